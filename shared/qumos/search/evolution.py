"""Regularized evolution (Real et al., "Regularized Evolution for Image Classifier
Architecture Search", AAAI 2019): the strong non-RL baseline of the security engine.

A population of `population` designs starts uniformly random. Each cycle draws `sample`
members at random, copies the one with the highest reward, mutates one field of its
action (a fragment's block, depth, entanglement or re-uploading, or the glue, head,
hiding, or the number of fragments when open) to another allowed value, evaluates the
child, adds it and removes the OLDEST member (aging, the "regularized" part: a lucky
evaluation cannot stay in the population forever). Children the search has already seen
are re-drawn (up to 20 times), so the budget buys distinct designs.

The budget is `qumos.search.search.Budget` (distinct designs and/or minutes), as for PPO
and random search; `workers` children are evaluated per cycle.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from qumos.search.env import DesignSpace
from qumos.search.evaluator import Evaluator
from qumos.search.search import Budget, SearchResult, unique_records

REDRAWS = 20


def mutate(space: DesignSpace, action: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One field of `action` set to another of its allowed values (fields with one value
    are never picked). Fields of unused fragment slots may change the action but not the
    design; the caller re-draws children it has seen."""
    nvec = space.nvec
    free = np.flatnonzero(nvec > 1)
    child = np.array(action, dtype=np.int64, copy=True)
    i = int(rng.choice(free))
    child[i] = (child[i] + 1 + rng.integers(nvec[i] - 1)) % nvec[i]
    return child


def evolution_search(
    space: DesignSpace,
    ev: Evaluator,
    budget: Budget,
    seed: int = 0,
    population: int = 8,
    sample: int = 3,
    max_steps: int | None = None,
) -> SearchResult:
    """Regularized evolution until the budget is spent (see the module docstring)."""
    if population < 2 or not 2 <= sample <= population:
        raise ValueError(
            f"population {population}, sample {sample}: need population >= 2 "
            "and 2 <= sample <= population"
        )
    rng = np.random.default_rng(seed)
    workers = getattr(ev.executor, "workers", 1)
    max_steps = max_steps or 20 * (budget.max_evals or 1000)
    budget.start()
    log_start, start_fresh, steps = len(ev.log), ev.fresh, 0
    pop: deque[tuple[np.ndarray, float]] = deque()

    def allowed(n: int) -> int:
        rem = budget.remaining_evals(ev)
        return n if rem is None else max(0, min(n, rem))

    # initial population: uniformly random designs
    while len(pop) < population and not budget.exhausted(ev) and steps < max_steps:
        n = allowed(min(workers, population - len(pop)))
        acts = [np.array([rng.integers(k) for k in space.nvec]) for _ in range(n)]
        for a, rec in zip(acts, ev.evaluate_many([space.decode(a) for a in acts])):
            pop.append((a, rec["reward"]))
        steps += n
    # cycles: tournament, mutate, evaluate, age out the oldest
    while pop and not budget.exhausted(ev) and steps < max_steps:
        children = []
        for _ in range(allowed(workers)):
            idx = rng.choice(len(pop), size=min(sample, len(pop)), replace=False)
            parent = max((pop[i] for i in idx), key=lambda m: m[1])[0]
            for _ in range(REDRAWS):
                child = mutate(space, parent, rng)
                if space.decode(child).key() not in ev.seen:
                    break
            children.append(child)
        if not children:
            break
        for a, rec in zip(children, ev.evaluate_many([space.decode(a) for a in children])):
            pop.append((a, rec["reward"]))
            if len(pop) > population:
                pop.popleft()
        steps += len(children)
    return SearchResult(
        "evolution",
        ev.lam,
        unique_records(ev.log[log_start:]),
        ev.fresh - start_fresh,
        steps,
        budget.elapsed(),
        extra={"population": population, "sample": sample},
    )
