"""The allocation solver against brute force: the Pareto front holds every budget's optimum exactly,
budgets are respected, the Lagrangian bound never exceeds the optimum, and an impossible budget is a
clear error."""

import itertools
import random

import pytest

from slimlm.core.errors import SlimError
from slimlm.planner.allocate import Option, lagrangian_bound, pareto_front


def random_instance(rng, layers=5, options=4):
    out = []
    for _ in range(layers):
        n = rng.randint(1, options)
        out.append([Option(f"o{j}", rng.randint(1, 40) * 16, rng.random()) for j in range(n)])
    return out


def brute_force(options, budget):
    best = None
    for choice in itertools.product(*(range(len(layer)) for layer in options)):
        size = sum(options[i][j].bytes for i, j in enumerate(choice))
        loss = sum(options[i][j].loss for i, j in enumerate(choice))
        if size <= budget and (best is None or loss < best - 1e-12):
            best = loss
    return best


@pytest.mark.parametrize("seed", range(25))
def test_the_front_holds_every_budgets_optimum(seed):
    rng = random.Random(seed)
    options = random_instance(rng)
    front = pareto_front(options)
    assert front.exact
    sizes = [p.bytes for p in front.points]
    losses = [p.loss for p in front.points]
    assert sizes == sorted(sizes) and all(a > b for a, b in zip(losses, losses[1:]))
    smallest = sum(min(o.bytes for o in layer) for layer in options)
    largest = sum(max(o.bytes for o in layer) for layer in options)
    for budget in rng.sample(range(smallest, largest + 1), 8) + [smallest, largest]:
        point = front.best(budget)
        assert point.bytes <= budget  # respected exactly
        assert point.bytes == sum(options[i][j].bytes for i, j in enumerate(point.choice))
        assert point.loss == pytest.approx(sum(options[i][j].loss for i, j in enumerate(point.choice)))
        optimum = brute_force(options, budget)
        assert point.loss == pytest.approx(optimum)
        assert lagrangian_bound(options, budget) <= optimum + 1e-9


def test_an_impossible_budget_names_the_smallest_size():
    options = [[Option("int4", 100, 0.2), Option("int8", 200, 0.1)], [Option("int4", 50, 0.3)]]
    with pytest.raises(SlimError, match="smallest possible is 150 bytes"):
        pareto_front(options).best(149)


def test_a_thinned_front_says_it_is_not_exact():
    rng = random.Random(0)
    options = random_instance(rng, layers=8, options=4)
    front = pareto_front(options, max_points=5)
    assert not front.exact and len(front.points) <= 5


def test_the_smallest_point_within_a_loss():
    rng = random.Random(3)
    options = random_instance(rng)
    front = pareto_front(options)
    for target in (front.points[-1].loss, front.points[len(front.points) // 2].loss, front.points[0].loss + 1):
        point = front.smallest(target)
        assert point.loss <= target
        # nothing smaller meets it (brute force over every choice)
        for choice in itertools.product(*(range(len(layer)) for layer in options)):
            size = sum(options[i][j].bytes for i, j in enumerate(choice))
            loss = sum(options[i][j].loss for i, j in enumerate(choice))
            assert not (size < point.bytes and loss <= target + 1e-12)
    assert front.points[-1].loss > 0  # random losses in (0, 1)
    with pytest.raises(SlimError, match="least possible"):
        front.smallest(front.points[-1].loss / 2)


def timed_instance(rng, layers=5, options=4):
    return [[Option(f"o{j}", rng.randint(1, 40) * 16, rng.random(), (rng.random(), rng.random()))
             for j in range(rng.randint(1, options))] for _ in range(layers)]


def brute(options, ok):
    """The least loss (and its choice) over every choice whose totals pass ok(bytes, loss, times)."""
    best = None
    for choice in itertools.product(*(range(len(layer)) for layer in options)):
        picked = [options[i][j] for i, j in enumerate(choice)]
        b, l = sum(o.bytes for o in picked), sum(o.loss for o in picked)
        t = tuple(sum(o.times[k] for o in picked) for k in range(2))
        if ok(b, l, t) and (best is None or l < best[0] - 1e-12):
            best = (l, b, t)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_a_time_budget_is_met_and_optimal_up_to_its_ticks(seed):
    from slimlm.planner.allocate import solve

    rng = random.Random(seed)
    options = timed_instance(rng)
    fastest = sum(min(o.times[0] for o in layer) for layer in options)
    slowest = sum(max(o.times[0] for o in layer) for layer in options)
    for limit in (fastest, (fastest + slowest) / 2, slowest, fastest + 0.3 * (slowest - fastest)):
        got = solve(options, max_times={0: limit})
        assert got.times[0] <= limit * (1 + 1e-12)  # respected exactly (ticks are rounded up)
        # optimal against brute force with the budget shrunk by the rounding it may lose (layers x 1 tick)
        tick = slowest / 20_000
        tighter = brute(options, lambda b, l, t: t[0] <= limit - len(options) * tick)
        if tighter is not None:
            assert got.loss <= tighter[0] + 1e-9
        assert got.loss >= brute(options, lambda b, l, t: t[0] <= limit)[0] - 1e-9
    with pytest.raises(SlimError):
        solve(options, max_times={0: fastest * 0.99})


@pytest.mark.parametrize("seed", range(12))
def test_size_and_time_budgets_together_are_both_met(seed):
    from slimlm.planner.allocate import solve

    rng = random.Random(100 + seed)
    options = timed_instance(rng)
    mid_t = sum(sorted(o.times[0] for o in layer)[len(layer) // 2] for layer in options)
    mid_b = sum(sorted(o.bytes for o in layer)[len(layer) // 2] for layer in options)
    best = brute(options, lambda b, l, t: b <= mid_b and t[0] <= mid_t)
    if best is None:
        with pytest.raises(SlimError):
            solve(options, max_bytes=mid_b, max_times={0: mid_t})
        return
    got = solve(options, max_bytes=mid_b, max_times={0: mid_t})
    assert got.bytes <= mid_b and got.times[0] <= mid_t * (1 + 1e-12)
    assert got.loss >= best[0] - 1e-9  # and never better than possible (the two-budget answer is feasible, not certified)


@pytest.mark.parametrize("seed", range(8))
def test_the_fastest_within_a_loss(seed):
    from slimlm.planner.allocate import solve

    rng = random.Random(200 + seed)
    options = timed_instance(rng)
    target = sum(sorted(o.loss for o in layer)[len(layer) // 2] for layer in options)
    got = solve(options, max_loss=target, minimize=1)
    assert got.loss <= target
    best = min((sum(options[i][j].times[1] for i, j in enumerate(c)))
               for c in itertools.product(*(range(len(layer)) for layer in options))
               if sum(options[i][j].loss for i, j in enumerate(c)) <= target)
    assert got.times[1] <= best * (1 + 1e-4) + 1e-12


def test_a_very_slow_option_does_not_coarsen_a_tight_time_budget():
    """Regression: the ticks were once a fraction of the slowest plan's time, so with one very slow
    option (int3 without a fast kernel) a budget near the fastest plan was called infeasible."""
    from slimlm.planner.allocate import solve

    rng = random.Random(0)
    options = [[Option(f"o{j}", 1000, rng.random(), (rng.random() * 1e-3 * (50 if j == 5 else 1), 0.0))
                for j in range(6)] for _ in range(88)]
    fastest = sum(min(o.times[0] for o in layer) for layer in options)
    for factor in (1.0, 1.001, 1.05):
        got = solve(options, max_times={0: fastest * factor})
        assert got.times[0] <= fastest * factor * (1 + 1e-12)
    # and the fastest within a loss is as fine (it once used ticks of the slowest plan's time too)
    quickest = [min(layer, key=lambda o: o.times[0]) for layer in options]
    allowed = sum(o.loss for o in quickest)  # the fastest plan itself is within this loss
    got = solve(options, max_loss=allowed, minimize=0)
    assert got.loss <= allowed and got.times[0] <= fastest * (1 + 1e-4)
