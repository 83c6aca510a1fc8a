"""Integer codes and scales from a fake-quantized weight: one reader for every method's quantizer.

Every weight quantizer in jpqbench -- uniform/LSQ, GETA and DJPQ's learned step (also with a
non-linear exponent, whose *outputs* are still ``d * integer``), DJPQ's folded gates (a
per-channel factor on such a grid), cwmpq's per-channel min/max grids, noncomm's
power-of-two fixed point -- outputs, per output channel, values ``scale * q`` with integers
``q`` spanning at most ``2**bits`` consecutive values. So the export does not ask the
quantizer for its step: it reads the grid off the *effective* weight the model computes with
(:meth:`jpqbench.nn.layers._Compressible.effective_weight`), using the plan's bit widths.

Per channel (:func:`channel_grid`): the scale is the smallest gap between the channel's
distinct values and 0, divided by the smallest ``j`` that puts every value on an integer,
refined by least squares over all values; the integers are stored as unsigned codes
``u = q - zero`` with ``zero = min q`` (so ``w = scale * (u + zero)``). The float32 scale is
then chosen among the nearest floats so that ``float32(scale * (u + zero))`` reproduces every
value *bit for bit*; where no float32 does (a value rounded twice in the quantizer, as with a
folded gate), the smallest error is kept and reported, never hidden.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jpqbench.base.errors import UserError

MAX_QUANT_BITS = 16  # larger widths are stored as float32 (32 bits)
_ZERO_RANGE = (-(2 ** 15), 2 ** 15 - 1)  # zero points are int16


@dataclass
class ChannelGrid:
    scale: float  # a float32 value
    zero: int  # int16
    codes: np.ndarray  # int64 in [0, 2**bits)
    max_error: float  # max |float32(scale * (codes + zero)) - value|; 0 when exact


def dequantize(scale: float, zero: int, codes: np.ndarray) -> np.ndarray:
    """``float32(scale * (codes + zero))``, exactly as the loader computes it."""
    return np.float32(scale) * (codes + zero).astype(np.float32)


def _grid_step(values: np.ndarray, bits: int) -> float | None:
    """A float64 step with every value an integer multiple of it, or None.

    Candidates are the smallest gap between values (0 included) divided by j = 1, 2, ...  A
    step read off one small gap is only as precise as float32 rounding allows: at 16 bits a gap
    of two steps between values of ~0.3 is off by ~1e-3, i.e. by dozens of steps at the largest
    value. So the largest value's step count is searched within that uncertainty (nearest
    first), each count giving a step that every value must then sit on.
    """
    distinct = np.unique(np.concatenate([values, [0.0]]))
    gap = float(np.diff(distinct).min())
    span = float(np.ptp(values))
    anchor = float(values[np.argmax(np.abs(values))])
    relative_error = 2 * float(np.spacing(np.float32(abs(anchor)))) / gap
    for j in range(1, 2 ** bits):
        rough = gap / j
        if j > 1 and span / rough > 2 ** bits - 0.5:  # finer steps than this need more than 2**bits levels
            return None
        count = abs(anchor) / rough
        radius = int(np.ceil(count * relative_error)) + 1
        for n in sorted(range(max(1, round(count) - radius), round(count) + radius + 1),
                        key=lambda n: abs(n - count)):
            step = abs(anchor) / n
            q = np.round(values / step)
            step = float((values * q).sum() / (q * q).sum())  # least squares over every value
            q = values / step
            # float32 values on a grid miss the integers by float32 rounding only: ~2^-24 relative
            if np.abs(q - np.round(q)).max() <= 2 ** -18 * max(np.abs(q).max(), 1.0):
                return step
    return None


def channel_grid(values: np.ndarray, bits: int) -> ChannelGrid:
    """Scale, zero point and ``bits``-bit codes of one channel's float32 values (see module doc)."""
    values64 = np.asarray(values, dtype=np.float32).astype(np.float64).reshape(-1)
    if not 1 <= bits <= MAX_QUANT_BITS:
        raise ValueError(f"quantized channels take 1..{MAX_QUANT_BITS} bits, got {bits}")
    if not values64.any():
        return ChannelGrid(1.0, 0, np.zeros(values64.size, dtype=np.int64), 0.0)
    step = _grid_step(values64, bits)
    if step is None:
        raise ValueError("the values are not on a uniform grid")
    q = np.round(values64 / step).astype(np.int64)
    zero = int(q.min())
    codes = q - zero
    if codes.max() >= 2 ** bits:
        raise ValueError(f"the values span {int(codes.max()) + 1} grid steps, more than 2**{bits}")
    if not _ZERO_RANGE[0] <= zero <= _ZERO_RANGE[1]:
        raise ValueError(f"zero point {zero} does not fit int16")
    best_scale, best_error = float(np.float32(step)), np.inf
    for candidate in _neighbours(np.float32(step)):
        error = float(np.abs(dequantize(candidate, zero, codes).astype(np.float64) - values64).max())
        if error < best_error:
            best_scale, best_error = float(candidate), error
        if error == 0.0:
            break
    return ChannelGrid(best_scale, zero, codes, best_error)


def _neighbours(value: np.float32, ulps: int = 4) -> list[np.float32]:
    """``value`` first, then the float32s up to ``ulps`` steps either side, nearest first."""
    out, up, down = [value], value, value
    for _ in range(ulps):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        out += [up, down]
    return out


def layer_grids(name: str, weight: np.ndarray, bits: list[int]) -> list[ChannelGrid | None]:
    """:func:`channel_grid` of every output channel whose width is in 1..16 bits (None otherwise)."""
    flat = weight.reshape(weight.shape[0], -1)
    grids: list[ChannelGrid | None] = []
    for channel, width in enumerate(bits):
        if not 0 < width <= MAX_QUANT_BITS:
            grids.append(None)
            continue
        try:
            grids.append(channel_grid(flat[channel], width))
        except ValueError as error:
            raise UserError(f"layer {name}, output channel {channel}: the weights cannot be stored at the plan's "
                            f"{width} bits ({error})",
                            "the plan's w_bits must be what the weight quantizer does (see jpqbench/accounting/plan.py)") from None
    return grids
