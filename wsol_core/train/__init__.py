"""The per-worker training loop and its small parts: optimizer, checkpoints, evaluation."""
