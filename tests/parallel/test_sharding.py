"""Tensor-parallel shards, checked in one process: a layer's column shards concatenate to its output,
its row shards sum to it; layouts that cannot split are refused with the sizes."""

import pytest
import torch
from torch import nn

import slimlm
from slimlm.core.errors import SlimError
from slimlm.engine.decoder import decoder_spec
from slimlm.parallel.tensor import DIMS, TPLayout, shard_linear, shard_model_
from slimlm.quant.linear import QuantizedLinear
from slimlm.quant.scheme import QuantScheme
from slimlm.testing import tiny_model

SCHEMES = [None, QuantScheme(bits=4, group_size=32), QuantScheme(bits=4, group_size=32, symmetric=True),
           QuantScheme(bits=8, group_size=None, symmetric=True), QuantScheme(bits=3, group_size=32)]


def layer(scheme, n=64, k=128, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias)
    return lin if scheme is None else QuantizedLinear.from_float(lin, scheme).set_kernel_("reference")


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label() if s else "float")
@pytest.mark.parametrize("world", [2, 4])
def test_shards_recombine_to_the_layer(scheme, world):
    full = layer(scheme)
    x = torch.randn(3, 128)
    want = full(x)
    cols = [shard_linear(full, 0, [(r * 64 // world, (r + 1) * 64 // world)], True, "l") for r in range(world)]
    torch.testing.assert_close(torch.cat([c(x) for c in cols], -1), want, rtol=1e-5, atol=1e-5)
    rows = [shard_linear(full, 1, [(r * 128 // world, (r + 1) * 128 // world)], r == 0, "l") for r in range(world)]
    parts = [s(x[:, r * 128 // world:(r + 1) * 128 // world]) for r, s in enumerate(rows)]
    torch.testing.assert_close(sum(parts), want, rtol=1e-5, atol=1e-5)
    if scheme is not None:  # the shards are quantized layers holding only their part of the codes
        assert isinstance(cols[0], QuantizedLinear) and cols[0].storage_bytes() < full.storage_bytes()


def test_a_split_that_cuts_a_group_is_refused_with_the_sizes():
    full = layer(QuantScheme(bits=4, group_size=128), k=256)
    with pytest.raises(SlimError, match=r"mlp.down_proj: splitting its 256 inputs at 0\.\.64 would cut a quantization group of 128"):
        full.shard(1, [(0, 64)], True, "mlp.down_proj")


def test_layouts_that_cannot_split_are_refused():
    spec, _ = decoder_spec(tiny_model("llama"))  # 4 heads, 2 kv heads
    with pytest.raises(SlimError, match="--tp 3 does not divide the model's 4 attention heads"):
        TPLayout.for_spec(spec, 128, 3, 0)
    kv = [TPLayout.for_spec(spec, 128, 4, r).kv_heads for r in range(4)]
    assert kv == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]  # fewer kv heads than ranks: replicated


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_the_shards_of_every_rank_add_up_to_the_model(family):
    """Run each rank's shard on the engine's decoder with the all-reduce replaced by collecting the
    partial outputs: summed across ranks they give the single-process hidden states and logits."""
    from slimlm.engine.engine import Engine

    model = tiny_model(family)
    ids = torch.randint(1, 300, (7,), generator=torch.Generator().manual_seed(0))
    want = Engine(model, max_len=16, fused_step=False).prefill(0, ids)
    spec, _ = decoder_spec(model)
    world = 2
    inter = model.config.intermediate_size
    shards = [shard_model_(tiny_model(family), TPLayout.for_spec(spec, inter, world, r)) for r in range(world)]
    layouts = [TPLayout.for_spec(spec, inter, world, r) for r in range(world)]
    # run the ranks in lock step: each reduce call waits for the other rank's partial sum (threads)
    import threading

    barrier, partial, results = threading.Barrier(world), [None] * world, [None] * world

    def reducer(rank):
        def reduce(x):
            partial[rank] = x.clone()
            barrier.wait()
            total = sum(partial)
            barrier.wait()
            return total
        return reduce

    def run(rank):
        engine = Engine(shards[rank], max_len=16, fused_step=False, spec=layouts[rank].local_spec(spec),
                        reduce=reducer(rank))
        results[rank] = engine.prefill(0, ids)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
