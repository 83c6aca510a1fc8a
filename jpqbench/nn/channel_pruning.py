"""Structured channel pruning by masks, on torch-pruning's dependency graph.

torch-pruning (Fang et al., CVPR 2023) finds the *groups* of coupled channels: channel i of
a conv's output, of the BN after it, of every residual partner meeting it at an add, and
the matching input channel of every consumer. Pruning is decided per group, so residual
partners are always pruned together.

jpqbench prunes by **masking** during training (``out_mask`` of the compressible layers and
a mask on each coupled BN), so gradients, quantizers and optimizers keep working on fixed
shapes; the export step removes the masked channels physically. The classifier's outputs
are never pruned.

:class:`ChannelGroups` scores each group once (group L2 magnitude, torch-pruning's
``GroupMagnitudeImportance``) and then turns a pruning ratio into masks without rebuilding
the graph, which makes the budget bisection in :func:`prune_to_budget` cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from jpqbench.base.errors import UserError
from jpqbench.nn.layers import compressible_layers, cpu_copy, make_compressible, mask_batchnorm

ChannelMasks = dict[str, list[int]]  # module name -> pruned output-channel indices


@dataclass
class _Group:
    root: str
    handler: Callable
    order: list[int]  # root channels, least important first


def classifier_name(model: nn.Module) -> str:
    """The last Linear layer: its outputs are the classes and are never pruned."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no Linear classifier")
    return linears[-1]


class ChannelGroups:
    """The prunable channel groups of a model and their magnitude ranking."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        # Work on a CPU copy: tracing runs a forward pass, which must not initialise quantizers,
        # and the ranking is then the same whatever device the model trains on.
        self._model = cpu_copy(model).eval()
        self._names = {id(m): name for name, m in self._model.named_modules()}
        head = dict(self._model.named_modules())[classifier_name(self._model)]
        self._graph = tp.DependencyGraph().build_dependency(self._model, torch.ones(1, *input_shape))
        importance = tp.importance.GroupMagnitudeImportance(p=2)
        self.groups: list[_Group] = []
        for group in self._graph.get_all_groups(ignored_layers=[head], root_module_types=[nn.Conv2d, nn.Linear]):
            root_dep = group[0].dep
            scores = importance(group)
            if scores is None:
                continue
            self.groups.append(_Group(self._names[id(root_dep.target.module)], root_dep.handler,
                                      torch.argsort(scores, stable=True).tolist()))

    def masks(self, ratio: float | dict[str, float]) -> tuple[ChannelMasks, ChannelMasks]:
        """Pruned channels of every conv/linear and BN when each group loses ``round(ratio * n)``.

        ``ratio`` is one number for all groups or a mapping root-layer-name -> ratio. At least one
        channel of every group survives.
        """
        layers: ChannelMasks = {}
        norms: ChannelMasks = {}
        modules = dict(self._model.named_modules())
        for group in self.groups:
            r = ratio.get(group.root, 0.0) if isinstance(ratio, dict) else ratio
            n_prune = min(round(r * len(group.order)), len(group.order) - 1)
            if n_prune <= 0:
                continue
            pruned = sorted(group.order[:n_prune])
            for dep, idxs in self._graph.get_pruning_group(modules[group.root], group.handler, idxs=pruned):
                module = dep.target.module
                if dep.handler.__name__ != "prune_out_channels":
                    continue
                name = self._names.get(id(module))
                target = layers if isinstance(module, (nn.Conv2d, nn.Linear)) else \
                    norms if isinstance(module, nn.modules.batchnorm._BatchNorm) else None
                if target is not None and name is not None:
                    target[name] = sorted(set(target.get(name, [])) | {int(i) for i in idxs})
        return layers, norms


def apply_masks(model: nn.Module, masks: tuple[ChannelMasks, ChannelMasks]) -> None:
    """Set the output masks of the (made compressible) layers and the BN masks; resets earlier masks."""
    layer_masks, norm_masks = masks
    make_compressible(model)
    modules = dict(model.named_modules())
    for name, layer in compressible_layers(model).items():
        layer.out_mask.fill_(1.0)
        layer.out_mask[layer_masks.get(name, [])] = 0.0
    for name, module in modules.items():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (name in norm_masks or hasattr(module, "channel_mask")):
            mask = torch.ones(module.num_features)  # mask_batchnorm keeps it on BN's device
            mask[norm_masks.get(name, [])] = 0.0
            mask_batchnorm(module, mask)
    unknown = set(layer_masks) - set(compressible_layers(model))
    if unknown:
        raise ValueError(f"masks for layers that are not compressible: {sorted(unknown)}")


def prune_to_budget(groups: ChannelGroups, relative_cost: Callable[[tuple[ChannelMasks, ChannelMasks]], float],
                    target: float, max_ratio: float = 0.98, iterations: int = 20) -> tuple[float, tuple[ChannelMasks, ChannelMasks]]:
    """The smallest uniform pruning ratio whose masks bring ``relative_cost`` to ``target`` or below.

    ``relative_cost`` evaluates candidate masks with the harness's counter (and whatever bit
    widths the caller applies), so the choice is made by the same counter that reports it.
    """
    masks = groups.masks(0.0)
    if relative_cost(masks) <= target:
        return 0.0, masks
    best = groups.masks(max_ratio)
    if relative_cost(best) > target:
        raise UserError(f"budget {target} cannot be reached by structured pruning alone "
                        f"(pruning {max_ratio:.0%} of every group still costs {relative_cost(best):.4f})",
                        "choose a larger budget or a method that also quantizes")
    low, high = 0.0, max_ratio
    for _ in range(iterations):
        mid = (low + high) / 2
        candidate = groups.masks(mid)
        if relative_cost(candidate) <= target:
            high, best = mid, candidate
        else:
            low = mid
    return high, best
