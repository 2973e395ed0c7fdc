"""Pipelines: load, plan and run one command's work from its settings to its results."""
