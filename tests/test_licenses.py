"""Licences (SPEC section 8): Google Workspace for Education seats follow the students.

Every test runs the command line in-process against the local Directory API server, which
also serves the Enterprise License Manager API (testkit/licensing.py), and a SQLite
PowerSchool (see conftest.py).  They assert what an administrator would notice: who holds
the licence afterwards, the calls Google saw, exit codes, log, report, plan and journal.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from conftest import WHS_9, email
import student_sync
from testkit import district
from testkit.directory_server import FaultPlan
from test_safety import token_endpoint  # noqa: F401 - a fixture

PRODUCT, PLUS, STANDARD = "101031", "1010310008", "1010310005"
SCOPE = "https://www.googleapis.com/auth/apps.licensing"
LICENSING = "/apps/licensing/v1/"
JOURNAL_LINE = re.compile(r"journal: (\S+) \(undo with --undo (\S+)\)")
WINTER, SUMMER = "2026-03-02", "2026-07-01"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_backoff(monkeypatch):
    """Retries happen as often as ever, without the waiting."""
    monkeypatch.setattr(student_sync.RetryPolicy, "delay", lambda self, retry: 0.0)


def with_licences(sync, **keys) -> None:
    """A [licenses] section for Education Plus (Student), plus `keys`."""
    section = {"product_id": PRODUCT, "sku_id": PLUS}
    section.update(keys)
    sync.settings({"licenses": section})


def give(sync, number: int, *, auto: bool = False) -> None:
    sync.server.licensing.assign(email(number), PLUS, auto=auto)


def holds(sync, number: int) -> bool:
    return sync.server.licensing.holds(email(number), PLUS)


def licence_calls(sync, method: str | None = None) -> list:
    return [r for r in sync.server.requests
            if r.path.startswith(LICENSING) and (method is None or r.method == method)]


def licence_writes(sync) -> list[tuple[str, str]]:
    """(method, user) of every licence insert and delete, in the order the server saw them."""
    found = []
    for r in licence_calls(sync):
        if r.method == "POST":
            found.append(("assign", (r.body or {}).get("userId", "").lower()))
        elif r.method == "DELETE":
            found.append(("release", r.path.rsplit("/", 1)[1].lower()))
    return found


def graduate(sync, number: int, class_of: int = 2026) -> None:
    """A graduate of `class_of` whose account is still open in a building OU."""
    sync.student(number, class_of=class_of, status=3, school=999999, grade=99)
    sync.account(number, class_of=class_of)


def withdrawn(sync, number: int) -> None:
    sync.student(number, status=2)
    sync.account(number)


def report_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as stream:
        return list(csv.DictReader(stream))


def run_id_of(result) -> str:
    match = JOURNAL_LINE.search(result.output)
    assert match, f"no journal line in:\n{result.output}"
    return match.group(2)


def journal(sync, run_id: str) -> list[dict]:
    path = sync.folder / "logs" / f"journal-{run_id}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# 1. Without [licenses]: nothing licence-related at all
# ---------------------------------------------------------------------------------------------


def test_without_a_licenses_section_no_licensing_call_is_made(sync):
    graduate(sync, 100)
    give(sync, 100)
    sync.student(101)

    result = sync.run("--all", "--as-of", WINTER)

    assert result.code == 0, result.output
    assert licence_calls(sync) == []
    assert holds(sync, 100)
    assert sync.server.user(email(101)) is not None


def test_without_a_licenses_section_the_scope_is_not_asked_for(sync):
    settings = student_sync.load_settings(sync.settings_path)
    with_licences(sync)
    licensed = student_sync.load_settings(sync.settings_path)
    assert SCOPE not in student_sync.scopes_for(settings)
    assert SCOPE in student_sync.scopes_for(licensed)
    assert set(student_sync.scopes_for(settings)) < set(student_sync.scopes_for(licensed))


# ---------------------------------------------------------------------------------------------
# 2. The rules
# ---------------------------------------------------------------------------------------------


def test_graduate_is_suspended_and_loses_the_licence(sync):
    with_licences(sync)
    graduate(sync, 200)
    give(sync, 200)

    result = sync.run("--all", "--as-of", WINTER)

    assert result.code == 0, result.output
    assert sync.server.user(email(200))["suspended"] is True
    assert not holds(sync, 200)
    assert licence_writes(sync) == [("release", email(200))]


def test_graduate_in_summer_grace_keeps_the_account_and_loses_the_licence(sync):
    with_licences(sync)
    graduate(sync, 210, class_of=2026)
    give(sync, 210)

    result = sync.run("--all", "--as-of", SUMMER)

    assert result.code == 0, result.output
    assert sync.server.user(email(210))["suspended"] is False
    assert not holds(sync, 210)


def test_release_graduated_off_keeps_the_grace_graduates_licence(sync):
    with_licences(sync, release_graduated=False)
    graduate(sync, 220, class_of=2026)
    give(sync, 220)

    result = sync.run("--all", "--as-of", SUMMER)

    assert result.code == 0, result.output
    assert holds(sync, 220)
    assert licence_writes(sync) == []


def test_withdrawn_student_is_suspended_and_loses_the_licence(sync):
    with_licences(sync)
    withdrawn(sync, 230)
    give(sync, 230)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert sync.server.user(email(230))["suspended"] is True
    assert not holds(sync, 230)


def test_release_suspended_off_keeps_a_withdrawn_students_licence(sync):
    with_licences(sync, release_suspended=False)
    withdrawn(sync, 240)
    give(sync, 240)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert sync.server.user(email(240))["suspended"] is True
    assert holds(sync, 240)


def test_assign_gives_active_students_the_licence_they_lack(sync):
    with_licences(sync, assign=True)
    sync.student(250)
    sync.account(250)
    sync.student(251)
    sync.account(251)
    give(sync, 251)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert holds(sync, 250) and holds(sync, 251)
    assert licence_writes(sync) == [("assign", email(250))]


def test_without_assign_nobody_is_given_a_licence(sync):
    with_licences(sync)  # assign defaults to false
    sync.student(260)
    sync.account(260)
    sync.student(261)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert not holds(sync, 260) and not holds(sync, 261)
    assert licence_calls(sync, "POST") == []


def test_assign_skips_graduates_and_suspended_students(sync):
    with_licences(sync, assign=True)
    graduate(sync, 270, class_of=2026)   # in summer grace: open, but graduated
    withdrawn(sync, 271)

    result = sync.run("--all", "--as-of", SUMMER)

    assert result.code == 0, result.output
    assert licence_calls(sync, "POST") == []


def test_new_account_is_assigned_after_its_insert(sync):
    with_licences(sync, assign=True)
    sync.student(280, "Nia", "Park")

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert holds(sync, 280)
    order = [(r.method, r.path) for r in sync.server.requests if r.method == "POST"]
    assert order == [("POST", "/admin/directory/v1/users"),
                     ("POST", f"{LICENSING}product/{PRODUCT}/sku/{PLUS}/user")]


def test_new_account_whose_insert_failed_is_not_assigned(sync, no_backoff):
    with_licences(sync, assign=True)
    sync.student(285, "Nia", "Park")
    sync.server.faults = FaultPlan(rate=1.0, statuses=(500,), only_writes=True, seed=3)

    result = sync.run("--all")

    assert result.code == 1, result.output
    assert licence_calls(sync, "POST") == []


def test_accounts_of_no_student_in_scope_are_never_touched(sync):
    with_licences(sync, assign=True)
    sync.server.add_user("teacher@d118.org", given="Tess", family="Cher", org_unit="/Staff")
    sync.server.licensing.assign("teacher@d118.org", PLUS)
    sync.server.add_user(email(290), given="Ann", family="Lee", org_unit=WHS_9, suspended=True)
    sync.server.licensing.assign(email(290), PLUS)      # an account no PowerSchool row names
    sync.student(291, school=102, grade=7)               # a student of another building
    sync.account(291, org_unit=district.building_ou("LMS") + "/7th", school=102)
    sync.student(292)
    sync.account(292)

    result = sync.run("--building", "101")

    assert result.code == 0, result.output
    assert sync.server.licensing.holds("teacher@d118.org", PLUS)
    assert holds(sync, 290)
    assert not holds(sync, 291)
    assert licence_writes(sync) == [("assign", email(292))]


def test_students_failed_or_skipped_for_bad_data_are_not_touched(sync):
    with_licences(sync, assign=True)
    sync.student(300, status=None)          # no ENROLL_STATUS: failed for bad data
    sync.account(300, suspended=True)
    give(sync, 300)
    sync.student(301, "Test", "Student", status=2)    # a test account: skipped
    sync.account(301)
    give(sync, 301)
    sync.student(302, grade=42)             # a grade with no OU: failed
    sync.account(302)

    result = sync.run("--all")

    assert result.code == 1, result.output
    assert holds(sync, 300) and holds(sync, 301) and not holds(sync, 302)
    assert licence_writes(sync) == []


def test_holders_are_read_in_pages_of_1000_never_per_account(sync):
    with_licences(sync, assign=True)
    for number in range(1000, 1030):
        sync.student(number)
        sync.account(number)
        give(sync, number)

    result = sync.run("--all")

    assert result.code == 0, result.output
    reads = licence_calls(sync, "GET")
    assert [r.path for r in reads] == [f"{LICENSING}product/{PRODUCT}/sku/{PLUS}/users"]
    assert reads[0].query["maxResults"] == "1000"
    assert reads[0].query["customerId"] == sync.server.customer_id
    assert licence_writes(sync) == []


def test_customer_id_from_the_settings_is_used(sync):
    with_licences(sync, customer_id=sync.server.customer_id)
    sync.student(310)
    sync.account(310)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert [r.query["customerId"] for r in licence_calls(sync, "GET")] == [sync.server.customer_id]


def test_a_customer_id_google_refuses_stops_before_any_change(sync):
    with_licences(sync, customer_id="C0nothers")
    withdrawn(sync, 320)

    result = sync.run("--all")

    assert result.code == 2, result.output
    assert "customer" in result.output.lower()
    assert sync.writes() == []


# ---------------------------------------------------------------------------------------------
# 3. Applying: order, seats, odd answers
# ---------------------------------------------------------------------------------------------


def test_releases_go_out_before_assigns_so_freed_seats_serve_new_students(sync):
    with_licences(sync, assign=True)
    graduate(sync, 400)
    give(sync, 400)
    sync.student(401, "Nia", "Park")
    sync.server.licensing.seats[PLUS] = 1   # every seat taken

    result = sync.run("--all", "--as-of", WINTER)

    assert result.code == 0, result.output
    assert not holds(sync, 400) and holds(sync, 401)
    assert licence_writes(sync) == [("release", email(400)), ("assign", email(401))]


def test_out_of_seats_stops_assigning_with_one_error_and_the_rest_goes_out(sync):
    with_licences(sync, assign=True)
    graduate(sync, 410)
    give(sync, 410)
    waiting = list(range(420, 432))
    for number in waiting:
        sync.student(number)
        sync.account(number)
    withdrawn(sync, 415)
    sync.server.licensing.seats[PLUS] = 1   # the one seat the release frees

    result = sync.run("--all", "--as-of", WINTER, "--report", str(sync.folder / "r.csv"))

    assert result.code == 1, result.output
    assert not holds(sync, 410)
    assert sync.server.user(email(415))["suspended"] is True
    assert sum(holds(sync, n) for n in waiting) == 1
    assigns = [w for w in licence_writes(sync) if w[0] == "assign"]
    assert 2 <= len(assigns) < len(waiting)   # no more assigns once Google said none are left
    errors = [line for line in result.output.splitlines() if PLUS in line and "11 assigns" in line]
    assert len(errors) == 1, result.output
    failed = [r for r in report_rows(sync.folder / "r.csv") if r["result"].startswith("failed")]
    assert len(failed) == 11
    assert "11 failed" in result.output


def test_release_answered_404_counts_as_done(sync, monkeypatch):
    with_licences(sync)
    withdrawn(sync, 420)
    give(sync, 420)
    licensing = sync.server.licensing
    original = licensing.execute

    def gone_meanwhile(method, path, query, body):
        if method == "DELETE" and licensing.holds(email(420), PLUS):
            licensing.release(email(420), PLUS)   # someone released it by hand a moment ago
        return original(method, path, query, body)

    monkeypatch.setattr(licensing, "execute", gone_meanwhile)

    result = sync.run("--all", "--report", str(sync.folder / "r.csv"))

    assert result.code == 0, result.output
    assert [r.status for r in licence_calls(sync, "DELETE")] == [404]
    rows = [r for r in report_rows(sync.folder / "r.csv") if "license" in r["action"]]
    assert [r["result"] for r in rows] == ["applied"]


def test_automatic_licence_fails_the_student_pointing_at_the_admin_console(sync):
    with_licences(sync)
    withdrawn(sync, 430)
    give(sync, 430, auto=True)
    withdrawn(sync, 431)
    give(sync, 431)

    result = sync.run("--all")

    assert result.code == 1, result.output
    assert holds(sync, 430) and not holds(sync, 431)
    assert sync.server.user(email(430))["suspended"] is True   # the account change stays
    lines = [line for line in result.output.splitlines() if "430" in line and "automatic" in line.lower()]
    assert lines and "Admin console" in lines[0], result.output


def test_a_failing_licence_call_leaves_the_account_change_and_the_next_run_retries(sync, no_backoff):
    with_licences(sync)
    withdrawn(sync, 440)
    give(sync, 440)
    licensing = sync.server.licensing
    original = licensing.execute
    broken = {"on": True}

    def down(method, path, query, body):
        if method == "DELETE" and broken["on"]:
            from testkit.directory_server import _fault_response
            return _fault_response("503")
        return original(method, path, query, body)

    licensing.execute = down

    result = sync.run("--all")

    assert result.code == 1, result.output
    assert sync.server.user(email(440))["suspended"] is True
    assert holds(sync, 440)

    broken["on"] = False
    sync.server.clear_requests()
    result = sync.run("--all")

    assert result.code == 0, result.output
    assert not holds(sync, 440)
    assert [r.method for r in sync.writes()] == ["DELETE"]


def test_a_licence_already_held_on_assign_counts_as_done(sync, monkeypatch):
    with_licences(sync, assign=True)
    sync.student(450)
    sync.account(450)
    licensing = sync.server.licensing
    original = licensing.execute

    def given_meanwhile(method, path, query, body):
        if method == "POST" and not licensing.holds(email(450), PLUS):
            licensing.assign(email(450), PLUS)
        return original(method, path, query, body)

    monkeypatch.setattr(licensing, "execute", given_meanwhile)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert [r.status for r in licence_calls(sync, "POST")] == [409]
    assert holds(sync, 450)


def test_token_without_the_licensing_scope_is_exit_2_before_any_change(sync):
    with_licences(sync)
    withdrawn(sync, 460)
    give(sync, 460)
    sync.server.licensing.scope_granted = False

    result = sync.run("--all")

    assert result.code == 2, result.output
    assert "--authorize" in result.output and "licens" in result.output.lower()
    assert sync.writes() == []
    assert sync.server.user(email(460))["suspended"] is False


# ---------------------------------------------------------------------------------------------
# 4. Licence changes are changes like any other
# ---------------------------------------------------------------------------------------------


def test_dry_run_shows_licence_changes_and_makes_none(sync):
    with_licences(sync, assign=True)
    graduate(sync, 500)
    give(sync, 500)
    sync.student(501)
    sync.account(501)

    result = sync.run("--all", "--dry-run", "--as-of", WINTER, "--report", str(sync.folder / "r.csv"))

    assert result.code == 0, result.output
    assert sync.writes() == []
    assert re.search(r"would release license.*" + re.escape(email(500)), result.output), result.output
    assert re.search(r"would assign license.*" + re.escape(email(501)), result.output), result.output
    assert "1 license assigns, 1 license releases" in result.output
    rows = {(r["email"], r["action"]): r["result"] for r in report_rows(sync.folder / "r.csv")}
    assert rows[(email(500), "release license")] == "planned"
    assert rows[(email(501), "assign license")] == "planned"


def test_report_and_summary_name_the_licence_changes(sync):
    with_licences(sync, assign=True)
    withdrawn(sync, 510)
    give(sync, 510)
    sync.student(511)
    sync.account(511)

    result = sync.run("--all", "--report", str(sync.folder / "r.csv"))

    assert result.code == 0, result.output
    rows = {(r["email"], r["action"]): r for r in report_rows(sync.folder / "r.csv")}
    release = rows[(email(510), "release license")]
    assert release["result"] == "applied" and PLUS in release["detail"]
    assert rows[(email(511), "assign license")]["result"] == "applied"
    assert "1 license assigns, 1 license releases" in result.output


def test_plan_file_holds_licence_changes_in_the_specs_shape(sync, tmp_path):
    with_licences(sync, assign=True)
    withdrawn(sync, 520)
    give(sync, 520)
    sync.student(521)
    sync.account(521)
    plan_path = tmp_path / "plan.json"

    result = sync.run("--all", "--dry-run", "--plan-out", str(plan_path))

    assert result.code == 0, result.output
    changes = [c for c in json.loads(plan_path.read_text(encoding="utf-8"))["changes"]
               if c["action"] == "license"]
    by_email = {c["email"]: c for c in changes}
    release, assign = by_email[email(520)], by_email[email(521)]
    assert (release["labels"], release["before"], release["after"]) == (
        ["release license"], {"license": PLUS}, None)
    assert (assign["labels"], assign["before"], assign["after"]) == (
        ["assign license"], None, {"license": PLUS})
    assert release["student_number"] == 520


def test_apply_plan_applies_licence_changes_and_skips_stale_ones(sync, tmp_path):
    with_licences(sync, assign=True)
    for number in (530, 531):
        withdrawn(sync, number)
        give(sync, number)
    for number in (532, 533):
        sync.student(number)
        sync.account(number)
    plan_path = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(plan_path)).code == 0
    sync.server.licensing.release(email(531), PLUS)    # released by hand since
    sync.server.licensing.assign(email(533), PLUS)     # assigned by hand since
    sync.server.clear_requests()

    result = sync.run("--apply-plan", str(plan_path), "--report", str(tmp_path / "r.csv"))

    assert result.code == 0, result.output
    assert not holds(sync, 530) and holds(sync, 532)
    assert sorted(licence_writes(sync)) == [("assign", email(532)), ("release", email(530))]
    rows = {(r["email"], r["action"]): r["result"] for r in report_rows(tmp_path / "r.csv")}
    assert rows[(email(531), "release license")].startswith("stale")
    assert rows[(email(533), "assign license")].startswith("stale")


def test_journal_and_undo_reverse_licence_changes(sync):
    with_licences(sync, assign=True)
    withdrawn(sync, 540)
    give(sync, 540)
    sync.student(541)
    sync.account(541)

    result = sync.run("--all")
    assert result.code == 0, result.output
    run_id = run_id_of(result)
    entries = [e for e in journal(sync, run_id) if e["action"] == "license"]
    assert sorted((e["email"], e["labels"][0], e["result"]) for e in entries) == [
        (email(540), "release license", "applied"), (email(541), "assign license", "applied")]
    assert not holds(sync, 540) and holds(sync, 541)

    result = sync.run("--undo", run_id)

    assert result.code == 0, result.output
    assert holds(sync, 540) and not holds(sync, 541)
    assert sync.server.user(email(540))["suspended"] is False


def test_undo_of_a_release_when_no_seat_is_free_fails_that_student(sync):
    with_licences(sync)
    withdrawn(sync, 550)
    give(sync, 550)
    result = sync.run("--all")
    assert result.code == 0, result.output
    sync.server.add_user("staff@d118.org", given="S", family="T", org_unit="/Staff")
    sync.server.licensing.assign("staff@d118.org", PLUS)
    sync.server.licensing.seats[PLUS] = 1   # the freed seat went to someone else

    result = sync.run("--undo", run_id_of(result))

    assert result.code == 1, result.output
    assert not holds(sync, 550)
    assert PLUS in result.output


def test_more_releases_than_max_releases_stop_the_run(sync):
    with_licences(sync, max_releases=2)
    for number in (560, 561, 562):
        withdrawn(sync, number)
        give(sync, number)

    result = sync.run("--all")

    assert result.code == 3, result.output
    assert "max_releases" in result.output
    assert sync.writes() == []
    assert all(holds(sync, n) for n in (560, 561, 562))

    result = sync.run("--all", "--allow-mass-changes")

    assert result.code == 0, result.output
    assert not any(holds(sync, n) for n in (560, 561, 562))


def test_exactly_max_releases_goes_through(sync):
    with_licences(sync, max_releases=2)
    for number in (570, 571):
        withdrawn(sync, number)
        give(sync, number)

    assert sync.run("--all").code == 0
    assert not holds(sync, 570) and not holds(sync, 571)


def test_licence_fingerprint_makes_an_older_plan_with_other_licence_settings_an_error(sync, tmp_path):
    with_licences(sync, assign=True)
    sync.student(580)
    sync.account(580)
    plan_path = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(plan_path)).code == 0
    with_licences(sync, assign=True, sku_id=STANDARD)

    result = sync.run("--apply-plan", str(plan_path))

    assert result.code == 2, result.output
    assert licence_writes(sync) == []


# ---------------------------------------------------------------------------------------------
# 5. --check and settings
# ---------------------------------------------------------------------------------------------


def test_check_reports_the_sku_and_the_holders_in_scope(sync):
    with_licences(sync)
    for number in (600, 601):
        sync.student(number)
        sync.account(number)
        give(sync, number)
    sync.server.add_user("staff@d118.org", given="S", family="T", org_unit="/Staff")
    sync.server.licensing.assign("staff@d118.org", PLUS)

    result = sync.run("--check")

    assert result.code == 0, result.output
    line = next(line for line in result.output.splitlines() if PLUS in line)
    assert line.startswith("OK") and "2 accounts" in line, result.output
    assert sync.writes() == []


def test_check_fails_for_a_sku_google_does_not_know(sync):
    with_licences(sync, sku_id="1010319999")
    sync.student(610)
    sync.account(610)

    result = sync.run("--check")

    assert result.code == 2, result.output
    assert any(line.startswith("FAIL") and "1010319999" in line for line in result.output.splitlines())


def test_check_fails_without_the_licensing_scope(sync):
    with_licences(sync)
    sync.server.add_user("admin@d118.org", given="Ad", family="Min", org_unit="/Staff")
    sync.server.licensing.scope_granted = False

    result = sync.run("--check")

    assert result.code == 2, result.output
    fail = [line for line in result.output.splitlines() if line.startswith("FAIL") and "licens" in line.lower()]
    assert fail and "--authorize" in fail[0]


def test_check_without_licenses_says_nothing_about_licences(sync):
    result = sync.run("--check")
    assert result.code == 0, result.output
    assert licence_calls(sync) == []


@pytest.mark.parametrize("keys, named", [
    ({"product_id": PRODUCT, "sku_id": "1010310008 plus"}, "sku_id"),   # both default (SPEC 5); wrong ones are errors
    ({"product_id": "", "sku_id": PLUS}, "product_id"),
    ({"product_id": PRODUCT, "sku_id": PLUS, "assign": "yes"}, "assign"),
    ({"product_id": PRODUCT, "sku_id": PLUS, "max_releases": -1}, "max_releases"),
    ({"product_id": PRODUCT, "sku_id": PLUS, "customer_id": "d118.org!"}, "customer_id"),
    ({"product_id": PRODUCT, "sku_id": PLUS, "skuid": PLUS}, "skuid"),
])
def test_bad_licenses_settings_are_exit_2_naming_the_key(sync, keys, named):
    sync.settings({"licenses": keys})

    result = sync.run("--all")

    assert result.code == 2, result.output
    assert "[licenses]" in result.output and named in result.output


# ---------------------------------------------------------------------------------------------
# 6. Authorization
# ---------------------------------------------------------------------------------------------


def write_token(path: Path, scopes: list[str]) -> None:
    """A saved OAuth token that is still valid (no refresh needed) with these scopes."""
    path.write_text(json.dumps({
        "token": "ya29.test-token", "refresh_token": "1//refresh", "client_id": "id.apps.googleusercontent.com",
        "client_secret": "secret", "token_uri": "https://oauth2.googleapis.com/token",
        "scopes": scopes, "expiry": "2099-01-01T00:00:00Z"}), encoding="utf-8")


def oauth_with_licences(sync) -> None:
    sync.settings({"google": {"auth": "oauth", "token_file": "token.json",
                              "credentials_file": "credentials.json"},
                   "licenses": {"product_id": PRODUCT, "sku_id": PLUS}})


def test_saved_token_without_the_licensing_scope_is_exit_2_asking_for_authorize(sync):
    oauth_with_licences(sync)
    write_token(sync.folder / "token.json", list(student_sync.SCOPES))
    withdrawn(sync, 700)

    result = sync.run("--all")

    assert result.code == 2, result.output
    assert "--authorize" in result.output and SCOPE in result.output
    assert sync.writes() == []


def test_saved_token_with_the_licensing_scope_runs(sync):
    oauth_with_licences(sync)
    write_token(sync.folder / "token.json", [*student_sync.SCOPES, SCOPE])
    withdrawn(sync, 710)
    give(sync, 710)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert not holds(sync, 710)


def test_authorize_asks_for_the_licensing_scope_only_with_a_licenses_section(sync, monkeypatch):
    import google_auth_oauthlib.flow

    asked: list[list[str]] = []

    class Flow:
        def run_local_server(self, port=0):
            class Credentials:
                def to_json(self):
                    return json.dumps({"token": "t", "scopes": asked[-1]})
            return Credentials()

    def from_client_secrets_file(path, scopes, **kwargs):
        asked.append(list(scopes))
        return Flow()

    monkeypatch.setattr(google_auth_oauthlib.flow.InstalledAppFlow, "from_client_secrets_file",
                        staticmethod(from_client_secrets_file))
    (sync.folder / "credentials.json").write_text(
        (Path(__file__).resolve().parent.parent / "credentials.json.example").read_text(encoding="utf-8"),
        encoding="utf-8")
    sync.settings({"google": {"auth": "oauth", "token_file": "token.json", "credentials_file": "credentials.json"}})
    assert sync.run("--authorize").code == 0
    oauth_with_licences(sync)
    assert sync.run("--authorize").code == 0

    assert SCOPE not in asked[0] and SCOPE in asked[1]


# ---------------------------------------------------------------------------------------------
# 7. Lost answers
# ---------------------------------------------------------------------------------------------


def lose_first_answer(sync, monkeypatch, method: str) -> None:
    """The first licence call of `method` is applied, then answered 503 (its answer lost)."""
    from testkit.directory_server import _fault_response

    licensing = sync.server.licensing
    original = licensing.execute
    lost = {"done": False}

    def execute(verb, path, query, body):
        response = original(verb, path, query, body)
        if verb == method and not lost["done"] and response.status < 300:
            lost["done"] = True
            return _fault_response("503")
        return response

    monkeypatch.setattr(licensing, "execute", execute)


def test_a_release_whose_answer_was_lost_is_journalled_and_undone(sync, monkeypatch, no_backoff):
    with_licences(sync)
    withdrawn(sync, 800)
    give(sync, 800)
    lose_first_answer(sync, monkeypatch, "DELETE")

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert [r.status for r in licence_calls(sync, "DELETE")] == [503, 404]
    entries = [e for e in journal(sync, run_id_of(result)) if e["action"] == "license"]
    assert [e["result"] for e in entries] == ["applied"]
    assert not holds(sync, 800)

    assert sync.run("--undo", run_id_of(result)).code == 0
    assert holds(sync, 800)


def test_an_assign_whose_answer_was_lost_is_journalled_and_undone(sync, monkeypatch, no_backoff):
    with_licences(sync, assign=True)
    sync.student(810)
    sync.account(810)
    lose_first_answer(sync, monkeypatch, "POST")

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert [r.status for r in licence_calls(sync, "POST")] == [503, 409]
    entries = [e for e in journal(sync, run_id_of(result)) if e["action"] == "license"]
    assert [e["result"] for e in entries] == ["applied"]

    assert sync.run("--undo", run_id_of(result)).code == 0
    assert not holds(sync, 810)


def test_a_licence_found_already_released_is_not_reassigned_by_undo(sync, monkeypatch):
    with_licences(sync)
    withdrawn(sync, 820)
    give(sync, 820)
    licensing = sync.server.licensing
    original = licensing.execute

    def gone_meanwhile(method, path, query, body):
        if method == "DELETE" and licensing.holds(email(820), PLUS):
            licensing.release(email(820), PLUS)
        return original(method, path, query, body)

    monkeypatch.setattr(licensing, "execute", gone_meanwhile)
    result = sync.run("--all")
    assert result.code == 0, result.output
    monkeypatch.setattr(licensing, "execute", original)

    assert sync.run("--undo", run_id_of(result)).code == 0
    assert not holds(sync, 820)   # this run never took it: its undo does not give it back


def test_service_account_without_the_licensing_scope_delegated_is_exit_2_naming_it(sync, token_endpoint):
    from test_safety import NO_DELEGATION, write_service_account_key

    token_endpoint.status, token_endpoint.answer = 401, NO_DELEGATION
    write_service_account_key(sync.folder / "service-account.json", token_endpoint.url)
    sync.settings({"google": {"auth": "service_account", "service_account_file": "service-account.json",
                              "delegated_admin": "admin@d118.org"},
                   "licenses": {"product_id": PRODUCT, "sku_id": PLUS}})
    withdrawn(sync, 720)

    result = sync.run("--all")

    assert result.code == 2, result.output
    assert "delegation" in result.output.lower() and SCOPE in result.output
    assert sync.writes() == []


def test_refused_scopes_at_refresh_are_exit_2_asking_for_authorize(sync, token_endpoint):
    from test_safety import write_token as write_expired_token

    token_endpoint.status = 400
    token_endpoint.answer = {"error": "invalid_scope", "error_description": "Bad Request"}
    sync.settings({"google": {"auth": "oauth", "token_file": "token.json"},
                   "licenses": {"product_id": PRODUCT, "sku_id": PLUS}})
    write_expired_token(sync.folder / "token.json", token_endpoint.url, expiry="2020-01-01T00:00:00Z")
    path = sync.folder / "token.json"
    token = json.loads(path.read_text(encoding="utf-8"))
    token["scopes"] = [*token["scopes"], SCOPE]   # says it has it; Google refuses it at refresh
    path.write_text(json.dumps(token), encoding="utf-8")
    withdrawn(sync, 730)

    result = sync.run("--all")

    assert result.code == 2, result.output
    assert "--authorize" in result.output and SCOPE in result.output
    assert sync.writes() == []


# ---------------------------------------------------------------------------------------------
# 8. Google's other wordings (an emulator or a later API version may answer so)
# ---------------------------------------------------------------------------------------------


def answer_instead(sync, monkeypatch, method: str, status: int, reason: str, message: str,
                   times: int = 1000) -> None:
    """The first `times` licence calls of `method` are answered with this error, unexecuted."""
    from testkit.directory_server import ApiError, _error_response

    licensing = sync.server.licensing
    original = licensing.execute
    left = {"n": times}

    def execute(verb, path, query, body):
        if verb == method and left["n"] > 0:
            left["n"] -= 1
            return _error_response(ApiError(status, reason, message))
        return original(verb, path, query, body)

    monkeypatch.setattr(licensing, "execute", execute)


def test_assign_answered_already_held_in_words_counts_as_done(sync, monkeypatch):
    with_licences(sync, assign=True)
    sync.student(900)
    sync.account(900)
    answer_instead(sync, monkeypatch, "POST", 412, "conditionNotMet",
                   "User already has a license for the specified product and SKU")

    result = sync.run("--all")

    assert result.code == 0, result.output


def test_assign_answered_another_sku_held_fails_the_student(sync, monkeypatch):
    with_licences(sync, assign=True)
    sync.student(905)
    sync.account(905)
    answer_instead(sync, monkeypatch, "POST", 412, "conditionNotMet",
                   "User already has a license for another sku of this product")

    result = sync.run("--all")

    assert result.code == 1, result.output
    assert "another sku" in result.output


def test_out_of_seats_in_other_words_stops_assigning(sync, monkeypatch):
    with_licences(sync, assign=True)
    for number in (910, 911, 912):
        sync.student(number)
        sync.account(number)
    answer_instead(sync, monkeypatch, "POST", 400, "invalid", "Insufficient licenses for the product-SKU pair")

    result = sync.run("--all")

    assert result.code == 1, result.output
    assert [line for line in result.output.splitlines() if "3 assigns were not made" in line]
    assert len(licence_calls(sync, "POST")) < 3 or all(r.status == 400 for r in licence_calls(sync, "POST"))


def test_a_new_account_unknown_for_a_moment_is_assigned_on_a_later_try(sync, monkeypatch):
    with_licences(sync, assign=True)
    sync.student(920, "Nia", "Park")
    answer_instead(sync, monkeypatch, "POST", 412, "conditionNotMet", "User not found", times=2)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert holds(sync, 920)
    assert [r.status for r in licence_calls(sync, "POST")] == [412, 412, 200]


def test_a_plan_or_journal_without_licence_changes_reads_no_licences(sync, tmp_path):
    with_licences(sync)
    withdrawn(sync, 930)
    plan_path = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(plan_path)).code == 0
    sync.server.clear_requests()

    result = sync.run("--apply-plan", str(plan_path))

    assert result.code == 0, result.output
    assert sync.server.user(email(930))["suspended"] is True
    assert licence_calls(sync) == []
    sync.server.clear_requests()

    assert sync.run("--undo", run_id_of(result)).code == 0
    assert licence_calls(sync) == []


def test_the_email_names_licence_changes_and_the_seats_that_ran_out(sync, smtp):
    from conftest import email_settings

    settings = email_settings(smtp.port)   # when = "problems"
    settings["licenses"] = {"product_id": PRODUCT, "sku_id": PLUS, "assign": True}
    sync.settings(settings)
    withdrawn(sync, 940)
    give(sync, 940)
    for number in (941, 942, 943):
        sync.student(number)
        sync.account(number)
    sync.server.licensing.seats[PLUS] = 1

    result = sync.run("--all")

    assert result.code == 1, result.output
    assert len(smtp.messages) == 1
    body = smtp.bodies()[0]
    assert "1 license assigns, 1 license releases" in body
    assert "2 assigns were not made" in body and PLUS in body


def test_many_assigns_out_of_seats_are_one_error_not_an_outage(sync):
    with_licences(sync, assign=True)
    waiting = list(range(950, 990))
    for number in waiting:
        sync.student(number)
        sync.account(number)
    sync.server.licensing.seats[PLUS] = 0

    result = sync.run("--all", "--report", str(sync.folder / "r.csv"))

    assert result.code == 1, result.output
    assert "outage" not in result.output.lower()
    assert [line for line in result.output.splitlines() if f"{len(waiting)} assigns were not made" in line]
    failed = [r for r in report_rows(sync.folder / "r.csv") if r["result"].startswith("failed")]
    assert len(failed) == len(waiting)
    assert len(licence_calls(sync, "POST")) < len(waiting)


def test_the_licensing_daily_quota_used_up_is_exit_2_saying_so(sync, monkeypatch, no_backoff):
    with_licences(sync)
    withdrawn(sync, 995)
    give(sync, 995)
    answer_instead(sync, monkeypatch, "GET", 403, "rateLimitExceeded",
                   "Quota exceeded for quota metric 'Queries' and limit 'Queries per day' of service "
                   "'licensing.googleapis.com'")

    result = sync.run("--all")

    assert result.code == 2, result.output
    assert "quota" in result.output.lower() and "customer_id" not in result.output
    assert sync.writes() == []
