"""`slimlm export` from the command line: what a user runs, and the one-line errors of bad input."""

import pytest

from tests.cli_helpers import one_line_error, run

gguf = pytest.importorskip("gguf")




def test_quantize_then_export_gguf_and_hf(tiny_folder, tmp_path, capsys):
    q = tmp_path / "q"
    code, _, err = run(capsys, "quantize", tiny_folder("llama"), "-o", q, "--bits", "4", "--group-size", "32",
                       "--eval-tokens", 0)
    assert code == 0, err
    code, out, err = run(capsys, "export", q, "-o", tmp_path / "m.gguf")
    assert code == 0, err
    assert "14 quantized layers copied exactly" in out
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} >= {"Q4_1"}  # default int4 is asymmetric
    code, out, err = run(capsys, "export", q, "-o", tmp_path / "dense", "--format", "hf")
    assert code == 0, err
    assert (tmp_path / "dense" / "model.safetensors").is_file()


def test_bad_input_is_one_line_and_leaves_nothing(tiny_folder, tmp_path, capsys):
    q = tmp_path / "q3"
    assert run(capsys, "quantize", tiny_folder("llama"), "-o", q, "--bits", "3", "--eval-tokens", 0)[0] == 0
    code, _, err = run(capsys, "export", q, "-o", tmp_path / "m.gguf")
    one_line_error(code, err, "cannot be written exactly in GGUF")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))
    code, out, err = run(capsys, "export", q, "-o", tmp_path / "m.gguf", "--type", "q8_0")
    assert code == 0, err
    assert "re-quantized to q8_0 (KL" in out
    one_line_error(*run(capsys, "export", q, "-o", tmp_path / "m.gguf", "--type", "q8_0")[::2], "already exists")
    one_line_error(*run(capsys, "export", tiny_folder("opt"), "-o", tmp_path / "g.gguf")[::2], "not 'opt'")
    one_line_error(*run(capsys, "export", tmp_path / "missing", "-o", tmp_path / "x.gguf")[::2], "missing")
    one_line_error(*run(capsys, "export", q, "-o", tmp_path / "no" / "x.gguf")[::2], "does not exist")
    one_line_error(*run(capsys, "export", q, "-o", tmp_path / "d", "--format", "hf", "--type", "q8_0")[::2],
                   "apply to GGUF")
