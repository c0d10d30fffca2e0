"""Safe to run unattended: safety limits, one run at a time, convergence under faults,
fatal errors that stop quickly and clearly, bad PowerSchool data, and secrets kept out of
every output.

Each test runs the command line in-process against the local Directory API server and a
SQLite PowerSchool (see conftest.py); the few that need more (an OAuth token endpoint, an
Oracle listener that never answers, a second process holding the run lock) get small
fixtures defined below.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import webbrowser
from pathlib import Path

import pytest

from conftest import LMS_7, ROOT, WHS_9, WHS_10, email, serve_token_endpoint, state, withdrawn
import student_sync
from testkit import district
from testkit.directory_server import FaultPlan

SUSPENDED_OU = district.SUSPENDED_OU
CATEGORY = district.CATEGORY

# Recognizable secrets: none of them may show up in any output, log or report.
DB_PASSWORD = "DBPASS-7f3a91"
NEW_PASSWORD = "NEWPASS-8c2e55"
ACCESS_TOKEN = "ya29.TOKEN-5d1b77"
REFRESH_TOKEN = "1//REFRESH-9a4c33"
CLIENT_SECRET = "GOCSPX-CLIENT-2b6e40"
SECRETS = (DB_PASSWORD, NEW_PASSWORD, ACCESS_TOKEN, REFRESH_TOKEN, CLIENT_SECRET)

REVOKED = {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
NO_DELEGATION = {"error": "unauthorized_client",
                 "error_description": "Client is unauthorized to retrieve access tokens using this "
                                      "method, or client not authorized for any of the scopes requested."}

FATAL_SECONDS = 15  # a fatal error must end the run well before this: no hang, no long retry loop


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_browser(monkeypatch):
    """A scheduled run never opens a browser: any attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("student_sync tried to open a browser")

    for name in ("open", "open_new", "open_new_tab"):
        monkeypatch.setattr(webbrowser, name, refuse)
    from google_auth_oauthlib.flow import InstalledAppFlow
    monkeypatch.setattr(InstalledAppFlow, "run_local_server", refuse)


@pytest.fixture
def token_endpoint(monkeypatch):
    """A loopback token endpoint (see conftest) that answers every refresh: token revoked."""
    yield from serve_token_endpoint(monkeypatch, 400, REVOKED)


@pytest.fixture
def silent_listener():
    """A TCP port that accepts connections and never says a word; yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    held, stop = [], threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(timeout=2)
    for connection in held:
        connection.close()
    listener.close()


def closed_port() -> int:
    """A loopback port nobody listens on (refuses connections)."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


@pytest.fixture
def oracle(sync, monkeypatch):
    """Read PowerSchool over Oracle (no SQLite copy); call the result with a DSN to use."""
    sync.settings({"powerschool": {"sqlite": None, "connect_timeout": 2}})
    monkeypatch.setenv("POWERSCHOOL_READ_USER", "psnavigator")
    monkeypatch.setenv("POWERSCHOOL_DB_PASSWORD", DB_PASSWORD)

    def use(dsn: str) -> None:
        monkeypatch.setenv("POWERSCHOOL_PROD_DB", dsn)

    return use


def write_token(path: Path, token_uri: str, expiry: str) -> None:
    """A token file in google-auth's authorized-user format."""
    path.write_text(json.dumps({
        "token": ACCESS_TOKEN, "refresh_token": REFRESH_TOKEN, "token_uri": token_uri,
        "client_id": "118-sync.apps.googleusercontent.com", "client_secret": CLIENT_SECRET,
        "scopes": list(student_sync.SCOPES), "expiry": expiry,
    }), encoding="utf-8")


def oauth_settings(sync, **google) -> None:
    sync.settings({"google": {"auth": "oauth", "token_file": "token.json",
                              "api_endpoint": sync.server.url, **google}})


def write_service_account_key(path: Path, token_uri: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "d118-sync", "private_key_id": "5a1f0c",
        "private_key": pem, "client_email": "student-sync@d118-sync.iam.gserviceaccount.com",
        "client_id": "118000000000000000001", "token_uri": token_uri,
    }), encoding="utf-8")


def timed(sync, *arguments):
    started = time.monotonic()
    result = sync.run(*arguments)
    return result, time.monotonic() - started


def lines_with(output: str, text: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


# ---------------------------------------------------------------------------------------------
# 1. Mass-change guard
# ---------------------------------------------------------------------------------------------


def test_more_suspensions_than_the_limit_change_nothing_and_exit_3(sync):
    sync.settings({"safety": {"max_suspensions": 2}})
    withdrawn(sync, [1101, 1102], [1103])
    sync.student(1104)                                   # a create waits too

    result = sync.run("--all")

    assert result.code == 3, result.output
    assert sync.writes() == []
    [message] = lines_with(result.output, "--allow-mass-changes")
    assert re.search(r"\b3\b", message)                  # how many
    assert "101" in message and "102" in message         # which schools
    assert state(sync.server, 1101)[2] is False
    assert sync.server.user(email(1104)) is None


def test_allow_mass_changes_lets_the_run_go_through(sync):
    sync.settings({"safety": {"max_suspensions": 2}})
    withdrawn(sync, [1201, 1202], [1203])

    result = sync.run("--all", "--allow-mass-changes")

    assert result.code == 0, result.output
    assert [state(sync.server, n)[2] for n in (1201, 1202, 1203)] == [True, True, True]


def test_exactly_the_limit_goes_through(sync):
    sync.settings({"safety": {"max_suspensions": 2}})
    withdrawn(sync, [1301], [1302])

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert state(sync.server, 1301) == ("Ann", "Lee", True, SUSPENDED_OU)
    assert state(sync.server, 1302) == ("Ann", "Lee", True, SUSPENDED_OU)


def test_already_suspended_accounts_that_only_move_do_not_count(sync):
    sync.settings({"safety": {"max_suspensions": 2}})
    for number in (1401, 1402, 1403, 1404):            # suspended already, in the wrong OU
        sync.student(number, status=2)
        sync.account(number, suspended=True)
    withdrawn(sync, [1405, 1406])                        # two real suspensions: at the limit

    result = sync.run("--all")

    assert result.code == 0, result.output
    for number in range(1401, 1407):
        assert state(sync.server, number) == ("Ann", "Lee", True, SUSPENDED_OU)


def test_a_building_with_no_students_stops_with_exit_3(sync):
    sync.student(1501)                                   # students at 101 only
    sync.account(1501)
    for number in (1502, 1503):                          # accounts at 102, no rows there
        sync.account(number, org_unit=LMS_7, school=102)

    result = sync.run("--building", "102")

    assert result.code == 3, result.output
    assert sync.writes() == []
    assert "no students" in result.output.lower()


def test_a_district_with_no_students_but_accounts_stops_with_exit_3(sync):
    for number in (1601, 1602, 1603):
        sync.account(number)

    result = sync.run("--all")

    assert result.code == 3, result.output
    assert sync.writes() == []
    assert all(state(sync.server, n)[2] is False for n in (1601, 1602, 1603))


# ---------------------------------------------------------------------------------------------
# 2. Single instance
# ---------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""\
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import student_sync
    lock = student_sync.RunLock(Path(sys.argv[2]))
    lock.acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def lock_path(sync) -> Path:
    settings = student_sync.load_settings(sync.settings_path)
    return sync.folder / "logs" / f"student_sync-{settings.instance}.lock"


@pytest.fixture
def lock_holder(sync):
    """Another process holding the run lock of `sync`'s logs folder."""
    path = lock_path(sync)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT), str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=10)
        holder.stdout.close()


def wait_until_free(path: Path, within: float = 10.0) -> None:
    """Wait on the lock itself: Windows frees a killed process's byte-range locks a moment
    after the process ends, not at once, so the test asks the lock rather than a clock."""
    deadline = time.monotonic() + within
    while True:
        probe = student_sync.RunLock(path)
        try:
            probe.acquire()
        except student_sync.StopRun:
            assert time.monotonic() < deadline, f"the lock {path} was never freed"
            time.sleep(0.02)
            continue
        probe.release()
        return


def test_second_run_stops_at_once_while_another_holds_the_lock(sync, lock_holder):
    sync.student(2001)

    result, seconds = timed(sync, "--all")

    assert result.code == 2, result.output
    assert seconds < 5
    assert re.search(r"another\b.*\brun", result.output, re.IGNORECASE)
    assert sync.server.requests == []

    lock_holder.kill()                                   # dies without releasing anything
    lock_holder.wait(timeout=10)
    assert lock_path(sync).exists()
    wait_until_free(lock_path(sync))                     # the system frees a dead holder's lock


    result = sync.run("--all")

    assert result.code == 0, result.output
    assert state(sync.server, 2001) == ("Ann", "Lee", False, WHS_9)


def test_dry_run_is_not_blocked_by_the_lock(sync, lock_holder):
    sync.student(2101)

    result = sync.run("--all", "--dry-run")

    assert result.code == 0, result.output
    assert email(2101) in result.output
    assert sync.writes() == []


# ---------------------------------------------------------------------------------------------
# 3. Convergence under faults
# ---------------------------------------------------------------------------------------------

ALL_STUDENTS, BAND = "all-students@d118.org", "band@d118.org"


def mixed_district(sync) -> tuple[dict, dict]:
    """60 students, each needing one kind of change (or none).

    Returns the expected end state {email: (given, family, suspended, OU, attributes)} and
    the expected groups {email: set of groups}.
    """
    expected, groups, members = {}, {}, {ALL_STUDENTS: [], BAND: []}

    def expect(number, given="Ann", family="Lee", suspended=False, ou=WHS_9, school=101,
               class_of=2030, in_groups=()):
        expected[email(number)] = (given, family, suspended, ou,
                                   district.attributes(school, class_of)[CATEGORY])
        groups[email(number)] = set(in_groups)

    for i in range(12):                                  # creates, in two buildings
        number, grade = 3000 + i, 9 + i % 4
        if i % 3 == 2:
            sync.student(number, "MIA", "O'BRIEN", class_of=2030, school=102, grade=7)
            expect(number, "Mia", "O'Brien", ou=LMS_7, school=102)
        else:
            sync.student(number, "Ava", f"Garcia{i}", class_of=2039 - grade, grade=grade)
            expect(number, "Ava", f"Garcia{i}", ou=district.building_ou("WHS") + district.GRADES[grade],
                   class_of=2039 - grade)
    for i in range(10):                                  # moves
        sync.student(3100 + i, grade=10)
        sync.account(3100 + i)
        expect(3100 + i, ou=WHS_10)
    for i in range(8):                                   # renames
        sync.student(3200 + i, "Anne", "Lee-Smith")
        sync.account(3200 + i, given="Ann", family="Lee")
        expect(3200 + i, "Anne", "Lee-Smith")
    for i in range(8):                                   # attribute updates
        sync.student(3300 + i)
        sync.account(3300 + i, school=102, class_of=None if i % 2 else 2029)
        expect(3300 + i)
    for i in range(8):                                   # returning students
        sync.student(3400 + i)
        sync.account(3400 + i, given="Ann" if i % 2 else "Old", org_unit=SUSPENDED_OU, suspended=True)
        expect(3400 + i)
    for i in range(10):                                  # withdrawn, in one or two groups
        sync.student(3500 + i, status=2)
        sync.account(3500 + i)
        members[ALL_STUDENTS].append(email(3500 + i))
        if i % 2 == 0:
            members[BAND].append(email(3500 + i))
        expect(3500 + i, suspended=True, ou=SUSPENDED_OU)
    for i in range(4):                                   # in step, and in a group: untouched
        sync.student(3600 + i)
        sync.account(3600 + i)
        members[ALL_STUDENTS].append(email(3600 + i))
        expect(3600 + i, in_groups=[ALL_STUDENTS])
    for group, addresses in members.items():
        sync.server.add_group(group, members=addresses)
    return expected, groups


@pytest.mark.parametrize("seed", [11, 22, 33])
def test_runs_under_faults_converge_to_the_exact_end_state(sync, no_backoff, seed):
    expected, groups = mixed_district(sync)
    assert len(expected) == 60
    sync.server.faults = FaultPlan(
        rate=0.2, statuses=(429, 503, "403-rateLimitExceeded", "403-userRateLimitExceeded"),
        applied_then_error_rate=0.2, only_writes=True, seed=seed)

    first = sync.run("--all")
    second = sync.run("--all")

    assert first.code in (0, 1), first.output
    assert second.code == 0, second.output
    assert sum(r.status >= 400 for r in sync.writes()) >= 10     # the faults really were there
    users = sync.server.users()
    assert set(users) == set(expected)                   # no duplicates, nothing missing
    for address, (given, family, suspended, ou, attributes) in expected.items():
        user = users[address]
        actual = (user["name"]["givenName"], user["name"]["familyName"], user["suspended"],
                  user["orgUnitPath"], user.get("customSchemas", {}).get(CATEGORY))
        assert actual == (given, family, suspended, ou, attributes), address
        assert sync.server.groups_of(address) == groups[address], address
    for number in range(3000, 3012):
        assert users[email(number)]["changePasswordAtNextLogin"] is True

    sync.server.faults = None
    sync.server.clear_requests()
    final = sync.run("--all")
    assert final.code == 0, final.output
    assert sync.writes() == []


def test_create_applied_but_answered_503_is_reconciled_not_failed(sync, no_backoff, tmp_path):
    sync.student(3701, grade=10)
    sync.server.faults = FaultPlan(applied_then_error_rate=1.0, only_writes=True, seed=1)
    report = tmp_path / "report.csv"

    result = sync.run("--all", "--report", str(report))

    assert result.code == 0, result.output
    assert [a for a in sync.server.users()] == [email(3701)]
    assert state(sync.server, 3701) == ("Ann", "Lee", False, WHS_10)
    statuses = [r.status for r in sync.writes() if r.method == "POST"]
    assert statuses[:2] == [503, 409]                    # applied, lost answer; the retry meets 409
    assert any(r.method == "GET" and r.path.endswith("/users/" + email(3701)) for r in sync.server.requests)
    [row] = [line for line in report.read_text(encoding="utf-8-sig").splitlines() if line.startswith("3701,")]
    assert row.endswith(",applied")
    assert "0 failed" in result.output


def test_group_removal_that_keeps_failing_leaves_the_account_active_for_the_next_run(sync, no_backoff):
    # The only writes this run makes are the group removals, so failing every write fails them.
    sync.student(3801, status=2)
    sync.account(3801)
    sync.server.add_group(ALL_STUDENTS, members=[email(3801)])
    sync.server.add_group(BAND, members=[email(3801)])
    sync.server.faults = FaultPlan(rate=1.0, statuses=(503,), only_writes=True, seed=1)

    result = sync.run("--all")

    assert result.code == 1, result.output
    assert "3801" in result.output
    assert {r.method for r in sync.writes()} == {"DELETE"}
    assert state(sync.server, 3801) == ("Ann", "Lee", False, WHS_9)
    assert sync.server.groups_of(email(3801)) == {ALL_STUDENTS, BAND}

    sync.server.faults = None
    result = sync.run("--all")

    assert result.code == 0, result.output
    assert state(sync.server, 3801) == ("Ann", "Lee", True, SUSPENDED_OU)
    assert sync.server.groups_of(email(3801)) == set()


# ---------------------------------------------------------------------------------------------
# 4. Fatal errors: exit 2, a clear message, quickly
# ---------------------------------------------------------------------------------------------


def test_revoked_google_token_is_exit_2_asking_for_authorize(sync, token_endpoint):
    oauth_settings(sync)
    write_token(sync.folder / "token.json", token_endpoint.url, expiry="2020-01-01T00:00:00Z")
    sync.student(4001)

    result, seconds = timed(sync, "--all")

    assert result.code == 2, result.output
    assert seconds < FATAL_SECONDS
    assert token_endpoint.posts >= 1
    assert "--authorize" in result.output
    assert sync.server.requests == []


def test_missing_token_file_is_exit_2_asking_for_authorize(sync):
    oauth_settings(sync)
    sync.student(4101)

    result, seconds = timed(sync, "--all")

    assert result.code == 2, result.output
    assert seconds < FATAL_SECONDS
    assert "--authorize" in result.output
    assert sync.server.requests == []


def test_missing_domain_wide_delegation_is_exit_2_naming_delegation(sync, token_endpoint):
    token_endpoint.status, token_endpoint.answer = 401, NO_DELEGATION
    write_service_account_key(sync.folder / "service-account.json", token_endpoint.url)
    sync.settings({"google": {"auth": "service_account", "service_account_file": "service-account.json",
                              "delegated_admin": "admin@d118.org"}})
    sync.student(4201)

    result, seconds = timed(sync, "--all")

    assert result.code == 2, result.output
    assert seconds < FATAL_SECONDS
    assert token_endpoint.posts >= 1
    assert "delegation" in result.output.lower()
    assert sync.server.requests == []


def test_refused_oracle_connection_is_exit_2(sync, oracle):
    port = closed_port()
    oracle(f"127.0.0.1:{port}/PSPRODDB")

    result, seconds = timed(sync, "--all")

    assert result.code == 2, result.output
    assert seconds < FATAL_SECONDS
    assert f"127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output
    assert sync.server.requests == []


def test_unknown_oracle_host_is_exit_2_naming_the_host_problem(sync, oracle):
    oracle("nonexistent-host.invalid:1521/PSPRODDB")

    result, seconds = timed(sync, "--all")

    assert result.code == 2, result.output
    assert seconds < FATAL_SECONDS
    assert "nonexistent-host.invalid" in result.output
    assert re.search(r"host", result.output.replace("nonexistent-host", ""), re.IGNORECASE)
    assert sync.server.requests == []


def test_silent_oracle_listener_is_exit_2_within_the_connect_timeout(sync, oracle, silent_listener):
    oracle(f"127.0.0.1:{silent_listener}/PSPRODDB")

    result, seconds = timed(sync, "--all")

    assert result.code == 2, result.output
    assert seconds < 8                                   # connect_timeout is 2 s
    assert re.search(r"\b2(\.0)? ?s\b|connect_timeout|timed out|timeout", result.output, re.IGNORECASE)
    assert sync.server.requests == []


@pytest.mark.parametrize("variable", ["POWERSCHOOL_READ_USER", "POWERSCHOOL_DB_PASSWORD", "POWERSCHOOL_PROD_DB"])
def test_missing_oracle_environment_variable_is_exit_2_naming_it(sync, oracle, monkeypatch, variable):
    oracle(f"127.0.0.1:{closed_port()}/PSPRODDB")
    monkeypatch.delenv(variable)

    result, seconds = timed(sync, "--all")

    assert result.code == 2, result.output
    assert seconds < FATAL_SECONDS
    assert variable in result.output
    assert sync.server.requests == []


def test_bad_oracle_credentials_are_described_without_the_driver_noise():
    class OracleErrorDetail:  # what oracledb puts in args[0]
        full_code = "ORA-01017"
        message = "ORA-01017: invalid credential or not authorized; logon denied"

    text = student_sync._describe_db_error(Exception(OracleErrorDetail()))

    assert "ORA-01017" in text
    assert re.search(r"user name or password|credential", text, re.IGNORECASE)


def test_html_502_from_google_while_reading_is_exit_2_without_a_traceback(sync, no_backoff):
    sync.student(4301)
    sync.server.faults = FaultPlan(rate=1.0, statuses=("502-html",), only_writes=False, seed=1)

    result, seconds = timed(sync, "--all")

    assert result.code == 2, result.output
    assert seconds < FATAL_SECONDS
    assert "502" in result.output
    assert "non-json" in result.output.lower()
    assert "Traceback" not in result.output
    assert sync.writes() == []


# ---------------------------------------------------------------------------------------------
# 5. Bad PowerSchool data, end to end
# ---------------------------------------------------------------------------------------------

LONG = "A" + "b" * 60                                    # 61 characters

# (case, rows as sync.student keyword arguments, who the output names, words of the problem)
BAD_DATA = [
    ("null student number", [dict(number=None, first="Zed", last="Quill")], "Zed Quill", ["STUDENT_NUMBER"]),
    ("non-numeric student number", [dict(number="12A45")], "12A45", ["STUDENT_NUMBER"]),
    ("null enroll status", [dict(number=5003, status=None)], "5003", ["ENROLL_STATUS"]),
    ("non-numeric enroll status", [dict(number=5004, status="A")], "5004", ["ENROLL_STATUS"]),
    ("fractional enroll status", [dict(number=5005, status=1.5)], "5005", ["ENROLL_STATUS"]),
    ("null schoolid beside a good row", [dict(number=5006), dict(number=5006, school=None)],
     "5006", ["SCHOOLID"]),
    ("non-numeric schoolid beside a good row", [dict(number=5007), dict(number=5007, school="WHS")],
     "5007", ["SCHOOLID"]),
    ("empty first name", [dict(number=5008, first="  ")], "5008", ["first name", "empty"]),
    ("null last name", [dict(number=5009, last=None)], "5009", ["last name", "empty"]),
    ("61-character first name", [dict(number=5010, first=LONG)], "5010", ["first name", "60"]),
    ("61-character last name", [dict(number=5011, last=LONG)], "5011", ["last name", "60"]),
    ("unmapped grade", [dict(number=5012, grade=14)], "5012", ["grade", "14"]),
    ("target OU missing in Google", [dict(number=5013, school=103, grade=3)], "5013",
     ["JES Students/3rd", "not exist"]),
]


@pytest.mark.parametrize("rows, who, problem", [case[1:] for case in BAD_DATA],
                         ids=[case[0] for case in BAD_DATA])
def test_bad_row_names_the_student_and_the_problem_and_the_run_goes_on(sync, rows, who, problem):
    sync.ps.school(103, "Jefferson Elementary", "JES", 0)    # no OUs for JES in Google
    for row in rows:
        row = dict(row)
        sync.student(row.pop("number"), **row)
    sync.student(5900, "Good", "Student", grade=10)

    result = sync.run("--all")

    assert result.code == 1, result.output
    named = lines_with(result.output, who)
    assert any(all(word.lower() in line.lower() for word in problem) for line in named), result.output
    assert set(sync.server.users()) == {email(5900)}
    assert state(sync.server, 5900) == ("Good", "Student", False, WHS_10)


# ---------------------------------------------------------------------------------------------
# 6. Secrets never printed, logged or reported
# ---------------------------------------------------------------------------------------------


def secrets_oauth_success(sync, endpoints):
    oauth_settings(sync)
    write_token(sync.folder / "token.json", endpoints.url, expiry="2099-01-01T00:00:00Z")
    sync.student(6001)
    sync.student(6002, status=2)
    sync.account(6002)
    return 0


def secrets_create_fails(sync, endpoints):
    oauth_settings(sync)
    write_token(sync.folder / "token.json", endpoints.url, expiry="2099-01-01T00:00:00Z")
    sync.student(6101)
    sync.server.faults = FaultPlan(rate=1.0, statuses=(503,), only_writes=True, seed=1)
    return 1


def secrets_oracle_refused(sync, endpoints):
    sync.settings({"powerschool": {"sqlite": None, "connect_timeout": 2}})
    sync.monkeypatch.setenv("POWERSCHOOL_READ_USER", "psnavigator")
    sync.monkeypatch.setenv("POWERSCHOOL_PROD_DB", f"127.0.0.1:{closed_port()}/PSPRODDB")
    return 2


def secrets_oracle_timeout(sync, endpoints):
    sync.settings({"powerschool": {"sqlite": None, "connect_timeout": 2}})
    sync.monkeypatch.setenv("POWERSCHOOL_READ_USER", "psnavigator")
    sync.monkeypatch.setenv("POWERSCHOOL_PROD_DB", f"127.0.0.1:{sync.silent_port}/PSPRODDB")
    return 2


def secrets_token_revoked(sync, endpoints):
    oauth_settings(sync)
    write_token(sync.folder / "token.json", endpoints.url, expiry="2020-01-01T00:00:00Z")
    sync.student(6201)
    return 2


@pytest.mark.parametrize("setup", [secrets_oauth_success, secrets_create_fails, secrets_oracle_refused,
                                   secrets_oracle_timeout, secrets_token_revoked],
                         ids=lambda f: f.__name__.removeprefix("secrets_"))
def test_secrets_never_reach_output_logs_or_report(sync, monkeypatch, no_backoff, token_endpoint,
                                                   silent_listener, tmp_path, setup):
    monkeypatch.setenv("POWERSCHOOL_DB_PASSWORD", DB_PASSWORD)
    monkeypatch.setenv("NEW_USER_PASSWORD", NEW_PASSWORD)
    sync.monkeypatch, sync.silent_port = monkeypatch, silent_listener
    expected_code = setup(sync, token_endpoint)
    report = tmp_path / "report.csv"

    result = sync.run("--all", "-v", "--report", str(report))

    assert result.code == expected_code, result.output
    if setup is secrets_oauth_success:
        assert state(sync.server, 6001) is not None      # the bearer token really was used
    texts = {"console": result.output}
    for path in sorted((tmp_path / "logs").rglob("*")) + [report]:
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    assert any(name.endswith(".log") for name in texts)  # there was a log to leak into
    for name, text in texts.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret} appears in {name}"
