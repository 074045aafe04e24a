"""An audit sink: one JSON line per key event, appended to a file.

The file is ``$QIMEM_AUDIT_FILE`` when set, else ``qimem-audit.jsonl`` in qimem's data
directory (``$QIMEM_HOME`` or the user's data dir). Records carry metadata only (ids,
versions, algorithm, realm, time), never key material: qimem's events do not contain any.
Each record is written with one ``write`` on a file opened in append mode, so concurrent
processes interleave whole lines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV_VAR = "QIMEM_AUDIT_FILE"


def audit_path() -> Path:
    """Where records go (read on every event, so the environment can change it)."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Path(configured)
    from qimem.config import data_dir

    return data_dir() / "qimem-audit.jsonl"


def record(event: Any) -> dict[str, Any]:
    """The JSON record of a :class:`qimem.events.KeyEvent`."""
    key = event.key
    previous = event.previous
    return {
        "at": event.at.isoformat(),
        "kind": event.kind,
        "realm": event.realm,
        "key_id": key.key_id,
        "lineage_id": key.lineage_id,
        "name": key.name,
        "version": key.version,
        "algorithm": key.algorithm,
        "previous_key_id": previous.key_id if previous is not None else None,
        "source": "qimem-plugin-aes-gcm-siv",
    }


def write_event(event: Any) -> None:
    """Append one record for ``event``."""
    path = audit_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record(event), sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)
