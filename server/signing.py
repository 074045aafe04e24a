"""Signing, MAC, public key, random and hash operations (issue 16), declared once."""

from __future__ import annotations

from qimem.server.operations import Operation

OPERATIONS: tuple[Operation, ...] = ()
