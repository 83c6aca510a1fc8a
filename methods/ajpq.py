"""AJPQ: automated joint pruning and quantization with reinforcement learning (Tang, Wei & Li, arXiv 2011.06231)."""
from __future__ import annotations

import copy
import time
from itertools import islice
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from stable_baselines3 import DDPG
from stable_baselines3.common.noise import ActionNoise
from torch import nn

from jpqbench.ajpq_env import (AJPQEnv, BudgetWall, Episode, Policy, PolicySpace, apply_policy,
                               calibrate_policy)
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
        # sb3 adds the noise to the action scaled to [-1, 1]: twice its size in [0, 1] action units
        return (2.0 * self.sigma * self._rng.standard_normal(self.action_dim)).astype(np.float32)

    def reset(self) -> None:  # sb3 calls it at the end of every episode
        self.episode += 1


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
    """AJPQ (Tang, Wei & Li, arXiv 2011.06231): pruning as 0-bit channel-wise quantization, one mixed-precision search by DDPG.

    A DDPG agent (stable-baselines3) walks the conv/linear layers (jpqbench/ajpq_env.py); per
    layer it picks the pruning ratio of the layer's dependency group (layer controller) and
    ``channel_groups`` weight bit widths for the kept channels ranked by group L2 magnitude plus
    the input bit width (channel controller). Pruned channels are the 0-bit channels of the
    plan. A budget wall squeezes every finished policy until the harness's counter accepts it
    (and, with ``fill_budget``, grows an under-budget one until it spends the budget), so every
    episode -- and the result -- is within the budget. The reward is top-1 on the
    held-out part of the training set ("val") after min/max calibration and
    ``reward_finetune_steps`` SGD steps, minus the FP32 top-1 on the same batches. The best
    policy found is applied to the FP32 model and fine-tuned (LSQ steps, masks fixed) for all
    of the run's epochs; the search itself is search cost (``search_time_s``), logged per
    episode under ``search/`` in MLflow (reward, counted cost, squeeze, best policy per layer).

    There is no official code; every choice below is ours (HAQ/AMC lineage) and a hyperparameter
    where it can be. One agent whose action vector holds both controllers (the paper has
    hierarchical agents). Ratios in [0, ``max_ratio``] (AMC's 0.8); HAQ's action-to-bit mapping
    over ``w_bit_choices`` / ``a_bit_choices`` (2..8); weights symmetric per channel, inputs
    asymmetric per tensor (jpqbench/quant.py). The channel controller's widths go to equal
    importance chunks, largest width to the most important chunk. The wall squeezes all actions
    together and bisects the squeeze (HAQ lowers bits layer by layer), and ``fill_budget`` also
    grows under-budget policies (HAQ and AMC only lower; a few dozen episodes cannot learn to
    spend the budget). The reward is ``acc - acc_fp32`` (HAQ scales it by 0.1 and subtracts a
    moving average in the critic update; sb3 has no such baseline), given at the last step
    with ``gamma`` = 1 (HAQ's discount 1 with the final reward on every transition). sb3 has one
    learning rate for actor and critic (HAQ: 1e-4 and 1e-3), and its exploration noise is a
    clipped Gaussian (HAQ: truncated normal). The best policy is the episode with
    the highest reward (the first on ties), kept fixed while fine-tuning.

    Defaults keep the search to seconds (digits) or tens of seconds (minispeech) on 2 CPU cores.
    Paper-scale values (HAQ's mit-han-lab/haq defaults): episodes 600, warmup_episodes 20,
    noise 0.5, noise_decay 0.99, hidden (300, 300), tau 0.01, agent_batch_size 64, the reward
    after one fine-tuning epoch on 20,000 training images (reward_finetune_steps ~ 80 at batch
    256) evaluated on 10,000 held-out ones (eval_batches ~ 40).
    """

    class Hparams(Method.Hparams):
        episodes: int = Field(20, ge=1, description="search episodes, warm-up included")
        warmup_episodes: int = Field(6, ge=0, description="episodes of uniformly random actions before DDPG learns")
        noise: float = Field(0.5, gt=0, le=1, description="std of the exploration noise after warm-up, in [0, 1] action units")
        noise_decay: float = Field(0.9, gt=0, le=1, description="noise std multiplier per episode after warm-up")
        w_bit_choices: tuple[int, ...] = Field((2, 3, 4, 5, 6, 7, 8), min_length=1)
        a_bit_choices: tuple[int, ...] = Field((2, 3, 4, 5, 6, 7, 8), min_length=1)
        channel_groups: int = Field(2, ge=1, description="weight bit widths per layer (importance-ranked channel chunks)")
        max_ratio: float = Field(0.8, ge=0, lt=1, description="largest pruning ratio of a dependency group")
        fill_budget: bool = Field(True, description="the wall also grows under-budget policies up to the budget")
        calibration_batches: int = Field(8, ge=1, description="training batches calibrating the final model")
        reward_calibration_batches: int = Field(2, ge=1, description="training batches calibrating each reward's model")
        reward_finetune_steps: int = Field(2, ge=0, description="SGD steps on training batches before each reward")
        eval_batches: int = Field(3, ge=1, description="held-out (val) batches per reward")
        agent_lr: float = Field(1e-3, gt=0)
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
                                 "or the agent never acts")
            return self

    def search(self, model: nn.Module, budget: Budget, ctx: RunContext) -> tuple[Episode, dict[str, float]]:
        """Run the DDPG search on the FP32 ``model`` (left unchanged); the best episode and the search cost."""
        start = time.perf_counter()
        hp = self.hp
        space = PolicySpace(model, ctx.input_shape, ChannelGroups(model, ctx.input_shape), budget.metric,
                            hp.w_bit_choices, hp.a_bit_choices, hp.channel_groups, hp.max_ratio)
        wall = BudgetWall(space, lambda plan: ctx.cost(model, plan).relative(budget.metric), budget.target,
                          fill=hp.fill_budget)
        reward = _HeldOutReward(model, ctx, hp.reward_calibration_batches, hp.reward_finetune_steps, hp.eval_batches)
        noise = DecayingNoise(space.action_dim, hp.noise, hp.noise_decay, hp.warmup_episodes, ctx.seed)

        def log(episode: Episode, best: Episode) -> None:
            metrics = {"search/reward": episode.reward, "search/val_top1": episode.reward + reward.baseline,
                       "search/relative_cost": episode.relative_cost, "search/squeeze": episode.squeeze,
                       "search/best_reward": best.reward, "search/noise_sigma": noise.sigma}
            for name, layer in best.policy.plan.layers.items():
                kept = [b for b in layer.channel_bits() if b]
                metrics[f"search/best/{name}/pruned_fraction"] = len(layer.pruned) / layer.out_channels
                metrics[f"search/best/{name}/w_bits"] = sum(kept) / len(kept)
                metrics[f"search/best/{name}/a_bits"] = layer.a_bits
            ctx.log_metrics(metrics, episode.index)

        env = AJPQEnv(space, wall, reward, on_episode=log)
        steps = space.n_layers
        agent = DDPG("MlpPolicy", env, learning_rate=hp.agent_lr, buffer_size=hp.episodes * steps,
                     learning_starts=hp.warmup_episodes * steps, batch_size=hp.agent_batch_size, tau=hp.tau,
                     gamma=hp.gamma, train_freq=(1, "episode"), gradient_steps=-1, action_noise=noise,
                     policy_kwargs={"net_arch": list(hp.hidden)}, seed=ctx.seed, device="cpu", verbose=0)
        agent.learn(total_timesteps=hp.episodes * steps)
        cost = {"search/episodes": len(env.episodes), "search/evaluations": reward.evaluations,
                "search/cost_counts": wall.counts, "search/wall_s": time.perf_counter() - start}
        ctx.log_metrics(cost, len(env.episodes))
        return env.best, cost

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
