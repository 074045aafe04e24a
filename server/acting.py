"""Who is acting on a request, for the identity routes: the principal the middleware put
on ``req.context`` (checked again by the services: no escalation) and its name for audit
records; and the no-store headers of answers that carry secrets or tokens."""

from __future__ import annotations

import falcon

from qimem.identity.permissions import Principal


def caller(req: falcon.Request) -> Principal | None:
    """The acting principal, checked again by the services (no escalation); None only
    under ``--insecure-no-auth`` (loopback development, full control)."""
    return getattr(req.context, "principal", None)


def actor(req: falcon.Request) -> str:
    """The acting principal's name for audit records."""
    principal = caller(req)
    if principal is None:
        return "(insecure-no-auth)"
    return f"{principal.username}@{principal.realm}"


def no_store(resp: falcon.Response) -> None:
    """Keep an answer that holds a secret or a token out of every cache."""
    resp.set_header("Cache-Control", "no-store")
    resp.set_header("Pragma", "no-cache")
