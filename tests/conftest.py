"""Shared fixtures: a small trained model, written once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_artifact(tmp_path_factory):
    """The default 2-2-2 design on digits-4, trained briefly (seed 0)."""
    from qumos.artifact import save_artifact
    from qumos.datasets import load_task
    from qumos.spec import design_from_flags
    from qumos.train import TrainConfig, train_design

    out = tmp_path_factory.mktemp("artifact") / "model"
    design = design_from_flags(dataset="digits", task=4, fragments="2-2-2")
    data = load_task("digits", 4, seed=0)
    spec, res, test_acc = train_design(design, data, TrainConfig(epochs=6, seed=0), name="digits4")
    save_artifact(
        spec,
        out,
        metrics={"val_acc": res.val_acc, "test_acc": test_acc},
        training={"seed": 0, "design": design.model_dump()},
    )
    return out
