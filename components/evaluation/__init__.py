"""Evaluation internals, called by components/evaluate.py: metrics with bootstrap intervals
(metrics.py), figures (plots.py) and what goes into the MLflow run (mlflow_log.py)."""
