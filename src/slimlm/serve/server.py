"""Loading the served models and running the HTTP server.

`MODEL` is one model folder (or 'demo'), or a folder of model folders (a small model repository, as
Triton's): every subfolder with a config.json is loaded at start and served under its folder name.
"""

from __future__ import annotations

import threading
from pathlib import Path

from slimlm.core.errors import SlimError
from slimlm.serve.app import ServedModel, ServeSettings, create_app
from slimlm.serve.metrics import Metrics
from slimlm.serve.scheduler import Scheduler


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
                dtype: str | None = None, device: str = "cpu") -> dict[str, ServedModel]:
    from slimlm.api import load

    served = {}
    for name, path in model_paths(source).items():
        model, tokenizer = load(path, dtype=dtype, device=device)
        scheduler = Scheduler(model, slots=slots, max_len=max_len, max_queue=max_queue, metrics=metrics, name=name)
        served[name] = ServedModel(name, model, tokenizer, scheduler)
    return served


class BackgroundServer:
    """uvicorn in a thread (tests, benchmarks): `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        import time

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
        self.thread.join(timeout=10)


def build_app(source: str, settings: ServeSettings, **scheduler_settings):
    metrics = Metrics()
    models = load_models(source, metrics, **scheduler_settings)
    return create_app(models, settings, metrics), models
