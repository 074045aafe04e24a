"""The end-to-end helpers' retry of SoftHSM2's token race: only that failure is retried,
once, after the parallel pass; any other failure stands."""

from __future__ import annotations

import pytest
from root_e2e_helpers import steps_in_parallel


def test_a_step_that_met_the_token_race_runs_once_more_alone() -> None:
    calls: list[str] = []

    def flaky() -> str:
        calls.append("flaky")
        if calls.count("flaky") == 1:
            raise AssertionError("qimem keys create: 9 ... no token labelled 'qimem-a' in ...")
        return "made"

    def line() -> str:
        calls.append("line")
        if calls.count("line") == 1:
            return "qimem: error: cannot list the tokens (GeneralError)"
        return "qimem: error: wrong PIN"

    assert steps_in_parallel([flaky, line, lambda: "other"]) == [
        "made",
        "qimem: error: wrong PIN",
        "other",
    ]
    assert calls.count("flaky") == 2 and calls.count("line") == 2


def test_other_failures_are_not_retried() -> None:
    calls: list[int] = []

    def broken() -> str:
        calls.append(1)
        raise AssertionError("qimem keys create: exit 9: no such key")

    with pytest.raises(AssertionError, match="no such key"):
        steps_in_parallel([broken, lambda: "fine"])
    assert calls == [1]


def test_a_token_really_gone_is_still_reported() -> None:
    def gone() -> str:
        raise AssertionError("qimem decrypt: 9 no token labelled 'qimem-x'")

    with pytest.raises(AssertionError, match="no token labelled"):
        steps_in_parallel([gone])
