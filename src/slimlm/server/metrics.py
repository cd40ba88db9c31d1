"""Prometheus metrics of the server (prometheus-client, one registry per server). The scheduler
reports batches, tokens and finished requests (by finish reason: stop, length, cancelled, timeout,
error, shutdown); /metrics refreshes the queue and KV cache gauges before rendering."""

from __future__ import annotations


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("slimlm_requests", "finished requests", ["model", "finish"], registry=r)
        self.tokens = Counter("slimlm_generated_tokens", "generated tokens", ["model"], registry=r)
        self.queue = Gauge("slimlm_queue_depth", "requests waiting for a slot", ["model"], registry=r)
        self.running = Gauge("slimlm_running_requests", "requests in the running batch", ["model"], registry=r)
        self.kv_used = Gauge("slimlm_kv_cache_tokens", "tokens held in the KV cache", ["model"], registry=r)
        self.kv_capacity = Gauge("slimlm_kv_cache_capacity_tokens", "KV cache size in tokens", ["model"], registry=r)
        self.shared = Gauge("slimlm_shared_prefix_tokens", "prompt tokens whose keys and values came from the prefix "
                            "cache instead of being computed, since start", ["model"], registry=r)
        self.kv_blocks = Gauge("slimlm_kv_cache_blocks", "KV cache blocks by state: held by a sequence, cached "
                               "(idle, kept for prefix reuse), free", ["model", "state"], registry=r)
        self.preemptions = Gauge("slimlm_preemptions", "requests preempted (to resume later) because the KV cache "
                                 "was full, since start", ["model"], registry=r)
        self.batch = Histogram("slimlm_decode_batch_size", "sequences per decode step", ["model"], registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.ttft = Histogram("slimlm_time_to_first_token_seconds", "time to first token", ["model"], registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("slimlm_inter_token_latency_seconds", "time between tokens of a stream", ["model"],
                             registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))

    def observe_replica(self, model: str, replica: int, alive: bool, in_flight: int) -> None:
        """A replica's health and load (with --replicas): 1 while its process serves, and its requests."""
        if not hasattr(self, "replica_up"):
            from prometheus_client import Gauge

            self.replica_up = Gauge("slimlm_replica_up", "1 while a replica's process serves", ["model", "replica"],
                                    registry=self.registry)
            self.replica_requests = Gauge("slimlm_replica_requests", "requests a replica is running or queueing",
                                          ["model", "replica"], registry=self.registry)
        self.replica_up.labels(model, str(replica)).set(1 if alive else 0)
        self.replica_requests.labels(model, str(replica)).set(in_flight)

    def observe_batch(self, decoded: int | None, stats: dict[str, int] | None, model: str = "model") -> None:
        """A decode step's batch size (decoded), and (stats) the scheduler's gauges, which /metrics
        refreshes before it renders (so the scheduler's steps need not)."""
        if decoded:
            self.batch.labels(model).observe(decoded)
        if stats is None:
            return
        self.queue.labels(model).set(stats["waiting"])
        self.running.labels(model).set(stats["running"])
        self.kv_used.labels(model).set(stats["kv_tokens"])
        self.kv_capacity.labels(model).set(stats["kv_capacity"])
        if "shared_prefix_tokens" in stats:
            self.shared.labels(model).set(stats["shared_prefix_tokens"])
        if "kv_blocks" in stats:
            used, cached = stats["kv_blocks_used"], stats["kv_blocks_cached"]
            self.kv_blocks.labels(model, "used").set(used)
            self.kv_blocks.labels(model, "cached").set(cached)
            self.kv_blocks.labels(model, "free").set(stats["kv_blocks"] - used - cached)
            self.preemptions.labels(model).set(stats["preemptions"])
        if stats.get("spec_steps"):
            self.observe_spec(stats, model)

    def observe_spec(self, stats: dict, model: str) -> None:
        if not hasattr(self, "spec_proposed"):
            from prometheus_client import Gauge

            r = self.registry
            self.spec_proposed = Gauge("slimlm_spec_proposed_tokens", "draft tokens proposed (speculative decoding)",
                                       ["model"], registry=r)
            self.spec_accepted = Gauge("slimlm_spec_accepted_tokens", "draft tokens the model kept", ["model"],
                                       registry=r)
            self.spec_rate = Gauge("slimlm_spec_acceptance_rate", "accepted / proposed draft tokens", ["model"],
                                   registry=r)
            self.spec_per_step = Gauge("slimlm_spec_tokens_per_step", "tokens emitted per speculative step",
                                       ["model"], registry=r)
        self.spec_proposed.labels(model).set(stats["spec_proposed"])
        self.spec_accepted.labels(model).set(stats["spec_accepted"])
        self.spec_rate.labels(model).set(stats["spec_accepted"] / max(stats["spec_proposed"], 1))
        self.spec_per_step.labels(model).set(stats["spec_emitted"] / max(stats["spec_steps"], 1))

    def observe_token(self, request, now: float, model: str = "model") -> None:
        self.tokens.labels(model).inc()
        if len(request.generated) == 1:
            self.ttft.labels(model).observe(now - request.submitted)
        elif request.last_token_at is not None:
            self.itl.labels(model).observe(now - request.last_token_at)

    def observe_finish(self, request, reason: str, model: str = "model") -> None:
        self.requests.labels(model, reason).inc()

    def render(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()
