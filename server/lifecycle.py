"""Key lifecycle resources (issue 7; docs/keys.md), all under ``/v1/security``:

``GET|POST /keys/{key_id}/policy``, ``POST /keys/{key_id}/disable|enable|destroy``,
``POST /keys/{key_id}/schedule-deletion|cancel-deletion``, ``POST /keys/{key_id}/export``
and ``POST /import``. ``{key_id}`` also accepts a lineage_id or a key name. Each calls the
same service function as the CLI, with the caller as the audit actor.
"""

from __future__ import annotations

from typing import Any

import falcon

from qimem import services
from qimem.app import AppContext
from qimem.keys import LineagePolicy
from qimem.server.media import (
    Field,
    Spec,
    b64,
    base64_bytes,
    boolean,
    integer,
    plain_string,
    read_json,
    ref_string,
)
from qimem.services import lifecycle

KEY_PATH = "/v1/security/keys/{key_id}"
IMPORT_PATH = "/v1/security/import"


POLICY_SPEC = Spec(
    Field("min_decryption_version", integer),
    Field("min_encryption_version", integer),
    Field("usage_limit", integer, nullable=True),
    Field("auto_rotate_seconds", integer, nullable=True),
    Field("deletion_protection", boolean),
)
VERSION_SPEC = Spec(Field("version", integer, nullable=True))
SCHEDULE_SPEC = Spec(Field("days", integer, nullable=True))
EMPTY_SPEC = Spec()
EXPORT_SPEC = Spec(Field("passphrase", plain_string, required=True))
IMPORT_SPEC = Spec(
    Field("backup", base64_bytes, required=True), Field("passphrase", plain_string, required=True)
)


def _actor(req: falcon.Request) -> str | None:
    """The audit actor: the token's user (None without auth: nothing is recorded)."""
    principal = getattr(req.context, "principal", None)
    return f"{principal.username}@{principal.realm}" if principal is not None else None


def _optional_body(req: falcon.Request, limit: int) -> Any:
    """The JSON body, or ``{}`` when the request has none."""
    if not req.content_length:
        return {}
    return read_json(req, limit)


class _Resource:
    def __init__(self, app: AppContext, body_limit: int) -> None:
        self._app = app
        self._limit = body_limit


class PolicyResource(_Resource):
    """``GET`` a lineage's policy and usage counts; ``POST`` changes to it (fields left out
    keep their value; ``null`` clears ``usage_limit`` / ``auto_rotate_seconds``)."""

    def _render(self, ref: str, realm: str, policy: LineagePolicy) -> dict[str, Any]:
        details = services.show_key(self._app, ref, realm=realm)
        usage = lifecycle.key_usage(self._app, details.lineage_id, realm=realm)
        return {
            "lineage_id": details.lineage_id,
            "name": details.name,
            "policy": policy.to_dict(),
            "effective_usage_limit": lifecycle.effective_usage_limit(
                self._app, details.versions[-1], policy
            ),
            "usage": {str(v.version): usage.get(v.key_id, 0) for v in details.versions},
        }

    def on_get(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        ref = ref_string("key_id", key_id)
        policy = lifecycle.get_policy(self._app, ref, realm=req.context.realm)
        resp.media = self._render(ref, req.context.realm, policy)

    def on_post(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        ref = ref_string("key_id", key_id)
        raw = read_json(req, self._limit)
        body = POLICY_SPEC.parse(raw)
        for name in ("usage_limit", "auto_rotate_seconds"):
            if name in raw and raw[name] is None:
                body[name] = None  # explicit null: clear it
        policy = lifecycle.set_policy(
            self._app, ref, realm=req.context.realm, actor=_actor(req), **body
        )
        resp.media = self._render(ref, req.context.realm, policy)


class StateResource(_Resource):
    """``POST {version?}``: disable, enable or destroy one version of ``{key_id}``."""

    def __init__(self, app: AppContext, body_limit: int, operation: str) -> None:
        super().__init__(app, body_limit)
        self._operation = {
            "disable": lifecycle.disable_version,
            "enable": lifecycle.enable_version,
            "destroy": lifecycle.destroy_version,
        }[operation]

    def on_post(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        ref = ref_string("key_id", key_id)
        body = VERSION_SPEC.parse(_optional_body(req, self._limit))
        changed = self._operation(
            self._app, ref, version=body.get("version"), realm=req.context.realm, actor=_actor(req)
        )
        resp.media = changed.to_dict()


class ScheduleDeletionResource(_Resource):
    """``POST {days?}`` → the policy with its ``deletion_date``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        ref = ref_string("key_id", key_id)
        body = SCHEDULE_SPEC.parse(_optional_body(req, self._limit))
        policy = lifecycle.schedule_deletion(
            self._app,
            ref,
            days=body.get("days", lifecycle.DEFAULT_DELETION_DAYS),
            realm=req.context.realm,
            actor=_actor(req),
        )
        resp.media = policy.to_dict()


class CancelDeletionResource(_Resource):
    """``POST`` → the policy without a ``deletion_date``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        ref = ref_string("key_id", key_id)
        EMPTY_SPEC.parse(_optional_body(req, self._limit))
        policy = lifecycle.cancel_deletion(
            self._app, ref, realm=req.context.realm, actor=_actor(req)
        )
        resp.media = policy.to_dict()


class ExportResource(_Resource):
    """``POST {passphrase}`` → ``{"backup": base64}``: the lineage sealed under the
    passphrase (Argon2id + AES-256-GCM; the same file ``qimem keys export`` writes)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        from qimem import backup

        ref = ref_string("key_id", key_id)
        body = EXPORT_SPEC.parse(read_json(req, self._limit))
        data = backup.export_keys(
            self._app, [ref], body["passphrase"], realm=req.context.realm, actor=_actor(req)
        )
        resp.media = {"backup": b64(data)}


class ImportResource(_Resource):
    """``POST {backup, passphrase}`` → 201 with the restored lineages (ids kept), into the
    caller's realm."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        from qimem import backup

        body = IMPORT_SPEC.parse(read_json(req, self._limit))
        records = backup.import_keys(
            self._app,
            body["backup"],
            body["passphrase"],
            realm=req.context.realm,
            actor=_actor(req),
        )
        resp.status = falcon.HTTP_201
        resp.media = {
            "keys": [
                {
                    "lineage_id": r.lineage_id,
                    "name": r.name,
                    "realm": r.realm,
                    "versions": len(r.versions),
                }
                for r in records
            ]
        }


def add_lifecycle_routes(app: falcon.App, app_ctx: AppContext, body_limit: int) -> None:
    """Register the lifecycle routes on ``app``."""
    app.add_route(KEY_PATH + "/policy", PolicyResource(app_ctx, body_limit))
    for operation in ("disable", "enable", "destroy"):
        app.add_route(f"{KEY_PATH}/{operation}", StateResource(app_ctx, body_limit, operation))
    app.add_route(KEY_PATH + "/schedule-deletion", ScheduleDeletionResource(app_ctx, body_limit))
    app.add_route(KEY_PATH + "/cancel-deletion", CancelDeletionResource(app_ctx, body_limit))
    app.add_route(KEY_PATH + "/export", ExportResource(app_ctx, body_limit))
    app.add_route(IMPORT_PATH, ImportResource(app_ctx, body_limit))
