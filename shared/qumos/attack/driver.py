"""The one attack driver: every figure (CLI, attacker service, demo, security engine).

    run_attack(cfg, data, victim, holdings, seeds) -> AttackReport

For each seed the attacker draws its labelled images (`attacker_data`); under a query
profile it sends its own `cfg.queries` images through the public API (`victim.oracle`);
then, for each breach unit (each provider in turn for `breach` and `breach+queries`, the
coalition as one unit, no unit for `queries`), every strategy of the profile runs and is
scored on the test split. The references (S) do not depend on the breach and run once per
seed. Metrics (per seed, then mean and population std over seeds):

    A_j      best test accuracy over the profile's thefts for breach unit j
    S        best test accuracy over the profile's references (`S_reference` names it)
    leak_j   clip((A_j - S) / (acc_victim - S), 0, 1)   (1 if acc_victim <= S <= A_j)
    security 1 - max_j leak_j
    theft ratio A_j / acc_victim, fidelity = label agreement of that theft with the victim
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from qumos.attack.config import QUERY_PROFILES, AttackConfig
from qumos.attack.context import Context, QueryRows, strip
from qumos.attack.holdings import Holdings, attacker_data, check_log_model
from qumos.attack.report import AttackReport, SeedRecord, StrategyScore, leak_value
from qumos.attack.strategies import FUNCS, references_of, thefts_of
from qumos.attack.training import Progress, Trained, as_soft, predict_proba
from qumos.datasets import TaskData
from qumos.errors import AttackError
from qumos.spec import ModelSpec


class Oracle:
    """The public API as the attacker meets it, and the insider's view of its queries.

    `answer(raw)` -> the victim's answers (N, C) probabilities or (N,) labels;
    `rows(j, raw, features)` -> QueryRows: provider j's rows for those queries (after
    they were answered)."""

    def answer(self, raw: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def rows(self, j: int, raw: np.ndarray, features: np.ndarray) -> QueryRows:
        raise NotImplementedError  # pragma: no cover - interface


class InProcessOracle(Oracle):
    """The victim in process: answers under an output policy (`qumos.defense.policy`, the
    orchestrator's own function); exact provider rows. policy "probabilities" (rounded to
    `decimals` if given), "top_k" (with `k`), "label", or an OutputPolicy."""

    def __init__(self, victim: ModelSpec, policy="probabilities",
                 decimals: int | None = None, k: int | None = None):
        from pydantic import ValidationError
        from qumos.defense.policy import OutputPolicy
        from qumos.model import DistributedQNN

        if isinstance(policy, OutputPolicy):
            self.output_policy = policy
        else:
            if policy not in ("probabilities", "top_k", "label"):
                raise AttackError(f"policy: {policy!r}; allowed: probabilities, top_k, label")
            try:
                self.output_policy = OutputPolicy(kind=policy, k=k, decimals=decimals)
            except ValidationError as e:
                raise AttackError(f"policy: {e.errors()[0]['msg']}") from None
        self.victim, self.policy = victim, self.output_policy.kind
        self.decimals = self.output_policy.decimals
        self.net = DistributedQNN(victim)

    def answer(self, raw: np.ndarray) -> np.ndarray:
        from qumos.chain import preprocess
        from qumos.defense.policy import apply_policy

        p = predict_proba(self.net, preprocess(np.asarray(raw), self.victim.preprocess))
        return apply_policy(p, self.output_policy)

    def rows(self, j: int, raw: np.ndarray, features: np.ndarray) -> QueryRows:
        from qumos.attack.insider import provider_rows_in_process

        return provider_rows_in_process(self.victim, j, features)


@dataclass
class Victim:
    """The harness's knowledge of the victim (what scores a theft) and what the attacker
    may use of it: `arch` (Kerckhoffs; None = guess), the public API (`oracle`)."""

    model: str
    providers: list[str]  # placement: fragment k runs on providers[k]
    acc: float  # test accuracy (harness)
    test_labels: np.ndarray  # the victim's labels on the test split (fidelity; harness)
    arch: ModelSpec | None = None
    oracle: Oracle | None = None

    @classmethod
    def in_process(cls, spec: ModelSpec, data: TaskData, know_architecture: bool = True,
                   policy: str = "probabilities", decimals: int | None = None) -> Victim:
        oracle = InProcessOracle(spec, policy, decimals)
        labels = predict_proba(oracle.net, data.test.x).argmax(1)
        return cls(model=spec.name, providers=list(spec.placement),
                   acc=float((labels == data.test.y).mean()), test_labels=labels,
                   arch=strip(spec) if know_architecture else None, oracle=oracle)


def in_process_holdings(spec: ModelSpec, data: TaskData, cfg: AttackConfig,
                        seed: int) -> list[Holdings]:
    """Every provider's holdings had the victim served `cfg.traffic` users' images (the
    back of the attacker's unlabelled pool for `seed`, disjoint from its queries)."""
    from qumos.attack.holdings import holdings_in_process

    own = attacker_data(data, cfg.fraction, seed)
    q = cfg.queries if cfg.profile in QUERY_PROFILES else 0
    traffic = data.train.x[own.traffic(cfg.traffic, q)]
    return [holdings_in_process(spec, j, traffic) for j in range(spec.n_fragments)]


def breach_units(cfg: AttackConfig, holdings: Sequence[Holdings]) -> list[list[Holdings]]:
    if cfg.profile == "queries":
        return [[]]
    if cfg.profile == "coalition":
        by = {h.provider: h for h in holdings}
        missing = [p for p in cfg.coalition if p not in by]
        if missing:
            raise AttackError(f"coalition: no holdings of {missing}; breached: {sorted(by)}")
        return [[by[p] for p in cfg.coalition]]
    if not holdings:
        raise AttackError(f"profile {cfg.profile}: needs a breached provider's holdings")
    return [[h] for h in holdings]


def _score(name: str, fitted, data: TaskData, victim: Victim, seconds: float) -> StrategyScore:
    if isinstance(fitted, Trained):
        pred = predict_proba(fitted.model, data.test.x).argmax(1)
    else:
        pred = fitted.predict(data.test.x, data.test.raw)
    known = np.asarray(victim.test_labels) >= 0  # -1: the harness does not know the answer
    fid = float((pred[known] == victim.test_labels[known]).mean()) if known.any() else np.nan
    return StrategyScore(strategy=name, test_acc=float((pred == data.test.y).mean()),
                         fidelity=fid,
                         own_acc=float(fitted.own_acc), seconds=seconds,
                         note=getattr(fitted, "note", "") or "")


def attack_seed(cfg: AttackConfig, data: TaskData, victim: Victim,
                units: list[list[Holdings]], seed: int,
                progress: Progress | None = None) -> SeedRecord:
    """One seed: the references once, then every theft against every breach unit."""
    torch.set_num_threads(1)
    own = attacker_data(data, cfg.fraction, seed)
    base = Context(data=data, arch=victim.arch, cfg=cfg, seed=seed, own=own,
                   progress=progress)
    qidx = None
    if cfg.profile in QUERY_PROFILES:
        if victim.oracle is None:
            raise AttackError(f"profile {cfg.profile}: needs the victim's public API (an "
                              "orchestrator URL or an artifact)")
        qidx = own.queries(data, cfg.queries)
        base.qraw, base.qx = data.train.raw[qidx], data.train.x[qidx]
        base.qt = as_soft(victim.oracle.answer(base.qraw), len(data.classes))
    wanted = set(cfg.strategies) if cfg.strategies else None
    refs = [s for s in references_of(cfg.profile) if wanted is None or s in wanted]
    thefts = [s for s in thefts_of(cfg.profile) if wanted is None or s in wanted]
    if not refs:
        refs = ["scratch"]  # S needs at least one reference

    def run(name: str, ctx: Context) -> StrategyScore | None:
        t0 = time.perf_counter()
        if progress:
            progress({**ctx.info(name), "phase": "start"})
        fitted = FUNCS[name](ctx)
        if fitted is None:
            return None
        if isinstance(fitted, Trained):
            ctx.teachers[name] = fitted
        return _score(name, fitted, data, victim, time.perf_counter() - t0)

    ref_scores = {}
    for name in refs:
        sc = run(name, base)
        if sc is not None:
            ref_scores[name] = sc
    s_name = max(ref_scores, key=lambda k: ref_scores[k].test_acc)
    s_acc = ref_scores[s_name].test_acc
    rec = SeedRecord(seed=seed, victim_acc=victim.acc, references=ref_scores, S=s_acc,
                     S_reference=s_name)
    for unit in units:
        if not unit:
            continue
        stolen = [h.fragment(victim.model) for h in unit]
        for h in unit:
            check_log_model(h, victim.model)
        ctx = Context(data=data, arch=victim.arch, cfg=cfg, seed=seed, own=own,
                      stolen=stolen, logs={f.index: h.rows(f) for f, h in zip(stolen, unit)},
                      qx=base.qx, qraw=base.qraw, qt=base.qt, progress=progress,
                      provider="+".join(h.provider for h in unit))
        if qidx is not None and "insider" in thefts:
            for f in stolen:
                ctx.qrows[f.index] = victim.oracle.rows(f.index, base.qraw, base.qx)
        scores = {}
        for name in thefts:
            sc = run(name, ctx)
            if sc is not None:
                scores[name] = sc
        best = max(scores.values(), key=lambda s: s.test_acc) if scores else None
        a = best.test_acc if best else float("nan")
        rec.units.append({
            "provider": ctx.provider, "index": [f.index for f in stolen],
            "strategies": scores, "A": a, "A_strategy": best.strategy if best else "",
            "leak": leak_value(a, s_acc, victim.acc) if best else float("nan"),
            "theft_ratio": a / victim.acc if best and victim.acc > 0 else float("nan"),
            "fidelity": best.fidelity if best else float("nan"),
            "log_rows": {f.index: len(ctx.logs[f.index]) for f in stolen},
        })
    return rec


def run_attack(cfg: AttackConfig, data: TaskData, victim: Victim, holdings: Sequence[Holdings],
               seeds: Sequence[int], progress: Progress | None = None,
               holdings_for_seed: Callable[[int], Sequence[Holdings]] | None = None
               ) -> AttackReport:
    """Run the profile `cfg` for every seed and aggregate (module docstring).

    `holdings`: the breached providers' holdings (one per provider; `breach` and
    `breach+queries` attack each in turn, `coalition` takes those named). With
    `holdings_for_seed` the holdings are made per seed instead (in-process evaluations,
    whose simulated traffic depends on the seed)."""
    t0 = time.perf_counter()
    cfg.validate(len(victim.providers), victim.providers)
    if not seeds:
        raise AttackError("seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise AttackError(f"seeds: {list(seeds)} repeats a seed")
    if cfg.profile in QUERY_PROFILES and victim.oracle is None:
        raise AttackError(f"profile: {cfg.profile} needs the victim's public API; give an "
                          "orchestrator URL or an artifact")
    if cfg.profile in QUERY_PROFILES:
        own = attacker_data(data, cfg.fraction, seeds[0])
        own.queries(data, cfg.queries)  # N larger than the pool: an error before any work
    records = []
    total = len(seeds)
    for i, s in enumerate(seeds):
        hs = holdings_for_seed(s) if holdings_for_seed else holdings
        units = breach_units(cfg, hs)

        def prog(info: dict, _i=i) -> None:
            if progress:
                progress({**info, "done": _i, "total": total})
        records.append(attack_seed(cfg, data, victim, units, s, prog if progress else None))
        if progress:
            progress({"done": i + 1, "total": total, "seed": s, "phase": "seed done"})
    return AttackReport.from_records(cfg, records, model=victim.model,
                                     seconds=time.perf_counter() - t0)


def evaluate_in_process(spec: ModelSpec, data: TaskData, cfg: AttackConfig,
                        seeds: Sequence[int], progress: Progress | None = None,
                        policy: str = "probabilities") -> AttackReport:
    """The library/evaluator path: the victim in process, every provider's holdings
    computed for simulated users' traffic (see `in_process_holdings`)."""
    from qumos.spec import design_of

    if not spec.is_trained():
        raise AttackError("victim: the model is not trained")
    victim = Victim.in_process(spec, data, cfg.know_architecture, policy)
    rep = run_attack(cfg, data, victim, [], seeds, progress,
                     holdings_for_seed=lambda s: in_process_holdings(spec, data, cfg, s))
    rep.design = design_of(spec).short()
    return rep


__all__ = ["InProcessOracle", "Oracle", "Victim", "attack_seed", "breach_units",
           "evaluate_in_process", "in_process_holdings", "run_attack"]
