"""QASSO: GETA's quantization-aware structured sparse optimizer, as hooks around the harness loop.

The harness's optimizer takes every gradient step (weights at ``lr``, quantizer parameters at
``lr_quant``: :meth:`Qasso.param_groups`); :meth:`Qasso.after_step` then does what GETA's
optimizer adds, by optimizer step ``s`` of the run (0-based, :class:`Schedule`):

1. **warm-up** (``s < projection_start``): nothing -- plain training of everything;
2. **projection** (``projection_start <= s < pruning_start``): the partial projection -- only
   ``d`` is clamped into ``[d(b_u), d(b_l)]`` (bit width in ``[b_l, b_u]``), ``q_m`` and ``t``
   stay free; ``b_u`` starts at ``max_bits`` and drops by ``bit_reduction`` at the start of each
   projection period, never below ``final_bits``;
3. **joint** (``pruning_start <= s < cooldown_start``), in ``pruning_periods`` periods of ``L``
   steps: at the first step of a period the groups are scored (:func:`saliency`: magnitude,
   average magnitude, cosine similarity of parameter and gradient, first- and second-order
   Taylor, each normalised over all channels, equal weights) and the lowest-scoring alive
   channels -- this period's share of the target -- become *redundant* (at least one channel
   of every group stays). The target is a group sparsity (upstream), or, in budget mode, the
   fewest channels that, taken by the current scores, bring the counted cost at the current
   bit widths within the budget (found by bisection each period; the last period takes all
   that is still needed, so the pruned set meets the budget to within one channel). At every step of the period each group with redundant channels
   gets the angle-based forget step: with ``x`` the clipped values ``sign(w) min(|w|, q_m)^t``
   of its redundant rows and ``g`` their gradient, ``gamma = 1 / (L - t)`` if
   ``cos(x, g) >= 0`` (a linear decay to zero over the period) else
   ``-(1 - eta) lr |g| / (cos(x, g) |x|)``; ``d`` of each quantized layer in the group is chosen
   against the quantization residual ``r = sign(w)(round(u) - u)``: ``d(b_l)`` if
   ``cos(r, g) >= 0``, else ``-zeta eta lr |g| / (gamma cos(r, g) |r|)`` (``gamma`` shrinks by
   0.8 while that is below ``d(b_u)``), clamped into the layer's ``[d(b_u), d(b_l)]``; then the
   redundant rows move by ``-gamma Q(w)`` (quantized weights) or ``-gamma p`` (biases, BN).
   Groups without redundant channels are projected as in stage 2 with ``b_u = final_bits``.
   At the last step of a period the redundant channels become *pruned*: exactly 0.0 from then
   on (re-zeroed after every step) and masked (``out_mask``, BN masks) for the plan.
4. **cool-down** (``s >= cooldown_start``): every quantizer is frozen at its rounded bit width
   (:meth:`LearnedQuantizer.freeze`; ``q_m`` and ``t`` keep training, ``d`` follows them).

Choices that differ from upstream (microsoft/geta ``optimizer/geta.py``), each small:

* the gradient in the angles and scores is the raw gradient of the step (upstream: its
  optimizer's own direction, which for its default SGD variant without momentum is the same);
  the step's ``lr`` is the harness's cosine schedule at ``s``; the forget step acts on the
  weights after the harness's step, not before it; ``gamma`` is capped at 1 (no overshoot past 0);
* ``d`` is clamped per layer (upstream uses one ``d`` for all layers of a group, bounded with
  the largest ``q_m`` of the group, which can put a layer with a smaller range below ``b_l``);
* a group's forget rate is 0 when its clipped values have (numerically) zero norm (upstream
  tests their *mean*, which is also below 1e-8 for any group whose values are mostly negative);
* input (activation) quantizers are projected like weight quantizers, with their own
  ``[b_l, b_u]`` (upstream leaves that call commented out and lets activation bits float);
* the selection of redundant channels keeps one channel of every group alive by taking the
  next-lowest channel elsewhere, so the count is exactly the target (upstream shrinks the target);
* the run's state that is not a function of ``s`` (redundant and pruned channels) lives in
  buffers of a ``qasso_state`` module attached to the model during training, so a resumed run
  continues exactly where the checkpoint left it.

A **budget wall** runs when the bit widths are frozen: if the counted cost (the harness's
counter, through ``relative_cost``) is above the target, the quantizer with the most bits
(ties: the first layer) loses one bit until the cost fits. GETA has no budget; the wall only
takes back bits that rose after the last pruning period counted them (or, with a fixed group
sparsity, what the pruning the method predicted got wrong), so it never goes below ``b_l``
in budget mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from jpqbench.errors import UserError
from jpqbench.layers import compressible_layers, mask_batchnorm
from jpqbench.learned_quant import LearnedQuantizer, learned_quantizers
from jpqbench.qadg import PruningGroup
from jpqbench.train import TrainHooks

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
    """The bit range ``[low, b_u]`` of one kind of quantizer; ``b_u`` steps down from ``max_bits``."""

    low: int
    max_bits: int
    final: int
    reduction: int | None = None  # None: the reduction that reaches ``final`` in the last projection period

    def upper(self, schedule: Schedule, step: int) -> int:
        if schedule.stage(step) != "projection":
            return self.final
        periods = schedule.projection_periods
        reduction = self.reduction
        if reduction is None:
            reduction = math.ceil((self.max_bits - self.final) / (periods - 1)) if periods > 1 else 0
        return max(self.final, self.max_bits - schedule.projection_period(step) * reduction)


@dataclass
class QassoConfig:
    target_group_sparsity: float | None  # None: each period's count is derived from the budget
    lr_quant: float
    weight_bits: BitSchedule
    input_bits: BitSchedule | None
    saliency: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SALIENCY))
    eta: float = 0.999
    zeta: float = 0.9


class QassoState(nn.Module):
    """Redundant (this period) and pruned channels over all groups, as buffers (checkpointed)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("redundant", torch.zeros(channels, dtype=torch.bool))
        self.register_buffer("pruned", torch.zeros(channels, dtype=torch.bool))


# ---- saliency ------------------------------------------------------------------------

def _rows(module: nn.Module, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(values, gradient) of the given output rows of every parameter of a conv/linear/BN, flattened."""
    out = []
    for param in (module.weight, module.bias):
        if param is None:
            continue
        value = param.detach()[rows].reshape(len(rows), -1)
        grad = param.grad[rows].reshape(len(rows), -1) if param.grad is not None else torch.zeros_like(value)
        out.append((value, grad))
    return out


@torch.no_grad()
def saliency(model: nn.Module, groups: list[PruningGroup], weights: dict[str, float] | None = None) -> torch.Tensor:
    """GETA's combined saliency score of every channel of every group (concatenated, group order).

    Uses the parameters and their current ``.grad``; each criterion is divided by its L2 norm
    over all channels before the weighted sum. Low score = redundant.
    """
    weights = DEFAULT_SALIENCY if weights is None else weights
    modules = dict(model.named_modules())
    sq, dot, gsq, width = [], [], [], []
    for group in groups:
        acc = torch.zeros(4, group.size, dtype=torch.float64)
        for coupled in (*group.layers, *group.norms):
            for value, grad in _rows(modules[coupled.module], coupled.rows):
                acc[0].index_add_(0, coupled.channels, (value.double() ** 2).sum(1))
                acc[1].index_add_(0, coupled.channels, (value.double() * grad.double()).sum(1))
                acc[2].index_add_(0, coupled.channels, (grad.double() ** 2).sum(1))
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


def select_lowest(score: torch.Tensor, groups: list[PruningGroup], excluded: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` lowest-scoring channels not in ``excluded``, keeping one channel of every group.

    Returns a bool mask over all channels. Ties are broken by channel order (stable sort).
    """
    chosen = torch.zeros_like(excluded)
    left = [g.size - int(excluded[o:o + g.size].sum()) for g, o in zip(groups, _offsets(groups))]
    owner = torch.cat([torch.full((g.size,), i) for i, g in enumerate(groups)])
    taken = 0
    for channel in torch.argsort(score, stable=True).tolist():
        if taken == count:
            break
        group = int(owner[channel])
        if excluded[channel] or left[group] <= 1:
            continue
        chosen[channel] = True
        left[group] -= 1
        taken += 1
    return chosen


def _offsets(groups: list[PruningGroup]) -> list[int]:
    offsets, total = [], 0
    for group in groups:
        offsets.append(total)
        total += group.size
    return offsets


def pruned_rows(groups: list[PruningGroup], channels: torch.Tensor) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Output rows of every conv/linear and BN that the channels in the bool mask ``channels`` cover."""
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


# ---- the optimizer hooks ---------------------------------------------------------------

class Qasso(TrainHooks):
    """GETA's QASSO around ``ctx.train`` (see the module docstring).

    ``lr_at(step)`` is the weights' learning rate at optimizer step ``step`` (the harness's
    schedule); ``relative_cost`` and ``target`` drive the budget: each period's count when
    ``config.target_group_sparsity`` is None, and the budget wall at the freeze.
    Call :meth:`attach` before training and :meth:`detach` after it.
    """

    def __init__(self, model: nn.Module, groups: list[PruningGroup], schedule: Schedule, config: QassoConfig,
                 lr_at: Callable[[int], float], relative_cost: RelativeCost | None = None,
                 target: float | None = None) -> None:
        if config.target_group_sparsity is None and (relative_cost is None or target is None):
            raise ValueError("without target_group_sparsity QASSO needs relative_cost and target")
        self.groups, self.schedule, self.config = groups, schedule, config
        self.lr_at, self.relative_cost, self.target = lr_at, relative_cost, target
        self.offsets = _offsets(groups)
        self.channels = sum(g.size for g in groups)
        self.period_counts: list[int] = []
        if config.target_group_sparsity is not None:
            target_count = int(self.channels * min(config.target_group_sparsity, 0.999) + 1e-9)
            per_period = target_count // schedule.pruning_periods
            self.period_counts = [per_period] * (schedule.pruning_periods - 1)
            self.period_counts.append(target_count - sum(self.period_counts))
        self.modules = dict(model.named_modules())
        self.layers = compressible_layers(model)
        self._zero_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # ---- lifecycle -------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Add the state buffers and all-ones BN masks (so a checkpoint restores into the same keys)."""
        model.add_module(STATE_NAME, QassoState(self.channels))
        for group in self.groups:
            for coupled in group.norms:
                bn = self.modules[coupled.module]
                if not hasattr(bn, "channel_mask"):
                    mask_batchnorm(bn, torch.ones(bn.num_features))

    def detach(self, model: nn.Module) -> None:
        delattr(model, STATE_NAME)

    def state(self, model: nn.Module) -> QassoState:
        return getattr(model, STATE_NAME)

    # ---- TrainHooks ------------------------------------------------------------------
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

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        stage = self.schedule.stage(step)
        if stage == "warmup":
            return
        state = self.state(model)
        w_range = (self.config.weight_bits.low, self.config.weight_bits.upper(self.schedule, step))
        a_range = None if self.config.input_bits is None else \
            (self.config.input_bits.low, self.config.input_bits.upper(self.schedule, step))
        if stage != "cooldown":  # partial projection; the forget step below re-chooses d in its groups
            self._project(w_range, a_range)
        if stage == "joint":
            period, t = self.schedule.pruning_position(step)
            if t == 0:
                score = saliency(model, self.groups, self.config.saliency)
                state.redundant.copy_(select_lowest(score, self.groups, state.pruned,
                                                    self._period_count(model, state, period, score)))
            self._forget_step(state, t, self.lr_at(step), w_range)
        if stage == "joint" and t == self.schedule.pruning_len - 1:
            self._commit(state)
        self._zero_pruned(state)
        if step == self.schedule.cooldown_start - 1:
            self._freeze(model)

    # ---- stage pieces ----------------------------------------------------------------
    def _project(self, w_range: tuple[int, int], a_range: tuple[int, int] | None) -> None:
        for layer in self.layers.values():
            wq, aq = layer.weight_quantizer, layer.input_quantizer
            if isinstance(wq, LearnedQuantizer) and not wq.frozen:
                wq.project(*w_range)
            if a_range is not None and isinstance(aq, LearnedQuantizer) and not aq.frozen:
                aq.project(*a_range)

    def _forget_step(self, state: QassoState, t: int, lr: float, w_range: tuple[int, int]) -> None:
        """The joint stage's step on every group with redundant channels (sets d of their quantized layers)."""
        remaining = self.schedule.pruning_len - t
        eta, zeta = self.config.eta, self.config.zeta
        for group, offset in zip(self.groups, self.offsets):
            local = state.redundant[offset:offset + group.size]
            if not local.any():
                continue
            parts = []  # (module name, rows) of the redundant rows of each coupled module
            clip, res, grad = [], [], []
            for coupled in (*group.layers, *group.norms):
                rows = coupled.rows[local[coupled.channels]]
                if not len(rows):
                    continue
                parts.append((coupled.module, rows))
                module = self.modules[coupled.module]
                quantizer = getattr(module, "weight_quantizer", None)
                for param in (module.weight, module.bias):
                    if param is None:
                        continue
                    value = param.detach()[rows]
                    grad.append((param.grad[rows] if param.grad is not None else torch.zeros_like(value)).flatten())
                    if param is module.weight and isinstance(quantizer, LearnedQuantizer):
                        c, r = _clip_and_residual(quantizer, value)
                        clip.append(c.flatten()), res.append(r.flatten())
                    else:
                        clip.append(value.flatten()), res.append(torch.zeros_like(value).flatten())
            clip, res, grad = torch.cat(clip), torch.cat(res), torch.cat(grad)
            g_norm, x_norm, r_norm = float(grad.norm()), float(clip.norm()), float(res.norm())
            cos_x = float(clip @ grad) / (max(x_norm, 1e-8) * g_norm) if g_norm > 0 else math.nan
            cos_r = float(res @ grad) / (max(r_norm, 1e-8) * g_norm) if g_norm > 0 else math.nan
            if x_norm < 1e-8 or not math.isfinite(cos_x):
                gamma = 0.0
            elif cos_x >= 0:
                gamma = 1.0 / remaining
            else:
                gamma = -(1 - eta) * lr * g_norm / (cos_x * x_norm)
            gamma = min(gamma, 1.0)
            quantized = {name: self.modules[name].weight_quantizer for name, _ in parts
                         if isinstance(getattr(self.modules[name], "weight_quantizer", None), LearnedQuantizer)}
            bounds = {name: (float(q.step_for_bits(w_range[1])), float(q.step_for_bits(w_range[0])))
                      for name, q in quantized.items()}
            if quantized:
                if gamma == 0.0 or not math.isfinite(cos_r) or cos_r >= 0:
                    steps = {name: high for name, (low, high) in bounds.items()}
                else:
                    d = -zeta * eta * lr * g_norm / (gamma * cos_r * r_norm)
                    floor = max(low for low, _ in bounds.values())
                    while d < floor:
                        gamma *= 0.8
                        d /= 0.8
                    steps = {name: min(max(d, low), high) for name, (low, high) in bounds.items()}
                for name, step in steps.items():
                    quantized[name].d.fill_(step)
            for name, rows in parts:
                module = self.modules[name]
                quantizer = quantized.get(name)
                if quantizer is not None:
                    module.weight[rows] -= gamma * quantizer(module.weight[rows])
                elif module.weight is not None:
                    module.weight[rows] *= 1 - gamma
                if module.bias is not None:
                    module.bias[rows] *= 1 - gamma

    def _period_count(self, model: nn.Module, state: QassoState, period: int, score: torch.Tensor) -> int:
        """How many channels this period marks redundant: the fixed share of the target, or (budget
        mode) the share of the fewest further channels that, chosen by the current scores, bring the
        counted cost at the current bit widths within the target; the last period takes all of it."""
        if self.period_counts:
            return self.period_counts[period]

        def fits(count: int) -> bool:
            chosen = state.pruned | select_lowest(score, self.groups, state.pruned, count)
            return self.relative_cost(model, pruned_rows(self.groups, chosen)[0]) <= self.target

        alive = [g.size - int(state.pruned[o:o + g.size].sum()) for g, o in zip(self.groups, self.offsets)]
        low, high = -1, sum(a - 1 for a in alive)  # at most: all but one channel of every group
        if fits(0):
            high = 0
        while high - low > 1:  # invariant: fits(high) (or high is the most that can go), not fits(low)
            mid = (low + high) // 2
            if fits(mid):
                high = mid
            else:
                low = mid
        return math.ceil(high / (self.schedule.pruning_periods - period))

    def _commit(self, state: QassoState) -> None:
        """Redundant channels of the period become pruned: zero and masked from now on."""
        state.pruned |= state.redundant
        state.redundant.zero_()
        self._zero_cache = None
        apply_pruning(self.modules, self.groups, state.pruned)

    def _zero_pruned(self, state: QassoState) -> None:
        """Pruned rows are exactly 0.0 after every step (momentum and weight decay would move them)."""
        if self._zero_cache is None:
            layers, norms = pruned_rows(self.groups, state.pruned)
            self._zero_cache = []
            for name, rows in (*layers.items(), *norms.items()):
                module = self.modules[name]
                index = torch.as_tensor(rows, dtype=torch.long)
                for param in (module.weight, module.bias):
                    if param is not None:
                        self._zero_cache.append((param, index))
        for param, index in self._zero_cache:
            param.index_fill_(0, index, 0.0)

    def _freeze(self, model: nn.Module) -> None:
        """GETA's cool-down: freeze every bit width; then the budget wall (see the module docstring)."""
        quantizers = list(learned_quantizers(model).values())
        for quantizer in quantizers:
            quantizer.freeze()
        if self.relative_cost is None or self.target is None:
            return
        while self.relative_cost(model, None) > self.target:
            widest = max(quantizers, key=lambda q: int(q.frozen_bits))
            if int(widest.frozen_bits) <= 2:
                raise UserError(f"GETA cannot reach the budget {self.target}: every quantizer is at 2 bits and "
                                f"the pruned model still costs {self.relative_cost(model, None):.4f}",
                                "raise target_group_sparsity or the budget")
            widest.freeze(int(widest.frozen_bits) - 1)


def _clip_and_residual(quantizer: LearnedQuantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GETA's clipped values ``sign(w) min(|w|, q_m)^t`` and residual ``sign(w) (round(u) - u)``."""
    sign = torch.sign(w)
    v = torch.minimum(w.abs(), quantizer.q_m.abs())
    v_t = torch.where(v > 0, torch.pow(v.clamp_min(1e-12), quantizer.t), torch.zeros_like(v))
    u = v_t / quantizer.step()
    return sign * v_t, sign * (torch.round(u) - u)
