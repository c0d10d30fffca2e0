"""Hostile review of the newest paths (licences, the PowerSchool API source) for the defect
feared most: an account that is not a student of the scope is changed.

- a STUDENT_NUMBER read through the API is read as the SQL path reads it (digits only):
  " 500301", "5.00301e5" or "500301.0" is a bad row, never a row of student 500301;
- a number column written in another script's digits ("\u0661\u0660\u0661") is bad data, as the SQL
  reads it, never school 101;
- a school's STATE_EXCLUDEFROMREPORTING other than NULL or 0 (2, "Y") keeps it out of the
  state-reporting scope from every source, as the SQL's COALESCE(..., 0) = 0 does;
- the same district, odd rows included, gives the same plan from SQLite, Oracle-shaped SQL and
  the API, for every kind of scope;
- a placeholder row (a bad name) at a school of the scope does not bring a student whose real
  rows are elsewhere into it: rows skipped for a bad name are dropped first (SPEC 3);
- guards that held under review, kept as tests: a licence never follows a create that met a
  staff alias, and a plan's licence change for any address but the student's is refused;
- an assign answered 409 that names another SKU fails the student instead of counting as held.

End to end through student_sync.main (see conftest.py) against the local Directory API server,
the local PowerSchool API server over the same SQLite copy, asserting end states, requests,
exit codes and log lines.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import student_sync
from conftest import WHS_9, email
from testkit import district
from testkit.powerschool_api import PowerSchoolApiServer

CLIENT_ID, CLIENT_SECRET = "0c5e7a1b-wrongacct-client", "wrongacct-secret-never-shown"
LMS_7 = district.building_ou("LMS") + "/7th"
HUGE = ("99999999999999999991", "99999999999999999992")   # two students beyond SQLite's 64-bit integers
ARABIC_101 = "\u0661\u0660\u0661"      # 101 in Arabic-Indic digits: Python's Decimal reads it, SQL does not
ODD_7 = district.building_ou("ODD") + "/7th"


@pytest.fixture
def api_credentials(monkeypatch):
    monkeypatch.setenv("POWERSCHOOL_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("POWERSCHOOL_CLIENT_SECRET", CLIENT_SECRET)


def serve_api(sync) -> PowerSchoolApiServer:
    """The local PowerSchool API over the test district's SQLite copy, and settings reading it."""
    sync.ps.connection.commit()
    server = PowerSchoolApiServer(sync.folder / "powerschool.sqlite3", client_id=CLIENT_ID,
                                  client_secret=CLIENT_SECRET, max_page_size=4).start()
    sync.settings({"powerschool": {"source": "api", "url": server.url, "sqlite": None,
                                   "max_requests_per_second": 500}})
    return server


class OracleShaped:
    """A DB-API connection over the SQLite copy answering as python-oracledb does for
    PowerSchool's NUMBER columns: whole numbers come back as floats."""

    version = "19.0.0.0.0 (Oracle-shaped SQLite)"

    def __init__(self, path: Path):
        import sqlite3
        self._connection = sqlite3.connect(path)

    def cursor(self) -> "OracleShaped._Cursor":
        return OracleShaped._Cursor(self._connection.cursor())

    def close(self) -> None:
        self._connection.close()

    class _Cursor:
        arraysize = 100

        def __init__(self, cursor: Any):
            self._cursor = cursor

        def execute(self, sql: str, binds: Any = None) -> None:
            self._cursor.execute(sql, binds or {})

        def fetchall(self) -> list:
            return [self._row(r) for r in self._cursor.fetchall()]

        def fetchmany(self, size: int | None = None) -> list:
            return [self._row(r) for r in self._cursor.fetchmany(size or self.arraysize)]

        def close(self) -> None:
            self._cursor.close()

        @staticmethod
        def _row(row: tuple) -> tuple:
            return tuple(float(v) if isinstance(v, int) else v for v in row)


def plan_of(sync, name: str, scope: tuple[str, ...]) -> dict:
    """A dry run's plan file (changes, notices, school counts, scope) and its exit code."""
    path = sync.folder / f"plan-{name}.json"
    result = sync.run(*scope, "--dry-run", "--as-of", "2026-07-15", "--plan-out", str(path))
    assert result.code in (0, 1), result.output
    document = json.loads(path.read_text(encoding="utf-8"))
    return {"changes": document["changes"], "notices": document["notices"], "code": result.code,
            "active": document["active_students"], "scope": document["scope"]}


def plans_from_every_source(sync, monkeypatch, scope: tuple[str, ...]) -> dict[str, dict]:
    sync.settings()
    plans = {"sqlite": plan_of(sync, "sqlite", scope)}
    with monkeypatch.context() as patched:
        patched.setattr(student_sync, "connect_powerschool",
                        lambda settings: OracleShaped(sync.folder / "powerschool.sqlite3"))
        plans["oracle"] = plan_of(sync, "oracle", scope)
    with serve_api(sync):
        plans["api"] = plan_of(sync, "api", scope)
    sync.settings()
    return plans


def readable(plan: dict) -> list[str]:
    """A plan as lines, for a failure message worth reading."""
    return ([f"{c['email']}: {c['detail']}" for c in plan["changes"]]
            + [f"{n['level']} {n['student_number']}: {n['message']}" for n in plan["notices"]]
            + [f"active {plan['active']}, code {plan['code']}"])


# ---------------------------------------------------------------------------------------------
# 1. A STUDENT_NUMBER from the API is read as the SQL path reads it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelled", [" 500301", "500301 ", "500301.0", "5.00301e5", "+500301",
                                     "\u0665\u0660\u0660\u0663\u0660\u0661"])
def test_an_api_student_number_that_is_not_digits_never_brings_another_student_into_scope(
        sync, api_credentials, spelled):
    """Student 500301 left WHS (101); a row at LMS (102) whose number only reads as 500301
    when spaces, a decimal point, an exponent, a sign or other scripts' digits are allowed is
    bad data for that row.  A run for LMS must not take 500301 into its scope and move him."""
    sync.student(500301, status=2)
    sync.account(500301)
    sync.student(spelled, "Bo", "Ray", status=0, school=102, grade=7)
    sync.student(500302, school=102, grade=7)
    sync.account(500302, org_unit=LMS_7, school=102)
    before = sync.server.user(email(500301))

    with serve_api(sync):
        sync.server.clear_requests()
        result = sync.run("--building", "102")

    assert result.code == 1, result.output
    assert sync.server.user(email(500301)) == before, result.output
    assert not [r for r in sync.writes() if "500301" in r.path], result.output
    assert f"STUDENT_NUMBER {spelled!r}" in result.output, result.output


@pytest.mark.parametrize("source", ["sqlite", "api"])
def test_student_numbers_too_long_for_sqlites_integers_stay_two_students(sync, api_credentials, source):
    """SQLite's CAST turned every digit text beyond 64 bits into 9223372036854775807: two
    students became one, with the account of neither."""
    for number in HUGE:
        sync.student(number, school=102, grade=7)
    server = serve_api(sync) if source == "api" else None
    try:
        result = sync.run("--all")
    finally:
        if server:
            server.stop()

    assert result.code == 0, result.output
    assert all(sync.server.user(f"{number}@d118.org") for number in HUGE), result.output
    assert sync.server.user("9223372036854775807@d118.org") is None


def test_a_negative_api_student_number_is_bad_data_as_from_sql(sync, api_credentials):
    sync.student(-500303, school=102, grade=7)
    sync.student(500303, status=2)
    sync.account(500303)

    with serve_api(sync):
        result = sync.run("--building", "102", "--dry-run")

    assert result.code == 1, result.output
    assert "STUDENT_NUMBER -500303" in result.output
    assert "500303@" not in result.output.replace("-500303", "")


# ---------------------------------------------------------------------------------------------
# 2. STATE_EXCLUDEFROMREPORTING other than NULL or 0 excludes, from every source
# ---------------------------------------------------------------------------------------------


def odd_flag_school(sync, flag: Any, students: int = 0) -> None:
    """School 555 (ODD) flagged `flag`, with its OUs, and `students` active students whose
    accounts are in step."""
    sync.ps.execute("INSERT INTO SCHOOLS (SCHOOL_NUMBER, NAME, ABBREVIATION, STATE_EXCLUDEFROMREPORTING) "
                    "VALUES (555, 'Odd Flag Academy', 'ODD', ?)", (flag,))
    for grade_ou in set(district.GRADES.values()):
        sync.server.add_orgunit(district.building_ou("ODD") + grade_ou)
    for number in range(500400, 500400 + students):
        sync.student(number, school=555, grade=7)
        sync.account(number, org_unit=ODD_7, school=555)


@pytest.mark.parametrize("flag", [2, "Y"])
def test_a_school_flagged_other_than_0_or_null_is_outside_the_state_reporting_scope_of_the_api(
        sync, api_credentials, flag):
    odd_flag_school(sync, flag)
    sync.student(500501, school=555, grade=7)
    sync.account(500501, org_unit=WHS_9, school=101)      # in step for a run that covers 555, it would move
    before = sync.server.user(email(500501))
    sync.student(500502)
    sync.account(500502, org_unit=WHS_9)

    with serve_api(sync):
        sync.server.clear_requests()
        result = sync.run("--state-reporting")

    assert result.code == 0, result.output
    assert sync.server.user(email(500501)) == before, result.output
    assert sync.writes() == [], result.output


@pytest.mark.parametrize("flag", [2, "Y"])
def test_a_school_flagged_other_than_0_or_null_is_no_school_drop_for_state_reporting(sync, flag):
    """The SQL never read such a school's rows for --state-reporting, yet counted it in the
    scope: after an --all run had counted its students, every state-reporting run stopped with
    exit 3 on a drop to 0."""
    odd_flag_school(sync, flag, students=25)
    sync.student(500601)
    sync.account(500601)
    assert sync.run("--all").code == 0

    result = sync.run("--state-reporting")

    assert result.code == 0, result.output
    assert "555" not in result.output, result.output


@pytest.mark.parametrize("source", ["sqlite", "api"])
def test_a_school_number_in_other_scripts_digits_is_bad_data_never_school_101(sync, api_credentials, source):
    """Student 500305 left LMS; a row whose SCHOOLID is 101 in Arabic-Indic digits is no row at
    WHS: a run for WHS leaves him alone, and the district's run fails him loudly, changing nothing."""
    sync.student(500305, status=2, school=102, grade=7)
    sync.student(500305, school=ARABIC_101)
    sync.account(500305, org_unit=LMS_7, school=102)
    sync.student(500306)
    sync.account(500306)
    before = sync.server.user(email(500305))
    server = serve_api(sync) if source == "api" else None
    try:
        building = sync.run("--building", "101")
        district_wide = sync.run("--all")
    finally:
        if server:
            server.stop()

    assert building.code == 0, building.output
    assert district_wide.code == 1, district_wide.output
    assert sync.server.user(email(500305)) == before, district_wide.output
    assert [line for line in district_wide.output.splitlines() if "500305" in line and "SCHOOLID" in line]


# ---------------------------------------------------------------------------------------------
# 3. The same district, odd rows included, gives the same plan from every source
# ---------------------------------------------------------------------------------------------


def odd_district(sync) -> None:
    """Rows of every odd kind, beside school 555 flagged 2 and a District Office (0)."""
    odd_flag_school(sync, 2)
    sync.ps.school(0, "District Office", "DO", None)
    sync.student(2001, first=None)                                   # NULL first name, no account
    sync.student(2002, last=None)                                    # NULL last name, an account
    sync.account(2002)
    sync.student(2003, grade=99)                                     # active in grade 99
    sync.student(2004, status=3, grade=12, class_of=2026)            # graduated (status 3), in grace
    sync.account(2004)
    sync.student(2005, status=2)                                     # transferred out
    sync.account(2005)
    sync.student(2006, school=102, grade=7)                          # two rows: active wins
    sync.student(2006, status=2)
    sync.account(2006)
    sync.student(2007, school=777, grade=7)                          # a school SCHOOLS lacks
    sync.account(2007)
    sync.student(2008, status=2)                                     # ... beside a row in scope
    sync.student(2008, school=777, grade=7)
    sync.account(2008)
    sync.student(2009, school=0, grade=7)                            # school 0
    sync.student(2010, school="0", grade=7)
    sync.student(2011, school=555, grade=7)                          # the oddly flagged school
    sync.account(2011)
    sync.student(2012, status="2 ")                                  # numbers as text
    sync.account(2012)
    sync.student(2013, status="-1", grade=None)                      # pre-registered, no grade
    sync.student(2014, school=" 101", grade=" 9")
    sync.student(2015, school="101.0", grade="9.0")
    sync.student(2016, status=-2)
    sync.account(2016)
    sync.student(2017, class_of="2030.5")
    sync.student(2018, status=3, school=999999, grade=99, class_of=2025)   # graduated earlier
    sync.account(2018)
    sync.student(2019, "Test", "Student")                            # a placeholder: skipped
    sync.account(2019, suspended=True)
    sync.student(2020, school=102, grade=7)                          # the same student twice at 102
    sync.student(2020, school=102, grade=7)
    sync.student(" 2021", school=102, grade=7)                       # odd student numbers
    sync.student("2022.0", school=102, grade=7)
    sync.student("2.023e3", school=102, grade=7)
    sync.student(-2024, school=102, grade=7)
    sync.student(2024, status=2)
    sync.account(2024)
    sync.student(2025.0, school=102, grade=7)                        # a float, as Oracle sends it
    sync.student(None, school=102, grade=7)                          # no number at all
    sync.student(2026, school=ARABIC_101)                            # numbers in other scripts' digits
    sync.student(2027, status="\u0660")
    sync.student(2028, grade="\u0669")
    sync.student(2029, status=2, school=102, grade=7)
    sync.student(2029, school=ARABIC_101)
    sync.account(2029, org_unit=LMS_7, school=102)
    sync.student(HUGE[0], school=102, grade=7)                       # more digits than SQLite's integers
    sync.student(HUGE[1], school=102, grade=7)


@pytest.mark.parametrize("scope", [("--all",), ("--state-reporting",), ("--building", "102"),
                                   ("--building", "101", "555")])
def test_odd_rows_give_the_same_plan_from_sqlite_oracle_shaped_sql_and_the_api(
        sync, api_credentials, monkeypatch, scope):
    odd_district(sync)

    plans = plans_from_every_source(sync, monkeypatch, scope)

    sqlite = plans["sqlite"]
    assert sqlite["changes"] and sqlite["code"] == 1
    for name in ("oracle", "api"):
        other = plans[name]
        same = {k: v for k, v in other.items() if k != "notices"} == \
            {k: v for k, v in sqlite.items() if k != "notices"}
        # Oracle sends whole numbers as floats: its messages may quote -2024.0 for -2024
        said = [(n["level"], n["email"]) for n in other["notices"]] == \
            [(n["level"], n["email"]) for n in sqlite["notices"]]
        assert same and said, f"{name} differs from sqlite:\n" + "\n".join(readable(other)) + \
            "\n--- sqlite:\n" + "\n".join(readable(sqlite))
    assert plans["api"]["notices"] == sqlite["notices"]


# ---------------------------------------------------------------------------------------------
# 4. A placeholder row at a school of the scope does not bring a student into it
# ---------------------------------------------------------------------------------------------

PRODUCT, PLUS = "101031", "1010310008"


def test_a_placeholder_row_in_scope_does_not_bring_a_student_of_another_building_into_it(sync):
    """Rows skipped for a bad name are dropped first (SPEC 3): student 500701's only row at WHS
    is a "Test Student" placeholder; his real row says he left LMS.  A run for WHS leaves his
    account and licence alone and says so; the run for LMS suspends him and releases it."""
    sync.settings({"licenses": {"product_id": PRODUCT, "sku_id": PLUS}})
    sync.student(500701, "Test", "Student", status=0, school=101)
    sync.student(500701, "Ann", "Lee", status=2, school=102, grade=7)
    sync.account(500701, org_unit=LMS_7, school=102)
    sync.server.licensing.assign(email(500701), PLUS)
    before = sync.server.user(email(500701))
    sync.server.clear_requests()

    result = sync.run("--building", "101")

    assert result.code == 0, result.output
    assert sync.server.user(email(500701)) == before, result.output
    assert sync.server.licensing.holds(email(500701), PLUS)
    assert sync.writes() == []
    assert [line for line in result.output.splitlines() if "500701" in line and "skipped" in line], result.output

    own = sync.run("--building", "102")

    assert own.code == 0, own.output
    assert sync.server.user(email(500701))["suspended"] is True
    assert not sync.server.licensing.holds(email(500701), PLUS)


# ---------------------------------------------------------------------------------------------
# 5. Licences never reach an account that is not the student's (guards that held under review)
# ---------------------------------------------------------------------------------------------

TEACHER = "olga.teacher@d118.org"


def licence_posts(sync) -> list[str]:
    return [(r.body or {}).get("userId", "").lower() for r in sync.server.requests
            if r.path.startswith("/apps/licensing/v1/") and r.method == "POST"]


@pytest.mark.parametrize("how", ["sync", "apply-plan"])
def test_a_new_students_address_that_is_a_staff_alias_is_never_sent_a_licence(sync, tmp_path, how):
    """The create meets 409 (the address is the teacher's alias) and fails the student: the
    licence that would follow the create is not sent, to the alias or anyone."""
    sync.settings({"licenses": {"product_id": PRODUCT, "sku_id": PLUS, "assign": True}})
    sync.server.add_user(TEACHER, given="Olga", family="Teacher", org_unit="/Staff", aliases=[email(500901)])
    sync.student(500901, "Sam", "New", grade=10)
    arguments = ["--all"]
    if how == "apply-plan":
        plan = tmp_path / "plan.json"
        assert sync.run("--all", "--dry-run", "--plan-out", str(plan)).code == 0
        assert "assign license" in plan.read_text(encoding="utf-8")
        arguments = ["--apply-plan", str(plan)]
    sync.server.clear_requests()

    result = sync.run(*arguments)

    assert result.code == 1, result.output
    assert f"alias of {TEACHER}" in result.output
    assert licence_posts(sync) == []
    assert not sync.server.licensing.holds(TEACHER, PLUS)


@pytest.mark.parametrize("address", ["500902@d118.org.evil", "500902+x@d118.org", "0500902@d118.org",
                                     "olga.teacher@d118.org", "\uff15\uff10\uff10\uff19\uff10\uff12@d118.org"])
def test_a_plans_licence_change_for_an_address_that_is_not_the_students_is_refused(sync, tmp_path, address):
    sync.settings({"licenses": {"product_id": PRODUCT, "sku_id": PLUS}})
    sync.server.add_user(TEACHER, given="Olga", family="Teacher", org_unit="/Staff")
    sync.server.licensing.assign(TEACHER, PLUS)
    sync.student(500902, status=2)
    sync.account(500902)
    sync.server.licensing.assign(email(500902), PLUS)
    plan = tmp_path / "plan.json"
    assert sync.run("--all", "--dry-run", "--plan-out", str(plan)).code == 0
    document = json.loads(plan.read_text(encoding="utf-8"))
    [change] = [c for c in document["changes"] if c["action"] == "license"]
    change["email"] = address
    plan.write_text(json.dumps(document), encoding="utf-8")
    sync.server.clear_requests()

    result = sync.run("--apply-plan", str(plan))

    assert result.code == 2, result.output
    assert sync.writes() == []
    assert sync.server.licensing.holds(TEACHER, PLUS) and sync.server.licensing.holds(email(500902), PLUS)


@pytest.mark.parametrize("status", [409, 412])
def test_an_assign_answered_that_another_sku_is_held_fails_the_student_not_done(sync, monkeypatch, status):
    """Google's 409 for a user holding a conflicting SKU is not "held already": the student
    counts as failed, and the report does not say the licence is in place."""
    from testkit.directory_server import ApiError, _error_response

    sync.settings({"licenses": {"product_id": PRODUCT, "sku_id": PLUS, "assign": True}})
    sync.student(500903)
    sync.account(500903)
    licensing = sync.server.licensing
    original = licensing.execute

    def execute(verb, path, query, body):
        if verb == "POST":
            return _error_response(ApiError(status, "duplicate" if status == 409 else "conditionNotMet",
                                            "User already has a license for another sku of this product"))
        return original(verb, path, query, body)

    monkeypatch.setattr(licensing, "execute", execute)

    result = sync.run("--all")

    assert result.code == 1, result.output
    assert "another sku" in result.output
    assert not licensing.holds(email(500903), PLUS)


# ---------------------------------------------------------------------------------------------
# Enrolled at a school PowerSchool has no SCHOOLS row for
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", [("--all",), ("--building", "101")])
def test_a_student_enrolled_at_a_school_without_a_schools_row_is_not_suspended(sync, scope):
    """Rows at a school with no SCHOOLS row belong to no scope, but an enrollment there is
    doubt enough: the student fails loudly and keeps the account as it is."""
    sync.student(500501, status=2, school=101)           # transferred out of WHS
    sync.student(500501, status=0, school=555)           # enrolled at school 555: no SCHOOLS row
    sync.account(500501)
    sync.student(500502, status=2, school=101)           # transferred out, enrolled nowhere
    sync.student(500502, status=2, school=555)
    sync.account(500502)
    sync.server.clear_requests()
    result = sync.run(*scope)
    assert result.code == 1, result.output
    assert re.search(r"500501.*not suspended: enrolled .* at school 555, which has no SCHOOLS row", result.output), \
        result.output
    assert sync.server.user(email(500501))["suspended"] is False
    assert sync.server.user(email(500501))["orgUnitPath"] == WHS_9
    assert sync.server.user(email(500502))["suspended"] is True       # the rule still holds without doubt
