"""One module per CLI verb: `add_args(parser)` and `run(args) -> exit code`."""
