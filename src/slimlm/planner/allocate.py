"""Choosing one treatment per layer under a size budget: the multiple-choice knapsack problem
(Sinha & Zoltners, "The multiple-choice knapsack problem", Operations Research 27(3), 1979).

Each layer i has options j with a size b_ij (bytes) and a predicted loss k_ij (its KL when only that
layer is treated; the model's loss is predicted as their sum). We want one option per layer with
Σ b ≤ budget and Σ k minimal.

`pareto_front` solves it exactly by dynamic programming over the layers, keeping only the
non-dominated partial solutions (no other uses fewer bytes with no more loss): after the last layer
the kept set is the whole size/loss Pareto front, so every budget's optimum is read off it, and
the planner gets the front it reports for free. The front is exact unless it grows past
`max_points`, when it is thinned to that many points spread over its byte range (then
`Front.exact` is False, and `lagrangian_bound` says how far any answer can be from the optimum:
for λ ≥ 0, Σ_i min_j (k_ij + λ b_ij) - λ·budget is a lower bound on the optimal loss).

Speed budgets are further sums over the layers: an option also carries its predicted seconds per
decode step (`Option.times`, one entry per speed figure: batch-1 decode, prefill, batch-N decode;
`planner.speed`). `solve` handles any mix of a size budget, time budgets and a loss budget: the
front is built over one resource (the first time budget, in integer ticks rounded up, and the
answer the least-loss front point whose true seconds fit; else bytes), and each further budget enters the loss as a
Lagrange penalty μ·cost whose μ is bisected to the smallest value that meets it. With one budget the
answer is exact; with more it is feasible, and `lagrangian_bound` style reasoning no longer gives a
certificate, so the report shows the point against the single-budget optima instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from slimlm.core.errors import SlimError


@dataclasses.dataclass(frozen=True)
class Option:
    """One treatment of one layer: its name, its stored bytes, its predicted loss."""

    name: str
    bytes: int
    loss: float
    times: tuple[float, ...] = ()  # predicted seconds per step, per speed figure (planner.speed)


@dataclasses.dataclass(frozen=True)
class Point:
    """A whole-model choice on the front: total bytes, predicted loss, the option index per layer."""

    bytes: int  # the front's resource: bytes, unless pareto_front was given another
    loss: float
    choice: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Front:
    points: tuple[Point, ...]  # increasing bytes, strictly decreasing loss
    exact: bool

    def best(self, budget: int) -> Point:
        """The least-loss point within `budget` bytes; SlimError naming the smallest size possible if none."""
        fitting = [p for p in self.points if p.bytes <= budget]
        if not fitting:
            raise SlimError(f"no choice of treatments fits in {budget:,} bytes; the smallest possible is "
                            f"{self.points[0].bytes:,} bytes (predicted loss {self.points[0].loss:.4g})")
        return fitting[-1]

    def smallest(self, max_loss: float) -> Point:
        """The smallest point whose predicted loss is at most `max_loss`; SlimError naming the least
        loss possible if none."""
        good = [p for p in self.points if p.loss <= max_loss]
        if not good:
            raise SlimError(f"no choice of treatments has a predicted loss of {max_loss:.4g} or less; the least "
                            f"possible is {self.points[-1].loss:.4g} (at {self.points[-1].bytes:,} bytes)")
        return good[0]


def pareto_front(options: Sequence[Sequence[Option]], max_points: int = 200_000,
                 resource: Callable[[Option], int] | None = None,
                 penalty: Callable[[Option], float] | None = None, cap: int | None = None) -> Front:
    """The size/loss Pareto front over one option per layer (see the module docstring). resource: an
    integer cost per option to build the front over instead of bytes; penalty: added to each
    option's loss (a Lagrange term); cap: drop partial choices costing more (costs are never
    negative, so they cannot come back under it): the front up to cap, exactly."""
    if not options or any(not layer for layer in options):
        raise SlimError("every layer needs at least one option")
    if resource is not None or penalty is not None:
        options = [[Option(o.name, o.bytes if resource is None else resource(o),
                           o.loss + (penalty(o) if penalty is not None else 0.0), o.times) for o in layer]
                   for layer in options]
    # frontier: (bytes, loss, index into the back-pointer table of the previous layer, option)
    frontier: list[tuple[int, float]] = [(0, 0.0)]
    back: list[list[tuple[int, int]]] = []  # per layer: for each kept point, (previous point, option)
    exact = True
    for layer in options:
        candidates = sorted(((b + o.bytes, l + o.loss, i, j) for i, (b, l) in enumerate(frontier)
                             for j, o in enumerate(layer) if cap is None or b + o.bytes <= cap), key=lambda t: (t[0], t[1]))
        if not candidates:
            raise SlimError(f"no choice of treatments fits in {cap:,} (the smallest possible is "
                            f"{sum(min(o.bytes for o in row) for row in options):,})")
        kept, pointers, best = [], [], math.inf
        for b, l, i, j in candidates:
            if l < best:  # not dominated by a smaller (or equal) point already kept
                kept.append((b, l))
                pointers.append((i, j))
                best = l
        if len(kept) > max_points:
            exact = False
            step = (len(kept) - 1) / (max_points - 1)
            picks = sorted({round(k * step) for k in range(max_points)})
            kept, pointers = [kept[k] for k in picks], [pointers[k] for k in picks]
        frontier = kept
        back.append(pointers)
    points = []
    for end in range(len(frontier)):
        choice, k = [], end
        for pointers in reversed(back):
            i, j = pointers[k]
            choice.append(j)
            k = i
        b, l = frontier[end]
        points.append(Point(b, l, tuple(reversed(choice))))
    return Front(tuple(points), exact)


def lagrangian_bound(options: Sequence[Sequence[Option]], budget: int, iterations: int = 60) -> float:
    """A lower bound on the least predicted loss within `budget` (the Lagrangian dual, maximised over
    λ by bisection on its subgradient)."""

    def dual(lam: float) -> tuple[float, int]:
        value, used = -lam * budget, 0
        for layer in options:
            o = min(layer, key=lambda o: o.loss + lam * o.bytes)
            value += o.loss + lam * o.bytes
            used += o.bytes
        return value, used

    lo, hi = 0.0, 1.0
    while dual(hi)[1] > budget and hi < 1e30:
        hi *= 2
    best = max(dual(lo)[0], dual(hi)[0])
    for _ in range(iterations):
        mid = (lo + hi) / 2
        value, used = dual(mid)
        best = max(best, value)
        lo, hi = (mid, hi) if used > budget else (lo, mid)
    return best


@dataclasses.dataclass(frozen=True)
class Totals:
    """A whole-model choice with its true sums: bytes, predicted loss, predicted seconds per figure."""

    bytes: int
    loss: float
    times: tuple[float, ...]
    choice: tuple[int, ...]


def totals(options: Sequence[Sequence[Option]], choice: Sequence[int]) -> Totals:
    picked = [options[i][j] for i, j in enumerate(choice)]
    width = len(picked[0].times) if picked else 0
    return Totals(sum(o.bytes for o in picked), sum(o.loss for o in picked),
                  tuple(sum(o.times[k] for o in picked) for k in range(width)), tuple(choice))


def solve(options: Sequence[Sequence[Option]], max_bytes: int | None = None, max_loss: float | None = None,
          max_times: dict[int, float] | None = None, minimize: int | None = None, ticks: int = 20_000) -> Totals:
    """One option per layer within every budget given: bytes, predicted loss, and seconds per speed
    figure k (sum of `Option.times[k]`). With a size or time budget: the least loss within them
    (and within max_loss if given too); with only max_loss: the smallest (bytes) within it.
    minimize=k instead: the fewest seconds of figure k within the budgets (to 1e-4 of it). SlimError when the budgets cannot all be met."""
    max_times = {k: v for k, v in (max_times or {}).items() if v is not None}
    if minimize is not None:
        return _fastest(options, minimize, max_bytes, max_loss, max_times, ticks)
    if max_bytes is None and max_loss is None and not max_times:
        raise SlimError("give a budget: a size, a predicted loss or a speed")
    budgets: list[tuple[str, Callable[[Option], float], float]] = []
    if max_times:
        for k, limit in max_times.items():
            budgets.append((f"time{k}", lambda o, k=k: o.times[k], limit))
    if max_bytes is not None:
        budgets.append(("bytes", lambda o: o.bytes, max_bytes))
    if not budgets:  # a loss budget alone: the smallest within it
        return totals(options, pareto_front(options).smallest(max_loss).choice)
    (first, cost, limit), rest = budgets[0], budgets[1:]
    if first == "bytes":
        resource, room = None, int(limit)
    else:
        tick = limit / ticks if limit > 0 else 1.0  # the budget's resolution, whatever the slowest option costs
        resource = lambda o: math.ceil(cost(o) / tick - 1e-9)  # noqa: E731
        room = math.floor(limit / tick + 1e-9)

    def attempt(mu: dict[str, float]) -> Totals | None:
        penalty = (lambda o: sum(mu[name] * c(o) for name, c, _ in rest)) if rest else None
        # ticks are rounded up, so up to one per layer more than the seconds: look that far, then keep
        # the least-loss point whose true seconds fit
        slack = 0 if first == "bytes" else len(options) + 1
        try:
            front = pareto_front(options, resource=resource, penalty=penalty, cap=room + slack)
        except SlimError:
            return None
        fitting = list(front.points)
        if max_loss is not None and not rest:
            fitting = [p for p in fitting if p.loss <= max_loss]
        for p in reversed(fitting):
            t = totals(options, p.choice)
            if meets(t, first, limit):
                return t
        return None

    def meets(t: Totals, name: str, limit: float) -> bool:
        return (t.bytes if name == "bytes" else t.times[int(name[4:])]) <= limit * (1 + 1e-12)

    def infeasible(why: str) -> SlimError:
        closest = {name: min(sum(min(c(o) for o in layer) for layer in options), 10**30) for name, c, _ in budgets}
        least = sum(min(o.loss for o in layer) for layer in options)
        shown = ", ".join(f"{_label(name)} {_show(name, value)}" for name, value in closest.items())
        return SlimError(f"{why}; the best each budget can reach alone: {shown}, predicted loss {least:.4g}; "
                         "loosen a budget")

    mu = {name: 0.0 for name, _, _ in rest}
    result = attempt(mu)
    if result is None:
        raise infeasible(f"no choice fits {_label(first)} {_show(first, limit)}")
    for _ in range(3):  # coordinate-wise: each secondary budget's multiplier, given the others
        for name, c, lim in rest:
            if meets(result, name, lim):
                continue
            lo, hi = mu[name], max(mu[name], 1e-12)
            while True:
                mu[name] = hi
                trial = attempt(mu)
                if trial is None or meets(trial, name, lim) or hi > 1e30:
                    break
                hi *= 4
            if trial is None or not meets(trial, name, lim):
                raise infeasible("the budgets cannot all be met together")
            best = trial
            for _ in range(40):
                mu[name] = (lo + hi) / 2
                trial = attempt(mu)
                if trial is not None and meets(trial, name, lim):
                    hi, best = mu[name], trial
                else:
                    lo = mu[name]
            mu[name], result = hi, best
    if not all(meets(result, name, lim) for name, _, lim in budgets):
        raise infeasible("the budgets cannot all be met together")
    if max_loss is not None and result.loss > max_loss:
        raise infeasible(f"no choice within the other budgets has a predicted loss of {max_loss:.4g} or less "
                         f"(the best is {result.loss:.4g})")
    return result


def _fastest(options, k: int, max_bytes, max_loss, max_times, ticks: int) -> Totals:
    """The fewest seconds of figure k within the other budgets: bisection on a time budget for k,
    each step a `solve` (whose ticks are a fraction of that budget, so the answer is as fine as the
    budget, however slow the slowest option is)."""

    def within(limit: float) -> Totals | None:
        try:
            return solve(options, max_bytes=max_bytes, max_loss=max_loss, max_times={**max_times, k: limit}, ticks=ticks)
        except SlimError:
            return None

    lo = sum(min(o.times[k] for o in layer) for layer in options)
    best = within(lo)
    if best is not None:
        return best
    hi = sum(max(o.times[k] for o in layer) for layer in options)
    best = within(hi)
    if best is None:
        raise SlimError("no choice meets the budgets")
    hi = best.times[k]
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        found = within(mid)
        if found is None:
            lo = mid
        else:
            best, hi = found, found.times[k]
    return best


def _label(name: str) -> str:
    return "size" if name == "bytes" else f"speed figure {name[4:]}"


def _show(name: str, value: float) -> str:
    return f"{value:,.0f} bytes" if name == "bytes" else f"{value * 1e3:.3f} ms/step"
