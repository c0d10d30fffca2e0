"""Plans and journals as untrusted input, and the limits every run is held to (issues 10 and 11).

- a plan given to --apply-plan, or a journal read by --undo, may only touch student addresses,
  with the actions and fields the rules write, and must carry the "now" values it is checked
  against; anything else refuses the whole file (exit 2) before any change (issue 10.2);
- a custom attribute category or field missing in Google stops a run that would send them,
  once, before any change (issue 10.4);
- a plan older than the last run that applied changes is refused unless --allow-older-plan,
  its suspensions are re-checked against PowerSchool, and it never becomes the baseline; the
  same plan or undo a second time says so (issue 11.3);
- --undo is held to max_suspensions (issue 11.7); a dry run during a safety stop shows the
  whole plan (issue 11.8); --check shows the figures the next run will meet (issue 11.9);
- the summary email has an overall deadline (issue 11.10); the progress line never runs into a
  log line (issue 11.11).

End to end through student_sync.main against the local Directory API server and a SQLite
PowerSchool (see conftest.py).
"""

from __future__ import annotations

import copy
import json
import re
import socket
import sys
import threading
from pathlib import Path

import pytest

from conftest import (LMS_7, WHS_9, WHS_10, FakeTty, counts_file, email, email_settings, logs,
                      looks_of, run_id_of)
import student_sync
from testkit import district

SUSPENDED_OU = district.SUSPENDED_OU
CATEGORY = district.CATEGORY
SCHOOL_FIELD = district.SCHOOL_FIELD
GRAD_FIELD = district.GRAD_FIELD


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def withdrawn(sync, numbers) -> None:
    for number in numbers:
        sync.student(number, status=2)
        sync.account(number)


def saved_plans(sync) -> list[Path]:
    return sorted(logs(sync).glob("plan-*.json"))


def mixed_plan(sync, tmp_path, base: int) -> tuple[Path, dict]:
    """A reviewed plan with a create, a move, a rename + attributes, an unsuspend and a
    suspension; returns its path and its JSON."""
    sync.student(base)                                          # create
    sync.student(base + 1)                                      # move
    sync.account(base + 1, org_unit=WHS_10)
    sync.student(base + 2, "Anne")                              # rename + attributes
    sync.account(base + 2, given="Annie", school=102)
    sync.student(base + 3)                                      # unsuspend + move
    sync.account(base + 3, org_unit=SUSPENDED_OU, suspended=True)
    withdrawn(sync, [base + 4])                                 # suspend + move
    path = tmp_path / "plan.json"
    result = sync.run("--all", "--dry-run", "--plan-out", str(path))
    assert result.code == 0, result.output
    document = json.loads(path.read_text(encoding="utf-8"))
    assert len(document["changes"]) == 5
    return path, document


def index_of(document: dict, number: int) -> int:
    return next(i for i, c in enumerate(document["changes"]) if c["email"] == email(number))


def write_json(path: Path, document) -> Path:
    path.write_text(json.dumps(document, indent=1), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# 1. A plan file is input, not authority (issue 10.2)
# ---------------------------------------------------------------------------------------------


def _teacher_suspension(change: dict) -> None:
    change.update(email="oldteacher@d118.org")


def _other_number(change: dict) -> None:
    change.update(email=email(change["student_number"] + 1))


def _leading_zero(change: dict) -> None:
    change.update(email="0" + change["email"])


def _other_domain(change: dict) -> None:
    change.update(email=change["email"].replace("@d118.org", "@d118.org.evil.example"))


def _primary_email_change(change: dict) -> None:
    change["before"]["primaryEmail"] = change["email"]
    change["after"]["primaryEmail"] = "superadmin@d118.org"


def _password_on_update(change: dict) -> None:
    change["after"]["password"] = "Hijacked-2026!"
    change["before"]["password"] = ""


def _password_on_create(change: dict) -> None:
    change["after"]["password"] = "Hijacked-2026!"


def _admin_flag_on_create(change: dict) -> None:
    change["after"]["isAdmin"] = True


def _create_without_attributes(change: dict) -> None:
    del change["after"]["customSchemas"]


def _empty_before(change: dict) -> None:
    change["before"] = {}


def _partial_before(change: dict) -> None:
    del change["before"]["orgUnitPath"]


def _labels_do_not_match(change: dict) -> None:
    change["labels"] = ["move"]


def _unknown_label(change: dict) -> None:
    change["labels"] = change["labels"] + ["delete"]


def _other_category(change: dict) -> None:
    change["after"]["customSchemas"]["Staff_Data"] = {"Role": "admin"}
    change["before"]["customSchemas"]["Staff_Data"] = {"Role": None}


def _extra_attribute_field(change: dict) -> None:
    change["after"]["customSchemas"][CATEGORY]["Role"] = "admin"
    change["before"]["customSchemas"][CATEGORY]["Role"] = None


def _move_to_a_staff_ou(change: dict) -> None:
    change["after"]["orgUnitPath"] = "/Staff"


def _suspend_into_a_building_ou(change: dict) -> None:
    change["after"]["orgUnitPath"] = WHS_9


def _create_outside_the_student_ous(change: dict) -> None:
    change["after"]["orgUnitPath"] = "/Staff"


def _suspend_as_update(change: dict) -> None:
    change["action"] = "update"


def _unsuspend_that_suspends(change: dict) -> None:
    change["after"]["suspended"] = True


def _number_as_text(change: dict) -> None:
    change["student_number"] = "5e5"


# (which change of mixed_plan, how it is tampered with, a word the refusal names)
TAMPERED = {
    "teacher-address": (4, _teacher_suspension, "oldteacher@d118.org"),
    "number-and-email-differ": (4, _other_number, None),
    "leading-zero-address": (1, _leading_zero, None),
    "other-domain": (1, _other_domain, None),
    "primary-email-change": (1, _primary_email_change, "primaryEmail"),
    "password-on-update": (2, _password_on_update, "password"),
    "password-on-create": (0, _password_on_create, "password"),
    "admin-flag-on-create": (0, _admin_flag_on_create, "isAdmin"),
    "create-without-attributes": (0, _create_without_attributes, "customSchemas"),
    "empty-before": (1, _empty_before, "before"),
    "partial-before": (3, _partial_before, "orgUnitPath"),
    "labels-do-not-match-fields": (3, _labels_do_not_match, None),
    "unknown-label": (1, _unknown_label, "delete"),
    "other-attribute-category": (2, _other_category, "Staff_Data"),
    "extra-attribute-field": (2, _extra_attribute_field, "Role"),
    "move-to-a-staff-ou": (1, _move_to_a_staff_ou, "/Staff"),
    "suspend-into-a-building-ou": (4, _suspend_into_a_building_ou, None),
    "create-outside-the-student-ous": (0, _create_outside_the_student_ous, "/Staff"),
    "suspend-as-update": (4, _suspend_as_update, None),
    "unsuspend-that-suspends": (3, _unsuspend_that_suspends, "suspended"),
    "number-as-text": (4, _number_as_text, "5e5"),
}


@pytest.mark.parametrize("case", list(TAMPERED), ids=list(TAMPERED))
def test_apply_plan_refuses_a_tampered_change_naming_it_and_changes_nothing(sync, tmp_path, case):
    which, tamper, word = TAMPERED[case]
    base = 7000
    sync.server.add_user("oldteacher@d118.org", given="Old", family="Teacher", org_unit="/Staff")
    sync.server.add_user("superadmin@d118.org", given="Super", family="Admin", org_unit="/")
    path, document = mixed_plan(sync, tmp_path, base)
    index = index_of(document, base + which)
    tampered = copy.deepcopy(document)
    original_email = tampered["changes"][index]["email"]
    tamper(tampered["changes"][index])
    bad = write_json(tmp_path / "tampered.json", tampered)
    before = sync.server.users()
    sync.server.clear_requests()

    result = sync.run("--apply-plan", str(bad))

    assert result.code == 2, result.output
    assert sync.writes() == []
    assert sync.server.users() == before
    assert "tampered.json" in result.output
    refusal = [line for line in result.output.splitlines() if f"changes[{index}]" in line]
    assert refusal, result.output
    shown = tampered["changes"][index]["email"]
    assert shown in refusal[0] or original_email in refusal[0], refusal
    if word:
        assert word in refusal[0], refusal
    assert "Hijacked" not in result.output


def test_apply_plan_of_an_untampered_plan_still_applies_every_kind_of_change(sync, tmp_path):
    base = 7100
    path, _ = mixed_plan(sync, tmp_path, base)

    result = sync.run("--apply-plan", str(path))

    assert result.code == 0, result.output
    assert looks_of(sync.server, base)[:2] == (False, WHS_9)
    assert looks_of(sync.server, base + 1)[1] == WHS_9
    assert looks_of(sync.server, base + 2)[2] == "Anne"
    assert looks_of(sync.server, base + 3)[:2] == (False, WHS_9)
    assert looks_of(sync.server, base + 4)[:2] == (True, SUSPENDED_OU)


def test_a_tampered_plan_can_never_set_a_password_or_primary_address(sync, tmp_path):
    base = 7200
    sync.server.add_user("superadmin@d118.org", given="Super", family="Admin", org_unit="/")
    path, document = mixed_plan(sync, tmp_path, base)
    tampered = copy.deepcopy(document)
    # a well-formed "student" change aimed at the administrator
    tampered["changes"].append({
        "student_number": 1, "email": "superadmin@d118.org", "action": "update", "labels": ["rename"],
        "before": {"name": {"givenName": "Super", "familyName": "Admin"}},
        "after": {"name": {"givenName": "Ann", "familyName": "Lee"}, "password": "Hijacked-2026!",
                  "primaryEmail": "1@d118.org"},
        "remove_groups": False})
    bad = write_json(tmp_path / "tampered.json", tampered)

    result = sync.run("--apply-plan", str(bad))

    assert result.code == 2, result.output
    assert sync.writes() == []
    assert "changes[5]" in result.output and "superadmin@d118.org" in result.output
    assert sync.server.user("superadmin@d118.org")["name"]["givenName"] == "Super"
    for path_ in logs(sync).iterdir():
        assert "Hijacked" not in path_.read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# 1b. A journal is input too (issue 10.2)
# ---------------------------------------------------------------------------------------------


def synced_journal(sync, base: int) -> tuple[str, Path, list[dict]]:
    sync.student(base)                                          # created
    sync.student(base + 1)                                      # moved
    sync.account(base + 1, org_unit=WHS_10)
    withdrawn(sync, [base + 2])                                 # suspended
    result = sync.run("--all")
    assert result.code == 0, result.output
    run_id = run_id_of(result)
    path = logs(sync) / f"journal-{run_id}.jsonl"
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return run_id, path, entries


def write_journal(path: Path, entries: list[dict]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")


@pytest.mark.parametrize("case", ["teacher", "primary-email", "password", "empty-before", "staff-number"])
def test_undo_refuses_a_tampered_journal_naming_the_line_and_changes_nothing(sync, case):
    base = 7300
    sync.server.add_user("oldteacher@d118.org", given="Old", family="Teacher", org_unit=SUSPENDED_OU,
                         suspended=True)
    run_id, path, entries = synced_journal(sync, base)
    line = next(i for i, e in enumerate(entries) if e["email"] == email(base + 2))  # the suspension
    entry = entries[line]
    if case == "teacher":
        entry["email"] = "oldteacher@d118.org"
    elif case == "primary-email":
        entry["before"]["primaryEmail"] = "oldteacher@d118.org"
        entry["after"]["primaryEmail"] = entry["email"]
    elif case == "password":
        entry["before"]["password"] = "Hijacked-2026!"
        entry["after"]["password"] = "x"
    elif case == "empty-before":
        entry["before"] = {}
    elif case == "staff-number":
        entry["student_number"] = base + 1
    write_journal(path, entries)
    before = sync.server.users()
    sync.server.clear_requests()

    result = sync.run("--undo", run_id)

    assert result.code == 2, result.output
    assert sync.writes() == []
    assert sync.server.users() == before
    assert f"line {line + 1}" in result.output, result.output
    assert "Hijacked" not in result.output


# ---------------------------------------------------------------------------------------------
# 2. The custom attribute category or a field missing in Google (issue 10.4)
# ---------------------------------------------------------------------------------------------


SCHEMA_CASES = {
    "category-renamed": ("SynchronizationData", {SCHOOL_FIELD: "INT64", GRAD_FIELD: "INT64"},
                         f"custom attribute category {CATEGORY} does not exist"),
    "field-missing": (CATEGORY, {SCHOOL_FIELD: "INT64", "GradYear": "INT64"}, GRAD_FIELD),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_missing_schema_stops_a_run_that_would_send_attributes_before_any_change(bare_sync, case):
    name, fields, words = SCHEMA_CASES[case]
    sync = bare_sync(name, fields)
    for number in range(7401, 7406):
        sync.student(number)                                    # creates: would send attributes
    sync.student(7410)                                          # a move only
    sync.server.add_user(email(7410), given="Ann", family="Lee", org_unit=WHS_10)
    sync.student(7411, status=2)                                # a suspension only
    sync.server.add_user(email(7411), given="Ann", family="Lee", org_unit=WHS_9)

    result = sync.run("--all")

    assert result.code == 2, result.output
    assert sync.writes() == []
    assert words in result.output
    assert result.output.count(words) <= 2, result.output   # once (console), not once per student


def test_missing_schema_does_not_stop_a_run_that_sends_no_attributes(bare_sync):
    sync = bare_sync("SomethingElse", {"Other": "STRING"})
    sync.student(7420)
    sync.server.add_user(email(7420), given="Ann", family="Lee", org_unit=WHS_10,   # a move only
                         custom=district.attributes(101, 2030))
    sync.student(7421, status=2)
    sync.server.add_user(email(7421), given="Ann", family="Lee", org_unit=WHS_9)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert sync.server.user(email(7420))["orgUnitPath"] == WHS_9
    assert sync.server.user(email(7421))["suspended"] is True


def test_missing_schema_stops_apply_plan_with_attribute_changes(bare_sync, tmp_path):
    sync = bare_sync(CATEGORY, {SCHOOL_FIELD: "INT64", GRAD_FIELD: "INT64"})
    sync.student(7430)                                          # a create
    path = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(path)).code == 0
    with sync.server._lock:                                     # the category is renamed meanwhile
        sync.server._state.schemas.clear()
    sync.server.add_schema("Sync_Data", {SCHOOL_FIELD: "INT64", GRAD_FIELD: "INT64"})

    result = sync.run("--apply-plan", str(path))

    assert result.code == 2, result.output
    assert sync.writes() == []
    assert f"custom attribute category {CATEGORY} does not exist" in result.output


# ---------------------------------------------------------------------------------------------
# 3. A plan applied after a newer run (issue 11.3)
# ---------------------------------------------------------------------------------------------


def monday_plan(sync, tmp_path, base: int) -> Path:
    """Monday: a plan that suspends a withdrawn student (`base`) and another (`base + 1`)."""
    withdrawn(sync, [base, base + 1])
    path = tmp_path / "monday.json"
    result = sync.run("--all", "--dry-run", "--plan-out", str(path))
    assert result.code == 0, result.output
    return path


def test_plan_older_than_the_last_applied_run_is_refused_naming_the_option(sync, tmp_path):
    base = 7500
    monday = monday_plan(sync, tmp_path, base)
    sync.ps.execute("UPDATE STUDENTS SET ENROLL_STATUS = 0 WHERE STUDENT_NUMBER = ?", (base,))
    sync.student(base + 9)                                      # Tuesday's run creates an account
    tuesday = sync.run("--all")
    assert tuesday.code == 0, tuesday.output
    sync.server.clear_requests()

    wednesday = sync.run("--apply-plan", str(monday))

    assert wednesday.code == 2, wednesday.output
    assert sync.writes() == []
    assert "--allow-older-plan" in wednesday.output
    assert looks_of(sync.server, base)[0] is False


def test_older_plan_allowed_rechecks_each_suspension_and_never_moves_the_baseline(sync, tmp_path):
    base = 7600
    monday = monday_plan(sync, tmp_path, base)
    sync.ps.execute("UPDATE STUDENTS SET ENROLL_STATUS = 0 WHERE STUDENT_NUMBER = ?", (base,))
    sync.student(base + 9)
    tuesday = sync.run("--all")
    assert tuesday.code == 0, tuesday.output
    baseline = counts_file(sync).read_text(encoding="utf-8")

    result = sync.run("--apply-plan", str(monday), "--allow-older-plan")

    assert result.code == 0, result.output
    assert looks_of(sync.server, base)[:2] == (False, WHS_9)       # active again: left alone
    assert any(email(base) in line and "stale" in line for line in result.output.splitlines()), result.output
    assert looks_of(sync.server, base + 1)[:2] == (True, SUSPENDED_OU)   # still withdrawn: suspended
    assert counts_file(sync).read_text(encoding="utf-8") == baseline


def test_a_suspension_is_rechecked_against_powerschool_even_in_a_current_plan(sync, tmp_path):
    base = 7700
    monday = monday_plan(sync, tmp_path, base)
    sync.ps.execute("UPDATE STUDENTS SET ENROLL_STATUS = 0 WHERE STUDENT_NUMBER = ?", (base,))
    sync.ps.execute("DELETE FROM STUDENTS WHERE STUDENT_NUMBER = ?", (base + 1,))

    result = sync.run("--apply-plan", str(monday))

    assert result.code == 0, result.output
    assert looks_of(sync.server, base)[0] is False                 # active again
    assert looks_of(sync.server, base + 1)[0] is False             # no longer a student of the scope
    assert sync.writes() == []


def test_a_plan_made_after_the_last_applied_run_applies(sync, tmp_path):
    base = 7800
    sync.student(base)
    assert sync.run("--all").code == 0                              # applies: a create
    monday = monday_plan(sync, tmp_path, base + 1)
    assert sync.run("--all", "--dry-run").code == 0                 # a dry run applies nothing

    result = sync.run("--apply-plan", str(monday))

    assert result.code == 0, result.output
    assert looks_of(sync.server, base + 1)[0] is True


def test_the_same_plan_a_second_time_says_already_applied(sync, tmp_path):
    base = 7900
    monday = monday_plan(sync, tmp_path, base)
    first = sync.run("--apply-plan", str(monday))
    assert first.code == 0, first.output
    sync.server.clear_requests()

    again = sync.run("--apply-plan", str(monday))

    assert again.code == 0, again.output
    assert sync.writes() == []
    assert "already applied" in again.output
    assert run_id_of(first) in again.output
    assert "stale" not in again.output


def test_the_same_undo_a_second_time_says_already_undone(sync):
    base = 7950
    sync.student(base)
    synced = sync.run("--all")
    first = sync.run("--undo", run_id_of(synced))
    assert first.code == 0, first.output
    sync.server.clear_requests()

    again = sync.run("--undo", run_id_of(synced))

    assert again.code == 0, again.output
    assert sync.writes() == []
    assert "already undone" in again.output
    assert run_id_of(first) in again.output
    assert "changed since" not in again.output


# ---------------------------------------------------------------------------------------------
# 4. --undo is held to the safety limits (issue 11.7)
# ---------------------------------------------------------------------------------------------


def provisioning_run(sync, base: int, count: int) -> str:
    for number in range(base, base + count):
        sync.student(number)
    result = sync.run("--all")
    assert result.code == 0, result.output
    return run_id_of(result)


def test_undo_that_would_suspend_more_than_the_limit_stops_with_exit_3(sync):
    run_id = provisioning_run(sync, 8000, 4)
    sync.settings({"safety": {"max_suspensions": 3}})
    sync.server.clear_requests()

    result = sync.run("--undo", run_id)

    assert result.code == 3, result.output
    assert sync.writes() == []
    assert "4" in result.output and "max_suspensions" in result.output
    assert "--allow-mass-changes" in result.output
    assert all(looks_of(sync.server, n)[0] is False for n in range(8000, 8004))


def test_undo_past_the_limit_goes_through_with_allow_mass_changes(sync):
    run_id = provisioning_run(sync, 8100, 4)
    sync.settings({"safety": {"max_suspensions": 3}})

    result = sync.run("--undo", run_id, "--allow-mass-changes")

    assert result.code == 0, result.output
    assert all(looks_of(sync.server, n)[0] is True for n in range(8100, 8104))


def test_undo_dry_run_shows_the_figures_and_the_stop_it_would_meet(sync):
    run_id = provisioning_run(sync, 8200, 4)
    sync.settings({"safety": {"max_suspensions": 3}})
    sync.server.clear_requests()

    result = sync.run("--undo", run_id, "--dry-run")

    assert result.code == 3, result.output
    assert sync.writes() == []
    assert sum(line.startswith("would suspend") for line in result.output.splitlines()) == 4, result.output
    assert "max_suspensions" in result.output and "summary (planned)" in result.output


def test_undo_within_the_limit_is_not_stopped(sync):
    run_id = provisioning_run(sync, 8300, 3)
    sync.settings({"safety": {"max_suspensions": 3}})

    result = sync.run("--undo", run_id)

    assert result.code == 0, result.output


# ---------------------------------------------------------------------------------------------
# 5. A dry run during a safety stop (issue 11.8)
# ---------------------------------------------------------------------------------------------


def stopping_district(sync) -> None:
    sync.settings({"safety": {"max_suspensions": 1}})
    withdrawn(sync, [8401, 8402, 8403])
    sync.student(8404)                                          # a create


def test_dry_run_during_a_safety_stop_shows_the_whole_plan_and_the_stop(sync):
    stopping_district(sync)

    result = sync.run("--all", "--dry-run")

    assert result.code == 3, result.output
    assert sync.writes() == []
    for number in (8401, 8402, 8403):
        assert any(line.startswith("would suspend") and email(number) in line
                   for line in result.output.splitlines()), result.output
    assert any(line.startswith("would create") and email(8404) in line for line in result.output.splitlines())
    assert "summary (planned): 1 creates" in result.output and "3 suspends" in result.output
    assert "max_suspensions" in result.output
    assert saved_plans(sync) == []                              # no plan file unless asked


def test_dry_run_during_a_safety_stop_writes_the_plan_it_is_asked_for(sync, tmp_path):
    stopping_district(sync)
    path = tmp_path / "review.json"

    result = sync.run("--all", "--dry-run", "--plan-out", str(path))

    assert result.code == 3, result.output
    assert saved_plans(sync) == []
    assert len(json.loads(path.read_text(encoding="utf-8"))["changes"]) == 4


def test_dry_run_safety_stop_email_says_it_was_a_dry_run(sync, smtp):
    stopping_district(sync)
    sync.settings({**email_settings(smtp.port), "safety": {"max_suspensions": 1}})

    result = sync.run("--all", "--dry-run")

    assert result.code == 3, result.output
    [message] = smtp.messages
    body = message.get_body(preferencelist=("plain",)).get_content()
    assert "dry run" in message["Subject"].lower()
    assert "dry run" in body.lower()


# ---------------------------------------------------------------------------------------------
# 6. --check shows the figures the next run will meet (issue 11.9)
# ---------------------------------------------------------------------------------------------


def school_of(sync, first: int, count: int) -> list[int]:
    numbers = list(range(first, first + count))
    for number in numbers:
        sync.student(number)
        sync.account(number)
    return numbers


def fail_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("FAIL")]


def test_check_fails_when_the_next_run_would_stop_on_a_school_drop(sync):
    whs = school_of(sync, 8500, 94)
    assert sync.run("--all").code == 0
    for number in whs[:51]:
        sync.ps.execute("UPDATE STUDENTS SET ENROLL_STATUS = 2 WHERE STUDENT_NUMBER = ?", (number,))

    result = sync.run("--check")

    assert result.code == 2, result.output
    assert any("101" in line and "94" in line and "43" in line for line in fail_lines(result.output)), \
        result.output
    assert sync.writes() == []


def test_check_fails_when_the_next_run_would_suspend_more_than_the_limit(sync):
    sync.settings({"safety": {"max_suspensions": 2}})
    withdrawn(sync, [8601, 8602, 8603])
    sync.student(8604)
    sync.account(8604)

    result = sync.run("--check")

    assert result.code == 2, result.output
    assert any("3" in line and "max_suspensions" in line for line in fail_lines(result.output)), result.output


def test_check_shows_the_figures_as_ok_when_the_next_run_would_go_ahead(sync):
    school_of(sync, 8700, 24)
    withdrawn(sync, [8750])
    assert sync.run("--all", "--dry-run").code == 0

    result = sync.run("--check")

    assert result.code == 0, result.output
    ok = [line for line in result.output.splitlines() if line.startswith("OK")]
    assert any("max_suspensions" in line and "1" in line for line in ok), result.output
    assert any("max_school_drop_percent" in line for line in ok), result.output


# ---------------------------------------------------------------------------------------------
# 7. The summary email has an overall deadline (issue 11.10)
# ---------------------------------------------------------------------------------------------


class TricklingSmtp:
    """A loopback "SMTP server" that sends its greeting one byte at a time, never finishing
    it, for at most `lasts` seconds; then it hangs up."""

    def __init__(self, interval: float = 0.05, lasts: float = 4.0):
        self.interval, self.lasts = interval, lasts
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._trickle, args=(connection,), daemon=True).start()

    def _trickle(self, connection: socket.socket) -> None:
        greeting = b"220-" + b"x" * 10_000
        with connection:
            for count, byte in enumerate(greeting):
                if self.stop.is_set() or count * self.interval > self.lasts:
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return
                self.stop.wait(self.interval)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(timeout=2)


@pytest.fixture
def trickling():
    server = TricklingSmtp()
    yield server
    server.close()


def test_a_trickling_smtp_server_meets_the_overall_deadline_named_as_a_timeout(sync, trickling, monkeypatch):
    monkeypatch.setattr(student_sync, "EMAIL_DEADLINE_SECONDS", 0.5)
    sync.settings(email_settings(trickling.port, when="always"))
    sync.student(8801)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert sync.server.user(email(8801)) is not None
    lines = [line for line in result.output.splitlines() if "could not email the summary" in line]
    assert lines and "timed out" in lines[0], result.output


# ---------------------------------------------------------------------------------------------
# 8. The progress line and log lines on one terminal (issue 11.11)
# ---------------------------------------------------------------------------------------------


def screen(text: str) -> list[str]:
    """What a terminal shows: carriage return goes back to the start of the line and
    overwrites it, new line starts the next."""
    lines = []
    for raw in text.split("\n"):
        line: list[str] = []
        column = 0
        for char in raw:
            if char == "\r":
                column = 0
                continue
            if column < len(line):
                line[column] = char
            else:
                line.append(char)
            column += 1
        lines.append("".join(line).rstrip())
    return lines


def test_progress_line_is_ended_before_a_log_line_is_printed(monkeypatch):
    terminal = FakeTty()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    handler = student_sync.setup_logging(0)
    try:
        progress = student_sync.Progress("applying", 3, stream=terminal)
        progress.step()
        student_sync.log.info("create 200016@d118.org: create Ann Lee")
        progress.step()
        student_sync.log.warning("student 200017: kept in a frozen OU")
        progress.step()
        progress.close()
    finally:
        student_sync.log.removeHandler(handler)

    shown = [line for line in screen(terminal.text) if line]
    assert "create 200016@d118.org: create Ann Lee" in shown, shown
    assert "WARNING: student 200017: kept in a frozen OU" in shown, shown
    assert shown[-1] == "applying: 3/3", shown
    assert not any("applying" in line and "@" in line for line in shown), shown


# ---------------------------------------------------------------------------------------------
# More of the same guards
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["other-sku", "assign-to-staff", "two-labels"])
def test_apply_plan_refuses_a_tampered_licence_change(sync, tmp_path, case):
    PRODUCT, PLUS = "101031", "1010310008"                      # Education Plus (Student)
    sync.settings({"licenses": {"product_id": PRODUCT, "sku_id": PLUS, "assign": True}})
    sync.student(7051)
    sync.account(7051)
    sync.server.add_user("principal@d118.org", given="Pat", family="Principal", org_unit="/Staff")
    path = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(path)).code == 0
    document = json.loads(path.read_text(encoding="utf-8"))
    [index] = [i for i, c in enumerate(document["changes"]) if c["action"] == "license"]
    change = document["changes"][index]
    if case == "other-sku":
        change["after"] = {"license": "1010310009"}
    elif case == "assign-to-staff":
        change["email"] = "principal@d118.org"
    else:
        change["labels"] = ["assign license", "release license"]
    bad = write_json(tmp_path / "tampered.json", document)
    sync.server.clear_requests()

    result = sync.run("--apply-plan", str(bad))

    assert result.code == 2, result.output
    assert sync.writes() == []
    assert f"changes[{index}]" in result.output


def test_an_undo_can_itself_be_undone(sync):
    base = 7060
    sync.student(base)                                          # created
    sync.student(base + 1, "Anne")                              # unsuspended, moved, renamed
    sync.account(base + 1, given="Annie", org_unit=SUSPENDED_OU, suspended=True)
    sync.student(base + 2)                                      # attributes never set before
    sync.server.add_user(email(base + 2), given="Ann", family="Lee", org_unit=WHS_9)
    withdrawn(sync, [base + 3])                                 # suspended
    synced = sync.run("--all")
    assert synced.code == 0, synced.output
    after_sync = {n: looks_of(sync.server, n) for n in range(base, base + 4)}
    undone = sync.run("--undo", run_id_of(synced))
    assert undone.code == 0, undone.output

    redone = sync.run("--undo", run_id_of(undone))

    assert redone.code == 0, redone.output
    for number in (base + 1, base + 3):
        assert looks_of(sync.server, number) == after_sync[number], number
    assert looks_of(sync.server, base)[0] is False              # the created account is open again


def test_allow_older_plan_without_a_plan_is_a_usage_error(sync):
    sync.student(7070)

    result = sync.run("--all", "--allow-older-plan")

    assert result.code == 2, result.output
    assert "--apply-plan" in result.output
    assert sync.writes() == []
