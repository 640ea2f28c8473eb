"""Checks that an attack report's derived figures follow from its measured ones.

Per seed, S is the best no-theft reference's test accuracy, A_j the best theft's at
breach unit j, leak_j = leak_value(A_j, S, acc_victim) and security = 1 - max_j leak_j. A
report holds [mean, std] over seeds: with one seed every relation is exact; with more,
the mean of a per-seed maximum lies between the largest mean and the largest
mean + std * sqrt(n - 1) (the largest value any seed can have), and the mean of a
per-seed max leak is at least the largest mean leak."""

from __future__ import annotations

import math

import pytest
from qumos.attack.report import leak_value


def _best(figs: list[list[float | None]], n: int) -> tuple[float, float]:
    """Bounds on mean_s max_i x_is from each i's [mean, std] over n seeds."""
    figs = [f for f in figs if f[0] is not None]
    assert figs, "no figure to take the best of"
    lo = max(f[0] for f in figs)
    hi = max(f[0] + (f[1] or 0.0) * math.sqrt(n - 1) for f in figs)
    return lo, hi


def assert_report_consistent(rep: dict) -> None:
    n = len(rep["seeds"])
    tol = 1e-9
    lo, hi = _best([r["acc"] for r in rep["references"].values()], n)
    assert lo - tol <= rep["S"][0] <= hi + tol, (rep["S"], rep["references"])
    by_provider = rep.get("by_provider") or {
        p["provider"]: p["by_strategy"] for p in rep["providers"]
    }
    leaks = []
    for p in rep["providers"]:
        lo, hi = _best([s["acc"] for s in by_provider[p["provider"]].values()], n)
        assert lo - tol <= p["A"][0] <= hi + tol, (p["provider"], p["A"])
        assert 0.0 <= p["leak"][0] <= 1.0
        if n == 1:
            assert p["leak"][0] == pytest.approx(
                leak_value(p["A"][0], rep["S"][0], rep["victim_acc"][0])
            ), p["provider"]
        leaks.append(p["leak"][0])
    if rep.get("security") is not None and leaks:
        if n == 1:
            assert rep["security"][0] == pytest.approx(1.0 - max(leaks))
        else:
            assert rep["security"][0] <= 1.0 - max(leaks) + tol, (rep["security"], leaks)
