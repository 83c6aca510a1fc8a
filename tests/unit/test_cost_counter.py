"""The one cost counter (jpqbench.accounting.counter.count): hand-computed layers, pruning propagation,
known totals and a cross-check against torch's own FLOP counter."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from jpqbench.accounting.counter import count
from jpqbench.accounting.plan import CompressionPlan, LayerPlan, with_pruned, with_uniform_bits
from jpqbench.base.registry import MODELS
from jpqbench.pipeline.cli import main


def _plan(model: nn.Module, **layers: LayerPlan) -> CompressionPlan:
    plan = CompressionPlan.dense(model)
    plan.layers.update(layers)
    return plan


# ---------------------------------------------------------------- hand-computed single layers
def test_strided_padded_conv_by_hand() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1, bias=True)
    # H_out = floor((9 + 2*1 - 3) / 2) + 1 = 5
    macs = 5 * 5 * 3 * 3 * 3 * 8
    report = count(conv, (3, 9, 9))
    assert report.macs == macs == 5400
    assert report.dense_macs == macs
    assert report.bops == macs * 32 * 32
    assert report.weight_bits == (8 * 3 * 3 * 3) * 32 + 8 * 32  # weights + 32-bit biases
    assert report.params == 8 * 27 + 8

    quant = count(conv, (3, 9, 9), with_uniform_bits(CompressionPlan.dense(conv), 4, 8))
    assert quant.macs == macs
    assert quant.bops == macs * 4 * 8
    assert quant.weight_bits == (8 * 27) * 4 + 8 * 32  # biases stay 32-bit
    assert quant.relative_bops == pytest.approx(4 * 8 / 1024)


def test_activation_peak_is_the_largest_input_tensor_in_bits() -> None:
    """Input channels x H_in x W_in (not the strided output size) x a_bits; regression: pixels were left out."""
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    assert count(conv, (3, 9, 9)).activation_bits_peak == 3 * 9 * 9 * 32
    quant = count(conv, (3, 9, 9), with_uniform_bits(CompressionPlan.dense(conv), 4, 8))
    assert quant.activation_bits_peak == 3 * 9 * 9 * 8


def test_activation_peak_of_linear_input() -> None:
    fc = nn.Linear(20, 7)
    assert count(fc, (20,)).activation_bits_peak == 20 * 32
    assert count(fc, (20,), with_uniform_bits(CompressionPlan.dense(fc), 4, 8)).activation_bits_peak == 20 * 8


def test_grouped_conv_by_hand() -> None:
    conv = nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=2, bias=False)
    # each output channel sees the 4/2 = 2 input channels of its group
    macs = 6 * 6 * 3 * 3 * 2 * 6
    report = count(conv, (4, 6, 6))
    assert report.macs == macs == 3888
    assert report.weight_bits == 6 * 2 * 9 * 32
    assert report.params == conv.weight.numel() == 108


def test_depthwise_conv_by_hand() -> None:
    conv = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=8, bias=False)
    macs = 5 * 5 * 3 * 3 * 1 * 8
    report = count(conv, (8, 5, 5))
    assert report.macs == macs == 1800
    assert count(conv, (8, 5, 5), with_uniform_bits(CompressionPlan.dense(conv), 4, 8)).bops == macs * 4 * 8


def test_linear_by_hand() -> None:
    fc = nn.Linear(20, 7)
    report = count(fc, (20,))
    assert report.macs == 20 * 7
    assert report.bops == 140 * 32 * 32
    assert report.weight_bits == 140 * 32 + 7 * 32
    assert report.params == 147 and report.kept_params == 147
    quant = count(fc, (20,), with_uniform_bits(CompressionPlan.dense(fc), 4, 8))
    assert quant.bops == 140 * 4 * 8
    assert quant.weight_bits == 140 * 4 + 7 * 32


def test_per_channel_weight_bits() -> None:
    conv = nn.Conv2d(2, 4, kernel_size=1, bias=True)
    pixels, fan_in = 3 * 3, 2
    plan = _plan(conv, **{"": LayerPlan(out_channels=4, w_bits=[2, 4, 8, 16], a_bits=8)})
    report = count(conv, (2, 3, 3), plan)
    assert report.macs == 4 * pixels * fan_in
    assert report.bops == sum(pixels * fan_in * b * 8 for b in (2, 4, 8, 16))
    assert report.weight_bits == sum(fan_in * b + 32 for b in (2, 4, 8, 16))

    # a pruned channel costs nothing; its entry in the per-channel list is ignored
    plan.layers[""].pruned = [3]
    pruned = count(conv, (2, 3, 3), plan)
    assert pruned.macs == 3 * pixels * fan_in
    assert pruned.bops == sum(pixels * fan_in * b * 8 for b in (2, 4, 8))
    assert pruned.weight_bits == sum(fan_in * b + 32 for b in (2, 4, 8))
    assert pruned.kept_params == 3 * (fan_in + 1)
    assert pruned.params == 4 * (fan_in + 1)  # dense count is unchanged


def test_unstructured_sparsity_reduces_nonzero_params_only() -> None:
    fc = nn.Linear(10, 10, bias=False)
    plan = _plan(fc, **{"": LayerPlan(out_channels=10, w_sparsity=0.5)})
    report = count(fc, (10,), plan)
    assert report.nonzero_params == pytest.approx(50)
    assert report.macs == 100  # dense BOPs convention: sparsity is not taken out of MACs


# ---------------------------------------------------------------- pruning propagation
class ConvBnConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.bn(self.conv1(x))))


def test_activation_peak_counts_alive_channels_only() -> None:
    model = ConvBnConv()
    plan = with_uniform_bits(with_pruned(CompressionPlan.dense(model), {"conv1": [0, 2, 4, 6]}), 8, 8)
    # the largest input is conv2's: 8 - 4 = 4 alive channels of 6x6 (> conv1's 3 channels of 6x6)
    assert count(model, (3, 6, 6), plan).activation_bits_peak == 4 * 36 * 8
    assert count(model, (3, 6, 6)).activation_bits_peak == 8 * 36 * 32  # dense: all 8 channels, FP32


def test_pruning_propagates_through_bn_relu() -> None:
    model = ConvBnConv()
    shape, pixels, k = (3, 6, 6), 36, 3
    dense = count(model, shape)
    assert dense.macs == pixels * 9 * 3 * 8 + pixels * 9 * 8 * 16
    pruned = count(model, shape, with_pruned(CompressionPlan.dense(model), {"conv1": [0, 2, 5]}))
    conv1_drop = k * pixels * 9 * 3
    conv2_drop = pixels * 9 * k * 16  # conv2 loses k dead input channels on every output channel
    assert dense.macs - pruned.macs == conv1_drop + conv2_drop
    assert dense.weight_bits - pruned.weight_bits == (k * 27 + 16 * k * 9) * 32
    assert pruned.kept_params == dense.params - k * 27 - 16 * k * 9


class GroupedConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 1, bias=False)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def test_pruning_into_grouped_conv_only_reduces_its_group() -> None:
    model = GroupedConsumer()
    shape, pixels = (1, 4, 4), 16
    pruned = count(model, shape, with_pruned(CompressionPlan.dense(model), {"conv1": [0]}))
    conv1 = 3 * pixels * 1
    # group 0 (outputs 0..2) sees inputs {0, 1}: input 0 is dead -> fan-in 1; group 1 keeps 2
    conv2 = pixels * 9 * (3 * 1 + 3 * 2)
    assert pruned.macs == conv1 + conv2


class Residual(nn.Module):
    """stem -> two branches added -> consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 5, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return self.head(torch.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x))))


def test_residual_add_one_branch_pruned_keeps_channel_alive() -> None:
    model = Residual()
    shape, pixels = (3, 5, 5), 25
    dense = count(model, shape)
    one = count(model, shape, with_pruned(CompressionPlan.dense(model), {"a": [2]}))
    # only branch a's own channel goes; the head still reads channel 2 (from branch b)
    assert dense.macs - one.macs == pixels * 9 * 4


def test_residual_add_both_branches_pruned_kills_channel() -> None:
    model = Residual()
    shape, pixels = (3, 5, 5), 25
    dense = count(model, shape)
    both = count(model, shape, with_pruned(CompressionPlan.dense(model), {"a": [2], "b": [2]}))
    drop = pixels * 9 * 4 + pixels * 1 * 4 + pixels * 9 * 1 * 5  # a's channel, b's channel, head's input
    assert dense.macs - both.macs == drop


class ConvFlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def test_pruning_propagates_through_flatten() -> None:
    model = ConvFlattenLinear()
    shape = (1, 3, 3)
    dense = count(model, shape)
    pruned = count(model, shape, with_pruned(CompressionPlan.dense(model), {"conv": [1]}))
    # one conv channel = 9 flattened features of every one of the 10 outputs
    assert dense.macs - pruned.macs == 9 * 9 * 1 + 9 * 10
    assert dense.params - pruned.kept_params == 9 + 9 * 10


# ---------------------------------------------------------------- known totals
def _flop_counter_macs(model: nn.Module, shape: tuple[int, ...]) -> float:
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.randn(1, *shape))
    return counter.get_total_flops() / 2


def _weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_torchvision_resnet18_is_1_82_gmacs() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None)
    report = count(model, (3, 224, 224))
    assert report.macs == pytest.approx(1.82e9, rel=0.005)
    assert report.params == sum(p.numel() for n, p in model.named_parameters() if "bn" not in n
                                and "downsample.1" not in n)  # conv/linear weights + fc bias


def test_resnet8_mlperf_tiny_totals() -> None:
    model = MODELS.get("resnet8")(10, (3, 32, 32))
    report = count(model, (3, 32, 32))
    assert report.macs == pytest.approx(12.5e6, rel=0.005)
    assert _weights(model) == 77_360
    biases = sum(m.bias.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None)
    assert report.params - biases == 77_360


class Depthwise(nn.Module):
    """MobileNet-style: stem, depthwise 3x3 stride 2, pointwise, pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, 2, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@pytest.mark.parametrize("build, shape", [
    (lambda: MODELS.get("resnet8")(10, (3, 32, 32)), (3, 32, 32)),
    (lambda: MODELS.get("resnet20")(10, (3, 32, 32)), (3, 32, 32)),
    (lambda: MODELS.get("digits_cnn")(10, (1, 8, 8)), (1, 8, 8)),
    (Depthwise, (3, 16, 16)),
], ids=["resnet8", "resnet20", "digits_cnn", "depthwise"])
def test_dense_macs_match_torch_flop_counter(build, shape) -> None:
    model = build()
    assert count(model, shape).macs == _flop_counter_macs(model, shape)


def test_dense_plan_is_relative_one() -> None:
    model = MODELS.get("digits_cnn")(10, (1, 8, 8))
    for plan in (None, CompressionPlan.dense(model)):
        report = count(model, (1, 8, 8), plan)
        assert report.relative_bops == 1.0 and report.relative_size == 1.0
        assert report.bops == report.macs * 32 * 32


def test_plan_with_unknown_layer_is_refused() -> None:
    model = ConvBnConv()
    plan = CompressionPlan.dense(model)
    plan.layers["nope"] = LayerPlan(out_channels=3)
    with pytest.raises(ValueError, match="nope"):
        count(model, (3, 6, 6), plan)


def test_cli_cost_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["cost", "--model", "resnet8", "--input-shape", "3", "32", "32", "--num-classes", "10",
                 "--w-bits", "4", "--a-bits", "4", "--json"])
    assert code == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["relative_bops"] == pytest.approx(16 / 1024)
    assert figures["macs"] == figures["dense_macs"] == pytest.approx(12.5e6, rel=0.005)
