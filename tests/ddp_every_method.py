"""Run under torchrun by tests/pipeline/test_ddp.py: pretraining, then every built-in method, one after
the other, in one launch of 2 ranks (start-up paid once), plus ``rank_dependent``, a method whose
ranks end with different weights, which the harness must refuse. Rank 0 writes
``{"pretrain" or method: outcome}`` as JSON.

    torchrun --standalone --nproc-per-node 2 tests/ddp_every_method.py CONFIG CHECKPOINT OUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from jpqbench.accounting.plan import plan_from_model
from jpqbench.base.registry import METHODS, register_method
from jpqbench.harness.distributed import is_main_process, rank
from jpqbench.harness.method import Compressed, Method
from jpqbench.pipeline.cli import main


@register_method("rank_dependent")
class RankDependent(Method):
    """Trains, then changes one weight by the process's rank: a decision taken from rank-specific data."""

    def compress(self, model, budget, ctx) -> Compressed:
        ctx.train(model, 1, phase="train")
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += rank()
        return Compressed(model, plan_from_model(model, self.name, {}))


def outcome(config: str, checkpoint: str, out: Path, method: str) -> str:
    argv = ["--config", config, "run", "--method", method, "--dataset", "digits", "--seed", "0",
            "--checkpoint", checkpoint, "--out", str(out / method)]
    try:
        status = main(argv if method == "fp32" else [*argv, "--budget", "0.05"])
    except RuntimeError as error:
        return f"error: {error}"
    if status != 0 or not is_main_process():
        return f"status {status}"
    metrics = json.loads((out / method / "metrics.json").read_text())
    return f"status {status}: {metrics['status']}, target met {metrics['target_met']}"


if __name__ == "__main__":
    config, checkpoint, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    pretrained = main(["--config", config, "pretrain", "--dataset", "digits", "--out", str(out / "pretrained.pt")])
    outcomes = {"pretrain": f"status {pretrained}",
                **{method: outcome(config, checkpoint, out, method) for method in METHODS.names()}}
    if is_main_process():
        (out / "outcomes.json").write_text(json.dumps(outcomes, indent=1))
