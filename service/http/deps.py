"""FastAPI dependencies shared by the routes: the classify service and the admin check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from service.core.classify import ClassifyService
from service.core.errors import ForbiddenError, NotReadyError, UnauthorizedError


def service_of(request: Request) -> ClassifyService:
    """The loaded model; 503 while it is still loading."""
    service: ClassifyService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReadyError("the model is still loading")
    return service


async def get_service(request: Request) -> ClassifyService:
    """Dependency form of `service_of`. Async on purpose: FastAPI runs sync dependencies in the
    threadpool, a thread hop per request for a dictionary lookup."""
    return service_of(request)


ServiceDep = Annotated[ClassifyService, Depends(get_service)]


async def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Bearer token for budget changes, compared in constant time.

    No token configured -> 403 (the endpoint is disabled, no token can help). A missing token and a
    wrong one are both 401; the message and `WWW-Authenticate` say which (`error="invalid_token"`
    for a wrong one, as RFC 6750 asks), which tells a guesser nothing about the token itself.
    """
    configured = request.app.state.settings.admin_token
    if configured is None or not configured.get_secret_value():
        raise ForbiddenError("changing the budget is disabled: the server has no admin token (BOOSTSERVE_ADMIN_TOKEN)")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError(
            "missing bearer token: send 'Authorization: Bearer <admin token>'",
            www_authenticate='Bearer realm="boostserve"',
        )
    if not hmac.compare_digest(token.strip().encode(), configured.get_secret_value().encode()):
        raise UnauthorizedError(
            "invalid bearer token", www_authenticate='Bearer realm="boostserve", error="invalid_token"'
        )
