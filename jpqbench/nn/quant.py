"""Fake quantizers shared by the methods and baselines.

One uniform quantizer covers the common cases:

* ``symmetric`` (signed, zero at 0: weights) or ``asymmetric`` (unsigned range with a zero
  point: activations, including post-ReLU ones whose minimum is 0);
* per-tensor or per-channel (``channels > 1``; channel axis 0, the output channel of a
  conv/linear weight);
* the step is either **calibrated** from observed min/max (post-training quantization) or
  **learned** with LSQ (Esser et al., ICLR 2020: gradient scaled by 1/sqrt(numel * q_max),
  initialised at 2 mean|x| / sqrt(q_max));
* rounding uses the straight-through estimator, so the quantizer trains end to end.

Quantizers are built on the CPU and moved with ``.to(device)`` to the layer they serve
(:func:`jpqbench.nn.layers.module_device`); whatever they compute afterwards is made on the
device of the tensor they quantize. A quantizer reports its bit width through :attr:`bits`; the harness's plan checker verifies
that a quantized tensor never takes more than 2**bits distinct values per channel.
``FLOAT_BITS`` (32) stands for "not quantized" everywhere in the harness.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

FLOAT_BITS = 32


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Same value as ``x``; gradient multiplied by ``factor`` (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


class UniformQuantizer(nn.Module):
    """Uniform fake quantizer with a calibrated or LSQ-learned step.

    Knobs: ``bits`` (2..16), ``mode`` ("symmetric" | "asymmetric"), ``channels`` (1 = per
    tensor, C = per output channel along axis 0), ``learn_step`` (LSQ). The step is
    initialised from the first tensor seen (or from :meth:`calibrate`); until then the
    quantizer is uninitialised and refuses to run in eval mode rather than pass floats
    through silently.
    """

    def __init__(self, bits: int, mode: Literal["symmetric", "asymmetric"] = "symmetric",
                 channels: int = 1, learn_step: bool = False) -> None:
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"bits must be in [2, 16], got {bits}")
        self.bits = int(bits)
        self.mode = mode
        self.channels = channels
        self.learn_step = learn_step
        if mode == "symmetric":
            self.q_min, self.q_max = -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1
        else:
            self.q_min, self.q_max = 0, 2 ** bits - 1
        self.step = nn.Parameter(torch.ones(channels), requires_grad=learn_step)
        self.register_buffer("zero_point", torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}, channels={self.channels}, learn_step={self.learn_step}"

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (x.dim() - 1))) if self.channels > 1 else t

    def _reduce(self, x: torch.Tensor, op) -> torch.Tensor:
        if self.channels > 1:
            return op(x.detach().reshape(self.channels, -1), dim=1)
        return op(x.detach().reshape(1, -1), dim=1)

    @torch.no_grad()
    def calibrate(self, x_min: torch.Tensor, x_max: torch.Tensor) -> None:
        """Set step (and zero point) so that [x_min, x_max] maps onto the integer grid."""
        if self.mode == "symmetric":
            step = torch.maximum(x_min.abs(), x_max.abs()) / self.q_max
            zero = torch.zeros_like(step)
        else:  # the range always contains 0, so that zero (padding, ReLU) is exact
            x_min = torch.minimum(x_min, torch.zeros_like(x_min))
            x_max = torch.maximum(x_max, torch.zeros_like(x_max))
            step = (x_max - x_min) / (self.q_max - self.q_min)
            zero = torch.round(-x_min / step.clamp_min(1e-12))
        self.step.copy_(step.clamp_min(1e-8))
        self.zero_point.copy_(zero)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        if self.learn_step:
            mean_abs = self._reduce(x, lambda t, dim: t.abs().mean(dim=dim))
            self.step.copy_((2 * mean_abs / self.q_max ** 0.5).clamp_min(1e-8))
            if self.mode == "asymmetric":
                x_min = self._reduce(x, lambda t, dim: t.amin(dim=dim))
                x_min = torch.minimum(x_min, x_min.new_zeros(1))
                self.zero_point.copy_(torch.round(-x_min / self.step))
            self.initialized.fill_(True)
        else:
            self.calibrate(self._reduce(x, lambda t, dim: t.amin(dim=dim)),
                           self._reduce(x, lambda t, dim: t.amax(dim=dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            if not self.training:
                raise RuntimeError("quantizer used in eval mode before calibration: call calibrate() "
                                   "or run a training-mode batch first")
            self._initialize(x)
        step = self.step
        if self.learn_step and torch.is_grad_enabled():
            # only where a gradient will flow: (x - x*f) + x*f is x up to one float32 rounding
            # that depends on the tensor's size, and evaluation must not
            step = scale_grad(step, 1.0 / (x.numel() / self.channels * self.q_max) ** 0.5)
        step = self._view(step, x)
        zero = self._view(self.zero_point, x)
        # clamp before rounding: LSQ's gradient w.r.t. x is 1 on the whole representable range
        # (including the values that round to q_min / q_max) and 0 only outside it
        q = round_ste(torch.clamp(x / step + zero, self.q_min, self.q_max))
        return (q - zero) * step


class MinMaxObserver(nn.Module):
    """Records running min/max of the tensors passing through (for post-training calibration)."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("x_min", torch.full((channels,), float("inf")))
        self.register_buffer("x_max", torch.full((channels,), float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(self.channels, -1) if self.channels > 1 else x.detach().reshape(1, -1)
        self.x_min = torch.minimum(self.x_min, flat.amin(dim=1))
        self.x_max = torch.maximum(self.x_max, flat.amax(dim=1))
        return x
