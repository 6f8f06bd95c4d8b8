"""A run's configuration: its fields and defaults, every choice list, YAML and overrides, the checks."""
