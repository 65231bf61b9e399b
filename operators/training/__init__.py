"""Training: the t-batch trainer and the end-to-end run that writes a checkpoint."""
