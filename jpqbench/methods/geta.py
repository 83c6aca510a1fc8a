"""GETA: joint structured pruning and mixed-precision quantization-aware training.

Qu et al., "Automatic Joint Structured Pruning and Quantization for Efficient Neural Network
Training and Compression", CVPR 2025 (arXiv 2502.16638); code microsoft/geta.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from jpqbench import (
    FLOAT_BITS,
    Budget,
    Compressed,
    CompressionPlan,
    Method,
    RunContext,
    UserError,
    calibrate_inputs,
    cpu_copy,
    install_learned_quantizers,
    layer_bits,
    plan_from_model,
    register_method,
    with_pruned,
    with_uniform_bits,
)
from jpqbench.blocks.geta.qadg import PruningGroup, build_groups
from jpqbench.blocks.geta.qasso import (
    DEFAULT_SALIENCY,
    BitSchedule,
    QassoConfig,
    QassoHooks,
    Schedule,
    prunable_channels,
    pruned_rows,
    saliency,
    select_lowest,
)


@register_method("geta")
class Geta(Method):
    """GETA (Qu et al., CVPR 2025): QADG + QASSO -- structured pruning and learned bit widths in one training run.

    Every conv/linear gets GETA's learned quantizer (step d, range q_m, exponent t; 16 bits at
    start; jpqbench/nn/learned_quant.py, shared with djpq) on its weight and, in
    ``weight_activation`` mode (the default), on its input. Weights and activations is how GETA's
    own CNN operating point ran (upstream's VGG7 tutorial and README quick start:
    ``QuantizationMode.WEIGHT_AND_ACTIVATION``, 92.57 % at 0.41 % relative BOPs) and how every
    other method of the grid is counted; with weights only, activations stay at 32 bits, so a
    0.5-4.5 % BOPs budget can only be met by pruning roughly 70-93 % of the channels at
    ``b_u = b_l`` and GETA loses its mixed precision (upstream's library default, weights only,
    is kept as ``mode=weight``).

    The quantization-aware dependency graph (QADG, jpqbench/blocks/geta/qadg.py) groups coupled
    channels with torch-pruning, traced on a copy of the model whose quantizers are identities:
    quantizer parameters stay with their layer and are never pruned. QASSO
    (jpqbench/blocks/geta/qasso.py), a torch optimizer handed to the harness's trainer through
    ``TrainHooks.make_optimizer``, then takes every step of the run's whole epoch budget. Its
    first-order step is the recipe's SGD with momentum (no Nesterov) or Adam, with the quantizer
    parameters in their own group at ``lr_quant``. Four stages, as fractions of the run's
    optimizer steps (defaults: upstream's VGG7 tutorial, projection over the first 20 %, pruning
    over the next 20 %, 5 periods each):

    1. warm-up (``warmup_fraction``, default none);
    2. partial projection: only d is clamped into ``[d(b_u), d(b_l)]``, with ``b_u`` stepping
       down from ``max_bit_wt`` to the derived ``b_u``, which the last projection period
       reaches (``bit_reduction`` unset: even steps, e.g. upstream's 16, 14, 12, 10, 8);
    3. joint pruning: each period the lowest-saliency channels (QASSO's criteria: magnitude,
       average magnitude, cosine similarity, first- and second-order Taylor) become redundant;
       their rows take the half-space step (a forget rate from the angle between the clipped
       values and the optimizer's direction), their layers' d is set against the quantization
       residual, and they are exactly zero at the period's end. BatchNorms behind a channel
       concat decay linearly instead, like upstream's auxiliary groups;
    4. cool-down with frozen integer bit widths. One rule gives the integer width, for the
       count, the freeze and the plan: ``ceil(log2(2n + 1))`` bits for a signed grid of n
       positive levels (``ceil(log2(n + 1))`` unsigned; jpqbench/nn/learned_quant.py).

    The mechanics in detail: jpqbench/blocks/geta/qasso.py.

    How it meets the budget (the harness's counter throughout): before training, the bit
    range's upper end ``b_u`` is chosen. The pruned set is predicted with QASSO's own saliency
    score on the start model (gradients of ``calibration_batches`` training batches); for each
    ``b_u`` from ``max_final_bit`` down to ``min_bit_wt`` the smallest predicted pruning whose
    plan (all layers at ``b_u`` bits, activations at ``b_u`` in ``weight_activation`` mode,
    else 32) is within the target is found by bisection, and the largest ``b_u`` whose group
    sparsity is at most ``max_group_sparsity`` wins (if none is, the ``b_u`` that needs the
    least pruning: ``b_u = b_l``). Pricing every layer at ``b_u`` is what guarantees the bit
    range is feasible whatever widths QASSO learns inside it; the price is that at the tightest
    budgets the range closes to ``[b_l, b_l]``: it is [4, 4] at 0.5 % of the FP32 BOPs on every
    model of config/paper.yaml (and at 1 % on most), where GETA runs at uniform 4 bits and
    reaches the budget by pruning. During training the group sparsity is re-derived at each
    pruning period from the budget, the current scores and the current integer bit widths (the
    last period takes exactly what is still needed), so the search itself lands on the budget;
    bit widths are frozen at the integer width the count used. A budget wall at the freeze then
    takes back bits that rose after the last count (widest quantizer first) if the run is still
    over; that wall is a projection onto the budget, so the plan frozen before it goes back as
    ``Compressed.searched`` (reported as ``searched_relative_bops``). ``target_group_sparsity``
    fixes the sparsity instead, as upstream (then only ``b_u`` is derived, at that sparsity).

    Paper regime: GETA reports VGG7/CIFAR-10 at 0.41 % relative BOPs (its tutorial) and
    ResNet-20/CIFAR-10 at 4.5 %, so the grid's 0.5-4.5 % points lie inside what it ran and the
    10 % point is looser than both; no run is flagged ``outside_paper_regime``.

    ``group_divisible`` (upstream's, default 1) keeps every group's kept channels a multiple
    of it. Quantizers are per tensor, as upstream. Differences from upstream (the full list,
    with the smaller ones, is in jpqbench/blocks/geta/qasso.py):

    * ``lr_quant`` follows the run's cosine schedule like every learning rate (upstream:
      constant);
    * weight decay on conv/linear weights only, as for every method (upstream also decays d,
      which raises bit widths);
    * standard Adam moments (upstream seeds its moment buffers with the first gradient);
    * one d per layer, clamped per layer, not shared per group;
    * the auxiliary decay runs once per step (upstream repeats it for every parameter of the
      group);
    * activation quantizers are unsigned on post-ReLU inputs, initialised from calibration data
      (upstream: from the weight's range) and projected like the weights into
      ``[min_bit_act, b_u]`` (upstream leaves activation bit widths unprojected);
    * bit widths freeze at the integer width their grid needs (upstream rounds the continuous
      width);
    * the start model's saliency (for the budget derivation, before any step) uses raw
      gradients.
    """

    test_hparams = {"calibration_batches": 1, "projection_periods": 1, "pruning_periods": 1}

    class Hparams(Method.Hparams):
        mode: Literal["weight", "weight_activation"] = Field(
            "weight_activation", description="what is quantized: weights only, or weights and every conv/linear "
            "input (upstream's VGG7 tutorial and README quick start: weights and activations)")
        nonlinear: bool = Field(True, description="learn the quantizer's exponent t (upstream's default, "
                                                  "SYMMETRIC_NONLINEAR); false: t = 1, the linear variant")
        target_group_sparsity: float | None = Field(
            None, ge=0, lt=1, description="fixed fraction of all grouped channels to prune (upstream's knob); "
            "null: derived from the budget")
        max_group_sparsity: float = Field(
            0.5, gt=0, lt=1, description="largest fraction of grouped channels the b_u derivation plans to prune "
            "before it gives up bits (fraction of channels; upstream's VGG7 target_group_sparsity)")
        min_bit_wt: int = Field(4, ge=2, le=16, description="b_l of the weight quantizers (bits)")
        max_bit_wt: int = Field(16, ge=2, le=16, description="b_u of the weight quantizers at the start of the "
                                                            "projection (bits)")
        min_bit_act: int = Field(4, ge=2, le=16, description="b_l of the input quantizers (bits)")
        max_bit_act: int = Field(16, ge=2, le=16, description="b_u of the input quantizers at the start of the "
                                                             "projection (bits)")
        max_final_bit: int = Field(8, ge=2, le=16, description="the widest b_u the budget derivation may choose "
                                                               "for the joint stage (bits)")
        bit_reduction: int | None = Field(
            None, ge=1, description="bits b_u drops per projection period (bits); null: even steps from "
            "max_bit_wt to the derived b_u, which the last period reaches either way")
        warmup_fraction: float = Field(0.0, ge=0, lt=1, description="share of the run's optimizer steps before "
                                                                    "the projection (fraction)")
        projection_fraction: float = Field(0.2, ge=0, lt=1, description="share of the run's optimizer steps in "
                                                                        "the projection stage (fraction)")
        pruning_fraction: float = Field(0.2, gt=0, lt=1, description="share of the run's optimizer steps in the "
                                                                     "joint pruning stage (fraction)")
        projection_periods: int = Field(5, ge=1, description="periods of the projection stage (count)")
        pruning_periods: int = Field(5, ge=1, description="periods of the joint pruning stage (count)")
        lr_quant: float = Field(1e-3, gt=0, description="peak learning rate of the quantizer parameters d, q_m, "
                                                        "t (follows the run's cosine schedule)")
        weight_ste_clip: float | None = Field(
            2.0, gt=0, description="weights pass straight-through gradients where |w| <= this (weight units); "
            "null: where |w| <= q_m")
        saliency: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_SALIENCY),
                                           description="weights of QASSO's saliency criteria (unitless)")
        calibration_batches: int = Field(4, ge=1, description="training batches for the input quantizers' "
                                                              "ranges and the start saliency (count)")
        group_divisible: int = Field(1, ge=1, description="kept channels per group are a multiple of this "
                                                          "(channels)")

        @model_validator(mode="after")
        def _consistent(self) -> "Geta.Hparams":
            if self.warmup_fraction + self.projection_fraction + self.pruning_fraction > 1:
                raise ValueError("warmup_fraction + projection_fraction + pruning_fraction must be at most 1")
            if not self.min_bit_wt <= self.max_final_bit <= self.max_bit_wt:
                raise ValueError("need min_bit_wt <= max_final_bit <= max_bit_wt")
            if self.mode == "weight_activation" and not self.min_bit_act <= self.max_final_bit <= self.max_bit_act:
                raise ValueError("need min_bit_act <= max_final_bit <= max_bit_act")
            if any(w < 0 for w in self.saliency.values()) or not any(self.saliency.values()):
                raise ValueError("saliency weights must be non-negative and not all zero")
            return self

    def compress(self, model: nn.Module, budget: Budget, ctx: RunContext) -> Compressed:
        hp = self.hp
        activations = hp.mode == "weight_activation"
        skeleton, groups, score = self._prepare(model, ctx)
        count, bits = self._derive(skeleton, groups, score, budget, ctx)
        channels = sum(g.size for g in groups)

        steps_per_epoch = math.ceil(len(ctx.data.train) / ctx.recipe.batch_size)
        if ctx.recipe.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, ctx.recipe.max_steps_per_epoch)
        total = ctx.epochs * steps_per_epoch
        schedule = Schedule.from_fractions(total, hp.warmup_fraction, hp.projection_fraction, hp.pruning_fraction,
                                           hp.projection_periods, hp.pruning_periods)
        config = QassoConfig(
            target_group_sparsity=hp.target_group_sparsity, lr_quant=hp.lr_quant,
            weight_bits=BitSchedule(hp.min_bit_wt, hp.max_bit_wt, bits, hp.bit_reduction),
            input_bits=BitSchedule(min(hp.min_bit_act, bits), hp.max_bit_act, bits, hp.bit_reduction)
            if activations else None,
            saliency=dict(hp.saliency), group_divisible=hp.group_divisible)
        hooks = QassoHooks(model, groups, schedule, config,
                           relative_cost=lambda m, rows: _relative_cost(ctx, skeleton, m, rows, budget.metric),
                           target=budget.target)
        hooks.attach(model)
        ctx.train(model, ctx.epochs, phase="geta", hooks=hooks, lr=ctx.recipe.finetune_lr)
        pruned = int(hooks.state(model).pruned.sum())
        searched_bits = hooks.searched_bits(model)
        hooks.detach(model)
        bits_used = layer_bits(model)
        notes = {"group_sparsity": pruned / channels if channels else 0.0, "groups": len(groups),
                 "channels": channels, "pruned_channels": pruned, "predicted_pruned_channels": count,
                 "bit_range_w": [config.weight_bits.low, bits],
                 "mean_w_bits": sum(b["w"] for b in bits_used.values()) / len(bits_used)}
        if activations:
            notes["bit_range_a"] = [config.input_bits.low, bits]
        plan = plan_from_model(model, self.name, notes)
        return Compressed(model, plan, searched=_with_bits(plan, searched_bits))

    def _prepare(self, model: nn.Module, ctx: RunContext) -> tuple[nn.Module, list[PruningGroup], torch.Tensor]:
        """Give ``model`` GETA's quantizers (input ones calibrated), group its channels (QADG) and
        score them on the start model: (a plain copy of the start model, groups, channel scores).

        Costs depend on shapes and the plan only, so they are counted on that plain CPU copy, which
        is cheaper to copy (no quantizers, hooks or gradients) in the counter's probe, whatever the
        model's device.
        """
        hp = self.hp
        skeleton = cpu_copy(model)
        activations = hp.mode == "weight_activation"
        install_learned_quantizers(model, weights=True, activations=activations, learn_exponent=hp.nonlinear,
                                   init_bits=16, weight_ste_clip=hp.weight_ste_clip)
        if activations:
            calibrate_inputs(model, ctx.calibration_batches(hp.calibration_batches))
        groups = build_groups(model, ctx.input_shape)
        return skeleton, groups, _start_saliency(model, groups, ctx, hp.calibration_batches, hp.saliency)

    def _derive(self, skeleton: nn.Module, groups: list[PruningGroup], score: torch.Tensor, budget: Budget,
                ctx: RunContext) -> tuple[int, int]:
        """(number of channels to prune, upper bit width b_u) from the budget; see the class docstring.

        ``skeleton`` is a plain copy of the model (same layer names and shapes) to count costs on.
        """
        hp = self.hp
        dense = CompressionPlan.dense(skeleton)
        channels = sum(g.size for g in groups)
        max_count = prunable_channels(groups, hp.group_divisible)
        excluded = torch.zeros(channels, dtype=torch.bool)

        def cost(count: int, bits: int) -> float:
            layers, _ = pruned_rows(groups, select_lowest(score, groups, excluded, count, hp.group_divisible))
            a_bits = bits if hp.mode == "weight_activation" else FLOAT_BITS
            return ctx.cost(skeleton, with_uniform_bits(with_pruned(dense, layers), bits, a_bits)).relative(budget.metric)

        def smallest_count(bits: int, fits: int | None = None) -> int | None:
            """The fewest channels to prune at ``bits``; ``fits``: a count already known to fit."""
            if fits is None:
                if cost(max_count, bits) > budget.target:
                    return None
                fits = max_count
            low, high = -1, fits  # cost(high) fits; cost(low) does not (or low = -1)
            while high - low > 1:
                mid = (low + high) // 2
                if cost(mid, bits) <= budget.target:
                    high = mid
                else:
                    low = mid
            return high

        candidates = range(hp.max_final_bit, hp.min_bit_wt - 1, -1)
        if hp.target_group_sparsity is not None:
            count = int(channels * hp.target_group_sparsity + 1e-9)
            if count > max_count:
                raise UserError(f"target_group_sparsity {hp.target_group_sparsity} would prune whole groups "
                                f"(at most {max_count} of {channels} channels can go with "
                                f"group_divisible={hp.group_divisible})",
                                "choose a smaller target_group_sparsity")
            for bits in candidates:
                if cost(count, bits) <= budget.target:
                    return count, bits
            raise UserError(f"GETA cannot reach budget {budget.target} at group sparsity {hp.target_group_sparsity} "
                            f"with {hp.min_bit_wt}-bit weights", "raise target_group_sparsity, lower min_bit_wt, "
                            "or leave target_group_sparsity unset to derive it from the budget")
        preferred = min(int(hp.max_group_sparsity * channels), max_count)
        for bits in candidates:  # the widest b_u at which max_group_sparsity suffices
            if cost(preferred, bits) <= budget.target:
                return smallest_count(bits, preferred), bits
        # none: the narrowest b_u, which needs the least pruning (fewer bits never need more)
        count = smallest_count(hp.min_bit_wt)
        if count is None:
            raise UserError(f"GETA cannot reach budget {budget.target}: pruning all but {hp.group_divisible} "
                            f"channel(s) per group at {hp.min_bit_wt} bits still costs "
                            f"{cost(max_count, hp.min_bit_wt):.4f}",
                            "choose a larger budget, lower min_bit_wt or group_divisible"
                            + (", or mode=weight_activation" if hp.mode == "weight" else ""))
        return count, hp.min_bit_wt


def _with_bits(plan: CompressionPlan, bits: dict[str, int]) -> CompressionPlan:
    """``plan`` with every layer's weight and input bit widths taken from ``bits`` (by quantizer
    name, :meth:`QassoHooks.searched_bits`): the plan the search reached before the budget wall."""
    layers = {name: replace(layer, w_bits=bits.get(f"{name}.weight_quantizer", layer.w_bits),
                            a_bits=bits.get(f"{name}.input_quantizer", layer.a_bits))
              for name, layer in plan.layers.items()}
    return CompressionPlan(layers, plan.method, dict(plan.notes))


def _relative_cost(ctx: RunContext, skeleton: nn.Module, model: nn.Module, pruned: dict[str, list[int]] | None,
                   metric: str) -> float:
    """The counted cost of ``model`` as it is, its pruned channels replaced by ``pruned`` if given
    (counted on ``skeleton``, a plain copy with the same layers and shapes)."""
    plan = plan_from_model(model, "geta")
    return ctx.cost(skeleton, plan if pruned is None else with_pruned(plan, pruned)).relative(metric)


def _start_saliency(model: nn.Module, groups: list[PruningGroup], ctx: RunContext, n_batches: int,
                    weights: dict[str, float]) -> torch.Tensor:
    """QASSO's saliency on the start model, with the gradient summed over ``n_batches`` training batches."""
    loader = ctx.data.loader("train", ctx.recipe.batch_size, shuffle=True,
                             generator=torch.Generator().manual_seed(ctx.seed))
    was_training = model.training
    model.eval()  # BN statistics stay those of the start model
    model.zero_grad(set_to_none=True)
    try:
        for index, (inputs, targets) in enumerate(loader):
            if index >= n_batches:
                break
            F.cross_entropy(model(inputs), targets).backward()
        return saliency(model, groups, weights)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
