"""Careless or hostile input to the CLI and the files it writes (issue 18, items 9-13): each is one
clear line with exit 2, and nothing is lost or left behind."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from tests.cli_helpers import one_line_error, run




@pytest.mark.parametrize("verb, extra", [("quantize", ["--bits", "8"]), ("prune", ["--sparsity", "0.3"])])
def test_overwrite_replaces_the_output(tiny_folder, tmp_path, capsys, verb, extra):
    """--overwrite used to be checked before the work and then not passed to the save."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = run(capsys, verb, tiny_folder("llama"), "-o", out, "--eval-tokens", 0, *extra)
    one_line_error(code, err, "already exists; pass --overwrite")
    code, _, err = run(capsys, verb, tiny_folder("llama"), "-o", out, "--eval-tokens", 0, "--overwrite", *extra)
    assert code == 0, err
    assert (out / "config.json").is_file() and not (out / "old.txt").exists()


def test_size_settings_are_bounded_by_the_data_and_the_machine(tiny_folder, tmp_path, capsys):
    code, _, err = run(capsys, "quantize", tiny_folder("llama"), "-o", tmp_path / "q", "-m", "gptq",
                       "--n-samples", 1000000000, "--seq-len", 32, "--eval-tokens", 0)
    one_line_error(code, err, "n_samples 1000000000 asks for more windows than the calibration data has")
    code, _, err = run(capsys, "bench", tiny_folder("llama"), "--batch-sizes", 1000000000, "--prompt-tokens", 8,
                       "--new-tokens", 4)
    one_line_error(code, err, "GB are available; lower --batch-sizes")
    assert not (tmp_path / "q").exists()


def nan_folder(src, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(src, folder)
    state = load_file(folder / "model.safetensors")
    key = next(k for k in state if k.endswith("mlp.up_proj.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, key


@pytest.mark.parametrize("argv", [["inspect"], ["generate", "{}", "hi", "-n", "2"], ["bench", "--repeats", "1"],
                                  ["quantize", "-o", "{out}", "--eval-tokens", "0"],
                                  ["prune", "-o", "{out}", "--eval-tokens", "0"], ["eval", "--max-tokens", "64"]])
def test_nan_weights_are_refused_by_every_verb(tiny_folder, tmp_path, capsys, argv):
    folder, key = nan_folder(tiny_folder("llama"), tmp_path)
    verb, *rest = argv
    rest = [str(tmp_path / "out") if a == "{out}" else a for a in rest if a != "{}"]
    code, _, err = run(capsys, verb, folder, *rest)
    one_line_error(code, err, f"NaN or infinite values in '{key}'")
    assert not (tmp_path / "out").exists()


def test_tracebacks_of_the_old_cli_are_one_line_errors(tiny_folder, tmp_path, capsys):
    src = tiny_folder("llama")
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, "quantize", src, "-o", tmp_path / "afile" / "out")
    one_line_error(code, err, "is a file, so")
    # weights of the wrong shape in a compressed (meta-built) folder
    code, _, _ = run(capsys, "quantize", src, "-o", tmp_path / "q", "--eval-tokens", 0, "--save-format", "slimlm")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "q" / "model.safetensors")
    key = next(k for k in state if k.endswith("down_proj.scale"))
    state[key] = torch.zeros(3, 3, dtype=state[key].dtype)
    save_file(state, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run(capsys, "inspect", tmp_path / "q")
    one_line_error(code, err, f"'{key}' is [3, 3], the config says")
    # a pickled .bin that would run code
    evil = tmp_path / "evil"
    shutil.copytree(src, evil)
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"x": _Touch(str(marker))}, evil / "pytorch_model.bin")
    code, _, err = run(capsys, "inspect", evil)
    one_line_error(code, err, "pickled objects other than tensors")
    assert not marker.exists()
    # an unknown architecture: one line
    unknown = tmp_path / "unknown"
    shutil.copytree(src, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config["model_type"] = "nosucharch"
    (unknown / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "inspect", unknown)
    one_line_error(code, err, "model type 'nosucharch'")


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mknod, (self.path,))


def test_a_killed_write_is_cleaned_up_and_files_share_one_mode(tiny_folder, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = tmp_path / f".out.tmp-{pid}"
    (stale / "sub").mkdir(parents=True)
    live = tmp_path / f".out.tmp-{os.getpid() + 10**7}"  # no such pid either, but keep a live one too:
    mine = tmp_path / f".out.tmp-{os.getppid()}"
    mine.mkdir()
    code, _, err = run(capsys, "quantize", tiny_folder("llama"), "-o", tmp_path / "out", "--eval-tokens", 0)
    assert code == 0, err
    assert not stale.exists() and mine.exists() and not live.exists()
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "out").iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_a_vanishing_temperature_is_greedy_not_a_traceback(tiny_folder, capsys):
    code, greedy, err = run(capsys, "generate", tiny_folder("llama"), "Once", "-n", 6)
    assert code == 0, err
    code, tiny, err = run(capsys, "generate", tiny_folder("llama"), "Once", "-n", 6, "--temperature", "1e-40")
    assert code == 0 and tiny == greedy, err
    code, _, err = run(capsys, "generate", tiny_folder("llama"), "Once", "--temperature", "nan")
    one_line_error(code, err, "temperature nan must be a finite number")
