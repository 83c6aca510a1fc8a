"""QASSO: GETA's quantization-aware structured sparse optimizer, a ``torch.optim.Optimizer``.

:class:`Qasso` takes every step of a GETA run itself, as upstream's optimizer does
(microsoft/geta ``only_train_once/optimizer/geta.py``); :class:`QassoHooks` hands it to the
harness's training loop (``TrainHooks.make_optimizer``), whose cosine schedule sets each
parameter group's ``lr``. At optimizer step ``s`` of the run (0-based, :class:`Schedule`):

* **the first-order step.** Every parameter with a gradient gets upstream's direction ``v``:
  the gradient plus L2 weight decay, then SGD momentum (``buf = mu buf + v``, no dampening, no
  Nesterov -- exactly ``torch.optim.SGD(momentum=mu, weight_decay=wd)``) or Adam's
  bias-corrected ``m / (sqrt(v) + eps)``; ``p <- p - lr v``. Quantizer parameters (``d``,
  ``q_m``, ``t``) are in their own parameter group with ``lr = lr_quant``. Weight decay goes
  to conv/linear weights only (the harness's groups, the same for every method).
1. **warm-up** (``s < projection_start``): that step alone, on everything;
2. **projection** (``projection_start <= s < pruning_start``): after the step, the partial
   projection -- only ``d`` is clamped into ``[d(b_u), d(b_l)]`` (bit width in ``[b_l, b_u]``),
   ``q_m`` and ``t`` stay free; ``b_u`` starts at ``max_bits`` and steps down at the start of
   each projection period to reach ``final_bits`` -- the ``b_u`` of the joint stage -- in the
   last one (:class:`BitSchedule`), so the projection hands the joint stage the range it
   projected onto, as upstream does (there ``max_bit_wt`` drops by ``bit_reduction`` at each
   period after the first, and the joint stage keeps where it ended: 16 - 4 x 2 = 8 in the
   VGG7 tutorial);
3. **joint** (``pruning_start <= s < cooldown_start``), in ``pruning_periods`` periods of ``L``
   steps: at the first step of a period the groups are scored (:func:`saliency`: magnitude,
   average magnitude, cosine similarity of parameter and direction, first- and second-order
   Taylor, each normalised over all channels, equal weights; the direction ``v`` stands for
   the gradient, as upstream) and the lowest-scoring alive channels -- this period's share of
   the target -- become *redundant* (at least ``group_divisible`` channels of every group stay,
   and with ``group_divisible = k > 1`` a group's kept channels are rounded up to a multiple
   of ``k``, as upstream). The target is a group sparsity (upstream), or, in budget mode, the
   fewest channels that, taken by the current scores, bring the counted cost at the current
   bit widths within the budget (found by bisection each period; the last period takes all
   that is still needed, so the pruned set meets the budget to within one channel).
   Groups without redundant channels take the step and the projection of stage 2 with
   ``b_u = final_bits``. A group with redundant channels takes upstream's *half-space* step:
   its ``q_m`` and ``t`` take the first-order step; with ``x`` the clipped values
   ``sign(w) min(|w|, q_m)^t`` of its redundant rows (biases and BN parameters as they are)
   and ``v`` their direction, the forget rate is ``gamma = 1 / (L - t)`` if ``cos(x, v) >= 0``
   (a linear decay to zero over the period) else ``-(1 - eta) lr |v| / (cos(x, v) |x|)``;
   ``d`` of each quantized layer of the group is *set* (no gradient step) against the
   quantization residual ``r = sign(w)(round(u) - u)``: ``d(b_l)`` if ``cos(r, v) >= 0``, else
   ``-zeta eta lr |v| / (gamma cos(r, v) |r|)`` (``gamma`` shrinks by 0.8 while that is below
   ``d(b_u)``), clamped into the layer's ``[d(b_u), d(b_l)]``; then every parameter of the
   group takes the first-order step and its redundant rows additionally lose ``gamma Q(w)``
   (quantized weights, ``Q`` with the new ``d``) or ``gamma p`` (biases, BN), both computed
   from the values before the step, as upstream. *Auxiliary* rows -- a BatchNorm that reads
   the channels through a concatenation (:attr:`jpqbench.blocks.geta.qadg.CoupledRows.auxiliary`) -- are
   left out of the angles and shrink by ``(L - t - 1) / (L - t)`` per step instead (upstream's
   auxiliary decay). At the last step of a period the redundant channels become *pruned*:
   exactly 0.0 from then on (re-zeroed after every step) and masked (``out_mask``, BN masks)
   for the plan; so at the end of the joint stage every redundant channel is exactly zero.
4. **cool-down** (``s >= cooldown_start``): every quantizer is frozen at the end of the joint
   stage at the integer bit width its grid needs -- the width the budget count of the pruning
   periods used (:meth:`LearnedQuantizer.freeze`; ``q_m`` and ``t`` keep training, ``d``
   follows them -- upstream's projection of ``d`` onto ``d(bits)``).

Choices that differ from upstream, each small and deliberate:

* Adam is the textbook one (upstream seeds its moment buffers with the first gradient and
  its square and still divides by the bias corrections, which scales the first steps by
  about 0.3); upstream's ``adamw`` variant is not offered (the harness's recipe has none);
* weight decay spares biases, BN and quantizer parameters (upstream's L2 term reaches every
  parameter, ``d``, ``q_m`` and ``t`` included: decaying ``d`` raises the bit width); the
  harness's groups are the same for every method, so the comparison stays fair;
* ``lr_quant`` follows the run's cosine schedule like every group (upstream keeps it constant
  while its scheduler decays ``lr``);
* ``gamma`` is capped at 1 (no overshoot past 0); a group's forget rate is 0 when its clipped
  values have (numerically) zero norm (upstream tests their *mean*, which is also below 1e-8
  for any group whose values are mostly negative); upstream's auxiliary decay runs once per
  step here (upstream repeats it for every parameter of the group in the same step);
* the freeze keeps the integer bit width the grid needs, ``ceil(log2(2n + 1))`` for ``n``
  positive levels (upstream rounds the continuous width, which for a 7.3-bit grid gives 7 bits
  where the grid has 157 values): one rule for the budget count, the freeze and the plan
  (:mod:`jpqbench.nn.learned_quant`), so the freeze never changes the counted cost;
* with ``bit_reduction`` unset, ``b_u`` steps down evenly from ``max_bits`` to ``final_bits``
  over the projection periods (upstream: a fixed ``bit_reduction``, whose end the user
  chooses to be the joint stage's ``b_u``; with 16 bits, 5 periods and ``b_u = 8`` the two are
  the same, 2 bits a period); a set ``bit_reduction`` still ends at ``final_bits`` in the last
  period;
* ``d`` is clamped per layer (upstream uses one ``d`` for all layers of a group, bounded with
  the largest ``q_m`` of the group, which can put a layer with a smaller range below ``b_l``);
* input (activation) quantizers are projected like weight quantizers, with their own
  ``[b_l, b_u]`` (upstream leaves that call commented out and lets activation bits float);
* the greedy selection keeps ``group_divisible`` channels of every group by taking the
  next-lowest channel elsewhere, so with ``group_divisible = 1`` the count is exactly the
  target (upstream shrinks the target; with ``k > 1`` the rounding shrinks it here too);
  groups of at most ``group_divisible`` channels are never pruned (upstream: the same);
* upstream clips gradients into ``[grad_clip_min, grad_clip_max]`` only in a helper that its
  ``step`` never calls, so there is no clipping here either;
* the state that is not a function of the parameters -- the step, redundant and pruned
  channels -- lives in buffers of a ``qasso_state`` module attached to the model during
  training, and the momentum buffers in the optimizer's ``state``; both are checkpointed,
  so a resumed run continues exactly where it stopped.

A **budget wall** runs when the bit widths are frozen: if the counted cost (the harness's
counter, through ``relative_cost``) is above the target, the quantizer with the most bits
(ties: the first layer) loses one bit until the cost fits. GETA has no budget; the wall only
takes back bits that rose after the last pruning period counted them (or, with a fixed group
sparsity, what the pruning the method predicted got wrong), so it never goes below ``b_l``
in budget mode. The wall is a projection onto the budget after the search: the bit widths
frozen before it are kept in ``qasso_state.searched_bits`` (:meth:`QassoHooks.searched_bits`),
so the method can report what its search itself reached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from jpqbench.base.errors import UserError
from jpqbench.blocks.geta.qadg import CoupledRows, PruningGroup
from jpqbench.harness.train import TrainHooks, TrainSpec
from jpqbench.nn.layers import compressible_layers, mask_batchnorm, module_device
from jpqbench.nn.learned_quant import LearnedQuantizer, learned_quantizers

RelativeCost = Callable[[nn.Module, "dict[str, list[int]] | None"], float]
"""``relative_cost(model, pruned)``: the counted relative cost of ``model`` as it is (integer bit
widths of its quantizers), with its pruned output channels replaced by ``pruned`` when given."""

DEFAULT_SALIENCY = {"magnitude": 0.2, "avg_magnitude": 0.2, "cosine_similarity": 0.2,
                    "taylor_first_order": 0.2, "taylor_second_order": 0.2}
STATE_NAME = "qasso_state"


@dataclass(frozen=True)
class Schedule:
    """QASSO's stage boundaries in optimizer steps (0-based) of one training run of ``total`` steps."""

    total: int
    projection_start: int
    projection_periods: int
    projection_len: int
    pruning_start: int
    pruning_periods: int
    pruning_len: int

    @property
    def cooldown_start(self) -> int:
        return self.pruning_start + self.pruning_periods * self.pruning_len

    @classmethod
    def from_fractions(cls, total: int, warmup: float, projection: float, pruning: float,
                       projection_periods: int, pruning_periods: int) -> "Schedule":
        """Boundaries as fractions of ``total`` steps; periods shrink when there are fewer steps."""
        projection_start = round(warmup * total)
        projection_steps = round(projection * total)
        pruning_steps = max(1, round(pruning * total))
        n_projection = max(1, min(projection_periods, projection_steps)) if projection_steps else 0
        n_pruning = min(pruning_periods, pruning_steps)
        schedule = cls(total, projection_start, n_projection, projection_steps // max(n_projection, 1),
                       projection_start + projection_steps, n_pruning, pruning_steps // n_pruning)
        if schedule.cooldown_start > total:
            raise UserError(f"the run has {total} optimizer steps, too few for GETA's stages "
                            f"(warm-up {projection_start}, projection {projection_steps}, pruning {pruning_steps})",
                            "give the run more epochs or steps, or lower the stage fractions")
        return schedule

    def stage(self, step: int) -> str:
        if step < self.projection_start:
            return "warmup"
        if step < self.pruning_start:
            return "projection"
        if step < self.cooldown_start:
            return "joint"
        return "cooldown"

    def projection_period(self, step: int) -> int:
        return min((step - self.projection_start) // self.projection_len, self.projection_periods - 1)

    def pruning_position(self, step: int) -> tuple[int, int]:
        """(period, step within the period) of a joint-stage step."""
        return divmod(step - self.pruning_start, self.pruning_len)


@dataclass(frozen=True)
class BitSchedule:
    """The bit range ``[low, b_u]`` of one kind of quantizer; ``b_u`` steps down from ``max_bits``
    over the projection periods and is ``final`` from the last projection period on."""

    low: int
    max_bits: int
    final: int
    reduction: int | None = None  # bits per period; None: even steps from max_bits to final

    def upper(self, schedule: Schedule, step: int) -> int:
        """``b_u`` at optimizer step ``step`` (``final`` outside the projection stage)."""
        if schedule.stage(step) != "projection":
            return self.final
        return self.period_upper(schedule.projection_period(step), schedule.projection_periods)

    def period_upper(self, period: int, periods: int) -> int:
        """``b_u`` in projection period ``period`` (0-based) of ``periods``.

        The last period always projects onto ``final``, so the joint stage starts from the range
        the projection ended in (no jump); before it ``b_u`` drops by ``reduction`` a period, or,
        with ``reduction`` None, by the even share of ``max_bits - final`` (rounded up), never
        below ``final``.
        """
        if period >= periods - 1:
            return self.final
        drop = self.max_bits - self.final
        if self.reduction is None:
            taken = -(-period * drop // (periods - 1))  # ceil(period * drop / (periods - 1))
        else:
            taken = period * self.reduction
        return max(self.final, self.max_bits - taken)


@dataclass
class QassoConfig:
    target_group_sparsity: float | None  # None: each period's count is derived from the budget
    lr_quant: float
    weight_bits: BitSchedule
    input_bits: BitSchedule | None
    saliency: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SALIENCY))
    group_divisible: int = 1  # kept channels per group: a multiple of this (upstream's default 1)
    eta: float = 0.999
    zeta: float = 0.9

    def __post_init__(self) -> None:
        if self.group_divisible < 1:
            raise ValueError(f"group_divisible must be at least 1, got {self.group_divisible}")


class QassoState(nn.Module):
    """The optimizer step, redundant (this period) and pruned channels over all groups, and the bit
    widths frozen before the budget wall (one per learned quantizer, in
    :func:`learned_quantizers` order; 0 until the freeze), as buffers (so the model's checkpoint
    carries them)."""

    def __init__(self, channels: int, quantizers: int) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("redundant", torch.zeros(channels, dtype=torch.bool))
        self.register_buffer("pruned", torch.zeros(channels, dtype=torch.bool))
        self.register_buffer("searched_bits", torch.zeros(quantizers, dtype=torch.long))


# ---- saliency ------------------------------------------------------------------------

Direction = Callable[[torch.Tensor], "torch.Tensor | None"]
"""``direction(param)``: the update direction QASSO uses for ``param`` (None: no gradient)."""


def _gradient(param: torch.Tensor) -> torch.Tensor | None:
    return param.grad


def _rows(module: nn.Module, rows: torch.Tensor, direction: Direction) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(values, direction) of the given output rows of every parameter of a conv/linear/BN, flattened."""
    out = []
    for param in (module.weight, module.bias):
        if param is None:
            continue
        value = param.detach()[rows].reshape(len(rows), -1)
        grad = direction(param)
        out.append((value, grad[rows].reshape(len(rows), -1) if grad is not None else torch.zeros_like(value)))
    return out


@torch.no_grad()
def saliency(model: nn.Module, groups: list[PruningGroup], weights: dict[str, float] | None = None,
             direction: Direction = _gradient) -> torch.Tensor:
    """GETA's combined saliency score of every channel of every group (concatenated, group order).

    Uses the parameters and their ``direction`` (default: the current ``.grad``; QASSO passes
    its own update direction, as upstream); each criterion is divided by its L2 norm over all
    channels before the weighted sum. Low score = redundant. The per-row sums are made on the
    parameters' device and gathered on the CPU, where the channel bookkeeping (scores, channel
    masks, the groups' row indices) lives whatever device the model trains on.
    """
    weights = DEFAULT_SALIENCY if weights is None else weights
    modules = dict(model.named_modules())
    sq, dot, gsq, width = [], [], [], []
    for group in groups:
        acc = torch.zeros(4, group.size, dtype=torch.float64)
        for coupled in (*group.layers, *group.norms):
            for value, grad in _rows(modules[coupled.module], coupled.rows, direction):
                acc[0].index_add_(0, coupled.channels, (value.double() ** 2).sum(1).cpu())
                acc[1].index_add_(0, coupled.channels, (value.double() * grad.double()).sum(1).cpu())
                acc[2].index_add_(0, coupled.channels, (grad.double() ** 2).sum(1).cpu())
                acc[3].index_add_(0, coupled.channels, torch.full((len(coupled.rows),), float(value.shape[1]),
                                                                  dtype=torch.float64))
        sq.append(acc[0]), dot.append(acc[1]), gsq.append(acc[2]), width.append(acc[3])
    sq, dot, gsq, width = (torch.cat(t) for t in (sq, dot, gsq, width))
    magnitude = sq.sqrt()
    criteria = {"magnitude": magnitude,
                "avg_magnitude": magnitude / width.clamp_min(1),
                "cosine_similarity": dot / (magnitude + 1e-8) / (gsq.sqrt() + 1e-8) + 1,
                "taylor_first_order": dot.abs(),
                "taylor_second_order": 0.5 * dot ** 2}
    unknown = set(weights) - set(criteria)
    if unknown:
        raise ValueError(f"unknown saliency criteria {sorted(unknown)}; known: {sorted(criteria)}")
    score = torch.zeros_like(magnitude)
    for name, weight in weights.items():
        score += weight * criteria[name] / (criteria[name].norm() + 1e-12)
    return score


def select_lowest(score: torch.Tensor, groups: list[PruningGroup], excluded: torch.Tensor, count: int,
                  divisible: int = 1) -> torch.Tensor:
    """The ``count`` lowest-scoring channels not in ``excluded``, keeping ``divisible`` channels of every group.

    Returns a bool mask over all channels; ties are broken by channel order (stable sort).
    Groups of at most ``divisible`` channels are never chosen. With ``divisible = k > 1`` each
    group's kept channels are then rounded up to a multiple of ``k`` (its highest-scoring chosen
    channels are given back), so fewer than ``count`` may be chosen -- upstream's
    ``group_divisible``. ``score`` is a CPU tensor (:func:`saliency`'s); so is the result.
    """
    excluded = excluded.cpu()
    chosen = torch.zeros_like(excluded)
    offsets = _offsets(groups)
    alive = [g.size - int(excluded[o:o + g.size].sum()) for g, o in zip(groups, offsets)]
    left = list(alive)
    owner = torch.cat([torch.full((g.size,), i) for i, g in enumerate(groups)])
    order = torch.argsort(score, stable=True).tolist()
    taken = 0
    for channel in order:
        if taken == count:
            break
        group = int(owner[channel])
        if excluded[channel] or left[group] <= divisible or groups[group].size <= divisible:
            continue
        chosen[channel] = True
        left[group] -= 1
        taken += 1
    if divisible > 1:
        for index, (group, offset) in enumerate(zip(groups, offsets)):
            kept = left[index]
            rounded = min(alive[index], -(-kept // divisible) * divisible)
            if rounded == kept:
                continue
            local = torch.nonzero(chosen[offset:offset + group.size]).flatten() + offset
            give_back = local[torch.argsort(score[local], descending=True, stable=True)[:rounded - kept]]
            chosen[give_back] = False
    return chosen


def prunable_channels(groups: list[PruningGroup], divisible: int = 1) -> int:
    """The most channels :func:`select_lowest` can choose: all but ``divisible`` of every larger group."""
    return sum(g.size - divisible for g in groups if g.size > divisible)


def _offsets(groups: list[PruningGroup]) -> list[int]:
    offsets, total = [], 0
    for group in groups:
        offsets.append(total)
        total += group.size
    return offsets


def pruned_rows(groups: list[PruningGroup], channels: torch.Tensor) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Output rows of every conv/linear and BN that the channels in the bool mask ``channels`` cover."""
    channels = channels.cpu()  # the groups' row indices are CPU tensors
    layers: dict[str, set[int]] = {}
    norms: dict[str, set[int]] = {}
    for group, offset in zip(groups, _offsets(groups)):
        local = channels[offset:offset + group.size]
        for target, coupled_rows in ((layers, group.layers), (norms, group.norms)):
            for coupled in coupled_rows:
                rows = coupled.rows[local[coupled.channels]].tolist()
                if rows:
                    target.setdefault(coupled.module, set()).update(rows)
    return ({k: sorted(v) for k, v in layers.items()}, {k: sorted(v) for k, v in norms.items()})


@torch.no_grad()
def apply_pruning(modules: dict[str, nn.Module], groups: list[PruningGroup], pruned: torch.Tensor) -> None:
    """Make the channels in the bool mask ``pruned`` exactly zero and mask them.

    Zeroes the output rows of every coupled conv/linear (weight, bias) and BN (scale, shift)
    and sets the layers' ``out_mask`` and the BN masks, so the plan read off the model names
    them pruned. ``modules`` maps names to modules (``dict(model.named_modules())``).
    """
    layers, norms = pruned_rows(groups, pruned)
    for name, rows in (*layers.items(), *norms.items()):
        module = modules[name]
        for param in (module.weight, module.bias):
            if param is not None:
                param[rows] = 0.0
    for name, rows in layers.items():
        modules[name].out_mask[rows] = 0.0
    for name, rows in norms.items():
        bn = modules[name]
        mask = torch.ones(bn.num_features)
        mask[rows] = 0.0
        mask_batchnorm(bn, mask)


# ---- the optimizer -----------------------------------------------------------------------

def _check_budget_inputs(config: QassoConfig, relative_cost: RelativeCost | None, target: float | None) -> None:
    if config.target_group_sparsity is None and (relative_cost is None or target is None):
        raise ValueError("without target_group_sparsity QASSO needs relative_cost and target")


_Part = tuple[CoupledRows, torch.Tensor, bool]  # coupled module, its redundant rows, is it a conv/linear writer


@dataclass
class _Forget:
    """One group's half-space step: rows that lose ``delta`` and auxiliary rows scaled by ``factor``."""

    subtract: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    scale: list[tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=list)


class Qasso(torch.optim.Optimizer):
    """GETA's QASSO optimizer (see the module docstring).

    Args:
        params: parameter groups (``lr``, ``weight_decay`` per group); :meth:`QassoHooks.param_groups`
            makes the usual ones (decayed weights, the rest, quantizer parameters at ``lr_quant``).
        model: the quantized model the parameters belong to, with a ``qasso_state`` module
            attached (:meth:`QassoHooks.attach`).
        groups: its QADG channel groups (:func:`jpqbench.blocks.geta.qadg.build_groups`).
        variant: ``"sgd"`` (with ``momentum``) or ``"adam"`` (with ``betas``, ``eps``).
        relative_cost, target: the budget -- each period's count when
            ``config.target_group_sparsity`` is None, and the budget wall at the freeze.
    """

    def __init__(self, params: Iterable[dict[str, Any]], model: nn.Module, groups: list[PruningGroup],
                 schedule: Schedule, config: QassoConfig, *, lr: float, variant: str = "sgd", momentum: float = 0.0,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 relative_cost: RelativeCost | None = None, target: float | None = None) -> None:
        if variant not in ("sgd", "adam"):
            raise ValueError(f"QASSO's variant must be 'sgd' or 'adam', got {variant!r}")
        _check_budget_inputs(config, relative_cost, target)
        if not isinstance(getattr(model, STATE_NAME, None), QassoState):
            raise ValueError(f"the model has no {STATE_NAME} module: call QassoHooks.attach(model) first")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, betas=betas, eps=eps))
        self.variant = variant
        self.model, self.groups, self.schedule, self.config = model, groups, schedule, config
        self.relative_cost, self.target = relative_cost, target
        self.qstate: QassoState = getattr(model, STATE_NAME)
        self.modules = dict(model.named_modules())
        self.layers = compressible_layers(model)
        self.quantizer_params = {id(p) for q in learned_quantizers(model).values() for p in q.parameters()}
        self.offsets = _offsets(groups)
        self.channels = sum(g.size for g in groups)
        self.period_counts: list[int] = []
        if config.target_group_sparsity is not None:
            target_count = int(self.channels * min(config.target_group_sparsity, 0.999) + 1e-9)
            per_period = target_count // schedule.pruning_periods
            self.period_counts = [per_period] * (schedule.pruning_periods - 1)
            self.period_counts.append(target_count - sum(self.period_counts))
        self._zero_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # ---- the step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        s = int(self.qstate.step)
        stage = self.schedule.stage(s)
        direction = self._directions()
        lr = {id(p): group["lr"] for group in self.param_groups for p in group["params"]}
        w_range = (self.config.weight_bits.low, self.config.weight_bits.upper(self.schedule, s))
        a_range = None if self.config.input_bits is None else \
            (self.config.input_bits.low, self.config.input_bits.upper(self.schedule, s))

        forgetting: list[tuple[PruningGroup, list[_Part]]] = []
        t = 0
        if stage == "joint":
            period, t = self.schedule.pruning_position(s)
            if t == 0:
                score = saliency(self.model, self.groups, self.config.saliency, lambda p: direction.get(id(p)))
                self.qstate.redundant.copy_(select_lowest(score, self.groups, self.qstate.pruned,
                                                          self._period_count(period, score),
                                                          self.config.group_divisible))
            forgetting = self._redundant_rows()
        set_d = self._quantized_writers(forgetting)
        skip = {id(self.layers[name].weight_quantizer.d) for name in set_d}

        # quantizer parameters first (the forget step reads the updated q_m and t, as upstream);
        # the d of a layer with redundant rows is set by the forget step instead
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in self.quantizer_params and id(p) in direction and id(p) not in skip:
                    p.add_(direction[id(p)], alpha=-group["lr"])
        forgets = [self._forget(group, parts, t, direction, lr, w_range) for group, parts in forgetting]
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self.quantizer_params and id(p) in direction:
                    p.add_(direction[id(p)], alpha=-group["lr"])
        for forget in forgets:
            for param, rows, delta in forget.subtract:
                param[rows] -= delta
            for param, rows, factor in forget.scale:
                param[rows] *= factor

        if stage in ("projection", "joint"):
            self._project(w_range, a_range, exclude=set_d)
        if stage == "joint" and t == self.schedule.pruning_len - 1:
            self._commit()
        self._zero_pruned()
        if s == self.schedule.cooldown_start - 1:
            self._freeze()
        self.qstate.step += 1
        return loss

    def _directions(self) -> dict[int, torch.Tensor]:
        """Upstream's ``grad_variant`` of every parameter with a gradient (updates the moment buffers)."""
        out: dict[int, torch.Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if not group["weight_decay"] else p.grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if self.variant == "sgd":
                    if group["momentum"]:
                        if "momentum_buffer" not in state:
                            state["momentum_buffer"] = grad.clone()
                        else:
                            state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                        grad = state["momentum_buffer"]
                else:
                    beta1, beta2 = group["betas"]
                    if "exp_avg" not in state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    state["exp_avg"].lerp_(grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    first = state["exp_avg"] / (1 - beta1 ** state["step"])
                    second = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
                    grad = first / (second.sqrt() + group["eps"])
                out[id(p)] = grad
        return out

    # ---- stage pieces ------------------------------------------------------------------
    def _redundant_rows(self) -> list[tuple[PruningGroup, list[_Part]]]:
        """Every group with redundant channels, with the redundant rows of each of its coupled modules
        (and whether the module is one of the group's conv/linear writers)."""
        out = []
        redundant = self.qstate.redundant.cpu()  # indexes the groups' CPU rows; the rows index any device
        for group, offset in zip(self.groups, self.offsets):
            local = redundant[offset:offset + group.size]
            if not local.any():
                continue
            parts = [(coupled, coupled.rows[local[coupled.channels]], is_layer)
                     for coupled_rows, is_layer in ((group.layers, True), (group.norms, False))
                     for coupled in coupled_rows]
            out.append((group, [part for part in parts if len(part[1])]))
        return out

    def _quantized_writers(self, forgetting: list[tuple[PruningGroup, list[_Part]]]) -> set[str]:
        """Conv/linear layers with redundant rows and a learned weight quantizer: the forget step sets their d."""
        return {coupled.module for _, parts in forgetting for coupled, _, is_layer in parts
                if is_layer and isinstance(self.layers[coupled.module].weight_quantizer, LearnedQuantizer)}

    def _forget(self, group: PruningGroup, parts: list[_Part], t: int,
                direction: dict[int, torch.Tensor], lr: dict[int, float], w_range: tuple[int, int]) -> _Forget:
        """The half-space step of one group at step ``t`` of its period: sets the d of its quantized
        layers and returns what its redundant rows lose, from the parameters before the step."""
        remaining = self.schedule.pruning_len - t
        eta, zeta = self.config.eta, self.config.zeta
        forget = _Forget()
        clip, res, grad = [], [], []
        for coupled, rows, _ in parts:
            if coupled.auxiliary:
                continue
            module = self.modules[coupled.module]
            quantizer = getattr(module, "weight_quantizer", None)
            for param in (module.weight, module.bias):
                if param is None:
                    continue
                value = param[rows]
                v = direction.get(id(param))
                grad.append((v[rows] if v is not None else torch.zeros_like(value)).flatten())
                if param is module.weight and isinstance(quantizer, LearnedQuantizer):
                    c, r = _clip_and_residual(quantizer, value)
                    clip.append(c.flatten()), res.append(r.flatten())
                else:
                    clip.append(value.flatten()), res.append(torch.zeros_like(value).flatten())
        clip, res, grad = torch.cat(clip), torch.cat(res), torch.cat(grad)
        g_norm, x_norm, r_norm = float(grad.norm()), float(clip.norm()), float(res.norm())
        cos_x = float(clip @ grad) / (max(x_norm, 1e-8) * g_norm) if g_norm > 0 else math.nan
        cos_r = float(res @ grad) / (max(r_norm, 1e-8) * g_norm) if g_norm > 0 else math.nan
        lr_w = lr[id(self.modules[group.layers[0].module].weight)]
        if x_norm < 1e-8 or not math.isfinite(cos_x):
            gamma = 0.0
        elif cos_x >= 0:
            gamma = 1.0 / remaining
        else:
            gamma = -(1 - eta) * lr_w * g_norm / (cos_x * x_norm)
        gamma = min(gamma, 1.0)

        quantized = {coupled.module: self.layers[coupled.module].weight_quantizer for coupled, _, is_layer in parts
                     if is_layer and isinstance(self.layers[coupled.module].weight_quantizer, LearnedQuantizer)}
        bounds = {name: (float(q.step_for_bits(w_range[1])), float(q.step_for_bits(w_range[0])))
                  for name, q in quantized.items()}
        if quantized:
            # no residual to set d against (or it underflowed to a zero norm): the coarsest step
            if gamma == 0.0 or r_norm < 1e-8 or not math.isfinite(cos_r) or cos_r >= 0:
                steps = {name: high for name, (low, high) in bounds.items()}
            else:
                d = -zeta * eta * lr_w * g_norm / (gamma * cos_r * r_norm)
                floor = max(low for low, _ in bounds.values())
                while d < floor:
                    gamma *= 0.8
                    d /= 0.8
                steps = {name: min(max(d, low), high) for name, (low, high) in bounds.items()}
            for name, step in steps.items():
                quantized[name].d.fill_(step)

        for coupled, rows, _ in parts:
            module = self.modules[coupled.module]
            params = [p for p in (module.weight, module.bias) if p is not None]
            if coupled.auxiliary:
                factor = (remaining - 1) / remaining
                forget.scale.extend((p, rows, factor) for p in params)
                continue
            quantizer = quantized.get(coupled.module)
            for p in params:
                values = quantizer(p[rows]) if quantizer is not None and p is module.weight else p[rows]
                forget.subtract.append((p, rows, gamma * values))
        return forget

    def _project(self, w_range: tuple[int, int], a_range: tuple[int, int] | None, exclude: set[str]) -> None:
        """The partial projection: every unfrozen quantizer's d into its bit range (``exclude``: weight
        quantizers whose d the forget step set)."""
        for name, layer in self.layers.items():
            wq, aq = layer.weight_quantizer, layer.input_quantizer
            if isinstance(wq, LearnedQuantizer) and not wq.frozen and name not in exclude:
                wq.project(*w_range)
            if a_range is not None and isinstance(aq, LearnedQuantizer) and not aq.frozen:
                aq.project(*a_range)

    def _period_count(self, period: int, score: torch.Tensor) -> int:
        """How many channels this period marks redundant: the fixed share of the target, or (budget
        mode) the share of the fewest further channels that, chosen by the current scores, bring the
        counted cost at the current bit widths within the target; the last period takes all of it."""
        if self.period_counts:
            return self.period_counts[period]
        pruned, divisible = self.qstate.pruned.cpu(), self.config.group_divisible

        def fits(count: int) -> bool:
            chosen = pruned | select_lowest(score, self.groups, pruned, count, divisible)
            return self.relative_cost(self.model, pruned_rows(self.groups, chosen)[0]) <= self.target

        alive = [g.size - int(pruned[o:o + g.size].sum()) for g, o in zip(self.groups, self.offsets)]
        low, high = -1, sum(a - divisible for a in alive if a > divisible)
        if fits(0):
            high = 0
        while high - low > 1:  # invariant: fits(high) (or high is the most that can go), not fits(low)
            mid = (low + high) // 2
            if fits(mid):
                high = mid
            else:
                low = mid
        return math.ceil(high / (self.schedule.pruning_periods - period))

    def _commit(self) -> None:
        """Redundant channels of the period become pruned: zero and masked from now on."""
        self.qstate.pruned |= self.qstate.redundant
        self.qstate.redundant.zero_()
        self._zero_cache = None
        apply_pruning(self.modules, self.groups, self.qstate.pruned)

    def _zero_pruned(self) -> None:
        """Pruned rows are exactly 0.0 after every step (momentum and weight decay would move them)."""
        if self._zero_cache is None:
            layers, norms = pruned_rows(self.groups, self.qstate.pruned)
            self._zero_cache = []
            for name, rows in (*layers.items(), *norms.items()):
                module = self.modules[name]
                for param in (module.weight, module.bias):
                    if param is not None:
                        self._zero_cache.append((param, torch.as_tensor(rows, dtype=torch.long, device=param.device)))
        for param, index in self._zero_cache:
            param.index_fill_(0, index, 0.0)

    def _freeze(self) -> None:
        """GETA's cool-down: freeze every bit width; then the budget wall (see the module docstring)."""
        quantizers = list(learned_quantizers(self.model).values())
        for quantizer in quantizers:
            quantizer.freeze()
        self.qstate.searched_bits.copy_(torch.tensor([int(q.frozen_bits) for q in quantizers]))
        if self.relative_cost is None or self.target is None:
            return
        while self.relative_cost(self.model, None) > self.target:
            widest = max(quantizers, key=lambda q: int(q.frozen_bits))
            if int(widest.frozen_bits) <= 2:
                raise UserError(f"GETA cannot reach the budget {self.target}: every quantizer is at 2 bits and "
                                f"the pruned model still costs {self.relative_cost(self.model, None):.4f}",
                                "raise target_group_sparsity or the budget")
            widest.freeze(int(widest.frozen_bits) - 1)


def _clip_and_residual(quantizer: LearnedQuantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GETA's clipped values ``sign(w) min(|w|, q_m)^t`` and residual ``sign(w) (round(u) - u)``."""
    sign = torch.sign(w)
    v = torch.minimum(w.abs(), quantizer.q_m.abs())
    v_t = torch.where(v > 0, torch.pow(v.clamp_min(1e-12), quantizer.t), torch.zeros_like(v))
    u = v_t / quantizer.step()
    return sign * v_t, sign * (torch.round(u) - u)


# ---- into the harness's training loop ---------------------------------------------------------

class QassoHooks(TrainHooks):
    """Hands :class:`Qasso` to ``ctx.train`` (``TrainHooks.make_optimizer``) with its parameter groups.

    Call :meth:`attach` before training (adds the ``qasso_state`` buffers and all-ones BN masks,
    so a checkpoint restores into the same keys) and :meth:`detach` after it. The optimizer
    variant, learning rate and momentum are the run's recipe (``TrainSpec``).
    """

    def __init__(self, model: nn.Module, groups: list[PruningGroup], schedule: Schedule, config: QassoConfig,
                 relative_cost: RelativeCost | None = None, target: float | None = None) -> None:
        _check_budget_inputs(config, relative_cost, target)
        self.model, self.groups, self.schedule, self.config = model, groups, schedule, config
        self.relative_cost, self.target = relative_cost, target
        self.optimizer: Qasso | None = None

    def attach(self, model: nn.Module) -> None:
        state = QassoState(sum(g.size for g in self.groups), len(learned_quantizers(model)))
        model.add_module(STATE_NAME, state.to(module_device(model)))
        modules = dict(model.named_modules())
        for group in self.groups:
            for coupled in group.norms:
                bn = modules[coupled.module]
                if not hasattr(bn, "channel_mask"):
                    mask_batchnorm(bn, torch.ones(bn.num_features))

    def detach(self, model: nn.Module) -> None:
        delattr(model, STATE_NAME)

    def state(self, model: nn.Module) -> QassoState:
        return getattr(model, STATE_NAME)

    def searched_bits(self, model: nn.Module) -> dict[str, int]:
        """Every learned quantizer's bit width as the search froze it, before the budget wall
        (by quantizer name, e.g. ``conv1.weight_quantizer``); call after the freeze, before :meth:`detach`."""
        bits = self.state(model).searched_bits.tolist()
        if not all(bits):
            raise RuntimeError("QASSO has not frozen the bit widths yet: no searched bit widths to read")
        return dict(zip(learned_quantizers(model), bits))

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        quant = {id(p) for q in learned_quantizers(model).values() for p in q.parameters()}
        decay, no_decay, quant_params = [], [], []
        for param in model.parameters():
            if not param.requires_grad:
                continue
            if id(param) in quant:
                quant_params.append(param)
            else:
                (decay if param.dim() > 1 else no_decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
                {"params": quant_params, "weight_decay": 0.0, "lr": self.config.lr_quant}]

    def make_optimizer(self, groups: list[dict[str, Any]], spec: TrainSpec) -> Qasso:
        self.optimizer = Qasso(groups, self.model, self.groups, self.schedule, self.config, lr=spec.lr,
                               variant=spec.optimizer, momentum=spec.momentum, relative_cost=self.relative_cost,
                               target=self.target)
        return self.optimizer
