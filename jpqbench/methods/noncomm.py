"""Joint quantization and unstructured pruning of weights and activations, with the schedule as the variable."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from jpqbench import (
    Budget,
    Compressed,
    CompressionPlan,
    Method,
    RunContext,
    TrainHooks,
    UserError,
    compressible_layers,
    largest_uniform_bits,
    make_compressible,
    plan_from_model,
    register_method,
    shard_steps,
    with_uniform_bits,
)
from jpqbench.blocks.noncomm.qsparse import (
    ActivationPQ,
    Placement,
    WeightPQ,
    cubic_sparsity,
    place_activation_operators,
)

# The paper's CIFAR-10 schedules (mlzxy/qsparse-examples cifar10/mobilenetv2.py, train modes
# prune_*-quantize, quantize-prune_*-late and quantize-late), in epochs of a 250-epoch run; used as
# fractions of the run's budget.
PAPER_EPOCHS = 250
PAPER_SCHEDULES: dict[str, dict[str, tuple[int, ...]]] = {
    "pq": {"prune": (115, 130, 145, 160), "weights": (230,), "activations": (235,)},
    "qp": {"prune": (195, 210, 225, 240), "weights": (160,), "activations": (170,)},
    "q": {"prune": (), "weights": (230,), "activations": (240,)},
}

# The operating points the paper ran, on every task it reports (MobileNetV2/CIFAR-10, ESPCN,
# Faster R-CNN, Pix2Pix, CycleGAN): 8-bit weights and activations (Q8), and no pruning (Q8 alone),
# weights pruned to 0.5 (P0.5(w)) or weights and activations pruned to 0.5 (P0.5(w, f)).
PAPER_BITS = 8
PAPER_SPARSITIES: frozenset[tuple[float, float]] = frozenset({(0.0, 0.0), (0.5, 0.0), (0.5, 0.5)})


def outside_paper_regime(bits: int, w_sparsity: float, a_sparsity: float) -> str | None:
    """Why a run at this operating point is one the paper never ran, or None if the paper ran it.

    The rule: ``bits`` (weights and activations alike) must be the paper's 8, and the final
    (weight, activation) sparsity pair one of the paper's (0, 0), (0.5, 0), (0.5, 0.5) --
    sparsities as the run applies them (0 for what its schedule does not prune), compared to
    1e-9. Anything else -- a budget that forces fewer bits, or another sparsity -- is outside,
    whichever order: the paper's claim that the order matters was made at Q8 P0.5 only.
    """
    ran = bits == PAPER_BITS and any(math.isclose(w_sparsity, w, abs_tol=1e-9) and
                                     math.isclose(a_sparsity, a, abs_tol=1e-9) for w, a in PAPER_SPARSITIES)
    if ran:
        return None
    return (f"the paper ran only {PAPER_BITS}-bit weights and activations with (weight, activation) sparsity "
            f"(0, 0), (0.5, 0) or (0.5, 0.5); this run uses {bits} bits at ({w_sparsity:g}, {a_sparsity:g})")


Kind = Literal["prune", "weights", "activations"]


@dataclass(frozen=True)
class Event:
    """At training step ``step``: prune to ``scale`` x the target sparsity, or switch a quantizer family on."""

    step: int
    kind: Kind
    scale: float = 1.0


def schedule_events(prune_at: tuple[float, ...], weights_at: float, activations_at: float,
                    total_steps: int) -> list[Event]:
    """The events of a run of ``total_steps`` optimizer steps; fraction f fires at step floor(f * total_steps).

    Pruning step k of n prunes to ``cubic_sparsity(target, k, n)``; fractions that land on the
    same step fire together (the later pruning step wins).
    """
    def step(fraction: float) -> int:
        return min(total_steps - 1, math.floor(fraction * total_steps + 1e-9))

    n = len(prune_at)
    events = [Event(step(f), "prune", cubic_sparsity(1.0, k, n)) for k, f in enumerate(prune_at, start=1)]
    events += [Event(step(weights_at), "weights"), Event(step(activations_at), "activations")]
    return sorted(events, key=lambda e: e.step)


class ScheduleHooks(TrainHooks):
    """Arms every operator before each training step: what it observes and what fires at that step.

    An activation quantizer observes the ``window`` steps ending with its switch-on step (that
    step's batch included); an activation pruner observes mean |x| over the ``window`` steps
    ending with each pruning step. A weight quantizer observes only the weight of its switch-on
    step -- the tensor it then quantizes, as upstream's weight window of 1 -- so its ``d`` does not
    depend on how far the weights drift over a window that grows with the dataset. Arming is
    idempotent per step, so a run resumed at an epoch boundary re-arms the same way.
    """

    def __init__(self, events: list[Event], window: int, steps_per_epoch: int, w_sparsity: float,
                 a_sparsity: float, weights: list[WeightPQ], activations: list[ActivationPQ]) -> None:
        self.events, self.window, self.steps_per_epoch = events, window, steps_per_epoch
        self.w_sparsity, self.a_sparsity = w_sparsity, a_sparsity
        self.weights, self.activations = weights, activations

    def _fires(self, step: int, kind: Kind) -> Event | None:
        return max((e for e in self.events if e.kind == kind and e.step == step), key=lambda e: e.scale, default=None)

    def _observes(self, step: int, kind: Kind) -> bool:
        return any(e.step - self.window < step <= e.step for e in self.events if e.kind == kind)

    def arm(self, step: int) -> None:
        prune = self._fires(step, "prune")
        weights_on = self._fires(step, "weights") is not None
        for op in self.weights:
            op.arm(prune_to=None if prune is None else self.w_sparsity * prune.scale,
                   observe=weights_on, switch_on=weights_on)
        for op in self.activations:
            op.arm(prune_to=None if prune is None else self.a_sparsity * prune.scale,
                   observe_magnitude=self._observes(step, "prune"), observe=self._observes(step, "activations"),
                   switch_on=self._fires(step, "activations") is not None)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        self.arm(epoch * self.steps_per_epoch)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.arm(step + 1)


def _steps_per_epoch(ctx: RunContext) -> int:
    """Optimizer steps per epoch, as :func:`jpqbench.harness.train.fit` counts them (by the same function)."""
    _, steps = shard_steps(len(ctx.data.train), ctx.recipe.batch_size)
    return min(steps, ctx.recipe.max_steps_per_epoch) if ctx.recipe.max_steps_per_epoch else steps


@register_method("noncomm")
class NonCommutative(Method):
    """Zhang et al. (2021, qsparse): power-of-two quantization + unstructured pruning of weights and activations.

    Joint power-of-two quantization and unstructured magnitude pruning of weights and activations,
    with the order of the two as the experiment's variable (Zhang, Colbert, Kreutz-Delgado, Das,
    arXiv 2110.08271; code mlzxy/qsparse, experiments mlzxy/qsparse-examples).

    Weights ``Q(P(W))``: per-layer unstructured magnitude pruning on Zhu & Gupta's cubic schedule
    (n steps, ``s_k = s_f (1 - (1 - k/n)^3)``), then per-output-channel power-of-two fixed point
    ``clamp(trunc(W 2^d), -2^(b-1), 2^(b-1)-1) 2^-d`` with ``d`` chosen once at switch-on by least
    squared error on the weight of that step (straight-through gradient). Activations
    BN -> P -> Q -> ReLU: a static (C, H, W) mask from mean |x| over a window of batches, then
    per-tensor power-of-two quantization (``d`` by least squared error over a window of batches),
    then the ReLU. ``order`` picks the paper's CIFAR-10 schedule (mlzxy/qsparse-examples), as
    fractions of the run's epochs (250 there): ``pq`` prunes at 115/130/145/160 and quantizes
    weights at 230, activations at 235; ``qp`` quantizes weights at 160, activations at 170 and
    prunes at 195/210/225/240; ``q`` quantizes only, weights at 230 and activations at 240
    (upstream's ``quantize-late``). ``acts`` adds activation pruning to
    weight pruning. The paper's one classification schedule is kept for every dataset: its other
    tasks (super-resolution, detection, GANs) use task-specific epochs, no ImageNet classifier.
    Unlike the paper, which trains from scratch (float until its first event), the run starts
    from the shared pretrained FP32 checkpoint, as every method of the harness does.

    Budget: dense BOPs and dense size depend on the bit width alone, so ``bits`` (weights and
    activations) is the largest of 8..2 whose counted cost -- the harness's counter, on a plan
    with every layer at that width -- is within the target, as for the uniform baselines; the
    sparsities come on top and show in the sparse-aware figures (``relative_sparse_bops``;
    ``relative_sparse_size``, the smaller of dense and bitmap format) and the sparsity columns.
    The paper ran only Q8 with sparsity 0 or 0.5
    (:func:`outside_paper_regime`); a run elsewhere -- every BOPs budget below 8-bit's 1/16 of
    FP32, which forces 2 to 7 bits -- says so in ``plan.notes["outside_paper_regime"]``.

    Choices the paper leaves open or that differ from upstream (each a hyperparameter or noted):

    * placement (:func:`jpqbench.blocks.noncomm.qsparse.place_activation_operators`): the activation operator
      sits on the input of every ``nn.ReLU`` / ``nn.ReLU6`` (found on the torch.fx graph), so
      after conv-BN it is the paper's BN -> P -> Q -> ReLU, and mean |x| and the MSE of ``d``
      are taken on the BN output. In a residual block the ReLU follows the add, so the *sum* is
      pruned and quantized (upstream's MobileNetV2 prunes and quantizes after its adds); the
      body's last BN output is not quantized on its own, which keeps the next block's input on
      one ``bits``-bit grid (a sum of two grids would need more). Upstream's CIFAR ResNet
      quantizes outside the add only in downsampling blocks, at a fixed format (8 bits, 5
      fractional), and in identity blocks adds two quantized tensors without charging the extra
      bits; here every pre-ReLU add gets its own operator, its format fitted like every other,
      so that the plan stays honest. The block input read by body and shortcut has one
      operator. torchvision's ResNet blocks call one ``relu`` module at two or three sites; each
      site first gets a ReLU module of its own (:func:`jpqbench.nn.activations.split_shared_relus`:
      parameter-free ``relu_1``/``relu_2`` beside ``relu`` and a class swap of the block, so
      every conv/linear/BN name and ``state_dict`` key stays), hence one mask per site.
      ``nn.ReLU6`` (MobileNetV2) is treated as ReLU, with the operator's fractional bits ``d``
      limited to those for which ``min(x, 6)`` keeps the grid (6 a grid point or above its
      largest value: every ``d >= -1``, so all of the default range), so what its consumers are
      claimed to read stays true. MobileNetV2's block outputs (linear bottlenecks, residual
      sums) reach the next expansion conv without an activation, so that conv quantizes its
      own input and it is not pruned (upstream prunes there too). Models that reuse any other
      activation module, apply ReLU as a function or use other activations are refused;
    * the last ReLU called stays float and unpruned (upstream's example leaves its last one), and
      a layer whose input is not an operator's ReLU output reached through max-pool / flatten /
      zero-pad -- the network input, the classifier's input after average pooling, VGG7's last
      FC -- gets its own quantizer at its input, not pruned;
    * what the plan claims for a layer's input, where the cost counter charges activations: the
      producing operator's ``bits`` (a ReLU of a signed b-bit grid uses b-1 bits of it; b are
      charged, as the paper counts), and the positions that are zero for every input -- the
      mask, or after a max-pool only the windows masked entirely. The masks' own sparsities are
      in the plan's notes (``activation_mask_sparsity``); the measured sparsity adds the ReLU's
      and the quantizer's zeros, which are not claimed;
    * weight importance is the current |W| at each pruning step, as the paper's code (weight
      window 1; later qsparse releases added a running mean of |W|); masks are nested and fixed
      between pruning steps;
    * windows: a weight quantizer's ``d`` is fitted to its weight at the switch-on step (the
      paper's code: window 1). Activation quantizers and pruners observe ``window`` optimizer
      steps, whole (global) batches; the paper's CIFAR-10 code keeps the last 2048 samples,
      16 batches of 128, so ``window`` x batch size ~ 2048 samples reproduces it (the default
      8 is that at batch 256; at a smaller batch set it per dataset). Candidate ``d`` in
      ``decimal_range`` (upstream 0..19); biases stay FP32 (upstream default);
    * from the pretrained start (see above), all epochs are one phase with the shared cosine
      learning rate, so each event falls at the same point of the cosine as in the paper.
    """

    test_hparams = {"window": 1}

    class Hparams(Method.Hparams):
        order: Literal["pq", "qp", "q"] = Field(
            "pq", description="the paper's CIFAR-10 schedule: pq prune first, qp quantize first, q quantize only")
        acts: bool = Field(True, description="prune activations too (P(w, f)), not only weights (P(w))")
        bits: int | None = Field(
            None, ge=2, le=16, description="bits of weights and activations; None: the largest of 8..2 within budget")
        w_sparsity: float = Field(0.5, ge=0, lt=1, description="final fraction of zero weights per layer")
        a_sparsity: float = Field(0.5, ge=0, lt=1, description="final fraction of activation positions masked per site")
        prune_at: tuple[float, ...] | None = Field(
            None, description="pruning steps as fractions of the run's steps; None: the order's paper schedule")
        weights_at: float | None = Field(
            None, ge=0, lt=1, description="weight quantization switch-on as a fraction of the run; None: the paper's")
        activations_at: float | None = Field(
            None, ge=0, lt=1, description="activation quantization switch-on, fraction of the run; None: the paper's")
        window: int = Field(8, ge=1, description="optimizer steps (global batches) an activation quantizer or "
                                                 "pruner observes before it fires")
        decimal_range: tuple[int, int] = Field(
            (0, 20), description="candidate fractional bits d of the power-of-two grid, [low, high)")

        @model_validator(mode="after")
        def _consistent_schedule(self) -> "NonCommutative.Hparams":
            prune, weights, acts = self.points()
            if any(not 0 <= f < 1 for f in prune) or list(prune) != sorted(set(prune)):
                raise ValueError(f"prune_at must be increasing fractions in [0, 1), got {prune}")
            if self.order == "q" and prune:
                raise ValueError("order 'q' quantizes only; leave prune_at unset")
            if self.order != "q" and not prune:
                raise ValueError(f"order {self.order!r} needs at least one pruning step")
            if self.order == "pq" and prune[-1] > min(weights, acts):
                raise ValueError("order 'pq' must finish pruning before quantization starts")
            if self.order == "qp" and max(weights, acts) > prune[0]:
                raise ValueError("order 'qp' must switch quantization on before pruning starts")
            if not self.decimal_range[0] < self.decimal_range[1]:
                raise ValueError(f"decimal_range must be (low, high) with low < high, got {self.decimal_range}")
            return self

        def points(self) -> tuple[tuple[float, ...], float, float]:
            """(pruning fractions, weight quantization fraction, activation quantization fraction)."""
            paper = PAPER_SCHEDULES[self.order]
            prune = self.prune_at if self.prune_at is not None else tuple(e / PAPER_EPOCHS for e in paper["prune"])
            weights = self.weights_at if self.weights_at is not None else paper["weights"][0] / PAPER_EPOCHS
            acts = self.activations_at if self.activations_at is not None else paper["activations"][0] / PAPER_EPOCHS
            return prune, weights, acts

    @property
    def prunes_weights(self) -> bool:
        return self.hp.order != "q"

    @property
    def prunes_activations(self) -> bool:
        return self.prunes_weights and self.hp.acts

    def compress(self, model: nn.Module, budget: Budget, ctx: RunContext) -> Compressed:
        make_compressible(model)
        layers = compressible_layers(model)
        bits = self._bits(model, budget, ctx)
        decimals = range(*self.hp.decimal_range)
        placement = place_activation_operators(model, ctx.input_shape, bits, decimals, self.prunes_activations)
        for layer in layers.values():
            layer.weight_quantizer = WeightPQ(layer.weight.shape, bits, decimals).to(layer.weight.device)
        steps_per_epoch = _steps_per_epoch(ctx)
        prune, weights_at, acts_at = self.hp.points()
        events = schedule_events(prune, weights_at, acts_at, ctx.epochs * steps_per_epoch)
        hooks = ScheduleHooks(events, self.hp.window, steps_per_epoch,
                              self._target("w_sparsity"), self._target("a_sparsity"),
                              [layer.weight_quantizer for layer in layers.values()], placement.operators())
        ctx.train(model, ctx.epochs, phase="noncomm", hooks=hooks)
        self._check_schedule_completed(layers, placement)
        masks = {name: op.sparsity for name, op in placement.pre_activation.items()}
        plan = plan_from_model(model, self.name, {"bits": bits, "order": self.hp.order, "acts": self.hp.acts,
                                                  "events": [[e.step, e.kind, e.scale] for e in events],
                                                  "activation_mask_sparsity": masks})
        for name, layer in layers.items():
            plan.layers[name].w_sparsity = layer.weight_quantizer.sparsity
        placement.claim_inputs(plan)
        outside = outside_paper_regime(bits, self._target("w_sparsity"), self._target("a_sparsity"))
        if outside:
            plan.notes["outside_paper_regime"] = outside
        return Compressed(model, plan)

    def _target(self, kind: Literal["w_sparsity", "a_sparsity"]) -> float:
        """The final sparsity the schedule prunes to: 0 for what the order / ``acts`` leave unpruned."""
        pruned = self.prunes_weights if kind == "w_sparsity" else self.prunes_activations
        return getattr(self.hp, kind) if pruned else 0.0

    def _bits(self, model: nn.Module, budget: Budget, ctx: RunContext) -> int:
        """The bit width: ``hp.bits`` if it meets the budget, else the largest of 8..2 that does.

        Budgets are dense BOPs or dense size, which the sparsities do not change.
        """
        dense = CompressionPlan.dense(model)

        def relative_cost(bits: int) -> float:
            return ctx.cost(model, with_uniform_bits(dense, bits, bits)).relative(budget.metric)

        if self.hp.bits is None:
            return largest_uniform_bits(relative_cost, budget.target)
        if relative_cost(self.hp.bits) > budget.target:
            raise UserError(f"noncomm at {self.hp.bits} bits costs {relative_cost(self.hp.bits):.4f} of FP32, "
                            f"above the {budget.metric} budget {budget.target}",
                            "leave bits unset (the largest within the budget is chosen) or lower it")
        return self.hp.bits

    def _check_schedule_completed(self, layers: dict[str, nn.Module], placement: Placement) -> None:
        """Every quantizer is on and every mask at its target: otherwise the step count was misjudged."""
        for name, layer in layers.items():
            w = layer.weight_quantizer
            if not bool(w.quantizer.enabled):
                raise RuntimeError(f"noncomm: the schedule did not switch the weight quantizer of {name} on")
            if self.prunes_weights and w.sparsity < self.hp.w_sparsity - 1 / w.mask.numel():
                raise RuntimeError(f"noncomm: the schedule did not prune {name}'s weights to the target")
        named = {**{f"{name} (before the ReLU)": op for name, op in placement.pre_activation.items()},
                 **{f"{name} (input)": op for name, op in placement.own_input.items()}}
        for name, op in named.items():
            if not bool(op.quantizer.enabled):
                raise RuntimeError(f"noncomm: the schedule did not switch the activation quantizer of {name} on")
            if op.prunable and op.sparsity < self.hp.a_sparsity - 1 / op.mask.numel():
                raise RuntimeError(f"noncomm: the schedule did not prune the activations of {name} to the target")
