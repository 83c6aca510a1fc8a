"""The AJPQ search space and its two gymnasium environments (Tang, Wei & Li, arXiv 2011.06231).

AJPQ treats structured pruning as **0-bit channel-wise quantization**: a compression policy
gives every output channel of every conv/linear layer a weight bit width, 0 meaning pruned,
and every layer an input (activation) bit width. The paper builds the policy with a
hierarchy of two controllers that follow one importance criterion; here each controller has
its own environment (and its own stable-baselines3 DDPG agent, ``jpqbench/methods/ajpq.py``):

* :class:`LayerControllerEnv` -- the **layer controller** walks the dependency groups
  (torch-pruning groups, :class:`jpqbench.nn.channel_pruning.ChannelGroups`) in network order, one step at
  the group's first conv/linear layer, and picks the group's pruning ratio ``r``: the group
  loses its ``round(r * C)`` least important channels (group L2 magnitude) in every coupled
  layer at once (AMC's walk; layers that open no group -- a residual partner, a depthwise
  conv, the classifier -- take no pruning decision);
* :class:`ChannelControllerEnv` -- the **channel controller** then walks every conv/linear
  layer with the ratios known (they arrive through ``reset(options={"ratio_actions": ...})``)
  and picks the layer's input bit width and the weight bit width of **every kept output
  channel**. Its action per layer is ``[a_bits, w_level, w_spread]``; the kept channels,
  ranked by the *same* importance criterion (most important first, position ``t`` in [0, 1]),
  get the bit action ``u(t) = level + spread * (1 - 2 t) * min(level, 1 - level)``, so more
  important channels never get fewer bits, ``spread`` = 0 is HAQ's one width per layer, and
  the widths stay inside [0, 1] (level 0 is the lowest width for all, level 1 the highest).

Every action is a number in [0, 1] (HAQ's mapping: bit choice ``floor(u * n)`` of ``n``
sorted choices; ratio ``a * max_ratio``). When the channel controller has finished the walk,
the **budget wall** (HAQ/AMC) is applied to *both* controllers' actions, so every finished
episode is within the budget *as the harness counts it*, whatever the agents sent. It moves
the actions together along one squeeze ``s`` in [-1, 1]: for ``s > 0`` a fraction ``s`` of
the way to the most compressed policy (ratio actions ``a + s (1 - a)``, weight levels and --
for BOPs -- activation actions ``a (1 - s)``), for ``s < 0`` a fraction ``-s`` of the way to
the least compressed one (ratio ``a (1 + s)``, bit actions ``a - s (1 - a)``); spreads are
kept. The counted cost is monotone in ``s``, so bisection finds the smallest squeeze the
counter accepts: an over-budget policy is squeezed (HAQ, AMC) and, with ``fill`` (our
choice), an under-budget one grows until it spends the budget -- a search of a few dozen
episodes cannot learn that on its own. The most compressed policy is checked against the
budget when the wall is built, so the wall always ends within it.

States follow HAQ/AMC, min-max normalised over the layers: index, conv/linear, depthwise,
prunable, C_in, C_out, stride, kernel area, #weights, input H*W; then for the layer
controller the share of the dense cost its earlier ratios removed, the share still to come
and its previous action (AMC); for the channel controller the layer's pruned fraction, the
share of the dense cost already removed by pruning and bits up to this layer, the pruned
cost still to come and its previous action (HAQ). The cost shares are analytic estimates
(output channels and bits; input channels pruned upstream are not taken out), used only as
features -- the wall uses the harness's counter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from jpqbench.accounting.plan import CompressionPlan, LayerPlan
from jpqbench.base.errors import UserError
from jpqbench.nn.channel_pruning import ChannelGroups, ChannelMasks, apply_masks
from jpqbench.nn.layers import compressible_layers, make_compressible, module_device
from jpqbench.nn.quant import UniformQuantizer, round_ste, scale_grad
from jpqbench.nn.uniform_quantization import calibrate

RelativeCost = Callable[[CompressionPlan], float]

# columns of the joint action matrix (one row per conv/linear layer)
RATIO, A_BITS, W_LEVEL, W_SPREAD = 0, 1, 2, 3
CHANNEL_ACTIONS = (A_BITS, W_LEVEL, W_SPREAD)


@dataclass(frozen=True)
class LayerInfo:
    """What the environments know about one conv/linear layer."""

    name: str
    out_channels: int
    group: str | None            # root of the dependency group holding this layer's outputs
    decides: bool                # True when the layer controller sets that group's ratio at this layer
    order: tuple[int, ...]       # output channels, most important first
    dense_cost: float            # MACs (bops budget) or weights (size budget): state feature only


@dataclass
class Policy:
    """A decoded joint pruning + mixed-precision policy."""

    actions: np.ndarray                           # (layers, 4) joint actions in [0, 1], after the wall
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
            model(torch.zeros(1, *input_shape, device=module_device(model)))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


class PolicySpace:
    """Turns the two controllers' actions into a :class:`Policy` and computes their states.

    Joint action row of a layer: ``[ratio, a_bits, w_level, w_spread]``, each in [0, 1]; the
    ratio only counts on the rows of :attr:`deciders` (the layer controller's steps).
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], groups: ChannelGroups, metric: str,
                 w_bit_choices: Sequence[int], a_bit_choices: Sequence[int], max_ratio: float) -> None:
        self.groups = groups
        self.metric = metric
        self.w_choices = sorted(set(w_bit_choices))
        self.a_choices = sorted(set(a_bit_choices))
        self.max_ratio = max_ratio
        static = _static_features(model, input_shape)
        walk = list(static)
        members = {group.root: sorted(groups.masks({group.root: 1.0})[0], key=walk.index) for group in groups.groups}
        group_of = {layer: root for root, layers in members.items() for layer in layers}
        deciders = {layers[0] for layers in members.values() if layers}
        orders = {g.root: g.order[::-1] for g in groups.groups}  # most important first
        modules = dict(model.named_modules())
        self.layers: list[LayerInfo] = []
        for name, (_, macs, weights) in static.items():
            group = group_of.get(name)
            order = orders[group] if group else self._own_order(modules[name])
            self.layers.append(LayerInfo(name, int(modules[name].weight.shape[0]), group, name in deciders,
                                         tuple(order), macs if metric == "bops" else weights))
        self.deciders = [i for i, layer in enumerate(self.layers) if layer.decides]
        if not self.deciders:
            raise UserError("ajpq found no prunable channel group in the model (only a classifier?)",
                            "use a quantization-only method (ptq, qat) for this model")
        raw = np.array([[i, *static[layer.name][0][:2], float(layer.decides), *static[layer.name][0][2:]]
                        for i, layer in enumerate(self.layers)], dtype=np.float64)
        span = raw.max(axis=0) - raw.min(axis=0)
        self.static_state = ((raw - raw.min(axis=0)) / np.where(span > 0, span, 1.0)).astype(np.float32)
        self.dense = np.array([layer.dense_cost for layer in self.layers])
        self.total_cost = float(self.dense.sum())

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
    def layer_state_dim(self) -> int:
        return self.static_state.shape[1] + 3

    @property
    def channel_state_dim(self) -> int:
        return self.static_state.shape[1] + 3 + len(CHANNEL_ACTIONS)

    # ---- decoding -----------------------------------------------------------------------------
    @staticmethod
    def clean(actions: np.ndarray) -> np.ndarray:
        """Whatever an agent sends: NaN -> 0, then clipped into [0, 1]."""
        return np.clip(np.nan_to_num(np.asarray(actions, dtype=np.float64), nan=0.0), 0.0, 1.0)

    @staticmethod
    def pick(choices: Sequence[int], action: float) -> int:
        """HAQ's mapping of a continuous action to one of ``n`` sorted choices (equal-width bins)."""
        return choices[min(int(action * len(choices)), len(choices) - 1)]

    def ratio(self, action: float) -> float:
        return float(action) * self.max_ratio

    def ratios(self, actions: np.ndarray) -> dict[str, float]:
        """Dependency-group root -> ratio, from the ratio column of the joint ``actions``."""
        return {self.layers[i].group: self.ratio(actions[i, RATIO]) for i in self.deciders}

    def joint(self, ratio_actions: np.ndarray, channel_actions: np.ndarray) -> np.ndarray:
        """The joint action matrix from the layer controller's (one per decider) and channel controller's rows."""
        actions = np.zeros((self.n_layers, 4))
        actions[self.deciders, RATIO] = self.clean(ratio_actions).reshape(-1)
        actions[:, list(CHANNEL_ACTIONS)] = self.clean(channel_actions).reshape(self.n_layers, len(CHANNEL_ACTIONS))
        return actions

    def channel_widths(self, level: float, spread: float, kept: int) -> list[int]:
        """Weight bits of ``kept`` channels in importance order (most important first); never increasing."""
        position = np.linspace(0.0, 1.0, kept) if kept > 1 else np.zeros(kept)
        action = level + spread * (1.0 - 2.0 * position) * min(level, 1.0 - level)
        return [self.pick(self.w_choices, a) for a in action]

    def decode(self, actions: np.ndarray) -> Policy:
        actions = self.clean(actions).reshape(self.n_layers, 4)
        ratios = self.ratios(actions)
        masks = self.groups.masks(ratios)
        plans: dict[str, LayerPlan] = {}
        for i, layer in enumerate(self.layers):
            pruned = masks[0].get(layer.name, [])
            dead = set(pruned)
            kept = [c for c in layer.order if c not in dead]
            bits = [0] * layer.out_channels
            for channel, width in zip(kept, self.channel_widths(actions[i, W_LEVEL], actions[i, W_SPREAD], len(kept))):
                bits[channel] = width
            plans[layer.name] = LayerPlan(layer.out_channels, list(pruned), bits, self.pick(self.a_choices, actions[i, A_BITS]))
        return Policy(actions, ratios, masks, CompressionPlan(plans, method="ajpq"))

    def squeeze(self, actions: np.ndarray, s: float) -> np.ndarray:
        """Move the joint actions towards the most (``s > 0``) or least (``s < 0``) compressed policy.

        ``s`` = 1 / -1 reaches that policy; activation bits only move when they count (BOPs).
        """
        out = self.clean(actions).reshape(self.n_layers, 4).copy()
        bits = [A_BITS, W_LEVEL] if self.metric == "bops" else [W_LEVEL]
        if s >= 0:
            out[:, RATIO] = out[:, RATIO] + s * (1.0 - out[:, RATIO])
            out[:, bits] = out[:, bits] * (1.0 - s)
        else:
            out[:, RATIO] = out[:, RATIO] * (1.0 + s)
            out[:, bits] = out[:, bits] - s * (1.0 - out[:, bits])
        return out

    # ---- states -------------------------------------------------------------------------------
    def kept_fractions(self, masks: tuple[ChannelMasks, ChannelMasks]) -> np.ndarray:
        return np.array([1.0 - len(masks[0].get(layer.name, [])) / layer.out_channels for layer in self.layers])

    def layer_state(self, step: int, ratio_actions: np.ndarray) -> np.ndarray:
        """Layer controller's state at its ``step``-th decision, given its ratio actions for the earlier ones."""
        step = min(step, len(self.deciders) - 1)
        index = self.deciders[step]
        decided = {self.layers[i].group: self.ratio(ratio_actions[k]) for k, i in enumerate(self.deciders[:step])}
        reduced = sum(layer.dense_cost * min(round(decided[layer.group] * layer.out_channels), layer.out_channels - 1)
                      / layer.out_channels for layer in self.layers if layer.group in decided)
        rest = float(self.dense[index + 1:].sum())
        previous = ratio_actions[step - 1] if step > 0 else 0.0
        return np.concatenate([self.static_state[index], [reduced / self.total_cost, rest / self.total_cost,
                                                          previous]]).astype(np.float32)

    def channel_state(self, index: int, kept: np.ndarray, channel_actions: np.ndarray) -> np.ndarray:
        """Channel controller's state at layer ``index``, given the kept fractions after pruning and its
        actions (rows ``a_bits, w_level, w_spread``) for the layers before."""
        index = min(index, self.n_layers - 1)
        estimated = [self.estimated_cost(j, kept[j], channel_actions[j]) for j in range(index)]
        reduced = float(self.dense[:index].sum()) - sum(estimated)
        rest = float(self.dense[index + 1:] @ kept[index + 1:])
        previous = channel_actions[index - 1] if index > 0 else np.zeros(len(CHANNEL_ACTIONS))
        return np.concatenate([self.static_state[index], [1.0 - kept[index], reduced / self.total_cost,
                                                          rest / self.total_cost], previous]).astype(np.float32)

    def estimated_cost(self, index: int, kept: float, channel_action: np.ndarray) -> float:
        """Analytic estimate of layer ``index``'s cost (state feature only): kept output channels times
        the mean weight bits (and the input bits for BOPs) over FP32."""
        layer = self.layers[index]
        n_kept = max(1, round(kept * layer.out_channels))
        a_bits, level, spread = self.clean(channel_action)
        w_bits = float(np.mean(self.channel_widths(level, spread, n_kept)))
        factor = w_bits / 32 if self.metric == "size" else w_bits * self.pick(self.a_choices, a_bits) / 1024
        return layer.dense_cost * kept * factor


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
        most = space.decode(space.squeeze(np.zeros((space.n_layers, 4)), 1.0))
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
    """One finished episode: ``policy`` is what left the wall (counted, rewarded); ``searched`` is
    the agents' own policy before the wall, so a reader can see how much the wall decided."""

    index: int
    reward: float
    relative_cost: float
    squeeze: float
    policy: Policy
    searched: Policy


class LayerControllerEnv(gym.Env):
    """The layer controller's walk: one step per dependency group, the action is the group's pruning ratio.

    Its episode ends before the policy is complete (the channel controller acts next), so its
    own steps return reward 0; the search hands the episode's reward to every one of its
    transitions when the channel controller's episode has ended (HAQ gives every transition
    the final reward). :attr:`ratio_actions` is what the channel controller's ``reset`` takes.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, space: PolicySpace) -> None:
        super().__init__()
        self.space = space
        self.observation_space = gym.spaces.Box(0.0, 1.0, (space.layer_state_dim,), dtype=np.float32)
        self.action_space = gym.spaces.Box(0.0, 1.0, (1,), dtype=np.float32)
        self.ratio_actions = np.zeros(len(space.deciders))
        self._step = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.ratio_actions = np.zeros(len(self.space.deciders))
        self._step = 0
        return self.space.layer_state(0, self.ratio_actions), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._step >= len(self.ratio_actions):
            raise RuntimeError("LayerControllerEnv.step after the episode ended: call reset()")
        self.ratio_actions[self._step] = self.space.clean(action).reshape(-1)[0]
        self._step += 1
        done = self._step == len(self.ratio_actions)
        return self.space.layer_state(self._step, self.ratio_actions), 0.0, done, False, {}


class ChannelControllerEnv(gym.Env):
    """The channel controller's walk over every conv/linear layer, after the layer controller's.

    ``reset(options={"ratio_actions": ...})`` takes the layer controller's actions of the same
    episode. At the last layer the budget wall is applied to both controllers' actions and
    ``reward(policy)`` is called once, on the policy after the wall; the step returns that
    reward and ``info["episode"]``.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, space: PolicySpace, wall: BudgetWall, reward: Callable[[Policy], float],
                 on_episode: Callable[[Episode, Episode], None] | None = None) -> None:
        super().__init__()
        self.space = space
        self.wall = wall
        self.reward = reward
        self.on_episode = on_episode
        self.observation_space = gym.spaces.Box(0.0, 1.0, (space.channel_state_dim,), dtype=np.float32)
        self.action_space = gym.spaces.Box(0.0, 1.0, (len(CHANNEL_ACTIONS),), dtype=np.float32)
        self.episodes: list[Episode] = []
        self.best: Episode | None = None
        self._ratio_actions: np.ndarray | None = None
        self._kept = np.ones(space.n_layers)
        self._actions = np.zeros((space.n_layers, len(CHANNEL_ACTIONS)))
        self._index = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if options is None or "ratio_actions" not in options:
            raise ValueError("ChannelControllerEnv.reset needs options={'ratio_actions': ...} from the layer controller")
        self._ratio_actions = self.space.clean(options["ratio_actions"]).reshape(len(self.space.deciders))
        joint = self.space.joint(self._ratio_actions, np.zeros((self.space.n_layers, len(CHANNEL_ACTIONS))))
        self._kept = self.space.kept_fractions(self.space.groups.masks(self.space.ratios(joint)))
        self._actions = np.zeros((self.space.n_layers, len(CHANNEL_ACTIONS)))
        self._index = 0
        return self.space.channel_state(0, self._kept, self._actions), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._ratio_actions is None or self._index >= self.space.n_layers:
            raise RuntimeError("ChannelControllerEnv.step outside an episode: call reset(options=...)")
        self._actions[self._index] = self.space.clean(action).reshape(-1)
        self._index += 1
        state = self.space.channel_state(self._index, self._kept, self._actions)
        if self._index < self.space.n_layers:
            return state, 0.0, False, False, {}
        joint = self.space.joint(self._ratio_actions, self._actions)
        policy, cost, squeeze = self.wall(joint)
        episode = Episode(len(self.episodes), float(self.reward(policy)), cost, squeeze, policy,
                          searched=self.space.decode(joint))
        self.episodes.append(episode)
        if self.best is None or episode.reward > self.best.reward:
            self.best = episode
        if self.on_episode is not None:
            self.on_episode(episode, self.best)
        self._ratio_actions = None
        return state, episode.reward, True, False, {"episode": episode}


class ChannelBitsQuantizer(nn.Module):
    """Symmetric weight quantizer with one bit width per output channel; 0 bits = a pruned channel.

    Channel c lies on the integer grid ``+-(2^(b_c - 1) - 1)`` times its own step (min/max
    calibrated, LSQ-learned when ``learn_step``, gradient scale per channel as LSQ); a 0-bit
    channel's grid is {0}, so it quantizes to exactly 0. ``bits`` is the per-channel list the
    plan records.
    """

    def __init__(self, bits: Sequence[int], learn_step: bool) -> None:
        super().__init__()
        self.bits = [int(b) for b in bits]
        if any(b != 0 and not 2 <= b <= 16 for b in self.bits):
            raise ValueError(f"channel bit widths must be 0 or in [2, 16], got {sorted(set(self.bits))}")
        self.learn_step = learn_step
        self.register_buffer("q_max", torch.tensor([2.0 ** (b - 1) - 1 if b else 0.0 for b in self.bits]))
        self.step = nn.Parameter(torch.ones(len(self.bits)), requires_grad=learn_step)
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (weight.dim() - 1)))

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        """Min/max calibration: every channel's largest magnitude maps to its largest integer."""
        absmax = weight.detach().reshape(len(self.bits), -1).abs().amax(dim=1)
        self.step.copy_(torch.where(self.q_max > 0, absmax / self.q_max.clamp_min(1.0), 1.0).clamp_min(1e-8))
        self.initialized.fill_(True)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            if not self.training:
                raise RuntimeError("ChannelBitsQuantizer used in eval mode before calibrate()")
            self.calibrate(weight)
        step = self.step
        if self.learn_step:
            step = scale_grad(step, 1.0 / (weight[0].numel() * self.q_max.clamp_min(1.0)) ** 0.5)
        step, q_max = self._view(step, weight), self._view(self.q_max, weight)
        return round_ste(torch.clamp(weight / step, -q_max, q_max)) * step


def apply_policy(model: nn.Module, policy: Policy, learn_step: bool) -> None:
    """Mask ``model`` (layers and BN) and give every layer its channel-wise weight and input quantizers."""
    make_compressible(model)
    apply_masks(model, policy.masks)
    for name, layer in compressible_layers(model).items():
        claim = policy.plan.layers[name]
        device = layer.weight.device
        layer.weight_quantizer = ChannelBitsQuantizer(claim.channel_bits(), learn_step).to(device)
        layer.input_quantizer = UniformQuantizer(claim.a_bits, "asymmetric", channels=1, learn_step=learn_step).to(device)


def calibrate_policy(model: nn.Module, batches) -> None:
    """Weight quantizers from the weights, then input quantizers on training ``batches``."""
    for layer in compressible_layers(model).values():
        if isinstance(layer.weight_quantizer, ChannelBitsQuantizer):
            layer.weight_quantizer.calibrate(layer.weight)
    calibrate(model, batches)
