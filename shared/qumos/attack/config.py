"""Attacker profiles and the attack configuration (docs/threat-model.md).

A profile says what the adversary holds; the configuration adds its budgets. Every
figure the project prints comes from one `AttackConfig` run through
`qumos.attack.driver.run_attack`.

| profile          | holdings                                                              |
|------------------|-----------------------------------------------------------------------|
| `breach`         | one provider j: its fragment(s) and its whole access log; `fraction`   |
|                  | of the training split labelled                                        |
| `breach+queries` | `breach` plus `queries` of its own unlabelled images through the      |
|                  | public API, their rows attributed in provider j's log                  |
| `queries`        | `queries` and the labelled budget, no breach (the reference for        |
|                  | `breach+queries`)                                                     |
| `coalition`      | m < K providers breached together (fragments and logs): the named     |
|                  | ones, or every coalition of up to `coalition_size` (the worst counts) |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qumos.errors import AttackError

PROFILES = ("breach", "breach+queries", "queries", "coalition")
QUERY_PROFILES = ("breach+queries", "queries")
BREACH_PROFILES = ("breach", "breach+queries", "coalition")

BASE_REFERENCES = ("scratch", "logreg", "mlp", "knn")
QUERY_REFERENCES = ("distill_qnn", "distill_mlp")
WHITE_BOX = ("substitute", "finetune", "head_only")
THEFTS = WHITE_BOX + ("selftrain", "logspread")


def references_of(profile: str) -> tuple[str, ...]:
    if profile in ("breach+queries", "queries"):
        return BASE_REFERENCES + QUERY_REFERENCES
    return BASE_REFERENCES


def thefts_of(profile: str) -> tuple[str, ...]:
    if profile == "queries":
        return ()
    if profile == "breach+queries":
        return THEFTS + ("insider",)
    return THEFTS


def strategies_of(profile: str) -> tuple[str, ...]:
    return references_of(profile) + thefts_of(profile)


# Learning rates cycled over the restarts (restart r uses LRS[r % len(LRS)]): several
# learning rates, since one that suits a 6-parameter head diverges on a 90-weight circuit.
DEFAULT_LRS = (0.1, 0.03, 0.01)
MAX_EPOCHS = 2000
MAX_RESTARTS = 64
MAX_QUERIES = 5000


@dataclass
class AttackConfig:
    """What the attacker holds and how hard it trains. The defaults are the converged
    budget (bench/bench_attack_convergence.py: doubling it moves the mean best accuracy
    by less than 0.01 on the reference designs)."""

    profile: str = "breach"  # one of PROFILES
    fraction: float = 0.05  # labelled share of the task's training split, (0, 1]
    queries: int = 100  # own unlabelled images sent through the public API (query profiles)
    coalition: tuple[str, ...] = ()  # provider names breached together (profile coalition)
    coalition_size: int = 0  # profile coalition, instead of names: every coalition up to this size
    epochs: int = 75  # optimiser passes per restart (full batch: steps)
    restarts: int = 24  # restarts per trainable strategy (LRS cycled), probabilities averaged
    lrs: tuple[float, ...] = DEFAULT_LRS
    full_batch_max: int = 1024  # train full-batch when the data has at most this many rows
    batch_size: int = 64  # the minibatch size above full_batch_max
    traffic: int = 200  # in-process evaluations: users' rows in each provider's log
    know_architecture: bool = True  # Kerckhoffs; False: guess the rest of the design
    strategies: tuple[str, ...] = ()  # restrict to these strategies (default: all of the profile)
    batched: bool = True  # train models of one architecture together (qumos.stacked)

    def validate(
        self, n_providers: int | None = None, providers: list[str] | None = None
    ) -> AttackConfig:
        """Raise AttackError naming the field; returns self."""
        if self.profile not in PROFILES:
            raise AttackError(
                f"profile: unknown profile {self.profile!r}; allowed: {list(PROFILES)}"
            )
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            raise AttackError(f"fraction: is {self.fraction}; allowed: (0, 1]")
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise AttackError(f"epochs: is {self.epochs}; allowed: 1 to {MAX_EPOCHS}")
        if not 1 <= self.restarts <= MAX_RESTARTS:
            raise AttackError(f"restarts: is {self.restarts}; allowed: 1 to {MAX_RESTARTS}")
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise AttackError(f"lrs: is {list(self.lrs)}; allowed: one or more numbers > 0")
        if self.profile in QUERY_PROFILES and not 1 <= self.queries <= MAX_QUERIES:
            raise AttackError(
                f"queries: is {self.queries}; profile {self.profile} sends 1 to "
                f"{MAX_QUERIES} queries"
            )
        if self.queries < 0:
            raise AttackError(f"queries: is {self.queries}; allowed: >= 0")
        if self.batch_size < 1 or self.full_batch_max < 1:
            raise AttackError("batch_size and full_batch_max: allowed >= 1")
        if self.traffic < 0:
            raise AttackError(f"traffic: is {self.traffic}; allowed: >= 0")
        if self.profile == "coalition":
            self._validate_coalition(n_providers, providers)
        elif self.coalition or self.coalition_size:
            field = "coalition" if self.coalition else "coalition_size"
            raise AttackError(
                f"{field}: only profile coalition takes a coalition (profile is {self.profile})"
            )
        allowed = strategies_of(self.profile)
        for s in self.strategies:
            if s not in allowed:
                raise AttackError(
                    f"strategies: unknown strategy {s!r} for profile "
                    f"{self.profile}; allowed: {list(allowed)}"
                )
        return self

    def _validate_coalition(self, n_providers: int | None, providers: list[str] | None) -> None:
        if bool(self.coalition) == bool(self.coalition_size):
            raise AttackError(
                "coalition: profile coalition needs the breached providers, e.g. "
                "provider-a,provider-c, or (coalition_size) a number m: every coalition of "
                "up to m providers in turn, the worst counts; not both"
            )
        if self.coalition_size:
            # no upper bound: a design of at most m providers is held whole by the
            # coalition (the centralized design of an experiment, a 2-fragment design)
            if self.coalition_size < 1:
                raise AttackError(f"coalition_size: is {self.coalition_size}; allowed: 1 or more")
            return
        if len(set(self.coalition)) != len(self.coalition):
            raise AttackError(f"coalition: names a provider twice: {list(self.coalition)}")
        if providers is not None:
            unknown = [p for p in self.coalition if p not in providers]
            if unknown:
                raise AttackError(
                    f"coalition: {unknown} not in the design; its providers are {providers}"
                )
        if n_providers is not None and len(self.coalition) >= n_providers:
            raise AttackError(
                f"coalition: breaches {len(self.coalition)} of "
                f"{n_providers} providers; a coalition holds fewer than all "
                "(all of them hold the whole model)"
            )

    def lr(self, restart: int) -> float:
        return self.lrs[restart % len(self.lrs)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["coalition"] = list(self.coalition)
        d["lrs"] = list(self.lrs)
        d["strategies"] = list(self.strategies)
        return d


@dataclass
class ScoreContext:
    """The harness's side (never shown to the attacker): how thefts are scored."""

    victim_acc: float
    victim_test: object = None  # the victim's labels on the test split (fidelity)
    extras: dict = field(default_factory=dict)
