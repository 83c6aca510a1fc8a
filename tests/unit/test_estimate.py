"""``jpqbench estimate``: counts, search images, device-hours and SLURM runtimes against hand
computations on the tiny config of conftest.write_config, and its refusals of bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import write_config
from paths import REPO_ROOT

from jpqbench.base.config import load_config
from jpqbench.base.errors import UserError
from jpqbench.base.method_spec import get_method
from jpqbench.base.registry import DATASETS
from jpqbench.pipeline.cli import main
from jpqbench.pipeline.estimate import Work, estimate, parse_img_per_s, read_throughput, slurm_runtimes, totals
from jpqbench.pipeline.grid import grid

# write_config's digits: 1,221 / 216 / 360 samples; batch 64, at most 3 steps = 192 samples an
# epoch; 1 pretraining and 1 compression epoch; a val pass every 5 epochs and at the end
PRETRAIN = Work(1, 192, 216)  # 1 val pass
# fp32 and ptq never train (Method.trains): the runner's val pass and 3 test passes only
NO_TRAINING = Work(0, 0, 216 + 3 * 360)
# ajpq at conftest's smoke scale: 6 episodes x 128 fine-tune samples; 6 + 1 (baseline) x 192 val samples
AJPQ = Work(1, 192, 2 * 216 + 3 * 360, 6 * 128, 7 * 192)


def _config_file(tmp_path: Path, *replacements: tuple[str, str], extra: str = "") -> Path:
    """write_config's tiny digits config with methods fp32, ptq and ajpq, and ``replacements`` made in its text."""
    path = write_config(tmp_path / "config.yaml", tmp_path, extra=extra)
    text = path.read_text()
    for old, new in [("methods: [fp32, ptq]", "methods: [fp32, ptq, ajpq]"), *replacements]:
        assert old in text
        text = text.replace(old, new)
    path.write_text(text)
    return path


def _user_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "\n  fix: " in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("dataset", ["digits", "minispeech", "cifar10", "speech_commands", "tiny_imagenet",
                                     "imagenet"])
def test_every_dataset_declares_its_split_sizes(dataset: str) -> None:
    sizes = DATASETS.get(dataset).split_samples
    assert set(sizes) == {"train", "val", "test"} and all(isinstance(n, int) and n > 0 for n in sizes.values())


@pytest.mark.parametrize("dataset", ["digits", "minispeech"])
def test_embedded_split_sizes_match_the_loaded_data(dataset: str, tmp_path: Path) -> None:
    plugin = DATASETS.get(dataset)()
    plugin.prepare(tmp_path)
    bundle = plugin.load(tmp_path)
    assert plugin.split_samples == {"train": len(bundle.train), "val": len(bundle.val), "test": len(bundle.test)}


def test_counts_by_hand(tmp_path: Path) -> None:
    rows = estimate(load_config(_config_file(tmp_path)))
    assert [(row.method, row.rule, row.runs, row.jobs, row.run) for row in rows] == [
        ("pretrain", "pretrain", 1, 1, PRETRAIN), ("fp32", "reference_digits", 1, 1, NO_TRAINING),
        ("ptq", "compress_digits", 1, 1, NO_TRAINING), ("ajpq", "compress_digits", 1, 1, AJPQ)]
    assert all(row.img_per_s is None and row.hours(row.runs) is None for row in rows)
    assert totals(rows)["device_hours"] is None and totals(rows)["rows_unknown"] == 4


def test_jobs_and_runs_follow_the_grid(tmp_path: Path) -> None:
    """Two seeds and two budgets: a batched grid runs every budget and seed of a method in one job."""
    replacements = (("seeds: [0]", "seeds: [0, 1]"), ("budgets: [0.05]", "budgets: [0.05, 0.1]"))
    batched = estimate(load_config(_config_file(tmp_path, *replacements)))
    assert [(row.rule, row.runs, row.jobs) for row in batched] == [
        ("pretrain", 2, 2), ("reference_digits", 2, 1), ("compress_digits", 4, 1), ("compress_digits", 4, 1)]
    assert batched[3].total == AJPQ.times(4)
    unbatched = estimate(load_config(_config_file(tmp_path, *replacements, extra="batch_runs: false\n")))
    assert [(row.rule, row.runs, row.jobs) for row in unbatched] == [
        ("pretrain", 2, 2), ("reference", 2, 2), ("compress", 4, 4), ("compress", 4, 4)]


def test_uncapped_epochs_and_bn_recalibration(tmp_path: Path) -> None:
    path = _config_file(tmp_path, (", max_steps_per_epoch: 3", ", eval_every: 2, bn_recalibration_batches: 5"),
                        ("pretrain_epochs: 1, epochs: 1", "pretrain_epochs: 3, epochs: 4"))
    pretrain, fp32, _, ajpq = estimate(load_config(path))
    assert pretrain.run == Work(3, 3 * 1221, 2 * 216)  # val after epochs 2 and 3
    # val after epochs 2 and 4 + the runner's; 3 test passes; 5 x 64 recalibration samples
    assert ajpq.run == Work(4, 4 * 1221, 3 * 216 + 3 * 360 + 5 * 64, 6 * 128, 7 * 192)
    assert fp32.run == Work(0, 0, 216 + 3 * 360 + 5 * 64)


def test_ajpq_search_images_from_its_hparams() -> None:
    ajpq = get_method("ajpq")
    hparams = ajpq.Hparams(episodes=10, warmup_episodes=2, reward_train_samples=500, reward_val_samples=300,
                           reward_finetune_epochs=2)
    assert ajpq.search_images(hparams, 10_000, 10_000) == (10 * 500 * 2, 11 * 300)
    assert ajpq.search_images(hparams, 400, 100) == (10 * 400 * 2, 11 * 100)  # a subset is at most its split
    assert ajpq.search_images(ajpq.Hparams(), 45_000, 5_000) == (600 * 20_000, 601 * 5_000)  # HAQ's defaults
    assert get_method("qat").search_images(get_method("qat").Hparams(), 45_000, 5_000) == (0, 0)


def test_device_hours_by_hand(tmp_path: Path) -> None:
    rows = estimate(load_config(_config_file(tmp_path)), {"digits/digits_cnn": 1.0})
    # seconds at 1 sample/s: training samples + forward-only samples / 3
    seconds = [192 + 216 / 3, 1296 / 3, 1296 / 3, 192 + 768 + (1512 + 1344) / 3]
    assert [row.hours(row.runs) for row in rows] == pytest.approx([s / 3600 for s in seconds])
    summed = totals(rows)
    assert summed["device_hours"] == pytest.approx(sum(seconds) / 3600)
    assert summed["rows_unknown"] == 0 and summed["jobs"] == 4 and summed["train_images"] == 2 * 192
    assert [(r.rule, r.minutes) for r in slurm_runtimes(rows)] == [
        ("pretrain", math.ceil(seconds[0] / 60 * 1.5)), ("reference_digits", math.ceil(seconds[1] / 60 * 1.5)),
        ("compress_digits", math.ceil(seconds[3] / 60 * 1.5))]  # ajpq's job is compress_digits' longest


def test_unknown_throughput_is_not_guessed(tmp_path: Path, capsys) -> None:
    path = _config_file(tmp_path, ("digits_cnn: {}", "digits_cnn: {}, resnet8: {}"))
    rows = estimate(load_config(path), {"digits/digits_cnn": 100.0})
    unknown = [row for row in rows if row.model == "resnet8"]
    assert len(unknown) == 4 and all(row.hours(row.runs) is None for row in unknown)
    summed = totals(rows)
    assert summed["rows_unknown"] == 4 and summed["unknown_benchmarks"] == ["digits/resnet8"]
    assert summed["device_hours"] == pytest.approx(sum(row.hours(row.runs) for row in rows[:4]))
    runtimes = slurm_runtimes(rows)
    assert all(r.minutes is None and r.missing == ["digits/resnet8"] for r in runtimes)
    assert main(["--config", str(path), "estimate", "--img-per-s", "digits/digits_cnn=100", "--slurm-runtime"]) == 0
    out = capsys.readouterr().out
    assert "—" in out and "for 4 of 8 rows: 4 unknown (no throughput for digits/resnet8)" in out
    assert "# compress_digits: none: no throughput for digits/resnet8" in out


def test_cli_table_json_and_slurm_runtime(tmp_path: Path, capsys) -> None:
    path = _config_file(tmp_path, extra="batch_runs: false\n")
    assert main(["--config", str(path), "estimate"]) == 0
    out = capsys.readouterr().out
    assert "device-h" not in out and "total: 4 jobs, 4 runs, 2 epochs, 384 training" in out
    throughput = tmp_path / "throughput.json"
    throughput.write_text(json.dumps({"device": "test GPU", "img_per_s": {"digits/digits_cnn": 2.0,
                                                                         "cifar10/resnet20": 9.0}}))
    assert main(["--config", str(path), "estimate", "--throughput", str(throughput), "--img-per-s",
                 "digits/digits_cnn=1", "--slurm-runtime"]) == 0  # the command line wins over the file
    out = capsys.readouterr().out
    assert "device-h" in out and "on test GPU" in out
    assert "  compress:\n    runtime: 48  # longest job: digits/digits_cnn ajpq, 31.9 min" in out  # 1912 s x 1.5
    assert main(["--config", str(path), "estimate", "--throughput", str(throughput), "--json", "--slurm-runtime"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "test GPU" and report["slurm_runtime_min"] == {"pretrain": 4, "reference": 6,
                                                                               "compress": 24}
    assert [row["search_train_images"] for row in report["rows"]] == [0, 0, 0, 768]
    assert report["totals"]["runs"] == 4 and report["totals"]["rows_unknown"] == 0


@pytest.mark.parametrize("item, expected", [
    ("digits/digits_cnn", "is not DATASET/MODEL=N"),
    ("digits=5", "is not <dataset>/<model>"),
    ("digits/digits_cnn=fast", "not a positive number"),
    ("digits/digits_cnn=-1", "not a positive number"),
    ("digits/digits_cnn=inf", "not a positive number"),
    ("cifar/resnet20=5", "unknown dataset 'cifar'"),
    ("digits/resnet99=5", "unknown model 'resnet99'"),
])
def test_bad_img_per_s(item: str, expected: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(UserError, match="--img-per-s"):
        parse_img_per_s([item])
    assert expected in _user_error(["--config", str(_config_file(tmp_path)), "estimate", "--img-per-s", item], capsys)


FORMAT_FIX = "pass the JSON that benchmarks/throughput.py writes"


@pytest.mark.parametrize("content, expected", [
    (None, ("cannot be read", FORMAT_FIX)),
    ("{not json", ("is not valid JSON", FORMAT_FIX)),
    ('["digits/digits_cnn", 5]', ('holds no "img_per_s" mapping', FORMAT_FIX)),
    ('{"device": "x", "img_per_s": 5}', ('holds no "img_per_s" mapping', FORMAT_FIX)),
    ('{"img_per_s": {"tiny/resnet8": 5}}', ("unknown dataset 'tiny'", "use one of: ")),
    ('{"img_per_s": {"digits/digits_cnn": "fast"}}', ("not a positive number", "images per second")),
    ('{"img_per_s": {"digits/digits_cnn": true}}', ("not a positive number", "images per second")),
])
def test_bad_throughput_file(content: str | None, expected: tuple[str, str], tmp_path: Path, capsys) -> None:
    throughput = tmp_path / "throughput.json"
    if content is not None:
        throughput.write_text(content)
    with pytest.raises(UserError, match="throughput file"):
        read_throughput(throughput)
    err = _user_error(["--config", str(_config_file(tmp_path)), "estimate", "--throughput", str(throughput)], capsys)
    problem, fix = expected
    assert problem in err.split("\n  fix: ")[0] and fix in err.split("\n  fix: ")[1]


def test_slurm_runtime_needs_a_throughput(tmp_path: Path, capsys) -> None:
    err = _user_error(["--config", str(_config_file(tmp_path)), "estimate", "--slurm-runtime"], capsys)
    assert "--slurm-runtime needs" in err and "--img-per-s" in err


def test_a_dataset_without_split_sizes_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(DATASETS.get("digits"), "split_samples")
    with pytest.raises(UserError, match="dataset plugin 'digits' .* declares no split_samples"):
        estimate(load_config(_config_file(tmp_path)))


@pytest.mark.parametrize("config, jobs", [("config/config.yaml", 27), ("config/paper.yaml", 1608)])
def test_shipped_configs_count_the_grid(config: str, jobs: int) -> None:
    """Every run of the grid once, plus one pretraining per (dataset, model, seed); config.yaml's
    27 jobs are the README's."""
    cfg = load_config(REPO_ROOT / config)
    rows = estimate(cfg)
    assert sum(row.runs for row in rows if row.rule != "pretrain") == len(grid(cfg))
    seeds = sum(len(cfg.seeds_of(dataset)) for dataset, _ in cfg.benchmarks())
    assert sum(row.runs for row in rows if row.rule == "pretrain") == seeds
    assert totals(rows)["jobs"] == jobs
