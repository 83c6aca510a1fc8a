"""The AJPQ search space and its gymnasium environment (Tang, Wei & Li, arXiv 2011.06231).

AJPQ treats structured pruning as **0-bit channel-wise quantization**: a compression policy
gives every output channel of every conv/linear layer a weight bit width, 0 meaning pruned,
and every layer an input (activation) bit width. The agent builds a policy layer by layer:

* **layer controller** -- the pruning ratio ``r`` of the layer's dependency group (torch-pruning
  groups, :class:`jpqbench.prune.ChannelGroups`): the group loses its ``round(r * C)`` least
  important channels (group L2 magnitude), in every coupled layer at once. A group's ratio is
  set at the step of its first layer in the walk; layers that open no group (a residual
  partner, a depthwise conv, the classifier) have no pruning decision, their ratio action is
  ignored and the state says so (the ``prunable`` feature);
* **channel controller** -- ``channel_groups`` weight bit widths per layer, given to the kept
  channels ranked by the *same* importance criterion: the kept channels, most important first,
  are split into ``channel_groups`` equal chunks and the widths, sorted from the largest,
  are handed out in that order (more important channels never get fewer bits); plus the
  layer's activation bit width.

Every action is a number in [0, 1] (HAQ's mapping: bit choice ``floor(a * n)`` of ``n``
sorted choices, ratio ``a * max_ratio``). The **budget wall** (HAQ/AMC) guarantees that every
finished episode is within the budget *as the harness counts it*. It moves all actions of a
policy together along one squeeze ``s`` in [-1, 1]: for ``s > 0`` a fraction ``s`` of the way to
the most compressed policy (ratio actions ``a + s (1 - a)``, bit actions ``a (1 - s)``), for
``s < 0`` a fraction ``-s`` of the way to the least compressed one (ratio actions
``a (1 + s)``, bit actions ``a - s (1 - a)``). The counted cost is monotone in ``s``, so
bisection finds the smallest squeeze the counter accepts: an over-budget policy is squeezed
(HAQ, AMC) and, with ``fill`` (our choice), an under-budget one grows until it spends the
budget -- a search of a few dozen episodes cannot learn that on its own. The most compressed
policy is checked against the budget when the wall is built, so the wall always ends within it.

The state of a layer follows HAQ/AMC: index, conv/linear, depthwise, prunable, C_in, C_out,
stride, kernel area, #weights, input H*W (each min-max normalised over the layers), the share
of the dense cost already removed by the layers before it and the share still to come (an
analytic per-layer estimate, used only as a feature -- the wall uses the harness's counter),
and the previous layer's action.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from jpqbench.errors import UserError
from jpqbench.layers import compressible_layers, make_compressible
from jpqbench.plan import CompressionPlan, LayerPlan
from jpqbench.prune import ChannelGroups, ChannelMasks, apply_masks
from jpqbench.quant import UniformQuantizer
from jpqbench.uniform import calibrate

RelativeCost = Callable[[CompressionPlan], float]


@dataclass(frozen=True)
class LayerInfo:
    """What the environment knows about one conv/linear layer."""

    name: str
    features: tuple[float, ...]  # static HAQ/AMC features, raw (normalised by the space)
    out_channels: int
    group: str | None            # root of the dependency group holding this layer's outputs
    decides: bool                # True when this layer's step sets that group's ratio
    order: tuple[int, ...]       # output channels, most important first
    dense_cost: float            # MACs (bops budget) or weights (size budget): state feature only


@dataclass
class Policy:
    """A decoded joint pruning + mixed-precision policy."""

    actions: np.ndarray                           # (layers, action_dim) in [0, 1], after the wall
    ratios: dict[str, float]                      # dependency-group root -> pruning ratio
    masks: tuple[ChannelMasks, ChannelMasks]      # pruned channels of every conv/linear and BN
    plan: CompressionPlan                         # per-channel weight bits (0 = pruned), input bits


def _static_features(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[tuple[float, ...], float, float]]:
    """Per conv/linear: (raw HAQ/AMC features, dense MACs, #weights) from one forward pass."""
    seen: dict[str, tuple[tuple[float, ...], float, float]] = {}

    def hook(name: str):
        def record(module: nn.Module, args, output: torch.Tensor) -> None:
            x = args[0]
            if isinstance(module, nn.Conv2d):
                kernel = module.kernel_size[0] * module.kernel_size[1]
                depthwise = float(module.groups > 1 and module.groups == module.in_channels)
                fan_in = module.in_channels // module.groups * kernel
                in_pixels, out_pixels = x.shape[2] * x.shape[3], output.shape[2] * output.shape[3]
                features = (1.0, depthwise, module.in_channels, module.out_channels, module.stride[0], kernel,
                            module.weight.numel(), in_pixels)
                macs = out_pixels * fan_in * module.out_channels
            else:
                positions = x.numel() // x.shape[0] // x.shape[-1]
                features = (0.0, 0.0, module.in_features, module.out_features, 1, 1, module.weight.numel(), positions)
                macs = positions * module.in_features * module.out_features
            seen[name] = (features, float(macs), float(module.weight.numel()))
        return record

    hooks = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


class PolicySpace:
    """Turns the agent's raw actions (one row per layer) into a :class:`Policy`.

    Action row of a layer: ``[ratio, a_bits, w_bits_1 .. w_bits_G]``, each in [0, 1].
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], groups: ChannelGroups, metric: str,
                 w_bit_choices: Sequence[int], a_bit_choices: Sequence[int], channel_groups: int,
                 max_ratio: float) -> None:
        self.groups = groups
        self.metric = metric
        self.w_choices = sorted(set(w_bit_choices))
        self.a_choices = sorted(set(a_bit_choices))
        self.channel_groups = channel_groups
        self.max_ratio = max_ratio
        static = _static_features(model, input_shape)
        members = self._group_members()
        deciders: set[str] = set()
        for root, layers in members.items():
            deciders.add(min(layers, key=list(static).index))
        group_of = {layer: root for root, layers in members.items() for layer in layers}
        orders = {g.root: g.order[::-1] for g in groups.groups}  # most important first
        modules = dict(model.named_modules())
        self.layers: list[LayerInfo] = []
        for name, (features, macs, weights) in static.items():
            group = group_of.get(name)
            order = orders[group] if group else self._own_order(modules[name])
            self.layers.append(LayerInfo(name, features, int(modules[name].weight.shape[0]), group, name in deciders,
                                         tuple(order), macs if metric == "bops" else weights))
        raw = np.array([[i, *layer.features[:2], float(layer.decides), *layer.features[2:]]
                        for i, layer in enumerate(self.layers)], dtype=np.float64)
        span = raw.max(axis=0) - raw.min(axis=0)
        self.static_state = ((raw - raw.min(axis=0)) / np.where(span > 0, span, 1.0)).astype(np.float32)
        self.total_cost = sum(layer.dense_cost for layer in self.layers)

    def _group_members(self) -> dict[str, list[str]]:
        """Root -> the conv/linear layers whose output channels the group prunes."""
        members = {}
        for group in self.groups.groups:
            layer_masks, _ = self.groups.masks({group.root: 1.0})
            members[group.root] = sorted(layer_masks)
        return members

    @staticmethod
    def _own_order(module: nn.Module) -> list[int]:
        """Output channels by the L2 norm of their weights, most important first (no group: the classifier)."""
        norms = module.weight.detach().reshape(module.weight.shape[0], -1).norm(dim=1)
        return torch.argsort(norms, descending=True, stable=True).tolist()

    # ---- shapes -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def action_dim(self) -> int:
        return 2 + self.channel_groups

    @property
    def state_dim(self) -> int:
        return self.static_state.shape[1] + 2 + self.action_dim

    # ---- decoding -----------------------------------------------------------------------------
    @staticmethod
    def clean(actions: np.ndarray) -> np.ndarray:
        """Whatever the agent sends: NaN -> 0, then clipped into [0, 1]."""
        return np.clip(np.nan_to_num(np.asarray(actions, dtype=np.float64), nan=0.0), 0.0, 1.0)

    @staticmethod
    def pick(choices: Sequence[int], action: float) -> int:
        """HAQ's mapping of a continuous action to one of ``n`` sorted choices (equal-width bins)."""
        return choices[min(int(action * len(choices)), len(choices) - 1)]

    def ratio(self, action: float) -> float:
        return float(action) * self.max_ratio

    def decode(self, actions: np.ndarray) -> Policy:
        actions = self.clean(actions).reshape(self.n_layers, self.action_dim)
        ratios = {layer.group: self.ratio(actions[i, 0]) for i, layer in enumerate(self.layers) if layer.decides}
        masks = self.groups.masks(ratios)
        plans: dict[str, LayerPlan] = {}
        for i, layer in enumerate(self.layers):
            pruned = masks[0].get(layer.name, [])
            dead = set(pruned)
            kept = [c for c in layer.order if c not in dead]
            widths = sorted((self.pick(self.w_choices, a) for a in actions[i, 2:]), reverse=True)
            bits = [0] * layer.out_channels
            for chunk, width in zip(np.array_split(np.array(kept, dtype=np.int64), self.channel_groups), widths):
                for channel in chunk.tolist():
                    bits[channel] = width
            plans[layer.name] = LayerPlan(layer.out_channels, list(pruned), bits, self.pick(self.a_choices, actions[i, 1]))
        return Policy(actions, ratios, masks, CompressionPlan(plans, method="ajpq"))

    def squeeze(self, actions: np.ndarray, s: float) -> np.ndarray:
        """Move every action towards the most (``s > 0``) or least (``s < 0``) compressed policy.

        ``s`` = 1 / -1 reaches that policy; activation bits only move when they count (BOPs).
        """
        out = self.clean(actions).reshape(self.n_layers, self.action_dim).copy()
        bits = slice(1 if self.metric == "bops" else 2, None)
        if s >= 0:
            out[:, 0] = out[:, 0] + s * (1.0 - out[:, 0])
            out[:, bits] = out[:, bits] * (1.0 - s)
        else:
            out[:, 0] = out[:, 0] * (1.0 + s)
            out[:, bits] = out[:, bits] - s * (1.0 - out[:, bits])
        return out

    # ---- state --------------------------------------------------------------------------------
    def estimated_kept_cost(self, index: int, actions: np.ndarray) -> float:
        """Analytic estimate of layer ``index``'s cost under ``actions`` (state feature only).

        Kept output channels times the mean weight bits (and input bits for BOPs) over FP32;
        input channels pruned upstream are not taken out here (the counter does that).
        """
        layer = self.layers[index]
        ratio = next((self.ratio(actions[j, 0]) for j, other in enumerate(self.layers)
                      if other.decides and other.group == layer.group), 0.0) if layer.group else 0.0
        n = layer.out_channels
        keep = 1.0 - min(round(ratio * n), n - 1) / n
        w_bits = float(np.mean([self.pick(self.w_choices, a) for a in actions[index, 2:]]))
        factor = w_bits / 32 if self.metric == "size" else w_bits * self.pick(self.a_choices, actions[index, 1]) / 1024
        return layer.dense_cost * keep * factor

    def state(self, index: int, actions: np.ndarray) -> np.ndarray:
        """State of layer ``index`` given the actions already taken for layers ``< index``."""
        index = min(index, self.n_layers - 1)
        reduced = sum(self.layers[j].dense_cost - self.estimated_kept_cost(j, actions) for j in range(index))
        rest = sum(layer.dense_cost for layer in self.layers[index + 1:])
        previous = actions[index - 1] if index > 0 else np.zeros(self.action_dim)
        return np.concatenate([self.static_state[index], [reduced / self.total_cost, rest / self.total_cost],
                               previous]).astype(np.float32)


class BudgetWall:
    """Squeezes a policy until the harness's counter says it is within ``target`` (see the module doc).

    ``relative_cost`` is the harness's counter (``ctx.cost(model, plan).relative(metric)``);
    its answers are memoised per plan, since the bisection often decodes the same plan twice.
    """

    def __init__(self, space: PolicySpace, relative_cost: RelativeCost, target: float, fill: bool = True,
                 iterations: int = 8) -> None:
        self.space = space
        self.target = target
        self.fill = fill
        self.iterations = iterations
        self._relative_cost = relative_cost
        self._memo: dict[tuple, float] = {}
        self.counts = 0
        most = space.decode(space.squeeze(np.zeros((space.n_layers, space.action_dim)), 1.0))
        cost = self.cost(most.plan)
        if cost > target:
            raise UserError(f"budget {target} cannot be reached by ajpq's search space: the most compressed policy "
                            f"(ratio {space.max_ratio}, {space.w_choices[0]}-bit weights, {space.a_choices[0]}-bit "
                            f"inputs) costs {cost:.4f} of FP32",
                            "raise max_ratio, add lower bit choices, or choose a larger budget")

    def cost(self, plan: CompressionPlan) -> float:
        key = tuple((name, tuple(layer.pruned), tuple(layer.w_bits), layer.a_bits) for name, layer in plan.layers.items())
        if key not in self._memo:
            self._memo[key] = self._relative_cost(plan)
            self.counts += 1
        return self._memo[key]

    def _at(self, actions: np.ndarray, s: float) -> tuple[Policy, float]:
        policy = self.space.decode(self.space.squeeze(actions, s))
        return policy, self.cost(policy.plan)

    def __call__(self, actions: np.ndarray) -> tuple[Policy, float, float]:
        """The policy that leaves the environment, its counted relative cost, and the squeeze used."""
        best, best_cost = self._at(actions, 0.0)
        if best_cost <= self.target:
            if not self.fill:
                return best, best_cost, 0.0
            low, high = -1.0, 0.0
            least, least_cost = self._at(actions, -1.0)
            if least_cost <= self.target:
                return least, least_cost, -1.0
        else:
            low, high = 0.0, 1.0
            best, best_cost = self._at(actions, 1.0)
        for _ in range(self.iterations):  # invariant: the policy at `high` is within budget, at `low` is not
            mid = (low + high) / 2
            candidate, candidate_cost = self._at(actions, mid)
            if candidate_cost <= self.target:
                high, best, best_cost = mid, candidate, candidate_cost
            else:
                low = mid
        return best, best_cost, high


@dataclass
class Episode:
    index: int
    reward: float
    relative_cost: float
    squeeze: float
    policy: Policy


class AJPQEnv(gym.Env):
    """One episode = one walk over the conv/linear layers; the reward comes at the last step.

    HAQ/AMC give every transition of an episode the episode's reward; stable-baselines3 stores
    transitions as they happen, so here intermediate rewards are 0 and the last step carries the
    reward -- with ``gamma = 1`` every step's return is the same episode reward.
    ``reward(policy)`` is called once per episode, on the policy after the budget wall.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, space: PolicySpace, wall: BudgetWall, reward: Callable[[Policy], float],
                 on_episode: Callable[[Episode, Episode], None] | None = None) -> None:
        super().__init__()
        self.space = space
        self.wall = wall
        self.reward = reward
        self.on_episode = on_episode
        self.observation_space = gym.spaces.Box(0.0, 1.0, (space.state_dim,), dtype=np.float32)
        self.action_space = gym.spaces.Box(0.0, 1.0, (space.action_dim,), dtype=np.float32)
        self.episodes: list[Episode] = []
        self.best: Episode | None = None
        self._actions = np.zeros((space.n_layers, space.action_dim))
        self._index = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._actions = np.zeros((self.space.n_layers, self.space.action_dim))
        self._index = 0
        return self.space.state(0, self._actions), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self._actions[self._index] = self.space.clean(action).reshape(-1)
        self._index += 1
        if self._index < self.space.n_layers:
            return self.space.state(self._index, self._actions), 0.0, False, False, {}
        policy, cost, squeeze = self.wall(self._actions)
        episode = Episode(len(self.episodes), float(self.reward(policy)), cost, squeeze, policy)
        self.episodes.append(episode)
        if self.best is None or episode.reward > self.best.reward:
            self.best = episode
        if self.on_episode is not None:
            self.on_episode(episode, self.best)
        return self.space.state(self._index, self._actions), episode.reward, True, False, {"relative_cost": cost}


class ChannelBitsQuantizer(nn.Module):
    """Symmetric weight quantizer with one bit width per output channel; 0 bits = a pruned channel.

    Channels that share a width share one per-channel :class:`UniformQuantizer` (min/max
    calibrated, LSQ-learned when ``learn_step``); a 0-bit channel quantizes to exactly 0.
    ``bits`` is the per-channel list the plan records.
    """

    def __init__(self, bits: Sequence[int], learn_step: bool) -> None:
        super().__init__()
        self.bits = [int(b) for b in bits]
        self.parts = nn.ModuleDict()
        for width in sorted(set(self.bits) - {0}):
            channels = [c for c, b in enumerate(self.bits) if b == width]
            self.parts[str(width)] = UniformQuantizer(width, "symmetric", channels=len(channels), learn_step=learn_step)
            self.register_buffer(f"index_{width}", torch.tensor(channels, dtype=torch.long))

    def _index(self, width: str) -> torch.Tensor:
        return getattr(self, f"index_{width}")

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        """Min/max calibration of every width's quantizer on its channels of ``weight``."""
        for width, quantizer in self.parts.items():
            flat = weight.detach().index_select(0, self._index(width)).reshape(len(self._index(width)), -1)
            quantizer.calibrate(flat.amin(dim=1), flat.amax(dim=1))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(weight)
        for width, quantizer in self.parts.items():
            index = self._index(width)
            out = out.index_copy(0, index, quantizer(weight.index_select(0, index)))
        return out


def apply_policy(model: nn.Module, policy: Policy, learn_step: bool) -> None:
    """Mask ``model`` (layers and BN) and give every layer its channel-wise weight and input quantizers."""
    make_compressible(model)
    apply_masks(model, policy.masks)
    for name, layer in compressible_layers(model).items():
        claim = policy.plan.layers[name]
        layer.weight_quantizer = ChannelBitsQuantizer(claim.channel_bits(), learn_step)
        layer.input_quantizer = UniformQuantizer(claim.a_bits, "asymmetric", channels=1, learn_step=learn_step)


def calibrate_policy(model: nn.Module, batches) -> None:
    """Weight quantizers from the weights, then input quantizers on training ``batches``."""
    for layer in compressible_layers(model).values():
        if isinstance(layer.weight_quantizer, ChannelBitsQuantizer):
            layer.weight_quantizer.calibrate(layer.weight)
    calibrate(model, batches)

