"""The package's layers (docs/layout.md), read off the source: every import points down, none loops.

The imports are parsed, not executed, so an import inside a function or under
``TYPE_CHECKING`` counts like one at the top of the file.
"""
from __future__ import annotations

import ast
import importlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import jpqbench

PACKAGE = Path(jpqbench.__file__).resolve().parent
# lowest first; a module may import from its own layer and the layers below it
LAYERS: list[set[str]] = [{"base"}, {"nn"}, {"models"}, {"accounting"}, {"harness"}, {"export"}, {"blocks"},
                          {"pipeline"}, {"methods", "datasets", "cost_models"}]
PLUGIN_PACKAGES = {"methods", "datasets", "cost_models"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every ``import`` / ``from ... import`` of a jpqbench module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "jpqbench"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jpqbench":
            found.append((node.module, [alias.name for alias in node.names]))
    return found


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _package(module: str) -> str:
    """The top subpackage of a module (``jpqbench.nn.layers`` -> ``nn``); the facade is ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(module: str) -> int:
    package = _package(module)
    for index, members in enumerate(LAYERS):
        if package in members:
            return index
    raise AssertionError(f"{module} lies in no layer: add its package to LAYERS and docs/layout.md")


def _targets(module: str, imported: str, names: list[str]) -> list[str]:
    """The modules an import statement really depends on (``from jpqbench.base import atomic`` -> the submodule)."""
    if imported == "jpqbench":
        return ["jpqbench"]
    subs = [f"{imported}.{name}" for name in names if f"{imported}.{name}" in MODULES]
    return subs or [imported]


EDGES = {module: sorted({target for imported, names in _imports(path) for target in _targets(module, imported, names)})
         for module, path in MODULES.items()}


def test_every_module_lies_in_a_layer() -> None:
    for module in MODULES:
        if module != "jpqbench":
            _layer(module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "jpqbench"))
def test_imports_point_down_only(module: str) -> None:
    """A module imports from its own layer or lower; only plugins import the facade (``jpqbench``)."""
    upward = []
    for target in EDGES[module]:
        if target == "jpqbench":
            if _package(module) not in PLUGIN_PACKAGES:
                upward.append("jpqbench (the plugin facade: import from the defining module instead)")
        elif _layer(target) > _layer(module):
            upward.append(target)
    assert not upward, f"{module} imports from layers above it: {upward}"


def test_the_facade_imports_nothing_of_the_package_statically() -> None:
    """``jpqbench/__init__.py`` resolves its names lazily; a static import would load torch for the
    report and the grid, and make every layer depend on the facade."""
    assert EDGES["jpqbench"] == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _package(m) in PLUGIN_PACKAGES))
def test_plugins_use_the_one_import_api(module: str) -> None:
    """A plugin imports ``jpqbench`` itself, and a method also its own blocks (``jpqbench.blocks.<name>``)."""
    allowed_blocks = f"jpqbench.blocks.{module.rsplit('.', 1)[-1]}"
    bad = [target for target in EDGES[module]
           if target != "jpqbench" and not (_package(module) == "methods" and target.startswith(allowed_blocks))]
    assert not bad, f"{module} imports {bad}: take them from `jpqbench` (add a missing name to jpqbench/__init__.py)"


def test_a_method_block_serves_one_method() -> None:
    """``jpqbench.blocks.<x>`` is code with one user: no other block package imports it."""
    for module, targets in EDGES.items():
        if _package(module) == "blocks" and module.count(".") >= 2:
            own = module.split(".")[2]
            foreign = [t for t in targets if _package(t) == "blocks" and t.count(".") >= 2 and t.split(".")[2] != own]
            assert not foreign, f"{module} imports another method's blocks: {foreign} (move shared code to jpqbench.nn)"


def test_no_import_cycles() -> None:
    """Depth-first search over the module graph: a back edge is a cycle, reported as its path."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in EDGES.get(module, []):
            if target not in MODULES:
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module)


def test_every_facade_name_resolves_and_plugins_find_what_they_import() -> None:
    for name in jpqbench.__all__:
        assert getattr(jpqbench, name) is not None, name
    for module in MODULES:
        if _package(module) in PLUGIN_PACKAGES:
            for imported, names in _imports(MODULES[module]):
                if imported == "jpqbench":
                    missing = [n for n in names if n not in jpqbench.__all__]
                    assert not missing, f"{module} imports {missing}, which jpqbench does not export"


def test_old_module_names_resolve_to_the_moved_modules() -> None:
    """``model.pt`` files pickled before the layered layout name classes by their old modules."""
    for old, new in jpqbench.MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new)
    assert importlib.import_module("jpqbench.layers").CompressibleConv2d.__module__ == "jpqbench.nn.layers"
    # the split ResNet blocks moved from the zoo (which stays) to nn.activations: an old pickle's
    # GLOBAL opcode still names them in the zoo
    from jpqbench.nn.activations import SplitReLUBasicBlock, SplitReLUBottleneck

    for old_name, cls in (("_SplitReLUBasicBlock", SplitReLUBasicBlock), ("_SplitReLUBottleneck", SplitReLUBottleneck)):
        assert pickle.loads(f"cjpqbench.models.zoo\n{old_name}\n.".encode()) is cls


def test_the_base_layer_and_the_report_do_not_import_torch() -> None:
    """The base is torch-free, so the config, the grid and the report load in a fraction of a second
    (Snakemake parses the grid at every start; the report notebook's kernel needs no torch)."""
    code = ("import sys; import jpqbench, jpqbench.base.config, jpqbench.base.registry, jpqbench.base.atomic, "
            "jpqbench.base.method_spec, jpqbench.base.budget, jpqbench.pipeline.grid, jpqbench.pipeline.aggregate, "
            "jpqbench.pipeline.report; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
