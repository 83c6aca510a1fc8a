"""Layer 5: code with exactly one user method, one subpackage per method (geta, djpq, ajpq, noncomm)."""
