"""The attacker: breach one provider, rebuild the model, measure the theft.

Threat model (DESIGN.md section 3, the project's documented assumptions):

- The adversary breaches exactly one provider j and gets everything it holds
  (`Holdings`): fragment j's operations and trained parameters, and the provider's
  access log. It does not get the glue, the head or the other fragments.
- Kerckhoffs (default, `AttackBudget.know_architecture=True`): it knows the design
  (number of fragments, its fragment's position, block types, depths, glue form, head
  kind) but none of the other trained values. With `know_architecture=False` it must
  guess: `index + 2` fragments (it assumes one more fragment follows its own), every
  missing fragment a copy of the stolen fragment's block type, depth and width, tanh
  glue, and a trainable linear head.
- Its labelled data: a seeded, stratified random `fraction` of the task's training
  split (`attacker_data`). The task's test split (same split seed as the victim) is
  used only to *score* the theft, never to choose anything.
- Restarts: every strategy trains `restarts` times from different random
  initialisations and keeps the restart with the best accuracy on the attacker's own
  labelled data (ties: lower cross-entropy on it). With a 5% budget that is ~20
  samples, too few to hold a part out, so the selection data is the training subset
  itself; within a restart `qumos.train.fit` likewise keeps the best epoch on it.

Strategies (each a function below):
    scratch    the whole (known or guessed) architecture from random initialisation
    substitute stolen fragment frozen in place; other fragments, glue, head trained anew
    finetune   as substitute, but the stolen parameters train too (initialised stolen)
    head_only  the stolen fragment as a frozen feature extractor with classical layers
               only around it: position 0: features -> Q -> linear head; position > 0:
               features -> pi*tanh(linear) -> Q -> linear head
    query      black box: label unlabelled training images (not in the attacker's
               labelled subset, at most `queries`) with the victim's public API answers,
               train the scratch architecture on them plus the labelled subset.
               Reported for context; not part of A_j (splitting cannot stop it).

Metrics, per seed s and breached provider j:
    A_j(s)    = max over the white-box strategies of their test accuracy
    S(s)      = scratch test accuracy
    leak_j(s) = clip((A_j(s) - S(s)) / (acc_victim - S(s)), 0, 1); when
                acc_victim <= S(s) the formula is undefined and leak_j(s) is 1 if
                A_j(s) >= acc_victim (the attacker holds a model as good as the victim's)
                else 0
    security(s) = 1 - max_j leak_j(s)
Reported figures are the mean and the (population, ddof=0) standard deviation of these
per-seed values over the seeds; `acc_victim` is the victim's single measured test
accuracy. Fidelity = label agreement with the victim on the test set.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from qumos.artifact import FragmentFile
from qumos.datasets import TaskData
from qumos.errors import AttackError
from qumos.model import DistributedQNN, predict_proba
from qumos.spec import (
    Design,
    FragmentDesign,
    ModelSpec,
    build_spec,
    design_of,
)
from qumos.torchsim import FragmentSim
from qumos.train import TrainConfig, fit
from torch import nn

__all__ = [
    "STRATEGIES",
    "WHITE_BOX",
    "AttackBudget",
    "Holdings",
    "ProviderReport",
    "SecurityReport",
    "StrategyResult",
    "attack_provider",
    "attacker_data",
    "breach",
    "evaluate_security",
    "finetune",
    "head_only",
    "holdings_from_spec",
    "leak_value",
    "query",
    "run_strategy",
    "scratch",
    "security_report_table",
    "substitute",
    "victim_predictor",
]

WHITE_BOX = ("substitute", "finetune", "head_only")
STRATEGIES = ("scratch",) + WHITE_BOX + ("query",)
MAX_EPOCHS = 500
MAX_RESTARTS = 20

VictimPredict = Callable[[np.ndarray], np.ndarray]  # raw images (N, H*W) -> labels (N,) or probs (N, C)
Progress = Callable[[dict], None]


@dataclass
class AttackBudget:
    fraction: float = 0.05  # labelled fraction of the training set, in (0, 1]
    epochs: int = 30  # attacker training epochs per restart
    restarts: int = 3  # best of R random restarts, chosen on the attacker's own data
    queries: int = 500  # public API queries for `query`
    lr: float = 0.03  # Adam learning rate
    batch_size: int = 16
    know_architecture: bool = True  # Kerckhoffs; False = guess the missing architecture

    def validate(self) -> AttackBudget:
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            raise AttackError(f"budget.fraction is {self.fraction}; allowed: (0, 1]")
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise AttackError(f"budget.epochs is {self.epochs}; allowed: 1 to {MAX_EPOCHS}")
        if not 1 <= self.restarts <= MAX_RESTARTS:
            raise AttackError(f"budget.restarts is {self.restarts}; allowed: 1 to {MAX_RESTARTS}")
        if self.queries < 0:
            raise AttackError(f"budget.queries is {self.queries}; allowed: >= 0")
        if not self.lr > 0:
            raise AttackError(f"budget.lr is {self.lr}; allowed: > 0")
        if self.batch_size < 1:
            raise AttackError(f"budget.batch_size is {self.batch_size}; allowed: >= 1")
        return self


@dataclass
class Holdings:
    """Exactly what one breached provider holds."""

    provider: str
    fragments: list[FragmentFile]  # index = position in the chain
    access_log: list[dict] = field(default_factory=list)

    def fragment(self, model: str | None = None) -> FragmentFile:
        """The stolen fragment (of `model`, if the provider hosts several)."""
        cands = [f for f in self.fragments if model is None or f.model == model]
        if not cands:
            have = sorted({f.model for f in self.fragments})
            raise AttackError(f"model: provider {self.provider!r} holds no fragment of "
                              f"{model!r}; it holds fragments of {have}")
        if len(cands) > 1:
            have = [f.fragment_id for f in cands]
            raise AttackError(f"model: provider {self.provider!r} holds several fragments "
                              f"({have}); name the model")
        return cands[0]


def breach(provider_dir: Path | str) -> Holdings:
    """Read what one provider holds from its data directory, and nothing else."""
    from qumos.store import ProviderStore, StoreError

    try:
        store = ProviderStore.open_existing(provider_dir)
    except StoreError as e:
        raise AttackError(f"breach: {e}; give the data directory of one provider "
                          "(it holds provider.json, fragments/ and access.jsonl)") from None
    frags, problems = store.load_all()
    if not frags:
        extra = f" (unreadable: {'; '.join(problems)})" if problems else ""
        raise AttackError(f"breach: provider {store.name!r} at {provider_dir} holds no "
                          f"fragment{extra}")
    return Holdings(provider=store.name, fragments=sorted(frags.values(),
                                                          key=lambda f: (f.model, f.index)),
                    access_log=store.read_log())


def holdings_from_spec(victim: ModelSpec, j: int) -> Holdings:
    """What provider j would hold if `victim` were deployed (in process, no files)."""
    if not 0 <= j < victim.n_fragments:
        raise AttackError(f"provider: index {j} out of range; the model has "
                          f"{victim.n_fragments} fragments")
    if victim.fragments[j].params is None:
        raise AttackError(f"fragments[{j}]: untrained; nothing to steal")
    ff = FragmentFile(model=victim.name, index=j, provider=victim.placement[j],
                      fragment=victim.fragments[j])
    return Holdings(provider=victim.placement[j], fragments=[ff], access_log=[])


# ----- data -------------------------------------------------------------------------------
@dataclass
class AttackerData:
    x: np.ndarray  # (n, 16) features of the labelled subset
    y: np.ndarray  # (n,)
    unlabelled: np.ndarray  # indices into data.train not in the subset, seeded order


def attacker_data(data: TaskData, fraction: float, seed: int) -> AttackerData:
    """A seeded random `fraction` of data.train, stratified by class (at least one per
    class); the rest of data.train, shuffled, is the unlabelled pool for `query`."""
    rng = np.random.default_rng(10_007 + seed)
    y = data.train.y
    n_total = len(y)
    n_want = max(1, int(round(fraction * n_total)))
    classes = np.unique(y)
    chosen: list[int] = []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        k = max(1, int(round(n_want * len(idx) / n_total)))
        chosen.extend(idx[:k].tolist())
    chosen_arr = rng.permutation(np.array(sorted(chosen)))
    rest = np.setdiff1d(np.arange(n_total), chosen_arr)
    return AttackerData(x=data.train.x[chosen_arr], y=y[chosen_arr],
                        unlabelled=rng.permutation(rest))


# ----- architectures ------------------------------------------------------------------------
def attacker_arch(stolen: FragmentFile, victim_arch: ModelSpec | None,
                  budget: AttackBudget, dataset: str, task: int) -> ModelSpec:
    """The untrained architecture the attacker builds around its fragment."""
    j = stolen.index
    if budget.know_architecture:
        if victim_arch is None:
            raise AttackError("design: the Kerckhoffs attacker needs the victim's design "
                              "(or set know_architecture false)")
        design = design_of(victim_arch)
        if j >= len(design.fragments):
            raise AttackError(f"design: has {len(design.fragments)} fragments; the stolen "
                              f"fragment is at position {j}")
        f = stolen.fragment
        want = design.fragments[j]
        if (f.n_qubits, f.block, f.depth, f.entanglement) != (
                want.n_qubits, want.block, want.depth, want.entanglement):
            raise AttackError(f"design: fragments[{j}] is {want.block}:{want.depth} on "
                              f"{want.n_qubits} qubits ({want.entanglement}); the stolen "
                              f"fragment is {f.block}:{f.depth} on {f.n_qubits} "
                              f"({f.entanglement})")
    else:
        f = stolen.fragment
        fd = FragmentDesign(n_qubits=max(f.n_qubits, 4), block=f.block, depth=f.depth,
                            entanglement=f.entanglement)
        frags = [fd.model_copy() for _ in range(j + 2)]
        frags[j] = FragmentDesign(n_qubits=f.n_qubits, block=f.block, depth=f.depth,
                                  entanglement=f.entanglement)
        design = Design(dataset=dataset, task=task, fragments=frags, glue="tanh",
                        head="linear")
    return build_spec(design, name="attacker")


def _strip(spec: ModelSpec) -> ModelSpec:
    """The architecture only: every trained value removed."""
    return build_spec(design_of(spec), name="attacker")


class HeadOnly(nn.Module):
    """features -> [pi*tanh(linear)] -> frozen stolen Q -> linear head -> logits."""

    def __init__(self, stolen: FragmentFile, n_features: int, n_classes: int, seed: int):
        super().__init__()
        f = stolen.fragment
        torch.manual_seed(seed)
        self.sim = FragmentSim(f)
        self.register_buffer("w", torch.tensor(f.params, dtype=torch.float32))
        self.pre = nn.Linear(n_features, f.n_inputs) if stolen.index > 0 else None
        if self.pre is None and f.n_inputs != n_features:
            raise AttackError(f"fragment at position 0 takes {f.n_inputs} inputs; the task "
                              f"has {n_features} features")
        self.head = nn.Linear(f.n_qubits, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x if self.pre is None else math.pi * torch.tanh(self.pre(x))
        return self.head(self.sim(a, self.w))


# ----- results --------------------------------------------------------------------------------
@dataclass
class StrategyResult:
    strategy: str
    seed: int
    provider: str | None
    index: int | None  # the stolen fragment's position (None for scratch)
    test_acc: float
    fidelity: float | None  # label agreement with the victim on the test set
    attacker_data_acc: float  # accuracy on the attacker's own labelled data (selection)
    seconds: float
    restart_accs: list[float] = field(default_factory=list)  # own-data acc per restart
    n_labelled: int = 0
    n_queries: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _ctx(progress: Progress | None, **info) -> Callable[[int, int, float], None] | None:
    if progress is None:
        return None

    def cb(epoch: int, epochs: int, val: float) -> None:
        progress({**info, "epoch": epoch, "epochs": epochs, "own_acc": val})
    return cb


def _train_restarts(make_model: Callable[[int], nn.Module], x: np.ndarray, y: np.ndarray,
                    x_sel: np.ndarray, y_sel: np.ndarray, budget: AttackBudget, seed: int,
                    progress: Progress | None, info: dict) -> tuple[nn.Module, list[float]]:
    """Best of `budget.restarts` restarts by accuracy on (x_sel, y_sel), ties by loss."""
    best, best_key, accs = None, None, []
    xs = torch.as_tensor(x_sel, dtype=torch.float32)
    ys = torch.as_tensor(y_sel, dtype=torch.long)
    for r in range(budget.restarts):
        rseed = 1000 * seed + r
        model = make_model(rseed)
        cfg = TrainConfig(epochs=budget.epochs, lr=budget.lr, batch_size=budget.batch_size,
                          seed=rseed)
        res = fit(model, x, y, x_sel, y_sel, cfg, _ctx(progress, **info, restart=r))
        with torch.no_grad():
            loss = float(nn.functional.cross_entropy(model(xs), ys))
        accs.append(res.val_acc)
        key = (res.val_acc, -loss)
        if best_key is None or key > best_key:
            best, best_key = copy.deepcopy(model), key
    assert best is not None
    return best, accs


def _score(strategy: str, model: nn.Module, data: TaskData, own: AttackerData, seed: int,
           t0: float, accs: list[float], victim_test: np.ndarray | None,
           stolen: FragmentFile | None, n_queries: int = 0) -> StrategyResult:
    pred = predict_proba(model, data.test.x).argmax(1).numpy()
    own_pred = predict_proba(model, own.x).argmax(1).numpy()
    return StrategyResult(
        strategy=strategy, seed=seed,
        provider=stolen.provider if stolen else None, index=stolen.index if stolen else None,
        test_acc=float((pred == data.test.y).mean()),
        fidelity=None if victim_test is None else float((pred == victim_test).mean()),
        attacker_data_acc=float((own_pred == own.y).mean()),
        seconds=time.perf_counter() - t0, restart_accs=accs, n_labelled=len(own.y),
        n_queries=n_queries)


def _labels(out: np.ndarray) -> np.ndarray:
    out = np.asarray(out)
    return out.argmax(1) if out.ndim == 2 else out.astype(int)


def _setup(holdings: Holdings | None, victim_arch: ModelSpec | None, data: TaskData,
           budget: AttackBudget, model: str | None = None):
    budget.validate()
    stolen = holdings.fragment(model) if holdings is not None else None
    if stolen is not None and stolen.fragment.params is None:
        raise AttackError(f"provider {holdings.provider!r}: fragment {stolen.fragment_id} "
                          "has no trained parameters")
    return stolen


def scratch(holdings: Holdings | None, victim_arch: ModelSpec | None, data: TaskData,
            budget: AttackBudget, seed: int, victim_test: np.ndarray | None = None,
            progress: Progress | None = None, model: str | None = None) -> StrategyResult:
    """The whole architecture from random initialisation on the labelled budget (the
    reference: what the attacker gets without any theft)."""
    t0 = time.perf_counter()
    stolen = _setup(holdings, victim_arch, data, budget, model)
    if budget.know_architecture or stolen is None:
        if victim_arch is None:
            raise AttackError("design: scratch needs the victim's design "
                              "(or a breached fragment to guess from)")
        arch = _strip(victim_arch)
    else:
        arch = attacker_arch(stolen, None, budget, data.dataset, data.task)
    own = attacker_data(data, budget.fraction, seed)
    best, accs = _train_restarts(lambda s: DistributedQNN(arch, seed=s), own.x, own.y,
                                 own.x, own.y, budget, seed, progress,
                                 {"strategy": "scratch", "seed": seed})
    return _score("scratch", best, data, own, seed, t0, accs, victim_test, None)


def _with_stolen(holdings, victim_arch, data, budget, seed, victim_test, progress, model,
                 name: str, frozen: bool) -> StrategyResult:
    t0 = time.perf_counter()
    stolen = _setup(holdings, victim_arch, data, budget, model)
    if stolen is None:
        raise AttackError(f"{name}: needs a breached provider's holdings")
    arch = attacker_arch(stolen, victim_arch, budget, data.dataset, data.task)
    j = stolen.index

    def make(s: int) -> nn.Module:
        m = DistributedQNN(arch, seed=s)
        m.set_fragment(j, stolen.fragment)
        m.freeze_fragment(j, frozen)
        return m

    own = attacker_data(data, budget.fraction, seed)
    best, accs = _train_restarts(make, own.x, own.y, own.x, own.y, budget, seed, progress,
                                 {"strategy": name, "seed": seed, "provider": holdings.provider})
    return _score(name, best, data, own, seed, t0, accs, victim_test, stolen)


def substitute(holdings: Holdings, victim_arch: ModelSpec | None, data: TaskData,
               budget: AttackBudget, seed: int, victim_test: np.ndarray | None = None,
               progress: Progress | None = None, model: str | None = None) -> StrategyResult:
    """Stolen fragment frozen at its position; the other fragments, glue and head are
    trained from random initialisation."""
    return _with_stolen(holdings, victim_arch, data, budget, seed, victim_test, progress,
                        model, "substitute", frozen=True)


def finetune(holdings: Holdings, victim_arch: ModelSpec | None, data: TaskData,
             budget: AttackBudget, seed: int, victim_test: np.ndarray | None = None,
             progress: Progress | None = None, model: str | None = None) -> StrategyResult:
    """As `substitute`, but the stolen parameters (initialised to the stolen values)
    are trained too."""
    return _with_stolen(holdings, victim_arch, data, budget, seed, victim_test, progress,
                        model, "finetune", frozen=False)


def head_only(holdings: Holdings, victim_arch: ModelSpec | None, data: TaskData,
              budget: AttackBudget, seed: int, victim_test: np.ndarray | None = None,
              progress: Progress | None = None, model: str | None = None) -> StrategyResult:
    """The stolen fragment as a frozen feature extractor with classical layers only
    around it (see the module docstring). Needs no architecture knowledge."""
    t0 = time.perf_counter()
    stolen = _setup(holdings, victim_arch, data, budget, model)
    if stolen is None:
        raise AttackError("head_only: needs a breached provider's holdings")
    n_classes = len(data.classes)
    own = attacker_data(data, budget.fraction, seed)
    best, accs = _train_restarts(
        lambda s: HeadOnly(stolen, data.train.x.shape[1], n_classes, s), own.x, own.y,
        own.x, own.y, budget, seed, progress,
        {"strategy": "head_only", "seed": seed, "provider": holdings.provider})
    return _score("head_only", best, data, own, seed, t0, accs, victim_test, stolen)


def query(holdings: Holdings | None, victim_arch: ModelSpec | None, data: TaskData,
          budget: AttackBudget, seed: int, victim_test: np.ndarray | None = None,
          progress: Progress | None = None, model: str | None = None,
          victim_predict: VictimPredict | None = None) -> StrategyResult:
    """Black-box extraction: label up to `budget.queries` unlabelled training images
    with the victim's answers (`victim_predict(raw images)`), train the scratch
    architecture on them plus the labelled subset; restarts chosen on the labelled
    subset."""
    t0 = time.perf_counter()
    stolen = _setup(holdings, victim_arch, data, budget, model)
    if victim_predict is None:
        raise AttackError("query: needs the victim's public prediction API "
                          "(set the orchestrator URL)")
    if victim_arch is None:
        if stolen is None:
            raise AttackError("design: query needs the victim's design")
        arch = attacker_arch(stolen, None, AttackBudget(know_architecture=False), data.dataset,
                             data.task)
    else:
        arch = _strip(victim_arch)
    own = attacker_data(data, budget.fraction, seed)
    idx = own.unlabelled[:budget.queries]
    qy = _labels(victim_predict(data.train.raw[idx])) if len(idx) else np.zeros(0, int)
    x = np.concatenate([own.x, data.train.x[idx]])
    y = np.concatenate([own.y, qy])
    best, accs = _train_restarts(lambda s: DistributedQNN(arch, seed=s), x, y, own.x, own.y,
                                 budget, seed, progress, {"strategy": "query", "seed": seed})
    return _score("query", best, data, own, seed, t0, accs, victim_test, stolen,
                  n_queries=len(idx))


_FUNCS = {"scratch": scratch, "substitute": substitute, "finetune": finetune,
          "head_only": head_only, "query": query}


def run_strategy(name: str, holdings: Holdings | None, victim_arch: ModelSpec | None,
                 data: TaskData, budget: AttackBudget, seed: int,
                 victim_predict: VictimPredict | None = None,
                 victim_test: np.ndarray | None = None, progress: Progress | None = None,
                 model: str | None = None) -> StrategyResult:
    """Run one strategy for one seed. `victim_test` (the victim's labels on data.test)
    gives the fidelity; without it, `victim_predict` on the test images is used."""
    if name not in _FUNCS:
        raise AttackError(f"strategies: unknown strategy {name!r}; allowed: {list(STRATEGIES)}")
    torch.set_num_threads(1)
    if victim_test is None and victim_predict is not None:
        victim_test = _labels(victim_predict(data.test.raw))
    kw = dict(victim_test=victim_test, progress=progress, model=model)
    if name == "query":
        kw["victim_predict"] = victim_predict
    return _FUNCS[name](holdings, victim_arch, data, budget, seed, **kw)


def victim_predictor(victim: ModelSpec) -> VictimPredict:
    """The victim's public answers, in process: raw images -> class probabilities."""
    from qumos.chain import preprocess

    net = DistributedQNN(victim)
    return lambda raw: predict_proba(net, preprocess(np.asarray(raw), victim.preprocess)).numpy()


# ----- metrics and the security report --------------------------------------------------------
def leak_value(a: float, s: float, acc_victim: float) -> float:
    """leak = clip((A - S) / (acc_victim - S), 0, 1); 1 if acc_victim <= S and A >=
    acc_victim, else 0 in that degenerate case."""
    den = acc_victim - s
    if den <= 1e-12:
        return 1.0 if a >= acc_victim - 1e-12 else 0.0
    return float(min(1.0, max(0.0, (a - s) / den)))


def _ms(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return (float("nan"), float("nan"))
    return (float(arr.mean()), float(arr.std()))


@dataclass
class ProviderReport:
    provider: str
    index: int
    by_strategy: dict[str, dict]  # name -> {acc_mean, acc_std, fidelity_mean, ...}
    A: tuple[float, float]  # (mean, std) over seeds of the best white-box accuracy
    leak: tuple[float, float]  # (mean, std) over seeds of leak_j
    best_strategy: str = ""  # the white-box strategy most often best


@dataclass
class SecurityReport:
    victim_acc: float
    scratch: tuple[float, float]
    per_provider: list[ProviderReport]
    security: tuple[float, float]
    seconds: float
    seeds: list[int] = field(default_factory=list)
    budget: dict = field(default_factory=dict)
    strategies: list[str] = field(default_factory=list)
    model: str = ""
    design: str = ""
    runs: list[dict] = field(default_factory=list)  # every StrategyResult as a dict

    @property
    def worst_leak(self) -> tuple[float, float]:
        """max_j leak_j per seed, then mean and std over seeds (= 1 - security). This is
        at least the largest per-provider mean leak (the worst provider may differ per
        seed)."""
        return (1.0 - self.security[0], self.security[1])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["worst_leak"] = list(self.worst_leak)
        return _jsonable(d)


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def summarize(runs: Sequence[StrategyResult], victim_acc: float, seeds: Sequence[int],
              strategies: Sequence[str], providers: Sequence[tuple[str, int]]) -> dict:
    """Per-provider figures from the per-seed runs (see the module docstring)."""
    by = {(r.strategy, r.index, r.seed): r for r in runs}
    s_by_seed = {s: by[("scratch", None, s)].test_acc for s in seeds if ("scratch", None, s) in by}
    per: list[ProviderReport] = []
    leaks_by_seed: dict[int, list[float]] = {s: [] for s in seeds}
    for name, j in providers:
        bs: dict[str, dict] = {}
        for st in strategies:
            jj = None if st == "scratch" else j  # scratch does not depend on the breach
            rs = [by[(st, jj, s)] for s in seeds if (st, jj, s) in by]
            if not rs:
                continue
            am, asd = _ms([r.test_acc for r in rs])
            fm, fsd = _ms([r.fidelity for r in rs])
            bs[st] = {"acc_mean": am, "acc_std": asd, "fidelity_mean": fm, "fidelity_std": fsd,
                      "own_acc_mean": _ms([r.attacker_data_acc for r in rs])[0],
                      "seconds": float(sum(r.seconds for r in rs)), "n_seeds": len(rs)}
        a_vals, l_vals, winners = [], [], []
        for s in seeds:
            wb = [by[(st, j, s)] for st in WHITE_BOX if (st, j, s) in by]
            if not wb or s not in s_by_seed:
                continue
            top = max(wb, key=lambda r: r.test_acc)
            a_vals.append(top.test_acc)
            winners.append(top.strategy)
            lk = leak_value(top.test_acc, s_by_seed[s], victim_acc)
            l_vals.append(lk)
            leaks_by_seed[s].append(lk)
        best = max(set(winners), key=winners.count) if winners else ""
        per.append(ProviderReport(provider=name, index=j, by_strategy=bs, A=_ms(a_vals),
                                  leak=_ms(l_vals), best_strategy=best))
    sec = [1.0 - max(v) for v in leaks_by_seed.values() if v]
    return {"scratch": _ms(list(s_by_seed.values())), "per_provider": per,
            "security": _ms(sec)}


def _job(args) -> StrategyResult:
    name, holdings, victim_arch, data, budget, seed, victim_test, victim = args
    torch.set_num_threads(1)
    vp = victim_predictor(victim) if (name == "query" and victim is not None) else None
    return run_strategy(name, holdings, victim_arch, data, budget, seed, victim_predict=vp,
                        victim_test=victim_test)


def evaluate_security(victim: ModelSpec, data: TaskData, budget: AttackBudget,
                      seeds: Sequence[int], strategies: Sequence[str] = WHITE_BOX,
                      providers: Sequence[int] | None = None,
                      progress: Progress | None = None, workers: int = 1) -> SecurityReport:
    """Breach every provider in `providers` (default: all) in turn and measure the theft.

    For each seed: scratch once (it does not depend on the breach), then every strategy
    against every breached provider. Figures are per-seed values aggregated as mean and
    population std over seeds (module docstring). `workers > 1` runs the (strategy,
    provider, seed) jobs in a spawn process pool, one torch thread each; progress is then
    reported per finished job (with `epoch` only when workers == 1).
    """
    t0 = time.perf_counter()
    budget.validate()
    if not seeds:
        raise AttackError("seeds: give at least one seed")
    strategies = list(strategies)
    for st in strategies:
        if st not in STRATEGIES:
            raise AttackError(f"strategies: unknown strategy {st!r}; allowed: {list(STRATEGIES)}")
    if not victim.is_trained():
        raise AttackError("victim: the model is not trained")
    torch.set_num_threads(1)
    js = list(range(victim.n_fragments)) if providers is None else list(providers)
    for j in js:
        if not 0 <= j < victim.n_fragments:
            raise AttackError(f"providers: index {j} out of range; the model has "
                              f"{victim.n_fragments} fragments")
    vp = victim_predictor(victim)
    victim_test = _labels(vp(data.test.raw))
    victim_acc = float((victim_test == data.test.y).mean())
    arch = victim if budget.know_architecture else None
    jobs = [("scratch", None, victim, data, budget, s, victim_test, victim) for s in seeds]
    for j in js:
        h = holdings_from_spec(victim, j)
        for st in strategies:
            if st == "scratch":
                continue
            jobs += [(st, h, arch, data, budget, s, victim_test, victim) for s in seeds]
    # `victim` goes to scratch/query as the architecture (stripped inside) and to query as
    # the public API; white-box strategies see only `arch` (None when guessing).
    runs: list[StrategyResult] = []
    total = len(jobs)

    def report(r: StrategyResult) -> None:
        runs.append(r)
        if progress:
            progress({"done": len(runs), "total": total, "strategy": r.strategy,
                      "provider": r.provider, "seed": r.seed, "test_acc": r.test_acc})

    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(_job, j) for j in jobs]
            for f in as_completed(futs):
                report(f.result())
    else:
        for name, h, a, d, b, s, vt, v in jobs:
            vpj = vp if name == "query" else None

            def cb(info: dict, _n=name, _h=h) -> None:
                if progress:
                    progress({**info, "done": len(runs), "total": total,
                              "provider": _h.provider if _h else None})
            report(run_strategy(name, h, a, d, b, s, victim_predict=vpj, victim_test=vt,
                                progress=cb if progress else None))
    runs.sort(key=lambda r: (STRATEGIES.index(r.strategy), r.index or 0, r.seed))
    prov = [(victim.placement[j], j) for j in js]
    all_st = ["scratch"] + [s for s in strategies if s != "scratch"]
    summ = summarize(runs, victim_acc, list(seeds), all_st, prov)
    return SecurityReport(victim_acc=victim_acc, scratch=summ["scratch"],
                          per_provider=summ["per_provider"], security=summ["security"],
                          seconds=time.perf_counter() - t0, seeds=list(seeds),
                          budget=asdict(budget), strategies=all_st, model=victim.name,
                          design=design_of(victim).short(), runs=[r.to_dict() for r in runs])


def attack_provider(holdings: Holdings, victim_arch: ModelSpec | None, data: TaskData,
                    budget: AttackBudget, seeds: Sequence[int],
                    strategies: Sequence[str] = ("scratch",) + WHITE_BOX,
                    victim_predict: VictimPredict | None = None,
                    victim_acc: float | None = None, model: str | None = None,
                    progress: Progress | None = None) -> dict:
    """One breached provider (the service's and CLI's job): every strategy for every
    seed, then A_j, S and leak_j. `victim_acc` (if not given) is measured through
    `victim_predict` on the test set; without either, leak is None. Returns a JSON-able
    dict with `runs`, `by_strategy`, `A`, `S`, `leak`, `victim_acc`."""
    t0 = time.perf_counter()
    budget.validate()
    if not seeds:
        raise AttackError("seeds: give at least one seed")
    for st in strategies:
        if st not in STRATEGIES:
            raise AttackError(f"strategies: unknown strategy {st!r}; allowed: {list(STRATEGIES)}")
    stolen = holdings.fragment(model)
    victim_test = None
    if victim_predict is not None:
        victim_test = _labels(victim_predict(data.test.raw))
        if victim_acc is None:
            victim_acc = float((victim_test == data.test.y).mean())
    strategies = ["scratch"] + [s for s in strategies if s != "scratch"]
    runs: list[StrategyResult] = []
    total = len(strategies) * len(seeds)
    for st in strategies:
        for s in seeds:
            def cb(info: dict) -> None:
                if progress:
                    progress({**info, "done": len(runs), "total": total,
                              "provider": holdings.provider})
            runs.append(run_strategy(st, holdings, victim_arch, data, budget, s,
                                     victim_predict=victim_predict, victim_test=victim_test,
                                     progress=cb, model=stolen.model))
            if progress:
                progress({"done": len(runs), "total": total, "strategy": st, "seed": s,
                          "provider": holdings.provider})
    summ = summarize(runs, victim_acc if victim_acc is not None else float("nan"),
                     list(seeds), strategies, [(holdings.provider, stolen.index)])
    pr = summ["per_provider"][0]
    out = {"provider": holdings.provider, "index": stolen.index, "model": stolen.model,
           "victim_acc": victim_acc, "by_strategy": pr.by_strategy, "A": pr.A,
           "S": summ["scratch"],
           "leak": pr.leak if victim_acc is not None else None,
           "security": summ["security"] if victim_acc is not None else None,
           "best_strategy": pr.best_strategy,
           "seeds": list(seeds), "budget": asdict(budget), "strategies": strategies,
           "seconds": time.perf_counter() - t0, "runs": [r.to_dict() for r in runs]}
    return _jsonable(out)


def security_report_table(report: SecurityReport | dict) -> str:
    """A markdown table of a SecurityReport (the demo prints this)."""
    d = report.to_dict() if isinstance(report, SecurityReport) else report
    sts = [s for s in d.get("strategies", []) if s != "scratch"]

    def f(m, s=None) -> str:
        if m is None:
            return "-"
        return f"{m:.3f}" if s is None else f"{m:.3f} ± {s:.3f}"
    lines = [f"model {d.get('model', '')} ({d.get('design', '')}); victim accuracy "
             f"{f(d['victim_acc'])}; attacker from scratch {f(*d['scratch'])}; "
             f"seeds {d.get('seeds')}; budget fraction {d.get('budget', {}).get('fraction')}",
             "",
             "| provider | fragment | " + " | ".join(sts) + " | A_j | scratch S | leak_j |",
             "|---|---|" + "---|" * len(sts) + "---|---|---|"]
    for p in d["per_provider"]:
        cells = [f(p["by_strategy"][s]["acc_mean"], p["by_strategy"][s]["acc_std"])
                 if s in p["by_strategy"] else "-" for s in sts]
        lines.append(f"| {p['provider']} | {p['index']} | " + " | ".join(cells) +
                     f" | {f(*p['A'])} | {f(*d['scratch'])} | {f(*p['leak'])} |")
    lines += ["", f"security = 1 - max_j leak_j = {f(*d['security'])} "
              f"(mean ± std over {len(d.get('seeds', []))} seeds)"]
    return "\n".join(lines)
