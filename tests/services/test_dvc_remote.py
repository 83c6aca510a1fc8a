"""DVC with a shared remote: what one machine prepares or pretrains, a fresh clone elsewhere pulls.

Temp git repositories with a directory remote set as the default (`dvc remote add -d shared
<dir>`, as a team sets a shared filesystem path or an s3:// bucket); a `git clone` carries the
DVC files and the remote's address but no DVC cache. Checked:

* the embedded pipeline: the `prepare_digits` stage runs and is pushed; the clone pulls it --
  the remote in sync, the files the origin's byte for byte, the same data fingerprint (the
  `data_hash` every run is tagged with), the clone's pipeline up to date with nothing rerun;
* the papers' grid (docs/dvc.md), on a tiny digits grid with the papers' one job per run: one
  clone pretrains seed 0 and shares that checkpoint and the prepared data with `dvc add
  --no-relink` and `dvc push`; a fresh clone pulls them (the data last, so it is newer than the
  checkpoint), and `snakemake -n` there plans seed 1's pretraining but not seed 0's, nor after a
  code change; seed 0's reference run then runs from the pulled checkpoint, which is left as it was;
* the project's .gitignore: .dvc files beside the papers' data and checkpoints can be committed
  and DVC finds them (a `dir/*` pattern would hide them from it) beside dvc.yaml's stages.

The embedded grid's checkpoints, summary and report travel like the prepared data (outputs of
the `grid` stage, pushed by test_e2e's `dvc push`); running that grid here would repeat that test.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from paths import REPO_ROOT

PROJECT = REPO_ROOT
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}

pytestmark = pytest.mark.skipif(shutil.which("dvc") is None, reason="dvc is not installed (a dependency of jpqbench)")


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env={**(env or os.environ), **GIT_IDENTITY}, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _digests(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _repository(folder: Path, store: Path, names: list[str]) -> Path:
    """A git repository in ``folder`` holding the project's ``names``, with DVC and ``store`` as its default remote."""
    for name in names:
        source, copy = PROJECT / name, folder / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, copy)
    _run(["git", "init", "-q"], folder)
    _run(["dvc", "init", "-q"], folder)
    _run(["dvc", "remote", "add", "-d", "shared", str(store)], folder)
    return folder


def _staged(repo: Path) -> list[str]:
    """What ``git add -A`` stages in ``repo``."""
    _run(["git", "add", "-A"], repo)
    return _run(["git", "diff", "--cached", "--name-only"], repo).split()


@pytest.mark.slow
def test_prepared_data_travels_through_a_shared_remote_into_a_fresh_clone(tmp_path: Path) -> None:
    clone, store = tmp_path / "clone", tmp_path / "shared-store"
    origin = _repository(tmp_path / "origin", store, ["dvc.yaml", ".dvcignore", "config", "jpqbench/datasets"])
    _run(["dvc", "repro", "prepare_digits"], origin)
    _run(["git", "add", "-A"], origin)
    _run(["git", "commit", "-q", "-m", "prepared digits"], origin)
    _run(["dvc", "push", "prepare_digits"], origin)
    assert "in sync" in _run(["dvc", "status", "--cloud", "prepare_digits"], origin)

    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "data" / "digits").exists() and not (clone / ".dvc" / "cache").exists()
    _run(["dvc", "pull", "prepare_digits"], clone)

    assert _digests(clone / "data" / "digits") == _digests(origin / "data" / "digits") != {}
    from jpqbench.base.registry import DATASETS

    plugin = DATASETS.get("digits")()
    assert plugin.load(clone / "data" / "digits").fingerprint == plugin.load(origin / "data" / "digits").fingerprint
    status = _run(["dvc", "status", "prepare_digits"], clone)
    assert "up to date" in status.lower(), status


# The papers' grid in miniature: digits, two seeds, a few steps per epoch; one job per run
# (`batch_runs: false`) and the results in their own folder, as config/paper.yaml.
PAPER_RESULTS = yaml.safe_load((PROJECT / "config" / "paper.yaml").read_text())["results_root"]
PAPER_GRID = f"results_root: {PAPER_RESULTS}\n" + """\
experiment: paper
seeds: [0, 1]
budgets: [0.05]
methods: [fp32, ptq]
batch_runs: false
datasets:
  digits: {models: {digits_cnn: {}}, pretrain_epochs: 1, epochs: 1, batch_size: 64, lr: 0.05,
           finetune_lr: 0.01, max_steps_per_epoch: 3}
"""
CHECKPOINT = f"{PAPER_RESULTS}/checkpoints/digits/digits_cnn/s{{seed}}.pt"
RUN = f"{PAPER_RESULTS}/runs/digits/digits_cnn/{{method}}/{{budget}}/s{{seed}}/metrics.json"
# No dvc.yaml: its `prepare_digits` stage owns data/digits, which stands for a paper dataset here.
PROJECT_FILES = ["Snakefile", ".gitignore", ".dvcignore", "config", "jpqbench"]


def _env(clone: Path) -> dict[str, str]:
    """The jobs run the clone's code and log to the clone's own MLflow store (mlflow.db in it)."""
    return {**{key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"},
            "PYTHONPATH": str(clone)}


def _snakemake(clone: Path, *args: str) -> str:
    return _run(["snakemake", *args, "--configfile", "config/paper.yaml"], clone, _env(clone))


def _planned(clone: Path) -> dict[str, set[str]]:
    """The outputs of the jobs `snakemake -n` plans in ``clone``, by rule."""
    planned: dict[str, set[str]] = {}
    jobs = re.findall(r"^(?:local)?rule (\w+):\n(?:    input: .*\n)?    output: (.*)$", _snakemake(clone, "-n"),
                      re.MULTILINE)
    for rule, outputs in jobs:
        planned.setdefault(rule, set()).update(outputs.split(", "))
    return planned


@pytest.mark.slow
def test_a_pulled_checkpoint_is_not_pretrained_again_in_a_fresh_clone(tmp_path: Path) -> None:
    seed0, store = CHECKPOINT.format(seed=0), tmp_path / "shared-store"
    origin = _repository(tmp_path / "origin", store, PROJECT_FILES)
    (origin / "config" / "paper.yaml").write_text(PAPER_GRID)
    _run(["git", "add", "-A"], origin)
    _run(["git", "commit", "-q", "-m", "project"], origin)
    _snakemake(origin, "--cores", "1", seed0)  # pretrains seed 0 (and prepares the data) only
    pretrained = (origin / seed0).stat().st_mtime_ns

    _run(["dvc", "add", "--no-relink", "data/digits", seed0], origin)
    assert (origin / seed0).stat().st_mtime_ns == pretrained  # runs compressed from it stay up to date
    assert _staged(origin) == ["data/digits.dvc", f"{seed0}.dvc"]
    _run(["git", "commit", "-q", "-m", "share the digits data and seed 0's checkpoint"], origin)
    _run(["dvc", "push"], origin)

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / seed0).exists() and not (clone / "data" / "digits").exists()
    _run(["dvc", "pull", f"{seed0}.dvc"], clone)
    earlier = (clone / seed0).stat().st_mtime - 3600  # as if the data came an hour after the checkpoint
    os.utime(clone / seed0, (earlier, earlier))
    _run(["dvc", "pull", "data/digits.dvc"], clone)
    pulled = (clone / seed0).stat().st_mtime_ns
    assert (clone / seed0).read_bytes() == (origin / seed0).read_bytes()
    assert (clone / "data" / "digits" / "MANIFEST.json").stat().st_mtime_ns > pulled

    planned = _planned(clone)
    assert planned["pretrain"] == {CHECKPOINT.format(seed=1)}
    assert RUN.format(method="ptq", budget="bops-0.05", seed=0) in planned["compress"]
    assert RUN.format(method="fp32", budget="reference", seed=0) in planned["reference"]
    with open(clone / "jpqbench" / "harness" / "train.py", "a") as code:
        code.write("# a change to the training code\n")
    _run(["git", "commit", "-q", "-a", "-m", "change the training code"], clone)
    assert _planned(clone)["pretrain"] == {CHECKPOINT.format(seed=1)}

    reference = RUN.format(method="fp32", budget="reference", seed=0)
    _snakemake(clone, "--cores", "1", reference)
    assert json.loads((clone / reference).read_text())["status"] == "ok"
    assert (clone / seed0).stat().st_mtime_ns == pulled
    assert not (clone / PAPER_RESULTS / "logs" / "pretrain").exists()


def test_the_papers_dvc_files_are_committed_and_found_beside_the_embedded_pipeline(tmp_path: Path) -> None:
    store = tmp_path / "shared-store"
    repo = _repository(tmp_path / "project", store, ["dvc.yaml", ".gitignore", ".dvcignore"])
    checkpoint = f"{PAPER_RESULTS}/checkpoints/cifar10/resnet20/s0.pt"
    workspace = ["data/cifar10/cifar-10-batches-py/data_batch_1", checkpoint,
                 f"{PAPER_RESULTS}/checkpoints/cifar10/resnet20/.s0.inputs.json",
                 f"{PAPER_RESULTS}/runs/cifar10/resnet20/fp32/reference/s0/metrics.json",
                 f"{PAPER_RESULTS}/summary.csv",
                 "results/checkpoints/digits/digits_cnn/s0.pt", "results/summary.csv"]  # the embedded grid's
    for name in workspace:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(os.urandom(64))

    _run(["dvc", "add", "--no-relink", "data/cifar10", checkpoint], repo)  # no overlap with dvc.yaml's outputs
    committed = [name for name in _staged(repo) if name.startswith(("data/", "results/"))]
    assert committed == ["data/cifar10.dvc", f"{checkpoint}.dvc"]
    _run(["dvc", "push"], repo)  # no targets: DVC finds the .dvc files itself
    for dvc_file in ("data/cifar10.dvc", f"{checkpoint}.dvc"):
        md5 = re.search(r"md5: (\S+)", (repo / dvc_file).read_text())[1]
        assert (store / "files" / "md5" / md5[:2] / md5[2:]).is_file(), dvc_file
