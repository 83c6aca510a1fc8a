"""Bit packing and reading codes off fake-quantized weights: exact round trips at every width."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from jpqbench.base.errors import UserError
from jpqbench.blocks.noncomm.qsparse import quantize_pow2
from jpqbench.export.codes import channel_grid, dequantize, layer_grids
from jpqbench.export.packing import pack, packed_size, unpack
from jpqbench.nn.learned_quant import LearnedQuantizer
from jpqbench.nn.quant import UniformQuantizer


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 32])
def test_pack_unpack_is_exact_at_every_width(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = [rng.integers(0, 2 ** bits, size=n, dtype=np.int64) for n in (1, 7, 9, 64)]
    # the extremes of the range are in every stream
    codes[0][:] = 2 ** bits - 1
    codes[1][0] = 0
    data = pack(codes, [bits] * 4)
    assert len(data) == packed_size([1, 7, 9, 64], [bits] * 4) == (81 * bits + 7) // 8
    for got, want in zip(unpack(data, [1, 7, 9, 64], [bits] * 4), codes):
        np.testing.assert_array_equal(got, want)


def test_per_channel_mixes_with_zero_bit_channels_round_trip() -> None:
    rng = np.random.default_rng(0)
    bits = [4, 0, 2, 8, 0, 3, 32, 5, 6, 7]
    n = 27
    codes = [rng.integers(0, 2 ** b, size=n, dtype=np.int64) if b else np.zeros(n, dtype=np.int64) for b in bits]
    data = pack(codes, bits)
    assert len(data) == (n * sum(bits) + 7) // 8  # 0-bit channels cost nothing
    for got, want in zip(unpack(data, [n] * len(bits), bits), codes):
        np.testing.assert_array_equal(got, want)


def test_stream_layout_is_lsb_first() -> None:
    # 3-bit codes 5 (101) and 3 (011): stream bits 1,0,1,1,1,0 -> byte 0b00011101
    assert pack([np.array([5, 3])], [3]) == bytes([0b00011101])


@pytest.mark.parametrize("codes, bits", [([4], 2), ([-1], 3), ([1], 0)])
def test_codes_that_do_not_fit_are_refused(codes: list[int], bits: int) -> None:
    with pytest.raises(ValueError):
        pack([np.array(codes)], [bits])


def test_unpack_refuses_a_wrong_length() -> None:
    with pytest.raises(ValueError, match="bytes of codes"):
        unpack(b"\x00" * 3, [8], [4])


def _assert_exact(values: torch.Tensor, bits: int) -> None:
    grid = channel_grid(values.numpy(), bits)
    assert grid.codes.min() >= 0 and grid.codes.max() < 2 ** bits
    assert grid.max_error == 0.0
    np.testing.assert_array_equal(dequantize(grid.scale, grid.zero, grid.codes), values.numpy())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_uniform_per_channel_weights_are_read_back_exactly(bits: int) -> None:
    weight = torch.randn(16, 8, 3, 3)
    quantizer = UniformQuantizer(bits, channels=16)
    flat = weight.reshape(16, -1)
    quantizer.calibrate(flat.amin(1), flat.amax(1))
    effective = quantizer.eval()(weight).reshape(16, -1)
    for row in effective:
        _assert_exact(row, bits)


def test_learned_nonlinear_and_pow2_weights_are_read_back_exactly() -> None:
    weight = torch.randn(200)
    learned = LearnedQuantizer(True, learn_exponent=True, init_bits=16)
    learned.initialize(weight)
    learned.t.data.fill_(0.7)  # a non-linear grid in x, but the outputs are still d * integers
    learned.freeze(5)
    _assert_exact(learned.eval()(weight).detach(), 5)
    _assert_exact(quantize_pow2(weight, 6, torch.tensor(3.0)), 6)  # includes -2^(b-1)


def test_a_few_values_on_a_16_bit_grid_are_read_back_exactly() -> None:
    """Nine weights of a 3x3 stem channel at 16 bits (a real djpq run): the smallest gap is three
    steps and the largest integer ~17,700, so a step read off the gap alone misplaces them."""
    step = np.float32(1.7134723748313263e-05)
    for levels in ([-11438, -1975, -17669, -11435, 1925, 7680, -13832, 8359, 12125],
                   [8449, 5384, 9586, 13956, -5622, -9450, -21839, -9452, -12604]):  # no small values
        _assert_exact(torch.from_numpy(step * np.array(levels, dtype=np.float32)), 16)


def test_values_off_a_uniform_grid_are_refused_with_the_layer_named() -> None:
    weight = np.array([[0.0, 1.0, 2.0, 3.0 + 1e-3]], dtype=np.float32)
    with pytest.raises(UserError, match="layer conv1, output channel 0"):
        layer_grids("conv1", weight, [4])
    wide = np.arange(20, dtype=np.float32).reshape(1, -1)  # 20 grid steps do not fit 4 bits
    with pytest.raises(UserError, match="more than 2\\*\\*4"):
        layer_grids("conv1", wide, [4])
