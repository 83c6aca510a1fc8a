"""Built-in dataset plugins: one file per dataset, each registered with @register_dataset."""
