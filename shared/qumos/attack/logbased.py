"""Log-based thefts: what the breached provider's access log adds.

    selftrain   the first provider's log holds the users' 16 input features in the clear
                (unless the company hides them): unlabelled in-distribution data. With
                input hiding on (the Kerckhoffs attacker knows: the architecture has an
                input transform) the position-0 rows are the transform's output,
                intermediate angles like any later position's, and are not used. The best
                white-box model of this breach (chosen on the attacker's own labelled
                images) labels those rows, and a model of the same kind is trained on the
                labelled images plus the pseudo-labelled rows; two rounds.
    logspread   the same rows without the stolen fragment: label spreading (a k-NN graph
                over the labelled features, the queries' features with the victim's
                top-1 answers, and the logged features), then an MLP on all of them.

A log at a later position holds intermediate angles that pair with no image the attacker
has: without its own queries (`breach+queries`, `qumos.attack.insider`) or a coalition
holding the neighbouring provider (`qumos.attack.whitebox`, glue fitted to the logs) it
has nothing to use, and the strategy says so in its note instead of failing. An empty or
torn log is not an error either.
"""

from __future__ import annotations

import numpy as np
from qumos.attack.context import Context
from qumos.attack.training import Job, join, one_hot, predict_proba
from qumos.attack.whitebox import HeadOnly

ROUNDS = 2


def _nothing(ctx: Context, why: str, name: str = "selftrain") -> None:
    if ctx.progress:
        ctx.progress({**ctx.info(name), "note": why})


def log_inputs(ctx: Context) -> np.ndarray:
    """Distinct feature rows of the position-0 log, minus the attacker's labelled ones."""
    rows = ctx.logs.get(0)
    if rows is None or len(rows) == 0:
        return np.zeros((0, ctx.own.x.shape[1]))
    u = np.unique(np.round(rows.inputs, 9), axis=0)
    own = {tuple(r) for r in np.round(ctx.own.x, 9)}
    keep = [i for i, r in enumerate(u) if tuple(r) not in own]
    return u[keep]


def selftrain(ctx: Context) -> Job | None:
    """One round: the teacher (the previous round's student, else the best white-box
    model of this breach) labels the logged features; a model of the teacher's kind
    trains on them and the labelled images. The driver runs ROUNDS rounds. None (with a
    note through progress) when the log holds nothing usable."""
    if not any(f.index == 0 for f in ctx.stolen):
        _nothing(ctx, "the breached log holds intermediate angles, not inputs")
        return None
    if ctx.arch is not None and ctx.arch.input_transform is not None:
        _nothing(ctx, "input hiding: the position-0 log holds transformed angles, not features")
        return None
    u = log_inputs(ctx)
    if len(u) == 0:
        _nothing(ctx, "the breached log holds no rows")
        return None
    teachers = {
        k: v for k, v in ctx.teachers.items() if k in ("substitute", "finetune", "head_only")
    }
    if not teachers:
        _nothing(ctx, "no white-box teacher ran")
        return None
    kind = max(teachers, key=lambda k: (teachers[k].own_acc, -teachers[k].own_loss))
    teacher = ctx.teachers.get("selftrain") or teachers[kind]

    def make(s: int):
        if kind == "head_only":
            return HeadOnly(
                max(ctx.stolen, key=lambda f: f.index), ctx.own.x.shape[1], ctx.n_classes, s
            )
        return ctx.qnn(s, stolen=True, frozen=(kind == "substitute"))

    pseudo = one_hot(predict_proba(teacher.model, u).argmax(1), ctx.n_classes)
    x_more, t_more = u, pseudo
    if ctx.has_queries:
        x_more = np.concatenate([ctx.qx, u])
        t_more = np.concatenate([ctx.qt, pseudo])
    x, t = join(ctx.own.x, ctx.own.y, ctx.n_classes, x_more, t_more)
    return Job(
        make,
        x,
        t,
        ctx.own.x,
        ctx.own.y,
        ctx.seed,
        ctx.info("selftrain"),
        note=f"{len(u)} log rows, teacher {kind}",
    )


class _FeatureModel:
    """A scikit-learn classifier on the 16 features behind the strategy interface."""

    def __init__(self, est, own_acc: float, note: str):
        self.est, self.own_acc, self.note = est, own_acc, note

    def predict(self, x: np.ndarray, raw: np.ndarray) -> np.ndarray:
        return self.est.predict(x)


def logspread(ctx: Context) -> _FeatureModel | None:
    """None (with a note through progress) when the log holds nothing usable."""
    import warnings

    from sklearn.neural_network import MLPClassifier
    from sklearn.semi_supervised import LabelSpreading

    if not any(f.index == 0 for f in ctx.stolen):
        _nothing(ctx, "the breached log holds intermediate angles, not inputs", "logspread")
        return None
    u = log_inputs(ctx)
    if len(u) == 0:
        _nothing(ctx, "the breached log holds no rows", "logspread")
        return None
    xl, yl = ctx.own.x, ctx.own.y
    if ctx.has_queries:
        assert ctx.qx is not None and ctx.qt is not None
        xl = np.concatenate([xl, ctx.qx])
        yl = np.concatenate([yl, ctx.qt.argmax(1)])
    x = np.concatenate([xl, u])
    y = np.concatenate([yl, -np.ones(len(u), dtype=int)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = int(min(7, max(2, len(xl) - 1)))
        spread = LabelSpreading(kernel="knn", n_neighbors=k, max_iter=200).fit(x, y)
        pseudo = spread.transduction_
        mlp = MLPClassifier(
            hidden_layer_sizes=(64,),
            alpha=1e-2,
            solver="lbfgs",
            max_iter=500,
            random_state=ctx.seed,
        ).fit(x, pseudo)
    own_acc = float((mlp.predict(ctx.own.x) == ctx.own.y).mean())
    return _FeatureModel(mlp, own_acc, f"{len(u)} log rows")
