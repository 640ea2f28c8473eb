"""The company side of a deployment: push each fragment to its provider, register the
company part (no fragment weights) and the integrity canaries with the orchestrator.
Canaries are computed with the full model on Aer (`qumos.quantum`), which only the
company can do: this, not `qumos.client`, is the client-side module that needs qiskit.
"""

from __future__ import annotations

import numpy as np
from qumos.chain import preprocess, run_chain
from qumos.client import check_response, make_client
from qumos.wire import CanaryRequest, FragmentCanaries


def make_canaries(spec, images, tolerance: float = 1e-6) -> CanaryRequest:
    """Canaries for every fragment from raw `images` (N, H*W), computed with the full model
    (all fragment parameters: only the company can do this). Fragment k's canary inputs are
    what fragment k really receives for those images (preprocess, fragments, glue), so on
    the wire they look like real traffic; outputs are exact expectation values."""
    from qumos.quantum import AerRunner, DeviceProfile

    for k, frag in enumerate(spec.fragments):
        if frag.params is None:
            raise ValueError(f"fragments[{k}].params: canaries need the full model")
    frags: list[FragmentCanaries] = []

    def run(k: int, x: np.ndarray) -> np.ndarray:
        y = AerRunner(spec.fragments[k], DeviceProfile()).run(x)
        frags.append(FragmentCanaries(inputs=x.tolist(), outputs=y.tolist()))
        return y

    run_chain(spec, preprocess(np.asarray(images, dtype=float), spec.preprocess), run)
    return CanaryRequest(fragments=frags, tolerance=tolerance)


def canary_images(spec, n: int, seed: int | None = None) -> np.ndarray:
    """`n` of the company's own training images (random, so each deployment's canaries
    differ; a provider cannot learn them from the code)."""
    from qumos.datasets import load_task

    raw = load_task(spec.dataset, spec.task, seed=0).train.raw
    rng = np.random.default_rng(seed)
    return raw[rng.choice(len(raw), size=min(n, len(raw)), replace=False)]


def deploy_artifact(
    artifact,
    orchestrator_url: str,
    admin_token: str,
    providers: dict[str, str],
    tokens: dict[str, str],
    timeout: float = 60.0,
    canaries: int = 64,
    canary_seed: int | None = None,
) -> dict:
    """Push fragment k to provider placement[k] (with that provider's token), then register
    the company part (no fragment weights) with the orchestrator, then `canaries` integrity
    canaries per fragment (0: none)."""
    from qumos.artifact import Artifact

    assert isinstance(artifact, Artifact)
    spec = artifact.spec
    missing = [p for p in spec.placement if p not in providers]
    if missing:
        raise ValueError(
            f"providers: no URL for {missing}; the model is placed on {spec.placement}"
        )
    missing = [p for p in spec.placement if p not in tokens]
    if missing:
        raise ValueError(f"tokens: no token for {missing}")

    def put(client, url: str, body: str, token: str) -> None:
        check_response(
            client.put(
                url,
                content=body,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
        )

    deployed = []
    with make_client(timeout=timeout) as client:
        for k, name in enumerate(spec.placement):
            ff = artifact.fragment_file(k)
            url = f"{providers[name].rstrip('/')}/v1/fragments/{ff.fragment_id}"
            put(client, url, ff.model_dump_json(), tokens[name])
            deployed.append({"provider": name, "fragment_id": ff.fragment_id, "url": url})
        url = f"{orchestrator_url.rstrip('/')}/v1/models/{spec.name}"
        put(client, url, artifact.company_spec().model_dump_json(), admin_token)
        if canaries > 0:
            req = make_canaries(spec, canary_images(spec, canaries, canary_seed))
            put(client, f"{url}/canaries", req.model_dump_json(), admin_token)
    return {"model": spec.name, "fragments": deployed, "orchestrator": url, "canaries": canaries}
