"""One run on disk: its directory and lock, its set-up, log, checkpoints, reports and stops."""
