"""``/v1/auth/realms/{realm}/users/{username}/otp``: a user's second factor (TOTP) over HTTP,
and ``/v1/auth/realms/{realm}/otp-policy``: whether the realm requires one.

``GET .../otp`` status; ``POST .../otp`` enrolls (the secret and its ``otpauth://`` URI,
once); ``POST .../otp/confirm {code}`` activates it (the recovery codes, once); ``POST
.../otp/disable {code?}`` removes it. These need a token of the realm: the user himself, or
``users:admin`` with the no-escalation rule (:mod:`qimem.services.otp` decides).
``GET|PUT .../otp-policy {required}``. Thin: parse, call the services, render.
"""

from __future__ import annotations

from typing import Any

import falcon

from qimem.app import AppContext
from qimem.errors import ValidationError
from qimem.server.acting import actor as _actor
from qimem.server.acting import caller
from qimem.server.acting import no_store as _no_store
from qimem.server.media import Field, Spec, read_body, read_json
from qimem.services import otp as otps


def _code(name: str, value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 64:
        raise ValidationError(f"'{name}' must be a string of at most 64 characters")
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(f"'{name}' must be true or false", code="invalid_type")
    return value


def _password(name: str, value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 1024:
        raise ValidationError(f"'{name}' must be a string of at most 1024 characters")
    return value


ENROLL_SPEC = Spec(Field("password", _password))
CONFIRM_SPEC = Spec(Field("code", _code, required=True))
DISABLE_SPEC = Spec(Field("code", _code))
POLICY_SPEC = Spec(Field("required", _boolean, required=True))


class OtpResource:
    """A user's second factor."""

    def __init__(self, app: AppContext, body_limit: int) -> None:
        self._app = app
        self._limit = body_limit

    def on_get(self, req: falcon.Request, resp: falcon.Response, realm: str, username: str) -> None:
        resp.media = otps.otp_status(self._app, realm, username, principal=caller(req))

    def on_post(
        self, req: falcon.Request, resp: falcon.Response, realm: str, username: str
    ) -> None:
        body: dict[str, Any] = {}
        if req.content_length or req.content_type:
            body = ENROLL_SPEC.parse(read_json(req, self._limit))
        else:
            read_body(req, self._limit)
        made = otps.otp_enroll(
            self._app,
            realm,
            username,
            password=body.get("password"),
            source=req.context.get("client_addr") or req.remote_addr,
            actor=_actor(req),
            principal=caller(req),
        )
        _no_store(resp)
        resp.status = falcon.HTTP_201
        resp.media = made.to_dict()

    def on_post_confirm(
        self, req: falcon.Request, resp: falcon.Response, realm: str, username: str
    ) -> None:
        body = CONFIRM_SPEC.parse(read_json(req, self._limit))
        codes = otps.otp_confirm(
            self._app, realm, username, body["code"], actor=_actor(req), principal=caller(req)
        )
        _no_store(resp)
        resp.media = {"confirmed": True, "recovery_codes": codes}

    def on_post_disable(
        self, req: falcon.Request, resp: falcon.Response, realm: str, username: str
    ) -> None:
        body: dict[str, Any] = {}
        if req.content_length or req.content_type:
            body = DISABLE_SPEC.parse(read_json(req, self._limit))
        else:
            read_body(req, self._limit)
        otps.otp_disable(
            self._app,
            realm,
            username,
            body.get("code"),
            actor=_actor(req),
            principal=caller(req),
        )
        resp.media = {"username": username, "otp": False}


class OtpPolicyResource:
    """The realm's second-factor policy."""

    def __init__(self, app: AppContext, body_limit: int) -> None:
        self._app = app
        self._limit = body_limit

    def on_get(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        resp.media = otps.otp_policy(self._app, realm, principal=caller(req))

    def on_put(self, req: falcon.Request, resp: falcon.Response, realm: str) -> None:
        body = POLICY_SPEC.parse(read_json(req, self._limit))
        resp.media = otps.set_otp_required(
            self._app, realm, body["required"], actor=_actor(req), principal=caller(req)
        )


def add_otp_routes(app: falcon.App, app_ctx: AppContext, prefix: str, limit: int) -> None:
    """Register the second-factor routes under ``prefix`` (``/v1/auth/realms``); their
    rules are in :mod:`qimem.server.auth_middleware`'s table."""
    user = prefix + "/{realm}/users/{username}/otp"
    resource = OtpResource(app_ctx, limit)
    app.add_route(user, resource)
    app.add_route(user + "/confirm", resource, suffix="confirm")
    app.add_route(user + "/disable", resource, suffix="disable")
    app.add_route(prefix + "/{realm}/otp-policy", OtpPolicyResource(app_ctx, limit))


# -- OpenAPI (merged by qimem.server.auth_openapi) ---------------------------------------

_ERR = [401, 403, 404, 503]
OPENAPI_SCHEMAS: dict[str, Any] = {
    "OtpStatus": {
        "type": "object",
        "properties": {
            "enrolled": {"type": "boolean"},
            "confirmed": {"type": "boolean"},
            "recovery_codes_left": {"type": "integer"},
            "required": {"type": "boolean"},
        },
        "required": ["enrolled", "confirmed"],
    },
    "OtpEnrollment": {
        "type": "object",
        "properties": {
            "secret": {"type": "string"},
            "otpauth_uri": {"type": "string"},
            "confirmed": {"type": "boolean"},
        },
        "required": ["secret", "otpauth_uri"],
    },
    "OtpEnroll": {
        "type": "object",
        "properties": {"password": {"type": "string", "minLength": 1, "maxLength": 1024}},
        "required": [],
        "additionalProperties": False,
    },
    "OtpCode": {
        "type": "object",
        "properties": {"code": {"type": "string", "minLength": 1, "maxLength": 64}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "OtpDisable": {
        "type": "object",
        "properties": {"code": {"type": "string", "minLength": 1, "maxLength": 64}},
        "required": [],
        "additionalProperties": False,
    },
    "OtpConfirmed": {
        "type": "object",
        "properties": {
            "confirmed": {"type": "boolean"},
            "recovery_codes": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["confirmed", "recovery_codes"],
    },
    "OtpPolicy": {
        "type": "object",
        "properties": {"realm": {"type": "string"}, "otp_required": {"type": "boolean"}},
        "required": ["otp_required"],
    },
    "OtpPolicyRequest": {
        "type": "object",
        "properties": {"required": {"type": "boolean"}},
        "required": ["required"],
        "additionalProperties": False,
    },
}


def openapi_paths(op: Any, realm: dict[str, Any], username: dict[str, Any]) -> dict[str, Any]:
    """The second-factor paths, built with :mod:`qimem.server.auth_openapi`'s helpers."""

    def body(schema: str, required: bool = True) -> dict[str, Any]:
        ref = {"$ref": f"#/components/schemas/{schema}"}
        return {"required": required, "content": {"application/json": {"schema": ref}}}

    params = [realm, username]
    base = "/v1/auth/realms/{realm}/users/{username}/otp"
    write = [400, *_ERR, 409, 413, 415]
    return {
        base: {
            "get": op(
                "otpStatus", "A user's second factor.", "200", "OtpStatus", _ERR, params=params
            ),
            "post": op(
                "otpEnroll",
                "Enroll a TOTP secret (in this response only; active once confirmed): the "
                "user himself, with his current password, or users:admin (no escalation).",
                "201",
                "OtpEnrollment",
                write,
                params=params,
                body=body("OtpEnroll", False),
            ),
        },
        base + "/confirm": {
            "post": op(
                "otpConfirm",
                "Activate the pending secret with a first code; the recovery codes, once.",
                "200",
                "OtpConfirmed",
                write,
                params=params,
                body=body("OtpCode"),
            )
        },
        base + "/disable": {
            "post": op(
                "otpDisable",
                "Remove the second factor (the user himself gives a current code).",
                "200",
                None,
                write,
                params=params,
                body=body("OtpDisable", False),
            )
        },
        "/v1/auth/realms/{realm}/otp-policy": {
            "get": op(
                "otpPolicy",
                "Whether the realm requires a second factor.",
                "200",
                "OtpPolicy",
                _ERR,
                params=[realm],
            ),  # fmt: skip
            "put": op(
                "setOtpPolicy",
                "Require a second factor of the realm's password users (realms:admin).",
                "200",
                "OtpPolicy",
                [400, *_ERR, 413, 415],
                params=[realm],
                body=body("OtpPolicyRequest"),
            ),
        },
    }
