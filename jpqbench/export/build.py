"""Build the artifact of a compressed model and account for every bit of it.

:func:`build_artifact` takes what a run returns (the fake-quantized, masked model and its
plan) and produces the :class:`~jpqbench.export.artifact.Artifact`: channels removed
physically (:mod:`jpqbench.export.physical`), each remaining channel's integer codes read off
its effective weight at the plan's bit width *before* BN folding (:mod:`jpqbench.export.codes`),
then BN folded into the scale (``scale * k``) and the bias (``k * b + shift``), and every layer
input's quantizer as a staircase (:mod:`jpqbench.export.staircase`).

Size accounting (:class:`SizeBreakdown`, in bits). The counter charges ``weight_bits`` = per
kept output channel ``b_w`` bits for each weight on an *alive* input plus 32 bits for its bias
where the layer has one. The file holds exactly that (``counted``) plus:

* ``header``       -- 10 bytes of magic/version/length and the JSON header;
* ``channel_bits`` -- one byte per stored output channel (its bit width);
* ``scales``       -- float32 scale + int16 zero point per quantized channel (48 bits);
* ``biases``       -- stored biases the counter does not charge: BN's folded shift in layers that
  had no bias, and the bias of a 0-bit channel that could not be removed;
* ``dead_inputs``  -- codes of weights on inputs that are dead but could not be removed (a
  pruned channel whose residual or depthwise partner lives on); 0 for group-consistent plans;
* ``padding``      -- each layer's code stream padded to a whole byte (< 8 bits per layer);
* ``activations``  -- the activation staircases (layer inputs, and noncomm's operators before
  its ReLUs) as :mod:`jpqbench.export.tables` encodes them, and noncomm's activation-mask bitmaps.

noncomm's unstructured weight zeros are stored *dense* at their bit width (a zero is code
``-zero``), so its artifact is compared with the dense ``weight_bits``; the counter's
bitmap-format ``sparse_weight_bits`` is a separate column.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from jpqbench.accounting.counter import input_liveness
from jpqbench.accounting.plan import CompressionPlan
from jpqbench.base.errors import UserError
from jpqbench.export.artifact import FLOAT_BITS, Artifact, LayerRecord
from jpqbench.export.codes import MAX_QUANT_BITS, layer_grids
from jpqbench.export.handlers import is_activation_operator
from jpqbench.export.packing import packed_size
from jpqbench.export.physical import batchnorm_pairs, fold_batchnorm, fold_factors, plain_model, prune_physically
from jpqbench.export.staircase import Staircase, staircase_of
from jpqbench.export.tables import encoded_bits
from jpqbench.nn.layers import observe_inputs

_Layer = (nn.Conv2d, nn.Linear)


@dataclass
class SizeBreakdown:
    """Bits of an artifact by what they hold (see module doc); ``counted`` equals the counter's ``weight_bits``."""

    counted: float = 0.0
    header: int = 0
    channel_bits: int = 0
    scales: int = 0
    biases: int = 0
    dead_inputs: int = 0
    padding: int = 0
    activations: int = 0

    @property
    def overhead(self) -> int:
        return self.header + self.channel_bits + self.scales + self.biases + self.dead_inputs + self.padding + \
            self.activations

    @property
    def total(self) -> float:
        return self.counted + self.overhead

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "overhead": self.overhead, "total": self.total}


@dataclass
class Built:
    artifact: Artifact
    size: SizeBreakdown  # without the header, which :func:`jpqbench.export.artifact.to_bytes` adds
    weight_max_error: float  # largest |dequantized - effective| weight before folding (0 = exact)
    dense: nn.Module  # the dense model, BN folded, float32 (the latency baseline)


def _table(name: str, quantizer: nn.Module, bits: int, seen: torch.Tensor) -> Staircase | None:
    """The staircase of one activation quantizer (None: it is the identity on a float input)."""
    if bits < FLOAT_BITS:
        return staircase_of(name, quantizer, bits, seen)
    # a float input behind a quantizer module: only a mask may act on it (noncomm before switch-on)
    mask = getattr(quantizer, "mask", None)
    table = Staircase(torch.zeros(0), torch.zeros(0), mask.detach().clone() if mask is not None else None)
    if not torch.equal(table(seen), quantizer.eval()(seen)):
        raise UserError(f"{name}: the activation is float (32 bits), but its quantizer changes it",
                        "the plan's a_bits must be what the input quantizer does")
    return table if mask is not None else None


def _activation_tables(compressed: nn.Module, plan: CompressionPlan, batch: torch.Tensor
                       ) -> tuple[dict[str, Staircase], dict[str, Staircase]]:
    """Staircases of the layers' input quantizers, and of the activation operators' (noncomm's pre-ReLU
    operators, see :mod:`jpqbench.export.handlers`), by module name."""
    layers = {name: m for name, m in compressed.named_modules()
              if isinstance(m, _Layer) and not isinstance(getattr(m, "input_quantizer", nn.Identity()), nn.Identity)}
    operators = {name: m for name, m in compressed.named_modules() if is_activation_operator(m)}
    seen: dict[str, torch.Tensor] = {}
    observe_inputs(compressed, {**layers, **operators}, [batch], lambda name, layer, x: seen.__setitem__(name, x))
    inputs = {name: _table(f"layer {name}'s input", layer.input_quantizer, plan.layers[name].a_bits, seen[name])
              for name, layer in layers.items()}
    ops = {name: _table(f"the operator before {name}", op.pre, op.pre.bits, seen[name]) for name, op in operators.items()}
    return ({k: v for k, v in inputs.items() if v is not None}, {k: v for k, v in ops.items() if v is not None})


def _check_operator_shapes(model: nn.Module, input_shape: tuple[int, ...], operators: dict[str, Staircase]) -> None:
    """An operator's mask covers its module's input: refuse one whose channels were removed."""
    masked = {name: table for name, table in operators.items() if table.mask is not None}
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())
    observe_inputs(model, {name: modules[name] for name in masked}, [torch.zeros(1, *input_shape)],
                   lambda name, module, x: shapes.__setitem__(name, tuple(x.shape[1:])))
    for name, table in masked.items():
        if shapes[name] != tuple(table.mask.shape):
            raise UserError(f"the activation mask before {name} covers {tuple(table.mask.shape)}, but channels were "
                            f"removed there ({shapes[name]})", "export supports activation masks on unpruned layers only")


def _slice_mask(table: Staircase, kept: torch.Tensor) -> Staircase:
    if table.mask is None or bool(kept.all()):
        return table
    return Staircase(table.levels, table.thresholds, table.mask[kept])


@torch.no_grad()
def build_artifact(compressed: nn.Module, plan: CompressionPlan, model_name: str, num_classes: int,
                   input_shape: tuple[int, ...], batch: torch.Tensor) -> Built:
    """The artifact of ``compressed`` (checked against ``plan``), its size breakdown and the dense baseline.

    ``batch`` (training data) checks each input staircase against its quantizer.
    """
    compressed.eval()
    plain = plain_model(compressed, model_name, num_classes, input_shape)
    pairs = batchnorm_pairs(plain)
    dense = fold_batchnorm(copy.deepcopy(plain), pairs)
    tables, operators = _activation_tables(compressed, plan, batch)
    # liveness as the counter sees it, on the compressed model: an activation mask (noncomm) can
    # make a whole input channel dead, which the plain model cannot show
    alive = input_liveness(compressed, input_shape, plan)
    originals = {name: m for name, m in compressed.named_modules() if isinstance(m, _Layer)}
    removed_out, removed_in = prune_physically(plain, input_shape, {n: list(l.pruned) for n, l in plan.layers.items()})
    _check_operator_shapes(plain, input_shape, operators)
    size, records, max_error = SizeBreakdown(), [], 0.0
    for name, layer in ((n, m) for n, m in plain.named_modules() if isinstance(m, _Layer)):
        original, claim = originals[name], plan.layers[name]
        gone = set(removed_out.get(name, []))
        kept_out = [c for c in range(claim.out_channels) if c not in gone]
        bits = [claim.channel_bits()[c] for c in kept_out]
        if any(MAX_QUANT_BITS < b < FLOAT_BITS for b in bits):
            raise UserError(f"layer {name}: bit widths {sorted(set(b for b in bits if MAX_QUANT_BITS < b < FLOAT_BITS))} "
                            f"cannot be stored", f"the artifact stores 1..{MAX_QUANT_BITS} or 32 bits per weight")
        weight = layer.weight.detach().float().numpy()
        flat = weight.reshape(weight.shape[0], -1)
        for row, b in enumerate(bits):
            if b == 0 and flat[row].any():
                raise UserError(f"layer {name}: pruned output channel {kept_out[row]} has non-zero weights",
                                "the method must mask every pruned channel")
        grids = layer_grids(name, weight, bits)
        k, shift = (fold_factors(plain.get_submodule(pairs[name])) if name in pairs
                    else (torch.ones(len(kept_out)), torch.zeros(len(kept_out))))
        k_np = k.float().numpy()
        scales, zeros, codes = [], [], []
        for row, (b, grid) in enumerate(zip(bits, grids)):
            if grid is not None:
                scales.append(np.float32(grid.scale) * k_np[row])
                zeros.append(grid.zero)
                codes.append(grid.codes)
                max_error = max(max_error, grid.max_error)
            elif b == FLOAT_BITS:
                codes.append((flat[row] * k_np[row]).astype(np.float32).view(np.uint32).astype(np.int64))
            else:
                codes.append(np.zeros(0, dtype=np.int64))
        bias = None
        if layer.bias is not None or name in pairs:
            own = layer.bias.detach() if layer.bias is not None else torch.zeros(len(kept_out))
            bias = (own * k + shift).float().numpy()
        kept_in = torch.ones(original.weight.shape[1] * (original.groups if isinstance(original, nn.Conv2d) else 1),
                             dtype=torch.bool)
        kept_in[removed_in.get(name, [])] = False
        if bool((~kept_in & alive[name]).any()):
            raise UserError(f"layer {name}: an input channel that is alive under the plan was removed",
                            "the plan's pruned channels must be consistent within each dependency group")
        table = _slice_mask(tables[name], kept_in) if name in tables else None
        records.append(LayerRecord(name, tuple(weight.shape), np.array(bits, dtype=np.uint8),
                                   np.array(scales, dtype=np.float32), np.array(zeros, dtype=np.int16), bias,
                                   codes, table))
        _account(size, records[-1], original, kept_out, bits, kept_in, alive[name])
    for table in operators.values():
        _account_table(size, table)
    artifact = Artifact(model_name, num_classes, tuple(input_shape), removed_out, records, operators)
    return Built(artifact, size, max_error, dense)


def _account(size: SizeBreakdown, record: LayerRecord, original: nn.Module, kept_out: list[int], bits: list[int],
             kept_in: torch.Tensor, alive: torch.Tensor) -> None:
    """Add one layer's bits to ``size``, split into what the counter charges and the overhead."""
    groups = original.groups if isinstance(original, nn.Conv2d) else 1
    out_per_group = original.weight.shape[0] // groups
    in_per_group = kept_in.numel() // groups
    kernel = math.prod(original.weight.shape[2:])
    code_bits = charged_biases = 0
    for channel, b in zip(kept_out, bits):
        group = slice(channel // out_per_group * in_per_group, (channel // out_per_group + 1) * in_per_group)
        stored, live = int(kept_in[group].sum()), int((kept_in[group] & alive[group]).sum())
        code_bits += stored * kernel * b
        if b:
            size.counted += live * kernel * b + (FLOAT_BITS if original.bias is not None else 0)
            size.dead_inputs += (stored - live) * kernel * b
            charged_biases += original.bias is not None
    size.channel_bits += 8 * len(bits)
    size.scales += 48 * len(record.scales)
    if record.bias is not None:
        size.biases += FLOAT_BITS * (len(bits) - charged_biases)
    size.padding += 8 * packed_size([code_bits], [1]) - code_bits
    if record.input is not None:
        _account_table(size, record.input)


def _account_table(size: SizeBreakdown, table: Staircase) -> None:
    size.activations += encoded_bits(table)
