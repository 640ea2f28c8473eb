"""Helpers for in-process service tests (apps built with create_app, lifespans run)."""

from __future__ import annotations

import secrets
from contextlib import AsyncExitStack, asynccontextmanager

import httpx


def write_token(path) -> str:
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token)
    path.chmod(0o600)
    return token


def provider_settings(tmp_path, name: str, **kw):
    from services.provider.settings import ProviderSettings

    token_file = tmp_path / "tokens" / name
    token = write_token(token_file)
    s = ProviderSettings(name=name, data_dir=tmp_path / name, token_file=token_file, **kw)
    return s, token


@asynccontextmanager
async def running(app):
    """Run an app's lifespan and give an httpx client talking to it in-process."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            yield client


@asynccontextmanager
async def company_stack(tmp_path, artifact, provider_overrides=None, provider_kw=None, **orch_kw):
    """Three real provider apps and the orchestrator, wired in-process with ASGITransport.

    provider_overrides: {name: httpx transport} replacing a provider (down, misbehaving),
    or {name: callable(app) -> transport} wrapping the real provider app.
    provider_kw: settings for every provider (e.g. inline_rows=0).
    Yields (orchestrator client, admin token, {name: (app, token)})."""
    from services.orchestrator.app import create_app as orch_app
    from services.orchestrator.settings import OrchestratorSettings
    from services.provider.app import create_app as provider_app

    async with AsyncExitStack() as stack:
        providers = {}
        for name in artifact.spec.placement:
            s, token = provider_settings(tmp_path, name, **(provider_kw or {}))
            app = provider_app(s)
            await stack.enter_async_context(app.router.lifespan_context(app))
            providers[name] = (app, token)
        mounts = {}
        for name, (app, _) in providers.items():
            ov = (provider_overrides or {}).get(name)
            if callable(ov) and not isinstance(ov, httpx.AsyncBaseTransport):
                ov = ov(app)  # a factory wrapping the real provider app (e.g. tampering)
            mounts[f"http://{name}"] = ov or httpx.ASGITransport(app=app)
        admin = write_token(tmp_path / "admin_token")
        settings = OrchestratorSettings(
            data_dir=tmp_path / "orchestrator",
            tokens_dir=tmp_path / "tokens",
            admin_token_file=tmp_path / "admin_token",
            providers=",".join(f"{n}=http://{n}" for n in providers),
            **orch_kw,
        )
        app = orch_app(settings, mounts=mounts)
        client = await stack.enter_async_context(running(app))
        # a client API key, sent by default like any client's (admin calls pass their own)
        client.headers["Authorization"] = f"Bearer {await create_key(client, admin)}"
        yield client, admin, providers


async def create_key(client, admin, name: str = "tests", **quota) -> str:
    r = await client.post(
        "/v1/keys", json={"name": name, **quota}, headers={"Authorization": f"Bearer {admin}"}
    )
    assert r.status_code == 201, r.text
    return r.json()["key"]


async def deploy_inprocess(client, admin, providers, artifact):
    """What `qumos deploy` does, through the in-process apps."""
    for k, name in enumerate(artifact.spec.placement):
        app, token = providers[name]
        ff = artifact.fragment_file(k)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://p"
        ) as pc:
            r = await pc.put(
                f"/v1/fragments/{ff.fragment_id}",
                content=ff.model_dump_json(),
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 201, r.text
    r = await client.put(
        f"/v1/models/{artifact.spec.name}",
        content=artifact.company_spec().model_dump_json(),
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert r.status_code == 201, r.text


def torch_probs(spec, features):
    """The in-process reference: the torch model in float64."""
    import torch
    from qumos.model import DistributedQNN

    model = DistributedQNN(spec, dtype=torch.float64)
    with torch.no_grad():
        return torch.softmax(model(torch.as_tensor(features, dtype=torch.float64)), 1).numpy()
