"""Evaluation: the paper and frozen protocols, metrics, baselines and the history scorer."""
