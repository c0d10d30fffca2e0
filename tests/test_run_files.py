"""Run files across settings files (SPEC sections 5 and 7): which settings file may undo a run
or apply a plan found in a shared logs folder.

Every test runs the command line in-process against the local Directory API server and a
SQLite PowerSchool (see conftest.py).  A second settings file, in a folder of its own, sends
its logs to the first one's logs folder, as two districts' (or a test and a production)
settings files on one server may.
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import email, logs, run_id_of, withdrawn
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


def run_with(sync, settings: Path, *arguments: str):
    saved = sync.settings_path
    sync.settings_path = settings
    try:
        return sync.run(*arguments)
    finally:
        sync.settings_path = saved


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
