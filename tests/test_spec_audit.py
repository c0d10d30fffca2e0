"""A line-by-line audit of SPEC.md against the tool: each test here pins a SPEC statement
that the rest of the suite left unchecked, or checked only for our own test server's shape.
Every test drives the command line (student_sync.main) against the local Directory API
server and a SQLite PowerSchool (conftest.py) and asserts what an administrator would see."""

from __future__ import annotations

import pytest

from conftest import WHS_9, email
from testkit import district


def active_school(sync, first: int, count: int) -> list[int]:
    """`count` active students at school 101 (grade 9), each with an account in step."""
    numbers = list(range(first, first + count))
    for number in numbers:
        sync.student(number)
        sync.account(number)
    return numbers


def withdraw(sync, numbers) -> None:
    for number in numbers:
        sync.ps.execute("UPDATE STUDENTS SET ENROLL_STATUS = 2 WHERE STUDENT_NUMBER = ?", (number,))


# ---------------------------------------------------------------------------------------------
# SPEC 7, source sanity: "drops by MORE than [safety] max_school_drop_percent" -- a drop of
# exactly that percentage goes ahead, for every percentage (70% of 20 is 14 students; the
# float 20 * (1 - 0.70) is 6.000000000000001, which made a drop to 6 look like more than 70%).
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("percent, students, lost, code", [
    (70, 20, 14, 0), (70, 20, 15, 3), (44, 25, 11, 0), (44, 25, 12, 3), (12.5, 24, 3, 0), (12.5, 24, 4, 3)])
def test_a_school_drop_of_exactly_the_percentage_goes_ahead(sync, percent, students, lost, code):
    sync.settings({"safety": {"max_school_drop_percent": percent}})
    numbers = active_school(sync, 700000, students)
    assert sync.run("--all").code == 0
    withdraw(sync, numbers[:lost])

    result = sync.run("--all")

    assert result.code == code, result.output
    suspended = [n for n in numbers if sync.server.user(email(n))["suspended"]]
    assert suspended == (numbers[:lost] if code == 0 else [])


# ---------------------------------------------------------------------------------------------
# SPEC 4: "usage ... error before any change" is exit 2; main(argv) -> int gives it as its
# answer, as it does for every other way a run ends (a scheduled job, a wrapper, a test).
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arguments", [
    ["--all", "--building", "101"],            # two scopes
    ["--all", "--as-of", "2026-02-30"],        # not a date
    ["--building", "WHS"],                     # not a building number
    ["--all", "--no-such-option"],
    ["--undo", "x", "--check"],
], ids=["two-scopes", "bad-date", "building-not-a-number", "unknown-option", "two-modes"])
def test_a_command_line_usage_error_is_exit_2_from_main_and_changes_nothing(sync, arguments):
    sync.student(700101)

    result = sync.run(*arguments)

    assert result.code == 2, result.output
    assert "usage:" in result.output
    assert sync.writes() == []
