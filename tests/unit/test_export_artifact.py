"""The artifact of known plans: physical shapes and file size by hand, outputs equal to the masked
fake-quantized model, 0-bit channels that cannot be removed, and malformed files refused."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from jpqbench.accounting.counter import count
from jpqbench.accounting.plan import plan_from_model
from jpqbench.accounting.verify import verify_plan
from jpqbench.base.errors import UserError
from jpqbench.export.artifact import _PREFIX, from_bytes, to_bytes, to_model
from jpqbench.export.build import build_artifact
from jpqbench.models.zoo import digits_cnn, ds_cnn
from jpqbench.nn.channel_pruning import ChannelGroups, apply_masks
from jpqbench.nn.layers import compressible_layers, make_compressible, mask_batchnorm
from jpqbench.nn.quant import UniformQuantizer
from jpqbench.nn.uniform_quantization import calibrate, quantize_uniform

SHAPE = (1, 8, 8)


def _with_random_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so that folding is exercised."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def _batch(shape: tuple[int, ...] = SHAPE, n: int = 32) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(2)) * 4


def _export(model: nn.Module, shape: tuple[int, ...], name: str, classes: int = 10):
    batch = _batch(shape)
    plan = plan_from_model(model, "t")
    verify_plan(plan, model, batch)
    built = build_artifact(model, plan, name, classes, shape, batch)
    raw = to_bytes(built.artifact)
    built.size.header = 8 * (_PREFIX.size + _PREFIX.unpack_from(raw)[2])
    return plan, built, raw, batch


def _pruned_quantized_digits() -> nn.Module:
    torch.manual_seed(0)
    model = _with_random_bn(digits_cnn(10, SHAPE))
    apply_masks(model, ChannelGroups(model, SHAPE).masks(0.5))
    quantize_uniform(model, 4, 8)
    calibrate(model, [_batch()])
    return model.eval()


@pytest.fixture(scope="module")
def digits_export():
    """The pruned (half of every group), 4-bit-weight / 8-bit-input digits_cnn and its export."""
    model = _pruned_quantized_digits()
    return (model, *_export(model, SHAPE, "digits_cnn"))


def test_artifact_size_of_a_known_plan_equals_the_hand_count(digits_export) -> None:
    model, plan, built, raw, _ = digits_export
    # every group loses half its channels: 32 -> 16 (stem + first block, its body), 64 -> 32
    shapes = {"stem.0": (16, 1, 3, 3), "blocks.0.body.0": (16, 16, 3, 3), "blocks.0.body.3": (16, 16, 3, 3),
              "blocks.1.body.0": (32, 16, 3, 3), "blocks.1.body.3": (32, 32, 3, 3),
              "blocks.1.shortcut.0": (32, 16, 1, 1), "fc": (10, 32)}
    assert {layer.name: layer.shape for layer in built.artifact.layers} == shapes
    weights = sum(math.prod(shape) for shape in shapes.values())  # 19,408
    channels = sum(shape[0] for shape in shapes.values())  # 154
    codes = weights * 4 // 8  # 4-bit codes; every layer's stream is a whole number of bytes
    bit_widths = channels  # one byte per channel
    scales = channels * (4 + 2)  # float32 scale + int16 zero point
    biases = (channels - 10) * 4 + 10 * 4  # BN folded into the six convs, the classifier's own bias
    # 8-bit asymmetric inputs, stored affine: scale, zero, t0, step and 255 int16 threshold offsets
    assert all(layer.input.levels.numel() == 256 for layer in built.artifact.layers)
    tables = 7 * (4 + 4 + 8 + 8 + 255 * 2)
    header = _PREFIX.size + _PREFIX.unpack_from(raw)[2]
    assert len(raw) == header + codes + bit_widths + scales + biases + tables
    # the counter charges the codes and the classifier's bias; the rest is the stated overhead
    counted = count(model, SHAPE, plan).weight_bits
    assert counted == weights * 4 + 10 * 32 == built.size.counted
    assert built.size.total == 8 * len(raw)
    assert built.size.overhead == 8 * (header + bit_widths + scales + (channels - 10) * 4 + tables)


def test_exported_model_computes_what_the_masked_fake_quantized_model_does(digits_export) -> None:
    model, _, built, raw, batch = digits_export
    assert built.weight_max_error == 0.0  # codes reproduce every fake-quantized weight bit for bit
    exported = to_model(from_bytes(raw))
    with torch.no_grad():
        expected, got = model(batch), exported(batch)
    # BN folding rounds differently in float32, which can move an activation across a rounding
    # threshold of the next 8-bit quantizer: rare one-step flips, never a structural difference
    assert torch.allclose(got, expected, atol=1e-2 * float(expected.abs().max()))
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.95
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in model.parameters()) / 3


def test_a_float_pruned_model_matches_to_float_precision() -> None:
    torch.manual_seed(0)
    model = _with_random_bn(digits_cnn(10, SHAPE))
    apply_masks(model, ChannelGroups(model, SHAPE).masks(0.6))
    _, built, raw, batch = _export(model, SHAPE, "digits_cnn")
    exported = to_model(from_bytes(raw))
    assert all(set(layer.bits.tolist()) == {32} for layer in built.artifact.layers)
    with torch.no_grad():
        assert torch.allclose(exported(batch), model.eval()(batch), atol=1e-5, rtol=1e-4)


def test_depthwise_model_exports_physically_with_its_groups() -> None:
    shape = (1, 49, 10)
    torch.manual_seed(0)
    model = _with_random_bn(ds_cnn(12, shape))
    apply_masks(model, ChannelGroups(model, shape).masks(0.5))
    quantize_uniform(model, 4, 8)
    calibrate(model, [_batch(shape)])
    plan, built, raw, batch = _export(model.eval(), shape, "ds_cnn", 12)
    layers = {layer.name: layer for layer in built.artifact.layers}
    assert layers["blocks.0"].shape == (32, 1, 3, 3)  # the depthwise conv keeps its producer's 32 channels
    assert layers["blocks.3"].shape == (32, 32, 1, 1)
    assert built.size.counted == count(model, shape, plan).weight_bits and built.size.total == 8 * len(raw)
    exported = to_model(from_bytes(raw))
    with torch.no_grad():
        expected = model(batch)
        assert torch.allclose(exported(batch), expected, atol=1e-2 * float(expected.abs().max()))


def test_a_pruned_channel_whose_residual_partner_lives_stays_as_a_zero_bit_channel() -> None:
    torch.manual_seed(0)
    model = _with_random_bn(digits_cnn(10, SHAPE))
    quantize_uniform(model, 4, 8)
    calibrate(model, [_batch()])
    stem = compressible_layers(model)["stem.0"]
    stem.out_mask[3] = 0.0  # pruned in the stem only: its partner blocks.0.body.3 still writes channel 3
    mask_batchnorm(model.stem[1], (torch.arange(32) != 3).float())
    plan, built, raw, batch = _export(model.eval(), SHAPE, "digits_cnn")
    first = built.artifact.layers[0]
    assert built.artifact.removed == {}  # nothing can be removed physically
    assert first.shape[0] == 32 and first.bits[3] == 0 and len(first.codes[3]) == 0
    assert built.size.counted == count(model, SHAPE, plan).weight_bits  # the counter charges it nothing
    exported = to_model(from_bytes(raw))
    with torch.no_grad():
        expected = model(batch)
        assert torch.allclose(exported(batch), expected, atol=1e-2 * float(expected.abs().max()))


def test_per_channel_widths_are_stored_at_each_channels_width() -> None:
    torch.manual_seed(0)
    model = _with_random_bn(digits_cnn(10, SHAPE))
    widths = [2, 3, 4, 5, 6, 7, 8, 2, 3, 4]
    fc = compressible_layers(make_compressible(model))["fc"]
    with torch.no_grad():  # each classifier channel on its own grid, as cwmpq leaves them
        for channel, bits in enumerate(widths):
            quantizer = UniformQuantizer(bits)
            row = fc.weight[channel]
            quantizer.calibrate(row.min().view(1), row.max().view(1))
            fc.weight[channel] = quantizer.eval()(row)

    class _Widths(nn.Identity):
        bits = widths

    fc.weight_quantizer = _Widths()
    plan, built, raw, _ = _export(model.eval(), SHAPE, "digits_cnn")
    record = built.artifact.layers[-1]
    assert record.bits.tolist() == widths
    # against the same layer in float32: 64 x 10 x 32 bits of codes become 64 x sum(widths) bits + 10 scales
    assert _payload(to_bytes(_float_copy(built.artifact))) - _payload(raw) == 64 * 10 * 4 - 64 * sum(widths) // 8 - 10 * 6
    np.testing.assert_array_equal(record.weight().numpy(), fc.weight.detach().numpy())


def _payload(raw: bytes) -> int:
    return len(raw) - _PREFIX.size - _PREFIX.unpack_from(raw)[2]


def _float_copy(artifact):
    """The same artifact with the classifier stored as float32 (for the size difference above)."""
    import copy

    other = copy.deepcopy(artifact)
    record = other.layers[-1]
    weight = record.weight().numpy().reshape(record.shape[0], -1)
    record.codes = [row.astype(np.float32).view(np.uint32).astype(np.int64) for row in weight]
    record.bits = np.full(record.shape[0], 32, dtype=np.uint8)
    record.scales, record.zeros = np.zeros(0, np.float32), np.zeros(0, np.int16)
    return other


@pytest.mark.parametrize("corrupt, message", [
    (lambda raw: b"XXXX" + raw[4:], "not a jpqbench artifact"),
    (lambda raw: raw[:-10], "truncated"),
    (lambda raw: raw[:-1] + bytes([raw[-1] ^ 0xFF]), "checksum"),
    (lambda raw: raw[:4] + (9).to_bytes(2, "little") + raw[6:], "format version 9"),
    (lambda raw: raw[:5], "too short"),
])
def test_a_malformed_artifact_is_refused_with_a_clear_message(digits_export, corrupt, message: str) -> None:
    raw = digits_export[3]
    with pytest.raises(UserError, match=message) as error:
        from_bytes(corrupt(raw), "model.jpq")
    assert "model.jpq is malformed" in error.value.problem and "jpqbench export" in error.value.fix


def test_an_artifact_for_another_architecture_is_refused(digits_export) -> None:
    artifact = from_bytes(digits_export[3])
    artifact.model, artifact.input_shape = "resnet8", (3, 32, 32)
    with pytest.raises(UserError, match="does not fit resnet8|are not resnet8"):
        to_model(artifact)
