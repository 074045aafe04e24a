"""qimem as a real subprocess for the tests: ``qimem serve`` started on a free port
(``--port 0``), its stderr in a log file, the URL read from its "serving on" line, stopped
with SIGTERM (:class:`ServeProcess`); any other command run to completion
(:func:`qimem_process`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 30.0
QIMEM_ARGV = [sys.executable, "-c", "from qimem.cli import main; main()"]


def home_env(home: Path, **variables: str) -> dict[str, str]:
    """This process's environment without ``QIMEM_*``, with ``QIMEM_HOME=home`` and
    ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env.update(QIMEM_HOME=str(home), **variables)
    return env


def qimem_process(
    home: Path, *args: str, stdin: str = "", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``qimem ARGS`` in its own process (inheriting this one's umask) with
    ``QIMEM_HOME=home`` and no other ``QIMEM_*`` variable; run from a directory above
    ``home`` (not the repo root, whose ./qimem would shadow the installed package)."""
    return subprocess.run(
        [*QIMEM_ARGV, *args],
        env=home_env(home),
        cwd=next(p for p in home.parents if p.is_dir()),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def serve_env_for(workdir: Path, root_key_b64: str) -> dict[str, str]:
    """This process's environment without ``QIMEM_*``, with ``QIMEM_HOME=workdir/home``,
    the root key in ``QIMEM_ROOT_KEY`` and a SQLite store ``workdir/qimem.db``."""
    return home_env(
        workdir / "home",
        QIMEM_ROOT_KEY=root_key_b64,
        QIMEM_STORE=f"sqlite:///{workdir / 'qimem.db'}",
    )


class ServeProcess:
    """``qimem serve --port 0 [ARGS]``; ``insecure`` adds ``--insecure-no-auth``;
    ``preexec_fn`` runs in the child before exec (e.g. to raise its core limit).

    Run with a cwd that is not the repo root (whose ./qimem would shadow the installed
    package): ``workdir`` is the test's own directory.
    """

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str],
        *extra: str,
        name: str = "serve",
        insecure: bool = True,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        mode = ["--insecure-no-auth"] if insecure else []
        self.proc = subprocess.Popen(
            [*QIMEM_ARGV, "serve", *mode, "--port", "0", *extra],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            preexec_fn=preexec_fn,  # noqa: PLW1509 - the tests' own setup (rlimits) only
        )
        self.url = ""
        self.port = 0

    def wait_ready(self) -> ServeProcess:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"serving on (http://(?:127\.0\.0\.1|0\.0\.0\.0):(\d+))", self.log())
            if found:
                self.url, self.port = found.group(1), int(found.group(2))
                return self
            if self.proc.poll() is not None:
                pytest.fail(f"qimem serve exited {self.proc.returncode}: {self.log()}")
            time.sleep(0.05)
        pytest.fail(f"qimem serve did not start: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")

    def stop(self) -> int:
        """SIGTERM and wait (killed after 20 s); returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


# ---- qimem serve --workers N: the master's worker processes, read from /proc ----------


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command (state, parent, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


def child_pids(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat(entry.name)
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (itself, not its children)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def socket_owners(server_port: int, pids: list[int]) -> dict[int, int]:
    """For each connection accepted on ``server_port`` (loopback, IPv4) by one of ``pids``:
    the client's port -> the pid holding the accepted socket."""
    owner_of_inode: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    owner_of_inode[target[8:-1]] = pid
        except OSError:
            continue
    owners: dict[int, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        if local_port == server_port and remote_port and fields[9] in owner_of_inode:
            owners[remote_port] = owner_of_inode[fields[9]]
    return owners


def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "") -> object:
    """Poll ``condition`` every 50 ms until it returns something true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what or condition}")
