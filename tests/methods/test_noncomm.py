"""noncomm (Zhang et al., arXiv 2110.08271): the schedule fires at exactly the configured steps in
the configured order, weight quantizers fit d to the switch-on weight while activation operators
observe the window, activations are pruned and quantized between BN and ReLU on every grid
model with an honest plan, final sparsities equal the targets per layer, quantized tensors lie
on the power-of-two grid, runs outside the paper's Q8 P0.5 regime say so, the sparse-aware cost
figures, and `jpqbench run` for each order."""
from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import yaml
from conftest import DigitsWorkspace, write_config
from torch import nn

from jpqbench.accounting.counter import count, input_liveness, measure_activation_sparsity
from jpqbench.accounting.plan import CompressionPlan, LayerPlan, PlanMismatch, plan_from_model, with_uniform_bits
from jpqbench.accounting.verify import verify_plan
from jpqbench.base.budget import Budget
from jpqbench.base.config import TrainRecipe
from jpqbench.base.errors import UserError
from jpqbench.base.method_spec import get_method
from jpqbench.base.registry import MODELS
from jpqbench.blocks.noncomm.qsparse import (
    ActivationPQ,
    Pow2Quantizer,
    PreActivationReLU,
    PreActivationReLU6,
    WeightPQ,
    place_activation_operators,
    quantize_pow2,
    relu6_keeps_grid,
    split_shared_relus,
)
from jpqbench.harness.data import DataBundle, TensorSplit
from jpqbench.harness.method import RunContext
from jpqbench.nn.layers import compressible_layers, make_compressible, observe_inputs
from jpqbench.pipeline.cli import main

SHAPE = (1, 8, 8)
STEPS_PER_EPOCH = 10  # 160 training samples, batch 16
EPOCHS = 5            # 50 steps: the paper's epoch e of 250 is step e / 5, every schedule point a whole step
TOTAL = STEPS_PER_EPOCH * EPOCHS
NONCOMM = sys.modules[get_method("noncomm").__module__]
W_TARGET, A_TARGET = 0.6, 0.4
# the paper's CIFAR-10 schedules in epochs of 250 (mlzxy/qsparse-examples cifar10/mobilenetv2.py:
# prune_*-quantize, quantize-prune_*-late, quantize-late), independent of the plugin's table
PAPER = {"pq": ((115, 130, 145, 160), 230, 235), "qp": ((195, 210, 225, 240), 160, 170), "q": ((), 230, 240)}


def _step(epoch_of_250: int) -> int:
    return math.floor(epoch_of_250 / 250 * TOTAL + 1e-9)


def _context(tmp_path: Path, shape: tuple[int, ...] = SHAPE) -> RunContext:
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        return TensorSplit(torch.randn(n, *shape, generator=generator), torch.randint(0, 10, (n,), generator=generator))

    data = DataBundle("random", split(160), split(32), split(32), num_classes=10, input_shape=shape,
                      default_model="digits_cnn")
    recipe = TrainRecipe(model="digits_cnn", pretrain_epochs=1, epochs=EPOCHS, batch_size=16, lr=0.1,
                         finetune_lr=0.01, eval_every=EPOCHS)
    return RunContext(data=data, recipe=recipe, epochs=EPOCHS, seed=0, work_dir=tmp_path)


def _operators(model: nn.Module, kind: type) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, kind)}


def _on_grid(x: torch.Tensor, bits: int, decimal: torch.Tensor) -> bool:
    """Every entry is k * 2^-d with k a signed ``bits``-bit integer."""
    integers = x * torch.exp2(decimal)
    return bool(torch.equal(integers, integers.round()) and integers.min() >= -(2 ** (bits - 1))
                and integers.max() <= 2 ** (bits - 1) - 1)


@dataclass
class Traced:
    model: nn.Module
    plan: CompressionPlan
    trace: list[dict[str, dict[str, float]]]  # per training step: operator -> state after its forward
    batch: torch.Tensor


def _compress(tmp_path: Path, **hparams) -> Traced:
    """Run noncomm on random data, recording every operator's state after each training forward."""
    torch.manual_seed(0)
    model = MODELS.get("digits_cnn")(10, SHAPE)
    trace: list[dict[str, dict[str, float]]] = []

    def record(module: nn.Module, args, output) -> None:
        if module.training:
            trace.append({name: {"on": bool(op.quantizer.enabled), "s": op.sparsity}
                          for name, op in _operators(module, (WeightPQ, ActivationPQ)).items()})

    model.register_forward_hook(record)
    ctx = _context(tmp_path)
    method = get_method("noncomm")(w_sparsity=W_TARGET, a_sparsity=A_TARGET, window=3, **hparams)
    compressed = method.compress(model, Budget("bops", 0.05), ctx)
    return Traced(compressed.model, compressed.plan, trace, ctx.data.train.inputs[:32])


VARIANTS = {"pq": {"order": "pq"}, "qp": {"order": "qp"}, "q": {"order": "q"},
            "pq-weights": {"order": "pq", "acts": False}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Traced]:
    return {key: _compress(tmp_path_factory.mktemp(key), **hp) for key, hp in VARIANTS.items()}


def _first_step(trace: list[dict], predicate) -> int | None:
    return next((step for step, state in enumerate(trace) if predicate(state)), None)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_schedule_fires_at_the_configured_steps_in_order(runs: dict[str, Traced], variant: str) -> None:
    order = VARIANTS[variant]["order"]
    prunes_acts = order != "q" and VARIANTS[variant].get("acts", True)
    prune_epochs, weights_epoch, acts_epoch = PAPER[order]
    run = runs[variant]
    trace = run.trace
    assert len(trace) == TOTAL
    weights, activations = _operators(run.model, WeightPQ), _operators(run.model, ActivationPQ)
    # digits_cnn: 4 operators before ReLUs (the last ReLU has none), own quantizers at the network and fc inputs
    assert len(weights) == 7 and len(activations) == 6
    assert sum(op.prunable for op in activations.values()) == (4 if prunes_acts else 0)
    # quantizers: off before their step, on from it on, for every operator at once
    for operators, epoch in ((weights, weights_epoch), (activations, acts_epoch)):
        for name in operators:
            assert _first_step(trace, lambda s: s[name]["on"]) == _step(epoch), name
            assert all(state[name]["on"] for state in trace[_step(epoch):])
    # weight and activation sparsity follow the cubic schedule exactly, changing only at the pruning steps
    n = len(prune_epochs)
    for step, state in enumerate(trace):
        k = sum(_step(e) <= step for e in prune_epochs)
        for operators, target in ((weights, W_TARGET), (activations, A_TARGET)):
            for name, op in operators.items():
                pruned = order != "q" and (op.prunable if isinstance(op, ActivationPQ) else True)
                expected = target * (1 - (1 - k / n) ** 3) if pruned else 0.0
                numel = op.mask.numel()
                assert state[name]["s"] == pytest.approx(round(expected * numel) / numel, abs=1e-9), (step, name)
    changes = [step for step in range(1, TOTAL) if trace[step] != trace[step - 1]]
    expected_changes = {_step(e) for e in prune_epochs} | {_step(weights_epoch), _step(acts_epoch)}
    assert set(changes) == expected_changes
    if order == "pq":
        assert max(_step(e) for e in prune_epochs) < _step(weights_epoch) < _step(acts_epoch)
    if order == "qp":
        assert _step(weights_epoch) < _step(acts_epoch) < min(_step(e) for e in prune_epochs)


@dataclass
class _ArmRecorder:
    """Stands in for an operator: records what each step arms it to do."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def arm(self, **armed: Any) -> None:
        self.calls.append(armed)

    def steps(self, key: str) -> list[int]:
        return [step for step, armed in enumerate(self.calls) if armed[key] not in (None, False)]


def test_weights_fit_d_at_their_switch_on_step_and_activations_over_the_window() -> None:
    """The weight quantizer sees only the weight it then quantizes (the paper's code: window 1),
    however large ``window`` is; activation quantizers and pruners see the ``window`` steps
    ending with their event."""
    events = NONCOMM.schedule_events((0.2, 0.4), 0.6, 0.8, total_steps=50)  # prune 10, 20; weights 30; acts 40
    weight, activation = _ArmRecorder(), _ArmRecorder()
    hooks = NONCOMM.ScheduleHooks(events, window=4, steps_per_epoch=10, w_sparsity=0.5, a_sparsity=0.5,
                                  weights=[weight], activations=[activation])
    for step in range(50):
        hooks.arm(step)
    assert weight.steps("observe") == weight.steps("switch_on") == [30]
    assert weight.steps("prune_to") == activation.steps("prune_to") == [10, 20]
    assert activation.steps("observe") == [37, 38, 39, 40] and activation.steps("switch_on") == [40]
    assert activation.steps("observe_magnitude") == [7, 8, 9, 10, 17, 18, 19, 20]


def test_orders_pq_and_qp_end_in_different_networks(runs: dict[str, Traced]) -> None:
    pq, qp = runs["pq"], runs["qp"]
    kinds = [[kind for _, kind, _ in run.plan.notes["events"]] for run in (pq, qp)]
    assert kinds[0].index("weights") > kinds[0].index("prune") and kinds[1].index("weights") < kinds[1].index("prune")
    # the masks are chosen on different weights and activations, so the orders prune different entries
    weights = zip(_operators(pq.model, WeightPQ).values(), _operators(qp.model, WeightPQ).values())
    assert any(not torch.equal(a.mask, b.mask) for a, b in weights)
    relus = zip(_operators(pq.model, PreActivationReLU).values(), _operators(qp.model, PreActivationReLU).values())
    assert any(not torch.equal(a.pre.mask, b.pre.mask) for a, b in relus)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_final_sparsity_equals_the_targets_per_layer(runs: dict[str, Traced], variant: str) -> None:
    run = runs[variant]
    prunes_weights = VARIANTS[variant]["order"] != "q"
    prunes_acts = prunes_weights and VARIANTS[variant].get("acts", True)
    layers = compressible_layers(run.model)
    names = list(layers)  # digits_cnn's module order is its call order
    inputs: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(
        name, mod.input_quantizer(args[0]))) for name, layer in layers.items()]
    run.model.eval()
    with torch.no_grad():
        run.model(run.batch)
    for hook in hooks:
        hook.remove()
    for name, op in _operators(run.model, PreActivationReLU).items():
        numel = op.pre.mask.numel()
        target = round(A_TARGET * numel) / numel if prunes_acts else 0.0
        assert op.pre.sparsity == run.plan.notes["activation_mask_sparsity"][name] == pytest.approx(target, abs=1e-9)
    measured = measure_activation_sparsity(run.model, [run.batch])
    for name, layer in layers.items():
        claim = run.plan.layers[name]
        numel = layer.weight.numel()
        w_target = round(W_TARGET * numel) / numel if prunes_weights else 0.0
        assert claim.w_sparsity == pytest.approx(w_target, abs=1e-9)
        assert int((layer.effective_weight() == 0).sum()) >= round(w_target * numel)
        a_pruned = prunes_acts and name not in (names[0], names[-1])  # network and classifier inputs are kept
        sample = inputs[name][0].numel()
        a_target = round(A_TARGET * sample) / sample if a_pruned else 0.0
        assert claim.a_sparsity == pytest.approx(a_target, abs=1e-9), name
        # a static mask: the same positions are zero for every sample of the batch; the ReLU adds zeros
        assert int((inputs[name] == 0).all(dim=0).sum()) >= round(a_target * sample)
        assert measured[name] >= claim.a_sparsity
    verify_plan(run.plan, run.model, run.batch)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantized_tensors_lie_on_the_power_of_two_grid(runs: dict[str, Traced], variant: str) -> None:
    run = runs[variant]
    bits = run.plan.notes["bits"]
    for name, layer in compressible_layers(run.model).items():
        assert run.plan.layers[name].w_bits == run.plan.layers[name].a_bits == bits
        decimal = layer.weight_quantizer.quantizer.decimal.view(-1, 1, 1, 1) if layer.weight.dim() == 4 \
            else layer.weight_quantizer.quantizer.decimal.view(-1, 1)
        assert _on_grid(layer.effective_weight().detach(), bits, decimal), name
    for name, op in _operators(run.model, ActivationPQ).items():
        x = op.eval()(torch.randn(64, *op.mask.shape) * 3)
        assert _on_grid(x, bits, op.quantizer.decimal), name


# ---------------------------------------------------------------- placement: BN -> P -> Q -> ReLU
def test_activations_are_pruned_and_quantized_between_bn_and_relu(runs: dict[str, Traced]) -> None:
    run = runs["pq"]
    model, bits = run.model.eval(), run.plan.notes["bits"]
    relus = _operators(model, nn.ReLU)
    # every ReLU but the last carries the operator; the last (before pooling and fc) stays float
    assert [type(relu) for relu in relus.values()] == [PreActivationReLU] * 4 + [nn.ReLU]
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def keep(name: str, key: str):
        return lambda module, args, output: seen.setdefault(name, {}).update(
            {key: (args[0] if key == "in" else output).detach().clone()})

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_hook(keep(name, "bn")))
        if isinstance(module, PreActivationReLU):
            hooks.append(module.register_forward_hook(keep(name, "in")))
            hooks.append(module.pre.register_forward_hook(keep(name, "pq")))
            hooks.append(module.register_forward_hook(keep(name, "relu")))
    with torch.no_grad():
        model(run.batch)
    for hook in hooks:
        hook.remove()
    after_bn = 0
    for name, relu in _operators(model, PreActivationReLU).items():
        x, pq, out = seen[name]["in"], seen[name]["pq"], seen[name]["relu"]
        decimal, masked = relu.pre.quantizer.decimal, relu.pre.mask == 0
        bn = [key for key, value in seen.items() if "bn" in value and torch.equal(value["bn"], x)]
        after_bn += bool(bn)
        # what reaches the ReLU is pruned (zero at every masked position, for every sample) and on the grid...
        assert _on_grid(pq, bits, decimal) and masked.any() and (pq[:, masked] == 0).all()
        assert torch.equal(out, torch.relu(pq))
        # ...while the BN output (or the residual sum) it was made from is neither
        assert not _on_grid(x, bits, decimal) and (x[:, masked] != 0).any()
    assert after_bn == 3  # stem and the two block bodies; the first block's ReLU follows the residual add


GRID_MODELS = {"digits_cnn": (1, 8, 8), "ds_cnn": (1, 49, 10), "resnet8": (3, 16, 16), "resnet20": (3, 16, 16),
               "vgg7": (3, 16, 16)}


@pytest.mark.parametrize("model_name", list(GRID_MODELS))
def test_placement_on_every_grid_model_gives_an_honest_plan(model_name: str) -> None:
    shape, bits = GRID_MODELS[model_name], 4
    torch.manual_seed(0)
    model = make_compressible(MODELS.get(model_name)(10, shape))
    placement = place_activation_operators(model, shape, bits, range(0, 20), prune=True)
    batch = torch.randn(8, *shape)
    for op in placement.operators():  # one training forward prunes to 0.5 and switches every quantizer on
        op.arm(prune_to=0.5, observe_magnitude=True, observe=True, switch_on=True)
    model.train()(batch)
    plan = plan_from_model(model.eval(), "noncomm")
    placement.claim_inputs(plan)
    verify_plan(plan, model, batch)
    inputs: dict[str, torch.Tensor] = {}
    observe_inputs(model, compressible_layers(model), [batch], lambda name, layer, x: inputs.setdefault(name, x))
    for name, (relu, _) in placement.fed_by.items():  # on the producing operator's grid, ReLU'd
        x, decimal = inputs[name], placement.pre_activation[relu].quantizer.decimal
        assert _on_grid(x, bits, decimal) and x.min() >= 0, name
    names = list(compressible_layers(model))
    # only the network input and the classifier's input have quantizers of their own, not pruning
    assert set(placement.own_input) == {names[0], names[-1]}
    assert [plan.layers[name].a_sparsity for name in (names[0], names[-1])] == [0.0, 0.0]
    for name, (relu, path) in placement.fed_by.items():
        claim, mask_sparsity = plan.layers[name], placement.pre_activation[relu].sparsity
        assert claim.a_bits == bits and mask_sparsity == 0.5
        pooled = any(node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.MaxPool2d)
                     for node in path)
        # directly after the ReLU the claim is the mask; after a max-pool only windows masked entirely count
        assert claim.a_sparsity == mask_sparsity if not pooled else 0 < claim.a_sparsity < mask_sparsity
    if model_name == "vgg7":
        assert sum(0 < plan.layers[name].a_sparsity < 0.5 for name in placement.fed_by) == 3  # the 3 pooled inputs


class _SharedReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.relu = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.relu(self.b(self.relu(self.a(x)))))


class _FunctionalReLU(_SharedReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(self.relu(self.a(x)))))


class _SiLU(_SharedReLU):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.SiLU()


class _DataDependent(_SharedReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x))) if x.sum() > 0 else self.c(x)


class _Hardtanh(_SharedReLU):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.Hardtanh(-1.0, 1.0)  # a Hardtanh like ReLU6, but not ReLU6


@pytest.mark.parametrize("model, message", [(_SharedReLU(), "calls module relu 2 times"),
                                            (_FunctionalReLU(), "applies ReLU as a function"),
                                            (_SiLU(), "relu is SiLU"), (_Hardtanh(), "relu is Hardtanh"),
                                            (_DataDependent(), "cannot be traced")],
                         ids=["shared", "functional", "silu", "hardtanh", "untraceable"])
def test_models_without_one_relu_module_per_activation_are_refused(model: nn.Module, message: str) -> None:
    with pytest.raises(UserError, match=message):
        place_activation_operators(make_compressible(model), (4,), 4, range(0, 8), prune=True)


# ---------------------------------------------------------------- torchvision models: shared ReLUs, ReLU6
def _module_calls(model: nn.Module) -> Counter:
    return Counter(node.target for node in fx.symbolic_trace(model).graph.nodes if node.op == "call_module")


@pytest.mark.parametrize("model_name, sites", [("resnet18", 1 + 8 * 2), ("resnet50", 1 + 16 * 3)])
def test_torchvision_resnet_blocks_get_one_relu_per_call_site_same_names_same_outputs(model_name: str,
                                                                                      sites: int) -> None:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None, num_classes=10).eval()
    batch = torch.randn(2, 3, 32, 32)
    keys, expected = list(model.state_dict()), model(batch)
    assert max(_module_calls(model).values()) > 1  # torchvision calls each block's relu 2 or 3 times
    split_shared_relus(model)
    assert list(model.state_dict()) == keys  # checkpoints, plans and the cost counter key on these names
    assert torch.equal(model(batch), expected)
    calls = _module_calls(model)
    relus = [name for name, module in model.named_modules() if type(module) is nn.ReLU]
    assert len(relus) == sites and all(calls[name] == 1 for name in relus)
    names = [name for name, _ in model.named_modules()]
    split_shared_relus(model)  # idempotent
    assert [name for name, _ in model.named_modules()] == names
    zoo = MODELS.get(model_name)(10, (3, 32, 32))  # the zoo's ResNets come split
    assert [name for name, _ in zoo.named_modules()] == names and max(_module_calls(zoo).values()) == 1


@pytest.mark.parametrize("model_name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_placement_on_torchvision_models_gives_an_honest_plan(model_name: str) -> None:
    """Every ReLU / ReLU6 call site but the last carries an operator; the layers reading them get
    the operator's grid (ReLU6 included: non-negative, at most 6) and the plan is true."""
    shape, bits = (3, 32, 32), 4
    torch.manual_seed(0)
    model = make_compressible(MODELS.get(model_name)(10, shape))
    activation = nn.ReLU6 if model_name == "mobilenet_v2" else nn.ReLU
    split_shared_relus(model)
    sites = [name for name, module in model.named_modules() if type(module) is activation]
    placement = place_activation_operators(model, shape, bits, range(0, 20), prune=True)
    assert len(placement.pre_activation) == len(sites) - 1
    kind = PreActivationReLU6 if activation is nn.ReLU6 else PreActivationReLU
    assert all(type(model.get_submodule(name)) is kind for name in placement.pre_activation)
    batch = torch.randn(8, *shape)
    for op in placement.operators():
        op.arm(prune_to=0.5, observe_magnitude=True, observe=True, switch_on=True)
    model.train()(batch)
    plan = plan_from_model(model.eval(), "noncomm")
    placement.claim_inputs(plan)
    verify_plan(plan, model, batch)
    layers = list(compressible_layers(model))
    assert set(placement.fed_by) | set(placement.own_input) == set(layers)
    if activation is nn.ReLU:  # every input but the network's and the pooled classifier's is an operator's output
        assert set(placement.own_input) == {layers[0], layers[-1]}
    else:  # MobileNetV2's linear bottlenecks feed the next block's expansion without an activation
        assert len(placement.fed_by) > len(layers) / 2
    inputs: dict[str, torch.Tensor] = {}
    observe_inputs(model, compressible_layers(model), [batch], lambda name, layer, x: inputs.setdefault(name, x))
    for name, (relu, _) in placement.fed_by.items():
        x, decimal = inputs[name], placement.pre_activation[relu].quantizer.decimal
        assert _on_grid(x, bits, decimal) and x.min() >= 0 and (x.max() <= 6 or activation is nn.ReLU), name


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_relu6_keeps_the_grid_exactly_when_relu6_keeps_grid_says_so(bits: int) -> None:
    verdicts = []
    for decimal in range(-6, 6):
        grid = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1)) * 2.0 ** -decimal
        verdicts.append(relu6_keeps_grid(bits, decimal))
        assert (set(F.relu6(grid).tolist()) <= set(grid.tolist())) == verdicts[-1], decimal
    assert not all(verdicts) and any(verdicts)


def test_relu6_operators_choose_only_fractional_bits_that_keep_their_grid() -> None:
    """With negative candidates, the ReLU6 operator is offered only d where min(x, 6) stays on
    k * 2^-d (here d >= -1); the ReLU operator keeps every candidate; none at all is refused."""
    def model() -> nn.Module:
        return make_compressible(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU6(),
                                               nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))

    net = model()
    placement = place_activation_operators(net, (4,), 4, range(-4, 4), prune=False)
    assert set(placement.pre_activation) == {"1", "3"}
    assert type(net[3]) is PreActivationReLU6 and type(net[1]) is PreActivationReLU
    assert net[1].pre.quantizer.candidates.tolist() == list(range(-4, 4))
    assert net[3].pre.quantizer.candidates.tolist() == list(range(-1, 4))
    for op in placement.operators():
        op.arm(observe=True, switch_on=True)
    net.train()(torch.randn(16, 4) * 20)
    out = net[3].eval()(torch.randn(64, 8) * 20)
    assert _on_grid(out, 4, net[3].pre.quantizer.decimal) and 0 <= out.min() and out.max() <= 6
    with pytest.raises(UserError, match="ReLU6 moves 4-bit values"):
        place_activation_operators(model(), (4,), 4, range(-4, -2), prune=False)


def test_quantizer_truncates_saturates_and_passes_gradients_straight_through() -> None:
    x = torch.tensor([0.30, -0.30, 0.99, -1.20, -1.30, 5.0, -5.0], requires_grad=True)
    q = quantize_pow2(x, bits=3, decimal=torch.tensor(2.0))  # grid k/4, k in [-4, 3]
    assert q.tolist() == [0.25, -0.25, 0.75, -1.0, -1.0, 0.75, -1.0]  # trunc toward zero, then saturate
    q.sum().backward()
    # 3.96 and -4.8 truncate onto the grid (gradient 1); -5.2, 20 and -20 saturate (gradient 0)
    assert x.grad.tolist() == [1, 1, 1, 1, 0, 0, 0]


def test_fractional_bits_minimise_squared_error_over_the_window_and_are_chosen_once() -> None:
    generator = torch.Generator().manual_seed(0)
    window = [torch.randn(6, 50, generator=generator) * scale for scale in (0.2, 1.5, 0.7)]
    quantizer = Pow2Quantizer(bits=4, channels=6, decimals=range(0, 8)).train()
    for tensor in window:
        assert torch.equal(quantizer(tensor), tensor)  # the identity until switched on
        quantizer.observe(tensor)
    quantizer.switch_on()
    joined = torch.cat(window, dim=1)
    for channel in range(6):
        errors = [((joined[channel] - quantize_pow2(joined[channel], 4, torch.tensor(float(d)))) ** 2).sum()
                  for d in range(8)]
        assert quantizer.decimal[channel] == min(range(8), key=lambda d: errors[d])
    chosen = quantizer.decimal.clone()
    quantizer(torch.randn(6, 50, generator=generator) * 100)
    assert torch.equal(quantizer.decimal, chosen)


def test_activation_mask_is_static_from_mean_magnitude_over_the_window_and_nested() -> None:
    op = ActivationPQ(torch.Size([6]), bits=8, decimals=range(0, 8), prunable=True).train()
    window = [torch.tensor([[4.0, -1.0, 0.0, 2.0, 3.0, 0.5]]), torch.tensor([[0.0, 1.0, 0.0, 2.0, -3.0, 0.5]])]
    op.arm(observe_magnitude=True)
    op(window[0])                       # mean |x| so far: 4, 1, 0, 2, 3, 0.5
    op.arm(observe_magnitude=True, prune_to=0.5)
    op(window[1])                       # window mean: 2, 1, 0, 2, 3, 0.5 -> prune entries 2, 5, 1
    assert op.mask.tolist() == [1, 0, 0, 1, 1, 0]
    out = op.eval()(torch.ones(3, 6) * 7)
    assert torch.equal(out, torch.tensor([[7.0, 0, 0, 7, 7, 0]] * 3))  # same positions for every sample
    op.train().arm(observe_magnitude=True, prune_to=2 / 3)
    op(torch.tensor([[0.1, 9.0, 9.0, 5.0, 6.0, 9.0]]))  # pruned entries stay pruned however large
    assert op.mask.tolist() == [0, 0, 0, 1, 1, 0]


@pytest.mark.parametrize("hparams", [{"order": "q", "prune_at": (0.5,)}, {"order": "pq", "prune_at": (0.5, 0.95)},
                                     {"order": "qp", "prune_at": (0.1, 0.2)}, {"prune_at": (0.6, 0.5)},
                                     {"bits": 1}, {"w_sparsity": 1.0}, {"window": 0}, {"order": "x"}])
def test_inconsistent_hyperparameters_are_refused(hparams: dict) -> None:
    with pytest.raises(UserError, match="invalid hyperparameters"):
        get_method("noncomm")(**hparams)


@pytest.mark.parametrize("bits, w_sparsity, a_sparsity", [(8, 0.5, 0.5), (8, 0.5, 0.0), (8, 0.0, 0.0)],
                         ids=["P(w,f)->Q8", "P(w)->Q8", "Q8"])
def test_the_papers_operating_points_are_inside_its_regime(bits: int, w_sparsity: float, a_sparsity: float) -> None:
    assert NONCOMM.outside_paper_regime(bits, w_sparsity, a_sparsity) is None


@pytest.mark.parametrize("bits, w_sparsity, a_sparsity", [(2, 0.5, 0.5), (3, 0.5, 0.5), (7, 0.5, 0.0), (4, 0.0, 0.0),
                                                          (16, 0.5, 0.5), (8, 0.75, 0.5), (8, 0.5, 0.25),
                                                          (8, 0.0, 0.5)])
def test_operating_points_the_paper_never_ran_are_flagged(bits: int, w_sparsity: float, a_sparsity: float) -> None:
    note = NONCOMM.outside_paper_regime(bits, w_sparsity, a_sparsity)
    assert note is not None and f"uses {bits} bits at ({w_sparsity:g}, {a_sparsity:g})" in note


@pytest.mark.parametrize("budget, bits", [(0.1, 8), (0.045, 6), (0.02, 4), (0.01, 3), (0.005, 2)])
def test_the_papers_budgets_leave_only_the_largest_in_the_papers_regime(tmp_path: Path, budget: float,
                                                                       bits: int) -> None:
    """On a paper-grid model at its input (ResNet-20, 32x32), paper.yaml's BOPs budgets force these
    widths; only 8 bits -- the 10 % budget -- is the paper's Q8 at its default sparsities."""
    method = get_method("noncomm")()
    chosen = method._bits(MODELS.get("resnet20")(10, (3, 32, 32)), Budget("bops", budget),
                          _context(tmp_path, (3, 32, 32)))
    assert chosen == bits
    assert (NONCOMM.outside_paper_regime(chosen, method.hp.w_sparsity, method.hp.a_sparsity) is None) is (bits == 8)


@pytest.mark.parametrize("budget, bits", [(0.1, 8), (0.01, 3)])
def test_a_run_notes_when_it_is_outside_the_papers_regime(tmp_path: Path, budget: float, bits: int) -> None:
    torch.manual_seed(0)
    model = MODELS.get("digits_cnn")(10, SHAPE)
    plan = get_method("noncomm")(window=3).compress(model, Budget("bops", budget), _context(tmp_path)).plan
    assert plan.notes["bits"] == bits
    if bits == 8:
        assert "outside_paper_regime" not in plan.notes
    else:
        assert f"uses {bits} bits at (0.5, 0.5)" in plan.notes["outside_paper_regime"]


def test_bits_above_the_budget_are_refused(tmp_path: Path) -> None:
    model = MODELS.get("digits_cnn")(10, SHAPE)
    with pytest.raises(UserError, match="above the bops budget"):
        get_method("noncomm")(bits=8).compress(model, Budget("bops", 0.05), _context(tmp_path))


# ---------------------------------------------------------------- the cost counter's sparse figures
def test_sparse_figures_by_hand_and_dense_figures_unchanged() -> None:
    conv = nn.Conv2d(4, 8, kernel_size=3, padding=1, bias=True)
    plan = with_uniform_bits(CompressionPlan.dense(conv), 4, 8)
    dense = count(conv, (4, 6, 6), plan)
    plan.layers[""] = LayerPlan(out_channels=8, w_bits=4, a_bits=8, w_sparsity=0.75, a_sparsity=0.5)
    sparse = count(conv, (4, 6, 6), plan)
    weights, macs = 8 * 4 * 9, 6 * 6 * 4 * 9 * 8
    assert (sparse.macs, sparse.bops, sparse.weight_bits) == (dense.macs, dense.bops, dense.weight_bits)
    assert sparse.bops == macs * 4 * 8
    assert sparse.sparse_bops == macs * 4 * 8 * 0.25 * 0.5
    # bitmap: one bit per weight position, 4 bits per non-zero, 32-bit biases
    assert sparse.sparse_weight_bits == weights * 1 + weights * 0.25 * 4 + 8 * 32
    assert sparse.weight_sparsity == 0.75 and sparse.activation_sparsity == 0.5
    assert sparse.relative_sparse_bops == pytest.approx(sparse.sparse_bops / (macs * 32 * 32))
    # without sparsity the bitmap costs more than dense storage, so dense is kept
    assert dense.sparse_weight_bits == dense.weight_bits and dense.sparse_bops == dense.bops


def test_cost_counter_liveness_sees_the_activation_masks_only() -> None:
    """The counter's liveness probe must see an operator's static mask and nothing else. Channel 0
    keeps a corner, whose probe value (4/9 of the centre's) truncates to 0 on the integer grid;
    channel 2 is masked entirely, so the depthwise conv gives zeros there, which the BN's shift
    makes non-zero before the next operator -- both reach the last conv at run time."""
    torch.manual_seed(0)
    model = make_compressible(nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False),
        nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2)))
    placement = place_activation_operators(model, (1, 3, 3), 4, range(0, 1), prune=True)  # d = 0: integers
    assert set(placement.pre_activation) == {"1", "4"}
    with torch.no_grad():
        first = placement.pre_activation["1"]
        first.mask.zero_()
        first.mask[0, 0, 0] = first.mask[1, 1, 1] = 1  # channel 0 keeps a corner, channel 1 the centre
        model[3].bias.fill_(2.0)
        for op in placement.operators():
            op.quantizer.switch_on()
    plan = plan_from_model(model.eval(), "noncomm")
    placement.claim_inputs(plan)
    batch = torch.randn(8, 1, 3, 3) * 50
    seen: dict[str, torch.Tensor] = {}
    observe_inputs(model, compressible_layers(model), [batch], lambda name, layer, x: seen.setdefault(name, x))
    reached = {name: (seen[name] != 0).flatten(2).any(dim=2).any(dim=0).tolist() for name in ("2", "5")}
    assert reached == {"2": [True, True, False], "5": [True, True, True]}
    alive = input_liveness(model, (1, 3, 3), plan)
    assert {name: alive[name].tolist() for name in reached} == reached
    verify_plan(plan, model, batch)


def test_activation_sparsity_claim_is_checked_against_the_layer_input() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    batch = torch.ones(5, 4)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4, [1.0] * 4]))
        model[0].bias.zero_()
    measured = measure_activation_sparsity(model, [batch, batch])
    assert measured == {"0": 0.0, "2": pytest.approx(1 / 3)}  # the ReLU zeroes unit 1 on every input
    plan = CompressionPlan.dense(model)
    plan.layers["2"].a_sparsity = 1 / 3
    verify_plan(plan, model, batch)
    plan.layers["2"].a_sparsity = 0.5
    with pytest.raises(PlanMismatch, match="activation sparsity"):
        verify_plan(plan, model, batch)


# ---------------------------------------------------------------- `jpqbench run`, every order
@pytest.mark.parametrize("hparams", [{"order": "pq", "acts": True}, {"order": "qp", "acts": True},
                                     {"order": "q"}], ids=["pq", "qp", "q"])
def test_jpqbench_run_reports_both_sparsities(digits_workspace: DigitsWorkspace, tmp_path: Path,
                                              no_env_tracking_uri, hparams: dict) -> None:
    config = write_config(tmp_path / "config.yaml", digits_workspace.root, data_root=digits_workspace.data_root)
    raw = yaml.safe_load(config.read_text())
    raw["methods"].append("noncomm")
    raw["method_params"] = {"noncomm": {**hparams, "w_sparsity": W_TARGET, "a_sparsity": A_TARGET}}
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["--config", str(config), "run", "--method", "noncomm", "--dataset", "digits", "--seed", "0",
                 "--epochs", "2", "--budget", "0.05", "--checkpoint", str(digits_workspace.checkpoint),
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    plan = CompressionPlan.load(out / "plan.json")
    assert metrics["target_met"] is True and metrics["relative_bops"] <= 0.05
    assert "uses 7 bits" in metrics["outside_paper_regime"]  # 5 % of FP32 BOPs forces 7 bits
    pruned = hparams["order"] != "q"
    assert metrics["weight_sparsity"] == pytest.approx(W_TARGET if pruned else 0.0, abs=0.01)
    layers = list(plan.layers)
    for name in layers[1:-1]:
        assert plan.layers[name].a_sparsity == pytest.approx(A_TARGET if pruned else 0.0, abs=0.01)
    assert (metrics["activation_sparsity"] > 0.3) is pruned
    assert (metrics["relative_sparse_bops"] < metrics["relative_bops"]) is pruned
