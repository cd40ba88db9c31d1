"""`slimlm serve MODEL`: an OpenAI-compatible server with continuous batching on the engine."""

from __future__ import annotations

import argparse
import os


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model folder, 'demo', or a folder of model folders (each served by its name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set SLIMLM_API_KEY)")
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together per model (KV cache slots)")
    p.add_argument("--max-len", type=int, default=None, help="tokens per sequence (prompt + output; default: the model's)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--max-tokens", type=int, default=2048, help="the most max_tokens a request may ask for")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def run(args: argparse.Namespace) -> int:
    from slimlm.commands._common import quiet_libraries
    from slimlm.core.errors import SlimError

    quiet_libraries()
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError:
        raise SlimError("serving needs the 'serve' extra: pip install 'slimlm[serve]'") from None
    from slimlm.serve.app import ServeSettings
    from slimlm.serve.server import build_app

    settings = ServeSettings(api_key=args.api_key or os.environ.get("SLIMLM_API_KEY"), max_tokens_limit=args.max_tokens,
                             request_timeout=args.timeout)
    app, models = build_app(args.model, settings, slots=args.slots, max_len=args.max_len, max_queue=args.max_queue,
                            dtype=args.dtype, device=args.device)
    print(f"serving {', '.join(models)} on http://{args.host}:{args.port}/v1 "
          f"({'API key required' if settings.api_key else 'no API key'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
