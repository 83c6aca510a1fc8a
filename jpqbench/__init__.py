"""jpqbench: a reproducible benchmarking harness for joint pruning + quantization.

The plugin API is this one import: a method, dataset, model or cost-model plugin takes
everything it needs from ``jpqbench`` (``from jpqbench import Method, Budget, RunContext,
Compressed, register_method, ...``); only a method's own building blocks come from
``jpqbench.blocks.<method>``. The names are resolved lazily, so that ``import jpqbench`` stays
light for the modules that need no torch (the grid, the report).

Modules moved by the layered layout (``jpqbench.layers`` -> ``jpqbench.nn.layers``, ...) stay
importable under their old names (:data:`MOVED`), so ``model.pt`` files pickled before the move
still load.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from importlib import import_module
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

_API_MODULES: dict[str, tuple[str, ...]] = {
    "jpqbench.base.errors": ("UserError",),
    "jpqbench.base.budget": ("Budget",),
    "jpqbench.base.registry": ("DATASETS", "METHODS", "MODELS", "COST_MODELS", "register_method",
                               "register_dataset", "register_model", "register_cost_model"),
    "jpqbench.nn.quant": ("FLOAT_BITS", "UniformQuantizer", "round_ste", "scale_grad"),
    "jpqbench.nn.layers": ("batchnorm_affine", "compressible_layers", "cpu_copy", "make_compressible",
                           "mask_batchnorm", "module_device", "observe_inputs"),
    "jpqbench.nn.learned_quant": ("LearnedQuantizer", "calibrate_inputs", "install_learned_quantizers", "layer_bits"),
    "jpqbench.nn.channel_pruning": ("ChannelGroups", "apply_masks", "classifier_name", "prune_to_budget"),
    "jpqbench.nn.uniform_quantization": ("calibrate", "largest_uniform_bits", "quantize_uniform",
                                         "quantize_within_budget"),
    "jpqbench.accounting.plan": ("CompressionPlan", "LayerPlan", "plan_from_model", "with_pruned", "with_uniform_bits"),
    "jpqbench.accounting.hardware": ("CostModel", "LayerCostInput", "get_cost_model", "layer_shapes"),
    "jpqbench.harness.data": ("DataBundle", "DatasetPlugin", "ImageFiles", "MANIFEST_FILE", "TensorSplit",
                              "decode_image", "file_sha256", "fingerprint_tensors", "split_targets",
                              "stratified_subset"),
    "jpqbench.harness.augment": ("ImageBatches", "random_shift_and_noise"),
    "jpqbench.harness.distributed": ("shard_steps",),
    "jpqbench.harness.train": ("TrainHooks", "default_param_groups"),
    "jpqbench.harness.method": ("Compressed", "Method", "RunContext"),
    "jpqbench.export.handlers": ("register_activation_operator", "register_masked_quantizer"),
}
_EXPORTS = {name: module for module, names in _API_MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)

MOVED: dict[str, str] = {
    "jpqbench.errors": "jpqbench.base.errors", "jpqbench.atomic": "jpqbench.base.atomic",
    "jpqbench.registry": "jpqbench.base.registry", "jpqbench.config": "jpqbench.base.config",
    "jpqbench.quant": "jpqbench.nn.quant", "jpqbench.layers": "jpqbench.nn.layers",
    "jpqbench.learned_quant": "jpqbench.nn.learned_quant", "jpqbench.prune": "jpqbench.nn.channel_pruning",
    "jpqbench.uniform": "jpqbench.nn.uniform_quantization", "jpqbench.plan": "jpqbench.accounting.plan",
    "jpqbench.cost": "jpqbench.accounting.counter", "jpqbench.hw_cost": "jpqbench.accounting.hardware",
    "jpqbench.data": "jpqbench.harness.data", "jpqbench.augment": "jpqbench.harness.augment",
    "jpqbench.distributed": "jpqbench.harness.distributed", "jpqbench.train": "jpqbench.harness.train",
    "jpqbench.evaluate": "jpqbench.harness.evaluate", "jpqbench.methods_api": "jpqbench.harness.method",
    "jpqbench.qasso": "jpqbench.blocks.geta.qasso", "jpqbench.qadg": "jpqbench.blocks.geta.qadg",
    "jpqbench.vib": "jpqbench.blocks.djpq.vib", "jpqbench.ajpq_env": "jpqbench.blocks.ajpq.env",
    "jpqbench.qsparse": "jpqbench.blocks.noncomm.qsparse", "jpqbench.export.finished": "jpqbench.pipeline.reexport",
    "jpqbench.runner": "jpqbench.pipeline.runner", "jpqbench.grid": "jpqbench.pipeline.grid",
    "jpqbench.tracking": "jpqbench.pipeline.tracking", "jpqbench.aggregate": "jpqbench.pipeline.aggregate",
    "jpqbench.report": "jpqbench.pipeline.report", "jpqbench.estimate": "jpqbench.pipeline.estimate",
    "jpqbench.cli": "jpqbench.pipeline.cli",
}
"""Old module name -> its module in the layered layout (issue 20)."""


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jpqbench' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module name to the moved module itself (one module object, two names)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the moved module is already imported."""


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
