"""Core pieces every other package builds on: errors, configs, registries, targeting, model I/O, data."""
