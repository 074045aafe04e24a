"""The pluggy markers of the ``qimem`` project."""

import pluggy

PROJECT = "qimem"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
