"""The company's classical part, in numpy: preprocessing, glue and head.

The orchestrator runs inference with these functions and never imports torch; the torch
model (`qumos.model`) implements the same maps differentiably, and tests check that the
two agree. The order of the chain (fragment, glue, fragment, ..., head) is written once,
`chain_steps`, and driven by the in-process models, the orchestrator and the deploy's
canaries.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from functools import partial
from typing import TypeVar

import numpy as np
from qumos.spec import GlueSpec, HeadSpec, ModelSpec, PreprocessSpec

T = TypeVar("T")


def preprocess(raw: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(N, H*W) pixels -> (N, pool_to**2) features in [0, pi]: center crop, average pool."""
    raw = np.asarray(raw, dtype=np.float64)
    h, w = spec.image_shape
    if raw.ndim != 2 or raw.shape[1] != h * w:
        raise ValueError(f"images must have shape (batch, {h * w}); got {raw.shape}")
    c, p = spec.crop, spec.pool_to
    top, left = (h - c) // 2, (w - c) // 2
    img = raw.reshape(-1, h, w)[:, top:top + c, left:left + c]
    pooled = img.reshape(-1, p, c // p, p, c // p).mean(axis=(2, 4))  # (N, p, p)
    return np.clip(pooled.reshape(len(raw), -1) / spec.max_value, 0, 1) * np.pi


def encode_inputs(spec: ModelSpec, features: np.ndarray) -> np.ndarray:
    """Fragment 0's input angles: the features, or with input hiding the company-held
    transform of them (`ModelSpec.input_transform`), so that fragment 0's provider never
    sees the features."""
    t = spec.input_transform
    return features if t is None else glue_forward(t, features, features)


def glue_forward(glue: GlueSpec, h: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Fragment k's outputs h (B, n_k) -> fragment k+1's input angles (B, out_dim)."""
    z = np.concatenate([h, features], axis=1) if glue.reupload else h
    a = z @ np.asarray(glue.weight).T + np.asarray(glue.bias)
    return np.pi * (np.tanh(a) if glue.kind == "tanh" else np.sin(a))


def head_forward(head: HeadSpec, h: np.ndarray) -> np.ndarray:
    """Last fragment's outputs (B, n) -> logits (B, n_classes)."""
    if head.kind == "linear":
        return h @ np.asarray(head.weight).T + np.asarray(head.bias)
    return head.scale * np.stack([h[:, g].sum(axis=1) for g in head.readout_groups()], axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def chain_steps(encode: Callable[[T], T], glues: Sequence[Callable[[T, T], T]],
                features: T) -> Generator[tuple[int, T], T, T]:
    """The chain, once for every backend (numpy here, torch in `qumos.model`, the
    orchestrator's providers over HTTP): a generator that yields (k, fragment k's input
    angles), is sent fragment k's outputs, and returns the last fragment's outputs.
    `encode(features)` gives fragment 0's angles, `glues[k](h, features)` fragment k+1's.
    Drive it with `drive` (a function per fragment) or, asynchronously, `adrive`."""
    h = yield 0, encode(features)
    for k, g in enumerate(glues):
        h = yield k + 1, g(h, features)
    return h


def drive(steps: Generator[tuple[int, T], T, T], fragment: Callable[[int, T], T]) -> T:
    """Run `chain_steps` with `fragment(k, angles) -> outputs`; the last outputs."""
    k, x = next(steps)
    while True:
        try:
            k, x = steps.send(fragment(k, x))
        except StopIteration as done:
            return done.value


async def adrive(steps: Generator[tuple[int, T], T, T],
                 fragment: Callable[[int, T], Awaitable[T]]) -> T:
    """`drive` with an async `fragment` (the orchestrator's provider calls)."""
    k, x = next(steps)
    while True:
        try:
            k, x = steps.send(await fragment(k, x))
        except StopIteration as done:
            return done.value


def numpy_steps(spec: ModelSpec, features: np.ndarray
                ) -> Generator[tuple[int, np.ndarray], np.ndarray, np.ndarray]:
    """`chain_steps` with the company's numpy glue of `spec`."""
    return chain_steps(lambda f: encode_inputs(spec, f),
                       [partial(glue_forward, g) for g in spec.glue], features)


def run_chain(spec: ModelSpec, features: np.ndarray,
              fragment: Callable[[int, np.ndarray], np.ndarray]) -> np.ndarray:
    """Class probabilities (B, C) of features (B, 16), with `fragment(k, angles)`
    executing fragment k (on Aer, the torch simulator, ...)."""
    return softmax(head_forward(spec.head, drive(numpy_steps(spec, features), fragment)))
