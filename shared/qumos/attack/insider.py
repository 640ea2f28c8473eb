"""Insider + queries (`breach+queries`): the attacker's own queries, matched to its rows
in the breached provider's log, rebuild the model around the stolen fragment j.

    insider   1. prefix: the fragments and glue before j, regressed (mean squared error)
                 so that prefix(features of query i) = the angles provider j logged for it;
              2. the stolen fragment frozen; the suffix (glue j, the fragments after j,
                 the head) distilled on the victim's answers, fed the logged angles;
              3. end-to-end fine-tuning of everything but the stolen fragment on the
                 labelled images (one-hot) and the queries (the victim's answers).
              Restarts cycle the learning rates; their probabilities are averaged (as
              every trainable strategy's: qumos.attack.training).

Where the rows come from: in process (the evaluator, `qumos attack --artifact`) the
provider's view of each query is computed exactly; against live services the queries go
through the public API and the rows are attributed in the real `access.jsonl` by timing
and content (`qumos.attack.live`). Queries whose row could not be attributed are used
for distillation only.
"""

from __future__ import annotations

import numpy as np
import torch
from qumos.attack.context import (
    Context,
    inputs_to,
    prefix_params,
    suffix_from,
    suffix_params,
)
from qumos.attack.training import Job, adam_steps, join
from torch import nn


def insider(ctx: Context) -> Job | None:
    """Stages 1 and 2 run when a restart's model is made; stage 3 is the job's training
    (with a third of the restart's learning rate, so it refines stages 1-2)."""
    if not ctx.stolen or not ctx.has_queries:
        return None
    stolen = max(ctx.stolen, key=lambda f: f.index)
    j = stolen.index
    rows = ctx.qrows.get(j)
    if rows is None or not rows.found.any():
        if ctx.progress:
            ctx.progress({**ctx.info("insider"), "note": "no query row attributed"})
        return None
    f = rows.found
    assert ctx.qx is not None and ctx.qt is not None  # has_queries
    xq = torch.as_tensor(ctx.qx[f], dtype=torch.float32)
    aq = torch.as_tensor(rows.inputs[f], dtype=torch.float32)
    tq = torch.as_tensor(ctx.qt[f], dtype=torch.float32)
    x_all, t_all = join(ctx.own.x, ctx.own.y, ctx.n_classes, ctx.qx, ctx.qt)
    cfg = ctx.cfg

    def make(rseed: int) -> nn.Module:
        lr = cfg.lr(rseed - 1000 * ctx.seed)
        net = ctx.qnn(rseed, stolen=True, frozen=True)
        if j > 0 or net.transform is not None:  # 1. prefix (with input hiding at j = 0:
            # the hiding transform) onto the logged angles
            pp = prefix_params(net, j)
            if pp:
                adam_steps(
                    pp, lambda: nn.functional.mse_loss(inputs_to(net, j, xq), aq), cfg.epochs, lr
                )
        sp = suffix_params(net, j)  # 2. suffix distilled from the logged angles
        if sp:
            adam_steps(
                sp,
                lambda: nn.functional.cross_entropy(suffix_from(net, j, aq, xq), tq),
                cfg.epochs,
                lr,
            )
        return net

    return Job(
        make,
        x_all,
        t_all,
        ctx.own.x,
        ctx.own.y,
        ctx.seed,
        ctx.info("insider"),
        lr_scale=1 / 3,
        note=f"{int(f.sum())} of {len(f)} query rows attributed",
    )


def provider_rows_in_process(victim, j: int, features: np.ndarray):
    """The exact rows provider j executes for `features` (the in-process insider)."""
    from qumos.attack.context import QueryRows
    from qumos.attack.holdings import fragment_rows

    ins, outs = fragment_rows(victim, features)[j]
    return QueryRows(inputs=ins, outputs=outs, found=np.ones(len(ins), dtype=bool))
