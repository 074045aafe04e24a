"""A real OpenLDAP ``slapd`` for the tests: its own slapd.conf, schema includes (core,
cosine, inetorgperson, nis), MDB data directory and LDIF, on free loopback ports; plain LDAP
(with StartTLS when ``tls``) and LDAPS with a certificate from a throw-away CA
(:func:`helpers_tls.make_test_ca`). Started and stopped by the test session
(:class:`Slapd`, a context manager); :meth:`Slapd.pause` / :meth:`Slapd.resume` freeze the
process (SIGSTOP) to play a directory that stops answering.

The directory (base ``dc=example,dc=org``):

* ``ou=people``: ``alice`` (in groups ``kim-admins`` and ``crypto-users``), ``bob`` (in
  ``crypto-users``), ``carol`` (no group), ``dave`` (no group); passwords :func:`password_of`;
* ``ou=groups``: ``groupOfNames`` entries with ``member`` DNs;
* ``ou=services``: ``cn=qimem-reader``, the service account of search-then-bind
  (password :data:`READER_PASSWORD`), allowed to read people and groups.

``allow bind_anon_dn`` is on: as in many real directories, a bind with a DN and an *empty*
password succeeds as an anonymous ("unauthenticated") bind. A login provider must refuse
empty passwords itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from helpers_tls import make_test_ca

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"
SCHEMA = Path("/etc/ldap/schema")
MODULES = Path("/usr/lib/ldap")
BASE = "dc=example,dc=org"
PEOPLE = f"ou=people,{BASE}"
GROUPS = f"ou=groups,{BASE}"
READER_DN = f"cn=qimem-reader,ou=services,{BASE}"
READER_PASSWORD = "reader-Secret-4711"  # noqa: S105 (a test directory's password)
USERS = {"alice": ["kim-admins", "crypto-users"], "bob": ["crypto-users"], "carol": [], "dave": []}


def available() -> bool:
    """Whether slapd, slapadd and the schema files are installed."""
    return (
        os.access(SLAPD, os.X_OK)
        and os.access(SLAPADD, os.X_OK)
        and (SCHEMA / "inetorgperson.schema").exists()
    )


def password_of(uid: str) -> str:
    """The directory password of ``uid``."""
    return f"dir-{uid}-Pass-{len(uid) * 7}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ldif() -> str:
    entries = [
        f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people",
        f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups",
        f"dn: ou=services,{BASE}\nobjectClass: organizationalUnit\nou: services",
        f"dn: {READER_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: qimem-reader\nuserPassword: {READER_PASSWORD}",
    ]
    for uid in USERS:
        entries.append(
            f"dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid.title()}\n"
            f"sn: {uid.title()}\nmail: {uid}@example.org\nuserPassword: {password_of(uid)}"
        )
    groups: dict[str, list[str]] = {}
    for uid, names in USERS.items():
        for name in names:
            groups.setdefault(name, []).append(uid)
    groups["empty-group"] = []
    for name, members in groups.items():
        member_lines = "".join(f"\nmember: uid={m},{PEOPLE}" for m in members) or (
            f"\nmember: {READER_DN}"  # groupOfNames needs a member
        )
        entries.append(
            f"dn: cn={name},{GROUPS}\nobjectClass: groupOfNames\ncn: {name}{member_lines}"
        )
    return "\n\n".join(entries) + "\n"


class Slapd:
    """One private slapd: ``url`` (ldap://, StartTLS-capable when ``tls``), ``ldaps_url``
    (when ``tls``), ``ca_file`` (the CA that signed its certificate)."""

    def __init__(self, workdir: Path, *, tls: bool = False) -> None:
        self.workdir = Path(workdir)
        self.tls = tls
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.ldaps_url = f"ldaps://127.0.0.1:{self.tls_port}" if tls else None
        self.ca_file: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._conf = self.workdir / "slapd.conf"
        self._log = self.workdir / "slapd.log"

    def _write_config(self) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        lines = [f"include {SCHEMA / n}.schema" for n in ("core", "cosine", "inetorgperson", "nis")]
        lines += [
            f"modulepath {MODULES}",
            "moduleload back_mdb",
            f"pidfile {self.workdir / 'slapd.pid'}",
            f"argsfile {self.workdir / 'slapd.args'}",
            "allow bind_anon_dn",
        ]
        if self.tls:
            self.ca_file, cert, key = make_test_ca(self.workdir / "tls")
            lines += [
                f"TLSCACertificateFile {self.ca_file}",
                f"TLSCertificateFile {cert}",
                f"TLSCertificateKeyFile {key}",
            ]
        lines += [
            "database mdb",
            "maxsize 16777216",
            f'suffix "{BASE}"',
            f'rootdn "cn=admin,{BASE}"',
            f"directory {data}",
            "access to attrs=userPassword by anonymous auth by self read by * none",
            f'access to * by dn.exact="{READER_DN}" read by users read by * none',
        ]
        self._conf.write_text("\n".join(lines) + "\n")

    def start(self) -> Slapd:
        """Write the config, load the LDIF (slapadd) on first start, start slapd and wait
        until it accepts connections."""
        if not (self.workdir / "data" / "data.mdb").exists():
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._write_config()
            ldif = self.workdir / "data.ldif"
            ldif.write_text(_ldif())
            subprocess.run(
                [SLAPADD, "-f", str(self._conf), "-l", str(ldif)],
                check=True,
                capture_output=True,
                timeout=60,
            )
        urls = self.url + "/" + (f" {self.ldaps_url}/" if self.ldaps_url else "")
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                [SLAPD, "-f", str(self._conf), "-h", urls, "-d", "0"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"slapd exited: {self._log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("slapd did not start listening")

    def stop(self) -> None:
        """Stop slapd (SIGTERM, then SIGKILL); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def pause(self) -> None:
        """Freeze slapd: connections are accepted by the kernel, nothing answers."""
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Slapd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_slapd(workdir: Path, *, tls: bool = False) -> Iterator[Slapd]:
    """A started :class:`Slapd` in ``workdir``, stopped afterwards."""
    with Slapd(workdir, tls=tls) as server:
        yield server


def search_options(server: Slapd, **extra: object) -> dict[str, object]:
    """``ldap`` provider options for search-then-bind with the service account (the
    password given inline: what the CLI puts there after reading ``bind_password_file``)."""
    return {
        "url": server.url,
        "bind_dn": READER_DN,
        "bind_password": READER_PASSWORD,
        "user_search_base": PEOPLE,
        "user_filter": "(&(objectClass=inetOrgPerson)(uid={username}))",
        "group_search_base": GROUPS,
        "timeout": 2,
        **extra,
    }


def template_options(server: Slapd, **extra: object) -> dict[str, object]:
    """``ldap`` provider options for a DN template (bind as the user directly)."""
    return {
        "url": server.url,
        "user_dn_template": f"uid={{username}},{PEOPLE}",
        "group_search_base": GROUPS,
        "timeout": 2,
        **extra,
    }
