"""Power-of-two quantizers and scheduled magnitude pruners of Zhang et al. (arXiv 2110.08271),
and where they sit in a network.

The building blocks of the ``noncomm`` method (upstream code: mlzxy/qsparse), written so that
*when* each operator switches on is decided from outside (a training schedule), while *what*
it does is fixed here:

* :func:`quantize_pow2` -- ``clamp(trunc(x * 2^d), -2^(b-1), 2^(b-1) - 1) * 2^-d``: signed
  fixed point with ``d`` fractional bits, so that rescaling is a shift in integer hardware.
  Straight-through gradient: 1 where truncation alone lands on the grid, 0 where it saturates.
* :class:`Pow2Quantizer` -- the identity until it is switched on; while *observing* it adds,
  for every candidate ``d``, the squared quantization error of the tensor it sees, and at
  switch-on it keeps the ``d`` with the least error summed over that window of recent tensors
  (the MSE over their concatenation). ``d`` is chosen once and never revisited. Per output
  channel (axis 0) for weights, per tensor for activations.
* :func:`magnitude_mask` and :func:`cubic_sparsity` -- nested unstructured magnitude pruning
  on Zhu & Gupta's cubic schedule ``s_k = s_f * (1 - (1 - k/n)^3)``.
* :class:`WeightPQ` -- a layer's ``weight_quantizer`` slot computing ``Q(P(W))``: unstructured
  per-layer magnitude pruning of the current weight, then per-channel quantization.
* :class:`ActivationPQ` -- ``Q(P(x))`` of an activation: a static mask over one sample's
  (C, H, W) (or features) chosen from mean |activation| over a window of recent batches -- the
  same positions are zero for every input -- then per-tensor quantization.
* :func:`place_activation_operators` -- the paper's placement BN -> P -> Q -> ReLU: an
  :class:`ActivationPQ` on the input of every ``nn.ReLU`` or ``nn.ReLU6``
  (:class:`PreActivationReLU`, :class:`PreActivationReLU6`), found on the model's torch.fx
  graph, and what each conv/linear layer's input then is (see there).
  It relies on one ReLU module per call site, which the zoo's torchvision ResNets have
  (:func:`jpqbench.nn.activations.split_shared_relus`, applied again here to user models).

Window statistics live in buffers, so a run resumed from an epoch checkpoint inside a window
ends exactly as an uninterrupted one. Operators only observe or fire in training mode; in
eval mode they are pure functions of their state.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from jpqbench.accounting.plan import CompressionPlan
from jpqbench.base.errors import UserError
from jpqbench.export.handlers import register_activation_operator, register_masked_quantizer
from jpqbench.harness.distributed import all_sum_
from jpqbench.nn.activations import split_shared_relus
from jpqbench.nn.layers import (
    CompressibleConv2d,
    CompressibleLinear,
    compressible_layers,
    module_device,
    observe_inputs,
)
from jpqbench.nn.quant import FLOAT_BITS


def quantize_pow2(x: torch.Tensor, bits: int, decimal: torch.Tensor) -> torch.Tensor:
    """Power-of-two fixed-point quantization with a clipped straight-through gradient.

    ``decimal`` (fractional bits ``d``) must broadcast against ``x``. Multiplying and dividing
    by ``2^d`` is exact in floating point, so the output lies exactly on the grid ``k * 2^-d``.
    """
    scale = torch.exp2(decimal)
    limit = 2 ** (bits - 1)
    # clamping to [-limit - 1, limit] first changes no output (truncation then saturates to the
    # grid anyway) and gives the gradient: 1 where truncation alone lands on the grid, else 0
    scaled = torch.clamp(x * scale, -limit - 1, limit)
    q = torch.clamp(torch.trunc(scaled), -limit, limit - 1)
    return (scaled + (q - scaled).detach()) / scale


class Pow2Quantizer(nn.Module):
    """Power-of-two quantizer whose fractional bits are chosen by least squared error at switch-on.

    ``channels`` = 1 quantizes per tensor; C > 1 per channel along axis 0 (a weight's output
    channel). ``decimals`` are the candidate fractional bit counts (upstream: 0..19).
    """

    def __init__(self, bits: int, channels: int = 1, decimals: Sequence[int] = range(0, 20)) -> None:
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"bits must be in [2, 16], got {bits}")
        self.bits = int(bits)
        self.channels = channels
        self.register_buffer("candidates", torch.tensor(list(decimals), dtype=torch.float32))
        self.register_buffer("errors", torch.zeros(len(decimals), channels, dtype=torch.float64))
        self.register_buffer("decimal", torch.zeros(channels))
        self.register_buffer("enabled", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.channels}, enabled={bool(self.enabled)}"

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().reshape(self.channels, -1)

    @torch.no_grad()
    def observe(self, x: torch.Tensor, *, over_ranks: bool = False) -> None:
        """Add the squared error of quantizing ``x`` at every candidate ``d`` to the window's sums.

        ``over_ranks``: ``x`` is this process's share of the batch (an activation under DDP), so
        the errors are summed over the ranks -- every rank's window then holds the whole batch,
        as one process's would, and every rank picks the same ``d``.
        """
        flat = self._flat(x)
        limit = 2 ** (self.bits - 1)
        errors = torch.stack([torch.trunc(flat * scale).clamp_(-limit, limit - 1).div_(scale)
                              .sub_(flat).square_().sum(dim=1, dtype=torch.float64)
                              for scale in torch.exp2(self.candidates).tolist()])
        self.errors += all_sum_(errors) if over_ranks else errors

    @torch.no_grad()
    def switch_on(self) -> None:
        """Fix ``d`` per channel at the candidate with the least summed error, and start quantizing."""
        self.decimal.copy_(self.candidates[self.errors.argmin(dim=0)])
        self.errors.zero_()
        self.enabled.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.enabled):
            return x
        decimal = self.decimal.view(-1, *([1] * (x.dim() - 1))) if self.channels > 1 else self.decimal
        return quantize_pow2(x, self.bits, decimal)


def cubic_sparsity(final: float, k: int, n: int) -> float:
    """Zhu & Gupta's sparsity after the k-th of n pruning steps: ``final * (1 - (1 - k/n)^3)``."""
    return final * (1.0 - (1.0 - k / n) ** 3)


@torch.no_grad()
def magnitude_mask(importance: torch.Tensor, mask: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A 0/1 mask like ``mask`` with ``round(sparsity * numel)`` zeros: the old zeros plus the
    least important remaining entries (ties broken by position, so the result is deterministic).

    Masks are nested -- an entry once pruned stays pruned -- so sparsity only grows, as in the
    cubic schedule.
    """
    flat_mask = mask.reshape(-1).bool()
    n_zero = max(round(sparsity * mask.numel()), int((~flat_mask).sum()))
    score = torch.where(flat_mask, importance.reshape(-1).double(), float("-inf"))
    order = torch.argsort(score, stable=True)
    new = torch.ones(mask.numel(), dtype=mask.dtype, device=mask.device)
    new[order[:n_zero]] = 0
    return new.view_as(mask)


class _MaskedQuantized(nn.Module):
    """What the plan reads off both operators: bits once the quantizer is on, the mask's sparsity."""

    quantizer: Pow2Quantizer
    mask: torch.Tensor

    @property
    def bits(self) -> int:
        return self.quantizer.bits if bool(self.quantizer.enabled) else FLOAT_BITS

    @property
    def sparsity(self) -> float:
        return int((self.mask == 0).sum()) / self.mask.numel()


class WeightPQ(_MaskedQuantized):
    """``Q(P(W))`` for a compressible layer's ``weight_quantizer`` slot.

    :meth:`arm` tells it what the next training forward should do: prune to a sparsity (by the
    magnitude of the current weight), add the pruned weight to the quantizer's window, switch
    the quantizer on. ``bits`` is the quantizer's width once it is on, 32 before.
    """

    def __init__(self, weight_shape: torch.Size, bits: int, decimals: range) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(weight_shape))
        self.quantizer = Pow2Quantizer(bits, channels=weight_shape[0], decimals=decimals)
        self.arm()

    def arm(self, prune_to: float | None = None, observe: bool = False, switch_on: bool = False) -> None:
        self._prune_to, self._observe, self._switch_on = prune_to, observe, switch_on

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training and self._prune_to is not None:
            self.mask.copy_(magnitude_mask(weight.detach().abs(), self.mask, self._prune_to))
            self._prune_to = None
        pruned = weight * self.mask
        if self.training and self._observe:
            self.quantizer.observe(pruned)
        if self.training and self._switch_on:
            self.quantizer.switch_on()
            self._switch_on = False
        return self.quantizer(pruned)


class ActivationPQ(_MaskedQuantized):
    """``Q(P(x))`` of an activation: before a ReLU (:class:`PreActivationReLU`) or in a
    compressible layer's ``input_quantizer`` slot.

    The pruning mask has the shape of one sample (``sample_shape``: (C, H, W) or (features,))
    and is static: chosen from the mean |x| accumulated while armed to observe, then fixed for
    every input until the next pruning step. ``prunable=False`` (the network input, the
    classifier's input, weight-only schedules) keeps the mask at ones and only quantizes.
    """

    def __init__(self, sample_shape: torch.Size, bits: int, decimals: Sequence[int], prunable: bool) -> None:
        super().__init__()
        self.prunable = prunable
        self.register_buffer("mask", torch.ones(sample_shape))
        self.register_buffer("magnitude_sum", torch.zeros(sample_shape, dtype=torch.float64))
        self.register_buffer("magnitude_count", torch.tensor(0, dtype=torch.int64))
        self.quantizer = Pow2Quantizer(bits, channels=1, decimals=decimals)
        self.arm()

    def arm(self, prune_to: float | None = None, observe_magnitude: bool = False, observe: bool = False,
            switch_on: bool = False) -> None:
        if not self.prunable:
            prune_to, observe_magnitude = None, False
        self._prune_to, self._observe_magnitude = prune_to, observe_magnitude
        self._observe, self._switch_on = observe, switch_on

    @torch.no_grad()
    def _update_mask(self, x: torch.Tensor) -> None:
        if self._observe_magnitude:  # summed over the ranks under DDP: the mask is the whole batch's
            self.magnitude_sum += all_sum_(x.detach().abs().sum(dim=0).double())
            self.magnitude_count += all_sum_(torch.tensor(x.shape[0], device=x.device))
        if self._prune_to is not None:
            mean = self.magnitude_sum / self.magnitude_count.clamp_min(1)
            self.mask.copy_(magnitude_mask(mean, self.mask, self._prune_to))
            self.magnitude_sum.zero_()
            self.magnitude_count.zero_()
            self._prune_to = None

    def structural_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What the cost counter's liveness probe should see: non-zero exactly where the static
        mask keeps a position, whatever reaches the operator.

        Not the value grid: the probe pushes a small normalised signal, which truncation would
        zero where real inputs are kept. Not the input's zeros either: the probe passes BN as
        the identity, but the BN before the operator adds its shift, so a channel that receives
        zeros is non-zero at run time. Claiming a kept position alive is never untrue for the
        counter; it may count work on a position that is always zero.
        """
        return torch.ones_like(x) * self.mask if self.prunable else torch.ones_like(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._update_mask(x)
        pruned = x * self.mask if self.prunable else x
        if self.training and self._observe:
            self.quantizer.observe(pruned, over_ranks=True)
        if self.training and self._switch_on:
            self.quantizer.switch_on()
            self._switch_on = False
        return self.quantizer(pruned)

    def export_parts(self) -> tuple[nn.Module, torch.Tensor | None]:
        """For the export (:func:`jpqbench.export.handlers.register_masked_quantizer`): the per-tensor
        quantizer, and the static mask if this operator prunes."""
        return self.quantizer, (self.mask.detach().clone() if self.prunable else None)


register_masked_quantizer(ActivationPQ, ActivationPQ.export_parts)


# ---------------------------------------------------------------- placement: BN -> P -> Q -> ReLU
@register_activation_operator  # the export reads its `pre` as the activation's quantizer
class PreActivationReLU(nn.ReLU):
    """An ``nn.ReLU`` whose input first passes through ``pre`` (an :class:`ActivationPQ`).

    Made by swapping the class of the model's own ReLU module, as the compressible layers are
    made: same module name, same place in the forward pass, no model rewrite. After a BN it
    computes the paper's BN -> P -> Q -> ReLU; after a residual add, add -> P -> Q -> ReLU.
    """

    pre: ActivationPQ

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pre(x), inplace=self.inplace)


class PreActivationReLU6(PreActivationReLU, nn.ReLU6):
    """An ``nn.ReLU6`` whose input first passes through ``pre``: BN -> P -> Q -> ReLU6 (MobileNetV2).

    A subclass of :class:`PreActivationReLU`, so whatever finds the operators finds these too.
    ``min(x, 6)`` keeps a value of the grid ``k * 2^-d`` on it when 6 is a grid point or above
    the grid's largest value; :func:`relu6_keeps_grid` is that condition, and the placement
    only offers the operator fractional bits ``d`` that meet it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.pre(x), inplace=self.inplace)


def relu6_keeps_grid(bits: int, decimal: int) -> bool:
    """Whether ReLU6 maps the signed ``bits``-bit grid ``k * 2^-decimal`` into itself.

    ``max(x, 0)`` always does; the cap ``min(x, 6)`` does when 6 is on the grid's step
    (``6 * 2^decimal`` an integer, i.e. ``decimal >= -1``) or when no grid value exceeds 6
    (``(2^(bits-1) - 1) * 2^-decimal <= 6``), so the cap never fires.
    """
    return decimal >= -1 or (2 ** (bits - 1) - 1) * 2.0 ** -decimal <= 6


# The activations an operator can sit before, and the class each is swapped to.
_PRE_ACTIVATION = {nn.ReLU: PreActivationReLU, nn.ReLU6: PreActivationReLU6}


# Operations that map a tensor on a power-of-two grid to a subset of the same grid (zeros stay
# zeros): a layer reading an operator's ReLU output through these needs no quantizer of its own.
_GRID_KEEPING_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity, nn.ZeroPad2d)
_GRID_KEEPING_FUNCTIONS = (torch.flatten, torch.reshape)
_GRID_KEEPING_METHODS = ("view", "reshape", "flatten", "contiguous")
# Activations the placement has no rule for (nn.ReLU6, a Hardtanh, has one): refused rather than
# silently left unpruned.
_OTHER_ACTIVATIONS = (nn.Hardtanh, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                      nn.Hardswish, nn.Mish)


class _LayerLeafTracer(fx.Tracer):
    """torch.fx tracer that keeps the compressible layers whole (one node per layer call)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (CompressibleConv2d, CompressibleLinear)) or super().is_leaf_module(
            module, qualified_name)


def _keeps_grid(model: nn.Module, node: fx.Node) -> bool:
    if len(node.all_input_nodes) != 1:
        return False
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), _GRID_KEEPING_MODULES)
    if node.op == "call_function":
        return node.target in _GRID_KEEPING_FUNCTIONS
    return node.op == "call_method" and node.target in _GRID_KEEPING_METHODS


def _replay(model: nn.Module, path: list[fx.Node], x: torch.Tensor) -> torch.Tensor:
    """Apply the single-input operations ``path`` of ``model``'s graph to ``x``, in order."""
    for node in path:
        args = fx.node.map_arg(node.args, lambda _: x)
        kwargs = fx.node.map_arg(node.kwargs, lambda _: x)
        if node.op == "call_module":
            x = model.get_submodule(node.target)(*args, **kwargs)
        elif node.op == "call_function":
            x = node.target(*args, **kwargs)
        else:
            x = getattr(args[0], node.target)(*args[1:], **kwargs)
    return x


@dataclass
class Placement:
    """Where the activation operators of one model sit, and what each layer's input is.

    ``pre_activation``: ReLU module name -> the operator on that ReLU's input. ``own_input``:
    layer -> the quantizer in its ``input_quantizer`` slot, for inputs that are not on an
    operator's grid (the network input, a pooled classifier input). ``fed_by``: layer -> (the
    ReLU whose output it reads, the grid-keeping graph nodes in between).
    """

    model: nn.Module
    pre_activation: dict[str, ActivationPQ]
    own_input: dict[str, ActivationPQ]
    fed_by: dict[str, tuple[str, list[fx.Node]]]

    def operators(self) -> list[ActivationPQ]:
        return [*self.pre_activation.values(), *self.own_input.values()]

    @torch.no_grad()
    def claim_inputs(self, plan: CompressionPlan) -> None:
        """Write each layer's input bits and guaranteed input sparsity into ``plan``.

        A layer fed by an operator's ReLU output gets that operator's bits: a ReLU of a signed
        ``b``-bit grid, max-pooled, flattened or zero-padded, stays on it. Its sparsity is the
        fraction of input positions that are zero for *every* input: the operator's mask pushed
        through the same operations (a max-pool window is surely zero only when all of it is
        masked), so after a pooling layer the claim is below the mask's sparsity. A layer with
        its own quantizer claims that quantizer's bits and no sparsity.
        """
        for name, op in self.own_input.items():
            plan.layers[name].a_bits, plan.layers[name].a_sparsity = op.bits, op.sparsity
        for name, (relu, path) in self.fed_by.items():
            op = self.pre_activation[relu]
            surely_zero = _replay(self.model, path, op.mask[None].clone()) == 0
            plan.layers[name].a_bits, plan.layers[name].a_sparsity = op.bits, surely_zero.float().mean().item()


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return _LayerLeafTracer().trace(model)
    except Exception as error:  # noqa: BLE001 -- any tracing failure is the same user problem
        raise UserError(f"noncomm places its activation operators on the model's torch.fx graph, and "
                        f"{type(model).__name__} cannot be traced ({type(error).__name__}: {str(error)[:200]})",
                        "use a model without data-dependent control flow in forward()") from None


def _refuse_unsupported(model: nn.Module, graph: fx.Graph, layers: dict[str, nn.Module]) -> None:
    """A placement rule exists only for nn.ReLU / nn.ReLU6 modules called once and layers called once."""
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in graph.nodes:
        functional = (node.op == "call_function" and node.target in (torch.relu, torch.relu_, F.relu, F.relu6,
                                                                      F.hardtanh)) or \
            (node.op == "call_method" and node.target in ("relu", "relu_"))
        if functional:
            raise UserError(f"noncomm places P -> Q before nn.ReLU modules, but {type(model).__name__} "
                            f"applies ReLU as a function (graph node {node.name})",
                            "use one nn.ReLU module per activation in the model")
        if node.op != "call_module":
            continue
        module = model.get_submodule(node.target)
        if isinstance(module, _OTHER_ACTIVATIONS) and type(module) not in _PRE_ACTIVATION:
            raise UserError(f"noncomm places P -> Q before nn.ReLU / nn.ReLU6 only; {node.target} is "
                            f"{type(module).__name__}", "use a model with ReLU or ReLU6 activations")
        if (type(module) in _PRE_ACTIVATION or node.target in layers) and calls[node.target] > 1:
            raise UserError(f"{type(model).__name__} calls module {node.target} {calls[node.target]} times; "
                            "noncomm keeps one activation mask per call site",
                            "give every activation and layer call its own module (split_shared_relus in "
                            "jpqbench/models/zoo.py does it for torchvision's ResNet blocks)")
    missing = set(layers) - set(calls)
    if missing:
        raise UserError(f"layers {sorted(missing)} are never called in the forward pass",
                        "remove them from the model")


def place_activation_operators(model: nn.Module, input_shape: tuple[int, ...], bits: int, decimals: Sequence[int],
                               prune: bool) -> Placement:
    """Put an :class:`ActivationPQ` before every ``nn.ReLU`` / ``nn.ReLU6`` of a compressible
    ``model`` but the last one called, and a quantizer at the input of every layer that needs its own.

    The paper prunes and quantizes activations between BN and ReLU (BN -> P -> Q -> ReLU);
    placed on the ReLU's input, the operator is exactly there after every conv-BN, and after a
    residual add (BN + shortcut -> add -> ReLU) it prunes and quantizes the sum, as upstream's
    MobileNetV2 does after its adds -- so the next layer's input stays on one ``bits``-bit grid
    instead of the sum of two grids. The last ReLU stays float and unpruned, as upstream's
    example leaves its last one; the classifier's input is then quantized, not pruned, by its
    own quantizer, like the network input and any input not on an operator's grid (after an
    average pool, or MobileNetV2's linear bottleneck, for instance). Without ``prune`` the
    operators only quantize.

    torchvision's ResNet blocks are first given one ReLU module per call site
    (:func:`split_shared_relus`). A ReLU6 operator chooses its fractional bits only among the
    ``decimals`` for which ReLU6 keeps its grid (:func:`relu6_keeps_grid`; with the default
    0..19, all), so the claim that its consumers read ``bits``-bit grid values stays true.
    """
    split_shared_relus(model)
    layers = compressible_layers(model)
    graph = _trace(model)
    _refuse_unsupported(model, graph, layers)
    relus = [node.target for node in graph.nodes
             if node.op == "call_module" and type(model.get_submodule(node.target)) in _PRE_ACTIVATION]
    sites = relus[:-1]
    if prune and not sites:
        raise UserError(f"noncomm prunes activations before nn.ReLU modules, and {type(model).__name__} "
                        "has none besides the last one", "run it with acts=false (weights only)")
    shapes: dict[str, torch.Size] = {}
    device = module_device(model)  # operators are built on the CPU and moved to the model's device
    observe_inputs(model, {**{name: model.get_submodule(name) for name in sites}, **layers},
                   [torch.zeros(1, *input_shape, device=device)],
                   lambda name, module, x: shapes.setdefault(name, x.shape[1:]))
    relu6_decimals = [d for d in decimals if relu6_keeps_grid(bits, d)]
    pre: dict[str, ActivationPQ] = {}
    for name in sites:
        relu6 = type(model.get_submodule(name)) is nn.ReLU6
        if relu6 and not relu6_decimals:
            raise UserError(f"ReLU6 moves {bits}-bit values of the grid k * 2^-d off it for every d in "
                            f"{list(decimals)}",
                            "let decimal_range include a d >= -1 (the default is 0..19)")
        pre[name] = ActivationPQ(shapes[name], bits, relu6_decimals if relu6 else decimals, prunable=prune).to(device)
    calls = {node.target: node for node in graph.nodes if node.op == "call_module" and node.target in layers}
    own: dict[str, ActivationPQ] = {}
    fed_by: dict[str, tuple[str, list[fx.Node]]] = {}
    for name, layer in layers.items():
        node, path = calls[name].args[0], []
        while not (node.op == "call_module" and node.target in pre) and _keeps_grid(model, node):
            path.append(node)
            node = node.all_input_nodes[0]
        if node.op == "call_module" and node.target in pre:
            fed_by[name] = (node.target, path[::-1])
        else:
            own[name] = layer.input_quantizer = ActivationPQ(shapes[name], bits, decimals, prunable=False).to(device)
    for name, op in pre.items():
        relu = model.get_submodule(name)
        relu.__class__ = _PRE_ACTIVATION[type(relu)]
        relu.pre = op
    return Placement(model, pre, own, fed_by)
