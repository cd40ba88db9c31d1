"""Checking a plan: build its recipe and measure it (`check_plan`), and what the planner prints and
reports of the result, predicted against measured (`summarize`)."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from slimlm.planner.plan import Budgets, Plan


def check_plan(load: Callable[[], nn.Module], recipe: list[dict[str, Any]], budgets: Budgets,
               held_out: Tensor | None, on_step: Callable[[str, int, int], None] | None = None,
               tokenizer=None, speed: bool = True, reference: nn.Module | None = None) -> dict[str, Any]:
    """Build `recipe` on `load()` and measure it: block linear bytes, KL / top-1 / perplexity against
    the original on held_out (T,) token ids, seconds per step of each speed figure (without `speed`:
    none). tokenizer: reads the calibration text of recipe steps that carry no windows of their own;
    reference: the original (default: another `load()`)."""
    import slimlm
    from slimlm.core.layers import is_compressed
    from slimlm.eval.perplexity import evaluate_quality
    from slimlm.planner.sensitivity import block_linears
    from slimlm.planner.speed import measured_seconds

    model = slimlm.apply(load(), recipe, tokenizer) if recipe else load()
    stored = 0
    for m in block_linears(model).values():
        bias = getattr(m, "bias", None)
        bias_bytes = bias.numel() * bias.element_size() if bias is not None else 0
        stored += (m.storage_bytes() if is_compressed(m) else sum(p.numel() * p.element_size() for p in m.parameters())) - bias_bytes
    out: dict[str, Any] = {"bytes": stored}
    if on_step:
        on_step("checking the plan", 1, 3)
    if held_out is not None and held_out.numel() > 2:
        quality = evaluate_quality(model, held_out, reference=load() if reference is None else reference)
        out.update(kl=quality.kl, top1=quality.top1, perplexity=quality.perplexity, eval_tokens=quality.tokens)
    if on_step:
        on_step("checking the plan", 2, 3)
    if speed:
        out.update(measured_seconds(model, budgets.figures() or {"decode": 1}, budgets.prompt_tokens))
    if on_step:
        on_step("checking the plan", 3, 3)
    return out


def summarize(result: Plan, budgets: Budgets) -> dict:
    """What the command prints and reports: the chosen point, its checks, whether the budgets held."""
    from slimlm.planner.allocate import lagrangian_bound

    only_size = budgets.max_bytes is not None and not budgets.figures()
    bound = lagrangian_bound(result.sensitivity.options(), budgets.max_bytes) if only_size else None
    bound = None if bound is None else bound + result.prefix_kl
    predicted = result.predicted()
    predicted_kl = result.point.loss + result.prefix_kl
    out = {"bytes": result.point.bytes, "predicted_kl": predicted_kl, "lower_bound": bound,
           "predicted": {k: _figure(k, v, budgets) for k, v in predicted.items()}, "checks": result.checks,
           "table": [], "notes": [], "met": True, "missed": ""}
    if not result.checks:
        return out
    last = result.checks[-1]
    rows = [("size (MB)", result.point.bytes / 1e6, last["bytes"] / 1e6)]
    if "kl" in last:
        rows.append(("KL (nats/token)", predicted_kl, last["kl"]))
        rows.append(("perplexity", None, last["perplexity"]))
        rows.append(("top-1 agreement", None, last["top1"]))
    for fig, seconds in predicted.items():
        rows.append((_figure_name(fig, budgets), _figure(fig, seconds, budgets), _figure(fig, last[fig], budgets)))
    out["table"] = [{"": name, "predicted": "" if p is None else f"{p:.4g}", "measured": f"{m:.4g}"} for name, p, m in rows]
    misses = []
    for fig, limit in budgets.step_limits().items():
        if last[fig] > limit * 1.0001:
            misses.append(f"{_figure_name(fig, budgets)} measured {_figure(fig, last[fig], budgets):.4g}, "
                          f"budget {_figure(fig, limit, budgets):.4g}")
    if budgets.max_bytes is not None and last["bytes"] > budgets.max_bytes:
        misses.append(f"size measured {last['bytes']:,} bytes, budget {budgets.max_bytes:,}")
    if len(result.checks) > 1:
        out["notes"].append(f"re-planned {len(result.checks) - 1} time(s): the first build missed a speed budget on "
                            "this machine, so the allocation was given that much less room")
    if misses:
        out["met"] = False
        out["missed"] = ("the built plan misses its budget on this machine after 3 tries: " + "; ".join(misses)
                         + "; loosen the budget (or rerun when the machine is less loaded)")
    return out


def _figure_name(fig: str, budgets) -> str:
    return {"decode": "decode tok/s (batch 1)", "prefill": f"time to first token (ms, {budgets.prompt_tokens} tokens)",
            "streams": f"throughput tok/s ({budgets.streams} streams)"}[fig]


def _figure(fig: str, seconds: float, budgets) -> float:
    return {"decode": 1 / seconds, "prefill": seconds * 1e3, "streams": budgets.streams / seconds}[fig]
