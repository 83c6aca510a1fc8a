"""Layer 3: the compression plan, the one cost counter, plan verification and the hardware cost-model API."""
