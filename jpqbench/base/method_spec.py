"""Method specs: ``name`` or ``name[key=value,...]``, resolved through the method registry.

Torch-free, so that the config, the grid and the report read method names without importing
the methods' code (the registry imports a plugin only when a spec is resolved).
"""
from __future__ import annotations

from typing import Any

import yaml

from jpqbench.base.errors import UserError
from jpqbench.base.registry import METHODS


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name[key=value,...]`` -> (name, hyperparameter overrides).

    A variant lets one grid compare settings of one method side by side, e.g.
    ``noncomm[order=pq,acts=true]``; values are read as YAML scalars (``true``, ``0.5``, ``pq``).
    """
    name, bracket, rest = spec.partition("[")
    if not bracket:
        return spec, {}
    if not rest.endswith("]") or not name:
        raise UserError(f"method {spec!r} is not of the form name[key=value,...]",
                        "write e.g. noncomm[order=pq,acts=true]")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest[:-1].split(",")):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise UserError(f"method {spec!r}: {item!r} is not key=value", "write e.g. noncomm[order=pq,acts=true]")
        overrides[key.strip()] = yaml.safe_load(value.strip())
    return name, overrides


def get_method(spec: str) -> type:
    """The plugin class of a method name or variant spec."""
    return METHODS.get(parse_method_spec(spec)[0])


def make_method(spec: str, method_params: dict[str, dict[str, Any]] | None = None) -> Any:
    """Instantiate ``spec`` with the config's ``method_params[name]``, then the variant's overrides."""
    name, overrides = parse_method_spec(spec)
    return get_method(name)(**{**(method_params or {}).get(name, {}), **overrides})


def method_takes_budget(spec: str) -> bool:
    """Whether the grid runs ``spec`` at every budget (False: once per seed, as a reference)."""
    return get_method(spec).takes_budget
