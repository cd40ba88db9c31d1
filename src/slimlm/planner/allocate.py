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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from slimlm.core.errors import SlimError


@dataclasses.dataclass(frozen=True)
class Option:
    """One treatment of one layer: its name, its stored bytes, its predicted loss."""

    name: str
    bytes: int
    loss: float


@dataclasses.dataclass(frozen=True)
class Point:
    """A whole-model choice on the front: total bytes, predicted loss, the option index per layer."""

    bytes: int
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


def pareto_front(options: Sequence[Sequence[Option]], max_points: int = 200_000) -> Front:
    """The size/loss Pareto front over one option per layer (see the module docstring)."""
    if not options or any(not layer for layer in options):
        raise SlimError("every layer needs at least one option")
    # frontier: (bytes, loss, index into the back-pointer table of the previous layer, option)
    frontier: list[tuple[int, float]] = [(0, 0.0)]
    back: list[list[tuple[int, int]]] = []  # per layer: for each kept point, (previous point, option)
    exact = True
    for layer in options:
        candidates = sorted(((b + o.bytes, l + o.loss, i, j) for i, (b, l) in enumerate(frontier)
                             for j, o in enumerate(layer)), key=lambda t: (t[0], t[1]))
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
