"""The apply engine keeps the record complete and never touches the wrong account.

Issues 10 (1, 5, 6) and 11 (1, 2, 4, 5, 6): an address that is somebody else's alias, losing
Google's authorization in the middle of a suspension, a journal that cannot be written, Ctrl-C,
answers lost after a change was applied, a create refused with 429 and then answered 409, a long
outage, and the rate limit with creates mixed in.  End to end through `student_sync.main`
against the local Directory API server, except the rate limiter, which runs on virtual time.
"""

from __future__ import annotations

import csv
import datetime as dt
import heapq
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import student_sync
from conftest import WHS_9, WHS_10, email
from testkit import district
from testkit.directory_server import DirectoryServer, FaultPlan

SUSPENDED_OU = district.SUSPENDED_OU
CATEGORY = district.CATEGORY
TEACHER = "oldteacher@d118.org"
BAND = "band@d118.org"
CHOIR = "choir@d118.org"
USERS = "/admin/directory/v1/users"


def journal_entries(sync) -> list[dict]:
    entries = []
    for path in sorted((sync.folder / "logs").glob("journal-*.jsonl")):
        entries += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return entries


def journal_of(sync, kind: str = "sync") -> Path:
    [path] = [p for p in (sync.folder / "logs").glob("journal-*.jsonl")
              if kind in p.read_text(encoding="utf-8").split("\n", 1)[0]]
    return path


def run_id_of(path: Path) -> str:
    return path.stem[len("journal-"):]


def report_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as stream:
        return list(csv.DictReader(stream))


def summary_line(output: str) -> str:
    [line] = [line for line in output.splitlines() if "summary (done)" in line]
    return line


def posts_for(sync, number: int) -> list[int]:
    return [r.status for r in sync.server.requests
            if r.method == "POST" and r.path == USERS and (r.body or {}).get("primaryEmail") == email(number)]


# ---------------------------------------------------------------------------------------------
# The test server models aliases as Google does
# ---------------------------------------------------------------------------------------------


def test_server_answers_a_get_by_alias_with_the_owner_and_refuses_to_insert_an_alias(tmp_path):
    import httplib2
    from googleapiclient.discovery import build
    from googleapiclient.errors import HttpError

    with DirectoryServer(domain="d118.org") as srv:
        srv.add_user(TEACHER, given="Olga", family="Teacher", org_unit="/Staff", aliases=["500031@d118.org"])
        api = build("admin", "directory_v1", static_discovery=True, cache_discovery=False,
                    client_options={"api_endpoint": srv.url}, http=httplib2.Http())

        owner = api.users().get(userKey="500031@D118.org").execute()
        with pytest.raises(HttpError) as refused:
            api.users().insert(body={"primaryEmail": "500031@d118.org", "password": "x" * 12,
                                     "name": {"givenName": "A", "familyName": "B"}}).execute()

    assert owner["primaryEmail"] == TEACHER and owner["aliases"] == ["500031@d118.org"]
    assert refused.value.status_code == 409
    assert srv.user("500031@d118.org") is None       # inspection is by primary address only


# ---------------------------------------------------------------------------------------------
# Issue 10.1: alias takeover, and a create answered 409 is not counted as a create
# ---------------------------------------------------------------------------------------------


def test_a_new_students_address_that_is_a_staff_alias_fails_the_student_and_leaves_the_staff_alone(
        sync, tmp_path):
    sync.server.add_user(TEACHER, given="Olga", family="Teacher", org_unit="/Staff",
                         aliases=[email(500031)])
    before = sync.server.user(TEACHER)
    sync.student(500031, first="Sam", last="New", grade=10)
    sync.student(500032, first="Kim", last="Other", grade=10)
    report = tmp_path / "report.csv"

    result = sync.run("--all", "--report", str(report))

    assert result.code == 1, result.output
    assert sync.server.user(TEACHER) == before                      # not renamed, not moved
    touched = [r for r in sync.writes() if r.method != "POST"]
    assert touched == []                                             # nothing sent to that account
    assert f"alias of {TEACHER}" in result.output and "500031" in result.output
    [row] = [r for r in report_rows(report) if r["student_number"] == "500031" and r["action"] == "create"]
    assert row["result"].startswith("failed") and TEACHER in row["result"]
    assert "1 creates" in summary_line(result.output)                # only 500032
    assert "1 failed" in summary_line(result.output)
    assert not [e for e in journal_entries(sync) if e["student_number"] == 500031 and e["result"] == "applied"]

    again = sync.run("--all")

    assert again.code == 1 and sync.server.user(TEACHER) == before
    assert "0 creates" in summary_line(again.output)


def test_a_create_answered_409_on_its_first_try_counts_as_what_the_follow_up_did(sync, tmp_path):
    # Somebody made the account between the listing and the insert: the insert meets 409,
    # the account is read back and moved. That is a move, not a create.
    sync.student(500041, grade=10)

    def someone_else_creates_it(method, path):
        if method == "POST" and path == USERS and not sync.server.user(email(500041)):
            sync.server.add_user(email(500041), given="Ann", family="Lee", org_unit=WHS_9,
                                 custom=district.attributes(101, 2030))
        return None

    sync.server.hook = someone_else_creates_it
    report = tmp_path / "report.csv"

    result = sync.run("--all", "--report", str(report))

    assert result.code == 0, result.output
    assert sync.server.user(email(500041))["orgUnitPath"] == WHS_10
    assert "0 creates, 1 moves" in summary_line(result.output)
    [row] = [r for r in report_rows(report) if r["student_number"] == "500041"]
    assert row["result"] == "applied" and "already existed" in row["detail"]


# ---------------------------------------------------------------------------------------------
# Issue 11.4: a create refused with 429 (or 403 rate limit) and then answered 409 is not ours
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("refusal", ["429", "403-rateLimitExceeded", "403-userRateLimitExceeded"])
def test_a_create_refused_for_rate_and_then_answered_409_is_not_our_create(sync, no_backoff, refusal):
    sync.student(500051, grade=10)

    def refused_while_someone_creates_it(method, path):
        if method == "POST" and path == USERS and not sync.server.user(email(500051)):
            sync.server.add_user(email(500051), given="Ann", family="Lee", org_unit=WHS_9,
                                 custom=district.attributes(101, 2030))
            return refusal, False          # refused, not executed: this try created nothing
        return None

    sync.server.hook = refused_while_someone_creates_it

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert posts_for(sync, 500051)[-1] == 409
    assert "0 creates, 1 moves" in summary_line(result.output)
    [entry] = [e for e in journal_entries(sync) if e["student_number"] == 500051]
    assert entry["action"] == "update" and entry["result"] == "applied"
    sync.server.hook = None

    undo = sync.run("--undo", run_id_of(journal_of(sync)))

    assert undo.code == 0, undo.output
    account = sync.server.user(email(500051))
    assert account["suspended"] is False and account["orgUnitPath"] == WHS_9   # moved back, not suspended


def test_a_create_whose_answer_was_lost_and_then_answered_409_is_our_create(sync, no_backoff):
    sync.student(500052, grade=10)
    answered = []

    def applied_but_lost_once(method, path):
        if method == "POST" and path == USERS and not answered:
            answered.append(1)
            return None, True               # executed, then answered 503
        return None

    sync.server.hook = applied_but_lost_once

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert posts_for(sync, 500052) == [503, 409]
    assert "1 creates" in summary_line(result.output)
    [entry] = [e for e in journal_entries(sync) if e["student_number"] == 500052]
    assert entry["action"] == "create" and entry["result"] == "applied"


# ---------------------------------------------------------------------------------------------
# Issue 11.2: every applied change is in the journal, summary and email
# ---------------------------------------------------------------------------------------------


def test_a_group_removal_applied_but_answered_503_then_404_is_our_removal(sync, no_backoff, tmp_path):
    sync.student(500061, status=2)
    sync.account(500061)
    sync.server.add_group(BAND, members=[email(500061)])
    sync.server.add_group(CHOIR, members=[email(500061)])
    lost = []

    def band_removal_answer_lost(method, path):
        if method == "DELETE" and BAND in path and not lost:
            lost.append(path)
            return None, True               # removed, then answered 503; the retry meets 404
        return None

    sync.server.hook = band_removal_answer_lost
    report = tmp_path / "report.csv"

    result = sync.run("--all", "--report", str(report))

    assert result.code == 0, result.output
    assert lost
    assert sync.server.groups_of(email(500061)) == set()
    assert "2 group removals" in summary_line(result.output)
    [entry] = [e for e in journal_entries(sync) if e["student_number"] == 500061]
    assert sorted(entry["groups_removed"]) == [BAND, CHOIR]
    [row] = [r for r in report_rows(report) if r["student_number"] == "500061"]
    assert BAND in row["detail"] and CHOIR in row["detail"]


def test_updates_applied_but_answered_503_every_time_are_read_back_journalled_and_undoable(sync, no_backoff):
    # Every write is applied and then answered 503, on every try: the answers are lost, the
    # changes are made.  One read of the account tells.
    for number in range(500080, 500085):
        sync.student(number, grade=10)
        sync.account(number)                                  # 9th grade OU: all move
    sync.student(500085, status=2)
    sync.account(500085)
    sync.server.add_group(BAND, members=[email(500085)])
    sync.server.faults = FaultPlan(applied_then_error_rate=1.0, only_writes=True, seed=1)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert "6 moves" in summary_line(result.output) and "1 suspends" in summary_line(result.output)
    assert "1 group removals" in summary_line(result.output)
    entries = {e["student_number"]: e for e in journal_entries(sync)}
    assert {n: entries[n]["result"] for n in range(500080, 500086)} == dict.fromkeys(range(500080, 500086), "applied")
    sync.server.faults = None

    undo = sync.run("--undo", run_id_of(journal_of(sync)))

    assert undo.code == 0, undo.output
    assert all(sync.server.user(email(n))["orgUnitPath"] == WHS_9 for n in range(500080, 500085))
    assert sync.server.user(email(500085))["suspended"] is False


def test_a_group_404_on_the_first_try_is_not_counted_as_ours(sync, no_backoff):
    # The listing said member; by the time of the delete somebody else had removed it.
    sync.student(500062, status=2)
    sync.account(500062)
    sync.server.add_group(BAND, members=[email(500062)])
    sync.server.add_group(CHOIR, members=[email(500062)])

    def removed_by_someone_else(method, path):
        if method == "DELETE" and BAND in path and email(500062) in sync.server.group_members(BAND):
            with sync.server._lock:
                sync.server._state.groups[BAND]["members"].remove(email(500062))
        return None

    sync.server.hook = removed_by_someone_else

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert "1 group removals" in summary_line(result.output)
    [entry] = [e for e in journal_entries(sync) if e["student_number"] == 500062]
    assert entry["groups_removed"] == [CHOIR]


def test_group_removals_before_a_failed_suspension_are_counted_in_summary_and_email(sync, no_backoff, smtp):
    sync.settings(email_settings(smtp.port))
    sync.student(500071, status=2)
    sync.account(500071)
    sync.server.add_group(BAND, members=[email(500071)])
    sync.server.add_group(CHOIR, members=[email(500071)])

    def suspension_fails(method, path):
        if method == "PUT" and email(500071) in path:
            return "503", False
        return None

    sync.server.hook = suspension_fails

    result = sync.run("--all")

    assert result.code == 1, result.output
    assert sync.server.groups_of(email(500071)) == set()
    assert sync.server.user(email(500071))["suspended"] is False
    assert "2 group removals" in summary_line(result.output)
    assert "0 suspends" in summary_line(result.output)
    [body] = smtp.bodies()
    assert "2 group removals" in body
    [entry] = [e for e in journal_entries(sync) if e["student_number"] == 500071]
    assert sorted(entry["groups_removed"]) == [BAND, CHOIR] and entry["result"].startswith("failed")


# ---------------------------------------------------------------------------------------------
# Issue 10.6: losing Google's authorization during a suspension stops the run
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failing_call", ["groups-list", "members-delete", "suspend-update"])
def test_losing_authorization_during_suspensions_stops_the_run(sync, no_backoff, token_endpoint, failing_call):
    future = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_token(sync.folder / "token.json", token_endpoint.url, expiry=future)
    sync.settings({"google": {"auth": "oauth", "token_file": "token.json", "api_endpoint": sync.server.url}})
    for number in range(500100, 500140):
        sync.student(number, status=2)
        sync.account(number)
        sync.server.add_group(f"club{number}@d118.org", members=[email(number)])

    def revoked(method, path):
        # The token is revoked in Google: from now on every call answers 401, and the
        # client's refresh meets invalid_grant.
        hit = {"groups-list": method == "GET" and path.endswith("/groups"),
               "members-delete": method == "DELETE",
               "suspend-update": method == "PUT"}[failing_call]
        if hit or revoked.on:
            revoked.on = True
            return "401", False
        return None

    revoked.on = False
    sync.server.hook = revoked

    result = sync.run("--all")

    assert result.code == 2, result.output
    assert "--authorize" in result.output
    calls_after_401 = [r for r in sync.server.requests if r.status == 401]
    assert len(calls_after_401) <= 8 * 2                 # the in-flight ones at most, no retry storm
    assert len(calls_after_401) < 40


# ---------------------------------------------------------------------------------------------
# Issue 10.5: a journal that cannot be written stops the applying; --undo of a cut journal
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_a_journal_that_cannot_be_written_stops_applying_with_exit_2_naming_the_folder(sync, tmp_path):
    numbers = range(500200, 500320)
    for number in numbers:
        sync.student(number, grade=10)
    sync.server.latency_ms = 10
    logs = sync.folder / "logs"
    full_after: list[int] = []
    swap = threading.Lock()

    def journal_lines() -> int:
        journals = list(logs.glob("journal-*.jsonl"))
        return len(journals[0].read_bytes().splitlines()) if journals else 0

    def disk_fills_up(method, path):
        if method != "POST":
            return None
        with swap:
            if not full_after and sync.server.count("POST") >= 12:
                for _ in range(1000):                  # the journal has its first lines by now
                    if journal_lines() >= 1:
                        break
                    time.sleep(0.01)
                full_after.append(sum(1 for n in numbers if sync.server.user(email(n))))
                [journal] = logs.glob("journal-*.jsonl")
                full = journal.with_name("full-disk")  # swapped in at once: a writer that opens the
                full.symlink_to("/dev/full")           # journal meanwhile cannot re-create it first
                os.replace(full, journal)              # every write from now on: no space left
        if full_after:
            time.sleep(0.2)    # slower writes from now on: the rest of the plan cannot race the stop
        return None

    sync.server.hook = disk_fills_up
    report = tmp_path / "report.csv"

    result = sync.run("--all", "--report", str(report))

    assert result.code == 2, result.output
    assert str(logs) in result.output and "journal" in result.output
    created = [n for n in numbers if sync.server.user(email(n))]
    assert full_after, result.output
    assert len(created) < len(numbers) - 40, (full_after, len(created))   # stopped soon after, far from the end
    rows = {r["student_number"]: r["result"] for r in report_rows(report) if r["action"] == "create"}
    assert all(rows[str(n)] == "applied" for n in created)
    assert sum(result.startswith("not tried") for result in rows.values()) == len(numbers) - len(created)
    assert f"{len(created)} creates" in summary_line(result.output)


def cut_last_line(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2], encoding="utf-8")


def test_undo_of_a_journal_whose_last_line_is_half_written_undoes_every_intact_line(sync):
    for number in range(500300, 500306):
        sync.student(number, grade=10)
        sync.account(number)                                  # 9th grade OU: all move
    first = sync.run("--all")
    assert first.code == 0, first.output
    journal = journal_of(sync)
    last = json.loads(journal.read_text(encoding="utf-8").splitlines()[-1])
    cut_last_line(journal)

    undo = sync.run("--undo", run_id_of(journal))

    assert undo.code == 1, undo.output                       # the last one could not be undone
    assert "incomplete" in undo.output and "last line" in undo.output
    for number in range(500300, 500306):
        expected = WHS_10 if number == last["student_number"] else WHS_9
        assert sync.server.user(email(number))["orgUnitPath"] == expected, number


def test_undo_of_a_journal_with_a_half_line_in_the_middle_is_refused_naming_the_line(sync):
    for number in range(500310, 500314):
        sync.student(number, grade=10)
        sync.account(number)
    sync.run("--all")
    journal = journal_of(sync)
    lines = journal.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    journal.write_text("".join(lines), encoding="utf-8")
    sync.server.clear_requests()

    undo = sync.run("--undo", run_id_of(journal))

    assert undo.code == 2, undo.output
    assert "line 2" in undo.output
    assert sync.writes() == []


# ---------------------------------------------------------------------------------------------
# Issue 11.1: Ctrl-C during apply
# ---------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """What this test's own SIGINT handler raises: the tool must have replaced it during apply."""


@pytest.fixture
def own_sigint_handler():
    """This test's handler for SIGINT and SIGTERM: without the tool's own during apply, a
    signal ends the run with an error instead of ending the test session."""
    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    yield handler
    for number, old in previous.items():
        signal.signal(number, old)


@pytest.mark.parametrize("signals", [1, 2], ids=["one-ctrl-c", "two-ctrl-c"])
def test_ctrl_c_during_apply_finishes_in_flight_changes_journals_them_and_exits_130(
        sync, own_sigint_handler, tmp_path, smtp, signals):
    sync.settings(email_settings(smtp.port))
    sync.server.latency_ms = 20
    numbers = range(500400, 500520)
    for number in numbers:
        sync.student(number, grade=10)
    creates = []

    def ctrl_c(method, path):
        if method == "POST" and path == USERS:
            creates.append(1)
            if len(creates) == 15 or (signals == 2 and len(creates) == 17):
                os.kill(os.getpid(), signal.SIGINT)
            elif len(creates) > 15:
                time.sleep(0.05)   # the rest of the plan cannot race the stop on a busy machine
        return None

    sync.server.hook = ctrl_c
    report = tmp_path / "report.csv"

    result = sync.run("--all", "--report", str(report))

    assert result.code == 130, result.output
    assert signal.getsignal(signal.SIGINT) is own_sigint_handler   # restored after the apply
    assert signal.getsignal(signal.SIGTERM) is own_sigint_handler
    assert "interrupted" in result.output.lower() and "interrupted" in summary_line(result.output)
    [message] = smtp.messages
    assert "interrupted" in message["Subject"] and "interrupted" in smtp.bodies()[0]
    created = {n for n in numbers if sync.server.user(email(n))}
    assert 15 <= len(created) < 60                              # stopped handing out changes
    journalled = {e["student_number"] for e in journal_entries(sync) if e["result"] == "applied"}
    assert journalled == created                                # every account that exists
    rows = report_rows(report)
    assert sum(r["result"] == "applied" for r in rows) == len(created)
    assert all(r["result"].startswith("not tried") for r in rows if int(r["student_number"]) not in created)
    sync.server.hook = None

    undo = sync.run("--undo", run_id_of(journal_of(sync)))     # the lock was released

    assert undo.code == 0, undo.output
    assert all(sync.server.user(email(n))["suspended"] for n in created)


def test_a_stop_request_sigterm_during_apply_stops_like_ctrl_c(sync, own_sigint_handler):
    numbers = range(500530, 500590)
    for number in numbers:
        sync.student(number, grade=10)
    sync.server.latency_ms = 20
    creates = []

    def stop_request(method, path):
        if method == "POST" and path == USERS:
            creates.append(1)
            if len(creates) == 10:
                os.kill(os.getpid(), signal.SIGTERM)
            elif len(creates) > 10:
                time.sleep(0.05)
        return None

    sync.server.hook = stop_request

    result = sync.run("--all")

    assert result.code == 130, result.output
    created = {n for n in numbers if sync.server.user(email(n))}
    assert 10 <= len(created) < len(numbers)
    assert {e["student_number"] for e in journal_entries(sync) if e["result"] == "applied"} == created
    assert signal.getsignal(signal.SIGTERM) is own_sigint_handler


def test_exit_code_130_is_named_in_the_readme_and_the_help():
    readme = (Path(student_sync.__file__).parent / "README.md").read_text(encoding="utf-8")
    assert "| 130 |" in readme
    assert "130" in student_sync.build_parser().epilog


# ---------------------------------------------------------------------------------------------
# Issue 11.5: a long outage stops the run
# ---------------------------------------------------------------------------------------------


def test_a_long_outage_stops_applying_and_reports_the_rest_as_not_tried(sync, no_backoff, tmp_path, smtp):
    sync.settings(email_settings(smtp.port))
    numbers = range(500600, 500700)
    for number in numbers:
        sync.student(number, grade=10)
        sync.account(number)
    sync.server.faults = FaultPlan(rate=1.0, statuses=(503,), only_writes=True, seed=1)
    report = tmp_path / "report.csv"

    result = sync.run("--all", "--report", str(report))

    assert result.code == 1, result.output
    tried = {r.path for r in sync.writes()}
    assert len(tried) <= student_sync.MAX_CONSECUTIVE_FAILURES + 8
    rows = report_rows(report)
    not_tried = [r for r in rows if r["result"].startswith("not tried")]
    assert len(not_tried) == 100 - len(tried)
    assert "outage" in summary_line(result.output) and "not tried" in summary_line(result.output)
    assert [line for line in result.output.splitlines() if "outage" in line and "pytest" not in line]
    [body] = smtp.bodies()
    assert [line for line in body.splitlines() if "outage" in line and "not tried" in line and "pytest" not in line]


def test_failures_with_successes_in_between_do_not_stop_the_run(sync, no_backoff):
    for number in range(500700, 500760):
        sync.student(number, grade=10)
        sync.account(number)
    failing = {email(n) for n in range(500700, 500760) if n % 2}

    def every_other_one_fails(method, path):
        if method == "PUT" and any(address in path for address in failing):
            return "503", False
        return None

    sync.server.hook = every_other_one_fails

    result = sync.run("--all")

    assert result.code == 1, result.output
    assert "30 failed" in summary_line(result.output)
    assert all(sync.server.user(email(n))["orgUnitPath"] == WHS_10 for n in range(500700, 500760, 2))


# ---------------------------------------------------------------------------------------------
# Issue 11.6: the rate limit holds in every second with creates mixed in
# ---------------------------------------------------------------------------------------------


class VirtualTime:
    """time.monotonic and time.sleep for several threads: time moves only when every thread
    that is still working sleeps, to the earliest wake-up.  Deterministic up to thread order."""

    def __init__(self, threads: int):
        self.now = 1000.0
        self.running = threads
        self._wakeups: list[float] = []
        self._condition = threading.Condition()

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._condition:
            wake = self.now + max(seconds, 1e-6)
            heapq.heappush(self._wakeups, wake)
            self.running -= 1
            self._advance()
            while self.now < wake:
                self._condition.wait()
            self.running += 1

    def finished(self) -> None:
        with self._condition:
            self.running -= 1
            self._advance()

    def _advance(self) -> None:
        if self.running == 0 and self._wakeups:
            self.now = heapq.heappop(self._wakeups)
            while self._wakeups and self._wakeups[0] <= self.now:
                heapq.heappop(self._wakeups)
            self._condition.notify_all()


def busiest(stamps: list[float]) -> int:
    stamps = sorted(stamps)
    return max(sum(1 for t in stamps if s <= t < s + 1.0 - 1e-9) for s in stamps)


def test_the_busiest_second_holds_no_more_calls_than_the_limit_with_creates_mixed_in():
    workers = 8
    time_ = VirtualTime(workers)
    overall = student_sync.RateLimiter(35, clock=time_.clock, sleep=time_.sleep)
    creates = student_sync.RateLimiter(9, clock=time_.clock, sleep=time_.sleep)
    policy = student_sync.RetryPolicy(sleep=time_.sleep, jitter=lambda: 0.0, limiter=overall)
    sent: list[tuple[float, str]] = []
    lock = threading.Lock()
    mix = random.Random(1)     # a quarter creates, in no particular order, as a real plan has
    work = ["create" if mix.random() < 0.25 else "update" for _ in range(600)]

    def worker() -> None:
        try:
            while True:
                with lock:
                    if not work:
                        return
                    kind = work.pop()

                def send(kind=kind):
                    with lock:
                        sent.append((time_.now, kind))

                policy.call(send, limiters=(creates,) if kind == "create" else ())
        finally:
            time_.finished()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(sent) == 600
    assert busiest([t for t, _ in sent]) <= 35
    assert busiest([t for t, kind in sent if kind == "create"]) <= 9


# ---------------------------------------------------------------------------------------------
# Helpers shared with the safety and operator tests (token endpoint, mailbox)
# ---------------------------------------------------------------------------------------------

from test_safety import token_endpoint, write_token  # noqa: E402,F401
from conftest import email_settings  # noqa: E402 - the smtp fixture is conftest's
