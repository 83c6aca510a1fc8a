"""Layer 2: the model zoo, built-in model plugins discovered like the other plugins.

Every builder has the signature ``build(num_classes, input_shape) -> nn.Module``.

Models are plain ``torch.nn`` modules built from Conv2d / BatchNorm2d / Linear so that the
one cost counter, torch-pruning's dependency graph and the quantizer wrappers understand
them without special cases.
"""
