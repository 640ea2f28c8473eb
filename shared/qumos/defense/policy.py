"""Output policy per model: what a client sees of the probabilities.

    probabilities   the full vector (default), rounded to `decimals` when set
    top_k           the k largest probabilities, the others 0 (rounded when set)
    label           the predicted label only (no probabilities at all)

One function, `apply_policy`, is used by the orchestrator (v1 predict and the v2 infer
routes) and by the attack package's in-process oracle, so the attacker meets exactly
what a client gets. Labels are always the argmax of the unrounded probabilities.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

POLICY_KINDS = ("probabilities", "top_k", "label")
MAX_DECIMALS = 15


class OutputPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["probabilities", "top_k", "label"] = Field(
        "probabilities", description="probabilities (default), top_k or label"
    )
    k: int | None = Field(None, description="top_k: how many probabilities are shown")
    decimals: int | None = Field(
        None,
        description="round shown probabilities to this many "
        f"decimals (0 to {MAX_DECIMALS}); none: full precision",
    )

    @model_validator(mode="after")
    def _check(self) -> OutputPolicy:
        if self.kind == "top_k":
            if self.k is None or self.k < 1:
                raise ValueError(f"k is {self.k}; top_k needs k >= 1")
        elif self.k is not None:
            raise ValueError(f"k is {self.k}; only the top_k policy takes k")
        if self.decimals is not None:
            if self.kind == "label":
                raise ValueError("decimals: the label policy shows no probabilities")
            if not 0 <= self.decimals <= MAX_DECIMALS:
                raise ValueError(f"decimals is {self.decimals}; allowed: 0 to {MAX_DECIMALS}")
        return self

    @property
    def shows_probabilities(self) -> bool:
        return self.kind != "label"

    def describe(self) -> str:
        s = self.kind + (f"(k={self.k})" if self.kind == "top_k" else "")
        return s + (f", {self.decimals} decimals" if self.decimals is not None else "")


DEFAULT_POLICY = OutputPolicy()


def parse_policy(text: str) -> OutputPolicy:
    """'probabilities', 'probabilities:3' (3 decimals), 'top_k:2', 'top_k:2:3', 'label'
    (the CLI's and benchmarks' short form). ValueError naming the problem."""
    parts = text.strip().split(":")
    kind = parts[0]
    if kind not in POLICY_KINDS:
        raise ValueError(
            f"policy: {text!r}; allowed: {', '.join(POLICY_KINDS)} "
            "(probabilities[:decimals], top_k:k[:decimals], label)"
        )
    try:
        nums = [int(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(f"policy: {text!r}; the numbers after ':' must be integers") from None
    if kind == "top_k":
        if not 1 <= len(nums) <= 2:
            raise ValueError(f"policy: {text!r}; expected top_k:k or top_k:k:decimals")
        return OutputPolicy(kind="top_k", k=nums[0], decimals=nums[1] if len(nums) > 1 else None)
    if kind == "probabilities":
        if len(nums) > 1:
            raise ValueError(f"policy: {text!r}; expected probabilities[:decimals]")
        return OutputPolicy(decimals=nums[0] if nums else None)
    if nums:
        raise ValueError(f"policy: {text!r}; label takes no numbers")
    return OutputPolicy(kind="label")


def apply_policy(probs: np.ndarray, policy: OutputPolicy | None) -> np.ndarray:
    """The answers a client gets for probabilities (N, C): (N, C) floats under
    probabilities and top_k, (N,) class indices under label."""
    p = np.asarray(probs, dtype=float)
    policy = policy or DEFAULT_POLICY
    if policy.kind == "label":
        return p.argmax(axis=1)
    if policy.kind == "top_k" and policy.k < p.shape[1]:
        keep = np.argsort(-p, axis=1, kind="stable")[:, : policy.k]
        out = np.zeros_like(p)
        np.put_along_axis(out, keep, np.take_along_axis(p, keep, axis=1), axis=1)
        p = out
    if policy.decimals is not None:
        p = np.round(p, policy.decimals)
    return p


__all__ = ["DEFAULT_POLICY", "POLICY_KINDS", "OutputPolicy", "apply_policy", "parse_policy"]
