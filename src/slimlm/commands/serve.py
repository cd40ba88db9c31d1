"""`slimlm serve MODEL`: an OpenAI-compatible server with continuous batching on the engine."""

from __future__ import annotations

import argparse
import math
import os


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model folder, 'demo', or a folder of model folders (each served by its name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="1..65535 (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'; prefer setting "
                                                   "SLIMLM_API_KEY, which keeps the key out of the process list")
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together per model (KV cache slots)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens per sequence (prompt + output; default: the model's)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--max-tokens", type=int, default=2048, help="the most max_tokens a request may ask for")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--shutdown-grace", type=float, default=5.0,
                   help="seconds running requests may take to finish after SIGTERM/SIGINT before they are failed")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings the server cannot work with, before anything loads (one-line SlimErrors)."""
    from slimlm.core.errors import SlimError

    if not 1 <= args.port <= 65535:
        raise SlimError(f"--port {args.port} must be in 1..65535")
    for flag, value in (("--slots", args.slots), ("--max-queue", args.max_queue), ("--max-tokens", args.max_tokens)):
        if value < 1:
            raise SlimError(f"{flag} {value} must be at least 1")
    if args.max_len is not None and args.max_len < 2:
        raise SlimError(f"--max-len {args.max_len} must be at least 2 (prompt + output tokens)")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise SlimError(f"--timeout {args.timeout} must be a positive number of seconds")
    if not (math.isfinite(args.shutdown_grace) and args.shutdown_grace >= 0):
        raise SlimError(f"--shutdown-grace {args.shutdown_grace} must be a number of seconds >= 0")


def run(args: argparse.Namespace) -> int:
    from slimlm.commands._common import quiet_libraries
    from slimlm.core.errors import SlimError

    check_args(args)
    quiet_libraries()
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise SlimError("serving needs the 'serve' extra: pip install 'slimlm[serve]'") from None
    from slimlm.server.server import run_server

    def announce(names: list[str], url: str) -> None:
        print(f"serving {', '.join(names)} on {url} ({'API key required' if api_key else 'no API key'})", flush=True)

    api_key = args.api_key or os.environ.get("SLIMLM_API_KEY")
    # SIGTERM ends the process by that signal once requests are finished or failed; SIGINT as an interrupt (130)
    run_server(args.model, args.host, args.port, api_key=api_key, max_tokens=args.max_tokens, timeout=args.timeout,
               shutdown_grace=args.shutdown_grace, slots=args.slots, max_len=args.max_len, max_queue=args.max_queue,
               dtype=args.dtype, device=args.device, on_ready=announce)
    return 0
