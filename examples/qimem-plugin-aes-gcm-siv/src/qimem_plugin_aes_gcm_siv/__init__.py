"""qimem plugin: the AES-256-GCM-SIV algorithm and a JSON-lines audit sink.

Enable it with ``qimem plugins enable aes-gcm-siv`` (or ``--plugin aes-gcm-siv``). The hook
implementations below are all qimem sees; the work is in :mod:`.algorithm` and :mod:`.audit`.
"""

from __future__ import annotations

from typing import Any

from qimem.hooks import hookimpl
from qimem.manifest import from_package
from qimem_plugin_aes_gcm_siv.algorithm import AesGcmSiv
from qimem_plugin_aes_gcm_siv.audit import write_event

__all__ = ["AesGcmSiv", "write_event"]


@hookimpl
def qimem_register_algorithms(register: Any) -> None:
    register(AesGcmSiv())


@hookimpl
def qimem_key_event(event: Any) -> None:
    write_event(event)


@hookimpl
def qimem_plugin_manifest() -> dict[str, Any]:
    return from_package(__name__)  # qimem_plugin.toml, the one source of truth
