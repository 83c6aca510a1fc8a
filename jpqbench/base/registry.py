"""Decorator registries for methods, datasets, models and cost models, with plugin discovery.

Modelled on timm's model registry and benchopt's one-file solvers: a plugin is one file
that calls ``@register_method("name")`` (or ``register_dataset`` / ``register_model`` /
``register_cost_model``).
No central list is edited to add one.

Where plugins come from, in order (:func:`discover_plugins`, the one discovery):

1. the built-in plugin packages ``jpqbench.models``, ``jpqbench.methods``,
   ``jpqbench.datasets`` and ``jpqbench.cost_models``: every module in them is imported, so
   they work the same from a source checkout and from a plain ``pip install .``;
2. extra folders listed in the environment variable ``JPQBENCH_PLUGIN_PATH``
   (``os.pathsep``-separated), for a user's own plugins kept outside the package, each file
   loaded by path as ``jpqbench_plugins.<folder>.<file>``;
3. installed third-party packages that declare an entry point in the groups
   ``jpqbench.models`` / ``jpqbench.methods`` / ``jpqbench.datasets`` /
   ``jpqbench.cost_models`` (the entry point names a module; importing it registers its plugins).

The built-in packages are named as strings, not imported here, so this torch-free base layer
depends on none of the layers above it.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import pkgutil
import sys
import types
from pathlib import Path
from typing import Callable, Generic, TypeVar

from jpqbench.base.errors import UserError

T = TypeVar("T")

# the folder holding the jpqbench package: the repository in a checkout, site-packages in an install
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
PLUGIN_PATH_ENV = "JPQBENCH_PLUGIN_PATH"


class Registry(Generic[T]):
    """A name -> object table filled by a decorator, which records the file each entry came from.

    ``names_classes``: the registered classes carry their registered name as ``cls.name`` (methods,
    cost models), set when they register -- so the class is complete however it is looked up.
    """

    def __init__(self, kind: str, names_classes: bool = False) -> None:
        self.kind = kind
        self.names_classes = names_classes
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}
        self._files: dict[str, Path | None] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")`` stores the decorated object."""

        def decorator(obj: T) -> T:
            origin = getattr(obj, "__module__", "?")
            if name in self._items and self._origin[name] != origin:
                raise UserError(
                    f"two {self.kind}s are registered as {name!r} "
                    f"({self._origin[name]} and {origin})",
                    f"rename one of them; {self.kind} names must be unique",
                )
            if self.names_classes:
                obj.name = name  # type: ignore[attr-defined]
            self._items[name] = obj
            self._origin[name] = origin
            source = inspect.getsourcefile(obj) if callable(obj) else None
            self._files[name] = Path(source) if source else None
            return obj

        return decorator

    def file_of(self, name: str) -> str:
        """Where ``name`` is defined: its file, as ``jpqbench/...`` for a built-in plugin."""
        path = self._files.get(name)
        if path is None:
            return f"the {self.kind} {name!r}"
        return str(path.relative_to(PACKAGE_PARENT)) if path.is_relative_to(PACKAGE_PARENT) else str(path)

    def get(self, name: str) -> T:
        discover_plugins()
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UserError(
                f"unknown {self.kind} {name!r}",
                f"use one of: {known} (see `jpqbench list {self.kind}s`)",
            )
        return self._items[name]

    def names(self) -> list[str]:
        discover_plugins()
        return sorted(self._items)


METHODS: Registry = Registry("method", names_classes=True)
DATASETS: Registry = Registry("dataset")
MODELS: Registry = Registry("model")
COST_MODELS: Registry = Registry("cost model", names_classes=True)  # hardware cost models (jpqbench/accounting/hardware.py)

register_method = METHODS.register
register_dataset = DATASETS.register
register_model = MODELS.register
register_cost_model = COST_MODELS.register

BUILTIN_PLUGIN_PACKAGES = ("jpqbench.models", "jpqbench.methods", "jpqbench.datasets", "jpqbench.cost_models")
ENTRY_POINT_GROUPS = BUILTIN_PLUGIN_PACKAGES  # a third-party package declares its plugins under the same names

_discovered = False


def plugin_dirs() -> list[Path]:
    """The user's plugin folders (``JPQBENCH_PLUGIN_PATH``), in load order."""
    extra = os.environ.get(PLUGIN_PATH_ENV, "")
    return [Path(p) for p in extra.split(os.pathsep) if p]


def _ensure_package(name: str) -> None:
    """Register an empty package ``name`` so that ``import name.child`` resolves through
    sys.modules: pickle imports a class's module by its dotted name, so without the parents a
    model holding a plugin's class (a method's quantizer, say) could not be saved or loaded."""
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = []
        sys.modules[name] = package


def _load_file(path: Path) -> None:
    module_name = f"jpqbench_plugins.{path.parent.name}.{path.stem}"
    if module_name in sys.modules:
        return
    _ensure_package("jpqbench_plugins")
    _ensure_package(f"jpqbench_plugins.{path.parent.name}")
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - not a python file
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[module_name]
        raise


def _import_package(name: str) -> None:
    """Import every module of the plugin package ``name`` (those not starting with ``_``)."""
    package = importlib.import_module(name)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda info: info.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{name}.{info.name}")


def discover_plugins() -> None:
    """Import every plugin once (idempotent): built-in packages, user folders, entry points."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for package in BUILTIN_PLUGIN_PACKAGES:
        _import_package(package)
    for folder in plugin_dirs():
        if not folder.is_dir():
            raise UserError(f"plugin folder {folder} listed in {PLUGIN_PATH_ENV} does not exist",
                            f"create it or remove it from {PLUGIN_PATH_ENV}")
        for path in sorted(folder.glob("*.py")):
            if not path.name.startswith("_"):
                _load_file(path)
    for group in ENTRY_POINT_GROUPS:
        for entry_point in importlib.metadata.entry_points(group=group):
            entry_point.load()
