"""Review, approval and undo (SPEC section 7): plan files, --apply-plan, the journal and
--undo, and the per-school source sanity check.

Every test runs the command line in-process against the local Directory API server and a
SQLite PowerSchool (see conftest.py).  Changes "by hand" between two runs go through the
server's own HTTP API, as an administrator's edit in the Admin console would.
"""

from __future__ import annotations

import csv
import json
import re
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import (LMS_7, PASSWORD, WHS_9, WHS_10, counts_file, email, logs, looks, looks_of,
                      run_id_of, withdrawn)
import student_sync
from testkit import district
from testkit.directory_server import FaultPlan

SUSPENDED_OU = district.SUSPENDED_OU
CATEGORY = district.CATEGORY
SCHOOL_FIELD = district.SCHOOL_FIELD
GRAD_FIELD = district.GRAD_FIELD


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def hand_edit(server, address: str, body: dict) -> None:
    """An administrator's edit of one account, through the server's users.update."""
    url = f"{server.url}admin/directory/v1/users/{urllib.parse.quote(address)}"
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), method="PUT",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as answer:
        assert answer.status == 200


def report_rows(path: Path) -> dict[str, dict]:
    """Change rows of a --report CSV, by email (notice rows left out)."""
    with open(path, encoding="utf-8-sig", newline="") as stream:
        rows = list(csv.DictReader(stream))
    return {r["email"]: r for r in rows if r["action"] not in ("error", "warning", "skip", "unowned")}


def fingerprint(sync) -> str:
    return student_sync.settings_fingerprint(student_sync.load_settings(sync.settings_path))


def every_kind_of_change(sync, base: int) -> dict[str, int]:
    """One student of each kind of change, and one already in step; returns their numbers."""
    numbers = {name: base + i for i, name in enumerate(
        ("create", "move", "rename", "attributes", "unsuspend", "suspend", "in_step"))}
    sync.student(numbers["create"], "ANN", "O'NEIL")
    sync.student(numbers["move"])
    sync.account(numbers["move"], org_unit=WHS_10)
    sync.student(numbers["rename"], "Anne", "Lee")
    sync.account(numbers["rename"], given="Annie")
    sync.student(numbers["attributes"])
    sync.account(numbers["attributes"], school=102, class_of=2029)
    sync.student(numbers["unsuspend"])
    sync.account(numbers["unsuspend"], org_unit=SUSPENDED_OU, suspended=True)
    sync.student(numbers["suspend"], status=2)
    sync.account(numbers["suspend"])
    sync.server.add_group("band@d118.org", members=[email(numbers["suspend"])])
    sync.student(numbers["in_step"])
    sync.account(numbers["in_step"])
    return numbers


# ---------------------------------------------------------------------------------------------
# 1. --plan-out
# ---------------------------------------------------------------------------------------------


def test_plan_out_dry_run_records_every_change_with_now_and_target_values(sync, tmp_path):
    n = every_kind_of_change(sync, 1000)
    plan_path = tmp_path / "review" / "plan.json"

    result = sync.run("--all", "--dry-run", "--plan-out", str(plan_path), "--as-of", "2026-03-02")

    assert result.code == 0, result.output
    assert sync.writes() == []
    text = plan_path.read_text(encoding="utf-8")
    assert PASSWORD not in text
    document = json.loads(text)
    assert document["format"]
    assert document["run_date"] == "2026-03-02"
    assert document["scope"]["kind"] == "all"
    assert sorted(document["scope"]["schools"]) == [101, 102, 901, 999999]
    assert document["settings_fingerprint"] == fingerprint(sync)
    changes = {c["email"]: c for c in document["changes"]}
    assert set(changes) == {email(n[k]) for k in n if k != "in_step"}
    for change in changes.values():
        assert set(change) >= {"student_number", "email", "action", "labels", "before", "after"}
        assert "password" not in change["after"] and "password" not in change["before"]

    create = changes[email(n["create"])]
    assert (create["student_number"], create["action"], create["labels"]) == (n["create"], "create", ["create"])
    assert create["before"] == {}
    assert create["after"]["primaryEmail"] == email(n["create"])
    assert create["after"]["name"] == {"givenName": "Ann", "familyName": "O'Neil"}
    assert create["after"]["orgUnitPath"] == WHS_9
    assert create["after"]["customSchemas"] == {CATEGORY: {SCHOOL_FIELD: "101", GRAD_FIELD: "2030"}}

    move = changes[email(n["move"])]
    assert (move["action"], move["labels"]) == ("update", ["move"])
    assert (move["before"], move["after"]) == ({"orgUnitPath": WHS_10}, {"orgUnitPath": WHS_9})

    rename = changes[email(n["rename"])]
    assert rename["labels"] == ["rename"]
    assert rename["before"]["name"] == {"givenName": "Annie", "familyName": "Lee"}
    assert rename["after"]["name"] == {"givenName": "Anne", "familyName": "Lee"}

    attributes = changes[email(n["attributes"])]
    assert attributes["labels"] == ["attributes"]
    assert attributes["before"]["customSchemas"] == {CATEGORY: {SCHOOL_FIELD: "102", GRAD_FIELD: "2029"}}
    assert attributes["after"]["customSchemas"] == {CATEGORY: {SCHOOL_FIELD: "101", GRAD_FIELD: "2030"}}

    unsuspend = changes[email(n["unsuspend"])]
    assert unsuspend["action"] == "update" and set(unsuspend["labels"]) == {"unsuspend", "move"}
    assert unsuspend["before"] == {"suspended": True, "orgUnitPath": SUSPENDED_OU}
    assert unsuspend["after"] == {"suspended": False, "orgUnitPath": WHS_9}

    suspend = changes[email(n["suspend"])]
    assert suspend["action"] == "suspend" and set(suspend["labels"]) == {"suspend", "move"}
    assert suspend["before"] == {"suspended": False, "orgUnitPath": WHS_9}
    assert suspend["after"] == {"suspended": True, "orgUnitPath": SUSPENDED_OU}


def test_plan_out_names_a_building_scope(sync, tmp_path):
    sync.student(1101)
    plan_path = tmp_path / "plan.json"

    result = sync.run("--building", "101", "--dry-run", "--plan-out", str(plan_path))

    assert result.code == 0, result.output
    document = json.loads(plan_path.read_text(encoding="utf-8"))
    assert document["scope"]["kind"] == "building"
    assert document["scope"]["schools"] == [101]


def test_plan_out_on_a_real_run_records_the_values_before_it_applied_them(sync, tmp_path):
    n = every_kind_of_change(sync, 1200)
    plan_path = tmp_path / "plan.json"

    result = sync.run("--all", "--plan-out", str(plan_path))

    assert result.code == 0, result.output
    text = plan_path.read_text(encoding="utf-8")
    assert PASSWORD not in text
    changes = {c["email"]: c for c in json.loads(text)["changes"]}
    assert changes[email(n["move"])]["before"] == {"orgUnitPath": WHS_10}
    assert changes[email(n["suspend"])]["before"] == {"suspended": False, "orgUnitPath": WHS_9}
    # and the run did what the plan says
    assert looks_of(sync.server, n["move"])[1] == WHS_9
    assert looks_of(sync.server, n["suspend"])[:2] == (True, SUSPENDED_OU)
    assert sync.server.user(email(n["create"])) is not None


# ---------------------------------------------------------------------------------------------
# 2. A safety stop writes its plan on its own
# ---------------------------------------------------------------------------------------------


def test_safety_stop_saves_its_plan_in_the_logs_folder_and_names_it(sync, tmp_path):
    # (a dry run saves none unless asked: tests/test_review_guard.py)
    dry_run: list[str] = []
    sync.settings({"safety": {"max_suspensions": 1}})
    withdrawn(sync, [1301, 1302, 1303])
    sync.student(1304)                                      # a create, also in the plan
    report = tmp_path / "report.csv"

    result = sync.run("--all", "--report", str(report), *dry_run)

    assert result.code == 3, result.output
    assert sync.writes() == []
    saved = list(logs(sync).glob("*.json"))
    saved = [p for p in saved if not p.name.startswith("school_counts")]
    assert len(saved) == 1, saved
    assert str(saved[0]) in result.output
    document = json.loads(saved[0].read_text(encoding="utf-8"))
    assert {c["email"] for c in document["changes"]} == {email(n) for n in (1301, 1302, 1303, 1304)}
    assert document["settings_fingerprint"] == fingerprint(sync)
    rows = report_rows(report)
    assert set(rows) == {email(n) for n in (1301, 1302, 1303, 1304)}
    assert all(r["result"].startswith("not applied") for r in rows.values()), rows


# ---------------------------------------------------------------------------------------------
# 3. --apply-plan
# ---------------------------------------------------------------------------------------------


def test_apply_plan_applies_current_changes_and_skips_hand_changed_ones_as_stale(sync, tmp_path):
    sync.student(2001)                                      # create
    sync.student(2002)                                      # create; made by hand meanwhile
    sync.student(2003)                                      # move
    sync.account(2003, org_unit=WHS_10)
    sync.student(2004)                                      # move; moved by hand meanwhile
    sync.account(2004, org_unit=WHS_10)
    sync.student(2005, "Anne")                              # rename; renamed by hand meanwhile
    sync.account(2005, given="Annie")
    withdrawn(sync, [2006])                                 # suspend
    plan_path = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(plan_path)).code == 0

    sync.server.add_user(email(2002), given="Hand", family="Made", org_unit=LMS_7)
    hand_edit(sync.server, email(2004), {"orgUnitPath": LMS_7})
    hand_edit(sync.server, email(2005), {"name": {"givenName": "Anya", "familyName": "Lee"}})
    report = tmp_path / "report.csv"

    result = sync.run("--apply-plan", str(plan_path), "--report", str(report))

    assert result.code == 0, result.output
    assert looks_of(sync.server, 2001)[:3] == (False, WHS_9, "Ann")
    assert looks_of(sync.server, 2003)[1] == WHS_9
    assert looks_of(sync.server, 2006)[:2] == (True, SUSPENDED_OU)
    assert looks_of(sync.server, 2002)[1:4] == (LMS_7, "Hand", "Made")
    assert looks_of(sync.server, 2004)[1] == LMS_7
    assert looks_of(sync.server, 2005)[2] == "Anya"
    rows = report_rows(report)
    for number in (2001, 2003, 2006):
        assert rows[email(number)]["result"] == "applied", rows[email(number)]
    for number in (2002, 2004, 2005):
        assert rows[email(number)]["result"].startswith("stale"), rows[email(number)]
        assert any(email(number) in line and "stale" in line for line in result.output.splitlines()), \
            result.output


def test_apply_plan_changes_nothing_outside_the_plan(sync, tmp_path):
    sync.student(2101)                                      # planned: a move
    sync.account(2101, org_unit=WHS_10)
    sync.student(2102)                                      # in step when planned
    sync.account(2102)
    plan_path = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(plan_path)).code == 0
    sync.student(2103)                                      # enrolled after the plan was written
    sync.ps.execute("UPDATE STUDENTS SET ENROLL_STATUS = 2 WHERE STUDENT_NUMBER = 2102")
    sync.account(2104, org_unit=WHS_10)                     # an account PowerSchool never saw
    before = sync.server.users()

    result = sync.run("--apply-plan", str(plan_path))

    assert result.code == 0, result.output
    after = sync.server.users()
    assert email(2103) not in after
    assert set(after) == set(before)
    for address in before:
        if address != email(2101):
            assert looks(after[address]) == looks(before[address]), address
    assert looks(after[email(2101)])[1] == WHS_9
    assert [r.path for r in sync.writes()] == [f"/admin/directory/v1/users/{email(2101)}"]


def test_apply_plan_ignores_safety_limits(sync, tmp_path):
    sync.settings({"safety": {"max_suspensions": 1}})
    withdrawn(sync, [2201, 2202, 2203])
    sync.server.add_group("band@d118.org", members=[email(2201), email(2202)])
    stopped = sync.run("--all")
    assert stopped.code == 3, stopped.output
    [saved] = [p for p in logs(sync).glob("*.json") if not p.name.startswith("school_counts")]

    result = sync.run("--apply-plan", str(saved))

    assert result.code == 0, result.output
    for number in (2201, 2202, 2203):
        assert looks_of(sync.server, number)[:2] == (True, SUSPENDED_OU)
        assert sync.server.groups_of(email(number)) == set()


def test_apply_plan_ignores_a_limit_lowered_after_the_plan_was_written(sync, tmp_path):
    withdrawn(sync, [2301, 2302, 2303])
    plan_path = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(plan_path)).code == 0
    sync.settings({"safety": {"max_suspensions": 1, "max_school_drop_percent": 5},
                   "logging": {"keep": 5}})

    result = sync.run("--apply-plan", str(plan_path))

    assert result.code == 0, result.output
    for number in (2301, 2302, 2303):
        assert looks_of(sync.server, number)[0] is True


@pytest.mark.parametrize("overrides", [
    {"ous": {"suspended": "/Suspended Accounts/Graduated Students"}},
    {"accounts": {"bad_names": ["test"]}},
    {"custom_schema": {"grad_year_field": "Homeschool_ID"}},
], ids=["ous-suspended", "accounts-bad_names", "custom_schema"])
def test_apply_plan_refuses_a_plan_made_with_other_settings(sync, tmp_path, overrides):
    sync.student(2401)
    withdrawn(sync, [2402])
    plan_path = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(plan_path)).code == 0
    sync.settings(overrides)

    result = sync.run("--apply-plan", str(plan_path))

    assert result.code == 2, result.output
    assert sync.writes() == []
    assert "settings" in result.output.lower()
    assert sync.server.user(email(2401)) is None
    assert looks_of(sync.server, 2402)[0] is False


def _not_a_plan(kind: str, real: dict) -> str:
    if kind == "text":
        return "this is not json {"
    if kind == "empty-object":
        return "{}"
    if kind == "list":
        return json.dumps(real["changes"])
    if kind == "wrong-format":
        return json.dumps(dict(real, format="something else 9"))
    if kind == "change-without-before":
        changes = [{k: v for k, v in c.items() if k != "before"} for c in real["changes"]]
        return json.dumps(dict(real, changes=changes))
    if kind == "unknown-action":
        changes = [dict(c, action="delete") for c in real["changes"]]
        return json.dumps(dict(real, changes=changes))
    if kind == "changes-not-a-list":
        return json.dumps(dict(real, changes=7))
    raise AssertionError(kind)


def create_and_move_plan(sync, tmp_path, base: int):
    """A reviewed plan with one create (`base`) and one move (`base + 1`)."""
    sync.student(base)
    sync.student(base + 1)
    sync.account(base + 1, org_unit=WHS_10)
    plan_path = tmp_path / "real.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(plan_path)).code == 0
    return plan_path


@pytest.mark.parametrize("kind", ["text", "empty-object", "list", "wrong-format", "change-without-before",
                                  "unknown-action", "changes-not-a-list", "missing-file"])
def test_apply_plan_refuses_a_file_that_is_not_a_plan(sync, tmp_path, kind):
    real_path = create_and_move_plan(sync, tmp_path, 2501)
    bad = tmp_path / "bad.json"
    if kind != "missing-file":
        bad.write_text(_not_a_plan(kind, json.loads(real_path.read_text(encoding="utf-8"))), encoding="utf-8")

    result = sync.run("--apply-plan", str(bad))

    assert result.code == 2, result.output
    assert sync.writes() == []
    assert "bad.json" in result.output


def test_applying_the_same_plan_twice_changes_nothing_the_second_time(sync, tmp_path):
    sync.student(2601)
    sync.student(2602)
    sync.account(2602, org_unit=WHS_10)
    withdrawn(sync, [2603])
    plan_path = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(plan_path)).code == 0
    assert sync.run("--apply-plan", str(plan_path)).code == 0
    sync.server.clear_requests()

    again = sync.run("--apply-plan", str(plan_path))

    assert again.code == 0, again.output
    assert sync.writes() == []
    assert "already applied" in again.output


def test_apply_plan_with_creates_and_no_password_exits_2_and_changes_nothing(sync, tmp_path, monkeypatch):
    plan_path = create_and_move_plan(sync, tmp_path, 2801)
    monkeypatch.delenv("NEW_USER_PASSWORD")

    result = sync.run("--apply-plan", str(plan_path))

    assert result.code == 2, result.output
    assert sync.writes() == []
    assert "NEW_USER_PASSWORD" in result.output


@pytest.mark.parametrize("extra", [["--all"], ["--as-of", "2026-07-01"]])
def test_apply_plan_with_a_scope_or_a_date_is_a_usage_error(sync, tmp_path, extra):
    sync.student(2701)
    plan_path = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(plan_path)).code == 0

    result = sync.run("--apply-plan", str(plan_path), *extra)

    assert result.code == 2, result.output
    assert sync.writes() == []


# ---------------------------------------------------------------------------------------------
# 4. The journal and --undo
# ---------------------------------------------------------------------------------------------


def test_real_run_journals_every_applied_change_and_names_its_run_id(sync):
    n = every_kind_of_change(sync, 3000)

    result = sync.run("--all")

    assert result.code == 0, result.output
    run_id = run_id_of(result)
    journal = logs(sync) / f"journal-{run_id}.jsonl"
    assert journal.is_file()
    assert str(journal) in result.output
    text = journal.read_text(encoding="utf-8")
    assert PASSWORD not in text
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert {e["email"] for e in entries} == {email(n[k]) for k in n if k != "in_step"}
    for entry in entries:
        assert entry["run_id"] == run_id
        assert entry["result"] == "applied"
        assert {"action", "before", "after"} <= set(entry)
    by_email = {e["email"]: e for e in entries}
    assert by_email[email(n["move"])]["before"] == {"orgUnitPath": WHS_10}
    assert by_email[email(n["move"])]["after"] == {"orgUnitPath": WHS_9}
    assert by_email[email(n["suspend"])]["action"] == "suspend"


def test_failed_changes_are_journalled_as_failed_and_an_undo_leaves_them_alone(sync, no_backoff):
    sync.student(3151)
    sync.account(3151, org_unit=WHS_10)
    withdrawn(sync, [3152])
    sync.server.faults = FaultPlan(rate=1.0, statuses=(503,), seed=1)
    failed = sync.run("--all")
    assert failed.code == 1, failed.output
    run_id = run_id_of(failed)
    entries = [json.loads(line) for line in
               (logs(sync) / f"journal-{run_id}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {e["email"] for e in entries} == {email(3151), email(3152)}
    assert all(e["result"].startswith("failed") for e in entries), entries
    sync.server.faults = None
    sync.server.clear_requests()

    result = sync.run("--undo", run_id)

    assert result.code == 0, result.output
    assert sync.writes() == []
    assert looks_of(sync.server, 3151)[:2] == (False, WHS_10)


def test_dry_run_writes_no_journal(sync):
    every_kind_of_change(sync, 3100)

    result = sync.run("--all", "--dry-run")

    assert result.code == 0, result.output
    assert list(logs(sync).glob("journal-*")) == []


def test_undo_restores_every_changed_account_and_suspends_created_ones(sync):
    n = every_kind_of_change(sync, 3200)
    sync.student(3250)                                      # attributes never set in Google
    sync.server.add_user(email(3250), given="Ann", family="Lee", org_unit=WHS_9)
    before = sync.server.users()
    synced = sync.run("--all")
    assert synced.code == 0, synced.output
    assert looks_of(sync.server, 3250)[4] is not None       # the sync did set them
    run_id = run_id_of(synced)

    result = sync.run("--undo", run_id)

    assert result.code == 0, result.output
    after = sync.server.users()
    for address, user in before.items():
        assert looks(after[address]) == looks(user), address
    created = after[email(n["create"])]
    assert created["suspended"] is True
    assert set(after) == set(before) | {email(n["create"])}
    assert "band@d118.org" in result.output                 # groups are not re-added: it says so


def test_undoing_the_same_run_twice_changes_nothing_the_second_time(sync):
    every_kind_of_change(sync, 3270)
    synced = sync.run("--all")
    run_id = run_id_of(synced)
    assert sync.run("--undo", run_id).code == 0
    state = sync.server.users()
    sync.server.clear_requests()

    again = sync.run("--undo", run_id)

    assert again.code in (0, 1), again.output
    assert sync.writes() == []
    assert sync.server.users() == state


def test_undo_leaves_an_account_changed_by_hand_alone_and_reports_it(sync):
    sync.student(3301)                                      # moved by the sync, then by hand
    sync.account(3301, org_unit=WHS_10)
    sync.student(3302)                                      # moved by the sync only
    sync.account(3302, org_unit=WHS_10)
    withdrawn(sync, [3303])                                 # suspended, then reopened by hand
    synced = sync.run("--all")
    assert synced.code == 0, synced.output
    hand_edit(sync.server, email(3301), {"orgUnitPath": LMS_7})
    hand_edit(sync.server, email(3303), {"suspended": False})

    result = sync.run("--undo", run_id_of(synced))

    assert result.code in (0, 1), result.output
    assert looks_of(sync.server, 3301)[1] == LMS_7
    assert looks_of(sync.server, 3303)[:2] == (False, SUSPENDED_OU)
    assert looks_of(sync.server, 3302)[1] == WHS_10
    for number in (3301, 3303):
        assert any(str(number) in line and "changed" in line for line in result.output.splitlines()), \
            result.output


def test_undo_is_a_run_with_its_own_journal(sync):
    sync.student(3401)
    sync.account(3401, org_unit=WHS_10)
    sync.student(3402)
    synced = sync.run("--all")
    first_id = run_id_of(synced)

    result = sync.run("--undo", first_id)

    assert result.code == 0, result.output
    undo_id = run_id_of(result)
    assert undo_id != first_id
    entries = [json.loads(line) for line in
               (logs(sync) / f"journal-{undo_id}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {e["email"] for e in entries} == {email(3401), email(3402)}
    assert all(e["run_id"] == undo_id and e["result"] == "applied" for e in entries)
    # the first run's journal is left as it was
    assert len((logs(sync) / f"journal-{first_id}.jsonl").read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.parametrize("run_id", ["20010101-000000", "../student_sync"])
def test_undo_of_an_unknown_run_id_exits_2_naming_it(sync, run_id):
    sync.student(3501)
    sync.run("--all")
    sync.server.clear_requests()

    result = sync.run("--undo", run_id)

    assert result.code == 2, result.output
    assert run_id in result.output
    assert sync.writes() == []


def test_an_applied_plan_is_journalled_and_can_be_undone(sync, tmp_path):
    sync.student(3601)
    sync.account(3601, org_unit=WHS_10)
    withdrawn(sync, [3602])
    sync.student(3603)
    before = sync.server.users()
    plan_path = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(plan_path)).code == 0
    applied = sync.run("--apply-plan", str(plan_path))
    assert applied.code == 0, applied.output

    result = sync.run("--undo", run_id_of(applied))

    assert result.code == 0, result.output
    after = sync.server.users()
    for address, user in before.items():
        assert looks(after[address]) == looks(user), address
    assert after[email(3603)]["suspended"] is True


# ---------------------------------------------------------------------------------------------
# 5. Source sanity: per-school counts
# ---------------------------------------------------------------------------------------------


def school_of(sync, school: int, first: int, count: int, grade: int = 9) -> list[int]:
    """`count` active students at `school`, each with an account in step."""
    abbreviation = {101: "WHS", 102: "LMS"}[school]
    numbers = list(range(first, first + count))
    for number in numbers:
        sync.student(number, school=school, grade=grade)
        sync.account(number, school=school, org_unit=district.building_ou(abbreviation) + f"/{grade}th")
    return numbers


def drop(sync, numbers) -> None:
    for number in numbers:
        sync.ps.execute("UPDATE STUDENTS SET ENROLL_STATUS = 2 WHERE STUDENT_NUMBER = ?", (number,))


def test_real_run_keeps_active_counts_per_school_and_a_dry_run_does_not(sync):
    school_of(sync, 101, 4001, 24)
    school_of(sync, 102, 4101, 5, grade=7)

    assert sync.run("--all", "--dry-run").code == 0
    assert not counts_file(sync).exists()
    assert sync.run("--all").code == 0

    counts = json.loads(counts_file(sync).read_text(encoding="utf-8"))
    text = json.dumps(counts)
    assert re.search(r'"101": 24\b', text) and re.search(r'"102": 5\b', text), text


def test_school_losing_half_its_students_stops_until_allowed(sync):
    whs = school_of(sync, 101, 4201, 24)
    school_of(sync, 102, 4301, 5, grade=7)
    assert sync.run("--all").code == 0
    drop(sync, whs[:12])
    sync.server.clear_requests()

    stopped = sync.run("--all")

    assert stopped.code == 3, stopped.output
    assert sync.writes() == []
    assert "101" in stopped.output and "24" in stopped.output and "12" in stopped.output
    again = sync.run("--all")                               # a stop does not move the baseline
    assert again.code == 3, again.output
    assert sync.writes() == []

    allowed = sync.run("--all", "--allow-mass-changes")

    assert allowed.code == 0, allowed.output
    assert all(looks_of(sync.server, number)[0] is True for number in whs[:12])
    sync.server.clear_requests()
    assert sync.run("--all").code == 0                      # the new figures are the baseline
    assert sync.writes() == []


def test_dry_run_stops_on_a_school_drop_like_the_real_run(sync):
    whs = school_of(sync, 101, 4401, 20)
    assert sync.run("--all").code == 0
    drop(sync, whs[:10])

    result = sync.run("--all", "--dry-run")

    assert result.code == 3, result.output
    assert "101" in result.output


def test_school_returning_no_students_stops_the_run(sync):
    school_of(sync, 101, 4501, 22)
    school_of(sync, 102, 4601, 5, grade=7)
    assert sync.run("--all").code == 0
    sync.ps.execute("DELETE FROM STUDENTS WHERE SCHOOLID = 101")
    sync.student(4701, school=102, grade=7)                 # and something else to do
    sync.server.clear_requests()

    result = sync.run("--all")

    assert result.code == 3, result.output
    assert sync.writes() == []
    assert "101" in result.output and "22" in result.output and "0" in result.output


def test_school_with_fewer_than_20_students_does_not_trip_the_check(sync):
    school_of(sync, 101, 4801, 24)
    lms = school_of(sync, 102, 4901, 19, grade=7)
    assert sync.run("--all").code == 0
    drop(sync, lms)                                         # 19 -> 0

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert all(looks_of(sync.server, number)[:2] == (True, SUSPENDED_OU) for number in lms)


@pytest.mark.parametrize("lost, code", [(6, 0), (7, 3)], ids=["exactly-30-percent", "35-percent"])
def test_school_drop_limit_is_more_than_the_percentage(sync, lost, code):
    whs = school_of(sync, 101, 5001, 20)
    assert sync.run("--all").code == 0
    drop(sync, whs[:lost])

    result = sync.run("--all")

    assert result.code == code, result.output


def test_applying_the_plan_of_a_school_drop_stop_lets_the_next_run_go_ahead(sync):
    whs = school_of(sync, 101, 5101, 24)
    assert sync.run("--all").code == 0
    drop(sync, whs[:12])
    stopped = sync.run("--all")
    assert stopped.code == 3, stopped.output
    [saved] = [p for p in logs(sync).glob("plan-*.json")]
    assert sync.run("--apply-plan", str(saved)).code == 0

    nightly = sync.run("--all")

    assert nightly.code == 0, nightly.output


def test_undo_dry_run_previews_the_reversal_and_changes_nothing(sync):
    cases = every_kind_of_change(sync, 3900)
    run_id = run_id_of(sync.run("--all"))
    after_sync = sync.server.users()
    sync.server.clear_requests()

    preview = sync.run("--undo", run_id, "--dry-run")

    assert preview.code == 0, preview.output
    assert sync.writes() == []
    assert sync.server.users() == after_sync
    assert "would suspend" in preview.output          # the created account
    assert "would unsuspend" in preview.output        # the suspended one
    assert email(cases["create"]) in preview.output


def test_apply_plan_dry_run_previews_and_changes_nothing(sync, tmp_path):
    every_kind_of_change(sync, 3950)
    plan_path = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(plan_path)).code == 0
    sync.server.clear_requests()

    preview = sync.run("--apply-plan", str(plan_path), "--dry-run")

    assert preview.code == 0, preview.output
    assert sync.writes() == []
    assert "would create" in preview.output


def test_settings_files_sharing_a_logs_folder_keep_their_own_school_counts_and_lock(tmp_path):
    paths = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        paths.append(district.write_settings(tmp_path / name / "student_sync.toml", "http://127.0.0.1:9/"))
    first, second = (student_sync.load_settings(path) for path in paths)

    assert first.instance != second.instance
    assert student_sync.load_settings(paths[0]).instance == first.instance   # stable night after night
