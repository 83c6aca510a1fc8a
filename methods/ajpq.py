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
from stable_baselines3 import DDPG
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.noise import ActionNoise
from torch import nn

from jpqbench.ajpq_env import (BudgetWall, ChannelControllerEnv, Episode, LayerControllerEnv, Policy, PolicySpace,
                               apply_policy, calibrate_policy)
from jpqbench.methods_api import Budget, Compressed, Method, RunContext
from jpqbench.plan import plan_from_model
from jpqbench.prune import ChannelGroups
from jpqbench.registry import register_method
from jpqbench.train import default_param_groups


class DecayingNoise(ActionNoise):
    """HAQ's exploration: none during the random warm-up, then Gaussian noise whose std decays per episode."""

    def __init__(self, action_dim: int, sigma: float, decay: float, warmup_episodes: int, seed: int) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.initial_sigma = sigma
        self.decay = decay
        self.warmup_episodes = warmup_episodes
        self.episode = 0
        self._rng = np.random.default_rng(seed)

    @property
    def sigma(self) -> float:
        if self.episode < self.warmup_episodes:
            return 0.0
        return self.initial_sigma * self.decay ** (self.episode - self.warmup_episodes)

    def __call__(self) -> np.ndarray:
        # added to the action scaled to [-1, 1] (as sb3 does): twice its size in [0, 1] action units
        return (2.0 * self.sigma * self._rng.standard_normal(self.action_dim)).astype(np.float32)

    def reset(self) -> None:  # called at the end of every episode
        self.episode += 1


class Controller:
    """One controller: a stable-baselines3 DDPG agent on its own gymnasium environment, episode by episode.

    sb3's ``learn()`` owns the loop of a single agent whose environment returns the reward at
    its own step; here the layer controller's episode ends before the reward exists (the
    channel controller acts next). So the search runs the episode loop (HAQ's) and every
    piece of RL is sb3's: the actor (``predict``), the action scaling, the replay buffer and the
    DDPG update (``train``). Warm-up episodes take uniformly random actions; afterwards the
    actor's action plus :class:`DecayingNoise`, clipped (sb3's exploration for DDPG). At the
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
        self.noise = DecayingNoise(env.action_space.shape[0], hp.noise, hp.noise_decay, hp.warmup_episodes, seed)
        self.episode = 0
        self._trajectory: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = []

    def act(self, observation: np.ndarray) -> np.ndarray:
        if self.episode < self.warmup_episodes:
            return self.agent.action_space.sample()
        action, _ = self.agent.predict(observation, deterministic=True)
        policy = self.agent.policy
        return policy.unscale_action(np.clip(policy.scale_action(action) + self.noise(), -1.0, 1.0))

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


class _HeldOutReward:
    """The episode reward: top-1 on held-out *training* data ("val") after calibration and a short
    fine-tune, minus the FP32 model's top-1 on the same batches (HAQ's ``acc - org_acc``)."""

    def __init__(self, model: nn.Module, ctx: RunContext, calibration_batches: int, finetune_steps: int,
                 eval_batches: int) -> None:
        self.model = model
        self.ctx = ctx
        self.calibration_batches = calibration_batches
        self.finetune_steps = finetune_steps
        self.eval_batches = eval_batches
        self.evaluations = 0
        self.baseline = self._top1(copy.deepcopy(model))

    def _train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same ``finetune_steps`` training batches for every episode (a fair comparison)."""
        generator = torch.Generator().manual_seed(self.ctx.seed)
        steps = 0
        while steps < self.finetune_steps:
            for batch in self.ctx.data.loader("train", self.ctx.recipe.batch_size, shuffle=True, generator=generator):
                if steps == self.finetune_steps:
                    return
                steps += 1
                yield batch

    @torch.no_grad()
    def _top1(self, model: nn.Module) -> float:
        self.evaluations += 1
        model.eval()
        correct = total = 0
        for inputs, targets in islice(self.ctx.data.loader("val", self.ctx.recipe.batch_size), self.eval_batches):
            correct += (model(inputs).argmax(1) == targets).sum().item()
            total += len(targets)
        return correct / total

    def _finetune(self, model: nn.Module) -> None:
        recipe = self.ctx.recipe
        groups = default_param_groups(model, recipe.weight_decay)
        optimizer = (torch.optim.SGD(groups, lr=recipe.finetune_lr, momentum=recipe.momentum)
                     if recipe.optimizer == "sgd" else torch.optim.Adam(groups, lr=recipe.finetune_lr))
        model.train()
        for inputs, targets in self._train_batches():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()

    def __call__(self, policy: Policy) -> float:
        model = copy.deepcopy(self.model)
        apply_policy(model, policy, learn_step=True)
        calibrate_policy(model, self.ctx.calibration_batches(self.calibration_batches))
        self._finetune(model)
        return self._top1(model) - self.baseline


@register_method("ajpq")
class AJPQ(Method):
    """AJPQ (Tang, Wei & Li, arXiv 2011.06231): pruning as 0-bit channel-wise quantization, one mixed-precision
    search by a hierarchy of two DDPG controllers.

    Two stable-baselines3 DDPG agents, each on its own gymnasium environment
    (jpqbench/ajpq_env.py): the **layer controller** walks the dependency groups and picks each
    group's pruning ratio (its ``round(r * C)`` least important channels by group L2
    magnitude become 0-bit channels); then the **channel controller** walks every conv/linear
    layer with those ratios in its state and picks the layer's input bit width and the weight
    bit width of every kept output channel, through a level and a spread over the channels
    ranked by the same importance (more important channels never get fewer bits). The budget
    wall then squeezes both controllers' actions together until the harness's counter accepts
    the policy (and, with ``fill_budget``, grows an under-budget one until it spends the
    budget), so every episode -- and the result -- is within the budget. Both controllers
    receive the episode's reward: top-1 on the held-out part of the training set ("val")
    after min/max calibration and ``reward_finetune_steps`` SGD steps, minus the FP32 top-1 on
    the same batches. The best policy found is applied to the FP32 model and fine-tuned (LSQ
    steps, masks fixed) for all of the run's epochs; the search itself is search cost
    (``search_time_s``), logged per episode under ``search/`` in MLflow (reward, counted cost,
    squeeze, noise, best policy per layer) and in total (episodes, evaluations, wall time).

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
    * ratios in [0, ``max_ratio``] (AMC's 0.8); HAQ's action-to-bit mapping over
      ``w_bit_choices`` / ``a_bit_choices`` (2..8); weights symmetric per channel, inputs
      asymmetric per tensor;
    * the wall acts once, after both controllers, squeezing all actions together by bisection
      (HAQ lowers bits layer by layer, AMC clips each ratio as it goes); ``fill_budget`` also
      grows under-budget policies (HAQ and AMC only lower);
    * transitions store the agents' raw actions (HAQ/AMC), each with the episode reward and
      ``gamma`` = 1 (HAQ's discount); the reward is ``acc - acc_fp32`` (HAQ scales it by 0.1
      and subtracts a moving average in the critic update; sb3's update has no baseline);
    * sb3 has one learning rate for actor and critic (HAQ: 1e-4 and 1e-3); exploration noise
      is a clipped Gaussian whose std decays per episode (HAQ: truncated normal); the two
      agents are seeded ``seed`` and ``seed + 1``;
    * the best policy is the episode with the highest reward (the first on ties), kept fixed
      while fine-tuning.

    Defaults keep the search to seconds (digits) or tens of seconds (minispeech) on 2 CPU cores.
    Paper-scale values (HAQ's mit-han-lab/haq defaults): episodes 600, warmup_episodes 20,
    noise 0.5, noise_decay 0.99, hidden (300, 300), tau 0.01, agent_batch_size 64, the reward
    after one fine-tuning epoch on 20,000 training images (reward_finetune_steps ~ 80 at batch
    256) evaluated on 10,000 held-out ones (eval_batches ~ 40).
    """

    class Hparams(Method.Hparams):
        episodes: int = Field(20, ge=1, description="search episodes, warm-up included")
        warmup_episodes: int = Field(6, ge=0, description="episodes of uniformly random actions before DDPG acts")
        noise: float = Field(0.5, gt=0, le=1, description="std of the exploration noise after warm-up, in [0, 1] action units")
        noise_decay: float = Field(0.9, gt=0, le=1, description="noise std multiplier per episode after warm-up")
        w_bit_choices: tuple[int, ...] = Field((2, 3, 4, 5, 6, 7, 8), min_length=1)
        a_bit_choices: tuple[int, ...] = Field((2, 3, 4, 5, 6, 7, 8), min_length=1)
        max_ratio: float = Field(0.8, ge=0, lt=1, description="largest pruning ratio of a dependency group")
        fill_budget: bool = Field(True, description="the wall also grows under-budget policies up to the budget")
        calibration_batches: int = Field(8, ge=1, description="training batches calibrating the final model")
        reward_calibration_batches: int = Field(2, ge=1, description="training batches calibrating each reward's model")
        reward_finetune_steps: int = Field(2, ge=0, description="SGD steps on training batches before each reward")
        eval_batches: int = Field(3, ge=1, description="held-out (val) batches per reward")
        agent_lr: float = Field(1e-3, gt=0, description="actor and critic learning rate of both agents")
        agent_batch_size: int = Field(64, ge=1)
        tau: float = Field(0.01, gt=0, le=1)
        gamma: float = Field(1.0, gt=0, le=1)
        hidden: tuple[int, ...] = Field((300, 300), min_length=1, description="actor and critic hidden layers (HAQ)")

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

    def controllers(self, space: PolicySpace, wall: BudgetWall, reward: Callable[[Policy], float], seed: int,
                    on_episode: Callable[[Episode, Episode], None] | None = None) -> tuple[Controller, Controller]:
        """The layer and the channel controller, each with its own environment and DDPG agent."""
        layer = Controller(LayerControllerEnv(space), self.hp, len(space.deciders), seed)
        channel = Controller(ChannelControllerEnv(space, wall, reward, on_episode), self.hp, space.n_layers, seed + 1)
        return layer, channel

    def search(self, model: nn.Module, budget: Budget, ctx: RunContext) -> tuple[Episode, dict[str, float]]:
        """Run the hierarchical DDPG search on the FP32 ``model`` (left unchanged); the best episode and the search cost."""
        start = time.perf_counter()
        hp = self.hp
        space = PolicySpace(model, ctx.input_shape, ChannelGroups(model, ctx.input_shape), budget.metric,
                            hp.w_bit_choices, hp.a_bit_choices, hp.max_ratio)
        wall = BudgetWall(space, lambda plan: ctx.cost(model, plan).relative(budget.metric), budget.target,
                          fill=hp.fill_budget)
        reward = _HeldOutReward(model, ctx, hp.reward_calibration_batches, hp.reward_finetune_steps, hp.eval_batches)

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
                "search/cost_counts": wall.counts, "search/wall_s": time.perf_counter() - start}
        ctx.log_metrics(cost, len(channel.env.episodes))
        return channel.env.best, cost

    def compress(self, model: nn.Module, budget: Budget, ctx: RunContext) -> Compressed:
        with ctx.search_timer():
            best, cost = self.search(model, budget, ctx)
        apply_policy(model, best.policy, learn_step=True)
        calibrate_policy(model, ctx.calibration_batches(self.hp.calibration_batches))
        ctx.train(model, ctx.epochs, phase="finetune")
        notes = {"best_episode": best.index, "best_reward": best.reward, "searched_relative_cost": best.relative_cost,
                 "squeeze": best.squeeze, "ratios": best.policy.ratios,
                 **{key.removeprefix("search/"): value for key, value in cost.items()}}
        return Compressed(model, plan_from_model(model, self.name, notes))
