"""Activation quantizers exported as staircases: the same function, bit for bit."""
from __future__ import annotations

import pytest
import torch

from jpqbench.base.errors import UserError
from jpqbench.blocks.noncomm.qsparse import ActivationPQ
from jpqbench.export.staircase import Staircase, find_staircase, staircase_of
from jpqbench.nn.learned_quant import LearnedQuantizer
from jpqbench.nn.quant import UniformQuantizer


def _probe() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.cat([torch.randn(20000) * 4, torch.tensor([0.0, -0.0, 1e30, -1e30])])


def _uniform(bits: int, mode: str, learn: bool) -> UniformQuantizer:
    quantizer = UniformQuantizer(bits, mode, learn_step=learn)
    quantizer.calibrate(torch.tensor([-0.7]), torch.tensor([3.3]))
    return quantizer.eval()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_uniform_quantizers_become_exact_staircases(bits: int, mode: str) -> None:
    quantizer = _uniform(bits, mode, learn=False)
    x = _probe()
    table = staircase_of("layer l's input", quantizer, bits, x[:4096].view(4, 1024))
    assert table.levels.numel() == (2 ** bits - 1 if mode == "symmetric" else 2 ** bits)
    assert torch.equal(table(x), quantizer(x))


def test_learned_quantizer_with_an_exponent_becomes_an_exact_staircase() -> None:
    quantizer = LearnedQuantizer(None, learn_exponent=True, init_bits=16)
    quantizer.initialize_range(3.0, 0.0)  # unsigned (post-ReLU)
    quantizer.t.data.fill_(1.3)
    quantizer.freeze(4)
    quantizer.eval()
    x = _probe()
    table = staircase_of("layer l's input", quantizer, 4, x[:4096])
    assert table.levels.numel() <= 16
    assert torch.equal(table(x), quantizer(x))


def test_noncomm_activation_mask_is_kept_beside_the_steps() -> None:
    operator = ActivationPQ(torch.Size([2, 3, 3]), bits=4, decimals=range(0, 8), prunable=True)
    operator.mask.copy_((torch.arange(18) % 3 != 0).float().view(2, 3, 3))
    operator.quantizer.decimal.fill_(2.0)
    operator.quantizer.enabled.fill_(True)
    operator.eval()
    x = torch.randn(50, 2, 3, 3) * 3
    table = staircase_of("layer l's input", operator, 4, x)
    assert table.mask is not None and torch.equal(table.mask, operator.mask)
    assert torch.equal(table(x), operator(x))


def test_fast_lookup_equals_bucketize_even_for_crowded_thresholds() -> None:
    torch.manual_seed(1)
    for thresholds in (torch.linspace(-2, 3, 255), torch.sort(torch.randn(127) ** 3).values,
                       torch.sort(torch.cat([torch.randn(60) * 1e-6, torch.randn(60)])).values, torch.tensor([0.5])):
        table = Staircase(torch.arange(float(thresholds.numel() + 1)), thresholds)
        below, above = torch.nextafter(thresholds, torch.tensor(-1e30)), torch.nextafter(thresholds, torch.tensor(1e30))
        x = torch.cat([torch.randn(10000) * 3, thresholds, below, above, torch.tensor([1e30, -1e30, 0.0])])
        assert torch.equal(table.index(x).long(), torch.bucketize(x, thresholds, right=True))


def test_a_non_monotone_or_too_fine_function_is_refused() -> None:
    with pytest.raises(ValueError, match="more than 4 levels"):
        find_staircase(lambda x: torch.round(x * 3).clamp(-10, 10), 4)
    with pytest.raises(UserError, match="layer l's input"):
        staircase_of("layer l's input", _uniform(8, "asymmetric", learn=False), 4, torch.randn(100))


def _round_trip(table: Staircase) -> tuple[Staircase, dict, int]:
    import io

    from jpqbench.export.tables import decode, encode

    data, entry = encode(table)
    stream = io.BytesIO(data)
    back = decode(lambda n, what: stream.read(n), entry, "t")
    assert stream.read() == b""  # the decoder reads exactly what the encoder wrote
    return back, entry, len(data)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_tables_are_stored_affine_and_decode_bit_for_bit(bits: int) -> None:
    table = staircase_of("x", _uniform(bits, "asymmetric", learn=True), bits, _probe()[:4096])
    back, entry, size = _round_trip(table)
    assert entry["encoding"] == "affine" and size == 24 + 2 * (2 ** bits - 1)
    assert torch.equal(back.levels, table.levels) and torch.equal(back.thresholds, table.thresholds)


def test_nonuniform_and_masked_tables_are_stored_as_floats_and_decode_bit_for_bit() -> None:
    quantizer = LearnedQuantizer(True, learn_exponent=True, init_bits=16)
    quantizer.initialize_range(2.0, -2.0)
    quantizer.t.data.fill_(0.8)  # thresholds on a power curve: not affine
    quantizer.freeze(5)
    table = staircase_of("x", quantizer.eval(), 5, _probe()[:4096])
    table = Staircase(table.levels, table.thresholds, (torch.arange(12) % 2).float().view(3, 4))
    back, entry, size = _round_trip(table)
    assert entry["encoding"] == "float" and size == 4 * (2 * table.levels.numel() - 1) + 2
    assert torch.equal(back.levels, table.levels) and torch.equal(back.thresholds, table.thresholds)
    assert torch.equal(back.mask, table.mask)
