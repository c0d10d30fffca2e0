"""Bad input, as a new district (or a hostile export) gives it: each gets a message that names
what is wrong and what to do, and exit 2 before any change, or a warning where the run can safely
go on; never a traceback, never a change to an account that is not the student's (issues 10, 12).

Each test runs the command line against the local Directory API server and a SQLite
PowerSchool (see conftest.py); a few start student_sync.py as a child process, as Task
Scheduler would.
"""

from __future__ import annotations

import ast
import csv
import datetime as dt
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import LMS_7, PASSWORD, ROOT, WHS_9, Sync, email
import student_sync
from testkit import district

DB_PASSWORD = "Tiger-Secret-9"
CLIENT_SECRET = "GOCSPX-client-secret-77"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_report(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as stream:
        return list(csv.reader(stream))


def log_text(sync: Sync) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in (sync.folder / "logs").glob("*.log"))


def name_of(sync: Sync, number: int) -> tuple[str, str]:
    user = sync.server.user(email(number))
    return user["name"]["givenName"], user["name"]["familyName"]


def no_traceback(output: str) -> None:
    assert "Traceback" not in output and "unexpected error" not in output, output


def edit_settings(sync: Sync, old: str, new: str) -> None:
    """Change the settings file's text as an administrator would in Notepad."""
    text = sync.settings_path.read_text(encoding="utf-8")
    assert old in text
    sync.settings_path.write_text(text.replace(old, new), encoding="utf-8")


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(student_sync.RetryPolicy, "delay", lambda self, retry: 0.0)


class _HtmlHandler(http.server.BaseHTTPRequestHandler):
    """A proxy or captive portal: every request gets 200 and a sign-in page."""

    def _page(self) -> None:
        body = (b"<!DOCTYPE html><html><head><title>Web filter: sign in</title></head>"
                b"<body><form>Sign in to continue</form></body></html>")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = _page

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def html_endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------
# Issue 10.3: email suffix and domain disagree
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [(), ("--check",)], ids=["run", "check"])
def test_a_domain_that_is_not_the_suffixs_is_refused_naming_both_keys(sync, mode):
    sync.student(1001)
    sync.account(1001)
    sync.settings({"google": {"email_suffix": "@students.d118.org", "domain": "d118.org"}})

    result = sync.run(*(mode or ("--all",)))

    assert result.code == 2, result.output
    assert "[google] domain" in result.output and "[google] email_suffix" in result.output
    assert "students.d118.org" in result.output
    assert sync.server.requests == []
    no_traceback(result.output)


def test_the_domain_defaults_to_the_suffixs_even_for_a_subdomain():
    raw = dict(district.BASE_SETTINGS, google={**district.BASE_SETTINGS["google"],
                                               "email_suffix": "@Students.D118.org"})
    raw["google"].pop("domain")
    settings = student_sync.settings_from_dict(raw, ROOT / "student_sync.toml")
    assert settings.google.domain == "students.d118.org"


def test_a_domain_with_a_trailing_space_and_capitals_is_trimmed_and_lower_cased(sync):
    sync.student(1001)
    sync.account(1001)
    sync.settings({"google": {"domain": " D118.org "}})

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert sync.writes() == []
    listings = [r for r in sync.server.requests if r.method == "GET" and r.path.endswith("/users")]
    assert listings and all(r.query.get("domain") == "d118.org" for r in listings), listings


# ---------------------------------------------------------------------------------------------
# Issue 10.7: odd source values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("number, account", [("5e5", 500000), ("+500008", 500008), (" 500007 ", 500007),
                                             ("500009.5", 500009), ("1_000", 1000)])
def test_a_student_number_that_is_not_only_digits_is_bad_data_for_that_row(sync, tmp_path, number, account):
    sync.student(number, first="Zed", last="Zulu")
    sync.account(account, given="Old", family="Owner")
    sync.student(1001)                                    # a good row: still created

    result = sync.run("--all", "--report", str(tmp_path / "r.csv"))

    assert result.code == 1, result.output
    assert name_of(sync, account) == ("Old", "Owner")
    assert [w.path for w in sync.writes() if str(account) in w.path] == []
    assert sync.server.user(email(1001)) is not None
    assert "STUDENT_NUMBER" in result.output and number.strip() in result.output
    no_traceback(result.output)


HUGE = "9" * 5000   # more digits than Python turns text into a number at once (4300)


@pytest.mark.parametrize("column, value, code, created", [
    ("number", HUGE, 1, False),        # no student number: that row fails
    ("grade", HUGE, 1, False),         # no grade of the grades table: that student fails
    ("class_of", HUGE, 0, True),       # not a year: created without one, with a warning
    ("class_of", "1e5000", 0, True),
    ("school", HUGE, 0, False),        # no school of the district: no row of the scope
    ("status", HUGE, 1, False),        # no enrollment status: that student fails
], ids=["number", "grade", "class_of", "class_of-1e5000", "school", "status"])
def test_a_number_column_of_thousands_of_digits_is_bad_data_for_that_row(sync, column, value, code, created):
    """A corrupt export's endless digits are bad data for one row (as any other non-number),
    never a run that ends 'unexpected error' for every student."""
    row = {"number": 1002, "first": "Zed", "last": "Zulu", column: value}
    sync.student(**row)
    sync.student(1001)                                    # a good row: still created

    result = sync.run("--all")

    assert result.code == code, result.output
    assert sync.server.user(email(1001)) is not None
    assert (sync.server.user(email(1002)) is not None) == created
    no_traceback(result.output)


def test_integral_numbers_and_digit_text_are_student_numbers(sync):
    sync.student(500001)                                  # Oracle NUMBER
    sync.student(500002.0)                                # a NUMBER read as a float
    sync.student("500003")                                # the REST API's text

    result = sync.run("--all")

    assert result.code == 0, result.output
    for number in (500001, 500002, 500003):
        assert name_of(sync, number) == ("Ann", "Lee")


def test_decimal_and_float_student_numbers_are_read_as_oracle_gives_them():
    import decimal

    rows = [student_sync.StudentRow(value, "Ann", "Lee", 2030, 0, 101, 9, student_sync.School(101, "W", "WHS", False))
            for value in (decimal.Decimal("500010"), 500011.0, decimal.Decimal("500012.5"), "5e5", True)]
    settings = student_sync.settings_from_dict(district.BASE_SETTINGS, ROOT / "student_sync.toml")
    scope = student_sync.Scope("all", frozenset({101}))
    decided = student_sync.decide_all(rows, settings, dt.date(2026, 10, 1), scope)
    assert sorted(decided.by_email) == [f"500010{district.SUFFIX}", f"500011{district.SUFFIX}"]


def test_names_lose_control_and_format_characters_before_they_are_compared_or_sent(sync):
    sync.student(1001, first="A\u200bnn", last="Lee\x07")           # in step once cleaned
    sync.account(1001)
    sync.student(1002, first="Zo\u200be\u2060", last="Smi\x00th\ufeff")   # created clean
    sync.student(1003, first="Te\u200bst", last="Student")           # a test name, once cleaned
    sync.student(1004, first="Mary\tJane", last="O\u00adNeil")       # a tab is a space

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert [w.path for w in sync.writes() if "1001" in w.path] == []
    assert name_of(sync, 1002) == ("Zoe", "Smith")
    assert sync.server.user(email(1003)) is None
    assert name_of(sync, 1004) == ("Mary Jane", "ONeil")


@pytest.mark.parametrize("number", ["=1+2", "+5000", "-5000", "@SUM(A1)", "\t=1"])
def test_no_report_cell_becomes_a_spreadsheet_formula(sync, tmp_path, number):
    sync.student(number, first="=HYPERLINK(\"http://x\")", last="Lee")
    sync.student(1001, first="@Ann", last="-Lee")
    report = tmp_path / "r.csv"

    result = sync.run("--all", "--report", str(report))

    assert result.code == 1, result.output
    rows = read_report(report)
    cells = [cell for row in rows for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], rows
    assert any(c == "'" + number.strip() or c == "'" + number for c in cells), rows


def test_ordinary_report_cells_are_left_as_they_are(sync, tmp_path):
    sync.student(1001)
    report = tmp_path / "r.csv"
    result = sync.run("--all", "--report", str(report))
    assert result.code == 0, result.output
    header, row = read_report(report)
    assert header == ["student_number", "email", "action", "detail", "result"]
    assert row[:3] == ["1001", email(1001), "create"]


# ---------------------------------------------------------------------------------------------
# Issue 10.8: credentials in a DSN are masked wherever it is shown
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [("--all",), ("--check",)], ids=["run", "check"])
def test_a_password_in_the_dsn_is_masked(sync, monkeypatch, mode):
    port = free_port()                                    # nobody listens: refused at once
    monkeypatch.setenv("POWERSCHOOL_READ_USER", "scott")
    monkeypatch.setenv("POWERSCHOOL_DB_PASSWORD", DB_PASSWORD)
    monkeypatch.setenv("POWERSCHOOL_PROD_DB", f"scott/{DB_PASSWORD}@127.0.0.1:{port}/PSPRODDB")
    sync.settings({"powerschool": {"sqlite": None, "connect_timeout": 10}})

    result = sync.run(*mode)

    assert result.code == 2, result.output
    assert DB_PASSWORD not in result.output
    assert DB_PASSWORD not in log_text(sync)
    assert f"127.0.0.1:{port}/PSPRODDB" in result.output
    assert "refused" in result.output.lower()
    no_traceback(result.output)


@pytest.mark.parametrize("dsn, shown", [
    ("scott/tiger@db:1521/PS", "scott/***@db:1521/PS"),
    ("scott/ti/g@r@db:1521/PS", "scott/***@db:1521/PS"),
    ('scott/"p@ss"@db/PS', "scott/***@db/PS"),
    ("db.d118.org:1521/PSPRODDB", "db.d118.org:1521/PSPRODDB"),
    ("scott@db:1521/PS", "scott@db:1521/PS"),
    ("oracle://scott:tiger@db:1521/PS", "oracle://scott:***@db:1521/PS"),
])
def test_mask_dsn_hides_only_the_password(dsn, shown):
    assert student_sync.mask_dsn(dsn) == shown


# ---------------------------------------------------------------------------------------------
# Issue 12: the settings file
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16", "utf-16-be"])
def test_a_settings_file_not_in_utf8_says_it_must_be_utf8(sync, encoding):
    text = sync.settings_path.read_text(encoding="utf-8").replace(
        'graduated_school_name = "Graduated Students"', 'graduated_school_name = "Élèves diplômés"')
    sync.settings_path.write_bytes(text.encode(encoding))

    result = sync.run("--check")

    assert result.code == 2, result.output
    assert "UTF-8" in result.output and str(sync.settings_path) in result.output
    assert sync.server.requests == []
    no_traceback(result.output)


def test_a_utf8_settings_file_with_bom_and_crlf_still_loads(sync):
    sync.student(1001)
    text = sync.settings_path.read_text(encoding="utf-8").replace("\n", "\r\n")
    sync.settings_path.write_bytes(text.encode("utf-8-sig"))
    result = sync.run("--all")
    assert result.code == 0, result.output


@pytest.mark.parametrize("extra", ["09", " 9", "9 ", "+9"])
def test_two_grades_keys_for_one_grade_are_a_settings_error(sync, extra):
    grades = {str(k): v for k, v in district.GRADES.items()}
    grades[extra] = "/Ninth"
    sync.settings({"ous": {"grades": grades}})
    sync.student(1001)

    result = sync.run("--all")

    assert result.code == 2, result.output
    assert "[ous] grades" in result.output
    assert f'"{extra}"' in result.output and '"9"' in result.output
    assert sync.server.requests == []


def test_an_empty_grades_table_is_a_settings_error(sync):
    sync.settings({"ous": {"grades": {}}})
    sync.student(1001)

    result = sync.run("--all")

    assert result.code == 2, result.output
    assert "[ous] grades" in result.output and "empty" in result.output
    assert sync.server.requests == []


def test_a_backslash_escape_in_a_path_setting_warns_and_says_how_to_write_windows_paths(sync):
    # `"D:\new\tables"` in TOML is D:, a newline, "ew", a tab, "ables".
    edit_settings(sync, 'sqlite = "powerschool.sqlite3"', 'sqlite = "D:\\new\\tables.sqlite3"')

    result = sync.run("--check")

    assert result.code == 2, result.output                # the database is not there either
    warning = [line for line in result.output.splitlines() if "[powerschool] sqlite" in line and
               "control character" in line]
    assert warning, result.output
    assert "forward slashes" in warning[0] and "single quotes" in warning[0]


def test_a_windows_path_that_breaks_the_toml_says_how_to_write_it(sync):
    edit_settings(sync, 'sqlite = "powerschool.sqlite3"', 'sqlite = "C:\\Users\\admin\\ps.sqlite3"')

    result = sync.run("--check")

    assert result.code == 2, result.output
    assert "not valid TOML" in result.output
    assert "forward slashes" in result.output and "single quotes" in result.output
    no_traceback(result.output)


def test_a_windows_path_in_single_quotes_loads_unchanged(sync):
    edit_settings(sync, 'sqlite = "powerschool.sqlite3"', "sqlite = 'D:\\new\\tables.sqlite3'")
    settings = student_sync.load_settings(sync.settings_path)
    assert str(settings.powerschool.sqlite).endswith("D:\\new\\tables.sqlite3")


# ---------------------------------------------------------------------------------------------
# Issue 12: --authorize with a malformed OAuth client file
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [
    '{"web": {}}',
    "not JSON at all",
    '{"web": {"client_id": "1.apps.googleusercontent.com", "client_secret": "' + CLIENT_SECRET + '", '
    '"auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": "https://oauth2.googleapis.com/token"}}',
    '{"installed": {"client_id": "1.apps.googleusercontent.com"}}',
    '[]',
], ids=["web-empty", "not-json", "web-client", "installed-no-secret", "list"])
def test_authorize_with_a_malformed_client_file_says_what_file_is_needed(sync, monkeypatch, content):
    from google_auth_oauthlib.flow import InstalledAppFlow

    def no_browser(*args, **kwargs):
        raise AssertionError("a browser sign-in was started with a bad client file")

    monkeypatch.setattr(InstalledAppFlow, "run_local_server", no_browser)
    client_file = sync.folder / "credentials.json"
    client_file.write_text(content, encoding="utf-8")
    sync.settings({"google": {"auth": "oauth"}})

    result = sync.run("--authorize")

    assert result.code == 2, result.output
    assert str(client_file) in result.output and "Desktop app" in result.output
    assert CLIENT_SECRET not in result.output
    no_traceback(result.output)


# ---------------------------------------------------------------------------------------------
# Issue 12: a Directory endpoint that answers with a web page
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [("--all",), ("--check",)], ids=["run", "check"])
def test_a_directory_endpoint_answering_with_an_html_page_says_so(sync, html_endpoint, mode, no_backoff):
    sync.student(1001)
    sync.settings({"google": {"api_endpoint": html_endpoint}})

    result = sync.run(*mode)

    assert result.code == 2, result.output
    assert "non-JSON page" in result.output, result.output
    no_traceback(result.output)


# ---------------------------------------------------------------------------------------------
# Issue 12: output piped into a program that stops reading
# ---------------------------------------------------------------------------------------------


def test_output_into_a_pipe_that_closes_early_ends_quietly(sync):
    for number in range(10001, 12001):                    # 2,000 "would create" lines: more than a pipe holds
        sync.student(number)
    sync.ps.connection.commit()
    environment = dict(os.environ, NEW_USER_PASSWORD=PASSWORD, PYTHONIOENCODING="utf-8")
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "student_sync.py"), "--config", str(sync.settings_path), "--all", "--dry-run"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment, cwd=sync.folder)
    first = child.stdout.readline()                       # like `| head -1`
    child.stdout.close()
    errors = child.stderr.read().decode("utf-8", "replace")
    code = child.wait(timeout=120)

    assert first
    assert "BrokenPipe" not in errors and "Logging error" not in errors and "Traceback" not in errors, errors
    assert code == 0, errors
    assert "summary (planned): 2000 creates" in log_text(sync)   # the run itself went on to its end


# ---------------------------------------------------------------------------------------------
# Issue 12: an output path that is one of the tool's inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--report", "--plan-out"])
@pytest.mark.parametrize("which", ["settings", "sqlite", "credentials", "token", "service_account"])
def test_an_output_path_that_is_an_input_of_the_tool_is_refused(sync, option, which):
    sync.student(1001)
    sync.settings({"google": {"service_account_file": "key.json"}})
    inputs = {"settings": sync.settings_path, "sqlite": sync.ps.path,
              "credentials": sync.folder / "credentials.json", "token": sync.folder / "token.json",
              "service_account": sync.folder / "key.json"}
    for path in inputs.values():
        if not path.exists():
            path.write_text("{}", encoding="utf-8")
    target = inputs[which]
    sync.ps.connection.commit()
    before = target.read_bytes()
    # Spelled another way than the settings spell it, as a person would type it: relative,
    # which is relative to the settings file's folder (issue 13: tasks start in System32).
    spelled = Path(os.path.relpath(target, sync.settings_path.parent))

    result = sync.run("--all", "--dry-run", option, str(spelled))

    assert result.code == 2, result.output
    assert option in result.output and "input" in result.output
    assert target.read_bytes() == before
    assert sync.server.requests == []


# ---------------------------------------------------------------------------------------------
# Issue 12: --building given more than once; a building with no students yet
# ---------------------------------------------------------------------------------------------


def test_building_given_twice_syncs_both_buildings(sync):
    sync.student(1001)                                    # 101
    sync.student(1002, school=102, grade=7)               # 102

    result = sync.run("--building", "101", "--building", "102")

    assert result.code == 0, result.output
    assert sync.server.user(email(1001)) is not None
    assert sync.server.user(email(1002))["orgUnitPath"] == LMS_7


def test_a_new_building_with_no_students_yet_is_not_a_safety_stop(sync):
    sync.ps.school(103, "Jefferson Elementary", "JES", 0)
    sync.student(1001)
    sync.account(1001)
    assert sync.run("--all").code == 0                     # the counts now know 103 had nobody

    result = sync.run("--building", "103")

    assert result.code == 0, result.output
    assert sync.writes() == []


def test_a_building_never_counted_with_no_students_and_no_accounts_is_not_a_safety_stop(sync):
    sync.ps.school(103, "Jefferson Elementary", "JES", 0)
    sync.student(1001)

    result = sync.run("--building", "103")

    assert result.code == 0, result.output
    assert sync.writes() == []


def test_a_building_that_had_students_at_the_last_run_and_now_has_none_still_stops(sync):
    sync.ps.school(103, "Jefferson Elementary", "JES", 0)
    sync.server.add_orgunit(district.building_ou("JES") + "/3rd")
    sync.student(1001, school=103, grade=3)
    assert sync.run("--all").code == 0
    sync.ps.connection.execute("DELETE FROM STUDENTS WHERE SCHOOLID = 103")

    result = sync.run("--building", "103")

    assert result.code == 3, result.output
    assert "no students" in result.output.lower()


# ---------------------------------------------------------------------------------------------
# Issue 12: Google unreachable while refreshing a token
# ---------------------------------------------------------------------------------------------


def expired_token(sync: Sync, token_uri: str, monkeypatch) -> Path:
    # google-auth sends every user token to Google's token endpoint whatever the file says:
    # point that address elsewhere, as a broken network would.
    import google.oauth2.credentials

    monkeypatch.setattr(google.oauth2.credentials, "_GOOGLE_OAUTH2_TOKEN_ENDPOINT", token_uri)
    token = sync.folder / "token.json"
    token.write_text(json.dumps({
        "token": "ya29.old", "refresh_token": "1//refresh-secret", "client_id": "1.apps.googleusercontent.com",
        "client_secret": CLIENT_SECRET, "token_uri": token_uri, "scopes": list(student_sync.SCOPES),
        "expiry": "2001-01-01T00:00:00Z"}), encoding="utf-8")
    sync.settings({"google": {"auth": "oauth", "token_file": str(token)}})
    return token


def self_signed_tls_server(folder: Path) -> tuple[http.server.HTTPServer, str]:
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = http.server.HTTPServer(("127.0.0.1", 0), _HtmlHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"https://127.0.0.1:{server.server_address[1]}/token"


@pytest.mark.parametrize("cause", ["refused", "name", "proxy", "certificate"])
def test_google_unreachable_while_refreshing_the_token_names_the_cause(sync, monkeypatch, cause):
    for variable in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                     "ALL_PROXY", "all_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(variable, raising=False)
    server = None
    if cause == "refused":
        uri, words = f"http://127.0.0.1:{free_port()}/token", ["refused"]
    elif cause == "name":
        uri, words = "https://oauth2.no-such-host.invalid/token", ["oauth2.no-such-host.invalid", "name"]
    elif cause == "proxy":
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
        uri, words = "https://oauth2.googleapis.com/token", ["proxy", "HTTPS_PROXY"]
    else:
        if shutil.which("openssl") is None:
            pytest.skip("openssl is needed to make a certificate")
        server, uri = self_signed_tls_server(sync.folder)
        words = ["certificate"]
    expired_token(sync, uri, monkeypatch)
    sync.student(1001)
    try:
        result = sync.run("--all")
    finally:
        if server is not None:
            server.shutdown()

    assert result.code == 2, result.output
    assert "refresh the token" in result.output
    for word in words:
        assert word.lower() in result.output.lower(), result.output
    assert CLIENT_SECRET not in result.output and "refresh-secret" not in result.output
    no_traceback(result.output)


@pytest.mark.parametrize("mode", [("--all",), ("--check",)], ids=["run", "check"])
def test_a_directory_endpoint_that_refuses_says_so(sync, no_backoff, mode):
    port = free_port()
    sync.settings({"google": {"api_endpoint": f"http://127.0.0.1:{port}/"}})
    sync.student(1001)

    result = sync.run(*mode)

    assert result.code == 2, result.output
    assert f"127.0.0.1:{port} refused the connection" in result.output, result.output
    no_traceback(result.output)


def test_a_token_endpoint_answering_with_an_html_page_says_so(sync, monkeypatch, html_endpoint):
    expired_token(sync, html_endpoint + "token", monkeypatch)
    sync.student(1001)

    result = sync.run("--all")

    assert result.code == 2, result.output
    assert "refresh the token" in result.output and "non-JSON page" in result.output
    assert CLIENT_SECRET not in result.output
    no_traceback(result.output)


def test_imported_on_an_older_python_the_importer_hears_why():
    script = ("import sys\n"
              "sys.version_info = (3, 10, 12, 'final', 0)\n"
              "sys.modules['tomllib'] = None\n"
              f"sys.path.insert(0, {str(ROOT)!r})\n"
              "try:\n"
              "    import student_sync\n"
              "except ImportError as exc:\n"
              "    print('ImportError:', exc)\n")
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "ImportError: Python 3.11 or newer is needed" in child.stdout, child.stdout + child.stderr


# ---------------------------------------------------------------------------------------------
# Issue 12: Python older than 3.11; the README
# ---------------------------------------------------------------------------------------------

OLD_PYTHON = (
    "import runpy, sys\n"
    "sys.version_info = (3, 10, 12, 'final', 0)\n"
    "sys.modules['tomllib'] = None\n"            # 3.10 has no tomllib
    "sys.argv = [sys.argv[1], '--help']\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@pytest.mark.parametrize("script", ["student_sync.py", "demo.py", "sync_all.py", "sync_building.py",
                                    "sync_state_reporting.py"])
def test_an_older_python_is_told_that_311_is_needed(script):
    child = subprocess.run([sys.executable, "-c", OLD_PYTHON, str(ROOT / script)], capture_output=True,
                           text=True, cwd=ROOT, timeout=60)
    output = child.stdout + child.stderr
    assert child.returncode != 0, output
    assert "Python 3.11 or newer is needed" in output and "3.10" in output, output
    assert "Traceback" not in output, output


@pytest.mark.parametrize("script", ["student_sync.py", "demo.py"])
def test_the_scripts_parse_as_python_310_so_the_version_message_is_reached(script):
    ast.parse((ROOT / script).read_text(encoding="utf-8"), feature_version=(3, 10))


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_try_it_creates_a_virtual_environment_first():
    section = readme_section("Try it")
    assert "python -m venv" in section or "python3 -m venv" in section
    assert section.index("-m venv") < section.index("pip install -r requirements.txt")
    assert "Activate.ps1" in section or "Scripts\\activate" in section


def test_readme_and_example_tell_how_to_write_windows_paths():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = (ROOT / "student_sync.example.toml").read_text(encoding="utf-8")
    for text in (readme, example):
        assert "forward slashes" in text and "single quotes" in text


def test_readme_moving_section_says_casing_alone_is_not_a_rename():
    section = readme_section("Moving from the old script")
    assert "casing show up as" not in section.replace("\n", " ")
    assert "ignoring case" in section.replace("\n", " ")
