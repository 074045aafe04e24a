"""A private PostgreSQL server for tests that stop, restart or cut off their database.

The shared server (``QIMEM_TEST_POSTGRES_URL``) must never be restarted: other tests use it
in parallel. :class:`PgInstance` runs ``initdb`` in a fresh temp directory and ``pg_ctl``
on a free loopback port, with its socket in that directory and ``fsync=off`` (throwaway
data). As root, both run as the ``postgres`` user (``runuser``), which owns the directory.

:class:`TcpProxy` sits between a client and a server on loopback and can cut the link:
drop every open connection and hold new ones open without answering (a black hole), or
refuse new ones, until :meth:`TcpProxy.restore`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import _in_ci

PG_USER = "postgres"


def find_pg_bin() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl`` (Debian's versioned dir or PATH)."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(candidate, "pg_ctl"), os.X_OK):
            return Path(candidate)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def require_pg_bin() -> Path:
    """The PostgreSQL binaries, or skip (fail under CI=true, like every postgres test)."""
    problem = None
    pg_bin = find_pg_bin()
    if pg_bin is None or not (pg_bin / "initdb").exists():
        problem = "a private PostgreSQL needs initdb and pg_ctl (postgresql server binaries)"
    elif os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            problem = "a private PostgreSQL started as root needs the 'postgres' OS user"
    if problem:
        if _in_ci():
            pytest.fail(problem + " (CI=true: PostgreSQL tests must not be skipped)")
        pytest.skip(problem)
    assert pg_bin is not None
    return pg_bin


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgInstance:
    """A throwaway PostgreSQL cluster: :meth:`start`, :meth:`stop`, :meth:`restart`,
    :meth:`destroy`. Its superuser is ``postgres`` with trust authentication."""

    def __init__(self, pg_bin: Path) -> None:
        self.pg_bin = pg_bin
        # Not under pytest's tmp_path: its 0700 parents would keep the postgres user out.
        self.root = Path(tempfile.mkdtemp(prefix="qimem-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        try:
            if self._as_root:
                shutil.chown(self.root, user=PG_USER)
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", PG_USER, "--no-sync")
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        command = [str(self.pg_bin / tool), *args]
        if self._as_root:
            command = ["runuser", "-u", PG_USER, "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=self.root
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr[-2000:]}")

    def _options(self) -> str:
        return (
            # fsync=off survives a killed server (the OS keeps the pages), not a power cut;
            # synchronous_commit stays on: -m immediate must not lose acknowledged commits.
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=100 -c log_timezone=UTC"
        )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", self._options(),
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m MODE -w``: returns once the server accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", self._options(),
                  "-m", mode, "-w", "-t", "60", "restart")  # fmt: skip

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, database: str = "postgres", *, port: int | None = None, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        url = f"postgresql+psycopg://{PG_USER}@127.0.0.1:{port or self.port}/{database}"
        return f"{url}?{query}" if query else url

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create database ``name`` (a copy of ``template`` if given); returns its URL."""
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres", autocommit=True
        ) as conn:
            copy = f' TEMPLATE "{template}"' if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{copy}')
        return self.url(name)

    def destroy(self) -> None:
        """Stop at once (if running) and remove the cluster's directory."""
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class TcpProxy:
    """A loopback TCP proxy to ``127.0.0.1:target_port`` whose link can be cut.

    * :meth:`blackhole`: every open connection is closed; new ones are accepted and held
      open, but nothing is forwarded and nothing answered (a client waits for its timeout).
    * :meth:`restore`: held connections are closed, new ones are forwarded again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._links: list[socket.socket] = []  # every socket of live forwarded pairs
        self._held: list[socket.socket] = []  # black-holed client connections
        self._cut = False
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._cut:
                    self._held.append(client)
                    continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()  # the server is down: the client sees the connection close
                continue
            upstream.settimeout(None)
            with self._lock:
                self._links += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                for sock in (src, dst):
                    if sock in self._links:
                        self._links.remove(sock)
                        sock.close()

    def blackhole(self) -> None:
        """Cut the link: close open connections, hold new ones without an answer."""
        with self._lock:
            self._cut = True
            links, self._links = self._links, []
        for sock in links:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def restore(self) -> None:
        """Forward new connections again; held ones are closed."""
        with self._lock:
            self._cut = False
            held, self._held = self._held, []
        for sock in held:
            sock.close()

    def close(self) -> None:
        self._closed = True
        self.blackhole()
        self.restore()
        self._listener.close()
        self._acceptor.join(5)


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")
