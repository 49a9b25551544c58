"""The training loop behind `plait train`: setup, evaluation, checkpoints, metrics, logs, verify, generate."""
