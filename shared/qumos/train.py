"""Training: Adam on cross-entropy, model selection on validation accuracy."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from qumos.model import DistributedQNN, accuracy
from qumos.spec import Design, ModelSpec, build_spec
from torch import nn


@dataclass
class TrainConfig:
    epochs: int = 30  # passes over the training set
    lr: float = 0.03  # Adam learning rate
    batch_size: int = 32
    seed: int = 0  # initialisation and batch order
    # Model selection on the validation data: "acc" keeps the epoch with the best accuracy
    # (ties: the earlier epoch); "acc_loss" breaks ties by the lower cross-entropy (ties:
    # the earlier epoch), so a run that fits its few samples early keeps improving its
    # margin (the attacker's choice: its selection data is its training data).
    select: str = "acc"


@dataclass
class TrainResult:
    model: nn.Module
    val_acc: float
    train_acc: float
    best_epoch: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    val_loss: float | None = None  # the selected state's validation loss ("acc_loss")


ProgressFn = Callable[[int, int, float], None]  # (epoch, epochs, val_acc)


def _targets(y) -> torch.Tensor:
    """Hard labels (N,) -> long; soft targets (N, C) probabilities -> float."""
    arr = np.asarray(y)
    if arr.ndim == 2:
        return torch.as_tensor(arr, dtype=torch.float32)
    return torch.as_tensor(arr, dtype=torch.long)


def _val_key(model: nn.Module, x_val, y_val, select: str) -> tuple[float, float]:
    acc = accuracy(model, x_val, y_val)
    if select != "acc_loss" or len(y_val) == 0:
        return (acc, 0.0)
    with torch.no_grad():
        logits = model(torch.as_tensor(np.asarray(x_val), dtype=torch.float32))
        loss = float(nn.functional.cross_entropy(logits, torch.as_tensor(np.asarray(y_val))))
    return (acc, -loss)


def fit(
    model: nn.Module,
    x_train,
    y_train,
    x_val,
    y_val,
    cfg: TrainConfig,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train the model's trainable parameters; keep the state with the best validation
    accuracy (ties: the earlier epoch, or with `cfg.select == "acc_loss"` the lower
    validation loss). x_val may be the training data itself. `y_train` holds class
    indices (N,) or soft targets (N, C), probabilities (distillation); `y_val` holds class
    indices. A batch size >= N is full-batch training (one step per epoch).
    `qumos.stacked.fit_many` trains many models this way at once."""
    if cfg.select not in ("acc", "acc_loss"):
        raise ValueError(f"select is {cfg.select!r}; allowed: 'acc', 'acc_loss'")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    xt = torch.as_tensor(np.asarray(x_train), dtype=torch.float32)
    yt = _targets(y_train)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr) if params else None
    gen = torch.Generator().manual_seed(cfg.seed)
    best = (_val_key(model, x_val, y_val, cfg.select), 0, copy.deepcopy(model.state_dict()))
    history = []
    for epoch in range(1, cfg.epochs + 1):
        if opt is None:
            break
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            logits = model(xt[idx])
            target = yt[idx].to(logits.dtype) if yt.ndim == 2 else yt[idx]
            loss = nn.functional.cross_entropy(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        key = _val_key(model, x_val, y_val, cfg.select)
        history.append({"epoch": epoch, "loss": total / max(len(xt), 1), "val_acc": key[0]})
        if key > best[0]:
            best = (key, epoch, copy.deepcopy(model.state_dict()))
        if progress:
            progress(epoch, cfg.epochs, key[0])
    model.load_state_dict(best[2])
    train_acc = accuracy(model, xt, yt.argmax(1) if yt.ndim == 2 else yt)
    return TrainResult(
        model=model,
        val_acc=best[0][0],
        train_acc=train_acc,
        best_epoch=best[1],
        seconds=time.perf_counter() - t0,
        history=history,
        val_loss=-best[0][1] if cfg.select == "acc_loss" else None,
    )


def train_design(
    design: Design,
    data,
    cfg: TrainConfig,
    name: str = "qumos-model",
    progress: ProgressFn | None = None,
) -> tuple[ModelSpec, TrainResult, float]:
    """Train a design on a TaskData; returns (trained spec, result, test accuracy)."""
    spec = build_spec(design, name=name)
    model = DistributedQNN(spec, seed=cfg.seed)
    res = fit(model, data.train.x, data.train.y, data.val.x, data.val.y, cfg, progress)
    test_acc = accuracy(model, data.test.x, data.test.y)
    return model.to_spec(), res, test_acc
