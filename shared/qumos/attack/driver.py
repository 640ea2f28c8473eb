"""The one attack driver: every figure (CLI, attacker service, demo, security engine).

    run_attack(cfg, data, victim, holdings, seeds) -> AttackReport

For each seed the attacker draws its labelled images (`attacker_data`); under a query
profile it sends its own `cfg.queries` images through the public API (`victim.oracle`);
then, for each breach unit (each provider in turn for `breach` and `breach+queries`, the
coalition as one unit or every coalition of up to `coalition_size` providers in turn, no unit
for `queries`), every strategy of the profile runs and is scored on the test split. The references (S) do not depend on the breach and run once per
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
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import torch
from qumos.attack.config import QUERY_PROFILES, AttackConfig
from qumos.attack.context import Context, QueryRows, strip
from qumos.attack.holdings import Holdings, attacker_data, check_log_model
from qumos.attack.report import AttackReport, SeedRecord, StrategyScore, leak_value
from qumos.attack.strategies import FUNCS, references_of, thefts_of
from qumos.attack.training import Job, Progress, Trained, as_soft, predict_proba, run_jobs
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

    def __init__(
        self,
        victim: ModelSpec,
        policy="probabilities",
        decimals: int | None = None,
        k: int | None = None,
    ):
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
    def in_process(
        cls,
        spec: ModelSpec,
        data: TaskData,
        know_architecture: bool = True,
        policy: str = "probabilities",
        decimals: int | None = None,
    ) -> Victim:
        oracle = InProcessOracle(spec, policy, decimals)
        labels = predict_proba(oracle.net, data.test.x).argmax(1)
        return cls(
            model=spec.name,
            providers=list(spec.placement),
            acc=float((labels == data.test.y).mean()),
            test_labels=labels,
            arch=strip(spec) if know_architecture else None,
            oracle=oracle,
        )


def in_process_holdings(
    spec: ModelSpec, data: TaskData, cfg: AttackConfig, seed: int
) -> list[Holdings]:
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
    if cfg.profile == "coalition" and cfg.coalition_size:
        # up to m: a coalition can always ignore a member, so its worst case includes
        # every smaller coalition (the single breaches too); a design of at most m
        # providers is held whole
        return [
            list(unit)
            for m in range(1, min(cfg.coalition_size, len(holdings)) + 1)
            for unit in combinations(holdings, m)
        ]
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
    return StrategyScore(
        strategy=name,
        test_acc=float((pred == data.test.y).mean()),
        fidelity=fid,
        own_acc=float(fitted.own_acc),
        seconds=seconds,
        note=getattr(fitted, "note", "") or "",
    )


@dataclass
class Case:
    """One seed's attack: the task data, the victim (per seed in the security engine, where
    each seed trains its own victim) and the breached holdings."""

    seed: int
    data: TaskData
    victim: Victim
    holdings: Sequence[Holdings]


@dataclass
class _Run:
    """One (case, breach unit) context and its scores; unit None: the references."""

    case: Case
    ctx: Context
    unit: list[Holdings] | None
    scores: dict = field(default_factory=dict)


def _case_contexts(
    cfg: AttackConfig, case: Case, thefts: list[str], progress: Progress | None
) -> list[_Run]:
    data, victim, seed = case.data, case.victim, case.seed
    own = attacker_data(data, cfg.fraction, seed)
    base = Context(data=data, arch=victim.arch, cfg=cfg, seed=seed, own=own, progress=progress)
    if cfg.profile in QUERY_PROFILES:
        if victim.oracle is None:
            raise AttackError(
                f"profile {cfg.profile}: needs the victim's public API (an "
                "orchestrator URL or an artifact)"
            )
        qidx = own.queries(data, cfg.queries)
        base.qraw, base.qx = data.train.raw[qidx], data.train.x[qidx]
        base.qt = as_soft(victim.oracle.answer(base.qraw), len(data.classes))
    runs = [_Run(case, base, None)]
    for unit in breach_units(cfg, case.holdings):
        if not unit:
            continue
        stolen = [h.fragment(victim.model) for h in unit]
        for h in unit:
            check_log_model(h, victim.model)
        ctx = Context(
            data=data,
            arch=victim.arch,
            cfg=cfg,
            seed=seed,
            own=own,
            stolen=stolen,
            logs={f.index: h.rows(f) for f, h in zip(stolen, unit)},
            qx=base.qx,
            qraw=base.qraw,
            qt=base.qt,
            progress=progress,
            provider="+".join(h.provider for h in unit),
        )
        if base.qx is not None and "insider" in thefts:
            assert victim.oracle is not None and base.qraw is not None
            for f in stolen:
                ctx.qrows[f.index] = victim.oracle.rows(f.index, base.qraw, base.qx)
        runs.append(_Run(case, ctx, unit))
    return runs


def _run_phase(
    names: list[str], runs: list[_Run], cfg: AttackConfig, progress: Progress | None
) -> None:
    """Every strategy of `names` for every run, in lockstep: the trainable ones' jobs
    all go to one `run_jobs` call (models of one architecture train together)."""
    jobs: list[tuple[_Run, str, Job, float]] = []
    for name in names:
        for run in runs:
            t0 = time.perf_counter()
            out = FUNCS[name](run.ctx)
            if out is None:
                continue
            if isinstance(out, Job):
                jobs.append((run, name, out, time.perf_counter() - t0))
            else:
                _record(run, name, out, time.perf_counter() - t0)
    if not jobs:
        return
    t0 = time.perf_counter()
    trained = run_jobs([j for _, _, j, _ in jobs], cfg, progress)
    share = (time.perf_counter() - t0) / len(jobs)  # batched: the time is shared
    for (run, name, _, prep), tr in zip(jobs, trained):
        _record(run, name, tr, prep + share)


def _record(run: _Run, name: str, fitted, seconds: float) -> None:
    if isinstance(fitted, Trained):
        run.ctx.teachers[name] = fitted
    run.scores[name] = _score(name, fitted, run.case.data, run.case.victim, seconds)


def attack_cases(
    cfg: AttackConfig, cases: Sequence[Case], progress: Progress | None = None
) -> list[SeedRecord]:
    """Every case (seed): the references, then every theft against every breach unit,
    the strategies run in lockstep over all cases and units so that their trainings
    batch (`qumos.attack.training.run_jobs`)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(1):  # numpy's BLAS threads fight the other jobs (10x on sklearn)
        return _attack_cases(cfg, cases, progress)


def _attack_cases(
    cfg: AttackConfig, cases: Sequence[Case], progress: Progress | None = None
) -> list[SeedRecord]:
    from qumos.attack.logbased import ROUNDS

    wanted = set(cfg.strategies) if cfg.strategies else None
    refs = [s for s in references_of(cfg.profile) if wanted is None or s in wanted]
    thefts = [s for s in thefts_of(cfg.profile) if wanted is None or s in wanted]
    if not refs:
        refs = ["scratch"]  # S needs at least one reference
    runs = [r for c in cases for r in _case_contexts(cfg, c, thefts, progress)]
    bases = [r for r in runs if r.unit is None]
    units = [r for r in runs if r.unit is not None]
    _run_phase(refs, bases, cfg, progress)
    _run_phase([t for t in thefts if t != "selftrain"], units, cfg, progress)
    if "selftrain" in thefts:
        for _ in range(ROUNDS):
            _run_phase(["selftrain"], units, cfg, progress)
    records = []
    for case in cases:
        base = next(r for r in bases if r.case is case)
        ref_scores = base.scores
        s_name = max(ref_scores, key=lambda k: ref_scores[k].test_acc)
        s_acc = ref_scores[s_name].test_acc
        victim = case.victim
        rec = SeedRecord(
            seed=case.seed,
            victim_acc=victim.acc,
            references=ref_scores,
            S=s_acc,
            S_reference=s_name,
        )
        for run in (r for r in units if r.case is case):
            scores = run.scores
            best = max(scores.values(), key=lambda s: s.test_acc) if scores else None
            a = best.test_acc if best else float("nan")
            stolen = run.ctx.stolen
            rec.units.append(
                {
                    "provider": run.ctx.provider,
                    "index": [f.index for f in stolen],
                    "strategies": scores,
                    "A": a,
                    "A_strategy": best.strategy if best else "",
                    "leak": leak_value(a, s_acc, victim.acc) if best else float("nan"),
                    "theft_ratio": a / victim.acc if best and victim.acc > 0 else float("nan"),
                    "fidelity": best.fidelity if best else float("nan"),
                    "log_rows": {f.index: len(run.ctx.logs[f.index]) for f in stolen},
                }
            )
        records.append(rec)
    return records


def _check(cfg: AttackConfig, cases: Sequence[Case]) -> None:
    if not cases:
        raise AttackError("seeds: give at least one seed")
    seeds = [c.seed for c in cases]
    if len(set(seeds)) != len(seeds):
        raise AttackError(f"seeds: {seeds} repeats a seed")
    for c in cases:
        cfg.validate(len(c.victim.providers), c.victim.providers)
        if cfg.profile in QUERY_PROFILES:
            if c.victim.oracle is None:
                raise AttackError(
                    f"profile: {cfg.profile} needs the victim's public API; "
                    "give an orchestrator URL or an artifact"
                )
            attacker_data(c.data, cfg.fraction, c.seed).queries(c.data, cfg.queries)


def run_attack(
    cfg: AttackConfig,
    data: TaskData,
    victim: Victim,
    holdings: Sequence[Holdings],
    seeds: Sequence[int],
    progress: Progress | None = None,
    holdings_for_seed: Callable[[int], Sequence[Holdings]] | None = None,
) -> AttackReport:
    """Run the profile `cfg` for every seed against one victim and aggregate (module
    docstring).

    `holdings`: the breached providers' holdings (one per provider; `breach` and
    `breach+queries` attack each in turn, `coalition` takes those named). With
    `holdings_for_seed` the holdings are made per seed instead (in-process evaluations,
    whose simulated traffic depends on the seed). Bad input fails before any training."""
    t0 = time.perf_counter()
    cfg.validate(len(victim.providers), victim.providers)
    if not seeds:
        raise AttackError("seeds: give at least one seed")
    cases = [
        Case(s, data, victim, holdings_for_seed(s) if holdings_for_seed else holdings)
        for s in seeds
    ]
    _check(cfg, cases)
    records = attack_cases(cfg, cases, progress)
    return AttackReport.from_records(
        cfg, records, model=victim.model, seconds=time.perf_counter() - t0
    )


def evaluate_in_process(
    spec: ModelSpec,
    data: TaskData,
    cfg: AttackConfig,
    seeds: Sequence[int],
    progress: Progress | None = None,
    policy: str = "probabilities",
) -> AttackReport:
    """The library path: the victim in process, every provider's holdings computed for
    simulated users' traffic (see `in_process_holdings`)."""
    return evaluate_victims([(s, spec, data) for s in seeds], cfg, progress, policy)


def evaluate_victims(
    cases: Sequence[tuple[int, ModelSpec, TaskData]],
    cfg: AttackConfig,
    progress: Progress | None = None,
    policy: str = "probabilities",
) -> AttackReport:
    """In process, one victim per seed (the security engine trains a victim per seed):
    `cases` = [(seed, trained spec, its task data)]. All seeds' trainings batch."""
    from qumos.spec import design_of

    t0 = time.perf_counter()
    built = []
    for s, spec, data in cases:
        if not spec.is_trained():
            raise AttackError("victim: the model is not trained")
        victim = Victim.in_process(spec, data, cfg.know_architecture, policy)
        built.append(Case(s, data, victim, in_process_holdings(spec, data, cfg, s)))
    _check(cfg, built)
    records = attack_cases(cfg, built, progress)
    spec0 = cases[0][1]
    return AttackReport.from_records(
        cfg,
        records,
        model=spec0.name,
        design=design_of(spec0).short(),
        seconds=time.perf_counter() - t0,
    )


__all__ = [
    "Case",
    "InProcessOracle",
    "Oracle",
    "Victim",
    "attack_cases",
    "breach_units",
    "evaluate_in_process",
    "evaluate_victims",
    "in_process_holdings",
    "run_attack",
]
