"""Layer 0, torch-free: errors, atomic writes, the registries and the one plugin discovery, the config schema, budgets and method specs."""
