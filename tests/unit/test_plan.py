"""CompressionPlan: JSON round trip, refusal of malformed files, and verify_plan refusing lying plans."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from jpqbench.accounting.plan import CompressionPlan, LayerPlan, PlanMismatch, plan_from_model
from jpqbench.accounting.verify import verify_plan
from jpqbench.base.errors import UserError
from jpqbench.base.registry import MODELS
from jpqbench.nn.channel_pruning import ChannelGroups, apply_masks
from jpqbench.nn.layers import make_compressible, mask_batchnorm
from jpqbench.nn.quant import UniformQuantizer
from jpqbench.nn.uniform_quantization import calibrate, quantize_uniform

SHAPE = (1, 8, 8)


def _randomise_bn(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN statistics and affine terms, so an unmasked BN emits non-zero values."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=generator) + 0.5
            module.bias.data = torch.rand(n, generator=generator) + 0.1
            module.running_mean = torch.randn(n, generator=generator) * 0.1
            module.running_var = torch.rand(n, generator=generator) + 0.5


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def compressed(batch: torch.Tensor) -> nn.Module:
    """digits_cnn pruned by 25 % per group (masks) and quantized to 4-bit weights / 8-bit inputs."""
    torch.manual_seed(0)
    model = MODELS.get("digits_cnn")(10, SHAPE)
    _randomise_bn(model, torch.Generator().manual_seed(0))
    masks = ChannelGroups(model, SHAPE).masks(0.25)
    apply_masks(model, masks)
    quantize_uniform(model, 4, 8)
    calibrate(model, [batch])
    return model.eval()


# ---------------------------------------------------------------- JSON
def test_json_round_trip(tmp_path) -> None:
    plan = CompressionPlan({
        "conv": LayerPlan(out_channels=4, pruned=[1, 3], w_bits=[2, 0, 8, 4], a_bits=6, w_sparsity=0.25,
                          a_sparsity=0.5),
        "fc": LayerPlan(out_channels=10, w_bits=8, a_bits=8),
    }, method="mine", notes={"ratio": 0.5, "bits": 8})
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = CompressionPlan.load(path)
    assert loaded == plan
    assert loaded.layers["conv"].channel_bits() == [2, 0, 8, 0]
    assert CompressionPlan.from_dict(plan.to_dict()) == plan


def test_round_trip_of_a_plan_read_off_a_model(tmp_path, compressed: nn.Module) -> None:
    plan = plan_from_model(compressed, "t")
    plan.save(tmp_path / "plan.json")
    assert CompressionPlan.load(tmp_path / "plan.json") == plan


@pytest.mark.parametrize("text", ["{not json", "null", '{"method": "x"}', '{"layers": {"a": {"bogus": 1}}}',
                                  '{"layers": {"a": 5}}'],
                         ids=["syntax", "null", "no-layers", "unknown-field", "layer-not-object"])
def test_malformed_plan_is_a_user_error(tmp_path, text: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(UserError, match="malformed") as info:
        CompressionPlan.load(path)
    assert info.value.fix


def test_layers_not_a_mapping_is_a_user_error(tmp_path) -> None:
    """Regression: an AttributeError used to escape CompressionPlan.load."""
    path = tmp_path / "plan.json"
    path.write_text('{"layers": []}')
    with pytest.raises(UserError):
        CompressionPlan.load(path)


def test_invalid_values_are_a_user_error(tmp_path) -> None:
    path = tmp_path / "plan.json"
    for layer in ({"out_channels": 4, "pruned": [4]}, {"out_channels": 4, "w_bits": [8, 8]},
                  {"out_channels": 4, "a_bits": 0}, {"out_channels": 4, "w_sparsity": 1.0}):
        CompressionPlan({"c": LayerPlan(**layer)}).save(path)
        with pytest.raises(UserError, match="invalid"):
            CompressionPlan.load(path)


def test_missing_plan_file_is_a_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        CompressionPlan.load(tmp_path / "absent.json")


# ---------------------------------------------------------------- verify_plan: truthful plans pass
def test_truthful_pruned_and_quantized_plan_passes(compressed: nn.Module, batch: torch.Tensor) -> None:
    plan = plan_from_model(compressed, "t")
    assert any(layer.pruned for layer in plan.layers.values())
    assert all(layer.w_bits == 4 and layer.a_bits == 8 for layer in plan.layers.values())
    verify_plan(plan, compressed, batch)


def test_dense_plan_of_fp32_model_passes(batch: torch.Tensor) -> None:
    model = MODELS.get("digits_cnn")(10, SHAPE)
    verify_plan(CompressionPlan.dense(model), model, batch)


# ---------------------------------------------------------------- verify_plan: lying plans are refused
def test_refuses_claimed_pruned_channel_that_is_not_zero(compressed: nn.Module, batch: torch.Tensor) -> None:
    plan = plan_from_model(compressed, "t")
    layer = plan.layers["blocks.0.body.0"]
    alive = [c for c in range(layer.out_channels) if c not in layer.pruned]
    layer.pruned = sorted(layer.pruned + alive[:1])
    with pytest.raises(PlanMismatch, match="blocks.0.body.0: channels the plan calls pruned are not zero"):
        verify_plan(plan, compressed, batch)


class ConvBnConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def test_refuses_masked_conv_whose_batchnorm_is_not_masked() -> None:
    model = make_compressible(ConvBnConv())
    _randomise_bn(model, torch.Generator().manual_seed(0))
    model.conv1.out_mask[[2, 5]] = 0.0
    plan = plan_from_model(model, "t")
    assert plan.layers["conv1"].pruned == [2, 5]
    batch = torch.randn(4, 3, 6, 6)
    # the conv's weights are zero, but BN still emits its shifted bias on channels 2 and 5
    with pytest.raises(PlanMismatch, match="conv2: input channels that are pruned upstream are not zero at run time"):
        verify_plan(plan, model, batch)
    # masking the BN too makes the same plan true
    mask = torch.ones(8)
    mask[[2, 5]] = 0
    mask_batchnorm(model.bn, mask)
    verify_plan(plan, model, batch)


@pytest.fixture
def uniform8(batch: torch.Tensor) -> tuple[nn.Module, CompressionPlan]:
    """digits_cnn at 8-bit weights and inputs, calibrated, with its truthful plan."""
    model = MODELS.get("digits_cnn")(10, SHAPE)
    quantize_uniform(model, 8, 8)
    calibrate(model, [batch])
    return model, plan_from_model(model, "t")


def test_refuses_weight_bits_below_the_quantizer(uniform8, batch: torch.Tensor) -> None:
    model, plan = uniform8
    verify_plan(plan, model, batch)
    for layer in plan.layers.values():
        layer.w_bits = 4
    with pytest.raises(PlanMismatch, match=r"more than 2\*\*4 distinct weight values"):
        verify_plan(plan, model, batch)


def test_refuses_per_channel_weight_bits_below_the_quantizer(uniform8, batch: torch.Tensor) -> None:
    model, plan = uniform8
    layer = plan.layers["blocks.1.body.0"]
    layer.w_bits = [8] * layer.out_channels
    layer.w_bits[3] = 2
    with pytest.raises(PlanMismatch, match=r"blocks.1.body.0: channel 3 has more than 2\*\*2"):
        verify_plan(plan, model, batch)


def test_refuses_activation_bits_below_the_quantizer(uniform8, batch: torch.Tensor) -> None:
    model, plan = uniform8
    for layer in plan.layers.values():
        layer.a_bits = 4
    with pytest.raises(PlanMismatch, match=r"input takes more than 2\*\*4 distinct values"):
        verify_plan(plan, model, batch)


def test_refuses_quantized_claims_for_float_layers(batch: torch.Tensor) -> None:
    model = MODELS.get("digits_cnn")(10, SHAPE)
    plan = CompressionPlan.dense(model)
    plan.layers["blocks.0.body.0"].w_bits = 8
    with pytest.raises(PlanMismatch, match="distinct weight values"):
        verify_plan(plan, model, batch)
    plan = CompressionPlan.dense(model)
    plan.layers["blocks.0.body.0"].a_bits = 8
    with pytest.raises(PlanMismatch, match="distinct values"):
        verify_plan(plan, model, batch)


def test_refuses_claimed_sparsity_not_in_the_weights(compressed: nn.Module, batch: torch.Tensor) -> None:
    plan = plan_from_model(compressed, "t")
    plan.layers["blocks.1.body.0"].w_sparsity = 0.9
    with pytest.raises(PlanMismatch, match="claimed weight sparsity"):
        verify_plan(plan, compressed, batch)


def test_refuses_plan_for_other_layers(compressed: nn.Module, batch: torch.Tensor) -> None:
    plan = plan_from_model(compressed, "t")
    del plan.layers["fc"]
    with pytest.raises(PlanMismatch, match="missing"):
        verify_plan(plan, compressed, batch)


def test_quantizer_bits_are_read_into_the_plan() -> None:
    model = make_compressible(ConvBnConv())
    model.conv2.weight_quantizer = UniformQuantizer(3, channels=4)
    model.conv2.input_quantizer = UniformQuantizer(5, "asymmetric")
    plan = plan_from_model(model, "t")
    assert (plan.layers["conv2"].w_bits, plan.layers["conv2"].a_bits) == (3, 5)
    assert (plan.layers["conv1"].w_bits, plan.layers["conv1"].a_bits) == (32, 32)


class ConvHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_refuses_pruned_output_channel_that_still_emits_its_bias() -> None:
    """Regression: check 1 once looked at the weight only, so a last-layer output with no consumer
    (nothing downstream to catch it at run time) could be claimed pruned while emitting its bias."""
    model = ConvHead()
    with torch.no_grad():
        model.fc.weight[1] = 0.0
        model.fc.bias[1] = 5.0
    plan = CompressionPlan.dense(model)
    plan.layers["fc"].pruned = [1]
    batch = torch.randn(2, 1, 5, 5)
    assert (model(batch)[:, 1] == 5.0).all()  # the "pruned" class logit is not zero
    with pytest.raises(PlanMismatch):
        verify_plan(plan, model, batch)


def test_masked_bias_of_a_pruned_channel_passes() -> None:
    model = make_compressible(ConvHead())
    model.conv.out_mask[[0, 3]] = 0.0  # effective weight *and* bias are masked
    plan = plan_from_model(model, "t")
    assert plan.layers["conv"].pruned == [0, 3]
    verify_plan(plan, model, torch.randn(2, 1, 5, 5))


def test_refuses_zero_weight_bits_on_a_channel_not_pruned(uniform8, batch: torch.Tensor) -> None:
    """0 bits costs nothing in the counter, so only a pruned (and verified zero) channel may claim it."""
    model, plan = uniform8
    layer = plan.layers["blocks.1.body.0"]
    layer.w_bits = [8] * layer.out_channels
    layer.w_bits[3] = 0
    with pytest.raises(UserError, match=r"channels \[3\] have 0 weight bits but are not listed as pruned"):
        verify_plan(plan, model, batch)
