"""Log-based thefts: what the breached provider's access log adds.

    selftrain   the first provider's log holds the users' 16 input features in the clear
                (unless the company hides them): unlabelled in-distribution data. With
                input hiding on (the Kerckhoffs attacker knows: the architecture has an
                input transform) the position-0 rows are the transform's output,
                intermediate angles like any later position's, and are not used. The best
                white-box model of this breach (chosen on the attacker's own labelled
                images) labels those rows, and a model of the same kind is trained on the
                labelled images plus the pseudo-labelled rows; two rounds.

A log at a later position holds intermediate angles that pair with no image the attacker
has: without its own queries (`breach+queries`, `qumos.attack.insider`) or a coalition
holding the neighbouring provider (`qumos.attack.whitebox`, glue fitted to the logs) it
has nothing to use, and the strategy says so in its note instead of failing. An empty or
torn log is not an error either.
"""

from __future__ import annotations

import numpy as np
from qumos.attack.context import Context
from qumos.attack.training import Trained, join, one_hot, predict_proba, train_restarts
from qumos.attack.whitebox import HeadOnly

ROUNDS = 2


def _nothing(ctx: Context, why: str) -> Trained | None:
    if ctx.progress:
        ctx.progress({**ctx.info("selftrain"), "note": why})
    return None


def log_inputs(ctx: Context) -> np.ndarray:
    """Distinct feature rows of the position-0 log, minus the attacker's labelled ones."""
    rows = ctx.logs.get(0)
    if rows is None or len(rows) == 0:
        return np.zeros((0, ctx.own.x.shape[1]))
    u = np.unique(np.round(rows.inputs, 9), axis=0)
    own = {tuple(r) for r in np.round(ctx.own.x, 9)}
    keep = [i for i, r in enumerate(u) if tuple(r) not in own]
    return u[keep]


def selftrain(ctx: Context) -> Trained | None:
    """None (with a note through progress) when the log holds nothing usable."""
    if not any(f.index == 0 for f in ctx.stolen):
        return _nothing(ctx, "the breached log holds intermediate angles, not inputs")
    if ctx.arch is not None and ctx.arch.input_transform is not None:
        return _nothing(ctx, "input hiding: the position-0 log holds transformed angles, "
                        "not features")
    u = log_inputs(ctx)
    if len(u) == 0:
        return _nothing(ctx, "the breached log holds no rows")
    teachers = {k: v for k, v in ctx.teachers.items()
                if k in ("substitute", "finetune", "head_only")}
    if not teachers:
        return _nothing(ctx, "no white-box teacher ran")
    kind = max(teachers, key=lambda k: (teachers[k].own_acc, -teachers[k].own_loss))
    teacher = teachers[kind]

    def make(s: int):
        if kind == "head_only":
            return HeadOnly(max(ctx.stolen, key=lambda f: f.index), ctx.own.x.shape[1],
                            ctx.n_classes, s)
        return ctx.qnn(s, stolen=True, frozen=(kind == "substitute"))

    best = teacher
    for _ in range(ROUNDS):
        pseudo = one_hot(predict_proba(best.model, u).argmax(1), ctx.n_classes)
        x_more, t_more = u, pseudo
        if ctx.has_queries:
            x_more = np.concatenate([ctx.qx, u])
            t_more = np.concatenate([ctx.qt, pseudo])
        x, t = join(ctx.own.x, ctx.own.y, ctx.n_classes, x_more, t_more)
        best = train_restarts(make, x, t, ctx.own.x, ctx.own.y, ctx.cfg, ctx.seed,
                              ctx.progress, ctx.info("selftrain"))
    best.note = f"{len(u)} log rows, teacher {kind}"
    return best
