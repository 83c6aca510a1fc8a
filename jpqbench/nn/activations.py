"""One ReLU module per call site, for models (torchvision's ResNets) that call one ReLU several times.

Used by the model zoo (its torchvision builders) and by noncomm's activation operators (which
split user models again), so it lives here rather than in either.
"""
from __future__ import annotations

import sys

import torch
from torch import nn


class SplitReLUBasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` with one ReLU module per call site: ``relu`` after ``bn1``,
    ``relu_1`` after the residual add (torchvision calls ``relu`` at both)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu_1(out + identity)


class SplitReLUBottleneck(nn.Module):
    """torchvision's ``Bottleneck`` with one ReLU module per call site: ``relu`` after ``bn1``,
    ``relu_1`` after ``bn2``, ``relu_2`` after the residual add (torchvision calls ``relu`` at all three)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu_1(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return self.relu_2(self.bn3(self.conv3(out)) + identity)


def split_shared_relus(model: nn.Module) -> nn.Module:
    """Give every call site of torchvision's ResNet blocks its own ReLU module, in place.

    torchvision's ``BasicBlock`` and ``Bottleneck`` call one ``relu`` module two or three times;
    a per-call-site operator (noncomm's activation pruning and quantization) or hook needs one
    module per site. Each such block gets fresh
    ``nn.ReLU`` modules ``relu_1`` (and ``relu_2``) beside ``relu``, and its class is swapped for
    one whose forward computes the same with them -- the way the compressible layers are made:
    no model rewrite, every conv/linear/BN keeps its name, ReLUs have no state, so
    ``state_dict`` keys are unchanged and checkpoints load either way. Blocks already split and
    all other modules are left alone; the model is returned for convenience.
    """
    resnet = sys.modules.get("torchvision.models.resnet")  # not imported: no torchvision blocks to split
    if resnet is None:
        return model
    splits = {resnet.BasicBlock: (SplitReLUBasicBlock, 1), resnet.Bottleneck: (SplitReLUBottleneck, 2)}
    for block in [m for m in model.modules() if type(m) in splits]:
        cls, extra = splits[type(block)]
        for index in range(1, extra + 1):
            block.add_module(f"relu_{index}", nn.ReLU(inplace=block.relu.inplace))
        block.__class__ = cls
    return model
