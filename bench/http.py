"""HTTP suite: ``POST /v1/security/encrypt`` (64-byte plaintext), ``/sign`` (Ed25519) and
``/mac`` (HMAC-SHA-256) of 64-byte messages, under ``wrk``.

Peer: a bare Falcon + waitress endpoint doing the same work (parse the JSON body, decode
base64, one ``AESGCM.encrypt`` with a fresh nonce, one ``Ed25519PrivateKey.sign`` or one
``HMAC(key, SHA256())`` over the message, answer base64 JSON), same thread count, same
waitress settings, measured in the same run. qimem answers with its own signature and tag
format (the header naming the key version), as users get by default. qimem is the real ``qimem serve
--insecure-no-auth`` as users run it (SQLite store, default access log on, written to a
file). When ``taskset`` exists both servers run pinned to CPU 0 and wrk to CPU 1 (on two
cores this cut p99 noticeably and steadied the numbers).

Cases: 16 and 64 connections for 15 s per server (``--quick``: 3 s), in three alternating
rounds of 5 s (quick: one round) so load from other processes hits both servers alike;
target ≥ 0.7× the bare endpoint's requests/s with zero non-2xx; the worst round's p99
latency is reported. Full runs add a 60-second
soak at 64 connections: zero errors and RSS at the end within 10% of RSS after warm-up.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.servers import free_port, wait_healthy

PLAINTEXT = os.urandom(64)
THREADS = 4
PEER = "bare Falcon+waitress AESGCM"
#: (case label, path, body of the qimem request, peer name, key to create in qimem).
CASES: tuple[tuple[str, str, dict[str, Any], str, dict[str, Any]], ...] = (
    (
        "POST /v1/security/encrypt 64 B",
        "/v1/security/encrypt",
        {"key": "bench", "plaintext": base64.b64encode(PLAINTEXT).decode()},
        PEER,
        {"name": "bench"},
    ),
    (
        "POST /v1/security/sign ed25519 64 B",
        "/v1/security/sign",
        {"key": "bench-sign", "message": base64.b64encode(PLAINTEXT).decode()},
        "bare Falcon+waitress Ed25519 sign",
        {"name": "bench-sign", "algorithm": "ed25519"},
    ),
    (
        "POST /v1/security/mac hmac-sha256 64 B",
        "/v1/security/mac",
        {"key": "bench-mac", "data": base64.b64encode(PLAINTEXT).decode()},
        "bare Falcon+waitress HMAC-SHA256",
        {"name": "bench-mac", "algorithm": "hmac-sha256"},
    ),
)

#: The bare peer's Falcon app (``app``): the AESGCM encrypt route and a health check. Its
#: scripts append how they serve it (one process here, pre-forked in bench/workers.py).
BARE_APP = r"""
import base64, json, logging, os, sys
import falcon, waitress
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.hmac import HMAC

logging.getLogger("waitress.queue").setLevel(logging.ERROR)
aead = AESGCM(AESGCM.generate_key(256))
signer = Ed25519PrivateKey.generate()
mac_key = os.urandom(32)


class Encrypt:
    def on_post(self, req, resp):
        body = json.loads(req.bounded_stream.read())
        nonce = os.urandom(12)
        sealed = aead.encrypt(nonce, base64.b64decode(body["plaintext"]), None)
        resp.media = {"envelope": base64.b64encode(nonce + sealed).decode()}


class Sign:
    def on_post(self, req, resp):
        body = json.loads(req.bounded_stream.read())
        signature = signer.sign(base64.b64decode(body["message"]))
        resp.media = {"signature": base64.b64encode(signature).decode()}


class Mac:
    def on_post(self, req, resp):
        body = json.loads(req.bounded_stream.read())
        h = HMAC(mac_key, SHA256())
        h.update(base64.b64decode(body["data"]))
        resp.media = {"tag": base64.b64encode(h.finalize()).decode()}


class Health:
    def on_get(self, req, resp):
        resp.media = {"status": "ok"}


app = falcon.App()
app.add_route("/v1/security/encrypt", Encrypt())
app.add_route("/v1/security/sign", Sign())
app.add_route("/v1/security/mac", Mac())
app.add_route("/healthz", Health())
"""
_BARE_SERVER = (
    BARE_APP
    + r"""
waitress.serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=int(sys.argv[2]),
               ident="bare", asyncore_use_poll=True, _quiet=True)
"""
)

_WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{body}'
"""


def pin(cpu: int | str) -> list[str]:
    """``taskset -c CPU`` (a CPU or a list such as ``"0-1"``) where it can pin, else nothing."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu)]
    return []


def _post(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    if response.status >= 300:
        raise RuntimeError(f"{path} answered {response.status}: {data}")
    return data


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _to_ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _wrk(url: str, script: Path, connections: int, seconds: float) -> dict[str, float]:
    """Run wrk; return req/s, p99 ms, non-2xx and socket-error counts."""
    cmd = [
        *pin(1),
        "wrk",
        "-t1" if pin(1) else "-t2",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if rps is None or p99 is None:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    return {
        "rps": float(rps.group(1)),
        "p99_ms": _to_ms(p99.group(1), p99.group(2)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in socket_errors.groups()) if socket_errors else 0,
    }


def _combine(runs: list[dict[str, float]]) -> dict[str, float]:
    """Equal-length rounds: mean req/s, the worst p99, summed error counts."""
    return {
        "rps": sum(r["rps"] for r in runs) / len(runs),
        "p99_ms": max(r["p99_ms"] for r in runs),
        "non2xx": sum(r["non2xx"] for r in runs),
        "socket_errors": sum(r["socket_errors"] for r in runs),
    }


def _start_qimem(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QIMEM_")}
    env["QIMEM_HOME"] = str(workdir / "home")
    env["QIMEM_STORE"] = f"sqlite:///{workdir / 'keys.db'}"
    env["QIMEM_ROOT_KEY"] = base64.b64encode(os.urandom(32)).decode()
    log = (workdir / "qimem-serve.log").open("wb")
    cmd = [
        *pin(0),
        sys.executable,
        "-c",
        "from qimem.cli import main; main()",
        "serve",
        "--insecure-no-auth",
        "--port",
        str(port),
        "--threads",
        str(THREADS),
    ]
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=log)


def _start_bare(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    cmd = [*pin(0), sys.executable, "-c", _BARE_SERVER, str(port), str(THREADS)]
    return subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run(quick: bool) -> list[dict[str, Any]]:
    """The HTTP suite's rows (see the module docstring)."""
    if shutil.which("wrk") is None:
        return [
            {
                "case": "encrypt 64 B",
                "metric": "req/s",
                "qimem": None,
                "ok": None,
                "notes": "wrk is not installed (apt-get install -y wrk); suite skipped",
            }
        ]
    seconds = 3.0 if quick else 15.0
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qimem-bench-http-") as tmp:
        workdir = Path(tmp)
        qport, bport = free_port(), free_port()
        qimem_proc = _start_qimem(workdir, qport)
        bare_proc = _start_bare(workdir, bport)
        try:
            wait_healthy(qport, qimem_proc)
            wait_healthy(bport, bare_proc)
            rounds = 1 if quick else 3
            for label, path, request, peer, key in CASES:
                _post(qport, "/v1/security/keys", key)
                script = workdir / f"{path.rsplit('/', 1)[1]}.lua"
                script.write_text(_WRK_SCRIPT.format(body=json.dumps(request)))
                qurl = f"http://127.0.0.1:{qport}{path}"
                burl = f"http://127.0.0.1:{bport}{path}"
                for url in (qurl, burl):  # warm-up: imports, key cache, allocator
                    _wrk(url, script, 16, 1)
                for connections in (16, 64):
                    # Alternate the two servers in rounds so a burst of load from other
                    # processes on the machine hits both alike.
                    samples: dict[str, list[dict[str, float]]] = {"bare": [], "qimem": []}
                    for _ in range(rounds):
                        samples["bare"].append(_wrk(burl, script, connections, seconds / rounds))
                        samples["qimem"].append(_wrk(qurl, script, connections, seconds / rounds))
                    rows.append(
                        _row(f"{label}, {connections} conns", peer, samples, seconds, rounds)
                    )

            if not quick:
                script = workdir / "encrypt.lua"
                qurl = f"http://127.0.0.1:{qport}/v1/security/encrypt"
                rows.append(_soak(qimem_proc.pid, qurl, script))
        finally:
            _stop(qimem_proc)
            _stop(bare_proc)
        log = (workdir / "qimem-serve.log").read_text("utf-8", errors="replace")
        if "Traceback" in log:
            raise RuntimeError("qimem serve logged a traceback during the benchmark")
    return rows


def _row(
    case: str, peer: str, samples: dict[str, list[dict[str, float]]], seconds: float, rounds: int
) -> dict[str, Any]:
    bare, ours = _combine(samples["bare"]), _combine(samples["qimem"])
    ratio = ours["rps"] / bare["rps"] if bare["rps"] else None
    errors = ours["non2xx"] + ours["socket_errors"]
    return {
        "case": case,
        "metric": "req/s",
        "qimem": round(ours["rps"]),
        "peer_name": peer,
        "peer": round(bare["rps"]),
        "ratio": ratio,
        "target": ">= 0.7",
        "ok": ratio is not None and ratio >= 0.7 and errors == 0,
        "notes": (
            f"p99 {ours['p99_ms']:.1f} ms (bare {bare['p99_ms']:.1f} ms); "
            f"non-2xx {ours['non2xx']}, socket errors {ours['socket_errors']}; "
            f"{seconds:.0f} s in {rounds} round(s), {THREADS} threads"
        ),
    }


def _soak(pid: int, url: str, script: Path) -> dict[str, Any]:
    """60 s at 64 connections after a 10 s warm-up; RSS growth and errors."""
    _wrk(url, script, 64, 10)
    warm = _rss_kib(pid)
    result = _wrk(url, script, 64, 60)
    end = _rss_kib(pid)
    growth = end / warm
    errors = result["non2xx"] + result["socket_errors"]
    return {
        "case": "soak: encrypt, 64 conns, 60 s",
        "metric": "RSS end / warm",
        "qimem": round(growth, 3),
        "target": "<= 1.10, 0 errors",
        "ok": growth <= 1.10 and errors == 0,
        "notes": (
            f"RSS {warm / 1024:.1f} MiB after warm-up, {end / 1024:.1f} MiB at end; "
            f"{result['rps']:.0f} req/s, p99 {result['p99_ms']:.1f} ms, errors {errors}"
        ),
    }
