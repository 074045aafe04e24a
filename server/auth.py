"""The authentication slot of the server.

Identity (tokens, realms, permissions) is not built yet, so today the only mode is
``--insecure-no-auth``, and :class:`AuthMiddleware` enforces its one rule: requests come
from a loopback address (the runner also refuses to *bind* anything but loopback in this
mode). Building the middleware without that mode fails with a clear :class:`ConfigError`.
The identity work replaces the body of :meth:`AuthMiddleware.process_request` with token
checks that set ``req.context.principal`` and ``req.context.realm``; resources already read
the realm from there.
"""

from __future__ import annotations

import ipaddress
import socket

import falcon

from qimem.errors import ConfigError, ForbiddenError
from qimem.keys import DEFAULT_REALM

#: Routes that never need credentials (DESIGN.md §7: health and JWKS).
PUBLIC_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", "/v1/openapi.json"})

AUTH_NOT_AVAILABLE = (
    "authentication is not available yet in this version of qimem; run the server for "
    "local development with --insecure-no-auth (it binds only to a loopback address)"
)

_LOOPBACK_LITERALS = frozenset({"127.0.0.1", "::1", "localhost"})


def is_loopback(host: str | None) -> bool:
    """True for a loopback IP literal (127.0.0.0/8, ::1, IPv4-mapped loopback)."""
    if not host:
        return False
    if host in _LOOPBACK_LITERALS:
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def resolve_loopback_bind(host: str, port: int) -> str:
    """The numeric address to bind for ``host``, refusing anything that is not loopback.

    Every address ``host`` resolves to must be loopback (so ``localhost`` is fine and
    ``0.0.0.0``, ``::`` or a LAN name are not).

    :raises ConfigError: ``host`` is not a loopback address or does not resolve.
    """
    refusal = (
        f"--insecure-no-auth refuses to bind {host!r}: without authentication the server "
        "only listens on a loopback address (127.0.0.1, ::1 or localhost)"
    )
    if host in ("", "*", "0.0.0.0", "::"):  # noqa: S104 - checked to be refused
        raise ConfigError(refusal)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ConfigError(f"cannot resolve the bind address {host!r}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses or not all(is_loopback(a) for a in addresses):
        raise ConfigError(refusal)
    return addresses[0]


class AuthMiddleware:
    """Authenticates every request except :data:`PUBLIC_ROUTES`.

    :param insecure_no_auth: serve without authentication (loopback clients only). The only
        mode available until identity lands; ``False`` raises :class:`ConfigError`.
    """

    def __init__(self, *, insecure_no_auth: bool) -> None:
        if not insecure_no_auth:
            raise ConfigError(AUTH_NOT_AVAILABLE)
        self.insecure_no_auth = insecure_no_auth

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.principal = None
        req.context.realm = DEFAULT_REALM
        if not is_loopback(req.remote_addr):
            raise ForbiddenError(
                "this server runs without authentication and only serves loopback clients"
            )
