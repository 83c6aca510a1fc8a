"""DJPQ's building block: variational information bottleneck gates (vib.py)."""
