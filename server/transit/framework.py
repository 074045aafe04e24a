"""The Vault-Transit-compatible facade's framework: declarations, routes, Vault's wire shape.

A :class:`TransitOperation` declares one Transit endpoint once, next to the
``/v1/security`` operation it *binds* (:func:`qimem.server.operations.operation`): the
permission, the key-name finder's meaning, the audit action and the metric label come from
that declaration, so the facade is authorized and audited exactly like ``/v1/security``.
From the declarations come the Falcon routes (:func:`add_routes`) and the authorization
rules (``qimem.server.auth_middleware.transit_rules``).

Vault's wire shape, made here only:

* answers are ``{"request_id", "lease_id", "renewable", "lease_duration", "data",
  "wrap_info", "warnings", "auth"}`` with ``Content-Type: application/json`` exactly;
* errors are ``{"errors": ["..."]}``: 400 for validation and crypto failures (qimem's 409
  and 422 included), 403 for a missing, bad or insufficient token (Vault's answer, which
  hvac raises as ``Forbidden``), 404 for an unknown path or key on a read, 413 for a body
  over the server's limit, 5xx as they are;
* leniency where Vault is lenient: unknown body fields are ignored with a warning,
  integers and booleans may come as strings, ``null`` stands for an absent field; strict
  everywhere else (base64, ranges, names).

The ``LIST`` verb and ``X-Vault-Token`` are handled by :class:`TransitMiddleware` before
routing: ``LIST`` becomes ``GET`` with ``list=true``, the token becomes the
``Authorization: Bearer`` header the authorization middleware reads, and
``X-Vault-Namespace`` names the realm.
"""

from __future__ import annotations

import binascii
import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import falcon

from qimem.app import AppContext
from qimem.errors import NotFoundError, QimemError, ValidationError
from qimem.server import errors as qerrors
from qimem.server.key_names import KeyNames, name_of
from qimem.server.media import MAX_BATCH_ITEMS, read_body
from qimem.server.metrics import Metrics
from qimem.server.operations import actor_of, operation

JSON_TYPE = "application/json"
DEFAULT_MOUNT = "transit"
TOKEN_PREFIX = "/v1/auth/token"  # noqa: S105 (a URL path, not a password)


class VaultError(QimemError):
    """An error answered in Vault's shape with a given status (400 unless said)."""

    http_status = 400
    title = "Bad request"

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, code="transit_error")
        self.http_status = status


@dataclass
class TransitRequest:
    """What a Transit call gets: the app, the realm, the URL's parameters, the body (a dict,
    ``{}`` without one), whether ``list=true`` was asked, the audit actor, and the
    warnings list the answer carries."""

    app: AppContext
    realm: str
    params: dict[str, str]
    body: dict[str, Any]
    listing: bool = False
    actor: str | None = None
    warnings: list[str] = field(default_factory=list)
    #: set by a call to the key it used, for the audit record
    key_ref: str | None = None
    #: the caller (None without authentication)
    principal: Any = None
    #: set by a batch: (succeeded, failed) items, for the metrics
    counts: tuple[int, int] | None = None


#: The call: a request in, Vault's ``data`` out (``None``: 204 No Content).
TransitCall = Callable[[TransitRequest], "dict[str, Any] | None"]


def url_name(app: AppContext, realm: str, body: Any, params: dict[str, Any]) -> list[str | None]:
    """The key named in the URL (``{name}``), for grants scoped to key-name patterns."""
    return [name_of(app, realm, params.get("name"))]


@dataclass(frozen=True)
class TransitOperation:
    """One Transit endpoint, declared once.

    :param name: its operationId (``transit`` + Vault's name, e.g. ``transitEncrypt``).
    :param method: ``GET``, ``POST`` or ``DELETE`` (``LIST`` arrives as ``GET`` with
        ``listing``).
    :param path: under the mount (``/v1/<mount>``), e.g. ``/encrypt/{name}``.
    :param binds: the ``/v1/security`` operation whose permission, audit action and metric
        this one shares (``None``: any valid token, no audit).
    :param fields: the body fields it reads; others are ignored with a warning.
    :param key_names: how grants scoped to key-name patterns find the key names (default:
        the URL's ``{name}``).
    :param also: further ``(permission, key names)`` the caller must hold.
    :param prefix: ``None``: under the mount; else an absolute prefix (``/v1/auth/token``).
    """

    name: str
    method: str
    path: str
    call: TransitCall
    binds: str | None = None
    fields: tuple[str, ...] = ()
    key_names: KeyNames | None = url_name
    also: tuple[tuple[str, KeyNames], ...] = ()
    prefix: str | None = None

    def full_path(self, mount: str) -> str:
        return (self.prefix if self.prefix is not None else f"/v1/{mount}") + self.path

    @property
    def bound(self) -> tuple[str | None, str | None, str | None, str | None]:
        """``(permission, audit, pair, metric)`` of the bound declaration."""
        if self.binds is None:
            return None, None, None, None
        op = operation(self.binds)
        return op.permission, op.audit, op.pair, op.metric


# ---- parsing: lenient where Vault is ---------------------------------------------------


def warn_unknown(body: Mapping[str, Any], known: Iterable[str], warnings: list[str]) -> None:
    """Vault's warning for body fields an endpoint does not read."""
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        warnings.append(
            "Endpoint ignored these unrecognized parameters: [" + " ".join(unknown) + "]"
        )


_INTEGER = re.compile(r"-?[0-9]{1,18}")


def integer(body: Mapping[str, Any], name: str, default: int | None = None) -> int | None:
    """An integer field; ``"3"`` counts as 3 (Vault's parser coerces); null is absent."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):  # ASCII digits only
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise VaultError(f"{name} must be an integer")


def boolean(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    """A boolean field; ``"true"``/``"false"``/``"1"``/``"0"`` count (Vault's parser)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "t", "f"):
        return value.lower() in ("true", "1", "t")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise VaultError(f"{name} must be a boolean")


def string(body: Mapping[str, Any], name: str) -> str | None:
    """A string field (null or absent: None)."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise VaultError(f"{name} must be a string")
    return value


def b64_field(body: Mapping[str, Any], name: str, *, empty_is_none: bool = True) -> bytes | None:
    """A standard-base64 field, decoded strictly; absent, null (or empty, with
    ``empty_is_none``) is None."""
    value = string(body, name)
    if value is None or (empty_is_none and value == ""):
        return None
    try:  # strict: the alphabet only, whole quanta, correct padding, nothing after it
        decoded = binascii.a2b_base64(value, strict_mode=True)
        if len(value) == 4 * ((len(decoded) + 2) // 3):  # no extra padding quanta
            return decoded
    except (binascii.Error, ValueError):
        pass
    raise VaultError(f"failed to base64-decode {name}")


def batch_input(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """``batch_input`` as a list of objects (None when absent or null); empty or over
    :data:`qimem.server.media.MAX_BATCH_ITEMS` items is refused."""
    items = body.get("batch_input")
    if items is None:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise VaultError("batch_input must be a list of objects")
    if not items:
        raise VaultError("missing batch input to process")
    if len(items) > MAX_BATCH_ITEMS:
        raise VaultError(f"batch_input holds more than {MAX_BATCH_ITEMS} items")
    return items


def error_text(exc: QimemError) -> str:
    """The message of a qimem error for a Vault ``errors`` list (generic for a 5xx)."""
    return str(qerrors.qimem_error_body(exc)["error"]["message"])


# ---- answers ---------------------------------------------------------------------------


def envelope(
    data: Any, warnings: list[str] | None = None, request_id: str | None = None
) -> dict[str, Any]:
    """Vault's response envelope around ``data`` (``request_id``: the server's, which its
    logs and the ``X-Request-Id`` header carry; default a fresh one)."""
    return {
        "request_id": request_id or str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": warnings or None,
        "auth": None,
    }


_encode = json.JSONEncoder(separators=(",", ":")).encode


def render(resp: falcon.Response, status: int, doc: Any) -> None:
    """``doc`` as JSON with ``Content-Type: application/json`` exactly (hvac reads the
    ``errors`` only then)."""
    resp.status = status
    resp.content_type = JSON_TYPE
    resp.data = _encode(doc).encode()


def _vault_status(status: int) -> int:
    if status == 401:
        return 403  # Vault answers a bad or missing token with 403 permission denied
    if status in (409, 415, 422):
        return 400
    return status


def render_error(resp: falcon.Response, status: int, messages: list[str]) -> None:
    status = _vault_status(status)
    if status == 403:
        messages = ["permission denied", *messages]
    render(resp, status, {"errors": messages})


# ---- resources and routes ---------------------------------------------------------------


_LIST_VALUES = {"true": True, "1": True, "t": True, "false": False, "0": False, "f": False}


def _list_param(req: falcon.Request) -> bool:
    """``?list=true`` (a GET standing for LIST); anything but one boolean is refused."""
    value = req.params.get("list")
    if value is None:
        return False
    if not isinstance(value, str) or value not in _LIST_VALUES:
        raise VaultError("list must be true or false")
    return _LIST_VALUES[value]


class TransitResource:
    """Serves one declaration: parse the body leniently, call, wrap in Vault's envelope."""

    def __init__(self, app: AppContext, limit: int, metrics: Metrics, op: TransitOperation):
        self._app = app
        self._limit = limit
        self._metrics = metrics
        self._op = op
        self._metric = op.bound[3]
        self._self_audited = op.bound[2] is not None

    def __call__(self, req: falcon.Request, resp: falcon.Response, **params: Any) -> None:
        body: Any = {}
        if req.method in ("POST", "PUT"):
            raw = read_body(req, self._limit)
            if raw.strip():
                try:
                    body = json.loads(raw)
                except (ValueError, RecursionError):
                    raise VaultError("failed to parse JSON input") from None
                if body is None:
                    body = {}
            if not isinstance(body, dict):
                raise VaultError("the request body must be a JSON object")
        elif req.method == "GET":
            body = {k: v for k, v in req.params.items() if k not in ("list", "realm")}
        request = TransitRequest(
            self._app,
            req.context.realm,
            dict(params),
            body,
            listing=getattr(req.context, "transit_list", False) or _list_param(req),
            actor=actor_of(req) if self._self_audited else None,
            principal=getattr(req.context, "principal", None),
        )
        warn_unknown(body, self._op.fields, request.warnings)
        try:
            data = self._op.call(request)
        except QimemError:
            if self._metric is not None:
                self._metrics.count_crypto(self._metric, failed=1)
            req.context.key_ref = request.key_ref or params.get("name")
            raise
        if self._metric is not None:
            ok, failed = request.counts or (1, 0)
            self._metrics.count_crypto(self._metric, ok=ok, failed=failed)
        req.context.key_ref = request.key_ref or params.get("name")
        status = 200
        if isinstance(data, BatchAnswer):
            status, data = data.status, data.data
        if data is None and not request.warnings:
            resp.status = falcon.HTTP_204
            return
        request_id = getattr(req.context, "request_id", None)
        render(resp, status, envelope(data, request.warnings, request_id))


@dataclass
class BatchAnswer:
    """A batch's answer: 400 when an item failed (Vault), unless the body's
    ``partial_failure_response_code`` says otherwise and some items succeeded."""

    data: dict[str, Any]
    status: int = 200

    @classmethod
    def of(cls, results: list[dict[str, Any]], body: Mapping[str, Any]) -> BatchAnswer:
        failed = sum(1 for r in results if r.get("error"))
        status = 200
        if failed:
            status = 400
            code = integer(body, "partial_failure_response_code")
            if code is not None and failed < len(results) and 200 <= code <= 599:
                status = code
        return cls({"batch_results": results}, status)


class _Route:
    """The responders of every declaration sharing one path."""


def add_routes(
    app: falcon.App,
    app_ctx: AppContext,
    limit: int,
    metrics: Metrics,
    mount: str,
    operations: Iterable[TransitOperation],
) -> None:
    """Serve ``operations`` under ``/v1/<mount>``."""
    routes: dict[str, _Route] = {}
    for op in operations:
        resource = TransitResource(app_ctx, limit, metrics, op)
        route = routes.setdefault(op.full_path(mount), _Route())
        setattr(route, "on_" + op.method.lower(), resource.__call__)
    for path, route in routes.items():
        app.add_route(path, route)


# ---- the middleware and error handlers ---------------------------------------------------


class TransitMiddleware:
    """Before routing, on the facade's paths: ``LIST`` → ``GET`` (``list=true``),
    ``X-Vault-Token`` → ``Authorization: Bearer``, ``X-Vault-Namespace`` → the realm."""

    def __init__(self, mount: str) -> None:
        self._prefixes = (f"/v1/{mount}/", TOKEN_PREFIX + "/")

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not req.path.startswith(self._prefixes):
            return
        if req.method == "LIST":
            req.method = "GET"
            req.context.transit_list = True
        env = req.env
        token = env.get("HTTP_X_VAULT_TOKEN")
        if token and "HTTP_AUTHORIZATION" not in env:
            env["HTTP_AUTHORIZATION"] = "Bearer " + token
        namespace = env.get("HTTP_X_VAULT_NAMESPACE")
        if namespace and "HTTP_X_QIMEM_REALM" not in env:
            env["HTTP_X_QIMEM_REALM"] = namespace.strip("/")


def install_error_handlers(app: falcon.App, mount: str) -> None:
    """Answer errors on the facade's paths in Vault's shape; elsewhere, as before."""
    prefixes = (f"/v1/{mount}/", f"/v1/{mount}", TOKEN_PREFIX + "/")

    def ours(req: falcon.Request) -> bool:
        return req.path.startswith(prefixes)

    def on_qimem(req: falcon.Request, resp: falcon.Response, exc: QimemError, params: Any):
        if not ours(req):
            return qerrors.handle_qimem_error(req, resp, exc, params)
        if exc.http_status >= 500:
            qerrors.handle_qimem_error(req, resp, exc, params)  # logs, Retry-After
        status = exc.http_status
        if isinstance(exc, NotFoundError) and req.method != "GET":
            status = 400  # Vault: "encryption key not found" is a user error on writes
        render_error(resp, status, [error_text(exc)])

    def on_http(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError, params: Any):
        if not ours(req):
            return qerrors.handle_http_error(req, resp, exc, params)
        for name, value in (exc.headers or {}).items():
            resp.set_header(name, value)
        status = exc.status_code
        message = "unsupported path" if status in (404, 405) else (exc.title or "bad request")
        if status == 405:
            status = 405 if req.method not in ("GET", "POST", "DELETE") else 404
        render_error(resp, status, [message])

    def on_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: Any):
        qerrors.handle_unexpected(req, resp, exc, params)  # logs the type only
        if ours(req):
            render_error(resp, 500, ["internal error"])

    app.add_error_handler(Exception, on_unexpected)
    app.add_error_handler(falcon.HTTPError, on_http)
    app.add_error_handler(QimemError, on_qimem)


def check_type_supported(value: Any, what: str) -> None:
    """Refuse a non-string value where Vault wants a name."""
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string")
