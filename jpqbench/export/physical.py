"""From a masked, fake-quantized model to a physically smaller one: copy, remove channels, fold BN.

1. :func:`plain_model` rebuilds the run's architecture from the model zoo and fills it with
   what the compressed model *computes with*: each conv/linear gets its effective
   (fake-quantized, masked) weight and bias, each BN its statistics with masked channels'
   scale and shift set to zero (a masked BN outputs zero, as ``mask_batchnorm`` makes it).
   Every parameter of the plain model must come from the compressed one, and a module or a
   forward hook the export does not know (a method's gate left attached) is refused, since the
   plain model would silently compute something else. Quantizers are not copied: they become
   staircases (:mod:`jpqbench.export.staircase`).
2. :func:`prune_physically` removes channels with torch-pruning, one dependency group at a
   time. A channel of a group is removed only if *every* conv/linear producing it (residual
   partners, a depthwise conv and its producer) is pruned in the plan; a pruned channel whose
   partner lives on stays in the model as a 0-bit channel (all-zero weights). The classifier's
   outputs are never removed, and a group keeps at least one channel.
3. :func:`batchnorm_pairs` finds each BN that reads a conv's output and nothing else (torch.fx
   graph); :func:`fold_factors` gives the per-channel factor ``k`` and shift with which the pair is
   one conv: ``W' = k * W``, ``b' = k * b + shift``. The loader swaps those BNs for identities.

The loader (:mod:`jpqbench.export.artifact`) repeats 1's architecture, 2 and 3 from the
artifact's header, so the exported model and the loaded one are built by the same code.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch_pruning as tp
from torch import nn

from jpqbench.base.errors import UserError
from jpqbench.base.registry import MODELS
from jpqbench.export.handlers import is_activation_operator
from jpqbench.nn.channel_pruning import classifier_name
from jpqbench.nn.layers import _mask_output, batchnorm_affine

_BatchNorm = nn.modules.batchnorm._BatchNorm
_Layer = (nn.Conv2d, nn.Linear)


def build(model_name: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The zoo architecture, in eval mode."""
    return MODELS.get(model_name)(num_classes, tuple(input_shape)).eval()


def _check_structure(compressed: nn.Module, plain: nn.Module) -> None:
    """Refuse a compressed model with modules the export would silently drop.

    Allowed beyond the zoo architecture: the compressible twins of its conv/linear layers with
    their quantizer slots, and noncomm's pre-activation ReLUs with their operator (``pre``).
    """
    from jpqbench.nn.layers import _Compressible

    zoo = dict(plain.named_modules())
    slots: list[str] = []
    for name, module in compressed.named_modules():
        reference = zoo.get(name)
        if reference is None:
            if not any(name.startswith(slot + ".") or name == slot for slot in slots):
                raise UserError(f"module {name} ({type(module).__name__}) of the compressed model is not part of "
                                "the architecture, and the export does not know what it computes",
                                "fold it into the layers before returning the model, or teach jpqbench/export about it")
            continue
        if type(module) is not type(reference):
            if isinstance(module, _Compressible) and isinstance(module, type(reference)):
                slots += [f"{name}.weight_quantizer", f"{name}.input_quantizer"]
            elif is_activation_operator(module) and isinstance(reference, (nn.ReLU, nn.ReLU6)):
                slots.append(f"{name}.pre")
            else:
                raise UserError(f"module {name} is a {type(module).__name__} in the compressed model but a "
                                f"{type(reference).__name__} in the architecture", "export supports the model zoo's modules")


def _check_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
        unknown = [hook for hook in hooks if hook is not _mask_output]
        if unknown:
            raise UserError(f"module {name or '<model>'} of the compressed model carries forward hooks the export "
                            f"does not know ({', '.join(getattr(h, '__name__', repr(h)) for h in unknown)})",
                            "the method must fold or remove its hooks before returning the model")


@torch.no_grad()
def plain_model(compressed: nn.Module, model_name: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The zoo model computing with ``compressed``'s effective weights (no quantizers, no masks)."""
    _check_hooks(compressed)
    plain = build(model_name, num_classes, input_shape)
    _check_structure(compressed, plain)
    source = dict(compressed.named_modules())
    for name, module in plain.named_modules():
        own = list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False) if b is not None]
        if not own:
            continue
        other = source.get(name)
        if isinstance(module, _Layer) and isinstance(other, type(module)):
            weight = other.effective_weight() if hasattr(other, "effective_weight") else other.weight
            bias = other.effective_bias() if hasattr(other, "effective_bias") else other.bias
            if weight.shape != module.weight.shape or (bias is None) != (module.bias is None):
                raise UserError(f"layer {name} of the compressed model does not match {model_name}'s",
                                "export the model with the architecture it was trained as")
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        elif isinstance(module, _BatchNorm) and isinstance(other, _BatchNorm):
            mask = getattr(other, "channel_mask", torch.ones(other.num_features))
            state = other.state_dict()
            module.load_state_dict({key: state[key] for key in module.state_dict()})
            module.weight.mul_(mask)
            module.bias.mul_(mask)
        else:
            raise UserError(f"module {name} ({type(module).__name__}) of {model_name} has state the export cannot "
                            f"take from the compressed model ({type(other).__name__})",
                            "export supports conv, linear and batch-norm layers")
    return plain


def _layer_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules() if isinstance(m, _Layer)}


def prune_physically(model: nn.Module, input_shape: tuple[int, ...], pruned: dict[str, list[int]]
                     ) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Remove, in place, every channel all of whose producers ``pruned`` lists (see module doc).

    Returns ``(removed_out, removed_in)``: per conv/linear layer, the original indices of the
    output channels and of the input channels (after flatten: input features) now gone.
    """
    names = _layer_names(model)
    head = dict(model.named_modules())[classifier_name(model)]
    with torch.enable_grad():  # torch-pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(model, torch.ones(1, *input_shape))
    plans = []
    for group in graph.get_all_groups(ignored_layers=[head], root_module_types=list(_Layer)):
        producers = [(names[id(item.dep.target.module)], item.idxs) for item in group.items
                     if item.dep.handler.__name__ == "prune_out_channels" and id(item.dep.target.module) in names]
        size = len(group.items[0].idxs)
        if any(list(idxs) != list(range(size)) for _, idxs in producers):
            raise UserError(f"layer {producers[0][0]}: its channels are coupled to others through an index "
                            "mapping (concatenation) that the export does not support", "export a model without concat")
        common = set(range(size))
        for name, _ in producers:
            common &= set(pruned.get(name, []))
        removable = sorted(common)[: size - 1]  # a group keeps at least one channel
        if removable:
            plans.append((group.items[0].dep.target.module, group.items[0].dep.handler, removable))
    removed_out: dict[str, list[int]] = {}
    removed_in: dict[str, list[int]] = {}
    for module, handler, idxs in plans:
        group = graph.get_pruning_group(module, handler, idxs=idxs)
        for item in group.items:
            name = names.get(id(item.dep.target.module))
            kind = item.dep.handler.__name__
            if name is None or kind not in ("prune_out_channels", "prune_in_channels"):
                continue
            target = removed_out if kind == "prune_out_channels" else removed_in
            if name in target:
                raise UserError(f"layer {name}: its channels belong to two dependency groups",
                                "export supports one producer group per layer input")
            target[name] = sorted(int(i) for i in item.idxs)
        with torch.no_grad():
            group.prune()
    return removed_out, removed_in


def batchnorm_pairs(model: nn.Module) -> dict[str, str]:
    """conv name -> name of the BN that reads its output and is its only reader; every BN must have one."""
    traced = fx.symbolic_trace(model)
    modules = dict(model.named_modules())
    pairs: dict[str, str] = {}
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        source = node.args[0]
        if (isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(modules[source.target], nn.Conv2d) and len(source.users) == 1):
            pairs[source.target] = node.target
        else:
            raise UserError(f"batch norm {node.target} does not directly follow a conv, so it cannot be folded",
                            "export folds BN into the preceding conv only")
    return pairs


def fold_factors(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, shift)`` with ``BN(y) = k * y + shift`` on running statistics, detached (the export's numbers)."""
    k, shift = batchnorm_affine(bn)
    return k.detach(), shift.detach()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def strip_batchnorm(model: nn.Module, pairs: dict[str, str]) -> None:
    """Replace every paired BN by an identity and give its conv a bias (zeros); weights are set by the caller."""
    for conv_name, bn_name in pairs.items():
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
        _set_module(model, bn_name, nn.Identity())


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: dict[str, str]) -> nn.Module:
    """Fold every paired BN into its conv, in place (the float model whose latency is measured)."""
    for conv_name, bn_name in pairs.items():
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        k, shift = fold_factors(bn)
        conv.weight.mul_(k.view(-1, 1, 1, 1))
        bias = (conv.bias * k if conv.bias is not None else 0.0) + shift
        conv.bias = nn.Parameter(bias.clone())
        _set_module(model, bn_name, nn.Identity())
    return model
