"""Power-of-two quantizers and scheduled magnitude pruners of Zhang et al. (arXiv 2110.08271).

The building blocks of the ``noncomm`` method (upstream code: mlzxy/qsparse), written so that
*when* each operator switches on is decided from outside (a training schedule), while *what*
it does is fixed here:

* :func:`quantize_pow2` -- ``clamp(trunc(x * 2^d), -2^(b-1), 2^(b-1) - 1) * 2^-d``: signed
  fixed point with ``d`` fractional bits, so that rescaling is a shift in integer hardware.
  Straight-through gradient: 1 where truncation alone lands on the grid, 0 where it saturates.
* :class:`Pow2Quantizer` -- the identity until it is switched on; while *observing* it adds,
  for every candidate ``d``, the squared quantization error of the tensor it sees, and at
  switch-on it keeps the ``d`` with the least error summed over that window of recent tensors
  (the MSE over their concatenation). ``d`` is chosen once and never revisited. Per output
  channel (axis 0) for weights, per tensor for activations.
* :func:`magnitude_mask` and :func:`cubic_sparsity` -- nested unstructured magnitude pruning
  on Zhu & Gupta's cubic schedule ``s_k = s_f * (1 - (1 - k/n)^3)``.
* :class:`WeightPQ` -- a layer's ``weight_quantizer`` slot computing ``Q(P(W))``: unstructured
  per-layer magnitude pruning of the current weight, then per-channel quantization.
* :class:`ActivationPQ` -- a layer's ``input_quantizer`` slot computing ``Q(P(x))``: a static
  mask over one sample's (C, H, W) (or features) chosen from mean |activation| over a window
  of recent batches -- the same positions are zero for every input -- then per-tensor
  quantization.

Window statistics live in buffers, so a run resumed from an epoch checkpoint inside a window
ends exactly as an uninterrupted one. Operators only observe or fire in training mode; in
eval mode they are pure functions of their state.
"""
from __future__ import annotations

import torch
from torch import nn

from jpqbench.quant import FLOAT_BITS


def quantize_pow2(x: torch.Tensor, bits: int, decimal: torch.Tensor) -> torch.Tensor:
    """Power-of-two fixed-point quantization with a clipped straight-through gradient.

    ``decimal`` (fractional bits ``d``) must broadcast against ``x``. Multiplying and dividing
    by ``2^d`` is exact in floating point, so the output lies exactly on the grid ``k * 2^-d``.
    """
    scale = torch.exp2(decimal)
    limit = 2 ** (bits - 1)
    # clamping to [-limit - 1, limit] first changes no output (truncation then saturates to the
    # grid anyway) and gives the gradient: 1 where truncation alone lands on the grid, else 0
    scaled = torch.clamp(x * scale, -limit - 1, limit)
    q = torch.clamp(torch.trunc(scaled), -limit, limit - 1)
    return (scaled + (q - scaled).detach()) / scale


class Pow2Quantizer(nn.Module):
    """Power-of-two quantizer whose fractional bits are chosen by least squared error at switch-on.

    ``channels`` = 1 quantizes per tensor; C > 1 per channel along axis 0 (a weight's output
    channel). ``decimals`` are the candidate fractional bit counts (upstream: 0..19).
    """

    def __init__(self, bits: int, channels: int = 1, decimals: range = range(0, 20)) -> None:
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"bits must be in [2, 16], got {bits}")
        self.bits = int(bits)
        self.channels = channels
        self.register_buffer("candidates", torch.tensor(list(decimals), dtype=torch.float32))
        self.register_buffer("errors", torch.zeros(len(decimals), channels, dtype=torch.float64))
        self.register_buffer("decimal", torch.zeros(channels))
        self.register_buffer("enabled", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.channels}, enabled={bool(self.enabled)}"

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().reshape(self.channels, -1)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Add the squared error of quantizing ``x`` at every candidate ``d`` to the window's sums."""
        flat = self._flat(x)
        limit = 2 ** (self.bits - 1)
        for index, scale in enumerate(torch.exp2(self.candidates).tolist()):
            grid = torch.trunc(flat * scale).clamp_(-limit, limit - 1).div_(scale)
            self.errors[index] += grid.sub_(flat).square_().sum(dim=1, dtype=torch.float64)

    @torch.no_grad()
    def switch_on(self) -> None:
        """Fix ``d`` per channel at the candidate with the least summed error, and start quantizing."""
        self.decimal.copy_(self.candidates[self.errors.argmin(dim=0)])
        self.errors.zero_()
        self.enabled.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.enabled):
            return x
        decimal = self.decimal.view(-1, *([1] * (x.dim() - 1))) if self.channels > 1 else self.decimal
        return quantize_pow2(x, self.bits, decimal)


def cubic_sparsity(final: float, k: int, n: int) -> float:
    """Zhu & Gupta's sparsity after the k-th of n pruning steps: ``final * (1 - (1 - k/n)^3)``."""
    return final * (1.0 - (1.0 - k / n) ** 3)


@torch.no_grad()
def magnitude_mask(importance: torch.Tensor, mask: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A 0/1 mask like ``mask`` with ``round(sparsity * numel)`` zeros: the old zeros plus the
    least important remaining entries (ties broken by position, so the result is deterministic).

    Masks are nested -- an entry once pruned stays pruned -- so sparsity only grows, as in the
    cubic schedule.
    """
    flat_mask = mask.reshape(-1).bool()
    n_zero = max(round(sparsity * mask.numel()), int((~flat_mask).sum()))
    score = torch.where(flat_mask, importance.reshape(-1).double(), float("-inf"))
    order = torch.argsort(score, stable=True)
    new = torch.ones(mask.numel(), dtype=mask.dtype, device=mask.device)
    new[order[:n_zero]] = 0
    return new.view_as(mask)


class _MaskedQuantized(nn.Module):
    """What the plan reads off both operators: bits once the quantizer is on, the mask's sparsity."""

    quantizer: Pow2Quantizer
    mask: torch.Tensor

    @property
    def bits(self) -> int:
        return self.quantizer.bits if bool(self.quantizer.enabled) else FLOAT_BITS

    @property
    def sparsity(self) -> float:
        return int((self.mask == 0).sum()) / self.mask.numel()


class WeightPQ(_MaskedQuantized):
    """``Q(P(W))`` for a compressible layer's ``weight_quantizer`` slot.

    :meth:`arm` tells it what the next training forward should do: prune to a sparsity (by the
    magnitude of the current weight), add the pruned weight to the quantizer's window, switch
    the quantizer on. ``bits`` is the quantizer's width once it is on, 32 before.
    """

    def __init__(self, weight_shape: torch.Size, bits: int, decimals: range) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(weight_shape))
        self.quantizer = Pow2Quantizer(bits, channels=weight_shape[0], decimals=decimals)
        self.arm()

    def arm(self, prune_to: float | None = None, observe: bool = False, switch_on: bool = False) -> None:
        self._prune_to, self._observe, self._switch_on = prune_to, observe, switch_on

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training and self._prune_to is not None:
            self.mask.copy_(magnitude_mask(weight.detach().abs(), self.mask, self._prune_to))
            self._prune_to = None
        pruned = weight * self.mask
        if self.training and self._observe:
            self.quantizer.observe(pruned)
        if self.training and self._switch_on:
            self.quantizer.switch_on()
            self._switch_on = False
        return self.quantizer(pruned)


class ActivationPQ(_MaskedQuantized):
    """``Q(P(x))`` for a compressible layer's ``input_quantizer`` slot.

    The pruning mask has the shape of one sample (``sample_shape``: (C, H, W) or (features,))
    and is static: chosen from the mean |x| accumulated while armed to observe, then fixed for
    every input until the next pruning step. ``prunable=False`` (the network input, the
    classifier's input) keeps the mask at ones and only quantizes.
    """

    def __init__(self, sample_shape: torch.Size, bits: int, decimals: range, prunable: bool) -> None:
        super().__init__()
        self.prunable = prunable
        self.register_buffer("mask", torch.ones(sample_shape))
        self.register_buffer("magnitude_sum", torch.zeros(sample_shape, dtype=torch.float64))
        self.register_buffer("magnitude_count", torch.tensor(0, dtype=torch.int64))
        self.quantizer = Pow2Quantizer(bits, channels=1, decimals=decimals)
        self.arm()

    def arm(self, prune_to: float | None = None, observe_magnitude: bool = False, observe: bool = False,
            switch_on: bool = False) -> None:
        if not self.prunable:
            prune_to, observe_magnitude = None, False
        self._prune_to, self._observe_magnitude = prune_to, observe_magnitude
        self._observe, self._switch_on = observe, switch_on

    @torch.no_grad()
    def _update_mask(self, x: torch.Tensor) -> None:
        if self._observe_magnitude:
            self.magnitude_sum += x.detach().abs().sum(dim=0).double()
            self.magnitude_count += x.shape[0]
        if self._prune_to is not None:
            mean = self.magnitude_sum / self.magnitude_count.clamp_min(1)
            self.mask.copy_(magnitude_mask(mean, self.mask, self._prune_to))
            self.magnitude_sum.zero_()
            self.magnitude_count.zero_()
            self._prune_to = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._update_mask(x)
        pruned = x * self.mask if self.prunable else x
        if self.training and self._observe:
            self.quantizer.observe(pruned)
        if self.training and self._switch_on:
            self.quantizer.switch_on()
            self._switch_on = False
        return self.quantizer(pruned)
