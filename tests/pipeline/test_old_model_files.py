"""Run folders written before the layered layout (issue 20) still load and re-export to the same bytes.

The fixtures are three minispeech runs of the default grid at 4bc7f60 (geta, ajpq, noncomm at
0.05 BOPs, seed 0): their ``model.pt`` pickles name classes by the old module paths
(``jpqbench.layers``, ``jpqbench.qsparse``, ``jpqbench.learned_quant``, ``jpqbench.ajpq_env``, ...),
which resolve through ``jpqbench.MOVED``. ``model.pt`` is stored gzipped; ``mlflow_run_id`` was
dropped from ``metrics.json`` so that the re-export logs nowhere.
"""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import yaml
from paths import FIXTURES, REPO_ROOT

OLD_RUNS = FIXTURES / "pre_layout_runs"
pytestmark = pytest.mark.slow  # prepares minispeech and exports three models: ~20 s


@pytest.fixture(scope="module")
def minispeech_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from jpqbench.pipeline.cli import main

    root = tmp_path_factory.mktemp("old_runs")
    raw = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())  # the recipe the runs used
    raw.update(data_root=str(root / "data"), results_root=str(root / "results"),
               tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(config), "prepare", "--dataset", "minispeech"]) == 0
    return config


@pytest.mark.parametrize("method", sorted(path.name for path in OLD_RUNS.iterdir()))
def test_an_old_run_reexports_to_its_original_artifact(method: str, minispeech_config: Path, tmp_path: Path,
                                                      no_env_tracking_uri: None) -> None:
    from jpqbench.pipeline.cli import main

    run = tmp_path / method
    shutil.copytree(OLD_RUNS / method, run)
    (run / "model.pt").write_bytes(gzip.decompress((run / "model.pt.gz").read_bytes()))
    original = (run / "model.jpq").read_bytes()
    (run / "model.jpq").unlink()
    pickled = (run / "model.pt").read_bytes()
    assert b"jpqbench.layers" in pickled and b"jpqbench.nn." not in pickled  # written by the old layout

    assert main(["--config", str(minispeech_config), "export", "--run-dir", str(run)]) == 0
    assert (run / "model.jpq").read_bytes() == original
    metrics = json.loads((run / "metrics.json").read_text())
    before = json.loads((OLD_RUNS / method / "metrics.json").read_text())
    assert metrics["export_top1"] == before["export_top1"] and metrics["artifact_bytes"] == before["artifact_bytes"]
