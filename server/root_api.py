"""Root of trust over HTTP: ``GET /v1/root/status`` and ``POST /v1/root/rotate``.

Both are reserved to administrators of the ``master`` realm (``realms:admin``): the root
wraps every realm's keys, so a realm admin of another realm may neither see nor rotate it
(their rules are in :mod:`qimem.server.auth_middleware`). A rotation can take long, so
``POST`` starts it in a background thread of this process and answers 202 with the status
at once; ``GET`` shows the root versions, how many rows each wraps, and the rotation's
progress, result or error (its message only). One rotation runs at a time per process
(409 ``root_rotation_running``); a rotation another process runs on the same store is
resumed or refused by :func:`qimem.root.rotation.rotate` itself, and its refusal shows up
here as the rotation's error.

Audit: the request is recorded as ``root.rotate`` by the auth middleware (success when
accepted, denied or failure otherwise); the rotation's end is recorded as ``root.rotate``
with target ``root`` and ``phase = "finished"``, its outcome, the active version and how
many rows moved (no key material, no settings).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import falcon

from qimem.app import AppContext
from qimem.errors import ConflictError, QimemError, ValidationError
from qimem.identity.realms import MASTER
from qimem.server.media import read_body, read_json

ROOT_PREFIX = "/v1/root"
STATUS_PATH = ROOT_PREFIX + "/status"
ROTATE_PATH = ROOT_PREFIX + "/rotate"
#: Progress lines kept for ``GET /v1/root/status`` (the most recent ones).
PROGRESS_LINES = 20

log = logging.getLogger("qimem.server")

#: One rotation at a time in this process, whichever store it rotates.
_RUNNING = threading.Lock()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RootRotationRunner:
    """The rotation of one app's store in a background thread, and what it did."""

    def __init__(self, app: AppContext) -> None:
        self._app = app
        self._lock = threading.Lock()
        self.state = "idle"  # idle | running | succeeded | failed
        self.started: str | None = None
        self.finished: str | None = None
        self.actor: str | None = None
        self.result: dict[str, Any] | None = None
        self.error: dict[str, str] | None = None
        self._progress: deque[str] = deque(maxlen=PROGRESS_LINES)
        self._thread: threading.Thread | None = None

    def start(self, actor: str) -> None:
        """Start a rotation in a background thread.

        :raises ConflictError: a rotation is already running in this process.
        """
        if not _RUNNING.acquire(blocking=False):
            raise ConflictError(
                "a root rotation is already running in this server process",
                code="root_rotation_running",
            )
        try:
            with self._lock:
                self.state, self.started, self.finished = "running", _now(), None
                self.actor, self.result, self.error = actor, None, None
                self._progress.clear()
            self._thread = threading.Thread(
                target=self._run, name="qimem-root-rotation", daemon=True
            )
            self._thread.start()
        except BaseException:
            _RUNNING.release()
            raise

    def _say(self, line: str) -> None:
        with self._lock:
            self._progress.append(line)

    def _run(self) -> None:
        from qimem.root import rotation

        try:
            report = rotation.rotate(self._app, progress=self._say)
        except QimemError as exc:
            self._end("failed", error={"code": exc.code, "message": exc.message})
        except Exception as exc:  # never a traceback in the answer; the type in the log
            log.error("root rotation failed: %s", type(exc).__name__)
            self._end(
                "failed",
                error={"code": "internal_error", "message": "the root rotation failed"},
            )
        else:
            self._end("succeeded", result=report.to_json())
        finally:
            _RUNNING.release()

    def _end(
        self,
        state: str,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
    ) -> None:
        with self._lock:
            self.state, self.finished, self.result, self.error = state, _now(), result, error
        detail: dict[str, Any] = {"phase": "finished"}
        if result is not None:
            detail.update(active=result["active"], moved=sum(result["moved"].values()))
        if error is not None:
            detail["code"] = error["code"]
        outcome = "success" if state == "succeeded" else "failure"
        try:
            from qimem.services import identity as ids

            ids.identity(self._app).record(
                MASTER, self.actor or "-", "root.rotate", "root", outcome, **detail
            )
        except Exception as exc:
            log.warning("root rotation audit record not written: %s", type(exc).__name__)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the running rotation's thread (tests, shutdown)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "state": self.state,
                "started": self.started,
                "finished": self.finished,
                "progress": list(self._progress),
                "result": self.result,
                "error": self.error,
            }


def _rotatable(app: AppContext) -> str | None:
    """Why ``app``'s store cannot rotate its root, or ``None`` if it can."""
    if app.backend.root_rows is None:
        return "root rotation needs an SQL store (SQLite or PostgreSQL)"
    if app.wrapper is None:
        return "no root configured for this store"
    return None


class RootStatusResource:
    """``GET /v1/root/status``: root versions, rows per version, the rotation's progress."""

    def __init__(self, runner: RootRotationRunner) -> None:
        self._runner = runner

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = _status(self._runner)


def _status(runner: RootRotationRunner) -> dict[str, Any]:
    from qimem.root import rotation

    app = runner._app
    reason = _rotatable(app)
    body: dict[str, Any] = {"rotatable": reason is None, "rotation": runner.to_json()}
    if reason is not None:
        body["reason"] = reason
        body["root"] = None
    else:
        body["root"] = rotation.status(app)
    return body


class RootRotateResource:
    """``POST /v1/root/rotate``: start a rotation (202), or 409 while one runs."""

    def __init__(self, runner: RootRotationRunner, body_limit: int) -> None:
        self._runner = runner
        self._limit = body_limit

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        _empty_body(req, self._limit)
        reason = _rotatable(self._runner._app)
        if reason is not None:
            raise ConflictError(reason, code="root_rotation_unsupported")
        principal = getattr(req.context, "principal", None)
        actor = f"{principal.username}@{principal.realm}" if principal is not None else "-"
        self._runner.start(actor)
        resp.status = falcon.HTTP_202
        resp.location = STATUS_PATH
        resp.media = _status(self._runner)


def _empty_body(req: falcon.Request, limit: int) -> None:
    """The body must be absent or an empty JSON object (nothing is chosen over HTTP: the
    new version's provider is the server's configured one)."""
    import io

    raw = read_body(req, limit)
    if not raw:
        return
    req.stream = io.BytesIO(raw)  # read_json reads it again, checking the media type
    body = read_json(req, limit)
    if body != {}:
        raise ValidationError(
            "the request body must be empty or {}: rotation takes no parameters (the new "
            "root version is wrapped by the server's configured root-key provider)",
            code="invalid_body",
        )


def add_root_routes(app: falcon.App, app_ctx: AppContext, body_limit: int) -> RootRotationRunner:
    """Serve ``/v1/root/status`` and ``/v1/root/rotate``; returns the rotation runner."""
    runner = RootRotationRunner(app_ctx)
    app.add_route(STATUS_PATH, RootStatusResource(runner))
    app.add_route(ROTATE_PATH, RootRotateResource(runner, body_limit))
    return runner


# -- OpenAPI -----------------------------------------------------------------------------

_STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["rotatable", "root", "rotation"],
    "properties": {
        "rotatable": {"type": "boolean"},
        "reason": {"type": "string"},
        "root": {
            "description": "Root versions (provider, recorded settings, state, check value) "
            "and how many rows each wraps; null when the store cannot rotate.",
            "type": ["object", "null"],
            "properties": {
                "keyring": {"type": "boolean"},
                "active": {"type": "integer"},
                "check": {"type": "string"},
                "configured_provider": {"type": ["string", "null"]},
                "versions": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "version": {"type": "integer"},
                            "provider": {"type": "string"},
                            "settings": {"type": "object"},
                            "direct": {"type": "boolean"},
                            "state": {"enum": ["active", "draining", "retired"]},
                            "created": {"type": "string"},
                            "check": {"type": "string"},
                            "rows": {"type": "integer"},
                        },
                    },
                },
            },
        },
        "rotation": {
            "type": "object",
            "required": ["state", "progress"],
            "properties": {
                "state": {"enum": ["idle", "running", "succeeded", "failed"]},
                "started": {"type": ["string", "null"]},
                "finished": {"type": ["string", "null"]},
                "progress": {"type": "array", "items": {"type": "string"}},
                "result": {"type": ["object", "null"]},
                "error": {
                    "type": ["object", "null"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    },
}

_JSON_STATUS = {"application/json": {"schema": {"$ref": "#/components/schemas/RootStatus"}}}


def _e(status: int) -> dict[str, str]:
    return {"$ref": f"#/components/responses/E{status}"}


PATHS: dict[str, Any] = {
    STATUS_PATH: {
        "get": {
            "operationId": "rootStatus",
            "tags": ["root"],
            "summary": "Root versions, rows per version, and this server's rotation "
            "(master realm realms:admin).",
            "responses": {
                "200": {"description": "The root's status.", "content": _JSON_STATUS},
                "403": _e(403),
                "503": _e(503),
            },
        }
    },
    ROTATE_PATH: {
        "post": {
            "operationId": "rootRotate",
            "tags": ["root"],
            "summary": "Start an online root rotation in the background (master realm "
            "realms:admin); poll /v1/root/status.",
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {
                        "schema": {"type": "object", "additionalProperties": False}
                    }
                },
            },
            "responses": {
                "202": {"description": "Rotation started.", "content": _JSON_STATUS},
                "400": _e(400),
                "403": _e(403),
                "409": _e(409),
                "413": _e(413),
                "415": _e(415),
                "503": _e(503),
            },
        }
    },
}


def add_to_openapi(doc: dict[str, Any]) -> dict[str, Any]:
    """Add the root paths and their schema to ``doc`` (in place; before ``add_auth``)."""
    import copy

    doc.setdefault("components", {}).setdefault("schemas", {})["RootStatus"] = copy.deepcopy(
        _STATUS_SCHEMA
    )
    doc.setdefault("paths", {}).update(copy.deepcopy(PATHS))
    return doc
