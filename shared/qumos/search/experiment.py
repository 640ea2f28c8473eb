"""The paper's experiment, honestly: every method, several search seeds, held-out figures.

Per task (DATASET-TASK) and attacker budget (the attacker's labelled fraction), with one
evaluation config for every design of every method:

1. centralized search: PPO over one-fragment designs with the fixed readout head
   (`DesignSpace.centralized`: nothing is company-held) with lambda 0 (victim accuracy
   only, no attacks while searching), once per search seed; the accuracy ceiling, and a
   breach of its only provider is a full theft. Shared by every attacker budget.
   The same accuracy-only search is also run over the K-fragment space itself
   (`random`, lambda 0, no attacks while searching): the most accurate model of the
   searched architectures, deployed all on one provider (`all_in_one`: a breach of that
   provider is a full theft). One-fragment designs have no glue, so no re-uploading, and
   can be less accurate than the distributed ones; the more accurate of the two
   centralized rows is the accuracy the value gap and the engine's targets compare with.
2. even split: each one-fragment centralized winner cut into K fragments (`even_split`).
3. the searches over K-fragment designs, each method once per search seed, every one on
   the same budget of distinct designs: `random` (uniform), `evolution` (regularized
   evolution), `ppo` (the engine: PPO on the one-step environment), `ppo-seq` (PPO on the
   sequential environment), `ppo-warm` (PPO started from the policy the `ppo` search of
   the same seed left in another task's output, `warm_start`). Every PPO search saves its
   policy in `<out>/<task>/policies/`. Their final design is the best by in-search reward.
4. held-out evaluation: every final design (and the centralized winner, its even split
   and the median-reward design of each random search) is re-evaluated on evaluation
   seeds the searches never used (`heldout_seeds`, disjoint from the search's seeds,
   asserted). The tables report these figures as mean ± std over search seeds, next to
   the in-search reward.
5. the value gap: acc_centralized - S on the held-out seeds (acc_centralized: the more
   accurate centralized row; S: the best no-theft
   reference of the profile). Where it is small, every design looks secure and the
   comparison says little; the report says which settings carry it (gap >= 0.15).
   `gap_fractions` are attacker budgets measured for the gap only (the centralized and
   even-split rows, no searches).

Everything resumes: evaluations are cached per (design, evaluation config) in
`<out>/<task>/cache.jsonl`; every finished search is recorded in `searches.jsonl` (its
designs' keys), so a rerun skips it; an unfinished search is replayed from the cache
(each method is deterministic given its seed and the rewards) and continues. Split a long
experiment into runs by task and attacker budget; `qumos.search.report.write_report`
gathers every `result.json` under the output directory (the tables, the target checks).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qumos.errors import QumosError
from qumos.search.env import DesignSpace
from qumos.search.evaluator import EvalCache, EvalConfig, Evaluator, reward
from qumos.search.report import (
    ALL_IN_ONE,
    CENTRALIZED_K1,
    MEDIAN_RANDOM,
    all_in_one,
    mean_std,
    median_in_search,
    method_label,
    middle_label,
    table_row,
    target_checks,
)
from qumos.search.search import Budget, SearchResult, pareto_plot, ppo_search, random_search
from qumos.spec import Design, FragmentDesign, validate_design

TASKS_DEFAULT = ("digits-2", "digits-4", "mnist-small-2", "mnist-small-4")
METHODS = ("random", "evolution", "ppo", "ppo-seq", "ppo-warm")


def parse_task(name: str) -> tuple[str, int]:
    ds, _, t = name.rpartition("-")
    if not ds or t not in ("2", "4"):
        raise QumosError(f"--tasks: {name!r} is not DATASET-TASK such as digits-4 (task 2 or 4)")
    return ds, int(t)


def even_split(design: Design, k: int) -> Design:
    """The one-fragment `design` cut into k fragments with depths summing to its depth
    (depth 6, k 3 -> 2-2-2; 5 -> 2-2-1; every fragment at least 1), the same block,
    entanglement and head, tanh glue, no re-uploading."""
    if len(design.fragments) != 1:
        raise QumosError(f"even_split: expected a one-fragment design, got {design.short()}")
    f = design.fragments[0]
    depths = [f.depth // k + (1 if i < f.depth % k else 0) for i in range(k)]
    depths = [max(1, d) for d in depths]
    frags = [
        FragmentDesign(
            n_qubits=f.n_qubits, block=f.block, depth=d, entanglement=f.entanglement
        ).model_dump()
        for d in depths
    ]
    return validate_design(
        {
            "dataset": design.dataset,
            "task": design.task,
            "fragments": frags,
            "glue": "tanh",
            "head": design.head,
        }
    )


def labelled_images(dataset: str, task: int, fraction: float, data_dir: str) -> list[int]:
    """The attacker's labelled images per class at `fraction` (the same for every seed:
    the splits are stratified, so each class's share of the training split is fixed)."""
    import numpy as np
    from qumos.attack.holdings import attacker_data
    from qumos.datasets import load_task

    own = attacker_data(load_task(dataset, task, seed=0, data_dir=Path(data_dir)), fraction, 0)
    return np.bincount(own.y).tolist()


def check_distinct_budgets(cfg: ExperimentConfig, data_dir: str) -> None:
    """Two labelled fractions that draw the same images are one setting measured twice
    (e.g. 0.005 and 0.0075 on mnist-small-4: 2 per class at both): name them."""
    fracs = (*cfg.fractions, *cfg.gap_fractions)
    for name in cfg.tasks:
        dataset, task = parse_task(name)
        seen: dict[tuple[int, ...], float] = {}
        for f in fracs:
            per_class = tuple(labelled_images(dataset, task, f, data_dir))
            if per_class in seen:
                raise QumosError(
                    f"--fractions: {seen[per_class]:g} and {f:g} give {name}'s attacker the "
                    f"same labelled images ({sum(per_class)}: {list(per_class)} per class); "
                    "keep one"
                )
            seen[per_class] = f


@dataclass
class ExperimentConfig:
    tasks: tuple[str, ...] = ("digits-4",)
    fractions: tuple[float, ...] = (0.01,)  # attacker budgets (labelled fraction)
    gap_fractions: tuple[float, ...] = ()  # budgets measured for the value gap only (no search)
    methods: tuple[str, ...] = ("random", "evolution", "ppo")
    search_seeds: tuple[int, ...] = (0, 1, 2)
    heldout_seeds: tuple[int, ...] = (100, 101, 102)
    n_fragments: int = 3
    lam: float = 1.0
    max_evals: int = 16  # distinct designs per search (every method, every seed)
    centralized_evals: int = 16  # distinct designs per centralized search
    budget_minutes: float | None = None  # optional wall clock per search
    workers: int = 1
    ray_address: str | None = None
    max_depth: int = 6  # fragment depths 1..max_depth in every searched space
    rollout: int = 8  # PPO: designs per policy update
    population: int = 8  # evolution
    tournament: int = 3  # evolution
    warm_start: Path | None = None  # ppo-warm: another task's output dir (its policies/)
    hiding: tuple[bool, ...] = (False,)  # input hiding: off, on, or (False, True) the choice
    # the random searches' N designs around the median (by in-search reward), held out as
    # one more baseline row: firmer than the single median design, whose rank is noisy
    middle_random: int = 5

    def validate(self, ecfg: EvalConfig) -> ExperimentConfig:
        """Raise QumosError naming the flag for inconsistent settings (before any work)."""
        for t in self.tasks:
            parse_task(t)
        if not self.tasks:
            raise QumosError("--tasks: give at least one task, e.g. digits-4")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise QumosError(f"--methods: {bad or 'none'}; allowed: {', '.join(METHODS)}")
        for name, seeds in (
            ("--search-seeds", self.search_seeds),
            ("--heldout-seeds", self.heldout_seeds),
        ):
            if not seeds or len(set(seeds)) != len(seeds):
                raise QumosError(f"{name}: {list(seeds)}; give distinct integers")
        overlap = sorted(set(self.heldout_seeds) & set(ecfg.seeds))
        if overlap:
            raise QumosError(
                f"--heldout-seeds: {overlap} also evaluate designs during the "
                f"search (--seeds {','.join(map(str, ecfg.seeds))}); held-out "
                "seeds must be new"
            )
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise QumosError(f"--fractions: {list(self.fractions)}; allowed: numbers in (0, 1]")
        if any(not 0 < f <= 1 for f in self.gap_fractions) or set(self.gap_fractions) & set(
            self.fractions
        ):
            raise QumosError(
                f"--gap-fractions: {list(self.gap_fractions)}; allowed: numbers "
                "in (0, 1] not already in --fractions"
            )
        if not 2 <= self.n_fragments <= 4:
            raise QumosError(f"--fragments: {self.n_fragments}; allowed: 2 to 4")
        if not 1 <= self.max_depth <= 6:
            raise QumosError(f"--max-depth: {self.max_depth}; allowed: 1 to 6")
        if self.max_evals < 1 or self.centralized_evals < 1:
            raise QumosError(
                f"--max-evals: {self.max_evals}, --centralized-evals: "
                f"{self.centralized_evals}; allowed: 1 or more"
            )
        if self.middle_random < 1 or self.middle_random % 2 == 0:
            raise QumosError(
                f"--middle-random: {self.middle_random}; allowed: an odd number, 1 or more "
                "(1: the median design only)"
            )
        if self.rollout < 2:
            raise QumosError(f"--rollout: {self.rollout}; allowed: 2 or more")
        if "ppo-warm" in self.methods:
            if self.warm_start is None:
                raise QumosError(
                    "--warm-start: method ppo-warm needs another task's output "
                    "directory, e.g. results/engine/digits-2"
                )
            missing = [
                str(warm_policy(self.warm_start, s))
                for s in self.search_seeds
                if not warm_policy(self.warm_start, s).is_file()
            ]
            if missing:
                raise QumosError(
                    f"--warm-start: no saved policy {missing[0]}; run the ppo "
                    "method on that task first with the same search seeds"
                )
        if not ecfg.attacks:
            raise QumosError(
                "the experiment attacks every design; the evaluation config has attacks off"
            )
        return self


# ----- one task -----------------------------------------------------------------------------
@dataclass
class TaskRun:
    """The state of one task's experiment: its cache, its finished searches."""

    name: str
    cfg: ExperimentConfig
    ecfg: EvalConfig  # search fidelity (the attacker budget is set per setting)
    out: Path
    executor: object
    log: Callable[[str], None] = print
    on_record: object = None
    cache: EvalCache = field(init=False)
    done: dict = field(init=False)

    def __post_init__(self) -> None:
        self.dataset, self.task = parse_task(self.name)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = EvalCache(self.out / "cache.jsonl")
        self.done = {}
        path = self.out / "searches.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    s = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.done[s["id"]] = s

    def evaluator(self, ecfg: EvalConfig, lam: float) -> Evaluator:
        return Evaluator(
            ecfg, lam=lam, cache=self.cache, executor=self.executor, on_record=self.on_record
        )

    def budget(self, n: int) -> Budget:
        return Budget(minutes=self.cfg.budget_minutes, max_evals=n)

    def search(
        self, method: str, seed: int, ecfg: EvalConfig, lam: float, space: DesignSpace, n: int
    ) -> dict:
        """One search (skipped when recorded): its designs' records, in order."""
        sid = f"{method}|seed={seed}|{ecfg.fingerprint()}|lam={lam}|n={n}|{space}"
        if method == "ppo-warm":
            sid += f"|warm={self.cfg.warm_start}"
        if sid in self.done:
            s = self.done[sid]
            recs = [
                self.cache.records[EvalCache.cache_key(k, ecfg.fingerprint())] for k in s["keys"]
            ]
            return {**s, "records": [{**r, "reward": reward(r, lam)} for r in recs]}
        self.log(f"[{self.name}] {method} search, seed {seed}, {n} designs")
        ev = self.evaluator(ecfg, lam)
        kind = "centralized" if space.n_fragments == 1 else "distributed"
        res = run_method(
            method,
            space,
            ev,
            self.budget(n),
            seed,
            self.cfg,
            tb_dir=self.out / "tb" / f"{method}-{seed}",
            save_policy=self.out / "policies" / f"{kind}-{method}-{seed}.zip",
        )
        s = {
            "id": sid,
            "method": method,
            "seed": seed,
            "keys": [r["key"] for r in res.records],
            "best": res.best["key"],
            "evaluations": len(res.records),
            "fresh": res.evaluations,
            "steps": res.steps,
            "seconds": res.seconds,
            "extra": res.extra,
        }
        with (self.out / "searches.jsonl").open("a") as f:
            f.write(json.dumps(s) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[sid] = s
        return {**s, "records": res.records}

    def heldout(self, designs: list[Design], ecfg: EvalConfig) -> list[dict]:
        """`designs` on the held-out seeds only (a config whose seeds are the held-out ones)."""
        hcfg = ecfg.with_(seeds=tuple(self.cfg.heldout_seeds))
        assert not set(hcfg.seeds) & set(ecfg.seeds), "held-out seeds overlap the search's"
        recs = self.evaluator(hcfg, self.cfg.lam).evaluate_many(designs)
        assert all(tuple(r["seeds"]) == tuple(self.cfg.heldout_seeds) for r in recs)
        return recs


def warm_policy(task_out: Path, seed: int) -> Path:
    """The distributed-design PPO policy a task's `ppo` search of `seed` saved."""
    return Path(task_out) / "policies" / f"distributed-ppo-{seed}.zip"


def run_method(
    method: str,
    space: DesignSpace,
    ev: Evaluator,
    budget: Budget,
    seed: int,
    cfg: ExperimentConfig,
    tb_dir: Path | None = None,
    save_policy: Path | None = None,
) -> SearchResult:
    if method == "random":
        return random_search(space, ev, budget, seed=seed)
    if method == "evolution":
        from qumos.search.evolution import evolution_search

        return evolution_search(
            space, ev, budget, seed=seed, population=cfg.population, sample=cfg.tournament
        )
    if method in ("ppo", "ppo-seq", "ppo-warm"):  # ppo_search names its result the same
        if save_policy is not None:
            save_policy.parent.mkdir(parents=True, exist_ok=True)
        return ppo_search(
            space,
            ev,
            budget,
            seed=seed,
            tb_dir=tb_dir,
            rollout=cfg.rollout,
            sequential=method == "ppo-seq",
            save_policy=save_policy,
            init_policy=warm_policy(cfg.warm_start, seed)
            if method == "ppo-warm" and cfg.warm_start is not None
            else None,
        )
    raise QumosError(f"--methods: {method!r}; allowed: {', '.join(METHODS)}")


def _best_design(search: dict) -> Design:
    return Design.model_validate(
        next(r for r in search["records"] if r["key"] == search["best"])["design"]
    )


def _median_design(records: list[dict]) -> dict:
    """The median record by reward (the lower middle for an even count)."""
    return middle_designs(records, 1)[0]


def middle_designs(records: list[dict], n: int) -> dict[int, dict]:
    """The `n` records around the median by reward, by offset from it (0: the median
    design); fewer when the search has fewer records."""
    ranked = sorted(records, key=lambda r: r["reward"])
    mid = (len(ranked) - 1) // 2
    return {
        off: ranked[mid + off]
        for off in range(-(n // 2), n // 2 + 1)
        if 0 <= mid + off < len(ranked)
    }


def run_task(
    task_name: str,
    cfg: ExperimentConfig,
    ecfg: EvalConfig,
    out: Path,
    executor,
    log: Callable[[str], None] = print,
    on_record=None,
) -> dict:
    """Every setting (attacker budget) of one task; writes and returns result.json."""
    tr = TaskRun(task_name, cfg, ecfg, out, executor, log, on_record)
    depths = tuple(range(1, cfg.max_depth + 1))
    t_start = time.perf_counter()
    # 1. centralized search (victim only): shared by every attacker budget
    cen_space = DesignSpace.centralized(tr.dataset, tr.task, depths=depths)
    cen = {
        s: tr.search("ppo", s, ecfg.with_(attacks=False), 0.0, cen_space, cfg.centralized_evals)
        for s in cfg.search_seeds
    }
    cen_best = {s: _best_design(c) for s, c in cen.items()}
    space = DesignSpace(
        tr.dataset, tr.task, n_fragments=cfg.n_fragments, depths=depths, hiding=cfg.hiding
    )
    # 1b. the same over the K-fragment architectures, deployed all on one provider
    ceil = {
        s: tr.search("random", s, ecfg.with_(attacks=False), 0.0, space, cfg.centralized_evals)
        for s in cfg.search_seeds
    }
    ceil_best = {s: _best_design(c) for s, c in ceil.items()}
    settings = []
    for frac in (*cfg.fractions, *cfg.gap_fractions):
        methods = cfg.methods if frac in cfg.fractions else ()
        e = ecfg.with_(attack_fraction=frac)
        log(f"[{task_name}] attacker budget: labelled fraction {frac}")
        finals: dict[str, dict[int | str, Design]] = {
            CENTRALIZED_K1: {s: d for s, d in cen_best.items()},
            f"even split into {cfg.n_fragments}": {
                s: even_split(d, cfg.n_fragments) for s, d in cen_best.items()
            },
        }
        in_search: dict[str, dict[int, float]] = {}
        searches: dict[str, dict[int, dict]] = {}
        for m in methods:
            searches[m] = {
                s: tr.search(m, s, e, cfg.lam, space, cfg.max_evals) for s in cfg.search_seeds
            }
            label = method_label(m)
            finals[label], in_search[label] = {}, {}
            for s, res in searches[m].items():
                best = max(res["records"], key=lambda r: r["reward"])
                finals[label][s] = Design.model_validate(best["design"])
                in_search[label][s] = best["reward"]
            if m == "random":
                finals[MEDIAN_RANDOM] = {
                    s: Design.model_validate(_median_design(res["records"])["design"])
                    for s, res in searches[m].items()
                }
                if cfg.middle_random > 1:
                    # one entry per design ("seed:offset"): its spread is over designs
                    finals[middle_label(cfg.middle_random)] = {
                        f"{s}:{off:+d}": Design.model_validate(r["design"])
                        for s, res in searches[m].items()
                        for off, r in middle_designs(res["records"], cfg.middle_random).items()
                    }
        log(f"[{task_name}] held-out evaluation on seeds {list(cfg.heldout_seeds)}")
        every = [d for per in finals.values() for d in per.values()] + list(ceil_best.values())
        unique = {d.key(): d for d in every}
        held = {r["key"]: r for r in tr.heldout(list(unique.values()), e)}
        rows = [
            table_row(
                label, {s: held[d.key()] for s, d in per.items()}, in_search.get(label), cfg.lam
            )
            for label, per in finals.items()
        ]
        ceil_label = ALL_IN_ONE.format(k=cfg.n_fragments)
        ceil_held = {s: all_in_one(held[d.key()]) for s, d in ceil_best.items()}
        rows.insert(1, table_row(ceil_label, ceil_held, None, cfg.lam))
        # the more accurate centralized row is the one compared with
        cen_label, cen_rows = max(
            (
                (CENTRALIZED_K1, [held[d.key()] for d in cen_best.values()]),
                (ceil_label, list(ceil_held.values())),
            ),
            key=lambda lr: statistics.fmean(r["victim_acc"][0] for r in lr[1]),
        )
        gap = statistics.fmean(r["victim_acc"][0] - r["S"][0] for r in cen_rows)
        all_recs = {m: [r for res in searches[m].values() for r in res["records"]] for m in methods}
        tag = f"fraction-{frac:g}"
        pareto_plot(
            {
                ("random" if m == "random" else method_label(m)): recs
                for m, recs in all_recs.items()
            },
            out / f"pareto-{tag}.png",
            f"{task_name}, fraction {frac:g}, K={cfg.n_fragments}, lambda={cfg.lam} (in-search)",
            highlight={
                f"{lab} (held-out, seed {min(per)})": held[per[min(per)].key()]
                for lab, per in finals.items()
                if lab.startswith(("centralized", "even", "engine"))
            },
        )
        best_acc = max(r["accuracy"][0] for r in rows)
        settings.append(
            {
                "fraction": frac,
                "labelled_per_class": labelled_images(tr.dataset, tr.task, frac, ecfg.data_dir),
                "value_gap": gap,
                # what the most accurate final design of any row is worth beyond S
                "best_accuracy_minus_S": best_acc - statistics.fmean(r["S"][0] for r in cen_rows),
                "S": mean_std([r["S"][0] for r in cen_rows]),
                "S_reference": sorted({x for r in cen_rows for x in r["S_reference"]}),
                "rows": rows,
                "checks": target_checks(rows, gap),
                "centralized_compared": cen_label,
                "random_median_in_search": median_in_search(
                    all_recs.get("random", []),
                    statistics.fmean(r["victim_acc"][0] for r in cen_rows),
                ),
                "searches": {
                    method_label(m): [
                        {k: v for k, v in res.items() if k != "records"}
                        for res in searches[m].values()
                    ]
                    for m in methods
                },
                "pareto": f"pareto-{tag}.png",
            }
        )
    fps = {ecfg.with_(attack_fraction=f).fingerprint() for f in cfg.fractions}
    secs = [r["seconds"] for r in tr.cache.records.values() if r["fingerprint"] in fps]
    result = {
        "task": task_name,
        "config": {**asdict(cfg), "warm_start": str(cfg.warm_start)},
        "eval_config": asdict(ecfg),
        "settings": settings,
        "seconds": time.perf_counter() - t_start,
        # at the search's fidelity (its evaluation seeds), wall time of one worker
        "designs_per_hour_per_core": 3600 / statistics.fmean(secs) if secs else None,
        "load_average": os.getloadavg(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result
