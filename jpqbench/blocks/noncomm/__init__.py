"""The non-commutative schedules' building blocks: qsparse-style weight and activation prune/quantize operators (qsparse.py)."""
