"""Top-1 / top-5 accuracy. Top-5 is reported only where there are more than 10 classes."""
from __future__ import annotations

import torch
from torch import nn

from jpqbench.data import DataBundle


@torch.no_grad()
def evaluate(model: nn.Module, data: DataBundle, split: str, batch_size: int = 256) -> dict[str, float | None]:
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    for inputs, targets in data.loader(split, batch_size):
        logits = model(inputs)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == targets).sum().item()
        correct5 += (top == targets[:, None]).any(dim=1).sum().item()
        total += len(targets)
    model.train(was_training)
    return {"top1": correct1 / total, "top5": correct5 / total if data.num_classes > 10 else None}
