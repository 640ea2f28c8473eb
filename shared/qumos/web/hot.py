"""The fast path for the few endpoints on every prediction's path (a provider's execute,
the orchestrator's predict and infer): `HotRoutes` calls their handlers straight from the
ASGI scope, without FastAPI's routing and dependency solving, which cost ~0.15-0.3 ms per
request here (a regex over every route, parameter resolution); four such exchanges sit
under every batch-1 prediction. docs/performance.md has the measurement.

A hot route is registered once, as an ordinary FastAPI route (`hot_route`): the OpenAPI
schema, and the way it is served when the fast path is off (the services'
`FAST_ROUTES=false`), come from that route. Its handler therefore takes only its path
parameters and the `Request`, and does its own auth and body parsing (`check_bearer`,
`parse_body`), the same on both paths. The fast path sits inside the services' own
middleware (metrics, in-flight and body limits), so those apply unchanged, and any
exception goes through the app's own exception handlers (`handle_exception`): the same
status and JSON body on both paths.
"""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from qumos.web.errors import handle_exception


class HotRoutes:
    """ASGI middleware serving `app.state.hot_routes` [(method, pattern, route)]."""

    def __init__(self, app, routes: list):
        self.app, self.routes = app, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for method, pattern, route in self.routes:
                m = pattern.fullmatch(scope["path"]) if scope["method"] == method else None
                if m is not None:
                    scope["path_params"] = params = m.groupdict()
                    scope["route"] = route
                    request = Request(scope, receive)
                    try:
                        response = await route.endpoint(request=request, **params)
                    except Exception as e:  # noqa: BLE001 - the app's handlers decide
                        response = await handle_exception(request, e)
                    return await response(scope, receive, send)
        await self.app(scope, receive, send)


def hot_route(app: FastAPI, method: str, path: str, **route_kwargs):
    """Decorator: `endpoint(request, **path_params) -> Response` as a FastAPI route with
    `route_kwargs` (response_model, responses, ...), also served by `HotRoutes` when the
    app has the fast path (`install_common(..., fast_routes=True)`). Path parameters
    match one segment."""

    def register(endpoint):
        app.add_api_route(path, endpoint, methods=[method], **route_kwargs)
        pattern = re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path)))
        app.state.hot_routes.append((method, pattern, app.routes[-1]))
        return endpoint

    return register
