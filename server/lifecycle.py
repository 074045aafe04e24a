"""Key lifecycle operations (issue 7; docs/keys.md), all under ``/v1/security``, declared
once (:mod:`qimem.server.operations`):

``GET|POST /keys/{key_id}/policy``, ``POST /keys/{key_id}/disable|enable|destroy``,
``POST /keys/{key_id}/schedule-deletion|cancel-deletion``, ``POST /keys/{key_id}/export``
and ``POST /import``. ``{key_id}`` also accepts a lineage_id or a key name. Each calls the
same service function as the CLI, with the caller as the audit actor (the services audit
these themselves: ``pair``).
"""

from __future__ import annotations

from typing import Any

from qimem import services
from qimem.app import AppContext
from qimem.keys import LineagePolicy
from qimem.server import key_names
from qimem.server.keys import KEY_PARAM, KEY_PARAMETER
from qimem.server.media import Field, Spec, b64, base64_bytes, boolean, integer, plain_string
from qimem.server.operations import Doc, Operation
from qimem.services import lifecycle

KEY_PATH = "/v1/security/keys/{key_id}"
IMPORT_PATH = "/v1/security/import"

POLICY_SPEC = Spec(
    Field("min_decryption_version", integer),
    Field("min_encryption_version", integer),
    Field("usage_limit", integer, nullable=True, clears=True),
    Field("auto_rotate_seconds", integer, nullable=True, clears=True),
    Field("deletion_protection", boolean),
)
VERSION_SPEC = Spec(Field("version", integer, nullable=True))
SCHEDULE_SPEC = Spec(Field("days", integer, nullable=True))
EMPTY_SPEC = Spec()
EXPORT_SPEC = Spec(Field("passphrase", plain_string, required=True))
IMPORT_SPEC = Spec(
    Field("backup", base64_bytes, required=True), Field("passphrase", plain_string, required=True)
)


def _render(app: AppContext, ref: str, realm: str, policy: LineagePolicy) -> dict[str, Any]:
    details = services.show_key(app, ref, realm=realm)
    usage = lifecycle.key_usage(app, details.lineage_id, realm=realm)
    return {
        "lineage_id": details.lineage_id,
        "name": details.name,
        "policy": policy.to_dict(),
        "effective_usage_limit": lifecycle.effective_usage_limit(app, details.versions[-1], policy),
        "usage": {str(v.version): usage.get(v.key_id, 0) for v in details.versions},
    }


def _get_policy(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    ref = args["key_id"]
    return _render(app, ref, realm, lifecycle.get_policy(app, ref, realm=realm))


def _set_policy(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    """Fields left out keep their value; ``null`` clears usage_limit / auto_rotate_seconds."""
    ref = args.pop("key_id")
    policy = lifecycle.set_policy(app, ref, realm=realm, **args)
    return _render(app, ref, realm, policy)


def _state(change: Any) -> Any:
    def call(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
        return change(  # type: ignore[no-any-return]
            app, args["key_id"], version=args.get("version"), realm=realm, actor=args["actor"]
        ).to_dict()

    return call


def _schedule(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    return lifecycle.schedule_deletion(
        app,
        args["key_id"],
        days=args.get("days", lifecycle.DEFAULT_DELETION_DAYS),
        realm=realm,
        actor=args["actor"],
    ).to_dict()


def _cancel(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    return lifecycle.cancel_deletion(
        app, args["key_id"], realm=realm, actor=args["actor"]
    ).to_dict()


def _export(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    """The lineage sealed under the passphrase (Argon2id + AES-256-GCM; the same file
    ``qimem keys export`` writes)."""
    from qimem import backup

    data = backup.export_keys(
        app, [args["key_id"]], args["passphrase"], realm=realm, actor=args["actor"]
    )
    return {"backup": b64(data)}


def _import(app: AppContext, realm: str, args: dict[str, Any]) -> dict[str, Any]:
    """The restored lineages (ids kept), into the caller's realm."""
    from qimem import backup

    records = backup.import_keys(
        app, args["backup"], args["passphrase"], realm=realm, actor=args["actor"]
    )
    return {
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


_ERRORS = (400, 403, 404, 409, 413, 415, 503)


def _key_op(
    name: str,
    operation: str,
    call: Any,
    spec: Spec,
    summary: str,
    request: str,
    response: str,
    answer: str,
    *,
    permission: str = "keys:rotate",
    optional_body: bool = True,
) -> Operation:
    """A POST on ``/keys/{key_id}/<operation>`` that the service audits itself."""
    return Operation(
        name,
        "POST",
        f"/keys/{{key_id}}/{operation}",
        call,
        Doc(
            summary,
            response,
            answer,
            request=request,
            tag="keys",
            errors=_ERRORS,
            parameters=(KEY_PARAMETER,),
        ),
        spec=spec,
        params=(KEY_PARAM,),
        permission=permission,
        key_names=key_names.param_key if permission == "keys:rotate" else None,
        pair="keys." + operation.replace("-", "_"),
        optional_body=optional_body,
    )


OPERATIONS = (
    Operation(
        "getKeyPolicy",
        "GET",
        "/keys/{key_id}/policy",
        _get_policy,
        Doc(
            "A key lineage's lifecycle policy and per-version usage counts.",
            "PolicyView",
            "The policy.",
            tag="keys",
            errors=(400, 403, 404, 503),
            parameters=(KEY_PARAMETER,),
        ),
        params=(KEY_PARAM,),
        permission="keys:read",
        key_names=key_names.param_key,
    ),
    _key_op(
        "setKeyPolicy",
        "policy",
        _set_policy,
        POLICY_SPEC,
        "Change minimum versions, usage limit, auto-rotation period, deletion protection.",
        "PolicyRequest",
        "PolicyView",
        "The new policy.",
        optional_body=False,
    ),
    _key_op(
        "disableKeyVersion",
        "disable",
        _state(lifecycle.disable_version),
        VERSION_SPEC,
        "Disable one version: it refuses to decrypt until enabled (not the active version).",
        "VersionRequest",
        "KeyVersion",
        "The version.",
    ),
    _key_op(
        "enableKeyVersion",
        "enable",
        _state(lifecycle.enable_version),
        VERSION_SPEC,
        "Enable a disabled version (decrypt-only again).",
        "VersionRequest",
        "KeyVersion",
        "The version.",
    ),
    _key_op(
        "destroyKeyVersion",
        "destroy",
        _state(lifecycle.destroy_version),
        VERSION_SPEC,
        "Destroy one version: its material is erased for good (not the active version; "
        "refused under deletion protection).",
        "VersionRequest",
        "KeyVersion",
        "The version.",
    ),
    _key_op(
        "scheduleKeyDeletion",
        "schedule-deletion",
        _schedule,
        SCHEDULE_SPEC,
        "Schedule the lineage for deletion after a waiting period (7..3650 days, default 30).",
        "ScheduleDeletionRequest",
        "LineagePolicy",
        "The policy with its deletion_date.",
    ),
    _key_op(
        "cancelKeyDeletion",
        "cancel-deletion",
        _cancel,
        EMPTY_SPEC,
        "Cancel a scheduled deletion.",
        "EmptyRequest",
        "LineagePolicy",
        "The policy.",
    ),
    # a backup holds key material: export and import are for realm administrators
    _key_op(
        "exportKey",
        "export",
        _export,
        EXPORT_SPEC,
        "Back up the lineage (all versions, states, policy) sealed under a passphrase.",
        "ExportRequest",
        "Backup",
        "The backup.",
        permission="realms:admin",
        optional_body=False,
    ),
    Operation(
        "importKeys",
        "POST",
        "/import",
        _import,
        Doc(
            "Restore the lineages of a backup into the caller's realm (ids kept; nothing if "
            "any exists).",
            "ImportResult",
            "Restored.",
            request="ImportRequest",
            tag="keys",
            errors=(400, 403, 409, 413, 415, 422, 503),
        ),
        spec=IMPORT_SPEC,
        permission="realms:admin",
        pair="keys.import",
        status=201,
    ),
)
