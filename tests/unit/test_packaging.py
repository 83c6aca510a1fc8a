"""A plain (non-editable) install carries the built-in plugins, the report notebook and its data."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from paths import REPO_ROOT


def test_the_wheel_holds_every_plugin_and_the_report_files(tmp_path: Path) -> None:
    source = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        if (REPO_ROOT / name).is_file() and not name.startswith(("tests/", "results/")):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("jpqbench-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    package_files = {name for name in tracked.split() if name.startswith("jpqbench/")}
    missing = sorted(package_files - names)
    assert not missing, f"the wheel lacks {missing}: declare them in pyproject.toml (package-data) or add an __init__.py"
    assert {"jpqbench/methods/geta.py", "jpqbench/datasets/digits.py", "jpqbench/cost_models/bops.py",
            "jpqbench/pipeline/report.ipynb", "jpqbench/pipeline/published.csv"} <= names
