"""The distributed hybrid QNN in torch, built from a `ModelSpec`.

    features (B, 16) -> Q_1 -> glue_1 -> Q_2 -> ... -> Q_K -> head -> logits (B, C)

Each fragment's weights are one `nn.Parameter` (n_params,); glue k is an `nn.Linear`
followed by pi * tanh (or pi * sin); the head is the fixed readout or an `nn.Linear`.
`to_spec()` writes the trained values back into a ModelSpec (the artifact's contents).
"""

from __future__ import annotations

import math

import torch
from qumos.chain import chain_steps, drive
from qumos.spec import FragmentSpec, GlueSpec, HeadSpec, ModelSpec
from qumos.torchsim import fragment_sim, init_params
from torch import nn


class Glue(nn.Module):
    def __init__(self, spec: GlueSpec):
        super().__init__()
        self.kind, self.reupload = spec.kind, spec.reupload
        self.linear = nn.Linear(spec.in_dim, spec.out_dim)
        if spec.weight is not None:
            with torch.no_grad():
                self.linear.weight.copy_(torch.tensor(spec.weight))
                self.linear.bias.copy_(torch.tensor(spec.bias))

    def forward(self, h: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        z = torch.cat([h, features], dim=1) if self.reupload else h
        a = self.linear(z)
        return math.pi * (torch.tanh(a) if self.kind == "tanh" else torch.sin(a))

    def to_spec(self, spec: GlueSpec) -> GlueSpec:
        return spec.model_copy(
            update={
                "weight": self.linear.weight.detach().tolist(),
                "bias": self.linear.bias.detach().tolist(),
            }
        )


class Head(nn.Module):
    def __init__(self, spec: HeadSpec):
        super().__init__()
        self.spec = spec
        self.linear = nn.Linear(spec.in_dim, spec.n_classes) if spec.kind == "linear" else None
        if self.linear is not None and spec.weight is not None:
            with torch.no_grad():
                self.linear.weight.copy_(torch.tensor(spec.weight))
                self.linear.bias.copy_(torch.tensor(spec.bias))
        groups = spec.readout_groups()
        m = torch.zeros(spec.in_dim, spec.n_classes)
        for c, g in enumerate(groups):
            m[g, c] = 1.0
        self.register_buffer("readout", m * spec.scale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h) if self.linear is not None else h @ self.readout

    def to_spec(self) -> HeadSpec:
        if self.linear is None:
            return self.spec
        return self.spec.model_copy(
            update={
                "weight": self.linear.weight.detach().tolist(),
                "bias": self.linear.bias.detach().tolist(),
            }
        )


class DistributedQNN(nn.Module):
    def __init__(self, spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        gen = torch.Generator().manual_seed(seed)
        # nn.Linear initialisation draws from the global CPU generator (torch.manual_seed
        # without its ~1 ms of seeding every other device: the same CPU stream)
        torch.default_generator.manual_seed(seed)
        self.sims = [fragment_sim(f, dtype=dtype) for f in spec.fragments]  # compiled once
        self.weights = nn.ParameterList(
            [
                nn.Parameter(
                    torch.tensor(f.params, dtype=dtype)
                    if f.params is not None
                    else init_params(f, gen).to(dtype)
                )
                for f in spec.fragments
            ]
        )
        self.glue = nn.ModuleList([Glue(g) for g in spec.glue])
        # input hiding: the company-held transform before fragment 0 (None: off)
        self.transform = Glue(spec.input_transform) if spec.input_transform else None
        self.head = Head(spec.head)
        if dtype != torch.get_default_dtype():  # nn.Linear made the glue and head in that
            self.to(dtype)

    @property
    def n_fragments(self) -> int:
        return len(self.sims)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Fragment 0's input angles (the features, or their hiding transform)."""
        if self.transform is None:
            return features
        x = features.to(self.transform.linear.weight.dtype)  # as the simulator casts
        return self.transform(x, x)

    def fragment_outputs(self, features: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of every fragment, in chain order: a list of (B, n_k)."""
        outs: list[torch.Tensor] = []

        def run(k: int, x: torch.Tensor) -> torch.Tensor:
            outs.append(self.sims[k](x, self.weights[k]))
            return outs[-1]

        drive(chain_steps(self.encode, list(self.glue), features), run)
        return outs

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.fragment_outputs(features)[-1])

    def freeze_fragment(self, k: int, frozen: bool = True) -> None:
        self.weights[k].requires_grad_(not frozen)

    def set_fragment(self, k: int, fragment: FragmentSpec) -> None:
        with torch.no_grad():
            self.weights[k].copy_(torch.tensor(fragment.params))

    def to_spec(self) -> ModelSpec:
        frags = [
            f.with_params(w.detach().double().tolist())
            for f, w in zip(self.spec.fragments, self.weights)
        ]
        glue = [m.to_spec(g) for m, g in zip(self.glue, self.spec.glue)]
        update = {"fragments": frags, "glue": glue, "head": self.head.to_spec()}
        if self.transform is not None:
            update["input_transform"] = self.transform.to_spec(self.spec.input_transform)
        return self.spec.model_copy(update=update)


@torch.no_grad()
def predict_proba(model: nn.Module, features, batch_size: int = 1024) -> torch.Tensor:
    x = torch.as_tensor(features, dtype=torch.float32)
    outs = [
        torch.softmax(model(x[i : i + batch_size]), dim=1) for i in range(0, len(x), batch_size)
    ]
    return torch.cat(outs) if outs else torch.zeros(0)


def accuracy(model: nn.Module, features, labels) -> float:
    y = torch.as_tensor(labels)
    if len(y) == 0:
        return float("nan")
    return float((predict_proba(model, features).argmax(1) == y).double().mean())
