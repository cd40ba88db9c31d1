"""Search over recipes: the mixed-precision allocation (`plan.plan`) run after structural choices and
with each quantization method, explored by successive halving.

A candidate is a recipe prefix plus a method:

- structure: nothing, or whole blocks / MLP channels / attention heads removed (`pruning.structured`;
  channels and heads ranked by activation, blocks by Block Influence);
- recovery: after a structure, optionally `recover` steps of distillation from the original
  (`distillation.recover`);
- method: which codes the allocation chooses between per layer: `rtn` (round-to-nearest only),
  `gptq` (RTN and GPTQ), `awq` (AWQ's activation-aware scales folded first, then RTN),
  `awq+gptq` (the scales, then RTN and GPTQ).

Each candidate's prefix is built, its per-layer sensitivity measured, the allocation solved within
the budgets (a KL budget is first charged the prefix's measured KL), and the whole recipe built from
the original model and measured against it.

Successive halving (Jamieson & Talwalkar, "Non-stochastic best arm identification and
hyperparameter optimization", arXiv 1502.07943; the inner loop of Hyperband, Li et al., arXiv
1603.06560): every candidate is evaluated cheaply (few sensitivity windows, a small slice of the
calibration text scored); the best 1/eta go on to the next rung, with eta times the windows and the
slice; at the last rung the finalists are planned on all windows, built, and checked on the
held-out text (and, with speed budgets, timed with the re-plan of `plan.plan`); the winner is the
finalist best on held-out text. So the search spends most of its time on the candidates that
matter, and the choice rests on text the search never scored.

The objective follows the budgets: with a size or speed budget, the least measured KL; with a KL
budget alone, the smallest model; for `cloud` (most throughput), the least predicted seconds per
step. A candidate whose budgets cannot be met (a prefix already over the KL budget, a structure
that removes nothing) is recorded with the reason and ranks last. Every trial is saved to a state
file as it finishes, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

from slimlm.core.errors import SlimError
from slimlm.planner.space import METHODS, parse_structure


@dataclasses.dataclass(frozen=True)
class Candidate:
    structure: str = ""  # "" or KIND:FRACTION
    recover: int = 0  # distillation steps after the structure
    method: str = "gptq"

    @property
    def label(self) -> str:
        parts = [self.structure.replace(":", " ") if self.structure else "no structure"]
        if self.recover:
            parts.append(f"recover {self.recover}")
        return " + ".join(parts + [self.method])

    def prefix(self, calibration: dict[str, Any]) -> list[dict[str, Any]]:
        """The recipe steps before the allocation's (structure, recovery, AWQ's scales)."""
        steps: list[dict[str, Any]] = []
        if self.structure:
            kind, fraction = parse_structure(self.structure)
            steps.append(dict(method=kind, sparsity=fraction, **({} if kind == "blocks" else {"importance": "activation"}),
                              **calibration))
        if self.recover:
            steps.append(dict(method="recover", steps=self.recover, **calibration))
        if self.method.startswith("awq"):
            from slimlm.planner.plan import AWQ_SCALES

            steps.append(dict(AWQ_SCALES, **calibration))
        return steps


def candidates(structures: tuple[str, ...], recover_steps: int, methods: tuple[str, ...]) -> list[Candidate]:
    """Every combination: no structure or each structure (each with and without recovery when
    recover_steps), times each method."""
    for m in methods:
        if m not in METHODS:
            raise SlimError(f"method '{m}' is not one of {', '.join(METHODS)}")
    for s in structures:
        parse_structure(s)
    out = []
    for structure in ("", *structures):
        for recover in ([0] if not structure or not recover_steps else [0, recover_steps]):
            out.extend(Candidate(structure, recover, m) for m in methods)
    return out


def successive_halving(names: list[str], evaluate: Callable[[str, int], dict], rungs: int, eta: int,
                       key: Callable[[dict], float], done: dict[str, dict] | None = None,
                       on_trial: Callable[[str, dict], None] | None = None) -> list[list[str]]:
    """Evaluate every name at rung 0, keep the best ceil(n / eta) (by `key`, lower is better, ties
    by order), evaluate those at rung 1, and so on to rung `rungs - 1`. done: trials already made
    (`"{name}@{rung}"` -> result), reused instead of evaluated (resume); on_trial(key, result) sees
    each new one. Returns the names evaluated at each rung."""
    done = {} if done is None else done
    alive, history = list(names), []
    for rung in range(rungs):
        history.append(alive)
        for name in alive:
            k = f"{name}@{rung}"
            if k not in done:
                done[k] = evaluate(name, rung)
                if on_trial:
                    on_trial(k, done[k])
        if rung == rungs - 1:
            break
        keep = max(1, math.ceil(len(alive) / eta))
        alive = sorted(alive, key=lambda n: (key(done[f"{n}@{rung}"]), alive.index(n)))[:keep]
    return history


@dataclasses.dataclass
class SearchResult:
    history: list[list[str]]  # candidates (labels) per rung
    trials: dict[str, dict]  # "label@rung" -> measured
    winner: str
    plan: Any  # the winner's Plan, its recipe the whole recipe (prefix included)
    objective: str

    def table(self) -> list[dict[str, Any]]:
        """One row per candidate: its score at each rung it reached."""
        rows = []
        for label in self.history[0]:
            row: dict[str, Any] = {"candidate": label}
            for rung in range(len(self.history)):
                trial = self.trials.get(f"{label}@{rung}")
                row[f"rung {rung}"] = None if trial is None else trial
            rows.append(row)
        return rows


    def rows(self) -> list[dict[str, str]]:
        """The table printed and reported: each candidate's figure at every rung it reached."""
        out = []
        for row in self.table():
            line = {"candidate": row["candidate"]}
            for rung in range(len(self.history)):
                trial = row[f"rung {rung}"]
                if trial is None:
                    text = ""
                elif not trial.get("feasible"):
                    text = "infeasible"
                elif self.objective == "kl":
                    text = f"KL {trial['kl']:.4f}"
                elif self.objective == "bytes":
                    text = f"{trial['bytes'] / 1e6:.4f} MB"
                else:
                    text = f"{1 / trial['seconds']:.1f} steps/s"
                line[f"rung {rung + 1}" + (" (held-out)" if rung == len(self.history) - 1 else "")] = text
            out.append(line)
        return out


def objective_of(budgets) -> str:
    if budgets.maximize:
        return "seconds"
    if budgets.max_bytes is None and not budgets.step_limits() and budgets.max_kl is not None:
        return "bytes"
    return "kl"


def score(trial: dict, objective: str) -> float:
    if not trial.get("feasible", False):
        return math.inf
    return float(trial[objective])


def search(load: Callable[[], nn.Module], tokenizer, ids: Tensor, tokens: Tensor, held_out: Tensor | None,
           budgets, space: list[Candidate], calibration: dict[str, Any], eta: int = 3, rungs: int = 3,
           slice_tokens: int = 4096, method: str = "fisher", fisher_samples: int = 4, state: str | None = None,
           on_step: Callable[[str, int, int], None] | None = None, speed=None) -> SearchResult:
    """Successive halving over `space` (see the module doc). ids: the calibration stream (T,);
    tokens (n, T): the sensitivity windows (rung r uses n / eta^(rungs-1-r) of them, at least 2);
    the calibration slice scored at rung r is slice_tokens / eta^(rungs-1-r) tokens of ids after the
    windows; held_out: what the finalists are checked on. calibration: the settings of the recipes'
    calibrated steps (calib, n_samples, seq_len), so the recipe rebuilds the model from its text."""
    from slimlm.eval.perplexity import evaluate_quality
    from slimlm.planner.check import check_plan
    from slimlm.planner.plan import plan
    from slimlm.planner.sensitivity import block_linears

    if rungs < 1 or eta < 2:
        raise SlimError(f"the search needs rungs >= 1 and eta >= 2 (got {rungs}, {eta})")
    if not space:
        raise SlimError("the search space is empty: give at least one method")
    by_label = {c.label: c for c in space}
    objective = objective_of(budgets)
    original = load()
    used = tokens.numel()
    rest = ids[used:]
    if rest.numel() < 64:
        raise SlimError(f"the calibration text has no tokens left after the {tokens.shape[0]} sensitivity windows to "
                        "score candidates on; give more text (--calib) or fewer --windows")
    figures = budgets.figures()
    if figures and speed is None:
        from slimlm.planner.plan import RTN, STEPS
        from slimlm.planner.speed import calibrate, storage_format

        shapes = {name: tuple(m.weight.shape) for name, m in block_linears(original).items()}
        formats = list(dict.fromkeys(storage_format(STEPS.get(t)) for t in ["keep"] + RTN))
        speed = calibrate(load, shapes, formats, figures, on_step=on_step)

    path = Path(state) if state else None
    fingerprint = _fingerprint(original, tokens, [c.label for c in space], budgets, calibration,
                               dict(eta=eta, rungs=rungs, slice=slice_tokens, method=method, samples=fisher_samples,
                                    held=None if held_out is None else held_out.numel()))
    done: dict[str, dict] = {}
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            saved = {}
        if saved.get("fingerprint") == fingerprint:
            done = dict(saved.get("trials", {}))
    plans: dict[str, Any] = {}
    counter = {"n": 0}
    cache: dict[str, nn.Module] = {}  # the last structure + recovery built (candidates sharing it come together)

    def prefix_model(prefix: list[dict[str, Any]]) -> nn.Module:
        import slimlm

        shared = [s for s in prefix if s["method"] != "awq"]
        key = json.dumps(shared, sort_keys=True)
        if key not in cache:
            cache.clear()
            cache[key] = slimlm.apply(load(), shared, tokenizer) if shared else original
        rest = prefix[len(shared):]
        return slimlm.apply(copy.deepcopy(cache[key]), rest, tokenizer) if rest else cache[key]

    total = sum(math.ceil(len(space) / eta**r) for r in range(rungs))

    def evaluate(label: str, rung: int) -> dict:
        candidate = by_label[label]
        last = rung == rungs - 1
        shrink = eta ** (rungs - 1 - rung)
        windows = tokens[: max(2, min(tokens.shape[0], math.ceil(tokens.shape[0] / shrink)))]
        scored = rest[: max(64, slice_tokens // shrink)]
        counter["n"] += 1
        if on_step:
            on_step(f"search rung {rung + 1}/{rungs}: {label}", counter["n"], total)
        started = time.perf_counter()
        prefix = candidate.prefix(calibration)
        # the calibrated codes of the allocation see 1/shrink of the calibration windows (at least 16)
        settings = dict(calibration)
        if "n_samples" in settings and not last:
            settings["n_samples"] = min(settings["n_samples"], max(16, math.ceil(settings["n_samples"] / shrink)))
        out: dict[str, Any] = {"rung": rung, "windows": int(windows.shape[0]), "feasible": False}
        try:
            prefixed = prefix_model(prefix)
            out["prefix_kl"] = evaluate_quality(prefixed, windows.reshape(-1), reference=original).kl if prefix else 0.0
            sub = budgets
            if budgets.max_kl is not None:
                if out["prefix_kl"] >= budgets.max_kl:
                    raise SlimError(f"the prefix alone has KL {out['prefix_kl']:.4g}, over the budget {budgets.max_kl:g}")
                sub = dataclasses.replace(budgets, max_kl=budgets.max_kl - out["prefix_kl"])
            verify = None
            if last:
                def verify(recipe):
                    return check_plan(load, prefix + recipe, budgets, scored if held_out is None else held_out,
                                      tokenizer=tokenizer)
            result = plan(lambda: copy.deepcopy(prefixed), windows, calibration=ids, gptq="gptq" in candidate.method,
                          gptq_settings=settings, budgets=sub, method=method, fisher_samples=fisher_samples,
                          verify=verify, speed=speed)
            result.prefix, result.prefix_kl = prefix, out["prefix_kl"]
            tail = result.recipe
            result.recipe = prefix + tail
            out.update(recipe=result.recipe, predicted_kl=result.point.loss + out["prefix_kl"],
                       predicted=result.predicted())
            if figures:
                out["seconds"] = result.point.times[list(result.figures).index(budgets.maximize)] \
                    if budgets.maximize else sum(result.point.times)
            if last and result.checks:
                measured = result.checks[-1]
                out.update({k: v for k, v in measured.items() if k != "predicted"}, checks=result.checks)
                out["feasible"] = not any(measured.get(f, 0) > limit * 1.0001 for f, limit in budgets.step_limits().items())
                if budgets.maximize:
                    out["seconds"] = measured[budgets.maximize]
                if not out["feasible"]:
                    out["note"] = "missed a speed budget when built"
            else:
                # below the last rung, built on the prefix already made (the same model: its steps are deterministic)
                built = check_plan(lambda: copy.deepcopy(prefixed), tail, budgets, scored, tokenizer=tokenizer,
                                   speed=False, reference=original)
                out.update({k: built[k] for k in ("bytes", "kl", "perplexity", "top1") if k in built})
                out["feasible"] = True
            if budgets.max_bytes is not None and out.get("bytes", 0) > budgets.max_bytes:
                out["feasible"], out["note"] = False, f"built {out['bytes']:,} bytes, over the budget"
            if last:
                plans[label] = result
        except SlimError as e:
            out["note"] = str(e)
        out["seconds_taken"] = round(time.perf_counter() - started, 2)
        return out

    def save(key: str, trial: dict) -> None:
        if path is None:
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "trials": done}, indent=1, default=float))
        os.replace(tmp, path)

    history = successive_halving(list(by_label), evaluate, rungs, eta, lambda t: score(t, objective), done, save)
    finalists = history[-1]
    ranked = sorted(finalists, key=lambda n: (score(done[f"{n}@{rungs - 1}"], objective), finalists.index(n)))
    winner = ranked[0]
    final = done[f"{winner}@{rungs - 1}"]
    if not final.get("feasible"):
        notes = "; ".join(f"{n}: {done[f'{n}@{rungs - 1}'].get('note', 'infeasible')}" for n in finalists)
        raise SlimError(f"no candidate of the search meets the budgets ({notes}); loosen a budget")
    if winner not in plans:  # resumed past the last rung: plan the winner again (deterministic), unbuilt
        plans[winner] = _replan(by_label[winner], load, tokenizer, ids, tokens, budgets, calibration, method,
                                fisher_samples, speed, final)
    return SearchResult(history, done, winner, plans[winner], objective)


def _replan(candidate: Candidate, load, tokenizer, ids, tokens, budgets, calibration, method, fisher_samples, speed,
            final: dict):
    """The last rung's plan of `candidate` again (deterministic), unbuilt: its recorded checks attached."""
    from slimlm.planner.plan import plan

    prefix_kl = final.get("prefix_kl", 0.0)
    sub = budgets if budgets.max_kl is None else dataclasses.replace(budgets, max_kl=budgets.max_kl - prefix_kl)
    result = plan(load, tokens, calibration=ids, gptq="gptq" in candidate.method, gptq_settings=calibration,
                  budgets=sub, method=method, fisher_samples=fisher_samples, speed=speed,
                  prefix=candidate.prefix(calibration), tokenizer=tokenizer)
    result.prefix_kl, result.recipe, result.checks = prefix_kl, final["recipe"], final.get("checks", [])
    return result


def _fingerprint(model: nn.Module, tokens: Tensor, labels: list[str], budgets, calibration: dict, settings: dict) -> str:
    from slimlm.planner.sensitivity import _fingerprint as weights_and_tokens, block_linears

    h = hashlib.sha256(weights_and_tokens(block_linears(model), tokens, []).encode())
    h.update(json.dumps([labels, dataclasses.asdict(budgets), calibration, settings], sort_keys=True, default=str).encode())
    return h.hexdigest()
