"""How an activation staircase is stored: compactly when its steps are uniform, else as plain floats.

Two encodings of a :class:`~jpqbench.export.staircase.Staircase` with ``L`` levels:

* ``"affine"`` (24 + 2 (L - 1) bytes): the levels are ``float32(scale * (i + zero))`` for
  ``i = 0 .. L-1`` (float32 ``scale``, int32 ``zero``), and each threshold is its *prediction*
  ``float32(t0 + i * step)`` (float64 ``t0``, ``step`` and arithmetic) moved by an int16
  number of float32 values (``offset``: the exact threshold of a rounding quantizer lies near
  the straight line, up to the float32 error of its own arithmetic). Uniform, LSQ and PACT
  quantizers are stored this way -- 534 bytes for an 8-bit input instead of 2,044.
* ``"float"`` (4 L + 4 (L - 1) bytes): levels and thresholds as float32 -- learned quantizers
  with an exponent (steps not uniform), power-of-two truncation (a dead zone twice as wide
  around 0), or anything the affine form does not reproduce.

The encoder decodes what it wrote and keeps the affine form only if every level and threshold
comes back bit for bit. An optional 0/1 mask (noncomm's activation pruning) follows either
encoding as a bitmap, least significant bit first.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from jpqbench.export.codes import MAX_QUANT_BITS, channel_grid
from jpqbench.export.staircase import Staircase, _from_key, _to_key


def _predicted(t0: float, step: float, count: int) -> torch.Tensor:
    """float32(t0 + i * step), computed in float64 (deterministic, and close to each threshold)."""
    return torch.from_numpy((t0 + np.arange(count, dtype=np.float64) * step).astype(np.float32))


def _affine_levels(count: int, scale: float, zero: int) -> torch.Tensor:
    return torch.tensor(scale, dtype=torch.float32) * (torch.arange(count, dtype=torch.float32) + float(zero))


def _affine(table: Staircase) -> bytes | None:
    """The affine encoding of ``table`` (levels and thresholds, not the mask), or None."""
    levels, thresholds = table.levels, table.thresholds
    count = levels.numel()
    if count < 2 or math.ceil(math.log2(count)) > MAX_QUANT_BITS:
        return None
    try:
        grid = channel_grid(levels.numpy(), max(1, math.ceil(math.log2(count))))
    except ValueError:
        return None
    if grid.max_error != 0.0 or not np.array_equal(grid.codes, np.arange(count)):
        return None
    if not torch.equal(_affine_levels(count, grid.scale, grid.zero), levels):
        return None
    t0 = float(thresholds[0])
    step = (float(thresholds[-1]) - t0) / max(count - 2, 1)
    offsets = _to_key(thresholds) - _to_key(_predicted(t0, step, count - 1))
    if offsets.abs().max() > 2 ** 15 - 1:
        return None
    return (np.array([grid.scale], "<f4").tobytes() + np.array([grid.zero], "<i4").tobytes()
            + np.array([t0, step], "<f8").tobytes() + offsets.numpy().astype("<i2").tobytes())


def _with_mask(table: Staircase, data: bytes, encoding: str) -> tuple[bytes, dict]:
    if table.mask is not None:
        data += np.packbits(table.mask.numpy().reshape(-1).astype(np.uint8), bitorder="little").tobytes()
    return data, {"levels": table.levels.numel(), "encoding": encoding,
                  "mask_shape": None if table.mask is None else list(table.mask.shape)}


def encode(table: Staircase) -> tuple[bytes, dict]:
    """``(payload bytes, header entry)`` of ``table``; the entry holds ``levels``, ``encoding``, ``mask_shape``."""
    affine = _affine(table)
    if affine is not None:
        data, entry = _with_mask(table, affine, "affine")
        if _round_trips(table, data, entry):
            return data, entry
    floats = table.levels.numpy().astype("<f4").tobytes() + table.thresholds.numpy().astype("<f4").tobytes()
    return _with_mask(table, floats, "float")


def _round_trips(table: Staircase, data: bytes, entry: dict) -> bool:
    offset = 0

    def take(n: int, what: str) -> bytes:
        nonlocal offset
        offset += n
        return data[offset - n:offset]

    back = decode(take, entry, "check")
    return torch.equal(back.levels, table.levels) and torch.equal(back.thresholds, table.thresholds)


def decode(take: Callable[[int, str], bytes], entry: dict, what: str) -> Staircase:
    """The staircase of a header ``entry``; ``take(n, what)`` returns the next ``n`` payload bytes."""
    count, encoding = int(entry["levels"]), entry.get("encoding", "float")
    if encoding == "affine":
        if count < 2:
            raise ValueError(f"{what}: an affine table needs at least 2 levels")
        scale = float(np.frombuffer(take(4, f"{what} scale"), "<f4")[0])
        zero = int(np.frombuffer(take(4, f"{what} zero point"), "<i4")[0])
        t0, step = (float(v) for v in np.frombuffer(take(16, f"{what} thresholds"), "<f8"))
        offsets = torch.from_numpy(np.frombuffer(take(2 * (count - 1), f"{what} offsets"), "<i2").astype(np.int64))
        levels = _affine_levels(count, scale, zero)
        thresholds = _from_key(_to_key(_predicted(t0, step, count - 1)) + offsets)
    elif encoding == "float":
        levels = torch.from_numpy(np.frombuffer(take(4 * count, f"{what} levels"), "<f4").copy())
        thresholds = torch.from_numpy(np.frombuffer(take(4 * max(count - 1, 0), f"{what} thresholds"), "<f4").copy())
    else:
        raise ValueError(f"{what}: unknown table encoding {encoding!r}")
    mask = None
    if entry["mask_shape"] is not None:
        shape = tuple(int(s) for s in entry["mask_shape"])
        size = math.prod(shape)
        bits = np.unpackbits(np.frombuffer(take((size + 7) // 8, f"{what} mask"), "u1"), bitorder="little")
        mask = torch.from_numpy(bits[:size].astype(np.float32).reshape(shape))
    return Staircase(levels, thresholds, mask)


def encoded_bits(table: Staircase) -> int:
    """Bits :func:`encode` writes for ``table``."""
    return 8 * len(encode(table)[0])
