"""The one HTTP(S) transport of qimem's clients: ``qimem --server`` (:mod:`qimem.remote`)
and ``qauth --server`` (:mod:`qimem.cli.qauth`) both talk to a server through
:class:`HttpClient`, with one status→error table.

Rules it enforces (issue 12, finding 10 and client TLS; docs/http.md "Clients"):

- **No redirects.** Any 3xx answer is an error naming only where it pointed
  (``scheme://host:port``; never its path, query or credentials). ``http.client`` never
  follows redirects by itself, so the bearer token and passwords go to ``--server`` and
  nowhere else.
- **Bounded reads.** A successful answer over :data:`MAX_RESPONSE_BYTES` (64 MiB) or an
  error body over :data:`MAX_ERROR_BYTES` (64 KiB) is not buffered: the connection is
  dropped and the error says so.
- **TLS.** ``https://`` verifies the certificate chain and host name against the system
  store, or only against ``ca_cert`` when given (like curl's ``--cacert``).
- **Plain http stays on loopback** unless ``insecure_plain_http`` is set.

Standard library only (``http.client``, one keep-alive connection per client; a forked
worker opens its own). Server errors become the qimem error class of the same local
operation, with a one-line message naming the server; the bearer token is never part of a
message or repr.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import re
import ssl
import urllib.parse
from typing import Any

from qimem.errors import (
    AuthError,
    ConflictError,
    DecryptionError,
    EnvelopeFormatError,
    ForbiddenError,
    KeyNotActiveError,
    NotFoundError,
    PayloadTooLargeError,
    QimemError,
    StoreUnavailableError,
    ValidationError,
)

REALM_HEADER = "X-Qimem-Realm"
_MIB = 1024 * 1024
#: The most a successful answer may hold (data endpoints answer a few KiB; a key listing of
#: many thousand keys stays far below).
MAX_RESPONSE_BYTES = 64 * _MIB
#: The most of an error body that is read (a qimem error body is one short JSON object).
MAX_ERROR_BYTES = 64 * 1024
#: The longest server error message shown.
_MAX_MESSAGE = 500

#: HTTP status → error class, for statuses 400-499 (5xx is always StoreUnavailableError).
BY_STATUS: dict[int, type[QimemError]] = {
    400: ValidationError,
    401: AuthError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: DecryptionError,
}
#: Error ``code`` → a more specific class than its status gives.
BY_CODE: dict[str, type[QimemError]] = {
    "key_not_active": KeyNotActiveError,
    "invalid_envelope": EnvelopeFormatError,
}
#: Connection failures after which one retry on a fresh connection is safe (the server
#: closed an idle keep-alive connection).
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
#: OpenSSL verify codes of a certificate for another name (hostname, IP address).
_NAME_MISMATCH = {62, 64}
_HOST_CHARS = re.compile(r"[A-Za-z0-9._:%-]{1,255}")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def check_url(url: str) -> str:
    """``url`` without a trailing slash, if it is an ``http://`` or ``https://`` URL.

    :raises ValidationError: any other scheme, or no host.
    """
    try:
        parsed = urllib.parse.urlparse(url)
        usable = parsed.scheme in ("http", "https") and bool(parsed.hostname)
        parsed.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        usable = False
    if not usable:
        raise ValidationError("--server must be an http:// or https:// URL")
    return url.rstrip("/")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_warning(url: str) -> str | None:
    """A one-line warning when ``url`` is plain http to a host that is not loopback."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "http" or is_loopback(parsed.hostname or ""):
        return None
    return (
        f"qimem: warning: {check_url(url)} is plain http: data keys, passwords and the token "
        "travel unencrypted; use https://"
    )


def tls_context(ca_cert: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A client TLS context that verifies the chain and host name: against the system trust
    store, or against ``ca_cert`` (a PEM file) alone.

    :raises ValidationError: ``ca_cert`` cannot be read or holds no certificate.
    """
    try:
        return ssl.create_default_context(cafile=os.fspath(ca_cert) if ca_cert else None)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = "not found" if isinstance(exc, FileNotFoundError) else type(exc).__name__
        raise ValidationError(
            f"--ca-cert {os.fspath(ca_cert or '')}: not a readable PEM CA certificate "
            f"file ({reason})"
        ) from None


def _read_bounded(resp: http.client.HTTPResponse, limit: int) -> bytes | None:
    """The body if it is at most ``limit`` bytes, else None (then the rest is unread)."""
    if resp.length is not None:  # a declared Content-Length: refuse before reading
        return None if resp.length > limit else resp.read()
    parts: list[bytes] = []
    total = 0
    while True:
        chunk = resp.read(min(_MIB, limit + 1 - total))
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        total += len(chunk)
        if total > limit:
            return None


def _clean(message: str) -> str:
    """A server's message as one printable line of bounded length."""
    text = _UNPRINTABLE.sub(" ", message).strip()
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


class HttpClient:
    """JSON over HTTP(S) to one qimem server, with an optional bearer token.

    :param realm: sent as ``X-Qimem-Realm`` (default: the token's realm).
    :param ca_cert: a PEM file of the CA(s) to trust for ``https://`` instead of the
        system store.
    :param insecure_plain_http: allow ``http://`` to a host that is not loopback.
    :param max_response_bytes: the largest successful answer read.
    :raises ValidationError: a bad URL, an unusable ``ca_cert``, or plain http beyond
        loopback without ``insecure_plain_http``.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        realm: str | None = None,
        timeout: float = 60.0,
        ca_cert: str | os.PathLike[str] | None = None,
        insecure_plain_http: bool = False,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.base_url = check_url(base_url)
        parsed = urllib.parse.urlparse(self.base_url)
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname or ""
        self._port = parsed.port
        self._prefix = parsed.path.rstrip("/")
        if not self._https and not insecure_plain_http and not is_loopback(self._host):
            raise ValidationError(
                f"refusing plain http to {self.base_url}: the token, passwords and data keys "
                "would cross the network unencrypted; use https:// (or, if you must, "
                "--insecure-plain-http)"
            )
        self._context = tls_context(ca_cert) if self._https else None
        self._token = token
        self.realm = realm
        self._timeout = timeout
        self._max_response = max_response_bytes
        self._conn: http.client.HTTPConnection | None = None
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"<HttpClient {self.base_url}>"

    def clone(self) -> HttpClient:
        """A client with the same settings and its own (not yet opened) connection."""
        twin = object.__new__(HttpClient)
        twin.__dict__.update(self.__dict__)
        twin._conn, twin._pid = None, os.getpid()
        return twin

    def _connection(self) -> http.client.HTTPConnection:
        if self._pid != os.getpid():  # forked: never share the parent's socket
            self._conn, self._pid = None, os.getpid()
        if self._conn is None:
            if self._context is not None:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._context
                )
            else:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout
                )
        return self._conn

    def close(self) -> None:
        """Close the kept-alive connection (a later request opens a new one)."""
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        form: bool = False,
        auth: bool = True,
    ) -> Any:
        """One request; the decoded JSON answer (None for an empty body).

        :param form: send ``body`` as ``application/x-www-form-urlencoded`` (token logins).
        :param auth: send the bearer token (False for a login, which carries its own).
        :raises StoreUnavailableError: the server cannot be reached (TLS failures included),
            answered 5xx, too much, or not JSON.
        :raises ValidationError: the server answered a redirect.
        :raises QimemError: the class of the server's error (401 → AuthError, ...).
        """
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            if form:
                data = urllib.parse.urlencode(body).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        if auth and self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if self.realm:
            headers[REALM_HEADER] = self.realm
        for attempt in (1, 2):
            reused = self._conn is not None and self._pid == os.getpid()
            conn = self._connection()
            try:
                try:
                    conn.request(method, self._prefix + path, body=data, headers=headers)
                except (BrokenPipeError, ConnectionResetError):
                    # The server may have answered already (413 for a body over its limit)
                    # and stopped reading: its answer is read next; if there is none,
                    # getresponse() fails like a closed connection (handled below).
                    pass
                resp = conn.getresponse()
                if 300 <= resp.status < 400:
                    resp.close()  # unread: the socket must go, not wait for a collector
                    self.close()
                    raise self._redirect(resp.status, resp.getheader("Location"))
                limit = self._max_response if resp.status < 300 else MAX_ERROR_BYTES
                raw = _read_bounded(resp, limit)
                if raw is None:
                    resp.close()
            except _STALE:
                self.close()
                if reused and attempt == 1:
                    continue
                raise self._unreachable("the connection was closed") from None
            except ssl.SSLCertVerificationError as exc:
                self.close()
                raise self._untrusted(exc) from None
            except ssl.SSLError as exc:
                self.close()
                raise self._unreachable(f"TLS error ({exc.reason or type(exc).__name__})") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise self._unreachable(type(exc).__name__) from None
            if raw is None or resp.getheader("Connection", "").lower() == "close":
                self.close()
            if resp.status >= 400:
                raise self._error(resp.status, raw or b"")
            if raw is None:
                raise StoreUnavailableError(
                    f"server {self.base_url} answered more than {limit // _MIB} MiB; "
                    "refusing to read it"
                )
            try:
                return json.loads(raw) if raw else None
            except ValueError:
                raise StoreUnavailableError(
                    f"server {self.base_url} answered something that is not JSON"
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _unreachable(self, reason: str) -> StoreUnavailableError:
        return StoreUnavailableError(f"cannot reach server {self.base_url}: {reason}")

    def _untrusted(self, exc: ssl.SSLCertVerificationError) -> StoreUnavailableError:
        detail = _clean(str(exc.verify_message or exc.reason or "verification failed"))
        if exc.verify_code in _NAME_MISMATCH:
            return StoreUnavailableError(
                f"TLS certificate of {self.base_url} is for another name "
                f"(certificate verify failed: {detail})"
            )
        return StoreUnavailableError(
            f"TLS certificate of {self.base_url} not trusted (certificate verify failed: "
            f"{detail}); give the CA that signed it with --ca-cert"
        )

    def _redirect(self, status: int, location: str | None) -> ValidationError:
        where = "without a Location" if not location else "to " + self._origin(location)
        return ValidationError(
            f"the server {self.base_url} answered {status} redirect {where}; qimem does not "
            "follow redirects with credentials: point --server at the final URL",
            code="redirect_refused",
        )

    def _origin(self, location: str) -> str:
        """``scheme://host[:port]`` of a Location (relative to this server), nothing more."""
        try:
            target = urllib.parse.urlsplit(urllib.parse.urljoin(self.base_url + "/", location))
            host, port = target.hostname, target.port
        except ValueError:
            host = port = None
        if not host or target.scheme not in ("http", "https") or not _HOST_CHARS.fullmatch(host):
            return "an unusable location"
        host = f"[{host}]" if ":" in host else host
        return f"{target.scheme}://{host}" + (f":{port}" if port else "")

    def _error(self, status: int, raw: bytes) -> QimemError:
        try:
            detail = json.loads(raw)["error"]
            code, message = str(detail["code"]), _clean(str(detail["message"]))
        except Exception:
            code, message = "", f"HTTP {status}"
        if status >= 500:
            cls: type[QimemError] = StoreUnavailableError
            message = f"server {self.base_url} failed: {message}"
        else:
            cls = BY_CODE.get(code) or BY_STATUS.get(status, QimemError)
            message = f"server {self.base_url}: {message}"
        return cls(message, code=code) if code else cls(message)
