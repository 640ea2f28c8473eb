"""Score a distributed design: train the victim, attack every single-provider breach.

For each seed s (the data split, the victim's initialisation and the attacker's seed):
train the victim with `TrainConfig(epochs=victim_epochs, seed=s)` (all seeds' victims in
one `fit_many` call), then the one attack driver (`qumos.attack.driver.evaluate_victims`,
profile `attack_profile`, the converged default budget, every seed's trainings batched)
attacks every provider, in process. S is the profile's best no-theft
reference (classical learners included, so S does not reward a design for being hard to
learn from scratch). Per seed, `gain = max(0, max_j (A_j - S))`, clipped at 0 so a design
whose stolen fragments score below S cannot earn a reward above its own accuracy; figures
are means (and spreads) over seeds, and

    reward = acc_victim - lambda * gain        (gain = mean over seeds)

`old_reward` is the formula before threat model v2 (S the scratch QNN of the design's own
architecture, gain not clipped), kept to report old winners under both.

With `attacks=False` only the victim is trained (the centralized search with lambda 0
needs nothing else); such records have no attack figures and a reward only for lambda 0.

Records are plain dicts, cached in a JSONL file by `design.key()` plus the evaluation
config's fingerprint (lambda is not part of it: the reward is recomputed from the
stored figures), so a crashed search resumes without evaluating anything twice. Each
record written carries `code`, a hash of the package's source that computed it (not part
of the key: figures from two revisions can differ by float rounding, amplified by
training on a handful of images, and the stamp says which revision a figure came from).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from qumos.spec import Design


@dataclass(frozen=True)
class EvalConfig:
    seeds: tuple[int, ...] = (0,)  # data split, victim init and attacker seed, one run each
    victim_epochs: int = 10  # victim training budget (passes over the training set)
    victim_lr: float = 0.03
    victim_batch_size: int = 32
    attacks: bool = True  # False: victim accuracy only (lambda-0 centralized search)
    attack_profile: str = "breach"  # qumos.attack profile (coalition needs a coalition)
    attack_coalition: tuple[str, ...] = ()  # profile coalition: the providers breached together
    attack_coalition_size: int = 0  # profile coalition: every coalition of up to this many
    attack_fraction: float = 0.05  # attacker's share of the labelled training data
    attack_epochs: int = 75  # training steps per restart (the converged default)
    attack_restarts: int = 24  # restarts, averaged (the converged default)
    attack_queries: int = 100  # query profiles
    attack_traffic: int = 200  # users' rows in each provider's log
    strategies: tuple[str, ...] = ()  # a subset of the profile's strategies (default all)
    batched: bool = True  # attacker trainings batched (same figures; not in the fingerprint)
    data_dir: str = "data"

    def fingerprint(self) -> str:
        d = asdict(self)
        d.pop("data_dir")
        d.pop("batched")
        if not self.attack_coalition and not self.attack_coalition_size:
            # absent unless set: records cached before these fields keep their fingerprint
            del d["attack_coalition"], d["attack_coalition_size"]
        if not self.attacks:  # the attacker's settings do not change a victim-only record
            d = {k: v for k, v in d.items() if not k.startswith("attack") and k != "strategies"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def with_(self, **kw) -> EvalConfig:
        return EvalConfig(**{**asdict(self), **kw})


@lru_cache(maxsize=8)
def _task_data(dataset: str, task: int, seed: int, data_dir: str):
    from qumos.datasets import load_task

    return load_task(dataset, task, seed=seed, data_dir=Path(data_dir))


def _ms(values: list[float]) -> list[float]:
    return [
        float(statistics.fmean(values)),
        float(statistics.pstdev(values)) if len(values) > 1 else 0.0,
    ]


def attack_config(cfg: EvalConfig):
    """The AttackConfig an EvalConfig evaluates with."""
    from qumos.attack import AttackConfig

    return AttackConfig(
        profile=cfg.attack_profile,
        fraction=cfg.attack_fraction,
        epochs=cfg.attack_epochs,
        restarts=cfg.attack_restarts,
        queries=cfg.attack_queries,
        coalition=tuple(cfg.attack_coalition),
        coalition_size=cfg.attack_coalition_size,
        traffic=cfg.attack_traffic,
        strategies=tuple(cfg.strategies),
        batched=cfg.batched,
    ).validate()


def train_victims(design: Design, datas: list, cfg: EvalConfig) -> tuple[list, list[float]]:
    """The design's victim for every seed (seed s on its own split), trained together
    (`qumos.stacked.fit_many`: the same results as `qumos.train.train_design` one by one).
    Returns the trained specs and their test accuracies."""
    from qumos.model import DistributedQNN, accuracy
    from qumos.spec import build_spec
    from qumos.stacked import fit_many
    from qumos.train import TrainConfig

    spec = build_spec(design, name="qumos-model")
    nets = [DistributedQNN(spec, seed=s) for s in cfg.seeds]
    fit_many(
        nets,
        [d.train.x for d in datas],
        [d.train.y for d in datas],
        [d.val.x for d in datas],
        [d.val.y for d in datas],
        [
            TrainConfig(
                epochs=cfg.victim_epochs, lr=cfg.victim_lr, batch_size=cfg.victim_batch_size, seed=s
            )
            for s in cfg.seeds
        ],
    )
    return (
        [n.to_spec() for n in nets],
        [float(accuracy(n, d.test.x, d.test.y)) for n, d in zip(nets, datas)],
    )


def evaluate_design(job: tuple[dict, EvalConfig]) -> dict:
    """Evaluate one design (a `Design.model_dump()`); a picklable worker function."""

    design_dict, cfg = job
    design = Design.model_validate(design_dict)
    t0 = time.perf_counter()
    datas = [_task_data(design.dataset, design.task, s, cfg.data_dir) for s in cfg.seeds]
    specs, accs = train_victims(design, datas, cfg)
    per_seed: list[dict] = [{"seed": s, "victim_acc": a} for s, a in zip(cfg.seeds, accs)]
    if cfg.attacks:
        from qumos.attack.driver import evaluate_victims

        rep = evaluate_victims(list(zip(cfg.seeds, specs, datas)), attack_config(cfg))
        for row, r in zip(per_seed, rep.records):
            s_acc = float(r["S"])
            attackers = [float(u["A"]) for u in r["units"]]
            leaks = [float(u["leak"]) for u in r["units"]]
            scratch = float(r["references"]["scratch"]["test_acc"])
            row.update(
                scratch=scratch,
                S=s_acc,
                S_reference=r["S_reference"],
                attacker_acc=attackers,
                leak=leaks,
                security=1.0 - max(leaks),
                gain=max(0.0, max(a - s_acc for a in attackers)),
                gain_unclipped=max(a - s_acc for a in attackers),
                gain_scratch=max(a - scratch for a in attackers),
                theft_ratio=max(attackers) / max(row["victim_acc"], 1e-9),
            )
    rec: dict = {
        "design": design.model_dump(),
        "short": design.short(),
        "key": design.key(),
        "n_fragments": len(design.fragments),
        "fingerprint": cfg.fingerprint(),
        "attacked": cfg.attacks,
        **summarize(per_seed),
    }
    rec["seconds"] = time.perf_counter() - t0
    rec["pid"] = os.getpid()
    return rec


def summarize(per_seed: list[dict]) -> dict:
    """A record's figures (mean, population std over its evaluation seeds) from its
    per-seed rows; the attack figures when the rows carry them. `pool_records` calls it
    on the rows of several records of one design."""
    out: dict = {
        "seeds": [r["seed"] for r in per_seed],
        "victim_acc": _ms([r["victim_acc"] for r in per_seed]),
    }
    if "attacker_acc" in per_seed[0]:
        k = len(per_seed[0]["attacker_acc"])
        out.update(
            scratch_acc=_ms([r["scratch"] for r in per_seed]),
            S=_ms([r["S"] for r in per_seed]),
            S_reference=[r["S_reference"] for r in per_seed],
            attacker_acc=[_ms([r["attacker_acc"][j] for r in per_seed]) for j in range(k)],
            worst_attacker_acc=_ms([max(r["attacker_acc"]) for r in per_seed]),
            worst_gain=_ms([r["gain"] for r in per_seed]),
            old_gain=_ms([r["gain_scratch"] for r in per_seed]),
            theft_ratio=_ms([r["theft_ratio"] for r in per_seed]),
            leak=[_ms([r["leak"][j] for r in per_seed]) for j in range(k)],
            worst_leak=_ms([max(r["leak"]) for r in per_seed]),
            security=_ms([r["security"] for r in per_seed]),
        )
    out["per_seed"] = per_seed
    return out


def pool_records(recs: list[dict]) -> dict:
    """One design's held-out records on disjoint evaluation seeds (the same design, the
    same attacker budget: the caller's to check) as one record over all their seeds: the
    per-seed rows joined and summarized again. Refuses records of different designs, a
    mix of attacked and unattacked ones, or overlapping seeds (ValueError)."""
    keys = {r["key"] for r in recs}
    if len(keys) != 1:
        raise ValueError(f"records of different designs: {sorted(keys)}")
    attacked = {bool(r["attacked"]) for r in recs}
    if len(attacked) != 1:
        raise ValueError("records with and without attacks")
    seeds = [s for r in recs for s in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"overlapping evaluation seeds: {sorted(seeds)}")
    per_seed = [row for r in recs for row in r["per_seed"]]
    return {
        **{k: v for k, v in recs[0].items() if k not in ("seconds", "pid")},
        "fingerprint": "+".join(r["fingerprint"] for r in recs),
        **summarize(per_seed),
    }


def _attacked(rec: dict, lam: float) -> None:
    if not rec.get("attacked"):
        raise ValueError(
            f"design {rec['short']} was evaluated without attacks; lambda {lam} "
            "needs attack figures"
        )


def reward(rec: dict, lam: float) -> float:
    """acc_victim - lambda * mean over seeds of max(0, max_j (A_j - S))."""
    if lam == 0:
        return rec["victim_acc"][0]
    _attacked(rec, lam)
    return rec["victim_acc"][0] - lam * rec["worst_gain"][0]


def old_reward(rec: dict, lam: float) -> float:
    """The reward before threat model v2: acc - lambda * max_j (A_j - S_scratch), where
    S_scratch is the scratch QNN of the design's own architecture, not clipped."""
    if lam == 0:
        return rec["victim_acc"][0]
    _attacked(rec, lam)
    return rec["victim_acc"][0] - lam * rec["old_gain"][0]


@lru_cache(maxsize=1)
def code_revision() -> str:
    """12 hex digits of a hash over the qumos package's .py and .c sources: the revision
    that computed a record (a git checkout is not needed, so it works in the images).
    Hashed once per process (cached), so a checkout edited during a long run does not
    relabel what the running code computes."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".c")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


class EvalCache:
    """Evaluated designs, persisted as one JSON object per line (append-only); a new
    record is stamped with `code` (`code_revision()`) unless it already has one."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self.records: dict[str, dict] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                self.records[self.cache_key(rec["key"], rec["fingerprint"])] = rec

    @staticmethod
    def cache_key(design_key: str, fingerprint: str) -> str:
        return f"{design_key}:{fingerprint}"

    def get(self, design: Design, cfg: EvalConfig) -> dict | None:
        return self.records.get(self.cache_key(design.key(), cfg.fingerprint()))

    def put(self, rec: dict) -> None:
        rec.setdefault("code", code_revision())
        self.records[self.cache_key(rec["key"], rec["fingerprint"])] = rec
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())


@dataclass
class Evaluator:
    """Evaluates designs through an executor and a cache; counts fresh evaluations."""

    cfg: EvalConfig
    lam: float = 1.0
    cache: EvalCache = field(default_factory=lambda: EvalCache(None))
    executor: Any = None  # qumos.search.parallel executor; None = serial
    on_record: Any = None  # callback(rec, fresh: bool) after each result
    fresh: int = 0  # evaluations run (cache misses)
    seen: set = field(default_factory=set)  # distinct designs asked for (the budget's unit)
    log: list = field(default_factory=list)  # every record returned, in order, with "reward"

    def evaluate_many(self, designs: list[Design], log: bool = True) -> list[dict]:
        """Records of `designs` (evaluated in parallel where not cached), with "reward".
        `log=False` only fills the cache (a vectorized environment's prefetch)."""
        from qumos.search.parallel import SerialExecutor

        ex = self.executor or SerialExecutor()
        missing: dict[str, Design] = {}
        for d in designs:
            self.seen.add(d.key())
            if self.cache.get(d, self.cfg) is None:
                missing.setdefault(d.key(), d)
        todo = list(missing.values())

        def done(i: int, rec: dict) -> None:
            self.cache.put(rec)
            self.fresh += 1
            if self.on_record:
                self.on_record(rec, True)

        if todo:
            ex.map(evaluate_design, [(d.model_dump(), self.cfg) for d in todo], done)
        out = []
        for d in designs:
            cached = self.cache.get(d, self.cfg)
            assert cached is not None, "evaluated above"
            rec = dict(cached)
            rec["reward"] = reward(rec, self.lam)
            out.append(rec)
            if log:
                self.log.append(rec)
        return out

    def __call__(self, design: Design) -> tuple[float, dict]:
        """The environment's reward function."""
        rec = self.evaluate_many([design])[0]
        return rec["reward"], {
            "victim_acc": rec["victim_acc"][0],
            "worst_gain": (rec.get("worst_gain") or [None])[0],
        }
