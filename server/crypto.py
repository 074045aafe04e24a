"""Message resources: encrypt, decrypt (single or batch), rewrap and data keys.

Batch bodies are ``{"items": [...]}``; the response holds one entry per item, in order,
either the result or ``{"error": {"code", "message"}}``, so one bad item never fails the
others. The response to a batch is 200 even when some items failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import falcon

from qimem import services
from qimem.app import AppContext
from qimem.errors import QimemError
from qimem.server.errors import qimem_error_body
from qimem.server.media import (
    Field,
    Spec,
    base64_bytes,
    batch_items,
    key_id_string,
    read_json,
    ref_string,
)
from qimem.server.metrics import Metrics

_KEY_FIELDS = (Field("key_id", key_id_string), Field("key", ref_string))
_CONTEXT = Field("context", base64_bytes, nullable=True)  # derived keys (docs/keys.md)
ENCRYPT_SPEC = Spec(
    *_KEY_FIELDS,
    Field("plaintext", base64_bytes, required=True),
    Field("aad", base64_bytes, nullable=True),
    _CONTEXT,
    one_of=("key_id", "key"),
)
DECRYPT_SPEC = Spec(
    Field("envelope", base64_bytes, required=True),
    Field("aad", base64_bytes, nullable=True),
    _CONTEXT,
)
DATAKEY_SPEC = Spec(*_KEY_FIELDS, _CONTEXT, one_of=("key_id", "key"))

Operation = Callable[[AppContext, str, Any], dict[str, Any]]


def _encrypt(app: AppContext, realm: str, item: Any) -> dict[str, Any]:
    body = ENCRYPT_SPEC.parse(item)
    ref = body.get("key_id") or body["key"]
    return services.encrypt(
        app, ref, body["plaintext"], aad=body.get("aad"), realm=realm, context=body.get("context")
    ).to_dict()


def _decrypt(app: AppContext, realm: str, item: Any) -> dict[str, Any]:
    body = DECRYPT_SPEC.parse(item)
    return services.decrypt(
        app, body["envelope"], aad=body.get("aad"), realm=realm, context=body.get("context")
    ).to_dict()


def _rewrap(app: AppContext, realm: str, item: Any) -> dict[str, Any]:
    body = DECRYPT_SPEC.parse(item)
    return services.rewrap(
        app, body["envelope"], aad=body.get("aad"), realm=realm, context=body.get("context")
    ).to_dict()


def _datakey(app: AppContext, realm: str, item: Any) -> dict[str, Any]:
    body = DATAKEY_SPEC.parse(item)
    ref = body.get("key_id") or body["key"]
    return services.datakey(app, ref, realm=realm, context=body.get("context")).to_dict()


class CryptoResource:
    """One message operation over POST; ``batch`` enables ``{"items": [...]}`` bodies."""

    def __init__(
        self,
        app: AppContext,
        body_limit: int,
        metrics: Metrics,
        name: str,
        operation: Operation,
        *,
        batch: bool = False,
    ) -> None:
        self._app = app
        self._limit = body_limit
        self._metrics = metrics
        self._name = name
        self._operation = operation
        self._batch = batch

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_json(req, self._limit)
        realm = req.context.realm
        items = batch_items(body) if self._batch else None
        if items is None:
            try:
                resp.media = self._operation(self._app, realm, body)
            except QimemError:
                self._metrics.count_crypto(self._name, failed=1)
                raise
            self._metrics.count_crypto(self._name, ok=1)
            return
        results: list[dict[str, Any]] = []
        failed = 0
        for item in items:
            try:
                results.append(self._operation(self._app, realm, item))
            except QimemError as exc:
                failed += 1
                results.append(qimem_error_body(exc))
        self._metrics.count_crypto(self._name, ok=len(items) - failed, failed=failed)
        resp.media = {"items": results}


def crypto_resources(
    app: AppContext, body_limit: int, metrics: Metrics
) -> dict[str, CryptoResource]:
    """The four message resources by operation name."""
    return {
        "encrypt": CryptoResource(app, body_limit, metrics, "encrypt", _encrypt, batch=True),
        "decrypt": CryptoResource(app, body_limit, metrics, "decrypt", _decrypt, batch=True),
        "rewrap": CryptoResource(app, body_limit, metrics, "rewrap", _rewrap),
        "datakey": CryptoResource(app, body_limit, metrics, "datakey", _datakey),
    }
