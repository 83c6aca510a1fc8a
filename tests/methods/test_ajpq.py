"""AJPQ (jpqbench/methods/ajpq.py, jpqbench/blocks/ajpq/env.py): the budget wall holds whatever both controllers do,
ratios prune round(r*C) channels per dependency group, per-channel bits follow importance, 0-bit
channels are zero, the reward never sees the test split, both agents learn, a seed reproduces
the search, and a CLI run reaches its budget."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DigitsWorkspace
from scipy.stats import truncnorm
from torch.utils.data import Dataset

from jpqbench.accounting.counter import count
from jpqbench.accounting.plan import CompressionPlan, plan_from_model
from jpqbench.accounting.verify import verify_plan
from jpqbench.base.budget import Budget
from jpqbench.base.config import TrainRecipe
from jpqbench.base.errors import UserError
from jpqbench.base.method_spec import make_method
from jpqbench.blocks.ajpq.env import (
    A_BITS,
    CHANNEL_ACTIONS,
    RATIO,
    W_LEVEL,
    W_SPREAD,
    BudgetWall,
    ChannelBitsQuantizer,
    ChannelControllerEnv,
    LayerControllerEnv,
    PolicySpace,
    apply_policy,
    calibrate_policy,
)
from jpqbench.harness.data import DataBundle, TensorSplit, stratified_subset
from jpqbench.harness.method import RunContext
from jpqbench.models.zoo import digits_cnn, ds_cnn
from jpqbench.nn.channel_pruning import ChannelGroups
from jpqbench.nn.layers import compressible_layers
from jpqbench.pipeline.cli import main

MODELS = {"digits_cnn": (digits_cnn, (1, 8, 8), 10), "ds_cnn": (ds_cnn, (1, 49, 10), 12)}
BITS = (2, 3, 4, 5, 6, 7, 8)


def _model(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    build, shape, classes = MODELS[name]
    torch.manual_seed(0)
    return build(classes, shape).eval(), shape


def _space(model: torch.nn.Module, shape: tuple[int, ...], metric: str = "bops", max_ratio: float = 0.8) -> PolicySpace:
    return PolicySpace(model, shape, ChannelGroups(model, shape), metric, BITS, BITS, max_ratio)


def _walk(env, actions: np.ndarray, options: dict | None = None) -> dict:
    """One episode of ``env`` with one action row per step; every state lies in the observation space."""
    state, _ = env.reset(options=options)
    assert env.observation_space.contains(state)
    for row in actions:
        state, reward, terminated, truncated, info = env.step(row)
        assert env.observation_space.contains(state)
    assert terminated and not truncated
    return info


def _adversarial(shape: tuple[int, int], rng: np.random.Generator) -> list[np.ndarray]:
    """Extremes, out-of-range and NaN actions, and random ones (a hypothesis-style sweep)."""
    fixed = [np.zeros(shape), np.ones(shape), np.full(shape, -3.0), np.full(shape, 7.0), np.full(shape, np.nan)]
    return fixed + [rng.uniform(-0.5, 1.5, shape) for _ in range(2)] + [rng.uniform(0, 1, shape) for _ in range(3)]


@pytest.mark.parametrize("name,metric,target", [("digits_cnn", "bops", 0.01), ("digits_cnn", "bops", 0.05),
                                                ("digits_cnn", "size", 0.1), ("ds_cnn", "bops", 0.03),
                                                ("ds_cnn", "size", 0.2)])
def test_every_policy_leaving_the_environment_is_within_budget(name: str, metric: str, target: float) -> None:
    """Whatever the raw actions of both controllers, the wall (applied after both) ends within budget."""
    model, shape = _model(name)
    space = _space(model, shape, metric)
    layer_env = LayerControllerEnv(space)
    rng = np.random.default_rng(0)
    layer_sweep = _adversarial((len(space.deciders), 1), rng)
    channel_sweep = _adversarial((space.n_layers, len(CHANNEL_ACTIONS)), rng)
    pairs = [(a, b) for a in layer_sweep[:5] for b in channel_sweep[:5]] + list(zip(layer_sweep[5:], channel_sweep[5:]))
    # the most expensive corner: no pruning, the highest bits
    pairs.append((np.zeros((len(space.deciders), 1)), np.ones((space.n_layers, len(CHANNEL_ACTIONS)))))
    costs = {}
    for fill in (False, True):
        wall = BudgetWall(space, lambda plan: count(model, shape, plan).relative(metric), target, fill=fill)
        channel_env = ChannelControllerEnv(space, wall, reward=lambda policy: 0.0)
        for i, (layer_actions, channel_actions) in enumerate(pairs):
            _walk(layer_env, layer_actions)
            episode = _walk(channel_env, channel_actions, {"ratio_actions": layer_env.ratio_actions})["episode"]
            counted = count(model, shape, episode.policy.plan).relative(metric)  # independently, by the harness
            assert counted == episode.relative_cost
            assert counted <= target, (fill, i, counted)
            costs[fill, i] = counted
    # growing an under-budget policy never makes it cheaper, and it spends most of the budget
    assert all(costs[True, i] >= costs[False, i] for i in range(len(pairs)))
    assert min(costs[True, i] for i in range(len(pairs))) > 0.5 * target


def test_unreachable_budget_is_refused_up_front() -> None:
    model, shape = _model("digits_cnn")
    space = _space(model, shape, "size", max_ratio=0.0)
    with pytest.raises(UserError, match="cannot be reached"):
        BudgetWall(space, lambda plan: count(model, shape, plan).relative("size"), 0.01)


def test_channel_controller_acts_after_the_layer_controller_and_sees_its_ratios() -> None:
    """The channel controller's state at a layer holds the pruned fraction the layer controller chose."""
    model, shape = _model("ds_cnn")
    space = _space(model, shape)
    channel_env = ChannelControllerEnv(space, BudgetWall(space, lambda plan: 0.0, 0.05), reward=lambda policy: 0.0)
    with pytest.raises(ValueError, match="ratio_actions"):
        channel_env.reset()
    ratio_actions = np.linspace(0.2, 1.0, len(space.deciders))
    state, _ = channel_env.reset(options={"ratio_actions": ratio_actions})
    pruned_feature = space.static_state.shape[1]
    for i, layer in enumerate(space.layers):
        expected = 0.0
        if layer.group is not None:
            step = next(k for k, j in enumerate(space.deciders) if space.layers[j].group == layer.group)
            expected = round(ratio_actions[step] * space.max_ratio * layer.out_channels) / layer.out_channels
        assert state[pruned_feature] == pytest.approx(expected), layer.name
        state, *_ = channel_env.step(np.full(len(CHANNEL_ACTIONS), 0.5))


def test_channel_widths_follow_importance_and_span_the_choices() -> None:
    model, shape = _model("digits_cnn")
    space = _space(model, shape)
    for level in np.linspace(0, 1, 11):
        for spread in (0.0, 0.5, 1.0):
            widths = space.channel_widths(level, spread, 16)
            assert widths == sorted(widths, reverse=True)
            if spread == 0.0:
                assert len(set(widths)) == 1  # HAQ's one width per layer
    assert set(space.channel_widths(0.0, 1.0, 16)) == {2} and set(space.channel_widths(1.0, 1.0, 16)) == {8}
    assert len(set(space.channel_widths(0.5, 1.0, 16))) == len(BITS)  # per channel, not per layer
    # the most important kept channel gets the most bits, whatever it is called
    policy = space.decode(np.tile([0.5, 0.5, 0.5, 1.0], (space.n_layers, 1)))
    for layer in space.layers:
        bits = policy.plan.layers[layer.name].channel_bits()
        kept = [c for c in layer.order if bits[c]]
        assert bits[kept[0]] == max(bits) and bits[kept[-1]] == min(b for b in bits if b)


@pytest.mark.parametrize("name", ["digits_cnn", "ds_cnn"])
def test_ratio_prunes_round_rC_channels_per_group_and_zero_bit_channels_are_zero(name: str) -> None:
    model, shape = _model(name)
    space = _space(model, shape)
    rng = np.random.default_rng(1)
    actions = rng.uniform(0, 1, (space.n_layers, 4))
    actions[[i for i, layer in enumerate(space.layers) if not layer.decides], RATIO] = 1.0  # ignored: no decision there
    policy = space.decode(actions)
    assert set(policy.plan.layers) == set(CompressionPlan.dense(model).layers)
    deciding = {layer.group: i for i, layer in enumerate(space.layers) if layer.decides}
    assert set(deciding) == {group.root for group in space.groups.groups}
    for i, layer in enumerate(space.layers):
        pruned = policy.plan.layers[layer.name].pruned
        if layer.group is None:  # the classifier
            assert pruned == []
        else:
            ratio = actions[deciding[layer.group], RATIO] * space.max_ratio
            assert len(pruned) == round(ratio * layer.out_channels)
            # every layer of the dependency group loses the same channels: the least important ones
            partners = [other.name for other in space.layers if other.group == layer.group]
            assert all(policy.plan.layers[other].pruned == pruned for other in partners)
            assert set(pruned) == set(layer.order[len(layer.order) - len(pruned):])
        # more important channels (group L2 order) never get fewer bits, one width per kept channel
        bits = policy.plan.layers[layer.name].channel_bits()
        kept_bits = [bits[c] for c in layer.order if bits[c]]
        assert kept_bits == space.channel_widths(actions[i, W_LEVEL], actions[i, W_SPREAD], len(kept_bits))
        assert kept_bits == sorted(kept_bits, reverse=True)
        assert policy.plan.layers[layer.name].a_bits == space.pick(BITS, actions[i, A_BITS])
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


def test_channel_bits_quantizer_grids_and_learns_its_steps() -> None:
    bits = [0, 2, 3, 8, 0, 4]
    weight = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    quantizer = ChannelBitsQuantizer(bits, learn_step=True)
    quantizer.calibrate(weight)
    out = quantizer(weight)
    for c, b in enumerate(bits):
        steps = out[c].detach() / quantizer.step[c].detach()
        if b == 0:
            assert out[c].abs().sum() == 0
        else:  # integers within +-(2^(b-1) - 1), the largest magnitude on the grid's edge
            assert torch.allclose(steps, steps.round(), atol=1e-4)
            assert steps.abs().max().round() == 2 ** (b - 1) - 1
    out.square().sum().backward()
    assert quantizer.step.grad is not None and quantizer.step.grad[[1, 2, 3, 5]].abs().min() > 0
    assert weight.grad[[0, 4]].abs().sum() == 0  # a pruned channel gets no gradient through the quantizer
    with pytest.raises(RuntimeError, match="before calibrate"):
        ChannelBitsQuantizer(bits, learn_step=False).eval()(weight)


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


SMALL = {"episodes": 3, "warmup_episodes": 1, "reward_train_samples": 32, "reward_val_samples": 32,
         "calibration_batches": 2, "reward_calibration_batches": 1}


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
    # the agents' own policy, before the wall, is what the harness reports as searched; the wall's
    # squeeze of it is the result
    assert compressed.searched is not None and set(compressed.searched.layers) == set(compressed.plan.layers)
    ctx.cost(compressed.model, compressed.searched)  # the harness counts it on the compressed model
    assert "outside_paper_regime" not in compressed.plan.notes  # 0.05 of FP32 BOPs: within the lineage's range


def test_same_seed_same_search(tmp_path: Path) -> None:
    results = []
    for run in range(2):
        model, _ = _model("digits_cnn")
        ctx = _context(tmp_path / str(run), _random_bundle())
        best, _ = make_method("ajpq", {"ajpq": {**SMALL, "episodes": 4, "warmup_episodes": 2}}).search(
            model, Budget("bops", 0.05), ctx)
        results.append((best.index, best.reward, best.policy.actions.tolist(), best.policy.plan.to_dict()))
    assert results[0] == results[1]


def test_both_agents_fill_their_replay_buffers_and_train_after_warmup() -> None:
    """Both DDPG agents store every transition with the episode's reward and update their actors
    only from the last warm-up episode on."""
    model, shape = _model("ds_cnn")
    space = _space(model, shape)
    method = make_method("ajpq", {"ajpq": {"episodes": 5, "warmup_episodes": 2, "agent_batch_size": 8}})
    wall = BudgetWall(space, lambda plan: count(model, shape, plan).relative("bops"), 0.05)

    def reward(policy) -> float:  # deterministic and policy dependent: prefers keeping channels
        return -sum(len(claim.pruned) for claim in policy.plan.layers.values()) / 100

    layer, channel = method.controllers(space, wall, reward, seed=0)
    actors = {c: [p.detach().clone() for p in c.agent.actor.parameters()] for c in (layer, channel)}
    steps = {layer: len(space.deciders), channel: space.n_layers}
    assert steps[layer] < steps[channel]  # the layer controller decides per group, the channel controller per layer
    for episode in range(5):
        layer.run_episode()
        result = channel.run_episode(options={"ratio_actions": layer.env.ratio_actions})["episode"]
        assert result.reward == reward(result.policy)
        for controller in (layer, channel):
            controller.end_episode(result.reward)
            buffer = controller.agent.replay_buffer
            assert buffer.size() == (episode + 1) * steps[controller]
            assert np.allclose(buffer.rewards[:buffer.size()][-steps[controller]:], result.reward)
            assert buffer.dones[:buffer.size()].sum() == episode + 1  # one terminal transition per episode
            changed = any(not torch.equal(before, after)
                          for before, after in zip(actors[controller], controller.agent.actor.parameters()))
            assert changed == (episode >= 1), (episode, controller.env)
    assert len(channel.env.episodes) == 5 and channel.env.best.reward == max(e.reward for e in channel.env.episodes)


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
    spec = "ajpq[episodes=4,warmup_episodes=2,reward_train_samples=128,reward_val_samples=128]"
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


# ---- the reward's data and HAQ's exploration ----------------------------------------------------

def _ajpq_module():
    """jpqbench/methods/ajpq.py as loaded by the registry (plugins are loaded by path, not importable by name)."""
    return sys.modules[type(make_method("ajpq")).__module__]


class _IdSplit(TensorSplit):
    """A split whose samples carry a unique id (x 1e-3) in their first pixel; it records the ids it serves."""

    def __init__(self, ids: torch.Tensor, targets: torch.Tensor) -> None:
        inputs = torch.randn(len(ids), 1, 8, 8, generator=torch.Generator().manual_seed(int(ids[0])))
        inputs[:, 0, 0, 0] = ids.float() / 1000
        super().__init__(inputs, targets)
        self.served: list[int] = []

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = super().__getitems__(indices)
        self.served.extend((inputs[:, 0, 0, 0] * 1000).round().long().tolist())
        return inputs, targets


def _class_sorted_bundle() -> DataBundle:
    """10 classes; val (ids 0..119) and train (ids 1000..1199) stored class by class, as ImageNet's val."""
    val = _IdSplit(torch.arange(120), torch.arange(120) // 12)
    train = _IdSplit(torch.arange(1000, 1200), torch.arange(200) // 20)
    return DataBundle("sorted", train, val, _Forbidden(), num_classes=10, input_shape=(1, 8, 8),
                      default_model="digits_cnn")


def test_reward_subset_is_stratified_fixed_and_disjoint_from_its_finetune(tmp_path: Path) -> None:
    """On a class-sorted val split (whose first batches hold classes 0-2 only) the reward reads every
    class, the same samples in the same order in every episode and for every method instance with the
    same seed, and never a sample its fine-tune trains on."""
    params = {"ajpq": {"reward_val_samples": 30, "reward_train_samples": 40, "reward_finetune_epochs": 2,
                       "reward_calibration_batches": 1}}
    model, shape = _model("digits_cnn")
    space = _space(model, shape)
    rng = np.random.default_rng(0)
    policies = [space.decode(rng.uniform(0, 1, (space.n_layers, 4))) for _ in range(3)]
    reads = []
    for instance in range(2):
        data = _class_sorted_bundle()
        reward = make_method("ajpq", params).reward(model, _context(tmp_path / str(instance), data))
        assert data.train.served == []  # the FP32 baseline reads the val subset only
        baseline, data.val.served = data.val.served, []
        episodes = []
        for policy in policies:
            reward(policy)
            episodes.append((data.val.served, data.train.served))
            data.val.served, data.train.served = [], []
        reads.append((baseline, episodes))
        assert all(episode == episodes[0] for episode in episodes)  # every episode: the same samples, same order
        assert baseline == episodes[0][0]
        val_ids, train_ids = episodes[0]
        val_classes = data.val.targets[val_ids]
        assert sorted(val_ids) == sorted(set(val_ids)) and len(val_ids) == 30
        assert torch.bincount(val_classes, minlength=10).tolist() == [3] * 10  # every class, in proportion
        assert val_ids != sorted(val_ids)  # shuffled, not a class-sorted block
        finetuned = set(train_ids)
        assert len(finetuned) == 40 and len(train_ids) == 16 + 2 * 40  # a calibration batch, then two passes
        assert torch.bincount(data.train.targets[[i - 1000 for i in finetuned]], minlength=10).tolist() == [4] * 10
        assert not finetuned & set(val_ids)
    assert reads[0] == reads[1]  # two method instances, one seed: the same subsets


def test_stratified_subset_is_deterministic_proportional_and_covers_every_class() -> None:
    # imbalanced, class-sorted: keywords first, then two small classes (Speech Commands' layout)
    targets = torch.cat([torch.arange(10).repeat_interleave(100), torch.full((12,), 10), torch.full((12,), 11)])
    subset = stratified_subset(targets, 240, seed=3)
    assert subset == stratified_subset(targets, 240, seed=3) != stratified_subset(targets, 240, seed=4)
    counts = torch.bincount(targets[subset], minlength=12)
    share = torch.bincount(targets, minlength=12) / len(targets)
    assert len(set(subset)) == 240 and counts.min() >= 1
    assert (counts - 240 * share).abs().max() < 1.5  # in proportion, up to rounding and the one-per-class floor
    assert subset != sorted(subset)  # shuffled
    assert sorted(stratified_subset(targets, 10_000, seed=0)) == list(range(len(targets)))  # larger: the whole split


def test_defaults_are_haqs() -> None:
    hp = make_method("ajpq").hp
    assert (hp.episodes, hp.warmup_episodes, hp.noise, hp.noise_decay) == (600, 20, 0.5, 0.99)
    assert (hp.reward_val_samples, hp.reward_train_samples, hp.reward_finetune_epochs) == (10_000, 20_000, 1)
    assert (hp.reward_calibration_batches, hp.hidden, hp.tau, hp.agent_batch_size) == (1, (300, 300), 0.01, 64)


def test_exploration_follows_haqs_schedule_and_stays_inside_the_bounds() -> None:
    """Random warm-up, then std 0.5 * 0.99**k in the k-th episode after it (HAQ's defaults); every
    exploring action lies in [0, 1] and none sits on a bound (truncated, not clipped)."""
    model, shape = _model("digits_cnn")
    space = _space(model, shape)
    method = make_method("ajpq", {"ajpq": {"episodes": 30, "hidden": (16,), "agent_batch_size": 8}})
    wall = BudgetWall(space, lambda plan: 0.0, 0.05, fill=False)  # every policy passes: the raw actions stay
    layer, channel = method.controllers(space, wall, lambda policy: 0.0, seed=0)
    for episode in range(24):
        expected = 0.0 if episode < 20 else 0.5 * 0.99 ** (episode - 20)
        layer.run_episode()
        channel.run_episode(options={"ratio_actions": layer.env.ratio_actions})
        for controller in (layer, channel):
            assert controller.noise.sigma == pytest.approx(expected, rel=1e-12)
            actions = np.stack([action for _, action, _, _ in controller._trajectory])
            assert ((actions > 0) & (actions < 1)).all()
            controller.end_episode(0.0)
    # around actions at and near the bounds: truncated-normal draws, none piled onto a bound
    noise = _ajpq_module().TruncatedNormalNoise(0.5, 0.99, warmup_episodes=0, seed=0)
    means = np.array([0.0, 0.02, 0.5, 0.98, 1.0])
    draws = np.stack([noise(means) for _ in range(4000)])
    assert ((draws > 0) & (draws < 1)).all()
    a, b = -means / 0.5, (1 - means) / 0.5
    assert np.allclose(draws.mean(0), truncnorm.mean(a, b, loc=means, scale=0.5), atol=0.02)
    assert np.allclose(draws.std(0), truncnorm.std(a, b, loc=means, scale=0.5), atol=0.02)


def test_searched_is_the_policy_before_the_wall() -> None:
    """An episode's ``searched`` policy decodes the agents' raw actions; squeezing it by the episode's
    squeeze gives the policy that left the wall."""
    model, shape = _model("digits_cnn")
    space = _space(model, shape)
    wall = BudgetWall(space, lambda plan: count(model, shape, plan).relative("bops"), 0.02)
    layer_env, channel_env = LayerControllerEnv(space), ChannelControllerEnv(space, wall, reward=lambda policy: 0.0)
    rng = np.random.default_rng(0)
    squeezes = set()
    for _ in range(4):
        layer_actions = rng.uniform(0, 1, (len(space.deciders), 1))
        channel_actions = rng.uniform(0, 1, (space.n_layers, len(CHANNEL_ACTIONS)))
        _walk(layer_env, layer_actions)
        episode = _walk(channel_env, channel_actions, {"ratio_actions": layer_env.ratio_actions})["episode"]
        raw = space.joint(layer_actions, channel_actions)
        assert episode.searched.plan.to_dict() == space.decode(raw).plan.to_dict()
        assert space.decode(space.squeeze(episode.searched.actions, episode.squeeze)).plan.to_dict() == \
            episode.policy.plan.to_dict()
        squeezes.add(episode.squeeze != 0)
    assert True in squeezes  # the wall moved at least one of them


def test_budgets_below_the_papers_lineage_are_flagged(tmp_path: Path) -> None:
    compressed = make_method("ajpq", {"ajpq": SMALL}).compress(_model("digits_cnn")[0], Budget("bops", 0.01),
                                                                _context(tmp_path, _random_bundle()))
    assert "0.01" in compressed.plan.notes["outside_paper_regime"]
