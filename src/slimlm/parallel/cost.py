"""A cost model of parallel decoding: given a model's shape, the devices' memory, bandwidth and
compute, and the interconnect's bandwidth and latency, predict the per-token latency (batch 1), the
throughput at a batch, and the memory per device of each tensor / pipeline / replica layout, and
recommend one (`slimlm plan-parallel`).

Per decode step a pipeline stage reads its weights once (1/tp of each layer it holds; the head split
along the vocabulary or not) and its share of the KV cache, so its time is the larger of bytes /
bandwidth and FLOPs / compute, plus a fixed cost per layer (kernel launches, Python). Tensor
parallelism adds two all-reduces of the batch's hidden states per layer (ring: 2(tp-1) messages of
size/tp each way; latency-bound for small batches) and a gather of the logits when the head is split.
Pipeline parallelism adds a send per stage boundary and, for a batch split into m micro-batches, the
bubble: a step takes (m + pp - 1) micro-batch stage times. Replicas multiply throughput, not latency.
Checked against the CPU figures of `benchmarks/parallel_speed.py` (see the README).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from slimlm.core.config import Config, check, field


@dataclasses.dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    weight_bits: float = 16.0  # stored bits per weight of the linear layers (scales included)
    head_bits: float = 16.0
    kv_bits: float = 16.0

    @classmethod
    def from_config(cls, config, weight_bits: float = 16.0, head_bits: float | None = None) -> "ModelShape":
        heads = config.num_attention_heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   intermediate=config.intermediate_size, vocab=config.vocab_size, weight_bits=weight_bits,
                   head_bits=head_bits or weight_bits)

    @property
    def layer_params(self) -> int:
        c, d = self.hidden, self.head_dim
        return c * self.heads * d * 2 + c * self.kv_heads * d * 2 + 3 * c * self.intermediate

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden


SHAPES = {  # public architectures (config.json values)
    "tinyllama-1.1b": ModelShape(22, 2048, 32, 4, 64, 5632, 32000),
    "llama-3-8b": ModelShape(32, 4096, 32, 8, 128, 14336, 128256),
    "llama-3-70b": ModelShape(80, 8192, 64, 8, 128, 28672, 128256),
}


@dataclasses.dataclass(frozen=True)
class Device:
    memory_gb: float
    bandwidth_gbs: float  # achievable memory bandwidth
    tflops: float  # achievable dense bf16
    layer_overhead_us: float  # fixed cost per layer per step (launches, host work)


@dataclasses.dataclass(frozen=True)
class Link:
    bandwidth_gbs: float  # per device, one direction
    latency_us: float  # per message of a collective or a send


DEVICES = {  # achievable, not peak: ~85% of HBM bandwidth, ~60% of dense bf16, CUDA graphs' launch cost
    "h200": Device(141, 4.8e3 * 0.85, 989 * 0.6, 3.0),
    "h100": Device(80, 3.35e3 * 0.85, 989 * 0.6, 3.0),
    "a100": Device(80, 2.0e3 * 0.85, 312 * 0.6, 4.0),
}
LINKS = {
    "nvlink": Link(450, 3.0),  # NVLink 4 (H100/H200), per direction, all-reduce hop latency with NCCL
    "infiniband": Link(50, 8.0),  # 400 Gb/s NDR per GPU, RDMA
    "pcie": Link(25, 10.0),
}


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    replicas: int
    split_head: bool = True

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.replicas

    def label(self) -> str:
        return f"tp{self.tp} pp{self.pp} x{self.replicas}"


@dataclasses.dataclass
class Prediction:
    layout: Layout
    latency_ms: float  # per token at batch 1
    throughput: float  # tokens/s at the batch, all replicas
    memory_gb: float  # per device: weights + KV cache of the batch at the context
    fits: bool
    comm_share: float  # of the batch-1 step


def stage_time(shape: ModelShape, device: Device, layers: float, tp: int, batch: int, context: int,
               with_head: bool, split_head: bool) -> float:
    """Seconds one stage spends on a decode step of `batch` sequences (memory or compute, whichever binds)."""
    weight = layers * shape.layer_params * shape.weight_bits / 8 / tp
    head = shape.vocab * shape.hidden * shape.head_bits / 8 / (tp if split_head else 1) if with_head else 0
    kv_local = max(shape.kv_heads / tp, 1)
    kv = batch * context * layers * 2 * kv_local * shape.head_dim * shape.kv_bits / 8
    flops = 2 * batch * (layers * shape.layer_params / tp + (shape.vocab * shape.hidden if with_head else 0))
    memory = (weight + head + kv) / (device.bandwidth_gbs * 1e9)
    compute = flops / (device.tflops * 1e12)
    return max(memory, compute) + layers * device.layer_overhead_us * 1e-6


def all_reduce_time(nbytes: float, ranks: int, link: Link) -> float:
    """Ring all-reduce: 2(n-1) steps, each moving nbytes/n (Patarasuk & Yuan's bandwidth-optimal ring)."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) * (link.latency_us * 1e-6 + nbytes / ranks / (link.bandwidth_gbs * 1e9))


def predict(shape: ModelShape, device: Device, link: Link, layout: Layout, batch: int = 16, context: int = 1024,
            act_bytes: int = 2, inter_node: Link | None = None, devices_per_node: int | None = None) -> Prediction:
    """Latency at batch 1, throughput at `batch` and memory per device of one layout. A layout whose
    tensor-parallel group spans nodes uses `inter_node` for its collectives, pipeline sends likewise."""
    tp, pp = layout.tp, layout.pp
    node = devices_per_node or layout.devices
    tp_link = inter_node if inter_node is not None and tp > node else link
    pp_link = inter_node if inter_node is not None and tp * pp > node else link
    layers = shape.layers / pp

    def step(b: int, micro: int) -> tuple[float, float]:
        """(seconds per step for b sequences in `micro` micro-batches, seconds of it in communication)"""
        mb = math.ceil(b / micro)
        compute = [stage_time(shape, device, layers, tp, mb, context, s == pp - 1, layout.split_head) for s in range(pp)]
        comm = 2 * layers * all_reduce_time(mb * shape.hidden * act_bytes, tp, tp_link)
        if layout.split_head and tp > 1:  # gather of the logits on the last stage
            comm += (tp - 1) * (tp_link.latency_us * 1e-6 + mb * shape.vocab * 4 / tp / (tp_link.bandwidth_gbs * 1e9))
        send = pp_link.latency_us * 1e-6 + mb * shape.hidden * act_bytes / (pp_link.bandwidth_gbs * 1e9)
        stage = max(compute) + comm
        if pp == 1:
            return stage, comm
        total = (micro + pp - 1) * stage + (pp - 1) * send  # the pipeline fills, then drains
        return total, (micro + pp - 1) * comm + (pp - 1) * send

    one, comm_one = step(1, 1)
    b_per_replica = math.ceil(batch / layout.replicas)
    many, _ = step(b_per_replica, min(b_per_replica, 2 * pp) if pp > 1 else 1)
    blocks = shape.layers * shape.layer_params * shape.weight_bits / 8 / (tp * pp)
    embed = shape.vocab * shape.hidden * 2  # bfloat16 embedding, on every tensor-parallel rank of the first stage
    head = shape.vocab * shape.hidden * shape.head_bits / 8 / (tp if layout.split_head else 1)
    weights = blocks + (embed + head if pp == 1 else max(embed, head))  # the fuller of the first and last stage
    kv = b_per_replica * context * layers * 2 * max(shape.kv_heads / tp, 1) * shape.head_dim * shape.kv_bits / 8
    memory = (weights + kv) / 1e9
    return Prediction(layout, 1e3 * one, layout.replicas * b_per_replica / many, memory, memory < 0.9 * device.memory_gb,
                      comm_one / one if one else 0.0)


def layouts(devices: int, shape: ModelShape) -> list[Layout]:
    """Every tp x pp x replicas = devices with tp dividing the heads and pp at most the layers."""
    out = []
    for tp, pp in itertools.product(range(1, devices + 1), repeat=2):
        if devices % (tp * pp) or shape.heads % tp or pp > shape.layers:
            continue
        if shape.kv_heads % tp and tp % shape.kv_heads:
            continue
        out.append(Layout(tp, pp, devices // (tp * pp)))
    return out


@dataclasses.dataclass(frozen=True)
class PlanParallelConfig(Config):
    """What `slimlm plan-parallel` predicts for."""

    name = "plan-parallel"
    device: str = field("h200", f"device kind: {', '.join(DEVICES)}")
    link: str = field("nvlink", f"interconnect within a node: {', '.join(LINKS)}")
    inter_node: str = field("infiniband", f"interconnect between nodes: {', '.join(LINKS)}")
    gpus_per_node: int = field(8, "devices per node")
    nodes: int = field(1, "nodes")
    bits: float = field(16.0, "stored bits per weight (4.5 for int4 g32 with its scales, 8.06 for int8)")
    batch: int = field(64, "concurrent sequences for the throughput column")
    context: int = field(2048, "tokens per sequence held in the KV cache")

    def __post_init__(self) -> None:
        check(self.device in DEVICES, f"device '{self.device}' is not known; use one of {', '.join(DEVICES)}")
        for name in ("link", "inter_node"):
            check(getattr(self, name) in LINKS, f"{name} '{getattr(self, name)}' is not known; use one of {', '.join(LINKS)}")
        for name in ("gpus_per_node", "nodes", "batch", "context"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{name} {value!r} must be at least 1")
        check(0 < self.bits <= 32, f"bits {self.bits!r} must be in (0, 32]")


def plan(shape: ModelShape, config: PlanParallelConfig) -> list[Prediction]:
    """Predictions for every layout of the devices, best throughput first among those that fit."""
    device, link, inter = DEVICES[config.device], LINKS[config.link], LINKS[config.inter_node]
    total = config.gpus_per_node * config.nodes
    shape = dataclasses.replace(shape, weight_bits=config.bits, head_bits=max(config.bits, 8.0))
    found = [predict(shape, device, link, layout, config.batch, config.context, inter_node=inter,
                     devices_per_node=config.gpus_per_node) for layout in layouts(total, shape)]
    return sorted(found, key=lambda p: (not p.fits, -p.throughput, p.latency_ms))
