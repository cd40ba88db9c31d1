"""slimlm's CUDA paths, checked on a GPU machine: engine vs transformers, the CUDA kernels against
the reference, calibrated quantization (GPTQ, AWQ, SmoothQuant) on the GPU against the same run on
CPU, and the int8 KV cache. Prints one line per check and exits non-zero if any fails.

    python benchmarks/cuda_check.py            # then, for speed: benchmarks/engine_speed.py --device cuda
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import torch

import slimlm
from slimlm.engine.engine import Engine
from slimlm.engine.generate import SamplingParams, generate_ids
from slimlm.testing import tiny_model

DEV = torch.device(os.environ.get("SLIMLM_CHECK_DEVICE", "cuda"))  # "cpu" dry-runs the script's own logic
CHECKS: list[tuple[str, object]] = []
FAILED: list[str] = []


def check(name: str):
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


def run_checks() -> None:
    for name, fn in CHECKS:
        t0 = time.perf_counter()
        try:
            detail = fn()
            print(f"PASS {name} ({time.perf_counter() - t0:.1f} s) {detail or ''}", flush=True)
        except Exception:  # report every check, keep going
            FAILED.append(name)
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)


def ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 300, (batch, n), generator=torch.Generator().manual_seed(seed))


def model(family: str = "llama", **kw) -> torch.nn.Module:
    return tiny_model(family, hidden=128, layers=2, **kw)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = p_logits.float().log_softmax(-1)
    q = q_logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@check("engine greedy == transformers generate (llama, mistral, qwen2, phi3; fp32)")
def _():
    for family in ("llama", "mistral", "qwen2", "phi3"):
        m = model(family).to(DEV)
        prompt = ids(9).to(DEV)
        ours = generate_ids(m, prompt, SamplingParams(max_new_tokens=24), engine=True)
        theirs = m.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
        assert torch.equal(ours[0], theirs[0, prompt.shape[1]:]), family


@check("engine batched decode of different lengths == each alone (bf16)")
def _():
    m = model("qwen2").to(DEV, torch.bfloat16)
    prompts = [ids(3, seed=1)[0], ids(11, seed=2)[0], ids(6, seed=3)[0]]
    engine = Engine(m, slots=3, max_len=64)
    logits = torch.stack([engine.prefill(i, p) for i, p in enumerate(prompts)])
    slots = torch.arange(3, device=DEV)
    together = []
    for _ in range(8):
        tokens = logits.argmax(-1)
        together.append(tokens)
        logits = engine.decode(slots, tokens)
    together = torch.stack(together, 1)
    for i, p in enumerate(prompts):
        alone = generate_ids(m, p[None], SamplingParams(max_new_tokens=8), engine=True)[0]
        agree = float((alone == together[i]).float().mean())
        assert agree >= 0.75, (i, agree)  # bf16: batched and single GEMMs may round differently


@check("CUDA-graph decode == the dynamic step (fp32 logits; llama, mistral window 4, qwen2, phi3; any slot subsets)")
def _():
    worst, captured = 0.0, set()
    for family, extra in (("llama", {}), ("mistral", {"sliding_window": 4}), ("qwen2", {}), ("phi3", {})):
        m = model(family, **extra).to(DEV)
        graphed = Engine(m, 5, 64, cuda_graphs=DEV.type == "cuda", static_steps=True)
        plain = Engine(m, 5, 64, cuda_graphs=False)
        gen = torch.Generator().manual_seed(1)
        live: dict[int, int] = {}  # slot -> tokens held
        for step in range(40):  # sequences start, decode in random subsets and finish, as the server runs them
            free = [s for s in range(5) if s not in live]
            if free and (not live or step % 3 == 0):
                slot, prompt = free[0], ids(3 + step % 7, seed=step)[0].to(DEV)
                for e in (graphed, plain):
                    e.prefill(slot, prompt)
                live[slot] = len(prompt)
            for slot in [s for s, n in live.items() if n > 50 or (step % 5 == 4 and s == min(live))]:
                for e in (graphed, plain):
                    e.release(slot)
                del live[slot]
            chosen = [s for s in live if torch.rand((), generator=gen) < 0.7] or sorted(live)[:1]
            if not chosen:
                continue
            slots = torch.tensor(chosen, device=DEV)
            tokens = torch.randint(1, 300, (len(chosen),), generator=gen).to(DEV)
            a, b = graphed.decode(slots, tokens), plain.decode(slots, tokens)
            worst = max(worst, float((a - b).abs().max()))
            for s in chosen:
                live[s] += 1
        assert DEV.type == "cpu" or graphed._graphs, "no graph was captured"
        captured |= set(graphed._graphs)
    assert worst < 1e-3, worst
    return f"max |diff| {worst:.1e}; buckets captured {sorted(captured)}"


@check("trainer on the device: bf16 autocast distillation lowers the loss, QAT converts back")
def _():
    from slimlm.distillation.qat import convert_qat_, prepare_qat_
    from slimlm.distillation.students import layer_subset
    from slimlm.distillation.trainer import TrainConfig, train

    teacher = tiny_model("llama", hidden=128, layers=4).to(DEV)
    student = layer_subset(teacher)
    blocks = ids(33, batch=16, seed=4)
    history = train(student, blocks, blocks[:4], TrainConfig(steps=20, batch_size=8, seq_len=33, warmup_steps=2,
                                                             lr=3e-3, bf16=DEV.type == "cuda"), teacher=teacher)
    assert history[-1]["loss"] < history[0]["loss"], history
    q = model().to(DEV)
    slimlm.quantize(q, "rtn", bits=4, group_size=32)
    prepare_qat_(q)
    train(q, blocks, None, TrainConfig(steps=4, batch_size=8, seq_len=33, warmup_steps=1, bf16=False))
    convert_qat_(q)
    assert all(m.scale.device.type == DEV.type for m in q.modules() if hasattr(m, "scheme"))
    return f"loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}"


@check("server on the device: concurrent requests get their solo greedy outputs")
def _():
    import threading

    import openai

    from slimlm.server.app import ServedModel, ServeSettings, create_app
    from slimlm.server.metrics import Metrics
    from slimlm.server.scheduler import Scheduler
    from slimlm.server.server import BackgroundServer
    from slimlm.testing.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    m = model(vocab=len(tok)).to(DEV)
    metrics = Metrics()
    sched = Scheduler(m, slots=4, max_len=128, metrics=metrics, name="m")
    app = create_app({"m": ServedModel("m", m, tok, sched)}, ServeSettings(), metrics)
    prompts = ["Once upon", "The quick brown fox", "def add(a, b):", "0123", "one, two"]
    try:
        with BackgroundServer(app) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            solo = {p: c.completions.create(model="m", prompt=p, max_tokens=16, temperature=0).choices[0].text
                    for p in prompts}
            got = []
            threads = [threading.Thread(target=lambda p=p: got.append(
                (p, c.completions.create(model="m", prompt=p, max_tokens=16, temperature=0).choices[0].text)))
                for p in prompts * 2]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sched.close()
    assert len(got) == 10 and all(text == solo[p] for p, text in got)
    return f"{len(got)} concurrent requests"


@check("int8 KV cache: logits close to the bf16 cache")
def _():
    m = model().to(DEV)
    prompt = ids(40)[0].to(DEV)
    full, quant = Engine(m, 1, 64), Engine(m, 1, 64, kv_dtype="int8")
    a = full.append(0, prompt, all_logits=True, read_back=True)
    b = quant.append(0, prompt, all_logits=True, read_back=True)
    assert quant.cache.k[0].dtype == torch.int8
    value = kl(a, b)
    assert value < 1e-3, value
    return f"KL {value:.2e}"


@check("CUDA kernels chosen and equal to the reference (int4 g32/g128, int8; M = 1, 8, 300)")
def _():
    details = []
    for settings in ({"bits": 4, "group_size": 32}, {"bits": 4, "group_size": 128, "symmetric": True},
                     {"bits": 8, "group_size": None}):
        m = model().to(DEV, torch.bfloat16)
        slimlm.quantize(m, "rtn", **settings)
        layers = [x for x in m.modules() if hasattr(x, "set_kernel_") and hasattr(x, "scheme")]
        for rows in (1, 8, 300):
            x = torch.randn(rows, 128, device=DEV, dtype=torch.bfloat16)
            layer = layers[0]
            layer.set_kernel_(None)
            fast = layer(x).float()
            name = layer.kernel
            layer.set_kernel_("reference")
            ref = layer(x).float()
            err = float((fast - ref).abs().max() / ref.abs().max())
            assert (name in ("cuda_int4", "cuda_int8") or DEV.type == "cpu") and err < 1e-2, (settings, rows, name, err)
        details.append(f"{name} {err:.1e}")
        layer.set_kernel_(None)
        out = generate_ids(m, ids(8).to(DEV), SamplingParams(max_new_tokens=8))
        assert out.shape == (1, 8)
    return ", ".join(details)


def _quantized_pair(method: str, **settings):
    """The same calibrated quantization run on CPU and on the GPU (fp32): (cpu model, gpu model, eval ids)."""
    calib = ids(64, batch=8, seed=5)
    cpu, gpu = model(), model().to(DEV)
    slimlm.quantize(cpu, method, calibration=calib, **settings)
    slimlm.quantize(gpu, method, calibration=calib.to(DEV), **settings)
    return cpu, gpu, ids(64, batch=2, seed=9)


def _compare(cpu, gpu, held_out, reference) -> str:
    with torch.no_grad():
        ref = reference(held_out).logits
        on_cpu = cpu(held_out).logits
        on_gpu = gpu(held_out.to(DEV)).logits.cpu()
    k_cpu, k_gpu = kl(ref, on_cpu), kl(ref, on_gpu)
    assert torch.isfinite(on_gpu).all()
    assert k_gpu < 1.5 * k_cpu + 1e-4, (k_cpu, k_gpu)
    return f"KL vs fp32: cpu {k_cpu:.4f}, cuda {k_gpu:.4f}"


@check("GPTQ int4 g32 on CUDA ~ GPTQ on CPU")
def _():
    cpu, gpu, held = _quantized_pair("gptq", bits=4, group_size=32)
    return _compare(cpu, gpu, held, model())


@check("AWQ int4 g32 on CUDA ~ AWQ on CPU")
def _():
    cpu, gpu, held = _quantized_pair("awq", bits=4, group_size=32)
    return _compare(cpu, gpu, held, model())


@check("SmoothQuant W8A8 on CUDA (torch._int_mm) ~ on CPU")
def _():
    cpu, gpu, held = _quantized_pair("smoothquant")
    kinds = {x._choose(torch.empty(1, x.in_features, device=DEV)) for x in gpu.modules()
             if x.__class__.__name__ == "W8A8Linear"}
    detail = _compare(cpu, gpu, held, model())
    assert DEV.type == "cpu" or kinds == {"int_mm"}, kinds
    return f"{detail}; kernels {sorted(kinds)}"


def main() -> None:
    if DEV.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here; run this on a GPU machine (or SLIMLM_CHECK_DEVICE=cpu to dry-run)")
    name = torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}", flush=True)
    run_checks()
    import pytest

    code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/quant/test_cuda_kernels.py"])
    if code != 0:
        FAILED.append("tests/quant/test_cuda_kernels.py")
    print(f"{len(FAILED)} failed: {', '.join(FAILED)}" if FAILED else "all CUDA checks passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
