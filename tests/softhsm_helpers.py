"""A private SoftHSM2 for the tests: one token directory and ``softhsm2.conf`` per test
process, with a few tokens initialised up front.

SoftHSM2 reads ``SOFTHSM2_CONF`` and lists its tokens at ``C_Initialize``, and
python-pkcs11 keeps the loaded library for the life of the process, so a process gets one
token directory (:func:`softhsm`, created on first use) with every token it needs already
made: tokens made later would not appear. Tests separate their keys by unique labels, and
make keys the provider must refuse in a child process (:meth:`SoftHsm.run`), so the test
process's own logins are never touched. Skips when SoftHSM2 is missing, except under
``CI=true`` where it fails (``.ci/run`` installs the ``softhsm2`` package).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

LIBRARY_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
#: The tokens every test process gets: label -> user PIN (the SO PIN is ``SO_PIN``).
TOKENS = {
    "qimem-a": "1111-user-a",
    "qimem-b": "2222-user-b",
    "qimem-pin": "3333-user-pin",  # only the wrong-PIN tests log in to it
    "qimem-contract": "4444-user-c",
}
SO_PIN = "so-pin-9999"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def find_library() -> str | None:
    """SoftHSM2's PKCS#11 module, or None."""
    return next((p for p in LIBRARY_CANDIDATES if os.path.isfile(p)), None)


def require_softhsm() -> tuple[str, str]:
    """(library, softhsm2-util), or skip (fail under CI=true) when SoftHSM2 is missing."""
    library, util = find_library(), shutil.which("softhsm2-util")
    if library is None or util is None:
        problem = "SoftHSM2 is not installed (Debian package softhsm2)"
        if _in_ci():
            pytest.fail(problem + " (CI=true: the PKCS#11 tests must not be skipped)")
        pytest.skip(problem)
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        problem = "python-pkcs11 is not installed"
        if _in_ci():
            pytest.fail(problem + " (CI=true)")
        pytest.skip(problem)
    return library, util


@dataclass
class SoftHsm:
    """The process's SoftHSM2: its directory, config, library and tokens."""

    directory: Path
    conf: Path
    library: str
    slots: dict[str, int]  # token label -> slot id

    def pin(self, token: str) -> str:
        return TOKENS[token]

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that must see the same tokens."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def pin_file(self, directory: Path, token: str, *, pin: str | None = None) -> Path:
        """A 0600 file holding ``pin`` (default: the token's right PIN) and a newline."""
        path = directory / f"{token}-{uuid.uuid4().hex[:8]}.pin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write((TOKENS[token] if pin is None else pin) + "\n")
        return path

    def settings(self, directory: Path, token: str, key_label: str, **extra: Any) -> dict[str, Any]:
        """``[root_key]`` settings for ``key_label`` on ``token`` (with a PIN file)."""
        out: dict[str, Any] = {
            "library": self.library,
            "token_label": token,
            "key_label": key_label,
            "pin_file": str(self.pin_file(directory, token)),
        }
        out.update(extra)
        return out

    def run(self, script: str, *args: str) -> str:
        """Run a python-pkcs11 ``script`` in a child process (``sys.argv[1:]`` = ``args``,
        ``LIB`` = the library path); its stdout. The child's logins end with it."""
        prelude = (
            f"import sys, pkcs11\nfrom pkcs11 import Attribute, KeyType\nLIB = {self.library!r}\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", prelude + script, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise AssertionError(f"pkcs11 helper script failed: {done.stderr[-2000:]}")
        return done.stdout

    def make_key(
        self,
        token: str,
        label: str,
        *,
        extractable: bool = False,
        sensitive: bool = True,
        key_type: str = "AES",
        bits: int = 256,
    ) -> None:
        """Generate a token key (in a child process) the way an operator might."""
        self.run(
            "s = pkcs11.lib(LIB).get_token(token_label=sys.argv[1]).open("
            "user_pin=sys.argv[2], rw=True)\n"
            "s.generate_key(getattr(KeyType, sys.argv[3]), int(sys.argv[4]), label=sys.argv[5],"
            " store=True, template={Attribute.EXTRACTABLE: sys.argv[6] == '1',"
            " Attribute.SENSITIVE: sys.argv[7] == '1'})\n"
            "s.close()\n",
            token,
            TOKENS[token],
            key_type,
            str(bits),
            label,
            "1" if extractable else "0",
            "1" if sensitive else "0",
        )


_INSTANCE: SoftHsm | None = None


def init_tokens(directory: Path) -> SoftHsm:
    """A SoftHSM2 of its own under ``directory`` (tokens/, softhsm2.conf) holding fresh
    :data:`TOKENS`, for child processes given its ``conf`` (``SOFTHSM2_CONF``); this
    process does not load it (``slots`` is empty)."""
    library, util = require_softhsm()
    (directory / "tokens").mkdir(mode=0o700, parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\n"
        "objectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    for label, pin in TOKENS.items():
        subprocess.run(
            [util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", SO_PIN],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
    return SoftHsm(directory, conf, library, {})


def softhsm() -> SoftHsm:
    """The process's private SoftHSM2 (made on first call; sets ``SOFTHSM2_CONF``)."""
    global _INSTANCE
    if _INSTANCE is not None:
        return _INSTANCE
    library, util = require_softhsm()
    import pkcs11

    if library in pkcs11._loaded:
        raise AssertionError(
            "SoftHSM2 was loaded in this process before tests/softhsm_helpers.softhsm(); "
            "its tokens would not be the tests' own"
        )
    directory = Path(tempfile.mkdtemp(prefix="qimem-softhsm-"))
    conf = init_tokens(directory).conf
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read by SoftHSM2 at C_Initialize
    lib = pkcs11.lib(library)
    slots = {
        slot.get_token().label: int(slot.slot_id) for slot in lib.get_slots(token_present=True)
    }
    missing = set(TOKENS) - set(slots)
    assert not missing, f"SoftHSM2 did not list the tokens {missing}"
    _INSTANCE = SoftHsm(directory, conf, library, {k: slots[k] for k in TOKENS})
    import atexit

    atexit.register(shutil.rmtree, directory, True)
    return _INSTANCE
