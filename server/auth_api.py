"""``/v1/auth``: realms, users, roles, service accounts, the OAuth2 token, revocation and
introspection endpoints, JWKS and the audit log. Thin: parse, call
:mod:`qimem.services.identity`, render.

Who may call what is decided by :class:`qimem.server.auth_middleware.IdentityAuthMiddleware`
from its route table; the resources only read ``req.context.principal`` to name the actor.
The token endpoint takes the standard OAuth2 form encoding and JSON alike.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

import falcon

from qimem.app import AppContext
from qimem.errors import ValidationError
from qimem.server.acting import actor, caller
from qimem.server.acting import no_store as _no_store
from qimem.server.auth_providers_api import add_provider_routes
from qimem.server.media import Field, Spec, plain_string, read_body, read_json
from qimem.services import identity as ids
from qimem.services import oidc

AUTH_PREFIX = "/v1/auth/realms"
FORM_TYPE = "application/x-www-form-urlencoded"
_MAX_FORM_FIELDS = 16


def read_params(req: falcon.Request, limit: int) -> dict[str, Any]:
    """A form-encoded or JSON body as a flat mapping of strings (OAuth2 endpoints)."""
    content_type = (req.content_type or "").split(";", 1)[0].strip().lower()
    if content_type == FORM_TYPE:
        raw = read_body(req, limit)
        try:
            pairs = urllib.parse.parse_qsl(
                raw.decode("utf-8"),
                keep_blank_values=True,
                strict_parsing=bool(raw),
                max_num_fields=_MAX_FORM_FIELDS,
            )
        except (ValueError, UnicodeDecodeError):
            raise ValidationError("the form body is malformed", code="invalid_request") from None
        params: dict[str, Any] = {}
        for name, value in pairs:
            if name in params:
                raise ValidationError(f"parameter {name!r} is repeated", code="invalid_request")
            params[name] = value
        return params
    body = read_json(req, limit)
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    return body


def _secret_string(name: str, value: Any) -> str:
    """A password or secret: a string of at most 1024 characters (never echoed)."""
    if not isinstance(value, str):
        raise ValidationError(f"'{name}' must be a string", code="invalid_type")
    if len(value) > 1024:
        raise ValidationError(f"'{name}' is too long", code="invalid_value")
    return value


def _names(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > 64:
        raise ValidationError(f"'{name}' must be an array of names", code="invalid_type")
    return [plain_string(name, v) for v in value]


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(f"'{name}' must be true or false", code="invalid_type")
    return value


def _description(name: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > 256:
        raise ValidationError(f"'{name}' must be at most 256 characters", code="invalid_value")
    return value


REALM_SPEC = Spec(Field("name", plain_string, required=True))
USER_SPEC = Spec(
    Field("username", plain_string, required=True),
    Field("password", _secret_string, required=True),
    Field("roles", _names),
)
USER_PATCH_SPEC = Spec(Field("enabled", _boolean), Field("password", _secret_string))
GRANT_SPEC = Spec(
    Field("role", plain_string, required=True), Field("scope", plain_string, nullable=True)
)
ROLE_SPEC = Spec(
    Field("name", plain_string, required=True),
    Field("permissions", _names, required=True),
    Field("description", _description),
)
CLIENT_SPEC = Spec(Field("client_id", plain_string, required=True), Field("roles", _names))


def _object(req: falcon.Request, limit: int, spec: Spec) -> dict[str, Any]:
    return spec.parse(read_json(req, limit))


def _token_param(params: dict[str, Any]) -> str:
    value = params.get("token")
    if not isinstance(value, str) or not value:
        raise ValidationError("'token' must be a non-empty string", code="invalid_request")
    return value


class _Base:
    def __init__(self, app: AppContext, body_limit: int) -> None:
        self._app = app
        self._limit = body_limit


class RealmsResource(_Base):
    """``GET`` list / ``POST {name}`` create realms; ``DELETE /{realm}``."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {
            "realms": [r.to_dict() for r in ids.list_realms(self._app, principal=caller(req))]
        }

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = _object(req, self._limit, REALM_SPEC)
        resp.status = falcon.HTTP_201
        resp.media = ids.create_realm(
            self._app, body["name"], actor=actor(req), principal=caller(req)
        ).to_dict()

    def on_delete_item(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        ids.delete_realm(self._app, realm, actor=actor(req), principal=caller(req))
        resp.status = falcon.HTTP_204


class UsersResource(_Base):
    """``GET`` users; ``POST {username, password, roles?}``; ``PATCH /{username}
    {enabled?, password?}``; ``POST|DELETE /{username}/roles {role, scope?}``."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        resp.media = {
            "users": [u.to_dict() for u in ids.list_users(self._app, realm, principal=caller(req))]
        }

    def on_post(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        body = _object(req, self._limit, USER_SPEC)
        user = ids.add_user(
            self._app,
            realm,
            body["username"],
            body["password"],
            body.get("roles", []),
            actor=actor(req),
            principal=caller(req),
        )
        resp.status = falcon.HTTP_201
        resp.media = user.to_dict()

    def on_patch_item(
        self, req: falcon.Request, resp: falcon.Response, realm: str, username: str
    ) -> None:
        body = _object(req, self._limit, USER_PATCH_SPEC)
        if not body:
            raise ValidationError("PATCH takes 'enabled' and/or 'password'", code="missing_field")
        who = caller(req)
        if "password" in body:
            ids.set_password(
                self._app, realm, username, body["password"], actor=actor(req), principal=who
            )
        if "enabled" in body:
            ids.set_user_enabled(
                self._app, realm, username, body["enabled"], actor=actor(req), principal=who
            )
        resp.media = ids.identity(self._app).get_user(realm, username).to_dict()

    def _change_grant(
        self,
        req: falcon.Request,
        realm: str,
        username: str,
        change: Callable[..., bool],
    ) -> tuple[str, bool]:
        """Apply ``change`` (grant or revoke) to the body's ``{role, scope?}``; the role and
        the change's result."""
        body = _object(req, self._limit, GRANT_SPEC)
        done = change(
            self._app,
            realm,
            username,
            body["role"],
            body.get("scope"),
            actor=actor(req),
            principal=caller(req),
        )
        return body["role"], done

    def on_post_roles(
        self, req: falcon.Request, resp: falcon.Response, realm: str, username: str
    ) -> None:
        role, added = self._change_grant(req, realm, username, ids.grant_role)
        resp.media = {"username": username, "role": role, "added": added}

    def on_delete_roles(
        self, req: falcon.Request, resp: falcon.Response, realm: str, username: str
    ) -> None:
        role, _ = self._change_grant(req, realm, username, ids.revoke_role)
        resp.media = {"username": username, "role": role, "revoked": True}


class RolesResource(_Base):
    """``GET`` roles; ``POST {name, permissions, description?}``."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        resp.media = {
            "roles": [r.to_dict() for r in ids.list_roles(self._app, realm, principal=caller(req))]
        }

    def on_post(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        body = _object(req, self._limit, ROLE_SPEC)
        role = ids.create_role(
            self._app,
            realm,
            body["name"],
            body["permissions"],
            body.get("description", ""),
            actor=actor(req),
            principal=caller(req),
        )
        resp.status = falcon.HTTP_201
        resp.media = role.to_dict()


class ClientsResource(_Base):
    """``POST {client_id, roles?}`` → the service account and its secret (shown once)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        body = _object(req, self._limit, CLIENT_SPEC)
        made = ids.create_client(
            self._app,
            realm,
            body["client_id"],
            body.get("roles", []),
            actor=actor(req),
            principal=caller(req),
        )
        _no_store(resp)
        resp.status = falcon.HTTP_201
        resp.media = {
            **made.user.to_dict(),
            "client_id": made.user.username,
            "client_secret": made.secret,
        }


class TokenResource(_Base):
    """The OAuth2 token endpoint (password, refresh_token, client_credentials grants; an
    external JWT with jwt-bearer or token-exchange: :mod:`qimem.services.oidc`)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        params = read_params(req, self._limit)
        _no_store(resp)
        source = req.context.get("client_addr") or req.remote_addr
        if params.get("grant_type") in oidc.ASSERTION_GRANTS:  # an external JWT
            resp.media = oidc.assertion_token(self._app, realm, params, source=source)
            return
        resp.media = ids.token(self._app, realm, params, source=source).to_dict()


class RevokeResource(_Base):
    """RFC 7009: ``POST token=...`` revokes an access token or a refresh token's family.

    Always 200 (an unknown token is not an error); possession of the token is the authority.
    """

    def on_post(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        params = read_params(req, self._limit)
        token = _token_param(params)
        ids.require_realm(self._app, realm)
        principal = getattr(req.context, "principal", None)
        ids.revoke(self._app, realm, token, actor=actor(req) if principal else None)
        resp.media = {"revoked": True}


class IntrospectResource(_Base):
    """RFC 7662: ``POST token=...`` → ``{"active": ...}`` (needs a bearer token)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        params = read_params(req, self._limit)
        ids.require_realm(self._app, realm)
        _no_store(resp)
        resp.media = ids.introspect(self._app, realm, _token_param(params))


class JwksResource(_Base):
    """The realm's public signing keys (public, cacheable for a minute)."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        resp.set_header("Cache-Control", "public, max-age=60")
        resp.media = ids.jwks(self._app, realm)


class DiscoveryResource(_Base):
    """The realm's OpenID Provider metadata (public, like the JWKS). Its URLs are on the
    origin of ``identity.issuer_base`` if that is a URL, else the request's (behind a
    trusted proxy: the forwarded scheme)."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        scheme = req.context.get("client_scheme") or req.scheme
        resp.set_header("Cache-Control", "public, max-age=60")
        resp.set_header("Vary", "Host, X-Forwarded-Proto")
        resp.media = oidc.discovery(self._app, realm, f"{scheme}://{req.netloc}")


class AuditResource(_Base):
    """``GET ?limit=&action=&actor=`` newest-first audit records of the realm."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        limit = req.get_param_as_int("limit", min_value=1, max_value=1000, default=100)
        records = ids.audit_events(
            self._app,
            realm,
            limit=limit,
            action=req.get_param("action"),
            actor=req.get_param("actor"),
            principal=caller(req),
        )
        resp.media = {"events": [r.to_dict() for r in records]}


class SigningKeyResource(_Base):
    """``POST`` rotates the realm's token signing key."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        kid = ids.rotate_signing_key(self._app, realm, actor=actor(req), principal=caller(req))
        resp.media = {"realm": realm, "kid": kid}


def add_auth_routes(app: falcon.App, app_ctx: AppContext, body_limit: int) -> None:
    """Register every ``/v1/auth`` route on ``app``."""
    realms = RealmsResource(app_ctx, body_limit)
    users = UsersResource(app_ctx, body_limit)
    p = AUTH_PREFIX
    app.add_route(p, realms)
    app.add_route(p + "/{realm}", realms, suffix="item")
    app.add_route(p + "/{realm}/users", users)
    app.add_route(p + "/{realm}/users/{username}", users, suffix="item")
    app.add_route(p + "/{realm}/users/{username}/roles", users, suffix="roles")
    app.add_route(p + "/{realm}/roles", RolesResource(app_ctx, body_limit))
    from qimem.server.clients_api import add_client_routes  # GET, items: issue 15 item 5

    add_client_routes(app, app_ctx, p, body_limit, ClientsResource(app_ctx, body_limit))
    app.add_route(p + "/{realm}/token", TokenResource(app_ctx, body_limit))
    app.add_route(p + "/{realm}/revoke", RevokeResource(app_ctx, body_limit))
    app.add_route(p + "/{realm}/introspect", IntrospectResource(app_ctx, body_limit))
    app.add_route(p + "/{realm}/jwks", JwksResource(app_ctx, body_limit))
    app.add_route(
        p + "/{realm}/.well-known/openid-configuration", DiscoveryResource(app_ctx, body_limit)
    )
    app.add_route(p + "/{realm}/audit", AuditResource(app_ctx, body_limit))
    app.add_route(p + "/{realm}/signing-key/rotate", SigningKeyResource(app_ctx, body_limit))
    add_provider_routes(app, app_ctx, p, body_limit)
    from qimem.server.otp_api import add_otp_routes  # the second factor: issue 15 item 6

    add_otp_routes(app, app_ctx, p, body_limit)


__all__ = ["AUTH_PREFIX", "add_auth_routes", "caller", "read_params"]
