"""Builders for the benchmark models.

* ``resnet8``   -- MLPerf Tiny image-classification reference (CIFAR-10, 77,360 conv/dense
  weights, about 12.5 MMACs at 32x32).
* ``resnet20``  -- He et al.'s CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels);
  the down-sampling shortcut is a 1x1 convolution + BN ("option B"), which pruning tools can
  trace, rather than option A's zero padding.
* ``digits_cnn`` -- a small residual CNN sized for the 8x8 scikit-learn digits (32/64 channels,
  one identity and one strided residual block, so residual-coupled pruning is exercised even
  on the embedded grid; 2.1 MMACs and 77k parameters, big enough that a run's compute dominates its
  process start-up).
* ``resnet56``  -- He et al.'s CIFAR ResNet-56 (3 stages x 9 basic blocks), built like resnet20.
* ``vgg7``      -- the CIFAR VGG7 of DJPQ / GETA (layout in :func:`vgg7`).
* ``ds_cnn``    -- MLPerf Tiny's keyword-spotting DS-CNN for 1x49x10 MFCCs (layout in :func:`ds_cnn`).
* ``resnet18``  -- torchvision's ImageNet ResNet-18 (random init).
* ``resnet18_64`` -- ResNet-18 for 64x64 Tiny ImageNet: 3x3 stride-1 stem, no max-pool.
* ``mobilenet_v2``, ``resnet50`` -- torchvision's ImageNet definitions (random init).

torchvision is imported inside the builders that need it: importing it costs seconds per job.
"""
from __future__ import annotations

import torch
from torch import nn

from jpqbench.base.registry import register_model

# model.pt files written before the layout of issue 20 name the split blocks here
from jpqbench.nn.activations import SplitReLUBasicBlock as _SplitReLUBasicBlock  # noqa: F401
from jpqbench.nn.activations import SplitReLUBottleneck as _SplitReLUBottleneck  # noqa: F401
from jpqbench.nn.activations import split_shared_relus


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (identity, or 1x1 conv when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut_bn: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(cout, cout, 3, 1))
        if stride != 1 or cin != cout:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride, bias=not shortcut_bn)]
            if shortcut_bn:
                layers.append(nn.BatchNorm2d(cout))
            self.shortcut: nn.Module = nn.Sequential(*layers)
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    """A stem, stages of basic blocks, global average pooling and a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...],
                 blocks_per_stage: int, shortcut_bn: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, widths[0]), nn.ReLU(inplace=True))
        blocks, cin = [], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(cin, width, stride, shortcut_bn))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


@register_model("resnet8")
def resnet8(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """MLPerf Tiny ResNet-8 (CIFAR-10 reference: 77,360 weights, 12.5 MMACs at 32x32)."""
    # MLPerf Tiny's shortcut is a bare 1x1 conv (with bias) -- no BN.
    return CifarResNet(input_shape[0], num_classes, (16, 32, 64), 1, shortcut_bn=False)


@register_model("resnet20")
def resnet20(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """CIFAR ResNet-20 (He et al.), 1x1-conv down-sampling shortcuts."""
    return CifarResNet(input_shape[0], num_classes, (16, 32, 64), 3)


@register_model("resnet56")
def resnet56(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """CIFAR ResNet-56 (He et al.), 1x1-conv down-sampling shortcuts."""
    return CifarResNet(input_shape[0], num_classes, (16, 32, 64), 9)


@register_model("digits_cnn")
def digits_cnn(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """Small residual CNN for the 8x8 digits: stem 32, one block at 32, one strided block at 64."""
    return CifarResNet(input_shape[0], num_classes, (32, 64), 1)


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    import torchvision  # lazy: importing torchvision costs seconds per job

    return split_shared_relus(getattr(torchvision.models, name)(weights=None, num_classes=num_classes))


@register_model("resnet18")
def resnet18(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """torchvision ResNet-18 (random init), for ImageNet; resnet18_64 is the 64x64 Tiny ImageNet one."""
    model = _torchvision_model("resnet18", num_classes)
    if input_shape[0] != 3:
        model.conv1 = nn.Conv2d(input_shape[0], 64, 7, 2, 3, bias=False)
    return model


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, groups: int = 1, bias: bool = False,
                  momentum: float = 0.1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, 1, kernel // 2, groups=groups, bias=bias),
            nn.BatchNorm2d(cout, momentum=momentum), nn.ReLU(inplace=True)]


class VGG7(nn.Module):
    """Three stages of two conv3x3-BN-ReLU and a 2x2 max-pool, then flatten -> FC 1024 -> FC classes."""

    def __init__(self, in_channels: int, num_classes: int, spatial: tuple[int, int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for width in (128, 256, 512):
            layers += [*_conv_bn_relu(cin, width), *_conv_bn_relu(width, width), nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(cin * (spatial[0] // 8) * (spatial[1] // 8), 1024),
                                        nn.ReLU(inplace=True), nn.Linear(1024, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("vgg7")
def vgg7(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """CIFAR VGG7 of DJPQ/GETA: 2x128, pool, 2x256, pool, 2x512, pool, FC 1024, FC classes.

    Each conv is 3x3, stride 1, padding 1, without bias and followed by BN + ReLU; the pools are
    2x2 max-pools, so at 32x32 the classifier sees 512x4x4 = 8192 features (12.97 M weights,
    0.62 GMACs). Papers' "VGG7" differ (LQ-Nets' VGG-Small has no hidden FC; some variants pool
    globally). This is the layout of Bayesian Bits (van Baalen et al. 2020), whose VGG7 DJPQ
    trains and reports BOPs on, and against whose figures GETA compares -- so our figures are
    comparable with both papers' tables.
    """
    return VGG7(input_shape[0], num_classes, (input_shape[1], input_shape[2]))


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's padding='same': ceil(size / stride) outputs, the odd pixel padded at the end."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class DSCNN(nn.Module):
    """Stem conv, depthwise-separable blocks, global average pool, linear classifier."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, filters: int = 64,
                 blocks: int = 4, momentum: float = 0.01) -> None:
        super().__init__()
        kernel, stride = (10, 4), 2
        top, bottom = _same_padding(input_shape[1], kernel[0], stride)
        left, right = _same_padding(input_shape[2], kernel[1], stride)
        self.stem = nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)),
                                  nn.Conv2d(input_shape[0], filters, kernel, stride),
                                  nn.BatchNorm2d(filters, momentum=momentum), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [*_conv_bn_relu(filters, filters, 3, groups=filters, bias=True, momentum=momentum),
                       *_conv_bn_relu(filters, filters, 1, bias=True, momentum=momentum)]
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(filters, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


@register_model("ds_cnn")
def ds_cnn(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """MLPerf Tiny KWS DS-CNN: conv 64 (10x4, /2, 'same') + 4 x [dw 3x3 -> pw 64], avg-pool, FC.

    Follows the Keras reference (mlcommons/tiny ``keras_model.py``): every conv keeps its bias
    (as Keras' default), BN + ReLU after each conv, BN momentum 0.01 (Keras 0.99). Keras'
    'same' on 49x10 with a 10x4 kernel and stride 2 gives 25x5 outputs by padding 4 rows above
    and 5 below, 1 column left and right -- asymmetric, so an explicit ``ZeroPad2d`` rather than
    Conv2d's symmetric padding keeps weights interchangeable with the reference. The reference
    pools with a fixed (49 // 2, 10 // 2) = (24, 5) window, which on the 25x5 map ignores the
    last row; we average the whole map, as Hello Edge describes the model (no MACs either way). Dropout is left to the training recipe.
    At 1x49x10: 22,604 conv/linear weights and biases and 2,656,768 MACs.
    """
    return DSCNN(input_shape, num_classes)


@register_model("resnet18_64")
def resnet18_64(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """ResNet-18 for 64x64 Tiny ImageNet: conv3x3 stride-1 stem (64 ch), no max-pool.

    torchvision's 7x7/2 stem plus 3x3/2 max-pool would shrink a 64x64 image to 16x16 before the
    first stage (2x2 at the last); the common Tiny ImageNet variant keeps full resolution in
    the stem so the stages run at 64/32/16/8, as the CIFAR ResNets do at 32x32.
    """
    model = _torchvision_model("resnet18", num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """torchvision MobileNetV2 (width 1.0, random init), for ImageNet."""
    model = _torchvision_model("mobilenet_v2", num_classes)
    if input_shape[0] != 3:
        model.features[0][0] = nn.Conv2d(input_shape[0], 32, 3, 2, 1, bias=False)
    return model


@register_model("resnet50")
def resnet50(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """torchvision ResNet-50 (random init), for ImageNet."""
    model = _torchvision_model("resnet50", num_classes)
    if input_shape[0] != 3:
        model.conv1 = nn.Conv2d(input_shape[0], 64, 7, 2, 3, bias=False)
    return model
