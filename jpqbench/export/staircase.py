"""Activation quantizers as staircases: one representation for every method's input quantizer.

The methods quantize layer inputs with different modules -- uniform min/max or LSQ steps
(:class:`jpqbench.nn.quant.UniformQuantizer`), GETA/DJPQ's learned step/range/exponent
(:mod:`jpqbench.nn.learned_quant`), cwmpq's PACT (exported as a uniform quantizer), noncomm's
power-of-two truncation with a static activation mask (:mod:`jpqbench.blocks.noncomm.qsparse`). In eval mode
each is an elementwise, monotone non-decreasing step function ``f`` with at most ``2**a_bits``
output values, so each is exactly described by its *levels* ``l_0 < ... < l_{L-1}`` and the
*thresholds* ``t_1 < ... < t_{L-1}`` at which it jumps: ``f(x) = l_i`` for
``t_i <= x < t_{i+1}``. :func:`find_staircase` reads both off the quantizer as a black box:
every jump is located to the exact float32 by bisection over the ordered float32 bit
patterns (a monotone ``f`` equal at both ends of an interval is constant on it, so no jump
can hide), which costs about 32 vectorised calls of ``f``. No method file is touched, and a
new quantizer works as long as it is elementwise and monotone -- :func:`staircase_of` checks
that the staircase reproduces the quantizer exactly on real activations and refuses otherwise.
The quantizer is always evaluated inside tensors of one canonical size (see :func:`_at_size`).

:class:`Staircase` runs the table: ``levels[number of thresholds <= x]``.
noncomm's static activation mask (unstructured activation pruning) is kept beside it as a
0/1 ``mask`` over one sample, applied before the steps, as noncomm does.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from jpqbench.base.errors import UserError
from jpqbench.export.handlers import split_mask
from jpqbench.nn.quant import FLOAT_BITS

_FLOAT_MAX_BITS = 0x7F7FFFFF  # bit pattern of the largest finite float32
_MAX_CORRECTION_STEPS = 6  # beyond this, Staircase's bucket table is slower than torch.bucketize


def _to_key(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 key that sorts like the float (-0.0 just below +0.0)."""
    bits = x.view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)


def _from_key(key: torch.Tensor) -> torch.Tensor:
    bits = torch.where(key >= 0, key, (-(key + 1)) | 0x80000000)
    bits = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits)  # back to int32's two's complement range
    return bits.to(torch.int32).view(torch.float32)


@torch.no_grad()
def find_staircase(fn, max_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(levels, thresholds)`` of the monotone step function ``fn`` over all finite float32.

    ``fn`` maps a 1-D float32 tensor elementwise. Raises ``ValueError`` when ``fn`` has more
    than ``max_levels`` levels (the plan's ``2**a_bits``) or is not monotone non-decreasing.
    """
    ends = torch.tensor([-_FLOAT_MAX_BITS - 1, _FLOAT_MAX_BITS], dtype=torch.int64)  # keys of -max, +max
    low, high = ends[:1], ends[1:]
    f_low, f_high = fn(_from_key(low)), fn(_from_key(high))
    jumps: list[torch.Tensor] = []
    while low.numel():
        if low.numel() > max_levels:
            raise ValueError(f"more than {max_levels} levels")
        done = high - low == 1
        jumps.append(high[done])
        low, high, f_low, f_high = low[~done], high[~done], f_low[~done], f_high[~done]
        if not low.numel():
            break
        mid = (low + high) // 2
        f_mid = fn(_from_key(mid))
        left, right = f_low != f_mid, f_mid != f_high
        low, high, f_low, f_high = (torch.cat([low[left], mid[right]]), torch.cat([mid[left], high[right]]),
                                    torch.cat([f_low[left], f_mid[right]]), torch.cat([f_mid[left], f_high[right]]))
    thresholds = _from_key(torch.sort(torch.cat(jumps)).values)
    levels = torch.cat([fn(_from_key(ends[:1])), fn(thresholds)])
    if levels.numel() > max_levels:
        raise ValueError(f"{levels.numel()} levels, more than {max_levels}")
    if levels.numel() > 1 and not bool((levels[1:] > levels[:-1]).all()):
        raise ValueError("the quantizer is not monotone non-decreasing")
    return levels.contiguous(), thresholds.contiguous()


class Staircase(nn.Module):
    """``levels[i(x * mask)]`` with ``i(x)`` = the number of thresholds ``<= x``: an exported activation quantizer.

    Without levels it only applies the mask (a float input with static activation pruning).

    ``torch.bucketize`` finds ``i`` exactly but costs ~100 ns per element on a CPU (the inputs of
    a DS-CNN test batch took tens of milliseconds per layer), so the lookup is a bucket table:
    equal buckets over ``[t_1, t_{L-1}]`` (at least ``8 * (L - 1)``, more where thresholds
    crowd, so that two neighbouring buckets hold at most one threshold) give a first guess of
    ``i`` (the count of thresholds up to the bucket's start), which is then moved up while
    ``x >= t_{i+1}`` and down while ``x < t_i`` for a fixed number of steps -- enough to cover
    the thresholds of neighbouring buckets, so the guess is corrected even when float rounding
    puts ``x`` in the bucket next to its own. The result equals ``bucketize`` exactly (tested);
    thresholds too crowded for a table of 2**20 buckets fall back to ``bucketize`` itself.
    """

    def __init__(self, levels: torch.Tensor, thresholds: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        super().__init__()
        if thresholds.numel() != max(levels.numel() - 1, 0):
            raise ValueError(f"{levels.numel()} levels need {levels.numel() - 1} thresholds, got {thresholds.numel()}")
        self.register_buffer("levels", levels.float().contiguous())
        self.register_buffer("thresholds", thresholds.float().contiguous())
        self.register_buffer("mask", None if mask is None else mask.float())
        self._build_lookup()

    def _build_lookup(self, max_steps: int = 1, max_buckets: int = 2 ** 20) -> None:
        t = self.thresholds.double()
        n = t.numel()
        low = float(t[0]) if n else 0.0
        span = float(t[-1]) - low if n else 0.0
        buckets = max(8 * n, 1)
        while True:  # finer buckets until the correction needs at most max_steps steps each way
            edges = low + torch.arange(buckets + 1, dtype=torch.float64) * (span / buckets)
            starts = torch.searchsorted(t, edges, right=True)
            # x in bucket k (or, by rounding or clamping, k +- 1 or outside the range) has its index in
            # [starts[k-1], starts[k+1]], with starts[-1] = 0 (x below t_1)
            ahead = starts[1:]
            behind = torch.cat([torch.zeros(1, dtype=starts.dtype), starts[:-2]])
            steps = int((ahead - behind).max()) if n else 0
            if steps <= max_steps or 2 * buckets > max_buckets:
                break
            buckets *= 2
        if steps > _MAX_CORRECTION_STEPS:  # thresholds too crowded for the table: plain bucketize
            starts, buckets, steps = starts[:1], 1, -1
        self.low, self.buckets, self.steps = low, buckets, steps
        self.inverse_width = buckets / span if span > 0 else 0.0
        inf = torch.tensor([float("inf")])
        self.register_buffer("_starts", starts[:-1].int(), persistent=False)
        self.register_buffer("_upper", torch.cat([self.thresholds, inf]), persistent=False)  # t_{i+1}
        self.register_buffer("_lower", torch.cat([-inf, self.thresholds]), persistent=False)  # t_i

    @property
    def bits(self) -> int:
        """Bits needed to index the levels (what the plan's ``a_bits`` claims at most); 32 without levels."""
        if not self.levels.numel():
            return FLOAT_BITS
        return max(1, math.ceil(math.log2(self.levels.numel())))

    def extra_repr(self) -> str:
        return f"levels={self.levels.numel()}, masked={self.mask is not None}"

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """The number of thresholds ``<= x``, elementwise (``bucketize(x, thresholds, right=True)``), as int32."""
        if self.steps < 0:
            return torch.bucketize(x, self.thresholds, right=True, out_int32=True)
        flat = x.reshape(-1)
        bucket = ((flat - self.low) * self.inverse_width).clamp_(0, self.buckets - 1).int()
        i = self._starts.index_select(0, bucket)  # index_select: ~20x faster than t[i] on a CPU
        for _ in range(self.steps):
            i += flat >= self._upper.index_select(0, i)
        for _ in range(self.steps):
            i -= (flat < self._lower.index_select(0, i)).int()
        return i.view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            x = x * self.mask
        if not self.levels.numel():  # a float input that is only masked
            return x
        return self.levels.index_select(0, self.index(x).reshape(-1)).view(x.shape)


CANONICAL_SIZE = 4096


def _at_size(quantizer: nn.Module, size: int):
    """``quantizer`` applied elementwise to a 1-D tensor, always inside tensors of ``size`` elements.

    LSQ's step-gradient scaling (:func:`jpqbench.nn.quant.scale_grad`) is applied in eval mode too
    and depends on the tensor's size: the step, and so the output, moves by a float32 ulp from
    one size to another (the fake-quantized model's own output depends on its batch size at
    that level). The staircase is read at one canonical size, :data:`CANONICAL_SIZE`.
    """
    def fn(x: torch.Tensor) -> torch.Tensor:
        chunks = []
        for start in range(0, x.numel(), size):
            part = x[start:start + size]
            padded = torch.cat([part, torch.zeros(size - part.numel(), dtype=part.dtype)])
            chunks.append(quantizer(padded)[:part.numel()].float())
        return torch.cat(chunks) if chunks else x.float()
    return fn


@torch.no_grad()
def staircase_of(what: str, quantizer: nn.Module, a_bits: int, seen: torch.Tensor) -> Staircase:
    """The :class:`Staircase` of an activation quantizer, checked on ``seen`` (inputs it really received).

    The check is exact equality with the quantizer's own output; anything else (a quantizer
    that is not elementwise, or not monotone) is refused, naming ``what`` (e.g. "layer fc's input").
    """
    was_training = quantizer.training
    quantizer.eval()
    try:
        elementwise, mask = split_mask(quantizer)
        fn = _at_size(elementwise, CANONICAL_SIZE)
        levels, thresholds = find_staircase(fn, 2 ** a_bits)
        table = Staircase(levels, thresholds, mask)
        expected = fn((seen * mask if mask is not None else seen).reshape(-1)).view(seen.shape)
        got = table(seen)
    except ValueError as error:
        raise UserError(f"the quantizer of {what} ({type(quantizer).__name__}) cannot be "
                        f"exported as a {a_bits}-bit staircase: {error}",
                        "export supports elementwise, monotone quantizers of at most 2**a_bits levels") from None
    finally:
        quantizer.train(was_training)
    if not torch.equal(expected, got):
        raise UserError(f"the staircase of {what}'s quantizer ({type(quantizer).__name__}) "
                        f"differs from the quantizer on real inputs (max |diff| {float((expected - got).abs().max()):.3g})",
                        "export supports elementwise, monotone quantizers only")
    return table
