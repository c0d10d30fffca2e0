"""PowerSchool through its plugin REST API (SPEC section 9), end to end.

student_sync's command line reads the district from the local PowerSchool API server
(testkit/powerschool_api.py, over the same SQLite copy) and the Google directory from the local
Directory API server; the tests assert exit codes, output lines, the requests PowerSchool saw and
the accounts' end state.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import WHS_9, email, logs
import student_sync
from testkit import district
from testkit.directory_server import DirectoryServer
from testkit.powerschool_api import PowerSchoolApiServer, _Tables

CLIENT_ID, CLIENT_SECRET = "d2b7c0de-0000-4c1e-9e55-client", "S3cr3t-never-shown-8f1a"
COLUMNS = {"student_number", "first_name", "last_name", "classof", "enroll_status", "schoolid", "grade_level"}


def api_settings(server: PowerSchoolApiServer, **extra: Any) -> dict:
    return {"powerschool": {"source": "api", "url": server.url, "sqlite": None,
                            "max_requests_per_second": 500, **extra}}


def start_api(sync, **options: Any) -> PowerSchoolApiServer:
    options.setdefault("max_page_size", 5)
    return PowerSchoolApiServer(sync.folder / "powerschool.sqlite3", client_id=CLIENT_ID,
                                client_secret=CLIENT_SECRET, **options).start()


@contextlib.contextmanager
def serving(sync, monkeypatch, settings: dict | None = None, **options: Any) -> Iterator[PowerSchoolApiServer]:
    """The local PowerSchool API with these options, the plugin's client ID and secret in the
    environment, and settings that read it (with `settings` among [powerschool]'s keys)."""
    monkeypatch.setenv("POWERSCHOOL_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("POWERSCHOOL_CLIENT_SECRET", CLIENT_SECRET)
    with start_api(sync, **options) as server:
        sync.settings(api_settings(server, **(settings or {})))
        yield server


@pytest.fixture
def api(sync, monkeypatch):
    with serving(sync, monkeypatch) as server:
        yield server


def students(sync, count: int = 12, school: int = 101) -> list[int]:
    numbers = [40000 + n for n in range(count)]
    for number in numbers:
        sync.student(number, school=school)
    return numbers


def student_pages(server: PowerSchoolApiServer) -> list:
    return [r for r in server.requests if r.path == "/ws/schema/table/students"]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def test_an_api_run_creates_the_accounts_of_the_students_it_reads(sync, api):
    numbers = students(sync, 12)
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)
    assert sync.server.user(email(numbers[0]))["orgUnitPath"] == WHS_9


def test_a_token_endpoint_served_only_with_its_final_slash_is_found(sync, monkeypatch):
    """PowerSchool's pages write the token endpoint both as /oauth/access_token and as
    /oauth/access_token/: a server routing only the second is met after one 404."""
    numbers = students(sync, 6)
    with serving(sync, monkeypatch, settings=dict(max_requests_per_second=8),
                 token_path="/oauth/access_token/", token_lifetime=1) as server:
        result = sync.run("--all")
        tokens = [(r.path, r.status) for r in server.requests if r.path.startswith("/oauth/")]
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)
    assert tokens[0] == ("/oauth/access_token", 404)
    assert tokens[1:] and all(t == ("/oauth/access_token/", 200) for t in tokens[1:])   # renewals too


def test_the_read_is_token_metadata_count_then_pages_with_projection_and_sort(sync, api):
    students(sync, 12)
    assert sync.run("--all", "--dry-run").code == 0
    records = api.requests
    assert (records[0].method, records[0].path, records[0].auth) == ("POST", "/oauth/access_token", "Basic")
    assert all(r.auth == "Bearer" for r in records[1:])
    paths = [r.path for r in records]
    assert paths.index("/ws/v1/metadata") < paths.index("/ws/schema/table/students/count") \
        < paths.index("/ws/schema/table/students")
    pages = student_pages(api)
    assert sorted(int(r.query["page"]) for r in pages) == [1, 2, 3]     # 12 rows, 5 a page
    for page in pages:
        assert set(page.query["projection"].lower().split(",")) == COLUMNS
        assert int(page.query["pagesize"]) == 5                        # the metadata's maximum
        assert page.query["sort"].lower() in ("dcid", "id")
    assert all(r.status == 200 for r in records)


def test_every_other_row_of_a_scoped_student_is_weighed(sync, api):
    """A run for building 102 must not suspend a student active at 101 (SPEC section 3)."""
    sync.student(41000, status=2, school=102, grade=8)
    sync.student(41000, status=0, school=101, grade=9)
    sync.account(41000, org_unit=WHS_9)
    result = sync.run("--building", "102")
    assert result.code == 0, result.output
    assert sync.server.user(email(41000))["suspended"] is False


def test_an_unknown_building_is_exit_2_naming_it(sync, api):
    students(sync, 2)
    result = sync.run("--building", "555")
    assert result.code == 2 and "555" in result.output


# --------------------------------------------------------------------------------------------
# The same district gives the same plan from every source
# --------------------------------------------------------------------------------------------


class OracleShapedConnection:
    """A DB-API connection over the SQLite copy that answers the way python-oracledb does
    for PowerSchool's NUMBER columns: numbers come back as floats (REFERENCE.md)."""

    version = "19.0.0.0.0 (Oracle-shaped SQLite)"

    def __init__(self, path: Path):
        import sqlite3
        self._connection = sqlite3.connect(path)

    def cursor(self):
        return _OracleShapedCursor(self._connection.cursor())

    def close(self):
        self._connection.close()


class _OracleShapedCursor:
    arraysize = 100

    def __init__(self, cursor):
        self._cursor = cursor

    @staticmethod
    def _row(row):
        return tuple(float(v) if isinstance(v, int) else v for v in row)

    def execute(self, sql, binds=None):
        assert "NVL" not in sql and "SYSDATE" not in sql
        self._cursor.execute(sql, binds or {})

    def fetchall(self):
        return [self._row(r) for r in self._cursor.fetchall()]

    def fetchmany(self, size=None):
        return [self._row(r) for r in self._cursor.fetchmany(size or self.arraysize)]

    def close(self):
        self._cursor.close()


def _plan_of(sync, name: str, *arguments: str) -> dict:
    """The dry run's plan (changes, notices, per-school counts, scope) and its exit code."""
    path = sync.folder / f"plan-{name}.json"
    result = sync.run("--all", "--dry-run", "--as-of", "2026-07-15", "--plan-out", str(path), *arguments)
    assert result.code in (0, 1), result.output
    document = json.loads(path.read_text(encoding="utf-8"))
    return {"changes": document["changes"], "notices": document["notices"],
            "active": document["active_students"], "scope": document["scope"], "code": result.code}


def _plans_from_sqlite_and_api(sync, monkeypatch, **server_options: Any) -> tuple[dict, dict]:
    """The same district's plan read from the SQLite copy, then through the API over it."""
    from_sqlite = _plan_of(sync, "sqlite")
    with serving(sync, monkeypatch, **server_options) as server:
        return from_sqlite, _plan_of(sync, "api")


class DemoDistrict:
    """testkit's sample district (the demo's), run through the command line like `sync`."""

    def __init__(self, folder: Path, server: DirectoryServer, capsys: Any):
        self.folder, self.server, self.capsys = folder, server, capsys
        self.database = folder / "powerschool.sqlite3"
        district.build_demo_district(folder, server, 2026)
        self.settings_path = self.settings({"powerschool": {"sqlite": str(self.database)}})

    def settings(self, overrides: dict) -> Path:
        self.settings_path = district.write_settings(self.folder / "student_sync.toml", self.server.url,
                                                     overrides)
        return self.settings_path

    def run(self, *arguments: str):
        self.capsys.readouterr()
        code = student_sync.main(["--config", str(self.settings_path), *arguments])
        captured = self.capsys.readouterr()
        return type("Result", (), {"code": code, "output": captured.out + captured.err})


def test_the_sample_district_gives_the_same_plan_from_sqlite_oracle_and_the_api(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NEW_USER_PASSWORD", "Welcome-Sync-2026")
    monkeypatch.setenv("POWERSCHOOL_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("POWERSCHOOL_CLIENT_SECRET", CLIENT_SECRET)
    with DirectoryServer(domain=district.DOMAIN) as server:
        demo = DemoDistrict(tmp_path, server, capsys)
        from_sqlite = _plan_of(demo, "sqlite")

        monkeypatch.setattr(student_sync, "connect_powerschool",
                            lambda settings: OracleShapedConnection(demo.database))
        from_oracle = _plan_of(demo, "oracle")
        monkeypatch.undo()
        monkeypatch.setenv("NEW_USER_PASSWORD", "Welcome-Sync-2026")   # a dry run without it exits 2
        monkeypatch.setenv("POWERSCHOOL_CLIENT_ID", CLIENT_ID)
        monkeypatch.setenv("POWERSCHOOL_CLIENT_SECRET", CLIENT_SECRET)

        with PowerSchoolApiServer(demo.database, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                  max_page_size=7) as ps_api:
            demo.settings(api_settings(ps_api))
            from_api = _plan_of(demo, "api")
            assert len(student_pages(ps_api)) > 10  # read in many pages
    assert from_sqlite["changes"], "the sample district has changes to plan"
    assert from_oracle == from_sqlite
    assert from_api == from_sqlite


def test_odd_values_read_through_the_api_give_what_sqlite_gives(sync, monkeypatch):
    """Text in number columns, NULLs, floats: every value comes back as a string from the API
    (or is left out when NULL), and is judged as the SQL path judges it."""
    sync.student(50001, class_of=None)                     # NULL CLASSOF: warning
    sync.student(50002, status=None)                       # NULL ENROLL_STATUS: failed
    sync.student("50003", grade="10")                      # text holding numbers
    sync.student(50004.0, school=101.0)                    # floats
    sync.student(50005, school="abc")                      # a school number that is not one
    sync.student(50006, first="  ANNE-MARIE  ", last="O'NEIL")
    sync.student(50007, last=None)                         # NULL name: cannot create
    sync.student(50008, status=2)                          # not active
    sync.account(50008)
    from_sqlite, from_api = _plans_from_sqlite_and_api(sync, monkeypatch)
    assert from_api == from_sqlite
    assert from_api["code"] == 1


def test_thousands_of_digits_read_through_the_api_give_what_sqlite_gives(sync, monkeypatch):
    """A corrupt column of endless digits is bad data for its row through the API too, never
    an 'unexpected error' (Python turns no more than 4300 digits of text into a number)."""
    huge = "9" * 5000
    sync.student(huge)                                     # STUDENT_NUMBER
    sync.student(50011, status=huge)
    sync.student(50012, class_of=huge)
    sync.student(50013, class_of="1e5000")
    sync.student(50014)
    from_sqlite, from_api = _plans_from_sqlite_and_api(sync, monkeypatch)
    assert from_api == from_sqlite
    assert from_api["code"] == 1 and len(from_api["changes"]) == 3


@pytest.mark.parametrize("style", ["decimal", "padded"])
def test_numbers_written_as_12345_0_or_padded_give_what_sqlite_gives(sync, monkeypatch, style):
    """SCHOOLID, GRADE_LEVEL, ENROLL_STATUS, CLASSOF, SCHOOL_NUMBER and the 0/1 flag may come as
    "101.0" (a Java double's text) or with spaces around them: the same number, the same plan.
    (STUDENT_NUMBER is read digits-only on purpose, as the SQL
    path reads its text: tests/test_wrong_account.py.)"""
    for number in range(50020, 50026):
        sync.student(number, school=101 if number % 2 else 102, grade=9 if number % 2 else 7)
    sync.student(50030, status=2)
    sync.account(50030)
    styled = ["schoolid", "grade_level", "enroll_status", "classof", "school_number", "state_excludefromreporting"]
    from_sqlite, from_api = _plans_from_sqlite_and_api(sync, monkeypatch, number_style=style, styled_columns=styled)
    assert from_api == from_sqlite
    assert len(from_api["changes"]) >= 6


def test_null_columns_sent_as_empty_text_give_what_sqlite_gives(sync, monkeypatch):
    """Oracle keeps no empty text (its '' is NULL) and no blank number: a NULL column that comes
    as "" instead of being left out is a NULL, with the same notices as the SQL path."""
    sync.student(50001, class_of=None)                     # NULL CLASSOF: warning
    sync.student(50002, status=None)                       # NULL ENROLL_STATUS: failed
    sync.student(50007, last=None)                         # NULL name: cannot create
    sync.student(50009, grade=None)                        # NULL GRADE_LEVEL
    sync.student(50010)
    from_sqlite, from_api = _plans_from_sqlite_and_api(sync, monkeypatch, null_as_empty=True)
    assert from_api == from_sqlite
    assert any("CLASSOF is empty" in n["message"] for n in from_api["notices"]), from_api["notices"]


@pytest.mark.parametrize("flag", [lambda v: v == 1, lambda v: "true" if v == 1 else "false",
                                  lambda v: " True" if v == 1 else "FALSE "],
                         ids=["json-boolean", "boolean-text", "boolean-text-any-case"])
def test_a_lenient_reading_of_other_answer_shapes(sync, api, monkeypatch, flag):
    """Ids as text, table names in capitals, numbers as JSON numbers, the 0/1 flag as a
    boolean (JSON or text): all read alike."""
    original = _Tables.record

    def other_shape(self, table, columns, row):
        record = original(self, table, columns, row)
        values = {k: (int(v) if v.lstrip("-").isdigit() else v) for k, v in record["tables"][table].items()}
        if "state_excludefromreporting" in values:  # a boolean for the 0/1 column
            values["state_excludefromreporting"] = flag(values["state_excludefromreporting"])
        return {"id": str(record["id"]), "name": table.upper(), "tables": {table.upper(): values}}

    numbers = students(sync, 7)
    sync.student(43000, school=901, grade=-1)  # at a school excluded from state reporting
    monkeypatch.setattr(_Tables, "record", other_shape)
    result = sync.run("--state-reporting")
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)
    assert sync.server.user(email(43000)) is None


# --------------------------------------------------------------------------------------------
# Short reads, limits and faults
# --------------------------------------------------------------------------------------------


def test_a_short_page_is_read_again_once(sync, api):
    numbers = students(sync, 12)
    api.add_fault("short", r"/students$", page=2)
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)
    assert api.count(r"^/ws/schema/table/students/count$") == 2


def test_a_short_read_twice_stops_the_run_before_any_change(sync, api):
    numbers = students(sync, 12)
    for number in numbers:
        sync.account(number)
    api.add_fault("short", r"/students$", page=3, times=2)
    sync.server.clear_requests()
    result = sync.run("--all")
    assert result.code == 2
    assert re.search(r"12 students?.*count|count.*12", result.output, re.IGNORECASE), result.output
    assert not sync.writes()
    assert not any(sync.server.user(email(n))["suspended"] for n in numbers)


def test_a_count_lower_than_the_table_is_found_by_the_page_after_a_full_last_page(sync, api, monkeypatch):
    """A stale count that is a whole number of pages would leave the last rows unread: here
    the active row of a student who moved to WHS, whose row at LMS says transferred out."""
    numbers = students(sync, 9)
    for number in numbers:
        sync.account(number)
    sync.student(40100, status=2, school=102)           # row 10: left LMS
    sync.student(40100, status=0, school=101)           # row 11: active at WHS
    sync.account(40100)
    original = _Tables.count
    monkeypatch.setattr(_Tables, "count", lambda self, table, q: original(self, table, q) - (table == "students"))
    sync.server.clear_requests()
    result = sync.run("--all")
    assert result.code == 2, result.output
    assert re.search(r"11 STUDENTS rows where it counts 10", result.output), result.output
    assert not sync.writes()
    assert not sync.server.user(email(40100))["suspended"]
    assert sorted(r.query.get("page") for r in student_pages(api)) == ["1", "1", "2", "2", "3", "3"]


def test_a_full_last_page_costs_one_empty_page_more(sync, api):
    numbers = students(sync, 10)
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)
    assert sorted(r.query.get("page") for r in student_pages(api)) == ["1", "2", "3"]


def test_429_with_retry_after_is_honoured(sync, api):
    numbers = students(sync, 6)
    api.add_fault("429", r"/students$", page=2, retry_after="1")
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)
    statuses = [r.status for r in student_pages(api) if r.query.get("page") == "2"]
    assert statuses == [429, 200]


def test_the_request_interval_of_the_server_is_respected(sync, monkeypatch):
    numbers = students(sync, 12)
    with serving(sync, monkeypatch, settings=dict(max_requests_per_second=4), min_interval_ms=100) as server:
        result = sync.run("--all")
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)
    assert len([r for r in student_pages(server) if r.status == 200]) == 3


def test_5xx_answers_are_retried(sync, api):
    numbers = students(sync, 6)
    api.add_fault("status", r"/students$", page=1, status=503, times=2)
    api.add_fault("status", r"/count$", status=500)
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)


def test_a_503_with_retry_after_waits_as_asked_then_reads_on(sync, api):
    numbers = students(sync, 6)
    api.add_fault("status", r"/students$", page=2, status=503, retry_after="1")
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)
    assert [r.status for r in student_pages(api) if r.query.get("page") == "2"] == [503, 200]


def test_a_503_asking_for_a_longer_wait_than_a_run_can_give_stops_before_any_change(sync, api):
    """Retry-After on a 503 (maintenance) is honoured like a 429's: an hour is not spent
    retrying every few seconds, nor waited out; the run says to try later."""
    numbers = students(sync, 6)
    api.add_fault("status", r"/students$", page=2, status=503, retry_after="3600")
    result = sync.run("--all")
    assert result.code == 2, result.output
    assert "3600 s" in result.output and "503" in result.output
    assert [r.status for r in student_pages(api) if r.query.get("page") == "2"] == [503]
    assert not sync.writes() and not any(sync.server.user(email(n)) for n in numbers)


def test_a_token_endpoint_asking_for_a_longer_wait_than_a_run_can_give_stops(sync, api):
    """The token request honours Retry-After under the same bound as the pages: an hour is
    not slept through, the run says to try later."""
    numbers = students(sync, 3)
    api.add_fault("status", r"/oauth/access_token$", status=503, retry_after="3600")
    result = sync.run("--all")
    assert result.code == 2, result.output
    assert "3600 s" in result.output and "try again later" in result.output
    assert not sync.writes() and not any(sync.server.user(email(n)) for n in numbers)


def test_a_page_holding_one_record_as_an_object_is_read_as_one_record(sync, monkeypatch):
    """A lone record may come as an object rather than a one-item list (JSON converted from
    XML does that): the last page of 11 students in pages of 5 holds one."""
    numbers = students(sync, 11)
    with serving(sync, monkeypatch, lone_record_as_object=True) as server:
        result = sync.run("--all")
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)


def test_a_token_expiring_mid_read_gets_one_new_token(sync, api):
    numbers = students(sync, 12)
    api.add_fault("expire", r"/students$", page=2)
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)
    assert api.count(r"^/oauth/access_token$", status=200) == 2


def test_a_token_refused_again_after_renewal_is_exit_2(sync, api):
    students(sync, 12)
    api.add_fault("expire", r"/students$", times=20)
    result = sync.run("--all")
    assert result.code == 2
    assert "401" in result.output or "token" in result.output.lower()
    assert not sync.writes()


def test_a_refusal_that_repeats_the_token_never_puts_it_in_the_output_or_log(sync, monkeypatch):
    """An OAuth resource server may answer a refused token with the token in its error text
    ("invalid_token", "Invalid access token: <token>"): the run quotes the server, never a
    token (nor the client secret)."""
    students(sync, 6)
    with serving(sync, monkeypatch, refusal_names_token=True) as server:
        server.add_fault("expire", r"/students$", times=20)
        result = sync.run("--all")
        tokens = list(server.issued_tokens)
    assert result.code == 2, result.output
    assert "401" in result.output and "Invalid access token" in result.output
    assert len(tokens) >= 2
    texts = [result.output] + [p.read_text(encoding="utf-8") for p in logs(sync).glob("*.log")]
    for text in texts:
        assert not any(token in text for token in tokens)
        assert CLIENT_SECRET not in text
    assert not sync.writes()


@pytest.mark.parametrize("body", ["errors", "message", "qualified", "error-message"])
def test_a_403_names_the_table_and_column_however_the_answer_words_it(sync, monkeypatch, body):
    """The field may come in errors[].field (bare or TABLE.COLUMN), in the message alone, or
    in an error's own message: the run and --check name STUDENTS.CLASSOF, exactly."""
    students(sync, 3)
    with serving(sync, monkeypatch, forbidden_body=body) as server:
        server.revoke("students", "classof")
        run = sync.run("--all")
        check = sync.run("--check")
    assert run.code == 2 and check.code == 2
    assert re.search(r"no access to the field STUDENTS\.CLASSOF\b", run.output), run.output
    assert re.search(r"FAIL .*no access to STUDENTS\.CLASSOF\b", check.output), check.output
    assert "STUDENTS.STUDENTS" not in run.output + check.output
    assert not sync.writes()


def test_a_table_the_plugin_cannot_see_is_named_not_taken_for_a_wrong_url(sync, monkeypatch):
    """A server that answers 404 for a table the plugin has no column of: the metadata was
    read, so the url is right; the run names the table and the plugin (and --check too)."""
    students(sync, 3)
    with serving(sync, monkeypatch, hide_ungranted_tables=True) as server:
        for column in ("id", "school_number", "name", "abbreviation", "state_excludefromreporting"):
            server.revoke("schools", column)
        run = sync.run("--all")
        check = sync.run("--check")
    for result in (run, check):
        assert result.code == 2, result.output
        assert "SCHOOLS" in result.output and "plugin" in result.output, result.output
        assert "[powerschool] url" not in result.output, result.output
    assert not sync.writes()


def test_a_column_the_plugin_lacks_is_exit_2_naming_it(sync, api):
    students(sync, 3)
    api.revoke("students", "classof")
    result = sync.run("--all")
    assert result.code == 2
    assert "CLASSOF" in result.output.upper() and "plugin" in result.output.lower()
    assert not sync.writes()


# --------------------------------------------------------------------------------------------
# Wrong settings and odd servers: exit 2, clearly
# --------------------------------------------------------------------------------------------


def test_refused_credentials_name_the_variables_never_the_secret(sync, api, monkeypatch):
    students(sync, 3)
    monkeypatch.setenv("POWERSCHOOL_CLIENT_SECRET", "wrong-" + CLIENT_SECRET)
    result = sync.run("--all")
    assert result.code == 2
    assert "POWERSCHOOL_CLIENT_ID" in result.output and "POWERSCHOOL_CLIENT_SECRET" in result.output
    assert CLIENT_SECRET not in result.output
    for path in (sync.folder / "logs").glob("*.log"):
        assert CLIENT_SECRET not in path.read_text(encoding="utf-8")


def test_a_token_answer_that_is_an_oauth_error_names_the_variables(sync, api, monkeypatch):
    """An OAuth error ({"error": "invalid_client"}) sent with 200 is refused credentials, not
    a wrong url."""
    from testkit.powerschool_api import _json

    monkeypatch.setattr(PowerSchoolApiServer, "_token", lambda self, headers, body: _json(
        200, {"error": "invalid_client", "error_description": "Bad client credentials"}))
    students(sync, 2)
    result = sync.run("--all")
    assert result.code == 2
    assert "POWERSCHOOL_CLIENT_ID" in result.output and "POWERSCHOOL_CLIENT_SECRET" in result.output
    assert "Bad client credentials" in result.output
    assert not sync.writes()


def test_a_missing_client_secret_variable_is_named(sync, api, monkeypatch):
    monkeypatch.delenv("POWERSCHOOL_CLIENT_SECRET")
    result = sync.run("--all")
    assert result.code == 2 and "POWERSCHOOL_CLIENT_SECRET" in result.output


def test_an_unreachable_url_is_exit_2(sync, api):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sync.settings({"powerschool": {"source": "api", "url": f"http://127.0.0.1:{port}", "sqlite": None}})
    result = sync.run("--all")
    assert result.code == 2
    assert f"127.0.0.1:{port}" in result.output


def test_a_url_that_is_not_powerschool_is_exit_2(sync, api):
    """The Directory API server answers 404 where PowerSchool's API would be."""
    sync.settings({"powerschool": {"source": "api", "url": sync.server.url.rstrip("/"), "sqlite": None}})
    result = sync.run("--all")
    assert result.code == 2
    assert "[powerschool] url" in result.output


def test_an_html_answer_is_exit_2(sync, api):
    students(sync, 3)
    api.add_fault("html", r"/ws/v1/metadata$")
    result = sync.run("--all")
    assert result.code == 2
    assert "HTML" in result.output


@pytest.mark.parametrize("path", [r"/oauth/access_token$", r"/ws/v1/metadata$", r"/students$"])
def test_a_redirect_to_the_sign_in_page_is_exit_2(sync, api, path):
    """A proxy or an expired session sends a request to PowerSchool's sign-in page (302, then
    200 with HTML): never read as an answer, whichever request meets it."""
    numbers = students(sync, 3)
    for number in numbers:
        sync.account(number)
    api.add_fault("login", path, times=20)
    sync.server.clear_requests()
    result = sync.run("--all")
    assert result.code == 2, result.output
    assert "HTML" in result.output and "sign-in" in result.output
    assert any(r.path == "/admin/pw.html" for r in api.requests)
    assert not sync.writes()


def test_plain_http_is_refused_for_a_server_that_is_not_local(sync):
    sync.settings({"powerschool": {"source": "api", "url": "http://ps.d118.org", "sqlite": None}})
    result = sync.run("--all")
    assert result.code == 2 and "https" in result.output


def test_api_settings_need_a_url(sync):
    sync.settings({"powerschool": {"source": "api", "sqlite": None}})
    result = sync.run("--all")
    assert result.code == 2 and "url" in result.output


def test_an_unknown_source_is_a_settings_error(sync):
    sync.settings({"powerschool": {"source": "rest"}})
    result = sync.run("--all")
    assert result.code == 2 and "source" in result.output


# --------------------------------------------------------------------------------------------
# --check
# --------------------------------------------------------------------------------------------


def test_check_with_the_api_source(sync, api):
    students(sync, 4, school=101)
    students_102 = [42000, 42001]
    for number in students_102:
        sync.student(number, school=102, grade=7)
    result = sync.run("--check")
    assert result.code == 0, result.output
    text = result.output
    assert re.search(r"OK .*token", text, re.IGNORECASE)
    assert re.search(r"OK .*page size 5|OK .*maximum page size.*5", text, re.IGNORECASE), text
    assert re.search(r"OK .*access to .*(11|every)", text, re.IGNORECASE), text
    assert "101: 4" in text and "102: 2" in text


def test_check_names_a_column_the_plugin_lacks(sync, api):
    students(sync, 2)
    api.revoke("students", "grade_level")
    result = sync.run("--check")
    assert result.code == 2
    assert re.search(r"FAIL .*GRADE_LEVEL", result.output, re.IGNORECASE), result.output


def test_check_tells_another_failure_from_a_missing_grant_whatever_the_url_holds(sync, monkeypatch):
    """A server whose address holds "403" (a port here; a district's host name elsewhere) and
    that answers a column's probe with an HTML page: --check says HTML, never that the plugin
    lacks the column."""
    monkeypatch.setenv("POWERSCHOOL_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("POWERSCHOOL_CLIENT_SECRET", CLIENT_SECRET)
    students(sync, 2)
    server = None
    for port in range(40300, 40400):
        try:
            server = start_api(sync, port=port)
            break
        except OSError:
            continue
    assert server is not None, "no free port with 403 in it"
    with server:
        server.add_fault("html", r"/students$", times=1)
        sync.settings(api_settings(server))
        result = sync.run("--check")
    assert result.code == 2
    assert re.search(r"FAIL .*HTML", result.output), result.output
    assert "no access" not in result.output.lower(), result.output


def test_check_names_the_key_the_paged_read_sorts_on_when_the_plugin_lacks_it(sync, api):
    """The read sorts every page on ID: --check does not call the plugin's access complete
    without it, and names it."""
    students(sync, 2)
    api.revoke("students", "id")
    result = sync.run("--check")
    assert result.code == 2
    assert re.search(r"FAIL .*no access to STUDENTS\.ID\b", result.output), result.output
    assert not re.search(r"OK .*access to every column", result.output), result.output


def test_the_plugin_grants_the_key_the_read_sorts_on():
    from testkit.powerschool_api import read_grants

    grants = read_grants()
    assert {(table, student_sync._API_SORT) for table in student_sync._API_TABLES} <= grants
    assert grants == {(t, c) for t, columns in student_sync._API_TABLES.items()
                      for c in (*columns, student_sync._API_SORT)}


def test_the_api_reader_gives_the_rows_and_schools_the_sql_gives(tmp_path, monkeypatch):
    """Same School and StudentRow values from the SQL and the API, values turned back from text."""
    import sqlite3

    monkeypatch.setenv("POWERSCHOOL_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("POWERSCHOOL_CLIENT_SECRET", CLIENT_SECRET)
    with DirectoryServer(domain=district.DOMAIN) as server:
        district.build_demo_district(tmp_path, server, 2026)
    database = tmp_path / "powerschool.sqlite3"
    connection = sqlite3.connect(database)
    schools = student_sync.read_schools(connection)
    scope = student_sync.resolve_scope("building", schools, [102])
    from_sql = student_sync.read_students(connection, scope, schools)
    connection.close()
    with PowerSchoolApiServer(database, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, max_page_size=9) as ps:
        path = district.write_settings(tmp_path / "api.toml", "http://127.0.0.1:9/", api_settings(ps))
        with student_sync.open_powerschool_api(student_sync.load_settings(path)) as api:
            api_schools = student_sync.read_api_schools(api)
            from_api = student_sync.read_api_students(api, scope, api_schools)
    assert api_schools == schools
    key = lambda row: (row.student_number, row.school_id)  # noqa: E731
    assert sorted(from_api, key=key) == sorted(from_sql, key=key)
    assert any(r.school_id == 101 for r in from_api)  # the other row of a student of 102
    assert all(isinstance(r.student_number, int) for r in from_api)


def test_a_server_stricter_than_the_settings_is_met_after_a_few_refusals(sync, monkeypatch):
    """The server's minimum interval (200 ms) is wider than max_requests_per_second allows for
    (20 a second): its 429s are waited out, the spacing widens, and the read completes."""
    numbers = students(sync, 12)
    with serving(sync, monkeypatch, settings=dict(max_requests_per_second=20), min_interval_ms=200) as server:
        result = sync.run("--all")
        refused = server.count(r"^/ws/", status=429)
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)
    assert 0 < refused < 20


def test_no_metadata_at_the_url_is_exit_2(sync, api):
    """A server that gives a token but answers 404 at /ws/v1/metadata is not PowerSchool's API."""
    students(sync, 3)
    api.add_fault("status", r"/ws/v1/metadata$", status=404)
    result = sync.run("--all")
    assert result.code == 2
    assert "404" in result.output and "[powerschool] url" in result.output
    assert not sync.writes()


@pytest.mark.parametrize("metadata", [{"metadata_omits": ["schema_table_query_max_page_size"]},
                                      {"metadata_page_size": 50}])
def test_pages_smaller_than_the_metadata_says_are_read_whole(sync, monkeypatch, metadata):
    """Metadata without schema_table_query_max_page_size (pages of 100 asked), or saying more
    than the server cuts its pages at (5): the first page tells the real size, every row is
    read in pages of that size, nothing is read twice."""
    numbers = students(sync, 12)
    with serving(sync, monkeypatch, **metadata) as server:
        result = sync.run("--all")
        pages = student_pages(server)
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)
    assert sorted(int(r.query["page"]) for r in pages) == [1, 1, 2, 3]   # the short first page asked twice
    assert [int(r.query["pagesize"]) for r in pages if r.query["page"] != "1"] == [5, 5]
    assert re.search(r"pages? of 5", result.output), result.output


def test_one_short_first_page_does_not_shrink_the_pages_after_it(sync, api):
    """A first page that comes back short once (4 of its 5 rows dropped) is asked again; the
    rest is read in pages of the size the metadata gives, not of 1."""
    numbers = students(sync, 12)
    api.add_fault("short", r"/students$", page=1, drop=4)
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)
    pages = student_pages(api)
    assert sorted(int(r.query["page"]) for r in pages) == [1, 1, 2, 3]
    assert {int(r.query["pagesize"]) for r in pages} == {5}
    assert "answers pages of" not in result.output


def test_tokens_that_run_out_during_a_long_read_are_renewed(sync, monkeypatch):
    """Tokens that live 1 s, a read of about 2 s: every page is read, no student is lost."""
    numbers = students(sync, 40)
    with serving(sync, monkeypatch, settings=dict(max_requests_per_second=8), token_lifetime=1) as server:
        result = sync.run("--all")
        tokens = server.count(r"^/oauth/access_token$", status=200)
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)
    assert tokens >= 2


def test_the_benchmark_runs_on_a_small_district(capsys):
    """bench/bench_powerschool.py's reads (each alone, then a run's overlapped read) still
    find the names they call, and it says whether SPEC 9's comparison holds."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_powerschool.py"
    spec = importlib.util.spec_from_file_location("bench_powerschool", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--students", "300", "--latency-ms", "0", "--page-size", "100", "--api-rates", "10",
                       "--google-latency-ms", "0"]) == 0
    output = capsys.readouterr().out
    assert output.count("| 300 |") == 3, output
    assert output.count("while Google's listing runs | 0 |") == 2, output
    assert re.search(r"^API read at 10 requests/s: [\d.]+ s [<>=]+ Google read at 0 ms a request: [\d.]+ s "
                     r"\((holds|does not hold)\)$", output, re.MULTILINE), output


def test_records_whose_ids_say_nothing_are_checked_by_the_count_alone(sync, api, monkeypatch):
    """A server that leaves DCID empty (0 for every record) is still read whole."""
    original = _Tables.record

    def no_ids(self, table, columns, row):
        return {**original(self, table, columns, row), "id": 0}

    numbers = students(sync, 12)
    monkeypatch.setattr(_Tables, "record", no_ids)
    result = sync.run("--all")
    assert result.code == 0, result.output
    assert all(sync.server.user(email(n)) for n in numbers)


def test_pages_that_overlap_are_not_taken_for_the_table(sync, api, monkeypatch):
    """Page 2 answering page 1's rows again (the right number of rows, twice the same): read
    again, then exit 2, nothing changed."""
    original = PowerSchoolApiServer._page

    def overlapping(self, table, query, drop):
        if table == "students" and query.get("page") == "2":
            query = {**query, "page": "1"}
        return original(self, table, query, drop)

    numbers = students(sync, 12)
    for number in numbers:
        sync.account(number)
    monkeypatch.setattr(PowerSchoolApiServer, "_page", overlapping)
    sync.server.clear_requests()
    result = sync.run("--all")
    assert result.code == 2, result.output
    assert not sync.writes()


def test_the_demo_runs_with_the_api_source(capfd, tmp_path, monkeypatch):
    import demo

    monkeypatch.setattr(demo.tempfile, "mkdtemp", lambda **_: str(tmp_path))
    assert demo.main(["--source", "api"]) == 0
    output = capfd.readouterr().out
    assert "PowerSchool plugin API at http://127.0.0.1:" in output
    assert "read through the API" in output
    assert "Demo finished" in output
