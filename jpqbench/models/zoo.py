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
* ``resnet18``  -- torchvision's ImageNet ResNet-18 (random init; for Tiny ImageNet / ImageNet).
"""
from __future__ import annotations

import torch
from torch import nn

from jpqbench.registry import register_model


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


@register_model("digits_cnn")
def digits_cnn(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """Small residual CNN for the 8x8 digits: stem 32, one block at 32, one strided block at 64."""
    return CifarResNet(input_shape[0], num_classes, (32, 64), 1)


@register_model("resnet18")
def resnet18(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """torchvision ResNet-18 (random init), for Tiny ImageNet / ImageNet."""
    import torchvision  # lazy: importing torchvision costs seconds per job

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if input_shape[0] != 3:
        model.conv1 = nn.Conv2d(input_shape[0], 64, 7, 2, 3, bias=False)
    return model
