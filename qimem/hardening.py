"""Process hardening for processes that hold keys: no core dumps, no ptrace by peers.

A crashed (SIGABRT, SIGSEGV) process that holds key material would otherwise write it to a
core file: the root-derived wrapping key, unwrapped keys, passwords of logins in flight.
:func:`disable_core_dumps` sets ``RLIMIT_CORE`` to 0 and, on Linux, clears the process's
"dumpable" flag (``prctl(PR_SET_DUMPABLE, 0)``), which also stops core dumps piped to a
handler (``core_pattern = |...``, which ignores ``RLIMIT_CORE``) and makes
``/proc/<pid>/mem`` and ``ptrace`` unavailable to other processes of the same user.

``qimem serve`` (and ``qimem-api``, ``qauth-api``) and every CLI process that opens the store
or talks to a server call it. Set ``QIMEM_ALLOW_CORE_DUMPS=1`` to keep core dumps while
debugging a crash (never on a host with production keys).
"""

from __future__ import annotations

import os
import sys

from qimem.lazylog import get_logger

log = get_logger("qimem.hardening")

#: Set to 1 to keep core dumps (debugging only).
ALLOW_ENV = "QIMEM_ALLOW_CORE_DUMPS"
_PR_SET_DUMPABLE = 4
_done = False


def core_dumps_allowed() -> bool:
    """True when the operator opted out with ``QIMEM_ALLOW_CORE_DUMPS=1``."""
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def disable_core_dumps() -> bool:
    """Make this process produce no core dump and refuse ``ptrace`` by its peers.

    Sets the soft ``RLIMIT_CORE`` to 0 (the hard limit is left alone, so a debugger session
    can raise it again) and, on Linux, ``PR_SET_DUMPABLE`` to 0. Idempotent and cheap;
    a no-op where the platform has neither, and when :data:`ALLOW_ENV` is set. Returns
    whether core dumps are now off.
    """
    global _done
    if core_dumps_allowed():
        return False
    if _done:
        return True
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        pass
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_DUMPABLE, 0) failed: errno %d", ctypes.get_errno())
                return False
        except (OSError, AttributeError):
            log.warning("prctl is not available; only RLIMIT_CORE is set")
            return False
    _done = True
    return True


def ensure_open_files(wanted: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to ``wanted`` (capped by the hard limit) if lower.

    ``qimem serve`` needs one descriptor per open connection; many systems start processes
    with a soft limit of 1024. Returns the soft limit in force afterwards (``wanted`` where
    the platform has no such limit).
    """
    try:
        import resource
    except ImportError:
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return wanted if soft == resource.RLIM_INFINITY else soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft
    if target < wanted:
        log.warning(
            "open file limit is %d (hard limit); fewer connections than configured fit", target
        )
    return target
