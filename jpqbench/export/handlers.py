"""The table through which a method teaches the export about the modules it adds to a model.

The export understands the model zoo's modules and the compressible layers (their weight and
input quantizers). A method that puts modules of its own into the model registers them here,
where it defines them, so that the export never imports a method's code:

* an **activation operator** stands where the architecture has a ``ReLU``/``ReLU6`` and applies
  a quantizer, its attribute ``pre``, to the activation's input (noncomm's pre-ReLU operators):
  :func:`register_activation_operator`;
* a **masked quantizer** is an input quantizer made of a static channel/element mask and a
  per-tensor quantizer (noncomm's activation prune+quantize operators):
  :func:`register_masked_quantizer` with a function that takes it apart into
  ``(quantizer, mask or None)``.

The export is the layer below the methods' building blocks (``jpqbench.blocks``), which register
themselves on import; a model holding such a module was built, or unpickled, by importing them.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

SplitMask = Callable[[nn.Module], "tuple[nn.Module, torch.Tensor | None]"]

_ACTIVATION_OPERATORS: list[type[nn.Module]] = []
_MASKED_QUANTIZERS: dict[type[nn.Module], SplitMask] = {}


def register_activation_operator(cls: type[nn.Module]) -> type[nn.Module]:
    """Declare ``cls`` an activation operator (usable as a class decorator)."""
    if cls not in _ACTIVATION_OPERATORS:
        _ACTIVATION_OPERATORS.append(cls)
    return cls


def register_masked_quantizer(cls: type[nn.Module], split: SplitMask) -> None:
    """Declare ``cls`` a masked quantizer, taken apart by ``split(module) -> (quantizer, mask or None)``."""
    _MASKED_QUANTIZERS[cls] = split


def is_activation_operator(module: nn.Module) -> bool:
    return isinstance(module, tuple(_ACTIVATION_OPERATORS))


def split_mask(quantizer: nn.Module) -> tuple[nn.Module, torch.Tensor | None]:
    """A masked quantizer's (quantizer, mask); any other quantizer is returned with no mask."""
    for cls, split in _MASKED_QUANTIZERS.items():
        if isinstance(quantizer, cls):
            return split(quantizer)
    return quantizer, None
