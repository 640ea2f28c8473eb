"""How every trainable strategy trains: converged, restarted, selected on own data only.

- Full batch when the data has at most `cfg.full_batch_max` rows (the attacker's ~22
  labelled images, plus its queries and log rows), else minibatches of `cfg.batch_size`.
- `cfg.restarts` restarts from different random initialisations, restart r with learning
  rate `cfg.lrs[r % len(cfg.lrs)]`.
- Within a restart, the epoch with the best accuracy on the attacker's own labelled
  images, ties broken by the lower cross-entropy on them (`qumos.train.fit` with
  `select="acc_loss"`). Across restarts, the attacker keeps them all and averages their
  probabilities (`Ensemble`): with ~22 labelled images every restart fits them
  perfectly, and picking the restart with the lowest training loss picked badly
  generalising ones more often the more restarts there were (measured: provider-c of
  `u3cu3:2-2-2`, 0.890 with 3 restarts, 0.678 with 6); the average only improves with
  more restarts. The test split is never looked at.
- Targets are class indices or soft targets (probabilities): labelled images count as
  one-hot rows, the victim's answers to queries and pseudo-labels as given.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from qumos.attack.config import AttackConfig
from qumos.train import TrainConfig, fit
from torch import nn

Progress = Callable[[dict], None]


@dataclass
class Trained:
    """A strategy's selected model and how it was chosen."""

    model: nn.Module
    own_acc: float  # accuracy on the attacker's own labelled images (its selection)
    own_loss: float
    restart_accs: list[float]
    note: str = ""  # e.g. "log held no inputs" when a strategy had nothing to use


def one_hot(y: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(y), n_classes))
    out[np.arange(len(y)), np.asarray(y, dtype=int)] = 1.0
    return out


def as_soft(answers: np.ndarray, n_classes: int) -> np.ndarray:
    """The victim's answers as soft targets: probabilities as given (renormalised after
    rounding), labels as one-hot rows."""
    a = np.asarray(answers, dtype=float)
    if a.ndim == 1:
        return one_hot(a.astype(int), n_classes)
    a = np.clip(a, 0, None)
    s = a.sum(axis=1, keepdims=True)
    return np.where(s > 0, a / np.where(s > 0, s, 1), 1.0 / n_classes)


def join(
    x_lab: np.ndarray,
    y_lab: np.ndarray,
    n_classes: int,
    x_more: np.ndarray | None = None,
    t_more: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labelled rows (one-hot) plus extra rows with soft targets; labelled only -> hard."""
    if x_more is None or len(x_more) == 0:
        return x_lab, y_lab
    return (np.concatenate([x_lab, x_more]), np.concatenate([one_hot(y_lab, n_classes), t_more]))


def own_key(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    with torch.no_grad():
        return _key(model(torch.as_tensor(x, dtype=torch.float32)), y)


class Ensemble(nn.Module):
    """The average of several models' probabilities; forward returns its log (logits).

    With `stacked` and members that are `DistributedQNN`s of one architecture, forward
    runs them as one `qumos.stacked.StackedQNN` (one simulator call per fragment for all
    members; the same figures to float rounding). That stack is a snapshot of the
    members' values when the ensemble is made: an ensemble is for predicting, not for
    training its members further."""

    def __init__(self, models: list[nn.Module], stacked: bool = False):
        super().__init__()
        self.members = nn.ModuleList(models)
        # kept out of the module tree: a frozen copy of the members, not more parameters
        self.__dict__["_stack"] = _stack_of(models) if stacked else None

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(M, B, C): every member's logits on the same rows."""
        stack = self.__dict__["_stack"]
        if stack is not None:
            with torch.no_grad():
                return stack(x.unsqueeze(0).expand(stack.n_models, *x.shape))
        return torch.stack([m(x) for m in self.members])

    @staticmethod
    def combine(member_logits: torch.Tensor) -> torch.Tensor:
        """(M, B, C) members' logits -> (B, C) log of their mean probabilities."""
        p = torch.softmax(member_logits, dim=2).mean(0)
        return torch.log(p.clamp_min(1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.member_logits(x))


def _stack_of(models: list[nn.Module]):
    from qumos.stacked import ArchitectureMismatch, StackedQNN

    try:
        return StackedQNN(models)
    except ArchitectureMismatch:
        return None


def _key(logits: torch.Tensor, y: np.ndarray) -> tuple[float, float]:
    yt = torch.as_tensor(y, dtype=torch.long)
    acc = float((logits.argmax(-1) == yt).double().mean())
    return acc, float(nn.functional.cross_entropy(logits, yt))


def ensemble(
    models: list[nn.Module],
    x_sel: np.ndarray,
    y_sel: np.ndarray,
    note: str = "",
    stacked: bool = False,
) -> Trained:
    """The restarts' average, with its own (acc, loss) and every restart's own accuracy
    on the selection rows. `stacked`: evaluate the restarts as one stacked model."""
    if len(models) == 1:
        model = models[0]
        model.eval()
        acc, loss = own_key(model, x_sel, y_sel)
        return Trained(model=model, own_acc=acc, own_loss=loss, restart_accs=[acc], note=note)
    ens = Ensemble(models, stacked=stacked)
    ens.eval()
    with torch.no_grad():
        logits = ens.member_logits(torch.as_tensor(x_sel, dtype=torch.float32))
        accs = [_key(logits[m], y_sel)[0] for m in range(len(models))]
        acc, loss = _key(Ensemble.combine(logits), y_sel)
    return Trained(model=ens, own_acc=acc, own_loss=loss, restart_accs=accs, note=note)


@dataclass
class Job:
    """One strategy's training for one seed and breach: `cfg.restarts` models made by
    `make(restart_seed)`, trained on (x, t), selected on (x_sel, y_sel), then averaged."""

    make: Callable[[int], nn.Module]
    x: np.ndarray
    t: np.ndarray  # class indices (N,) or soft targets (N, C)
    x_sel: np.ndarray
    y_sel: np.ndarray
    seed: int
    info: dict = field(default_factory=dict)
    lr_scale: float = 1.0  # restart r trains with lr_scale * cfg.lr(r)
    note: str = ""


def _signature(model: nn.Module, t: np.ndarray) -> str | None:
    """Models with equal signatures train together in one `fit_many` call; None: alone."""
    from qumos.model import DistributedQNN
    from qumos.stacked import architecture_of

    if type(model) is not DistributedQNN:
        return None
    return json.dumps([architecture_of(model), np.asarray(t).ndim], sort_keys=True)


def run_jobs(jobs: list[Job], cfg: AttackConfig, progress: Progress | None = None) -> list[Trained]:
    """Train every job's restarts. With `cfg.batched` (the default) the models of one
    architecture, frozen set and target kind -- the restarts, seeds, breaches and
    strategies of an evaluation -- train in one `qumos.stacked.fit_many` call; without,
    one by one with `qumos.train.fit`. Same seeds, same results either way (tested)."""
    from qumos.stacked import fit_many

    entries = []  # (job, restart, model, TrainConfig)
    for i, job in enumerate(jobs):
        n = len(job.x)
        bs = n if n <= cfg.full_batch_max else cfg.batch_size
        for r in range(cfg.restarts):
            rseed = 1000 * job.seed + r
            tc = TrainConfig(
                epochs=cfg.epochs,
                lr=job.lr_scale * cfg.lr(r),
                batch_size=max(bs, 1),
                seed=rseed,
                select="acc_loss",
            )
            entries.append((i, r, job.make(rseed), tc))
    groups: dict[object, list[int]] = {}
    for e, (i, _, model, _) in enumerate(entries):
        sig = _signature(model, jobs[i].t) if cfg.batched else None
        groups.setdefault(sig if sig is not None else ("alone", e), []).append(e)

    def cb_for(e: int):
        if progress is None:
            return None
        i, r = entries[e][0], entries[e][1]

        def cb(epoch: int, total: int, val: float) -> None:
            progress(
                {**jobs[i].info, "restart": r, "epoch": epoch, "epochs": total, "own_acc": val}
            )

        return cb

    for members in groups.values():
        if len(members) == 1:
            (e,) = members
            i, _, model, tc = entries[e]
            j = jobs[i]
            fit(model, j.x, j.t, j.x_sel, j.y_sel, tc, cb_for(e))
            continue
        js = [jobs[entries[e][0]] for e in members]
        cbs = [cb_for(e) for e in members]

        def many_cb(m: int, epoch: int, total: int, val: float, _cbs=cbs) -> None:
            if _cbs[m] is not None:
                _cbs[m](epoch, total, val)

        fit_many(
            [entries[e][2] for e in members],
            [j.x for j in js],
            [j.t for j in js],
            [j.x_sel for j in js],
            [j.y_sel for j in js],
            [entries[e][3] for e in members],
            many_cb if progress else None,
        )
    out = []
    for i, job in enumerate(jobs):
        models = [entries[e][2] for e in range(len(entries)) if entries[e][0] == i]
        out.append(ensemble(models, job.x_sel, job.y_sel, note=job.note, stacked=cfg.batched))
    return out


def train_restarts(
    make: Callable[[int], nn.Module],
    x: np.ndarray,
    t: np.ndarray,
    x_sel: np.ndarray,
    y_sel: np.ndarray,
    cfg: AttackConfig,
    seed: int,
    progress: Progress | None = None,
    info: dict | None = None,
) -> Trained:
    """`cfg.restarts` restarts of `make(restart_seed)` trained on (x, t), averaged."""
    return run_jobs([Job(make, x, t, x_sel, y_sel, seed, info or {})], cfg, progress)[0]


def adam_steps(
    params: Sequence[torch.Tensor], loss_fn: Callable[[], torch.Tensor], steps: int, lr: float
) -> float:
    """Full-batch Adam on `loss_fn` for `steps` steps; returns the last loss (regression
    stages of the log and insider strategies)."""
    opt = torch.optim.Adam(params, lr=lr)
    last = float("nan")
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = float(loss.detach())
    return last


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, batch: int = 2048) -> np.ndarray:
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    outs = [torch.softmax(model(xt[i : i + batch]), dim=1) for i in range(0, len(xt), batch)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0))
