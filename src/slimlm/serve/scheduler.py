"""Continuous batching on the engine (the scheme of Orca, Yu et al., OSDI 2022, and vLLM): requests
join and leave the running batch between decode steps.

One scheduler thread owns the engine. Each iteration it
  1. drops cancelled or timed-out requests and frees their slots at once,
  2. admits waiting requests into free slots (the KV cache is preallocated, `slots` x `max_len`, so
     admission can never run the process out of memory; a prompt that cannot fit is refused when
     it is submitted),
  3. prefills at most `prefill_chunk` prompt tokens (chunked prefill: a long prompt is spread over
     several iterations so running streams keep getting tokens),
  4. runs one decode step for every request that is generating, samples each one's next token with
     its own settings, and streams it out.
The waiting queue is bounded: `submit` raises `QueueFull` (the server answers 429) rather than
letting work pile up. Events reach each request's own thread-safe queue.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any

import torch
from torch import nn

from slimlm.core.errors import SlimError
from slimlm.engine.engine import Engine
from slimlm.engine.sampling import sample_next


class QueueFull(Exception):
    """The waiting queue is at its bound."""


@dataclasses.dataclass
class Request:
    prompt: list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    logprobs: int = 0  # > 0: report each token's log-probability and the top `logprobs` alternatives
    timeout: float | None = None  # seconds from submission
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    # scheduler state
    slot: int | None = None
    fed: int = 0  # prompt tokens prefilled so far
    generated: list[int] = dataclasses.field(default_factory=list)
    last_token_at: float | None = None
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    def __init__(self, model: nn.Module, slots: int = 8, max_len: int | None = None, max_queue: int = 64,
                 prefill_chunk: int = 256, metrics: Any = None, name: str = "model") -> None:
        if not Engine.supports(model):
            from slimlm.engine.decoder import decoder_spec

            raise SlimError(f"serving runs on slimlm's engine, which cannot run this model: {decoder_spec(model)[1]}")
        self.engine = Engine(model, slots=slots, max_len=max_len)
        self.max_len = self.engine.max_len
        self.slots, self.max_queue, self.prefill_chunk = slots, max_queue, prefill_chunk
        self.metrics, self.name = metrics, name
        self.model_lock = threading.Lock()  # held while the model runs (a step, or scoring a prompt)
        self.waiting: list[Request] = []
        self.running: dict[int, Request] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="slimlm-scheduler", daemon=True)
        self.thread.start()

    # --- called from request handlers -------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        if len(request.prompt) == 0:
            raise SlimError("the prompt is empty")
        if len(request.prompt) + request.max_tokens >= self.max_len:
            raise SlimError(f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                            f"context of {self.max_len - 1} tokens; shorten the prompt or lower max_tokens")
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull()
            if request.seed is not None:
                request.generator = torch.Generator().manual_seed(request.seed)
            self.waiting.append(request)
        self.wake.set()
        return request

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"waiting": len(self.waiting), "running": len(self.running),
                    "kv_tokens": int(self.engine.lengths.sum()), "kv_capacity": self.slots * self.max_len}

    def close(self) -> None:
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=10)

    # --- the scheduler thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopped:
            with self.lock:
                idle = not self.waiting and not self.running
            if idle:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            try:
                with self.model_lock:
                    self._iteration()
            except Exception as e:  # noqa: BLE001 - a failed step must not kill the server: fail its requests
                with self.lock:
                    failed = list(self.running.values())
                    self.running.clear()
                for r in failed:
                    self._finish(r, "error", message=f"generation failed: {e}")

    def _iteration(self) -> None:
        now = time.monotonic()
        with self.lock:
            for r in list(self.running.values()) + self.waiting:
                expired = r.timeout is not None and now - r.submitted > r.timeout
                if r.cancelled.is_set() or expired:
                    if r.slot is not None:
                        self.running.pop(r.slot, None)
                    else:
                        self.waiting.remove(r)
                    self._finish(r, "timeout" if expired else "cancelled")
            free = [s for s in range(self.slots) if s not in self.running]
            while free and self.waiting:
                r = self.waiting.pop(0)
                r.slot = free.pop(0)
                self.engine.release(r.slot)
                self.running[r.slot] = r
            active = list(self.running.values())
        budget = self.prefill_chunk
        for r in active:  # chunked prefill, oldest first
            if budget <= 0:
                break
            if r.fed < len(r.prompt):
                take = min(budget, len(r.prompt) - r.fed)
                logits = self.engine.append(r.slot, torch.tensor(r.prompt[r.fed:r.fed + take]), read_back=r.fed > 0)
                r.fed += take
                budget -= take
                if r.fed == len(r.prompt):
                    self._emit(r, logits[None])
        decoding = [r for r in active if r.fed == len(r.prompt) and r.generated and r.slot in self.running]
        if decoding:
            slots = torch.tensor([r.slot for r in decoding])
            tokens = torch.tensor([r.generated[-1] for r in decoding])
            logits = self.engine.decode(slots, tokens)  # (B, V)
            for i, r in enumerate(decoding):
                self._emit(r, logits[i:i + 1])
        if self.metrics is not None:
            self.metrics.observe_batch(len(decoding), self.stats(), self.name)

    def _emit(self, r: Request, logits: torch.Tensor) -> None:
        """Sample r's next token from logits (1, V), stream it, and finish r if it is done."""
        token = int(sample_next(logits, r.temperature, r.top_k, r.top_p, r.generator)[0])
        logprob = None
        if r.logprobs:
            lp = logits[0].float().log_softmax(-1)  # (V,)
            top = torch.topk(lp, min(r.logprobs, lp.numel()))
            logprob = (float(lp[token]), list(zip(top.indices.tolist(), top.values.tolist())))
        r.generated.append(token)
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.observe_token(r, now, self.name)
        r.last_token_at = now
        r.events.put(("token", token, logprob))
        if token in r.stop_ids:
            self._release(r, "stop")
        elif len(r.generated) >= r.max_tokens:
            self._release(r, "length")

    def _release(self, r: Request, reason: str) -> None:
        with self.lock:
            self.running.pop(r.slot, None)
        self._finish(r, reason)

    def _finish(self, r: Request, reason: str, message: str | None = None) -> None:
        r.events.put(("done", reason, message))
        if self.metrics is not None:
            self.metrics.observe_finish(r, reason, self.name)
