"""Layer 4: what a method's RunContext exposes -- data, augmentation, the training loop, evaluation, data parallelism -- and the Method base class."""
