"""Uniform quantization of a whole model, shared by the baselines and the sequential pipelines.

Weights: symmetric, per output channel. Inputs (activations): asymmetric, per tensor. The
step is calibrated from min/max over training batches (post-training quantization) and,
when ``learn_step`` is set, then learned with LSQ during fine-tuning.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from jpqbench.base.errors import UserError
from jpqbench.nn.layers import compressible_layers, make_compressible, observe_inputs
from jpqbench.nn.quant import MinMaxObserver, UniformQuantizer


def quantize_uniform(model: nn.Module, w_bits: int, a_bits: int, learn_step: bool = False) -> None:
    """Give every conv/linear a ``w_bits`` weight quantizer and an ``a_bits`` input quantizer."""
    make_compressible(model)
    for layer in compressible_layers(model).values():
        device = layer.weight.device
        layer.weight_quantizer = UniformQuantizer(w_bits, "symmetric", channels=layer.weight.shape[0],
                                                  learn_step=learn_step).to(device)
        layer.input_quantizer = UniformQuantizer(a_bits, "asymmetric", channels=1, learn_step=learn_step).to(device)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Min/max calibration of every uniform quantizer on training batches (in eval mode).

    Weight quantizers are calibrated on their weight; input quantizers on the activations
    that reach them while every input quantizer is bypassed and weights are already
    quantized (the input of layer l is observed as the float activation of the network with
    quantized weights).
    """
    layers = compressible_layers(model)
    for layer in layers.values():
        quantizer = layer.weight_quantizer
        if isinstance(quantizer, UniformQuantizer):
            flat = layer.weight.detach().reshape(quantizer.channels, -1)
            quantizer.calibrate(flat.amin(dim=1), flat.amax(dim=1))
    observers = {name: MinMaxObserver().to(layer.weight.device) for name, layer in layers.items()}
    observe_inputs(model, layers, batches, lambda name, layer, x: observers[name](x), bypass_input_quantizers=True)
    for name, layer in layers.items():
        if isinstance(layer.input_quantizer, UniformQuantizer):
            layer.input_quantizer.calibrate(observers[name].x_min, observers[name].x_max)


def largest_uniform_bits(relative_cost: Callable[[int], float], target: float,
                         candidates: Iterable[int] = (8, 7, 6, 5, 4, 3, 2)) -> int:
    """The largest bit width ``b`` (weights and activations at ``b``) whose cost meets ``target``.

    ``relative_cost(b)`` is evaluated with the harness's counter, so the choice is made by the
    same counter that reports the run.
    """
    candidates = sorted(candidates, reverse=True)
    for bits in candidates:
        if relative_cost(bits) <= target:
            return bits
    raise UserError(f"budget {target} cannot be reached by uniform {candidates[-1]}-bit quantization "
                    f"(it costs {relative_cost(candidates[-1]):.4f} of FP32)",
                    "choose a larger budget or a method that also prunes")


def quantize_within_budget(model: nn.Module, relative_cost: Callable[[int], float], target: float,
                           batches: Iterable[torch.Tensor], learn_step: bool) -> int:
    """Uniformly quantize ``model`` at the largest bit width within ``target`` and calibrate it.

    Returns the bit width. ``relative_cost(b)`` is the counted relative cost at ``b`` bits.
    """
    bits = largest_uniform_bits(relative_cost, target)
    quantize_uniform(model, bits, bits, learn_step=learn_step)
    calibrate(model, batches)
    return bits
