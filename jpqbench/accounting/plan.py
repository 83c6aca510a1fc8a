"""The CompressionPlan: what a method claims it did to each layer, as JSON.

Per compressible (conv/linear) layer the plan records

* ``pruned``     -- indices of the output channels removed by structured pruning;
* ``w_bits``     -- weight bit width, per layer (int) or per output channel (list; the entry
  of a pruned channel is ignored); 32 = floating point;
* ``a_bits``     -- bit width of the layer's *input* activation; 32 = floating point;
* ``w_sparsity`` -- unstructured weight sparsity among the kept weights (fraction of zeros);
* ``a_sparsity`` -- unstructured input-activation sparsity (fraction of zeros).

The cost counter computes every figure from a plan and the model's shapes alone
(:mod:`jpqbench.accounting.counter`); :func:`jpqbench.accounting.verify.verify_plan` checks that a
plan tells the truth about its model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jpqbench.base.errors import UserError
from jpqbench.nn.layers import compressible_layers
from jpqbench.nn.quant import FLOAT_BITS


@dataclass
class LayerPlan:
    out_channels: int
    pruned: list[int] = field(default_factory=list)
    w_bits: int | list[int] = FLOAT_BITS
    a_bits: int = FLOAT_BITS
    w_sparsity: float = 0.0
    a_sparsity: float = 0.0

    def channel_bits(self) -> list[int]:
        """Weight bits of every output channel, 0 for a pruned channel."""
        bits = self.w_bits if isinstance(self.w_bits, list) else [self.w_bits] * self.out_channels
        pruned = set(self.pruned)
        return [0 if c in pruned else int(b) for c, b in enumerate(bits)]

    def kept_mask(self) -> torch.Tensor:
        mask = torch.ones(self.out_channels, dtype=torch.bool)
        mask[list(self.pruned)] = False
        return mask


@dataclass
class CompressionPlan:
    layers: dict[str, LayerPlan]
    method: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    # ---- JSON round trip -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "notes": self.notes,
                "layers": {name: asdict(layer) for name, layer in self.layers.items()}}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionPlan":
        return cls(layers={name: LayerPlan(**layer) for name, layer in data["layers"].items()},
                   method=data.get("method", ""), notes=data.get("notes", {}))

    @classmethod
    def load(cls, path: str | Path) -> "CompressionPlan":
        path = Path(path)
        try:
            plan = cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise UserError(f"plan file {path} does not exist", "pass the plan.json written by `jpqbench run`") from None
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"plan file {path} is malformed ({error})",
                            "regenerate it with `jpqbench run`; see jpqbench/accounting/plan.py for the format") from None
        plan.validate()
        return plan

    def validate(self) -> None:
        """Internal consistency (independent of any model): types first, then values."""
        for name, layer in self.layers.items():
            problems = _type_problems(layer)
            if problems:
                raise UserError(f"plan layer {name!r} is malformed: {'; '.join(problems)}",
                                "fix the method that wrote it, or regenerate it with `jpqbench run`; "
                                "see jpqbench/accounting/plan.py for the format")
            if any(not 0 <= c < layer.out_channels for c in layer.pruned):
                problems.append("pruned channel index out of range")
            if isinstance(layer.w_bits, list) and len(layer.w_bits) != layer.out_channels:
                problems.append(f"{len(layer.w_bits)} per-channel bit widths for {layer.out_channels} channels")
            bits = layer.w_bits if isinstance(layer.w_bits, list) else [layer.w_bits]
            if any(not 0 <= b <= FLOAT_BITS for b in bits) or not 1 <= layer.a_bits <= FLOAT_BITS:
                problems.append("bit width outside [0, 32]")
            zero_bit = {c for c, b in enumerate(bits) if b == 0} if isinstance(layer.w_bits, list) else (
                set(range(layer.out_channels)) if layer.w_bits == 0 else set())
            if zero_bit - set(layer.pruned):  # 0 bits costs nothing, so it must be a pruned (zero) channel
                problems.append(f"channels {sorted(zero_bit - set(layer.pruned))[:8]} have 0 weight bits "
                                "but are not listed as pruned")
            if not (0 <= layer.w_sparsity < 1 and 0 <= layer.a_sparsity < 1):
                problems.append("sparsity outside [0, 1)")
            if problems:
                raise UserError(f"plan layer {name!r} is invalid: {'; '.join(problems)}",
                                "fix the method that wrote it; see jpqbench/accounting/plan.py for the format")

    @classmethod
    def dense(cls, model: nn.Module) -> "CompressionPlan":
        """The FP32 plan: nothing pruned, every layer at 32 bits."""
        return cls({name: LayerPlan(out_channels=layer.weight.shape[0])
                    for name, layer in conv_linear_layers(model).items()}, method="fp32")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_problems(layer: LayerPlan) -> list[str]:
    """What in a layer's plan (as read from JSON) has the wrong type: a hand-edited plan.json with
    ``"w_bits": "8"`` or ``4.5`` must be refused, not compared as a string or truncated."""
    problems = []
    if not _is_int(layer.out_channels) or layer.out_channels < 1:
        problems.append(f"out_channels={layer.out_channels!r} is not a positive integer")
    if not isinstance(layer.pruned, list) or not all(_is_int(c) for c in layer.pruned):
        problems.append(f"pruned={layer.pruned!r} is not a list of channel indices")
    elif len(set(layer.pruned)) != len(layer.pruned):
        problems.append("pruned lists a channel twice")
    if not (_is_int(layer.w_bits) or isinstance(layer.w_bits, list) and all(_is_int(b) for b in layer.w_bits)):
        problems.append(f"w_bits={layer.w_bits!r} is not an integer or a list of integers")
    if not _is_int(layer.a_bits):
        problems.append(f"a_bits={layer.a_bits!r} is not an integer")
    for key in ("w_sparsity", "a_sparsity"):
        value = getattr(layer, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}={value!r} is not a number")
    return problems


def conv_linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def plan_from_model(model: nn.Module, method: str, notes: dict[str, Any] | None = None) -> CompressionPlan:
    """Read the plan off the masks and quantizers of a compressible model.

    Layers that are plain ``nn.Conv2d`` / ``nn.Linear`` (not made compressible) are FP32.
    """
    layers: dict[str, LayerPlan] = {}
    compressible = compressible_layers(model)
    for name, module in conv_linear_layers(model).items():
        if name not in compressible:
            layers[name] = LayerPlan(out_channels=module.weight.shape[0])
            continue
        w_bits = module.weight_bits
        layers[name] = LayerPlan(
            out_channels=module.weight.shape[0],
            pruned=torch.nonzero(module.out_mask == 0).flatten().tolist(),
            w_bits=[int(b) for b in w_bits] if isinstance(w_bits, (list, tuple, torch.Tensor)) else int(w_bits),
            a_bits=module.input_bits,
        )
    return CompressionPlan(layers, method=method, notes=notes or {})


class PlanMismatch(UserError):
    """A plan that does not describe its model."""


def check_fits(plan: CompressionPlan, model: nn.Module) -> None:
    """Raise :class:`PlanMismatch` unless ``plan`` names exactly ``model``'s conv/linear layers,
    each with the layer's number of output channels (the counter would otherwise charge a
    plan's per-channel bits against channels the layer does not have)."""
    layers = conv_linear_layers(model)
    if set(layers) != set(plan.layers):
        missing, extra = set(layers) - set(plan.layers), set(plan.layers) - set(layers)
        raise PlanMismatch(f"plan layers do not match the model (missing {sorted(missing)}, unknown {sorted(extra)})",
                           "the method must write a plan for exactly the model it returns")
    wrong = [f"{name} ({plan.layers[name].out_channels} in the plan, {layer.weight.shape[0]} in the model)"
             for name, layer in layers.items() if plan.layers[name].out_channels != layer.weight.shape[0]]
    if wrong:
        raise PlanMismatch(f"plan's output channel counts do not match the model: {', '.join(wrong[:5])}",
                           "the method must write a plan for exactly the model it returns")


def with_uniform_bits(plan: CompressionPlan, w_bits: int, a_bits: int) -> CompressionPlan:
    """A copy of ``plan`` (same pruning) with every layer at ``w_bits`` / ``a_bits``."""
    layers = {name: LayerPlan(layer.out_channels, list(layer.pruned), w_bits, a_bits,
                              layer.w_sparsity, layer.a_sparsity) for name, layer in plan.layers.items()}
    return CompressionPlan(layers, plan.method, dict(plan.notes))


def with_pruned(plan: CompressionPlan, pruned: dict[str, list[int]]) -> CompressionPlan:
    """A copy of ``plan`` whose pruned channels are ``pruned`` (layers not named: none pruned)."""
    layers = {name: LayerPlan(layer.out_channels, list(pruned.get(name, [])), layer.w_bits, layer.a_bits,
                              layer.w_sparsity, layer.a_sparsity) for name, layer in plan.layers.items()}
    return CompressionPlan(layers, plan.method, dict(plan.notes))
