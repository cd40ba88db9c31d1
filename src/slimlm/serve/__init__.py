"""Serving: an OpenAI-compatible HTTP server with continuous batching on the engine (`slimlm serve`)."""
