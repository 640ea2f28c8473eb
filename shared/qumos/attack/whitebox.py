"""White-box thefts with the stolen fragment(s).

    substitute   the stolen fragments frozen in place; the rest of the (known or guessed)
                 architecture trained anew
    finetune     as substitute, but the stolen parameters train too (initialised stolen)
    head_only    the last stolen fragment as a frozen feature extractor with classical
                 layers only around it: features -> [pi*tanh(linear)] -> Q -> linear head

Each trains on the attacker's labelled images, plus, under `breach+queries`, its queries
with the victim's answers as soft targets. Under `coalition`, where the coalition holds
two consecutive fragments k and k+1, glue k is fitted to their logs first (rows paired
by position: pi*tanh(W h + b) = a, so atanh(a / pi) = W h + b is a least-squares fit of
the logged outputs of k onto the logged inputs of k+1) and frozen.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from qumos.artifact import FragmentFile
from qumos.attack.context import Context
from qumos.attack.training import Job, join
from qumos.errors import AttackError
from qumos.model import DistributedQNN
from qumos.torchsim import FragmentSim
from torch import nn


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
            raise AttackError(
                f"fragment at position 0 takes {f.n_inputs} inputs; the task "
                f"has {n_features} features"
            )
        self.head = nn.Linear(f.n_qubits, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x if self.pre is None else math.pi * torch.tanh(self.pre(x))
        return self.head(self.sim(a, self.w))


def _data(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    return join(ctx.own.x, ctx.own.y, ctx.n_classes, ctx.qx if ctx.has_queries else None, ctx.qt)


def _fit_glue_from_logs(ctx: Context, net: DistributedQNN) -> None:
    """Coalition: glue k from the logs of consecutive stolen fragments k and k+1."""
    idx = {f.index for f in ctx.stolen}
    for k in sorted(idx):
        if k + 1 not in idx or k >= len(net.glue):
            continue
        g = net.glue[k]
        lo, hi = ctx.logs.get(k), ctx.logs.get(k + 1)
        if lo is None or hi is None or len(lo) == 0 or len(lo) != len(hi):
            continue  # unpaired logs: nothing to fit
        h = lo.outputs
        if g.reupload:
            if 0 not in ctx.logs or len(ctx.logs[0]) != len(lo):
                continue  # the glue also reads the features, which the coalition lacks
            h = np.concatenate([h, ctx.logs[0].inputs], axis=1)
        a = np.clip(hi.inputs / math.pi, -0.999999, 0.999999)
        z = np.arctanh(a) if g.kind == "tanh" else np.arcsin(a)
        H = np.concatenate([h, np.ones((len(h), 1))], axis=1)
        sol, *_ = np.linalg.lstsq(H, z, rcond=None)
        with torch.no_grad():
            g.linear.weight.copy_(torch.as_tensor(sol[:-1].T, dtype=torch.float32))
            g.linear.bias.copy_(torch.as_tensor(sol[-1], dtype=torch.float32))
        for p in g.parameters():
            p.requires_grad_(False)


def _stolen_qnn(ctx: Context, name: str, frozen: bool) -> Job:
    if not ctx.stolen:
        raise AttackError(f"{name}: needs a breached provider's fragment")

    def make(s: int) -> nn.Module:
        net = ctx.qnn(s, stolen=True, frozen=frozen)
        if len(ctx.stolen) > 1:
            _fit_glue_from_logs(ctx, net)
        return net

    x, t = _data(ctx)
    return Job(make, x, t, ctx.own.x, ctx.own.y, ctx.seed, ctx.info(name))


def substitute(ctx: Context) -> Job:
    return _stolen_qnn(ctx, "substitute", frozen=True)


def finetune(ctx: Context) -> Job:
    return _stolen_qnn(ctx, "finetune", frozen=False)


def head_only(ctx: Context) -> Job:
    if not ctx.stolen:
        raise AttackError("head_only: needs a breached provider's fragment")
    stolen = max(ctx.stolen, key=lambda f: f.index)
    x, t = _data(ctx)
    nf = ctx.own.x.shape[1]
    if stolen.index == 0 or stolen.fragment.n_inputs == nf:
        # a one-fragment QNN, so it batches: features -> Q -> linear head at position 0;
        # later, the classical layer before Q is an input transform (pi*tanh(W x + b))
        hidden = ctx.arch is not None and ctx.arch.input_transform is not None
        arch = _one_fragment(
            stolen, ctx.data.dataset, ctx.data.task, hide=stolen.index > 0 or hidden
        )

        def make(s: int) -> nn.Module:
            net = DistributedQNN(arch, seed=s)
            net.set_fragment(0, stolen.fragment)
            net.freeze_fragment(0)
            return net

        return Job(make, x, t, ctx.own.x, ctx.own.y, ctx.seed, ctx.info("head_only"))
    return Job(
        lambda s: HeadOnly(stolen, ctx.own.x.shape[1], ctx.n_classes, s),
        x,
        t,
        ctx.own.x,
        ctx.own.y,
        ctx.seed,
        ctx.info("head_only"),
    )


def _one_fragment(stolen: FragmentFile, dataset: str, task: int, hide: bool = False):
    from qumos.spec import Design, FragmentDesign, build_spec

    f = stolen.fragment
    return build_spec(
        Design(
            dataset=dataset,
            task=task,
            head="linear",
            hide_inputs=hide,
            fragments=[
                FragmentDesign(
                    n_qubits=f.n_qubits, block=f.block, depth=f.depth, entanglement=f.entanglement
                )
            ],
        ),
        name="attacker",
    )
