"""Transit suite: ``POST /v1/transit/encrypt/k`` (the Vault-compatible facade, issue 17)
against ``POST /v1/security/encrypt`` on the same ``qimem serve`` (64-byte plaintext, one
AES-256-GCM key, ``--insecure-no-auth`` so both pay the same for authentication: none).

Both paths end in the same ``qimem.services.encrypt`` call; the facade adds Vault's
response envelope (a request id) and the ``vault:v1:`` ciphertext. wrk drives each path
in alternating rounds (as :mod:`bench.http` does). Issue 17's target: the facade >= 0.9x
qimem's own endpoint.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.http import THREADS, _combine, _post, _start_qimem, _stop, _wrk
from bench.servers import free_port, wait_healthy

TARGET = 0.9
_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{body}'
"""


def run(quick: bool) -> list[dict[str, Any]]:
    """One row: the facade's req/s over qimem's own endpoint's, at 16 connections."""
    case = "Transit facade encrypt via HTTP vs /v1/security/encrypt, 64 B, 16 conns"
    if shutil.which("wrk") is None:
        skipped = "wrk is not installed (apt-get install -y wrk); suite skipped"
        return [{"case": case, "metric": "req/s", "qimem": None, "ok": None, "notes": skipped}]
    seconds = 4.0 if quick else 15.0
    rounds = 2 if quick else 3
    plaintext = base64.b64encode(b"x" * 64).decode()
    with tempfile.TemporaryDirectory(prefix="qimem-bench-transit-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        proc = _start_qimem(workdir, port)
        try:
            wait_healthy(port, proc)
            _post(port, "/v1/security/keys", {"name": "k"})
            paths = {
                "transit": ("/v1/transit/encrypt/k", {"plaintext": plaintext}),
                "security": ("/v1/security/encrypt", {"key": "k", "plaintext": plaintext}),
            }
            urls: dict[str, tuple[str, Path]] = {}
            for name, (path, body) in paths.items():
                script = workdir / f"{name}.lua"
                script.write_text(_SCRIPT.format(body=json.dumps(body)))
                urls[name] = (f"http://127.0.0.1:{port}{path}", script)
                _wrk(urls[name][0], script, 16, 1)  # warm-up
            samples: dict[str, list[dict[str, float]]] = {"transit": [], "security": []}
            for _ in range(rounds):
                for name in ("security", "transit"):
                    url, script = urls[name]
                    samples[name].append(_wrk(url, script, 16, seconds / rounds))
        finally:
            _stop(proc)
    ours, peer = _combine(samples["transit"]), _combine(samples["security"])
    ratio = ours["rps"] / peer["rps"] if peer["rps"] else None
    errors = ours["non2xx"] + ours["socket_errors"] + peer["non2xx"] + peer["socket_errors"]
    return [
        {
            "case": case,
            "metric": "req/s",
            "qimem": round(ours["rps"]),
            "peer_name": "POST /v1/security/encrypt (same server)",
            "peer": round(peer["rps"]),
            "ratio": ratio,
            "target": f">= {TARGET}",
            "ok": ratio is not None and ratio >= TARGET and errors == 0,
            "notes": (
                f"p99 {ours['p99_ms']:.1f} ms (security {peer['p99_ms']:.1f} ms); errors "
                f"{errors}; {seconds:.0f} s per path in {rounds} rounds, {THREADS} threads"
            ),
        }
    ]
