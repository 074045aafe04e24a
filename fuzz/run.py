"""Run one fuzz target under atheris (libFuzzer), or replay a corpus without atheris.

Usage (from the repository root, with ``pip install -e '.[fuzz]'``)::

    python fuzz/run.py envelope --runs 200000          # stop after 200k executions
    python fuzz/run.py stream --max-time 600           # or after 10 minutes
    python fuzz/run.py http_json --max-time 600 -- -max_len=2048   # extra libFuzzer flags
    python fuzz/run.py manifest --replay               # corpus only, no atheris needed
    python fuzz/run.py envelope --merge                # keep new coverage in fuzz/corpus

Targets: ``envelope``, ``stream``, ``http_json``, ``manifest`` (``fuzz/fuzz_<target>.py``).
The fuzzer starts from the committed seeds in ``fuzz/corpus/<target>/`` (read only) and
writes what it learns to ``--workdir`` (default ``/tmp/qimem-fuzz/<target>/corpus``); a
crasher is written next to it as ``crash-<sha1>``. To keep a crasher as a regression
input, minimize it (``-- -minimize_crash=1 -runs=10000 crash-...``), fix the bug, and copy
it into ``fuzz/corpus/<target>/`` under a name saying what it is.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("envelope", "stream", "http_json", "manifest")
CHILD = "--libfuzzer-child"


def corpus_files(target: str) -> list[Path]:
    """The committed regression corpus of ``target``, in a stable order."""
    return sorted(p for p in (HERE / "corpus" / target).iterdir() if p.is_file())


def replay(target: str) -> int:
    """Run every committed corpus file through the target once; 0 when all pass."""
    module = importlib.import_module(f"fuzz_{target}")
    failed = 0
    for path in corpus_files(target):
        try:
            module.test_one_input(path.read_bytes())
        except Exception as exc:
            failed += 1
            print(f"FAIL {path.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"{target}: {len(corpus_files(target)) - failed} passed, {failed} failed")
    return 1 if failed else 0


def child_command(target: str) -> str:
    """How libFuzzer starts a child process of ``target`` (merge runs in children, started
    through the shell from argv[0])."""
    run = shlex.quote(str(HERE / "run.py"))
    return f"{shlex.quote(sys.executable)} {run} {target} {CHILD}"


def merge(target: str, workdir: Path) -> int:
    """libFuzzer's ``-merge=1``: the work-corpus inputs that reach features the committed
    corpus does not are added to it as ``cov-<sha1>``."""
    merged = workdir / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    seeds = HERE / "corpus" / target
    # Starting from the committed corpus, libFuzzer adds only inputs with new features.
    shutil.copytree(seeds, merged)
    known = {hashlib.sha1(p.read_bytes()).hexdigest() for p in corpus_files(target)}  # noqa: S324 - a name, not a security use
    flags = ["-merge=1", str(merged), str(workdir / "corpus")]
    done = subprocess.run([*shlex.split(child_command(target)), *flags], check=False)  # noqa: S603 - this script, with our own flags
    if done.returncode:
        return done.returncode
    added = 0
    for path in sorted(merged.iterdir()):
        data = path.read_bytes()
        digest = hashlib.sha1(data).hexdigest()  # noqa: S324 - a name, not a security use
        if digest not in known:
            (seeds / f"cov-{digest}").write_bytes(data)
            added += 1
    print(f"{target}: {added} inputs added to {seeds}")
    return 0


def child(target: str, flags: list[str]) -> int:
    """A libFuzzer child process (merge): the flags come from libFuzzer itself."""
    import atheris

    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["qimem"]):
        module = importlib.import_module(f"fuzz_{target}")
    atheris.Setup([child_command(target), *flags], module.test_one_input)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[1] == CHILD:
        return child(argv[0], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--runs", type=int, default=-1, help="executions (-1: no limit)")
    parser.add_argument("--max-time", type=int, default=0, help="seconds (0: no limit)")
    parser.add_argument("--workdir", type=Path, help="default /tmp/qimem-fuzz/<target>")
    parser.add_argument("--replay", action="store_true", help="replay the corpus only")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add the inputs of the work corpus that reach new coverage to fuzz/corpus",
    )
    parser.add_argument("libfuzzer", nargs="*", help="extra libFuzzer flags, after --")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.replay:
        return replay(args.target)

    workdir = args.workdir or Path("/tmp/qimem-fuzz") / args.target  # noqa: S108 - a scratch dir the user can override
    (workdir / "corpus").mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(args.target, workdir)

    import atheris

    with atheris.instrument_imports(include=["qimem"]):
        module = importlib.import_module(f"fuzz_{args.target}")
    flags = [
        f"-runs={args.runs}",
        f"-max_total_time={args.max_time}",
        "-timeout=10",  # one input taking longer is reported as a hang
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={workdir}/",
        *args.libfuzzer,
        str(workdir / "corpus"),
        str(HERE / "corpus" / args.target),
    ]
    atheris.Setup([sys.argv[0], *flags], module.test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
