"""`slimlm serve MODEL`: an OpenAI-compatible server with continuous batching on the engine. The flags
are derived from `ServeConfig` (the settings `slimlm.serve` takes), checked before anything loads."""

from __future__ import annotations

import argparse
import os

from slimlm.commands._flags import add_config_flags, settings_from_args


def serve_config():
    from slimlm.server.config import ServeConfig

    return ServeConfig


def serving_threads(threads: int | None, device: str) -> None:
    """Unless --threads says otherwise, a CPU server computes on all cores but one, which is left to the
    HTTP front end and detokenizing: on a 2-core machine, 16 streams of the demo model were served at
    2700 tokens/s with one compute thread and 1900 with two, which the front end kept preempting."""
    import torch

    if threads is None and device.split(":")[0] == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model folder, 'demo', or a folder of model folders (each served by its name)")
    add_config_flags(p, [serve_config()])


def run(args: argparse.Namespace) -> int:
    from slimlm.api import serve
    from slimlm.commands._common import quiet_libraries

    settings = settings_from_args(args, serve_config())
    if settings.get("api_key") is None and os.environ.get("SLIMLM_API_KEY"):
        settings["api_key"] = os.environ["SLIMLM_API_KEY"]
    quiet_libraries()
    serving_threads(args.threads, settings.get("device", "cpu"))

    def announce(names: list[str], url: str) -> None:
        guarded = "API key required" if settings.get("api_key") else "no API key"
        print(f"serving {', '.join(names)} on {url} ({guarded})", flush=True)

    # SIGTERM ends the process by that signal once requests are finished or failed; SIGINT as an interrupt (130)
    serve(args.model, on_ready=announce, **settings)
    return 0
