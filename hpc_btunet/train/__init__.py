"""Jobs (pre-training, fine-tuning), their engine, checkpoints, losses and metrics."""
