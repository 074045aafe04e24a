"""Who is calling, under which name, and whether this server may be reached from a network.

* :class:`ClientMiddleware` (first after the request id) checks the ``Host`` header and
  works out the client's address:

  - ``qimem serve --insecure-no-auth`` accepts only loopback names as ``Host``
    (:data:`LOOPBACK_HOSTS`: ``localhost``, ``127.0.0.1``, ``[::1]``, with or without a
    port), so a web page whose DNS name was rebound to 127.0.0.1 cannot drive the
    unauthenticated server from a browser; otherwise ``allowed_hosts`` (empty: any)
    decides. Others get 421 ``host_not_allowed``.
  - ``req.context.client_addr`` is the peer's address, or, when the peer is a trusted proxy,
    the right-most address in ``X-Forwarded-For`` that is not a trusted proxy (addresses
    left of it were written by the client and prove nothing). ``req.context.client_scheme``
    is ``X-Forwarded-Proto`` from a trusted proxy, else the connection's scheme.
  - With ``require_tls_proxy`` (``qimem serve --trusted-proxy`` without
    ``--insecure-plain-http``), the server is meant to be reached through its TLS proxy
    only: a request whose peer is neither a trusted proxy nor loopback, or that a trusted
    proxy forwards with ``X-Forwarded-Proto`` other than ``https`` (it reached the proxy
    over plain HTTP), gets 403 ``direct_access_refused`` before authentication, its body
    unread. Loopback peers are served: their traffic never leaves the host (health
    checks, an operator on the machine). A proxy that sends no ``X-Forwarded-Proto`` is
    believed (the documented nginx config always sends it).

* :func:`check_exposure` refuses a non-loopback bind unless the operator said how TLS is
  provided: ``--trusted-proxy`` (TLS ends at a reverse proxy) or ``--insecure-plain-http``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

import falcon

from qimem.errors import ConfigError, ValidationError
from qimem.server.auth import is_loopback

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: ``Host`` names the unauthenticated development server answers to.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
_MAX_FORWARDED_HOPS = 32


class HostNotAllowedError(ValidationError):
    """The request's ``Host`` is not one this server answers to."""

    http_status = 421
    code = "host_not_allowed"
    title = "Misdirected request"


class DirectAccessRefusedError(ValidationError):
    """The request did not come through the TLS-terminating proxy this server sits behind."""

    http_status = 403
    code = "direct_access_refused"
    title = "Forbidden"


def split_host(value: str) -> tuple[str, str | None] | None:
    """``Host`` header → (lower-case host, port or None); None when malformed.

    ``[::1]:8080`` → ``("[::1]", "8080")``; ``Example.org`` → ``("example.org", None)``.
    """
    value = value.strip().lower()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            return None
        port: str | None = rest[1:]
    elif ":" in value:
        host, _, port = value.rpartition(":")
    else:
        host, port = value, None
    if not host or (port is not None and not (port.isdigit() and len(port) <= 5)):
        return None
    return host, port


def normalize_allowed_hosts(hosts: Iterable[str]) -> frozenset[str]:
    """Validate ``allowed_hosts`` entries (``name``, ``name:port``, ``[v6]``, ``[v6]:port``).

    :raises ConfigError: an entry that is not a host name with an optional port.
    """
    result = set()
    for entry in hosts:
        parsed = split_host(entry) if isinstance(entry, str) else None
        if parsed is None:
            raise ConfigError(f"allowed host {entry!r} is not a host name with an optional port")
        host, port = parsed
        result.add(host if port is None else f"{host}:{port}")
    return frozenset(result)


def parse_trusted_proxies(values: Iterable[str]) -> tuple[Network, ...]:
    """``--trusted-proxy`` values (an IP address or a network such as ``10.0.0.0/24``).

    :raises ConfigError: a value that is not an address or network.
    """
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(str(value).strip().strip("[]"), strict=False))
        except ValueError:
            raise ConfigError(
                f"trusted proxy {value!r} is not an IP address or network (a host name is not "
                "accepted: the check compares the connection's peer address)"
            ) from None
    return tuple(networks)


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = value.strip()
    if value.startswith("[") and "]" in value:  # [v6] or [v6]:port
        value = value[1 : value.index("]")]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


class ClientMiddleware:
    """Check ``Host`` and set ``req.context.client_addr`` and ``client_scheme``.

    :param allowed_hosts: accepted ``Host`` values (see :func:`normalize_allowed_hosts`);
        empty: any. ``qimem serve --insecure-no-auth`` passes :data:`LOOPBACK_HOSTS`.
    :param trusted_proxies: peers whose ``X-Forwarded-For``/``-Proto`` are honoured.
    :param require_tls_proxy: refuse (403 ``direct_access_refused``) a request whose peer is
        neither a trusted proxy nor loopback, and one a trusted proxy forwards with an
        ``X-Forwarded-Proto`` other than ``https``.
    """

    def __init__(
        self,
        *,
        allowed_hosts: Iterable[str] = (),
        trusted_proxies: Iterable[Network] = (),
        require_tls_proxy: bool = False,
    ) -> None:
        self._hosts = normalize_allowed_hosts(allowed_hosts) or None
        self._accepted: set[str] = set()  # Host values seen and accepted (bounded)
        self._proxies = tuple(trusted_proxies)
        self._trusted_cache: dict[str, bool] = {}
        self._require_tls_proxy = require_tls_proxy

    def _trusted(self, address: str) -> bool:
        known = self._trusted_cache.get(address)
        if known is None:
            ip = _address(address)
            known = ip is not None and any(ip in net for net in self._proxies)
            if len(self._trusted_cache) < 1024:
                self._trusted_cache[address] = known
        return known

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        peer = req.remote_addr
        req.context.client_addr = peer
        req.context.client_scheme = req.scheme
        if self._proxies and self._trusted(peer):
            self._from_proxy(req, peer)
        elif self._require_tls_proxy and not is_loopback(peer):
            raise DirectAccessRefusedError(
                "this server is served through its TLS proxy; connect there (direct "
                "connections are refused)"
            )
        if self._hosts is not None:
            header = req.get_header("Host")
            if header not in self._accepted:
                self._check_host(header)

    def _check_host(self, header: str | None) -> None:
        hosts = self._hosts
        assert hosts is not None
        parsed = split_host(header) if header else None
        if parsed is not None:
            host, port = parsed
            if host in hosts or (port is not None and f"{host}:{port}" in hosts):
                if header is not None and len(self._accepted) < 256:
                    self._accepted.add(header)
                return
        if hosts == LOOPBACK_HOSTS:
            what = "loopback names (localhost, 127.0.0.1, [::1])"
        else:
            what = "the names in allowed_hosts"
        raise HostNotAllowedError(
            f"this server answers only to {what}; the request's Host header is not one of them"
        )

    def _from_proxy(self, req: falcon.Request, peer: str) -> None:
        forwarded = req.get_header("X-Forwarded-For")
        if forwarded:
            hops = forwarded.split(",")[-_MAX_FORWARDED_HOPS:]
            client = peer
            for hop in reversed(hops):
                ip = _address(hop)
                if ip is None:
                    break  # garbage: keep the last address a trusted proxy vouched for
                client = str(ip)
                if not self._trusted(client):
                    break
            req.context.client_addr = client
        proto = req.get_header("X-Forwarded-Proto")
        if proto:
            proto = proto.split(",")[-1].strip().lower()
            if proto in ("http", "https"):
                req.context.client_scheme = proto
            if self._require_tls_proxy and proto != "https":
                raise DirectAccessRefusedError(
                    "this server is served through its TLS proxy over HTTPS only; the proxy "
                    "forwarded a request that did not arrive over HTTPS: connect with https://"
                )


def _bind_addresses(host: str, port: int) -> list[str]:
    if host in ("", "*", "0.0.0.0", "::"):  # noqa: S104 - every interface
        return [host or "0.0.0.0"]  # noqa: S104 - compared, never bound here
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ConfigError(f"cannot resolve the bind address {host!r}") from None
    return [str(info[4][0]) for info in infos]


def check_exposure(
    host: str, port: int, *, trusted_proxies: Iterable[Network], insecure_plain_http: bool
) -> str | None:
    """Refuse a non-loopback bind unless TLS is provided by a proxy or plain HTTP is chosen.

    Returns a warning to print (plain HTTP on a network), or None. With trusted proxies
    and without ``insecure_plain_http``, the app refuses peers that are neither a proxy nor
    loopback (``ClientMiddleware(require_tls_proxy=True)``); ``insecure_plain_http`` lets
    them in, with the warning.

    :raises ConfigError: a non-loopback bind without ``--trusted-proxy`` or
        ``--insecure-plain-http``.
    """
    addresses = _bind_addresses(host, port)
    if addresses and all(is_loopback(a) for a in addresses):
        return None
    if insecure_plain_http:
        return (
            f"warning: serving plain HTTP on {host!r}, which is not a loopback address: bearer "
            "tokens and key material cross the network unencrypted"
        )
    if tuple(trusted_proxies):
        return None
    raise ConfigError(
        f"refusing to bind {host!r}, which is not a loopback address, without TLS: put a "
        "TLS-terminating reverse proxy in front and name it with --trusted-proxy ADDR "
        "(see docs/operations.md#deployment-behind-nginx), or pass --insecure-plain-http to "
        "send tokens and keys over the network unencrypted"
    )
