"""AJPQ: automated joint pruning and quantization with reinforcement learning (Tang, Wei & Li, arXiv 2011.06231)."""
from __future__ import annotations

import copy
import time
from itertools import islice
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from scipy.stats import truncnorm
from stable_baselines3 import DDPG
from stable_baselines3.common.logger import Logger
from torch import nn

from jpqbench import (
    Budget,
    ChannelGroups,
    Compressed,
    Method,
    RunContext,
    default_param_groups,
    plan_from_model,
    register_method,
    split_targets,
    stratified_subset,
)
from jpqbench.blocks.ajpq.env import (
    BudgetWall,
    ChannelControllerEnv,
    Episode,
    LayerControllerEnv,
    Policy,
    PolicySpace,
    apply_policy,
    calibrate_policy,
)

# AJPQ reports ~5x smaller models and ~2x less computation; its HAQ lineage went no lower than
# about 4-bit weights and activations, i.e. 4 * 4 / (32 * 32) = 1/64 of FP32 BOPs
PAPER_LOWEST_RELATIVE_BOPS = 1 / 64


class TruncatedNormalNoise:
    """HAQ's exploration (mit-han-lab/haq, ``DDPG.select_action``): none during the random warm-up,
    then the actor's action is the mean of a normal distribution *truncated* to the action
    bounds [0, 1], with std ``sigma * decay**k`` in the ``k``-th episode after the warm-up.

    Truncation, not clipping: a clipped Gaussian around an action near a bound sends up to half
    its samples onto the bound itself (one bit width, or no pruning at all), while a truncated
    one keeps every sample inside [0, 1] spread like the Gaussian it cuts.
    """

    def __init__(self, sigma: float, decay: float, warmup_episodes: int, seed: int) -> None:
        self.initial_sigma = sigma
        self.decay = decay
        self.warmup_episodes = warmup_episodes
        self.episode = 0
        self._rng = np.random.default_rng(seed)

    @property
    def sigma(self) -> float:
        """The std in [0, 1] action units for the current episode (0 during the warm-up)."""
        if self.episode < self.warmup_episodes:
            return 0.0
        return self.initial_sigma * self.decay ** (self.episode - self.warmup_episodes)

    def __call__(self, mean: np.ndarray) -> np.ndarray:
        """One exploring action around the actor's ``mean`` (in [0, 1])."""
        mean = np.clip(np.asarray(mean, dtype=np.float64), 0.0, 1.0)
        sigma = self.sigma
        if sigma == 0.0:  # the warm-up, or a std that underflowed after very many episodes
            return mean.astype(np.float32)
        sample = truncnorm.rvs(-mean / sigma, (1.0 - mean) / sigma, loc=mean, scale=sigma, random_state=self._rng)
        return np.clip(sample, 0.0, 1.0).astype(np.float32)  # float rounding only: the draw lies within [0, 1]

    def reset(self) -> None:
        """Called at the end of every episode."""
        self.episode += 1


class Controller:
    """One controller: a stable-baselines3 DDPG agent on its own gymnasium environment, episode by episode.

    sb3's ``learn()`` owns the loop of a single agent whose environment returns the reward at
    its own step; here the layer controller's episode ends before the reward exists (the
    channel controller acts next). So the search runs the episode loop (HAQ's) and every
    piece of RL is sb3's: the actor (``predict``), the action scaling, the replay buffer and the
    DDPG update (``train``). Warm-up episodes take uniformly random actions; afterwards the
    actor's action explored by :class:`TruncatedNormalNoise` (HAQ's, not sb3's). At the
    end of an episode every transition is stored with the episode's reward (HAQ) and, from the
    last warm-up episode on, the agent takes one gradient step per transition (HAQ's
    ``n_update`` = 1), so the first exploiting episode already uses a trained actor.
    """

    def __init__(self, env: LayerControllerEnv | ChannelControllerEnv, hp: "AJPQ.Hparams", steps: int,
                 seed: int) -> None:
        self.env = env
        self.warmup_episodes = hp.warmup_episodes
        self.agent = DDPG("MlpPolicy", env, learning_rate=hp.agent_lr, buffer_size=hp.episodes * steps,
                          batch_size=hp.agent_batch_size, tau=hp.tau, gamma=hp.gamma,
                          policy_kwargs={"net_arch": list(hp.hidden)}, seed=seed, device="cpu", verbose=0)
        self.agent.set_logger(Logger(folder=None, output_formats=[]))
        self.noise = TruncatedNormalNoise(hp.noise, hp.noise_decay, hp.warmup_episodes, seed)
        self.episode = 0
        self._trajectory: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = []

    def act(self, observation: np.ndarray) -> np.ndarray:
        if self.episode < self.warmup_episodes:
            return self.agent.action_space.sample()
        action, _ = self.agent.predict(observation, deterministic=True)
        return self.noise(action)

    def run_episode(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Walk the environment once; the info of its last step."""
        observation, _ = self.env.reset(options=options)
        done, info = False, {}
        while not done:
            action = self.act(observation)
            following, _, done, _, info = self.env.step(action)
            self._trajectory.append((observation, action, following, done))
            observation = following
        return info

    def end_episode(self, reward: float) -> None:
        policy, buffer = self.agent.policy, self.agent.replay_buffer
        for observation, action, following, done in self._trajectory:
            buffer.add(observation[None], following[None], policy.scale_action(action)[None], np.array([reward]),
                       np.array([done]), [{}])
        if self.episode >= self.warmup_episodes - 1:
            self.agent.train(gradient_steps=len(self._trajectory), batch_size=self.agent.batch_size)
        self._trajectory = []
        self.episode += 1
        self.noise.reset()


class HeldOutReward:
    """The episode reward (HAQ's ``acc - org_acc``): top-1 on a fixed subset of the held-out split
    ("val", carved from the training data or, for Speech Commands, its official validation
    speakers; never the test split) after min/max calibration and a short fine-tune on a fixed
    subset of the training split, minus the FP32 model's top-1 on the same subset.

    HAQ (mit-han-lab/haq, ``get_split_train_dataset``) draws 10,000 held-out and 20,000 training
    images once and uses them for every episode. Here both subsets are drawn once per run (from
    the run's seed) by :func:`jpqbench.harness.data.stratified_subset`: class-stratified and shuffled,
    because a split may be stored class by class and its first batches would reward a policy
    for a few classes only; fixed, so that every episode is compared on the same samples. Sizes
    are in samples, so they mean the same at every batch size; a subset larger than its split is
    the whole split. The fine-tune runs ``finetune_epochs`` passes over the training subset
    (augmented as in training), each in its own seeded order (the same orders in every
    episode), and calibration reads the first batches of the first pass (HAQ calibrates on one
    batch of its training subset). The two subsets come from different splits, so they never
    share a sample.
    """

    def __init__(self, model: nn.Module, ctx: RunContext, val_samples: int, train_samples: int,
                 finetune_epochs: int, calibration_batches: int) -> None:
        self.model = model
        self.ctx = ctx
        self.calibration_batches = calibration_batches
        self.val_indices = stratified_subset(split_targets(ctx.data.val), val_samples, ctx.seed)
        train_indices = stratified_subset(split_targets(ctx.data.train), train_samples, ctx.seed)
        self.epoch_orders = [np.random.default_rng([ctx.seed, epoch]).permutation(train_indices).tolist()
                             for epoch in range(max(finetune_epochs, 1))]
        self.finetune_epochs = finetune_epochs
        self.evaluations = 0
        self.baseline = self._top1(copy.deepcopy(model))

    @property
    def train_indices(self) -> list[int]:
        """The training subset, in the order of its first pass."""
        return self.epoch_orders[0]

    def _batches(self, split: str, order: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # unshuffled: the order is fixed here, and a shuffled loader would be sharded under torchrun
        return iter(self.ctx.data.loader(split, self.ctx.recipe.batch_size, indices=order))

    @torch.no_grad()
    def _top1(self, model: nn.Module) -> float:
        self.evaluations += 1
        model.eval()
        correct = 0
        for inputs, targets in self._batches("val", self.val_indices):
            correct += (model(inputs).argmax(1) == targets).sum().item()
        return correct / len(self.val_indices)

    def _finetune(self, model: nn.Module) -> None:
        recipe = self.ctx.recipe
        groups = default_param_groups(model, recipe.weight_decay)
        optimizer = (torch.optim.SGD(groups, lr=recipe.finetune_lr, momentum=recipe.momentum)
                     if recipe.optimizer == "sgd" else torch.optim.Adam(groups, lr=recipe.finetune_lr))
        model.train()
        for order in self.epoch_orders[:self.finetune_epochs]:
            for inputs, targets in self._batches("train", order):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(inputs), targets).backward()
                optimizer.step()

    def __call__(self, policy: Policy) -> float:
        model = copy.deepcopy(self.model)
        apply_policy(model, policy, learn_step=True)
        batches = islice(self._batches("train", self.train_indices), self.calibration_batches)
        calibrate_policy(model, (inputs for inputs, _ in batches))
        self._finetune(model)
        return self._top1(model) - self.baseline


@register_method("ajpq")
class AJPQ(Method):
    """AJPQ (Tang, Wei & Li, arXiv 2011.06231): pruning as 0-bit channels, searched by two DDPG controllers.

    Pruning is 0-bit channel-wise quantization, so one search by a hierarchy of two DDPG
    controllers yields one mixed-precision policy.

    Two stable-baselines3 DDPG agents, each on its own gymnasium environment
    (jpqbench/blocks/ajpq/env.py): the **layer controller** walks the dependency groups and picks each
    group's pruning ratio (its ``round(r * C)`` least important channels by group L2
    magnitude become 0-bit channels); then the **channel controller** walks every conv/linear
    layer with those ratios in its state and picks the layer's input bit width and the weight
    bit width of every kept output channel, through a level and a spread over the channels
    ranked by the same importance (more important channels never get fewer bits). The budget
    wall then squeezes both controllers' actions together until the harness's counter accepts
    the policy (and, with ``fill_budget``, grows an under-budget one until it spends the
    budget), so every episode -- and the result -- is within the budget. Both controllers
    receive the episode's reward (:class:`HeldOutReward`): top-1 on a fixed, class-stratified
    subset of ``reward_val_samples`` held-out samples ("val", never the test split) after
    min/max calibration and ``reward_finetune_epochs`` passes over a fixed subset of
    ``reward_train_samples`` training samples, minus the FP32 top-1 on the same subset. The
    best policy found is applied to the FP32 model and fine-tuned (LSQ steps, masks fixed) for
    all of the run's epochs; the search itself is search cost (``search_time_s``), logged per
    episode under ``search/`` in MLflow (reward, counted cost, squeeze, noise, best policy per
    layer) and in total (episodes, evaluations, wall time, reward subset sizes). The best
    episode's policy *before* the wall is returned as ``Compressed.searched``: the wall
    decides every episode's cost, and the harness reports what the agents asked for next to it.

    The paper states the hierarchy (layer controller: layer sparsity; channel controller: a
    bit width per kernel; one importance criterion) and RL in the HAQ/AMC/AutoQ lineage; it
    has no code, so every detail below is ours and a hyperparameter where it can be:

    * order: the layer controller walks the whole network first, then the channel
      controller (the paper does not say whether they alternate per layer); the channel
      controller therefore sees every layer's pruned size, the layer controller no bits;
    * the channel controller's action is per layer (``[a_bits, w_level, w_spread]``) and is
      turned into one width per output channel by importance rank -- an action per kernel
      (AutoQ's low-level controller) would make an episode hundreds of steps long;
    * importance: torch-pruning's group L2 magnitude, computed once on the FP32 model;
    * states are HAQ/AMC's: the layer's features (index, type, shape, stride, kernel area,
      #weights, input H*W) min-max normalised over the layers, then the shares of the dense
      cost removed so far and still to come and the previous action (jpqbench/blocks/ajpq/env.py);
    * the episode loop is ours around sb3's actor, replay buffer and DDPG update
      (:class:`Controller`), because sb3's ``learn()`` cannot hand one reward to two agents;
    * ratios in [0, ``max_ratio``] (AMC's 0.8); HAQ's action-to-bit mapping over
      ``w_bit_choices`` / ``a_bit_choices`` (2..8); weights symmetric per channel, inputs
      asymmetric per tensor;
    * the wall acts once, after both controllers, squeezing all actions together by bisection
      (HAQ lowers bits layer by layer, AMC clips each ratio as it goes); ``fill_budget`` also
      grows under-budget policies (HAQ and AMC only lower);
    * transitions store the agents' raw actions (HAQ/AMC), each with the episode reward and
      ``gamma`` = 1 (HAQ's discount); the reward is ``acc - acc_fp32`` (HAQ scales it by 0.1
      and subtracts a moving average in the critic update; sb3's update has no baseline);
    * sb3 has one learning rate for actor and critic (HAQ: 1e-4 and 1e-3); exploration is
      HAQ's truncated normal whose std decays per episode after the warm-up
      (:class:`TruncatedNormalNoise`; HAQ's ``episode <= warmup`` makes 21 warm-up episodes and
      its first exploring one starts one decay step down);
      the two agents are seeded ``seed`` and ``seed + 1``;
    * the reward's subsets are class-stratified and drawn from the run's seed (HAQ: a random
      split with a fixed seed), the fine-tune uses the run's recipe (optimizer, ``finetune_lr``,
      weight decay; HAQ: SGD lr 1e-3, momentum 0.9);
    * the best policy is the episode with the highest reward (the first on ties), kept fixed
      while fine-tuning.

    The defaults are HAQ's (mit-han-lab/haq ``rl_quantize.py`` and ``run/run_search.sh``): 600
    episodes, the first 20 random, noise 0.5 decaying x0.99 per episode, 10,000 held-out and
    20,000 training samples, one fine-tune epoch, one calibration batch, hidden (300, 300),
    tau 0.01, agent batch 64. A smoke-scale grid (config/config.yaml) turns them down.

    Operating points: the paper reports about 5x smaller models and 2x less computation, and
    its HAQ lineage went no lower than about 4-bit weights and activations (1/64 of FP32 BOPs);
    a BOPs budget below that is flagged ``outside_paper_regime``.
    """

    test_hparams = {"episodes": 2, "warmup_episodes": 1, "calibration_batches": 1, "reward_calibration_batches": 1,
                   "reward_train_samples": 4, "reward_val_samples": 4, "agent_batch_size": 4, "hidden": (16,)}

    class Hparams(Method.Hparams):
        episodes: int = Field(600, ge=1, description="search episodes, warm-up included (HAQ: 600)")
        warmup_episodes: int = Field(20, ge=0, description="episodes of uniformly random actions before DDPG acts "
                                                           "(HAQ: 20)")
        noise: float = Field(0.5, gt=0, le=1, description="std of the truncated-normal exploration in the first "
                                                          "episode after the warm-up, in [0, 1] action units "
                                                          "(HAQ: 0.5)")
        noise_decay: float = Field(0.99, gt=0, le=1, description="multiplier of the exploration std per episode after "
                                                                 "the warm-up (HAQ: 0.99)")
        w_bit_choices: tuple[int, ...] = Field((2, 3, 4, 5, 6, 7, 8), min_length=1,
                                               description="weight bit widths a kept channel may get (bits)")
        a_bit_choices: tuple[int, ...] = Field((2, 3, 4, 5, 6, 7, 8), min_length=1,
                                               description="input (activation) bit widths a layer may get (bits)")
        max_ratio: float = Field(0.8, ge=0, lt=1, description="largest pruning ratio of a dependency group "
                                                              "(fraction of its channels; AMC: 0.8)")
        fill_budget: bool = Field(True, description="the wall also grows under-budget policies up to the budget")
        calibration_batches: int = Field(8, ge=1, description="training batches calibrating the final model")
        reward_calibration_batches: int = Field(1, ge=1, description="batches of the reward's training subset "
                                                                     "calibrating each reward's model (HAQ: 1)")
        reward_val_samples: int = Field(10_000, ge=1, description="held-out (val) samples each reward is measured on, "
                                                                  "class-stratified, the same every episode; the "
                                                                  "whole val split when it is smaller (HAQ: 10,000)")
        reward_train_samples: int = Field(20_000, ge=1, description="training samples of the reward's fine-tune "
                                                                    "subset, class-stratified, the same every episode; "
                                                                    "the whole train split when it is smaller "
                                                                    "(HAQ: 20,000)")
        reward_finetune_epochs: int = Field(1, ge=0, description="passes over the reward's training subset before "
                                                                 "each reward (epochs; 0: no fine-tune; HAQ: 1)")
        agent_lr: float = Field(1e-3, gt=0, description="actor and critic learning rate of both agents "
                                                        "(HAQ: critic 1e-3, actor 1e-4)")
        agent_batch_size: int = Field(64, ge=1, description="transitions per DDPG update (HAQ: 64)")
        tau: float = Field(0.01, gt=0, le=1, description="soft update rate of the target networks (HAQ: 0.01)")
        gamma: float = Field(1.0, gt=0, le=1, description="discount per step (HAQ: 1)")
        hidden: tuple[int, ...] = Field((300, 300), min_length=1, description="actor and critic hidden layers "
                                                                              "(units; HAQ: 300, 300)")

        @field_validator("w_bit_choices", "a_bit_choices")
        @classmethod
        def _bits_in_range(cls, choices: tuple[int, ...]) -> tuple[int, ...]:
            if any(not 2 <= b <= 16 for b in choices):
                raise ValueError(f"bit choices must lie in [2, 16] (0 bits is pruning), got {list(choices)}")
            return tuple(sorted(set(choices)))

        @model_validator(mode="after")
        def _warmup_before_end(self) -> "AJPQ.Hparams":
            if self.warmup_episodes >= self.episodes:
                raise ValueError(f"warmup_episodes ({self.warmup_episodes}) must be below episodes ({self.episodes}), "
                                 "or the agents never act")
            return self

    @classmethod
    def search_images(cls, hparams: "AJPQ.Hparams", train_samples: int, val_samples: int) -> tuple[int, int]:
        """The search's rewards (:class:`HeldOutReward`): every episode fine-tunes on the training
        subset ``reward_finetune_epochs`` times and evaluates the held-out subset once, and the
        FP32 baseline evaluates it once more; each subset is at most its split. The reward's
        calibration batches (one per episode by default) are left out."""
        trained = min(hparams.reward_train_samples, train_samples) * hparams.reward_finetune_epochs
        evaluated = min(hparams.reward_val_samples, val_samples)
        return hparams.episodes * trained, (hparams.episodes + 1) * evaluated

    def controllers(self, space: PolicySpace, wall: BudgetWall, reward: Callable[[Policy], float], seed: int,
                    on_episode: Callable[[Episode, Episode], None] | None = None) -> tuple[Controller, Controller]:
        """The layer and the channel controller, each with its own environment and DDPG agent."""
        layer = Controller(LayerControllerEnv(space), self.hp, len(space.deciders), seed)
        channel = Controller(ChannelControllerEnv(space, wall, reward, on_episode), self.hp, space.n_layers, seed + 1)
        return layer, channel

    def reward(self, model: nn.Module, ctx: RunContext) -> HeldOutReward:
        """The episode reward of a search on the FP32 ``model``, with this method's subset sizes."""
        hp = self.hp
        return HeldOutReward(model, ctx, hp.reward_val_samples, hp.reward_train_samples, hp.reward_finetune_epochs,
                             hp.reward_calibration_batches)

    def search(self, model: nn.Module, budget: Budget, ctx: RunContext) -> tuple[Episode, dict[str, float]]:
        """Run the hierarchical DDPG search on the FP32 ``model`` (left unchanged); the best episode and the search cost."""
        start = time.perf_counter()
        hp = self.hp
        space = PolicySpace(model, ctx.input_shape, ChannelGroups(model, ctx.input_shape), budget.metric,
                            hp.w_bit_choices, hp.a_bit_choices, hp.max_ratio)
        wall = BudgetWall(space, lambda plan: ctx.cost(model, plan).relative(budget.metric), budget.target,
                          fill=hp.fill_budget)
        reward = self.reward(model, ctx)

        def log(episode: Episode, best: Episode) -> None:
            metrics = {"search/reward": episode.reward, "search/val_top1": episode.reward + reward.baseline,
                       "search/relative_cost": episode.relative_cost, "search/squeeze": episode.squeeze,
                       "search/best_reward": best.reward, "search/layer_noise_sigma": layer.noise.sigma,
                       "search/channel_noise_sigma": channel.noise.sigma}
            for name, claim in best.policy.plan.layers.items():
                kept = [b for b in claim.channel_bits() if b]
                metrics[f"search/best/{name}/pruned_fraction"] = len(claim.pruned) / claim.out_channels
                metrics[f"search/best/{name}/w_bits"] = sum(kept) / len(kept)
                metrics[f"search/best/{name}/a_bits"] = claim.a_bits
            ctx.log_metrics(metrics, episode.index)

        layer, channel = self.controllers(space, wall, reward, ctx.seed, on_episode=log)
        for _ in range(hp.episodes):
            layer.run_episode()
            episode = channel.run_episode(options={"ratio_actions": layer.env.ratio_actions})["episode"]
            layer.end_episode(episode.reward)
            channel.end_episode(episode.reward)
        cost = {"search/episodes": len(channel.env.episodes), "search/evaluations": reward.evaluations,
                "search/cost_counts": wall.counts, "search/wall_s": time.perf_counter() - start,
                "search/reward_val_samples": len(reward.val_indices),
                "search/reward_train_samples": len(reward.train_indices)}
        ctx.log_metrics(cost, len(channel.env.episodes))
        return channel.env.best, cost

    def compress(self, model: nn.Module, budget: Budget, ctx: RunContext) -> Compressed:
        with ctx.search_timer():
            best, cost = self.search(model, budget, ctx)
        apply_policy(model, best.policy, learn_step=True)
        calibrate_policy(model, ctx.calibration_batches(self.hp.calibration_batches))
        ctx.train(model, ctx.epochs, phase="finetune")
        notes = {"best_episode": best.index, "best_reward": best.reward, "squeeze": best.squeeze,
                 "ratios": best.policy.ratios, **{key.removeprefix("search/"): value for key, value in cost.items()}}
        if budget.metric == "bops" and budget.target < PAPER_LOWEST_RELATIVE_BOPS:
            notes["outside_paper_regime"] = (
                f"AJPQ reports about 5x smaller models and 2x less computation, and its HAQ lineage went no lower "
                f"than about 4-bit weights and activations ({PAPER_LOWEST_RELATIVE_BOPS:.4f} of FP32 BOPs), far above "
                f"{budget.target:g}")
        return Compressed(model, plan_from_model(model, self.name, notes), searched=best.searched.plan)
