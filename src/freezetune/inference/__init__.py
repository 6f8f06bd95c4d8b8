"""Using a trained model: load and evaluate a checkpoint, predict on new files, export it."""
