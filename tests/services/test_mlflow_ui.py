"""What `mlflow ui` shows of the harness's runs: a model-training experiment, each run's dataset
and source.

MLflow 3 records an experiment's kind in the experiment tag ``mlflow.experimentKind`` (model
training: its page is the runs table; GenAI: traces), which MLflow's UI reads to pick the page
(3.17's goes by its sidebar switch instead: docs/tracking.md). The runs table's Dataset column
and dataset filters read the runs' dataset inputs, its Source and Version columns MLflow's
source tags. The live test runs a real pretraining and compression run through
the CLI into a store whose experiment an older jpqbench created (without a kind), starts a real
`mlflow ui` on it and checks what the UI's REST API answers. The others check the store
directly: an experiment gets its kind when the harness creates it or next uses it (parallel
jobs that do so at once all go on), a kind someone chose is kept, and a resumed run keeps one
dataset input.
"""
from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import DigitsWorkspace, create_experiment, write_config
from test_tracking_server import mlflow_server

from jpqbench.base.config import load_config
from jpqbench.pipeline.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, init_tracking, tracked_run


def _client(root: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def test_init_tracking_gives_new_and_older_experiments_the_model_training_kind(
        tmp_path: Path, no_env_tracking_uri, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a new experiment's artifacts go to ./mlruns
    create_experiment(tmp_path, "older")  # as jpqbench made experiments before they had a kind
    create_experiment(tmp_path, "chosen")
    client = _client(tmp_path)
    chosen = client.get_experiment_by_name("chosen").experiment_id
    client.set_experiment_tag(chosen, EXPERIMENT_KIND_TAG, "genai_development")
    names = ("older", "new", "chosen")
    for name in names:
        init_tracking(load_config(write_config(tmp_path / f"{name}.yaml", tmp_path, experiment=name)))
    kinds = {name: client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG) for name in names}
    assert kinds == {"older": MODEL_TRAINING, "new": MODEL_TRAINING, "chosen": "genai_development"}


class _AnotherJobTagsFirst:
    """A client of a job that loses the race to tag an older store's experiment: another job's tag
    lands first (``lands``), and the store refuses this job's insert of the same key, as MLflow's
    SQL store does (an IntegrityError, wrapped)."""

    def __init__(self, client: Any, lands: bool) -> None:
        self._client, self._lands = client, lands

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        from mlflow.exceptions import MlflowException

        if self._lands:
            self._client.set_experiment_tag(experiment_id, key, value)
        raise MlflowException("UNIQUE constraint failed: experiment_tags.key, experiment_tags.experiment_id")


def test_parallel_jobs_tagging_an_older_experiment_at_once_all_go_on(tmp_path: Path) -> None:
    from mlflow.exceptions import MlflowException

    from jpqbench.pipeline.tracking import _experiment_id

    create_experiment(tmp_path, "older")
    client = _client(tmp_path)
    with pytest.raises(MlflowException):  # a refusal that left no tag is an error
        _experiment_id(_AnotherJobTagsFirst(client, lands=False), "older")
    experiment_id = _experiment_id(_AnotherJobTagsFirst(client, lands=True), "older")
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING


def test_a_resumed_run_keeps_one_dataset_input_and_records_its_source(
        tmp_path: Path, no_env_tracking_uri) -> None:
    import mlflow.data
    from mlflow.data.sources import LocalArtifactDatasetSource

    create_experiment(tmp_path, "resumed")  # an older store: the run gives the experiment its kind
    config = load_config(write_config(tmp_path / "config.yaml", tmp_path, experiment="resumed"))
    id_file, data = tmp_path / "work" / "mlflow_run_id", tmp_path / "data" / "digits"
    with pytest.raises(KeyboardInterrupt):
        with tracked_run(config, "r", id_file, {}, entry_point="run") as tracker:
            tracker.log_dataset("digits", "0123456789abcdef", data)
            raise KeyboardInterrupt
    with tracked_run(config, "r", id_file, {}, entry_point="run") as tracker:  # resumed: the same MLflow run
        tracker.log_dataset("digits", "0123456789abcdef", data)

    client = _client(tmp_path)
    run = client.get_run(id_file.read_text().strip())
    assert run.info.status == "FINISHED"
    [logged] = run.inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("digits", "0123456789abcdef")
    source = mlflow.data.get_source(logged)  # MLflow reads the source back as a local folder
    assert isinstance(source, LocalArtifactDatasetSource) and source.uri == str(data.resolve())
    assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.source.name"] == "jpqbench run"
    assert run.data.tags.get("mlflow.source.git.commit", "unknown") == run.data.tags["git_commit"]
    assert client.get_experiment_by_name("resumed").tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING


def _get(url: str, path: str, **query: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return json.load(response)


def _post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.mark.slow
def test_mlflow_ui_lists_the_runs_with_their_dataset_and_source(
        digits_workspace: DigitsWorkspace, tmp_path: Path, no_env_tracking_uri) -> None:
    from jpqbench.pipeline.cli import main

    create_experiment(tmp_path, "ui")  # made by an older jpqbench: no kind yet
    config = write_config(tmp_path / "config.yaml", tmp_path, experiment="ui", data_root=digits_workspace.data_root)
    checkpoint = tmp_path / "results" / "checkpoints" / "digits" / "digits_cnn" / "s0.pt"
    assert main(["--config", str(config), "pretrain", "--dataset", "digits", "--seed", "0"]) == 0
    assert main(["--config", str(config), "run", "--method", "ptq", "--dataset", "digits", "--budget", "0.05",
                 "--seed", "0", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "ptq")]) == 0
    metrics = json.loads((tmp_path / "ptq" / "metrics.json").read_text())

    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlartifacts", tmp_path / "mlflow-ui.log",
                       command="ui") as url:
        experiment = _get(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="ui")["experiment"]
        search = {"experiment_ids": [experiment["experiment_id"]], "order_by": ["attributes.start_time ASC"]}
        runs = _post(url, "/api/2.0/mlflow/runs/search", search)["runs"]
        same_data = f"dataset.name = 'digits' AND dataset.digest = '{metrics['data_hash']}'"
        by_dataset = _post(url, "/api/2.0/mlflow/runs/search", {**search, "filter": same_data})
        other_data = _post(url, "/api/2.0/mlflow/runs/search", {**search, "filter": "dataset.digest = 'other'"})
        page = urllib.request.urlopen(url, timeout=30).read().decode()

    assert {"key": EXPERIMENT_KIND_TAG, "value": MODEL_TRAINING} in experiment["tags"]
    assert [run["info"]["run_name"] for run in runs] == ["pretrain/digits/digits_cnn/s0",
                                                        "digits/digits_cnn/ptq/bops-0.05/s0"]
    assert [run["info"]["run_id"] for run in by_dataset["runs"]] == [run["info"]["run_id"] for run in runs]
    assert other_data.get("runs", []) == []
    data_dir = str((digits_workspace.data_root / "digits").resolve())
    for run, entry_point in zip(runs, ("pretrain", "run")):
        assert run["info"]["status"] == "FINISHED"
        [dataset_input] = run["inputs"]["dataset_inputs"]
        dataset = dataset_input["dataset"]
        assert (dataset["name"], dataset["digest"], dataset["source_type"]) == ("digits", metrics["data_hash"], "local")
        assert json.loads(dataset["source"]) == {"uri": data_dir}
        tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
        assert tags["mlflow.source.name"] == f"jpqbench {entry_point}" and tags["mlflow.source.type"] == "LOCAL"
        assert tags["data_hash"] == metrics["data_hash"]
        assert tags.get("mlflow.source.git.commit", "unknown") == tags["git_commit"]
    assert '<div id="root"' in page  # the UI itself is served, not only the API
