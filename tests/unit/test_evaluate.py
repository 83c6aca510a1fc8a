"""Batch-norm re-estimation: exact batch statistics, nothing else touched."""
from __future__ import annotations

import torch
from torch import nn

from jpqbench.harness.evaluate import recalibrate_batchnorm


class _ModeSpy(nn.Module):
    """Records the training flag it sees in forward (a stand-in for a quantizer observer)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training)
        return x


def test_statistics_become_the_average_over_the_batches_and_only_bn_trains() -> None:
    torch.manual_seed(0)
    spy = _ModeSpy()
    model = nn.Sequential(spy, nn.BatchNorm1d(3, momentum=0.01))
    model[1].running_mean.fill_(7.0)  # stale statistics
    batches = [torch.randn(16, 3) * 2 + 5 for _ in range(4)]
    weight_before = model[1].weight.clone()
    model.train()
    recalibrate_batchnorm(model, batches)
    everything = torch.cat(batches)
    assert torch.allclose(model[1].running_mean, everything.mean(0), atol=1e-5)
    # the cumulative average of per-batch unbiased variances (equal batch sizes)
    expected_var = torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(model[1].running_var, expected_var, atol=1e-5)
    assert spy.seen == [False] * 4  # everything but BN stayed in eval mode
    assert model[1].momentum == 0.01 and model.training  # settings restored
    assert torch.equal(model[1].weight, weight_before)
