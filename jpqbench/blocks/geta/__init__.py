"""GETA's building blocks: QASSO (the optimizer's stages, qasso.py) and QADG (pruning groups, qadg.py)."""
