"""An audit row's detail text and record id (qimem.identity.audit): the fast paths every
key operation takes give exactly what the general ones give."""

from __future__ import annotations

import json
import uuid
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from qimem.identity.audit import audit_row, clean_detail, new_record_id


def general_text(detail: dict[str, Any]) -> str:
    """The detail text as every record was written before the fast path."""
    text = json.dumps(clean_detail(detail), sort_keys=True) if detail else "{}"
    return "{}" if len(text) > 1024 else text


@given(st.text(max_size=300))
def test_a_key_operations_source_detail_is_the_general_text(source: str) -> None:
    row = audit_row("r", "a@r", "crypto.encrypt", "k", "success", {"source": source})
    assert row["detail"] == general_text({"source": source})
    assert json.loads(row["detail"]) == {"source": source[:128]}


def test_a_source_whose_json_passes_the_cap_is_dropped_as_before() -> None:
    # Characters outside the BMP are 12 characters each in JSON: 128 of them pass 1 KiB,
    # and a detail the column cannot hold would fail every buffered flush after it.
    for source in ("\U0001f600" * 128, "\x00" * 200, "a" * 500):
        row = audit_row("r", "a@r", "crypto.encrypt", "k", "success", {"source": source})
        assert row["detail"] == general_text({"source": source})
        assert len(row["detail"]) <= 1024
    assert (
        audit_row("r", "a", "x", "k", "success", {"source": "\U0001f600" * 128})["detail"] == "{}"
    )


@given(
    st.dictionaries(
        st.sampled_from(["source", "secret", "password", "status", "grant", "version"]),
        st.one_of(st.none(), st.integers(), st.booleans(), st.text(max_size=40)),
        max_size=4,
    )
)
def test_every_other_detail_takes_the_general_path(detail: dict[str, Any]) -> None:
    row = audit_row("r", "a@r", "login", "-", "success", detail)
    assert row["detail"] == general_text(detail)
    assert not {"secret", "password"} & set(json.loads(row["detail"]))


def test_record_ids_are_random_version_4_uuids() -> None:
    ids = {new_record_id() for _ in range(2000)}
    assert len(ids) == 2000
    for text in list(ids)[:200]:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
