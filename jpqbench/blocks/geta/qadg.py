"""QADG: GETA's quantization-aware dependency graph, on torch-pruning's dependency graph.

GETA folds each quantizer into the conv/linear node it quantizes, so that its parameters
(step, range, exponent) travel with the layer and are never pruned. Here every quantizer is
a per-tensor module *inside* its compressible layer (``weight_quantizer``/``input_quantizer``);
the graph is traced on a copy of the model in which those quantizers are identities, so the
traced graph is exactly the conv/linear graph and no quantizer parameter can be a pruning
target. (Upstream traced with private TorchScript/ONNX passes that newer torch removed;
torch-pruning traces through autograd, which works on every zoo model.)

A :class:`PruningGroup` is one torch-pruning group rooted at a conv/linear output: channel
``j`` of the group bundles row ``j`` of every coupled output-side parameter -- the weight
rows and bias of each conv/linear writing the channel (residual partners included, depthwise
convs included) and the scale/shift of each BatchNorm on it. Zeroing those rows makes the
channel exactly zero wherever it is read, so the group can be removed physically. Input-side
slices of the consumers are left alone (they multiply zeros). The classifier's outputs are
never grouped (:func:`jpqbench.nn.channel_pruning.classifier_name`), as in :mod:`jpqbench.nn.channel_pruning`.

A BatchNorm that reads the channels through a channel concatenation (DenseNet-style) is
*auxiliary* (:attr:`CoupledRows.auxiliary`): upstream puts such a node group into the
parameter groups of the layers it concatenates and decays its rows on their own schedule
instead of with the angle-based step (:mod:`jpqbench.blocks.geta.qasso`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from jpqbench.nn.channel_pruning import classifier_name
from jpqbench.nn.layers import compressible_layers, cpu_copy

_BatchNorm = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class CoupledRows:
    """Rows ``rows`` of module ``module`` (a conv/linear or a BatchNorm) belong to group channels ``channels``."""

    module: str
    rows: torch.Tensor  # long, output-channel indices of the module
    channels: torch.Tensor  # long, the group channel of each row
    auxiliary: bool = False  # a BatchNorm behind a channel concatenation


@dataclass(frozen=True)
class PruningGroup:
    root: str
    size: int  # number of channels
    layers: tuple[CoupledRows, ...]  # conv/linear writers of the channels
    norms: tuple[CoupledRows, ...]  # BatchNorms on the channels


def _strip_quantizers(model: nn.Module) -> nn.Module:
    """A copy whose compressible layers have identity quantizers (the folded QADG nodes)."""
    stripped = cpu_copy(model).eval()
    for layer in compressible_layers(stripped).values():
        layer.weight_quantizer = nn.Identity()
        layer.input_quantizer = nn.Identity()
    return stripped


def build_groups(model: nn.Module, input_shape: tuple[int, ...]) -> list[PruningGroup]:
    """The prunable channel groups of ``model`` (module names refer to ``model`` itself)."""
    traced = _strip_quantizers(model)
    names = {id(m): name for name, m in traced.named_modules()}
    head = dict(traced.named_modules())[classifier_name(traced)]
    with torch.enable_grad():  # torch-pruning traces through autograd
        graph = tp.DependencyGraph().build_dependency(traced, torch.ones(1, *input_shape))
    groups: list[PruningGroup] = []
    for group in graph.get_all_groups(ignored_layers=[head], root_module_types=[nn.Conv2d, nn.Linear]):
        layers: list[CoupledRows] = []
        norms: list[CoupledRows] = []
        behind_concat: set[int] = set()  # graph nodes the group reaches through a concatenation
        for item in group.items:  # in traversal order: a dependency's source is reached before its target
            dep = item.dep
            if dep.source.type == tp.ops.OPTYPE.CONCAT or id(dep.source) in behind_concat:
                behind_concat.add(id(dep.target))
            if not graph.is_out_channel_pruning_fn(dep.handler):
                continue
            module = dep.target.module
            if not isinstance(module, (nn.Conv2d, nn.Linear, _BatchNorm)):
                continue
            rows = CoupledRows(names[id(module)], torch.as_tensor(item.idxs, dtype=torch.long),
                               torch.as_tensor(item.root_idxs, dtype=torch.long),
                               isinstance(module, _BatchNorm) and id(dep.target) in behind_concat)
            (norms if isinstance(module, _BatchNorm) else layers).append(rows)
        if not layers:
            continue
        size = int(max(int(r.channels.max()) for r in layers)) + 1
        groups.append(PruningGroup(names[id(group[0].dep.target.module)], size, tuple(layers), tuple(norms)))
    return groups
