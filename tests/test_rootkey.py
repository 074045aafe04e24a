"""The root key file and the wrapping of key material under the root key."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from qimem.errors import ConfigError, DecryptionError
from qimem.rootkey import (
    ROOT_KEY_SIZE,
    KeyWrapper,
    decode_root_key,
    encode_root_key,
    generate_root_key,
    read_root_key_file,
    write_root_key_file,
)


@pytest.fixture
def no_umask() -> Iterator[None]:
    """Umask 0, so a file mode of 0600 proves the code asked for it."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_write_creates_0600_file(tmp_path: Path, no_umask: None) -> None:
    path = tmp_path / "deep" / "dir" / "root.key"
    key = write_root_key_file(path)
    assert isinstance(key, bytearray) and len(key) == ROOT_KEY_SIZE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text("ascii") == encode_root_key(key) + "\n"
    assert read_root_key_file(path) == key


def test_write_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    key = write_root_key_file(path)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="already exists") as info:
        write_root_key_file(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    assert read_root_key_file(path) == key


def test_fresh_keys_differ(tmp_path: Path) -> None:
    a = write_root_key_file(tmp_path / "a.key")
    b = write_root_key_file(tmp_path / "b.key")
    assert a != b


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620, 0o602, 0o644, 0o610])
def test_group_or_other_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "root.key"
    key = write_root_key_file(path)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        read_root_key_file(path)
    message = str(info.value)
    assert f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message
    assert encode_root_key(key) not in message
    path.chmod(0o600)
    assert read_root_key_file(path) == key
    path.chmod(0o400)  # read-only for the owner is fine too
    assert read_root_key_file(path) == key


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="qimem init"):
        read_root_key_file(tmp_path / "absent.key")


@pytest.mark.parametrize(
    "contents",
    [
        "this is not base64!",
        base64.b64encode(b"k" * 16).decode(),  # too short
        base64.b64encode(b"k" * 33).decode(),  # too long
        "",
        "\n",
        base64.b64encode(b"k" * 32).decode()[:-2],  # damaged padding
        "\xff\xfe binary",
    ],
)
def test_bad_contents(tmp_path: Path, contents: str) -> None:
    path = tmp_path / "root.key"
    path.write_bytes(contents.encode("utf-8"))
    path.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        read_root_key_file(path)
    message = str(info.value)
    assert str(path) in message
    if contents.strip():
        assert contents.strip() not in message  # the file's contents are not echoed


def test_decode_tolerates_surrounding_whitespace() -> None:
    key = generate_root_key()
    assert decode_root_key(f"  {encode_root_key(key)}\n", "QIMEM_ROOT_KEY") == key
    with pytest.raises(ConfigError, match="QIMEM_ROOT_KEY"):
        decode_root_key("nope", "QIMEM_ROOT_KEY")


# -- KeyWrapper -----------------------------------------------------------------------------


def test_wrap_round_trip_binds_context() -> None:
    wrapper = KeyWrapper(generate_root_key())
    material = os.urandom(32)
    context = b"qimem-key-v1|master|lineage|key|1|aes-256-gcm"
    blob = wrapper.wrap(material, context)
    assert material not in blob
    unwrapped = wrapper.unwrap(blob, context)
    assert isinstance(unwrapped, bytearray) and unwrapped == material
    assert wrapper.wrap(bytearray(material), context) != blob  # fresh nonce every time
    for other in (b"", context + b"x", context.replace(b"|1|", b"|2|")):
        with pytest.raises(DecryptionError):
            wrapper.unwrap(blob, other)


def test_unwrap_refuses_other_root_key_and_damage() -> None:
    material = os.urandom(32)
    wrapper = KeyWrapper(generate_root_key())
    blob = wrapper.wrap(material, b"ctx")
    with pytest.raises(DecryptionError):
        KeyWrapper(generate_root_key()).unwrap(blob, b"ctx")
    for index in range(len(blob)):
        damaged = bytearray(blob)
        damaged[index] ^= 0x01
        with pytest.raises(DecryptionError):
            wrapper.unwrap(bytes(damaged), b"ctx")
    for short in (b"", blob[:1], blob[:28]):
        with pytest.raises(DecryptionError):
            wrapper.unwrap(short, b"ctx")
    assert wrapper.unwrap(blob, b"ctx") == material


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_wrong_root_key_size(size: int) -> None:
    with pytest.raises(ConfigError, match="root key"):
        KeyWrapper(os.urandom(size))


def test_check_value_identifies_root_key_without_revealing_it() -> None:
    root_key = generate_root_key()
    a, b = KeyWrapper(root_key), KeyWrapper(bytes(root_key))
    assert a.check_value == b.check_value
    assert a.check_value != KeyWrapper(generate_root_key()).check_value
    assert bytes(root_key).hex() not in a.check_value
    assert a.check_value not in bytes(root_key).hex()


def test_repr_shows_no_key_bytes() -> None:
    root_key = generate_root_key()
    wrapper = KeyWrapper(root_key)
    text = repr(wrapper) + str(wrapper)
    for form in (
        bytes(root_key).hex(),
        bytes(root_key).hex()[:16],
        encode_root_key(root_key),
        repr(bytes(root_key)),
    ):
        assert form not in text
    assert not hasattr(wrapper, "__dict__")  # nothing else hangs off it (slots)
