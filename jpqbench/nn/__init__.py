"""Layer 1: numeric building blocks with at least two users -- quantizers, compressible layers, channel pruning, uniform quantization."""
