"""Registries (unknown names, plugin discovery) and config validation."""
from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
from paths import REPO_ROOT

import jpqbench.base.registry as registry
from jpqbench.base.config import validate_config
from jpqbench.base.errors import UserError
from jpqbench.base.registry import COST_MODELS, DATASETS, METHODS, MODELS, discover_plugins

BUILTIN_METHODS = {"fp32", "ptq", "qat", "prune", "prune_then_quantize", "quantize_then_prune"}


def _raw(**overrides) -> dict:
    raw = {
        "experiment": "t", "seeds": [0], "budgets": [0.05], "methods": ["fp32", "ptq"],
        "datasets": {"digits": {"models": {"digits_cnn": {}}, "pretrain_epochs": 1, "epochs": 1, "batch_size": 64,
                                "lr": 0.05, "finetune_lr": 0.01, "max_steps_per_epoch": 3}},
    }
    raw.update(overrides)
    return raw


# ---------------------------------------------------------------- registries
def test_builtin_plugins_are_registered() -> None:
    assert BUILTIN_METHODS <= set(METHODS.names())
    assert "digits" in DATASETS.names() and {"resnet8", "resnet20", "digits_cnn", "resnet18"} <= set(MODELS.names())


def test_a_class_carries_its_registered_name_and_file_however_it_is_looked_up() -> None:
    """The name is set at registration: a class taken straight from the registry (not through
    get_method) is complete, and the file it came from is recorded (several methods share one)."""

    assert all(METHODS.get(name).name == name for name in METHODS.names())
    assert all(COST_MODELS.get(name).name == name for name in COST_MODELS.names())
    assert (METHODS.file_of("ptq"), METHODS.file_of("prune_then_quantize")) == ("jpqbench/methods/uniform.py",
                                                                                 "jpqbench/methods/sequential.py")
    assert DATASETS.file_of("cifar10") == "jpqbench/datasets/cifar10.py"


def test_invalid_hyperparameters_point_to_the_file_that_defines_them() -> None:
    from jpqbench.base.method_spec import make_method

    with pytest.raises(UserError) as info:
        make_method("ptq[no_such_knob=1]")
    assert "invalid hyperparameters for method 'ptq'" in info.value.problem
    assert info.value.fix == "see the Hparams of jpqbench/methods/uniform.py"


def test_every_hyperparameter_is_described_and_listed(capsys: pytest.CaptureFixture[str]) -> None:
    from jpqbench.pipeline.cli import main

    fields = {(name, field): info for name in METHODS.names()
              for field, info in METHODS.get(name).Hparams.model_fields.items()}
    assert all(info.description for info in fields.values()), [key for key, info in fields.items()
                                                                 if not info.description]
    assert main(["list", "methods", "-v"]) == 0
    out = capsys.readouterr().out
    assert "defined in jpqbench/methods/uniform.py" in out
    for (name, field), info in fields.items():
        assert f"   {field} = {info.default!r}: {info.description}" in out, (name, field)


def test_list_shows_cost_models(capsys: pytest.CaptureFixture[str]) -> None:
    from jpqbench.pipeline.cli import main

    assert main(["list", "cost-models"]) == 0
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()} >= {"bops", "size", "mpic"}


@pytest.mark.parametrize("registry_, kind, known", [
    (METHODS, "method", "fp32"), (DATASETS, "dataset", "digits"), (MODELS, "model", "resnet20")])
def test_unknown_name_lists_the_known_ones(registry_, kind: str, known: str) -> None:
    with pytest.raises(UserError) as info:
        registry_.get("no_such_thing")
    assert info.value.problem == f"unknown {kind} 'no_such_thing'"
    for name in registry_.names():
        assert name in info.value.fix
    assert known in info.value.fix


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch):
    """Rediscover plugins in this test only; every registry table is restored afterwards."""
    discover_plugins()  # the project's plugins are loaded (and cached in sys.modules) first
    for reg in (METHODS, DATASETS, MODELS):
        monkeypatch.setattr(reg, "_items", dict(reg._items))
        monkeypatch.setattr(reg, "_origin", dict(reg._origin))
    monkeypatch.setattr(registry, "_discovered", False)
    before = set(sys.modules)
    yield monkeypatch
    for name in set(sys.modules) - before:
        if name.startswith("jpqbench_plugins."):
            del sys.modules[name]


PLUGIN = '''
from jpqbench.harness.method import Method
from jpqbench.base.registry import register_method


@register_method("tmp_plugin_method")
class TmpPlugin(Method):
    """A method kept outside the repository."""
'''


def test_plugin_discovered_from_env_path(tmp_path: Path, isolated_registry: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "tmp_method.py").write_text(textwrap.dedent(PLUGIN))
    (folder / "_private.py").write_text("raise RuntimeError('files starting with _ are not plugins')\n")
    isolated_registry.setenv(registry.PLUGIN_PATH_ENV, str(folder))
    assert "tmp_plugin_method" in METHODS.names()
    assert METHODS.get("tmp_plugin_method").__doc__.startswith("A method kept outside")
    assert BUILTIN_METHODS <= set(METHODS.names())  # built-ins still there
    from jpqbench.pipeline.cli import main

    assert main(["list", "methods"]) == 0
    assert "tmp_plugin_method" in capsys.readouterr().out


def test_plugin_not_registered_without_env(isolated_registry: pytest.MonkeyPatch) -> None:
    isolated_registry.delenv(registry.PLUGIN_PATH_ENV, raising=False)
    assert "tmp_plugin_method" not in METHODS.names()


def test_missing_plugin_folder_is_a_user_error(tmp_path: Path, isolated_registry: pytest.MonkeyPatch) -> None:
    isolated_registry.setenv(registry.PLUGIN_PATH_ENV, str(tmp_path / "absent"))
    with pytest.raises(UserError, match="does not exist"):
        METHODS.names()


def test_duplicate_name_from_another_module_is_refused(tmp_path: Path,
                                                       isolated_registry: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "dupes"
    folder.mkdir()
    (folder / "dupe.py").write_text(textwrap.dedent(PLUGIN).replace("tmp_plugin_method", "ptq"))
    isolated_registry.setenv(registry.PLUGIN_PATH_ENV, str(folder))
    with pytest.raises(UserError, match="two methods are registered as 'ptq'"):
        METHODS.names()


def test_a_model_holding_a_plugin_class_saves_and_loads_in_a_fresh_process(tmp_path: Path) -> None:
    """pickle imports a class's module by its dotted name: the plugins' parent packages must exist."""
    import subprocess

    import torch

    discover_plugins()
    module = sys.modules["jpqbench.methods.cwmpq"]
    saved = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(module.PrecisionChoice([0, 2, 4, 8], slots=3)), saved)
    load = ("import torch; from jpqbench.base.registry import discover_plugins; discover_plugins(); "
            f"print(type(torch.load({str(saved)!r}, weights_only=False)[0]).__qualname__)")
    result = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "PrecisionChoice"


# ---------------------------------------------------------------- config
def test_valid_config_passes() -> None:
    config = validate_config(_raw())
    assert config.recipe("digits").max_steps_per_epoch == 3 and config.budgets == [0.05]


def test_repository_configs_are_valid() -> None:
    from jpqbench.base.config import load_config

    root = REPO_ROOT
    paths = sorted([*root.glob("config/*.yaml"), *root.glob("benchmarks/*.yaml")])
    assert len(paths) >= 3
    for path in paths:
        load_config(path)


def test_unknown_top_level_key_is_named() -> None:
    with pytest.raises(UserError) as info:
        validate_config(_raw(budgest=[0.1]))
    assert "budgest: unknown key" in info.value.problem


def test_unknown_recipe_key_is_named() -> None:
    raw = _raw()
    raw["datasets"]["digits"]["epoch"] = 3
    with pytest.raises(UserError) as info:
        validate_config(raw)
    assert "datasets.digits.epoch: unknown key" in info.value.problem


@pytest.mark.parametrize("budget", [0, 0.0, 1, 1.5, -0.1])
def test_budget_outside_0_1_is_refused(budget: float) -> None:
    with pytest.raises(UserError) as info:
        validate_config(_raw(budgets=[0.05, budget]))
    assert "  budgets: " in info.value.problem
    assert f"budget {float(budget)} is out of range" in info.value.problem


def test_unknown_method_is_named() -> None:
    with pytest.raises(UserError) as info:
        validate_config(_raw(methods=["fp32", "magic"]))
    assert "unknown method 'magic'" in info.value.problem
    assert "ptq" in info.value.fix


def test_unknown_model_and_dataset_are_named() -> None:
    raw = _raw()
    raw["datasets"]["digits"]["models"] = {"resnet999": {}}
    with pytest.raises(UserError, match="unknown model 'resnet999'"):
        validate_config(raw)
    raw = _raw()
    raw["datasets"] = {"imagenet22k": raw["datasets"]["digits"]}
    with pytest.raises(UserError, match="unknown dataset 'imagenet22k'"):
        validate_config(raw)


def test_method_params_may_hold_a_method_outside_the_grid_but_not_an_unknown_one() -> None:
    """`jpqbench run --method qat` runs with the config's qat parameters although the grid lists no qat;
    a misspelt name is still refused, naming where it stands."""
    config = validate_config(_raw(method_params={"qat": {"calibration_batches": 2}}))
    assert config.method_params_of("digits", "digits_cnn") == {"qat": {"calibration_batches": 2}}
    with pytest.raises(UserError, match=r"method_params.qta: unknown method 'qta'") as info:
        validate_config(_raw(method_params={"qta": {"calibration_batches": 2}}))
    assert "qat" in info.value.fix
    with pytest.raises(UserError, match="invalid hyperparameters for method 'qat'"):
        validate_config(_raw(method_params={"qat": {"calibration_batchez": 2}}))


def test_method_params_merge_grid_then_dataset_then_model_key_by_key() -> None:
    raw = _raw(methods=["fp32", "prune_then_quantize"],
               method_params={"prune_then_quantize": {"bits": 6, "prune_fraction": 0.3}})
    digits = raw["datasets"]["digits"]
    digits["method_params"] = {"prune_then_quantize": {"bits": 4}}
    digits["models"] = {"digits_cnn": {}, "resnet8": {"lr": 0.2, "method_params": {"prune_then_quantize":
                                                                                     {"prune_fraction": 0.6}}}}
    config = validate_config(raw)
    assert config.method_params_of("digits", "digits_cnn") == {"prune_then_quantize": {"bits": 4, "prune_fraction": 0.3}}
    assert config.method_params_of("digits", "resnet8") == {"prune_then_quantize": {"bits": 4, "prune_fraction": 0.6}}
    assert config.recipe("digits", "resnet8").lr == 0.2  # method_params is not a recipe key


@pytest.mark.parametrize("where", ["dataset", "model"])
def test_dataset_and_model_method_params_are_validated(where: str) -> None:
    def placed(params: dict) -> dict:
        raw = _raw()
        if where == "dataset":
            raw["datasets"]["digits"]["method_params"] = params
        else:
            raw["datasets"]["digits"]["models"]["digits_cnn"] = {"method_params": params}
        return raw

    prefix = "datasets.digits" + (".models.digits_cnn" if where == "model" else "")
    with pytest.raises(UserError, match=re.escape(f"{prefix}.method_params.qta: unknown method 'qta'")):
        validate_config(placed({"qta": {"calibration_batches": 2}}))
    with pytest.raises(UserError, match=r"digits/digits_cnn: invalid hyperparameters for method 'ptq'"):
        validate_config(placed({"ptq": {"calibration_batchez": 2}}))
    with pytest.raises(UserError, match=r"digits/digits_cnn: invalid hyperparameters for method 'ptq'"):
        validate_config(placed({"ptq": {"calibration_batches": "many"}}))


def test_out_of_range_recipe_values_are_named() -> None:
    raw = _raw()
    raw["datasets"]["digits"]["epochs"] = 0
    with pytest.raises(UserError, match="datasets.digits.epochs"):
        validate_config(raw)
    with pytest.raises(UserError, match="seeds"):
        validate_config(_raw(seeds=[]))


def test_models_share_the_dataset_recipe_and_override_their_own_keys() -> None:
    raw = _raw()
    raw["datasets"]["digits"]["models"] = {"digits_cnn": {}, "resnet8": {"lr": 0.2, "epochs": 4}}
    config = validate_config(raw)
    assert config.benchmarks() == [("digits", "digits_cnn"), ("digits", "resnet8")]
    assert (config.recipe("digits", "digits_cnn").lr, config.recipe("digits", "digits_cnn").epochs) == (0.05, 1)
    wide = config.recipe("digits", "resnet8")
    assert (wide.model, wide.lr, wide.epochs, wide.batch_size) == ("resnet8", 0.2, 4, 64)


def test_model_override_errors_name_the_model_and_key() -> None:
    raw = _raw()
    raw["datasets"]["digits"]["models"] = {"digits_cnn": {"lrr": 0.1}}
    with pytest.raises(UserError, match=r"models\.digits_cnn\.lrr: unknown key"):
        validate_config(raw)
    raw["datasets"]["digits"]["models"] = {"digits_cnn": {"epochs": 0}}
    with pytest.raises(UserError, match=r"models\.digits_cnn\.epochs: Input should be greater than or equal to 1"):
        validate_config(raw)


def test_a_dataset_with_several_models_needs_the_model_named() -> None:
    raw = _raw()
    raw["datasets"]["digits"]["models"] = {"digits_cnn": {}, "resnet8": {}}
    config = validate_config(raw)
    with pytest.raises(UserError, match="several models") as info:
        config.recipe("digits")
    assert "--model" in info.value.fix
    with pytest.raises(UserError, match="model 'vgg7' is not configured for dataset 'digits'"):
        config.recipe("digits", "vgg7")
    with pytest.raises(UserError, match="dataset 'cifar10' is not in the config"):
        config.recipe("cifar10", "resnet8")


def test_method_variants_override_hyperparameters() -> None:
    from jpqbench.base.method_spec import make_method, parse_method_spec

    assert parse_method_spec("qat") == ("qat", {})
    assert parse_method_spec("prune_then_quantize[bits=4, prune_fraction=0.25]") == (
        "prune_then_quantize", {"bits": 4, "prune_fraction": 0.25})
    method = make_method("prune_then_quantize[bits=4]", {"prune_then_quantize": {"bits": 6, "prune_fraction": 0.3}})
    assert (method.hp.bits, method.hp.prune_fraction) == (4, 0.3)  # the variant wins over method_params
    config = validate_config(_raw(methods=["fp32", "ptq", "ptq[calibration_batches=2]"]))
    assert config.methods[-1] == "ptq[calibration_batches=2]"


@pytest.mark.parametrize("spec, message", [
    ("ptq[calibration_batches=2", "is not of the form"),
    ("ptq[calibration_batches]", "is not key=value"),
    ("ptq[bits=4]", "invalid hyperparameters for method 'ptq'"),
    ("magic[bits=4]", "unknown method 'magic'"),
])
def test_bad_method_variants_are_named(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        validate_config(_raw(methods=["fp32", spec]))


def test_a_dataset_may_run_its_own_seeds() -> None:
    from jpqbench.pipeline.grid import grid

    raw = _raw(seeds=[0, 1, 2], methods=["fp32"])
    raw["datasets"]["minispeech"] = {**raw["datasets"]["digits"], "models": {"ds_cnn": {}}, "seeds": [5]}
    config = validate_config(raw)
    assert config.seeds_of("digits") == [0, 1, 2] and config.seeds_of("minispeech") == [5]
    assert sorted((p.dataset, p.seed) for p in grid(config)) == [
        ("digits", 0), ("digits", 1), ("digits", 2), ("minispeech", 5)]


def test_a_dataset_may_run_its_own_budgets() -> None:
    from jpqbench.pipeline.grid import grid

    raw = _raw(budgets=[0.02, 0.05, 0.1], methods=["fp32", "qat"])
    raw["datasets"]["minispeech"] = {**raw["datasets"]["digits"], "models": {"ds_cnn": {}}, "budgets": [0.05]}
    config = validate_config(raw)
    assert config.budgets_of("digits") == [0.02, 0.05, 0.1] and config.budgets_of("minispeech") == [0.05]
    budgeted = sorted((p.dataset, p.budget.target) for p in grid(config) if p.budget is not None)
    assert budgeted == [("digits", 0.02), ("digits", 0.05), ("digits", 0.1), ("minispeech", 0.05)]
    assert config.recipe("minispeech").model == "ds_cnn"  # `budgets` is no recipe key


def test_a_dataset_budget_out_of_range_is_refused() -> None:
    raw = _raw()
    raw["datasets"]["digits"]["budgets"] = [1.5]
    with pytest.raises(UserError, match="budget 1.5 is out of range"):
        validate_config(raw)


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    from jpqbench.base.config import load_config

    project_config = REPO_ROOT / "config" / "config.yaml"
    path = tmp_path / "twice.yaml"
    path.write_text(project_config.read_text().replace("budget_metric: bops", "budget_metric: bops\nbudget_metric: size"))
    with pytest.raises(UserError, match="key 'budget_metric' appears twice"):
        load_config(path)
    assert load_config(project_config).budget_metric == "bops"
