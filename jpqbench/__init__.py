"""jpqbench: a reproducible benchmarking harness for joint pruning + quantization.

The plugin API is importable from the top level (``from jpqbench import Method,
register_method, Budget, RunContext, Compressed``); it is resolved lazily so that light
modules (the report, the grid) do not import torch.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Method": "jpqbench.methods_api", "Budget": "jpqbench.methods_api", "RunContext": "jpqbench.methods_api",
    "Compressed": "jpqbench.methods_api", "register_method": "jpqbench.registry",
    "register_dataset": "jpqbench.registry", "register_model": "jpqbench.registry",
    "CompressionPlan": "jpqbench.plan", "UserError": "jpqbench.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jpqbench' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
