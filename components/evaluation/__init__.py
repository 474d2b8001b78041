"""Evaluation internals, called by components/evaluate.py: metrics with bootstrap intervals
(metrics.py) and figures (plots.py)."""
