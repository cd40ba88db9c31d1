"""Pruning: unstructured, n:m and structured methods (see `methods.py` for the registry)."""
