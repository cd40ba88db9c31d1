"""Calibration across processes: each of two gloo processes takes half the calibration windows, the
statistics are combined, and both end with the model one process makes (same codes or masks, up to
floating-point summation order)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import slimlm
from slimlm.testing import tiny_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
CALIBRATION = torch.randint(1, 300, (8, 24), generator=torch.Generator().manual_seed(0))  # 8 windows
STEPS = {
    "gptq": ("quantize", dict(bits=4, group_size=32)),
    "awq": ("quantize", dict(bits=4, group_size=32, max_tokens=64, clip_tokens=32)),
    "smoothquant": ("quantize", {}),
    "wanda": ("prune", dict(sparsity=0.5)),
    "sparsegpt": ("prune", dict(sparsity=0.5)),
    "channels": ("prune", dict(sparsity=0.25, importance="activation")),
}


def compress(method: str, calibration=CALIBRATION) -> dict:
    verb, settings = STEPS[method]
    model = getattr(slimlm, verb)(tiny_model("llama"), method, calibration=calibration, **settings)
    return {k: v.clone() for k, v in model.state_dict().items()}


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {method: compress(method) for method in STEPS}
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def same_model(method: str, a: dict, b: dict) -> bool:
    """Equal codes (but for a rare rounding tie), the same pruned weights, floats within summation order."""
    for key, value in a.items():
        other = b[key]
        if value.dtype in (torch.uint8, torch.int8):
            if (value == other).float().mean() <= 0.995:
                return False
        elif value.is_floating_point():
            if method in ("wanda", "sparsegpt") and ((value == 0) == (other == 0)).float().mean() <= 0.995:
                return False
            if value.shape != other.shape or not torch.allclose(other, value, rtol=2e-3, atol=2e-3):
                return False
    return a.keys() == b.keys()


def test_two_processes_calibrate_like_one(tmp_path):
    out = tmp_path / "results.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    shared = torch.load(out)
    for method in STEPS:
        alone = compress(method)
        assert same_model(method, shared[method], alone), method
        # a process that used only its own half of the windows would not pass that check:
        assert not same_model(method, compress(method, CALIBRATION[0::2]), alone), method


def test_quantize_under_torchrun_splits_the_calibration(tiny_folder, tmp_path):
    """`torchrun --nproc-per-node 2 -m slimlm quantize -m gptq ...`: rank 0 saves what one process makes."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    src = tiny_folder("llama")
    args = ["quantize", str(src), "-m", "gptq", "--bits", "4", "--group-size", "32", "--n-samples", "8",
            "--seq-len", "32", "--calib", "demo", "--eval-tokens", "0", "--save-format", "slimlm"]
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(_port()), "-m", "slimlm",
                           *args, "-o", str(tmp_path / "two")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from slimlm.cli import main

    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    two, one = slimlm.load(tmp_path / "two")[0].state_dict(), slimlm.load(tmp_path / "one")[0].state_dict()
    assert same_model("gptq", two, one)
    shutil.rmtree(tmp_path / "two")


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
