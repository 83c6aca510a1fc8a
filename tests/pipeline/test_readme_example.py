"""The README's "Adding a method" example is real code: as a plugin file it registers, lists and runs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import DigitsWorkspace, write_config
from paths import REPO_ROOT


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    examples = [block for block in blocks if "@register_method" in block]
    assert len(examples) == 1, "the README should hold one method example"
    return examples[0]


def test_the_readme_example_imports_only_the_facade() -> None:
    imports = re.findall(r"^from (\S+) import", _example(), re.M)
    assert [name for name in imports if name.startswith("jpqbench")] == ["jpqbench"]


def test_the_readme_example_is_a_working_plugin(digits_workspace: DigitsWorkspace, tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "w4a8.py").write_text(_example())
    config = write_config(tmp_path / "config.yaml", digits_workspace.root, data_root=digits_workspace.data_root,
                          results_root=tmp_path / "results")
    env = {**os.environ, "JPQBENCH_PLUGIN_PATH": str(plugins)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cli = [sys.executable, "-m", "jpqbench.pipeline.cli", "--config", str(config)]

    listed = subprocess.run([*cli, "list", "methods", "-v"], env=env, capture_output=True, text=True, check=True)
    assert re.search(r"^w4a8 .*4-bit weights", listed.stdout, re.M)
    assert "calibration_batches" in listed.stdout and str(plugins / "w4a8.py") in listed.stdout

    checkpoint = ["--checkpoint", str(digits_workspace.checkpoint)]
    ran = subprocess.run([*cli, "run", "--method", "w4a8", "--dataset", "digits", "--budget", "0.05", "--seed", "0",
                          *checkpoint], env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    metrics = json.loads(next((tmp_path / "results").rglob("metrics.json")).read_text())
    assert metrics["method"] == "w4a8" and metrics["status"] == "ok"
    plan = json.loads(next((tmp_path / "results").rglob("plan.json")).read_text())
    assert {layer["a_bits"] for layer in plan["layers"].values()} == {8}
