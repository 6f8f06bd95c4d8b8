"""What a model is: built by name with its weights and input, its stages, its classifier head."""
