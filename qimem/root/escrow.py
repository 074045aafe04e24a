"""Split-key escrow of the file provider's root key: K-of-N SLIP-39 shares.

``qimem root split`` cuts the 32-byte root key into N shares, any K of which rebuild it
(Shamir's secret sharing, as specified by SLIP-39 and implemented by Trezor's reference
library ``shamir-mnemonic``; qimem does no secret-sharing arithmetic of its own). Each
share is a file: a header of ``# key: value`` comment lines, then the share's words.

What catches a wrong share:

* each share's words carry an RS1024 checksum: a mistyped, missing, extra or swapped word
  is refused;
* every share of one split carries the same random 15-bit identifier: a share of another
  split is refused;
* the share's index, the threshold and the identifier are in the words *and* in the
  header: a header edited to pass one share off as another is refused;
* with more than K shares, every share takes part in a recovery (overlapping K-subsets
  must agree), and SLIP-39's digest refuses a K-subset holding a forged share value;
* the header records the root key's check value (:attr:`qimem.rootkey.KeyWrapper.
  check_value`, public): a wrong passphrase decrypts to another key, which is refused.

One group only (SLIP-39 group threshold 1, one group of N members with threshold K).
Limits: 2 <= N <= 16 and 2 <= K <= N. A threshold of 1 is refused: 1-of-N shares are N
plain copies of the key (SLIP-39 itself allows 1-of-1 only), which a backup copy does
better.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qimem import fileio
from qimem.errors import ConflictError, DecryptionError, ValidationError
from qimem.rootkey import ROOT_KEY_SIZE, KeyWrapper

#: The first line of every share file.
FORMAT_LINE = "# qimem root key share, format 1"
MIN_SHARES = 2
MAX_SHARES = 16
MIN_THRESHOLD = 2
#: Share files are ~600 bytes; anything much larger is refused before it is parsed.
MAX_SHARE_FILE_BYTES = 4096
#: SLIP-39 passphrases are printable ASCII; qimem also caps their length.
MAX_PASSPHRASE = 1024
#: The most share files one recovery reads.
MAX_SHARE_FILES = MAX_SHARES
_HEADER_KEYS = ("share", "threshold", "identifier", "check value", "passphrase", "created")
_HEADER = re.compile(r"^# ([a-z][a-z ]*[a-z]): (\S.*)$")
_SHARE_OF = re.compile(r"^([0-9]{1,2}) of ([0-9]{1,2})$")
_WORDS_PER_LINE = 11
#: A 32-byte secret's share: 4 metadata + 26 value + 3 checksum words.
_ROOT_SHARE_WORDS = 33


class ShareError(ValidationError):
    """A share file or a set of share files that cannot rebuild the root key."""

    code = "invalid_share"


@dataclass(frozen=True)
class ShareFile:
    """One parsed share file. Its repr names the file and the share, never the words."""

    path: Path
    index: int  # 1-based, as the header and the file name show it
    count: int
    threshold: int
    identifier: int
    check_value: str
    passphrase: bool
    mnemonic: str

    def __repr__(self) -> str:
        return f"<ShareFile {self.path} share {self.index} of {self.count}>"


@dataclass(frozen=True)
class SplitResult:
    """What :func:`split_to_files` wrote (no secret in it)."""

    files: list[Path]
    shares: int
    threshold: int
    identifier: int
    check_value: str


def _library() -> Any:
    """``shamir_mnemonic``, imported on use (the CLI's other commands never load it)."""
    import shamir_mnemonic

    return shamir_mnemonic


def check_limits(shares: int, threshold: int) -> None:
    """Refuse share counts and thresholds qimem does not make.

    :raises ValidationError: ``shares`` not in 2..16, or ``threshold`` not in 2..``shares``.
    """
    if not MIN_SHARES <= shares <= MAX_SHARES:
        raise ValidationError(f"--shares must be between {MIN_SHARES} and {MAX_SHARES}")
    if not MIN_THRESHOLD <= threshold <= shares:
        raise ValidationError(
            f"--threshold must be between {MIN_THRESHOLD} and --shares ({shares}): "
            "a threshold of 1 would make every share a plain copy of the root key"
        )


def check_passphrase(passphrase: bytes) -> None:
    """:raises ValidationError: not printable ASCII (SLIP-39's rule) or too long."""
    if len(passphrase) > MAX_PASSPHRASE:
        raise ValidationError(f"the passphrase is longer than {MAX_PASSPHRASE} characters")
    if not all(32 <= c <= 126 for c in passphrase):
        raise ValidationError("the passphrase must be printable ASCII (SLIP-39)")


def split_root_key(
    key: bytes | bytearray, shares: int, threshold: int, passphrase: bytes = b""
) -> list[str]:
    """``key`` split into ``shares`` SLIP-39 mnemonics, any ``threshold`` of which rebuild
    it (one group; the master secret encrypted under ``passphrase``, empty by default).

    :raises ValidationError: limits (:func:`check_limits`), a key that is not
        :data:`~qimem.rootkey.ROOT_KEY_SIZE` bytes, or a bad passphrase.
    """
    check_limits(shares, threshold)
    check_passphrase(passphrase)
    if len(key) != ROOT_KEY_SIZE:
        raise ValidationError(f"the root key must be {ROOT_KEY_SIZE} bytes")
    groups = _library().generate_mnemonics(1, [(threshold, shares)], bytes(key), passphrase)
    return list(groups[0])


def share_identifier(mnemonic: str) -> int:
    """The identifier SLIP-39 gives every share of one split."""
    return int(_library().Share.from_mnemonic(mnemonic).identifier)


def share_file_name(identifier: int, index: int, count: int) -> str:
    return f"root-share-{identifier}-{index}-of-{count}.txt"


def render_share(
    mnemonic: str, index: int, count: int, check_value: str, passphrase: bool, created: str
) -> str:
    """The text of share file ``index`` of ``count`` (see the module docstring)."""
    share = _library().Share.from_mnemonic(mnemonic)
    words = mnemonic.split()
    lines = [
        FORMAT_LINE,
        f"# share: {index} of {count}",
        f"# threshold: {share.member_threshold}",
        f"# identifier: {share.identifier}",
        f"# check value: {check_value}",
        f"# passphrase: {'yes' if passphrase else 'no'}",
        f"# created: {created}",
        f"# Any {share.member_threshold} of the {count} shares rebuild the qimem root key:",
        "#   qimem root recover SHARE_FILE... -o NEW_ROOT_KEY_FILE",
        "# Keep this file offline and apart from the other shares. The words below are the",
        "# share (SLIP-39); the header lines above are checked against them on recovery.",
    ]
    lines += [
        " ".join(words[i : i + _WORDS_PER_LINE]) for i in range(0, len(words), _WORDS_PER_LINE)
    ]
    return "\n".join(lines) + "\n"


def write_share_files(
    mnemonics: list[str],
    out_dir: Path,
    *,
    check_value: str,
    passphrase: bool = False,
    created: datetime | None = None,
) -> list[Path]:
    """Write one share file per mnemonic into ``out_dir`` (created 0700 if missing), each
    0600 and written atomically (:func:`qimem.fileio.atomic_output`).

    Nothing is ever overwritten: if any target name exists, no file is written; if one
    appears meanwhile, the files already written by this call are removed again.

    :raises ConflictError: a share file of that name exists.
    :raises ValidationError: ``out_dir`` is not a directory or not writable.
    """
    count = len(mnemonics)
    when = (created or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    identifier = share_identifier(mnemonics[0])
    targets = [out_dir / share_file_name(identifier, i, count) for i in range(1, count + 1)]
    if out_dir.exists() and not out_dir.is_dir():
        raise ValidationError(f"{out_dir} is not a directory")
    fileio.make_private_dirs(out_dir)
    for target in targets:
        if os.path.lexists(target):
            raise ConflictError(f"{target} exists; refusing to overwrite a share file")
    written: list[Path] = []
    try:
        for i, (mnemonic, target) in enumerate(zip(mnemonics, targets, strict=True), 1):
            text = render_share(mnemonic, i, count, check_value, passphrase, when)
            _write_private(target, text.encode("ascii"), what="share file")
            written.append(target)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def split_to_files(
    key: bytes | bytearray,
    shares: int,
    threshold: int,
    out_dir: Path,
    passphrase: bytes = b"",
) -> SplitResult:
    """:func:`split_root_key` then :func:`write_share_files`: the service behind
    ``qimem root split``."""
    mnemonics = split_root_key(key, shares, threshold, passphrase)
    check_value = KeyWrapper(key).check_value
    files = write_share_files(
        mnemonics, out_dir, check_value=check_value, passphrase=bool(passphrase)
    )
    return SplitResult(files, shares, threshold, share_identifier(mnemonics[0]), check_value)


def _write_private(path: Path, data: bytes, *, what: str) -> None:
    """``data`` to a new file ``path`` (0600; temp file, fsync, no-replace rename)."""
    try:
        with fileio.atomic_output(path, force=False, mode=0o600) as fh:
            fh.write(data)
    except ConflictError:
        raise ConflictError(f"{path} exists; refusing to overwrite a {what}") from None


def _read_text(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SHARE_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ShareError(f"{path}: no such share file") from None
    except IsADirectoryError:
        raise ShareError(f"{path} is a directory, not a share file") from None
    except OSError as exc:
        raise ShareError(f"{path}: cannot read it ({type(exc).__name__})") from None
    if len(data) > MAX_SHARE_FILE_BYTES:
        raise ShareError(f"{path}: larger than {MAX_SHARE_FILE_BYTES} bytes; not a share file")
    if not data.strip():
        raise ShareError(f"{path} is empty; not a share file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ShareError(f"{path}: not a text share file (non-ASCII bytes)") from None
    if any(ord(c) < 32 and c not in "\r\n\t" for c in text):
        raise ShareError(f"{path}: not a text share file (control characters)")
    return text


def read_share_file(path: Path) -> ShareFile:
    """Parse and check one share file (header against words; the words' checksum).

    :raises ShareError: missing, oversized, binary, empty, malformed, a header that does
        not match the words, or words that fail SLIP-39's checks (unknown word, checksum).
    """
    lines = _read_text(path).splitlines()
    if not lines or lines[0].strip() != FORMAT_LINE:
        raise ShareError(f"{path}: not a qimem root key share (first line is not {FORMAT_LINE!r})")
    header: dict[str, str] = {}
    words: list[str] = []
    for number, raw in enumerate(lines[1:], 2):
        line = raw.strip()
        if line.startswith("#"):
            match = _HEADER.match(line)
            if match and match.group(1) in _HEADER_KEYS:
                if match.group(1) in header:
                    raise ShareError(f"{path}: line {number} repeats '{match.group(1)}'")
                header[match.group(1)] = match.group(2).strip()
            continue
        words += line.lower().split()
    missing = [key for key in _HEADER_KEYS if key not in header]
    if missing:
        raise ShareError(f"{path}: the header lacks {', '.join(repr(k) for k in missing)}")
    share_of = _SHARE_OF.match(header["share"])
    threshold, identifier = header["threshold"], header["identifier"]
    check_value, flag = header["check value"], header["passphrase"]
    if (
        share_of is None
        or not re.fullmatch(r"[0-9]{1,2}", threshold)
        or not re.fullmatch(r"[0-9]{1,5}", identifier)
        or not re.fullmatch(r"[0-9a-f]{32}", check_value)
        or flag not in ("yes", "no")
    ):
        raise ShareError(f"{path}: malformed header")
    index, count = int(share_of.group(1)), int(share_of.group(2))
    share = decode_share(str(path), words)
    if len(words) != _ROOT_SHARE_WORDS:
        raise ShareError(f"{path}: {len(words)} words; a root key share has {_ROOT_SHARE_WORDS}")
    stated = (index, int(threshold), int(identifier))
    actual = (share.index + 1, share.member_threshold, share.identifier)
    if stated != actual:
        raise ShareError(
            f"{path}: the header says share {index}, threshold {threshold}, identifier "
            f"{identifier}, but the words are share {actual[0]}, threshold {actual[1]}, "
            f"identifier {actual[2]}: the file was edited"
        )
    if not (actual[1] <= count <= MAX_SHARES and index <= count):
        raise ShareError(f"{path}: malformed header ('share: {index} of {count}')")
    return ShareFile(
        path,
        index,
        count,
        actual[1],
        actual[2],
        check_value,
        flag == "yes",  # noqa: S105 - a yes/no flag, not a password
        " ".join(words),
    )


def decode_share(source: str, words: list[str]) -> Any:
    """The SLIP-39 share (``shamir_mnemonic.Share``) these words encode, if it is a share
    of a one-group split. Errors name ``source`` and the word's position, never a word.

    :raises ShareError: an unknown word, a bad checksum or padding, a multi-group share.
    """
    lib = _library()
    from shamir_mnemonic.wordlist import WORD_INDEX_MAP

    if not words:
        raise ShareError(f"{source}: no share words")
    for position, word in enumerate(words, 1):
        if word not in WORD_INDEX_MAP:
            raise ShareError(f"{source}: word {position} is not in the SLIP-39 word list")
    try:
        share = lib.Share.from_mnemonic(" ".join(words))
    except lib.MnemonicError:
        raise ShareError(
            f"{source}: the share's checksum or length does not match (a word is mistyped, "
            "missing, extra or out of order)"
        ) from None
    if share.group_count != 1 or share.group_threshold != 1:
        raise ShareError(f"{source}: a multi-group SLIP-39 share; qimem splits into one group")
    return share


def combine(shares: list[ShareFile], passphrase: bytes = b"") -> bytearray:
    """The secret that ``shares`` (parsed share files) rebuild.

    :raises ShareError: fewer than the threshold, a share given twice, shares of different
        splits, or shares that do not combine (SLIP-39's digest).
    """
    lib = _library()
    from shamir_mnemonic.shamir import ShareGroup

    if not shares:
        raise ShareError("no share files given")
    first = shares[0]
    for other in shares[1:]:
        if other.identifier != first.identifier or other.check_value != first.check_value:
            raise ShareError(
                f"{other.path} is from another split (identifier {other.identifier}) than "
                f"{first.path} (identifier {first.identifier})"
            )
        if (other.threshold, other.count, other.passphrase) != (
            first.threshold,
            first.count,
            first.passphrase,
        ):
            raise ShareError(
                f"{other.path} and {first.path} disagree on the threshold, the share count "
                "or the passphrase"
            )
    seen: dict[int, Path] = {}
    for share in shares:
        if share.index in seen:
            raise ShareError(f"share {share.index} given twice ({seen[share.index]}, {share.path})")
        seen[share.index] = share.path
    if len(shares) < first.threshold:
        raise ShareError(f"need {first.threshold} shares, got {len(shares)}")
    decoded = [lib.Share.from_mnemonic(s.mnemonic) for s in shares]
    subsets = _covering_subsets(len(decoded), first.threshold)
    results: set[bytes] = set()
    for subset in subsets:
        group = ShareGroup()
        try:
            for i in subset:
                group.add(decoded[i])  # refuses differing SLIP-39 parameters
            ems = lib.recover_ems({0: group})  # refuses a wrong digest
        except lib.MnemonicError:
            raise ShareError(
                "the shares do not combine (their SLIP-39 parameters or digest do not "
                "match): one of them was altered or forged"
            ) from None
        results.add(ems.ciphertext)
    if len(results) != 1:
        raise ShareError("the shares disagree: one of them was altered or forged")
    return bytearray(ems.decrypt(passphrase))


def _covering_subsets(count: int, k: int) -> list[range]:
    """K-subsets of ``range(count)`` that together use every index (``ceil(count / k)``
    of them; the last one overlaps its neighbour)."""
    return [
        range(start, start + k) if start + k <= count else range(count - k, count)
        for start in range(0, count, k)
    ]


def recover_root_key(paths: list[Path], passphrase: bytes = b"") -> tuple[bytearray, ShareFile]:
    """The root key that the share files at ``paths`` rebuild, checked against the check
    value recorded at split time; also the first share (its identifier, threshold).

    :raises ShareError: see :func:`read_share_file` and :func:`combine`; too many files.
    :raises DecryptionError: the rebuilt key's check value differs from the recorded one
        (a wrong passphrase, or a header whose check value was edited).
    """
    if len(paths) > MAX_SHARE_FILES:
        raise ShareError(f"at most {MAX_SHARE_FILES} share files")
    check_passphrase(passphrase)
    shares = [read_share_file(Path(p)) for p in paths]
    if shares and shares[0].passphrase and not passphrase:
        raise ShareError("the shares were made with a passphrase; give it (--passphrase-file)")
    if shares and not shares[0].passphrase and passphrase:
        raise ShareError("the shares were made without a passphrase; give none")
    key = combine(shares, passphrase)
    if len(key) != ROOT_KEY_SIZE:  # pragma: no cover - read_share_file demands 33 words
        raise ShareError(f"the shares rebuild a {len(key)}-byte secret, not a root key")
    if KeyWrapper(key).check_value != shares[0].check_value:
        key[:] = bytes(len(key))
        raise DecryptionError(
            "the rebuilt key does not match the check value the shares record "
            f"({shares[0].check_value}): wrong passphrase?",
            code="wrong_passphrase",
        )
    return key, shares[0]


def write_recovered_key(path: Path, key: bytes | bytearray) -> None:
    """Write ``key`` as a root key file (base64 line, 0600, never overwriting; a missing
    directory is created 0700), like :func:`qimem.rootkey.write_root_key_file`.

    :raises ConflictError: ``path`` exists.
    """
    from qimem.rootkey import encode_root_key

    if os.path.lexists(path):
        raise ConflictError(f"{path} exists; refusing to overwrite it (recover to a new path)")
    fileio.make_private_dirs(path.parent)
    _write_private(path, (encode_root_key(key) + "\n").encode("ascii"), what="root key file")
