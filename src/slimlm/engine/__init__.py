"""Inference runtime: prefill, decode loop, sampling."""
