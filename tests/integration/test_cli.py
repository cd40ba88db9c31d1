"""The CLI end to end on tiny models: every verb, --json output, and user errors (exit 2, one line)."""

import json
import subprocess
import sys

import pytest
import torch

from slimlm.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_then_inspect_eval_generate(tiny_folder, tmp_path, capsys):
    src = tiny_folder("llama")
    code, out, _ = run_cli(capsys, "quantize", src, "-o", tmp_path / "q", "--bits", 4, "--group-size", 32,
                           "--eval-tokens", 300, "--json")
    original, quantized = json.loads(out)["report"]["variants"]
    assert code == 0 and quantized["size"]["weight_bytes"] < original["size"]["weight_bytes"]
    assert original["quality"]["kl"] == 0 and quantized["quality"]["kl"] > 0
    assert (tmp_path / "q" / "report.md").is_file() and (tmp_path / "q" / "recipe.yaml").is_file()
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "q", "--json")
    info = json.loads(out)
    assert code == 0 and info["schemes"]["int4 g32 asym"] == 14 and info["linear_bits_per_weight"] < 6
    code, out, _ = run_cli(capsys, "eval", tmp_path / "q", "--reference", src, "--max-tokens", 200, "--window", 64, "--json")
    result = json.loads(out)
    assert code == 0 and result["perplexity"] > 1 and 0 < result["top1"] <= 1 and result["kl"] > 0
    code, out, _ = run_cli(capsys, "generate", tmp_path / "q", "Once upon", "-n", 5)
    assert code == 0 and out.startswith("Once upon")


def test_bench_json(tiny_folder, capsys):
    code, out, _ = run_cli(capsys, "bench", tiny_folder("gpt2"), "--prompt-tokens", 8, "--new-tokens", 4,
                           "--batch-sizes", "1,2", "--repeats", 1, "--json")
    assert code == 0 and set(json.loads(out)["decode_tps"]) == {"1", "2"}


def test_compress_on_a_user_model_keeps_variants(tiny_folder, tmp_path, capsys):
    code, out, err = run_cli(capsys, "compress", "--model", tiny_folder("qwen2"), "--variants", "fp32,int8,int4",
                             "--max-tokens", 300, "--window", 64, "--no-bench", "-o", tmp_path / "out", "--json")
    assert code == 0, err
    report = json.loads(out)
    names = [v["name"] for v in report["variants"]]
    assert names == ["fp32", "int8", "int4"]
    fp32, int8, int4 = report["variants"]
    assert fp32["quality"]["kl"] == pytest.approx(0, abs=1e-9) and fp32["quality"]["top1"] == 1.0
    assert 0 < int8["quality"]["kl"] < int4["quality"]["kl"]
    assert fp32["disk_bytes"] > int8["disk_bytes"] > int4["disk_bytes"]
    assert all(v["roundtrip_max_abs_diff"] == 0.0 for v in report["variants"])
    for name in names:
        assert (tmp_path / "out" / name / "config.json").is_file()
    assert (tmp_path / "out" / "report.md").read_text().count("| int") == 2
    assert (tmp_path / "out" / "report.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["inspect", "/no/such/model"], "does not exist"),
        (["quantize", "demo", "-o", "{tmp}/o", "--bits", "5"], "bits=5 is not supported"),
        (["quantize", "demo", "-o", "{tmp}/o", "--group-size", "48"], "group size 48"),
        (["quantize", "demo", "-o", "{tmp}/o", "-m", "magic"], "unknown quantization method 'magic'"),
        (["quantize", "demo", "-o", "{tmp}/o", "--include", "*.nothing.*"], "matches no linear layer"),
        (["quantize", "demo", "-o", "{tmp}/exists"], "already exists"),
        (["eval", "demo", "--data", "{tmp}/missing.txt"], "does not exist"),
        (["eval", "demo", "--data", "{tmp}/binary.txt"], "UTF-8"),
        (["compress", "--variants", "int5"], "unknown variant 'int5'"),
        (["bench", "demo", "--prompt-tokens", "100000"], "exceed"),
        (["generate", "demo", "hi", "--top-p", "0"], "top_p"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(argv, needle, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00")
    code, out, err = run_cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_bad_flag_type_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "demo", "--batch-sizes", "one"])
    assert e.value.code == 2 and "comma-separated list" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "slimlm", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "compress" in out.stdout


def test_compress_with_a_gptq_variant(tiny_folder, tmp_path, capsys):
    docs = "\n<|endoftext|>\n".join(f"story {i}: once upon a time a fox counted {i} stars" for i in range(60))
    (tmp_path / "data.txt").write_text(docs)
    code, out, err = run_cli(capsys, "compress", "--model", tiny_folder("llama"), "--variants", "fp32,int4,gptq-int4",
                             "--data", f"{tmp_path}/data.txt@30:", "--calib", f"{tmp_path}/data.txt@:30",
                             "--window", 64, "--no-bench", "--json")
    assert code == 0, err
    fp32, rtn, gptq = json.loads(out)["variants"]
    assert gptq["description"] == "gptq int4 g32 asym" and gptq["quality"]["kl"] > 0


def test_quantize_dry_run_shows_per_layer_schemes_and_writes_nothing(tiny_folder, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "quantize", tiny_folder("llama"), "-o", tmp_path / "q", "-m", "gptq", "--dry-run",
                           "--json", "--override", "model.layers.0.*=skip", "--override", "*.self_attn.*=bits:8")
    (plan,) = json.loads(out)
    assert code == 0 and not (tmp_path / "q").exists()
    assert plan["step"]["method"] == "gptq" and plan["step"]["damp"] == 0.01  # every default resolved
    assert plan["layers"]["model.layers.1.self_attn.q_proj"] == "int8 per-channel asym"  # the group picked again for 8 bits
    assert plan["layers"]["model.layers.1.mlp.up_proj"] == "int4 g128 asym"
    assert not any(name.startswith("model.layers.0.") for name in plan["layers"])


@pytest.mark.parametrize("method, extra, label", [
    ("awq", ["--bits", 4, "--group-size", 32], "int4 g32 asym"),
    ("smoothquant", ["--alpha", 0.6], "w8a8 int8 per-token"),
])
def test_calibrated_methods_from_the_cli(method, extra, label, tiny_folder, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time there was a tiny model. " * 200)
    code, out, _ = run_cli(capsys, "quantize", tiny_folder("qwen2"), "-o", tmp_path / "q", "-m", method, *extra,
                           "--calib", calib, "--n-samples", 4, "--seq-len", 32, "--eval-tokens", 0)
    assert code == 0
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "q", "--json")
    assert json.loads(out)["schemes"][label] == 14


def test_bench_on_the_engine_with_a_transformers_baseline(tiny_folder, capsys):
    code, out, _ = run_cli(capsys, "bench", tiny_folder("llama"), "--prompt-tokens", 8, "--new-tokens", 4,
                           "--batch-sizes", "1,3", "--repeats", 1, "--baseline", "--kv-dtype", "int8", "--json")
    result = json.loads(out)
    assert code == 0 and result["runtime"] == "engine" and result["baseline"]["runtime"] == "transformers"
    assert result["bandwidth_gbps"] > 0 and set(result["baseline"]["decode_tps"]) == {"1", "3"}


@pytest.mark.parametrize("method, extra", [("magnitude", ["--sparsity", 0.5]),
                                           ("wanda", ["--pattern", "2:4", "--n-samples", 4, "--seq-len", 32]),
                                           ("sparsegpt", ["--sparsity", 0.5, "--n-samples", 4, "--seq-len", 32])])
def test_prune_saves_a_sparse_model_with_a_report(tiny_folder, tmp_path, capsys, method, extra):
    src = tiny_folder("llama")
    code, out, _ = run_cli(capsys, "prune", src, "-o", tmp_path / "p", "-m", method, *extra, "--eval-tokens", 200, "--json")
    result = json.loads(out)
    assert code == 0 and result["sparsity"]["method"] == method
    assert all(abs(v - 0.5) < 0.02 for v in result["sparsity"]["measured"].values())
    original, pruned = result["report"]["variants"]
    assert pruned["quality"]["kl"] > 0
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["slimlm_sparsity"]["method"] == method


def test_prune_bad_sparsity_is_a_one_line_error(tiny_folder, tmp_path, capsys):
    code, _, err = run_cli(capsys, "prune", tiny_folder("llama"), "-o", tmp_path / "p", "--sparsity", 1.2)
    assert code == 2 and "sparsity 1.2" in err and "Traceback" not in err and not (tmp_path / "p").exists()


def test_prune_channels_shrinks_the_saved_model(tiny_folder, tmp_path, capsys):
    src = tiny_folder("llama")
    code, out, _ = run_cli(capsys, "prune", src, "-o", tmp_path / "p", "-m", "channels", "--sparsity", 0.25,
                           "--importance", "activation", "--n-samples", 4, "--seq-len", 32, "--eval-tokens", 200, "--json")
    assert code == 0
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["intermediate_size"] == 96 and config["slimlm_structured"]["importance"] == "activation"
    original, pruned = json.loads(out)["report"]["variants"]
    assert pruned["size"]["parameters"] < original["size"]["parameters"]


def test_distill_then_resume_and_finetune_qat(tiny_folder, tmp_path, capsys):
    src = tiny_folder("llama", layers=4)
    common = ["--data", "demo@0:18", "--eval-data", "demo@18:", "--steps", 4, "--batch-size", 2, "--seq-len", 32,
              "--eval-every", 2, "--save-every", 2, "--no-bf16", "--json"]
    code, out, _ = run_cli(capsys, "distill", src, "-o", tmp_path / "s", *common)
    summary = json.loads(out)
    assert code == 0 and summary["steps"] == 4 and summary["eval_ppl"] > 0
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and (tmp_path / "s" / "history.json").is_file()
    code, out, _ = run_cli(capsys, "distill", src, "-o", tmp_path / "s", *common[:-1], "--steps", 6, "--resume", "--json")
    assert code == 0 and json.loads(out)["steps"] == 6
    run_cli(capsys, "quantize", src, "-o", tmp_path / "q", "--bits", 4, "--group-size", 32, "--eval-tokens", 0)
    code, out, _ = run_cli(capsys, "finetune", tmp_path / "q", "-o", tmp_path / "f", "--qat", "--teacher", src, *common)
    assert code == 0
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "f", "--json")
    assert json.loads(out)["schemes"]["int4 g32 asym"] == 28


def saved_tensors(folder) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_finetune_with_lora_merges_the_adapters(tiny_folder, tmp_path, capsys, monkeypatch):
    """The saved model holds the input's tensors, no adapter's: each targeted weight plus the (α/r)·B·A its
    trained adapter held in memory at the end, every other tensor untouched."""
    from slimlm.distillation import lora

    adapters = []  # every adapter the run makes, as trained (merging leaves lora_a/lora_b as they are)
    make = lora.LoRALinear.__init__

    def make_and_record(self, *args, **kwargs):
        make(self, *args, **kwargs)
        adapters.append(self)

    monkeypatch.setattr(lora.LoRALinear, "__init__", make_and_record)
    src = tiny_folder("llama")
    code, out, _ = run_cli(capsys, "finetune", src, "-o", tmp_path / "l", "--lora", 4, "--lora-targets", "*.mlp.*",
                           "--data", "demo@0:18", "--steps", 3, "--batch-size", 2, "--seq-len", 32, "--no-bf16", "--json")
    assert code == 0
    before, after = saved_tensors(src), saved_tensors(tmp_path / "l")
    assert set(after) == set(before)  # no lora_a / lora_b / base.weight: the wrappers are gone
    targets = sorted(k for k in before if ".mlp." in k and k.endswith(".weight"))
    assert targets and len(adapters) == len(targets)
    for key in set(before) - set(targets):
        assert torch.equal(after[key], before[key]), key
    deltas = [m.delta().detach() for m in adapters]
    for key in targets:
        change = after[key].float() - before[key].float()
        assert change.abs().max() > 0, f"{key} did not change: the adapters were not merged"
        # float32 W + Δ: only the rounding of that one addition separates change from Δ
        match = [i for i, d in enumerate(deltas) if d.shape == change.shape and torch.allclose(change, d, rtol=1e-3, atol=1e-6)]
        assert match, f"{key} changed by something other than its adapter's (α/r)·B·A"
        deltas.pop(match[0])  # one adapter per layer
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "l", "--json")
    assert code == 0 and json.loads(out)["architecture"] == "LlamaForCausalLM"


def test_generate_with_a_draft_prints_the_same_text_and_the_acceptance(tiny_folder, capsys):
    """`slimlm generate --draft ngram|FOLDER --num-speculative K`: greedy text unchanged; the acceptance
    and tokens per target step go to stderr; impossible settings are one-line errors."""
    folder = tiny_folder("llama")
    prompt = "one two three one two three one two"
    code, plain, _ = run_cli(capsys, "generate", folder, prompt, "-n", 12)
    for draft in ("ngram", folder):  # the model itself as its own draft: every token accepted
        code, out, err = run_cli(capsys, "generate", folder, prompt, "-n", 12, "--draft", draft, "--num-speculative", 3)
        assert code == 0 and out == plain and "speculative decoding:" in err
    assert "100% of" in err
    code, _, err = run_cli(capsys, "generate", folder, prompt, "--draft", "ngram", "--num-speculative", 0)
    assert code == 2 and "--num-speculative 0 must be at least 1" in err


def test_bench_table_titles_the_settings_it_ran_with(tiny_folder, capsys):
    code, out, _ = run_cli(capsys, "bench", tiny_folder("llama"), "--new-tokens", 4, "--batch-sizes", "1", "--repeats", 1)
    assert code == 0 and "(128 prompt, 4 new tokens" in " ".join(out.split())  # the default prompt, not "None"
