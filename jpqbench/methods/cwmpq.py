"""Joint pruning + channel-wise mixed-precision quantization (cwmpq).

Motetti, Risso, Burrello et al., "Joint pruning and channel-wise mixed-precision quantization
for efficient deep neural networks", IEEE TC 2024 (arXiv 2407.01054); upstream code in
eml-eda/plinio (``methods/mps``) and eml-eda/mixprec-pruning. Read top to bottom:

1. quantizers: symmetric per-channel min-max weights, PACT activations (an unsigned grid after a
   ReLU, a signed one where a layer input is negative), and their softmax-weighted mixtures over a
   precision set (0 bits = a zero weight = a pruned channel);
2. the search space: one logit vector per output channel of every dependency group
   (torch-pruning: residual partners and depthwise convs share it), one per layer input;
3. the budget: a cost model from :mod:`jpqbench.accounting.hardware` as regulariser, its strength
   proportional to the expected cost's excess over the budget, and a final projection of the
   argmax assignment onto the budget (lower precisions until within it, then fill it), checked
   with the harness counter;
4. the method: float warm-up -> search -> fine-tune with frozen precisions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.utils.hooks import RemovableHandle

from jpqbench import (
    Budget,
    Compressed,
    CompressionPlan,
    CostModel,
    LayerCostInput,
    Method,
    RunContext,
    TrainHooks,
    UniformQuantizer,
    UserError,
    batchnorm_affine,
    classifier_name,
    compressible_layers,
    cpu_copy,
    get_cost_model,
    layer_shapes,
    make_compressible,
    mask_batchnorm,
    module_device,
    observe_inputs,
    plan_from_model,
    register_method,
    round_ste,
)

Assignment = list[torch.Tensor]  # per PrecisionChoice: the chosen precision index of every slot


# ---------------------------------------------------------------------------------- quantizers
def quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel min-max fake quantization; 0 bits gives zeros.

    The step is max|W_c| / (2^(b-1) - 1) and the integers span +-(2^(b-1) - 1); the rounding is
    straight-through in the integer domain, so every value lies exactly on the channel's grid.
    """
    if bits == 0:
        return torch.zeros_like(weight)
    levels = 2 ** (bits - 1) - 1
    shape = (-1,) + (1,) * (weight.dim() - 1)
    step = (weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1) / levels).clamp_min(1e-12).view(shape)
    return torch.clamp(round_ste(weight / step), -levels, levels) * step


ActivationGrid = Literal["unsigned", "signed", "narrow"]


def activation_range(bits: int, grid: ActivationGrid) -> tuple[int, int]:
    """The integer codes ``(q_min, q_max)`` of a ``bits``-bit activation grid.

    * ``unsigned``: 0 .. 2^b - 1, PACT's grid for post-ReLU inputs;
    * ``signed``: -2^(b-1) .. 2^(b-1) - 1, all 2^b codes of a two's-complement integer, for inputs
      that are negative inside the network (MobileNetV2's linear bottlenecks) -- 4 levels at 2 bits,
      as the unsigned grid and plinio's ``PACTActSigned`` have, where a narrow grid would be ternary;
    * ``narrow``: -(2^(b-1) - 1) .. 2^(b-1) - 1, the symmetric grid of the network input (fixed at
      ``input_bits``, where one code of 2^b hardly matters; kept so the embedded results stay as they were).

    Every grid holds 0 exactly, so a pruned input channel stays exactly zero.
    """
    if grid == "unsigned":
        return 0, 2 ** bits - 1
    if grid == "signed":
        return -2 ** (bits - 1), 2 ** (bits - 1) - 1
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


class _PACT(torch.autograd.Function):
    """PACT's forward and gradients: x passes where it is inside the clip range, the clip collects
    the gradient of the clipped elements (each end scaled by its derivative in the clip), rounding
    and the step are straight-through."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: torch.Tensor, q_min: int, q_max: int, zero: int) -> torch.Tensor:
        top = max(q_max, -q_min)
        c = clip.detach().clamp_min(1e-3)
        ctx.save_for_backward(x, c * (q_min / top), c * (q_max / top))
        ctx.ends = (q_min / top, q_max / top)
        step = c / top
        # UniformQuantizer's arithmetic, zero point included: the model returned with it (to_core_modules)
        # computes exactly what this computed
        return (torch.round(torch.clamp(x / step + zero, q_min + zero, q_max + zero)) - zero) * step

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, low, high = ctx.saved_tensors
        above, below = x >= high, x <= low
        low_end, high_end = ctx.ends
        grad_clip = torch.where(above, grad, 0.0).sum() * high_end + torch.where(below, grad, 0.0).sum() * low_end
        return grad.masked_fill(above | below, 0.0), grad_clip.reshape(high.shape), None, None, None


def uniform_mode(grid: ActivationGrid, q_min: int) -> tuple[Literal["symmetric", "asymmetric"], int]:
    """The :class:`UniformQuantizer` mode that holds ``grid``, and its zero point (the code of 0)."""
    return ("symmetric", 0) if grid == "narrow" else ("asymmetric", -q_min)


def pact(x: torch.Tensor, clip: torch.Tensor, bits: int, grid: ActivationGrid) -> torch.Tensor:
    """PACT (Choi et al. 2018) on a ``grid`` (:func:`activation_range`): the step is ``clip`` over the
    grid's largest code magnitude, x is clipped to the grid's ends and rounded to the nearest code."""
    q_min, q_max = activation_range(bits, grid)
    return _PACT.apply(x, clip, q_min, q_max, uniform_mode(grid, q_min)[1])


class PrecisionChoice(nn.Module):
    """Logits ``alpha`` (precisions x slots) over a precision set, shared by everything that uses its slots.

    Training: ``theta = softmax(alpha / T)``; evaluation: the argmax one-hot; frozen: a fixed
    one-hot (the chosen precisions of the fine-tuning phase). ``alpha_p`` starts at p / max(P).
    """

    def __init__(self, precisions: Sequence[int], slots: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.precisions = tuple(sorted(precisions))
        top = max(self.precisions)
        self.alpha = nn.Parameter(torch.tensor([p / top for p in self.precisions]).unsqueeze(1).repeat(1, slots))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("choice", torch.zeros(slots, dtype=torch.long))
        self.register_buffer("frozen", torch.tensor(False))

    @property
    def zero_index(self) -> int | None:
        return self.precisions.index(0) if 0 in self.precisions else None

    def hard(self) -> torch.Tensor:
        """The chosen precision index of every slot (argmax, or the frozen choice)."""
        return self.choice if bool(self.frozen) else self.alpha.detach().argmax(dim=0)

    def probs(self) -> torch.Tensor:
        if self.training and not bool(self.frozen):
            return F.softmax(self.alpha / self.temperature, dim=0)
        return F.one_hot(self.hard(), len(self.precisions)).T.to(self.alpha.dtype)

    def freeze(self, choice: torch.Tensor) -> None:
        self.choice.copy_(choice)
        self.frozen.fill_(True)
        self.alpha.requires_grad_(False)


class MixedPrecisionWeight(nn.Module):
    """``sum_p theta_{p,c} Q_p(W_c)`` per output channel c; ``slot[c]`` is c's slot in the shared choice."""

    def __init__(self, choice: PrecisionChoice, slot: torch.Tensor) -> None:
        super().__init__()
        self.choice = choice
        self.register_buffer("slot", slot)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        probs = self.choice.probs()[:, self.slot]
        shape = (-1,) + (1,) * (weight.dim() - 1)
        out = torch.zeros_like(weight)
        for index, bits in enumerate(self.choice.precisions):
            if bits == 0 or (not probs.requires_grad and not bool(probs[index].any())):
                continue
            out = out + probs[index].view(shape) * quantize_weight(weight, bits)
        return out

    @property
    def bits(self) -> list[int]:
        return [self.choice.precisions[i] for i in self.choice.hard()[self.slot].tolist()]


class MixedPrecisionActivation(nn.Module):
    """``sum_q theta_q PACT_q(x)`` for a layer input on ``grid``, one learned clip per precision (init 6)."""

    def __init__(self, choice: PrecisionChoice, grid: ActivationGrid, clip_init: float) -> None:
        super().__init__()
        self.choice = choice
        self.grid = grid
        self.clip = nn.Parameter(torch.full((len(choice.precisions),), float(clip_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.choice.probs()[:, 0]
        terms = [probs[index] * pact(x, self.clip[index], bits, self.grid)
                 for index, bits in enumerate(self.choice.precisions) if probs.requires_grad or bool(probs[index])]
        return sum(terms[1:], terms[0])

    @property
    def bits(self) -> int:
        return self.choice.precisions[int(self.choice.hard()[0])]


class ChannelGate(nn.Module):
    """Keep probability ``1 - theta_0`` of each channel. During the search it scales a channel's constant
    term -- the shift of its BN, or the bias of a BN-less conv -- as the weight mixture already scales
    the rest, so that a channel at 0 bits outputs exactly zero."""

    def __init__(self, choice: PrecisionChoice, slot: torch.Tensor) -> None:
        super().__init__()
        self.choice = choice
        self.register_buffer("slot", slot)

    def forward(self) -> torch.Tensor:
        return 1 - self.choice.probs()[self.choice.zero_index, self.slot]


def _gate_norm_shift(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """BN on running statistics is ``scale * x + shift``; keep ``scale * x + keep * shift``."""
    _, shift = batchnorm_affine(module)
    return output - ((1 - module.cwmpq_gate()) * shift).view(1, -1, *([1] * (output.dim() - 2)))


def _gate_bias(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    dropped = (1 - module.cwmpq_gate()) * module.bias
    return output - dropped.view(1, -1, *([1] * (output.dim() - 2)))


# -------------------------------------------------------------------------------- search space
@dataclass
class _Group:
    """One torch-pruning dependency group: per module, which of its channels map to which slot."""

    size: int
    producers: dict[str, tuple[list[int], torch.Tensor]] = field(default_factory=dict)  # out channels
    consumers: dict[str, tuple[list[int], torch.Tensor]] = field(default_factory=dict)  # in channels
    norms: dict[str, tuple[list[int], torch.Tensor]] = field(default_factory=dict)
    norm_inputs: dict[str, str] = field(default_factory=dict)  # BN -> the conv/linear feeding it


def dependency_groups(model: nn.Module, input_shape: tuple[int, ...]) -> list[_Group]:
    """Coupled channels from torch-pruning's dependency graph (the classifier's outputs excluded).

    Channel i of a group's root maps to ``len(idxs) / size`` consecutive indices of every coupled
    module (more than one after a flatten). Traced on a CPU copy: the groups (CPU tensors) do not
    depend on the model's device.
    """
    probe = cpu_copy(model).eval()
    names = {id(m): name for name, m in probe.named_modules()}
    head = probe.get_submodule(classifier_name(probe))
    graph = tp.DependencyGraph().build_dependency(probe, torch.ones(1, *input_shape))
    groups = []
    for dependencies in graph.get_all_groups(ignored_layers=[head], root_module_types=[nn.Conv2d, nn.Linear]):
        group = _Group(size=len(dependencies[0].idxs))
        for item in dependencies:
            module, handler = item.dep.target.module, item.dep.handler.__name__
            name, idxs = names.get(id(module)), [int(i) for i in item.idxs]
            if name is None or len(idxs) % group.size:
                continue
            slots = torch.arange(group.size).repeat_interleave(len(idxs) // group.size)
            conv_or_linear = isinstance(module, (nn.Conv2d, nn.Linear))
            if handler == "prune_out_channels" and conv_or_linear:
                group.producers[name] = (idxs, slots)
            elif handler == "prune_in_channels" and conv_or_linear:
                group.consumers[name] = (idxs, slots)
            elif handler == "prune_out_channels" and isinstance(module, nn.modules.batchnorm._BatchNorm):
                group.norms[name] = (idxs, slots)
                feeding = [node.module for node in graph.module2node[module].inputs]
                if len(feeding) == 1 and names.get(id(feeding[0])) is not None:
                    group.norm_inputs[name] = names[id(feeding[0])]
        groups.append(group)
    return groups


def network_input_layers(model: nn.Module, input_shape: tuple[int, ...]) -> set[str]:
    """Conv/linear layers whose input is computed from the network input through no other conv/linear.

    Found by autograd on a CPU copy: only the conv/linear weights require a gradient, so a layer's input
    requires one exactly when some conv/linear lies upstream of it (padding, pooling or a BN before
    the first layer do not count; a later layer that also reads the raw input directly would).
    """
    probe = cpu_copy(model).eval()
    for parameter in probe.parameters():
        parameter.requires_grad_(False)
    layers = {n: m for n, m in probe.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for layer in layers.values():
        layer.weight.requires_grad_(True)
    fed: set[str] = set()
    for name, layer in layers.items():
        layer.register_forward_pre_hook(
            lambda module, args, name=name: None if args[0].requires_grad else fed.add(name))
    with torch.enable_grad():
        probe(torch.zeros(1, *input_shape))
    return fed


def _slot_map(channels: int, idxs: list[int], slots: torch.Tensor) -> torch.Tensor:
    out = torch.full((channels,), -1, dtype=torch.long)
    out[idxs] = slots
    return out


class SearchSpace:
    """The per-channel weight choices and per-layer activation choices of a model, wired in place.

    Layers that produce the channels of one dependency group (residual partners, a depthwise conv
    and its producer) share one :class:`PrecisionChoice`, so they always agree on precision and
    pruning. Layers whose outputs are not prunable (the classifier) get a choice without 0 bits.
    Every layer input chooses among ``a_precisions`` -- on the signed grid where it takes negative
    values (``signed_inputs``), else on the unsigned one -- except the network input, fixed at
    ``input_bits`` (:func:`network_input_layers`).

    Devices: the space is built on the CPU and moved onto the model's device in one go; the slot
    maps it keeps for the cost models stay on the CPU, where the cost models compute
    (:meth:`cost_inputs` brings the probabilities there, differentiably).
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], w_precisions: Sequence[int],
                 a_precisions: Sequence[int], signed_inputs: set[str], clip_init: float, input_bits: int) -> None:
        fixed = network_input_layers(model, input_shape)  # before the search modules are attached
        make_compressible(model)
        device = module_device(model)
        self.model = model
        self.layers = compressible_layers(model)
        self.shapes = layer_shapes(model, input_shape)
        modules = dict(model.named_modules())
        self.w_choices: list[PrecisionChoice] = []
        self.weight_slot: dict[str, tuple[int, torch.Tensor]] = {}
        self.inputs: dict[str, list[tuple[int, list[int], torch.Tensor]]] = {name: [] for name in self.layers}
        self.norms: dict[str, tuple[int, torch.Tensor]] = {}
        self.gated: dict[str, RemovableHandle] = {}  # module name -> hook of its search-time gate
        for group in dependency_groups(model, input_shape):
            index = len(self.w_choices)
            self.w_choices.append(PrecisionChoice(w_precisions, group.size))
            for name, (idxs, slots) in group.producers.items():
                if name in self.weight_slot:
                    raise ValueError(f"layer {name} produces channels of two dependency groups")
                self.weight_slot[name] = (index, _slot_map(self.layers[name].weight.shape[0], idxs, slots))
            for name, (idxs, slots) in group.consumers.items():
                self.inputs[name].append((index, idxs, slots))
            for name, (idxs, slots) in group.norms.items():
                self.norms[name] = (index, _slot_map(modules[name].num_features, idxs, slots))
            if 0 in w_precisions:
                fed = set(group.norm_inputs.values())
                for name in group.norms:
                    gate = ChannelGate(self.w_choices[index], self.norms[name][1])
                    self._gate(modules[name], gate, _gate_norm_shift, name)
                for name in group.producers:
                    if name not in fed and self.layers[name].bias is not None:
                        self._gate(self.layers[name], ChannelGate(self.w_choices[index], self.weight_slot[name][1]),
                                   _gate_bias, name)
        unprunable = tuple(p for p in w_precisions if p != 0)
        for name, layer in self.layers.items():
            if name not in self.weight_slot:
                self.weight_slot[name] = (len(self.w_choices), torch.arange(layer.weight.shape[0]))
                self.w_choices.append(PrecisionChoice(unprunable, layer.weight.shape[0]))
            index, slot = self.weight_slot[name]
            if bool((slot < 0).any()):
                raise ValueError(f"layer {name}: output channels outside its dependency group")
            layer.weight_quantizer = MixedPrecisionWeight(self.w_choices[index], slot)
        self.a_choices = [PrecisionChoice((input_bits,) if name in fixed else a_precisions, 1) for name in self.layers]
        self.grids: dict[str, ActivationGrid] = {
            name: ("narrow" if name in fixed else "signed") if name in signed_inputs else "unsigned"
            for name in self.layers}
        for choice, (name, layer) in zip(self.a_choices, self.layers.items()):
            layer.input_quantizer = MixedPrecisionActivation(choice, self.grids[name], clip_init)
        model.to(device)  # the choices, quantizers and gates just attached (parameters stay the same objects)

    def _gate(self, module: nn.Module, gate: ChannelGate, hook: Callable, name: str) -> None:
        module.cwmpq_gate = gate
        self.gated[name] = module.register_forward_hook(hook)

    @property
    def choices(self) -> list[PrecisionChoice]:
        return self.w_choices + self.a_choices

    def set_temperature(self, temperature: float) -> None:
        for choice in self.choices:
            choice.temperature.fill_(temperature)

    def batch_norms(self) -> list[nn.modules.batchnorm._BatchNorm]:
        return [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @torch.no_grad()
    def recalibrate_norms(self, batches: torch.Tensor) -> None:
        """BN running statistics of the network as the search starts (soft mixtures in place), averaged
        over ``batches``: the fixed affine the search then runs on (:meth:`freeze_norms`)."""
        saved = [(bn, bn.momentum) for bn in self.batch_norms()]
        for bn, _ in saved:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        self.model.train()
        for batch in batches.split(64):
            self.model(batch)
        for bn, momentum in saved:
            bn.momentum = momentum

    def freeze_norms(self) -> None:
        """BN on its running statistics: a fixed per-channel affine, the counterpart of upstream folding BN
        into the conv before the search. Batch statistics would renormalise a softly pruned or quantized
        group of channels and hide its removal from the loss until the argmax flips."""
        for bn in self.batch_norms():
            bn.training = False  # not .eval(): that would recurse into the gate and its choice

    # ---- costs
    def cost_inputs(self, probs: Sequence[torch.Tensor]) -> list[LayerCostInput]:
        """Per layer, the cost model's view of ``probs`` (one matrix per choice, in :attr:`choices` order).

        On the CPU, where the cost models compute; gradients flow back to ``probs`` on their device.
        """
        probs = [p.cpu() for p in probs]
        w_probs, a_probs = probs[:len(self.w_choices)], probs[len(self.w_choices):]
        out = []
        for name, a_prob, a_choice in zip(self.layers, a_probs, self.a_choices):
            shape, (index, slot) = self.shapes[name], self.weight_slot[name]
            alive = torch.ones(shape.in_channels, dtype=w_probs[index].dtype)
            for producer, idxs, slots in self.inputs[name]:
                zero = self.w_choices[producer].zero_index
                if zero is not None:
                    alive = alive.index_put((torch.tensor(idxs),), 1 - w_probs[producer][zero, slots])
            out.append(LayerCostInput(shape, w_probs[index][:, slot], self.w_choices[index].precisions,
                                      a_prob[:, 0], a_choice.precisions, alive))
        return out

    def soft_probs(self) -> list[torch.Tensor]:
        return [choice.probs() for choice in self.choices]

    def hard_assignment(self) -> Assignment:
        return [choice.hard().clone() for choice in self.choices]

    def one_hot(self, assignment: Assignment, requires_grad: bool = False) -> list[torch.Tensor]:
        """Float64 one-hot matrices: hard costs are sums of integers, exact in float64 (not in float32)."""
        return [F.one_hot(idx, len(c.precisions)).T.double().requires_grad_(requires_grad)
                for idx, c in zip(assignment, self.choices)]

    def cost(self, model: CostModel, assignment: Assignment) -> float:
        with torch.no_grad():
            return float(model.total(self.cost_inputs(self.one_hot(assignment))))

    # ---- freezing
    @torch.no_grad()
    def apply(self, assignment: Assignment) -> None:
        """Freeze ``assignment``: fixed precisions, 0-bit channels masked (weights, bias, BN), gates removed."""
        for choice, idx in zip(self.choices, assignment):
            choice.freeze(idx)
        modules = dict(self.model.named_modules())
        for name, handle in self.gated.items():
            handle.remove()
            del modules[name].cwmpq_gate
        self.gated = {}
        for name, layer in self.layers.items():
            layer.out_mask.copy_(torch.tensor(layer.weight_quantizer.bits) != 0)
        for name, (index, slot) in self.norms.items():
            choice = self.w_choices[index]
            if choice.zero_index is not None:
                mask_batchnorm(modules[name], (choice.hard()[slot] != choice.zero_index).float())

    @torch.no_grad()
    def to_core_modules(self) -> None:
        """Replace the frozen mixtures by what they compute, in harness modules only: the quantized weights
        are written into ``weight`` (each channel on its own grid) and each PACT becomes the equivalent
        calibrated :class:`UniformQuantizer`, so the returned model unpickles without this plugin."""
        for layer in self.layers.values():
            layer.weight.copy_(layer.weight_quantizer(layer.weight))
            layer.weight_quantizer = nn.Identity()
            layer.input_quantizer = _as_uniform(layer.input_quantizer).to(layer.weight.device)


def _as_uniform(pact_module: MixedPrecisionActivation) -> UniformQuantizer:
    """The harness quantizer that computes exactly what the frozen PACT computes (same arithmetic): the
    narrow grid is its symmetric mode; the unsigned and signed grids its asymmetric mode, zero at code -q_min."""
    bits = pact_module.bits
    q_min, q_max = activation_range(bits, pact_module.grid)
    mode, zero = uniform_mode(pact_module.grid, q_min)
    quantizer = UniformQuantizer(bits, mode)
    clip = pact_module.clip[pact_module.choice.precisions.index(bits)].clamp_min(1e-3)
    quantizer.step.fill_(float(clip / max(q_max, -q_min)))
    quantizer.zero_point.fill_(zero)
    quantizer.initialized.fill_(True)
    return quantizer


# -------------------------------------------------------------------------------------- budget
@dataclass(order=True)
class _Move:
    """Move slot ``slot`` of choice ``choice`` to precision index ``to``: ``score`` = logit change per unit of cost."""

    score: float
    delta: float  # estimated |cost change|
    choice: int
    slot: int
    to: int


def _moves(space: SearchSpace, assignment: Assignment, model: CostModel, step: int) -> list[_Move]:
    """Every one-precision move down (``step=-1``) or up (``step=+1``; from 0 bits: un-pruning), best first.

    A move's score is ``alpha[current] - alpha[new]`` per unit of cost it saves (down) or adds (up):
    the moves the search's logits mind least per bit come first. Cost changes are estimated from the
    gradient of the cost at the one-hot assignment -- exact for a channel's own layer, approximate
    where the slot also sets the fan-in of a layer of its own group (a depthwise conv).
    """
    onehots = space.one_hot(assignment, requires_grad=True)
    grads = torch.autograd.grad(model.total(space.cost_inputs(onehots)), onehots, allow_unused=True)
    moves = []
    for k, (choice, idx, grad) in enumerate(zip(space.choices, assignment, grads)):
        if grad is None:
            continue
        movable = idx > 0 if step < 0 else idx < len(choice.precisions) - 1
        slots = torch.nonzero(movable).flatten()
        current, new = idx[slots], idx[slots] + step
        delta = (grad[current, slots] - grad[new, slots]) * -step
        change = choice.alpha.detach()[current, slots] - choice.alpha.detach()[new, slots]
        for s, to, d, c in zip(slots.tolist(), new.tolist(), delta.tolist(), change.tolist()):
            if d > 0:
                moves.append(_Move(c / d, d, k, s, to))
    return sorted(moves)


def _lower(space: SearchSpace, assignment: Assignment, model: CostModel, excess: float,
           limit: int) -> Assignment | None:
    """Apply the best downward moves until their estimated saving covers ``excess``; every group keeps a channel."""
    kept = [len(idx) if c.zero_index is None else int((idx != c.zero_index).sum())
            for c, idx in zip(space.choices, assignment)]
    new, saved, moves = [idx.clone() for idx in assignment], 0.0, 0
    for move in _moves(space, assignment, model, -1):
        if move.to == space.choices[move.choice].zero_index:
            if kept[move.choice] <= 1:
                continue
            kept[move.choice] -= 1
        new[move.choice][move.slot] = move.to
        saved, moves = saved + move.delta, moves + 1
        if saved >= excess or moves >= limit:
            break
    return new if moves else None


def _raise(space: SearchSpace, assignment: Assignment, model: CostModel, slack: float, limit: int,
           excluded: set[tuple[int, int]]) -> tuple[Assignment, list[_Move]]:
    """Apply the best upward moves whose estimated cost still fits in ``slack``."""
    new, used, chosen = [idx.clone() for idx in assignment], 0.0, []
    for move in _moves(space, assignment, model, +1):
        if (move.choice, move.slot) in excluded or used + move.delta > slack:
            continue
        new[move.choice][move.slot] = move.to
        used += move.delta
        chosen.append(move)
        if len(chosen) >= limit:
            break
    return new, chosen


def _keep_a_channel(space: SearchSpace, assignment: Assignment) -> Assignment:
    """Give every group the search pruned entirely back the channel whose logits least prefer 0 bits
    (at its best non-zero precision): a fully pruned group would cut the network."""
    fixed = [idx.clone() for idx in assignment]
    for choice, idx in zip(space.choices, fixed):
        zero = choice.zero_index
        if zero is not None and bool((idx == zero).all()):
            alpha = choice.alpha.detach().clone()
            alpha[zero] = -math.inf
            best, index = alpha.max(dim=0)
            slot = int((best - choice.alpha.detach()[zero]).argmax())
            idx[slot] = index[slot]
    return fixed


def fit_to_budget(space: SearchSpace, assignment: Assignment, model: CostModel,
                  relative: Callable[[Assignment], float], target: float, dense: float,
                  fill: bool = True, max_share: float = 0.05) -> tuple[Assignment, int]:
    """Project an assignment onto the budget: lower precisions until ``relative(a) <= target``, then
    (``fill``) raise precisions -- of channels, pruned ones included, and of layer inputs -- while the
    cost stays within it.

    Moves are taken in batches of at most ``max_share`` of the candidates; a raise batch that the
    exact cost refuses is halved, a single refused move is dropped. Returns the assignment and the
    number of accepted batches.
    """
    limit = lambda n: max(1, int(max_share * n))  # noqa: E731 -- batch size for n candidates
    assignment, batches = _keep_a_channel(space, assignment), 0
    while (achieved := relative(assignment)) > target:
        lowered = _lower(space, assignment, model, (achieved - target) * dense,
                         limit(sum(len(idx) for idx in assignment)))
        if lowered is None:
            raise UserError(f"budget {target} cannot be reached: with every precision lowered as far as the "
                            f"precision sets allow, the model still costs {achieved:.4f} of FP32",
                            "choose a larger budget or add lower precisions (w_precisions / a_precisions)")
        assignment, batches = lowered, batches + 1
    cap, excluded = limit(sum(len(idx) for idx in assignment)), set()
    while fill:
        candidate, chosen = _raise(space, assignment, model, (target - relative(assignment)) * dense, cap, excluded)
        if not chosen:
            break
        if relative(candidate) <= target:
            assignment, batches = candidate, batches + 1
        elif len(chosen) == 1:
            excluded.add((chosen[0].choice, chosen[0].slot))
        else:
            cap = max(1, len(chosen) // 2)
    return assignment, batches


def project_onto_budget(space: SearchSpace, method: str, model: CostModel, dense: float, target: float,
                        counter: Callable[[CompressionPlan], float],
                        fill: bool) -> tuple[CompressionPlan, dict[str, int]]:
    """Freeze the search's argmax and read its plan -- what the search itself reached, for the harness to
    count -- then project it onto the budget (:func:`fit_to_budget`) by ``model``, then by ``counter``
    (the harness's relative cost of a plan), and leave the projected assignment applied.

    Returns the searched plan and the number of accepted move batches of both fits.
    """
    searched = space.hard_assignment()
    space.apply(searched)
    searched_plan = plan_from_model(space.model, method)
    assignment, batches = fit_to_budget(space, searched, model, lambda a: space.cost(model, a) / dense,
                                        target, dense, fill=fill)

    def counted(candidate: Assignment) -> float:
        space.apply(candidate)
        return counter(plan_from_model(space.model, method))

    assignment, counter_batches = fit_to_budget(space, assignment, model, counted, target, dense, fill=False)
    space.apply(assignment)
    return searched_plan, {"budget_fit_batches": batches, "counter_fit_batches": counter_batches}


# ------------------------------------------------------------------------------------- training
class SearchHooks(TrainHooks):
    """The search phase inside the harness trainer.

    * parameter groups: network weights with the recipe's optimizer and learning rate; the logits
      in their own group (lr ``alpha_lr``, by default 1.0 with SGD and 0.01 with Adam; momentum
      ``alpha_momentum`` with SGD; no weight decay); PACT clips
      without weight decay (as upstream);
    * temperature ``T0 * exp(-anneal_rate * epoch)`` at every epoch start (FBNetV2-style);
    * loss term ``lambda * cost_soft / cost_ref`` (cost_ref: every slot at its largest precision) with
      ``lambda = strength * max(0, c / budget - 1)``, ``c`` the expected cost under the softmax by the
      cost model of the budget's metric: the pressure is proportional to the excess over the budget
      and vanishes at it (a squared hinge when the regulariser is that cost model), so it cannot wind
      up and push the logits far past the budget the way a strength integrated over steps does.
    """

    def __init__(self, space: SearchSpace, hp: Any, regulariser: CostModel, budget_model: CostModel,
                 budget_cost: float, epochs: int, sgd: bool, log: Callable[[dict[str, float], int], None]) -> None:
        self.space, self.hp, self.regulariser, self.budget_model = space, hp, regulariser, budget_model
        self.budget_cost, self.epochs, self.sgd, self.log = budget_cost, epochs, sgd, log
        self.ramp = 1.0
        top = [torch.full_like(c.hard(), len(c.precisions) - 1) for c in space.choices]
        self.reference = space.cost(regulariser, top)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        alphas = [c.alpha for c in self.space.choices]
        clips = [layer.input_quantizer.clip for layer in self.space.layers.values()]
        special = {id(p) for p in alphas + clips}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
        alpha_lr = self.hp.alpha_lr or (1.0 if self.sgd else 0.01)
        alpha_group: dict[str, Any] = {"params": alphas, "lr": alpha_lr, "weight_decay": 0.0}
        if self.sgd:
            alpha_group["momentum"] = self.hp.alpha_momentum
        return [{"params": [p for p in rest if p.dim() > 1], "weight_decay": weight_decay},
                {"params": [p for p in rest if p.dim() <= 1] + clips, "weight_decay": 0.0}, alpha_group]

    def temperature(self, epoch: int) -> float:
        return self.hp.temperature * math.exp(-self.hp.anneal_rate * epoch)

    def strength(self, soft_over_budget: float) -> float:
        return self.ramp * self.hp.strength * max(0.0, soft_over_budget - 1)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        self.space.freeze_norms()
        self.space.set_temperature(self.temperature(epoch))
        if self.hp.strength_ramp:  # upstream's incremental strength: 1 % to 100 % over the first half
            self.ramp = min(1.0, 0.01 + 0.99 * epoch / max(1, self.epochs // 2))
        with torch.no_grad():
            soft = float(self.budget_model.total(self.space.cost_inputs(self.space.soft_probs()))) / self.budget_cost
        hard = self.space.cost(self.budget_model, self.space.hard_assignment()) / self.budget_cost
        self.log({"search/temperature": self.temperature(epoch), "search/strength": self.strength(soft),
                  "search/soft_cost_over_budget": soft, "search/hard_cost_over_budget": hard}, epoch)

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        inputs = self.space.cost_inputs(self.space.soft_probs())
        soft = float(self.budget_model.total(inputs).detach()) / self.budget_cost
        if soft <= 1:
            return None
        cost = self.regulariser.total(inputs)
        return self.strength(soft) * cost / self.reference


# --------------------------------------------------------------------------------------- method
@torch.no_grad()
def signed_inputs(model: nn.Module, batch: torch.Tensor, chunk: int = 64) -> set[str]:
    """Conv/linear layers whose input takes negative values on ``batch``: the network input, and inner
    inputs that no ReLU precedes (MobileNetV2's linear bottlenecks). They get a signed PACT grid.

    ``batch`` runs in chunks of ``chunk`` samples: the calibration set of an ImageNet run (8 x 256
    images at 224^2) in one forward pass would hold ~10 GB in MobileNetV2's widest activation.
    """
    seen: set[str] = set()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    observe_inputs(model, layers, batch.split(chunk),
                   lambda name, layer, x: seen.add(name) if bool((x < 0).any()) else None)
    return seen


def outside_paper_regime(space: SearchSpace) -> dict[str, str]:
    """The ``outside_paper_regime`` note where the search space leaves what the paper and its code ran:
    signed activations inside the network, which their networks (ResNet-8, DS-CNN, ResNet-18 on Tiny
    ImageNet, ResNet-50 on ImageNet) never have -- upstream quantizes every inner activation with an
    unsigned PACT -- so the signed grid searched there is this harness's extension."""
    inner = [name for name, grid in space.grids.items() if grid == "signed"]
    if not inner:
        return {}
    return {"outside_paper_regime": f"{len(inner)} of {len(space.grids)} layer inputs are signed inside the network "
                                    "(no ReLU before them), which none of the paper's networks has, so their "
                                    "precision is searched on a signed activation grid the paper never used"}


@register_method("cwmpq")
class CWMPQ(Method):
    """Joint pruning + channel-wise mixed precision (Motetti et al. 2024; simplified): weight bits {0,2,4,8}/channel, 0 = pruned.
    Simplified: BatchNorm runs on fixed, re-estimated statistics during the search instead of
    being folded into the conv; a budget-driven regulariser strength replaces the paper's sweep
    of a fixed lambda; the logits' learning rate is raised for the harness's short searches
    (details under "Deviations from upstream" below).

    Per output channel, softmax(alpha / T) mixes symmetric min-max quantized copies of the
    weights at each precision of ``w_precisions`` (0 bits = zero = pruned channel); per layer
    input, the same over PACT-quantized activations at ``a_precisions`` (learned clip, init 6):
    on PACT's unsigned grid after a ReLU, on a signed grid (clip [-c, c), all 2^b two's-complement
    codes) where the input takes negative values inside the network -- MobileNetV2's 17 inputs fed
    by a linear bottleneck, 53 % of its MACs, which at a fixed 8 bits would keep its cheapest
    unpruned assignment at 0.010 of FP32 BOPs. Only the network input itself (the layers that
    read it through no other conv/linear) is fixed, at ``input_bits`` on the narrow symmetric grid,
    like upstream's separate 8-bit input quantizer. alpha_p starts at p / max(P); T anneals by
    exp(-``anneal_rate``) per search epoch (config/paper.yaml sets it per dataset to upstream's
    total temperature decay over that grid's search epochs); evaluation uses the argmax. Channels coupled by the
    torch-pruning dependency graph (residual partners; a depthwise conv and its producer) share
    one logit vector; the classifier cannot reach 0 bits; the keep probabilities 1 - theta_0 of
    a layer's producers shrink its counted input channels.

    Epochs: ``warmup_fraction`` float training, ``search_fraction`` search (weights, clips and
    logits), the rest fine-tuning at the frozen precisions. Loss: CE + lambda * cost / cost(all at
    max precision), cost = ``cost_model`` (default: the budget's metric, ``size`` or ``bops``;
    ``mpic`` = latency on MPIC; more in jpqbench/cost_models/). How it meets the budget: (1) lambda =
    ``strength`` x the relative excess of the expected cost under the softmax (by the cost model
    of the budget's metric) over the budget, 0 within it, ramped from 1 % to 100 % over the first
    half of the search (upstream's incremental strength); (2) the argmax assignment is then
    projected onto the budget: precisions are lowered one step at a time, the moves the logits
    mind least per unit of cost first, until the cost is within the budget; then
    (``fill_budget``) channels (pruned ones too) and layer inputs are raised the same way while
    it stays within, so a search whose argmax overshot -- channels of a group tend to cross to
    0 bits together -- still spends the budget where the logits object least; (3) the harness
    counter checks the result and lowers further if it disagreed (it never has: the size and bops
    cost models equal it at hard assignments). The precisions are frozen for fine-tuning. The
    argmax assignment before (2) goes back as ``Compressed.searched``, so the harness counts and
    reports what the search itself reached (``searched_relative_bops``) beside the projected result.
    A run whose network has signed inner inputs is noted ``outside_paper_regime``: the paper's
    networks (ResNet-8, DS-CNN, ResNet-18 on Tiny ImageNet; ResNet-50 on ImageNet in its code) have none.

    Deviations from upstream, all deliberate: BatchNorm is not folded into the conv (the harness
    counts conv/linear layers only); it runs on running statistics recalibrated with the soft
    mixtures in place and then fixed during the search -- the affine a folded conv applies --
    with its shift scaled by the channel's keep probability, is masked after the search and
    trains normally during fine-tuning; the weight grid is the narrow symmetric one
    (+-(2^(b-1)-1) levels; upstream spans 2*max|W| over 2^b - 1 steps and clips the top); PACT
    rounds to nearest (upstream floors); a signed inner input has one learned clip per precision
    and a grid symmetric up to its top code (upstream's ``PACTActSigned``, which its code uses only
    for the network input, learns both ends); activation precision is searched per layer *input* (the
    harness's a_bits convention; upstream quantizes each producer's output once); the size cost
    counts 32-bit biases of kept channels (so it equals the harness counter) and the effective
    input channels carry gradient (upstream detaches them); the weights train with the harness
    recipe's optimizer (SGD by default) instead of Adam lr 1e-3; the logits sit in a parameter
    group of that same optimizer (with SGD: momentum 0.9, Nesterov as the recipe) rather than a
    separate SGD optimizer, at ``alpha_lr`` 1.0 instead of 1e-2 (with an Adam recipe: 1e-2, as
    Adam's steps do not scale with the gradient), since a harness search is a few hundred steps
    against upstream's tens of thousands (with SGD at 1e-2 the task loss moves a logit by ~1e-3
    in a whole search); lambda follows the excess over the budget and the result is
    projected onto it (upstream sweeps a fixed lambda and takes the cost it lands on); no early
    stopping or best-epoch checkpoint selection. The returned model holds the quantized weights
    and equivalent harness UniformQuantizers for the inputs, so model.pt loads without this plugin.
    """

    test_hparams = {"calibration_batches": 1}

    class Hparams(Method.Hparams):
        w_precisions: tuple[int, ...] = Field((0, 2, 4, 8), description="weight precisions each output channel "
                                              "chooses among (bits; 0 = pruned)")
        a_precisions: tuple[int, ...] = Field((2, 4, 8), description="precisions each layer input but the network "
                                              "input chooses among, signed or unsigned (bits)")
        cost_model: str | None = Field(None, description="regulariser's cost model (size, bops, mpic or one in "
                                                         "jpqbench/cost_models/); null = the budget's metric")
        strength: float = Field(10.0, gt=0, description="lambda per unit of relative excess of the expected cost "
                                                        "over the budget (dimensionless)")
        strength_ramp: bool = Field(True, description="ramp lambda from 1 % to 100 % over the first half of the "
                                                      "search (upstream's incremental strength)")
        temperature: float = Field(1.0, gt=0, description="softmax temperature T0 at the first search epoch")
        anneal_rate: float = Field(0.045, ge=0, description="T = T0 exp(-anneal_rate x epoch) (per search epoch)")
        alpha_lr: float | None = Field(None, gt=0, description="learning rate of the logits; null = 1.0 with the "
                                                               "recipe's SGD, 0.01 with Adam")
        alpha_momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum of the logits")
        warmup_fraction: float = Field(0.1, ge=0, lt=1, description="float warm-up epochs (fraction of the run's)")
        search_fraction: float = Field(0.5, gt=0, le=1, description="search epochs (fraction of the run's)")
        act_clip_init: float = Field(6.0, gt=0, description="initial PACT clip c of every activation precision "
                                                            "(activation units)")
        input_bits: int = Field(8, ge=2, le=16, description="fixed precision of the network input (bits)")
        fill_budget: bool = Field(True, description="after lowering, raise precisions again while the cost fits "
                                                    "the budget")
        calibration_batches: int = Field(8, ge=1, description="training batches that find the signed inputs and "
                                                              "re-estimate BN as the search starts (batches)")

        @field_validator("w_precisions")
        @classmethod
        def _weight_bits(cls, bits: tuple[int, ...]) -> tuple[int, ...]:
            if len(set(bits)) != len(bits) or any(b != 0 and not 2 <= b <= 16 for b in bits):
                raise ValueError(f"w_precisions must be distinct values in {{0}} U [2, 16], got {bits}")
            if not any(bits):
                raise ValueError("w_precisions needs at least one non-zero precision (the classifier cannot be pruned)")
            return bits

        @field_validator("a_precisions")
        @classmethod
        def _activation_bits(cls, bits: tuple[int, ...]) -> tuple[int, ...]:
            if not bits or len(set(bits)) != len(bits) or any(not 2 <= b <= 16 for b in bits):
                raise ValueError(f"a_precisions must be distinct values in [2, 16], got {bits}")
            return bits

        @model_validator(mode="after")
        def _phases_and_cost_model(self) -> "CWMPQ.Hparams":
            if self.warmup_fraction + self.search_fraction > 1:
                raise ValueError("warmup_fraction + search_fraction must be at most 1")
            if self.cost_model is not None:
                try:
                    model = get_cost_model(self.cost_model)
                except UserError as error:
                    raise ValueError(f"{error.problem}; {error.fix}") from None
                model.check(self.w_precisions, self.a_precisions)
            return self

    def phase_epochs(self, epochs: int) -> tuple[int, int, int]:
        """(warm-up, search, fine-tune) epochs: fractions of the run's budget, at least one search epoch."""
        warmup = min(round(epochs * self.hp.warmup_fraction), epochs - 1)
        search = min(max(1, round(epochs * self.hp.search_fraction)), epochs - warmup)
        return warmup, search, epochs - warmup - search

    def compress(self, model: nn.Module, budget: Budget, ctx: RunContext) -> Compressed:
        warmup, search, finetune = self.phase_epochs(ctx.epochs)
        ctx.train(model, warmup, phase="warmup")
        dense = ctx.cost(model)
        dense_cost = dense.dense_bops if budget.metric == "bops" else dense.dense_weight_bits
        budget_model = get_cost_model(budget.metric)
        regulariser = get_cost_model(self.hp.cost_model or budget.metric)
        calibration = torch.cat(list(ctx.calibration_batches(self.hp.calibration_batches)))
        space = SearchSpace(model, ctx.input_shape, self.hp.w_precisions, self.hp.a_precisions,
                            signed_inputs(model, calibration), self.hp.act_clip_init, self.hp.input_bits)
        space.recalibrate_norms(calibration)
        hooks = SearchHooks(space, self.hp, regulariser, budget_model, budget.target * dense_cost, search,
                            ctx.recipe.optimizer == "sgd", ctx.log_metrics)
        ctx.train(model, search, phase="search", hooks=hooks)

        searched, fit_notes = project_onto_budget(space, self.name, budget_model, dense_cost, budget.target,
                                                  lambda plan: ctx.cost(model, plan).relative(budget.metric),
                                                  fill=self.hp.fill_budget)
        ctx.train(model, finetune, phase="finetune")
        notes = {**fit_notes, "cost_model": regulariser.name, "phase_epochs": [warmup, search, finetune],
                 **outside_paper_regime(space)}
        plan = plan_from_model(model, self.name, notes)
        space.to_core_modules()
        return Compressed(model, plan, searched=searched)
