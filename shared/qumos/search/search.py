"""Search the design space under a budget: PPO (stable-baselines3), uniform random, or
regularized evolution (`qumos.search.evolution`).

Every method stops launching evaluations once the budget (wall-clock minutes and/or
distinct designs) is spent; a batch already running finishes, so the overshoot is at
most one batch of `workers` evaluations (none with one worker). The unit is a distinct
design the search asked for, whether the shared cache already held it or not: methods
sharing a cache get the same number of designs, and a search resumed after a crash
replays its designs from the cache and stops where it would have. Proposing a design
already seen costs nothing; `max_steps` bounds a policy that keeps doing so.

PPO runs on `workers` copies of the one-step environment; before a vectorized step the
`workers` proposed designs are evaluated in parallel (the executor), then each copy
reads its reward from the cache. Rollouts are `n_steps * workers` designs (default 8);
gamma is irrelevant (every episode is one step).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from qumos.errors import QumosError
from qumos.search.env import DesignEnv, DesignSpace, SequentialDesignEnv
from qumos.search.evaluator import Evaluator


@dataclass
class Budget:
    minutes: float | None = None  # wall-clock budget of the whole search
    max_evals: int | None = None  # distinct designs the search asks for

    def __post_init__(self) -> None:
        if self.minutes is None and self.max_evals is None:
            raise QumosError("budget: give --budget-minutes and/or --max-evals")
        if self.minutes is not None and self.minutes <= 0:
            raise QumosError(f"--budget-minutes: {self.minutes}; must be > 0")
        if self.max_evals is not None and self.max_evals < 1:
            raise QumosError(f"--max-evals: {self.max_evals}; must be >= 1")
        self.t0 = time.perf_counter()

    def start(self) -> Budget:
        self.t0 = time.perf_counter()
        return self

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining_evals(self, ev: Evaluator) -> int | None:
        return None if self.max_evals is None else self.max_evals - len(ev.seen)

    def exhausted(self, ev: Evaluator) -> bool:
        if self.minutes is not None and self.elapsed() >= 60 * self.minutes:
            return True
        return self.max_evals is not None and len(ev.seen) >= self.max_evals


@dataclass
class SearchResult:
    method: str
    lam: float
    records: list[dict]  # unique designs in the order first seen, each with "reward"
    evaluations: int  # fresh evaluations
    steps: int  # designs proposed (cache hits included)
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def best(self) -> dict:
        return max(self.records, key=lambda r: r["reward"])


def unique_records(log: list[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for rec in log:
        seen.setdefault(rec["key"], rec)
    return list(seen.values())


def random_search(
    space: DesignSpace, ev: Evaluator, budget: Budget, seed: int = 0, max_steps: int | None = None
) -> SearchResult:
    """Uniformly random designs, `workers` at a time, until the budget is spent."""
    rng = np.random.default_rng(seed)
    workers = getattr(ev.executor, "workers", 1)
    max_steps = max_steps or 20 * (budget.max_evals or 1000)
    steps, start_fresh = 0, ev.fresh
    budget.start()
    log_start = len(ev.log)
    while not budget.exhausted(ev) and steps < max_steps:
        n = workers
        rem = budget.remaining_evals(ev)
        if rem is not None:
            n = max(1, min(n, rem))
        ev.evaluate_many([space.sample(rng) for _ in range(n)])
        steps += n
    return SearchResult(
        "random",
        ev.lam,
        unique_records(ev.log[log_start:]),
        ev.fresh - start_fresh,
        steps,
        budget.elapsed(),
    )


def ppo_search(
    space: DesignSpace,
    ev: Evaluator,
    budget: Budget,
    seed: int = 0,
    tb_dir: Path | None = None,
    n_steps: int | None = None,
    max_steps: int | None = None,
    learning_rate: float = 3e-3,
    ent_coef: float = 0.01,
    rollout: int = 8,
    sequential: bool = False,
    init_policy: Path | None = None,
    save_policy: Path | None = None,
) -> SearchResult:
    """PPO until the budget is spent, on the one-step design environment (a contextual
    bandit) or, `sequential`, on `SequentialDesignEnv` (one fragment per step, the partial
    design observed, gamma 1).
    `rollout`: designs per policy update (n_steps = rollout * steps-per-design // workers,
    at least 2 env steps in all); `n_steps` overrides it. `init_policy`: a saved policy
    (`save_policy` of an earlier search with the same action and observation spaces, e.g.
    another task's) to start from instead of a random initialisation."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv

    workers = getattr(ev.executor, "workers", 1)
    if rollout < 2:
        raise QumosError(f"--rollout: {rollout}; allowed: 2 or more designs per update")
    env_cls = SequentialDesignEnv if sequential else DesignEnv
    per_design = (space.n_fragments or 1) if sequential else 1
    n_steps = n_steps or max(1, rollout * per_design // workers, -(-2 // workers))
    max_steps = max_steps or 20 * (budget.max_evals or 1000)

    class PrefetchVecEnv(DummyVecEnv):
        """Evaluates the designs this step completes in parallel before each copy reads
        its reward."""

        def step_wait(self):
            designs = [e.pending_design(a) for e, a in zip(self.envs, self.actions)]
            ev.evaluate_many([d for d in designs if d is not None], log=False)
            return super().step_wait()

    class BudgetCallback(BaseCallback):
        def __init__(self):
            super().__init__()
            self.steps = 0  # designs proposed
            self.best = -np.inf

        def _on_step(self) -> bool:
            for r, done in zip(self.locals["rewards"], self.locals["dones"]):
                if not done:
                    continue
                self.steps += 1
                self.best = max(self.best, float(r))
                self.logger.record_mean("search/reward", float(r))
            self.logger.record("search/best_reward", self.best)
            self.logger.record("search/designs", len(ev.seen))
            return not budget.exhausted(ev) and self.steps < max_steps

    venv = PrefetchVecEnv([lambda: env_cls(space, ev) for _ in range(workers)])
    kw: dict[str, Any] = dict(
        n_steps=n_steps,
        batch_size=n_steps * workers,
        n_epochs=10,
        learning_rate=learning_rate,
        ent_coef=ent_coef,
        gamma=1.0 if sequential else 0.0,
        gae_lambda=1.0,
        seed=seed,
        tensorboard_log=str(tb_dir) if tb_dir else None,
        verbose=0,
        device="cpu",
    )
    if init_policy is not None:
        model = PPO.load(
            init_policy,
            env=venv,
            custom_objects={"learning_rate": learning_rate},
            **{k: v for k, v in kw.items() if k not in ("learning_rate",)},
        )
    else:
        model = PPO("MlpPolicy", venv, policy_kwargs={"net_arch": [32, 32]}, **kw)
    cb = BudgetCallback()
    start_fresh, log_start = ev.fresh, len(ev.log)
    budget.start()
    model.learn(total_timesteps=10**9, callback=cb, tb_log_name="ppo")
    if save_policy is not None:
        model.save(save_policy)
    res = SearchResult(
        "ppo-seq" if sequential else "ppo-warm" if init_policy is not None else "ppo",
        ev.lam,
        unique_records(ev.log[log_start:]),
        ev.fresh - start_fresh,
        cb.steps,
        budget.elapsed(),
        extra={
            "policy_mode": _policy_mode(model, venv, space, sequential),
            "updates": int(model._n_updates // model.n_epochs),
        },
    )
    venv.close()
    return res


def _policy_mode(model, venv, space: DesignSpace, sequential: bool) -> str:
    """The policy's most likely design, for the record (not evaluated: that would cost
    budget; the search's result is the best design it evaluated)."""
    env = venv.envs[0]
    obs, _ = env.reset()
    for _ in range((space.n_fragments or 1) if sequential else 1):
        action, _ = model.predict(obs, deterministic=True)
        design = env.pending_design(action)
        if design is not None:
            return design.short()
        obs, *_ = env.step(action)
    raise AssertionError("the environment did not complete a design")


# ----- outputs ----------------------------------------------------------------------------
CSV_FIELDS = [
    "key",
    "short",
    "n_fragments",
    "reward",
    "victim_acc",
    "victim_acc_std",
    "scratch_acc",
    "worst_attacker_acc",
    "worst_gain",
    "worst_leak",
    "security",
    "seconds",
]


def flat(rec: dict) -> dict:
    def m(name, i=0):
        v = rec.get(name)
        return None if v is None else v[i]

    return {
        "key": rec["key"],
        "short": rec["short"],
        "n_fragments": rec["n_fragments"],
        "reward": rec.get("reward"),
        "victim_acc": m("victim_acc"),
        "victim_acc_std": m("victim_acc", 1),
        "scratch_acc": m("scratch_acc"),
        "worst_attacker_acc": m("worst_attacker_acc"),
        "worst_gain": m("worst_gain"),
        "worst_leak": m("worst_leak"),
        "security": m("security"),
        "seconds": rec.get("seconds"),
    }


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (acc, leak) no other point beats (higher acc and lower leak)."""
    front = []
    for i, (a, lk) in enumerate(points):
        if not any((a2 >= a and l2 <= lk) and (a2 > a or l2 < lk) for a2, l2 in points):
            front.append(i)
    return front


def pareto_plot(
    series: dict[str, list[dict]], path: Path, title: str, highlight: dict[str, dict] | None = None
) -> None:
    """Accuracy against worst-case leak for every evaluated (attacked) design."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    allpts = []
    for i, (name, recs) in enumerate(series.items()):
        recs = [r for r in recs if r.get("attacked")]
        pts = [(r["worst_leak"][0], r["victim_acc"][0]) for r in recs]
        allpts += [(a, lk) for lk, a in pts]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=18, alpha=0.6, label=name, color=f"C{i}")
    if allpts:
        front = sorted((allpts[i] for i in pareto_front(allpts)), key=lambda p: p[1])
        ax.plot([lk for _, lk in front], [a for a, _ in front], "k--", lw=1, label="Pareto front")
    for i, (name, rec) in enumerate((highlight or {}).items()):
        if rec.get("attacked"):
            ax.scatter(
                [rec["worst_leak"][0]],
                [rec["victim_acc"][0]],
                marker="*",
                s=220,
                edgecolor="k",
                color=f"C{i + len(series)}",
                label=name,
                zorder=5,
            )
    ax.set_xlabel("worst-case leak  max_j clip((A_j - S) / (acc - S), 0, 1)")
    ax.set_ylabel("victim test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_search_outputs(res: SearchResult, out: Path, title: str) -> dict:
    """best_design.yaml (for `qumos train`), best.json, designs.jsonl/.csv, pareto.png."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    best = res.best
    (out / "best_design.yaml").write_text(yaml.safe_dump(best["design"], sort_keys=False))
    summary = {
        "method": res.method,
        "lambda": res.lam,
        "evaluations": res.evaluations,
        "steps": res.steps,
        "seconds": res.seconds,
        "best": best,
        **res.extra,
    }
    (out / "best.json").write_text(json.dumps(summary, indent=2))
    with (out / "designs.jsonl").open("w") as f:
        for rec in res.records:
            f.write(json.dumps(rec) + "\n")
    with (out / "designs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for rec in res.records:
            w.writerow(flat(rec))
    if any(r.get("attacked") for r in res.records):
        pareto_plot(
            {res.method: res.records},
            out / "pareto.png",
            title,
            highlight={f"best ({res.method})": best},
        )
    return summary
