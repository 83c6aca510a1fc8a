"""Compressible conv/linear layers: the one place where masks and quantizers meet the math.

:func:`make_compressible` swaps every ``nn.Conv2d`` / ``nn.Linear`` of a model for a
:class:`CompressibleConv2d` / :class:`CompressibleLinear` that *is still* a Conv2d / Linear
(subclass, same parameters, same state-dict keys plus a few buffers), so torch-pruning's
dependency graph, the cost counter and user code keep recognising it. Each one carries:

* ``out_mask``        -- 1/0 per output channel (structured pruning);
* ``weight_quantizer`` -- applied to the weight before the mask (``nn.Identity`` = FP32);
* ``input_quantizer``  -- applied to the layer's input activation (``nn.Identity`` = FP32).

The effective weight is ``weight_quantizer(W) * out_mask``. The *activation* bit width of a
layer is the bit width of its input (the tensor its MACs multiply), which is what BOPs need.

BatchNorm layers that follow a pruned channel are masked too (:func:`mask_batchnorm`):
without that, a pruned channel would still emit BN's bias ``beta`` and could not be removed
physically without changing the network's function.

Methods with their own quantizer family (learned bit widths, channel-wise mixtures) set
their own modules as ``weight_quantizer`` / ``input_quantizer``; such a module must expose
``bits`` -- an ``int``, or a per-output-channel list for weights -- which the plan records.
"""
from __future__ import annotations

import copy
from itertools import chain
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from jpqbench.nn.quant import FLOAT_BITS


class _Compressible:
    """Shared behaviour of the compressible conv and linear layers."""

    out_mask: torch.Tensor
    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_compression(self) -> None:
        self.register_buffer("out_mask", self.weight.new_ones(self.weight.shape[0]))
        self.weight_quantizer: nn.Module = nn.Identity()
        self.input_quantizer: nn.Module = nn.Identity()

    def effective_weight(self) -> torch.Tensor:
        mask = self.out_mask.view(-1, *([1] * (self.weight.dim() - 1)))
        return self.weight_quantizer(self.weight) * mask

    def effective_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias * self.out_mask

    @property
    def weight_bits(self) -> int | list[int]:
        return getattr(self.weight_quantizer, "bits", FLOAT_BITS)

    @property
    def input_bits(self) -> int:
        return int(getattr(self.input_quantizer, "bits", FLOAT_BITS))


class CompressibleConv2d(_Compressible, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.effective_weight(), self.effective_bias())


class CompressibleLinear(_Compressible, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.effective_weight(), self.effective_bias())


CompressibleLayer = CompressibleConv2d | CompressibleLinear


def _swap_class(module: nn.Module, cls: type) -> None:
    # Changing __class__ keeps the very same Parameter objects (optimizers, hooks and
    # state-dict keys stay valid) -- the cheapest faithful "wrap".
    module.__class__ = cls
    module._init_compression()


def make_compressible(model: nn.Module) -> nn.Module:
    """Turn every Conv2d/Linear of ``model`` into its compressible twin, in place. Idempotent."""
    for module in model.modules():
        if isinstance(module, _Compressible):
            continue
        if type(module) is nn.Conv2d:
            _swap_class(module, CompressibleConv2d)
        elif type(module) is nn.Linear:
            _swap_class(module, CompressibleLinear)
        elif isinstance(module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)):
            raise TypeError(f"{type(module).__name__} is not supported by the compressible layers yet")
    return model


def compressible_layers(model: nn.Module) -> dict[str, CompressibleLayer]:
    """Name -> layer for every compressible layer, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _Compressible)}


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU for a module with neither).

    Where a tensor or a module made for ``module`` belongs: methods build quantizers, masks and
    probes on the CPU (the same random draws on every device) and move them here when they
    attach them, so a model on a GPU stays wholly on it.
    """
    tensor = next(chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def cpu_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` on the CPU, for the work that does not depend on the device
    (cost probes, dependency tracing, plan tables).

    Parameters and buffers are copied straight to the CPU, so a model on a GPU is never
    duplicated on it first; gradients are not copied.
    """
    memo: dict[int, torch.Tensor] = {}
    for tensor in chain(model.parameters(), model.buffers()):
        copied = tensor.detach().to("cpu", copy=True)
        memo[id(tensor)] = nn.Parameter(copied, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else copied
    return copy.deepcopy(model, memo)


def _mask_output(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output * module.channel_mask.view(1, -1, *([1] * (output.dim() - 2)))


def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` per channel with ``bn(x) = scale * x + shift`` on its running statistics
    (eval mode); differentiable in BN's weight and bias. Used to fold BN into a conv (export) and
    to gate BN's shift (cwmpq)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0.0)
    return scale, shift


def mask_batchnorm(bn: nn.modules.batchnorm._BatchNorm, mask: torch.Tensor) -> None:
    """Zero the outputs of ``bn`` where ``mask`` is 0 (idempotent; the mask is a buffer on BN's device)."""
    if hasattr(bn, "channel_mask"):
        bn.channel_mask.copy_(mask)
        return
    bn.register_buffer("channel_mask", mask.to(module_device(bn), torch.float32, copy=True))
    bn.register_forward_hook(_mask_output)


@torch.no_grad()
def observe_inputs(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[torch.Tensor],
                   observe: Callable[[str, nn.Module, torch.Tensor], None], *,
                   bypass_input_quantizers: bool = False) -> None:
    """Run ``batches`` through ``model`` in eval mode, calling ``observe(name, layer, x)`` with the
    input each of ``layers`` receives (before its own input quantizer).

    With ``bypass_input_quantizers`` those layers' input quantizers are identities meanwhile,
    so calibration sees float activations. Hooks, quantizers and the training mode are
    restored afterwards, whatever happens.
    """
    def hook(name: str) -> Callable[[nn.Module, tuple], None]:
        def pre_hook(module: nn.Module, args: tuple) -> None:  # returning a value would replace the input
            observe(name, module, args[0])
        return pre_hook

    hooks = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    saved = {name: layer.input_quantizer for name, layer in layers.items()} if bypass_input_quantizers else {}
    was_training = model.training
    model.eval()
    try:
        for name in saved:
            layers[name].input_quantizer = nn.Identity()
        for batch in batches:
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
        for name, quantizer in saved.items():
            layers[name].input_quantizer = quantizer
        model.train(was_training)


def quantized_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``layer`` computes on: its input ``x`` after the layer's input quantizer, if it has one."""
    quantizer = getattr(layer, "input_quantizer", None)
    return quantizer(x) if quantizer is not None else x
