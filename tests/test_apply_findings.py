"""Hostile review findings on the apply engine's record (reviewer A, F3, F10, F11).

Whatever goes wrong while a run applies -- a defect while an outcome is journalled, a create
whose answer was lost and whose read-back then fails, a Ctrl-C while the state files are
saved -- the record stays whole: no change is started that cannot be journalled, the account
we made is in the journal, and a run that applied changes is recorded and reported.  End to
end through `student_sync.main` against the local Directory API server.
"""

from __future__ import annotations

import json
import signal
import time

import student_sync
from conftest import email
from testkit import district

USERS = "/admin/directory/v1/users"


def journal_entries(sync) -> list[dict]:
    return [json.loads(line) for path in sorted((sync.folder / "logs").glob("journal-*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()]


def set_status(sync, number: int, status: int) -> None:
    sync.ps.execute("UPDATE STUDENTS SET ENROLL_STATUS = ? WHERE STUDENT_NUMBER = ?", (status, number))


# F10 -------------------------------------------------------------------------------------------


def test_an_unexpected_journal_error_stops_handing_out_changes(sync, monkeypatch):
    numbers = range(501201, 501241)
    for number in numbers:
        sync.student(number, grade=10)
        sync.account(number)                               # 40 moves
    sync.server.hook = lambda method, path: time.sleep(0.02) if method == "PUT" else None

    def broken(self, outcome):
        raise ValueError("cannot encode")                  # e.g. UnicodeEncodeError from a name

    monkeypatch.setattr(student_sync.Journal, "record", broken)
    report = sync.folder / "report.csv"
    result = sync.run("--all", "--report", str(report))

    moved = [n for n in numbers if sync.server.user(email(n))["orgUnitPath"].endswith("/10th")]
    assert len(moved) <= 16, (len(moved), result.output)   # the changes under way, not the other 24+
    assert result.code == 2, result.output
    assert "journal" in result.output and "ValueError" in result.output, result.output
    assert "unexpected error" not in result.output, result.output
    assert report.exists(), result.output                  # what was applied is still reported


def test_a_defect_while_an_outcome_is_logged_stops_handing_out_and_still_journals(sync, monkeypatch):
    numbers = range(501251, 501291)
    for number in numbers:
        sync.student(number, grade=10)
        sync.account(number)                               # 40 moves
    sync.server.hook = lambda method, path: time.sleep(0.02) if method == "PUT" else None
    original = student_sync._log_outcome

    def broken_once(outcome, _calls=[]):
        _calls.append(1)
        if len(_calls) == 2:
            raise RuntimeError("a defect in the logging")
        return original(outcome)

    monkeypatch.setattr(student_sync, "_log_outcome", broken_once)
    result = sync.run("--all")

    assert result.code == 2 and "unexpected error" in result.output, result.output
    moved = {n for n in numbers if sync.server.user(email(n))["orgUnitPath"].endswith("/10th")}
    assert len(moved) <= 16, (len(moved), result.output)   # stopped handing out; in-flight finished
    journalled = {int(e["student_number"]) for e in journal_entries(sync) if e["result"] == "applied"}
    # every applied move but the one whose logging broke is in the journal
    assert len(moved - journalled) <= 1, (sorted(moved - journalled), result.output)


# F11 -------------------------------------------------------------------------------------------


def test_our_create_is_journalled_as_applied_even_when_the_read_back_fails(sync, no_backoff):
    sync.student(501301)
    lost = []

    def hook(method, path):
        if method == "POST" and path == USERS and not lost:
            lost.append(1)
            return None, True                              # applied, then answered 503
        if method == "GET" and path.endswith("/users/" + email(501301)):
            return "503", False                            # the read-back meets the outage
        return None

    sync.server.hook = hook
    result = sync.run("--all")

    assert sync.server.user(email(501301)) is not None     # the account exists: we made it
    [entry] = [e for e in journal_entries(sync) if e["email"] == email(501301)]
    assert entry["action"] == "create" and entry["result"] == "applied", (entry, result.output)
    assert "503" in entry["result"] or "503" in entry["note"], entry   # the follow-up's failure is told
    assert result.code == 1, result.output                 # the student still counts as failed
    assert "1 failed" in result.output or "failed: 1" in result.output, result.output

    run_id = next((sync.folder / "logs").glob("journal-*.jsonl")).stem[len("journal-"):]
    sync.server.hook = None
    undo = sync.run("--undo", run_id, "--allow-mass-changes")
    assert sync.server.user(email(501301))["suspended"] is True, undo.output


def test_our_create_whose_follow_up_update_fails_is_journalled_as_applied(sync, no_backoff):
    sync.student(501302, grade=10)
    lost = []

    def hook(method, path):
        if method == "POST" and path == USERS and not lost:
            lost.append(1)                                 # our create goes through (where an
            sync.server.add_user(email(501302), given="Student", family="S501302",
                                 org_unit=district.building_ou("WHS") + "/9th")   # admin moves it)
            return "503", False                            # ... and its answer is lost
        if method == "PUT" and path.endswith("/users/" + email(501302)):
            return "503", False                            # the follow-up update meets the outage
        return None

    sync.server.hook = hook
    result = sync.run("--all")

    [entry] = [e for e in journal_entries(sync) if e["email"] == email(501302)]
    assert entry["action"] == "create" and entry["result"] == "applied", (entry, result.output)
    assert result.code == 1, result.output


# F3 --------------------------------------------------------------------------------------------


def test_ctrl_c_just_after_applying_still_records_the_run_and_writes_the_report(sync, tmp_path, monkeypatch):
    sync.student(500301, status=2)
    sync.account(500301)                                   # Monday: plan to suspend 500301
    monday = tmp_path / "monday.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(monday)).code == 0
    set_status(sync, 500301, 0)                            # re-enrolled by Tuesday
    sync.student(500302, grade=10)
    sync.account(500302)                                   # Tuesday's run moves 500302
    original = student_sync.save_school_counts

    def ctrl_c_while_saving(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)                 # the operator's Ctrl-C, a moment late
        return original(*args, **kwargs)

    monkeypatch.setattr(student_sync, "save_school_counts", ctrl_c_while_saving)
    report = tmp_path / "tuesday.csv"
    tuesday = sync.run("--all", "--report", str(report))
    monkeypatch.setattr(student_sync, "save_school_counts", original)

    assert sync.server.user(email(500302))["orgUnitPath"].endswith("/10th")   # Tuesday applied
    assert tuesday.code == 130, tuesday.output
    assert report.exists(), tuesday.output
    assert "interrupted" in tuesday.output.lower(), tuesday.output
    wednesday = sync.run("--apply-plan", str(monday))
    assert wednesday.code == 2 and "written before run" in wednesday.output, wednesday.output
    assert sync.server.user(email(500301))["suspended"] is False


def test_the_run_is_recorded_even_when_the_school_counts_cannot_be_saved(sync, tmp_path, monkeypatch):
    sync.student(500311, status=2)
    sync.account(500311)
    monday = tmp_path / "monday.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(monday)).code == 0
    set_status(sync, 500311, 0)
    sync.student(500312, grade=10)
    sync.account(500312)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    original = student_sync.save_school_counts
    monkeypatch.setattr(student_sync, "save_school_counts", disk_full)
    tuesday = sync.run("--all")
    monkeypatch.setattr(student_sync, "save_school_counts", original)

    assert tuesday.code == 2 and "school counts" in tuesday.output, tuesday.output
    wednesday = sync.run("--apply-plan", str(monday))
    assert wednesday.code == 2 and "written before run" in wednesday.output, wednesday.output
    assert sync.server.user(email(500311))["suspended"] is False
