"""Tensor and pipeline parallelism across two CPU processes (gloo): greedy tokens equal one process
for Llama, Qwen2 and Mistral shapes, float and int4/int8 (slimlm's and compressed-tensors
checkpoints); batched decode of sequences of different lengths and chunked prefill too."""

import pytest
import torch
import torch.distributed as dist

import slimlm
from slimlm.engine.engine import Engine
from slimlm.engine.generate import generate_ids
from slimlm.engine.sampling import SamplingParams
from slimlm.testing import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
PROMPTS = [torch.tensor([1, 5, 9, 33, 70, 11, 4]), torch.tensor([7, 2, 90])]


def folder(tmp_path, family, quant=None, save_format="slimlm", **overrides):
    model, tok = tiny_model(family, **overrides), tiny_tokenizer()
    if quant:
        slimlm.quantize(model, "rtn", **quant)
    return slimlm.save(model, tmp_path / family, tok, format=save_format)


def solo_tokens(model, steps=10):
    return [generate_ids(model, p[None], SamplingParams(max_new_tokens=steps), engine=True)[0].tolist() for p in PROMPTS]


@pytest.mark.parametrize("layout, family, quant, save_format, overrides", [
    ("tp", "llama", None, "slimlm", {}),
    ("tp-replicated-head", "llama", None, "slimlm", {}),
    ("tp", "llama", {"bits": 4, "group_size": 32}, "slimlm", {}),
    ("tp", "qwen2", {"bits": 8, "group_size": None, "symmetric": True}, "compressed-tensors", {}),
    ("tp", "mistral", {"bits": 4, "group_size": 32, "head": "float"}, "compressed-tensors", {"sliding_window": 6}),
    ("tp", "mistral", {"bits": 4, "group_size": 32}, "slimlm", {}),  # the default int8 head, split across ranks
    ("pp", "llama", {"bits": 4, "group_size": 32, "include": ["*", "lm_head"]}, "slimlm", {}),
    ("pp-one-micro-batch", "qwen2", None, "slimlm", {}),
    ("pp", "mistral", {"bits": 8, "group_size": None, "symmetric": True}, "compressed-tensors", {"sliding_window": 6}),
], ids=["tp-llama-float", "tp-llama-float-replicated-head", "tp-llama-int4", "tp-qwen2-int8-ct", "tp-mistral-int4-ct-window",
        "tp-mistral-int4-int8-head", "pp-llama-int4",
        "pp-qwen2-float-one-micro-batch", "pp-mistral-int8-ct-window"])
def test_two_ranks_generate_what_one_process_does(tmp_path, layout, family, quant, save_format, overrides):
    path = folder(tmp_path, family, quant, save_format, **overrides)
    single, _ = slimlm.load(path)
    want = solo_tokens(single)
    want_logits = Engine(single, max_len=64, fused_step=False).prefill(0, PROMPTS[0])
    settings = {"tp-replicated-head": {"tp": 2, "split_head": False},
                "pp-one-micro-batch": {"pp": 2, "micro_batches": 1}}.get(layout, {layout: 2})
    model, _ = slimlm.load(path, **settings)
    try:
        assert solo_tokens(model) == want
        engine = model.slimlm_parallel.engine(slots=2, max_len=64)
        logits = engine.prefill(0, PROMPTS[0])
        torch.testing.assert_close(logits, want_logits, rtol=2e-2, atol=2e-2)
        # two sequences of different lengths decode together; slot 1's prompt prefilled in two chunks
        engine.prefill(1, PROMPTS[1][:2])
        second = engine.append(1, PROMPTS[1][2:])
        tokens = torch.stack([logits.argmax(-1), second.argmax(-1)])
        got = [[int(t)] for t in tokens]
        for _ in range(5):
            tokens = engine.decode(torch.tensor([0, 1]), tokens).argmax(-1)
            for row, t in zip(got, tokens.tolist()):
                row.append(t)
        assert got == [w[:6] for w in want]
        engine.close()
    finally:
        model.slimlm_parallel.close()
    assert not dist.is_initialized()


def test_a_rank_holds_its_share_of_the_weights(tmp_path):
    from slimlm.eval.size import weight_bytes
    from slimlm.parallel.loading import load_tp_shard

    path = folder(tmp_path, "llama", hidden=128, layers=4)
    whole, _ = slimlm.load(path)
    shard, _, layout, spec = load_tp_shard(path, 2, 1)
    embedding = sum(p.numel() * p.element_size() for p in whole.model.embed_tokens.parameters())
    share = (weight_bytes(whole) - embedding) / 2 + embedding  # the blocks halve, the tied embedding is replicated
    assert abs(weight_bytes(shard) - share) < 0.05 * weight_bytes(whole)
    assert spec.n_heads == 2 and layout.q_heads == range(2, 4)


def test_impossible_layouts_are_one_line_errors(tmp_path, capsys):
    from slimlm.cli import main

    path = folder(tmp_path, "llama")
    code = main(["generate", str(path), "hi", "--tp", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "--tp 3 does not divide the model's 4 attention heads" in err
    assert len(err.strip().splitlines()) == 1


def test_stages_are_balanced_by_bytes():
    from slimlm.parallel.pipeline import balance

    assert balance([10] * 8, 0, 0, 2) == [range(0, 4), range(4, 8)]
    assert balance([10] * 8, 25, 0, 2) == [range(0, 3), range(3, 8)]  # the embedding weighs on stage 0
    assert balance([10] * 8, 0, 40, 3) == [range(0, 3), range(3, 7), range(7, 8)]  # costs 30, 40, 50
    with pytest.raises(Exception, match="--pp 9 needs at least 9 layers"):
        balance([10] * 8, 0, 0, 9)


def test_torchrun_two_nodes_on_loopback(tmp_path):
    """`torchrun --nnodes 2 --rdzv-backend c10d` (two "nodes" on loopback) runs `slimlm generate --tp 2`,
    and rank 0 prints what one process generates."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    path = folder(tmp_path, "llama")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(torchrun), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "slimlm-test", "-m", "slimlm", "generate",
               str(path), "Once upon", "-n", "8", "--tp", "2"]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in outputs]
    from slimlm.cli import main

    printed = sorted(out for out, _ in outputs)
    assert printed[0] == ""  # the follower prints nothing
    import contextlib
    import io

    solo = io.StringIO()
    with contextlib.redirect_stdout(solo):
        assert main(["generate", str(path), "Once upon", "-n", "8"]) == 0
    assert printed[1] == solo.getvalue()
