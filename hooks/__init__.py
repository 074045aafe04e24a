"""qimem hook specifications and markers (installed as ``qimem.hooks``)."""

from qimem.hooks.markers import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec"]
