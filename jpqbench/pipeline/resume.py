"""What lets a rerun continue an interrupted run, or skip a finished one: :class:`RunState`."""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jpqbench.base import atomic
from jpqbench.base.config import BenchConfig
from jpqbench.pipeline.tracking import abandon_run


@dataclass(frozen=True)
class RunState:
    """Where a run keeps what lets a rerun continue it: ``work`` (training checkpoints and, while
    the run is open, its MLflow run id; removed when the run ends) and, beside its outputs, two
    hidden files that outlive it: the inputs it was made for and its MLflow run id.

    Kept ids make a rerun of a finished run whose outputs were deleted -- Snakemake deletes every
    output of a job that was killed, even the runs of a batched job that had finished -- continue
    the same MLflow run instead of adding a second one.
    """

    work: Path
    kept: str  # path prefix of the kept files

    @classmethod
    def of_run(cls, out: Path) -> "RunState":
        return cls(out / ".work", f"{out}/.")

    @property
    def inputs_file(self) -> Path:
        return Path(f"{self.kept}inputs.json")

    @property
    def kept_id(self) -> Path:
        return Path(f"{self.kept}mlflow_run_id")

    @property
    def id_file(self) -> Path:
        """The MLflow run id while the run is open (what :func:`jpqbench.pipeline.tracking.tracked_run` reads)."""
        return self.work / "mlflow_run_id"

    def claim(self, config: BenchConfig, inputs: dict[str, Any]) -> None:
        """Open the state for a run with ``inputs``: an earlier attempt's state is kept (resumed)
        only if it was made for the same inputs. State made for other inputs (a changed
        hyperparameter, recipe, budget or checkpoint) or by a version that recorded none is
        discarded, and an unfinished MLflow run it names is closed as KILLED ("abandoned"):
        resuming from it would continue another run. Under torchrun rank 0 does this, through
        :func:`jpqbench.harness.distributed.agree`, while the other ranks wait."""
        text = _inputs_text(inputs)
        same = self.inputs_file.is_file() and self.inputs_file.read_text() == text
        if not same and (self.work.exists() or self.kept_id.exists()):
            print(f"discarding {self.work}: it was made for other inputs than this run's", file=sys.stderr)
            for id_file in (self.id_file, self.kept_id):
                abandon_run(config, id_file, "the run's inputs changed before it was resumed")
            shutil.rmtree(self.work, ignore_errors=True)
            self.kept_id.unlink(missing_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        if self.kept_id.exists() and not self.id_file.exists():  # finished before, its outputs since deleted
            os.replace(self.kept_id, self.id_file)
        atomic.write_text(self.inputs_file, text)

    def finished(self, inputs: dict[str, Any], outputs: tuple[str, ...]) -> dict[str, Any] | None:
        """The recorded metrics of a run that finished with these ``inputs`` and whose ``outputs``
        (beside ``metrics.json``) are all present; None when it has to run. A diverged run is
        finished with ``metrics.json`` alone (rerunning it would diverge again)."""
        out = self.inputs_file.parent
        if self.work.exists() or not self.inputs_file.is_file() or not (out / "metrics.json").is_file():
            return None
        if self.inputs_file.read_text() != _inputs_text(inputs):
            return None
        try:
            metrics = json.loads((out / "metrics.json").read_text())
        except json.JSONDecodeError:
            return None
        if not isinstance(metrics, dict) or metrics.get("status") not in ("ok", "diverged"):
            return None
        if metrics["status"] == "ok" and not all((out / name).is_file() for name in outputs):
            return None
        kept = self.kept_id.read_text().strip() if self.kept_id.is_file() else None
        return metrics if metrics.get("mlflow_run_id") == kept else None

    def release(self) -> None:
        """The run ended: keep its MLflow run id beside the outputs, remove the work folder."""
        if self.id_file.exists():
            os.replace(self.id_file, self.kept_id)
        shutil.rmtree(self.work)


def _inputs_text(inputs: dict[str, Any]) -> str:
    return json.dumps(inputs, sort_keys=True, default=str)
