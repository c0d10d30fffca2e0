"""The command line end to end: a SQLite PowerSchool, the local Directory API server, the real client."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import googleapiclient
import pytest

from conftest import FROZEN, LMS_7, PASSWORD, ROOT, WHS_9, WHS_10, email, make_settings, state
import student_sync
from testkit import district
from testkit.directory_server import FaultPlan

GRAD_OU = district.GRADUATED_OU
SUSPENDED_OU = district.SUSPENDED_OU


# --- one run brings every kind of student in step; a second run makes no writes -----------------


def test_run_applies_every_rule_and_second_run_makes_no_writes(sync):
    sync.student(1001, "ANN", "O'NEIL")                    # new: created, name title-cased
    sync.student(1002, grade=10)                           # moved to the 10th-grade OU
    sync.account(1002)
    sync.student(1003, "Anne", "Lee")                      # renamed
    sync.account(1003, given="Ann")
    sync.student(1004)                                     # returning: unsuspended and moved
    sync.account(1004, org_unit=SUSPENDED_OU, suspended=True)
    sync.student(1005, status=2)                           # withdrawn: suspended, out of groups
    sync.account(1005)
    sync.server.add_group("band@d118.org", members=[email(1005)])
    sync.student(1006, class_of=2026, status=3, school=999999, grade=99)   # graduate
    sync.account(1006, class_of=2026)
    sync.student(1007, grade=10)                           # frozen: left in its OU
    sync.account(1007, org_unit=FROZEN)
    sync.student(1008, "Test", "Student")                  # test account: skipped
    sync.student(1009, status=2)                           # withdrawn, no account: nothing

    result = sync.run("--all", "--as-of", "2026-11-28")

    assert result.code == 0, result.output
    assert state(sync.server, 1001) == ("Ann", "O'Neil", False, WHS_9)
    assert sync.server.user(email(1001))["customSchemas"][district.CATEGORY] == {
        district.SCHOOL_FIELD: "101", district.GRAD_FIELD: "2030"}
    assert state(sync.server, 1002) == ("Ann", "Lee", False, WHS_10)
    assert state(sync.server, 1003) == ("Anne", "Lee", False, WHS_9)
    assert state(sync.server, 1004) == ("Ann", "Lee", False, WHS_9)
    assert state(sync.server, 1005) == ("Ann", "Lee", True, SUSPENDED_OU)
    assert sync.server.groups_of(email(1005)) == set()
    assert state(sync.server, 1006) == ("Ann", "Lee", True, GRAD_OU)
    assert state(sync.server, 1007) == ("Ann", "Lee", False, FROZEN)
    assert sync.server.user(email(1008)) is None
    assert sync.server.user(email(1009)) is None
    assert "1007" in result.output and "frozen" in result.output
    assert "1008" in result.output and "skipped" in result.output

    sync.server.clear_requests()
    again = sync.run("--all", "--as-of", "2026-11-28")
    assert again.code == 0, again.output
    assert sync.writes() == []


def test_one_update_call_carries_all_of_an_accounts_changes(sync):
    sync.student(2001, "Anne", "Lee", grade=10)
    sync.account(2001, given="Ann", org_unit=SUSPENDED_OU, suspended=True, school=102, class_of=2029)

    assert sync.run("--all").code == 0

    writes = sync.writes()
    assert len(writes) == 1
    assert writes[0].method == "PUT"
    assert writes[0].body["suspended"] is False
    assert writes[0].body["orgUnitPath"] == WHS_10
    assert writes[0].body["name"] == {"givenName": "Anne", "familyName": "Lee"}
    assert writes[0].body["customSchemas"] == {district.CATEGORY: {
        district.SCHOOL_FIELD: "101", district.GRAD_FIELD: "2030"}}


def test_create_sends_password_ou_and_attributes_in_one_insert(sync):
    sync.student(2101, "Ann", "Lee", grade=9)

    assert sync.run("--all").code == 0

    [insert] = sync.writes()
    assert insert.method == "POST" and insert.path.endswith("/users")
    assert insert.body["password"] == PASSWORD
    assert insert.body["changePasswordAtNextLogin"] is True
    assert insert.body["orgUnitPath"] == WHS_9
    assert insert.body["customSchemas"][district.CATEGORY][district.SCHOOL_FIELD] == "101"


def test_suspension_removes_groups_before_suspending(sync):
    sync.student(2201, status=2)
    sync.account(2201)
    sync.server.add_group("band@d118.org", members=[email(2201)])
    sync.server.add_group("chess@d118.org", members=[email(2201)])

    assert sync.run("--all").code == 0

    writes = [(r.method, r.path) for r in sync.writes()]
    assert [m for m, _ in writes] == ["DELETE", "DELETE", "PUT"]
    assert sync.server.groups_of(email(2201)) == set()


def test_no_group_removal_when_setting_off(sync):
    sync.settings({"accounts": {"remove_groups_on_suspend": False}})
    sync.student(2301, status=2)
    sync.account(2301)
    sync.server.add_group("band@d118.org", members=[email(2301)])

    assert sync.run("--all").code == 0

    assert state(sync.server, 2301)[2] is True
    assert sync.server.groups_of(email(2301)) == {"band@d118.org"}


def test_summer_grace_keeps_graduate_active_in_july(sync):
    sync.student(2401, class_of=2026, status=3, school=999999, grade=99)
    sync.account(2401, class_of=2026)

    assert sync.run("--all", "--as-of", "2026-07-15").code == 0
    assert state(sync.server, 2401) == ("Ann", "Lee", False, GRAD_OU)

    assert sync.run("--all", "--as-of", "2026-09-01").code == 0
    assert state(sync.server, 2401) == ("Ann", "Lee", True, GRAD_OU)


# --- dry run ------------------------------------------------------------------------------------


def test_dry_run_prints_every_change_and_writes_nothing(sync, tmp_path):
    sync.student(3001)
    sync.student(3002, status=2)
    sync.account(3002)
    report = tmp_path / "plan.csv"

    result = sync.run("--all", "--dry-run", "--report", str(report))

    assert result.code == 0
    assert sync.writes() == []
    assert email(3001) in result.output and email(3002) in result.output
    assert "summary (planned): 1 creates" in result.output
    assert state(sync.server, 3002)[2] is False
    rows = report.read_text(encoding="utf-8-sig").splitlines()
    assert rows[0] == "student_number,email,action,detail,result"
    assert any(row.startswith("3001,") and row.endswith(",planned") for row in rows)


@pytest.mark.parametrize("password", [None, "short"])
def test_a_dry_run_without_the_new_account_password_shows_the_plan_and_answers_as_the_real_run(
        sync, monkeypatch, password):
    """SPEC 4: a dry run answers as the real run would. The missing (or short) password is a
    warning where it is found, the whole plan and its summary follow, and the dry run ends
    with the stop the real run meets: exit 2 (it exited 0, the real run 2)."""
    if password is None:
        monkeypatch.delenv("NEW_USER_PASSWORD")
    else:
        monkeypatch.setenv("NEW_USER_PASSWORD", password)
    sync.student(3101)

    dry = sync.run("--all", "--dry-run")
    assert dry.code == 2, dry.output
    assert "NEW_USER_PASSWORD" in dry.output
    assert f"would create: {email(3101)}" in dry.output and "summary (planned): 1 creates" in dry.output
    assert dry.output.rstrip().splitlines()[-1].count("a real run would stop here") == 1

    real = sync.run("--all")
    assert real.code == 2
    assert "NEW_USER_PASSWORD" in real.output
    assert sync.writes() == [] and sync.server.user(email(3101)) is None


def test_a_dry_run_of_a_reviewed_plan_without_the_password_answers_as_applying_it_would(
        sync, monkeypatch, tmp_path):
    sync.student(3102)
    plan = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(plan)).code == 0
    monkeypatch.delenv("NEW_USER_PASSWORD")

    dry = sync.run("--apply-plan", str(plan), "--dry-run")
    real = sync.run("--apply-plan", str(plan))

    assert (dry.code, real.code) == (2, 2), dry.output + real.output
    assert f"would create: {email(3102)}" in dry.output and "a real run would stop here" in dry.output
    assert sync.writes() == []


def test_short_password_is_exit_2_before_any_change(sync, monkeypatch):
    monkeypatch.setenv("NEW_USER_PASSWORD", "short")
    sync.student(3201)
    sync.student(3202, status=2)
    sync.account(3202)

    result = sync.run("--all")

    assert result.code == 2
    assert "shorter than 8" in result.output
    assert "short" not in result.output.replace("shorter", "")
    assert sync.writes() == []


def test_a_dry_run_does_not_claim_0_group_removals_for_suspensions_that_will_remove_groups(sync):
    """demo.py's dry run said "0 group removals" and the real run then made 6: which groups a
    suspended account leaves is read when the suspension is applied, so a planned summary says
    so instead of a figure."""
    sync.student(3301, status=2)
    sync.account(3301)
    sync.server.add_group("band@d118.org", members=[email(3301)])

    dry = sync.run("--all", "--dry-run")
    assert dry.code == 0, dry.output
    assert "1 suspends" in dry.output and "group removals" in dry.output
    assert "0 group removals" not in dry.output, dry.output
    assert "group removals for 1 of them are counted when applied" in dry.output

    real = sync.run("--all")
    assert "1 suspends" in real.output and "1 group removals" in real.output, real.output


def test_console_lines_name_each_change_once_and_read_as_sentences(sync):
    """A real run's line gave the verb twice ("create 3401@d118.org: create Ann Lee in ..."),
    a dry run's an odd one ("would attributes:")."""
    sync.student(3401)
    sync.student(3402)
    sync.account(3402, class_of=None)                      # lacks the graduation year

    dry = sync.run("--all", "--dry-run")
    assert f"would update attributes: {email(3402)} (attributes " in dry.output, dry.output
    assert "would attributes" not in dry.output

    real = sync.run("--all")
    assert f"{email(3401)}: create Ann Lee in {WHS_9}" in real.output, real.output
    assert f"create {email(3401)}" not in real.output and f"attributes {email(3402)}" not in real.output


# --- scopes and wrappers ------------------------------------------------------------------------


def test_building_scope_touches_only_that_building(sync):
    sync.student(4001, school=101)
    sync.student(4002, school=102, grade=7)

    assert sync.run("--building", "102").code == 0

    assert sync.server.user(email(4001)) is None
    assert state(sync.server, 4002) == ("Ann", "Lee", False, LMS_7)


def test_building_scope_weighs_rows_across_the_district(sync):
    # Withdrawn from 101, active at 102: a run for 101 must not suspend the account.
    sync.student(4101, status=2, school=101)
    sync.student(4101, status=0, school=102, grade=7)
    sync.account(4101, org_unit=LMS_7, school=102)

    result = sync.run("--building", "101")

    assert result.code == 0
    assert state(sync.server, 4101) == ("Ann", "Lee", False, LMS_7)
    assert "2 PowerSchool rows" in result.output


@pytest.mark.parametrize("here, elsewhere", [
    (500801, "0500801"),      # the other row's number written with a leading zero
    ("500802", 500802),       # the same digits, stored as text beside an integer
    (500803, "500803"),
])
def test_a_building_run_does_not_suspend_a_student_active_elsewhere_under_another_spelling(sync, here, elsewhere):
    """The SQLite copy stores STUDENT_NUMBER as it was written: the rows of one student (as the
    rules group them, by number) must all be read, however each is spelled, or a building run
    sees only the withdrawn row and suspends a student active at another school."""
    number = int(here)
    sync.student(here, status=2, school=101)                  # left WHS ...
    sync.student(elsewhere, school=102, grade=7)              # ... active at LMS
    sync.account(number, org_unit=LMS_7, school=102)

    result = sync.run("--building", "101")

    assert result.code == 0, result.output
    assert state(sync.server, number) == ("Ann", "Lee", False, LMS_7), result.output
    assert "2 PowerSchool rows" in result.output


def test_state_reporting_scope_leaves_excluded_schools(sync):
    sync.student(4201, school=101)
    sync.student(4202, school=102, grade=7)        # STATE_EXCLUDEFROMREPORTING NULL: included
    sync.student(4203, school=901, grade=-1)       # excluded

    assert sync.run("--state-reporting").code == 0

    assert sync.server.user(email(4201)) is not None
    assert sync.server.user(email(4202)) is not None
    assert sync.server.user(email(4203)) is None


def test_unknown_building_is_exit_2_naming_it(sync):
    result = sync.run("--building", "101", "555")
    assert result.code == 2
    assert "555" in result.output
    assert sync.server.requests == []


def test_accounts_outside_scope_are_never_touched(sync):
    sync.student(4301, school=102, grade=7)
    sync.server.add_user(email(9999), given="Not", family="Astudent", org_unit=WHS_9)
    sync.server.add_user("teacher@d118.org", given="Tea", family="Cher", org_unit="/")

    assert sync.run("--all").code == 0

    assert [r.path for r in sync.writes()] == ["/admin/directory/v1/users"]


@pytest.mark.parametrize("wrapper, arguments, expected", [
    ("sync_all.py", [], "for all"),
    ("sync_state_reporting.py", [], "for state-reporting"),
    ("sync_building.py", ["102"], "for building 102"),
])
def test_wrappers_choose_their_scope_and_pass_arguments_through(sync, wrapper, arguments, expected):
    sync.student(4401, school=102, grade=7)
    sync.ps.connection.commit()
    environment = dict(os.environ, NEW_USER_PASSWORD=PASSWORD)
    completed = subprocess.run(
        [sys.executable, str(ROOT / wrapper), *arguments, "--dry-run", "--config", str(sync.settings_path)],
        capture_output=True, text=True, env=environment, timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert expected in completed.stdout
    assert "would create" in completed.stdout
    assert sync.writes() == []


# --- exit codes and errors ----------------------------------------------------------------------


def test_bad_row_fails_that_student_and_the_run_goes_on(sync):
    sync.student(5001, status=None)
    sync.student(5002)

    result = sync.run("--all")

    assert result.code == 1
    assert "5001" in result.output and "ENROLL_STATUS" in result.output
    assert sync.server.user(email(5001)) is None
    assert sync.server.user(email(5002)) is not None


def test_missing_target_ou_reports_student_and_makes_no_call(sync):
    sync.ps.school(103, "Jefferson Elementary", "JES", 0)   # no OUs in Google for JES
    sync.student(5101, school=103, grade=3)
    sync.student(5102)

    result = sync.run("--all")

    assert result.code == 1
    assert "5101" in result.output and "JES Students/3rd" in result.output
    assert [r.body["primaryEmail"] for r in sync.writes()] == [email(5102)]


def test_settings_error_names_the_key(sync):
    sync.settings({"ous": {"grades": {"nine": "/9th"}}})
    result = sync.run("--all")
    assert result.code == 2
    assert "[ous] grades" in result.output and "nine" in result.output


def test_unknown_settings_key_is_an_error(sync):
    sync.settings({"google": {"max_request_per_second": 10}})
    result = sync.run("--all")
    assert result.code == 2
    assert "max_request_per_second" in result.output


def test_missing_required_key_is_an_error(sync):
    sync.settings(remove=[("ous", "student_prefix")])
    result = sync.run("--all")
    assert result.code == 2
    assert "[ous] student_prefix" in result.output


def test_google_tokens_are_never_sent_to_a_plain_http_endpoint_elsewhere(sync):
    sync.settings({"google": {"auth": "oauth", "api_endpoint": "http://proxy.d118.org:8080/"}})
    result = sync.run("--all")
    assert result.code == 2
    assert "[google] api_endpoint" in result.output and "https" in result.output


def test_no_scope_is_a_usage_error(sync):
    assert sync.run().code == 2


def test_unreachable_directory_is_exit_2(sync):
    sync.settings({"google": {"api_endpoint": "http://127.0.0.1:9/"}})
    sync.student(5201)
    result = sync.run("--all")
    assert result.code == 2
    assert "127.0.0.1:9" in result.output


def test_write_failing_after_retries_is_exit_1_and_names_the_student(sync, no_backoff):
    sync.student(5301, grade=10)
    sync.account(5301)
    sync.server.faults = FaultPlan(rate=1.0, statuses=(503,), only_writes=True, seed=1)

    result = sync.run("--all")

    assert result.code == 1
    assert "5301" in result.output and "503" in result.output
    puts = [r for r in sync.server.requests if r.method == "PUT"]
    assert len(puts) == student_sync.RetryPolicy().attempts


# --- requests: bulk reads only, and only what the discovery document defines ------------------


def test_no_change_run_makes_only_list_calls(sync):
    for number in range(6000, 6000 + 1100):
        sync.student(number, grade=9)
        sync.account(number)

    sync.server.clear_requests()
    result = sync.run("--all")

    assert result.code == 0
    assert sync.writes() == []
    user_lists = [r for r in sync.server.requests if r.path == "/admin/directory/v1/users"]
    # Listed from both ends at once: each end may read one page past the meeting point.
    assert len(user_lists) <= math.ceil(1100 / 500) + 2
    assert all(r.method == "GET" and r.query["maxResults"] == "500" and r.query["domain"] == "d118.org"
               for r in user_lists)
    assert len(sync.server.requests) == len(user_lists) + 1   # and one orgunits.list
    assert "1100 already in step" in result.output


def test_listing_from_both_ends_reads_every_account_of_the_domain(sync):
    # Students, staff and odd addresses spread over the whole email order.
    numbers = list(range(100, 1300, 1))
    for number in numbers:
        sync.student(number, grade=9)
        sync.account(number)
    for name in ["aaron", "zed", "_svc", "mid.dle", "o'hara"]:
        sync.server.add_user(f"{name}@d118.org", given="Staff", family="Member", org_unit="/")

    result = sync.run("--all", "-v")

    assert result.code == 0, result.output
    assert sync.writes() == []
    assert f"{len(numbers) + 5} accounts" in result.output


def _discovery():
    path = Path(googleapiclient.__file__).parent / "discovery_cache/documents/admin.directory_v1.json"
    return json.loads(path.read_text())


def _methods(resource):
    for method in resource.get("methods", {}).values():
        yield method
    for child in resource.get("resources", {}).values():
        yield from _methods(child)


def _match(method, request_path):
    import re

    pattern = re.escape("/" + method["path"])
    pattern = re.sub(r"\\\{\\\+[^}]+\\\}", ".+", pattern)
    pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", pattern)
    return re.fullmatch(pattern, request_path) is not None


def test_every_request_is_a_method_of_the_discovery_document(sync):
    sync.student(7001)
    sync.student(7002, grade=10)
    sync.account(7002)
    sync.student(7003, status=2)
    sync.account(7003)
    sync.server.add_group("band@d118.org", members=[email(7003)])

    assert sync.run("--all").code == 0

    discovery = _discovery()
    standard = set(discovery.get("parameters", {}))
    methods = list(_methods(discovery))
    assert sync.server.requests
    for request in sync.server.requests:
        candidates = [m for m in methods if m["httpMethod"] == request.method and _match(m, unquote(request.path))]
        assert candidates, f"{request.method} {request.path} is not in the discovery document"
        allowed = standard | {name for m in candidates for name, p in m.get("parameters", {}).items()
                              if p.get("location") == "query"}
        assert set(request.query) <= allowed, (request.path, set(request.query) - allowed)


def test_an_ou_missing_from_the_ou_list_is_asked_for_before_a_student_is_failed(server):
    # As if the server's OU list had left the 10th-grade OU out.
    settings = make_settings(google={"api_endpoint": server.url})
    client = student_sync.DirectoryClient(settings)
    listed = student_sync.Directory(accounts={}, org_units={"/": "/"})

    confirmed = student_sync.confirm_org_units(client, listed,
                                               [WHS_10.upper(), "/No Such OU"])

    assert confirmed.org_units[WHS_10.lower()] == WHS_10
    assert "/no such ou" not in confirmed.org_units
    gets = [r for r in server.requests if "/orgunits/" in r.path]
    assert len(gets) == 2
