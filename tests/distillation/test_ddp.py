"""Data parallel training: two CPU processes (gloo) on the same global batch follow the one-process
loss curve and end with the same weights."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slimlm.distillation.trainer import TrainConfig, train
from slimlm.testing import tiny_model

BLOCKS = torch.randint(1, 300, (16, 33), generator=torch.Generator().manual_seed(0))
CONFIG = dict(steps=4, batch_size=4, grad_accum=2, seq_len=33, warmup_steps=1, bf16=False, lr=3e-3, save_every=2)


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_model("llama")
        teacher = tiny_model("llama", seed=3)
        history = train(model, BLOCKS, None, TrainConfig(**CONFIG), teacher=teacher, out=out if rank == 0 else None)
        if rank == 0:
            torch.save({"history": history, "state": model.state_dict()}, f"{out}/result.pt")
        dist.barrier()  # nobody leaves the group while another still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_follow_the_single_process_loss_curve(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    single = tiny_model("llama")
    history = train(single, BLOCKS, None, TrainConfig(**CONFIG), teacher=tiny_model("llama", seed=3))
    assert [h["loss"] for h in result["history"]] == pytest.approx([h["loss"] for h in history], rel=1e-4)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(result["state"][name], value, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "history.json").read_text())[-1]["step"] == 4  # rank 0 wrote it
