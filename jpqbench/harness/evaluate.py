"""Top-1 / top-5 accuracy (top-5 only where there are more than 10 classes), and batch-norm
re-estimation, the one step the harness may apply after every method alike (a recipe knob)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from jpqbench.harness.data import DataBundle


@torch.no_grad()
def evaluate(model: nn.Module, data: DataBundle, split: str, batch_size: int = 256) -> dict[str, float | None]:
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.int64, device=data.device)  # top-1, top-5; read once, at the end
    total = 0
    for inputs, targets in data.loader(split, batch_size):
        logits = model(inputs)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct[0] += (top[:, 0] == targets).sum()
        correct[1] += (top == targets[:, None]).any(dim=1).sum()
        total += len(targets)
    model.train(was_training)
    correct1, correct5 = correct.tolist()
    return {"top1": correct1 / total, "top5": correct5 / total if data.num_classes > 10 else None}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Re-estimate every batch-norm layer's running statistics on ``batches``, changing nothing else.

    Short compression budgets leave BN statistics behind the network: with momentum 0.01
    (DS-CNN's Keras 0.99) they need hundreds of steps to follow a pruning or quantization
    change. Only the BN layers are put in training mode (quantizer observers and other
    method state stay in eval mode); the statistics become the plain average over ``batches``.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    was_training = model.training
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs the same
        bn.train()
    try:
        for batch in batches:
            model(batch)
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.train(was_training)
