"""Variational-information-bottleneck channel gates (VIBNet: Dai et al., ICML 2018), as DJPQ uses them.

Every gated conv/linear layer gets one gate per output channel, ``z = mu + eps * sigma`` with
``eps ~ N(0, 1)`` drawn per sample and channel while training. A channel's information is
measured by ``log alpha = log sigma^2 - log mu^2``: the channel is kept iff ``log alpha <
threshold``, and at evaluation the gate is deterministic, ``1[log alpha < threshold] * mu``.
The KL term of the bottleneck, ``0.5 * log(1 + mu^2 / sigma^2)`` per channel, pushes
uninformative channels towards ``mu = 0``.

How a conv channel's KL is weighted: VIBNet's layer sums the KL over every position of the
gated map (x H*W) and multiplies it by a per-layer ``kl_mult``; every configuration its
published runs use (zhuchen03/VIBNet ``ib_vgg.py`` D4, D6, G, G5) sets ``kl_mult`` to
1 / (side of the map), so a channel's KL counts ``H*W / side = sqrt(H*W)`` times. Plain H*W
would weigh a 112x112 stem channel 256 times a 7x7 one, and the high-resolution stages would
close before any cost term acts. Here a gate's KL is weighted by ``(H*W) ** kl_spatial_exponent``
(:func:`attach_gates`): 0.5 is VIBNet's published weighting (generalised to non-square maps),
1 its plain per-position sum, 0 one count per channel (its D5 configuration).

Where the gate sits: on the output of the layer's own BatchNorm when one reads the layer's
output directly (so the gate scales what BN emits and a closed gate emits an exact zero,
BN bias included), else on the layer's output. :func:`attach_gates` finds that host with one
forward pass and hooks the gate onto it; :meth:`Gates.fold` ends gating by folding the kept
``mu`` into the host (BN's affine parameters, or the layer's weight scale and bias) and turning
closed gates into pruned channels (``out_mask`` and the BN mask), so the returned model has no
gate left and its plan is an ordinary mask + bit-width plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from jpqbench.nn.layers import CompressibleLayer, compressible_layers, mask_batchnorm, module_device

_LOG_EPS = 1e-8  # keeps log mu^2 finite at mu = 0 (VIBNet's choice)


class VIBGate(nn.Module):
    """Per-channel multiplicative gate ``z = mu + eps * sigma`` (deterministic at eval)."""

    def __init__(self, channels: int, threshold: float = 0.0, init_mu: tuple[float, float] = (1.0, 0.01),
                 init_log_sigma2: tuple[float, float] = (-9.0, 0.01), spatial: int = 1,
                 kl_spatial_exponent: float = 0.5) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.randn(channels) * init_mu[1] + init_mu[0])
        self.log_sigma2 = nn.Parameter(torch.randn(channels) * init_log_sigma2[1] + init_log_sigma2[0])
        self.threshold = float(threshold)
        self.spatial = int(spatial)  # H*W of the gated map (1 for a linear layer)
        self.kl_scale = float(self.spatial ** kl_spatial_exponent)  # how many times a channel's KL counts

    def extra_repr(self) -> str:
        return (f"channels={self.mu.numel()}, threshold={self.threshold}, spatial={self.spatial}, "
                f"kl_scale={self.kl_scale:g}")

    def log_alpha(self) -> torch.Tensor:
        return self.log_sigma2 - torch.log(self.mu ** 2 + _LOG_EPS)

    def keep_mask(self) -> torch.Tensor:
        """Bool per channel: kept iff ``log alpha < threshold``."""
        return self.log_alpha().detach() < self.threshold

    def soft_keep(self, temperature: float) -> torch.Tensor:
        """Differentiable keep indicator ``sigmoid((threshold - log alpha) / temperature)``."""
        return torch.sigmoid((self.threshold - self.log_alpha()) / temperature)

    def kl(self) -> torch.Tensor:
        # 0.5 * log(1 + mu^2 / sigma^2) = 0.5 * softplus(-log alpha), stable for any log alpha
        return 0.5 * F.softplus(-self.log_alpha()).sum() * self.kl_scale

    def gate(self, batch: int) -> torch.Tensor:
        """The gate values, shape (batch, channels): sampled while training, deterministic at eval."""
        if self.training:
            eps = torch.randn(batch, self.mu.numel(), device=self.mu.device, dtype=self.mu.dtype)
            return self.mu + eps * torch.exp(0.5 * self.log_sigma2)
        return (self.mu * self.keep_mask()).expand(batch, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.gate(x.shape[0])
        return x * z.view(*z.shape, *([1] * (x.dim() - 2)))


def _gate_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return module.vib_gate(output)


class _ChannelScaledQuantizer(nn.Module):
    """A weight quantizer followed by a fixed per-output-channel scale (a folded gate ``mu``).

    Scaling a channel maps its quantization levels one to one, so the channel still takes at
    most ``2**bits`` values and the plan's bit width stays true.
    """

    def __init__(self, quantizer: nn.Module, scale: torch.Tensor) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.register_buffer("scale", scale.detach().clone())

    @property
    def bits(self):
        return self.quantizer.bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.quantizer(w) * self.scale.view(-1, *([1] * (w.dim() - 1)))


@dataclass
class Gates:
    """The gates of a model: layer name -> gate, and the module each one is hooked onto."""

    gates: dict[str, VIBGate]
    hosts: dict[str, str]  # layer name -> name of the gated module (its BN, or the layer itself)
    _handles: list[RemovableHandle] = field(default_factory=list, repr=False)

    def parameters(self) -> list[nn.Parameter]:
        return [p for gate in self.gates.values() for p in (gate.mu, gate.log_sigma2)]

    def kl(self) -> torch.Tensor:
        return torch.stack([gate.kl() for gate in self.gates.values()]).sum()

    def keep_masks(self) -> dict[str, torch.Tensor]:
        return {name: gate.keep_mask() for name, gate in self.gates.items()}

    @torch.no_grad()
    def fold(self, model: nn.Module, keep: dict[str, torch.Tensor] | None = None) -> None:
        """Replace every gate by what it does at evaluation: kept ``mu`` folded into the host, closed
        gates turned into pruned channels (layer ``out_mask`` and the host BN's mask). Removes the gates.

        ``keep`` overrides the gates' own keep masks (a projection that prunes further).
        """
        modules = dict(model.named_modules())
        layers = compressible_layers(model)
        keep = keep if keep is not None else self.keep_masks()
        for handle in self._handles:
            handle.remove()
        for name, gate in self.gates.items():
            kept = keep[name]
            scale = gate.mu.detach() * kept
            layer: CompressibleLayer = layers[name]
            host = modules[self.hosts[name]]
            if isinstance(host, nn.modules.batchnorm._BatchNorm):
                host.weight.mul_(scale)
                host.bias.mul_(scale)
                mask_batchnorm(host, kept.float())
            else:  # scale is on the gate's device, the layer's
                layer.weight_quantizer = _ChannelScaledQuantizer(layer.weight_quantizer, scale)
                if layer.bias is not None:
                    layer.bias.mul_(scale)
            layer.out_mask.mul_(kept.to(layer.out_mask.dtype))
            del host.vib_gate
        self.gates, self.hosts, self._handles = {}, {}, []


def gate_hosts(model: nn.Module, names: list[str], input_shape: tuple[int, ...]) -> dict[str, tuple[str, int]]:
    """For each layer in ``names``: the module whose output its gate scales, and that map's H*W.

    One forward pass (eval mode, on a batch of ones) records which BatchNorm reads a
    layer's output tensor itself; that BN hosts the gate, else the layer does.
    """
    modules = dict(model.named_modules())
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is held so that its id is not reused
    hosts: dict[str, tuple[str, int]] = {}
    handles = []

    def layer_hook(name: str):
        def hook(module, args, output):
            produced[id(output)] = (name, output)
            hosts.setdefault(name, (name, _spatial(output)))
        return hook

    def bn_hook(bn_name: str):
        def hook(module, args, output):
            source = produced.get(id(args[0]))
            if source is not None:
                hosts[source[0]] = (bn_name, _spatial(output))
        return hook

    for name, module in modules.items():
        if name in names:
            handles.append(module.register_forward_hook(layer_hook(name)))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_hook(bn_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.ones(1, *input_shape, device=module_device(model)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    missing = set(names) - set(hosts)
    if missing:
        raise RuntimeError(f"layers never called in a forward pass: {sorted(missing)}")
    return hosts


def _spatial(output: torch.Tensor) -> int:
    return output[0, 0].numel() if output.dim() > 2 else 1


def attach_gates(model: nn.Module, names: list[str], input_shape: tuple[int, ...], threshold: float = 0.0,
                 init_mu: tuple[float, float] = (1.0, 0.01),
                 init_log_sigma2: tuple[float, float] = (-9.0, 0.01), kl_spatial_exponent: float = 0.5) -> Gates:
    """Hook a :class:`VIBGate` onto the output channels of each layer in ``names`` (model made compressible).

    A gate's KL counts ``(H*W) ** kl_spatial_exponent`` times, H*W that of the map it gates
    (see the module docstring for why 0.5).

    The gates are registered as submodules (``<host>.vib_gate``), so they are in the model's
    ``parameters()`` and ``state_dict()`` and travel with checkpoints.
    """
    modules = dict(model.named_modules())
    gates, hosts, handles = {}, {}, []
    for name, (host_name, spatial) in gate_hosts(model, names, input_shape).items():
        host = modules[host_name]
        # drawn on the CPU (the same initial gates on every device), then moved to the layer's device
        gate = VIBGate(modules[name].weight.shape[0], threshold, init_mu, init_log_sigma2, spatial,
                       kl_spatial_exponent).to(modules[name].weight.device)
        host.vib_gate = gate
        handles.append(host.register_forward_hook(_gate_output))
        gates[name], hosts[name] = gate, host_name
    return Gates({name: gates[name] for name in names}, {name: hosts[name] for name in names}, handles)
