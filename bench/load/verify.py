"""The final pass: every ciphertext obtained decrypted once more through the API."""

from __future__ import annotations

import base64
import hashlib
import threading
import time

from bench.load.common import Record, Target, Verification
from bench.load.driver import _Client


def verify(
    target: Target, records: list[Record], connections: int = 2, server: int = -1
) -> Verification:
    """Decrypt every record once more through the API (batches) and compare the plaintext,
    on ``target``'s last server by default (the one most connections did not use)."""
    result = Verification(checked=len(records))
    batches: list[list[Record]] = []
    batch: list[Record] = []
    size = 0
    for record in records:
        if batch and (len(batch) >= 500 or size + len(record.envelope) > 400_000):
            batches.append(batch)
            batch, size = [], 0
        batch.append(record)
        size += len(record.envelope) + 100
    if batch:
        batches.append(batch)

    lock = threading.Lock()
    started = time.monotonic()

    def worker(mine: list[list[Record]]) -> None:
        client = _Client(target, server % len(target.urls), [], 0)
        client.login()
        for items in mine:
            body = {
                "items": [
                    {"envelope": r.envelope} | ({"aad": r.aad} if r.aad is not None else {})
                    for r in items
                ]
            }
            status, data = client._json("verify", "/v1/security/decrypt", body, client.token)
            verified = corrupted = 0
            if status == 200 and len(data.get("items", [])) == len(items):
                for record, answer in zip(items, data["items"]):
                    if "plaintext" not in answer:
                        continue  # lost
                    got = hashlib.sha256(base64.b64decode(answer["plaintext"])).digest()
                    if got == record.digest:
                        verified += 1
                    else:
                        corrupted += 1
            with lock:
                if status:
                    result.statuses[status] += 1
                else:
                    result.conn_errors += 1
                result.verified += verified
                result.corrupted += corrupted
                result.lost += len(items) - verified - corrupted
        client.conn.close()

    threads = [
        threading.Thread(target=worker, args=(batches[i::connections],)) for i in range(connections)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.monotonic() - started
    return result
