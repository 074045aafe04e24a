"""Loopback rules of ``--insecure-no-auth`` (local development without tokens).

In that mode the runner binds only loopback addresses (:func:`resolve_loopback_bind`) and
the authentication middleware (:mod:`qimem.server.auth_middleware`) serves only loopback
clients (:func:`is_loopback`).
"""

from __future__ import annotations

import ipaddress
import socket

from qimem.errors import ConfigError

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
