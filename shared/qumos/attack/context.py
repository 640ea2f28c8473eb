"""Everything one strategy run sees: the attacker's knowledge for one seed and one breach."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from qumos.artifact import FragmentFile
from qumos.attack.config import AttackConfig
from qumos.attack.holdings import AttackerData, LogRows
from qumos.attack.training import Progress, Trained
from qumos.datasets import TaskData
from qumos.errors import AttackError
from qumos.model import DistributedQNN
from qumos.spec import ModelSpec, build_spec, design_of
from torch import nn


@dataclass
class QueryRows:
    """The insider's own queries as provider j logged them (rows aligned with the
    queries; `found[i]` False where the row could not be attributed)."""

    inputs: np.ndarray  # (N, n_inputs)
    outputs: np.ndarray  # (N, n_qubits)
    found: np.ndarray  # (N,) bool


@dataclass
class Context:
    data: TaskData
    arch: ModelSpec | None  # the victim's architecture, no trained values (Kerckhoffs)
    cfg: AttackConfig
    seed: int
    own: AttackerData
    stolen: list[FragmentFile] = field(default_factory=list)  # breached fragments
    logs: dict[int, LogRows] = field(default_factory=dict)  # by fragment index
    qx: np.ndarray | None = None  # (N, F) the attacker's query features
    qraw: np.ndarray | None = None  # (N, H*W) its query images
    qt: np.ndarray | None = None  # (N, C) the victim's answers as soft targets
    qrows: dict[int, QueryRows] = field(default_factory=dict)  # insider rows, by index
    progress: Progress | None = None
    provider: str | None = None  # the breach's name (for progress)
    teachers: dict[str, Trained] = field(default_factory=dict)  # white-box results so far

    @property
    def n_classes(self) -> int:
        return len(self.data.classes)

    @property
    def has_queries(self) -> bool:
        return self.qx is not None and len(self.qx) > 0

    def info(self, strategy: str) -> dict:
        return {"strategy": strategy, "seed": self.seed, "provider": self.provider}

    def model_arch(self) -> ModelSpec:
        if self.arch is not None:
            return self.arch
        if not self.stolen:
            raise AttackError("design: this strategy needs the victim's design")
        return guessed_arch(self.stolen[-1], self.data)

    def qnn(self, seed: int, stolen: bool = True, frozen: bool = True) -> DistributedQNN:
        """The attacker's copy of the architecture; the stolen fragments set (and frozen)."""
        net = DistributedQNN(self.model_arch(), seed=seed)
        if stolen:
            for f in self.stolen:
                net.set_fragment(f.index, f.fragment)
                net.freeze_fragment(f.index, frozen)
        return net


def strip(spec: ModelSpec) -> ModelSpec:
    """The architecture only: every trained value removed."""
    return build_spec(design_of(spec), name="attacker")


def guessed_arch(stolen: FragmentFile, data: TaskData) -> ModelSpec:
    """Without Kerckhoffs: `index + 2` fragments, each a copy of the stolen fragment's
    block type and depth (at least 4 qubits), tanh glue and a linear head."""
    from qumos.spec import Design, FragmentDesign

    f = stolen.fragment
    fd = FragmentDesign(
        n_qubits=max(f.n_qubits, 4), block=f.block, depth=f.depth, entanglement=f.entanglement
    )
    frags = [fd.model_copy() for _ in range(stolen.index + 2)]
    frags[stolen.index] = FragmentDesign(
        n_qubits=f.n_qubits, block=f.block, depth=f.depth, entanglement=f.entanglement
    )
    return build_spec(
        Design(dataset=data.dataset, task=data.task, fragments=frags, glue="tanh", head="linear"),
        name="attacker",
    )


def inputs_to(net: DistributedQNN, j: int, x: torch.Tensor) -> torch.Tensor:
    """The input angles of fragment j for features x (the prefix's output)."""
    if j == 0:
        return net.encode(x)  # the features, or their hiding transform
    h = net.sims[0](net.encode(x), net.weights[0])
    for k in range(1, j + 1):
        a = net.glue[k - 1](h, x)
        if k == j:
            return a
        h = net.sims[k](a, net.weights[k])
    raise AssertionError("unreachable")


def suffix_from(net: DistributedQNN, j: int, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Logits from fragment j's input angles a (and the features x, for re-uploading)."""
    h = net.sims[j](a, net.weights[j])
    for k in range(j + 1, net.n_fragments):
        h = net.sims[k](net.glue[k - 1](h, x), net.weights[k])
    return net.head(h)


def prefix_params(net: DistributedQNN, j: int) -> list[nn.Parameter]:
    ps = [net.weights[k] for k in range(j)] + [
        p for g in list(net.glue)[:j] for p in g.parameters()
    ]
    if net.transform is not None:
        ps += list(net.transform.parameters())
    return [p for p in ps if p.requires_grad]


def suffix_params(net: DistributedQNN, j: int) -> list[nn.Parameter]:
    ps = [net.weights[k] for k in range(j + 1, net.n_fragments)]
    ps += [p for g in list(net.glue)[j:] for p in g.parameters()]
    ps += list(net.head.parameters())
    return [p for p in ps if p.requires_grad]


Factory = Callable[[int], nn.Module]
