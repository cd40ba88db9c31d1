"""Choosing a compression for a deployment target: per-layer sensitivity, allocation under budgets."""
