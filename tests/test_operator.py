"""What the person who runs student_sync sees and keeps: --check, the per-run log files,
the --report CSV, the progress counter, the summary email, and accounts nobody owns.

Each test runs the command line in-process against the local Directory API server and a
SQLite PowerSchool (see conftest.py); the email tests add a local SMTP server (aiosmtpd).
"""

from __future__ import annotations

import csv
import copy
import re
import sys
from pathlib import Path

from conftest import (PASSWORD, SMTP_PASSWORD, WHS_9, WHS_10, FakeTty, Sync, email, email_settings,
                      free_port)
import student_sync
from testkit import district
from testkit.directory_server import FaultPlan


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def log_files(sync: Sync) -> list[Path]:
    return sorted((sync.folder / "logs").glob("student_sync-*.log"))


def newest_log(sync: Sync) -> str:
    files = sorted(log_files(sync), key=lambda p: p.stat().st_mtime_ns)
    assert files, "no log file was written"
    return files[-1].read_text(encoding="utf-8")


def read_report(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as stream:
        return list(csv.DictReader(stream))


def lines_starting(output: str, word: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(word)]


# ---------------------------------------------------------------------------------------------
# 1. --check
# ---------------------------------------------------------------------------------------------


def test_check_all_ok_prints_one_ok_line_per_check_and_exits_0(sync):
    sync.student(1001)
    sync.student(1002, school=102, grade=7)
    sync.student(1003, grade=10)
    result = sync.run("--check")
    assert result.code == 0, result.output
    assert not lines_starting(result.output, "FAIL"), result.output
    ok = lines_starting(result.output, "OK")
    assert len(ok) == 9, result.output
    settings, powerschool, google, ous, schema, password, files, drop, suspensions = ok
    assert "settings" in settings
    assert "PowerSchool" in powerschool and "101: 2" in powerschool and "102: 1" in powerschool
    assert "Google" in google and "authorized" in google
    assert "OU" in ous
    assert district.CATEGORY in schema and district.SCHOOL_FIELD in schema and district.GRAD_FIELD in schema
    assert "NEW_USER_PASSWORD" in password
    assert "logs folder" in files and "can be written" in files
    assert "max_school_drop_percent" in drop and "max_suspensions" in suspensions


def test_check_missing_building_ous_is_a_fail_line_listing_them(sync):
    sync.ps.school(103, "Jefferson Elementary", "JES", 0)  # no OUs for JES in Google
    sync.student(1001)
    sync.student(1002, school=103, grade=3)
    sync.student(1003, school=103, grade=4)
    result = sync.run("--check")
    assert result.code == 2, result.output
    fails = lines_starting(result.output, "FAIL")
    assert len(fails) == 1, result.output
    assert "/D118 Students/JES Students/3rd" in fails[0]
    assert "/D118 Students/JES Students/4th" in fails[0]
    assert "WHS" not in fails[0]


def test_check_missing_schema_field_is_a_fail_naming_the_field(bare_sync):
    sync = bare_sync(district.CATEGORY, {district.SCHOOL_FIELD: "INT64"})
    sync.student(1001)
    result = sync.run("--check")
    assert result.code == 2, result.output
    fails = lines_starting(result.output, "FAIL")
    assert len(fails) == 1, result.output
    assert district.GRAD_FIELD in fails[0] and "missing" in fails[0]


def test_check_category_spelled_otherwise_names_the_domains_spelling(bare_sync):
    sync = bare_sync("SynchronizationData", {district.SCHOOL_FIELD: "INT64", district.GRAD_FIELD: "INT64"})
    sync.student(1001)
    result = sync.run("--check")
    assert result.code == 2, result.output
    fails = lines_starting(result.output, "FAIL")
    assert len(fails) == 1, result.output
    assert "SynchronizationData" in fails[0] and district.CATEGORY in fails[0]


def test_check_without_new_user_password_fails_naming_the_variable(sync, monkeypatch):
    monkeypatch.delenv("NEW_USER_PASSWORD")
    sync.student(1001)
    result = sync.run("--check")
    assert result.code == 2, result.output
    fails = lines_starting(result.output, "FAIL")
    assert len(fails) == 1 and "NEW_USER_PASSWORD" in fails[0], result.output
    assert PASSWORD not in result.output


def test_check_with_powerschool_unreachable_fails_and_still_checks_google(sync):
    sync.settings({"powerschool": {"sqlite": "missing.sqlite3"}})
    result = sync.run("--check")
    assert result.code == 2, result.output
    fails = lines_starting(result.output, "FAIL")
    assert len(fails) == 1 and "PowerSchool" in fails[0] and "missing.sqlite3" in fails[0], result.output
    ok = "\n".join(lines_starting(result.output, "OK"))
    assert "Google" in ok and district.CATEGORY in ok and "OU" in ok


def test_check_with_google_unreachable_fails_and_still_checks_powerschool(sync, no_backoff):
    sync.settings({"google": {"api_endpoint": f"http://127.0.0.1:{free_port()}/"}})  # nobody listens
    sync.student(1001)
    result = sync.run("--check")
    assert result.code == 2, result.output
    fails = lines_starting(result.output, "FAIL")
    assert len(fails) == 1 and "Google" in fails[0], result.output
    ok = "\n".join(lines_starting(result.output, "OK"))
    assert "PowerSchool" in ok and "101: 1" in ok and "NEW_USER_PASSWORD" in ok


def test_check_of_one_building_ignores_other_buildings_missing_ous(sync):
    sync.ps.school(103, "Jefferson Elementary", "JES", 0)  # no OUs for JES in Google
    sync.student(1001)
    sync.student(1002, school=103, grade=3)
    result = sync.run("--check", "--building", "101")
    assert result.code == 0, result.output
    assert not lines_starting(result.output, "FAIL")


def test_quiet_check_still_shows_what_failed(sync, monkeypatch):
    monkeypatch.delenv("NEW_USER_PASSWORD")
    result = sync.run("--check", "-q")
    assert result.code == 2
    assert "NEW_USER_PASSWORD" in result.output


def test_check_makes_no_write_requests(sync):
    sync.student(1001)                                    # would be created
    sync.student(1002, status=2)                          # would be suspended
    sync.account(1002)
    sync.student(1003, grade=10)                          # would be moved
    sync.account(1003, org_unit=WHS_9)
    sync.server.add_group("band@d118.org", members=[email(1002)])
    result = sync.run("--check")
    assert result.code == 0, result.output
    assert sync.writes() == []


# ---------------------------------------------------------------------------------------------
# 2. One log file per run
# ---------------------------------------------------------------------------------------------


def test_a_relative_logs_folder_is_beside_the_script_wherever_the_settings_are(tmp_path):
    raw = copy.deepcopy(district.BASE_SETTINGS)
    raw["logging"]["dir"] = "nightly-logs"
    settings = student_sync.settings_from_dict(raw, tmp_path / "elsewhere" / "student_sync.toml")
    assert settings.logging.dir == Path(student_sync.__file__).resolve().parent / "nightly-logs"


def test_each_run_writes_a_log_file_in_the_logs_folder_with_debug_detail(sync, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)                          # not relative to the working folder
    sync.student(1001)
    sync.student(1002)
    sync.account(1002, org_unit=WHS_10)
    sync.student(1003, class_of=None)                     # a warning on the console
    sync.account(1003, class_of=None)
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert "WARNING: student 1003" in result.output
    assert len(log_files(sync)) == 1
    assert not (elsewhere / "logs").exists()
    text = newest_log(sync)
    version_line = f"student_sync {student_sync.__version__}, run "
    assert version_line in text
    assert version_line not in result.output
    for line in result.output.splitlines():               # every console line is in the file too
        assert re.sub(r"^(WARNING|ERROR): ", "", line) in text
    summary = [line for line in text.splitlines() if "summary (done)" in line]
    assert len(summary) == 1
    assert re.search(r"1 creates, 1 moves, .*; \d+ already in step, .*0 failed.*; \d+\.\d s$", summary[0])


def test_verbose_run_shows_the_debug_line_on_the_console(sync):
    result = sync.run("--all", "-v")
    assert f"student_sync {student_sync.__version__}, run " in result.output


def test_only_the_newest_keep_log_files_remain(sync):
    sync.settings({"logging": {"keep": 3}})
    sync.student(1001)
    sync.account(1001)
    made = []
    for _ in range(5):
        before = set(log_files(sync))
        assert sync.run("--all").code == 0
        made.extend(set(log_files(sync)) - before)
    assert len(made) == 5
    assert set(log_files(sync)) == set(made[-3:])


# ---------------------------------------------------------------------------------------------
# 3. --report FILE
# ---------------------------------------------------------------------------------------------


def test_report_is_utf8_with_bom_and_one_applied_row_per_change(sync, tmp_path):
    report = tmp_path / "report.csv"
    sync.student(1001, first="Zoë", last="O'Brien")
    sync.student(1002, first="José", last="D'Angelo")
    sync.account(1002, given="Jose", family="Dangelo")
    sync.student(1003, grade=10)
    sync.account(1003)
    result = sync.run("--all", "--report", str(report))
    assert result.code == 0, result.output
    data = report.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf")
    assert data[3:].decode("utf-8").splitlines()[0] == "student_number,email,action,detail,result"
    rows = {row["email"]: row for row in read_report(report)}
    assert set(rows) == {email(1001), email(1002), email(1003)}
    assert all(row["result"] == "applied" for row in rows.values())
    assert rows[email(1001)]["action"] == "create" and rows[email(1001)]["student_number"] == "1001"
    assert "Zoë O'Brien" in rows[email(1001)]["detail"]
    assert "rename" in rows[email(1002)]["action"] and "José D'Angelo" in rows[email(1002)]["detail"]
    assert "move" in rows[email(1003)]["action"]
    assert sync.server.user(email(1001))["name"]["givenName"] == "Zoë"


def test_dry_run_report_says_planned(sync, tmp_path):
    report = tmp_path / "report.csv"
    sync.student(1001)
    sync.student(1002, status=2)
    sync.account(1002)
    result = sync.run("--all", "--dry-run", "--report", str(report))
    assert result.code == 0, result.output
    rows = read_report(report)
    assert {(r["email"], r["action"], r["result"]) for r in rows} == {
        (email(1001), "create", "planned"), (email(1002), "suspend+move", "planned")}
    assert sync.writes() == []


def test_report_names_the_reason_of_a_failed_write(sync, tmp_path, no_backoff):
    report = tmp_path / "report.csv"
    sync.student(1001)
    sync.server.faults = FaultPlan(rate=1.0, statuses=(503,), only_writes=True, seed=1)
    result = sync.run("--all", "--report", str(report))
    assert result.code == 1, result.output
    rows = read_report(report)
    assert len(rows) == 1
    assert rows[0]["email"] == email(1001)
    assert rows[0]["result"].startswith("failed: ") and "503" in rows[0]["result"]


def test_report_has_an_error_row_for_bad_powerschool_data(sync, tmp_path):
    report = tmp_path / "report.csv"
    sync.student(1001)
    sync.account(1001)
    sync.student(1002, status=None)
    sync.student(1003, grade="ninth")
    result = sync.run("--all", "--report", str(report))
    assert result.code == 1, result.output
    rows = {row["student_number"]: row for row in read_report(report)}
    assert set(rows) == {"1002", "1003"}
    for row in rows.values():
        assert row["action"] == "error"
        assert row["result"].startswith("failed: ")
    assert "ENROLL_STATUS" in rows["1002"]["detail"]
    assert "GRADE_LEVEL" in rows["1003"]["detail"]


def test_unwritable_report_path_is_named_and_does_not_hide_the_runs_outcome(sync, tmp_path):
    report = tmp_path / "no such folder" / "report.csv"
    sync.student(1001)
    result = sync.run("--all", "--report", str(report))
    assert "unexpected error" not in result.output
    assert str(report) in result.output
    if sync.writes():                                     # applied: the outcome must still be told
        assert "summary (done): 1 creates" in result.output
    else:                                                 # or refused up front
        assert result.code == 2


# ---------------------------------------------------------------------------------------------
# 4. Progress
# ---------------------------------------------------------------------------------------------


def test_no_progress_lines_when_output_is_not_a_terminal(sync):
    for number in range(1001, 1011):
        sync.student(number)
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert len(sync.server.users()) == 10
    assert "\r" not in result.output


def test_progress_counts_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdout", FakeTty())
    stream = FakeTty()
    progress = student_sync.Progress("applying", 3, stream=stream)
    for _ in range(3):
        progress.step()
    progress.close()
    assert stream.text == "\rapplying: 1/3\rapplying: 2/3\rapplying: 3/3\n"


def test_progress_is_silent_when_stdout_is_redirected(monkeypatch):
    monkeypatch.setattr(sys, "stdout", FakeTty(tty=False))
    stream = FakeTty()
    progress = student_sync.Progress("applying", 3, stream=stream)
    progress.step()
    progress.close()
    assert stream.text == ""


# ---------------------------------------------------------------------------------------------
# 5. Summary email
# ---------------------------------------------------------------------------------------------


def test_when_always_a_successful_run_sends_the_summary_and_log_path(sync, smtp):
    sync.settings(email_settings(smtp.port, when="always"))
    sync.student(1001)
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert len(smtp.messages) == 1
    message = smtp.messages[0]
    assert message["To"] == "tech@d118.org" and message["From"] == "sync@d118.org"
    body = smtp.bodies()[0]
    assert "summary (done): 1 creates" in body
    [log_path] = log_files(sync)
    assert str(log_path) in body


def test_when_problems_a_clean_run_sends_nothing(sync, smtp):
    sync.settings(email_settings(smtp.port))
    sync.student(1001)
    sync.account(1001)
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert smtp.messages == []


def test_when_problems_a_failed_student_sends_one_message(sync, smtp):
    sync.settings(email_settings(smtp.port))
    sync.student(1001)
    sync.account(1001)
    sync.student(1002, status=None)
    result = sync.run("--all")
    assert result.code == 1, result.output
    assert len(smtp.messages) == 1
    assert "1002" in smtp.bodies()[0]


def test_when_problems_a_safety_stop_sends_one_message(sync, smtp):
    sync.settings({**email_settings(smtp.port), "safety": {"max_suspensions": 0}})
    sync.student(1001, status=2)
    sync.account(1001)
    result = sync.run("--all")
    assert result.code == 3, result.output
    assert len(smtp.messages) == 1
    assert "safety" in smtp.bodies()[0]
    assert sync.writes() == []


def test_when_problems_a_run_that_could_not_start_sends_one_naming_the_problem(sync, smtp):
    sync.settings({**email_settings(smtp.port), "powerschool": {"sqlite": "missing.sqlite3"}})
    result = sync.run("--all")
    assert result.code == 2, result.output
    assert len(smtp.messages) == 1
    body = smtp.bodies()[0]
    assert "PowerSchool" in body and "missing.sqlite3" in body


def test_smtp_server_down_leaves_the_exit_code_and_logs_it(sync):
    sync.settings(email_settings(free_port(), when="always"))   # nobody listens there
    sync.student(1001)
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert "could not email the summary" in result.output
    assert "could not email the summary" in newest_log(sync)


def test_smtp_login_password_never_appears_in_output_or_logs(sync, smtp, monkeypatch, tmp_path):
    monkeypatch.setenv("SMTP_USER", "sync-mailer")
    monkeypatch.setenv("SMTP_PASSWORD", SMTP_PASSWORD)
    sync.settings(email_settings(smtp.port, when="always", user_env="SMTP_USER", password_env="SMTP_PASSWORD"))
    sync.student(1001)
    report = tmp_path / "report.csv"
    result = sync.run("--all", "-v", "--report", str(report))
    assert result.code == 0, result.output
    assert smtp.logins == [("sync-mailer", SMTP_PASSWORD)]
    assert len(smtp.messages) == 1
    assert SMTP_PASSWORD not in result.output
    for path in (sync.folder / "logs").iterdir():
        assert SMTP_PASSWORD not in path.read_text(encoding="utf-8", errors="replace")
    assert SMTP_PASSWORD not in report.read_text(encoding="utf-8-sig")
    assert SMTP_PASSWORD not in smtp.messages[0].as_string()


def test_smtp_login_refused_leaves_the_exit_code(sync, smtp, monkeypatch):
    monkeypatch.setenv("SMTP_USER", "sync-mailer")
    monkeypatch.setenv("SMTP_PASSWORD", "wrong-" + SMTP_PASSWORD)
    sync.settings(email_settings(smtp.port, when="always", user_env="SMTP_USER", password_env="SMTP_PASSWORD"))
    sync.student(1001)
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert smtp.messages == []
    assert "could not email the summary" in result.output
    assert SMTP_PASSWORD not in result.output and SMTP_PASSWORD not in newest_log(sync)


# ---------------------------------------------------------------------------------------------
# 6. Accounts nobody owns
# ---------------------------------------------------------------------------------------------


def add_strays(sync: Sync) -> None:
    sync.student(1001)
    sync.account(1001)
    sync.account(5555)                                    # under the prefix, no such student
    sync.server.add_user("jdoe@d118.org", given="Jay", family="Doe", org_unit=WHS_9)
    sync.server.add_user("teacher@d118.org", given="Tess", family="Cher", org_unit="/Staff")
    sync.server.add_user("7777@d118.org", given="Old", family="Staff", org_unit="/Staff")


def test_all_run_lists_unowned_accounts_and_leaves_them_alone(sync, tmp_path):
    add_strays(sync)
    report = tmp_path / "report.csv"
    before = sync.server.users()
    result = sync.run("--all", "--report", str(report))
    assert result.code == 0, result.output
    listed = [line for line in result.output.splitlines() if "matches no PowerSchool student" in line]
    assert any(email(5555) in line for line in listed), result.output
    assert any("jdoe@d118.org" in line for line in listed), result.output
    assert len(listed) == 2, result.output
    assert "teacher@d118.org" not in result.output and "7777@d118.org" not in result.output
    assert sync.writes() == []
    assert sync.server.users() == before
    unowned = [row for row in read_report(report) if row["action"] == "unowned"]
    assert {row["email"] for row in unowned} == {email(5555), "jdoe@d118.org"}
    assert all(row["result"] == "report only" for row in unowned)


def test_building_run_lists_no_unowned_accounts(sync, tmp_path):
    add_strays(sync)
    report = tmp_path / "report.csv"
    result = sync.run("--building", "101", "--report", str(report))
    assert result.code == 0, result.output
    assert "matches no PowerSchool student" not in result.output
    assert email(5555) not in result.output and "jdoe@d118.org" not in result.output
    assert not [row for row in read_report(report) if row["action"] == "unowned"]


def test_leading_zero_address_is_nobodys_account(sync):
    sync.student(1002)
    sync.account(1002)
    sync.server.add_user("01002@d118.org", given="Ann", family="Lee", org_unit=WHS_9)
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert "01002@d118.org" in result.output
    assert sync.writes() == []


def test_quiet_dry_run_still_prints_the_plan_and_its_summary(sync):
    """-q quiets what a run says along the way, not the plan a dry run is asked to show."""
    sync.student(1001)                                    # would be created
    sync.student(1002, status=2)                          # would be suspended
    sync.account(1002)
    result = sync.run("--all", "--dry-run", "-q")
    assert result.code == 0, result.output
    assert re.search(r"would create: 1001@d118\.org", result.output), result.output
    assert re.search(r"would suspend\S*: 1002@d118\.org", result.output), result.output
    assert "summary (planned)" in result.output
    assert "PowerSchool:" not in result.output            # the lines along the way stay quiet
    assert not sync.writes()
