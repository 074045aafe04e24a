"""The one authentication and authorization middleware of the server.

Every request is checked against :data:`RULES`, keyed by (method, route template): public
routes (health, metrics, JWKS, the token and revocation endpoints) pass; every other route
needs ``Authorization: Bearer <access token>`` with the rule's permission.

* no, malformed, expired, revoked or forged token → 401 (``WWW-Authenticate: Bearer``);
* a valid token without the permission → 403;
* another realm (in the URL, or chosen with ``X-Qimem-Realm`` / ``?realm=``) → 404, as if
  it did not exist, unless the caller is a ``master`` realm admin acting on it explicitly.

Security endpoints act on the token's realm (``req.context.realm``), so another realm's
keys are simply not found (404). Grants scoped to key-name patterns are checked against
the named key of the request (the body is read once here and handed on unchanged). A route
missing from the table needs ``realms:admin``: new endpoints are closed until mapped.
``--insecure-no-auth`` keeps the server's loopback-only development mode.

Audited key operations are recorded in buffered batches, or with ``[identity] audit_mode =
"required"`` synchronously around the operation: no audit record, no answer (503
``audit_unavailable``). Each record's detail has ``source``: the client's address
(``req.context.client_addr``, which behind a trusted proxy comes from X-Forwarded-For).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import falcon

from qimem import invalidation
from qimem.app import AppContext
from qimem.errors import AuditUnavailableError, AuthError, ForbiddenError, NotFoundError, QimemError
from qimem.identity import Principal
from qimem.identity.realms import MASTER
from qimem.keys import DEFAULT_REALM
from qimem.server.auth import is_loopback
from qimem.server.auth_api import AUTH_PREFIX
from qimem.server.errors import handle_qimem_error
from qimem.server.key_names import KeyNames
from qimem.server.media import read_body
from qimem.server.operations import PREFIX, Operation, security_operations
from qimem.services import identity as ids

log = logging.getLogger("qimem.audit")

REALM_HEADER = "X-Qimem-Realm"
_CHALLENGE = 'Bearer realm="qimem"'


@dataclass(frozen=True)
class Rule:
    """What a route needs. ``permission=None`` with ``public=False``: any valid token."""

    permission: str | None = None
    public: bool = False
    realm_param: bool = False  # the realm comes from the URL's {realm}
    master_only: bool = False  # realm-wide administration of the deployment
    key_names: KeyNames | None = None  # for grants scoped to key-name patterns
    audit: str | None = None  # audit action recorded for this operation
    #: A management operation the service audits itself; with ``audit_mode = "required"``
    #: it also gets the "requested" / outcome pair of key operations under this action.
    pair: str | None = None
    #: Further permissions the request needs, each on the key names its finder returns
    #: (none returned: nothing asked), e.g. a rewrap to a target key.
    also: tuple[tuple[str, KeyNames], ...] = ()


def operation_rules(operations: Iterable[Operation]) -> dict[tuple[str, str], Rule]:
    """The rules of declared operations (:mod:`qimem.server.operations`), at their
    /v1/security paths and qimem-api short aliases."""
    rules: dict[tuple[str, str], Rule] = {}
    for op in operations:
        rule = Rule(
            op.permission, key_names=op.key_names, audit=op.audit, pair=op.pair, also=op.also
        )
        rules[(op.method, PREFIX + op.path)] = rule
        if op.short:
            rules[(op.method, op.short)] = rule
    return rules


def _auth_rules() -> dict[tuple[str, str], Rule]:
    p = AUTH_PREFIX
    admin = Rule("users:admin", realm_param=True)

    def manage(pair: str) -> Rule:
        return Rule("users:admin", realm_param=True, pair=pair)

    client = p + "/{realm}/clients/{client_id}"
    otp = p + "/{realm}/users/{username}/otp"

    return {
        ("GET", p): Rule("realms:admin", master_only=True),
        ("POST", p): Rule("realms:admin", master_only=True, pair="realm.create"),
        ("DELETE", p + "/{realm}"): Rule(
            "realms:admin", realm_param=True, master_only=True, pair="realm.delete"
        ),
        ("GET", p + "/{realm}/users"): admin,
        ("POST", p + "/{realm}/users"): manage("user.create"),
        ("PATCH", p + "/{realm}/users/{username}"): manage("user.update"),
        ("POST", p + "/{realm}/users/{username}/roles"): manage("role.grant"),
        ("DELETE", p + "/{realm}/users/{username}/roles"): manage("role.revoke"),
        ("GET", p + "/{realm}/roles"): admin,
        ("POST", p + "/{realm}/roles"): manage("role.create"),
        ("POST", p + "/{realm}/clients"): manage("client.create"),
        # service accounts' lifecycle (qimem.server.clients_api)
        ("GET", p + "/{realm}/clients"): admin,
        ("GET", client): admin,
        ("DELETE", client): manage("client.delete"),
        ("POST", client + "/disable"): manage("client.disable"),
        ("POST", client + "/enable"): manage("client.enable"),
        ("POST", client + "/rotate-secret"): manage("client.rotate_secret"),
        # second factor (qimem.server.otp_api): the user himself or users:admin, decided
        # by qimem.services.otp
        ("GET", otp): Rule(realm_param=True),
        ("POST", otp): Rule(realm_param=True, pair="otp.enroll"),
        ("POST", otp + "/confirm"): Rule(realm_param=True, pair="otp.confirm"),
        ("POST", otp + "/disable"): Rule(realm_param=True, pair="otp.disable"),
        ("GET", p + "/{realm}/otp-policy"): admin,
        ("PUT", p + "/{realm}/otp-policy"): Rule(
            "realms:admin", realm_param=True, pair="realm.otp_policy"
        ),
        ("POST", p + "/{realm}/token"): Rule(public=True),
        ("POST", p + "/{realm}/revoke"): Rule(public=True),
        ("GET", p + "/{realm}/jwks"): Rule(public=True),
        ("GET", p + "/{realm}/.well-known/openid-configuration"): Rule(public=True),
        ("POST", p + "/{realm}/introspect"): Rule(realm_param=True),
        ("GET", p + "/{realm}/audit"): Rule("audit:read", realm_param=True),
        ("POST", p + "/{realm}/signing-key/rotate"): Rule(
            "realms:admin", realm_param=True, pair="signing_key.rotate"
        ),
    }


def default_rules() -> dict[tuple[str, str], Rule]:
    """The route table: security API (long and short paths), plugins, /v1/auth."""
    rules = operation_rules(security_operations())
    rules[("GET", "/v1/plugins")] = Rule("plugins:read")
    rules[("GET", "/v1/plugins/{name}")] = Rule("plugins:read")
    rules[("POST", "/v1/plugins")] = Rule("plugins:admin", master_only=True, pair="plugins.enable")
    rules[("DELETE", "/v1/plugins/{name}")] = Rule(
        "plugins:admin", master_only=True, pair="plugins.disable"
    )
    rules[("GET", "/v1/openapi.json")] = Rule()
    rules.update(_auth_rules())
    # /v1/root (qimem.server.root_api): the root wraps every realm's keys, so only master
    # realm administrators see or rotate it
    rules[("GET", "/v1/root/status")] = Rule("realms:admin", master_only=True)
    rules[("POST", "/v1/root/rotate")] = Rule("realms:admin", master_only=True, audit="root.rotate")
    return rules


RULES = default_rules()


def transit_rules(mount: str = "transit") -> dict[tuple[str, str], Rule]:
    """The rules of the Vault-Transit-compatible facade at ``/v1/<mount>``
    (``qimem.server.transit``): each declaration's bound /v1/security operation gives the
    permission, audit action and pair; the facade's finder gives the key names."""
    from qimem.server.transit import transit_operations

    rules: dict[tuple[str, str], Rule] = {}
    for op in transit_operations():
        permission, audit, pair, _ = op.bound
        rules[(op.method, op.full_path(mount))] = Rule(
            permission,
            key_names=op.key_names if permission is not None else None,
            audit=audit,
            pair=pair,
            also=op.also,
        )
    return rules


def rules_with_transit(settings: Any) -> dict[tuple[str, str], Rule]:
    """:data:`RULES` and, when ``settings`` (``[transit]``) enable it, the rules of the
    Vault-Transit-compatible facade at its mount (:func:`transit_rules`)."""
    if not settings.enabled:
        return RULES
    return {**RULES, **transit_rules(settings.mount)}


_CLOSED = Rule("realms:admin", master_only=True)


def _bearer(req: falcon.Request) -> str:
    header = req.get_header("Authorization")
    if not header:
        raise AuthError("this endpoint needs a bearer access token", code="unauthorized")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError("the Authorization header must be 'Bearer <token>'", code="unauthorized")
    return value.strip()


def _realm_not_found(realm: str) -> NotFoundError:
    return NotFoundError(f"realm {realm!r} does not exist", code="realm_not_found")


def _batch_keys(items: list[Any], detail: dict[str, Any]) -> str | None:
    """A batch answer's audit target: its one key, or ``"batch"`` with the key ids it used
    (at most 100, ids only) and its item count in ``detail``."""
    used = sorted(
        {i["key_id"] for i in items if isinstance(i, dict) and isinstance(i.get("key_id"), str)}
    )
    detail["items"] = len(items)
    if not used:
        return None
    detail["key_ids"] = used[:100]
    return used[0] if len(used) == 1 else "batch"


class IdentityAuthMiddleware:
    """Authenticate with bearer tokens and authorize by :data:`RULES`.

    :param public_paths: paths served without a token (default: identity settings'
        ``public_paths``: /healthz, /readyz, /metrics).
    :param audit: record security operations (buffered) in the audit log.
    """

    def __init__(
        self,
        app_ctx: AppContext,
        *,
        insecure_no_auth: bool = False,
        public_paths: Iterable[str] | None = None,
        rules: dict[tuple[str, str], Rule] | None = None,
        audit: bool = True,
    ) -> None:
        self._app = app_ctx
        self.insecure_no_auth = insecure_no_auth
        self._rules = rules if rules is not None else RULES
        self._audit = audit and not insecure_no_auth
        if insecure_no_auth:
            self._identity = None
            self._public = frozenset(public_paths or ())
        else:
            self._identity = ids.identity(app_ctx)  # open now: fail at start, not per request
            paths = (
                public_paths if public_paths is not None else self._identity.settings.public_paths
            )
            self._public = frozenset(paths)
            self._audit = self._audit and self._identity.settings.audit_key_operations
        self._required = self._audit and self._identity.settings.audit_mode == "required"  # type: ignore[union-attr]
        # audit_spill_full = "refuse": no audited operation runs while its record could not
        # be kept (store down, spill full).
        self._admit = (
            self._audit
            and not self._required
            and self._identity.settings.audit_spill_full == "refuse"  # type: ignore[union-attr]
        )

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        # Other servers' changes pushed into this process's caches (started in the process
        # that serves: after a pre-fork, in each worker; one lookup once started).
        invalidation.subscribe(self._app)
        req.context.principal = None
        req.context.realm = DEFAULT_REALM
        if self.insecure_no_auth and not is_loopback(req.remote_addr):
            raise ForbiddenError(
                "this server runs without authentication and only serves loopback clients"
            )

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict[str, Any]
    ) -> None:
        self._authorize(req, resp, resource, params)
        if self._admit:
            rule = self._rules.get((req.method, req.uri_template or ""))
            if rule is not None and rule.audit is not None and req.context.principal is not None:
                self._identity.audit.admit()  # type: ignore[union-attr]
        if self._required:  # no audit record, no operation
            rule = self._rules.get((req.method, req.uri_template or ""))
            principal = req.context.principal
            action = None if rule is None else rule.audit or rule.pair
            if action is not None and principal is not None:
                try:
                    self._write(req, principal, action, "-", "requested", buffered=False)
                except Exception as exc:
                    log.warning("required audit record not written: %s", type(exc).__name__)
                    raise AuditUnavailableError(
                        "the audit log cannot be written, so the request was not run"
                    ) from None

    def _authorize(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict[str, Any]
    ) -> None:
        if self.insecure_no_auth or resource is None:
            return  # no route: Falcon answers 404 without touching anything
        template = req.uri_template or ""
        if template in self._public:
            return
        rule = self._rules.get((req.method, template), _CLOSED)
        if rule.public:
            return
        try:
            principal = ids.authenticate(self._app, _bearer(req))
        except AuthError:
            resp.set_header("WWW-Authenticate", _CHALLENGE)
            raise
        req.context.principal = principal
        realm = self._target_realm(req, principal, rule, params)
        req.context.realm = realm
        if rule.master_only and principal.realm != MASTER:
            raise ForbiddenError("this operation is reserved to master realm administrators")
        if not self._permitted(req, principal, rule.permission, rule.key_names, realm, params):
            raise ForbiddenError(f"this operation needs the {rule.permission} permission")
        for permission, finder in rule.also:
            if not self._permitted(req, principal, permission, finder, realm, params, also=True):
                raise ForbiddenError(f"this operation needs the {permission} permission")

    def _permitted(
        self,
        req: falcon.Request,
        principal: Principal,
        permission: str | None,
        finder: KeyNames | None,
        realm: str,
        params: dict[str, Any],
        *,
        also: bool = False,
    ) -> bool:
        """The principal holds ``permission`` realm-wide, or on every key name ``finder``
        finds (with ``also``, finding no name asks nothing)."""
        if permission is None or principal.allows(permission):
            return True
        if finder is None or not (also or principal.allows_any(permission)):
            return False
        found, body = self._body(req)
        if not found:  # no key names to check: not allowed (``also``: the resource says 400)
            return also
        names = finder(self._app, realm, body, params)
        if also and not names:
            return True
        return bool(names) and all(
            isinstance(name, str) and principal.allows(permission, name)  # {"name": 5}
            for name in names
        )

    def _target_realm(
        self, req: falcon.Request, principal: Principal, rule: Rule, params: dict[str, Any]
    ) -> str:
        if rule.realm_param:
            wanted = params.get("realm", principal.realm)
        else:
            wanted = req.get_header(REALM_HEADER) or req.get_param("realm") or principal.realm
        if wanted == principal.realm:
            return wanted
        if not principal.can_act_in(wanted) or not self._identity.realm_exists(wanted):  # type: ignore[union-attr]
            raise _realm_not_found(wanted)
        return wanted

    @staticmethod
    def _body(req: falcon.Request) -> tuple[bool, Any]:
        """The parsed JSON body (read once, and handed on unchanged to the resource), as
        ``(True, body)``; ``(False, None)`` when it is not JSON."""
        cached = getattr(req.context, "auth_body", None)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        body: Any = None
        found = True
        if req.method in ("POST", "PUT", "PATCH"):
            raw = read_body(req, getattr(req.stream, "limit", 1 << 20))
            req.stream = io.BytesIO(raw)  # hand the same bytes on to the resource
            try:
                body = json.loads(raw) if raw else None
            except (ValueError, RecursionError):
                found = False
        req.context.auth_body = (found, body)
        return found, body

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool
    ) -> None:
        if not self._audit:
            return
        principal = getattr(req.context, "principal", None)
        if principal is None:
            return
        rule = self._rules.get((req.method, req.uri_template or ""))
        action = None if rule is None else rule.audit or (rule.pair if self._required else None)
        if action is None:
            return
        status = resp.status_code
        media = resp.media if status < 400 else None
        target = media.get("key_id") if isinstance(media, dict) else None
        target = target or getattr(req.context, "key_ref", None)  # e.g. an invalid signature
        outcome = "success" if status < 400 else ("denied" if status in (401, 403) else "failure")
        detail: dict[str, Any] = {} if status < 400 else {"status": status}
        if target is None and isinstance(media, dict) and isinstance(media.get("items"), list):
            target = _batch_keys(media["items"], detail)
        target = target if isinstance(target, str) else "-"
        if not self._required:
            try:
                self._write(req, principal, action, target, outcome, buffered=True, **detail)
            except QimemError:
                pass  # buffered auditing never turns a served request into an error
            return
        try:
            self._write(req, principal, action, target, outcome, buffered=False, **detail)
        except Exception as exc:  # required: the result is withheld
            log.warning("required audit record not written: %s", type(exc).__name__)
            resp.data = resp.text = None  # the resource's answer is not sent
            error = AuditUnavailableError(
                "the audit log cannot be written, so the result of this request is withheld"
            )
            handle_qimem_error(req, resp, error, {})

    def _write(
        self,
        req: falcon.Request,
        principal: Principal,
        action: str,
        target: str,
        outcome: str,
        *,
        buffered: bool,
        **detail: Any,
    ) -> None:
        self._identity.record(  # type: ignore[union-attr]
            getattr(req.context, "realm", principal.realm),
            f"{principal.username}@{principal.realm}",
            action,
            target,
            outcome,
            buffered=buffered,
            source=getattr(req.context, "client_addr", None) or req.remote_addr,
            **detail,
        )
