"""config/paper.yaml is held to the settings ledger, docs/paper-settings.md.

The ledger states, for every method of the papers' grid and every benchmark, each setting with
the value paper.yaml resolves to, the paper's or upstream code's value and its source, and why
they differ. This test resolves every method's hyperparameters (and every benchmark's recipe)
from paper.yaml exactly as a run does and requires a ledger row, with the same value, for each:
a value changed in paper.yaml, or a default changed in a method's ``Hparams``, without its
ledger row fails here.

Ledger format: one ``## <method>`` section (``## recipe`` for the training recipe) holding a
Markdown table whose columns are setting | scope | value in paper.yaml | paper / upstream value |
source | why it differs. ``scope`` is ``all``, a dataset or ``dataset/model``; the most specific
row wins. The value may be written in backticks; ``variant`` as the value means the key is set by the method variants in paper.yaml's
``methods`` list (e.g. ``noncomm[order=pq,acts=true]``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from paths import REPO_ROOT

from jpqbench.base.config import BenchConfig, TrainRecipe, load_config
from jpqbench.base.method_spec import make_method, parse_method_spec

PROJECT = REPO_ROOT
LEDGER = PROJECT / "docs" / "paper-settings.md"
PAPER = PROJECT / "config" / "paper.yaml"
COLUMNS = ["setting", "scope", "value in paper.yaml", "paper / upstream value", "source", "why it differs"]
RECIPE = "recipe"


@dataclass(frozen=True)
class Row:
    section: str
    setting: str
    scope: str
    value: str
    source: str
    line: int


def read_ledger(path: Path = LEDGER) -> list[Row]:
    """Every table row of the ledger, with its section; a malformed table fails with its line."""
    rows, section, header_ok = [], None, False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith("## "):
            section, header_ok = line[3:].strip(), False
            continue
        if not line.startswith("|") or section is None:
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]  # `\|` is a literal pipe
        if cells == COLUMNS:
            header_ok = True
            continue
        if set("".join(cells)) <= set("-: "):
            continue
        assert header_ok, f"{path.name}:{number}: a table row before the header {' | '.join(COLUMNS)}"
        assert len(cells) == len(COLUMNS), f"{path.name}:{number}: {len(cells)} cells, not {len(COLUMNS)}"
        setting = re.fullmatch(r"`([a-z_0-9]+)`", cells[0])
        assert setting, f"{path.name}:{number}: the setting {cells[0]!r} is not a `name`"
        assert cells[4], f"{path.name}:{number}: the row names no source"
        value = cells[2].strip("`")  # a value may be written as code
        if value != "variant":
            try:
                yaml.safe_load(value)
            except yaml.YAMLError:
                pytest.fail(f"{path.name}:{number}: the value {cells[2]!r} is not YAML")
        rows.append(Row(section, setting.group(1), cells[1], value, cells[4], number))
    return rows


def _plain(value: Any) -> Any:
    """Tuples as lists and dict values likewise, as YAML reads them back."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _specificity(scope: str, dataset: str, model: str) -> int | None:
    """How specifically ``scope`` covers (dataset, model): 2, 1 or 0 (``all``); None if it does not."""
    return {f"{dataset}/{model}": 2, dataset: 1, "all": 0}.get(scope)


def _resolved(config: BenchConfig) -> list[tuple[str, str, str, str, Any, bool]]:
    """(section, dataset, model, setting, value, set by the variant) for every setting of the grid."""
    settings = []
    for dataset, model in config.benchmarks():
        recipe = config.recipe(dataset, model).model_dump(exclude={"model"})
        settings += [(RECIPE, dataset, model, key, value, False) for key, value in recipe.items()]
        for spec in config.methods:
            name, overrides = parse_method_spec(spec)
            hparams = make_method(spec, config.method_params_of(dataset, model)).hp.model_dump()
            settings += [(name, dataset, model, key, value, key in overrides) for key, value in hparams.items()]
    return settings


def ledger_problems(config: BenchConfig, rows: list[Row]) -> list[str]:
    """What in ``config`` the ledger does not state, or states with another value."""
    problems = []
    for section, dataset, model, key, value, by_variant in _resolved(config):
        covering = [(spec, row) for row in rows if row.section == section and row.setting == key
                    and (spec := _specificity(row.scope, dataset, model)) is not None]
        if not covering:
            problems.append(f"{section}.{key} at {dataset}/{model}: no ledger row")
            continue
        best = max(spec for spec, _ in covering)
        chosen = [row for spec, row in covering if spec == best]
        if len(chosen) > 1:
            problems.append(f"{section}.{key} at {dataset}/{model}: rows {[r.line for r in chosen]} both apply")
            continue
        row = chosen[0]
        if by_variant:
            if row.value != "variant":
                problems.append(f"{section}.{key} (line {row.line}): set by a variant in `methods`, "
                                f"the ledger must say `variant`")
        elif row.value == "variant" or _plain(yaml.safe_load(row.value)) != _plain(value):
            problems.append(f"{section}.{key} at {dataset}/{model}: paper.yaml resolves to {value!r}, "
                            f"the ledger (line {row.line}) says {row.value}")
    return problems


def stale_rows(config: BenchConfig, rows: list[Row]) -> list[str]:
    """Rows naming a section, setting or scope that the papers' grid does not have."""
    names = {parse_method_spec(spec)[0] for spec in config.methods}
    scopes = {"all", *config.datasets, *(f"{d}/{m}" for d, m in config.benchmarks())}
    known = {name: set(make_method(name).hp.model_dump()) for name in names}
    known[RECIPE] = set(TrainRecipe.model_fields) - {"model"}
    return [f"line {row.line}: {row.section}.{row.setting} at scope {row.scope!r}" for row in rows
            if row.section not in known or row.setting not in known[row.section] or row.scope not in scopes]


@pytest.fixture(scope="module")
def paper() -> BenchConfig:
    return load_config(PAPER)


def test_every_setting_of_the_papers_grid_has_its_ledger_row_with_the_same_value(paper: BenchConfig) -> None:
    problems = ledger_problems(paper, read_ledger())
    assert not problems, "docs/paper-settings.md and config/paper.yaml disagree:\n" + "\n".join(problems[:40])


def test_the_ledger_has_no_row_for_a_setting_or_scope_the_grid_lacks(paper: BenchConfig) -> None:
    stale = stale_rows(paper, read_ledger())
    assert not stale, "ledger rows naming nothing in the papers' grid:\n" + "\n".join(stale)


def test_a_changed_value_without_its_ledger_row_fails(paper: BenchConfig, tmp_path: Path) -> None:
    """The check has teeth: a dataset-level override, a global one and a recipe change each break it."""
    rows = read_ledger()
    raw = yaml.safe_load(PAPER.read_text())
    raw["datasets"]["cifar10"].setdefault("method_params", {}).setdefault("djpq", {})["min_bits"] = 3
    raw["method_params"].setdefault("ajpq", {})["agent_batch_size"] = 17
    raw["datasets"]["imagenet"]["epochs"] = 31
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(raw))
    problems = "\n".join(ledger_problems(load_config(path), rows))
    assert "djpq.min_bits at cifar10/resnet20: paper.yaml resolves to 3" in problems
    assert "ajpq.agent_batch_size at imagenet/resnet18: paper.yaml resolves to 17" in problems
    assert "recipe.epochs at imagenet/mobilenet_v2: paper.yaml resolves to 31" in problems
    assert not ledger_problems(paper, rows)


def test_a_missing_row_and_a_stale_row_are_named(paper: BenchConfig) -> None:
    rows = [row for row in read_ledger() if not (row.section == "geta" and row.setting == "mode")]
    assert any(problem.startswith("geta.mode at ") and problem.endswith("no ledger row")
               for problem in ledger_problems(paper, rows))
    ghost = Row("geta", "no_such_knob", "all", "1", "ours", 0)
    assert stale_rows(paper, [ghost]) == ["line 0: geta.no_such_knob at scope 'all'"]
