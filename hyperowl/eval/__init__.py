"""Evaluation: run a model over a task file, write per-sample predictions and a summary."""
