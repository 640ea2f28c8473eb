"""Live services: uvicorn processes on loopback, started by qumos.localstack."""

from __future__ import annotations

import pytest
from qumos.artifact import load_artifact
from qumos.datasets import load_task
from qumos.localstack import stack_on_free_ports


@pytest.fixture(scope="session")
def live_artifact(small_artifact):
    return load_artifact(small_artifact)


@pytest.fixture(scope="session")
def digits_test():
    return load_task("digits", 4, seed=0).test


@pytest.fixture(scope="session")
def reference_probs(live_artifact, digits_test):
    """The in-process torch model (float64) on the whole test set."""
    import torch
    from qumos.model import DistributedQNN

    model = DistributedQNN(live_artifact.spec, dtype=torch.float64)
    with torch.no_grad():
        x = torch.as_tensor(digits_test.x, dtype=torch.float64)
        return torch.softmax(model(x), 1).numpy()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, live_artifact):
    s = stack_on_free_ports(tmp_path_factory.mktemp("stack"), with_attacker=False)
    with s:
        s.deploy(live_artifact)
        yield s
