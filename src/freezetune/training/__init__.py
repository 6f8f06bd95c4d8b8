"""The training loop: its step, loss, optimizer groups and schedule, validation metrics, progress."""
