"""Measurement: perplexity, divergence from a reference model, size, memory, speed, reports."""
