"""Loading the served models and running the HTTP server.

`MODEL` is one model folder (or 'demo'), or a folder of model folders (a small model repository, as
Triton's): every subfolder with a config.json is loaded at start and served under its folder name.

Shutting down (SIGTERM, SIGINT, or a BackgroundServer leaving its `with`) is explicit: the
schedulers stop taking work, waiting requests fail at once (503, or an error event on a stream),
running ones get `shutdown_grace` seconds to finish and are failed after that, and uvicorn stops
waiting for connections shortly after. A second SIGINT quits at once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import uvicorn

from slimlm.core.errors import SlimError
from slimlm.server.app import ServedModel, ServeSettings, create_app
from slimlm.server.metrics import Metrics
from slimlm.server.scheduler import Scheduler
from slimlm.server.state import ServerState

logger = logging.getLogger(__name__)


def model_paths(source: str) -> dict[str, str]:
    """name -> path: the folder itself if it is a model, else each model folder inside it."""
    if source == "demo":
        return {"demo": "demo"}
    root = Path(source).expanduser()
    if (root / "config.json").is_file():
        return {root.name: str(root)}
    if root.is_dir():
        found = {p.name: str(p) for p in sorted(root.iterdir()) if (p / "config.json").is_file()}
        if found:
            return found
    raise SlimError(f"'{source}' is neither a model folder (with config.json) nor a folder of model folders")


def load_models(source: str, metrics: Metrics, slots: int = 8, max_len: int | None = None, max_queue: int = 64,
                dtype: str | None = None, device: str = "cpu", tp: int = 1, pp: int = 1,
                replicas: int = 1, kv_dtype: str = "auto", draft: str | None = None,
                num_speculative: int = 4, engine_process: bool = False, **cache) -> dict[str, ServedModel]:
    """Load every model of `source` with its scheduler: in this process; spread over tp x pp processes
    (tensor / pipeline parallel, rank 0 here); or in worker processes behind this front end, `replicas`
    of them (engine_process: one, even for replicas=1; `slimlm serve`'s default).
    cache: the paged KV cache's kv_tokens, block_size, prefix_caching, and mixed_steps (`Scheduler`)."""
    from slimlm.core.model_io import causal_lm_config, load_model, load_tokenizer, read_config_json, resolve_model_path

    paths = model_paths(source)
    if (tp > 1 or pp > 1) and len(paths) > 1:
        raise SlimError("--tp/--pp serve one model per server; start one server per model folder")
    served = {}
    for name, path in paths.items():
        if replicas > 1 or engine_process:
            from slimlm.server.replicas import ReplicaSet

            folder = resolve_model_path(path)
            # the config handed over, so the tokenizer never reads a guarded config.json itself
            tokenizer = load_tokenizer(folder, causal_lm_config(folder, read_config_json(folder)))
            scheduler = ReplicaSet(path, replicas, slots=slots, max_len=max_len, max_queue=max_queue, dtype=dtype,
                                   device=device, metrics=metrics, name=name, tp=tp, pp=pp, kv_dtype=kv_dtype,
                                   draft=draft, num_speculative=num_speculative, **cache)
            served[name] = ServedModel(name, None, tokenizer, scheduler)
            continue
        if tp > 1 or pp > 1:
            from slimlm.parallel.group import ParallelConfig
            from slimlm.parallel.launch import open_model

            model, tokenizer = open_model(path, ParallelConfig(tp=tp, pp=pp), dtype, device)
        else:
            model, tokenizer = load_model(path, dtype=dtype, device=device)
        scheduler = Scheduler(model, slots=slots, max_len=max_len, max_queue=max_queue, metrics=metrics, name=name,
                              kv_dtype=kv_dtype, draft=draft, num_speculative=num_speculative, **cache)
        served[name] = ServedModel(name, model, tokenizer, scheduler)
    return served


def build_app(source: str, settings: ServeSettings, **scheduler_settings):
    metrics = Metrics()
    models = load_models(source, metrics, **scheduler_settings)
    return create_app(models, settings, metrics), models


class Server(uvicorn.Server):
    """uvicorn that winds the schedulers down first when it stops (see the module docstring)."""

    def __init__(self, app, log_level: str = "warning", **config) -> None:
        self.state: ServerState = app.state.slimlm
        grace = self.state.settings.shutdown_grace
        super().__init__(uvicorn.Config(app, log_level=log_level, lifespan="off",
                                        timeout_graceful_shutdown=int(grace) + 2, **config))

    async def shutdown(self, sockets=None) -> None:
        self.state.shutdown(self.state.settings.shutdown_grace)
        await super().shutdown(sockets)


def listen(host: str, port: int) -> socket.socket:
    """A bound TCP socket, or a one-line SlimError (port taken, unknown host) before models load."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise SlimError(f"--port {port} must be in 1..65535")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise SlimError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)  # clients may connect now; uvicorn accepts them once it runs
    except OSError as e:
        sock.close()
        raise SlimError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def run(app, sock: socket.socket) -> None:
    """Serve on `sock` until SIGTERM/SIGINT, then shut down as the module docstring says."""
    try:
        Server(app).run(sockets=[sock])
    finally:
        for served in app.state.slimlm.models.values():
            served.scheduler.close()


def run_server(source: str, on_ready: Callable[[list[str], str], None] | None = None, **settings) -> None:
    """Serve `source` (a model folder, 'demo', or a folder of model folders) until SIGTERM/SIGINT.

    Settings are the fields of `ServeConfig` (`slimlm serve`'s flags). They are checked, and the port
    bound, before any model loads, so a mistake fails at once. on_ready(model names, base URL) runs
    when serving starts (default: an INFO log line)."""
    from slimlm.server.config import ServeConfig

    config = ServeConfig.from_dict(settings)
    sock = listen(config.host, config.port)
    try:
        app, models = build_app(source, config.http_settings(), **config.scheduler_settings())
    except BaseException:
        sock.close()
        raise
    url = f"http://{config.host}:{config.port}/v1"
    if on_ready is None:
        logger.info("serving %s on %s", ", ".join(models), url)
    else:
        on_ready(list(models), url)
    run(app, sock)


class BackgroundServer:
    """uvicorn in a thread (tests, benchmarks): `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = Server(app, host=host, port=port)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="slimlm-http")

    def __enter__(self) -> str:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.01)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.server.state.settings.shutdown_grace + 10)
