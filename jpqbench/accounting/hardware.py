"""Pluggable hardware cost models: what a (soft) precision assignment costs on a target.

Search methods that learn bit widths (``cwmpq``) need a *differentiable* cost to add to the
loss. A cost model gets, for every conv/linear layer, a :class:`LayerCostInput`: the layer's
shape (the harness counter's :class:`~jpqbench.accounting.counter.LayerShape`), the probabilities of each
weight precision per output channel, of each activation precision of the layer's input, and
the probability that each input channel is alive (its producer's channel not pruned). Weight
precision 0 means "pruned". With one-hot probabilities the figure is the cost of one concrete
compressed model; the built-in ``size`` and ``bops`` models then equal the harness counter's
``weight_bits`` and ``bops`` exactly (same conventions: kept fan-in only, 32-bit biases of kept
channels, grouped and depthwise convs per group), which ``tests/unit/test_hardware_cost.py`` checks.

Built-in models, one file each in ``jpqbench/cost_models/``:

* ``size`` -- weight bits (model size), the counter's ``weight_bits``;
* ``bops`` -- bit operations, MACs x b_w x b_a, the counter's ``bops``;
* ``mpic`` -- latency in cycles on the MPIC mixed-precision RISC-V core (Ottavi et al. 2020),
  MACs / (MACs per cycle of the (a_bits, w_bits) pair), the table of Motetti et al. (2024).

Adding a model is one decorated class in one file, in ``jpqbench/cost_models/`` or
in a folder listed in ``JPQBENCH_PLUGIN_PATH``::

    import torch
    from jpqbench.accounting.hardware import CostModel, LayerCostInput
    from jpqbench.base.registry import register_cost_model

    @register_cost_model("my_npu")
    class MyNPU(CostModel):
        '''Cycles on my NPU: MACs / throughput(w_bits, a_bits).'''

        def layer_cost(self, layer: LayerCostInput) -> torch.Tensor:
            return (layer.macs * layer.expected(lambda w, a: 0.0 if w == 0 else 1 / (w * a))).sum()

Methods select it by name (``cwmpq[cost_model=my_npu]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Sequence

import torch
from torch import nn

from jpqbench.accounting.counter import LayerShape
from jpqbench.base.errors import UserError
from jpqbench.base.registry import COST_MODELS
from jpqbench.nn.layers import cpu_copy


@dataclass
class LayerCostInput:
    """One conv/linear layer under a (soft) precision assignment.

    ``w_probs[p, c]``: probability that output channel ``c`` uses weight precision ``w_bits[p]``
    (0 = pruned); ``a_probs[q]``: probability that the layer's input uses ``a_bits[q]``;
    ``in_alive[j]``: probability that input channel ``j`` is alive.
    """

    shape: LayerShape
    w_probs: torch.Tensor
    w_bits: tuple[int, ...]
    a_probs: torch.Tensor
    a_bits: tuple[int, ...]
    in_alive: torch.Tensor

    @property
    def fan_in(self) -> torch.Tensor:
        """Expected kept inputs (alive input channels of its conv group x kernel area) per output channel."""
        s = self.shape
        alive_per_group = self.in_alive.view(s.groups, s.in_channels // s.groups).sum(dim=1)
        return alive_per_group.repeat_interleave(s.out_channels // s.groups) * s.kernel_area

    @property
    def macs(self) -> torch.Tensor:
        """MACs per output channel if it is kept (its expected fan-in at every output position)."""
        return self.fan_in * self.shape.out_pixels

    @property
    def keep(self) -> torch.Tensor:
        """Probability that each output channel is kept (not at 0 bits)."""
        pruned = [p for p, bits in enumerate(self.w_bits) if bits == 0]
        return 1 - self.w_probs[pruned].sum(dim=0) if pruned else torch.ones_like(self.w_probs[0])

    def expected_w_bits(self) -> torch.Tensor:
        """Expected weight bit width per output channel (0 counts for pruned)."""
        bits = torch.tensor(self.w_bits, dtype=self.w_probs.dtype)
        return (self.w_probs * bits[:, None]).sum(dim=0)

    def expected(self, per_mac: Callable[[int, int], float]) -> torch.Tensor:
        """Per output channel, the expectation of ``per_mac(w_bits, a_bits)`` over both assignments."""
        table = torch.tensor([[float(per_mac(w, a)) for a in self.a_bits] for w in self.w_bits],
                             dtype=self.w_probs.dtype)
        return torch.einsum("pc,q,pq->c", self.w_probs, self.a_probs, table)


class CostModel:
    """Base class of a hardware cost model (see the module docstring for how to add one)."""

    name: ClassVar[str] = ""

    def check(self, w_bits: Sequence[int], a_bits: Sequence[int]) -> None:
        """Raise ``ValueError`` if the model is undefined for these precisions (default: all are fine)."""

    def layer_cost(self, layer: LayerCostInput) -> torch.Tensor:
        """The (differentiable, scalar) cost of one layer."""
        raise NotImplementedError

    def total(self, layers: Iterable[LayerCostInput]) -> torch.Tensor:
        return sum((self.layer_cost(layer) for layer in layers), torch.zeros(()))


def get_cost_model(name: str) -> CostModel:
    """A fresh instance of the cost model registered as ``name``."""
    known = COST_MODELS.names()
    if name not in known:
        raise UserError(f"unknown cost model {name!r}",
                        f"use one of: {', '.join(known)}, or add one in jpqbench/cost_models/ (see jpqbench/accounting/hardware.py)")
    return COST_MODELS.get(name)()


@torch.no_grad()
def layer_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, LayerShape]:
    """The shape of every conv/linear layer on one input, with the cost counter's conventions."""
    probe = cpu_copy(model).eval()
    shapes: dict[str, LayerShape] = {}

    def hook(name: str):
        def record(module: nn.Module, args, output: torch.Tensor) -> None:
            x = args[0]
            if isinstance(module, nn.Conv2d):
                shapes[name] = LayerShape("conv", module.in_channels, module.out_channels, module.groups,
                                          module.kernel_size[0] * module.kernel_size[1], x.shape[2] * x.shape[3],
                                          output.shape[2] * output.shape[3], module.bias is not None)
            else:
                positions = x.numel() // x.shape[0] // x.shape[-1]
                shapes[name] = LayerShape("linear", module.in_features, module.out_features, 1, 1,
                                          positions, positions, module.bias is not None)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in probe.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        probe(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return shapes
