"""cwmpq (methods/cwmpq.py): 0-bit channels are pruned for real, coupled channels share one choice,
the temperature follows its schedule, evaluation quantizes each channel at one precision, the
regulariser at hard assignments is the harness's count, the budget projection lands within the
budget, and `jpqbench run --method cwmpq` meets its budget end to end."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import DigitsWorkspace
from jpqbench.cli import main
from jpqbench.cost import count
from jpqbench.errors import UserError
from jpqbench.hw_cost import get_cost_model
from jpqbench.plan import CompressionPlan, plan_from_model, verify_plan
from jpqbench.registry import DATASETS, METHODS, MODELS

CWMPQ = METHODS.get("cwmpq")
cw = sys.modules[CWMPQ.__module__]
MODELS_UNDER_TEST = [("digits_cnn", (1, 8, 8)), ("resnet8", (3, 32, 32)), ("ds_cnn", (1, 49, 10))]


def _space(model_name: str = "digits_cnn", input_shape: tuple[int, ...] = (1, 8, 8), seed: int = 0):
    """A randomly initialised zoo model wired for the search, BN statistics from one batch."""
    torch.manual_seed(seed)
    model = MODELS.get(model_name)(10, input_shape)
    batch = torch.randn(16, *input_shape)
    space = cw.SearchSpace(model, input_shape, (0, 2, 4, 8), (2, 4, 8), cw.signed_inputs(model, batch), 6.0)
    model.train()
    model(batch)
    return model, space, batch


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
    assert all(isinstance(layer.w_bits, list) for layer in plan.layers.values())
    data = DATASETS.get("digits")().load(digits_workspace.data_root / "digits")
    saved = torch.load(out / "model.pt", weights_only=False)
    verify_plan(plan, saved["model"], next(iter(data.loader("train", 64)))[0])
