"""The recipe search: successive halving keeps the best 1/eta per rung and resumes from its trials;
the search's winner is a recipe that rebuilds a model within the budget."""

import json
import math

import pytest
import torch

import slimlm
from slimlm.planner.plan import Budgets
from slimlm.planner.search import Candidate, candidates, search, successive_halving
from slimlm.planner.sensitivity import block_linears
from slimlm.testing import tiny_model, tiny_tokenizer


def test_successive_halving_keeps_the_best_third_per_rung_and_resumes():
    true = {name: k for k, name in enumerate("fdbiaegch")}  # lower is better: 'f' best, 'h' worst
    calls = []

    def evaluate(name, rung):
        calls.append((name, rung))
        noise = 0.5 * (-1) ** len(calls) / (rung + 1)  # less noise with more data
        return {"score": true[name] + noise}

    done = {}
    history = successive_halving(sorted(true), evaluate, rungs=3, eta=3, key=lambda t: t["score"], done=done)
    assert [len(h) for h in history] == [9, 3, 1]
    assert set(history[1]) == {"f", "d", "b"} and history[2] == ["f"]
    assert len(calls) == 13 and set(done) == {f"{n}@{r}" for r, names in enumerate(history) for n in names}
    calls.clear()
    again = successive_halving(sorted(true), evaluate, rungs=3, eta=3, key=lambda t: t["score"], done=dict(done))
    assert again == history and calls == []  # every trial came from the saved ones
    # a candidate that cannot be built (score inf) never survives a rung with a feasible one
    history = successive_halving(["x", "y"], lambda n, r: {"s": math.inf if n == "x" else 1.0}, 2, 2, lambda t: t["s"])
    assert history == [["x", "y"], ["y"]]


def test_the_space_and_its_errors():
    space = candidates(("channels:0.25", "blocks 0.5"), 10, ("rtn", "gptq"))
    assert len(space) == 2 * (1 + 2 * 2)
    assert Candidate("channels:0.25", 10, "awq+gptq").label == "channels 0.25 + recover 10 + awq+gptq"
    steps = Candidate("heads:0.5", 5, "awq").prefix(dict(calib="demo", n_samples=4))
    assert [s["method"] for s in steps] == ["heads", "recover", "awq"] and steps[2]["quantize"] is False
    assert len(candidates(("heads:0.5",), 0, ("rtn",))) == 2  # no recovery dimension
    with pytest.raises(slimlm.SlimError, match="KIND:FRACTION"):
        candidates(("layers:0.5",), 0, ("rtn",))
    with pytest.raises(slimlm.SlimError, match="is not one of"):
        candidates((), 0, ("hqq",))


def _int4_bytes(model):
    return sum(m.weight.shape[0] * m.weight.shape[1] // 2 + m.weight.shape[0] * (m.weight.shape[1] // 32) * 3
               for m in block_linears(model).values())


def test_search_finds_a_recipe_within_the_budget_and_resumes(tmp_path, monkeypatch):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    from slimlm.core.data import load_tokens

    ids = load_tokens("demo", tok)
    load = lambda: tiny_model("llama")  # noqa: E731
    budget = _int4_bytes(load())
    tokens = ids[: 4 * 32].view(4, 32)
    held = ids[-1024:]
    space = candidates(("channels:0.5",), 20, ("rtn",))
    calibration = dict(calib="demo", n_samples=8, seq_len=32)
    state = tmp_path / "search.json"
    result = search(load, tok, ids, tokens, held, Budgets(max_bytes=budget), space, calibration, eta=2, rungs=2,
                    slice_tokens=512, state=str(state))
    assert [len(h) for h in result.history] == [3, 2] and result.objective == "kl"
    final = result.trials[f"{result.winner}@1"]
    assert final["feasible"] and final["bytes"] <= budget
    # the winner's recipe rebuilds the model it measured
    built = slimlm.apply(load(), result.plan.recipe, tok)
    assert sum(m.storage_bytes() for m in block_linears(built).values()) == final["bytes"]
    from slimlm.eval.perplexity import evaluate_quality

    assert evaluate_quality(built, held, reference=load()).kl == pytest.approx(final["kl"], rel=1e-5)
    for label in result.history[1]:  # the finalists were checked on the held-out text
        assert result.trials[f"{label}@1"]["eval_tokens"] == held.numel() - 1
    saved = json.loads(state.read_text())
    assert set(saved["trials"]) == set(result.trials)
    # resumed: no trial is made again (only the winner's plan is redone, unbuilt)
    import slimlm.planner.plan as plan_module

    calls = []
    real = plan_module.plan
    monkeypatch.setattr(plan_module, "plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = search(load, tok, ids, tokens, held, Budgets(max_bytes=budget), space, calibration, eta=2, rungs=2,
                   slice_tokens=512, state=str(state))
    assert again.winner == result.winner and again.plan.recipe == result.plan.recipe and len(calls) == 1


def test_a_kl_budget_is_charged_the_prefix_first():
    tok = tiny_tokenizer()
    from slimlm.core.data import load_tokens

    ids = load_tokens("demo", tok)
    load = lambda: tiny_model("llama")  # noqa: E731
    space = candidates(("channels:0.75",), 0, ("rtn",))
    result = search(load, tok, ids, ids[:64].view(2, 32), None, Budgets(max_kl=0.01), space,
                    dict(calib="demo", n_samples=8, seq_len=32), eta=2, rungs=2, slice_tokens=256)
    assert result.objective == "bytes" and result.winner == "no structure + rtn"
    pruned = result.trials["channels 0.75 + rtn@0"]
    assert not pruned["feasible"] and "over the budget" in pruned["note"]


def test_plan_cli_search(tiny_folder, tmp_path, capsys):
    from tests.cli_helpers import one_line_error, run

    recipe = tmp_path / "plan.yaml"
    code, out, err = run(capsys, "plan", tiny_folder("llama"), "--max-size", "40KB", "--search", "--methods", "rtn",
                         "--structures", "heads:0.5", "--recover-steps", 0, "--windows", 2, "--seq-len", 32,
                         "--n-samples", 4, "--rungs", 2, "--eta", 2, "--slice-tokens", 256, "-o", recipe,
                         "--report", tmp_path / "r.html")
    assert code == 0, err
    assert "winner:" in out and "rung 2 (held-out)" in out and recipe.is_file()
    assert "search" in (tmp_path / "r.html").read_text()
    one_line_error(*run(capsys, "plan", tiny_folder("llama"), "--max-size", "40KB", "--search", "--structures",
                        "rows:0.5", "-o", tmp_path / "x.yaml")[::2], "KIND:FRACTION")


def test_a_search_under_a_speed_floor_times_its_finalists():
    from tests.planner.test_speed_plan import hand_speed

    tok = tiny_tokenizer()
    from slimlm.core.data import load_tokens

    ids = load_tokens("demo", tok)
    load = lambda: tiny_model("llama", vocab=320, hidden=64)  # noqa: E731
    space = candidates(("heads:0.5",), 0, ("rtn",))
    result = search(load, tok, ids, ids[:64].view(2, 32), ids[-512:], Budgets(min_decode=1.0), space,
                    dict(calib="demo", n_samples=8, seq_len=32), eta=2, rungs=2, slice_tokens=256, speed=hand_speed())
    final = result.trials[f"{result.winner}@1"]
    assert final["feasible"] and 0 < final["decode"] <= 1.0  # measured on this machine, within the floor
    assert result.plan.checks and result.plan.predicted()["decode"] > 0
    # the pruned candidate's shapes were never timed: the speed model scaled the nearest timed ones
    assert "seconds" in result.trials["heads 0.5 + rtn@0"]
