"""Extraction monitor per key: PRADA (Juuti et al., "PRADA: Protecting Against DNN Model
Stealing Attacks", EuroS&P 2019).

For each of a key's queries x with predicted class c, d = the smallest L2 distance from x
to the key's growing set G_c of earlier queries of class c; d joins the key's distance
set D; x joins G_c when d > T_c, with T_c = max(T_c, mean(D_c) - std(D_c)) over the
distances that admitted members of G_c. Benign queries (natural images) give a D that
looks normally distributed; an extraction attack's synthetic queries (perturbations of
a few seeds, noise, ...) do not. Once D holds `min_queries` values, the Shapiro-Wilk
statistic W of (the last `window` values of) D is computed; W < `delta` flags the key.
Distances are taken on the raw images (pixels, as sent); a key is tested per model.

`shapiro_w` is Royston's (1995) approximation (AS R94, what scipy.stats.shapiro uses),
in numpy, so the orchestrator needs no scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

ACTIONS = ("log", "throttle", "block")


class MonitorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delta: float = Field(0.85, gt=0, lt=1, description="flag when Shapiro-Wilk W < delta")
    min_queries: int = Field(100, ge=20, le=100_000, description="distances needed first")
    window: int = Field(2000, ge=20, le=100_000, description="last distances tested")
    max_set: int = Field(5000, ge=10, le=1_000_000, description="growing-set cap per class")


def _ndtri(p: np.ndarray) -> np.ndarray:
    """Inverse standard normal CDF (Acklam's rational approximation, |err| < 1.2e-9)."""
    a = [
        -3.969683028665376e01,
        2.209460984245205e02,
        -2.759285104469687e02,
        1.383577518672690e02,
        -3.066479806614716e01,
        2.506628277459239e00,
    ]
    b = [
        -5.447609879822406e01,
        1.615858368580409e02,
        -1.556989798598866e02,
        6.680131188771972e01,
        -1.328068155288572e01,
    ]
    c = [
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e00,
        -2.549732539343734e00,
        4.374664141464968e00,
        2.938163982698783e00,
    ]
    d = [7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00]
    p = np.asarray(p, dtype=float)
    out = np.empty_like(p)
    lo, hi = p < 0.02425, p > 1 - 0.02425
    mid = ~(lo | hi)
    q = p[mid] - 0.5
    r = q * q
    out[mid] = (
        (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5])
        * q
        / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    )
    for mask, sign in ((lo, 1.0), (hi, -1.0)):
        pp = p[mask] if sign > 0 else 1 - p[mask]
        q = np.sqrt(-2 * np.log(pp))
        out[mask] = sign * (
            (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5])
            / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
        )
    return out


def shapiro_w(x) -> float:
    """The Shapiro-Wilk W statistic of a sample (n >= 6), Royston's coefficients. A
    constant sample gives 1.0 (nothing to test)."""
    x = np.sort(np.asarray(x, dtype=float))
    n = len(x)
    if n < 6:
        raise ValueError(f"shapiro_w: {n} values; at least 6")
    ss = float(((x - x.mean()) ** 2).sum())
    if ss <= 1e-300:
        return 1.0
    m = _ndtri((np.arange(1, n + 1) - 0.375) / (n + 0.25))
    mm = float(m @ m)
    u = 1 / math.sqrt(n)
    an = m[-1] / math.sqrt(mm) + u * (
        0.221157 + u * (-0.147981 + u * (-2.071190 + u * (4.434685 - 2.706056 * u)))
    )
    an1 = m[-2] / math.sqrt(mm) + u * (
        0.042981 + u * (-0.293762 + u * (-1.752461 + u * (5.682633 - 3.582633 * u)))
    )
    phi = (mm - 2 * m[-1] ** 2 - 2 * m[-2] ** 2) / (1 - 2 * an**2 - 2 * an1**2)
    a = m / math.sqrt(phi)
    a[-1], a[-2], a[0], a[1] = an, an1, -an, -an1
    return float(min(1.0, (a @ x) ** 2 / ss))


@dataclass
class _ClassSet:
    members: list = field(default_factory=list)  # arrays (d,)
    dists: list = field(default_factory=list)  # distances that admitted members
    threshold: float = 0.0


@dataclass
class PradaState:
    """One key's (and model's) monitor state."""

    sets: dict[int, _ClassSet] = field(default_factory=dict)
    distances: list = field(default_factory=list)
    queries: int = 0
    w: float | None = None
    flagged_at: int | None = None  # the query count when the key was flagged

    def observe(self, x: np.ndarray, classes: np.ndarray, cfg: MonitorConfig) -> bool:
        """Add queries x (B, d) with predicted classes (B,); True if this flags the key
        (the first time)."""
        for row, c in zip(np.asarray(x, dtype=float), np.asarray(classes)):
            self.queries += 1
            s = self.sets.setdefault(int(c), _ClassSet())
            if not s.members:
                s.members.append(row)
                continue
            d = float(np.sqrt(((np.asarray(s.members) - row) ** 2).sum(axis=1)).min())
            self.distances.append(d)
            if d > s.threshold and len(s.members) < cfg.max_set:
                s.members.append(row)
                s.dists.append(d)
                s.threshold = max(s.threshold, float(np.mean(s.dists) - np.std(s.dists)))
        if len(self.distances) > 2 * cfg.window:
            del self.distances[: -cfg.window]
        if len(self.distances) < cfg.min_queries:
            return False
        self.w = shapiro_w(self.distances[-cfg.window :])
        if self.w < cfg.delta and self.flagged_at is None:
            self.flagged_at = self.queries
            return True
        return False


class Monitor:
    """PRADA states per (key, model), in memory (a restart starts every key afresh;
    the flag itself is persisted with the key)."""

    def __init__(self, cfg: MonitorConfig | None = None):
        self.cfg = cfg or MonitorConfig()
        self.states: dict[tuple[str, str], PradaState] = {}

    def observe(self, key: str, model: str, x: np.ndarray, classes: np.ndarray) -> bool:
        st = self.states.setdefault((key, model), PradaState())
        return st.observe(x, classes, self.cfg)

    def state(self, key: str, model: str) -> PradaState | None:
        return self.states.get((key, model))


def queries_until_flagged(
    x: np.ndarray, classes: np.ndarray, cfg: MonitorConfig | None = None, batch: int = 1
) -> int | None:
    """How many of the queries x (in order, `batch` per request) one key sends before
    the monitor flags it (None: never). The benchmarks' and tests' detector."""
    cfg = cfg or MonitorConfig()
    st = PradaState()
    for i in range(0, len(x), batch):
        if st.observe(x[i : i + batch], classes[i : i + batch], cfg):
            return st.queries
    return None


__all__ = [
    "ACTIONS",
    "Monitor",
    "MonitorConfig",
    "PradaState",
    "queries_until_flagged",
    "shapiro_w",
]
