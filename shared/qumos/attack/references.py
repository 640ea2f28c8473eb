"""No-theft references: what the attacker gets without breaching anything.

S, the reference a theft is measured against, is the best of these on the same labelled
data (and, for the query profiles, the same queries):

    scratch       the victim's QNN architecture from random initialisation
    logreg        logistic regression on the standardised images (C by cross-validation
                  on the attacker's own labelled images)
    mlp           a one-hidden-layer MLP on the standardised images (L2 by cross-validation)
    knn           k nearest neighbours on the standardised images (k by leave-one-out)
    distill_qnn   queries: the QNN architecture trained on the victim's answers to the
                  attacker's queries (soft labels when the policy returns probabilities,
                  one-hot top-1 otherwise) plus its labelled images
    distill_mlp   queries: a classical MLP (torch) on the same targets

The classical learners see the images, not the QNN's 16 features: the attacker holds
the images, and a stronger reference is the honest one. They do not depend on the
design, so a fitted one is kept (`classical_cache`, keyed by the learner, the seed and a
digest of the labelled images and labels) and a search fits each once per seed and
attacker budget, not once per design; a cached fit is the very estimator a new fit
would give (every fit is seeded), so no figure changes.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
from qumos.attack.context import Context, strip
from qumos.attack.training import Job, Trained, join, train_restarts
from qumos.model import DistributedQNN
from torch import nn


class Classical:
    """A fitted scikit-learn pipeline behind the strategy interface."""

    def __init__(self, est, own_acc: float, note: str = ""):
        self.est, self.own_acc, self.note = est, own_acc, note

    def predict(self, x: np.ndarray, raw: np.ndarray) -> np.ndarray:
        return self.est.predict(raw)


def _cv_folds(y: np.ndarray) -> int:
    """Stratified folds the labelled images allow (at most 3); below 2, no CV is possible
    (one image of some class) and the first hyperparameter of the grid is used."""
    counts = np.bincount(y.astype(int))
    return int(min(3, counts[counts > 0].min()))


def _fit_cv(make, grid: list, own_raw: np.ndarray, own_y: np.ndarray, seed: int):
    """Choose a hyperparameter by stratified k-fold (k <= 3) accuracy on the labelled images
    (ties: the first in `grid`), refit on all of them."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = _cv_folds(own_y)
    best, best_score = grid[0], -1.0
    if folds >= 2 and len(own_y) >= 2 * folds and len(np.unique(own_y)) > 1:
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for g in grid:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                score = float(np.mean(cross_val_score(make(g), own_raw, own_y, cv=cv)))
            if score > best_score:
                best, best_score = g, score
    est = make(best)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(own_raw, own_y)
    return est, float((est.predict(own_raw) == own_y).mean())


CACHE_SIZE = 64  # fitted classical references kept per process (a few KB each)
classical_cache: OrderedDict[tuple, Classical] = OrderedDict()


def _cached(name: str, fit: Callable[[Context], Classical]) -> Callable[[Context], Classical]:
    """`fit` once per (learner, seed, labelled images and labels); least recently used
    entries leave beyond CACHE_SIZE."""

    def run(ctx: Context) -> Classical:
        digest = hashlib.blake2b(digest_size=16)
        for a in (ctx.own.raw, ctx.own.y):
            a = np.ascontiguousarray(a)
            digest.update(f"{a.dtype}{a.shape}".encode())
            digest.update(a.tobytes())
        key = (name, ctx.seed, digest.hexdigest())
        if key in classical_cache:
            classical_cache.move_to_end(key)
            return classical_cache[key]
        out = classical_cache[key] = fit(ctx)
        while len(classical_cache) > CACHE_SIZE:
            classical_cache.popitem(last=False)
        return out

    run.__name__ = run.__qualname__ = name
    run.__doc__ = fit.__doc__
    return run


def _logreg(ctx: Context) -> Classical:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    est, acc = _fit_cv(
        lambda c: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500)),
        [0.01, 0.1, 1.0, 10.0, 100.0],
        ctx.own.raw,
        ctx.own.y,
        ctx.seed,
    )
    return Classical(est, acc)


def _mlp(ctx: Context) -> Classical:
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    est, acc = _fit_cv(
        lambda a: make_pipeline(
            StandardScaler(),
            MLPClassifier(
                hidden_layer_sizes=(64,),
                alpha=a,
                solver="lbfgs",
                max_iter=300,
                random_state=ctx.seed,
            ),
        ),
        [1e-2, 1.0, 10.0],
        ctx.own.raw,
        ctx.own.y,
        ctx.seed,
    )
    return Classical(est, acc)


def _knn(ctx: Context) -> Classical:
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ks = [k for k in (1, 3, 5, 7) if k < len(ctx.own.y)] or [1]
    est, acc = _fit_cv(
        lambda k: make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k)),
        ks,
        ctx.own.raw,
        ctx.own.y,
        ctx.seed,
    )
    return Classical(est, acc)


logreg = _cached("logreg", _logreg)
mlp = _cached("mlp", _mlp)
knn = _cached("knn", _knn)


def scratch(ctx: Context) -> Job:
    arch = strip(ctx.arch) if ctx.arch is not None else ctx.model_arch()
    return Job(
        lambda s: DistributedQNN(arch, seed=s),
        ctx.own.x,
        ctx.own.y,
        ctx.own.x,
        ctx.own.y,
        ctx.seed,
        ctx.info("scratch"),
    )


def distill_qnn(ctx: Context) -> Job:
    arch = strip(ctx.arch) if ctx.arch is not None else ctx.model_arch()
    x, t = join(ctx.own.x, ctx.own.y, ctx.n_classes, ctx.qx, ctx.qt)
    return Job(
        lambda s: DistributedQNN(arch, seed=s),
        x,
        t,
        ctx.own.x,
        ctx.own.y,
        ctx.seed,
        ctx.info("distill_qnn"),
    )


class _Scaled(nn.Module):
    """Standardise images (statistics of the attacker's own images), then an MLP."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, n_in: int, n_out: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(n_in, 64), nn.ReLU(), nn.Linear(64, n_out))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.net((raw - self.mean) / self.std)


class RawModel:
    """A torch model on images behind the strategy interface."""

    def __init__(self, trained: Trained):
        self.trained, self.own_acc, self.note = trained, trained.own_acc, trained.note

    def predict(self, x: np.ndarray, raw: np.ndarray) -> np.ndarray:
        from qumos.attack.training import predict_proba

        return predict_proba(self.trained.model, raw).argmax(1)


def distill_mlp(ctx: Context) -> RawModel:
    xr, t = join(ctx.own.raw, ctx.own.y, ctx.n_classes, ctx.qraw, ctx.qt)
    mean, std = xr.mean(0), xr.std(0) + 1e-3
    tr = train_restarts(
        lambda s: _Scaled(mean, std, xr.shape[1], ctx.n_classes, s),
        xr,
        t,
        ctx.own.raw,
        ctx.own.y,
        ctx.cfg,
        ctx.seed,
        ctx.progress,
        ctx.info("distill_mlp"),
    )
    return RawModel(tr)
