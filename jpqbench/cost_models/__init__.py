"""Built-in hardware cost models: one file per model, each registered with @register_cost_model."""
