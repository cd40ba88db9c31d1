"""Replicas (data parallelism for serving): N worker processes, each with its own copy of the model,
engine and scheduler, behind one OpenAI-compatible front end that routes each request to the
least-loaded live replica. With N = 1 this is `slimlm serve`'s engine process: the scheduler and the
HTTP front end then never wait for one interpreter lock.

`ReplicaSet` offers the scheduler's API to the handlers (submit, call, stats, shutdown, close), so the
front end is the same app. Each replica is a process started with multiprocessing's spawn, talking to
the front end over a pipe (requests and cancels in; tokens, finishes, stats and scores out). Replicas
share nothing, so they need no collective: a torch.distributed group would take every member down
with one that dies, while here a replica that dies fails only its own requests (5xx, or an error event
in a stream), the others go on serving, and /health says the server is degraded.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any

from slimlm.core.errors import SlimError
from slimlm.engine.sampling import SamplingParams
from slimlm.server.scheduler import QueueFull, Request, ShuttingDown, check_prompt

logger = logging.getLogger(__name__)
STATS_EVERY = 0.5  # seconds between a replica's reports of its queue and KV cache


@dataclasses.dataclass
class Replica:
    index: int
    process: Any
    conn: Any
    alive: bool = True
    in_flight: dict = dataclasses.field(default_factory=dict)  # request id -> Request
    stats: dict = dataclasses.field(default_factory=lambda: {"waiting": 0, "running": 0, "kv_tokens": 0,
                                                             "kv_capacity": 0})
    send_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def send(self, message: tuple) -> None:
        with self.send_lock:
            self.conn.send(message)


class ReplicaSet:
    """The scheduler API over `count` replica processes serving the model at `path`."""

    def __init__(self, path: str, count: int, slots: int = 8, max_len: int | None = None, max_queue: int = 64,
                 dtype: str | None = None, device: str = "cpu", metrics: Any = None, name: str = "model",
                 threads: int | None = None, tp: int = 1, pp: int = 1, kv_dtype: str = "auto",
                 draft: str | None = None, num_speculative: int = 4, **cache) -> None:
        """cache: the paged KV cache's settings (`Scheduler`: kv_tokens, block_size, prefix_caching)."""
        import multiprocessing

        import torch

        self.name, self.metrics, self.max_queue = name, metrics, max_queue
        self.deadline: float | None = None
        self.lock = threading.Lock()
        self.wake = threading.Event()  # set by Request.cancel: the router sends the cancel on
        self.ids = itertools.count()
        self.calls: dict[int, concurrent.futures.Future] = {}
        threads = threads or max(1, torch.get_num_threads() // count)
        context = multiprocessing.get_context("spawn")
        self.replicas = []
        for i in range(count):
            parent, child = context.Pipe()
            # a parallel replica starts processes of its own, which a daemonic process may not; it still
            # stops with the front end, as every replica does: its pipe closes and it leaves
            process = context.Process(target=replica_main, daemon=tp * pp == 1, name=f"slimlm-replica-{i}",
                                      args=(child, path, dict(slots=slots, max_len=max_len, max_queue=max_queue,
                                                              dtype=dtype, device=device, name=name, tp=tp, pp=pp,
                                                              kv_dtype=kv_dtype, draft=draft,
                                                              num_speculative=num_speculative, cache=cache),
                                            threads))
            process.start()
            child.close()
            self.replicas.append(Replica(i, process, parent))
        # ("ready", vocab, max_len, KV cache tokens) or ("failed", message)
        ready = [self._first_message(r) for r in self.replicas]
        failed = [m[1] for m in ready if m[0] != "ready"]
        if failed:
            self.close()
            what = "the engine process" if count == 1 else "a replica"
            raise SlimError(f"{what} of model {name} could not start: {failed[0]}")
        self.vocab_size, self.max_len, self.capacity = ready[0][1], ready[0][2], ready[0][3]
        self.slots = slots * count
        for replica in self.replicas:
            threading.Thread(target=self._read, args=(replica,), daemon=True, name=f"replica-{replica.index}-reader").start()
        threading.Thread(target=self._route_cancels, daemon=True, name="replica-cancels").start()

    @staticmethod
    def _first_message(replica: Replica) -> tuple:
        try:
            return replica.conn.recv()
        except (EOFError, OSError):  # it died before a word (killed, out of memory)
            replica.process.join(timeout=5)
            return ("failed", f"its process exited with code {replica.process.exitcode}")

    # --- the scheduler API ------------------------------------------------------------------------
    def check_prompt(self, prompt: list[int], max_new_tokens: int) -> None:
        check_prompt(prompt, max_new_tokens, self.vocab_size, self.max_len, self.capacity)

    def _least_loaded(self) -> Replica:
        live = [r for r in self.replicas if r.alive]
        if not live:
            raise ShuttingDown()
        return min(live, key=lambda r: len(r.in_flight))

    def submit(self, request: Request) -> Request:
        self.check_prompt(request.prompt, request.params.max_new_tokens)
        with self.lock:
            if self.deadline is not None:
                raise ShuttingDown()
            replica = self._least_loaded()
            if len(replica.in_flight) >= self.max_queue + self.slots // len(self.replicas):
                raise QueueFull()
            rid = next(self.ids)
            replica.in_flight[rid] = request
            request.wake = self.wake
        age = time.monotonic() - request.submitted
        timeout = None if request.timeout is None else max(request.timeout - age, 0.0)
        grammar = request.constraint.grammar if request.constraint is not None else None  # built again there
        try:
            replica.send(("submit", rid, request.prompt, dataclasses.asdict(request.params), timeout, request.id,
                          grammar))
        except (OSError, ValueError):
            self._lost(replica)
        return request

    def call(self, fn, *args) -> concurrent.futures.Future:
        """Prompt scoring (`scoring.score_prompt(model, prompt, top_n)`), run by the least-loaded replica."""
        from slimlm.server.scoring import score_prompt

        if fn is not score_prompt:
            raise SlimError(f"replicas run prompt scoring only, not {getattr(fn, '__name__', fn)}")
        _, prompt, top_n = args
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            if self.deadline is not None:
                raise ShuttingDown()
            replica = self._least_loaded()
            cid = next(self.ids)
            self.calls[cid] = future
        replica.send(("score", cid, prompt, top_n))
        return future

    def stats(self) -> dict[str, int]:
        """The schedulers' stats (`Scheduler.stats`) summed over the live replicas."""
        with self.lock:
            live = [r for r in self.replicas if r.alive]
            keys = {key for r in live for key in r.stats}
            total = {key: sum(r.stats.get(key, 0) for r in live) for key in keys | {"waiting", "running", "kv_tokens",
                                                                                    "kv_capacity"}}
            for r in self.replicas:
                self._observe_replica(r)
        return total

    def health(self) -> list[bool]:
        return [r.alive for r in self.replicas]

    def shutdown(self, grace: float = 0.0) -> None:
        with self.lock:
            deadline = time.monotonic() + max(grace, 0.0)
            self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)
        for replica in self.replicas:
            if replica.alive:
                try:
                    replica.send(("shutdown", grace))
                except (OSError, ValueError):
                    self._lost(replica)

    def close(self, grace: float = 0.0) -> None:
        self.shutdown(grace)
        for replica in self.replicas:
            replica.process.join(timeout=grace + 10)
            if replica.process.is_alive():
                replica.process.kill()  # it ignores SIGTERM (see `replica_main`)

    # --- the front end's threads ------------------------------------------------------------------
    def _read(self, replica: Replica) -> None:
        """Events from one replica, until its pipe closes (it exited, or died). Should handling a message
        fail (a bug), the replica counts as lost: its requests fail rather than wait forever."""
        try:
            self._read_messages(replica)
        except Exception:  # noqa: BLE001
            logger.exception("reading replica %d of model %s failed", replica.index, self.name)
            self._lost(replica)

    def _read_messages(self, replica: Replica) -> None:
        while True:
            try:
                message = replica.conn.recv()
            except (EOFError, OSError):
                self._lost(replica)
                return
            kind = message[0]
            if kind == "events":
                for rid, event in message[1]:
                    self._deliver(replica, rid, event)
            elif kind == "stats":
                replica.stats = message[1]
                if self.metrics is not None:
                    for size in message[2]:  # the decode batches since the last report
                        self.metrics.observe_batch(size, None, self.name)
            elif kind == "scored":
                future = self.calls.pop(message[1], None)
                if future is not None:
                    if message[2] is None:
                        future.set_exception(SlimError(message[3]))
                    else:
                        future.set_result(message[2])
            elif kind == "bye":
                with self.lock:
                    replica.alive = False
                return

    def _deliver(self, replica: Replica, rid: int, event: tuple) -> None:
        with self.lock:
            request = replica.in_flight.get(rid)
            if request is not None and event[0] == "done":
                del replica.in_flight[rid]
        if request is None:
            return
        now = time.monotonic()
        if event[0] == "token":
            request.generated.append(event[1])
            if self.metrics is not None:
                self.metrics.observe_token(request, now, self.name)
            request.last_token_at = now
        else:
            request.finish_reason = event[1]
            if self.metrics is not None:
                self.metrics.observe_finish(request, event[1], self.name)
        request.events.put(event)

    def _lost(self, replica: Replica) -> None:
        """A replica that stopped answering: fail its requests (and its scoring calls), route around it."""
        with self.lock:
            if not replica.alive:
                return
            replica.alive = False
            stranded = list(replica.in_flight.items())
            replica.in_flight.clear()
        replica.process.join(timeout=1)
        code = replica.process.exitcode
        who = "the engine process" if len(self.replicas) == 1 else f"replica {replica.index}"
        message = f"{who} of model {self.name} stopped (exit code {code}); its requests failed"
        if self.deadline is None:
            logger.error(message)
        for _, request in stranded:
            request.finish_reason = "error"
            if self.metrics is not None:
                self.metrics.observe_finish(request, "error", self.name)
            request.events.put(("done", "error", message))

    def _route_cancels(self) -> None:
        sent: set[int] = set()
        while True:
            self.wake.wait(0.5)
            self.wake.clear()
            with self.lock:
                pending = [(r, rid) for r in self.replicas if r.alive for rid, q in r.in_flight.items()
                           if q.cancelled.is_set() and rid not in sent]
            for replica, rid in pending:
                sent.add(rid)
                try:
                    replica.send(("cancel", rid))
                except (OSError, ValueError):
                    self._lost(replica)

    def _observe_replica(self, replica: Replica) -> None:
        if self.metrics is not None and hasattr(self.metrics, "observe_replica"):
            self.metrics.observe_replica(self.name, replica.index, replica.alive, len(replica.in_flight))


class _BatchSizes:
    """A replica scheduler's metrics: it keeps the decode batch sizes for the next stats report (the front
    end's metrics see tokens and finishes as they arrive)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def observe_batch(self, decoded: int | None, stats: dict, model: str) -> None:
        if decoded:
            with self.lock:
                self.sizes.append(decoded)

    def observe_token(self, *args) -> None:
        pass

    def observe_finish(self, *args) -> None:
        pass

    def take(self) -> list[int]:
        with self.lock:
            sizes, self.sizes = self.sizes, []
        return sizes


class _Outbox:
    """A replica's request events, sent to the front end in one message per scheduler iteration (a
    decode step of 16 sequences: one pickle and one write, not 16; and the front end's reader wakes
    once). A request's finish flushes at once, after its tokens."""

    def __init__(self, send) -> None:
        self.send, self.items, self.lock = send, [], threading.Lock()

    def put(self, rid: int, event: tuple) -> None:
        with self.lock:
            self.items.append((rid, event))
        if event[0] == "done":
            self.flush()

    def flush(self) -> None:
        with self.lock:
            items, self.items = self.items, []
            if items:  # under the lock: two flushes cannot reorder a request's events
                self.send(("events", items))


class _Events:
    """A replica's request's events, bound for the front end through the outbox; its first token goes
    at once (not after the rest of the step: time to first token)."""

    def __init__(self, outbox: _Outbox, rid: int, finished) -> None:
        self.outbox, self.rid, self.finished, self.started = outbox, rid, finished, False

    def put(self, event: tuple) -> None:
        self.outbox.put(self.rid, event)
        if event[0] == "done":
            self.finished(self.rid)
        elif not self.started:
            self.started = True
            self.outbox.flush()


def replica_main(conn, path: str, settings: dict, threads: int) -> None:
    """One replica process: serve, then leave without running C++ destructors of the threads still
    parked in torch's pools (which abort a process that exits with them joinable). Ctrl-C and a
    service manager's SIGTERM reach every process of the group: this one leaves it to the front end,
    which finishes or fails the requests within the grace and then says "shutdown" (or its pipe
    closes, if it died)."""
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        serve_replica(conn, path, settings, threads)
    finally:
        conn.close()
        os._exit(0)


def serve_replica(conn, path: str, settings: dict, threads: int) -> None:
    """Load the model, run a scheduler, serve the front end's messages until it says stop."""
    import torch

    from slimlm.core.model_io import load_model
    from slimlm.server.scheduler import Scheduler
    from slimlm.server.scoring import score_prompt

    torch.set_num_threads(threads)
    import transformers

    # the front end prints what matters; a progress bar here would also leave tqdm's process lock behind
    # (a leaked-semaphore warning at exit: this process leaves by os._exit)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        if settings.get("tp", 1) * settings.get("pp", 1) > 1:  # this replica is rank 0 of a group of its own
            from slimlm.parallel.group import ParallelConfig
            from slimlm.parallel.launch import open_model

            model, tokenizer = open_model(path, ParallelConfig(tp=settings["tp"], pp=settings["pp"]),
                                          settings["dtype"], settings["device"])
        else:
            model, tokenizer = load_model(path, dtype=settings["dtype"], device=settings["device"])
        batches = _BatchSizes()
        scheduler = Scheduler(model, slots=settings["slots"], max_len=settings["max_len"], metrics=batches,
                              max_queue=settings["max_queue"], name=settings["name"], kv_dtype=settings["kv_dtype"],
                              draft=settings["draft"], num_speculative=settings["num_speculative"],
                              **settings.get("cache", {}))
    except Exception as e:  # noqa: BLE001 - reported to the front end, which refuses to start
        conn.send(("failed", (str(e) if isinstance(e, SlimError) else f"{type(e).__name__}: {e}").splitlines()[0]))
        return
    lock = threading.Lock()

    def send(message: tuple) -> None:
        with lock:
            conn.send(message)

    requests: dict[int, Request] = {}
    outbox = _Outbox(send)
    scheduler.after_iteration = outbox.flush
    send(("ready", scheduler.vocab_size, scheduler.max_len, scheduler.engine.capacity))
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(STATS_EVERY):
            try:
                send(("stats", scheduler.stats(), batches.take()))
            except (OSError, ValueError):
                return

    threading.Thread(target=report, daemon=True).start()
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the front end is gone
                scheduler.close()
                return
            kind = message[0]
            if kind == "submit":
                _, rid, prompt, params, timeout, request_id, grammar = message
                try:
                    r = Request(prompt=prompt, params=SamplingParams(**params), timeout=timeout, id=request_id,
                                events=_Events(outbox, rid, lambda rid: requests.pop(rid, None)))
                    requests[rid] = r
                    if grammar is not None:  # structured output: checked by the front end, built again here
                        from slimlm.server.structured import constraint_factory

                        r.constraint = constraint_factory(grammar, tokenizer, scheduler.vocab_size)()
                    scheduler.submit(r)
                except (SlimError, QueueFull, ShuttingDown) as e:
                    requests.pop(rid, None)
                    outbox.put(rid, ("done", "error", f"{type(e).__name__}: {e}"))
                except Exception as e:  # noqa: BLE001 - this request fails, the engine goes on serving
                    logger.exception("request %s could not start", request_id or "?")
                    requests.pop(rid, None)
                    outbox.put(rid, ("done", "error", f"the request could not start: {type(e).__name__}: {e}"))
            elif kind == "cancel":
                r = requests.get(message[1])
                if r is not None:
                    r.cancel()
            elif kind == "score":
                _, cid, prompt, top_n = message
                future = scheduler.call(score_prompt, model, prompt, top_n)
                future.add_done_callback(lambda f, cid=cid: send(
                    ("scored", cid, None, str(f.exception())) if f.exception() else ("scored", cid, f.result(), None)))
            elif kind == "shutdown":
                scheduler.close(message[1])
                send(("bye",))
                return
    finally:
        stop.set()
        group = getattr(model, "slimlm_parallel", None)
        if group is not None:  # a parallel replica stops its own processes
            group.close()
