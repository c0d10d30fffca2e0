"""Run files across settings files (SPEC sections 5 and 7): which settings file may undo a run
or apply a plan found in a shared logs folder.

Every test runs the command line in-process against the local Directory API server and a
SQLite PowerSchool (see conftest.py).  A second settings file, in a folder of its own, sends
its logs to the first one's logs folder, as two districts' (or a test and a production)
settings files on one server may.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import email, email_settings, logs, run_id_of, run_with, withdrawn
from test_windows import windows  # noqa: F401 - the Windows branch, as a fixture
import student_sync
from testkit import district


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def other_settings(sync, **overrides: dict) -> Path:
    """Another settings file, in its own folder, whose logs go to `sync`'s logs folder."""
    folder = sync.folder / "other"
    folder.mkdir(exist_ok=True)
    sections = {"logging": {"dir": str(logs(sync))}, "powerschool": {"sqlite": str(sync.ps.path)}}
    for section, keys in overrides.items():
        sections.setdefault(section, {}).update(keys)
    return district.write_settings(folder / "student_sync.toml", sync.server.url, sections)


def mark_of(settings: Path) -> str:
    return student_sync.load_settings(settings).instance


def unmarked(sync, run_id: str, *, keep_log: bool = True) -> str:
    """Rename a run's journal (and log) as the tool named them before run ids carried the
    settings file's mark: `20261128-020003` instead of `20261128-020003-1a2b3c4d`."""
    old_id = re.sub(r"-[0-9a-f]{8}(?=-\d+$|$)", "", run_id)
    assert old_id != run_id
    (logs(sync) / f"journal-{run_id}.jsonl").rename(logs(sync) / f"journal-{old_id}.jsonl")
    log_file = logs(sync) / f"student_sync-{run_id}.log"
    if keep_log:
        text = log_file.read_text(encoding="utf-8").replace(run_id, old_id)
        (logs(sync) / f"student_sync-{old_id}.log").write_text(text, encoding="utf-8")
    log_file.unlink()
    return old_id


# ---------------------------------------------------------------------------------------------
# 1. --undo and --apply-plan belong to the settings file that ran them
# ---------------------------------------------------------------------------------------------


def test_undo_of_a_run_of_another_settings_file_in_the_shared_logs_folder_is_refused(sync):
    other = other_settings(sync)
    sync.student(710001)
    made = run_with(sync, other, "--all")                 # the other settings file creates the account
    assert made.code == 0, made.output
    run_id = run_id_of(made)
    journal = logs(sync) / f"journal-{run_id}.jsonl"
    journal_before = journal.read_text(encoding="utf-8")
    sync.server.clear_requests()

    for dry_run in ((), ("--dry-run",)):
        result = sync.run("--undo", run_id, *dry_run)

        assert result.code == 2, result.output
        said = result.output
        assert run_id in said
        assert f"mark {mark_of(other)}" in said                  # the mark the run carries
        assert mark_of(sync.settings_path) in said               # this settings file's
        assert str(other) in said                                # the settings file its log names
        assert "run the undo with that run's settings file" in said
    assert sync.writes() == []
    assert sync.server.user(email(710001))["suspended"] is False
    assert journal.read_text(encoding="utf-8") == journal_before
    assert list(logs(sync).glob(f"journal-*{mark_of(sync.settings_path)}*")) == []  # no undo journal

    undone = run_with(sync, other, "--undo", run_id)       # its own settings file undoes it
    assert undone.code == 0, undone.output
    assert sync.server.user(email(710001))["suspended"] is True


def test_undo_of_a_run_from_before_marks_whose_log_names_this_settings_file_goes_ahead(sync):
    sync.student(710011)
    made = sync.run("--all")
    assert made.code == 0, made.output
    old_id = unmarked(sync, run_id_of(made))

    result = sync.run("--undo", old_id)

    assert result.code == 0, result.output
    assert sync.server.user(email(710011))["suspended"] is True


def test_undo_of_a_run_from_before_marks_whose_log_names_another_settings_file_is_refused(sync):
    other = other_settings(sync)
    sync.student(710021)
    made = run_with(sync, other, "--all")
    assert made.code == 0, made.output
    old_id = unmarked(sync, run_id_of(made))
    sync.server.clear_requests()

    result = sync.run("--undo", old_id)

    assert result.code == 2, result.output
    assert old_id in result.output and str(other) in result.output
    assert "run the undo with that run's settings file" in result.output
    assert sync.writes() == []
    assert sync.server.user(email(710021))["suspended"] is False


def test_undo_of_a_run_from_before_marks_without_its_log_is_refused_until_the_journal_is_claimed(sync):
    sync.student(710031)
    made = sync.run("--all")
    assert made.code == 0, made.output
    old_id = unmarked(sync, run_id_of(made), keep_log=False)
    sync.server.clear_requests()

    refused = sync.run("--undo", old_id)

    assert refused.code == 2, refused.output
    claimed = f"journal-{old_id}-{mark_of(sync.settings_path)}.jsonl"
    assert old_id in refused.output and claimed in refused.output
    assert sync.writes() == []
    assert sync.server.user(email(710031))["suspended"] is False

    # The administrator says whose run it was by giving the journal this settings file's mark.
    (logs(sync) / f"journal-{old_id}.jsonl").rename(logs(sync) / claimed)
    undone = sync.run("--undo", f"{old_id}-{mark_of(sync.settings_path)}")
    assert undone.code == 0, undone.output
    assert sync.server.user(email(710031))["suspended"] is True


def test_a_plan_written_by_another_settings_file_with_other_rules_is_refused(sync):
    other = other_settings(sync, safety={"max_suspensions": 1}, accounts={"bad_names": ["nobody"]})
    withdrawn(sync, [710041, 710042])
    stopped = run_with(sync, other, "--all")               # a safety stop writes its plan into the logs
    assert stopped.code == 3, stopped.output
    [plan] = logs(sync).glob(f"plan-*-{mark_of(other)}.json")
    sync.server.clear_requests()

    result = sync.run("--apply-plan", str(plan), "--allow-older-plan")

    assert result.code == 2, result.output
    assert "was made with other settings" in result.output and str(plan) in result.output
    assert sync.writes() == []
    assert sync.server.user(email(710041))["suspended"] is False


def test_a_plan_written_by_another_settings_file_with_the_same_rules_is_refused(sync):
    other = other_settings(sync, safety={"max_suspensions": 1})
    withdrawn(sync, [710051, 710052])
    stopped = run_with(sync, other, "--all")
    assert stopped.code == 3, stopped.output
    [plan] = logs(sync).glob(f"plan-*-{mark_of(other)}.json")
    sync.server.clear_requests()

    result = sync.run("--apply-plan", str(plan), "--allow-older-plan")

    assert result.code == 2, result.output
    assert mark_of(other) in result.output and mark_of(sync.settings_path) in result.output
    assert "apply it with that run's settings file" in result.output
    assert sync.writes() == []
    assert sync.server.user(email(710051))["suspended"] is False

    applied = run_with(sync, other, "--apply-plan", str(plan))
    assert applied.code == 0, applied.output
    assert sync.server.user(email(710051))["suspended"] is True


# ---------------------------------------------------------------------------------------------
# 2. Safety-stop plan files are pruned with the logs, each settings file its own
# ---------------------------------------------------------------------------------------------


def plans_of(sync, settings: Path) -> list[Path]:
    return sorted(logs(sync).glob(f"plan-*-{mark_of(settings)}*.json"))


def test_safety_stop_plans_are_pruned_to_the_newest_keep_of_this_settings_file_only(sync, tmp_path):
    sync.settings({"logging": {"keep": 2}, "safety": {"max_suspensions": 0}})
    other = other_settings(sync, logging={"keep": 5}, safety={"max_suspensions": 0})
    withdrawn(sync, [720001])
    before_marks = logs(sync) / "plan-20261128-020003.json"          # written before run ids had marks
    chosen = [logs(sync) / "plan-reviewed.json", logs(sync) / "september.json"]   # --plan-out names
    logs(sync).mkdir(exist_ok=True)
    before_marks.write_text("{}", encoding="utf-8")
    for path in chosen:
        written = sync.run("--all", "--dry-run", "--plan-out", str(path))
        assert written.code == 3 and path.is_file(), written.output
    stopped_other = run_with(sync, other, "--all")
    assert stopped_other.code == 3, stopped_other.output

    mine = []
    for _ in range(4):
        stopped = sync.run("--all")
        assert stopped.code == 3, stopped.output
        mine.append(Path(re.search(r"The plan is in (\S+) ", stopped.output).group(1)))

    assert plans_of(sync, sync.settings_path) == sorted(mine[-2:])
    assert len(plans_of(sync, other)) == 1                       # the other settings file's, kept
    assert before_marks.is_file()
    assert all(path.is_file() for path in chosen)
    assert sync.server.user(email(720001))["suspended"] is False


# ---------------------------------------------------------------------------------------------
# 3. Files that hold student names and numbers are this account's only (POSIX)
# ---------------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    """The usual umask, under which a file is created readable by everyone (0644)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def replaced(monkeypatch):
    """The mode of every file as it takes another's place (an atomic write's temporary file)."""
    seen: list[tuple[str, int]] = []
    real = os.replace

    def replace(source, target, *args, **kwargs):
        seen.append((Path(target).name, mode(Path(source))))
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return seen


def test_the_files_a_run_creates_are_readable_by_this_account_only(sync, tmp_path, open_umask, replaced):
    sync.student(730001)                                      # a create: journal, report, plan
    report, plan = tmp_path / "out" / "report.csv", tmp_path / "out" / "plan.json"
    assert not logs(sync).exists()

    dry = sync.run("--all", "--dry-run", "--plan-out", str(plan))
    result = sync.run("--all", "--report", str(report))
    withdrawn(sync, [730002, 730003])
    sync.settings({"safety": {"max_suspensions": 1}})
    stopped = sync.run("--all")

    assert dry.code == 0 and result.code == 0 and stopped.code == 3, stopped.output
    assert mode(logs(sync)) == 0o700
    written = [*logs(sync).glob("student_sync-*.log"), *logs(sync).glob("journal-*.jsonl"),
               *logs(sync).glob("plan-*.json"), *logs(sync).glob("school_counts-*.json"),
               *logs(sync).glob("applied_runs-*.json"), report, plan]
    assert {path.name.split("-")[0] for path in written} >= {"student_sync", "journal", "plan", "school_counts",
                                                             "applied_runs", "report.csv", "plan.json"}
    assert {path.name: mode(path) for path in written} == {path.name: 0o600 for path in written}
    assert replaced and all(seen == 0o600 for _, seen in replaced), replaced


def test_a_file_that_exists_keeps_its_permissions_when_rewritten(sync, tmp_path, open_umask):
    sync.student(730011)
    report = tmp_path / "report.csv"
    report.write_text("", encoding="utf-8")
    report.chmod(0o640)                                     # shared with a group on purpose
    assert sync.run("--all").code == 0
    [counts] = logs(sync).glob("school_counts-*.json")
    counts.chmod(0o644)
    sync.student(730012)

    result = sync.run("--all", "--report", str(report))

    assert result.code == 0, result.output
    assert "730012" in report.read_text(encoding="utf-8-sig")
    assert mode(report) == 0o640
    assert mode(counts) == 0o644


def test_on_windows_the_files_take_the_logs_folders_access_list_unchanged(sync, tmp_path, windows, open_umask):
    sync.student(730021)
    report = tmp_path / "report.csv"

    result = sync.run("--all", "--report", str(report))

    assert result.code == 0, result.output
    assert windows.icacls == []                             # no access list of their own
    opened = [report, *logs(sync).glob("student_sync-*.log"), *logs(sync).glob("journal-*.jsonl")]
    assert len(opened) == 3
    assert [mode(path) for path in opened] == [0o644] * 3   # no POSIX mode asked for either


# ---------------------------------------------------------------------------------------------
# 4. Ctrl-C while the summary email is sent
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def ctrl_c_mail_server():
    """An SMTP server that, once the run connects to it, has Ctrl-C pressed (SIGINT to this
    process, with Python's own handler for it: a process started in the background of a shell
    inherits SIGINT ignored, and Python then sets no handler) and then never says a word; its
    port.  What it saw is in `seen` for the assertion messages."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    seen: list[str] = []

    def serve() -> None:
        try:
            connection, peer = listener.accept()
        except OSError as exc:
            seen.append(f"accept failed: {exc!r}")
            return
        held.append(connection)
        seen.append(f"connection from {peer}; Ctrl-C")
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield SimpleNamespace(port=listener.getsockname()[1], seen=seen)
    listener.close()
    for connection in held:
        connection.close()
    thread.join(5)
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("stopped, code", [(False, 130), (True, 3)])
def test_ctrl_c_while_the_summary_email_is_sent_abandons_the_email_not_the_runs_outcome(
        sync, ctrl_c_mail_server, stopped, code, monkeypatch):
    # A short deadline: a Ctrl-C that is lost fails this test in seconds, not in a minute.
    monkeypatch.setattr(student_sync, "EMAIL_DEADLINE_SECONDS", 8)
    sync.settings({**email_settings(ctrl_c_mail_server.port, when="always"),
                   "safety": {"max_suspensions": 0 if stopped else 100}})
    withdrawn(sync, [740001])

    try:
        result = sync.run("--all")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during the summary email ended main with a traceback")

    assert result.code == code, (result.output, ctrl_c_mail_server.seen)  # a finished run: interrupted; a stop: its own
    assert "Traceback" not in result.output
    assert re.search(r"WARNING: interrupted \(Ctrl-C\) while the summary email was being sent", result.output)
    assert "timed out" not in result.output        # the Ctrl-C ended the wait, not the deadline
    [log_file] = logs(sync).glob("student_sync-*.log")
    assert "interrupted (Ctrl-C) while the summary email was being sent" in log_file.read_text(encoding="utf-8")
    assert sync.server.user(email(740001))["suspended"] is (not stopped)
