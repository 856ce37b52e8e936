"""Training: configuration, the method registry, the trainer and what it needs (callbacks,
distribution, checkpoints, the run directory, schedules and optimizers)."""
