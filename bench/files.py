"""Files suite: ``qimem encrypt/decrypt`` (real processes) vs ``age``, ``cp`` and raw loops.

Cases (issue 3, "Performance"; full run sizes, ``--quick`` uses small ones):

* **cpu**: 1 GiB from the page cache, output discarded (stdout → /dev/null), one job:
  ``qimem encrypt`` vs ``age``, and vs a raw Python loop (64 KiB reads, AES-256-GCM, writes)
  run as a process too. Decrypt likewise.
* **jobs 2**: the same single file with ``--jobs 2`` written to tmpfs (/dev/shm), age
  writing to the same place.
* **disk**: 1 GiB disk to disk, ``qimem encrypt`` (durable: fsync + rename) vs ``cp`` (not
  durable) and, for information, ``cp`` + ``sync``.
* **rss**: peak RSS of encrypt and decrypt on 1 GiB (and 4 GiB in the full run).
* **small**: 10,000 × 4 KiB files with ``--jobs 2`` vs ``age`` in a shell loop and vs a raw
  durable Python loop (temp + fsync + rename per file). Fresh directories every run.
* **segment**: stream throughput in-process per segment size (16 KiB .. 1 MiB), which is
  how the default segment size was chosen.

Every timed case alternates qimem and its peer and keeps the best run of each (the machine
is shared and noisy). When matplotlib is importable a chart goes to
``docs/files-throughput.png``; without it the suite still runs.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.core import make_row

SUITE = "files"
GIB = 1 << 30
MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "docs" / "files-throughput.png"
QIMEM = str(Path(sys.executable).with_name("qimem"))

RAW_LOOP = r"""
import os, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
aead = AESGCM(os.urandom(32))
src = open(sys.argv[1], "rb", buffering=0)
out = open(sys.stdout.fileno(), "wb", buffering=0, closefd=False)
prefix = os.urandom(7)
i = 0
while True:
    chunk = src.read(65536)
    if not chunk:
        break
    out.write(aead.encrypt(prefix + i.to_bytes(5, "big"), chunk, None))
    i += 1
"""

# The ceiling for --jobs 2 into tmpfs: no crypto at all, N forked processes copying disjoint
# halves of the file with pread/pwrite in 256 KiB pieces (qimem's segment size) into one
# output file. Writes to one file take the inode's lock in the kernel, so they serialize.
RAW_SPLIT_COPY = r"""
import os, sys
src, dst, procs = sys.argv[1], sys.argv[2], int(sys.argv[3])
size = os.path.getsize(src)
fin = os.open(src, os.O_RDONLY)
fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.ftruncate(fout, size)
piece = 256 * 1024
share = -(-size // procs // piece) * piece
children = []
for i in range(procs):
    pid = os.fork()
    if pid == 0:
        for off in range(i * share, min(size, (i + 1) * share), piece):
            os.pwrite(fout, os.pread(fin, piece, off), off)
        os._exit(0)
    children.append(pid)
for pid in children:
    _, status = os.waitpid(pid, 0)
    assert status == 0
"""

RAW_DURABLE = r"""
import os, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
aead = AESGCM(os.urandom(32))
src, dst = sys.argv[1], sys.argv[2]
for name in sorted(os.listdir(src)):
    with open(os.path.join(src, name), "rb") as fh:
        data = fh.read()
    nonce = os.urandom(12)
    tmp = os.path.join(dst, "." + name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, nonce + aead.encrypt(nonce, data, None))
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, os.path.join(dst, name + ".enc"))
dfd = os.open(dst, os.O_RDONLY)
os.fsync(dfd)
os.close(dfd)
"""


def _wall(argv: list[str] | str, *, stdin: Any = None, stdout: Any = None, env=None) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    subprocess.run(
        argv,
        stdin=stdin,
        stdout=stdout if stdout is not None else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        check=True,
        shell=isinstance(argv, str),
    )
    return time.perf_counter() - start


def _rss_mib(argv: list[str], *, stdin_path: str, env: dict[str, str]) -> float:
    """Peak RSS (MiB) of a process, from wait4's rusage."""
    with open(stdin_path, "rb") as fin:
        proc = subprocess.Popen(argv, stdin=fin, stdout=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[1]} failed with {proc.returncode}")
    return usage.ru_maxrss / 1024


def _best(sides: list[Callable[[], float]], rounds: int) -> list[float]:
    """Best (shortest) wall time of each side, alternating the order every round."""
    best = [float("inf")] * len(sides)
    for r in range(rounds):
        order = range(len(sides)) if r % 2 == 0 else reversed(range(len(sides)))
        for i in order:
            best[i] = min(best[i], sides[i]())
    return best


def _random_file(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        left = size
        block = os.urandom(4 * MIB)
        while left > 0:
            n = min(left, len(block))
            fh.write(block[:n])
            left -= n
            block = block[n:] + block[:n]  # cheap variety; content does not matter


class _Log:
    """A row list that prints each row as it arrives (a full run takes minutes)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = _PrintingList(rows)


class _PrintingList(list):  # type: ignore[type-arg]
    def __iadd__(self, more):  # type: ignore[no-untyped-def]
        for row in more:
            print(
                f"  files: {row['case']}: {row['qimem']} {row['metric']}"
                f" (peer {row['peer_name'] or '-'}: {row['peer']}, ratio {row['ratio']})",
                file=sys.stderr,
                flush=True,
            )
        return super().__iadd__(more)


def run(quick: bool) -> list[dict[str, Any]]:
    if shutil.which("age") is None or shutil.which("age-keygen") is None:
        print("bench files: age is not installed (apt-get install age); peers missing")
    size = 64 * MIB if quick else GIB
    rounds = 2 if quick else 3
    small_count = 500 if quick else 10_000
    work = Path(tempfile.mkdtemp(prefix="qimem-bench-files-", dir="/var/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="qimem-bench-", dir="/dev/shm"))
    env = dict(os.environ, QIMEM_HOME=str(work / "home"))
    env.pop("QIMEM_CONFIG", None)
    env.pop("QIMEM_STORE", None)
    rows: list[dict[str, Any]] = []
    chart: dict[str, dict[str, float]] = {}
    try:
        subprocess.run([QIMEM, "init"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            [QIMEM, "keys", "create", "--name", "bench"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        age = shutil.which("age") is not None
        recipient = ""
        if age:
            subprocess.run(
                ["age-keygen", "-o", str(work / "age.key")], check=True, capture_output=True
            )
            recipient = subprocess.run(
                ["age-keygen", "-y", str(work / "age.key")],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        big = work / "big.bin"
        _random_file(big, size)
        sealed = work / "big.bin.qimem"
        aged = work / "big.bin.age"
        subprocess.run(
            [QIMEM, "encrypt", "--key", "bench", str(big), "-o", str(sealed)], env=env, check=True
        )
        if age:
            subprocess.run(["age", "-r", recipient, "-o", str(aged), str(big)], check=True)
        label = f"{size // MIB} MiB"
        log = _Log(rows)
        rows = log.rows
        rows += _cpu(env, big, sealed, aged if age else None, recipient, work, rounds, label, chart)
        rows += _jobs2(
            env, big, sealed, aged if age else None, recipient, work, shm, rounds, label, chart
        )
        rows += _disk(env, big, work, rounds, label)
        rows += _rss(env, big, sealed, work, quick)
        rows += _small(env, work, recipient if age else None, small_count, rounds)
        rows += _segments(quick, chart)
        _chart(chart)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    return rows


def _cpu(env, big, sealed, aged, recipient, work, rounds, label, chart) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    size = big.stat().st_size
    mb = size / 1e6
    devnull = subprocess.DEVNULL

    def q_enc() -> float:
        with big.open("rb") as fin:
            return _wall([QIMEM, "encrypt", "--key", "bench"], stdin=fin, stdout=devnull, env=env)

    def q_dec() -> float:
        with sealed.open("rb") as fin:
            return _wall([QIMEM, "decrypt"], stdin=fin, stdout=devnull, env=env)

    def a_enc() -> float:
        return _wall(["age", "-r", recipient, str(big)], stdout=devnull)

    def a_dec() -> float:
        return _wall(["age", "-d", "-i", str(work / "age.key"), str(aged)], stdout=devnull)

    def raw() -> float:
        return _wall([sys.executable, "-c", RAW_LOOP, str(big)], stdout=devnull)

    def q_empty() -> float:
        with open(os.devnull, "rb") as fin:
            return _wall([QIMEM, "encrypt", "--key", "bench"], stdin=fin, stdout=devnull, env=env)

    def py_empty() -> float:
        return _wall([sys.executable, "-c", "import cryptography.hazmat.primitives.ciphers.aead"])

    rows = []
    if aged is not None:
        q, a, r = _best([q_enc, a_enc, raw], rounds)
    else:
        (q, r), a = _best([q_enc, raw], rounds), None
    start_q, start_py = _best([q_empty, py_empty], rounds + 2)
    rows.append(
        make_row(
            SUITE,
            "start-up: encrypt of empty stdin (time)",
            "s",
            start_q,
            "python -c 'import cryptography'",
            start_py,
            higher_is_better=False,
            notes="fixed cost per qimem process (imports, plugins, store)",
        )
    )
    if size >= 512 * MIB:  # on small inputs start-up noise swamps the difference
        rows.append(
            make_row(
                SUITE,
                f"encrypt {label}, 1 job, steady state",
                "MB/s",
                mb / max(q - start_q, 1e-3),
                "raw 64 KiB AESGCM loop",
                mb / max(r - start_py, 1e-3),
                notes="wall time minus each side's start-up; information only",
            )
        )
    chart.setdefault("encrypt, 1 job", {}).update(
        {"qimem": mb / q, **({"age": mb / a} if a else {}), "raw loop": mb / r}
    )
    if a:
        rows.append(
            make_row(
                SUITE,
                f"encrypt {label}, 1 job, →/dev/null",
                "MB/s",
                mb / q,
                "age",
                mb / a,
                target=1.0,
                notes="wall time incl. start-up",
            )
        )
    rows.append(
        make_row(
            SUITE,
            f"encrypt {label}, 1 job, →/dev/null",
            "MB/s",
            mb / q,
            "raw 64 KiB AESGCM loop (process)",
            mb / r,
            target=0.8,
            notes="wall time incl. start-up",
        )
    )
    if aged is not None:
        q, a = _best([q_dec, a_dec], rounds)
        chart.setdefault("decrypt, 1 job", {}).update({"qimem": mb / q, "age": mb / a})
        rows.append(
            make_row(
                SUITE,
                f"decrypt {label}, 1 job, →/dev/null",
                "MB/s",
                mb / q,
                "age -d",
                mb / a,
                target=1.0,
                notes="wall time incl. start-up",
            )
        )
    return rows


def _jobs2(
    env, big, sealed, aged, recipient, work, shm, rounds, label, chart
) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    if aged is None:
        return []
    mb = big.stat().st_size / 1e6
    out = shm / "out"

    def q_enc() -> float:
        return _wall(
            [
                QIMEM,
                "encrypt",
                "--key",
                "bench",
                str(big),
                "-o",
                str(out),
                "--jobs",
                "2",
                "--force",
                "--quiet",
            ],
            env=env,
        )

    def a_enc() -> float:
        return _wall(["age", "-r", recipient, "-o", str(out), str(big)])

    def q_dec() -> float:
        return _wall(
            [QIMEM, "decrypt", str(sealed), "-o", str(out), "--jobs", "2", "--force", "--quiet"],
            env=env,
        )

    def a_dec() -> float:
        return _wall(["age", "-d", "-i", str(work / "age.key"), "-o", str(out), str(aged)])

    def copy(procs: int) -> Callable[[], float]:
        return lambda: _wall([sys.executable, "-c", RAW_SPLIT_COPY, str(big), str(out), str(procs)])

    q, a, c1, c2 = _best([q_enc, a_enc, copy(1), copy(2)], rounds)
    rows = [
        make_row(
            SUITE,
            "tmpfs write ceiling: plain copy, no crypto, 2 processes",
            "MB/s",
            mb / c2,
            "age",
            mb / a,
            notes=(
                f"1 process: {mb / c1:,.0f} MB/s; no encryptor writing one file here can "
                "beat this ratio vs age; information only"
            ),
        ),
        make_row(
            SUITE,
            f"encrypt {label}, --jobs 2, →/dev/shm",
            "MB/s",
            mb / q,
            "age",
            mb / a,
            target=1.6,
            notes="single file split in segment ranges",
        ),
    ]
    chart.setdefault("encrypt, 2 jobs", {}).update({"qimem": mb / q, "age": mb / a})
    q, a = _best([q_dec, a_dec], rounds)
    rows.append(
        make_row(
            SUITE,
            f"decrypt {label}, --jobs 2, →/dev/shm",
            "MB/s",
            mb / q,
            "age -d",
            mb / a,
            target=1.6,
        )
    )
    chart.setdefault("decrypt, 2 jobs", {}).update({"qimem": mb / q, "age": mb / a})
    out.unlink(missing_ok=True)
    return rows


def _disk(env, big, work, rounds, label) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    target = work / "disk"
    target.mkdir()
    counter = [0]

    def fresh(suffix: str) -> Path:
        counter[0] += 1
        return target / f"{counter[0]}{suffix}"

    def q_enc() -> float:
        out = fresh(".qimem")
        t = _wall(
            [QIMEM, "encrypt", "--key", "bench", str(big), "-o", str(out), "--quiet"], env=env
        )
        out.unlink()
        return t

    def cp() -> float:
        out = fresh(".cp")
        t = _wall(["cp", str(big), str(out)])
        out.unlink()
        return t

    def cp_sync() -> float:
        out = fresh(".cps")
        t = _wall(f"cp {big} {out} && sync {out}")
        out.unlink()
        return t

    q, c, cs = _best([q_enc, cp, cp_sync], rounds)
    return [
        make_row(
            SUITE,
            f"encrypt {label} disk→disk (time)",
            "s",
            q,
            "cp",
            c,
            target=1.25,
            higher_is_better=False,
            notes="qimem fsyncs its output; cp does not",
        ),
        make_row(
            SUITE,
            f"encrypt {label} disk→disk (time)",
            "s",
            q,
            "cp + sync",
            cs,
            notes="same durability on both sides",
        ),
    ]


def _rss(env, big, sealed, work, quick) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    rows = []
    cases = [(big, sealed)]
    if not quick:
        big4 = work / "big4.bin"
        _random_file(big4, 4 * GIB)
        sealed4 = work / "big4.bin.qimem"
        subprocess.run(
            [QIMEM, "encrypt", "--key", "bench", str(big4), "-o", str(sealed4)], env=env, check=True
        )
        cases.append((big4, sealed4))
    for plain, enc in cases:
        label = f"{plain.stat().st_size // MIB} MiB"
        for op, argv, src in (
            ("encrypt", [QIMEM, "encrypt", "--key", "bench"], plain),
            ("decrypt", [QIMEM, "decrypt"], enc),
        ):
            rss = _rss_mib(argv, stdin_path=str(src), env=env)
            rows.append(
                {
                    "suite": SUITE,
                    "case": f"peak RSS {op} {label}",
                    "metric": "MiB",
                    "qimem": round(rss, 1),
                    "peer_name": "",
                    "peer": None,
                    "ratio": None,
                    "target": "< 80 MiB",
                    "ok": rss < 80,
                    "notes": "stdin → /dev/null",
                }
            )
    return rows


def _small(env, work, recipient, count, rounds) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    src = work / "small"
    src.mkdir()
    for i in range(count):
        (src / f"f{i:05}").write_bytes(os.urandom(4096))
    subprocess.run(["sync"], check=True)
    counter = [0]

    def fresh() -> Path:
        counter[0] += 1
        path = work / f"out{counter[0]}"
        path.mkdir()
        return path

    def q() -> float:
        out = fresh()
        t = _wall(
            [
                QIMEM,
                "encrypt",
                "--key",
                "bench",
                str(src),
                "--out-dir",
                str(out),
                "--jobs",
                "2",
                "--quiet",
            ],
            env=env,
        )
        assert len(os.listdir(out)) == count
        shutil.rmtree(out)
        return t

    def raw() -> float:
        out = fresh()
        t = _wall([sys.executable, "-c", RAW_DURABLE, str(src), str(out)])
        shutil.rmtree(out)
        return t

    age_count = min(count, 1000)

    def age_loop() -> float:
        out = fresh()
        names = sorted(os.listdir(src))[:age_count]
        script = "\n".join(f'age -r {recipient} -o "{out}/{n}.age" "{src}/{n}"' for n in names)
        script_path = work / "age-loop.sh"
        script_path.write_text(script + "\n")
        t = _wall(["sh", str(script_path)])
        shutil.rmtree(out)
        return t

    sides = [q, raw] + ([age_loop] if recipient else [])
    times = _best(sides, rounds if count <= 1000 else 2)
    rate = count / times[0]
    rows = [
        make_row(
            SUITE,
            f"{count} × 4 KiB, --jobs 2",
            "files/s",
            rate,
            "raw durable Python loop",
            count / times[1],
            target=0.8,
            notes="fresh dirs; both fsync before the final name appears",
        )
    ]
    if recipient:
        rows.append(
            make_row(
                SUITE,
                f"{count} × 4 KiB, --jobs 2",
                "files/s",
                rate,
                "age in a shell loop",
                age_count / times[2],
                target=10.0,
                notes=f"age rate measured on {age_count} files",
            )
        )
    return rows


def _segments(quick: bool, chart: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """In-process stream throughput per segment size (the default is chosen from this)."""
    from qimem import stream
    from qimem.registry import Registry, make_plugin_manager

    algorithm = Registry(make_plugin_manager()).algorithm("aes-256-gcm")
    keyring = stream.RawKeyring(algorithm, os.urandom(32), "00000000-0000-4000-8000-000000000000")
    size = 64 * MIB if quick else 256 * MIB
    data = os.urandom(4 * MIB) * (size // (4 * MIB))

    class Sink(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # type: ignore[no-untyped-def]
            return len(b)

    rows = []
    sizes = [16 << 10, 64 << 10, 256 << 10, 1 << 20]
    results = dict.fromkeys(sizes, 0.0)
    for r in range(3 if quick else 6):  # interleaved rounds, best of each: load hits all
        for seg in sizes[r % 4 :] + sizes[: r % 4]:
            start = time.perf_counter()
            stream.encrypt_stream(io.BytesIO(data), Sink(), keyring, segment_size=seg)  # type: ignore[arg-type]
            results[seg] = max(results[seg], size / (time.perf_counter() - start) / 1e6)
    for seg, rate in results.items():
        rows.append(
            make_row(
                SUITE,
                f"stream encrypt, segment {seg >> 10} KiB (in-process)",
                "MB/s",
                rate,
                "",
                None,
                notes="default" if seg == stream.DEFAULT_SEGMENT_SIZE else "",
            )
        )
    chart["segment size (in-process)"] = {f"{seg >> 10} KiB": r for seg, r in results.items()}
    return rows


def _chart(chart: dict[str, dict[str, float]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench files: matplotlib not installed; no chart")
        return
    groups = list(chart)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.6))
    if len(groups) == 1:
        axes = [axes]
    colors = {"qimem": "#2b7bba", "age": "#e08214", "raw loop": "#7f7f7f"}
    for ax, group in zip(axes, groups, strict=True):
        names = list(chart[group])
        values = [chart[group][n] for n in names]
        ax.bar(names, values, color=[colors.get(n, "#2b7bba") for n in names])
        ax.set_title(group, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
    axes[0].set_ylabel("MB/s (higher is better)")
    fig.suptitle(
        "qimem stream v1 throughput (wall time incl. process start-up; 2 shared cores)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(CHART, dpi=110)
    plt.close(fig)
    print(f"bench files: wrote {CHART}")
