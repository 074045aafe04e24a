"""Request and audit record ids (qimem.random_ids): CSPRNG bytes read in bulk, never the
same in two processes, even when a process forks with bytes left in its buffer."""

from __future__ import annotations

import os
import signal
import threading
import uuid

from qimem import random_ids


def test_ids_have_their_shapes_and_do_not_repeat() -> None:
    hexes = {random_ids.hex_id() for _ in range(3000)}  # spans several 4 KiB reads
    assert len(hexes) == 3000 and all(len(h) == 32 for h in hexes)
    for text in (random_ids.uuid4_text() for _ in range(300)):
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text


def test_a_forked_child_never_reuses_its_parents_bytes() -> None:
    random_ids.random_16()  # the parent's buffer now holds 255 unread ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids, to the parent, then exit without cleanup
        os.close(read)
        os.write(write, b"".join(random_ids.random_16() for _ in range(300)))
        os._exit(0)
    os.close(write)
    child = b""
    while chunk := os.read(read, 65536):
        child += chunk
    os.close(read)
    os.waitpid(pid, 0)
    parent = {random_ids.random_16() for _ in range(300)}
    children = {child[i : i + 16] for i in range(0, len(child), 16)}
    assert len(children) == 300 and not parent & children


def test_a_fork_while_another_thread_holds_the_lock_does_not_deadlock_the_child() -> None:
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with random_ids._lock:  # noqa: SLF001 (the lock a fork may catch held)
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)  # a deadlocked child dies (and fails the test) instead of hanging
        random_ids.hex_id()  # would block forever on the parent's held lock
        os._exit(0)
    release.set()
    holder.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
