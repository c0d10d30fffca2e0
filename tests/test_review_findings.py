"""Hostile reviewers' findings on --apply-plan and --undo, fixed (review of main at c21f3f2).

- a reviewed plan is applied change by change only where today's decision (PowerSchool now,
  read district-wide for every student the plan names, and the directory now) still wants it;
- --undo changes only accounts of students PowerSchool knows, and restores an OU only into the
  student, suspended or graduated OUs;
- a plan or undo is recorded as done only when it finished every change; a new plan is never
  taken for an old one; a journal is read with the settings that bear on identity only;
- addresses from files are matched in ASCII only; a plan naming one account twice, or asking
  for group removals the rules would not make, is refused; a plan's own fields never decide
  how far it is trusted.

End to end through student_sync.main (see conftest.py), asserting end states.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
from pathlib import Path

import pytest

import student_sync
from conftest import WHS_9, email, make_settings, state
from testkit import district

SUSPENDED_OU = district.SUSPENDED_OU
PRODUCT, PLUS = "101031", "1010310008"


def journal_path(sync) -> Path:
    [path] = sorted((sync.folder / "logs").glob("journal-*.jsonl"))[:1]
    return path


def set_status(sync, number: int, status: int) -> None:
    sync.ps.execute("UPDATE STUDENTS SET ENROLL_STATUS = ? WHERE STUDENT_NUMBER = ?", (status, number))


def outage(method: str, path: str):
    return ("503", False) if method in ("PUT", "POST", "DELETE") else None


def dry_plan(sync, path: Path, *scope: str) -> dict:
    result = sync.run(*(scope or ("--all",)), "--dry-run", "--plan-out", str(path))
    assert result.code == 0, result.output
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, document) -> Path:
    path.write_text(json.dumps(document, indent=1), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# 1. Every change of a reviewed plan is re-checked against today's decision
# ---------------------------------------------------------------------------------------------


def test_apply_plan_does_not_unsuspend_a_student_who_left_since_the_plan(sync, tmp_path):
    sync.student(500101)                                   # active again: the plan unsuspends
    sync.account(500101, suspended=True)
    plan_path = tmp_path / "plan.json"
    assert "unsuspend" in json.dumps(dry_plan(sync, plan_path))
    set_status(sync, 500101, 2)                            # ... and left again before approval

    result = sync.run("--apply-plan", str(plan_path))

    assert sync.server.user(email(500101))["suspended"] is True, result.output


def test_a_reviewed_plan_does_not_unsuspend_a_student_who_left_since(sync, tmp_path):
    sync.student(60001, status=0)
    sync.account(60001, suspended=True, org_unit=SUSPENDED_OU)
    plan = tmp_path / "plan.json"
    dry_plan(sync, plan)
    set_status(sync, 60001, 2)

    result = sync.run("--apply-plan", str(plan))

    assert state(sync.server, 60001)[2] is True, result.output   # still suspended
    assert "60001" in result.output and "stale" in result.output.lower()
    assert sync.writes() == []


def test_apply_plan_does_not_move_a_student_who_left_since_the_plan(sync, tmp_path):
    sync.student(500105, grade=10)
    sync.account(500105)                                   # 9th -> 10th: a move of an active student
    plan_path = tmp_path / "plan.json"
    dry_plan(sync, plan_path)
    set_status(sync, 500105, 2)

    result = sync.run("--apply-plan", str(plan_path))

    assert sync.server.user(email(500105))["orgUnitPath"] == WHS_9, result.output
    assert "stale" in result.output


def test_apply_plan_does_not_assign_a_licence_to_a_student_who_left_since_the_plan(sync, tmp_path):
    sync.settings({"licenses": {"product_id": PRODUCT, "sku_id": PLUS, "assign": True}})
    sync.student(500102)
    sync.account(500102)
    plan_path = tmp_path / "plan.json"
    assert "assign license" in json.dumps(dry_plan(sync, plan_path))
    set_status(sync, 500102, 2)

    result = sync.run("--apply-plan", str(plan_path))

    assert not sync.server.licensing.holds(email(500102), PLUS), result.output


def test_apply_plan_does_not_release_the_licence_of_a_student_who_reenrolled(sync, tmp_path):
    sync.settings({"licenses": {"product_id": PRODUCT, "sku_id": PLUS}})
    sync.student(500104, status=2)
    sync.account(500104, suspended=True, org_unit=SUSPENDED_OU)
    sync.server.licensing.assign(email(500104), PLUS)
    plan_path = tmp_path / "plan.json"
    assert "release license" in json.dumps(dry_plan(sync, plan_path))
    set_status(sync, 500104, 0)                            # back before the plan is approved

    result = sync.run("--apply-plan", str(plan_path))

    assert sync.server.licensing.holds(email(500104), PLUS), result.output


def test_apply_plan_does_not_create_an_account_for_a_student_who_graduated_since(sync, tmp_path, monkeypatch):
    monkeypatch.setattr(student_sync.Run, "today", lambda self: dt.date(2026, 6, 15))
    sync.student(500103, class_of=2026, grade=12)          # new in May: the plan creates the account
    plan_path = tmp_path / "plan.json"
    assert '"create"' in json.dumps(dry_plan(sync, plan_path))
    set_status(sync, 500103, 3)                            # graduated in June: summer grace

    result = sync.run("--apply-plan", str(plan_path))

    assert sync.server.user(email(500103)) is None, result.output   # no account is ever created for a graduate
    assert "stale" in result.output


def test_apply_plan_weighs_every_student_it_names_whatever_scope_it_declares(sync, tmp_path):
    """A plan's own `scope` is not trusted: every student it names is weighed district-wide."""
    sync.student(500106, school=102, grade=7)              # active at LMS: the plan unsuspends
    sync.account(500106, suspended=True, org_unit=SUSPENDED_OU, school=102)
    sync.student(500107, school=102, grade=7)              # ... and this one, who then leaves
    sync.account(500107, suspended=True, org_unit=SUSPENDED_OU, school=102)
    plan_path = tmp_path / "plan.json"
    document = dry_plan(sync, plan_path, "--building", "102")
    set_status(sync, 500107, 2)
    document["scope"] = {"kind": "building", "schools": [101]}   # a scope that names neither
    write_json(plan_path, document)

    result = sync.run("--apply-plan", str(plan_path))

    assert result.code == 0, result.output
    assert sync.server.user(email(500106))["suspended"] is False, result.output
    assert sync.server.user(email(500107))["suspended"] is True, result.output


def test_apply_plan_still_applies_what_today_wants(sync, tmp_path):
    sync.settings({"licenses": {"product_id": PRODUCT, "sku_id": PLUS, "assign": True}})
    sync.student(500110)                                   # create + assign
    sync.student(500111)                                   # unsuspend
    sync.account(500111, suspended=True)
    sync.student(500112, status=2)                         # suspend + release
    sync.account(500112)
    sync.server.licensing.assign(email(500112), PLUS)
    plan_path = tmp_path / "plan.json"
    dry_plan(sync, plan_path)

    result = sync.run("--apply-plan", str(plan_path))

    assert result.code == 0, result.output
    assert sync.server.user(email(500110))["suspended"] is False
    assert sync.server.licensing.holds(email(500110), PLUS)
    assert sync.server.user(email(500111))["suspended"] is False
    assert sync.server.user(email(500112))["suspended"] is True
    assert not sync.server.licensing.holds(email(500112), PLUS)
    assert "stale" not in result.output


# ---------------------------------------------------------------------------------------------
# 2. --undo changes only students' accounts, and restores OUs only into the student OUs
# ---------------------------------------------------------------------------------------------


def _tampered_journal(sync, entry: dict) -> str:
    sync.student(500201, grade=10)
    sync.account(500201)                                   # 9th -> 10th: one move, one journal
    assert sync.run("--all").code == 0
    path = journal_path(sync)
    line = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    line.update(entry)
    path.write_text(json.dumps(line) + "\n", encoding="utf-8")
    return path.stem[len("journal-"):]


def test_undo_of_a_tampered_journal_does_not_suspend_an_account_of_no_student(sync):
    sync.server.add_user(email(90001), given="Pat", family="Principal", org_unit="/Staff")
    run_id = _tampered_journal(sync, {
        "student_number": 90001, "email": email(90001), "action": "update", "labels": ["unsuspend"],
        "before": {"suspended": True}, "after": {"suspended": False}})
    sync.server.clear_requests()

    result = sync.run("--undo", run_id)

    assert sync.server.user(email(90001))["suspended"] is False, result.output
    assert sync.writes() == []
    assert any("90001" in line and "PowerSchool" in line for line in result.output.splitlines()), result.output


def test_undo_of_a_tampered_journal_does_not_move_a_student_out_of_the_student_ous(sync):
    sync.server.add_orgunit("/Staff/Administrators")
    run_id = _tampered_journal(sync, {
        "labels": ["move"], "before": {"orgUnitPath": "/Staff/Administrators"},
        "after": {"orgUnitPath": district.building_ou("WHS") + "/10th"}})
    sync.server.clear_requests()

    result = sync.run("--undo", run_id)

    assert sync.server.user(email(500201))["orgUnitPath"] != "/Staff/Administrators", result.output
    assert sync.writes() == []
    assert "/Staff/Administrators" in result.output


# ---------------------------------------------------------------------------------------------
# 3. A plan or undo that did not finish is not recorded as done
# ---------------------------------------------------------------------------------------------


def test_a_plan_stopped_by_an_outage_can_be_applied_again(sync, tmp_path, no_backoff):
    withdrawn_numbers = range(500601, 500606)
    for number in withdrawn_numbers:
        sync.student(number, status=2)
        sync.account(number)
    plan_path = tmp_path / "plan.json"
    dry_plan(sync, plan_path)
    sync.server.hook = outage
    first = sync.run("--apply-plan", str(plan_path))
    assert first.code != 0, first.output
    sync.server.hook = None

    again = sync.run("--apply-plan", str(plan_path))

    assert all(sync.server.user(email(n))["suspended"] for n in withdrawn_numbers), again.output
    assert "already applied" not in again.output


def test_an_undo_stopped_by_an_outage_can_be_run_again(sync, no_backoff):
    for number in range(500701, 500704):
        sync.student(number, grade=10)
        sync.account(number)                               # the run moves each 9th -> 10th
    assert sync.run("--all").code == 0
    run_id = journal_path(sync).stem[len("journal-"):]
    sync.server.hook = outage
    assert sync.run("--undo", run_id).code != 0
    sync.server.hook = None

    again = sync.run("--undo", run_id)

    assert all(sync.server.user(email(n))["orgUnitPath"] == WHS_9 for n in range(500701, 500704)), again.output
    assert again.code == 0 and "already undone" not in again.output, again.output


def test_an_undo_run_again_after_a_stop_finishes_what_is_left_without_warnings(sync, no_backoff):
    for number in range(500711, 500715):
        sync.student(number, grade=10)
        sync.account(number)                               # the run moves each 9th -> 10th
    assert sync.run("--all").code == 0
    run_id = journal_path(sync).stem[len("journal-"):]
    puts = []

    def second_put_fails(method, path):                    # the first reversal goes out, then an outage
        if method == "PUT":
            puts.append(path)
            return ("503", False) if len(set(puts)) > 1 else None
        return None

    sync.server.hook = second_put_fails
    assert sync.run("--undo", run_id).code != 0
    sync.server.hook = None
    assert sum(sync.server.user(email(n))["orgUnitPath"] == WHS_9 for n in range(500711, 500715)) == 1

    again = sync.run("--undo", run_id)

    assert again.code == 0, again.output
    assert all(sync.server.user(email(n))["orgUnitPath"] == WHS_9 for n in range(500711, 500715)), again.output
    assert "changed since" not in again.output
    assert "1 already in step" in again.output, again.output


def test_an_already_applied_plan_says_nothing_to_do_not_a_summary(sync, tmp_path):
    sync.student(500801, status=2)
    sync.account(500801)
    plan_path = tmp_path / "plan.json"
    dry_plan(sync, plan_path)
    first = sync.run("--apply-plan", str(plan_path))
    assert first.code == 0, first.output
    run_id = re.search(r"undo with --undo (\S+)\)", first.output).group(1)

    report = tmp_path / "again.csv"
    again = sync.run("--apply-plan", str(plan_path), "--report", str(report))

    assert again.code == 0, again.output
    assert report.read_text(encoding="utf-8-sig").splitlines()[0].startswith("student_number,email,action")
    assert re.search(rf"nothing to do: plan \S*plan.json was already applied on \d{{4}}-\d\d-\d\d at [\d:]+ "
                     rf"\(run {run_id}\)", again.output), again.output
    assert "summary" not in again.output and "0 failed" not in again.output, again.output


def test_an_already_undone_run_says_nothing_to_do_not_a_summary(sync):
    sync.student(500802)
    synced = sync.run("--all")
    run_id = journal_path(sync).stem[len("journal-"):]
    first = sync.run("--undo", run_id)
    assert first.code == 0, first.output

    again = sync.run("--undo", run_id)

    assert again.code == 0, again.output
    assert re.search(rf"nothing to do: run {run_id} was already undone on \d{{4}}-\d\d-\d\d at [\d:]+ \(run \S+\)",
                     again.output), again.output
    assert "summary" not in again.output and "0 failed" not in again.output, again.output


# ---------------------------------------------------------------------------------------------
# 4. A new plan is never taken for an old one
# ---------------------------------------------------------------------------------------------


def test_a_new_plan_equal_to_an_old_applied_one_is_still_applied(sync, tmp_path):
    sync.student(501001, status=2)
    sync.account(501001)
    monday = tmp_path / "monday.json"
    dry_plan(sync, monday)
    assert sync.run("--apply-plan", str(monday)).code == 0
    set_status(sync, 501001, 0)                            # re-enrolled: the nightly run reopens it
    assert sync.run("--all").code == 0
    assert sync.server.user(email(501001))["suspended"] is False
    set_status(sync, 501001, 2)                            # withdrawn again
    friday = tmp_path / "friday.json"
    dry_plan(sync, friday)

    result = sync.run("--apply-plan", str(friday))

    assert sync.server.user(email(501001))["suspended"] is True, result.output


# ---------------------------------------------------------------------------------------------
# 5. A journal is read with the settings that bear on the accounts' identity only
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    {"accounts": {"change_password_at_next_login": False}},
    {"ous": {"student_prefix": "/Students/"}},
    {"custom_schema": {"category": "Sync_Data"}},
], ids=["change-password", "ou-prefix", "schema-category"])
def test_undo_of_a_run_still_works_after_an_unrelated_setting_changed(sync, overrides):
    sync.student(500401)                                   # created by the run
    assert sync.run("--all").code == 0
    run_id = journal_path(sync).stem[len("journal-"):]
    sync.settings(overrides)

    result = sync.run("--undo", run_id)

    assert result.code == 0, result.output
    assert sync.server.user(email(500401))["suspended"] is True


def test_undo_still_refuses_a_journal_for_another_domain(sync):
    sync.student(500402)
    assert sync.run("--all").code == 0
    run_id = journal_path(sync).stem[len("journal-"):]
    sync.settings({"google": {"email_suffix": "@students.d118.org", "domain": "students.d118.org"}})
    sync.server.clear_requests()

    result = sync.run("--undo", run_id)

    assert result.code == 2, result.output
    assert sync.writes() == []


# ---------------------------------------------------------------------------------------------
# 6. Addresses from files are matched in ASCII only
# ---------------------------------------------------------------------------------------------


def test_a_look_alike_domain_in_a_plan_is_not_a_students_address():
    settings = make_settings(google={"email_suffix": "@k12.d118.org", "domain": "k12.d118.org"})
    assert student_sync.student_number_of("500001@k12.d118.org", settings) == 500001
    assert student_sync.student_number_of("500001@\u212a12.d118.org", settings) is None
    assert student_sync.student_number_of("500001@K12.D118.ORG", settings) == 500001


def test_a_create_whose_primary_email_is_a_look_alike_is_refused():
    settings = make_settings(google={"email_suffix": "@k12.d118.org", "domain": "k12.d118.org"})
    change = {"student_number": 500001, "email": "500001@k12.d118.org", "action": "create", "labels": ["create"],
              "before": {}, "after": {"primaryEmail": "500001@\u212a12.d118.org",
                                      "name": {"givenName": "Ann", "familyName": "Lee"},
                                      "changePasswordAtNextLogin": True, "orgUnitPath": WHS_9,
                                      "customSchemas": {district.CATEGORY: {district.SCHOOL_FIELD: "101"}}},
              "remove_groups": False}
    assert "primaryEmail" in student_sync.change_problem(change, settings)
    change["after"]["primaryEmail"] = "500001@k12.d118.org"
    assert student_sync.change_problem(change, settings) is None


# ---------------------------------------------------------------------------------------------
# 7. Lesser: twice the same account, group removals, the plan's own fields
# ---------------------------------------------------------------------------------------------


def test_a_plan_naming_the_same_account_twice_is_refused_naming_both(sync, tmp_path):
    sync.student(501101, status=2)
    sync.account(501101)
    sync.student(501102)
    plan_path = tmp_path / "plan.json"
    document = dry_plan(sync, plan_path)
    index = next(i for i, c in enumerate(document["changes"]) if c["email"] == email(501101))
    twin = copy.deepcopy(document["changes"][index])
    twin["email"] = twin["email"].upper()                  # the same account, written otherwise
    document["changes"].append(twin)
    write_json(plan_path, document)
    last = len(document["changes"]) - 1

    result = sync.run("--apply-plan", str(plan_path))

    assert result.code == 2, result.output
    assert sync.writes() == []
    assert f"changes[{last}]" in result.output and f"changes[{index}]" in result.output, result.output


def test_a_plan_may_change_an_account_and_its_licence(sync, tmp_path):
    sync.settings({"licenses": {"product_id": PRODUCT, "sku_id": PLUS}})
    sync.student(501103, status=2)
    sync.account(501103)
    sync.server.licensing.assign(email(501103), PLUS)
    plan_path = tmp_path / "plan.json"
    assert len(dry_plan(sync, plan_path)["changes"]) == 2  # a suspension and a release

    result = sync.run("--apply-plan", str(plan_path))

    assert result.code == 0, result.output
    assert not sync.server.licensing.holds(email(501103), PLUS)


def test_a_plan_asking_for_group_removals_the_settings_do_not_make_is_refused(sync, tmp_path):
    sync.settings({"accounts": {"remove_groups_on_suspend": False}})
    sync.student(501201, status=2)
    sync.account(501201)
    sync.server.add_group("band@d118.org", members=[email(501201)])
    plan_path = tmp_path / "plan.json"
    document = dry_plan(sync, plan_path)
    assert document["changes"][0]["remove_groups"] is False
    document["changes"][0]["remove_groups"] = True
    write_json(plan_path, document)

    result = sync.run("--apply-plan", str(plan_path))

    assert result.code == 2, result.output
    assert "changes[0]" in result.output and "remove_groups" in result.output
    assert sync.writes() == []


def test_a_plan_asking_for_group_removals_of_a_suspended_account_is_refused(sync, tmp_path):
    sync.student(501202, status=2)
    sync.account(501202, suspended=True)                   # suspended already: a move only
    plan_path = tmp_path / "plan.json"
    document = dry_plan(sync, plan_path)
    assert document["changes"][0]["labels"] == ["move"]
    document["changes"][0]["remove_groups"] = True
    write_json(plan_path, document)

    result = sync.run("--apply-plan", str(plan_path))

    assert result.code == 2, result.output
    assert "remove_groups" in result.output
    assert sync.writes() == []


@pytest.mark.parametrize("forged", ["missing", "null"])
def test_a_plan_without_the_recorded_last_applied_run_is_older(sync, tmp_path, forged):
    sync.student(501301)
    assert sync.run("--all").code == 0                     # a run that applied changes
    sync.student(501302, status=2)
    sync.account(501302)
    plan_path = tmp_path / "plan.json"
    document = dry_plan(sync, plan_path)
    if forged == "missing":
        del document["last_applied_run"]
        document["created"] = "9999-12-31T23:59:59"        # and a date that says "newest"
    else:
        document["last_applied_run"] = None
    write_json(plan_path, document)
    sync.server.clear_requests()

    result = sync.run("--apply-plan", str(plan_path))

    assert result.code == 2 and "--allow-older-plan" in result.output, result.output
    assert sync.writes() == []


def test_an_ou_path_with_a_look_alike_letter_is_not_a_student_ou():
    settings = make_settings(ous={"student_prefix": "/K12 Students/"})
    assert student_sync.is_student_ou("/K12 Students/WHS Students", settings)
    assert student_sync.is_student_ou("/k12 students/WHS Students", settings)
    assert not student_sync.is_student_ou("/\u212a12 Students/WHS Students", settings)
    assert "look" in student_sync._target_ou_problem("/\u212a12 Students/WHS Students", "update", settings)
    assert student_sync._target_ou_problem("/K12 Students/WHS Students", "update", settings) is None
