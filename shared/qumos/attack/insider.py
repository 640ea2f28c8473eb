"""Insider + queries (`breach+queries`): the attacker's own queries, matched to its rows
in the breached provider's log, rebuild the model around the stolen fragment j.

    insider   1. prefix: the fragments and glue before j, regressed (mean squared error)
                 so that prefix(features of query i) = the angles provider j logged for it;
              2. the stolen fragment frozen; the suffix (glue j, the fragments after j,
                 the head) distilled on the victim's answers, fed the logged angles;
              3. end-to-end fine-tuning of everything but the stolen fragment on the
                 labelled images (one-hot) and the queries (the victim's answers).
              Restarts cycle the learning rates; the restart with the best accuracy on the
              attacker's own labelled images wins.

Where the rows come from: in process (the evaluator, `qumos attack --artifact`) the
provider's view of each query is computed exactly; against live services the queries go
through the public API and the rows are attributed in the real `access.jsonl` by timing
and content (`qumos.attack.live`). Queries whose row could not be attributed are used
for distillation only.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from qumos.attack.context import (
    Context,
    inputs_to,
    prefix_params,
    suffix_from,
    suffix_params,
)
from qumos.attack.training import Trained, adam_steps, join, own_key
from qumos.train import TrainConfig, fit
from torch import nn


def insider(ctx: Context) -> Trained | None:
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
    xq = torch.as_tensor(ctx.qx[f], dtype=torch.float32)
    aq = torch.as_tensor(rows.inputs[f], dtype=torch.float32)
    tq = torch.as_tensor(ctx.qt[f], dtype=torch.float32)
    x_all, t_all = join(ctx.own.x, ctx.own.y, ctx.n_classes, ctx.qx, ctx.qt)
    n = len(x_all)
    cfg = ctx.cfg
    best, best_key, accs = None, None, []
    for r in range(cfg.restarts):
        rseed = 1000 * ctx.seed + r
        lr = cfg.lr(r)
        net = ctx.qnn(rseed, stolen=True, frozen=True)
        if j > 0 or net.transform is not None:  # 1. prefix (with input hiding at j = 0:
            # the hiding transform) onto the logged angles
            pp = prefix_params(net, j)
            if pp:
                adam_steps(pp, lambda n=net: nn.functional.mse_loss(inputs_to(n, j, xq), aq),
                           cfg.epochs, lr)
        sp = suffix_params(net, j)  # 2. suffix distilled from the logged angles
        if sp:
            adam_steps(sp, lambda n=net: nn.functional.cross_entropy(suffix_from(n, j, aq, xq), tq),
                       cfg.epochs, lr)
        cb = None
        if ctx.progress is not None:
            def cb(epoch: int, total: int, val: float, _r=r) -> None:
                ctx.progress({**ctx.info("insider"), "restart": _r, "epoch": epoch,
                              "epochs": total, "own_acc": val})
        # 3. end to end, the stolen fragment frozen; a smaller step keeps stages 1-2
        tc = TrainConfig(epochs=cfg.epochs, lr=lr / 3, batch_size=n if n <= cfg.full_batch_max
                         else cfg.batch_size, seed=rseed, select="acc_loss")
        fit(net, x_all, t_all, ctx.own.x, ctx.own.y, tc, cb)
        acc, loss = own_key(net, ctx.own.x, ctx.own.y)
        accs.append(acc)
        if best_key is None or (acc, -loss) > best_key:
            best, best_key = copy.deepcopy(net), (acc, -loss)
    assert best is not None and best_key is not None
    return Trained(model=best, own_acc=best_key[0], own_loss=-best_key[1], restart_accs=accs,
                   note=f"{int(f.sum())} of {len(f)} query rows attributed")


def provider_rows_in_process(victim, j: int, features: np.ndarray):
    """The exact rows provider j executes for `features` (the in-process insider)."""
    from qumos.attack.context import QueryRows
    from qumos.attack.holdings import fragment_rows

    ins, outs = fragment_rows(victim, features)[j]
    return QueryRows(inputs=ins, outputs=outs, found=np.ones(len(ins), dtype=bool))
