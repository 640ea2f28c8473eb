"""`qumos keys create|list|revoke|flagged`: client API keys of a running orchestrator,
through its admin API (the admin token). The key is printed once, at creation; the
orchestrator keeps only a salted hash. Bad arguments and refused calls exit 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import typer
from qumos.cli_common import emit, fail
from qumos.errors import QumosError

DEFAULT_WORKDIR = Path("runs/local")
keys_app = typer.Typer(
    no_args_is_help=True,
    help="Client API keys of an orchestrator (admin token): create, list, revoke, flagged.",
)

ORCH = typer.Option(
    "http://127.0.0.1:8100",
    "--orchestrator",
    envvar="QUMOS_ORCHESTRATOR_URL",
    help="orchestrator URL",
)
ADMIN = typer.Option(
    DEFAULT_WORKDIR / "secrets/admin_token",
    "--admin-token-file",
    envvar="QUMOS_ADMIN_TOKEN_FILE",
    help="file with the admin token",
)
JSON = typer.Option(False, "--json")


def _call(
    method: str, orchestrator: str, admin_token_file: Path, path: str, body: dict | None = None
) -> dict:
    import httpx
    from qumos.client import check_response, make_client
    from qumos.config import read_token_file

    token = read_token_file(admin_token_file, "--admin-token-file")
    if not orchestrator.startswith(("http://", "https://")):
        raise QumosError(f"--orchestrator: {orchestrator!r} is not an http(s) URL")
    try:
        with make_client(timeout=30) as c:
            return check_response(
                c.request(
                    method,
                    f"{orchestrator.rstrip('/')}{path}",
                    json=body,
                    headers={"Authorization": f"Bearer {token}"},
                )
            )
    except httpx.TransportError as e:
        raise QumosError(
            f"--orchestrator: {orchestrator} is unreachable ({type(e).__name__})"
        ) from None


@keys_app.command("create")
def create(
    name: str = typer.Option(..., "--name", help="who the key is for"),
    images_per_window: int | None = typer.Option(
        None, min=1, help="quota: images per window (default: no limit)"
    ),
    window_s: float = typer.Option(60.0, min=0.001, help="quota window in seconds"),
    images_total: int | None = typer.Option(None, min=1, help="quota: images in total"),
    orchestrator: str = ORCH,
    admin_token_file: Path = ADMIN,
    as_json: bool = JSON,
) -> None:
    """Create a key, printed once.

    Store it: the orchestrator keeps only a salted hash."""
    try:
        from qumos.defense.keys import name_problem

        problem = name_problem(name)
        if problem:
            raise QumosError(f"--name: {problem}")
        body = {"name": name, "window_s": window_s}
        if images_per_window is not None:
            body["images_per_window"] = images_per_window
        if images_total is not None:
            body["images_total"] = images_total
        res = _call("POST", orchestrator, admin_token_file, "/v1/keys", body)
    except QumosError as e:
        fail(e)
    emit(res, as_json, f"{res['key']}\n(key {res['id']} for {res['name']}; shown only now)")


def _show(
    orchestrator: str,
    admin_token_file: Path,
    path: str,
    as_json: bool,
    human: Callable[[dict], str],
) -> None:
    """GET `path` of the admin API and print it (`human(answer)` without --json)."""
    try:
        res = _call("GET", orchestrator, admin_token_file, path)
    except QumosError as e:
        fail(e)
    emit(res, as_json, human(res))


@keys_app.command("list")
def list_keys(
    orchestrator: str = ORCH, admin_token_file: Path = ADMIN, as_json: bool = JSON
) -> None:
    """List keys by id, never the keys themselves."""
    _show(
        orchestrator,
        admin_token_file,
        "/v1/keys",
        as_json,
        lambda res: (
            "\n".join(
                f"{k['id']}  {k['name']:20}  {'revoked' if k['revoked'] else 'active':8} "
                f"{'FLAGGED ' if k['flagged'] else ''}quota {json.dumps(k['quota'])}"
                for k in res["keys"]
            )
            or "(no keys)"
        ),
    )


@keys_app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., help="qk_<id> as `keys list` shows"),
    orchestrator: str = ORCH,
    admin_token_file: Path = ADMIN,
    as_json: bool = JSON,
) -> None:
    """Revoke a key: its requests get 403 from now on."""
    try:
        from qumos.defense.keys import key_id as parse_id

        try:
            kid = parse_id(key_id)
        except ValueError as e:
            raise QumosError(f"KEY_ID: {e}") from None
        res = _call("DELETE", orchestrator, admin_token_file, f"/v1/keys/qk_{kid}")
    except QumosError as e:
        fail(e)
    emit(res, as_json, f"revoked {res['id']} ({res['name']})")


@keys_app.command("flagged")
def flagged(orchestrator: str = ORCH, admin_token_file: Path = ADMIN, as_json: bool = JSON) -> None:
    """Keys the extraction monitor flagged, and why."""
    _show(
        orchestrator,
        admin_token_file,
        "/v1/keys/flagged",
        as_json,
        lambda res: (
            "\n".join(
                f"{k['id']}  {k['name']}: {k['flagged'].get('reason')}" for k in res["flagged"]
            )
            or "(no flagged keys)"
        ),
    )
