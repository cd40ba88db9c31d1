"""A plan is a recipe slimlm.apply runs: the model it builds stores exactly the bytes the plan
charged, within the budget, and computes what the plan's treatments predict."""

import pytest
import torch

import slimlm
from slimlm.planner.plan import plan
from slimlm.planner.sensitivity import block_linears
from slimlm.testing import tiny_model


def test_the_planned_recipe_builds_the_planned_model():
    tokens = torch.randint(0, 320, (4, 32))
    load = lambda: tiny_model("llama", vocab=320, hidden=64)  # noqa: E731
    int4 = sum(64 * k // 2 + 64 * (k // 32) * 3 for k in [64] * 12 + [128] * 2)  # uniform int4 g32's bytes
    with_gptq = plan(load, tokens, int4, gptq_settings=dict(n_samples=4, seq_len=32))
    assert with_gptq.point.bytes <= int4 and {s["method"] for s in with_gptq.recipe} <= {"rtn", "gptq"}
    assert sorted(n for s in with_gptq.recipe for n in s["include"]) == sorted(with_gptq.sensitivity.layers)
    result = plan(load, tokens, int4, gptq=False)  # data-free steps: the recipe runs without calibration text
    assert with_gptq.point.loss <= result.point.loss  # more treatments to choose from
    model = slimlm.apply(load(), result.recipe)
    layers = block_linears(model)
    stored = sum(m.storage_bytes() - (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
                 for m in layers.values())
    assert stored == result.point.bytes
    chosen = result.treatments()
    for name, m in layers.items():
        assert f"int{m.scheme.bits}" in chosen[name]
    # more room, no worse a prediction; too little room, a clear error
    assert plan(load, tokens, 2 * int4, gptq=False).point.loss <= plan(load, tokens, int4, gptq=False).point.loss
    with pytest.raises(slimlm.SlimError, match="the smallest plan is"):
        plan(load, tokens, 1000, gptq=False)
    # a quality budget instead: the smallest plan predicted within it
    by_kl = plan(load, tokens, None, gptq=False, max_kl=result.point.loss)
    assert by_kl.point.loss <= result.point.loss and by_kl.point.bytes <= result.point.bytes


def test_plan_cli_writes_a_recipe_quantize_builds(tiny_folder, tmp_path, capsys):
    from tests.cli_helpers import one_line_error, run

    recipe = tmp_path / "plan.yaml"
    code, out, err = run(capsys, "plan", tiny_folder("llama"), "--max-size", "40KB", "--no-gptq", "--windows", 2,
                         "--seq-len", 32, "-o", recipe, "--sensitivity-out", tmp_path / "s.json",
                         "--heatmap", tmp_path / "s.png")
    assert code == 0, err
    assert "chosen:" in out and recipe.is_file()
    import json

    sens = json.loads((tmp_path / "s.json").read_text())
    assert len(sens["layers"]) == 14 and len(sens["kl"][0]) == len(sens["treatments"])
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = run(capsys, "quantize", tiny_folder("llama"), "--recipe", recipe, "-o", tmp_path / "m", "--eval-tokens", 0)
    assert code == 0, err
    one_line_error(*run(capsys, "plan", tiny_folder("llama"), "--max-size", "1KB", "--no-gptq", "--windows", 2,
                        "--seq-len", 32, "-o", tmp_path / "x.yaml")[::2], "the smallest plan is")
    one_line_error(*run(capsys, "plan", tiny_folder("llama"), "--max-size", "lots", "-o", tmp_path / "y.yaml")[::2],
                   "is not a size")


def test_plan_cli_checks_a_plan_with_calibrated_steps(tiny_folder, tmp_path, capsys):
    """The check builds the recipe, whose GPTQ steps read their calibration text with the model's
    tokenizer (it once had none, and `slimlm plan` failed whenever GPTQ was chosen)."""
    from tests.cli_helpers import run

    recipe = tmp_path / "plan.yaml"
    code, out, err = run(capsys, "plan", tiny_folder("llama"), "--max-size", "40KB", "--windows", 2, "--seq-len", 32,
                         "--n-samples", 4, "-o", recipe)
    assert code == 0, err
    assert "method: gptq" in recipe.read_text() and "measured" in out
    steps = __import__("yaml").safe_load(recipe.read_text())["steps"]
    assert steps[0]["method"] == "awq" and steps[0]["quantize"] is False  # the scales folded first, by default
    code, _, err = run(capsys, "plan", tiny_folder("llama"), "--max-size", "40KB", "--windows", 2, "--seq-len", 32,
                       "--n-samples", 4, "--no-awq", "--no-gptq", "-o", recipe, "--overwrite")
    assert code == 0, err
    assert {s["method"] for s in __import__("yaml").safe_load(recipe.read_text())["steps"]} == {"rtn"}


def test_a_prefix_is_planned_on_the_model_it_makes():
    from slimlm.planner.plan import AWQ_SCALES
    from slimlm.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tokens = torch.randint(0, 320, (2, 32))
    load = lambda: tiny_model("llama", vocab=320, hidden=64)  # noqa: E731
    prefix = [dict(AWQ_SCALES, calib="demo", n_samples=4, seq_len=32)]
    result = plan(load, tokens, 40_000, gptq=False, prefix=prefix, tokenizer=tok)
    assert result.recipe[0] == prefix[0] and result.prefix == prefix
    smoothed = slimlm.apply(load(), prefix, tok)
    plain = plan(lambda: smoothed, tokens, 40_000, gptq=False)
    assert result.point.choice == plain.point.choice and result.recipe[1:] == plain.recipe
    built = slimlm.apply(load(), result.recipe, tok)
    assert sum(m.storage_bytes() for m in block_linears(built).values()) == result.point.bytes
