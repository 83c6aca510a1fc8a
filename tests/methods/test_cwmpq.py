"""cwmpq (jpqbench/methods/cwmpq.py): 0-bit channels are pruned for real, coupled channels share one choice,
the temperature follows its schedule, evaluation quantizes each channel at one precision, the
regulariser at hard assignments is the harness's count, the budget projection lands within the
budget, MobileNetV2's signed inner activations are searched down to 2 bits on a signed grid (at
224^2), the plan the search reached before the projection is recorded and counted, and
`jpqbench run --method cwmpq` meets its budget end to end."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DigitsWorkspace

from jpqbench.accounting.counter import count
from jpqbench.accounting.hardware import get_cost_model
from jpqbench.accounting.plan import CompressionPlan, plan_from_model
from jpqbench.accounting.verify import verify_plan
from jpqbench.base.errors import UserError
from jpqbench.base.registry import DATASETS, METHODS, MODELS
from jpqbench.pipeline.cli import main

CWMPQ = METHODS.get("cwmpq")
cw = sys.modules[CWMPQ.__module__]
MODELS_UNDER_TEST = [("digits_cnn", (1, 8, 8)), ("resnet8", (3, 32, 32)), ("ds_cnn", (1, 49, 10))]
IMAGENET = (3, 224, 224)
# MobileNetV2 at 224^2 reaches 0.005 of FP32 BOPs with this fraction of its channels pruned: none (its
# cheapest unpruned assignment, every weight and searched input at 2 bits, costs 0.0043)
MOBILENET_PRUNED_AT_0_005 = 0.0


def _space(model_name: str = "digits_cnn", input_shape: tuple[int, ...] = (1, 8, 8), seed: int = 0):
    """A randomly initialised zoo model wired for the search, BN statistics from one batch."""
    torch.manual_seed(seed)
    model = MODELS.get(model_name)(10, input_shape)
    batch = torch.randn(16, *input_shape)
    space = cw.SearchSpace(model, input_shape, (0, 2, 4, 8), (2, 4, 8), cw.signed_inputs(model, batch), 6.0, 8)
    model.train()
    model(batch)
    return model, space, batch


def _mobilenet_v2():
    """MobileNetV2 at ImageNet's 224^2 (random weights, BN on its initial statistics) wired for the search."""
    torch.manual_seed(0)
    model = MODELS.get("mobilenet_v2")(1000, IMAGENET)
    batch = torch.randn(2, *IMAGENET)
    space = cw.SearchSpace(model, IMAGENET, (0, 2, 4, 8), (2, 4, 8), cw.signed_inputs(model, batch), 6.0, 8)
    return model, space, batch


def _lowest(space, **bits_of: int) -> list[torch.Tensor]:
    """Every choice at its lowest non-zero precision, except the layer inputs named in ``bits_of``."""
    inputs = {id(layer.input_quantizer.choice): name for name, layer in space.layers.items()}
    out = []
    for choice in space.choices:
        bits = bits_of.get(inputs.get(id(choice)), min(p for p in choice.precisions if p))
        out.append(torch.full_like(choice.hard(), choice.precisions.index(bits)))
    return out


def _randomise(space, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for choice in space.choices:
            choice.alpha.copy_(torch.randn(choice.alpha.shape, generator=generator))


def _inputs_of(model, names: list[str], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, args, n=n: seen.__setitem__(n, args[0])) for n in names]
    model.eval()
    with torch.no_grad():
        model(batch)
    for handle in handles:
        handle.remove()
    return seen


def test_a_channel_whose_argmax_is_0_bits_is_zero_in_the_output_and_pruned() -> None:
    model, space, batch = _space()
    stem = space.layers["stem.0"].weight_quantizer
    with torch.no_grad():
        stem.choice.alpha[:, int(stem.slot[5])] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # stem channel 5 is summed with blocks.0.body.3's channel 5 at the residual add; its consumers:
    consumers = ["blocks.0.body.0", "blocks.1.body.0", "blocks.1.shortcut.0"]
    for name, x in _inputs_of(model, consumers, batch).items():
        assert x[:, 5].abs().sum() == 0, name
        assert x[:, 4].abs().sum() > 0, name
    assert space.layers["stem.0"].effective_weight()[5].abs().sum() == 0

    space.apply(space.hard_assignment())
    plan = plan_from_model(model, "cwmpq")
    for name in ("stem.0", "blocks.0.body.3"):
        assert 5 in plan.layers[name].pruned and plan.layers[name].w_bits[5] == 0, name
    verify_plan(plan, model, batch)
    model.train()
    model(batch)  # training mode too: the channel's BN is masked, not just gated
    for name, x in _inputs_of(model, consumers, batch).items():
        assert x[:, 5].abs().sum() == 0, name
    space.to_core_modules()  # the returned model: harness modules only, same plan still true
    verify_plan(plan, model, batch)


@pytest.mark.parametrize("model_name, input_shape", MODELS_UNDER_TEST)
def test_coupled_layers_always_agree(model_name: str, input_shape: tuple[int, ...]) -> None:
    """Residual partners (and a depthwise conv with its producer) share one choice: the same soft mixture
    in training, the same bits in evaluation, the same pruned channels in the plan."""
    model, space, batch = _space(model_name, input_shape)
    _randomise(space)
    groups = [g for g in cw.dependency_groups(model, input_shape) if len(g.producers) > 1]
    assert groups, "the model has coupled layers"
    for group in groups:
        views = []
        for name, (idxs, _) in group.producers.items():
            quantizer = space.layers[name].weight_quantizer
            model.train()
            soft = quantizer.choice.probs()[:, quantizer.slot[idxs]]
            model.eval()
            views.append((quantizer.choice, soft, [quantizer.bits[i] for i in idxs]))
        assert all(choice is views[0][0] for choice, _, _ in views)
        assert all(torch.equal(soft, views[0][1]) for _, soft, _ in views)
        assert all(bits == views[0][2] for _, _, bits in views)
    space.apply(space.hard_assignment())
    plan = plan_from_model(model, "cwmpq")
    for group in groups:
        pruned = [sorted(idxs.index(c) for c in plan.layers[name].pruned)
                  for name, (idxs, _) in group.producers.items()]
        assert all(p == pruned[0] for p in pruned)
    verify_plan(plan, model, batch)


def test_the_classifier_is_never_pruned() -> None:
    model, space, _ = _space()
    assert 0 not in space.layers["fc"].weight_quantizer.choice.precisions
    assert space.layers["fc"].weight_quantizer.choice not in {space.layers[n].weight_quantizer.choice
                                                              for n in space.layers if n != "fc"}


@pytest.mark.parametrize("temperature, rate", [(1.0, 0.045), (2.0, 0.3)])
def test_temperature_annealing_follows_the_configured_schedule(temperature: float, rate: float) -> None:
    model, space, _ = _space()
    _randomise(space)
    hp = CWMPQ.Hparams(temperature=temperature, anneal_rate=rate)
    size = get_cost_model("size")
    hooks = cw.SearchHooks(space, hp, size, size, 1e6, 6, sgd=True, log=lambda m, s: None)
    model.train()
    for epoch in range(6):
        hooks.on_epoch_start(model, epoch)
        expected = temperature * math.exp(-rate * epoch)
        for choice in space.choices:
            assert float(choice.temperature) == pytest.approx(expected, rel=1e-6)
            assert torch.allclose(choice.probs(), F.softmax(choice.alpha / expected, dim=0))
        # the search runs BN on fixed statistics (upstream folds it), the logits stay soft
        assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_in_eval_mode_each_channel_is_quantized_at_one_precision() -> None:
    model, space, _ = _space()
    _randomise(space)
    model.eval()
    for name, layer in space.layers.items():
        weight, bits = layer.effective_weight(), layer.weight_quantizer.bits
        argmax = layer.weight_quantizer.choice.alpha.argmax(dim=0)[layer.weight_quantizer.slot]
        assert bits == [layer.weight_quantizer.choice.precisions[i] for i in argmax.tolist()]
        for channel, b in enumerate(bits):
            w = layer.weight[channel].detach()
            if b == 0:
                assert weight[channel].abs().sum() == 0
                continue
            levels = 2 ** (b - 1) - 1
            step = w.abs().max() / levels
            assert torch.equal(weight[channel], torch.round(w / step).clamp(-levels, levels) * step), (name, channel)
            assert torch.unique(weight[channel]).numel() <= 2 ** b


@pytest.mark.parametrize("model_name, input_shape", MODELS_UNDER_TEST)
def test_size_regulariser_at_hard_assignments_is_the_harness_count(model_name: str,
                                                                   input_shape: tuple[int, ...]) -> None:
    model, space, _ = _space(model_name, input_shape)
    _randomise(space)
    model.eval()  # the regulariser's own code path, at one-hot probabilities
    size, bops = get_cost_model("size"), get_cost_model("bops")
    regulariser = float(size.total(space.cost_inputs(space.soft_probs())))
    assignment = space.hard_assignment()
    assert any(bool((idx == 0).any()) for c, idx in zip(space.choices, assignment) if c.zero_index == 0)
    space.apply(assignment)
    report = count(model, input_shape, plan_from_model(model, "cwmpq"))
    assert space.cost(size, assignment) == report.weight_bits
    assert regulariser == pytest.approx(report.weight_bits, rel=1e-6)
    assert space.cost(bops, assignment) == report.bops


def test_budget_projection_lands_within_and_close_to_the_budget() -> None:
    model, space, _ = _space()
    _randomise(space)
    bops = get_cost_model("bops")
    dense = count(model, (1, 8, 8)).dense_bops
    target = 0.02
    relative = lambda a: space.cost(bops, a) / dense  # noqa: E731
    top = [torch.full_like(c.hard(), len(c.precisions) - 1) for c in space.choices]
    lowest = [torch.full_like(c.hard(), 0 if c.zero_index is None else 1) for c in space.choices]  # 2 bits
    for start in (top, lowest):  # lowered to the budget, or filled up to it
        fitted, _ = cw.fit_to_budget(space, start, bops, relative, target, dense)
        assert 0.95 * target <= relative(fitted) <= target
    pruned = [torch.zeros_like(c.hard()) for c in space.choices]  # every group entirely pruned
    unfilled, _ = cw.fit_to_budget(space, pruned, bops, relative, target, dense, fill=False)
    for choice, idx in zip(space.choices, unfilled):  # no group is left cut
        assert choice.zero_index is None or int((idx != choice.zero_index).sum()) == 1
    filled, _ = cw.fit_to_budget(space, pruned, bops, relative, target, dense)  # pruning undone where it fits
    assert 0.95 * target <= relative(filled) <= target
    lowered, _ = cw.fit_to_budget(space, top, bops, relative, target, dense, fill=False)
    assert relative(lowered) <= target
    space.apply(lowered)
    assert count(model, (1, 8, 8), plan_from_model(model, "cwmpq")).relative_bops == pytest.approx(relative(lowered))


def test_mobilenet_v2_searches_every_signed_inner_input_down_to_2_bits() -> None:
    """At 224^2 the 17 layer inputs fed by a linear bottleneck (signed, 53 % of the MACs) choose among
    a_precisions like every other input; only the network input is fixed. So MobileNetV2 reaches 0.005
    of FP32 BOPs, by the harness counter, pruning MOBILENET_PRUNED_AT_0_005 of its channels; with those
    inputs at 8 bits, as they used to be fixed, its cheapest unpruned assignment is above 0.01."""
    model, space, _ = _mobilenet_v2()
    inner = {name for name, grid in space.grids.items() if grid == "signed"}
    assert cw.network_input_layers(model, IMAGENET) == {"features.0.0"}
    assert space.grids["features.0.0"] == "narrow"
    assert space.layers["features.0.0"].input_quantizer.choice.precisions == (8,)
    assert len(inner) == 17 and "features.18.0" in inner and "features.2.conv.0.0" in inner
    for name in inner:
        assert space.layers[name].input_quantizer.choice.precisions == (2, 4, 8), name

    space.apply(_lowest(space))
    plan = plan_from_model(model, "cwmpq")
    kept = sum(int(layer.kept_mask().sum()) for layer in plan.layers.values())
    pruned = 1 - kept / sum(layer.out_channels for layer in plan.layers.values())
    assert pruned <= MOBILENET_PRUNED_AT_0_005
    assert count(model, IMAGENET, plan).relative_bops <= 0.005
    space.apply(_lowest(space, **{name: 8 for name in inner}))
    assert count(model, IMAGENET, plan_from_model(model, "cwmpq")).relative_bops > 0.01


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_signed_activation_with_b_bits_takes_at_most_2_to_the_b_values(bits: int) -> None:
    """The signed grid spends all 2^b codes on [-c, c) with 0 exact; on MobileNetV2 at 224^2 with every
    searched input at b bits the plan passes verify_plan, and the harness quantizers the returned model
    holds compute exactly what the search's PACTs computed."""
    x = torch.linspace(-20, 20, 40001)
    y = cw.pact(x, torch.tensor(3.0), bits, "signed")
    assert torch.unique(y).numel() == 2 ** bits and bool((y == 0).any())
    assert float(y.min()) == -3.0 and float(y.max()) == pytest.approx(3.0 * (1 - 2 ** (1 - bits)))

    model, space, batch = _mobilenet_v2()
    inner = [name for name, grid in space.grids.items() if grid == "signed"]
    space.apply(_lowest(space, **{name: bits for name in space.layers if name != "features.0.0"}))
    plan = plan_from_model(model, "cwmpq")
    assert {plan.layers[name].a_bits for name in inner} == {bits}
    verify_plan(plan, model, batch)
    model.eval()
    with torch.no_grad():
        searched = model(batch)
        space.to_core_modules()
        assert torch.equal(model(batch), searched)
    verify_plan(plan, model, batch)


def test_the_plan_the_search_reached_is_recorded_and_counted() -> None:
    """project_onto_budget returns the plan of the search's argmax, as the harness counts it (above the
    budget here), and leaves the projection applied (within it, by the same counter), on MobileNetV2."""
    model, space, _ = _mobilenet_v2()
    _randomise(space)
    bops = get_cost_model("bops")
    dense = count(model, IMAGENET).dense_bops
    argmax = space.hard_assignment()
    counter = lambda plan: count(model, IMAGENET, plan).relative_bops  # noqa: E731
    searched, notes = cw.project_onto_budget(space, "cwmpq", bops, dense, 0.005, counter, fill=True)
    assert counter(searched) == pytest.approx(space.cost(bops, argmax) / dense, rel=1e-9)
    assert counter(searched) > 0.005 and notes["budget_fit_batches"] > 0
    for name, layer in space.layers.items():
        index, slot = space.weight_slot[name]
        precisions = space.w_choices[index].precisions
        assert searched.layers[name].w_bits == [precisions[i] for i in argmax[index][slot].tolist()], name
    assert counter(plan_from_model(model, "cwmpq")) <= 0.005


@pytest.mark.parametrize("params, message", [
    ({"cost_model": "mpic", "w_precisions": (0, 3, 8)}, "mpic"),
    ({"cost_model": "nope"}, "unknown cost model"),
    ({"w_precisions": (0,)}, "non-zero"),
    ({"a_precisions": (1, 8)}, "a_precisions"),
    ({"warmup_fraction": 0.6, "search_fraction": 0.6}, "at most 1"),
])
def test_bad_hyperparameters_are_refused(params: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        CWMPQ(**params)


def test_phases_share_the_run_epochs() -> None:
    method = CWMPQ()
    assert method.phase_epochs(30) == (3, 15, 12)
    assert method.phase_epochs(2) == (0, 1, 1)
    assert method.phase_epochs(1) == (0, 1, 0)


@pytest.mark.slow
@pytest.mark.parametrize("metric, budget", [("bops", 0.05), ("size", 0.15)])
def test_jpqbench_run_cwmpq_meets_its_budget(digits_workspace: DigitsWorkspace, no_env_tracking_uri, tmp_path: Path,
                                             metric: str, budget: float) -> None:
    """Four epochs (warm-up 1, search 2, fine-tune 1) on the tiny digits setup, through the CLI."""
    out = tmp_path / metric
    argv = ["--config", str(digits_workspace.config), "run", "--method", "cwmpq[warmup_fraction=0.25]",
            "--dataset", "digits", "--seed", "0", "--epochs", "4", "--checkpoint", str(digits_workspace.checkpoint),
            "--out", str(out), "--budget", str(budget), "--budget-metric", metric]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_used"] == 4 and metrics["target_met"] is True
    assert metrics["achieved"] == metrics[f"relative_{metric}"] <= budget
    plan = CompressionPlan.load(out / "plan.json")
    assert plan.notes["phase_epochs"] == [1, 2, 1]
    assert "outside_paper_regime" not in plan.notes  # digits_cnn has no signed inner activation
    data = DATASETS.get("digits")().load(digits_workspace.data_root / "digits")
    saved = torch.load(out / "model.pt", weights_only=False)
    searched = count(saved["model"], data.input_shape, CompressionPlan.load(out / "searched_plan.json"))
    assert metrics[f"searched_relative_{metric}"] == pytest.approx(searched.relative(metric), rel=1e-12)
    assert searched.relative(metric) > budget  # four epochs: only the projection met the budget
    assert all(isinstance(layer.w_bits, list) for layer in plan.layers.values())
    verify_plan(plan, saved["model"], next(iter(data.loader("train", 64)))[0])
