"""Sample districts for the tests, the demo and the benchmark.

A SQLite database with PowerSchool's table and column names (the very SQL the Oracle
path uses runs against it), a settings file pointing student_sync at a local Directory
API server, and the OUs, schema and accounts that server starts with.  Never used by a
real run.
"""

from __future__ import annotations

import copy
import random
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Mapping

# Column types are left off STUDENTS' value columns on purpose: like a careless export,
# the test data may hold text where PowerSchool holds numbers.
_SCHEMA = """
CREATE TABLE SCHOOLS (
    ID INTEGER PRIMARY KEY,
    SCHOOL_NUMBER INTEGER,
    NAME TEXT,
    ABBREVIATION TEXT,
    STATE_EXCLUDEFROMREPORTING INTEGER
);
CREATE TABLE STUDENTS (
    ID INTEGER PRIMARY KEY,
    DCID INTEGER,
    STUDENT_NUMBER,
    FIRST_NAME,
    LAST_NAME,
    CLASSOF,
    ENROLL_STATUS,
    SCHOOLID,
    GRADE_LEVEL
);
CREATE INDEX STUDENTS_SCHOOLID ON STUDENTS (SCHOOLID);
CREATE INDEX STUDENTS_NUMBER ON STUDENTS (STUDENT_NUMBER);
"""

DOMAIN = "d118.org"
SUFFIX = "@d118.org"
CATEGORY = "Synchronization_Data"
SCHOOL_FIELD = "Homeschool_ID"
GRAD_FIELD = "Graduation_Year"
PREFIX = "/D118 Students/"
SUSPENDED_OU = "/Suspended Accounts"
GRADUATED_OU = "/Suspended Accounts/Graduated Students"

GRADES = {
    -2: "/PreKindergarten", -1: "/PreKindergarten", 0: "/Kindergarten", 1: "/1st", 2: "/2nd",
    3: "/3rd", 4: "/4th", 5: "/5th", 6: "/6th", 7: "/7th", 8: "/8th", 9: "/9th", 10: "/10th",
    11: "/11th", 12: "/12th", 13: "",
}

# The settings of a test district, as a TOML-shaped dict (see settings_toml).
BASE_SETTINGS: dict[str, dict[str, Any]] = {
    "powerschool": {"sqlite": "powerschool.sqlite3", "connect_timeout": 30},
    "google": {"domain": DOMAIN, "email_suffix": SUFFIX, "auth": "none",
               "api_endpoint": "http://127.0.0.1:9/", "max_requests_per_second": 1000,
               "max_creates_per_second": 1000},
    "accounts": {"new_password_env": "NEW_USER_PASSWORD", "change_password_at_next_login": True,
                 "graduated_school_name": "Graduated Students", "graduated_active_summer": True,
                 "no_grade_ou_schools": [999999, 901], "remove_groups_on_suspend": True,
                 "bad_names": ["test", "tester", "teststudent", "training1", "registration"]},
    "ous": {"student_prefix": PREFIX, "building_suffix": " Students", "suspended": SUSPENDED_OU,
            "graduated": GRADUATED_OU, "frozen": ["/Restricted", "/Adobe Licensed Students"],
            "grades": {str(k): v for k, v in GRADES.items()}},
    "custom_schema": {"category": CATEGORY, "school_field": SCHOOL_FIELD, "grad_year_field": GRAD_FIELD},
    "safety": {"max_suspensions": 100},
    "logging": {"dir": "logs", "keep": 60},
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def settings_toml(settings: Mapping[str, Mapping[str, Any]]) -> str:
    """A TOML text for a two-level dict; dict values become sub-tables."""
    lines: list[str] = []
    for section, keys in settings.items():
        tables = {k: v for k, v in keys.items() if isinstance(v, dict)}
        lines.append(f"[{section}]")
        for key, value in keys.items():
            if key not in tables:
                lines.append(f"{key} = {_toml_value(value)}")
        for key, table in tables.items():
            lines.append(f"[{section}.{key}]")
            lines.extend(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in table.items())
        lines.append("")
    return "\n".join(lines)


def write_settings(path: Path, endpoint: str, overrides: Mapping[str, Mapping[str, Any]] | None = None,
                   remove: Iterable[tuple[str, str]] = ()) -> Path:
    """Write a settings file for a test district served at `endpoint`.

    `overrides` replaces keys per section (a value of None removes the key); `remove`
    names (section, key) pairs to leave out.
    """
    settings = copy.deepcopy(BASE_SETTINGS)
    settings["google"]["api_endpoint"] = endpoint
    # A relative logs folder would be beside student_sync.py: keep a test district's logs
    # beside its settings instead.
    settings["logging"]["dir"] = str(Path(path).resolve().parent / "logs")
    for section, keys in (overrides or {}).items():
        target = settings.setdefault(section, {})
        for key, value in keys.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    for section, key in remove:
        settings.get(section, {}).pop(key, None)
    path = Path(path)
    path.write_text(settings_toml(settings), encoding="utf-8")
    return path


class PowerSchool:
    """A SQLite database with PowerSchool's SCHOOLS and STUDENTS tables."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.connection = sqlite3.connect(self.path)
        self.connection.executescript(_SCHEMA)
        self._next_id = 1

    def school(self, number: int, name: str, abbreviation: str, excluded: int | None = 0) -> None:
        self.connection.execute(
            "INSERT INTO SCHOOLS (SCHOOL_NUMBER, NAME, ABBREVIATION, STATE_EXCLUDEFROMREPORTING) "
            "VALUES (?, ?, ?, ?)", (number, name, abbreviation, excluded))

    def student(self, number: Any, first: Any, last: Any, class_of: Any, status: Any,
                school: Any, grade: Any) -> None:
        self.connection.execute(
            "INSERT INTO STUDENTS (DCID, STUDENT_NUMBER, FIRST_NAME, LAST_NAME, CLASSOF, ENROLL_STATUS, "
            "SCHOOLID, GRADE_LEVEL) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (self._next_id, number, first, last, class_of, status, school, grade))
        self._next_id += 1

    def students(self, rows: Iterable[tuple]) -> None:
        for row in rows:
            self.student(*row)

    def execute(self, sql: str, params: Any = ()) -> None:
        self.connection.execute(sql, params)

    def close(self) -> None:
        self.connection.commit()
        self.connection.close()

    def __enter__(self) -> "PowerSchool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def building_ou(abbreviation: str) -> str:
    return f"{PREFIX}{abbreviation} Students"


def prepare_directory(server: Any, abbreviations: Iterable[str], frozen: Iterable[str] = ()) -> None:
    """OUs for each building and grade, the suspended and graduated OUs, and our schema."""
    for abbreviation in abbreviations:
        for grade_ou in set(GRADES.values()):
            server.add_orgunit(building_ou(abbreviation) + grade_ou)
    for path in (SUSPENDED_OU, GRADUATED_OU, *frozen):
        server.add_orgunit(path)
    server.add_schema(CATEGORY, {SCHOOL_FIELD: "INT64", GRAD_FIELD: "INT64"})


def attributes(school: int, class_of: int | None) -> dict[str, dict[str, str]]:
    fields = {SCHOOL_FIELD: str(school)}
    if class_of is not None:
        fields[GRAD_FIELD] = str(class_of)
    return {CATEGORY: fields}


# ---------------------------------------------------------------------------
# The demo district: a few buildings and every kind of case
# ---------------------------------------------------------------------------

DEMO_SCHOOLS = [
    (101, "Washington High School", "WHS", 0),
    (102, "Lincoln Middle School", "LMS", 0),
    (103, "Jefferson Elementary", "JES", None),
    (901, "Early Childhood Center", "ECC", 1),
    (999999, "Graduated Students", "GRAD", 1),
]

_FIRST = ["Ava", "Liam", "Noah", "Emma", "Mia", "Ethan", "Sofia", "Lucas", "Aria", "Mateo",
          "Zoe", "Owen", "Maya", "Elijah", "Nora", "Caleb", "Leah", "Isaac", "Ruby", "Jonah"]
_LAST = ["Garcia", "Nguyen", "Patel", "Kowalski", "O'Brien", "Smith-Jones", "McDonald", "Lopez",
         "Johnson", "Kim", "Brown", "Novak", "Rossi", "Haddad", "Okafor", "Schmidt", "Larsen",
         "Dubois", "Yamamoto", "Silva"]


def build_demo_district(folder: Path, server: Any, year: int) -> dict[str, list[str]]:
    """Fill `folder`/powerschool.sqlite3 and `server` with the demo's cases.

    `year` is the current school year's graduation year (CLASSOF of today's 12th grade).
    Returns the student numbers of each case, for the demo to print.
    """
    rng = random.Random(118)
    cases: dict[str, list[str]] = {}
    groups: dict[str, list[str]] = {"all-students@d118.org": [], "whs-band@d118.org": []}
    frozen_ou = building_ou("WHS") + "/Restricted"
    prepare_directory(server, [s[2] for s in DEMO_SCHOOLS], frozen=[frozen_ou])

    def account(number: int, first: str, last: str, ou: str, school: int, class_of: int | None,
                suspended: bool = False, custom: bool = True) -> None:
        server.add_user(f"{number}{SUFFIX}", given=first, family=last, org_unit=ou, suspended=suspended,
                        custom=attributes(school, class_of) if custom else None)

    def note(case: str, number: int) -> None:
        cases.setdefault(case, []).append(str(number))

    with PowerSchool(Path(folder) / "powerschool.sqlite3") as ps:
        for school_number, name, abbreviation, excluded in DEMO_SCHOOLS:
            ps.school(school_number, name, abbreviation, excluded)
        number = 20000
        buildings = [(101, "WHS", range(9, 13)), (102, "LMS", range(6, 9)), (103, "JES", range(1, 6))]
        for school, abbreviation, grades in buildings:
            for i in range(50):
                number += 1
                grade = grades[i % len(grades)]
                class_of = year + 12 - grade
                first, last = rng.choice(_FIRST), rng.choice(_LAST)
                ou = building_ou(abbreviation) + GRADES[grade]
                status = 0
                if i < 40:  # in step
                    account(number, first, last, ou, school, class_of)
                    if i % 7 == 0:
                        groups["all-students@d118.org"].append(f"{number}{SUFFIX}")
                elif i < 43:  # new student: create
                    note("create", number)
                elif i == 43:  # still in last year's grade OU: move
                    account(number, first, last, building_ou(abbreviation) + GRADES[grade - 1], school, class_of)
                    note("move", number)
                elif i == 44:  # preferred name changed: rename
                    account(number, first + "ie", last, ou, school, class_of)
                    note("rename", number)
                elif i == 45:  # custom attributes never set
                    account(number, first, last, ou, school, class_of, custom=False)
                    note("attributes", number)
                elif i == 46:  # returning student: unsuspend and move back
                    account(number, first, last, SUSPENDED_OU, school, class_of, suspended=True)
                    note("unsuspend", number)
                elif i == 47:  # transferred out: suspend, after removing from groups
                    status = 2
                    account(number, first, last, ou, school, class_of)
                    groups["all-students@d118.org"].append(f"{number}{SUFFIX}")
                    groups["whs-band@d118.org"].append(f"{number}{SUFFIX}")
                    note("suspend", number)
                elif i == 48 and school == 101:  # in a frozen OU: not moved
                    account(number, first, last, frozen_ou, school, class_of)
                    note("frozen", number)
                else:  # written in capitals in PowerSchool: title-cased on create
                    first, last = first.upper(), last.upper()
                    note("create", number)
                ps.student(number, first, last, class_of, status, school, grade)
        for _ in range(8):  # last year's graduates: suspended into the graduated OU
            number += 1
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            ps.student(number, first, last, year - 1, 3, 999999, 99)
            account(number, first, last, building_ou("WHS") + "/12th", 101, year - 1)
            note("graduate", number)
        for i in range(4):  # pre-kindergarten: the building OU, no grade OU
            number += 1
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            ps.student(number, first, last, year + 14, -1 if i % 2 else 0, 901, -1)
            account(number, first, last, building_ou("ECC"), 901, year + 14)
        number += 1  # a test account: skipped
        ps.student(number, "Test", "Student", year + 5, 0, 101, 9)
        note("skipped", number)
        number += 1  # no enrollment status: reported, nothing changed
        ps.student(number, "Ivy", "Moreau", year + 3, None, 102, 7)
        note("bad data", number)
        number += 1  # two rows: the active one wins
        ps.student(number, "Theo", "Anders", year + 4, 2, 101, 9)
        ps.student(number, "Theo", "Anders", year + 4, 0, 102, 8)
        account(number, "Theo", "Anders", building_ou("LMS") + "/8th", 102, year + 4)
        note("two rows", number)
    for group, members in groups.items():
        server.add_group(group, members=members)
    return cases


# ---------------------------------------------------------------------------
# Synthetic districts of any size, for the benchmark
# ---------------------------------------------------------------------------

SYNTHETIC_SCHOOLS = 20


def build_synthetic_district(folder: Path, server: Any, students: int, *, changed_share: float = 0.0,
                             provisioned: bool = True, year: int = 2026, seed: int = 7,
                             kinds: tuple[str, ...] = ("move", "rename", "suspend")) -> Path:
    """`students` active students over SYNTHETIC_SCHOOLS schools, with accounts.

    `provisioned` False leaves every account to create; `changed_share` of the accounts
    need a change, shared equally among `kinds` (move, rename, suspend, or create: the
    account is missing).
    """
    rng = random.Random(seed)
    abbreviations = [f"S{n:02d}" for n in range(1, SYNTHETIC_SCHOOLS + 1)]
    prepare_directory(server, abbreviations)
    path = Path(folder) / "powerschool.sqlite3"
    with PowerSchool(path) as ps:
        for n, abbreviation in enumerate(abbreviations, start=1):
            ps.school(100 + n, f"School {abbreviation}", abbreviation, 0)
        rows = []
        for i in range(students):
            number = 100000 + i
            school_index = i % SYNTHETIC_SCHOOLS
            school = 101 + school_index
            grade = (i // SYNTHETIC_SCHOOLS) % 13
            class_of = year + 12 - grade
            first, last = _FIRST[i % len(_FIRST)], _LAST[(i // 7) % len(_LAST)]
            status = 0
            ou = building_ou(abbreviations[school_index]) + GRADES[grade]
            if provisioned:
                given, org_unit = first, ou
                roll = rng.random()
                kind = kinds[int(roll / changed_share * len(kinds))] if roll < changed_share else None
                if kind == "move":
                    org_unit = building_ou(abbreviations[(school_index + 1) % SYNTHETIC_SCHOOLS]) + GRADES[grade]
                elif kind == "rename":
                    given = first + "x"
                elif kind == "suspend":
                    status = 2
                if kind != "create":
                        server.add_user(f"{number}{SUFFIX}", given=given, family=last, org_unit=org_unit,
                                    custom=attributes(school, class_of))
            rows.append((number, first, last, class_of, status, school, grade))
        ps.connection.executemany(
            "INSERT INTO STUDENTS (STUDENT_NUMBER, FIRST_NAME, LAST_NAME, CLASSOF, ENROLL_STATUS, "
            "SCHOOLID, GRADE_LEVEL) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    return path
