"""The model zoo. Every builder has the signature ``build(num_classes, input_shape) -> nn.Module``.

Models are plain ``torch.nn`` modules built from Conv2d / BatchNorm2d / Linear so that the
one cost counter, torch-pruning's dependency graph and the quantizer wrappers understand
them without special cases.
"""
from jpqbench.models import zoo  # noqa: F401  (registers the builders)
