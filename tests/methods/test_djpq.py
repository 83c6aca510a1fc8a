"""DJPQ (jpqbench/methods/djpq.py, jpqbench/blocks/djpq/vib.py): VIB gates prune what they close, the differentiable cost is
the harness counter at hard gates and falls when gates close or bits drop, the power-of-two variant
keeps to {2, 4, 8, 16}, and `jpqbench run --method djpq` meets its budget with an honest plan.

At the papers' scale (every architecture of config/paper.yaml at its real input size): the KL
pressure per channel at initialisation is balanced across stages, paper.yaml's ``kl_weight``
puts the KL term at initialisation at half the chance cross-entropy, and the plan the search
reached before the projection is recorded and costs at least the projected plan."""
from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DigitsWorkspace
from paths import PAPER_CONFIG
from torch import nn

from jpqbench.accounting.counter import count
from jpqbench.accounting.plan import CompressionPlan, plan_from_model, with_pruned
from jpqbench.accounting.verify import verify_plan
from jpqbench.base.budget import Budget
from jpqbench.base.config import load_config
from jpqbench.base.method_spec import make_method
from jpqbench.base.registry import DATASETS, METHODS, MODELS
from jpqbench.nn.layers import make_compressible
from jpqbench.nn.learned_quant import LearnedQuantizer
from jpqbench.pipeline.cli import main

SHAPES = {"digits_cnn": (1, 8, 8), "ds_cnn": (1, 49, 10), "resnet8": (3, 16, 16), "resnet20": (3, 32, 32)}
PAPER = PAPER_CONFIG
# the models of the papers' grid at their real input sizes, with their dataset's class count
REAL_SCALE = {"resnet8": ((3, 32, 32), 10), "resnet20": ((3, 32, 32), 10), "vgg7": ((3, 32, 32), 10),
              "ds_cnn": ((1, 49, 10), 12), "resnet18_64": ((3, 64, 64), 200),
              "resnet18": ((3, 224, 224), 1000), "resnet50": ((3, 224, 224), 1000),
              "mobilenet_v2": ((3, 224, 224), 1000)}
# the stated balance: a channel's KL pressure at initialisation is at most CONV_STAGE_BOUND times
# another's among conv stages (224x224: the 112x112 stem against the 7x7 stage), and at most
# GATE_BOUND times among all gates (VGG7: its 32x32 convs against its FC gate, VIBNet's own
# VGG ratio); H*W weighting gave 256 and 1024
CONV_STAGE_BOUND, GATE_BOUND = 16.0, 32.0


def _djpq():
    """The plugin module (loaded by path by the registry)."""
    return sys.modules[METHODS.get("djpq").__module__]


def _ctx(shape: tuple[int, ...]) -> SimpleNamespace:
    """The part of RunContext that DJPQ.prepare uses, on random inputs."""
    gen = torch.Generator().manual_seed(0)
    return SimpleNamespace(input_shape=shape, cost=lambda model, plan=None: count(model, shape, plan),
                           calibration_batches=lambda n: (torch.randn(16, *shape, generator=gen) for _ in range(n)))


def _prepared(model_name: str, metric: str = "bops", **hparams):
    """A zoo model with DJPQ's gates and learned quantizers, its hooks, and a batch."""
    torch.manual_seed(0)
    shape = SHAPES[model_name]
    model = MODELS.get(model_name)(10, shape)
    for module in model.modules():  # non-trivial BN, so a channel that is not masked would show
        if isinstance(module, nn.BatchNorm2d):
            module.bias.data.uniform_(0.1, 0.5)
    method = METHODS.get("djpq")(**hparams)
    ctx = _ctx(shape)
    gates, cost = method.prepare(model, Budget(metric, 0.05), ctx)
    hooks = _djpq().JointHooks(model, gates, cost, 0.05, method.hp)
    return model, gates, hooks, method.hp, torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))


def _kl_per_channel_by_stage(model_name: str, kl_weight: float | None = None) -> tuple[dict[int, float], float]:
    """A paper-grid model at its real input size with DJPQ's gates: the KL term per channel at
    initialisation (nats, kl_weight included) of each stage (keyed by the gated map's H*W), and
    the whole KL term at initialisation."""
    shape, classes = REAL_SCALE[model_name]
    torch.manual_seed(0)
    model = MODELS.get(model_name)(classes, shape)
    make_compressible(model)
    hp = METHODS.get("djpq")(**({} if kl_weight is None else {"kl_weight": kl_weight})).hp
    gates = _djpq().gate_model(model, shape, hp)
    stages: dict[int, list[float]] = defaultdict(list)
    with torch.no_grad():
        for gate in gates.gates.values():
            stages[gate.spatial].append(hp.kl_weight * float(gate.kl()) / gate.mu.numel())
        total = hp.kl_weight * float(gates.kl())
    return {spatial: sum(values) / len(values) for spatial, values in stages.items()}, total


@pytest.mark.parametrize("model_name", list(REAL_SCALE))
def test_kl_pressure_per_channel_is_balanced_across_stages(model_name: str) -> None:
    """At the real input size no stage's channels start with more than CONV_STAGE_BOUND (conv
    stages) or GATE_BOUND (any gate) times another's KL pressure: a channel's KL counts
    sqrt(H*W) times, so the ratio is that of the map sides, not of their areas."""
    per_channel, _ = _kl_per_channel_by_stage(model_name)
    conv = [value for spatial, value in per_channel.items() if spatial > 1]
    assert max(conv) <= CONV_STAGE_BOUND * min(conv) * (1 + 1e-2)
    assert max(per_channel.values()) <= GATE_BOUND * min(per_channel.values()) * (1 + 1e-2)
    largest, smallest = max(per_channel), min(per_channel)  # the ratio is the ratio of the map sides
    assert per_channel[largest] / per_channel[smallest] == pytest.approx(math.sqrt(largest / smallest), rel=5e-3)


@pytest.mark.parametrize("dataset,model_name", load_config(PAPER).benchmarks())
def test_paper_kl_weight_starts_the_kl_term_at_half_the_chance_cross_entropy(dataset: str, model_name: str) -> None:
    """paper.yaml's kl_weight for each benchmark puts the KL term at initialisation at
    0.5 ln(classes) nats (within the 2-significant-digit rounding of the value in paper.yaml)."""
    config = load_config(PAPER)
    hp = make_method("djpq", config.method_params_of(dataset, model_name)).hp
    assert REAL_SCALE[model_name] == (DATASETS.get(dataset).input_shape, DATASETS.get(dataset).num_classes)
    _, total = _kl_per_channel_by_stage(model_name, hp.kl_weight)
    assert total == pytest.approx(0.5 * math.log(DATASETS.get(dataset).num_classes), rel=0.05)


def _harden(gates, quantizers, closed: dict[str, list[int]], bits: dict[str, tuple[int, int]]) -> None:
    """Gates far from the threshold (kept: log alpha = -60, closed: +60) and quantizers frozen at ``bits``."""
    with torch.no_grad():
        for name, gate in gates.gates.items():
            gate.mu.fill_(1.0)
            gate.log_sigma2.fill_(-60.0)
            gate.log_sigma2[closed.get(name, [])] = 60.0
    for name, (weight_q, input_q) in quantizers.items():
        weight_q.freeze(bits[name][0])
        input_q.freeze(bits[name][1])


def test_gate_above_threshold_zeroes_its_channel_at_eval_and_the_plan_prunes_it() -> None:
    model, gates, hooks, hp, batch = _prepared("digits_cnn")
    gate = gates.gates["blocks.0.body.0"]
    assert gates.hosts["blocks.0.body.0"] == "blocks.0.body.1"  # the gate sits on the conv's own BN
    with torch.no_grad():
        gate.log_sigma2[5] = 3.0  # log alpha = 3 - log(mu^2) > threshold 0
    assert not gate.keep_mask()[5] and gate.keep_mask().sum() == 31
    seen = {}
    model.get_submodule("blocks.0.body.1").register_forward_hook(lambda m, a, out: seen.__setitem__("bn", out))
    model(batch)  # a training forward samples the gate: the channel is noisy, not zero
    assert seen["bn"][:, 5].abs().sum() > 0
    model.eval()
    with torch.no_grad():
        before = model(batch)
    assert seen["bn"][:, 5].abs().sum() == 0 and seen["bn"][:, 4].abs().sum() > 0

    _djpq().project_to_budget(model, gates, hooks.cost, target=1.0, hp=hp)
    plan = plan_from_model(model, "djpq")
    assert plan.layers["blocks.0.body.0"].pruned == [5]
    assert all(not layer.pruned for name, layer in plan.layers.items() if name != "blocks.0.body.0")
    verify_plan(plan, model, batch)
    model.eval()
    with torch.no_grad():  # folding the gates into BN / masks is exact
        assert torch.allclose(model(batch), before, atol=1e-5, rtol=1e-4)
    assert not any(hasattr(m, "vib_gate") for m in model.modules())


def _random_hard_state(gates, hooks, *, seed: int, closed_share: float, min_bits: int
                       ) -> tuple[dict[str, list[int]], dict[str, tuple[int, int]]]:
    """Close about ``closed_share`` of every layer's gates and set random (weight, input) bits in
    [min_bits, 8], as a search could end; return the closed channels and the bits."""
    gen = torch.Generator().manual_seed(seed)
    closed = {name: torch.nonzero(torch.rand(g.mu.numel(), generator=gen) < closed_share).flatten().tolist()
              for name, g in gates.gates.items()}
    bits = {name: tuple(int(b) for b in torch.randint(min_bits, 9, (2,), generator=gen)) for name in hooks.quantizers}
    _harden(gates, hooks.quantizers, closed, bits)
    return closed, bits


@pytest.mark.parametrize("metric", ["bops", "size"])
@pytest.mark.parametrize("model_name", ["digits_cnn", "ds_cnn", "resnet8"])
def test_cost_term_at_hard_gates_equals_the_harness_counter(model_name: str, metric: str) -> None:
    """Residual adds (digits_cnn, resnet8 with a BN-less shortcut) and depthwise convs (ds_cnn)."""
    model, gates, hooks, hp, batch = _prepared(model_name, metric)
    closed, bits = _random_hard_state(gates, hooks, seed=2, closed_share=0.4, min_bits=2)
    with torch.no_grad():
        soft = float(hooks.soft_cost(model))
    same_plan = with_pruned(plan_from_model(model, "djpq"), closed)
    assert soft == pytest.approx(count(model, SHAPES[model_name], same_plan).relative(metric), rel=1e-5)

    # the projection (nothing to do at target 1) hardens exactly these gates and bits, plus the
    # channels left without a live input (depthwise channels behind closed ones), which cost nothing
    _djpq().project_to_budget(model, gates, hooks.cost, target=1.0, hp=hp)
    plan = plan_from_model(model, "djpq")
    verify_plan(plan, model, batch)
    assert {name: (layer.w_bits, layer.a_bits) for name, layer in plan.layers.items()} == bits
    assert all(set(pruned) <= set(plan.layers[name].pruned) for name, pruned in closed.items())
    counted = count(model, SHAPES[model_name], plan).relative(metric)
    if metric == "bops":
        assert counted == pytest.approx(soft, rel=1e-5)
    else:  # a dead channel's bias still counted in the plan above
        assert counted <= soft * (1 + 1e-6)


def test_cost_term_falls_when_gates_close_or_bits_drop() -> None:
    model, gates, hooks, hp, _ = _prepared("ds_cnn")
    names = list(gates.gates)
    stem, depthwise = names[0], names[1]
    assert model.get_submodule(depthwise).groups == 64
    with torch.no_grad():
        base = float(hooks.soft_cost(model))
        gates.gates[names[3]].log_sigma2[:10] += 5.0  # ten gates of a pointwise conv towards closing
        after_gates = float(hooks.soft_cost(model))
        hooks.quantizers[names[3]][0].d.mul_(4.0)  # its weights lose two bits
        after_bits = float(hooks.soft_cost(model))
    assert base > after_gates > after_bits

    # the input side: closing the stem's channels removes the depthwise conv's work on them,
    # although the depthwise conv's own gates are open
    keep = {name: torch.ones(g.mu.numel()) for name, g in gates.gates.items()}
    dense_terms = hooks.cost.layer_terms(keep)
    keep[stem][:16] = 0.0
    pruned_terms = hooks.cost.layer_terms(keep)
    assert pruned_terms[depthwise][0] == pytest.approx(dense_terms[depthwise][0] * 48 / 64)


def test_residual_partner_keeps_a_channel_alive() -> None:
    """At a residual add an input channel dies only when every producer closed it."""
    model, gates, hooks, hp, _ = _prepared("digits_cnn")
    keep = {name: torch.ones(g.mu.numel()) for name, g in gates.gates.items()}
    consumer = "blocks.1.body.0"  # reads stem.0 + blocks.0.body.3 (identity block)
    dense = hooks.cost.layer_terms(keep)[consumer][0]
    keep["blocks.0.body.3"][:8] = 0.0
    assert hooks.cost.layer_terms(keep)[consumer][0] == pytest.approx(dense)
    keep["stem.0"][:8] = 0.0
    assert hooks.cost.layer_terms(keep)[consumer][0] == pytest.approx(dense * 24 / 32)


def _project_random_search(model_name: str, metric: str, target_fraction: float | None):
    """A prepared model whose search ended with random closed gates and bit widths, projected onto
    ``target_fraction`` x the cost of that hardened state (None: a budget of 1, no move needed)."""
    model, gates, hooks, hp, batch = _prepared(model_name, metric)
    closed, bits = _random_hard_state(gates, hooks, seed=3, closed_share=0.3, min_bits=3)
    hardened = _djpq().hardened_plan(model, *_djpq().harden(model, gates, hooks.cost, hp), "djpq")
    target = 1.0 if target_fraction is None else target_fraction * count(model, SHAPES[model_name],
                                                                         hardened).relative(metric)
    projection = _djpq().project_to_budget(model, gates, hooks.cost, target=target, hp=hp)
    return model, projection, closed, bits, target, batch


@pytest.mark.parametrize("metric", ["bops", "size"])
@pytest.mark.parametrize("model_name", ["resnet20", "ds_cnn"])
def test_searched_plan_is_the_hardened_search_and_costs_at_least_the_projected(model_name: str, metric: str) -> None:
    """Real architectures at their real input sizes. The searched plan is the search's own hard
    state (closed gates pruned, rounded bits), counted by the harness as the cost the projection
    started from; every projection move lowers a bit width or prunes a channel, so the projected
    plan is contained in it and costs less (here the search ended at twice the budget)."""
    model, projection, closed, bits, target, _ = _project_random_search(model_name, metric, 0.5)
    searched, shape = projection.searched, SHAPES[model_name]
    projected = plan_from_model(model, "djpq")
    searched_cost = count(model, shape, searched).relative(metric)
    projected_cost = count(model, shape, projected).relative(metric)
    assert searched_cost == pytest.approx(projection.notes["cost_at_rounding"], rel=1e-5)
    assert searched_cost == pytest.approx(2 * target, rel=1e-5)
    assert {name: (layer.w_bits, layer.a_bits) for name, layer in searched.layers.items()} == bits
    assert all(set(pruned) <= set(searched.layers[name].pruned) for name, pruned in closed.items())
    assert projected_cost <= target < searched_cost
    for name, layer in projected.layers.items():
        assert set(searched.layers[name].pruned) <= set(layer.pruned)
        assert searched.layers[name].w_bits >= layer.w_bits and searched.layers[name].a_bits >= layer.a_bits


def test_searched_plan_is_the_projected_plan_when_the_search_met_the_budget() -> None:
    model, projection, _, _, _, batch = _project_random_search("resnet20", "bops", None)
    assert projection.notes["projection_bit_steps"] == projection.notes["projection_pruned_channels"] == 0
    assert projection.searched.layers == plan_from_model(model, "djpq").layers
    verify_plan(projection.searched, model, batch)


def test_budgets_beyond_the_papers_most_compressed_points_are_flagged() -> None:
    """DJPQ published 0.48 % relative BOPs on CIFAR-10 (VGG7, 210x) but no ImageNet point below
    1.9 % (ResNet-18, 53x): paper.yaml's 0.5 % and 1 % are outside its regime on ImageNet only."""
    note = _djpq().paper_regime_note
    flagged = {(dataset, budget) for dataset, _ in load_config(PAPER).benchmarks()
               for budget in load_config(PAPER).budgets_of(dataset) if note(dataset, Budget("bops", budget))}
    assert flagged == {("imagenet", 0.005), ("imagenet", 0.01)}
    assert "1.89%" in note("imagenet", Budget("bops", 0.005))["outside_paper_regime"]
    assert note("imagenet", Budget("size", 0.005)) == {}  # the paper's points are BOPs


def test_pow2_quantizer_uses_the_nearest_power_of_two_grid() -> None:
    model, gates, hooks, hp, batch = _prepared("digits_cnn", restrict_pow2=True)
    weight_q = hooks.quantizers["blocks.0.body.0"][0]
    with torch.no_grad():  # a learned step worth ~5.3 bits runs on the 4-bit grid (log2 5.3 nearer 2 than 3)
        weight_q.d.copy_(weight_q.q_m / (2 ** 4.3 - 1))
    assert float(weight_q.bit_width().detach()) == pytest.approx(4.0)
    weight = model.get_submodule("blocks.0.body.0").weight
    assert torch.unique(weight_q(weight)).numel() <= 2 ** 4
    assert [_djpq().nearest_pow2(b) for b in (2.0, 2.9, 3.0, 5.6, 6.0, 11.0, 12.0, 16.0)] == [2, 4, 4, 4, 8, 8, 16, 16]


def test_hyperparameters_are_validated() -> None:
    from jpqbench.base.errors import UserError

    with pytest.raises(UserError, match="restrict_pow2"):
        METHODS.get("djpq")(restrict_pow2=True, min_bits=3)
    with pytest.raises(UserError, match="min_bits"):
        METHODS.get("djpq")(min_bits=8, max_bits=4)


def _run(ws: DigitsWorkspace, out: Path, method: str, *extra: str) -> dict:
    argv = ["--config", str(ws.config), "run", "--method", method, "--dataset", "digits", "--seed", "0",
            "--epochs", "3", "--checkpoint", str(ws.checkpoint), "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("metric,budget", [("bops", 0.03), ("size", 0.12)])
def test_run_meets_its_budget(digits_workspace: DigitsWorkspace, no_env_tracking_uri, tmp_path: Path,
                              metric: str, budget: float) -> None:
    metrics = _run(digits_workspace, tmp_path, "djpq", "--budget", str(budget), "--budget-metric", metric)
    assert metrics["status"] == "ok" and metrics["target_met"] is True
    assert metrics[f"relative_{metric}"] <= budget * 1.10
    plan = CompressionPlan.load(tmp_path / "plan.json")
    assert plan.notes["projected_cost"] <= budget
    # the search's own result is recorded, counted, and never below what the projection made of it
    assert CompressionPlan.load(tmp_path / "searched_plan.json").method == "djpq"
    assert metrics[f"searched_relative_{metric}"] == pytest.approx(plan.notes["cost_at_rounding"], rel=1e-5)
    assert metrics[f"searched_relative_{metric}"] >= metrics[f"relative_{metric}"] * (1 - 1e-9)
    # the default kl_weight is the paper grid's rule on digits_cnn: KL term at init = 0.5 ln(10)
    assert plan.notes["kl_term_at_init"] == pytest.approx(0.5 * math.log(10), rel=0.05)
    assert all(2 <= layer.w_bits <= 16 and 2 <= layer.a_bits <= 16 for layer in plan.layers.values())


def test_restrict_pow2_run_has_only_power_of_two_bits(digits_workspace: DigitsWorkspace, no_env_tracking_uri,
                                                      tmp_path: Path) -> None:
    metrics = _run(digits_workspace, tmp_path, "djpq[restrict_pow2=true]", "--budget", "0.03")
    assert metrics["target_met"] is True
    plan = CompressionPlan.load(tmp_path / "plan.json")
    bits = [b for layer in plan.layers.values() for b in (layer.w_bits, layer.a_bits)]
    assert set(bits) <= {2, 4, 8, 16}
    saved = torch.load(tmp_path / "model.pt", weights_only=False)["model"]
    assert all(type(q) is LearnedQuantizer and q.frozen for q in saved.modules() if isinstance(q, LearnedQuantizer))


def test_same_seed_same_run(digits_workspace: DigitsWorkspace, no_env_tracking_uri, tmp_path: Path) -> None:
    first = _run(digits_workspace, tmp_path / "a", "djpq", "--budget", "0.03")
    second = _run(digits_workspace, tmp_path / "b", "djpq", "--budget", "0.03")
    assert (tmp_path / "a" / "plan.json").read_text() == (tmp_path / "b" / "plan.json").read_text()
    assert first["top1"] == second["top1"] and first["relative_bops"] == second["relative_bops"]
