"""Throughput benchmark of a recipe: ``python -m pretrain.bench --help``."""
