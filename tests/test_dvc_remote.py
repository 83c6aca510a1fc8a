"""DVC with a shared remote: what one machine prepares, a fresh clone elsewhere pulls.

A copy of the project's dvc.yaml in a temp git repository with a directory remote set as the
default (`dvc remote add -d shared <dir>`, as a team sets a shared filesystem path or an
s3:// bucket). The `prepare_digits` stage runs, its output is pushed; a `git clone` of the
repository -- which carries dvc.lock and the remote's address but no DVC cache -- pulls it.
Checked: the remote holds the data (`dvc status --cloud` in sync), the clone's files are the
origin's byte for byte, jpqbench loads them with the same data fingerprint (the `data_hash`
every run is tagged with), and the clone's pipeline is up to date with nothing rerun.

The grid's checkpoints, summary and report travel the same way (outputs of the `grid` stage,
pushed by test_e2e's `dvc push`); running the grid here as well would only repeat that test.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}

pytestmark = pytest.mark.skipif(shutil.which("dvc") is None, reason="dvc is not installed (a dependency of jpqbench)")


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, **GIT_IDENTITY}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _digests(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_prepared_data_travels_through_a_shared_remote_into_a_fresh_clone(tmp_path: Path) -> None:
    origin, clone, store = tmp_path / "origin", tmp_path / "clone", tmp_path / "shared-store"
    origin.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(PROJECT / name, origin / name)
    for name in ("config", "datasets"):
        shutil.copytree(PROJECT / name, origin / name, ignore=shutil.ignore_patterns("__pycache__"))
    _run(["git", "init", "-q"], origin)
    _run(["dvc", "init", "-q"], origin)
    _run(["dvc", "remote", "add", "-d", "shared", str(store)], origin)
    _run(["dvc", "repro", "prepare_digits"], origin)
    _run(["git", "add", "-A"], origin)
    _run(["git", "commit", "-q", "-m", "prepared digits"], origin)
    _run(["dvc", "push", "prepare_digits"], origin)
    assert "in sync" in _run(["dvc", "status", "--cloud", "prepare_digits"], origin)

    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "data" / "digits").exists() and not (clone / ".dvc" / "cache").exists()
    _run(["dvc", "pull", "prepare_digits"], clone)

    assert _digests(clone / "data" / "digits") == _digests(origin / "data" / "digits") != {}
    from jpqbench.registry import DATASETS

    plugin = DATASETS.get("digits")()
    assert plugin.load(clone / "data" / "digits").fingerprint == plugin.load(origin / "data" / "digits").fingerprint
    status = _run(["dvc", "status", "prepare_digits"], clone)
    assert "up to date" in status.lower(), status
