"""Bit packing: unsigned integer codes of any width from 1 to 32 bits into a little-endian bit stream.

A layer's codes are one stream: channel after channel, each channel's codes at that channel's
own bit width (per-layer widths are the special case of equal widths; a 0-bit channel adds
nothing). Code ``k`` of width ``b`` occupies the next ``b`` bits of the stream, least
significant bit first, and bit ``i`` of the stream is bit ``i % 8`` of byte ``i // 8``
(numpy's ``bitorder="little"``). The stream is zero-padded to a whole byte, so a layer costs
``ceil(sum of code bits / 8)`` bytes -- the only packing overhead, at most 7 bits per layer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_BITS = 32


def _check(codes: np.ndarray, bits: int) -> None:
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"bit width {bits} outside [0, {MAX_BITS}]")
    if codes.size and (codes.min() < 0 or (bits < MAX_BITS and codes.max() >= 1 << bits)):
        raise ValueError(f"codes outside [0, 2**{bits}) cannot be packed at {bits} bits")


def pack(channels: Sequence[np.ndarray], bits: Sequence[int]) -> bytes:
    """Pack ``channels[c]`` (non-negative integer codes) at ``bits[c]`` bits each into one stream."""
    if len(channels) != len(bits):
        raise ValueError(f"{len(channels)} code arrays for {len(bits)} bit widths")
    streams = []
    for codes, width in zip(channels, bits):
        codes = np.asarray(codes, dtype=np.int64).reshape(-1)
        _check(codes, int(width))
        if width == 0:
            if codes.any():
                raise ValueError("a 0-bit channel can only hold zeros")
            continue
        shifts = np.arange(width, dtype=np.int64)
        streams.append(((codes[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1))
    stream = np.concatenate(streams) if streams else np.zeros(0, dtype=np.uint8)
    return np.packbits(stream, bitorder="little").tobytes()


def packed_size(counts: Sequence[int], bits: Sequence[int]) -> int:
    """Bytes :func:`pack` writes for channels of ``counts[c]`` codes at ``bits[c]`` bits."""
    total = sum(int(n) * int(b) for n, b in zip(counts, bits))
    return (total + 7) // 8


def unpack(data: bytes, counts: Sequence[int], bits: Sequence[int]) -> list[np.ndarray]:
    """Inverse of :func:`pack`: ``counts[c]`` codes of ``bits[c]`` bits per channel (int64 arrays).

    A 0-bit channel reads back as ``counts[c]`` zeros. ``data`` must be exactly
    :func:`packed_size` bytes long.
    """
    if len(data) != packed_size(counts, bits):
        raise ValueError(f"{len(data)} bytes of codes, expected {packed_size(counts, bits)}")
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little").astype(np.int64)
    out, start = [], 0
    for n, width in zip(counts, bits):
        n, width = int(n), int(width)
        if width == 0:
            out.append(np.zeros(n, dtype=np.int64))
            continue
        chunk = stream[start:start + n * width].reshape(n, width)
        out.append((chunk << np.arange(width, dtype=np.int64)).sum(axis=1))
        start += n * width
    return out
