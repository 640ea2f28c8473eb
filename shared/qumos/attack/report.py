"""Typed results: per strategy, per seed, and the aggregated report (mean ± std)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from qumos.attack.config import AttackConfig


def leak_value(a: float, s: float, acc_victim: float) -> float:
    """leak = clip((A - S) / (acc_victim - S), 0, 1); when acc_victim <= S the formula is
    undefined: 1 if A >= acc_victim (the thief holds a model as good as the victim's),
    else 0."""
    den = acc_victim - s
    if den <= 1e-12:
        return 1.0 if a >= acc_victim - 1e-12 else 0.0
    return float(min(1.0, max(0.0, (a - s) / den)))


def ms(values: Sequence[float]) -> list[float]:
    """[mean, population std] of the finite values; [nan, nan] if there are none."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return [float("nan"), float("nan")]
    return [float(arr.mean()), float(arr.std())]


@dataclass
class StrategyScore:
    strategy: str
    test_acc: float
    fidelity: float  # label agreement with the victim on the test split
    own_acc: float  # accuracy on the attacker's own labelled images (its selection)
    seconds: float
    note: str = ""


@dataclass
class SeedRecord:
    """One seed: the references and each breach unit's thefts."""

    seed: int
    victim_acc: float
    references: dict[str, StrategyScore]
    S: float
    S_reference: str
    units: list[dict] = field(default_factory=list)  # provider, index, strategies, A, ...

    @property
    def security(self) -> float:
        leaks = [u["leak"] for u in self.units if math.isfinite(u["leak"])]
        return 1.0 - max(leaks) if leaks else float("nan")


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, np.generic):
        return _jsonable(o.item())
    return o


@dataclass
class ProviderFigures:
    provider: str
    index: list[int]
    A: list[float]
    leak: list[float]
    theft_ratio: list[float]
    fidelity: list[float]
    best_strategy: str  # the theft most often best over the seeds
    by_strategy: dict[str, dict]  # name -> {"acc": [m, s], "fidelity": [m, s], "note": ...}


@dataclass
class AttackReport:
    profile: str
    queries: int
    victim_acc: list[float]
    S: list[float]
    S_reference: str  # the reference most often best over the seeds
    references: dict[str, dict]
    providers: list[ProviderFigures]
    security: list[float] | None  # None for `queries` (no breach)
    seeds: list[int]
    config: dict
    seconds: float
    model: str = ""
    design: str = ""
    records: list[dict] = field(default_factory=list)  # every seed's figures

    @classmethod
    def from_records(
        cls,
        cfg: AttackConfig,
        records: list[SeedRecord],
        model: str = "",
        design: str = "",
        seconds: float = 0.0,
    ) -> AttackReport:
        refs: dict[str, dict] = {}
        for name in dict.fromkeys(n for r in records for n in r.references):
            sc = [r.references[name] for r in records if name in r.references]
            refs[name] = {
                "acc": ms([s.test_acc for s in sc]),
                "fidelity": ms([s.fidelity for s in sc]),
            }
        provs = []
        n_units = max((len(r.units) for r in records), default=0)
        for u in range(n_units):
            us = [r.units[u] for r in records if len(r.units) > u]
            names = list(dict.fromkeys(n for x in us for n in x["strategies"]))
            by = {}
            for n in names:
                sc = [x["strategies"][n] for x in us if n in x["strategies"]]
                by[n] = {
                    "acc": ms([s.test_acc for s in sc]),
                    "fidelity": ms([s.fidelity for s in sc]),
                    "note": sc[-1].note if sc else "",
                }
            for n in ("selftrain", "logspread", "insider"):  # nothing to use
                if (
                    n in _theft_names(cfg)
                    and n not in by
                    and (not cfg.strategies or n in cfg.strategies)
                ):
                    by[n] = {
                        "acc": [None, None],
                        "fidelity": [None, None],
                        "note": "nothing to use in this breach",
                    }
            winners = Counter(x["A_strategy"] for x in us if x["A_strategy"])
            provs.append(
                ProviderFigures(
                    provider=us[0]["provider"],
                    index=us[0]["index"],
                    A=ms([x["A"] for x in us]),
                    leak=ms([x["leak"] for x in us]),
                    theft_ratio=ms([x["theft_ratio"] for x in us]),
                    fidelity=ms([x["fidelity"] for x in us]),
                    best_strategy=winners.most_common(1)[0][0] if winners else "",
                    by_strategy=by,
                )
            )
        s_win = Counter(r.S_reference for r in records)
        sec = [r.security for r in records]
        return cls(
            profile=cfg.profile,
            queries=cfg.queries if cfg.profile in ("breach+queries", "queries") else 0,
            victim_acc=ms([r.victim_acc for r in records]),
            S=ms([r.S for r in records]),
            S_reference=s_win.most_common(1)[0][0] if s_win else "",
            references=refs,
            providers=provs,
            security=None if cfg.profile == "queries" else ms(sec),
            seeds=[r.seed for r in records],
            config=cfg.to_dict(),
            seconds=seconds,
            model=model,
            design=design,
            records=[_jsonable(asdict(r)) for r in records],
        )

    @property
    def worst_leak(self) -> list[float] | None:
        if self.security is None:
            return None
        return [1.0 - self.security[0], self.security[1]]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["worst_leak"] = self.worst_leak
        return _jsonable(d)

    def table(self) -> str:
        return report_table(self.to_dict())


def _theft_names(cfg: AttackConfig) -> tuple[str, ...]:
    from qumos.attack.strategies import thefts_of

    return thefts_of(cfg.profile)


def _f(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        if v[0] is None:
            return "-"
        return f"{v[0]:.3f} ± {v[1]:.3f}"
    return f"{v:.3f}"


def report_table(d: dict) -> str:
    """Markdown: the references, then one row per breach unit (the demo and CLI print it)."""
    head = (
        f"profile {d['profile']}"
        + (f" (N = {d['queries']} queries)" if d["queries"] else "")
        + f"; model {d.get('model', '')} {d.get('design', '')}; victim accuracy "
        f"{_f(d['victim_acc'])}; seeds {d['seeds']}; labelled fraction "
        f"{d['config']['fraction']}"
    )
    refs = " | ".join(f"{n} {_f(r['acc'])}" for n, r in d["references"].items())
    lines = [
        head,
        "",
        f"no-theft references: {refs}",
        f"S = {_f(d['S'])} (best: {d['S_reference']})",
    ]
    if d["providers"]:
        names = list(dict.fromkeys(n for p in d["providers"] for n in p["by_strategy"]))
        lines += [
            "",
            "| breached | " + " | ".join(names) + " | A_j | leak_j | theft ratio | fidelity |",
            "|---|" + "---|" * (len(names) + 4),
        ]
        for p in d["providers"]:
            cells = [
                _f(p["by_strategy"][n]["acc"]) if n in p["by_strategy"] else "-" for n in names
            ]
            lines.append(
                f"| {p['provider']} | "
                + " | ".join(cells)
                + f" | {_f(p['A'])} | {_f(p['leak'])} | {_f(p['theft_ratio'])} | "
                f"{_f(p['fidelity'])} |"
            )
    if d.get("security") is not None:
        lines += [
            "",
            f"security = 1 - max_j leak_j = {_f(d['security'])} "
            f"(mean ± std over {len(d['seeds'])} seeds)",
        ]
    return "\n".join(lines)


def summary_json(d: dict) -> dict:
    """The `--json` summary: profile, queries, victim_acc, S, S_reference, providers
    (provider, A, leak, theft_ratio, fidelity), security, each figure [mean, std]."""
    return {
        "profile": d["profile"],
        "queries": d["queries"],
        "victim_acc": d["victim_acc"],
        "S": d["S"],
        "S_reference": d["S_reference"],
        "providers": [
            {
                "provider": p["provider"],
                "index": p["index"],
                "A": p["A"],
                "leak": p["leak"],
                "theft_ratio": p["theft_ratio"],
                "fidelity": p["fidelity"],
                "best_strategy": p["best_strategy"],
            }
            for p in d["providers"]
        ],
        "security": d["security"],
        "seeds": d["seeds"],
        "references": d["references"],
        "model": d.get("model"),
        "design": d.get("design"),
        "seconds": d.get("seconds"),
        "config": d["config"],
        "by_provider": {p["provider"]: p["by_strategy"] for p in d["providers"]},
    }
