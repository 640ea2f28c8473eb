"""Many independent models of one architecture, trained at once.

An evaluation trains hundreds of tiny models (restarts, seeds, scratch references, the
substitutes of every breached provider) that share an architecture and differ only in
their weights and data. One at a time, each step is ~50 small torch operations on ~22
rows, so per-operation overhead, not arithmetic, sets the time. `StackedQNN` holds M
`DistributedQNN`s' parameters stacked along a leading model axis and runs them as one:

    features (M, B, F) -> Q_1 -> glue_1 -> ... -> Q_K -> head -> logits (M, B, C)

- fragment k's weights are (M, P_k): `FragmentSim` builds the M per-model matrices and
  unitaries in one batched operation per step and runs the batch part (encoder, psi @ U,
  readout, in C) over all M * B rows in one call; a fragment frozen to the same values in
  every model (a stolen fragment) is held once, (P_k,), and its unitary built once;
- glue k is (M, out, in) weights and (M, out) biases (one batched matmul); the head is
  the fixed readout or a stacked linear layer.

`fit_many` trains them with `qumos.train.fit`'s procedure for each model: its own data,
batch order (its own generator, seeded like fit), learning rate, Adam state and
best-epoch selection; the same seeds give the same models as M calls of `fit` (to float
rounding: tested to 1e-5 in float64). Adam is elementwise, so Adam over the stacked
parameters is M independent Adams if each model's gradient is its own loss's: the loss
is the sum of the per-model mean losses. `StackedAdam` does torch's Adam arithmetic on
one flat buffer holding every trainable value (a handful of operations per step whatever
the number of parameter tensors), with per-model learning rates and step counts, and
leaves a model untouched in a step where it has no batch.

Memory: one simulator call handles at most `max_rows` rows (M * B); larger calls are
split into chunks of whole models (and of rows, for a single model's batch beyond it),
with the same results. The default is MAX_AMPLITUDES // 2**n_qubits (largest fragment):
2**21 amplitudes, i.e. 131072 rows at 4 qubits, 8192 at 8, 2048 at 10 (each state tensor
then takes at most 32 MiB in complex128).

Models whose architectures differ cannot be stacked: `StackedQNN` raises
`ArchitectureMismatch` naming the first difference.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import fields

import numpy as np
import torch
from qumos.model import DistributedQNN
from qumos.spec import ModelSpec
from qumos.train import TrainConfig, TrainResult, _targets
from torch import nn

__all__ = [
    "MAX_AMPLITUDES",
    "ArchitectureMismatch",
    "StackedAdam",
    "StackedQNN",
    "architecture_of",
    "check_same_architecture",
    "fit_many",
]

MAX_AMPLITUDES = 2**21  # per simulator call: rows * 2**n_qubits (see the module docstring)

ManyProgressFn = Callable[[int, int, int, float], None]  # (model index, epoch, epochs, val_acc)


class ArchitectureMismatch(ValueError):
    """Models that cannot be stacked: their architectures (or what is frozen) differ."""


def architecture_of(model: nn.Module) -> dict:
    """What must be equal for models to be stacked: every fragment's circuit, the glue's
    and head's shapes and kinds, the dtype and which parameters train."""
    if type(model) is not DistributedQNN:
        raise ArchitectureMismatch(
            f"only DistributedQNN models can be stacked; got {type(model).__name__}"
        )
    spec = model.spec
    return {
        "dtype": str(model.weights[0].dtype),
        "fragments": [f.architecture() for f in spec.fragments],
        "glue": [
            {"kind": g.kind, "reupload": g.reupload, "in_dim": g.in_dim, "out_dim": g.out_dim}
            for g in spec.glue
        ],
        "head": {
            "kind": spec.head.kind,
            "n_classes": spec.head.n_classes,
            "in_dim": spec.head.in_dim,
            "scale": spec.head.scale,
        },
        "input_transform": None
        if spec.input_transform is None
        else {
            "kind": spec.input_transform.kind,
            "in_dim": spec.input_transform.in_dim,
            "out_dim": spec.input_transform.out_dim,
        },
        "trainable": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def _first_difference(a, b, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path}{k}: present in one model only"
            d = _first_difference(a[k], b[k], f"{path}{k}.")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path[:-1]}: {len(a)} vs {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{path[:-1]}[{i}].")
            if d:
                return d
        return None
    return None if a == b else f"{path[:-1]}: {a!r} vs {b!r}"


def check_same_architecture(models: Sequence[nn.Module]) -> None:
    """Raise ArchitectureMismatch unless every model has models[0]'s architecture."""
    if not models:
        raise ArchitectureMismatch("no models to stack")
    ref = architecture_of(models[0])
    for i, m in enumerate(models[1:], 1):
        arch = architecture_of(m)
        if arch == ref:  # the common case, in one comparison; the walk only to name it
            continue
        diff = _first_difference(ref, arch) or "its architecture"
        if diff:
            raise ArchitectureMismatch(
                f"models[{i}] differs from models[0] in {diff}; only models of one "
                "architecture (and the same frozen parameters) can be trained together"
            )


class StackedQNN(nn.Module):
    """M DistributedQNNs of one architecture as one module: forward (M, B, F) -> (M, B, C).

    Built from the models (their current values, and which parameters are frozen); the
    trained values go back with `write_back(models)` or `to_specs()`. Every trainable
    value lives in one flat buffer (`flat`, with `flat_grad` and `flat_model`, the model
    of each element) that the stacked parameters are views of: the optimizer and the
    best-state bookkeeping of `fit_many` work on it in a few operations.
    """

    def __init__(self, models: Sequence[DistributedQNN], max_rows: int | None = None):
        super().__init__()
        models = list(models)
        check_same_architecture(models)
        m0 = models[0]
        self.specs: list[ModelSpec] = [m.spec for m in models]
        self.n_models = n = len(models)
        self.dtype = m0.weights[0].dtype
        self.sims = m0.sims  # compiled circuits; they hold no weights
        d_max = max(s.d for s in self.sims)
        self.max_rows = max_rows if max_rows is not None else max(1, MAX_AMPLITUDES // d_max)
        if self.max_rows < 1:
            raise ValueError(f"max_rows is {self.max_rows}; at least 1")

        # (name, stacked values, trainable) in a fixed order; trainable ones go in `flat`
        entries: list[tuple[str, torch.Tensor, bool]] = []
        self.shared: list[bool] = []  # fragment k frozen to one value in every model
        for k in range(m0.n_fragments):
            w = torch.stack([m.weights[k].detach() for m in models])
            train = m0.weights[k].requires_grad
            self.shared.append(not train and bool((w == w[0]).all()))
            entries.append((f"w{k}", w[:1] if self.shared[-1] else w, train))
        self.transform_kind = m0.transform.kind if m0.transform is not None else None
        if m0.transform is not None:  # input hiding: features -> fragment 0's angles
            for part in ("weight", "bias"):
                entries.append(
                    (
                        f"transform_{part}",
                        torch.stack([getattr(m.transform.linear, part).detach() for m in models]),
                        getattr(m0.transform.linear, part).requires_grad,
                    )
                )
        for k, g in enumerate(m0.glue):
            for part in ("weight", "bias"):
                entries.append(
                    (
                        f"glue{k}_{part}",
                        torch.stack([getattr(m.glue[k].linear, part).detach() for m in models]),
                        getattr(g.linear, part).requires_grad,
                    )
                )
        self.head_kind = m0.head.spec.kind
        if m0.head.linear is not None:
            for part in ("weight", "bias"):
                entries.append(
                    (
                        f"head_{part}",
                        torch.stack([getattr(m.head.linear, part).detach() for m in models]),
                        getattr(m0.head.linear, part).requires_grad,
                    )
                )
        self.register_buffer("readout", m0.head.readout.to(self.dtype))

        total = sum(t.numel() for _, t, train in entries if train)
        self.flat = torch.zeros(total, dtype=self.dtype)
        self.flat_grad = torch.zeros(total, dtype=self.dtype)
        self.flat_model = torch.zeros(total, dtype=torch.long)
        self._views: list[tuple[nn.Parameter, torch.Tensor]] = []  # (param, its grad view)
        off = 0
        for name, t, train in entries:
            if not train:
                self.register_buffer(name, t.clone().to(self.dtype))
                continue
            size = t.numel()
            view = self.flat[off : off + size].view(t.shape)
            view.copy_(t)
            p = nn.Parameter(view)  # shares the flat buffer's memory
            g = self.flat_grad[off : off + size].view(t.shape)
            p.grad = g
            self.flat_model[off : off + size] = torch.arange(n).repeat_interleave(size // n)
            setattr(self, name, p)
            self._views.append((p, g))
            off += size
        self.glue_spec = [(g.kind, g.reupload) for g in m0.glue]

    @classmethod
    def from_specs(
        cls,
        specs: Sequence[ModelSpec],
        seeds: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        max_rows: int | None = None,
    ) -> StackedQNN:
        """Stack DistributedQNN(spec, seed) for each spec (seeds default to 0)."""
        seeds = list(seeds) if seeds is not None else [0] * len(specs)
        return cls(
            [DistributedQNN(s, seed=sd, dtype=dtype) for s, sd in zip(specs, seeds)],
            max_rows=max_rows,
        )

    @property
    def has_trainable(self) -> bool:
        return self.flat.numel() > 0

    def fragment_weights(self, k: int) -> torch.Tensor:
        """(M, P_k) (or (1, P_k) for a fragment shared by every model)."""
        return getattr(self, f"w{k}")

    # ---- forward --------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, B, F) features, model m's rows x[m] -> (M, B, C) logits."""
        if x.dim() != 3 or x.shape[0] != self.n_models:
            raise ValueError(f"inputs {tuple(x.shape)}; expected (M={self.n_models}, B, F)")
        x = x.to(self.dtype)
        m_all, b = x.shape[:2]
        if m_all * b <= self.max_rows:
            return self._forward(x, 0, m_all)
        per = max(1, self.max_rows // max(b, 1))  # whole models per chunk
        outs = []
        for m0 in range(0, m_all, per):
            m1 = min(m_all, m0 + per)
            if b <= self.max_rows:
                outs.append(self._forward(x[m0:m1], m0, m1))
            else:  # one model's batch alone is over the limit: split its rows too
                outs.append(
                    torch.cat(
                        [
                            self._forward(x[m0:m1, r : r + self.max_rows], m0, m1)
                            for r in range(0, b, self.max_rows)
                        ],
                        dim=1,
                    )
                )
        return torch.cat(outs, dim=0)

    def _w(self, k: int, m0: int, m1: int) -> torch.Tensor:
        w = self.fragment_weights(k)
        return w[0] if self.shared[k] else w[m0:m1]

    def _forward(self, x: torch.Tensor, m0: int, m1: int) -> torch.Tensor:
        a = x
        if self.transform_kind is not None:
            a = torch.baddbmm(
                self.transform_bias[m0:m1].unsqueeze(1),
                x,
                self.transform_weight[m0:m1].transpose(1, 2),
            )
            a = math.pi * (torch.tanh(a) if self.transform_kind == "tanh" else torch.sin(a))
        h = self.sims[0](a, self._w(0, m0, m1))
        for k, (kind, reupload) in enumerate(self.glue_spec):
            z = torch.cat([h, x], dim=-1) if reupload else h
            w, b = getattr(self, f"glue{k}_weight")[m0:m1], getattr(self, f"glue{k}_bias")[m0:m1]
            a = torch.baddbmm(b.unsqueeze(1), z, w.transpose(1, 2))
            a = math.pi * (torch.tanh(a) if kind == "tanh" else torch.sin(a))
            h = self.sims[k + 1](a, self._w(k + 1, m0, m1))
        if self.head_kind == "linear":
            return torch.baddbmm(
                self.head_bias[m0:m1].unsqueeze(1), h, self.head_weight[m0:m1].transpose(1, 2)
            )
        return h @ self.readout

    # ---- gradients and values -------------------------------------------------------
    def zero_grad_flat(self) -> None:
        """Zero every trainable parameter's gradient (in the flat buffer)."""
        self.flat_grad.zero_()
        for p, g in self._views:
            if p.grad is not g:  # replaced (e.g. by module.zero_grad()): re-attach the view
                p.grad = g

    def sync_grads(self) -> None:
        """Make sure the flat gradient holds every parameter's gradient."""
        for p, g in self._views:
            if p.grad is not g:
                g.copy_(p.grad if p.grad is not None else torch.zeros_like(g))
                p.grad = g

    def write_back(self, models: Sequence[DistributedQNN]) -> None:
        """Copy the stacked values into the M models (the ones it was built from)."""
        if len(models) != self.n_models:
            raise ValueError(f"{len(models)} models; this stack holds {self.n_models}")
        with torch.no_grad():
            for i, m in enumerate(models):
                for k in range(m.n_fragments):
                    if not self.shared[k]:
                        m.weights[k].copy_(self.fragment_weights(k)[i])
                for k, g in enumerate(m.glue):
                    g.linear.weight.copy_(getattr(self, f"glue{k}_weight")[i])
                    g.linear.bias.copy_(getattr(self, f"glue{k}_bias")[i])
                if m.head.linear is not None:
                    m.head.linear.weight.copy_(self.head_weight[i])
                    m.head.linear.bias.copy_(self.head_bias[i])
                if m.transform is not None:
                    m.transform.linear.weight.copy_(self.transform_weight[i])
                    m.transform.linear.bias.copy_(self.transform_bias[i])

    def to_specs(self) -> list[ModelSpec]:
        """The M models' ModelSpecs with the stacked values (as DistributedQNN.to_spec)."""
        out = []
        for i, spec in enumerate(self.specs):
            frags = [
                f.with_params(self._w(k, i, i + 1).reshape(-1).detach().double().tolist())
                for k, f in enumerate(spec.fragments)
            ]
            glue = [
                g.model_copy(
                    update={
                        "weight": getattr(self, f"glue{k}_weight")[i].detach().tolist(),
                        "bias": getattr(self, f"glue{k}_bias")[i].detach().tolist(),
                    }
                )
                for k, g in enumerate(spec.glue)
            ]
            head = spec.head
            if self.head_kind == "linear":
                head = head.model_copy(
                    update={
                        "weight": self.head_weight[i].detach().tolist(),
                        "bias": self.head_bias[i].detach().tolist(),
                    }
                )
            update = {"fragments": frags, "glue": glue, "head": head}
            if self.transform_kind is not None:
                update["input_transform"] = spec.input_transform.model_copy(
                    update={
                        "weight": self.transform_weight[i].detach().tolist(),
                        "bias": self.transform_bias[i].detach().tolist(),
                    }
                )
            out.append(spec.model_copy(update=update))
        return out


class StackedAdam:
    """torch.optim.Adam (default betas and eps, no weight decay) over a StackedQNN's flat
    buffer: per-model learning rates and step counts, and `step(active)` leaves the
    models with active[m] False exactly as they were (no batch for them this step). The
    arithmetic is torch's single-tensor Adam's, element by element."""

    def __init__(
        self, stack: StackedQNN, lr: Sequence[float], betas=(0.9, 0.999), eps: float = 1e-8
    ):
        self.stack = stack
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.lr = torch.tensor([float(v) for v in lr], dtype=torch.float64)
        if self.lr.shape != (stack.n_models,):
            raise ValueError(f"{len(lr)} learning rates for {stack.n_models} models")
        self.steps = torch.zeros(stack.n_models, dtype=torch.float64)
        self.exp_avg = torch.zeros_like(stack.flat)
        self.exp_avg_sq = torch.zeros_like(stack.flat)

    @torch.no_grad()
    def step(self, active: torch.Tensor | None = None) -> None:
        st = self.stack
        if not st.has_trainable:
            return
        st.sync_grads()
        all_active = active is None or bool(active.all())
        if not all_active:
            act_el = active[st.flat_model]
            saved = (st.flat.clone(), self.exp_avg.clone(), self.exp_avg_sq.clone())
            self.steps += active.to(torch.float64)
        else:
            self.steps += 1
        g, p = st.flat_grad, st.flat
        self.exp_avg.lerp_(g, 1 - self.beta1)
        self.exp_avg_sq.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        steps = self.steps.clamp(min=1)  # inactive models' values are restored below
        bc1 = 1 - self.beta1**steps
        bc2_sqrt = (1 - self.beta2**steps) ** 0.5
        neg_step = (-(self.lr / bc1)).to(p.dtype)[st.flat_model]
        denom = (self.exp_avg_sq.sqrt() / bc2_sqrt.to(p.dtype)[st.flat_model]).add_(self.eps)
        p.add_(neg_step * self.exp_avg / denom)  # addcdiv's order: value * t1 / t2
        if not all_active:
            for t, old in zip((p, self.exp_avg, self.exp_avg_sq), saved):
                torch.where(act_el, t, old, out=t)


# ---- fit_many ---------------------------------------------------------------------------
def _per_model(value, m: int, name: str) -> list:
    """One value per model: a list/tuple of M values, or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != m:
            raise ValueError(f"{name}: {len(value)} entries for {m} models")
        return list(value)
    return [value] * m


def _pad(ts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """(M, N_max, ...) with zeros past each tensor's rows."""
    n_max = max((len(t) for t in ts), default=0)
    out = torch.zeros(len(ts), n_max, *ts[0].shape[1:], dtype=dtype)
    for i, t in enumerate(ts):
        out[i, : len(t)] = t
    return out


def _epoch_batches(
    perms: list[torch.Tensor | None], batch_sizes: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One epoch's minibatches of every model as padded index tensors: model i's
    permutation `perms[i]` (None: the model sits this epoch out) cut into consecutive
    batches of `batch_sizes[i]`. Returns idx (M, steps, width) long, mask (M, steps, width)
    1 where idx is a real row, count (M, steps) float64 rows per batch."""
    m = len(perms)
    lens = torch.tensor([len(p) if p is not None else 0 for p in perms], dtype=torch.long)
    steps = (lens + batch_sizes - 1) // batch_sizes
    n_steps = int(steps.max()) if m else 0
    width = int(torch.minimum(lens, batch_sizes).max()) if m else 0
    idx = torch.zeros(m, n_steps, width, dtype=torch.long)
    mask = torch.zeros(m, n_steps, width, dtype=dtype)
    if int(lens.sum()):
        flat = torch.cat([p for p in perms if p is not None and len(p)])
        model = torch.repeat_interleave(torch.arange(m), lens)
        pos = torch.arange(len(flat)) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        b = batch_sizes[model]
        idx[model, pos // b, pos % b] = flat
        mask[model, pos // b, pos % b] = 1
    return idx, mask, mask.sum(-1, dtype=torch.float64)


class _Eval:
    """Per-model accuracy (and cross-entropy) of the stacked models on per-model data,
    computed as `qumos.model.accuracy` does (argmax of the softmax)."""

    def __init__(self, xs: list[torch.Tensor], ys: list[torch.Tensor], dtype: torch.dtype):
        self.x = _pad(xs, dtype)
        self.y = _pad(ys, torch.long)
        self.n = torch.tensor([len(t) for t in xs], dtype=torch.float64)
        self.valid = torch.arange(self.x.shape[1])[None, :] < self.n[:, None]

    @torch.no_grad()
    def __call__(self, stack: StackedQNN, with_loss: bool = False):
        if self.x.shape[1] == 0:
            nan = torch.full((stack.n_models,), float("nan"), dtype=torch.float64)
            return nan, nan
        logits = stack(self.x)
        pred = torch.softmax(logits, dim=-1).argmax(-1)
        correct = ((pred == self.y) & self.valid).double().sum(1)
        acc = correct / self.n  # nan where a model has no data, as accuracy() gives
        loss = None
        if with_loss:
            ce = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), self.y.reshape(-1), reduction="none"
            )
            ce = ce.view(self.valid.shape).double() * self.valid
            loss = ce.sum(1) / self.n
        return acc, loss


def fit_many(
    models: Sequence[DistributedQNN],
    x_train,
    y_train,
    x_val,
    y_val,
    cfg: TrainConfig | Sequence[TrainConfig],
    progress: ManyProgressFn | None = None,
    *,
    max_rows: int | None = None,
) -> list[TrainResult]:
    """`qumos.train.fit` for each of the M models, all trained at once (StackedQNN).

    Every data argument is either one array for all models or a list/tuple of M arrays
    (sizes may differ); `cfg` one TrainConfig or M of them (epochs, lr, batch size and
    seed per model). `y_train` holds class indices (N,) or soft targets (N, C),
    probabilities; `y_val` class indices (soft ones are reduced to their argmax). As fit
    does, each model ends with its best-epoch values (ties: the earlier epoch) written
    back into it, and its TrainResult has that epoch's figures; `seconds` is the wall
    time of the whole call. `progress(model, epoch, epochs, val_acc)` after every epoch
    of every model. The models must share one architecture and frozen set
    (ArchitectureMismatch otherwise); `max_rows` bounds the rows per simulator call.
    """
    t0 = time.perf_counter()
    models = list(models)
    m_all = len(models)
    cfgs = _per_model(cfg, m_all, "cfg")
    for c in cfgs:
        if getattr(c, "select", "acc") not in ("acc", "acc_loss"):
            raise ValueError(f"select is {c.select!r}; allowed: 'acc', 'acc_loss'")
    xs = [
        torch.as_tensor(np.asarray(x), dtype=torch.float32)
        for x in _per_model(x_train, m_all, "x_train")
    ]
    ys = [_targets(y) for y in _per_model(y_train, m_all, "y_train")]
    if len({y.ndim for y in ys}) > 1:
        raise ValueError("y_train: mixes hard labels and soft targets across models")
    soft = ys[0].ndim == 2
    for i, (x, y) in enumerate(zip(xs, ys)):
        if len(x) != len(y):
            raise ValueError(f"models[{i}]: {len(x)} training samples but {len(y)} targets")
    xvs = [
        torch.as_tensor(np.asarray(x), dtype=torch.float32)
        for x in _per_model(x_val, m_all, "x_val")
    ]
    yvs = [_targets(y) for y in _per_model(y_val, m_all, "y_val")]
    yvs = [y.argmax(1) if y.ndim == 2 else y for y in yvs]

    stack = StackedQNN(models, max_rows=max_rows)
    dtype = stack.dtype
    select = [getattr(c, "select", "acc") for c in cfgs]
    any_loss = "acc_loss" in select
    use_loss = torch.tensor([s == "acc_loss" for s in select])
    val_eval = _Eval(xvs, yvs, dtype)
    x_pad = _pad(xs, dtype)
    y_pad = _pad(ys, dtype if soft else torch.long)
    n_train = [len(x) for x in xs]
    rows = torch.arange(m_all)[:, None]
    gens = [torch.Generator().manual_seed(c.seed) for c in cfgs]
    opt = StackedAdam(stack, [c.lr for c in cfgs])

    # Full batch with the training data as selection data (the attacker's case): the
    # selection figures of the values after epoch e are those of epoch e + 1's training
    # forward (the same rows and values, permuted), so that pass is not run twice.
    fused = (
        stack.has_trainable
        and not soft
        and len({c.epochs for c in cfgs}) == 1
        and all(n > 0 and c.batch_size >= n for n, c in zip(n_train, cfgs))
        and all(
            xv.shape == x.shape and torch.equal(xv, x) and torch.equal(yv, y)
            for xv, x, yv, y in zip(xvs, xs, yvs, ys)
        )
    )
    n_rows = torch.tensor(n_train, dtype=torch.float64)
    best_acc, best_loss = (None, None) if fused else val_eval(stack, any_loss)
    best_epoch = [0] * m_all
    best_flat = stack.flat.clone()
    histories: list[list[dict]] = [[] for _ in range(m_all)]

    def finish(
        epoch: int,
        total: torch.Tensor,
        live: list[bool],
        acc: torch.Tensor,
        loss: torch.Tensor | None,
    ) -> None:
        """Epoch `epoch` done (the stack holds its values): history, selection, progress."""
        nonlocal best_acc, best_loss, best_flat
        improved = acc > best_acc
        if any_loss:
            improved |= use_loss & (acc == best_acc) & (loss < best_loss)
        improved &= torch.tensor(live)
        # one conversion per tensor, not one per model (this runs every epoch)
        total_l, acc_l, improved_l = total.tolist(), acc.tolist(), improved.tolist()
        for i in range(m_all):
            if live[i]:
                histories[i].append(
                    {
                        "epoch": epoch,
                        "loss": total_l[i] / max(n_train[i], 1),
                        "val_acc": float(acc_l[i]),
                    }
                )
                if improved_l[i]:
                    best_epoch[i] = epoch
        best_acc = torch.where(improved, acc, best_acc)
        if any_loss:
            best_loss = torch.where(improved, loss, best_loss)
        best_flat = torch.where(improved[stack.flat_model], stack.flat, best_flat)
        if progress:
            for i in range(m_all):
                if live[i]:
                    progress(i, epoch, cfgs[i].epochs, float(acc_l[i]))

    batch_sizes = torch.tensor([c.batch_size for c in cfgs], dtype=torch.long)
    pending = None  # fused: (epoch, total, live) awaiting the next forward's figures
    for epoch in range(1, max((c.epochs for c in cfgs), default=0) + 1):
        if not stack.has_trainable:
            break
        live = [epoch <= c.epochs for c in cfgs]
        idx, mask, count = _epoch_batches(
            [
                torch.randperm(n, generator=g) if ok else None
                for n, g, ok in zip(n_train, gens, live)
            ],
            batch_sizes,
            dtype,
        )
        n_steps = idx.shape[1]
        total = torch.zeros(m_all, dtype=torch.float64)
        for s in range(n_steps):
            active = count[:, s] > 0
            ix = idx[:, s]
            logits = stack(x_pad[rows, ix])  # (M, width, C)
            target = y_pad[rows, ix]
            ce = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                target.reshape(-1, target.shape[-1]) if soft else target.reshape(-1),
                reduction="none",
            ).view(m_all, idx.shape[2])
            if fused:  # the figures of the values before this step, as _Eval computes them
                with torch.no_grad():
                    valid = mask[:, s] > 0
                    pred = torch.softmax(logits, dim=-1).argmax(-1)
                    acc = ((pred == target) & valid).double().sum(1) / n_rows
                    loss = ((ce.double() * valid).sum(1) / n_rows) if any_loss else None
                if pending is None:  # epoch 0: the starting point
                    best_acc, best_loss = acc, loss
                else:
                    finish(*pending, acc, loss)
            per_model = (ce * mask[:, s]).sum(1) / count[:, s].clamp(min=1).to(dtype)
            stack.zero_grad_flat()
            per_model.sum().backward()
            opt.step(active)
            total += per_model.detach().double() * count[:, s]
        if fused:
            pending = (epoch, total, live)
        else:
            finish(epoch, total, live, *val_eval(stack, any_loss))
    if pending is not None:
        finish(*pending, *val_eval(stack, any_loss))
    if best_acc is None:  # fused, no epoch ran
        best_acc, best_loss = val_eval(stack, any_loss)
    with torch.no_grad():
        stack.flat.copy_(best_flat)
    stack.write_back(models)
    train_acc, _ = _Eval(xs, [y.argmax(1) if soft else y for y in ys], dtype)(stack)
    torch.manual_seed(cfgs[-1].seed if cfgs else 0)  # fit leaves the global RNG seeded
    seconds = time.perf_counter() - t0
    has_val_loss = "val_loss" in {f.name for f in fields(TrainResult)}
    out = []
    for i, m in enumerate(models):
        kw = {}
        if has_val_loss:
            kw["val_loss"] = float(best_loss[i]) if select[i] == "acc_loss" else None
        out.append(
            TrainResult(
                model=m,
                val_acc=float(best_acc[i]),
                train_acc=float(train_acc[i]),
                best_epoch=best_epoch[i],
                seconds=seconds,
                history=histories[i],
                **kw,
            )
        )
    return out
