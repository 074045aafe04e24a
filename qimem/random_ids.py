"""Random identifiers made on every request (request ids, audit record ids), from the
operating system's CSPRNG, read 4 KiB at a time.

``os.urandom`` releases the GIL around its system call. On a loaded server each release
lets another thread take the interpreter, and the caller then waits to get it back: two
ids per request were two such hand-offs on the encrypt path. One 4 KiB read serves 256
ids. A forked child never reuses its parent's bytes (``os.register_at_fork`` and a process
id check), so ids stay unique across ``--workers`` processes.

Not for keys or nonces: those take ``os.urandom`` directly, each time.
"""

from __future__ import annotations

import os
import threading

_CHUNK = 4096
_lock = threading.Lock()
_buffer = b""
_offset = 0
_pid = os.getpid()


def _forget() -> None:
    """In a forked child: a fresh lock (the parent's may have been held) and no bytes."""
    global _lock, _buffer, _offset, _pid
    _lock = threading.Lock()
    _buffer, _offset, _pid = b"", 0, os.getpid()


os.register_at_fork(after_in_child=_forget)


def random_16() -> bytes:
    """16 bytes from the CSPRNG, never handed out twice (in this process or another)."""
    global _buffer, _offset, _pid
    with _lock:
        if _offset >= len(_buffer) or _pid != os.getpid():
            _buffer, _offset, _pid = os.urandom(_CHUNK), 0, os.getpid()
        out = _buffer[_offset : _offset + 16]
        _offset += 16
    return out


def hex_id() -> str:
    """32 random hex digits (a request id)."""
    return random_16().hex()


def uuid4_text() -> str:
    """A random (version 4) UUID's text, as ``str(uuid.uuid4())`` gives it (an audit record
    id), in a fraction of the time."""
    raw = bytearray(random_16())
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
