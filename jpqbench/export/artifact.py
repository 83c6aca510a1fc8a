"""The compressed-artifact file format (``model.jpq``), its writer, reader and loader.

Layout (all numbers little-endian)::

    offset 0   4 bytes   magic b"JPQA"
           4   uint16    format version (1)
           6   uint32    H = length of the header
          10   H bytes   header: UTF-8 JSON (below)
      10 + H   payload   one block per layer, in header order (below); exactly
                         header["payload_bytes"] bytes, CRC-32 header["payload_crc32"]

Header keys: ``format`` ("jpqbench-artifact"), ``version``, ``model`` (model-zoo name),
``num_classes``, ``input_shape``, ``removed`` (per conv/linear layer, the original indices of
the output channels physically removed -- the loader removes them again with torch-pruning,
dependency groups included, and folds BN away: :mod:`jpqbench.export.physical`),
``payload_bytes``, ``payload_crc32``, and ``layers``: per conv/linear layer in module order,
``name``, ``shape`` (the weight's shape after removal), ``bias`` (bool), and ``input``: null,
or ``{"levels": L, "encoding": "affine" | "float", "mask_shape": [...] | null}`` for a
quantized (or masked) layer input; ``L = 0`` marks a float input that is only masked.
``operators``: activation operators on the input of other modules (noncomm's P+Q before a
ReLU), ``{"module": name, "levels": L, "encoding": ..., "mask_shape": ...}`` each; their
tables follow the last layer block, in header order.

Layer block, for a weight of shape ``(C, ...)`` with ``n = numel / C`` weights per channel:

    C bytes              uint8 bit width of each output channel: 0 (all-zero channel, no codes),
                         1..16 (quantized), 32 (float32)
    4 * Q bytes          float32 scale of each quantized channel (Q = channels with 1..16 bits)
    2 * Q bytes          int16 zero point of each quantized channel
    4 * C bytes          float32 bias, if ``bias`` (BN folded in)
    ceil(S / 8) bytes    the codes: channel after channel, ``n`` codes of ``b_c`` bits each,
                         LSB first (``S = n * sum b_c``; :mod:`jpqbench.export.packing`); a float32
                         channel's codes are its IEEE-754 bit patterns
    if ``input``:  a table -- the input quantizer as a staircase (:mod:`jpqbench.export.staircase`):
                   "affine": float32 scale, int32 zero, float64 t0 and step, int16 offsets of
                   the L - 1 thresholds; "float": 4 * L bytes levels and 4 * max(L - 1, 0) bytes
                   thresholds (:mod:`jpqbench.export.tables`); then ceil(M / 8) bytes of 0/1
                   activation mask (M = prod(mask_shape), packed LSB first) when ``mask_shape``
                   is not null

    then one table per operator, as above.

A quantized weight is ``float32(scale * (code + zero))`` (BN's per-channel factor is already in
``scale``). Everything but the codes and the counted biases is overhead with respect to the
cost counter's ``weight_bits`` (:class:`jpqbench.export.build.SizeBreakdown` computes it exactly).
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jpqbench.base import atomic
from jpqbench.base.errors import UserError
from jpqbench.export.packing import pack, packed_size, unpack
from jpqbench.export.physical import batchnorm_pairs, build, prune_physically, strip_batchnorm
from jpqbench.export.staircase import Staircase
from jpqbench.export.tables import decode, encode
from jpqbench.nn.layers import compressible_layers, make_compressible

MAGIC = b"JPQA"
VERSION = 1
FORMAT = "jpqbench-artifact"
_PREFIX = struct.Struct("<4sHI")
FLOAT_BITS = 32
VALID_BITS = set(range(0, 17)) | {FLOAT_BITS}


@dataclass
class LayerRecord:
    """One conv/linear layer of an artifact, as stored (codes per output channel)."""

    name: str
    shape: tuple[int, ...]
    bits: np.ndarray  # uint8 per output channel
    scales: np.ndarray  # float32 per quantized channel
    zeros: np.ndarray  # int16 per quantized channel
    bias: np.ndarray | None  # float32 per output channel
    codes: list[np.ndarray]  # int64 codes per output channel (empty for 0 bits)
    input: Staircase | None = None

    @property
    def per_channel(self) -> int:
        return math.prod(self.shape[1:])

    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight."""
        rows = np.zeros((self.shape[0], self.per_channel), dtype=np.float32)
        q = 0
        for channel, width in enumerate(self.bits.tolist()):
            if width == FLOAT_BITS:
                rows[channel] = self.codes[channel].astype(np.uint32).view(np.float32)
            elif width:
                rows[channel] = self.scales[q] * (self.codes[channel] + int(self.zeros[q])).astype(np.float32)
                q += 1
        return torch.from_numpy(rows.reshape(self.shape))


@dataclass
class Artifact:
    model: str
    num_classes: int
    input_shape: tuple[int, ...]
    removed: dict[str, list[int]]
    layers: list[LayerRecord] = field(default_factory=list)
    operators: dict[str, Staircase] = field(default_factory=dict)  # module name -> staircase on its input


class InputStaircase(nn.Module):
    """``module(staircase(x))``: an activation operator in front of a module (noncomm's pre-ReLU P+Q)."""

    def __init__(self, staircase: Staircase, module: nn.Module) -> None:
        super().__init__()
        self.staircase, self.module = staircase, module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self.staircase(x))


def _layer_bytes(layer: LayerRecord) -> tuple[bytes, dict]:
    parts = [layer.bits.astype("u1").tobytes(), layer.scales.astype("<f4").tobytes(),
             layer.zeros.astype("<i2").tobytes()]
    if layer.bias is not None:
        parts.append(layer.bias.astype("<f4").tobytes())
    parts.append(pack(layer.codes, layer.bits.tolist()))
    entry = {"name": layer.name, "shape": list(layer.shape), "bias": layer.bias is not None, "input": None}
    if layer.input is not None:
        table, entry["input"] = encode(layer.input)
        parts.append(table)
    return b"".join(parts), entry


def to_bytes(artifact: Artifact) -> bytes:
    blocks, entries = zip(*[_layer_bytes(layer) for layer in artifact.layers]) if artifact.layers else ((), ())
    operators = []
    for name, table in artifact.operators.items():
        block, entry = encode(table)
        blocks += (block,)
        operators.append({"module": name, **entry})
    payload = b"".join(blocks)
    header = {"format": FORMAT, "version": VERSION, "model": artifact.model, "num_classes": artifact.num_classes,
              "input_shape": list(artifact.input_shape), "removed": artifact.removed, "layers": list(entries),
              "operators": operators, "payload_bytes": len(payload), "payload_crc32": zlib.crc32(payload)}
    text = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(text)) + text + payload


def write(artifact: Artifact, path: Path) -> int:
    """Write ``artifact`` to ``path`` atomically; return its size in bytes."""
    data = to_bytes(artifact)
    atomic.write_bytes(path, data)
    return len(data)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def take(self, n: int, what: str) -> bytes:
        if self.offset + n > len(self.data):
            raise ValueError(f"payload ends inside {what}")
        chunk = self.data[self.offset:self.offset + n]
        self.offset += n
        return chunk

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(np.dtype(dtype).itemsize * count, what), dtype=dtype).copy()


def _parse_layer(reader: _Reader, entry: dict) -> LayerRecord:
    name, shape = str(entry["name"]), tuple(int(s) for s in entry["shape"])
    bits = reader.array("u1", shape[0], f"{name}: bit widths")
    if not set(bits.tolist()) <= VALID_BITS:
        raise ValueError(f"{name}: bit widths {sorted(set(bits.tolist()) - VALID_BITS)} are not 0..16 or 32")
    quantized = int(((bits > 0) & (bits < FLOAT_BITS)).sum())
    scales = reader.array("<f4", quantized, f"{name}: scales")
    zeros = reader.array("<i2", quantized, f"{name}: zero points")
    bias = reader.array("<f4", shape[0], f"{name}: bias") if entry["bias"] else None
    n = math.prod(shape[1:])
    counts = [n] * shape[0]
    codes = unpack(reader.take(packed_size(counts, bits.tolist()), f"{name}: codes"), counts, bits.tolist())
    table = None if entry["input"] is None else _parse_table(reader, entry["input"], f"{name}: input")
    return LayerRecord(name, shape, bits, scales, zeros, bias, codes, table)


def _parse_table(reader: _Reader, entry: dict, what: str) -> Staircase:
    return decode(reader.take, entry, what)


def from_bytes(data: bytes, source: str = "artifact") -> Artifact:
    """Parse and check an artifact; any inconsistency is a :class:`UserError` naming it."""
    fix = "re-export the run with `jpqbench export --run-dir <run folder>`"
    try:
        if len(data) < _PREFIX.size:
            raise ValueError("file too short")
        magic, version, header_len = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise ValueError(f"not a jpqbench artifact (magic {magic!r})")
        if version != VERSION:
            raise ValueError(f"format version {version}, this jpqbench reads {VERSION}")
        header = json.loads(data[_PREFIX.size:_PREFIX.size + header_len].decode())
        payload = data[_PREFIX.size + header_len:]
        if header.get("format") != FORMAT:
            raise ValueError("header is not a jpqbench-artifact header")
        if len(payload) != header["payload_bytes"]:
            raise ValueError(f"payload is {len(payload)} bytes, the header says {header['payload_bytes']} (truncated?)")
        if zlib.crc32(payload) != header["payload_crc32"]:
            raise ValueError("payload checksum mismatch (corrupted file)")
        reader = _Reader(payload)
        layers = [_parse_layer(reader, entry) for entry in header["layers"]]
        operators = {str(entry["module"]): _parse_table(reader, entry, f"operator {entry['module']}:")
                     for entry in header["operators"]}
        if reader.offset != len(payload):
            raise ValueError(f"{len(payload) - reader.offset} bytes left after the last layer")
        return Artifact(str(header["model"]), int(header["num_classes"]), tuple(header["input_shape"]),
                        {str(k): [int(i) for i in v] for k, v in header["removed"].items()}, layers, operators)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as error:
        problem = f"KeyError {error}" if isinstance(error, KeyError) else str(error)
        raise UserError(f"{source} is malformed: {problem}", fix) from None


def read(path: Path) -> Artifact:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"artifact {path} does not exist", "export the run with `jpqbench export --run-dir <run folder>`")
    return from_bytes(path.read_bytes(), str(path))


@torch.no_grad()
def to_model(artifact: Artifact, quantize_inputs: bool = True) -> nn.Module:
    """The runnable model: zoo architecture, channels removed, BN folded, weights dequantized.

    With ``quantize_inputs`` every conv/linear is made compressible and its input quantizer is
    the stored staircase (the model computes what the fake-quantized model did); without, it is
    the plain float32 physical model (what the latency is measured on).
    """
    model = build(artifact.model, artifact.num_classes, artifact.input_shape)
    pairs = batchnorm_pairs(model)
    prune_physically(model, artifact.input_shape, artifact.removed)
    strip_batchnorm(model, pairs)
    modules = dict(model.named_modules())
    expected = [name for name, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if [record.name for record in artifact.layers] != expected:
        raise UserError(f"artifact layers {[r.name for r in artifact.layers]} are not {artifact.model}'s {expected}",
                        "re-export the run with the current jpqbench")
    for record in artifact.layers:
        layer = modules.get(record.name)
        if layer is None or tuple(layer.weight.shape) != record.shape or (layer.bias is None) != (record.bias is None):
            raise UserError(f"artifact layer {record.name} {record.shape} does not fit {artifact.model} "
                            f"after its channels are removed", "re-export the run with the current jpqbench")
        layer.weight.copy_(record.weight())
        if record.bias is not None:
            layer.bias.copy_(torch.from_numpy(record.bias))
    return quantize_activations(model, artifact) if quantize_inputs else model.eval()


def quantize_activations(model: nn.Module, artifact: Artifact) -> nn.Module:
    """Install ``artifact``'s activation staircases on the float physical ``model`` (in place)."""
    make_compressible(model)
    layers = compressible_layers(model)
    for record in artifact.layers:
        if record.input is not None:
            layers[record.name].input_quantizer = record.input
    for name, table in artifact.operators.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, InputStaircase(table, getattr(owner, child)))
    return model.eval()


def load(path: Path, quantize_inputs: bool = True) -> nn.Module:
    """Read ``path`` and return the runnable model (see :func:`to_model`)."""
    return to_model(read(path), quantize_inputs)
