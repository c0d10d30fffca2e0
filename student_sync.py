"""student_sync: keep Google Workspace student accounts in step with PowerSchool.

Reads the students of a scope (all buildings, the state-reporting buildings or given
building numbers) from PowerSchool's Oracle database, reads the Google directory in
bulk, plans every change as a plain value, and applies the plan through the Admin SDK
Directory API.  Meant to run unattended every night; see README.md and SPEC.md.

    python student_sync.py --all --dry-run
    python student_sync.py --building 123 --report changes.csv

Sections, top to bottom, each leaning only on the ones above it:
settings, PowerSchool, directory, plan, apply, report, command line.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import datetime as dt
import decimal
import json
import logging
import math
import os
import random
import re
import socket
import sqlite3
import sys
import threading
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

__version__ = "0.1.0"

log = logging.getLogger("student_sync")

SCRIPT_DIR = Path(__file__).resolve().parent

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_ERROR = 2
EXIT_SAFETY = 3

SCOPES = (
    "https://www.googleapis.com/auth/admin.directory.user",
    "https://www.googleapis.com/auth/admin.directory.orgunit.readonly",
    "https://www.googleapis.com/auth/admin.directory.group",
    "https://www.googleapis.com/auth/admin.directory.userschema.readonly",
)


class StopRun(Exception):
    """A condition that ends the run before (or instead of) applying changes."""

    exit_code = EXIT_ERROR


class SettingsError(StopRun):
    """The settings file is missing, unreadable or has a wrong key."""


class SourceError(StopRun):
    """PowerSchool could not be read."""


class GoogleError(StopRun):
    """Google could not be reached or refused our authorization."""


class SafetyStop(StopRun):
    """A safety limit stopped the run before any change."""

    exit_code = EXIT_SAFETY


# =============================================================================
# Settings
# =============================================================================

_REQUIRED = object()


@dataclass(frozen=True)
class PowerSchoolSettings:
    user_env: str
    password_env: str
    dsn_env: str
    sqlite: Path | None
    connect_timeout: float


@dataclass(frozen=True)
class GoogleSettings:
    domain: str
    email_suffix: str
    auth: str
    credentials_file: Path
    token_file: Path
    service_account_file: Path | None
    delegated_admin: str | None
    api_endpoint: str | None
    max_requests_per_second: float
    max_creates_per_second: float


@dataclass(frozen=True)
class AccountSettings:
    new_password_env: str
    change_password_at_next_login: bool
    graduated_school_name: str
    graduated_active_summer: bool
    no_grade_ou_schools: frozenset[int]
    remove_groups_on_suspend: bool
    bad_names: frozenset[str]


@dataclass(frozen=True)
class OuSettings:
    student_prefix: str
    building_suffix: str
    suspended: str
    graduated: str
    frozen: tuple[str, ...]
    grades: Mapping[int, str]


@dataclass(frozen=True)
class CustomSchemaSettings:
    category: str
    school_field: str
    grad_year_field: str


@dataclass(frozen=True)
class SafetySettings:
    max_suspensions: int
    max_school_drop_percent: float


@dataclass(frozen=True)
class LoggingSettings:
    dir: Path
    keep: int


@dataclass(frozen=True)
class EmailSettings:
    smtp_host: str
    smtp_port: int
    sender: str
    to: tuple[str, ...]
    user_env: str | None
    password_env: str | None
    when: str


@dataclass(frozen=True)
class Settings:
    path: Path
    powerschool: PowerSchoolSettings
    google: GoogleSettings
    accounts: AccountSettings
    ous: OuSettings
    custom_schema: CustomSchemaSettings
    safety: SafetySettings
    logging: LoggingSettings
    email: EmailSettings | None
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)


# Every key of the settings file: (kind, default).  _REQUIRED marks required keys;
# required-by-mode keys (auth, source) are checked after the table.
_SETTINGS_KEYS: dict[str, dict[str, tuple[str, Any]]] = {
    "powerschool": {
        "user_env": ("str", "POWERSCHOOL_READ_USER"),
        "password_env": ("str", "POWERSCHOOL_DB_PASSWORD"),
        "dsn_env": ("str", "POWERSCHOOL_PROD_DB"),
        "sqlite": ("str", None),
        "connect_timeout": ("positive", 30),
    },
    "google": {
        "domain": ("str", None),
        "email_suffix": ("str", _REQUIRED),
        "auth": ("str", "oauth"),
        "credentials_file": ("str", "credentials.json"),
        "token_file": ("str", "token.json"),
        "service_account_file": ("str", None),
        "delegated_admin": ("str", None),
        "api_endpoint": ("str", None),
        "max_requests_per_second": ("positive", 35),
        "max_creates_per_second": ("positive", 9),
    },
    "accounts": {
        "new_password_env": ("str", "NEW_USER_PASSWORD"),
        "change_password_at_next_login": ("bool", True),
        "graduated_school_name": ("str", "Graduated Students"),
        "graduated_active_summer": ("bool", True),
        "no_grade_ou_schools": ("int_list", [999999, 901]),
        "remove_groups_on_suspend": ("bool", True),
        "bad_names": ("str_list", ["test", "tester", "teststudent", "training1", "registration"]),
    },
    "ous": {
        "student_prefix": ("str", _REQUIRED),
        "building_suffix": ("str", " Students"),
        "suspended": ("str", _REQUIRED),
        "graduated": ("str", _REQUIRED),
        "frozen": ("str_list", ["/Restricted", "/Adobe Licensed Students"]),
        "grades": ("table", _REQUIRED),
    },
    "custom_schema": {
        "category": ("str", _REQUIRED),
        "school_field": ("str", _REQUIRED),
        "grad_year_field": ("str", _REQUIRED),
    },
    "safety": {
        "max_suspensions": ("count", 100),
        "max_school_drop_percent": ("percent", 30),
    },
    "logging": {
        "dir": ("str", "logs"),
        "keep": ("positive_int", 60),
    },
    "email": {
        "smtp_host": ("str", _REQUIRED),
        "smtp_port": ("positive_int", 587),
        "from": ("str", _REQUIRED),
        "to": ("str_list", _REQUIRED),
        "user_env": ("str", None),
        "password_env": ("str", None),
        "when": ("str", "problems"),
    },
}

_REQUIRED_SECTIONS = ("google", "ous", "custom_schema")


def _check_value(section: str, key: str, kind: str, value: Any) -> Any:
    """Return `value` checked against `kind`, or raise SettingsError naming the key."""
    where = f"[{section}] {key}"

    def wrong(expected: str) -> SettingsError:
        return SettingsError(f"settings: {where} must be {expected}, not {value!r}")

    if kind == "str":
        if not isinstance(value, str):
            raise wrong("text")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind in ("positive", "percent"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise wrong("a number above 0")
        if kind == "percent" and value > 100:
            raise wrong("a percentage from 1 to 100")
        return float(value)
    if kind in ("count", "positive_int"):
        lowest = 0 if kind == "count" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise wrong(f"a whole number of at least {lowest}")
        return value
    if kind == "str_list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of texts")
        return list(value)
    if kind == "int_list":
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise wrong("a list of whole numbers")
        return list(value)
    if kind == "table":
        if not isinstance(value, dict):
            raise wrong("a table")
        return dict(value)
    raise AssertionError(kind)


def _read_sections(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Check section and key names and value kinds; fill in defaults."""
    for section in raw:
        if section not in _SETTINGS_KEYS:
            known = ", ".join(f"[{s}]" for s in _SETTINGS_KEYS)
            raise SettingsError(f"settings: unknown section [{section}] (known: {known})")
        if not isinstance(raw[section], dict):
            raise SettingsError(f"settings: [{section}] must be a section")
    for section in _REQUIRED_SECTIONS:
        if section not in raw:
            raise SettingsError(f"settings: section [{section}] is missing")
    values: dict[str, dict[str, Any]] = {}
    for section, keys in _SETTINGS_KEYS.items():
        given = raw.get(section, {})
        if section == "email" and section not in raw:
            continue
        for key in given:
            if key not in keys:
                raise SettingsError(
                    f"settings: unknown key [{section}] {key} "
                    f"(known: {', '.join(keys)})"
                )
        values[section] = {}
        for key, (kind, default) in keys.items():
            if key in given:
                values[section][key] = _check_value(section, key, kind, given[key])
            elif default is _REQUIRED:
                raise SettingsError(f"settings: [{section}] {key} is missing")
            else:
                values[section][key] = default
    return values


def _ou_path(section: str, key: str, value: str, *, trailing_slash: bool = False) -> str:
    if not value.startswith("/"):
        raise SettingsError(f'settings: [{section}] {key}: "{value}" must start with "/"')
    if trailing_slash and not value.endswith("/"):
        raise SettingsError(f'settings: [{section}] {key}: "{value}" must end with "/"')
    if not trailing_slash and len(value) > 1 and value.endswith("/"):
        raise SettingsError(f'settings: [{section}] {key}: "{value}" must not end with "/"')
    return value


def _grades(table: Mapping[str, Any]) -> dict[int, str]:
    grades: dict[int, str] = {}
    for key, value in table.items():
        try:
            grade = int(str(key).strip())
        except ValueError:
            raise SettingsError(
                f'settings: [ous] grades: "{key}" is not a grade number (PowerSchool GRADE_LEVEL)'
            ) from None
        if not isinstance(value, str):
            raise SettingsError(f'settings: [ous] grades: "{key}" must map to an OU text, not {value!r}')
        if value:
            _ou_path("ous", f'grades "{key}"', value)
        grades[grade] = value
    return grades


def load_settings(path: Path) -> Settings:
    """Read and validate the TOML settings file; every error names its key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SettingsError(
            f"settings: file {path} not found (copy student_sync.example.toml and edit it, "
            "or pass --config FILE)"
        ) from None
    except OSError as exc:
        raise SettingsError(f"settings: cannot read {path}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"settings: {path} is not valid TOML: {exc}") from None
    return settings_from_dict(raw, path)


def settings_from_dict(raw: Mapping[str, Any], path: Path) -> Settings:
    """Build Settings from parsed TOML; relative paths are relative to `path`'s folder."""
    values = _read_sections(raw)
    base = Path(path).resolve().parent

    def local(name: str | None) -> Path | None:
        if name is None:
            return None
        candidate = Path(name)
        return candidate if candidate.is_absolute() else base / candidate

    ps, gg, ac, ou, cs = (values[s] for s in ("powerschool", "google", "accounts", "ous", "custom_schema"))

    suffix = gg["email_suffix"].strip()
    if not re.fullmatch(r"@[A-Za-z0-9.-]+\.[A-Za-z]{2,}", suffix):
        raise SettingsError(f'settings: [google] email_suffix: "{suffix}" must look like "@d118.org"')
    if gg["auth"] not in ("oauth", "service_account", "none"):
        raise SettingsError(
            f'settings: [google] auth: "{gg["auth"]}" must be "oauth", "service_account" or "none"'
        )
    if gg["auth"] == "none" and not gg["api_endpoint"]:
        raise SettingsError('settings: [google] api_endpoint is missing (needed with auth = "none")')
    if gg["auth"] == "service_account":
        for key in ("service_account_file", "delegated_admin"):
            if not gg[key]:
                raise SettingsError(f'settings: [google] {key} is missing (needed with auth = "service_account")')
    endpoint = gg["api_endpoint"]
    if endpoint is not None:
        if not re.match(r"https?://", endpoint):
            raise SettingsError(f'settings: [google] api_endpoint: "{endpoint}" must start with http:// or https://')
        endpoint = endpoint.rstrip("/") + "/"
    for key in ("category", "school_field", "grad_year_field"):
        if not cs[key].strip():
            raise SettingsError(f"settings: [custom_schema] {key} must not be empty")

    email = None
    if "email" in values:
        em = values["email"]
        if em["when"] not in ("problems", "always"):
            raise SettingsError(f'settings: [email] when: "{em["when"]}" must be "problems" or "always"')
        if not em["to"]:
            raise SettingsError("settings: [email] to must name at least one address")
        email = EmailSettings(
            smtp_host=em["smtp_host"], smtp_port=em["smtp_port"], sender=em["from"],
            to=tuple(em["to"]), user_env=em["user_env"], password_env=em["password_env"],
            when=em["when"],
        )

    return Settings(
        path=Path(path),
        powerschool=PowerSchoolSettings(
            user_env=ps["user_env"], password_env=ps["password_env"], dsn_env=ps["dsn_env"],
            sqlite=local(ps["sqlite"]), connect_timeout=ps["connect_timeout"],
        ),
        google=GoogleSettings(
            domain=(gg["domain"] or suffix[1:]).lower(),
            email_suffix=suffix.lower(),
            auth=gg["auth"],
            credentials_file=local(gg["credentials_file"]),
            token_file=local(gg["token_file"]),
            service_account_file=local(gg["service_account_file"]),
            delegated_admin=gg["delegated_admin"],
            api_endpoint=endpoint,
            max_requests_per_second=gg["max_requests_per_second"],
            max_creates_per_second=gg["max_creates_per_second"],
        ),
        accounts=AccountSettings(
            new_password_env=ac["new_password_env"],
            change_password_at_next_login=ac["change_password_at_next_login"],
            graduated_school_name=ac["graduated_school_name"].strip(),
            graduated_active_summer=ac["graduated_active_summer"],
            no_grade_ou_schools=frozenset(ac["no_grade_ou_schools"]),
            remove_groups_on_suspend=ac["remove_groups_on_suspend"],
            bad_names=frozenset(_clean_spaces(n).lower() for n in ac["bad_names"]),
        ),
        ous=OuSettings(
            student_prefix=_ou_path("ous", "student_prefix", ou["student_prefix"], trailing_slash=True),
            building_suffix=ou["building_suffix"],
            suspended=_ou_path("ous", "suspended", ou["suspended"]),
            graduated=_ou_path("ous", "graduated", ou["graduated"]),
            frozen=tuple(_ou_path("ous", "frozen", f) for f in ou["frozen"]),
            grades=MappingProxyType(_grades(ou["grades"])),
        ),
        custom_schema=CustomSchemaSettings(
            category=cs["category"].strip(), school_field=cs["school_field"].strip(),
            grad_year_field=cs["grad_year_field"].strip(),
        ),
        safety=SafetySettings(
            max_suspensions=values["safety"]["max_suspensions"],
            max_school_drop_percent=values["safety"]["max_school_drop_percent"],
        ),
        logging=LoggingSettings(dir=local(values["logging"]["dir"]), keep=values["logging"]["keep"]),
        email=email,
        raw=MappingProxyType(dict(raw)),
    )


# =============================================================================
# PowerSchool
# =============================================================================


@dataclass(frozen=True)
class School:
    number: int
    name: str
    abbreviation: str
    state_excluded: bool


@dataclass(frozen=True, slots=True)
class StudentRow:
    """One STUDENTS row as PowerSchool holds it: values are not yet checked."""

    student_number: Any
    first_name: Any
    last_name: Any
    class_of: Any
    enroll_status: Any
    school_id: Any
    grade_level: Any
    school: School | None = None


@dataclass(frozen=True)
class Scope:
    """Which schools a run covers: `kind` is "all", "state-reporting" or "building"."""

    kind: str
    school_numbers: frozenset[int]

    def describe(self) -> str:
        if self.kind == "building":
            return "building " + ", ".join(str(n) for n in sorted(self.school_numbers))
        return self.kind


_SCHOOLS_SQL = (
    "SELECT SCHOOL_NUMBER, NAME, ABBREVIATION, STATE_EXCLUDEFROMREPORTING FROM SCHOOLS"
)

# Rows of the scope's schools, plus every other row of the same students, so that a
# student's decision is weighed across the whole district (SPEC section 3).
_STUDENTS_SQL = """\
SELECT s.STUDENT_NUMBER, s.FIRST_NAME, s.LAST_NAME, s.CLASSOF, s.ENROLL_STATUS,
       s.SCHOOLID, s.GRADE_LEVEL
  FROM STUDENTS s
  LEFT JOIN SCHOOLS sc ON sc.SCHOOL_NUMBER = s.SCHOOLID
 WHERE ({scope})
    OR s.STUDENT_NUMBER IN (
       SELECT s2.STUDENT_NUMBER
         FROM STUDENTS s2
         JOIN SCHOOLS sc ON sc.SCHOOL_NUMBER = s2.SCHOOLID
        WHERE {scope})"""

_FETCH_ROWS = 5000


def read_schools(connection: Any) -> dict[int, School]:
    """All SCHOOLS rows keyed by school number."""
    cursor = connection.cursor()
    try:
        cursor.execute(_SCHOOLS_SQL)
        schools = {}
        for number, name, abbreviation, excluded in cursor.fetchall():
            number_value = _as_int(number)
            if number_value is None:
                log.warning("PowerSchool: SCHOOLS row with school number %r ignored", number)
                continue
            schools[number_value] = School(
                number=number_value,
                name=_clean_spaces(name),
                abbreviation=_clean_spaces(abbreviation),
                state_excluded=_as_int(excluded) == 1,
            )
        return schools
    finally:
        cursor.close()


def resolve_scope(kind: str, schools: Mapping[int, School], buildings: Sequence[int] = ()) -> Scope:
    """Turn a command-line scope into school numbers; an unknown building is an error."""
    if kind == "all":
        return Scope("all", frozenset(schools))
    if kind == "state-reporting":
        return Scope("state-reporting", frozenset(n for n, s in schools.items() if not s.state_excluded))
    unknown = [n for n in buildings if n not in schools]
    if unknown:
        names = ", ".join(str(n) for n in unknown)
        raise StopRun(f"unknown building number {names}: no such SCHOOL_NUMBER in PowerSchool's SCHOOLS")
    return Scope("building", frozenset(buildings))


def _scope_sql(scope: Scope) -> tuple[str, dict[str, int]]:
    """SQL condition on alias `sc` for the scope, with its bind values."""
    if scope.kind == "all":
        return "sc.SCHOOL_NUMBER IS NOT NULL", {}
    if scope.kind == "state-reporting":
        return "sc.SCHOOL_NUMBER IS NOT NULL AND COALESCE(sc.STATE_EXCLUDEFROMREPORTING, 0) = 0", {}
    numbers = sorted(scope.school_numbers)
    binds = {f"school{i}": n for i, n in enumerate(numbers)}
    if not binds:
        return "1 = 0", {}
    return "sc.SCHOOL_NUMBER IN (" + ", ".join(f":{b}" for b in binds) + ")", binds


def read_students(connection: Any, scope: Scope, schools: Mapping[int, School]) -> list[StudentRow]:
    """The rows of the scope's students (and their rows elsewhere) in one query."""
    condition, binds = _scope_sql(scope)
    cursor = connection.cursor()
    try:
        cursor.arraysize = _FETCH_ROWS
        cursor.execute(_STUDENTS_SQL.format(scope=condition), binds)
        rows = []
        while True:
            batch = cursor.fetchmany(_FETCH_ROWS)
            if not batch:
                break
            for number, first, last, class_of, status, school_id, grade in batch:
                school_number = _as_int(school_id)
                rows.append(StudentRow(
                    student_number=number, first_name=first, last_name=last, class_of=class_of,
                    enroll_status=status, school_id=school_id, grade_level=grade,
                    school=schools.get(school_number) if school_number is not None else None,
                ))
        return rows
    finally:
        cursor.close()


def connect_powerschool(settings: Settings) -> Any:
    """Open a DB-API connection: the SQLite copy when configured, else Oracle (thin mode)."""
    ps = settings.powerschool
    if ps.sqlite is not None:
        if not ps.sqlite.is_file():
            raise SourceError(f"PowerSchool: SQLite database {ps.sqlite} not found ([powerschool] sqlite)")
        try:
            return sqlite3.connect(f"{ps.sqlite.as_uri()}?mode=ro", uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            raise SourceError(f"PowerSchool: cannot open {ps.sqlite}: {exc}") from None
    names = {"user": ps.user_env, "password": ps.password_env, "dsn": ps.dsn_env}
    values = {}
    for what, variable in names.items():
        value = os.environ.get(variable, "")
        if not value:
            raise SourceError(
                f"PowerSchool: environment variable {variable} is not set "
                f"(the database {what}; named by [powerschool] {what}_env)"
            )
        values[what] = value
    return _connect_oracle(values["user"], values["password"], values["dsn"], ps.connect_timeout)


def _connect_oracle(user: str, password: str, dsn: str, timeout: float) -> Any:
    """oracledb.connect under an outer deadline: a silent listener can hang it for minutes."""
    try:
        import oracledb
    except ImportError:
        raise SourceError("PowerSchool: the oracledb package is not installed (pip install -r requirements.txt)") from None
    outcome: dict[str, Any] = {}

    def attempt() -> None:
        try:
            outcome["connection"] = oracledb.connect(
                user=user, password=password, dsn=dsn, tcp_connect_timeout=min(timeout, 20.0)
            )
        except BaseException as exc:  # handed over to the waiting thread below
            outcome["error"] = exc

    worker = threading.Thread(target=attempt, name="powerschool-connect", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise SourceError(
            f"PowerSchool: no answer from {dsn} within {timeout:g} s "
            "(is the database up? [powerschool] connect_timeout sets this limit)"
        )
    error = outcome.get("error")
    if error is None:
        return outcome["connection"]
    raise SourceError(f"PowerSchool: cannot connect to {dsn}: {_describe_db_error(error)}") from None


def _describe_db_error(error: BaseException) -> str:
    """A one-line, secret-free account of a connection failure."""
    if isinstance(error, socket.gaierror):
        return "unknown host name (check the host in the DSN)"
    first = error.args[0] if error.args else None
    code = getattr(first, "full_code", "") or ""
    if code == "ORA-01017":
        return "the database refused the user name or password (ORA-01017)"
    message = getattr(first, "message", None) or str(error) or type(error).__name__
    return message.splitlines()[0]


# =============================================================================
# Directory
# =============================================================================


@dataclass(frozen=True, slots=True)
class Account:
    """A Google account as the rules see it; `attributes` are our category's fields, as text."""

    email: str
    given_name: str
    family_name: str
    suspended: bool
    org_unit: str
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Directory:
    """The snapshot a plan is made from: accounts by lower-cased email, OUs by lower-cased path."""

    accounts: Mapping[str, Account]
    org_units: Mapping[str, str]


_USER_FIELDS = "primaryEmail,name(givenName,familyName),suspended,orgUnitPath,customSchemas"


def account_from_resource(resource: Mapping[str, Any], category: str) -> Account:
    """Read the fields the rules need from a users resource."""
    name = resource.get("name") or {}
    fields = (resource.get("customSchemas") or {}).get(category) or {}
    attributes = {}
    for key, value in fields.items():
        if isinstance(value, list):  # a multi-valued field: [{"value": ...}, ...]
            value = value[0].get("value") if value and isinstance(value[0], dict) else None
        if value is not None:
            attributes[key] = str(value)
    return Account(
        email=resource["primaryEmail"],
        given_name=name.get("givenName") or "",
        family_name=name.get("familyName") or "",
        suspended=bool(resource.get("suspended", False)),
        org_unit=resource.get("orgUnitPath") or "/",
        attributes=MappingProxyType(attributes),
    )


class DirectoryClient:
    """The Directory API: one service object, one HTTP connection per thread.

    httplib2 is not thread-safe, so requests are built from the shared service and
    executed on the calling thread's own connection.
    """

    def __init__(self, settings: Settings, credentials: Any = None):
        self.settings = settings
        self.credentials = credentials
        self._local = threading.local()
        self._lock = threading.Lock()
        self._resources: dict[str, Any] = {}

    def resource(self, name: str) -> Any:
        """`users`, `orgunits`, `groups`, `members` or `schemas` of the shared service."""
        with self._lock:
            if not self._resources:
                service = self._build()
                for each in ("users", "orgunits", "groups", "members", "schemas"):
                    self._resources[each] = getattr(service, each)()
            return self._resources[name]

    def execute(self, request: Any) -> Any:
        """Send a built request on this thread's connection."""
        return request.execute(http=self._http())

    def _http(self) -> Any:
        http = getattr(self._local, "http", None)
        if http is None:
            import httplib2

            http = httplib2.Http(timeout=60)
            if self.credentials is not None:
                import google_auth_httplib2

                http = google_auth_httplib2.AuthorizedHttp(self.credentials, http=http)
            self._local.http = http
        return http

    def _build(self) -> Any:
        from googleapiclient.discovery import build

        options = {}
        if self.settings.google.api_endpoint:
            options["api_endpoint"] = self.settings.google.api_endpoint
        return build(
            "admin", "directory_v1", http=self._http(), static_discovery=True,
            cache_discovery=False, client_options=options or None,
        )


def google_credentials(settings: Settings, *, interactive: bool = False) -> Any:
    """Credentials for the configured auth mode; None for a local endpoint ("none").

    A scheduled run never opens a browser: without a usable token it stops and says to
    run --authorize.
    """
    gg = settings.google
    if gg.auth == "none":
        return None
    from google.auth.exceptions import GoogleAuthError, RefreshError
    from google.auth.transport.requests import Request

    if gg.auth == "service_account":
        from google.oauth2 import service_account

        try:
            credentials = service_account.Credentials.from_service_account_file(
                str(gg.service_account_file), scopes=list(SCOPES)
            ).with_subject(gg.delegated_admin)
        except FileNotFoundError:
            raise GoogleError(f"Google: service account key {gg.service_account_file} not found "
                              "([google] service_account_file)") from None
        except (ValueError, KeyError, GoogleAuthError) as exc:
            raise GoogleError(f"Google: service account key {gg.service_account_file} is not usable: "
                              f"{type(exc).__name__}") from None
        try:
            credentials.refresh(Request())
        except RefreshError as exc:
            raise GoogleError(_describe_refresh_error(exc, settings)) from None
        except (OSError, GoogleAuthError) as exc:
            raise GoogleError(f"Google: cannot reach Google to authorize: {type(exc).__name__}") from None
        return credentials

    from google.oauth2.credentials import Credentials

    if interactive:
        return _authorize_interactively(settings)
    if not gg.token_file.is_file():
        raise GoogleError(f"Google: no token file {gg.token_file}: run "
                          f"'python student_sync.py --authorize' once, signed in as an administrator")
    try:
        credentials = Credentials.from_authorized_user_file(str(gg.token_file), list(SCOPES))
    except (ValueError, KeyError, json.JSONDecodeError):
        raise GoogleError(f"Google: token file {gg.token_file} is not usable: run "
                          "'python student_sync.py --authorize' again") from None
    if credentials.valid:
        return credentials
    if not credentials.refresh_token:
        raise GoogleError(f"Google: token in {gg.token_file} has expired and cannot be refreshed: run "
                          "'python student_sync.py --authorize' again")
    try:
        credentials.refresh(Request())
    except RefreshError as exc:
        raise GoogleError(_describe_refresh_error(exc, settings)) from None
    except (OSError, GoogleAuthError) as exc:
        raise GoogleError(f"Google: cannot reach Google to refresh the token: {type(exc).__name__}") from None
    _write_private(gg.token_file, credentials.to_json())
    return credentials


def _authorize_interactively(settings: Settings) -> Any:
    from google_auth_oauthlib.flow import InstalledAppFlow

    gg = settings.google
    if not gg.credentials_file.is_file():
        raise GoogleError(f"Google: OAuth client file {gg.credentials_file} not found "
                          "([google] credentials_file; see credentials.json.example and README)")
    flow = InstalledAppFlow.from_client_secrets_file(str(gg.credentials_file), list(SCOPES))
    credentials = flow.run_local_server(port=0)
    _write_private(gg.token_file, credentials.to_json())
    log.info("Google: authorized; token written to %s", gg.token_file)
    return credentials


def _describe_refresh_error(exc: Exception, settings: Settings) -> str:
    text = str(exc)
    if "unauthorized_client" in text:
        return ("Google: domain-wide delegation is not granted for this service account and these "
                "scopes (unauthorized_client): add the client ID and scopes in the Admin console, "
                "Security > API controls > Domain-wide delegation (see README)")
    if "invalid_grant" in text:
        if settings.google.auth == "service_account":
            return (f"Google: the service account could not act as {settings.google.delegated_admin} "
                    "(invalid_grant): check [google] delegated_admin and the key")
        return ("Google: the saved token has expired or been revoked (invalid_grant): run "
                "'python student_sync.py --authorize' again")
    return f"Google: authorization failed ({type(exc).__name__}): run 'python student_sync.py --authorize'"


def _write_private(path: Path, text: str) -> None:
    """Write a secret file readable by its owner only (where the platform allows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    try:
        os.chmod(temporary, 0o600)
    except OSError:
        pass
    os.replace(temporary, path)


def read_org_units(client: DirectoryClient, policy: "RetryPolicy") -> dict[str, str]:
    """Every OU of the domain: lower-cased path -> path as Google spells it."""
    request = client.resource("orgunits").list(
        customerId="my_customer", type="all", fields="organizationUnits(orgUnitPath)")
    answer = policy.call(lambda: client.execute(request))
    units = {"/": "/"}
    for unit in answer.get("organizationUnits", []) or []:
        path = unit.get("orgUnitPath")
        if path:
            units[path.lower()] = path
    return units


class _TwoEndedListing:
    """Lists the domain's users from both ends of the email order at once.

    One stream pages up from the first address, the other down from the last; they
    stop where they meet, so the whole domain is read in about half the time, with
    no search query (search results can lag writes) and no account missed.  If the
    server does not keep the order it was asked for, the ascending stream simply reads
    to the end on its own.
    """

    def __init__(self, client: DirectoryClient, settings: Settings, policy: "RetryPolicy"):
        self.client, self.settings, self.policy = client, settings, policy
        self.category = settings.custom_schema.category
        self.accounts: dict[str, Account] = {}
        self._lock = threading.Lock()
        self._highest_up: str | None = None    # last address the ascending stream has seen
        self._lowest_down: str | None = None   # last address the descending stream has seen
        self._finished = False                 # one stream read to its end: all is seen
        self._unordered = False                # the server ignored the order: no meeting point

    def read(self) -> dict[str, Account]:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="list") as pool:
            up = pool.submit(self._stream, "ASCENDING")
            down = pool.submit(self._stream, "DESCENDING")
            up.result()
            down.result()
        return self.accounts

    def _met(self) -> bool:
        if self._finished:
            return True
        if self._unordered or self._highest_up is None or self._lowest_down is None:
            return False
        return self._highest_up >= self._lowest_down

    def _stream(self, order: str) -> None:
        users = self.client.resource("users")
        request = users.list(
            domain=self.settings.google.domain, maxResults=500, projection="custom",
            customFieldMask=self.category, orderBy="email", sortOrder=order,
            fields=f"nextPageToken,users({_USER_FIELDS})",
        )
        ascending = order == "ASCENDING"
        previous: str | None = None
        while request is not None:
            with self._lock:
                if self._met() or (self._unordered and not ascending):
                    return
            answer = self.policy.call(lambda: self.client.execute(request))
            page = [account_from_resource(r, self.category)
                    for r in answer.get("users", []) or [] if r.get("primaryEmail")]
            keys = [a.email.lower() for a in page]
            if previous is not None:
                keys_in_order = [previous, *keys]
            else:
                keys_in_order = keys
            in_order = all((a < b) if ascending else (a > b) for a, b in zip(keys_in_order, keys_in_order[1:]))
            request = users.list_next(request, answer)
            with self._lock:
                for key, account in zip(keys, page):
                    self.accounts[key] = account
                if not in_order:
                    self._unordered = True
                    if not ascending:
                        return
                elif keys:
                    if ascending:
                        self._highest_up = keys[-1]
                    else:
                        self._lowest_down = keys[-1]
                if request is None and (ascending or not self._unordered):
                    self._finished = True
            if keys:
                previous = keys[-1]


def read_accounts(client: DirectoryClient, settings: Settings, policy: "RetryPolicy") -> dict[str, Account]:
    """Every account of the domain, in pages of 500, keyed by lower-cased primary email."""
    return _TwoEndedListing(client, settings, policy).read()


def read_directory(client: DirectoryClient, settings: Settings, policy: "RetryPolicy") -> Directory:
    """Accounts and OUs, read at the same time."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="orgunits") as pool:
        org_units = pool.submit(read_org_units, client, policy)
        accounts = read_accounts(client, settings, policy)
        return Directory(accounts=accounts, org_units=org_units.result())


# =============================================================================
# Plan
# =============================================================================

ERROR, WARNING, SKIP = "error", "warning", "skip"


@dataclass(frozen=True)
class Notice:
    """A per-student message: an error (the student failed), a warning, or a skip."""

    level: str
    student_number: str
    email: str
    message: str


@dataclass(frozen=True)
class Decision:
    """Where one student's account should be, weighed across all their rows."""

    student_number: int
    email: str
    first_name: str
    last_name: str
    should_be_active: bool
    graduated: bool
    target_ou: str
    attributes: Mapping[str, str]
    school_number: int


@dataclass(frozen=True)
class Change:
    """One account's change, exactly as apply will send it.

    `action` is "create", "update" or "suspend"; `before` holds the account's current
    values of the fields in `after`, which is the body of the one write call (for a
    create, without the password).  `labels` name the kinds of change for people.
    """

    student_number: int
    email: str
    action: str
    labels: tuple[str, ...]
    before: Mapping[str, Any]
    after: Mapping[str, Any]
    remove_groups: bool = False

    def describe(self) -> str:
        parts = []
        if self.action == "create":
            name = self.after["name"]
            parts.append(f"create {name['givenName']} {name['familyName']} in {self.after['orgUnitPath']}")
        for label in self.labels:
            if label == "suspend":
                parts.append("suspend" + (" (after removing from groups)" if self.remove_groups else ""))
            elif label == "unsuspend":
                parts.append("unsuspend")
            elif label == "move":
                parts.append(f"move {self.before['orgUnitPath']} -> {self.after['orgUnitPath']}")
            elif label == "rename":
                old, new = self.before["name"], self.after["name"]
                parts.append(f"rename {old['givenName']} {old['familyName']} -> "
                             f"{new['givenName']} {new['familyName']}")
            elif label == "attributes":
                old = next(iter(self.before["customSchemas"].values()))
                new = next(iter(self.after["customSchemas"].values()))
                parts.append("attributes " + ", ".join(
                    f"{k} {old.get(k) if old.get(k) is not None else '(none)'} -> {v}"
                    for k, v in new.items()))
        return "; ".join(parts)


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...]
    notices: tuple[Notice, ...]
    decisions: Mapping[str, Decision]
    unchanged: int

    def failed_students(self) -> int:
        return len({(n.student_number, n.email) for n in self.notices if n.level == ERROR})

    def suspensions(self) -> list[Change]:
        """Changes that take an account from active to suspended."""
        return [c for c in self.changes if "suspend" in c.labels]


def _clean_spaces(value: Any) -> str:
    """Text with ends trimmed and inner white space collapsed; NULL is empty."""
    if value is None:
        return ""
    return " ".join(str(value).split())


_APOSTROPHES = "'\u2019"


def normalize_name(value: Any) -> str:
    """Trim and collapse spaces; title-case a name written all in capitals or all in lower case.

    Mixed case is kept exactly (McDonald, de la Cruz).
    """
    name = _clean_spaces(value)
    if name != name.upper() and name != name.lower():
        return name
    letters = list(name.lower())
    for i, char in enumerate(letters):
        previous = letters[i - 1] if i else " "
        if previous in " -":
            letters[i] = char.upper()
        elif previous in _APOSTROPHES:
            run = 0
            while i + run < len(letters) and letters[i + run].isalpha():
                run += 1
            if run >= 2:
                letters[i] = char.upper()
    return "".join(letters)


def _as_int(value: Any) -> int | None:
    """A whole number from an int, integral float or Decimal, or numeric text; else None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, (decimal.Decimal, str, bytes)):
        text = value.decode() if isinstance(value, bytes) else str(value)
        try:
            number = decimal.Decimal(text.strip())
        except decimal.InvalidOperation:
            return None
        if not number.is_finite() or number != number.to_integral_value():
            return None
        return int(number)
    return None


def is_frozen(org_unit: str, frozen: Iterable[str]) -> bool:
    """True when a frozen path appears in `org_unit` as whole path segments."""
    segments = [s.lower() for s in org_unit.split("/") if s]
    for path in frozen:
        wanted = [s.lower() for s in path.split("/") if s]
        if not wanted:
            continue
        for start in range(len(segments) - len(wanted) + 1):
            if segments[start:start + len(wanted)] == wanted:
                return True
    return False


def email_for(student_number: int, settings: Settings) -> str:
    return f"{student_number}{settings.google.email_suffix}"


def _not_a_number(column: str, value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        return f"{column} is empty"
    return f"{column} {value!r} is not a whole number"


def _row_status(row: StudentRow, settings: Settings, today: dt.date) -> dict[str, Any]:
    """Weigh one row: graduated, active, should be active.  Raises ValueError on bad data."""
    status = _as_int(row.enroll_status)
    if status is None:
        raise ValueError(_not_a_number("ENROLL_STATUS", row.enroll_status))
    school_number = _as_int(row.school_id)
    if school_number is None:
        raise ValueError(_not_a_number("SCHOOLID", row.school_id))
    graduated_name = settings.accounts.graduated_school_name.lower()
    graduated = status == 3 or (
        row.school is not None and bool(graduated_name) and row.school.name.lower() == graduated_name
    )
    class_of = _as_int(row.class_of)
    grace = (settings.accounts.graduated_active_summer and graduated and class_of is not None
             and class_of == today.year and today.month in (6, 7, 8))
    active = status in (0, -1) and not graduated
    return {"status": status, "school_number": school_number, "graduated": graduated,
            "active": active, "should_be_active": active or grace, "class_of": class_of}


def _target_ou(row: StudentRow, weighed: Mapping[str, Any], settings: Settings) -> str:
    """The OU of SPEC section 3's table.  Raises ValueError when it cannot be named."""
    ous = settings.ous
    if weighed["graduated"]:
        return ous.graduated
    if not weighed["active"]:
        return ous.suspended
    school = row.school
    if school is None or not school.abbreviation:
        raise ValueError(f"school {weighed['school_number']} has no ABBREVIATION for its building OU")
    building = f"{ous.student_prefix}{school.abbreviation}{ous.building_suffix}"
    if weighed["status"] == -1 or weighed["school_number"] in settings.accounts.no_grade_ou_schools:
        return building
    grade = _as_int(row.grade_level)
    if grade is None:
        raise ValueError(_not_a_number("grade (GRADE_LEVEL)", row.grade_level))
    if grade not in ous.grades:
        raise ValueError(f"grade {grade} has no OU in [ous] grades")
    return building + ous.grades[grade]


def decide(rows: Sequence[StudentRow], settings: Settings, today: dt.date,
           notices: list[Notice]) -> Decision | None:
    """The district-wide decision for the rows of one student number (SPEC section 3)."""
    student_number = _as_int(rows[0].student_number)
    email = email_for(student_number, settings)
    number_text = str(student_number)

    def notice(level: str, message: str) -> None:
        notices.append(Notice(level, number_text, email, message))

    bad_names = settings.accounts.bad_names
    kept = [r for r in rows if _clean_spaces(r.first_name).lower() not in bad_names
            and _clean_spaces(r.last_name).lower() not in bad_names]
    if not kept:
        notice(SKIP, "skipped: test or placeholder name "
                     f"({_clean_spaces(rows[0].first_name)} {_clean_spaces(rows[0].last_name)})")
        return None
    weighed = []
    for row in kept:
        try:
            weighed.append((_row_status(row, settings, today), row))
        except ValueError as exc:
            notice(ERROR, f"bad PowerSchool data: {exc}; nothing changed for this student")
            return None
    if len(kept) > 1:
        schools = ", ".join(str(w["school_number"]) for w, _ in weighed)
        notice(WARNING, f"{len(kept)} PowerSchool rows for this student (schools {schools}); "
                        "an active row wins, then the lowest school number")
    status, row = min(weighed, key=lambda pair: (not pair[0]["should_be_active"], pair[0]["school_number"]))
    try:
        target_ou = _target_ou(row, status, settings)
    except ValueError as exc:
        notice(ERROR, f"bad PowerSchool data: {exc}; nothing changed for this student")
        return None
    schema = settings.custom_schema
    attributes = {schema.school_field: str(status["school_number"])}
    if status["class_of"] is not None:
        attributes[schema.grad_year_field] = str(status["class_of"])
    elif row.class_of is None:
        notice(WARNING, "CLASSOF is empty in PowerSchool: graduation year left out")
    else:
        notice(WARNING, f"CLASSOF {row.class_of!r} is not a year: graduation year left out")
    return Decision(
        student_number=student_number, email=email,
        first_name=normalize_name(row.first_name), last_name=normalize_name(row.last_name),
        should_be_active=status["should_be_active"], graduated=status["graduated"],
        target_ou=target_ou, attributes=MappingProxyType(attributes),
        school_number=status["school_number"],
    )


def _name_problem(name: str, which: str) -> str | None:
    if not name:
        return f"{which} is empty"
    if len(name) > 60:
        return f"{which} is longer than 60 characters"
    return None


def change_for(decision: Decision, account: Account | None, settings: Settings,
               org_units: Mapping[str, str], notices: list[Notice]) -> Change | None:
    """What one account needs to match its decision (rules 1-5 of SPEC section 3)."""
    number_text = str(decision.student_number)

    def notice(level: str, message: str) -> None:
        notices.append(Notice(level, number_text, decision.email, message))

    target_ou = org_units.get(decision.target_ou.lower())
    category = settings.custom_schema.category

    if account is None:
        if not decision.should_be_active or decision.graduated:
            return None  # rule 4, and no account is ever created for a graduate
        problems = [p for p in (_name_problem(decision.first_name, "first name"),
                                _name_problem(decision.last_name, "last name")) if p]
        if problems:
            notice(ERROR, f"cannot create the account: {' and '.join(problems)} in PowerSchool")
            return None
        if target_ou is None:
            notice(ERROR, f"cannot create the account: OU {decision.target_ou} does not exist in Google")
            return None
        after = {
            "primaryEmail": decision.email,
            "name": {"givenName": decision.first_name, "familyName": decision.last_name},
            "changePasswordAtNextLogin": settings.accounts.change_password_at_next_login,
            "orgUnitPath": target_ou,
            "customSchemas": {category: dict(decision.attributes)},
        }
        return Change(decision.student_number, decision.email, "create", ("create",), {}, after)

    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    labels: list[str] = []
    ou_differs = account.org_unit.lower() != decision.target_ou.lower()

    if not decision.should_be_active:
        if account.suspended and not ou_differs:
            return None
        if not account.suspended:
            labels.append("suspend")
            before["suspended"], after["suspended"] = False, True
        if ou_differs:
            labels.append("move")
            before["orgUnitPath"], after["orgUnitPath"] = account.org_unit, target_ou
        if target_ou is None:
            notice(ERROR, f"not suspended: OU {decision.target_ou} does not exist in Google")
            return None
        remove_groups = not account.suspended and settings.accounts.remove_groups_on_suspend
        return Change(decision.student_number, account.email, "suspend", tuple(labels),
                      before, after, remove_groups=remove_groups)

    if account.suspended:
        labels.append("unsuspend")
        before["suspended"], after["suspended"] = True, False
    if ou_differs:
        if is_frozen(account.org_unit, settings.ous.frozen):
            notice(WARNING, f"left in frozen OU {account.org_unit} (would move to {decision.target_ou})")
        elif target_ou is None:
            notice(ERROR, f"not changed: OU {decision.target_ou} does not exist in Google")
            return None
        else:
            labels.append("move")
            before["orgUnitPath"], after["orgUnitPath"] = account.org_unit, target_ou
    if (decision.first_name.casefold() != account.given_name.casefold()
            or decision.last_name.casefold() != account.family_name.casefold()):
        problems = [p for p in (_name_problem(decision.first_name, "first name"),
                                _name_problem(decision.last_name, "last name")) if p]
        if problems:
            notice(WARNING, f"name kept as {account.given_name} {account.family_name} in Google: "
                            f"{' and '.join(problems)} in PowerSchool")
        else:
            labels.append("rename")
            before["name"] = {"givenName": account.given_name, "familyName": account.family_name}
            after["name"] = {"givenName": decision.first_name, "familyName": decision.last_name}
    if any(account.attributes.get(k) != v for k, v in decision.attributes.items()):
        labels.append("attributes")
        before["customSchemas"] = {category: {k: account.attributes.get(k) for k in decision.attributes}}
        after["customSchemas"] = {category: dict(decision.attributes)}
    if not labels:
        return None
    return Change(decision.student_number, account.email, "update", tuple(labels), before, after)


def plan(rows: Iterable[StudentRow], directory: Directory, settings: Settings,
         today: dt.date, scope: Scope) -> Plan:
    """Every change the scope needs, as a value.  No I/O, no clock, no environment."""
    notices: list[Notice] = []
    by_number: dict[int, list[StudentRow]] = {}
    for row in rows:
        number = _as_int(row.student_number)
        in_scope = row.school is not None and row.school.number in scope.school_numbers
        if number is None or number <= 0:
            if in_scope:
                who = f"{_clean_spaces(row.first_name)} {_clean_spaces(row.last_name)}".strip() or "(no name)"
                notices.append(Notice(ERROR, _clean_spaces(row.student_number) or "(none)", "",
                                      f"bad PowerSchool data: STUDENT_NUMBER {row.student_number!r} "
                                      f"for {who} at school {row.school.number}; nothing changed"))
            continue
        by_number.setdefault(number, []).append(row)

    decisions: dict[str, Decision] = {}
    changes: list[Change] = []
    unchanged = 0
    for number in sorted(by_number):
        student_rows = by_number[number]
        if not any(r.school is not None and r.school.number in scope.school_numbers for r in student_rows):
            continue
        # Rows whose SCHOOLID names no school belong to no scope and are not weighed,
        # but a NULL or non-numeric SCHOOLID is bad data for the student.
        weighable = [r for r in student_rows if r.school is not None or _as_int(r.school_id) is None]
        decision = decide(weighable, settings, today, notices)
        if decision is None:
            continue
        decisions[decision.email.lower()] = decision
        account = directory.accounts.get(decision.email.lower())
        errors_before = sum(n.level == ERROR for n in notices)
        change = change_for(decision, account, settings, directory.org_units, notices)
        if change is not None:
            changes.append(change)
        elif sum(n.level == ERROR for n in notices) == errors_before:
            unchanged += 1
    return Plan(changes=tuple(changes), notices=tuple(notices),
                decisions=MappingProxyType(decisions), unchanged=unchanged)


# =============================================================================
# Apply
# =============================================================================

_RATE_REASONS = {"rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded"}


def _http_error_parts(exc: Exception) -> tuple[int, str, str]:
    """(status, reason, message) of an HttpError, whatever its body looked like."""
    status = getattr(exc, "status_code", None) or getattr(getattr(exc, "resp", None), "status", 0) or 0
    details = getattr(exc, "error_details", "")
    reason = ""
    if isinstance(details, list) and details and isinstance(details[0], dict):
        reason = details[0].get("reason", "") or ""
        message = details[0].get("message") or getattr(exc, "reason", "") or ""
    elif isinstance(details, str) and details.strip():
        text = re.sub(r"<[^>]+>", " ", details)
        message = " ".join(text.split())[:120] or "(empty answer)"
        if details.lstrip().startswith("<"):
            message = f"non-JSON answer: {message}"
    else:
        message = getattr(exc, "reason", "") or ""
    return int(status), reason, str(message)


def describe_http_error(exc: Exception) -> str:
    status, reason, message = _http_error_parts(exc)
    return f"HTTP {status}" + (f" {reason}" if reason else "") + (f": {message}" if message else "")


def is_retryable(exc: BaseException) -> bool:
    """429, 5xx, 403 rate-limit reasons, and dropped connections are worth another try."""
    from googleapiclient.errors import HttpError

    if isinstance(exc, HttpError):
        status, reason, _ = _http_error_parts(exc)
        return status == 429 or status >= 500 or (status == 403 and reason in _RATE_REASONS)
    return isinstance(exc, (ConnectionError, TimeoutError))


class RateLimiter:
    """Spaces calls so that no more than `rate` start in any second (thread-safe)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 1.0 / rate
        self._clock, self._sleep = clock, sleep
        self._next = -math.inf
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter, as Google advises: 2**n s + up to 1 s, n = 0, 1, 2..."""

    attempts: int = 6
    refused_attempts: int = 2
    max_delay: float = 32.0
    sleep: Callable[[float], None] = time.sleep
    jitter: Callable[[], float] = random.random
    limiter: RateLimiter | None = None

    def delay(self, retry: int) -> float:
        return min(2.0 ** retry, self.max_delay) + self.jitter()

    def call(self, request: Callable[[], Any], *, limiters: Sequence[RateLimiter] = ()) -> Any:
        """Run `request`, retrying what is worth retrying; the last error propagates.

        A refused connection is tried only `refused_attempts` times: it rarely heals in
        a minute, and a wrong endpoint should fail fast.
        """
        for attempt in range(self.attempts):
            for limiter in ((self.limiter,) if self.limiter else ()) + tuple(limiters):
                limiter.acquire()
            try:
                return request()
            except Exception as exc:
                last = self.refused_attempts if isinstance(exc, ConnectionRefusedError) else self.attempts
                if attempt + 1 >= last or not is_retryable(exc):
                    raise
                wait = self.delay(attempt)
                log.debug("retrying in %.1f s after %s", wait,
                          describe_http_error(exc) if hasattr(exc, "resp") else type(exc).__name__)
                self.sleep(wait)
        raise AssertionError("unreachable")


@dataclass
class Outcome:
    change: Change
    result: str  # "applied", "failed: <reason>", "planned"
    groups_removed: int = 0
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.result == "applied"


class Applier:
    """Executes a plan's changes through the Directory API."""

    def __init__(self, client: DirectoryClient, settings: Settings, directory: Directory,
                 decisions: Mapping[str, Decision], password: str | None,
                 policy: RetryPolicy, creates: RateLimiter, workers: int = 8):
        self.client, self.settings, self.directory = client, settings, directory
        self.decisions, self._password = decisions, password
        self.policy, self.creates, self.workers = policy, creates, workers
        self.authorization_lost: str | None = None

    def apply(self, changes: Sequence[Change], progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(changes)
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.workers,
                                                   thread_name_prefix="apply") as pool:
            futures = {pool.submit(self.apply_one, change): i for i, change in enumerate(changes)}
            for future in concurrent.futures.as_completed(futures):
                outcome = future.result()
                outcomes[futures[future]] = outcome
                if progress:
                    progress(outcome)
        return [o for o in outcomes if o is not None]

    def apply_one(self, change: Change) -> Outcome:
        """Apply one change; every failure becomes the change's outcome."""
        from google.auth.exceptions import RefreshError
        from googleapiclient.errors import HttpError

        if self.authorization_lost is not None:
            return Outcome(change, "failed: not attempted, Google authorization was lost")
        try:
            if change.action == "create":
                return self._create(change)
            if change.action == "suspend":
                return self._suspend(change)
            self._update(change.email, change.after)
            return Outcome(change, "applied")
        except HttpError as exc:
            return Outcome(change, f"failed: {describe_http_error(exc)}")
        except RefreshError as exc:
            # Nothing after this can succeed: stop the others too.
            self.authorization_lost = _describe_refresh_error(exc, self.settings)
            return Outcome(change, "failed: Google authorization was lost")
        except OSError as exc:
            return Outcome(change, f"failed: connection error ({type(exc).__name__})")

    def _update(self, email: str, body: Mapping[str, Any]) -> None:
        request = self.client.resource("users").update(userKey=email, body=dict(body), fields="primaryEmail")
        self.policy.call(lambda: self.client.execute(request))

    def _create(self, change: Change) -> Outcome:
        from googleapiclient.errors import HttpError

        users = self.client.resource("users")
        insert = users.insert(body=dict(change.after, password=self._password), fields="primaryEmail")
        try:
            self.policy.call(lambda: self.client.execute(insert), limiters=(self.creates,))
            return Outcome(change, "applied")
        except HttpError as exc:
            if _http_error_parts(exc)[0] != 409:
                raise
        # 409: the address exists after all (perhaps our own earlier try whose answer was
        # lost).  Read it and bring it in step by rule 2.
        get = users.get(userKey=change.email, projection="custom",
                        customFieldMask=self.settings.custom_schema.category, fields=_USER_FIELDS)
        resource = self.policy.call(lambda: self.client.execute(get))
        account = account_from_resource(resource, self.settings.custom_schema.category)
        notices: list[Notice] = []
        decision = self.decisions[change.email.lower()]
        follow_up = change_for(decision, account, self.settings, self.directory.org_units, notices)
        for notice in notices:
            _log_notice(notice)
        if follow_up is None:
            return Outcome(change, "applied", note="account already existed and was in step")
        if follow_up.action == "suspend":  # cannot happen for a should-be-active decision
            return Outcome(change, "failed: account exists and would be suspended")
        self._update(follow_up.email, follow_up.after)
        return Outcome(change, "applied", note=f"account already existed: {follow_up.describe()}")

    def _suspend(self, change: Change) -> Outcome:
        from googleapiclient.errors import HttpError

        removed = 0
        if change.remove_groups:
            # Groups go first: if a removal fails the account stays active, and the next
            # run, seeing it active, removes and suspends again.
            members = self.client.resource("members")
            for group in self._groups_of(change.email):
                delete = members.delete(groupKey=group, memberKey=change.email)
                try:
                    self.policy.call(lambda: self.client.execute(delete))
                    removed += 1
                except HttpError as exc:
                    if _http_error_parts(exc)[0] == 404:
                        continue  # already gone
                    return Outcome(change, f"failed: removing from group {group}: "
                                           f"{describe_http_error(exc)}; not suspended", removed)
        self._update(change.email, change.after)
        return Outcome(change, "applied", removed)

    def _groups_of(self, email: str) -> list[str]:
        groups_api = self.client.resource("groups")
        request = groups_api.list(userKey=email, maxResults=200, fields="nextPageToken,groups(email)")
        groups = []
        while request is not None:
            answer = self.policy.call(lambda: self.client.execute(request))
            groups.extend(g["email"] for g in answer.get("groups", []) or [] if g.get("email"))
            request = groups_api.list_next(request, answer)
        return groups


# =============================================================================
# Report
# =============================================================================


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname}: {text}"
        return text


def setup_logging(verbosity: int) -> logging.Handler:
    """Console logging: -q warnings only, default info, -v debug."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_ConsoleFormatter())
    handler.setLevel(level)
    log.handlers = [h for h in log.handlers if getattr(h, "_student_sync", False) is False]
    handler._student_sync = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    return handler


def open_run_log(settings: Settings, started: dt.datetime) -> tuple[logging.Handler | None, Path | None]:
    """A timestamped log file per run in the logs folder; the oldest beyond `keep` are removed."""
    folder = settings.logging.dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"student_sync-{started:%Y%m%d-%H%M%S}-{os.getpid()}.log"
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write a log file in %s: %s", folder, exc.strerror)
        return None, None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    handler.setLevel(logging.DEBUG)
    handler._student_sync = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    old = sorted(folder.glob("student_sync-*.log"))
    for stale in old[:-settings.logging.keep] if len(old) > settings.logging.keep else []:
        try:
            stale.unlink()
        except OSError:
            pass
    return handler, path


def _log_notice(notice: Notice) -> None:
    who = notice.student_number + (f" ({notice.email})" if notice.email else "")
    level = {ERROR: logging.ERROR, WARNING: logging.WARNING}.get(notice.level, logging.INFO)
    log.log(level, "student %s: %s", who, notice.message)


def write_report(path: Path, plan_: Plan, outcomes: Sequence[Outcome]) -> None:
    """CSV, one row per change with its outcome, plus errors, warnings and skips."""
    with open(path, "w", encoding="utf-8-sig", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["student_number", "email", "action", "detail", "result"])
        for outcome in outcomes:
            change = outcome.change
            detail = change.describe() + (f" ({outcome.note})" if outcome.note else "")
            if outcome.groups_removed:
                detail += f"; removed from {outcome.groups_removed} group(s)"
            writer.writerow([change.student_number, change.email, "+".join(change.labels),
                             detail, outcome.result])
        for notice in plan_.notices:
            result = "failed: " + notice.message if notice.level == ERROR else notice.level
            writer.writerow([notice.student_number, notice.email, notice.level, notice.message, result])


def summarize(plan_: Plan, outcomes: Sequence[Outcome], dry_run: bool, seconds: float) -> tuple[str, int]:
    """The end-of-run summary text and the number of failed students."""
    counts: Counter[str] = Counter()
    for outcome in outcomes:
        if outcome.ok or dry_run:
            counts.update(outcome.change.labels)
            counts["group removals"] += outcome.groups_removed
    failed_changes = [o for o in outcomes if not o.ok and not dry_run]
    failures = plan_.failed_students() + len(failed_changes)
    notice_counts = Counter(n.level for n in plan_.notices)
    verb = "planned" if dry_run else "done"
    order = [("create", "creates"), ("move", "moves"), ("rename", "renames"),
             ("attributes", "attribute updates"), ("unsuspend", "unsuspends"),
             ("suspend", "suspends"), ("group removals", "group removals")]
    parts = [f"{counts[key]} {label}" for key, label in order]
    text = (f"summary ({verb}): " + ", ".join(parts)
            + f"; {plan_.unchanged} already in step, {notice_counts[SKIP]} skipped, "
            f"{notice_counts[WARNING]} warnings, {failures} failed; {seconds:.1f} s")
    return text, failures


# =============================================================================
# Command line
# =============================================================================


def _parse_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2026-09-01") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="student_sync.py",
        description="Keep Google Workspace student accounts in step with PowerSchool.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--all", action="store_true", help="every building")
    scope.add_argument("--state-reporting", action="store_true",
                       help="buildings not excluded from state reporting")
    scope.add_argument("--building", type=int, nargs="+", metavar="N", help="these building numbers")
    parser.add_argument("--config", type=Path, default=SCRIPT_DIR / "student_sync.toml",
                        metavar="FILE", help="settings file (default: student_sync.toml beside the script)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    parser.add_argument("--report", type=Path, metavar="FILE", help="write every change and its outcome as CSV")
    parser.add_argument("--as-of", type=_parse_date, metavar="YYYY-MM-DD",
                        help="evaluate date rules (summer grace) as of this date")
    parser.add_argument("--allow-mass-changes", action="store_true",
                        help="let this one run go past the [safety] limits")
    parser.add_argument("--authorize", action="store_true",
                        help="sign in to Google once in a browser and save the token")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more output")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return parser


def _scope_kind(args: argparse.Namespace) -> str | None:
    if args.all:
        return "all"
    if args.state_reporting:
        return "state-reporting"
    if args.building:
        return "building"
    return None


def _new_account_password(settings: Settings, changes: Sequence[Change], dry_run: bool) -> str | None:
    """The new-account password, checked when the run would create accounts."""
    if not any(c.action == "create" for c in changes):
        return None
    variable = settings.accounts.new_password_env
    password = os.environ.get(variable, "")
    problem = None
    if not password:
        problem = f"environment variable {variable} (the new-account password) is not set"
    elif len(password) < 8:
        problem = f"the new-account password in {variable} is shorter than 8 characters"
    elif len(password) > 100:
        problem = f"the new-account password in {variable} is longer than 100 characters"
    if problem:
        if dry_run:
            log.warning("%s: a real run would stop here", problem)
            return None
        raise StopRun(f"{problem}; accounts to create: {sum(c.action == 'create' for c in changes)}")
    return password


def _check_safety(plan_: Plan, rows: Sequence[StudentRow], scope: Scope,
                  settings: Settings, allow: bool) -> None:
    if not rows and scope.school_numbers:
        raise SafetyStop(
            f"PowerSchool returned no students for {scope.describe()} "
            f"({len(scope.school_numbers)} school(s)): stopping rather than suspending everyone. "
            "Check the database; if this is really so, run again with --allow-mass-changes")
    suspensions = plan_.suspensions()
    limit = settings.safety.max_suspensions
    if len(suspensions) > limit and not allow:
        by_school: Counter[str] = Counter()
        for change in suspensions:
            decision = plan_.decisions.get(change.email.lower())
            by_school[str(decision.school_number) if decision else "?"] += 1
        where = ", ".join(f"school {s}: {n}" for s, n in sorted(by_school.items()))
        raise SafetyStop(
            f"this run would suspend {len(suspensions)} accounts, more than [safety] max_suspensions "
            f"= {limit} ({where}); nothing was changed. Review with --dry-run --report FILE; if it is "
            "right (for example graduates on September 1), run again with --allow-mass-changes")


class RunLock:
    """One run at a time per logs folder.

    An operating-system lock on a file: the system releases it when the holder ends, so
    a run that crashed or was killed never blocks the next night's run.
    """

    _OFFSET = 1 << 20  # Windows locks byte ranges: lock one far from the holder's note

    def __init__(self, path: Path):
        self.path = path
        self._file: Any = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(self.path, "a+", encoding="utf-8")
        try:
            self._lock(stream)
        except OSError:
            stream.seek(0)
            holder = stream.read(500).strip() or "unknown"
            stream.close()
            raise StopRun(f"another student_sync run holds {self.path} ({holder}); "
                          "this run stops without changing anything") from None
        stream.seek(0)
        stream.truncate()
        stream.write(f"pid {os.getpid()} on {socket.gethostname()}, started {dt.datetime.now():%Y-%m-%d %H:%M:%S}")
        stream.flush()
        self._file = stream

    def release(self) -> None:
        if self._file is None:
            return
        try:
            self._file.seek(0)
            self._file.truncate()
            self._unlock(self._file)
        finally:
            self._file.close()
            self._file = None

    def _lock(self, stream: Any) -> None:
        if os.name == "nt":
            import msvcrt

            stream.seek(self._OFFSET)
            msvcrt.locking(stream.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(self, stream: Any) -> None:
        if os.name == "nt":
            import msvcrt

            stream.seek(self._OFFSET)
            msvcrt.locking(stream.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(stream.fileno(), fcntl.LOCK_UN)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _run_authorize(settings: Settings) -> int:
    if settings.google.auth != "oauth":
        log.error('--authorize is for [google] auth = "oauth"; this settings file uses "%s"',
                  settings.google.auth)
        return EXIT_ERROR
    google_credentials(settings, interactive=True)
    return EXIT_OK


def run(args: argparse.Namespace, settings: Settings) -> int:
    """One sync run; raises StopRun for conditions that end it early."""
    started = time.monotonic()
    today = args.as_of or dt.date.today()
    kind = _scope_kind(args)

    connection = connect_powerschool(settings)
    try:
        try:
            schools = read_schools(connection)
            scope = resolve_scope(kind, schools, args.building or ())
            rows = read_students(connection, scope, schools)
        except StopRun:
            raise
        except Exception as exc:  # any DB-API driver's error class
            if not _is_db_error(exc):
                raise
            raise SourceError(f"PowerSchool: query failed: {_describe_db_error(exc)}") from None
    finally:
        connection.close()
    log.info("PowerSchool: %d rows for %s (%d schools)", len(rows), scope.describe(), len(scope.school_numbers))

    credentials = google_credentials(settings)
    client = DirectoryClient(settings, credentials)
    limiter = RateLimiter(settings.google.max_requests_per_second)
    policy = RetryPolicy(limiter=limiter)
    directory = _read_directory_or_stop(client, settings, policy)
    log.info("Google: %d accounts, %d OUs in %s", len(directory.accounts), len(directory.org_units),
             settings.google.domain)

    plan_ = plan(rows, directory, settings, today, scope)
    for notice in plan_.notices:
        _log_notice(notice)
    _check_safety(plan_, rows, scope, settings, args.allow_mass_changes)
    password = _new_account_password(settings, plan_.changes, args.dry_run)

    if args.dry_run:
        for change in plan_.changes:
            log.info("would %s: %s (%s)", "+".join(change.labels), change.email, change.describe())
        outcomes = [Outcome(c, "planned") for c in plan_.changes]
    else:
        applier = Applier(client, settings, directory, plan_.decisions, password, policy,
                          RateLimiter(settings.google.max_creates_per_second))
        outcomes = applier.apply(plan_.changes, progress=_log_outcome)
        if applier.authorization_lost:
            log.error("%s", applier.authorization_lost)

    if args.report:
        write_report(args.report, plan_, outcomes)
        log.info("report written to %s", args.report)
    text, failures = summarize(plan_, outcomes, args.dry_run, time.monotonic() - started)
    log.info("%s", text)
    return EXIT_FAILURES if failures else EXIT_OK


def _is_db_error(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.Error) or type(exc).__module__.startswith("oracledb")


def _read_directory_or_stop(client: DirectoryClient, settings: Settings, policy: RetryPolicy) -> Directory:
    from googleapiclient.errors import HttpError
    from google.auth.exceptions import RefreshError

    try:
        return read_directory(client, settings, policy)
    except HttpError as exc:
        raise GoogleError(f"Google: cannot read the directory of {settings.google.domain}: "
                          f"{describe_http_error(exc)}") from None
    except RefreshError as exc:
        raise GoogleError(_describe_refresh_error(exc, settings)) from None
    except OSError as exc:
        where = settings.google.api_endpoint or "Google"
        raise GoogleError(f"Google: cannot reach {where}: {type(exc).__name__}") from None


def _log_outcome(outcome: Outcome) -> None:
    change = outcome.change
    text = f"{'+'.join(change.labels)} {change.email}: {change.describe()}"
    if outcome.note:
        text += f" ({outcome.note})"
    if outcome.groups_removed:
        text += f"; removed from {outcome.groups_removed} group(s)"
    if outcome.ok:
        log.info("%s", text)
    else:
        log.error("student %s: %s %s", change.student_number, text, outcome.result)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    try:
        settings = load_settings(args.config)
    except StopRun as exc:
        log.error("%s", exc)
        return exc.exit_code
    if args.authorize:
        try:
            return _run_authorize(settings)
        except StopRun as exc:
            log.error("%s", exc)
            return exc.exit_code
    if _scope_kind(args) is None:
        build_parser().print_usage(sys.stderr)
        log.error("choose a scope: --all, --state-reporting or --building N [N ...]")
        return EXIT_ERROR
    started = dt.datetime.now()
    handler, log_path = open_run_log(settings, started)
    try:
        log.debug("student_sync %s, settings %s, arguments %s", __version__, settings.path,
                  " ".join(argv if argv is not None else sys.argv[1:]))
        if args.dry_run:
            return run(args, settings)
        with RunLock(settings.logging.dir / "student_sync.lock"):
            return run(args, settings)
    except StopRun as exc:
        log.error("%s", exc)
        return exc.exit_code
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


if __name__ == "__main__":
    sys.exit(main())
