"""Every model in the zoo, at its natural input shape: torch-pruning traces it, masks and physical
channel removal both work on it, and the one cost counter gives the published dense MACs and
parameter counts (cross-checked against torch's own FLOP counter)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from jpqbench.accounting.counter import count
from jpqbench.accounting.plan import plan_from_model
from jpqbench.base.registry import MODELS
from jpqbench.models.zoo import _same_padding
from jpqbench.nn.channel_pruning import ChannelGroups, apply_masks, classifier_name

# natural input shape and number of classes of every zoo model
SHAPES: dict[str, tuple[int, ...]] = {
    "resnet8": (3, 32, 32), "resnet20": (3, 32, 32), "resnet56": (3, 32, 32), "vgg7": (3, 32, 32),
    "digits_cnn": (1, 8, 8), "ds_cnn": (1, 49, 10), "resnet18_64": (3, 64, 64),
    "resnet18": (3, 224, 224), "mobilenet_v2": (3, 224, 224), "resnet50": (3, 224, 224),
}
CLASSES = {"ds_cnn": 12, "resnet18_64": 200, "resnet18": 1000, "mobilenet_v2": 1000, "resnet50": 1000}

# DS-CNN by hand at 1x49x10. 'same' padding with stride 2 gives a ceil(49/2) x ceil(10/2) = 25x5 map.
#   stem conv 10x4, 1 -> 64:      25*5 * 64 * 10*4*1 =   320,000 MACs;   64*40 + 64 =  2,624 params
#   4 x depthwise 3x3, 64:        25*5 * 64 * 3*3     =    72,000 each;   64*9 + 64  =    640 each
#   4 x pointwise 1x1, 64 -> 64:  25*5 * 64 * 64      =   512,000 each;   64*64 + 64 = 4,160 each
#   linear 64 -> 12:                       64 * 12    =       768;        64*12 + 12 =    780
#   total: 320,000 + 4 * 584,000 + 768 = 2,656,768 MACs;  2,624 + 4 * 4,800 + 780 = 22,604 params.
# 22,604 plus the 1,152 BN scales and shifts is the 23,756 trainable parameters of the Keras reference
# (NXP eiq model zoo's figure for the MLPerf Tiny model); the "38.6 K" quoted for DS-CNN-S is Hello
# Edge's *memory* figure (8-bit weights and biases + two 25x5x64 activation buffers: 22.6 K + 16 K).
DS_CNN_MACS = 320_000 + 4 * (72_000 + 512_000) + 768
DS_CNN_PARAMS = 2_624 + 4 * (640 + 4_160) + 780

# VGG7 by hand at 3x32x32: conv3x3 pairs at 32x32, 16x16, 8x8, then 512*4*4 -> 1024 -> 10.
VGG7_MACS = (32 * 32 * 9 * (3 * 128 + 128 * 128) + 16 * 16 * 9 * (128 * 256 + 256 * 256)
             + 8 * 8 * 9 * (256 * 512 + 512 * 512) + 8192 * 1024 + 1024 * 10)
VGG7_PARAMS = 9 * (3 * 128 + 128 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 512 * 512) + 8192 * 1024 + 1024 + 1024 * 10 + 10

# (dense MACs, params, relative tolerance). Published figures: MLPerf Tiny (ResNet-8), He et al. /
# the usual CIFAR tables (ResNet-20 40.8 M MACs incl. the 1x1 shortcuts, 0.27 M params; ResNet-56
# 125 M, 0.85 M), torchvision's model cards (ResNet-18 1.81 G, MobileNetV2 0.30 G / 3.5 M, ResNet-50
# 4.09 G / 25.6 M -- their params include BN, which the counter leaves out, hence the 2 %).
PUBLISHED: dict[str, tuple[float | None, float | None, float]] = {
    "resnet8": (12.5e6, None, 0.005),
    "resnet20": (40.8e6, 0.27e6, 0.01),
    "resnet56": (125.7e6, 0.85e6, 0.01),
    "ds_cnn": (DS_CNN_MACS, DS_CNN_PARAMS, 0.0),
    "vgg7": (VGG7_MACS, VGG7_PARAMS, 0.0),
    "resnet18": (1.82e9, None, 0.02),
    "mobilenet_v2": (0.300e9, 3.5e6, 0.02),
    "resnet50": (4.1e9, 25.6e6, 0.02),
}


def _params(names: list[str]) -> list:
    """The ImageNet models at 224x224 carry the `slow` mark: about 4 s each on 2 CPU cores, they
    would take the file from 7 s to 18 s, too close to its 20 s budget for the non-slow part."""
    return [pytest.param(name, marks=pytest.mark.slow) if SHAPES.get(name, (0, 0))[1] >= 224 else name
            for name in names]


def _build(name: str) -> nn.Module:
    assert name in SHAPES, f"add the natural input shape of the new zoo model {name!r} to SHAPES"
    torch.manual_seed(0)
    return MODELS.get(name)(CLASSES.get(name, 10), SHAPES[name]).eval()


def _physically_pruned(model: nn.Module, shape: tuple[int, ...], groups: ChannelGroups,
                       layers: dict[str, list[int]]) -> nn.Module:
    """A copy with the masked channels removed by torch-pruning's own ``group.prune()``."""
    physical = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(physical, example_inputs=torch.randn(1, *shape))
    modules = dict(physical.named_modules())
    for group in groups.groups:
        root = modules[group.root]
        graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels,
                                idxs=layers[group.root]).prune()
    return physical


@pytest.mark.parametrize("name", _params(MODELS.names()))
def test_model_prunes_by_masks_and_physically(name: str) -> None:
    model, shape = _build(name), SHAPES[name]
    dense = count(model, shape)
    groups = ChannelGroups(model, shape)  # torch-pruning's dependency graph traces the model
    assert groups.groups
    layers, norms = groups.masks(0.5)
    assert classifier_name(model) not in layers
    assert set(layers) >= {g.root for g in groups.groups}  # every group loses channels

    masked = copy.deepcopy(model)
    apply_masks(masked, (layers, norms))
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert masked(x).shape == (2, CLASSES.get(name, 10))
    pruned_cost = count(masked, shape, plan_from_model(masked, "p"))
    assert pruned_cost.macs < 0.5 * dense.macs  # half of most channels on both sides of a layer

    physical = _physically_pruned(model, shape, groups, layers)
    with torch.no_grad():
        assert physical(x).shape == (2, CLASSES.get(name, 10))
    assert sum(p.numel() for p in physical.parameters()) < sum(p.numel() for p in model.parameters())
    # the counter's MACs for the masks are the dense MACs of the physically pruned model
    assert count(physical, shape).macs == pruned_cost.macs


@pytest.mark.parametrize("name", _params(MODELS.names()))
def test_dense_cost_matches_torch_and_published_figures(name: str) -> None:
    model, shape = _build(name), SHAPES[name]
    report = count(model, shape)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        model(torch.ones(1, *shape))
    assert report.dense_macs == report.macs == flops.get_total_flops() / 2
    macs, params, rel = PUBLISHED.get(name, (None, None, 0.0))
    if macs is not None:
        assert report.macs == pytest.approx(macs, rel=rel)
    if params is not None:
        assert report.params == pytest.approx(params, rel=rel)


def test_ds_cnn_pads_like_keras_same() -> None:
    # TF 'same', stride 2: total padding = (ceil(n/2) - 1) * 2 + k - n, the odd pixel at the end
    assert _same_padding(49, 10, 2) == (4, 5)  # (25 - 1) * 2 + 10 - 49 = 9
    assert _same_padding(10, 4, 2) == (1, 1)  # (5 - 1) * 2 + 4 - 10 = 2
    model = _build("ds_cnn")
    with torch.no_grad():
        assert model.stem(torch.ones(1, *SHAPES["ds_cnn"])).shape == (1, 64, 25, 5)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.momentum == 0.01  # Keras momentum 0.99


def test_resnet18_64_keeps_full_resolution_in_the_stem() -> None:
    model = _build("resnet18_64")
    assert isinstance(model.maxpool, nn.Identity)
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    with torch.no_grad():
        assert model.layer4(model.layer3(model.layer2(model.layer1(
            model.relu(model.bn1(model.conv1(torch.ones(1, 3, 64, 64)))))))).shape == (1, 512, 8, 8)


def test_resnet56_has_nine_blocks_per_stage() -> None:
    model = _build("resnet56")
    assert len(model.blocks) == 27
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 1 + 27 * 2 + 2  # stem, bodies, shortcuts


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "resnet50"])
def test_imagenet_models_accept_other_input_channels(name: str) -> None:
    model = MODELS.get(name)(5, (1, 32, 32)).eval()
    with torch.no_grad():
        assert model(torch.ones(2, 1, 32, 32)).shape == (2, 5)
