"""AJPQ (methods/ajpq.py, jpqbench/ajpq_env.py): the budget wall holds whatever the agent does,
ratios prune round(r*C) channels per dependency group, 0-bit channels are zero, the reward never
sees the test split, a seed reproduces the search, and a CLI run reaches its budget."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from conftest import DigitsWorkspace
from jpqbench.ajpq_env import AJPQEnv, BudgetWall, PolicySpace, apply_policy, calibrate_policy
from jpqbench.cli import main
from jpqbench.config import TrainRecipe
from jpqbench.cost import count
from jpqbench.data import DataBundle, TensorSplit
from jpqbench.errors import UserError
from jpqbench.layers import compressible_layers
from jpqbench.methods_api import Budget, RunContext, make_method
from jpqbench.models.zoo import digits_cnn, ds_cnn
from jpqbench.plan import CompressionPlan, plan_from_model, verify_plan
from jpqbench.prune import ChannelGroups

MODELS = {"digits_cnn": (digits_cnn, (1, 8, 8), 10), "ds_cnn": (ds_cnn, (1, 49, 10), 12)}


def _model(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    build, shape, classes = MODELS[name]
    torch.manual_seed(0)
    return build(classes, shape).eval(), shape


def _space(model: torch.nn.Module, shape: tuple[int, ...], metric: str = "bops", channel_groups: int = 2,
           max_ratio: float = 0.8) -> PolicySpace:
    return PolicySpace(model, shape, ChannelGroups(model, shape), metric, (2, 3, 4, 5, 6, 7, 8), (2, 3, 4, 5, 6, 7, 8),
                       channel_groups, max_ratio)


def _episode(env: AJPQEnv, actions: np.ndarray):
    env.reset()
    for row in actions:
        state, reward, terminated, truncated, _ = env.step(row)
        assert env.observation_space.contains(state)
    assert terminated and not truncated
    return env.episodes[-1]


def _adversarial_actions(space: PolicySpace, rng: np.random.Generator) -> list[np.ndarray]:
    """Extremes, out-of-range and NaN actions, and random ones (a hypothesis-style sweep)."""
    shape = (space.n_layers, space.action_dim)
    fixed = [np.zeros(shape), np.ones(shape), np.full(shape, -3.0), np.full(shape, 7.0), np.full(shape, np.nan)]
    mixed = np.ones(shape)
    mixed[:, 0] = 0.0  # no pruning, highest bits: the most expensive policy
    fixed.append(mixed)
    randoms = [rng.uniform(-0.5, 1.5, shape) for _ in range(3)] + [rng.uniform(0, 1, shape) for _ in range(4)]
    return fixed + randoms


@pytest.mark.parametrize("name,metric,target", [("digits_cnn", "bops", 0.01), ("digits_cnn", "bops", 0.05),
                                                ("digits_cnn", "size", 0.1), ("ds_cnn", "bops", 0.03),
                                                ("ds_cnn", "size", 0.2)])
def test_every_policy_leaving_the_environment_is_within_budget(name: str, metric: str, target: float) -> None:
    model, shape = _model(name)
    space = _space(model, shape, metric)
    rng = np.random.default_rng(0)
    costs = {}
    for fill in (False, True):
        wall = BudgetWall(space, lambda plan: count(model, shape, plan).relative(metric), target, fill=fill)
        env = AJPQEnv(space, wall, reward=lambda policy: 0.0)
        for i, actions in enumerate(_adversarial_actions(space, rng)):
            episode = _episode(env, actions)
            counted = count(model, shape, episode.policy.plan).relative(metric)  # independently, by the harness
            assert counted == episode.relative_cost
            assert counted <= target, (fill, i, counted)
            costs[fill, i] = counted
        rng = np.random.default_rng(0)  # the same actions for both walls
    # growing an under-budget policy never makes it cheaper, and it spends most of the budget
    assert all(costs[True, i] >= costs[False, i] for i in range(len(costs) // 2))
    assert min(costs[True, i] for i in range(len(costs) // 2)) > 0.5 * target


def test_unreachable_budget_is_refused_up_front() -> None:
    model, shape = _model("digits_cnn")
    space = _space(model, shape, "size", max_ratio=0.0)
    with pytest.raises(UserError, match="cannot be reached"):
        BudgetWall(space, lambda plan: count(model, shape, plan).relative("size"), 0.01)


@pytest.mark.parametrize("name", ["digits_cnn", "ds_cnn"])
def test_ratio_prunes_round_rC_channels_per_group_and_zero_bit_channels_are_zero(name: str) -> None:
    model, shape = _model(name)
    space = _space(model, shape, channel_groups=3)
    rng = np.random.default_rng(1)
    actions = rng.uniform(0, 1, (space.n_layers, space.action_dim))
    actions[[i for i, layer in enumerate(space.layers) if not layer.decides], 0] = 1.0  # ignored: no decision there
    policy = space.decode(actions)
    assert set(policy.plan.layers) == set(CompressionPlan.dense(model).layers)
    deciding = {layer.group: i for i, layer in enumerate(space.layers) if layer.decides}
    assert set(deciding) == {group.root for group in space.groups.groups}
    for layer in space.layers:
        pruned = policy.plan.layers[layer.name].pruned
        if layer.group is None:  # the classifier
            assert pruned == []
            continue
        ratio = actions[deciding[layer.group], 0] * space.max_ratio
        assert len(pruned) == round(ratio * layer.out_channels)
        # every layer of the dependency group loses the same channels
        partners = [other.name for other in space.layers if other.group == layer.group]
        assert all(policy.plan.layers[other].pruned == pruned for other in partners)
        # more important channels (group L2 order) never get fewer bits
        bits = policy.plan.layers[layer.name].channel_bits()
        kept_bits = [bits[c] for c in layer.order if bits[c]]
        assert kept_bits == sorted(kept_bits, reverse=True) and len(set(kept_bits)) <= 3
    assert any(policy.plan.layers[layer.name].pruned for layer in space.layers)

    apply_policy(model, policy, learn_step=True)
    batch = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    calibrate_policy(model, [batch])
    outputs = {}
    hooks = [layer.register_forward_hook(lambda mod, args, out, n=n: outputs.__setitem__(n, out))
             for n, layer in compressible_layers(model).items()]
    with torch.no_grad():
        model(batch)
    for hook in hooks:
        hook.remove()
    for layer_name, layer in compressible_layers(model).items():
        zero_bit = [c for c, b in enumerate(policy.plan.layers[layer_name].channel_bits()) if b == 0]
        assert zero_bit == policy.plan.layers[layer_name].pruned
        if zero_bit:
            assert layer.effective_weight()[zero_bit].abs().sum() == 0
            assert outputs[layer_name][:, zero_bit].abs().sum() == 0
    # the model says what the policy says, and the harness's checker agrees
    read_back = plan_from_model(model, "ajpq")
    for layer_name, claim in policy.plan.layers.items():
        assert read_back.layers[layer_name].channel_bits() == claim.channel_bits()
        assert read_back.layers[layer_name].a_bits == claim.a_bits
    verify_plan(read_back, model, batch)


class _Forbidden(Dataset):
    def __len__(self) -> int:
        raise AssertionError("the test split was touched")

    def __getitem__(self, index: int):
        raise AssertionError("the test split was touched")


@dataclass
class _SpyBundle(DataBundle):
    """A DataBundle that records which split every loader is made for."""

    seen: list[str] = field(default_factory=list)

    def loader(self, split: str, *args, **kwargs):
        self.seen.append(split)
        assert split != "test", "the method asked for a test loader"
        return super().loader(split, *args, **kwargs)


def _context(tmp_path: Path, data: DataBundle, epochs: int = 1) -> RunContext:
    recipe = TrainRecipe(model="digits_cnn", pretrain_epochs=1, epochs=epochs, batch_size=16, lr=0.1, finetune_lr=0.01,
                         max_steps_per_epoch=2)
    return RunContext(data=data, recipe=recipe, epochs=epochs, seed=0, work_dir=tmp_path)


def _random_bundle() -> _SpyBundle:
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        return TensorSplit(torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator))

    return _SpyBundle("random", split(64), split(32), _Forbidden(), num_classes=10, input_shape=(1, 8, 8),
                      default_model="digits_cnn")


SMALL = {"episodes": 3, "warmup_episodes": 1, "reward_finetune_steps": 2, "eval_batches": 2, "calibration_batches": 2,
         "reward_calibration_batches": 1}


def test_reward_reads_only_the_training_set_and_the_run_spends_its_epochs(tmp_path: Path) -> None:
    data = _random_bundle()
    ctx = _context(tmp_path, data)
    model, _ = _model("digits_cnn")
    logged: list[tuple[dict, int]] = []
    ctx.log_metrics = lambda metrics, step: logged.append((metrics, step))
    compressed = make_method("ajpq", {"ajpq": SMALL}).compress(model, Budget("bops", 0.05), ctx)
    assert "test" not in data.seen and {"train", "val"} <= set(data.seen)
    assert ctx.epochs_used == ctx.epochs and ctx.search_s > 0
    assert ctx.cost(compressed.model, compressed.plan).relative_bops <= 0.05
    rewards = [(step, m["search/reward"]) for m, step in logged if "search/reward" in m]
    assert [step for step, _ in rewards] == [0, 1, 2]
    assert compressed.plan.notes["best_reward"] == max(r for _, r in rewards)
    search_cost = next(m for m, _ in logged if "search/wall_s" in m)
    assert search_cost["search/episodes"] == 3 and search_cost["search/evaluations"] == 4  # + the FP32 baseline


def test_same_seed_same_search(tmp_path: Path) -> None:
    results = []
    for run in range(2):
        model, _ = _model("digits_cnn")
        ctx = _context(tmp_path / str(run), _random_bundle())
        best, _ = make_method("ajpq", {"ajpq": {**SMALL, "episodes": 4, "warmup_episodes": 2}}).search(
            model, Budget("bops", 0.05), ctx)
        results.append((best.index, best.reward, best.policy.actions.tolist(), best.policy.plan.to_dict()))
    assert results[0] == results[1]


@pytest.mark.parametrize("params,match", [({"warmup_episodes": 4, "episodes": 4}, "warmup_episodes"),
                                          ({"w_bit_choices": [1, 4]}, "bit choices"),
                                          ({"max_ratio": 1.0}, "max_ratio")])
def test_bad_hyperparameters_are_user_errors(params: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        make_method("ajpq", {"ajpq": params})


@pytest.mark.slow
def test_cli_run_with_a_few_episodes_reaches_its_budget(digits_workspace: DigitsWorkspace, tmp_path: Path,
                                                       no_env_tracking_uri) -> None:
    from mlflow.tracking import MlflowClient

    out = tmp_path / "ajpq"
    spec = "ajpq[episodes=4,warmup_episodes=2,reward_finetune_steps=2]"
    assert main(["--config", str(digits_workspace.config), "run", "--method", spec, "--dataset", "digits",
                 "--seed", "0", "--epochs", "2", "--checkpoint", str(digits_workspace.checkpoint),
                 "--out", str(out), "--budget", "0.05"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target_met"] is True and metrics["relative_bops"] <= 0.05
    assert metrics["epochs_used"] == metrics["epochs"] == 2 and metrics["search_time_s"] > 0
    plan = CompressionPlan.load(out / "plan.json")
    assert plan.notes["episodes"] == 4
    assert any(layer.pruned for layer in plan.layers.values())  # pruning happened, as 0-bit channels
    history = MlflowClient(digits_workspace.tracking_uri).get_metric_history(metrics["mlflow_run_id"], "search/reward")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
