"""``"module:attr"`` references: how plugins name what they provide without importing it.

A plugin registers ``"qimem.builtin_plugins.sql.store:open_store"`` instead of the function
itself, so a process imports the SQL store's code (and SQLAlchemy) only when it opens an
SQL store, and an algorithm's code only when it encrypts or decrypts with it.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from qimem.errors import PluginError

#: ``package.module:attr`` or ``package.module:Class.attr``.
_REFERENCE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_reference(value: object) -> bool:
    """Whether ``value`` is a well-formed ``"module:attr"`` string."""
    return isinstance(value, str) and _REFERENCE.match(value) is not None


def resolve(reference: str, plugin: str) -> Any:
    """Import ``reference``'s module and return the attribute it names.

    :raises PluginError: naming ``plugin`` and the reference, if it cannot be imported.
    """
    module_name, _, attr = reference.partition(":")
    try:
        value: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            value = getattr(value, part)
    except Exception as exc:
        raise PluginError(
            f"plugin {plugin!r}: cannot load {reference!r} ({type(exc).__name__}: {exc})"
        ) from None
    return value


class LazyFactory:
    """A key store factory named by reference: imported on the first call."""

    def __init__(self, reference: str, plugin: str) -> None:
        self.reference = reference
        self.plugin = plugin
        self._target: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._target is None:
            target = resolve(self.reference, self.plugin)
            if not callable(target):
                raise PluginError(f"plugin {self.plugin!r}: {self.reference!r} is not callable")
            self._target = target
        return self._target(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<LazyFactory {self.reference}>"
