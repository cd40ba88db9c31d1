import json
from pathlib import Path

import pytest
import torch

import slimlm
from slimlm.core.errors import SlimError
from slimlm.distillation.checkpoint import load_checkpoint
from slimlm.distillation.students import layer_subset
from slimlm.distillation.trainer import TrainConfig, lr_factor, train
from slimlm.pruning import masks as M
from slimlm.testing import tiny_model

BLOCKS = torch.randint(1, 300, (16, 33), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(1, 300, (4, 33), generator=torch.Generator().manual_seed(1))
FAST = dict(steps=6, batch_size=4, seq_len=33, warmup_steps=2, eval_every=3, save_every=2, bf16=False, lr=3e-3)


def test_layer_subset_keeps_every_other_block_renumbered():
    teacher = tiny_model("llama", layers=4)
    student = layer_subset(teacher)
    assert len(student.model.layers) == 2 and student.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in student.model.layers] == [0, 1]
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    assert len(teacher.model.layers) == 4  # the teacher is untouched
    with pytest.raises(SlimError):
        layer_subset(teacher, [0, 7])


def test_training_lowers_the_loss_and_writes_history_and_plot(tmp_path):
    model = tiny_model("llama")
    before = train(model, BLOCKS, HELD_OUT, TrainConfig(**{**FAST, "steps": 1}))[0]["loss"]
    history = train(model, BLOCKS, HELD_OUT, TrainConfig(**{**FAST, "steps": 30, "lr": 1e-2}), out=tmp_path)
    assert history[-1]["loss"] < 0.8 * before and "eval_ppl" in history[-1]
    assert json.loads((tmp_path / "history.json").read_text())[-1]["step"] == 30
    assert (tmp_path / "loss.png").is_file()


def test_distillation_pulls_the_student_towards_the_teacher():
    teacher = tiny_model("llama", layers=4, seed=1)
    student = layer_subset(teacher)
    kl = lambda: float(torch.nn.functional.kl_div(  # noqa: E731
        student(HELD_OUT).logits.log_softmax(-1), teacher(HELD_OUT).logits.log_softmax(-1), log_target=True,
        reduction="batchmean"))
    with torch.no_grad():
        start = kl()
    train(student, BLOCKS, None, TrainConfig(**{**FAST, "steps": 20, "alpha": 0.0, "temperature": 1.0}), teacher=teacher)
    with torch.no_grad():
        assert kl() < 0.7 * start


class Crash(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    config = TrainConfig(**FAST)
    whole = tiny_model("llama")
    train(whole, BLOCKS, HELD_OUT, config)

    def crash(step, record):
        if step == 5:  # after the step-4 checkpoint, before the step-6 one
            raise Crash

    crashed = tiny_model("llama")
    with pytest.raises(Crash):
        train(crashed, BLOCKS, HELD_OUT, config, out=tmp_path, on_step=crash)
    resumed = tiny_model("llama", seed=7)  # different weights: everything must come from the checkpoint
    history = train(resumed, BLOCKS, HELD_OUT, config, out=tmp_path, resume=True)
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_fine_tuning_a_pruned_model_keeps_its_zeros():
    model = tiny_model("llama")
    slimlm.prune(model, "magnitude", sparsity=0.5)
    before = {n: M.sparsity(model.get_submodule(n).weight) for n in model.config.slimlm_sparsity["targets"]}
    masks = {n: model.get_submodule(n).weight != 0 for n in before}
    train(model, BLOCKS, None, TrainConfig(**{**FAST, "weight_decay": 0.1}))
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        assert torch.equal(w != 0, mask), name  # pruned stay zero, and the kept ones moved but stayed nonzero


def test_schedule_warms_up_then_decays():
    c = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(55, c) < lr_factor(20, c) and lr_factor(100, c) == pytest.approx(0.1)


def test_bad_settings_are_clear_errors():
    with pytest.raises(SlimError, match="lr"):
        TrainConfig(lr=5)
    with pytest.raises(SlimError, match="alpha"):
        TrainConfig(alpha=1.5)
    with pytest.raises(SlimError, match="resume"):
        train(tiny_model("llama"), BLOCKS, None, TrainConfig(**FAST), resume=True)


def test_hidden_state_matching_with_a_projection_between_widths():
    teacher = tiny_model("llama", hidden=64, layers=2, seed=1)
    student = tiny_model("llama", hidden=32, layers=2, intermediate_size=64)
    history = train(student, BLOCKS, None, TrainConfig(**{**FAST, "steps": 8, "hidden_weight": 1.0,
                                                           "hidden_layers": [[1, 1], [2, 2]]}), teacher=teacher)
    assert history[-1]["hidden"] < history[0]["hidden"] and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    with pytest.raises(SlimError, match="teacher"):
        train(student, BLOCKS, None, TrainConfig(**{**FAST, "hidden_weight": 1.0}))


KILL_SCRIPT = """
import os, signal, sys, torch
from slimlm.distillation.trainer import TrainConfig, train
from slimlm.testing import tiny_model
blocks = torch.randint(1, 300, (16, 33), generator=torch.Generator().manual_seed(0))
def die(step, record):
    if step == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handling: a real crash
train(tiny_model("llama"), blocks, None, TrainConfig(**{config}), out=sys.argv[1], on_step=die)
"""


def test_a_process_killed_mid_run_resumes_to_the_same_result(tmp_path):
    import subprocess
    import sys

    config = {**FAST, "steps": 8}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT.replace("{config}", repr(config)), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9  # SIGKILL
    assert load_checkpoint(tmp_path)["step"] == 4
    resumed = tiny_model("llama", seed=5)
    train(resumed, BLOCKS, None, TrainConfig(**config), out=tmp_path, resume=True)
    whole = tiny_model("llama")
    train(whole, BLOCKS, None, TrainConfig(**config))
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


class _Payload:
    """Unpickling this runs code (what a crafted checkpoint.pt did with --resume)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickled_checkpoint_is_refused_and_never_run(tmp_path):
    from pathlib import Path as P

    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": _Payload(str(marker))}, tmp_path / "checkpoint.pt")
    with pytest.raises(SlimError, match="pickled checkpoint .* not loaded"):
        train(tiny_model("llama"), BLOCKS, None, TrainConfig(**FAST), out=tmp_path, resume=True)
    assert not marker.exists() and P(tmp_path / "checkpoint.pt").exists()


def test_checkpoints_hold_no_pickle(tmp_path):
    train(tiny_model("llama"), BLOCKS, None, TrainConfig(**{**FAST, "steps": 2}), out=tmp_path)
    folder = tmp_path / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["state.json", "tensors.safetensors"]
    json.loads((folder / "state.json").read_text())  # plain JSON
    assert not list(tmp_path.glob("*.pt"))


@pytest.mark.parametrize("damage", ["truncate", "garbage json", "other model"])
def test_a_damaged_checkpoint_is_one_clear_error(tmp_path, damage):
    train(tiny_model("llama"), BLOCKS, None, TrainConfig(**{**FAST, "steps": 2}), out=tmp_path)
    folder = tmp_path / "checkpoint"
    if damage == "truncate":
        data = (folder / "tensors.safetensors").read_bytes()
        (folder / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garbage json":
        (folder / "state.json").write_text("{not json")
    student = tiny_model("llama", hidden=32) if damage == "other model" else tiny_model("llama")
    with pytest.raises(SlimError, match="checkpoint .* (corrupt|does not fit)"):
        train(student, BLOCKS, None, TrainConfig(**FAST), out=tmp_path, resume=True)
