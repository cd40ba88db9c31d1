"""Continuous batching on the engine (the scheme of Orca, Yu et al., OSDI 2022, and vLLM): requests
join and leave the running batch between decode steps.

One scheduler thread owns the engine and runs the model; nothing else does. Each iteration it
  1. runs the calls handed to it (`call`: prompt scoring), so they never block the event loop,
  2. drops cancelled or timed-out requests and frees their slots (and KV blocks) at once,
  3. admits waiting requests into free slots while the paged KV cache has blocks for their prompts
     (it is preallocated, `kv_tokens` in all, so admission never runs the process out of memory; a
     prompt that cannot fit is refused when it is submitted, as are token ids outside the
     vocabulary). With prefix caching a request starts from the cached blocks of the longest prefix
     of its prompt that an earlier or running request computed (`Engine.reuse_prefix`),
  4. prefills at most `prefill_chunk` prompt tokens (chunked prefill: a long prompt is spread over
     several iterations so running streams keep getting tokens),
  5. runs one decode step for every request that is generating, samples each one's next token with
     its own `SamplingParams`, and streams it out.
When the cache runs out of blocks mid-generation, the most recently admitted requests are preempted
as vLLM does (by recomputation): their blocks are freed and they wait at the head of the queue, to
resume by prefilling prompt and tokens so far (mostly from the prefix cache); their clients only see
a pause.
A failure is kept to the request that caused it: a failed prefill or sampling fails that request
only, and a failed batched decode step is retried one sequence at a time, so only the sequences
that fail alone are failed. The waiting queue is bounded: `submit` raises `QueueFull` (the server
answers 429) rather than letting work pile up. `shutdown(grace)` refuses new work, fails waiting
requests, and fails running ones that have not finished after `grace` seconds.

Events reach each request's `events` (anything with `put`, called on the scheduler thread):
("token", id, logprob) then one ("done", reason, message), reason one of stop, length, cancelled,
timeout, error, shutdown.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable

import torch
from torch import nn

from slimlm.core.errors import SlimError
from slimlm.engine.engine import Engine, engine_for
from slimlm.engine.kv_cache import DEFAULT_BLOCK_SIZE, CacheFull
from slimlm.engine.sampling import SamplingParams, sample_next
from slimlm.engine.speculative import ModelDraft, NgramDraft, accept

logger = logging.getLogger(__name__)
# Speculate while at most this many sequences decode: a decode step reads every weight once for the
# whole batch, so at small batches it is memory-bound and verifying k more positions per sequence is
# nearly free; at large batches the step is compute-bound and rejected drafts cost real work.
SPEC_MAX_BATCH = 8
MIX_MAX_PREFILL = 64  # prefill chunks up to this many tokens join the decode step (`Engine.step`); longer: apart


class QueueFull(Exception):
    """The waiting queue is at its bound."""


class ShuttingDown(Exception):
    """The scheduler no longer takes work."""


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams = SamplingParams()
    timeout: float | None = None  # seconds from submission
    id: str = ""
    events: Any = dataclasses.field(default_factory=queue.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    finish_reason: str | None = None  # set when the "done" event is sent
    constraint: Any = None  # structured output: masks the logits, consumes each token (`structured.Constraint`)
    # scheduler state
    slot: int | None = None
    feed: list[int] | None = None  # the tokens to prefill: the prompt, or after a preemption prompt + generated
    fed: int = 0  # tokens of `feed` prefilled so far
    admitted: int = 0  # admission order (the most recent is preempted first)
    computed: bool = False  # whether r's slot holds tokens it prefilled itself (not only cached blocks)
    generated: list[int] = dataclasses.field(default_factory=list)
    last_token_at: float | None = None
    generator: torch.Generator | None = None
    wake: threading.Event | None = None  # the scheduler's, so a cancel is noticed at once

    def cancel(self) -> None:
        self.cancelled.set()
        if self.wake is not None:
            self.wake.set()


def check_prompt(prompt: list[int], max_new_tokens: int, vocab_size: int, max_len: int, capacity: int) -> None:
    """Raise SlimError unless `prompt` is token ids of the vocabulary and fits with max_new_tokens in a
    sequence (max_len) and in the whole KV cache (capacity tokens)."""
    if len(prompt) == 0:
        raise SlimError("the prompt is empty")
    bad = next((t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise SlimError(f"token id {bad!r} is outside the vocabulary (0..{vocab_size - 1})")
    if len(prompt) + max_new_tokens >= max_len:
        raise SlimError(f"this model's context is {max_len - 1} tokens; the prompt has {len(prompt)} and "
                        f"max_tokens is {max_new_tokens}: shorten the prompt or lower max_tokens")
    if len(prompt) + max_new_tokens > capacity:
        raise SlimError(f"the KV cache holds {capacity} tokens in all; the prompt has {len(prompt)} and max_tokens "
                        f"is {max_new_tokens}: lower max_tokens or start the server with a larger --kv-tokens")


def check_settings(slots: int, max_len: int | None, max_queue: int, prefill_chunk: int = 256) -> None:
    """Raise SlimError for settings a scheduler cannot work with (no slots, no queue, ...)."""
    for name, value in (("slots", slots), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SlimError(f"{name} must be an integer >= 1, got {value!r}")
    if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 2):
        raise SlimError(f"max_len must be an integer >= 2 (prompt + output tokens), got {max_len!r}")


class Scheduler:
    def __init__(self, model: nn.Module, slots: int = 8, max_len: int | None = None, max_queue: int = 64,
                 prefill_chunk: int = 256, metrics: Any = None, name: str = "model", kv_dtype: str = "auto",
                 draft: str | None = None, num_speculative: int = 4, kv_tokens: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, prefix_caching: bool = True, mixed_steps: bool = True) -> None:
        """kv_dtype: 'int8' stores the KV cache as int8 with a float16 scale per token and head (`KVCache`).
        kv_tokens, block_size: the paged cache's size in tokens (default: `slots` x `max_len`) and tokens
        per block; prefix_caching: reuse cached blocks of prompt prefixes across requests; mixed_steps:
        prefill chunks of up to `MIX_MAX_PREFILL` tokens in the decode step's forward where the engine can.
        draft: speculative decoding (`engine.speculative`) whenever at most `SPEC_MAX_BATCH` sequences
        decode, proposing `num_speculative` tokens per sequence and step: 'ngram' (prompt lookup), or a
        draft model (a folder, or a loaded model) with the model's vocabulary, e.g. a `slimlm distill`
        student; its own engine keeps a slot per request."""
        if not isinstance(num_speculative, int) or isinstance(num_speculative, bool) or num_speculative < 1:
            raise SlimError(f"num_speculative {num_speculative!r} must be at least 1")
        check_settings(slots, max_len, max_queue, prefill_chunk)
        if not Engine.supports(model):
            from slimlm.engine.decoder import decoder_spec

            raise SlimError(f"serving runs on slimlm's engine, which cannot run this model: {decoder_spec(model)[1]}")
        self.engine = engine_for(model, slots=slots, max_len=max_len, kv_dtype=kv_dtype, kv_tokens=kv_tokens,
                                 block_size=block_size, prefix_caching=prefix_caching)
        self.model, self.max_len = model, self.engine.max_len
        self.watermark = (self.engine.capacity // self.engine.block_size) // 100  # blocks kept free at admission
        self.preempted = 0  # requests preempted for want of KV blocks
        self.shared_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self._admissions = 0
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.slots, self.max_queue, self.prefill_chunk = slots, max_queue, prefill_chunk
        self.num_speculative = num_speculative
        self.draft = self._load_draft(draft, model) if draft is not None else None
        self.spec = {"steps": 0, "proposed": 0, "accepted": 0, "emitted": 0}  # speculative steps' counts
        self.metrics, self.name = metrics, name
        self.mixed_steps = mixed_steps
        self.waiting: list[Request] = []
        self.running: dict[int, Request] = {}
        self.calls: list[tuple[Callable, tuple, concurrent.futures.Future]] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.deadline: float | None = None  # set by shutdown: running requests must finish by then
        self.after_iteration: Callable[[], None] | None = None  # e.g. an engine process sends the step's events
        self.thread = threading.Thread(target=self._loop, name=f"slimlm-scheduler-{name}", daemon=True)
        self.thread.start()

    # --- called from request handlers -------------------------------------------------------------
    def check_prompt(self, prompt: list[int], max_new_tokens: int) -> None:
        check_prompt(prompt, max_new_tokens, self.vocab_size, self.max_len, self.engine.capacity)

    def submit(self, request: Request) -> Request:
        self.check_prompt(request.prompt, request.params.max_new_tokens)
        with self.lock:
            if self.deadline is not None:
                raise ShuttingDown()
            if len(self.waiting) >= self.max_queue:
                raise QueueFull()
            if request.params.seed is not None:
                request.generator = torch.Generator().manual_seed(request.params.seed % 2**64)
            request.wake = self.wake
            self.waiting.append(request)
        self.wake.set()
        return request

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run fn(*args) on the scheduler thread between iterations (it owns the model); its future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            if self.deadline is not None:
                raise ShuttingDown()
            self.calls.append((fn, args, future))
        self.wake.set()
        return future

    def stats(self) -> dict[str, int]:
        with self.lock:
            pool = self.engine.pool
            return {"waiting": len(self.waiting), "running": len(self.running),
                    "kv_tokens": int(self.engine.lengths.sum()), "kv_capacity": self.engine.capacity,
                    "kv_blocks_used": pool.used(), "kv_blocks_cached": len(pool.idle),
                    "kv_blocks": len(pool.refs) - 1, "preemptions": self.preempted,
                    "shared_prefix_tokens": self.shared_tokens,
                    **{f"spec_{k}": v for k, v in self.spec.items()}}

    def shutdown(self, grace: float = 0.0) -> None:
        """Take no more work; fail waiting requests now and running ones still going after `grace` s."""
        with self.lock:
            deadline = time.monotonic() + max(grace, 0.0)
            self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)
        self.wake.set()

    def close(self, grace: float = 0.0) -> None:
        self.shutdown(grace)
        self.thread.join(timeout=grace + 10)

    # --- the scheduler thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self.wake.clear()
            self._run_calls()
            if self.deadline is not None and self._wind_down():
                return
            try:
                busy = self._iteration()
            except Exception:  # noqa: BLE001 - a bug outside the per-request guards: fail what is in flight, go on
                logger.exception("a scheduler iteration failed; failing the requests in flight")
                self._fail_everything("generation failed: internal error in the scheduler")
                busy = False
            if self.after_iteration is not None:
                self.after_iteration()
            if not busy:
                self.wake.wait(0.05)  # nothing to do: sleep until work arrives (timeouts still checked)

    def _run_calls(self) -> None:
        with self.lock:
            calls, self.calls = self.calls, []
        for fn, args, future in calls:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except Exception as e:  # noqa: BLE001 - the caller gets the exception; the scheduler goes on
                future.set_exception(e)

    def _wind_down(self) -> bool:
        """During shutdown: fail what cannot finish in time; True once nothing is left."""
        past = time.monotonic() >= self.deadline
        with self.lock:
            doomed = list(self.waiting) + (list(self.running.values()) if past else [])
            calls, self.calls = self.calls, []
        for r in doomed:
            self._drop(r, "shutdown", "the server is shutting down")
        for _, _, future in calls:
            future.set_exception(ShuttingDown())
        with self.lock:
            return not self.running and not self.waiting

    def _fail_everything(self, message: str) -> None:
        """Fail every request in flight without trusting the engine (the last resort after a bug)."""
        with self.lock:
            stranded = list(self.running.values()) + self.waiting
            self.running.clear()
            self.waiting.clear()
        for r in stranded:
            r.slot = None
            self._finish(r, "error", message)
        for slot in range(self.slots):
            try:
                self.engine.release(slot)
            except Exception:  # noqa: BLE001 - already failing; the log has the first error
                logger.exception("could not free slot %d", slot)

    def _drop(self, r: Request, reason: str, message: str | None = None) -> None:
        """Take r out of the queue or the batch, free its slot, and tell its client why."""
        with self.lock:
            if r.slot is not None and self.running.get(r.slot) is r:
                del self.running[r.slot]
                self.engine.release(r.slot)
                r.slot = None
            elif r in self.waiting:
                self.waiting.remove(r)
            else:
                return  # already finished
        self._finish(r, reason, message)

    def _iteration(self) -> bool:
        """One step of the batch; False when there was nothing to run."""
        now = time.monotonic()
        with self.lock:
            pending = list(self.running.values()) + self.waiting
        for r in pending:
            if r.cancelled.is_set():
                self._drop(r, "cancelled")
            elif r.timeout is not None and now - r.submitted > r.timeout:
                self._drop(r, "timeout", f"the request took longer than {r.timeout:g} s")
        with self.lock:
            free = [s for s in range(self.slots) if s not in self.running]
            while free and self.waiting and self._admit(self.waiting[0], free[0]):
                free.pop(0)
                self.waiting.pop(0)
            active = sorted(self.running.values(), key=lambda r: r.admitted)
        budget = self.prefill_chunk
        decoding = [r for r in active if r.slot is not None and r.fed == len(r.feed) and r.generated
                    and r.finish_reason is None]
        # short prefill chunks ride along the decode step (`Engine.step`) unless the decode step speculates
        mix = self.mixed_steps and getattr(self.engine, "can_mix", False) and not (
            self.draft is not None and len(decoding) <= SPEC_MAX_BATCH)
        deferred: list[tuple[Request, int]] = []  # (request, tokens) prefilled in the mixed step
        heads: set[int] = set()  # the deferred prompts up to their next full block (see below)
        bs = self.engine.block_size if mix and self.engine.prefix_caching else 0
        for r in active:  # chunked prefill, oldest first
            if budget <= 0:
                break
            if r.slot is not None and r.fed < len(r.feed):
                if not r.computed and self.engine.cached_length(r.feed) > r.fed:
                    # an earlier request prefilled (part of) this prompt since r was admitted: start from it
                    reused = self.engine.reuse_prefix(r.slot, r.feed)
                    self.shared_tokens += reused - r.fed
                    r.fed = reused
                head = hash(tuple(r.feed[:r.fed + bs])) if bs and len(r.feed) - r.fed > bs else None
                if head is not None and not r.computed and head in heads:
                    continue  # a prompt deferred above starts the same way: next iteration, r reuses its blocks
                take = min(budget, len(r.feed) - r.fed)
                if not self._make_room({r.slot: r.fed + take}, r):
                    continue  # r itself was preempted
                budget -= take
                if mix and take <= MIX_MAX_PREFILL:
                    deferred.append((r, take))
                    if head is not None:
                        heads.add(head)
                else:
                    self._prefill(r, take)
        if mix:
            decoded = self._mixed([r for r in decoding if r.slot is not None and r.finish_reason is None], deferred)
        else:  # those whose prefill ended above decode at once too
            decoding = [r for r in active if r.slot is not None and r.fed == len(r.feed) and r.generated
                        and r.finish_reason is None]
            if decoding:
                self._decode(decoding)
            decoded = len(decoding)
        if self.metrics is not None:
            self.metrics.observe_batch(decoded, None, self.name)
        return bool(active)

    def _prefill(self, r: Request, take: int) -> None:
        """Feed the next `take` tokens of r's prompt in a forward of its own; its first token when done."""
        try:
            logits = self.engine.append(r.slot, torch.tensor(r.feed[r.fed:r.fed + take]), read_back=r.fed > 0)
        except Exception as e:  # noqa: BLE001 - fail this request only
            self._fail(r, "prefill", e)
            return
        r.fed += take
        r.computed = True
        if r.fed == len(r.feed):
            self._emit(r, logits[None])

    def _mixed(self, decoding: list[Request], deferred: list[tuple[Request, int]]) -> int:
        """One forward for the decoding requests' next tokens and the deferred prefill chunks (`Engine.step`):
        on a small model a separate prefill forward cost as much as a decode step of 16 sequences. If it
        fails, each part runs again apart (only failures fail). Returns how many requests it decoded."""
        if not decoding and not deferred:
            return 0
        lengths = {r.slot: int(self.engine.lengths[r.slot]) + 1 for r in decoding}
        lengths.update({r.slot: r.fed + take for r, take in deferred})
        self._make_room(lengths)
        decoding = [r for r in decoding if r.slot is not None]  # the preempted wait
        deferred = [(r, take) for r, take in deferred if r.slot is not None]
        if not deferred:
            if decoding:
                self._decode(decoding, speculate=False)
            return len(decoding)
        rows = decoding + [r for r, _ in deferred]
        feeds = [[r.generated[-1]] for r in decoding] + [r.feed[r.fed:r.fed + take] for r, take in deferred]
        try:
            logits = self.engine.step([r.slot for r in rows], feeds)  # (B, V)
        except Exception as e:  # noqa: BLE001 - nothing was emitted: run the parts apart to isolate it
            logger.warning("a mixed step of %d sequences failed (%s); running them apart", len(rows), e)
            for r, take in deferred:
                if r.slot is not None:
                    self._prefill(r, take)
            decoding = [r for r in decoding if r.slot is not None and r.finish_reason is None]
            if decoding:
                self._decode(decoding, speculate=False)
            return len(decoding)
        for r, take in deferred:
            r.fed += take
            r.computed = True
        self._emit_step(decoding, logits[:len(decoding)])
        for i, (r, _) in enumerate(deferred, start=len(decoding)):
            if r.fed == len(r.feed):
                self._emit(r, logits[i:i + 1])
        return len(decoding)

    def _admit(self, r: Request, slot: int) -> bool:
        """Give r `slot`, starting from the cached blocks of its prompt's longest cached prefix, if the
        cache has blocks for the rest of its prompt (and a few to spare); else leave r waiting."""
        if r.feed is None:
            r.feed = r.prompt
        reused = self.engine.reuse_prefix(slot, r.feed)  # holds the cached blocks (or releases the slot)
        need = self.engine.blocks_for(slot, len(r.feed) + 1)
        if need + self.watermark > self.engine.pool.available() and self.running:
            self.engine.release(slot)  # the cached blocks go back to the cache; r waits for room
            return False
        r.slot, r.fed, r.computed = slot, reused, False
        self.shared_tokens += reused
        self._admissions += 1
        r.admitted = self._admissions
        self.running[slot] = r  # before anything can fail: a failed iteration fails what runs
        return True

    def _make_room(self, lengths: dict[int, int], keep: Request | None = None) -> bool:
        """Preempt the most recently admitted requests until the slots in `lengths` that still run can
        hold those lengths. False when `keep` had to go itself (preempted, or failed when it was the only
        request and still did not fit)."""
        def need() -> int:
            return sum(self.engine.blocks_for(slot, n) for slot, n in lengths.items() if slot in self.running)

        while need() > self.engine.pool.available():
            with self.lock:
                victim = max(self.running.values(), key=lambda r: r.admitted)
                alone = len(self.running) == 1
            if alone:
                self._fail(victim, "decode", CacheFull(f"the KV cache ({self.engine.capacity} tokens) cannot hold "
                                                       "this sequence; start the server with a larger --kv-tokens"))
            else:
                self._preempt(victim)
        return keep is None or keep.slot is not None

    def _preempt(self, r: Request) -> None:
        """Free r's slot and blocks and put it at the head of the queue, to resume by recomputation:
        its prompt and the tokens it has generated are prefilled again (from the prefix cache where
        its blocks are still there), then it goes on generating."""
        with self.lock:
            del self.running[r.slot]
            self.engine.release(r.slot)
            r.slot = None
            r.feed, r.fed = r.prompt + r.generated, 0
            self.waiting.insert(0, r)
        self.preempted += 1
        logger.info("request %s preempted: the KV cache is full", r.id or "?")

    def _load_draft(self, draft, model: nn.Module):
        if isinstance(draft, str) and draft == "ngram":
            return NgramDraft()
        from slimlm.core.layers import float_dtype, model_device

        if isinstance(draft, (str, bytes)) or hasattr(draft, "__fspath__"):
            from slimlm.core.model_io import load_model

            try:
                draft = load_model(draft, dtype=float_dtype(model), device=str(model_device(model)))[0]
            except SlimError as e:
                raise SlimError(f"the draft model: {e}") from None
        if not isinstance(draft, nn.Module):
            raise SlimError(f"the draft {draft!r} is neither 'ngram' nor a model folder")
        ours, theirs = model.get_output_embeddings().out_features, draft.get_output_embeddings().out_features
        if ours != theirs:
            raise SlimError(f"the draft model's vocabulary ({theirs} tokens) differs from the model's ({ours}); "
                            "use a draft with the same tokenizer (e.g. one made by slimlm distill)")
        return ModelDraft(draft, self.max_len + self.num_speculative + 2, self.slots)

    def _speculate(self, batch: list[Request]) -> list[Request]:
        """One speculative step for the requests of `batch` the draft has tokens for: the draft proposes
        up to `num_speculative` tokens each, one forward of the model scores every proposal
        (`Engine.extend`; `append` for an engine without it, one sequence at a time), and each keeps its
        longest accepted run and one token of the model's own (`engine.speculative.accept`). Returns
        the requests left for a plain decode step (no proposal, logprobs or structured output asked)."""
        plain = [r for r in batch if r.constraint is not None or r.params.logprobs]
        todo = [r for r in batch if r not in plain]
        budgets = [min(self.num_speculative, r.params.max_new_tokens - len(r.generated),
                       self.max_len - 2 - int(self.engine.lengths[r.slot])) for r in todo]
        live = [(r, b) for r, b in zip(todo, budgets) if b > 0]
        plain += [r for r, b in zip(todo, budgets) if b <= 0]
        if not live:
            return batch
        sequences = [r.prompt + r.generated for r, _ in live]
        if hasattr(self.draft, "propose_batch"):
            proposals, dists = self.draft.propose_batch(sequences, [r.slot for r, _ in live], max(b for _, b in live),
                                                        [r.params for r, _ in live], [r.generator for r, _ in live])
        else:
            pairs = [self.draft.propose(seq, b, r.params, r.generator) for seq, (r, b) in zip(sequences, live)]
            proposals, dists = [p for p, _ in pairs], [q for _, q in pairs]
        rows = []
        for (r, budget), proposal, q in zip(live, proposals, dists):
            if proposal[:budget]:
                rows.append((r, proposal[:budget], q[:budget] if q is not None else None))
            else:
                plain.append(r)
        extend = hasattr(getattr(self.engine, "local", self.engine), "extend")  # not on pipeline stages
        if not rows or (not extend and len(rows) > 1):
            return batch
        width = 1 + max(len(p) for _, p, _ in rows)
        starts = {r.slot: int(self.engine.lengths[r.slot]) for r, _, _ in rows}
        if sum(self.engine.blocks_for(slot, n + width) for slot, n in starts.items()) > self.engine.pool.available():
            return batch  # no blocks to spare for drafts: plain steps (which preempt if they must)
        fed = [[r.generated[-1]] + p + [p[-1]] * (width - 1 - len(p)) for r, p, _ in rows]  # padded rows
        if extend:
            scored = self.engine.extend(torch.tensor([r.slot for r, _, _ in rows]), torch.tensor(fed))  # (B, T, V)
        else:
            scored = self.engine.append(rows[0][0].slot, torch.tensor(fed[0]), all_logits=True, read_back=True)[None]
        for i, (r, proposal, q) in enumerate(rows):
            try:
                tokens, kept = accept(scored[i, :len(proposal) + 1], proposal, q, r.params, r.generator)
                self.engine.truncate(r.slot, starts[r.slot] + 1 + kept)
            except Exception as e:  # noqa: BLE001 - fail this request only
                self._fail(r, "decode", e)
                continue
            self.spec["steps"] += 1
            self.spec["proposed"] += len(proposal)
            self.spec["accepted"] += kept
            for j, token in enumerate(tokens):
                if r.finish_reason is not None:
                    break
                self.spec["emitted"] += 1
                self._emit(r, scored[i, j:j + 1], token)
        return [r for r in plain if r.slot is not None]

    def _decode(self, batch: list[Request], speculate: bool = True) -> None:
        """One decode step for `batch` (speculative where a draft is set and the batch is small); if it
        fails, each sequence again alone with plain steps (only failures fail)."""
        if speculate and self.draft is not None and len(batch) <= SPEC_MAX_BATCH:
            try:
                batch = self._speculate(batch)
            except Exception as e:  # noqa: BLE001 - nothing was emitted: plain steps isolate the failure
                logger.warning("a speculative step of %d sequences failed (%s); decoding them plainly", len(batch), e)
                batch = [r for r in batch if r.slot is not None and r.finish_reason is None]
                for r in batch:
                    self._decode([r], speculate=False)
                return
            if not batch:
                return
        self._make_room({r.slot: int(self.engine.lengths[r.slot]) + 1 for r in batch})
        batch = [r for r in batch if r.slot is not None]  # the preempted wait
        if not batch:
            return
        slots = torch.tensor([r.slot for r in batch])
        tokens = torch.tensor([r.generated[-1] for r in batch])
        try:
            logits = self.engine.decode(slots, tokens)  # (B, V)
        except Exception as e:  # noqa: BLE001 - isolate the sequence that fails
            if len(batch) == 1:
                self._fail(batch[0], "decode", e)
                return
            logger.warning("a decode step of %d sequences failed (%s); retrying each alone", len(batch), e)
            for r in batch:
                self._decode([r], speculate=False)
            return
        self._emit_step(batch, logits)

    def _emit_step(self, batch: list[Request], logits: torch.Tensor) -> None:
        """Each request of a decode step its token from its row of logits (B, V)."""
        if not batch:
            return
        picks = [None] * len(batch)
        greedy = [i for i, r in enumerate(batch) if r.params.temperature <= 0 and r.constraint is None]
        if greedy:  # every greedy row's argmax in one op and one read-back, not one per request
            try:
                rows = logits[greedy].float()
                picks_greedy = rows.masked_fill(rows.isnan(), float("-inf")).argmax(-1).tolist()
                for i, token in zip(greedy, picks_greedy):
                    picks[i] = token
            except Exception:  # noqa: BLE001 - each request samples (and fails) on its own below
                pass
        for i, r in enumerate(batch):
            self._emit(r, logits[i:i + 1], picks[i])

    def _fail(self, r: Request, stage: str, e: Exception) -> None:
        logger.error("request %s failed in %s", r.id or "?", stage, exc_info=e)
        self._drop(r, "error", f"generation failed: {type(e).__name__}: {e}")

    def _emit(self, r: Request, logits: torch.Tensor, token: int | None = None) -> None:
        """Sample r's next token from logits (1, V) (unless the batch picked it: `token`), stream it, and
        finish r if it is done."""
        p = r.params
        try:
            if r.constraint is not None:
                logits = r.constraint.mask(logits)
            if token is None:
                token = int(sample_next(logits, p.temperature, p.top_k, p.top_p, r.generator)[0])
            if r.constraint is not None and token not in p.stop_ids:
                r.constraint.advance(token)
            logprob = None
            if p.logprobs:
                lp = logits[0].float().log_softmax(-1)  # (V,)
                top = torch.topk(lp, min(p.logprobs, lp.numel()))
                logprob = (float(lp[token]), list(zip(top.indices.tolist(), top.values.tolist())))
        except Exception as e:  # noqa: BLE001 - fail this request only
            self._fail(r, "sampling", e)
            return
        r.generated.append(token)
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.observe_token(r, now, self.name)
        r.last_token_at = now
        r.events.put(("token", token, logprob))
        if token in p.stop_ids or (r.constraint is not None and r.constraint.done):
            self._drop(r, "stop")
        elif len(r.generated) >= p.max_new_tokens:
            self._drop(r, "length")

    def _finish(self, r: Request, reason: str, message: str | None = None) -> None:
        r.finish_reason = reason
        r.events.put(("done", reason, message))
        if self.metrics is not None:
            self.metrics.observe_finish(r, reason, self.name)
