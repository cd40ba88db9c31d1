"""Tiny random models and shared asserts, public so users can test their plug-ins with them."""

from slimlm.testing.tiny import FAMILIES, save_tiny_model, tiny_model, tiny_tokenizer

__all__ = ["FAMILIES", "save_tiny_model", "tiny_model", "tiny_tokenizer"]
