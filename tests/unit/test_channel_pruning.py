"""Structured pruning by masks (jpqbench.nn.channel_pruning) on resnet20: groups, masks, and equivalence with
torch-pruning's physical channel removal."""
from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from jpqbench.accounting.counter import count
from jpqbench.accounting.plan import CompressionPlan, plan_from_model, with_pruned
from jpqbench.accounting.verify import verify_plan
from jpqbench.base.errors import UserError
from jpqbench.base.registry import MODELS
from jpqbench.nn.channel_pruning import ChannelGroups, apply_masks, classifier_name, prune_to_budget
from jpqbench.nn.layers import compressible_layers

SHAPE = (3, 32, 32)

# residual-coupled output channels of resnet20 (stage -> convs that write into the same sum)
COUPLED = [
    ["stem.0", "blocks.0.body.3", "blocks.1.body.3", "blocks.2.body.3"],
    ["blocks.3.shortcut.0", "blocks.3.body.3", "blocks.4.body.3", "blocks.5.body.3"],
    ["blocks.6.shortcut.0", "blocks.6.body.3", "blocks.7.body.3", "blocks.8.body.3"],
]
WIDTHS = {"stem.0": 16, "blocks.3.shortcut.0": 32, "blocks.6.shortcut.0": 64}


def _randomised_resnet20() -> nn.Module:
    torch.manual_seed(0)
    model = MODELS.get("resnet20")(10, SHAPE)
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # non-trivial BN so an unmasked channel would show
            n = module.num_features
            module.weight.data = torch.rand(n, generator=gen) + 0.5
            module.bias.data = torch.randn(n, generator=gen) * 0.2
            module.running_mean = torch.randn(n, generator=gen) * 0.1
            module.running_var = torch.rand(n, generator=gen) + 0.5
    return model.eval()


@pytest.fixture(scope="module")
def fp32() -> nn.Module:
    return _randomised_resnet20()


@pytest.fixture(scope="module")
def groups(fp32: nn.Module) -> ChannelGroups:
    return ChannelGroups(fp32, SHAPE)


def test_groups_cover_every_prunable_channel_once(groups: ChannelGroups) -> None:
    roots = [g.root for g in groups.groups]
    assert len(roots) == len(set(roots)) == 12  # 9 block-internal groups + 3 residual stages
    for group in groups.groups:
        assert sorted(group.order) == list(range(len(group.order)))


def test_residual_coupled_convs_prune_identical_channels(groups: ChannelGroups) -> None:
    layers, norms = groups.masks(0.4)
    for stage in COUPLED:
        pruned = [layers[name] for name in stage]
        assert all(p == pruned[0] for p in pruned), stage
        assert len(pruned[0]) == round(0.4 * WIDTHS[stage[0]])
        # the BN after each coupled conv is masked identically
        for name in stage:
            prefix, index = name.rsplit(".", 1)
            assert norms[f"{prefix}.{int(index) + 1}"] == pruned[0]


def test_classifier_is_never_pruned(fp32: nn.Module, groups: ChannelGroups) -> None:
    assert classifier_name(fp32) == "fc"
    for ratio in (0.3, 0.98):
        layers, _ = groups.masks(ratio)
        assert "fc" not in layers


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.99])
def test_masks_prune_round_ratio_n_per_group(groups: ChannelGroups, ratio: float) -> None:
    layers, norms = groups.masks(ratio)
    for group in groups.groups:
        n = len(group.order)
        expected = min(round(ratio * n), n - 1)  # at least one channel survives
        assert len(layers[group.root]) == expected, group.root
        # the least important channels (by group magnitude) go first
        assert layers[group.root] == sorted(group.order[:expected])


def test_masks_accept_per_group_ratios(groups: ChannelGroups) -> None:
    layers, _ = groups.masks({"blocks.0.body.0": 0.5})
    assert set(layers) == {"blocks.0.body.0"} and len(layers["blocks.0.body.0"]) == 8
    assert groups.masks(0.0) == ({}, {})


def test_smallest_magnitude_channel_is_pruned_first(fp32: nn.Module) -> None:
    model = copy.deepcopy(fp32)
    with torch.no_grad():  # channel 11 of block 4's inner group is the weakest everywhere it appears
        model.blocks[4].body[0].weight[11] *= 1e-3
        model.blocks[4].body[1].weight[11] *= 1e-3
        model.blocks[4].body[1].bias[11] *= 1e-3
        model.blocks[4].body[3].weight[:, 11] *= 1e-3
    layers, norms = ChannelGroups(model, SHAPE).masks({"blocks.4.body.0": 1 / 32})
    assert layers == {"blocks.4.body.0": [11]} and norms == {"blocks.4.body.1": [11]}


def test_apply_masks_zeroes_weights_and_bn_outputs(fp32: nn.Module, groups: ChannelGroups) -> None:
    model = copy.deepcopy(fp32)
    layers, norms = groups.masks(0.5)
    apply_masks(model, (layers, norms))
    modules = dict(model.named_modules())
    for name, layer in compressible_layers(model).items():
        weight = layer.effective_weight()
        pruned = layers.get(name, [])
        assert weight[pruned].abs().sum() == 0
        kept = [c for c in range(weight.shape[0]) if c not in pruned]
        assert (weight[kept].flatten(1).abs().sum(dim=1) > 0).all()
    outputs = {}
    hooks = [modules[name].register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
             for name in norms]
    model(torch.randn(4, *SHAPE))
    for hook in hooks:
        hook.remove()
    for name, pruned in norms.items():
        assert outputs[name][:, pruned].abs().sum() == 0, name
        kept = [c for c in range(outputs[name].shape[1]) if c not in pruned]
        assert (outputs[name][:, kept].abs().flatten(1).sum(dim=1) > 0).all()
    # the plan read off the masked model is accepted by the harness's checker
    verify_plan(plan_from_model(model, "prune"), model, torch.randn(4, *SHAPE))


def test_apply_masks_resets_earlier_masks(fp32: nn.Module, groups: ChannelGroups) -> None:
    model = copy.deepcopy(fp32)
    apply_masks(model, groups.masks(0.5))
    apply_masks(model, groups.masks(0.25))
    layers, _ = groups.masks(0.25)
    assert plan_from_model(model, "p").layers["stem.0"].pruned == layers["stem.0"]
    apply_masks(model, groups.masks(0.0))
    assert all(not layer.pruned for layer in plan_from_model(model, "p").layers.values())
    assert all(bool(bn.channel_mask.all()) for bn in model.modules() if hasattr(bn, "channel_mask"))


def _physically_pruned(fp32: nn.Module, groups: ChannelGroups, layers: dict[str, list[int]]) -> nn.Module:
    physical = copy.deepcopy(fp32)
    graph = tp.DependencyGraph().build_dependency(physical, example_inputs=torch.randn(1, *SHAPE))
    modules = dict(physical.named_modules())
    for group in groups.groups:
        idxs = layers.get(group.root, [])
        if idxs:
            graph.get_pruning_group(modules[group.root], tp.prune_conv_out_channels, idxs=idxs).prune()
    return physical


@pytest.mark.parametrize("ratio", [0.5])
def test_masking_equals_physical_removal(fp32: nn.Module, groups: ChannelGroups, ratio: float) -> None:
    layers, norms = groups.masks(ratio)
    physical = _physically_pruned(fp32, groups, layers).eval()
    masked = copy.deepcopy(fp32)
    apply_masks(masked, (layers, norms))
    masked.eval()
    # the physical copy really is smaller, by exactly the masked channels
    for name, module in physical.named_modules():
        if isinstance(module, nn.Conv2d):
            assert module.out_channels == dict(fp32.named_modules())[name].out_channels - len(layers.get(name, []))
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got, dense = physical(x), masked(x), fp32(x)
    assert not torch.allclose(expected, dense, atol=1e-3)  # pruning changed the function ...
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # ... exactly as removal does
    # and the counter's MACs for the plan equal the dense MACs of the physically pruned model
    assert count(masked, SHAPE, plan_from_model(masked, "p")).macs == count(physical, SHAPE).macs


DIGITS = (1, 8, 8)


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, ChannelGroups]:
    torch.manual_seed(0)
    model = MODELS.get("digits_cnn")(10, DIGITS)
    return model, ChannelGroups(model, DIGITS)


def _relative_bops(model: nn.Module):
    dense = CompressionPlan.dense(model)
    return lambda masks: count(model, DIGITS, with_pruned(dense, masks[0])).relative_bops


def test_prune_to_budget_meets_the_target_with_the_smallest_ratio(digits) -> None:
    model, groups = digits
    cost = _relative_bops(model)
    ratio, masks = prune_to_budget(groups, cost, 0.3, iterations=8)
    assert 0 < ratio < 0.98
    assert cost(masks) <= 0.3
    assert masks == groups.masks(ratio)
    # cost is monotone in the ratio; a clearly smaller ratio (beyond the 1/32 rounding plateau) misses
    assert cost(groups.masks(ratio - 0.05)) > 0.3


def test_prune_to_budget_already_met(digits) -> None:
    model, groups = digits
    ratio, masks = prune_to_budget(groups, _relative_bops(model), 1.0)
    assert ratio == 0.0 and masks == ({}, {})


def test_prune_to_budget_unreachable_is_a_user_error(digits) -> None:
    model, groups = digits
    with pytest.raises(UserError, match="cannot be reached by structured pruning"):
        prune_to_budget(groups, _relative_bops(model), 0.0005)
