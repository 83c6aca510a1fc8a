"""GETA: the quantization-aware dependency graph on every zoo model, QASSO's stage properties
(bit ranges, frozen integer bit widths, exact group sparsity, physically removable zeros), the
budget derivation on the papers' grid at real input sizes, and a full `jpqbench run --method
geta` that meets its budget."""
from __future__ import annotations

import copy
import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from conftest import DigitsWorkspace
from paths import REPO_ROOT
from torch import nn
from torch.utils.data import TensorDataset

from jpqbench.accounting.counter import count
from jpqbench.accounting.plan import CompressionPlan, plan_from_model, with_pruned, with_uniform_bits
from jpqbench.accounting.verify import verify_plan
from jpqbench.base.budget import Budget
from jpqbench.base.config import TrainRecipe, load_config
from jpqbench.base.errors import UserError
from jpqbench.base.method_spec import get_method, make_method
from jpqbench.base.registry import DATASETS, MODELS
from jpqbench.blocks.geta.qadg import PruningGroup, build_groups
from jpqbench.blocks.geta.qasso import (
    BitSchedule,
    Qasso,
    QassoConfig,
    QassoHooks,
    Schedule,
    apply_pruning,
    prunable_channels,
    pruned_rows,
    select_lowest,
)
from jpqbench.harness.data import DataBundle
from jpqbench.harness.method import RunContext
from jpqbench.harness.train import TrainHooks, TrainSpec
from jpqbench.nn.channel_pruning import classifier_name
from jpqbench.nn.layers import compressible_layers
from jpqbench.nn.learned_quant import (
    LearnedQuantizer,
    calibrate_inputs,
    freeze_all,
    install_learned_quantizers,
    learned_quantizers,
)
from jpqbench.pipeline.cli import main

# every zoo model at its real input size (CIFAR 32x32, MFCC 49x10, Tiny ImageNet 64x64, ImageNet 224x224)
SHAPES = {"resnet8": (3, 32, 32), "resnet20": (3, 32, 32), "resnet56": (3, 32, 32), "vgg7": (3, 32, 32),
          "digits_cnn": (1, 8, 8), "ds_cnn": (1, 49, 10), "resnet18_64": (3, 64, 64), "resnet18": (3, 224, 224),
          "mobilenet_v2": (3, 224, 224), "resnet50": (3, 224, 224)}
TORCHVISION = {"resnet18", "resnet18_64", "mobilenet_v2", "resnet50"}  # a few seconds each
PAPER_GRID = load_config(REPO_ROOT / "config" / "paper.yaml")


def _zoo_params() -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in TORCHVISION else n for n in MODELS.names()]


def _channel_is_zero(model: nn.Module, groups: list[PruningGroup]) -> torch.Tensor:
    """Per channel of every group: are all of its output-side parameters exactly 0.0?"""
    modules = dict(model.named_modules())
    flags = []
    for group in groups:
        zero = torch.ones(group.size, dtype=torch.bool)
        for coupled in (*group.layers, *group.norms):
            module = modules[coupled.module]
            for param in (module.weight, module.bias):
                if param is not None:
                    rows = param.detach()[coupled.rows].reshape(len(coupled.rows), -1)
                    nonzero = (rows != 0).any(dim=1)
                    zero[coupled.channels[nonzero]] = False
        flags.append(zero)
    return torch.cat(flags)


def _physically_pruned(model: nn.Module, groups: list[PruningGroup], zero: torch.Tensor,
                       shape: tuple[int, ...]) -> nn.Module:
    """A plain copy with the quantized weights baked in, each layer's input quantizer kept as a
    pre-hook, and the zero channels removed by torch-pruning."""
    plain = copy.deepcopy(model)
    for layer in compressible_layers(plain).values():
        with torch.no_grad():
            weight, bias = layer.effective_weight(), layer.effective_bias()
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        input_quantizer = layer.input_quantizer
        del layer.weight_quantizer, layer.input_quantizer, layer.out_mask
        layer.__class__ = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
        if isinstance(input_quantizer, LearnedQuantizer):
            layer.register_forward_pre_hook(lambda m, args, q=input_quantizer: (q(args[0]),))
    for module in plain.modules():  # the BN masks: their channels are zero by gamma = beta = 0 already
        if hasattr(module, "channel_mask"):
            module._forward_hooks.clear()
            del module.channel_mask
    dtype = next(plain.parameters()).dtype
    graph = tp.DependencyGraph().build_dependency(plain, torch.ones(1, *shape, dtype=dtype))
    modules = dict(plain.named_modules())
    offset = 0
    for group in groups:
        local = torch.nonzero(zero[offset:offset + group.size]).flatten().tolist()
        offset += group.size
        if local:
            root = modules[group.root]
            graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs=local).prune()
    return plain


@pytest.mark.parametrize("name", _zoo_params())
def test_qadg_groups_every_zoo_model_and_zero_groups_are_removable(name: str) -> None:
    torch.manual_seed(0)
    shape = SHAPES[name]
    model = MODELS.get(name)(10, shape).eval()
    install_learned_quantizers(model, weights=True, activations=True)
    calibrate_inputs(model, [torch.randn(2, *shape)])
    groups = build_groups(model, shape)
    # float64 from here: removing channels reorders float sums, and in float32 that moves enough
    # activations of a 224x224 ResNet-50 across a rounding boundary of their (16-bit) input
    # quantizers to blur the comparison below; in float64 the reordering is far below one level
    model.double()
    quantizer_state = {k: v.clone() for k, v in model.state_dict().items() if "quantizer" in k}

    # every conv/linear output except the classifier's is in exactly one group; only conv/linear/BN rows
    writers = [c.module for g in groups for c in g.layers]
    assert len(writers) == len(set(writers))
    assert set(writers) == set(compressible_layers(model)) - {classifier_name(model)}
    modules = dict(model.named_modules())
    assert all(isinstance(modules[c.module], nn.BatchNorm2d) for g in groups for c in g.norms)
    assert all("quantizer" not in c.module for g in groups for c in (*g.layers, *g.norms))

    # zero a third of every group (the lowest random scores), then remove them physically
    channels = sum(g.size for g in groups)
    chosen = select_lowest(torch.rand(channels), groups, torch.zeros(channels, dtype=torch.bool), channels // 3)
    with torch.no_grad():
        apply_pruning(modules, groups, chosen)
    assert torch.equal(_channel_is_zero(model, groups), chosen)
    x = torch.randn(2, *shape, dtype=torch.float64)
    physical = _physically_pruned(model, groups, chosen, shape)
    with torch.no_grad():
        expected, got = model(x), physical(x)
    assert sum(p.numel() for p in physical.parameters()) < sum(p.numel() for p in model.parameters())
    # not bit-exact: the reordered sums can still, rarely, move an activation across a rounding
    # boundary -- one 16-bit level, far below a structural error
    assert torch.allclose(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    # the quantizers travel with their layers: not one of their parameters or buffers changed
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in quantizer_state.items())


# ---- QASSO on a tiny model -------------------------------------------------------------

def _tiny_ctx(tmp_path: Path, epochs: int = 5, n: int = 256) -> RunContext:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    y = (x[:, 0, :4].sum(dim=(1, 2)) > 0).long() + 2 * (x[:, 0, 4:].sum(dim=(1, 2)) > 0).long()
    split = TensorDataset(x, y)
    data = DataBundle("tiny", split, TensorDataset(x[:64], y[:64]), TensorDataset(x[:64], y[:64]), 4, (1, 8, 8),
                      "digits_cnn")
    recipe = TrainRecipe(model="digits_cnn", pretrain_epochs=1, epochs=epochs, batch_size=32, lr=0.05,
                         finetune_lr=0.02, eval_every=100)
    return RunContext(data=data, recipe=recipe, epochs=epochs, seed=0, work_dir=tmp_path)


class _Recording(QassoHooks):
    """QASSO's hooks, recording after every step of the optimizer every quantizer's bit width and
    (zero channels, pruned channels, redundant channels)."""

    log: list[tuple[int, str, dict[str, tuple[float, bool, float]]]]
    masks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    def after_step(self, model: nn.Module, step: int) -> None:
        super().after_step(model, step)
        self.log.append((step, self.schedule.stage(step), {
            name: (q.bit_width().item(), q.frozen, q.q_m.item()) for name, q in learned_quantizers(model).items()}))
        state = self.state(model)
        self.masks.append((_channel_is_zero(model, self.groups), state.pruned.clone(), state.redundant.clone()))


@pytest.fixture(scope="module")
def qasso_run(tmp_path_factory: pytest.TempPathFactory):
    """digits_cnn (weights and inputs quantized) trained 5 tiny epochs (40 steps) under QASSO."""
    torch.manual_seed(0)
    ctx = _tiny_ctx(tmp_path_factory.mktemp("qasso"))
    model = MODELS.get("digits_cnn")(4, (1, 8, 8))
    install_learned_quantizers(model, weights=True, activations=True)
    calibrate_inputs(model, ctx.calibration_batches(2))
    groups = build_groups(model, (1, 8, 8))
    schedule = Schedule.from_fractions(40, warmup=0.1, projection=0.3, pruning=0.3, projection_periods=3,
                                       pruning_periods=3)
    config = QassoConfig(target_group_sparsity=0.4, lr_quant=1e-3, weight_bits=BitSchedule(3, 12, 6, 2),
                         input_bits=BitSchedule(4, 12, 7, 3))
    hooks = _Recording(model, groups, schedule, config)
    hooks.log, hooks.masks = [], []
    hooks.attach(model)
    ctx.train(model, ctx.epochs, phase="qasso", hooks=hooks, lr=0.02)
    assert isinstance(hooks.optimizer, Qasso) and int(hooks.optimizer.qstate.step) == 40  # QASSO took every step
    state = copy.deepcopy(hooks.state(model))
    hooks.detach(model)
    return model, groups, schedule, config, hooks, state


def test_schedule_stages_and_upper_bits(qasso_run) -> None:
    _, _, schedule, config, hooks, _ = qasso_run
    assert (schedule.projection_start, schedule.pruning_start, schedule.cooldown_start) == (4, 16, 28)
    uppers = [config.weight_bits.upper(schedule, s) for s in range(schedule.projection_start, schedule.pruning_start)]
    # 12, 10, then the joint stage's 6 in the last period (bit_reduction 2 would reach 8 there)
    assert uppers[0] == 12 and uppers[-1] == 6 and uppers == sorted(uppers, reverse=True)
    assert config.weight_bits.upper(schedule, schedule.pruning_start) == 6  # the final range in the joint stage
    assert [s for s, *_ in hooks.log] == list(range(40))


def test_bit_widths_stay_in_the_projected_range(qasso_run) -> None:
    _, _, schedule, config, hooks, _ = qasso_run
    checked = 0
    for step, stage, widths in hooks.log:
        if stage not in ("projection", "joint"):
            continue
        for name, (width, frozen, _) in widths.items():
            bits = config.input_bits if name.endswith("input_quantizer") else config.weight_bits
            assert frozen == (step == schedule.cooldown_start - 1)  # frozen after the joint stage's last step
            assert bits.low - 1e-6 <= width <= bits.upper(schedule, step) + 1e-6, (step, name, width)
            checked += 1
    assert checked > 0
    # the projection really bit: the 16-bit start is brought down to b_u in the first projection step
    first = next(w for s, stage, w in hooks.log if stage == "projection")
    assert max(width for width, *_ in first.values()) <= 12 + 1e-6


def test_cooldown_bit_widths_are_integer_and_frozen(qasso_run) -> None:
    model, _, schedule, config, hooks, _ = qasso_run
    cooldown = [w for _, stage, w in hooks.log if stage == "cooldown"]
    assert len(cooldown) == 40 - schedule.cooldown_start
    for widths in cooldown:
        for name, (width, frozen, _) in widths.items():
            assert frozen and width == pytest.approx(round(width), abs=1e-9)
            assert width == pytest.approx(cooldown[0][name][0], abs=1e-9)  # the same bits all through
    q_m_moved = any(cooldown[-1][n][2] != cooldown[0][n][2] for n in cooldown[0])
    assert q_m_moved  # q_m (and t) keep training while the bit widths are frozen
    for name, quantizer in learned_quantizers(model).items():
        assert quantizer.bits == round(cooldown[-1][name][0])
        bits = config.input_bits if name.endswith("input_quantizer") else config.weight_bits
        assert bits.low <= quantizer.bits <= bits.final


def test_exactly_the_target_share_of_channels_is_zero_and_removable(qasso_run) -> None:
    model, groups, _, config, _, state = qasso_run
    channels = sum(g.size for g in groups)
    zero = _channel_is_zero(model, groups)
    assert int(zero.sum()) == int(channels * config.target_group_sparsity)
    assert torch.equal(zero, state.pruned) and not state.redundant.any()
    offset = 0
    for group in groups:  # every group keeps a channel
        assert not zero[offset:offset + group.size].all()
        offset += group.size
    layers = compressible_layers(model)
    for group in groups:  # the plan's masks are the zero rows
        for coupled in group.layers:
            mask = layers[coupled.module].out_mask
            offset = sum(g.size for g in groups[:groups.index(group)])
            assert torch.equal(mask[coupled.rows] == 0, zero[offset + coupled.channels])
    model.eval()
    x = torch.randn(8, 1, 8, 8)
    physical = _physically_pruned(model, groups, zero, (1, 8, 8))
    with torch.no_grad():
        expected, got = model(x), physical(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_too_few_steps_for_the_stages_is_a_user_error() -> None:
    with pytest.raises(UserError, match="too few"):
        Schedule.from_fractions(2, warmup=0.5, projection=0.5, pruning=0.5, projection_periods=1, pruning_periods=1)


def test_bad_hyperparameters_are_rejected() -> None:
    with pytest.raises(UserError, match="geta"):
        get_method("geta")(warmup_fraction=0.5, projection_fraction=0.4, pruning_fraction=0.3)
    with pytest.raises(UserError, match="geta"):
        get_method("geta")(min_bit_wt=6, max_final_bit=4)


def test_same_seed_same_compressed_model(tmp_path: Path) -> None:
    states = []
    for run in ("a", "b"):
        torch.manual_seed(0)
        model = MODELS.get("digits_cnn")(4, (1, 8, 8))
        ctx = _tiny_ctx(tmp_path / run, epochs=2, n=128)
        compressed = get_method("geta")().compress(model, Budget("bops", 0.05), ctx)
        assert ctx.cost(compressed.model, compressed.plan).relative_bops <= 0.05 * 1.10
        # the plan before the budget wall: the same pruning, bit widths that the wall can only have lowered
        searched = compressed.searched
        assert searched is not None and set(searched.layers) == set(compressed.plan.layers)
        for name, layer in compressed.plan.layers.items():
            assert searched.layers[name].pruned == layer.pruned
            assert searched.layers[name].w_bits >= layer.w_bits and searched.layers[name].a_bits >= layer.a_bits
        states.append((compressed.model.state_dict(), compressed.plan.to_dict()))
    assert states[0][1] == states[1][1]
    assert all(torch.equal(states[0][0][k], states[1][0][k]) for k in states[0][0])


def test_budget_mode_prunes_just_enough(tmp_path: Path) -> None:
    """Without a fixed group sparsity, the last pruning period takes exactly what the budget still
    needs at the current bit widths: with the bit ranges pinned at 4 bits (weights and inputs,
    1.6 % of the FP32 BOPs before pruning) the pruned model lands within one channel's cost under
    the 1 % target, not far below it."""
    torch.manual_seed(0)
    model = MODELS.get("digits_cnn")(4, (1, 8, 8))
    ctx = _tiny_ctx(tmp_path, epochs=3, n=128)
    compressed = get_method("geta")(min_bit_wt=4, max_final_bit=4).compress(model, Budget("bops", 0.01), ctx)
    plan = compressed.plan
    assert {layer.w_bits for layer in plan.layers.values()} == {4}
    assert {layer.a_bits for layer in plan.layers.values()} == {4}
    cost = ctx.cost(compressed.model, plan).relative_bops
    assert 0.01 * 0.9 < cost <= 0.01
    assert 0 < plan.notes["group_sparsity"] < 1


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QASSO's state (redundant and pruned channels, frozen bits, masks) is in the checkpoint: a run
    stopped after epoch 2 -- in the middle of its pruning period -- continues exactly where it was."""
    def run(work: Path) -> tuple[dict, dict]:
        torch.manual_seed(0)
        model = MODELS.get("digits_cnn")(4, (1, 8, 8))
        ctx = _tiny_ctx(work, epochs=5, n=128)  # 4 steps per epoch; one pruning period, steps 4..11
        compressed = get_method("geta")(pruning_periods=1, pruning_fraction=0.4).compress(
            model, Budget("bops", 0.05), ctx)
        return compressed.model.state_dict(), compressed.plan.to_dict()

    reference = run(tmp_path / "reference")

    class Stop(Exception):
        pass

    def stop_at_epoch_2(self, model, epoch):
        if epoch == 2:
            raise Stop
    with monkeypatch.context() as patch:
        patch.setattr(QassoHooks, "on_epoch_start", stop_at_epoch_2)
        with pytest.raises(Stop):
            run(tmp_path / "resumed")
    assert (tmp_path / "resumed" / "geta.pt").exists()
    resumed = run(tmp_path / "resumed")
    assert resumed[1] == reference[1]
    assert resumed[0].keys() == reference[0].keys()
    assert all(torch.equal(resumed[0][k], reference[0][k]) for k in reference[0])


def test_redundant_channels_are_exactly_zero_at_the_end_of_every_period(qasso_run) -> None:
    """During a period the redundant channels shrink but live; at its last step they become exactly
    0.0 and stay so; at the end of the joint stage every channel ever marked redundant is zero."""
    _, groups, schedule, config, hooks, _ = qasso_run
    marked = torch.zeros(sum(g.size for g in groups), dtype=torch.bool)
    for step, (zero, pruned, redundant) in enumerate(hooks.masks):
        marked |= redundant
        assert bool(zero[pruned].all())  # pruned channels are exactly zero after every step
        if schedule.stage(step) != "joint":
            continue
        period, t = schedule.pruning_position(step)
        if t < schedule.pruning_len - 1:
            assert redundant.any() and not bool(zero[redundant].all())  # shrinking, not yet zero
        else:
            assert not redundant.any() and torch.equal(pruned, marked)  # committed: zero from now on
            assert int(pruned.sum()) == sum(hooks.optimizer.period_counts[:period + 1])
    end = schedule.cooldown_start - 1
    assert torch.equal(hooks.masks[end][1], marked) and bool(hooks.masks[end][0][marked].all())
    assert int(marked.sum()) == int(sum(g.size for g in groups) * config.target_group_sparsity)


# ---- the optimizer on tiny tensors ---------------------------------------------------------

class _TwoConv(nn.Module):
    """conv1 -> BN -> ReLU -> conv2 -> BN -> ReLU -> mean -> fc: two channel groups and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean(dim=(2, 3)))


def _tiny_qasso(schedule: Schedule, variant: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                weight_decay: float = 1e-2, lr_quant: float = 1e-3, model: nn.Module | None = None,
                bits: BitSchedule = BitSchedule(4, 12, 8, 4)) -> tuple[nn.Module, list[PruningGroup], QassoHooks]:
    torch.manual_seed(0)
    model = model or _TwoConv()
    install_learned_quantizers(model)
    groups = build_groups(model, (1, 6, 6))
    hooks = QassoHooks(model, groups, schedule, QassoConfig(0.25, lr_quant, bits, None))
    hooks.attach(model)
    spec = TrainSpec(epochs=1, lr=lr, batch_size=1, optimizer=variant, momentum=momentum, weight_decay=weight_decay)
    hooks.make_optimizer(hooks.param_groups(model, lr, weight_decay), spec)
    return model, groups, hooks


def _set_grads(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.randn(param.shape, generator=gen)


def test_warmup_step_is_sgd_with_momentum_and_adam() -> None:
    """In the warm-up every parameter (quantizer parameters at lr_quant) moves exactly as
    torch.optim.SGD with momentum and L2 weight decay, or torch.optim.Adam, would move it."""
    schedule = Schedule.from_fractions(20, warmup=0.5, projection=0.2, pruning=0.2, projection_periods=1,
                                       pruning_periods=1)
    for variant, reference in (("sgd", lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9)),
                               ("adam", lambda g: torch.optim.Adam(g, lr=0.1))):
        model, _, hooks = _tiny_qasso(schedule, variant)
        qasso, twin = hooks.optimizer, copy.deepcopy(model)
        ref = reference(hooks.param_groups(twin, 0.1, 1e-2))
        for step in range(3):
            _set_grads(model, step), _set_grads(twin, step)
            qasso.step(), ref.step()
            for (name, got), expected in zip(model.named_parameters(), twin.parameters()):
                assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7), (variant, step, name)


def test_joint_step_sgd_on_important_groups_half_space_step_on_redundant_rows() -> None:
    """In the joint stage the important groups take exactly SGD with momentum by hand; redundant
    rows additionally lose gamma Q(w) (gamma = 1/(L - t) when the direction points along the
    values) from their value before the step, and their layer's d is set to d(b_l)."""
    schedule = Schedule.from_fractions(20, warmup=0.0, projection=0.2, pruning=0.5, projection_periods=1,
                                       pruning_periods=1)
    model, groups, hooks = _tiny_qasso(schedule)
    qasso = hooks.optimizer
    lr, mu, wd = 0.1, 0.9, 1e-2
    t = 2
    qasso.qstate.step.fill_(schedule.pruning_start + t)  # inside the period: no new selection
    first = next(i for i, g in enumerate(groups) if g.root == "conv1")
    offset = sum(g.size for g in groups[:first])
    qasso.qstate.redundant[offset:offset + 2] = True  # channels 0 and 1 of conv1's group
    rows = torch.tensor([0, 1])
    important = {"conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias", "fc.weight", "fc.bias"}
    params = dict(model.named_parameters())
    buffers = {name: None for name in params}
    for step in range(3):
        _set_grads(model, step)
        with torch.no_grad():  # the redundant rows' direction points along their values: cos(x, v) > 0
            for name in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"):
                params[name].grad[rows] = params[name][rows]
        before = {name: p.detach().clone() for name, p in params.items()}
        expected = {}
        for name, p in params.items():
            v = p.grad + (wd * before[name] if p.dim() > 1 else 0)
            buffers[name] = v.clone() if buffers[name] is None else buffers[name] * mu + v
            expected[name] = before[name] - lr * buffers[name]
        qasso.step()
        for name in important:  # SGD with momentum by hand
            assert torch.allclose(params[name], expected[name], rtol=1e-6, atol=1e-7), (step, name)
        if step == 0:  # the half-space step on the redundant rows (first step: no momentum history)
            gamma = 1 / (schedule.pruning_len - t)
            quantizer = model.conv1.weight_quantizer
            assert float(quantizer.d.detach()) == pytest.approx(float(quantizer.step_for_bits(4).detach()))  # d(b_l)
            with torch.no_grad():
                forget = {"conv1.weight": quantizer(before["conv1.weight"][rows])}
            for name in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"):
                lost = gamma * forget.get(name, before[name][rows])
                assert torch.allclose(params[name][rows], expected[name][rows] - lost, rtol=1e-6, atol=1e-7), name
                assert torch.allclose(params[name][2:], expected[name][2:], rtol=1e-6, atol=1e-7), name


def test_d_stays_inside_the_projected_interval_after_every_projection_step() -> None:
    """Huge steps on d in both directions (lr_quant 10): after every projection step each weight
    quantizer's d is inside [d(b_u), d(b_l)] for that period's b_u (12, then 8), and both ends are reached."""
    schedule = Schedule.from_fractions(20, warmup=0.0, projection=0.5, pruning=0.2, projection_periods=2,
                                       pruning_periods=1)
    bits = BitSchedule(4, 12, 8, 4)
    model, _, hooks = _tiny_qasso(schedule, lr_quant=10.0)
    qasso = hooks.optimizer
    quantizers = learned_quantizers(model)
    hit_low = hit_high = 0
    for step in range(schedule.pruning_start):
        _set_grads(model, step)
        for q in quantizers.values():  # q_m and t still; d pushed far out of range, both ways
            q.d.grad = torch.tensor(1e3 if step % 3 else -1e3)
            q.q_m.grad, q.t.grad = torch.zeros(()), torch.zeros(())
        qasso.step()
        upper = bits.upper(schedule, step)
        assert upper == (12 if step < 5 else 8)
        for name, q in quantizers.items():
            low, high = float(q.step_for_bits(upper).detach()), float(q.step_for_bits(bits.low).detach())
            d = float(q.d.detach())
            assert low * (1 - 1e-6) <= d <= high * (1 + 1e-6), (step, name, d, low, high)
            assert bits.low - 1e-6 <= float(q.bit_width().detach()) <= upper + 1e-6
            hit_low += d == pytest.approx(low)
            hit_high += d == pytest.approx(high)
    assert hit_low and hit_high


class _Concat(nn.Module):
    """Two convs concatenated into one BN (DenseNet-style): that BN is auxiliary in both groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 3, 3, padding=1)
        self.bb, self.bn = nn.BatchNorm2d(3), nn.BatchNorm2d(7)
        self.conv2, self.fc = nn.Conv2d(7, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(torch.cat([self.a(x), torch.relu(self.bb(self.b(x)))], dim=1)))
        return self.fc(self.conv2(x).mean(dim=(2, 3)))


def test_batchnorm_behind_a_concat_is_auxiliary_and_decays_linearly() -> None:
    schedule = Schedule.from_fractions(20, warmup=0.0, projection=0.2, pruning=0.5, projection_periods=1,
                                       pruning_periods=1)
    model, groups, hooks = _tiny_qasso(schedule, model=_Concat(), weight_decay=0.0, momentum=0.0)
    qasso = hooks.optimizer
    flags = {(g.root, c.module): c.auxiliary for g in groups for c in (*g.layers, *g.norms)}
    assert flags == {("a", "a"): False, ("a", "bn"): True, ("b", "b"): False, ("b", "bb"): False,
                     ("b", "bn"): True, ("conv2", "conv2"): False}
    b_group = next(i for i, g in enumerate(groups) if g.root == "b")
    offset = sum(g.size for g in groups[:b_group])
    qasso.qstate.redundant[offset + 1] = True  # channel 1 of b: row 1 of bb, row 4 + 1 of the concat BN
    length = schedule.pruning_len
    for t in range(1, length):  # from t = 1: the period's first step would choose its own redundant channels
        qasso.qstate.step.fill_(schedule.pruning_start + t)
        _set_grads(model, t)
        before = model.bn.weight.detach().clone()
        qasso.step()
        after, grad = model.bn.weight.detach(), model.bn.weight.grad
        if t < length - 1:
            expected = (before[5] - 0.1 * grad[5]) * (length - t - 1) / (length - t)
            assert float(after[5]) == pytest.approx(float(expected), rel=1e-6)
            assert float(after[4]) == pytest.approx(float(before[4] - 0.1 * grad[4]))  # channel 0 of b: plain SGD
    assert float(model.bn.weight[5].detach()) == 0.0 and float(model.bb.weight[1].detach()) == 0.0  # pruned
    assert bool((model.b.weight[1] == 0).all()) and not bool((model.b.weight[0] == 0).all())


def test_group_divisible_keeps_multiples_of_k() -> None:
    groups = [PruningGroup(f"g{i}", size, (), ()) for i, size in enumerate((5, 8, 2, 6))]
    channels = sum(g.size for g in groups)
    score = torch.rand(channels, generator=torch.Generator().manual_seed(0))
    none = torch.zeros(channels, dtype=torch.bool)
    assert prunable_channels(groups, 2) == 3 + 6 + 0 + 4
    for wanted in range(channels + 1):  # not `count`: that name is the harness's cost counter here
        chosen = select_lowest(score, groups, none, wanted, divisible=2)
        assert int(chosen.sum()) <= wanted
        offset = 0
        for group in groups:
            taken = int(chosen[offset:offset + group.size].sum())
            kept = group.size - taken
            assert kept >= min(2, group.size) and (taken == 0 or kept % 2 == 0), (wanted, group.root, kept)
            if group.size <= 2:
                assert taken == 0
            offset += group.size
    exact = select_lowest(score, groups, none, 9)  # divisible=1: exactly the count, one channel per group left
    assert int(exact.sum()) == 9


def test_group_divisible_reaches_the_plan(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MODELS.get("digits_cnn")(4, (1, 8, 8))
    ctx = _tiny_ctx(tmp_path, epochs=3, n=128)
    compressed = get_method("geta")(group_divisible=4).compress(model, Budget("bops", 0.05), ctx)
    assert ctx.cost(compressed.model, compressed.plan).relative_bops <= 0.05 * 1.10
    assert compressed.plan.notes["pruned_channels"] > 0
    for layer in compressed.plan.layers.values():
        kept = layer.out_channels - len(layer.pruned)
        assert kept == layer.out_channels or kept % 4 == 0


def test_make_optimizer_hook_supplies_the_optimizer_that_steps(tmp_path: Path) -> None:
    """A hook's optimizer takes every step in place of the harness's (whose SGD would move the
    weights): here one that only counts, so the weights must not move."""
    class Counting(torch.optim.Optimizer):
        def __init__(self, groups):
            super().__init__(groups, {"lr": 0.1})
            self.steps = 0

        def step(self, closure=None):
            self.steps += 1

    class Hooks(TrainHooks):
        def make_optimizer(self, groups, spec):
            self.optimizer = Counting(groups)
            return self.optimizer

    ctx = _tiny_ctx(tmp_path, epochs=4, n=64)  # two phases of 2 epochs
    model = MODELS.get("digits_cnn")(4, (1, 8, 8))
    start = copy.deepcopy(model.state_dict())
    hooks = Hooks()
    ctx.train(model, 2, phase="counting", hooks=hooks)
    assert hooks.optimizer.steps == 2 * 2  # 64 samples, batch 32, 2 epochs
    assert all(torch.equal(model.state_dict()[k], v) for k, v in start.items() if "running" not in k
               and "num_batches" not in k)
    ctx.train(model, 2, phase="default", hooks=TrainHooks())  # None: the harness's SGD, which moves them
    assert not torch.equal(model.fc.weight, start["fc.weight"])


# ---- end to end through the CLI ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("spec", ["geta", "geta[mode=weight,nonlinear=false]"])
def test_jpqbench_run_geta_meets_its_budget(spec: str, digits_workspace: DigitsWorkspace, tmp_path: Path,
                                           no_env_tracking_uri) -> None:
    out = tmp_path / "run"
    budget = 0.05
    assert main(["--config", str(digits_workspace.config), "run", "--method", spec, "--dataset", "digits",
                 "--seed", "0", "--epochs", "2", "--checkpoint", str(digits_workspace.checkpoint),
                 "--out", str(out), "--budget", str(budget)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["target_met"] is True
    assert metrics["relative_bops"] <= budget * 1.10
    assert metrics["searched_relative_bops"] >= metrics["relative_bops"]  # the wall only takes bits back
    plan = json.loads((out / "plan.json").read_text())
    notes = plan["notes"]
    assert notes["pruned_channels"] > 0 and 0 < notes["group_sparsity"] < 1
    low, high = notes["bit_range_w"]
    assert all(low <= layer["w_bits"] <= high for layer in plan["layers"].values())
    if "mode=weight" not in spec:  # the default: weights and activations
        low, high = notes["bit_range_a"]
        assert all(low <= layer["a_bits"] <= high for layer in plan["layers"].values())
    else:
        assert all(layer["a_bits"] == 32 for layer in plan["layers"].values())


# ---- the paper's operating points: derivation, projection schedule, integer bits ----------------

def _paper_points() -> list:
    """(dataset, model, budget) of every benchmark of config/paper.yaml at each of its budgets."""
    slow = {"tiny_imagenet", "imagenet"}  # 64x64 and 224x224 torchvision models: seconds per budget
    return [pytest.param(dataset, model, budget, marks=[pytest.mark.slow] if dataset in slow else [])
            for dataset, model in PAPER_GRID.benchmarks() for budget in PAPER_GRID.budgets_of(dataset)]


@functools.lru_cache(maxsize=1)
def _paper_setup(dataset: str, model_name: str):
    """geta as paper.yaml configures it for (dataset, model), prepared (quantizers, QADG groups, start
    saliency from one batch of two synthetic samples) on the zoo model at the dataset's real input size."""
    spec = DATASETS.get(dataset)
    shape, classes = tuple(spec.input_shape), spec.num_classes
    gen = torch.Generator().manual_seed(0)
    split = TensorDataset(torch.randn(2, *shape, generator=gen), torch.randint(0, classes, (2,), generator=gen))
    recipe = PAPER_GRID.recipe(dataset, model_name)
    ctx = RunContext(data=DataBundle(dataset, split, split, split, classes, shape, model_name), recipe=recipe,
                     epochs=recipe.epochs, seed=0, work_dir=Path(tempfile.gettempdir()))
    geta = make_method("geta", PAPER_GRID.method_params_of(dataset, model_name))
    torch.manual_seed(0)
    skeleton, groups, score = geta._prepare(MODELS.get(model_name)(classes, shape), ctx)
    return geta, ctx, skeleton, groups, score


@pytest.mark.parametrize("dataset, model_name, budget", _paper_points())
def test_derived_bit_range_at_the_paper_budgets_quantizes_activations(dataset: str, model_name: str,
                                                                      budget: float) -> None:
    """On the papers' grid GETA prices weights *and* activations at b_u: the derived pruning at
    (b_u, b_u) bits is within the budget and one channel fewer is not (so the derivation counted
    activations at b_u, not at 32 bits); b_u is the widest bit width in [b_l, 8] at which
    max_group_sparsity suffices, and only where none does (b_u = b_l) may it prune more."""
    geta, ctx, skeleton, groups, score = _paper_setup(dataset, model_name)
    hp = geta.hp
    assert hp.mode == "weight_activation"
    n_pruned, bits = geta._derive(skeleton, groups, score, Budget("bops", budget), ctx)
    assert hp.min_bit_wt <= bits <= min(hp.max_final_bit, 8)
    channels = sum(g.size for g in groups)
    none = torch.zeros(channels, dtype=torch.bool)

    def cost(pruned: int, b: int) -> float:
        layers, _ = pruned_rows(groups, select_lowest(score, groups, none, pruned, hp.group_divisible))
        plan = with_uniform_bits(with_pruned(CompressionPlan.dense(skeleton), layers), b, b)
        return ctx.cost(skeleton, plan).relative_bops

    assert cost(n_pruned, bits) <= budget
    if n_pruned:
        assert cost(n_pruned - 1, bits) > budget
    preferred = min(int(hp.max_group_sparsity * channels), prunable_channels(groups, hp.group_divisible))
    if bits > hp.min_bit_wt:
        assert n_pruned <= preferred
    if bits < hp.max_final_bit:
        assert cost(preferred, bits + 1) > budget  # one bit more would need more than max_group_sparsity


@pytest.mark.parametrize("final", range(4, 9))
def test_projection_ends_at_the_derived_b_u(final: int) -> None:
    """b_u starts at max_bit_wt, never rises, and the last projection period projects onto the
    derived b_u -- the joint stage's -- whatever bit_reduction is; unset, the steps are even (at
    most one bit apart), which for b_u = 8 is upstream's VGG7 tutorial: 16, 14, 12, 10, 8."""
    schedule = Schedule.from_fractions(1000, warmup=0.0, projection=0.2, pruning=0.2, projection_periods=5,
                                       pruning_periods=5)
    for reduction in (None, 1, 2, 5):
        bits = BitSchedule(4, 16, final, reduction)
        uppers = [bits.upper(schedule, s) for s in range(schedule.projection_start, schedule.pruning_start)]
        assert uppers[0] == 16 and uppers == sorted(uppers, reverse=True)
        last_period = schedule.projection_start + (schedule.projection_periods - 1) * schedule.projection_len
        assert set(uppers[last_period - schedule.projection_start:]) == {final}, reduction
        assert bits.upper(schedule, schedule.pruning_start) == final  # no jump into the joint stage
    even = [BitSchedule(4, 16, final).period_upper(p, 5) for p in range(5)]
    drops = [a - b for a, b in zip(even, even[1:])]
    assert max(drops) - min(drops) <= 1 and even[-1] == final
    assert [BitSchedule(4, 16, 8).period_upper(p, 5) for p in range(5)] == [16, 14, 12, 10, 8]


def test_count_and_freeze_use_one_integer_bit_rule_on_vgg7() -> None:
    """VGG7 at 32x32, weights and inputs quantized, each quantizer at a fractional width that rounds
    down (7.3, 4.4, 6.02) or up (7.6, 5.7) or is whole: the integer width counted before the freeze
    is the frozen one (7.3 bits is counted and frozen at 8), the counted cost does not move, and
    the frozen model's plan passes the harness's plan checker (no output channel or input takes
    more than 2**bits values)."""
    torch.manual_seed(0)
    shape = SHAPES["vgg7"]
    model = MODELS.get("vgg7")(10, shape).eval()
    install_learned_quantizers(model, weights=True, activations=True)
    batch = torch.randn(2, *shape)
    calibrate_inputs(model, [batch])
    widths = (7.3, 7.6, 4.4, 5.7, 6.02, 8.0, 4.0)
    quantizers = learned_quantizers(model)
    for index, quantizer in enumerate(quantizers.values()):
        with torch.no_grad():
            quantizer.d.copy_(quantizer.step_for_bits(widths[index % len(widths)]))
    counted = {name: q.bits for name, q in quantizers.items()}
    assert next(iter(counted.values())) == 8  # the first weight quantizer, at 7.3 bits: 157 values need 8
    before = plan_from_model(model, "geta")
    verify_plan(before, model, batch)
    freeze_all(model)
    assert {name: int(q.frozen_bits) for name, q in quantizers.items()} == counted
    assert {name: q.bits for name, q in quantizers.items()} == counted
    plan = plan_from_model(model, "geta")
    assert plan.to_dict() == before.to_dict()
    assert count(model, shape, plan).relative_bops == count(model, shape, before).relative_bops
    verify_plan(plan, model, batch)


def test_bit_widths_frozen_before_the_budget_wall_are_the_searched_ones() -> None:
    """QASSO freezes each quantizer at the width it counted, keeps those as the searched bit widths,
    and only then lets the budget wall take bits back (widest first) until the cost fits."""
    schedule = Schedule.from_fractions(20, warmup=0.0, projection=0.2, pruning=0.5, projection_periods=1,
                                       pruning_periods=1)
    model, _, hooks = _tiny_qasso(schedule)
    qasso = hooks.optimizer
    quantizers = learned_quantizers(model)
    for index, quantizer in enumerate(quantizers.values()):
        with torch.no_grad():
            quantizer.d.copy_(quantizer.step_for_bits(5.3 + index))  # 5.3, 6.3, 7.3: counted 6, 7, 8
    counted = {name: q.bits for name, q in quantizers.items()}
    assert sorted(counted.values()) == [6, 7, 8]
    with pytest.raises(RuntimeError, match="not frozen"):
        hooks.searched_bits(model)
    qasso.relative_cost = lambda m, rows: sum(q.bits for q in learned_quantizers(m).values())  # a toy cost
    qasso.target = sum(counted.values()) - 2
    qasso._freeze()
    assert hooks.searched_bits(model) == counted
    assert sorted(q.bits for q in quantizers.values()) == [6, 6, 7]  # the wall: 8 -> 7, then 7 -> 6
