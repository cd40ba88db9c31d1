"""Everything `slimlm serve` and `slimlm.serve` accept, in one config: the CLI's flags derive from
these fields, and the same checks run for both before anything loads."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from slimlm.core.config import Config, check, field
from slimlm.server.state import ServeSettings


@dataclasses.dataclass(frozen=True)
class ServeConfig(Config):
    name = "serve"
    host: str = field("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = field(8000, "TCP port, 1..65535")
    api_key: str | None = field(None, "require 'Authorization: Bearer KEY' on every route but /health; prefer "
                                      "setting SLIMLM_API_KEY, which keeps the key out of the process list")
    slots: int = field(8, "sequences decoded together per model (KV cache slots)")
    max_len: int | None = field(None, "tokens per sequence, prompt + output (default: the model's context)")
    max_queue: int = field(64, "waiting requests before answering 429")
    max_tokens: int = field(2048, "the most max_tokens a request may ask for")
    max_request_bytes: int = field(1 << 20, "largest request body, enforced while it streams in (413 beyond)")
    timeout: float = field(600.0, "seconds a request may take (504 beyond)")
    shutdown_grace: float = field(5.0, "seconds running requests may take to finish after SIGTERM/SIGINT before "
                                       "they are failed")
    dtype: str | None = field(None, "float32, bfloat16 or float16 (default: as stored)")
    draft: str | None = field(None, "speculative decoding while at most 8 sequences decode: 'ngram' (prompt lookup) "
                                    "or a draft model folder with the model's tokenizer (e.g. from slimlm distill)")
    num_speculative: int = field(4, "with --draft: tokens proposed per sequence and step")
    kv_dtype: str = field("auto", "KV cache storage: auto (the model's float dtype) or int8 (a float16 scale per "
                                  "token and head: about half of bfloat16, so about twice the sequences fit)")
    kv_tokens: int | None = field(None, "tokens the paged KV cache holds across all sequences (default: slots x "
                                        "max_len); with more --slots than fit at full length, memory follows "
                                        "the tokens held and the newest requests wait when it is full")
    block_size: int = field(16, "tokens per KV cache block")
    prefix_caching: bool = field(True, "reuse the KV cache blocks of prompt prefixes seen before (a shared system "
                                       "prompt, few-shot examples, a chat's history); --no-prefix-caching turns it off")
    device: str = field("cpu", "cpu or cuda")
    tp: int = field(1, "tensor-parallel processes per model (each holds a slice of every layer)")
    pp: int = field(1, "pipeline-parallel processes per model (each holds a run of layers)")
    replicas: int = field(1, "copies of the model in worker processes behind this front end, each request "
                             "routed to the least loaded (each itself split over --tp/--pp processes)")
    engine_process: bool = field(True, "run the engine and scheduler in a worker process of their own, so they never "
                                       "wait for the HTTP front end's interpreter lock (16 streams of the demo model: "
                                       "1.44x the tokens/s); --no-engine-process keeps them in this process")
    mixed_steps: bool = field(True, "feed new prompts of up to 64 uncached tokens in the running requests' decode step "
                                    "(one forward, on CPU's fused step); --no-mixed-steps gives each its own forward")

    def __post_init__(self) -> None:
        def whole(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        check(whole(self.port) and 1 <= self.port <= 65535, f"port {self.port!r} must be in 1..65535 (--port)")
        for name in ("slots", "max_queue", "max_tokens", "max_request_bytes", "tp", "pp", "replicas", "block_size"):
            value = getattr(self, name)
            check(whole(value) and value >= 1, f"{name} {value!r} must be at least 1 (--{name.replace('_', '-')})")
        check(self.kv_tokens is None or (whole(self.kv_tokens) and self.kv_tokens >= 2),
              f"kv_tokens {self.kv_tokens!r} must be at least 2 (--kv-tokens)")
        check(self.max_len is None or (whole(self.max_len) and self.max_len >= 2),
              f"max_len {self.max_len!r} must be at least 2: prompt + output tokens (--max-len)")
        check(isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0,
              f"timeout {self.timeout!r} must be a positive number of seconds (--timeout)")
        check(isinstance(self.shutdown_grace, (int, float)) and math.isfinite(self.shutdown_grace)
              and self.shutdown_grace >= 0, f"shutdown_grace {self.shutdown_grace!r} must be a number of seconds >= 0 "
                                            "(--shutdown-grace)")
        check(self.device.split(":")[0] in ("cpu", "cuda"), f"device {self.device!r} must be cpu or cuda (--device)")
        check(self.kv_dtype in ("auto", "int8"), f"kv_dtype {self.kv_dtype!r} must be auto or int8 (--kv-dtype)")
        check(self.draft in (None, "ngram", "demo") or Path(self.draft).is_dir(),
              f"draft {self.draft!r} is neither 'ngram' (prompt lookup) nor a model folder (--draft)")
        check(whole(self.num_speculative) and self.num_speculative >= 1,
              f"num_speculative {self.num_speculative!r} must be at least 1 (--num-speculative)")
        check(self.tp == 1 or self.pp == 1, "--tp and --pp together are not supported yet; choose one")
        self.http_settings()  # the API key and limits, checked now

    def http_settings(self) -> ServeSettings:
        return ServeSettings(api_key=self.api_key, max_tokens_limit=self.max_tokens,
                             max_request_bytes=self.max_request_bytes, request_timeout=self.timeout,
                             shutdown_grace=self.shutdown_grace)

    def scheduler_settings(self) -> dict:
        return dict(slots=self.slots, max_len=self.max_len, max_queue=self.max_queue, dtype=self.dtype,
                    device=self.device, tp=self.tp, pp=self.pp, replicas=self.replicas, kv_dtype=self.kv_dtype,
                    draft=self.draft, num_speculative=self.num_speculative, kv_tokens=self.kv_tokens,
                    block_size=self.block_size, prefix_caching=self.prefix_caching, mixed_steps=self.mixed_steps,
                    engine_process=self.engine_process)
