"""student_sync: keep Google Workspace student accounts in step with PowerSchool.

Reads the students of a scope (all buildings, the state-reporting buildings or given
building numbers) from PowerSchool's Oracle database, reads the Google directory in
bulk, plans every change as a plain value, and applies the plan through the Admin SDK
Directory API.  Meant to run unattended every night; see README.md and SPEC.md.

    python student_sync.py --all --dry-run
    python student_sync.py --building 123 --report changes.csv

Sections, top to bottom, each using only names from itself and the ones above it
(tests/test_layout.py checks this):

  Prelude: exit codes, the exceptions that stop a run, helpers for text, numbers, hosts
  Settings: the TOML file as frozen records, every key checked at load
  PowerSchool: school and student rows, the scope, the two queries, the connection
  PowerSchool API: the same tables through PowerSchool's plugin REST API (hosted districts)
  Google: credentials, errors, rate limit and retries, the client, the directory read
  Plan: SPEC section 3's rules as pure functions, from rows and accounts to changes
  Safety rules: when a plan must not be applied without --allow-mass-changes (pure)
  Apply: executes a plan's changes, one outcome each; decides nothing
  Run files: plan files, the journal and undo, school counts, the run lock, the log file
  Report: log lines, the CSV report, the summary, progress, the summary email
  Runs: sync, apply a reviewed plan, undo, check; each reads top to bottom
  Command line: options and main(), which turns every ending into an exit code
"""

from __future__ import annotations

import sys

if sys.version_info[:2] < (3, 11):  # before tomllib and the rest: say so instead of a traceback
    _TOO_OLD = (f"Python 3.11 or newer is needed (this is Python {sys.version_info[0]}.{sys.version_info[1]}): "
                "install it from python.org and run student_sync with it, in a virtual environment (see README)")
    if __name__ != "__main__":  # imported: the importer hears why
        raise ImportError(_TOO_OLD)
    sys.stderr.write(_TOO_OLD + "\n")
    raise SystemExit(2)

import argparse
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import datetime as dt
import decimal
import functools
import hashlib
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import threading
import time
import tomllib
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit


# =============================================================================
# Prelude
# =============================================================================
# Used by every section below: the version, the logger, exit codes, the exceptions that
# end a run (each carries its exit code), and small helpers for text, numbers, addresses
# and hosts.

__version__ = "0.1.0"

log = logging.getLogger("student_sync")

SCRIPT_DIR = Path(__file__).resolve().parent

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_ERROR = 2
EXIT_SAFETY = 3
EXIT_INTERRUPTED = 130   # Ctrl-C, as shells report a program ended by SIGINT

# Windows is the tool's usual home.  Every platform choice reads this one flag (never
# os.name inline), so that the tests run the Windows branches on Linux too.
WINDOWS = os.name == "nt"


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


def account_name() -> str:
    """The operating-system account this process runs as, written as an administrator
    would grant it rights (`D118\\svc-studentsync` on Windows)."""
    if WINDOWS and os.environ.get("USERNAME"):
        domain = os.environ.get("USERDOMAIN")
        return f"{domain}\\{os.environ['USERNAME']}" if domain else os.environ["USERNAME"]
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError, ImportError):  # an account with no name (a bare container)
        return f"user id {os.getuid()}" if hasattr(os, "getuid") else "this account"


def cannot_write(what: str, path: Path, exc: OSError) -> str:
    """The message for a file or folder this account may not write: what, where, as whom,
    and what to do about it."""
    reason = exc.strerror or type(exc).__name__
    where = path if what.endswith("folder") else path.parent
    fix = (f"give that account Modify rights on {where} (README: Windows Task Scheduler, icacls)" if WINDOWS
           else f"give that account write permission on {where} and the file")
    return f"cannot write {what} {path} as {account_name()} ({reason}): {fix}"


# Files that hold student names and numbers (logs, journals, plans, reports, state files) are
# created readable by this account only, and so is a folder the tool makes for them.  On Windows
# a mode bit cannot say that: a file takes its folder's access list, so the logs folder's
# permissions are what protect them there.
_OWNER_ONLY_FILE = 0o600
_OWNER_ONLY_FOLDER = 0o700


def owner_only(path: str | os.PathLike, flags: int) -> int:
    """An opener for open(): a file it creates is this account's only (POSIX); a file that
    exists keeps its permissions."""
    return os.open(path, flags, 0o666 if WINDOWS else _OWNER_ONLY_FILE)


def make_folder(path: Path) -> None:
    """Create the folder (and its parents) if missing; the folder itself this account's only
    (POSIX).  A folder that exists keeps its permissions."""
    Path(path).mkdir(mode=0o777 if WINDOWS else _OWNER_ONLY_FOLDER, parents=True, exist_ok=True)


def write_atomically(path: Path, text: str, *, private: bool = False, attempts: int = 5) -> str | None:
    """Replace the file at `path` with `text`, whole or not at all.

    The text goes into a uniquely named temporary file in the same folder, is flushed to
    the disk, then replaces the old file in one step: a full disk, a killed run or a
    refused replace leaves the old file as it was and no temporary file behind.  Windows
    refuses a replace while another program (a virus scanner, a backup) has the file open,
    so a refused replace is tried again a few times.

    A new file is readable by this account only (mode 0600, as the temporary file is from
    the start); a file that exists keeps its mode.  `private`: readable by this account
    only even when it was not (on Windows an access list of this account, Administrators and
    SYSTEM, set before the file takes its place).  Returns a warning when the file could not
    be made private; raises OSError when it could not be written.
    """
    import tempfile

    path = Path(path)
    make_folder(path.parent)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temporary = Path(name)
    warning = None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        if private:
            warning = _make_private(temporary)
        elif not WINDOWS and path.exists():  # mkstemp's 0600 would hide a shared file from its other readers
            os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
        _replace(temporary, path, attempts)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return warning


def _replace(source: Path, target: Path, attempts: int) -> None:
    """os.replace, tried again after a short wait while Windows says the file is in use."""
    for attempt in range(attempts):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2 ** attempt)


def _make_private(path: Path) -> str | None:
    """Make `path` readable by this account only; a warning when that could not be done.

    On Windows a mode bit cannot do it (0o600 only clears read-only), and a file inherits
    its folder's access list, which often lets every user read: the file gets its own list
    instead, without inheritance.  Administrators and SYSTEM are named by SID, which does not
    depend on the language Windows is installed in.
    """
    if not WINDOWS:
        os.chmod(path, 0o600)
        return None
    icacls = os.path.join(os.environ.get("SystemRoot", r"C:\Windows"), "System32", "icacls.exe")
    command = [icacls, str(path), "/inheritance:r", "/grant:r", f"{account_name()}:F",
               "*S-1-5-32-544:F", "*S-1-5-18:F"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"icacls could not be run ({type(exc).__name__})"
    if done.returncode != 0:
        said = " ".join((done.stdout + " " + done.stderr).split())[:200]
        return f"icacls answered {done.returncode}" + (f": {said}" if said else "")
    return None


def try_writing(path: Path, *, folder: bool = False,
                private: bool = False) -> tuple[OSError | None, str | None]:
    """Can this account write the file (or `folder`) at `path` the way a run will?
    Returns (the refusal, a warning when files there cannot be made private).

    Found by writing, not by asking: os.access ignores Windows access lists.  A file that
    exists is opened for appending (which changes nothing in it); then a file is written
    and replaced in the folder, as write_atomically does, and removed.
    """
    where = path if folder else path.parent
    try:
        make_folder(where)
        if not folder and path.exists() and not path.is_dir():
            with open(path, "a", encoding="utf-8"):
                pass
        probe = where / f".student_sync-probe-{os.getpid()}-{threading.get_ident()}"
        try:
            warning = write_atomically(probe, "", private=private, attempts=1)
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as exc:
        return exc, None
    return None, warning


SECRET_SERVICE = "student_sync"  # the credential store's service name for every secret


@dataclass(frozen=True)
class Secret:
    """A secret named by a settings `*_env` key, and where it was found."""

    name: str
    value: str = field(repr=False)
    source: str = ""     # "environment" or "credential store"; empty when found nowhere
    problem: str = ""    # why the credential store could not be asked, when it could not

    def missing(self, what: str) -> str:
        """What to say when it was found nowhere: never a value, always what to do."""
        return f"{self.name} ({what}) is not set: {self.nowhere()}"

    def nowhere(self) -> str:
        why = f" ({self.problem})" if self.problem else ""
        return (f"not in the environment, not in the credential store{why}; set the variable, or run: "
                f"python student_sync.py --store-secret {self.name}")


def read_secret(name: str) -> Secret:
    """The secret from the environment variable `name` or, when that is not set, from the
    operating system's credential store (service student_sync, user `name`).

    keyring is imported only here, when a variable is not set: it takes a while to find
    its backend, and most runs never need it.
    """
    value = os.environ.get(name, "")
    if value:
        return Secret(name, value, "environment")
    try:
        import keyring
    except ImportError:
        return Secret(name, "", problem="the keyring package is not installed: pip install -r requirements.txt")
    try:
        stored = keyring.get_password(SECRET_SERVICE, name)
    except Exception as exc:  # each backend fails its own way: NoKeyringError, a locked store, D-Bus
        return Secret(name, "", problem=f"the credential store cannot be read: {_keyring_error(exc)}")
    return Secret(name, stored, "credential store") if stored else Secret(name, "")


def _keyring_error(exc: BaseException, secret: str = "") -> str:
    """A keyring failure in one line, the secret (if one was being stored) masked out."""
    text = " ".join(str(exc).split())[:300] or "no detail"
    if secret:
        text = text.replace(secret, "***")
    return f"{type(exc).__name__}: {text}"


def _clean_spaces(value: Any) -> str:
    """Text with ends trimmed and inner white space collapsed, without control or format
    characters (NUL, BEL, zero-width spaces: Unicode Cc and Cf); NULL is empty."""
    if value is None:
        return ""
    text = str(value)
    if not text.isprintable():  # the rare name that needs a closer look
        text = "".join(c for c in text if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf"))
    return " ".join(text.split())


# Python turns text of more digits than this into a number only by raising ValueError (its
# guard against slow conversions, 4300 digits); no real column holds that many.
_LONGEST_DIGIT_TEXT = 4000


def _digit_text(text: str) -> bool:
    """Is `text` ASCII digits, perhaps after a minus, and short enough for int(text)?"""
    digits = text[1:] if text[:1] == "-" else text
    return digits.isascii() and digits.isdigit() and len(digits) <= _LONGEST_DIGIT_TEXT


def _whole_number(value: Any) -> int | None:
    """A whole number from an int, integral float or finite integral Decimal; else None
    (a bool, text or anything else is not a number here)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, decimal.Decimal):
        return (int(value) if value.is_finite() and value.adjusted() < _LONGEST_DIGIT_TEXT  # not 1e5000
                and value == value.to_integral_value() else None)
    return None


def _as_int(value: Any) -> int | None:
    """A whole number from an int, integral float or Decimal, or numeric ASCII text; else None."""
    if isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        if _digit_text(text):  # the usual "12345" or "-1", without Decimal's cost
            return int(text)
        if len(text) > _LONGEST_DIGIT_TEXT:  # no number: a corrupt value, bad data for its row
            return None
        if not text.isascii():  # Decimal reads other scripts' digits (Arabic-Indic 101); the SQL does not
            return None
        try:
            value = decimal.Decimal(text.strip())
        except decimal.InvalidOperation:
            return None
    return _whole_number(value)


def as_student_number(value: Any) -> int | None:
    """A STUDENT_NUMBER: text of digits only, or an integral number (Oracle's NUMBER as int,
    float or Decimal); anything else (`5e5`, `+500008`, ` 500007 `) is None."""
    if isinstance(value, str):
        return int(value) if _digit_text(value) and value[:1] != "-" else None
    return _whole_number(value)


def _key(email: str) -> str:
    """The lower-cased address, reusing the string when it is lower-case already."""
    lowered = email.lower()
    return email if lowered == email else lowered


def _is_loopback(host: str) -> bool:
    """Is `host` this machine: localhost, 127.x.x.x or ::1 (brackets allowed)?"""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# =============================================================================
# Settings
# =============================================================================
# The TOML settings file as frozen records: every key checked once, at load, against one
# table of keys; an error names its section and key.

_REQUIRED = object()


@dataclass(frozen=True)
class PowerSchoolSettings:
    user_env: str
    password_env: str
    dsn_env: str
    sqlite: Path | None
    connect_timeout: float
    source: str = "oracle"                 # "oracle" | "api" | "sqlite"
    url: str | None = None                 # the PowerSchool server, for source = "api"
    client_id_env: str = "POWERSCHOOL_CLIENT_ID"
    client_secret_env: str = "POWERSCHOOL_CLIENT_SECRET"
    max_requests_per_second: float = 10.0


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
class LicenseSettings:
    """[licenses]: the Google Workspace licence that follows the students (SPEC 8)."""

    product_id: str
    sku_id: str
    assign: bool
    release_graduated: bool
    release_suspended: bool
    max_releases: int
    customer_id: str | None


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
    licenses: LicenseSettings | None = None

    @property
    def instance(self) -> str:
        """A short name for this settings file, for the files of the logs folder that belong
        to one district's runs (lock, school counts): several settings files can share a
        logs folder without sharing those."""
        return settings_mark(self.path)


def settings_mark(path: Path) -> str:
    """The mark of the settings file at `path` (Settings.instance): its whole path, any case."""
    return hashlib.sha256(str(Path(path).resolve()).lower().encode()).hexdigest()[:8]


# Every key of the settings file: (kind, default).  _REQUIRED marks required keys;
# required-by-mode keys (auth, source) are checked after the table.
_SETTINGS_KEYS: dict[str, dict[str, tuple[str, Any]]] = {
    "powerschool": {
        "user_env": ("str", "POWERSCHOOL_READ_USER"),
        "password_env": ("str", "POWERSCHOOL_DB_PASSWORD"),
        "dsn_env": ("str", "POWERSCHOOL_PROD_DB"),
        "sqlite": ("str", None),
        "connect_timeout": ("positive", 30),
        "source": ("str", None),
        "url": ("str", None),
        "client_id_env": ("str", "POWERSCHOOL_CLIENT_ID"),
        "client_secret_env": ("str", "POWERSCHOOL_CLIENT_SECRET"),
        "max_requests_per_second": ("positive", 10),
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
    "licenses": {
        "product_id": ("str", "101031"),       # Google Workspace for Education
        "sku_id": ("str", "1010310008"),       # Education Plus (Student)
        "assign": ("bool", False),
        "release_graduated": ("bool", True),
        "release_suspended": ("bool", True),
        "max_releases": ("count", 100),
        "customer_id": ("str", None),
    },
}

# Sections that may be left out altogether (their required keys are required only when
# the section is there).
_OPTIONAL_SECTIONS = ("email", "licenses")

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
        if section in _OPTIONAL_SECTIONS and section not in raw:
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
    if not table:
        raise SettingsError('settings: [ous] grades is empty: map each PowerSchool GRADE_LEVEL to its OU '
                            '("9" = "/9th"; "" for the building OU itself)')
    grades: dict[int, str] = {}
    written: dict[int, str] = {}  # grade -> its key as the file spells it
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
        if grade in written:
            raise SettingsError(f'settings: [ous] grades: "{written[grade]}" and "{key}" are both grade {grade}: '
                                "keep one")
        written[grade] = str(key)
        grades[grade] = value
    return grades


def load_settings(path: Path) -> Settings:
    """Read and validate the TOML settings file; every error names its key."""
    path = Path(path)
    try:
        text = _settings_text(path)
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
        hint = ""
        if "\\" in text:  # the usual cause on Windows: "C:\Users\..." in double quotes
            hint = (' (in a "..." text a backslash starts an escape: write Windows paths with forward '
                    "slashes, \"C:/Users/...\", or in single quotes, 'C:\\Users\\...')")
        raise SettingsError(f"settings: {path} is not valid TOML: {exc}{hint}") from None
    return settings_from_dict(raw, path)


def _settings_text(path: Path) -> str:
    """The settings file's text: UTF-8, with or without a byte-order mark; anything else is refused
    (Notepad's "ANSI" and "Unicode" are the usual mistakes)."""
    data = path.read_bytes()
    save_as = "save it as UTF-8 (Notepad: File > Save As, Encoding: UTF-8)"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        raise SettingsError(f'settings: {path} is saved as UTF-16 (Notepad\'s "Unicode"): {save_as}')
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SettingsError(f"settings: {path} is not UTF-8 (line {line}; saved as \"ANSI\" or another "
                            f"code page?): {save_as}") from None


# Settings that name files or folders: a control character in one is a backslash escape
# that TOML read in a Windows path ("D:\new" is D:, a line break, "ew").
_PATH_KEYS = (("powerschool", "sqlite"), ("google", "credentials_file"), ("google", "token_file"),
              ("google", "service_account_file"), ("logging", "dir"))


def _warn_control_characters(values: Mapping[str, Mapping[str, Any]]) -> None:
    for section, key in _PATH_KEYS:
        value = values.get(section, {}).get(key)
        if isinstance(value, str) and any(unicodedata.category(c) == "Cc" for c in value):
            shown = value.encode("unicode_escape").decode("ascii")
            log.warning('settings: [%s] %s: "%s" holds a control character (a line break or tab): in a '
                        'TOML "..." text a backslash starts an escape; write Windows paths with forward '
                        "slashes (\"D:/folder/file\") or in single quotes ('D:\\folder\\file')",
                        section, key, shown)


def settings_from_dict(raw: Mapping[str, Any], path: Path) -> Settings:
    """Build Settings from parsed TOML.

    Relative paths are relative to the settings file's folder, except the logs folder,
    which is relative to the script's.
    """
    values = _read_sections(raw)
    _warn_control_characters(values)
    base = Path(path).resolve().parent
    # Checked in this order, so that the first wrong key reported stays the same.
    google = _google_settings(values["google"], base)
    custom_schema = _custom_schema_settings(values["custom_schema"])
    email = _email_settings(values["email"]) if "email" in values else None
    licenses = _license_settings(values["licenses"]) if "licenses" in values else None
    return Settings(
        path=Path(path),
        powerschool=_powerschool_settings(values["powerschool"], base),
        google=google,
        accounts=_account_settings(values["accounts"]),
        ous=_ou_settings(values["ous"]),
        custom_schema=custom_schema,
        safety=SafetySettings(**values["safety"]),
        # The logs stay beside the script (SPEC 5), wherever the settings file is.
        logging=LoggingSettings(dir=SCRIPT_DIR / values["logging"]["dir"], keep=values["logging"]["keep"]),
        email=email,
        licenses=licenses,
    )


def _local_path(name: str | None, base: Path) -> Path | None:
    """A path from the settings file: relative ones are relative to its folder."""
    if name is None:
        return None
    candidate = Path(name)
    return candidate if candidate.is_absolute() else base / candidate


_SOURCES = ("oracle", "api", "sqlite")


_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _variable_name(section: str, key: str, name: str | None) -> None:
    """An `*_env` key names an environment variable: an empty name is an error (a run would
    otherwise say "is not set ... --store-secret " with no name to set), and so is one that
    is no variable's name -- most likely the secret itself pasted in, which every message
    naming the variable would then carry into the log (SPEC 5), so it is never quoted."""
    if name is not None and not _VARIABLE_NAME.fullmatch(name.strip()):
        raise SettingsError(f"settings: [{section}] {key} must name an environment variable (letters, digits "
                            "and _, like NEW_USER_PASSWORD), not hold the secret itself; its value is not "
                            "shown here. Put the secret in that variable, or in the credential store with "
                            "--store-secret NAME")


def _powerschool_settings(ps: Mapping[str, Any], base: Path) -> PowerSchoolSettings:
    """[powerschool]: the source (SPEC 5 and 9) and the keys it needs.  A given `sqlite` path
    implies source = "sqlite" unless a source is named."""
    sqlite_path = _local_path(ps["sqlite"], base)
    source = ps["source"] if ps["source"] is not None else ("sqlite" if sqlite_path else "oracle")
    if source not in _SOURCES:
        raise SettingsError(f'settings: [powerschool] source: "{source}" must be "oracle", "api" or "sqlite"')
    # A key of another source is a contradiction, never silently ignored: an uncommented
    # `sqlite = ...` under `source = "oracle"` would otherwise go on reading Oracle.
    for key, used_by in (("sqlite", "sqlite"), ("url", "api")):
        if ps[key] is not None and source != used_by:
            chosen = f'source = "{source}"' if ps["source"] is not None else f'source (default "{source}")'
            raise SettingsError(
                f'settings: [powerschool] {key} is not used with [powerschool] {chosen}: set '
                f'source = "{used_by}" to read {"that SQLite copy" if key == "sqlite" else "that server"}, '
                f"or remove {key}")
    if source == "sqlite" and sqlite_path is None:
        raise SettingsError('settings: [powerschool] sqlite is missing (needed with source = "sqlite")')
    url = ps["url"]
    if source == "api":
        if not url or not url.strip():
            raise SettingsError('settings: [powerschool] url is missing (needed with source = "api": the '
                                'PowerSchool server, e.g. "https://ps.d118.org")')
        url = url.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(f'settings: [powerschool] url: "{url}" must look like "https://ps.d118.org"')
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise SettingsError(f'settings: [powerschool] url: "{url}" would carry the plugin\'s client secret '
                                "and tokens unencrypted: use https://")
    for key in ("user_env", "password_env", "dsn_env", "client_id_env", "client_secret_env"):
        _variable_name("powerschool", key, ps[key])
    return PowerSchoolSettings(
        user_env=ps["user_env"].strip(), password_env=ps["password_env"].strip(), dsn_env=ps["dsn_env"].strip(),
        sqlite=sqlite_path, connect_timeout=ps["connect_timeout"], source=source, url=url,
        client_id_env=ps["client_id_env"].strip(), client_secret_env=ps["client_secret_env"].strip(),
        max_requests_per_second=ps["max_requests_per_second"],
    )


def _google_settings(gg: Mapping[str, Any], base: Path) -> GoogleSettings:
    suffix = gg["email_suffix"].strip()
    if not re.fullmatch(r"@[A-Za-z0-9.-]+\.[A-Za-z]{2,}", suffix):
        raise SettingsError(f'settings: [google] email_suffix: "{suffix}" must look like "@d118.org"')
    suffix_domain = suffix[1:].lower()
    domain = gg["domain"].strip().lower() if gg["domain"] else ""
    if domain and domain != suffix_domain:
        # users.list(domain=) lists the accounts of that one domain: the students' accounts
        # would never be seen, every student would look new and no one would be suspended.
        raise SettingsError(
            f'settings: [google] domain "{domain}" is not the domain of [google] email_suffix "{suffix}": '
            f"the accounts of {suffix_domain} would never be read. Set domain = \"{suffix_domain}\" "
            "(or leave it out), or correct email_suffix")
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
    return GoogleSettings(
        domain=domain or suffix_domain,
        email_suffix=suffix.lower(),
        auth=gg["auth"],
        credentials_file=_local_path(gg["credentials_file"], base),
        token_file=_local_path(gg["token_file"], base),
        service_account_file=_local_path(gg["service_account_file"], base),
        delegated_admin=gg["delegated_admin"],
        api_endpoint=_api_endpoint(gg["api_endpoint"], gg["auth"]),
        max_requests_per_second=gg["max_requests_per_second"],
        max_creates_per_second=gg["max_creates_per_second"],
    )


def _api_endpoint(endpoint: str | None, auth: str) -> str | None:
    """The endpoint with one trailing slash; tokens are never sent unencrypted off this machine."""
    if endpoint is None:
        return None
    if not re.match(r"https?://", endpoint):
        raise SettingsError(f'settings: [google] api_endpoint: "{endpoint}" must start with http:// or https://')
    try:
        host = urlsplit(endpoint).hostname or ""
    except ValueError:  # a malformed address is no loopback one
        host = ""
    if auth != "none" and endpoint.startswith("http://") and not _is_loopback(host):
        raise SettingsError(f'settings: [google] api_endpoint: "{endpoint}" would carry Google tokens '
                            "unencrypted: use https://")
    return endpoint.rstrip("/") + "/"


def _account_settings(ac: Mapping[str, Any]) -> AccountSettings:
    _variable_name("accounts", "new_password_env", ac["new_password_env"])
    return AccountSettings(
        new_password_env=ac["new_password_env"].strip(),
        change_password_at_next_login=ac["change_password_at_next_login"],
        # Spaced as PowerSchool's school names are read (trimmed, inner spaces collapsed),
        # so that a doubled space in either never makes graduates look enrolled.
        graduated_school_name=_clean_spaces(ac["graduated_school_name"]),
        graduated_active_summer=ac["graduated_active_summer"],
        no_grade_ou_schools=frozenset(ac["no_grade_ou_schools"]),
        remove_groups_on_suspend=ac["remove_groups_on_suspend"],
        bad_names=frozenset(_clean_spaces(n).lower() for n in ac["bad_names"]),
    )


def _ou_settings(ou: Mapping[str, Any]) -> OuSettings:
    return OuSettings(
        student_prefix=_ou_path("ous", "student_prefix", ou["student_prefix"], trailing_slash=True),
        building_suffix=ou["building_suffix"],
        suspended=_ou_path("ous", "suspended", ou["suspended"]),
        graduated=_ou_path("ous", "graduated", ou["graduated"]),
        frozen=tuple(_ou_path("ous", "frozen", f) for f in ou["frozen"]),
        grades=MappingProxyType(_grades(ou["grades"])),
    )


def _custom_schema_settings(cs: Mapping[str, Any]) -> CustomSchemaSettings:
    for key in ("category", "school_field", "grad_year_field"):
        if not cs[key].strip():
            raise SettingsError(f"settings: [custom_schema] {key} must not be empty")
    return CustomSchemaSettings(category=cs["category"].strip(), school_field=cs["school_field"].strip(),
                                grad_year_field=cs["grad_year_field"].strip())


def _license_settings(li: Mapping[str, Any]) -> LicenseSettings:
    for key in ("product_id", "sku_id"):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", li[key].strip()):
            raise SettingsError(f'settings: [licenses] {key}: "{li[key]}" must be a product or SKU ID '
                                'like "101031" or "1010310008" (see README, Licences)')
    customer = li["customer_id"]
    if customer is not None and not re.fullmatch(r"C[0-9A-Za-z]{4,}", customer.strip()):
        raise SettingsError(f'settings: [licenses] customer_id: "{customer}" must look like "C01abcde2" '
                            "(Admin console > Account settings > Customer ID), or be left out")
    return LicenseSettings(
        product_id=li["product_id"].strip(), sku_id=li["sku_id"].strip(), assign=li["assign"],
        release_graduated=li["release_graduated"], release_suspended=li["release_suspended"],
        max_releases=li["max_releases"], customer_id=customer.strip() if customer else None,
    )


def _email_settings(em: Mapping[str, Any]) -> EmailSettings:
    if em["when"] not in ("problems", "always"):
        raise SettingsError(f'settings: [email] when: "{em["when"]}" must be "problems" or "always"')
    if not em["to"]:
        raise SettingsError("settings: [email] to must name at least one address")
    for key in ("user_env", "password_env"):
        _variable_name("email", key, em[key])
    return EmailSettings(
        smtp_host=em["smtp_host"], smtp_port=em["smtp_port"], sender=em["from"], to=tuple(em["to"]),
        user_env=em["user_env"].strip() if em["user_env"] else None,
        password_env=em["password_env"].strip() if em["password_env"] else None,
        when=em["when"],
    )


# =============================================================================
# PowerSchool
# =============================================================================
# School and student rows as PowerSchool holds them, the scope of a run, and the two
# queries that read them from any DB-API connection (Oracle, or a SQLite copy).


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

# A SQLite copy keeps each value as it was written (no column types): one student's rows
# can hold "0500801" beside 500801, which the query above would not match, although the
# rules read both as student 500801.  Oracle's STUDENT_NUMBER is a NUMBER, so there the
# match is the rules' own.  On a SQLite copy the same query reads this view instead (a
# temporary view named like the table is found before it), which gives digit-only text
# the number Oracle would hold and leaves every other value as written.  Only up to 18
# digits: SQLite's CAST turns longer text into 9223372036854775807, one number for many
# students; the rules read such text exactly.
_SQLITE_STUDENTS_VIEW = """\
CREATE TEMP VIEW IF NOT EXISTS STUDENTS AS
SELECT CASE WHEN typeof(STUDENT_NUMBER) = 'text' AND STUDENT_NUMBER <> ''
             AND STUDENT_NUMBER NOT GLOB '*[^0-9]*' AND length(ltrim(STUDENT_NUMBER, '0')) <= 18
            THEN CAST(STUDENT_NUMBER AS INTEGER) ELSE STUDENT_NUMBER END AS STUDENT_NUMBER,
       FIRST_NAME, LAST_NAME, CLASSOF, ENROLL_STATUS, SCHOOLID, GRADE_LEVEL
  FROM main.STUDENTS"""

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
                state_excluded=excluded_from_reporting(excluded),
            )
        return schools
    finally:
        cursor.close()


def excluded_from_reporting(value: Any) -> bool:
    """STATE_EXCLUDEFROMREPORTING as the state-reporting SQL weighs it (`COALESCE(..., 0) = 0`
    is included): NULL and 0 include the school, any other value (2, "Y") excludes it, so that
    the scope's schools and the rows read for them agree, whatever the source."""
    return value is not None and _as_int(value) != 0


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
    """The rows of the scope's students (and their rows elsewhere) in one query, the same
    SQL text for Oracle and a SQLite copy (see _SQLITE_STUDENTS_VIEW)."""
    condition, binds = _scope_sql(scope)
    cursor = connection.cursor()
    try:
        if isinstance(connection, sqlite3.Connection):
            cursor.execute(_SQLITE_STUDENTS_VIEW)
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


def students_of_scope(rows: Sequence[StudentRow], scope: Scope) -> list[StudentRow]:
    """The rows at the scope's schools, and every other row of the same students: a student
    is one student number, as the rules read it, however each row spells it."""
    in_scope = [r.school is not None and r.school.number in scope.school_numbers for r in rows]
    numbers = {as_student_number(r.student_number) for r, inside in zip(rows, in_scope) if inside} - {None}
    return [r for r, inside in zip(rows, in_scope) if inside or as_student_number(r.student_number) in numbers]


def connect_powerschool(settings: Settings) -> Any:
    """Open a DB-API connection: the SQLite copy when configured, else Oracle (thin mode)."""
    ps = settings.powerschool
    if ps.source == "sqlite" and ps.sqlite is not None:
        if not ps.sqlite.is_file():
            raise SourceError(f"PowerSchool: SQLite database {ps.sqlite} not found ([powerschool] sqlite)")
        try:
            return sqlite3.connect(f"{ps.sqlite.as_uri()}?mode=ro", uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            raise SourceError(f"PowerSchool: cannot open {ps.sqlite}: {exc}") from None
    names = {"user": ps.user_env, "password": ps.password_env, "dsn": ps.dsn_env}
    values = {}
    for what, variable in names.items():
        secret = read_secret(variable)
        if not secret.value:
            raise SourceError("PowerSchool: " + secret.missing(f"the database {what}; named by [powerschool] {what}_env"))
        values[what] = secret.value
    dsn, embedded = _dsn_without_credentials(values["dsn"])
    if embedded:
        # The old script's habit: user/password@host:port/service.  The password stays out of
        # every message, and the connection uses the variables meant for the secrets.
        log.warning("PowerSchool: the DSN in %s carries a user name and password (%s); they are not used: "
                    "the user and password come from %s and %s. Keep only host:port/service in %s",
                    ps.dsn_env, mask_dsn(values["dsn"]), ps.user_env, ps.password_env, ps.dsn_env)
    try:
        return _connect_oracle(values["user"], values["password"], dsn, ps.connect_timeout)
    except SourceError as exc:
        raise SourceError(_without(str(exc), [values["password"], *embedded])) from None


_DSN_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):([^@]*)@")


def _dsn_without_credentials(dsn: str) -> tuple[str, list[str]]:
    """The DSN without a `user/password@` (or `scheme://user:password@`) part, and the
    passwords that part held."""
    url = _DSN_URL_CREDENTIALS.match(dsn)
    if url:
        return url.group(1).split("://")[0] + "://" + dsn[url.end():], [url.group(2)]
    at, slash = dsn.rfind("@"), dsn.find("/")
    if at > 0 and 0 <= slash < at:
        return dsn[at + 1:], [dsn[slash + 1:at]]
    return dsn, []


def mask_dsn(dsn: str) -> str:
    """The DSN as it may be shown: a password in it becomes `***`
    (`scott/tiger@db:1521/PS` -> `scott/***@db:1521/PS`)."""
    url = _DSN_URL_CREDENTIALS.match(dsn)
    if url:
        return f"{url.group(1)}:***@{dsn[url.end():]}"
    at, slash = dsn.rfind("@"), dsn.find("/")
    if at > 0 and 0 <= slash < at:
        return f"{dsn[:slash]}/***{dsn[at:]}"
    return dsn


def _without(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret in it replaced by `***` (a driver's message may quote one)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


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
            f"PowerSchool: no answer from {mask_dsn(dsn)} within {timeout:g} s "
            "(is the database up? [powerschool] connect_timeout sets this limit)"
        )
    error = outcome.get("error")
    if error is None:
        return outcome["connection"]
    raise SourceError(f"PowerSchool: cannot connect to {mask_dsn(dsn)}: {_describe_db_error(error)}") from None


def _describe_db_error(error: BaseException) -> str:
    """A one-line, secret-free account of a connection failure."""
    if isinstance(error, socket.gaierror):
        return "unknown host name (check the host in the DSN)"
    first = error.args[0] if error.args else None
    code = getattr(first, "full_code", "") or ""
    if code == "ORA-01017":
        return "the database refused the user name or password (ORA-01017)"
    message = getattr(first, "message", None) or str(error) or type(error).__name__
    lines = message.splitlines()
    text = re.sub(r"\s*\(CONNECTION_ID=[^)]*\)", "", lines[0]).rstrip(".")
    cause = next((line for line in lines[1:] if "Errno" in line or "refused" in line.lower()), "")
    if "refused" in cause.lower():
        text += ": connection refused (is the database listener up, and the port right?)"
    elif cause:
        text += f": {cause.strip()}"
    return text


def _is_db_error(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.Error) or type(exc).__module__.startswith("oracledb")


# =============================================================================
# PowerSchool API
# =============================================================================
# The same two tables through PowerSchool's plugin REST API (SPEC section 9), for districts
# whose hosted PowerSchool offers no database connection: a client-credentials token, the
# metadata's page size, each table read whole in pages (count first, an explicit projection,
# a stable sort on the key), every value turned back from text, and the scope applied here,
# with the same district-wide weighing as the SQL.  A read that does not add up to the count
# is repeated once and is then an error: a short read must never look like students leaving.

_API_TABLES: dict[str, tuple[str, ...]] = {
    "schools": ("school_number", "name", "abbreviation", "state_excludefromreporting"),
    "students": ("student_number", "first_name", "last_name", "classof", "enroll_status",
                 "schoolid", "grade_level"),
}
_API_TEXT_COLUMNS = frozenset({"name", "abbreviation", "first_name", "last_name"})
_API_SORT = "id"                 # unique in both tables: a stable order from page to page
_API_DEFAULT_PAGE_SIZE = 100     # when the metadata does not say
_API_ATTEMPTS = 5                # tries of one request through 5xx and network errors
_API_MAX_WAITS = 30              # 429 answers one request may wait through
_API_MAX_RETRY_AFTER = 300.0     # seconds; a longer Retry-After is an error
_API_WORKERS = 4                 # pages in flight at once, under max_requests_per_second


class _Pacer:
    """Requests start evenly spaced, across threads, a little wider than 1/rate seconds, so
    that the server, whose arrivals jitter, never sees more than `rate` in a second.

    A 429 (PowerSchool's minimum interval between a plugin's requests) holds every thread
    back for the Retry-After, including those already waiting for a slot, and widens the
    spacing, so that a server stricter than the settings is met after a few refusals."""

    SLACK = 0.05
    WIDEST = 5.0      # seconds between requests, at most, however often the server refuses

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = (1.0 + self.SLACK) / rate
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._held_until = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                start = max(now, self._next, self._held_until)
                self._next = start + self.interval
            if start > now:
                self._sleep(start - now)
            with self._lock:
                if self._held_until <= start:
                    return
            # held back while waiting for this slot: take a new one after the hold

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._held_until = max(self._held_until, self._clock() + seconds)
            self.interval = min(self.interval * 1.5, max(self.interval, self.WIDEST))


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        pass
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())


def _api_value(column: str, value: Any) -> Any:
    """A column's value as the database holds it: the API sends text ("12345", "-1"); an
    empty text is NULL (Oracle keeps no '' apart from NULL)."""
    if value == "":
        return None
    if value is None or column in _API_TEXT_COLUMNS or not isinstance(value, str):
        return value
    if column == "student_number":
        # Read as the rules read STUDENT_NUMBER text (as_student_number: digits only; a
        # NUMBER column's "-5" too): " 12345", "1e3" or "12345.0" stay text, a bad number
        # for that row, never a row of another student.
        return int(value) if _digit_text(value) else value
    number = _as_int(value)
    return number if number is not None else value


def _missing_field(body: Any, text: str, table: str, columns: Iterable[str]) -> str | None:
    """The "TABLE.COLUMN" a 403 names, however the answer words it: errors[].field (a bare
    column or TABLE.COLUMN), else a TABLE.COLUMN or "field X" in the messages, else a
    requested column that the messages mention."""
    def qualified(name: str) -> str:
        owner, _, column = name.strip().strip("'\"").rpartition(".")
        return f"{(owner or table).upper()}.{column.upper()}"

    errors = body.get("errors") if isinstance(body, dict) else None
    errors = [errors] if isinstance(errors, dict) else errors if isinstance(errors, list) else []
    errors = [e for e in errors if isinstance(e, dict)]
    for error in errors:
        for key in ("field", "column", "fieldName"):
            if isinstance(error.get(key), str) and error[key].strip():
                return qualified(error[key])
    texts = [text] + [" ".join(str(e.get(k) or "") for k in ("message", "code")) for e in errors]
    known = set(columns) | set(_API_TABLES.get(table, ())) | {"id", "dcid"}
    for words in texts:
        match = re.search(rf"(?<![A-Za-z0-9_])({'|'.join(_API_TABLES)})\.([A-Za-z0-9_]+)", words, re.IGNORECASE)
        if match:
            return qualified(match.group(0))
        match = re.search(r"\bfields?\b\W{0,3}([A-Za-z0-9_]+)", words, re.IGNORECASE)
        if match and match.group(1).lower() in known:
            return qualified(match.group(1))
    for column in sorted(columns, key=len, reverse=True):
        if any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(column)}(?![A-Za-z0-9_])", words, re.IGNORECASE)
               for words in texts):
            return qualified(column)
    return None


class _ApiForbidden(SourceError):
    """A 403 from PowerSchool's API: the plugin lacks a column (or the API altogether)."""


class PowerSchoolApi:
    """One PowerSchool server's plugin API: token, paced and retried GETs, whole-table reads.

    Secrets stay inside: messages name the environment variables, never their values.
    """

    def __init__(self, settings: Settings, client_id: str, client_secret: str):
        import requests

        self._requests = requests
        ps = settings.powerschool
        self.url = ps.url or ""
        self.variables = f"{ps.client_id_env} and {ps.client_secret_env}"
        self.timeout = (ps.connect_timeout, max(60.0, ps.connect_timeout))
        self.rate = ps.max_requests_per_second
        self._credentials = (client_id, client_secret)
        self._pacer = _Pacer(self.rate)
        self._local = threading.local()
        self._sessions: list[Any] = []
        self._token: str | None = None
        self._token_path = "/oauth/access_token"
        self._tokens_seen: set[str] = set()     # never quoted back from an error answer
        self._expires_at: float | None = None
        self._token_lock = threading.Lock()
        self._renew_lock = threading.Lock()
        self.renewals = 0
        self.requests = 0
        self.page_size = _API_DEFAULT_PAGE_SIZE
        self.version = ""
        self.metadata_read = False   # the url answered as PowerSchool's API

    # connection --------------------------------------------------------------------------
    def open(self) -> "PowerSchoolApi":
        """The token and the metadata (page size, version): a wrong url or refused
        credentials stop here."""
        self._new_token()
        metadata = self.get("/ws/v1/metadata", {}, what="the API metadata")
        self.metadata_read = True
        inner = metadata.get("metadata", metadata) if isinstance(metadata, dict) else {}
        size = _as_int(inner.get("schema_table_query_max_page_size")) if isinstance(inner, dict) else None
        if size is not None and size > 0:
            self.page_size = size
        else:
            log.warning("PowerSchool: the API metadata has no schema_table_query_max_page_size; "
                        "reading pages of %d", self.page_size)
        self.version = str(inner.get("powerschool_version") or "") if isinstance(inner, dict) else ""
        return self

    def close(self) -> None:
        for session in self._sessions:
            session.close()

    def __enter__(self) -> "PowerSchoolApi":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _session(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._requests.Session()
            session.headers["Accept"] = "application/json"
            self._local.session = session
            with self._token_lock:
                self._sessions.append(session)
        return session

    def _unreachable(self, exc: Exception) -> SourceError:
        text = str(exc).lower()
        if isinstance(exc, self._requests.exceptions.SSLError):
            kind = "its certificate is not trusted by this machine"
        elif isinstance(exc, self._requests.Timeout):
            kind = "no answer in time"
        elif "refused" in text:
            kind = "connection refused"
        elif any(word in text for word in ("resolve", "getaddrinfo", "name or service", "nodename")):
            kind = "unknown host name"
        else:
            kind = type(exc).__name__
        return SourceError(f"PowerSchool: cannot reach {self.url} ({kind}): is [powerschool] url the "
                           "PowerSchool server's address, and is it up?")

    def _new_token(self) -> None:
        """POST /oauth/access_token with the plugin's client ID and secret (HTTP Basic)."""
        for attempt in range(_API_ATTEMPTS):
            url = self.url + self._token_path
            self._pacer.wait()
            self._count_request()
            try:
                answer = self._session().post(
                    url, auth=self._credentials, data={"grant_type": "client_credentials"},
                    headers={"Content-Type": "application/x-www-form-urlencoded;charset=UTF-8"},
                    timeout=self.timeout)
            except self._requests.RequestException as exc:
                if attempt + 1 >= (2 if "refused" in str(exc).lower() else _API_ATTEMPTS):
                    raise self._unreachable(exc) from None
                time.sleep(self._backoff(attempt))
                continue
            if answer.status_code == 404 and self._token_path == "/oauth/access_token":
                # PowerSchool's pages write the endpoint with and without its final slash; a
                # server may route only the other spelling.
                self._token_path = "/oauth/access_token/"
                continue
            if answer.status_code >= 500 or answer.status_code == 429:
                if attempt + 1 < _API_ATTEMPTS:
                    time.sleep(self._asked_wait(answer, "/oauth/access_token") or self._backoff(attempt))
                    continue
            break
        refused = (f"check the environment variables {self.variables} (copy them again from the plugin's "
                   "Data Configuration page in PowerSchool; is the plugin enabled?)")
        if answer.status_code in (400, 401, 403):
            raise SourceError(f"PowerSchool refused the plugin's client ID and secret (HTTP "
                              f"{answer.status_code}: {self._message(answer)}): {refused}")
        body = self._json(answer, self._token_path, "a token")
        token = body.get("access_token") if isinstance(body, dict) else None
        if isinstance(body, dict) and body.get("error") and not token:  # an OAuth error, sent with 200
            raise SourceError(f"PowerSchool refused the plugin's client ID and secret ({self._message(answer)}): "
                              f"{refused}")
        if not isinstance(token, str) or not token:
            raise SourceError(f"PowerSchool: {url} answered without an access_token: is [powerschool] "
                              "url the PowerSchool server's address?")
        lifetime = _as_int(body.get("expires_in"))  # "3600": a string, as PowerSchool sends it
        with self._token_lock:
            self._token = token
            self._tokens_seen.add(token)
            # Renewed a little before it runs out (a tenth of its life, at most a minute), so
            # that a long read does not meet the 401 at all.
            self._expires_at = (time.monotonic() + lifetime - min(60.0, lifetime / 10)
                                if lifetime is not None and lifetime > 0 else None)

    def _count_request(self) -> None:
        with self._token_lock:
            self.requests += 1

    @staticmethod
    def _backoff(attempt: int) -> float:
        return min(0.5 * 2 ** attempt, 8.0) + random.random() * 0.5

    def _json(self, answer: Any, path: str, what: str) -> Any:
        """The answer's JSON, or an error saying what came instead."""
        table = re.match(r"/ws/schema/table/([^/]+)", path)
        if answer.status_code == 404 and table and self.metadata_read:
            # The metadata was read at this url, so the url is right: the plugin sees no such table.
            raise SourceError(
                f"PowerSchool: HTTP 404 from {path} while reading {what}: {self._message(answer)}. The "
                f"plugin sees no {table.group(1).upper()} table: does it grant ViewOnly on the "
                f"{table.group(1).upper()} columns of powerschool-plugin/plugin.xml, approved in PowerSchool's "
                "Plugin Management?")
        if answer.status_code == 404:
            raise SourceError(f"PowerSchool: {self.url}{path} was not found (HTTP 404) while reading {what}: "
                              "is [powerschool] url the PowerSchool server's address?")
        kind = answer.headers.get("Content-Type", "")
        if answer.status_code >= 400:
            raise SourceError(f"PowerSchool: HTTP {answer.status_code} from {path} while reading {what}: "
                              f"{self._message(answer)}")
        if "html" in kind.lower() or answer.text.lstrip()[:1] == "<":
            raise SourceError(f"PowerSchool: {self.url}{path} answered with an HTML page, not the API's JSON, "
                              "while reading " + what + ": is [powerschool] url the PowerSchool server's "
                              "address (not a sign-in page or a proxy)?")
        try:
            return answer.json()
        except ValueError:
            raise SourceError(f"PowerSchool: {path} answered with something that is not JSON while "
                              f"reading {what}") from None

    def _message(self, answer: Any) -> str:
        """The server's own words on an error, for a log line: without a token or the secret,
        which an OAuth server may repeat ("Invalid access token: <token>")."""
        try:
            body = answer.json()
        except ValueError:
            text = re.sub(r"\s+", " ", re.sub(r"<[^>]*>", " ", answer.text)).strip()
            return self._redact(text)[:200] or answer.reason
        if isinstance(body, dict):
            inner = body.get("errorMessage") if isinstance(body.get("errorMessage"), dict) else body
            text = str(inner.get("message") or inner.get("error_description") or inner.get("error") or body)
        else:
            text = str(body)
        return self._redact(text)[:300]

    def _redact(self, text: str) -> str:
        with self._token_lock:
            secrets_ = sorted(self._tokens_seen | {self._credentials[1]}, key=len, reverse=True)
        for secret in secrets_:
            if secret:
                text = text.replace(secret, "[hidden]")
        return text

    # requests ----------------------------------------------------------------------------
    def get(self, path: str, params: Mapping[str, Any], *, what: str,
            columns: Iterable[str] = ()) -> Any:
        """GET a JSON answer: paced, 429 waited out, 5xx and network errors retried with
        backoff, one new token on 401; anything else is a SourceError saying what to do."""
        renewed = False
        waits = 0
        attempt = 0
        while True:
            if self._expires_at is not None and time.monotonic() >= self._expires_at:
                self._renew(self._token)
            self._pacer.wait()
            token = self._token
            self._count_request()
            try:
                answer = self._session().get(self.url + path, params=params, timeout=self.timeout,
                                             headers={"Authorization": f"Bearer {token}"})
            except self._requests.RequestException as exc:
                attempt += 1
                if attempt >= (2 if "refused" in str(exc).lower() else _API_ATTEMPTS):
                    raise self._unreachable(exc) from None
                time.sleep(self._backoff(attempt - 1))
                continue
            status = answer.status_code
            if status == 401 and not renewed:
                renewed = True
                self._renew(token)
                continue
            if status == 401:
                raise SourceError(f"PowerSchool refused a new token too (HTTP 401 from {path}: "
                                  f"{self._message(answer)}): is the plugin still enabled, with access to the "
                                  f"API? (client ID and secret in {self.variables})")
            if status == 429 and waits < _API_MAX_WAITS:
                waits += 1
                wait = self._asked_wait(answer, path)
                wait = self._backoff(waits - 1) if wait is None else wait
                log.debug("PowerSchool: %s refused as too soon (429); waiting %.1f s", path, wait)
                self._pacer.hold(wait)
                continue
            if status >= 500 and attempt + 1 < _API_ATTEMPTS:
                attempt += 1
                # A 503 may say when to come back (maintenance, a restart): every thread waits that long.
                asked = self._asked_wait(answer, path)
                wait = self._backoff(attempt - 1) if asked is None else asked
                log.debug("PowerSchool: HTTP %d from %s; retrying in %.1f s", status, path, wait)
                if asked is None:
                    time.sleep(wait)
                else:
                    self._pacer.hold(wait)
                continue
            if status == 403:
                raise _ApiForbidden(self._forbidden(answer, path, columns))
            return self._json(answer, path, what)

    @staticmethod
    def _asked_wait(answer: Any, path: str) -> float | None:
        """The answer's Retry-After in seconds (None without one); a wait longer than a run
        can give is a SourceError saying to try later."""
        wait = _retry_after(answer.headers.get("Retry-After"))
        if wait is not None and wait > _API_MAX_RETRY_AFTER:
            raise SourceError(f"PowerSchool asks to wait {wait:.0f} s before the next request "
                              f"(HTTP {answer.status_code} from {path}): try again later")
        return wait

    def _renew(self, used: str | None) -> None:
        """One new token for every thread that saw the old one refused or run out."""
        with self._renew_lock:
            if self._token != used:
                return  # another thread renewed it already
            self.renewals += 1
            log.info("PowerSchool: the access token ran out or was refused; asking for a new one")
            self._new_token()

    def _forbidden(self, answer: Any, path: str, columns: Iterable[str]) -> str:
        try:
            body = answer.json()
        except ValueError:
            body = None
        message = self._message(answer)
        table = re.sub(r"^/ws/schema/table/([^/]+).*$", r"\1", path).lower()
        field_name = _missing_field(body, message, table, columns)
        if field_name:
            return (f"PowerSchool: the plugin has no access to the field {field_name} (HTTP 403 from {path}: "
                    f"{message}). Install the plugin.xml of powerschool-plugin/ (it grants ViewOnly on every "
                    "column student_sync reads) and approve its access request in PowerSchool's Plugin "
                    "Management")
        return (f"PowerSchool: HTTP 403 from {path}: {message} (does the plugin grant ViewOnly on every "
                "column of powerschool-plugin/plugin.xml, and is it enabled?)")

    # tables ------------------------------------------------------------------------------
    def count(self, table: str) -> int:
        body = self.get(f"/ws/schema/table/{table}/count", {}, what=f"the {table.upper()} count")
        value = body.get("count") if isinstance(body, dict) else None
        if value is None and isinstance(body, dict) and isinstance(body.get("resource"), dict):
            value = body["resource"].get("count")
        number = _as_int(value)
        if number is None or number < 0:
            raise SourceError(f"PowerSchool: /ws/schema/table/{table}/count answered {str(body)[:100]!r}, "
                              "not a count")
        return number

    def page(self, table: str, columns: Sequence[str], page: int, size: int) -> list[tuple[Any, dict[str, Any]]]:
        """One page as (record id, {column: value}) pairs; a page past the end is empty."""
        params = {"projection": ",".join(columns), "page": page, "pagesize": size, "sort": _API_SORT}
        body = self.get(f"/ws/schema/table/{table}", params, what=f"{table.upper()} page {page}",
                        columns=columns)
        records = body.get("record") if isinstance(body, dict) else None
        if records is None:
            return []
        if isinstance(records, dict):  # a lone record, as JSON converted from XML sends it
            records = [records]
        if not isinstance(records, list):
            raise SourceError(f"PowerSchool: {table.upper()} page {page} has a record that is not a list")
        return [self._row(table, record) for record in records]

    @staticmethod
    def _row(table: str, record: Any) -> tuple[Any, dict[str, Any]]:
        tables = record.get("tables") if isinstance(record, dict) else None
        if not isinstance(tables, dict):
            raise SourceError(f"PowerSchool: a {table.upper()} record without tables: {str(record)[:100]}")
        values = tables.get(table)  # the usual spelling first: this runs once a row
        if values is None:
            values = next((v for k, v in tables.items() if str(k).lower() == table), None)
        if values is None and len(tables) == 1:
            values = next(iter(tables.values()))
        if not isinstance(values, dict):
            raise SourceError(f"PowerSchool: a {table.upper()} record without its columns: {str(record)[:100]}")
        key = record.get("id")
        return (str(key) if key is not None else None), {
            (column := str(k).lower()): _api_value(column, v) for k, v in values.items()}

    def read_table(self, table: str) -> list[dict[str, Any]]:
        """Every row of `table` (the columns student_sync reads), checked against the count
        and read again once when it falls short."""
        columns = _API_TABLES[table]
        for attempt in (1, 2):
            expected = self.count(table)
            first = self.page(table, columns, 1, self.page_size)
            if 0 < len(first) < min(self.page_size, expected):
                # Asked once more, so that one short answer does not shrink every page after it.
                first = self.page(table, columns, 1, self.page_size)
            if 0 < len(first) < min(self.page_size, expected):
                # The server cuts its pages smaller than the metadata said (or than the default
                # when it said nothing): the rest is asked in pages of the size it serves.
                log.warning("PowerSchool: the API answers pages of %d %s rows, not %d; reading pages of %d",
                            len(first), table.upper(), self.page_size, len(first))
                self.page_size = len(first)
            pages = max(1, math.ceil(expected / self.page_size))
            workers = max(1, min(_API_WORKERS, pages - 1))
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                       thread_name_prefix="powerschool") as pool:
                try:
                    results = [first] + list(pool.map(lambda n: self.page(table, columns, n, self.page_size),
                                                      range(2, pages + 1)))
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)  # no new page after a stop
                    raise
            if len(results[-1]) >= self.page_size:
                # A full last page: only the page after it tells a count lower than the table
                # (a stale count), which would otherwise leave rows unread, and a student whose
                # active row is one of them would be weighed on the rest.
                results.append(self.page(table, columns, pages + 1, self.page_size))
            rows = [pair for result in results for pair in result]
            # Record ids find a row read twice (pages that overlap); an id left empty, or 0
            # for every row, says nothing, and only the count is checked.
            keys = [key for key, _ in rows if key not in (None, "", "0", "null")]
            if len(rows) == expected and len(set(keys)) == len(keys):
                log.debug("PowerSchool: %d %s rows in %d pages", expected, table.upper(), len(results))
                return [values for _, values in rows]
            log.warning("PowerSchool: read %d %s rows (%d distinct) where the API counts %d%s",
                        len(rows), table.upper(), len(set(keys)) if keys else len(rows), expected,
                        "; reading the table again" if attempt == 1 else "")
        raise SourceError(
            f"PowerSchool: the API gave {len(rows)} {table.upper()} rows where it counts {expected}, twice "
            "in a row; a short read is not taken as students leaving, so nothing was changed. Try again "
            "later (is PowerSchool being changed or restarted?)")


def _api_credentials(settings: Settings) -> tuple[str, str]:
    """The plugin's client ID and secret, named in [powerschool] (environment or credential store)."""
    ps = settings.powerschool
    values = []
    for key, variable in (("client_id_env", ps.client_id_env), ("client_secret_env", ps.client_secret_env)):
        secret = read_secret(variable)
        if not secret.value:
            raise SourceError("PowerSchool: " + secret.missing(
                f"the plugin's {'client ID' if key == 'client_id_env' else 'client secret'}; named by "
                f"[powerschool] {key}; see README, PowerSchool through its REST API"))
        values.append(secret.value)
    return values[0], values[1]


def open_powerschool_api(settings: Settings) -> PowerSchoolApi:
    """A connected API client: token and metadata read."""
    client_id, client_secret = _api_credentials(settings)
    api = PowerSchoolApi(settings, client_id, client_secret)
    try:
        return api.open()
    except BaseException:
        api.close()
        raise


def _api_flag(value: Any) -> bool:
    """STATE_EXCLUDEFROMREPORTING from the API: a JSON true or false, or that written as text
    ("false": a boolean the server renders, never a number the database holds), else as the
    SQL weighs it."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return excluded_from_reporting(value)


def read_api_schools(api: PowerSchoolApi) -> dict[int, School]:
    """All SCHOOLS rows keyed by school number, as read_schools gives them."""
    schools = {}
    for row in api.read_table("schools"):
        number = _as_int(row.get("school_number"))
        if number is None:
            log.warning("PowerSchool: SCHOOLS row with school number %r ignored", row.get("school_number"))
            continue
        schools[number] = School(number=number, name=_clean_spaces(row.get("name")),
                                 abbreviation=_clean_spaces(row.get("abbreviation")),
                                 state_excluded=_api_flag(row.get("state_excludefromreporting")))
    return schools


def read_api_students(api: PowerSchoolApi, scope: Scope, schools: Mapping[int, School]) -> list[StudentRow]:
    """The scope's rows and every other row of the same students, as read_students gives
    them: the whole table is read and the scope applied here."""
    rows = []
    for values in api.read_table("students"):
        school_number = _as_int(values.get("schoolid"))
        rows.append(StudentRow(
            student_number=values.get("student_number"), first_name=values.get("first_name"),
            last_name=values.get("last_name"), class_of=values.get("classof"),
            enroll_status=values.get("enroll_status"), school_id=values.get("schoolid"),
            grade_level=values.get("grade_level"),
            school=schools.get(school_number) if school_number is not None else None))
    return students_of_scope(rows, scope)


def check_api_access(api: PowerSchoolApi) -> list[str]:
    """The columns the plugin cannot read ("TABLE.COLUMN"), one small request per column,
    and the key the paged read sorts on (a read sorted on a column the plugin lacks is
    refused as surely as one that projects it)."""
    missing = []
    for table, columns in _API_TABLES.items():
        for column in (*columns, _API_SORT):
            params = {"projection": column, "page": 1, "pagesize": 1}
            if column == _API_SORT:
                params["sort"] = _API_SORT
            try:
                api.get(f"/ws/schema/table/{table}", params, what=f"{table.upper()}.{column.upper()}",
                        columns=(column,))
            except _ApiForbidden:
                missing.append(f"{table.upper()}.{column.upper()}")
    return missing


# =============================================================================
# Google
# =============================================================================
# The Directory API: credentials, Google's errors, the rate limiter and retry policy, one
# client whose `call(request)` sends every request, and the bulk read of the directory
# (accounts and OUs) a plan is made from.


SCOPES = (
    "https://www.googleapis.com/auth/admin.directory.user",
    "https://www.googleapis.com/auth/admin.directory.orgunit.readonly",
    "https://www.googleapis.com/auth/admin.directory.group",
    "https://www.googleapis.com/auth/admin.directory.userschema.readonly",
)
LICENSING_SCOPE = "https://www.googleapis.com/auth/apps.licensing"


def scopes_for(settings: Settings) -> tuple[str, ...]:
    """The scopes a run asks for: the licensing scope only with a [licenses] section."""
    return SCOPES + ((LICENSING_SCOPE,) if settings.licenses else ())


@dataclass(frozen=True, slots=True)
class Account:
    """A Google account as the rules see it; `attributes` are our category's fields, as text."""

    email: str
    given_name: str
    family_name: str
    suspended: bool
    org_unit: str
    attributes: Mapping[str, str] = field(default_factory=dict)


@functools.lru_cache(maxsize=65536)
def shared_mapping(items: tuple[tuple[str, str], ...]) -> Mapping[str, str]:
    """One read-only mapping per distinct set of attribute values: a district of
    100,000 students has a few hundred (school, class year) pairs, not 100,000."""
    return MappingProxyType(dict(items))


@dataclass(frozen=True)
class Directory:
    """The snapshot a plan is made from: accounts by lower-cased email, OUs by lower-cased path,
    and (with [licenses]) the lower-cased emails of the accounts holding the licence."""

    accounts: Mapping[str, Account]
    org_units: Mapping[str, str]
    licensed: frozenset[str] | None = None


_USER_FIELDS = "primaryEmail,name(givenName,familyName),suspended,orgUnitPath,customSchemas"


def account_from_resource(resource: Mapping[str, Any], category: str) -> Account:
    """Read the fields the rules need from a users resource."""
    name = resource.get("name") or {}
    fields = (resource.get("customSchemas") or {}).get(category) or {}
    attributes = []
    for key, value in fields.items():
        if isinstance(value, list):  # a multi-valued field: [{"value": ...}, ...]
            value = value[0].get("value") if value and isinstance(value[0], dict) else None
        if value is not None:
            attributes.append((key, str(value)))
    # Names, OU paths and attribute values repeat across a district: 100,000 accounts
    # share one copy of each.
    return Account(
        email=resource["primaryEmail"],
        given_name=sys.intern(name.get("givenName") or ""),
        family_name=sys.intern(name.get("familyName") or ""),
        suspended=bool(resource.get("suspended", False)),
        org_unit=sys.intern(resource.get("orgUnitPath") or "/"),
        attributes=shared_mapping(tuple(sorted(attributes))),
    )


def google_credentials(settings: Settings, *, interactive: bool = False) -> Any:
    """Credentials for the configured auth mode; None for a local endpoint ("none").

    A scheduled run never opens a browser: without a usable token it stops and says to
    run --authorize.
    """
    gg = settings.google
    if gg.auth == "none":
        return None
    from google.auth.exceptions import GoogleAuthError

    if gg.auth == "service_account":
        from google.oauth2 import service_account

        try:
            credentials = service_account.Credentials.from_service_account_file(
                str(gg.service_account_file), scopes=list(scopes_for(settings))
            ).with_subject(gg.delegated_admin)
        except FileNotFoundError:
            raise GoogleError(f"Google: service account key {gg.service_account_file} not found "
                              "([google] service_account_file)") from None
        except (ValueError, KeyError, GoogleAuthError) as exc:
            raise GoogleError(f"Google: service account key {gg.service_account_file} is not usable: "
                              f"{type(exc).__name__}") from None
        _refresh(credentials, settings, "to authorize")
        return credentials

    from google.oauth2.credentials import Credentials

    if interactive:
        return _authorize_interactively(settings)
    if not gg.token_file.is_file():
        raise GoogleError(f"Google: no token file {gg.token_file}: run "
                          f"'python student_sync.py --authorize' once, signed in as an administrator")
    try:
        credentials = Credentials.from_authorized_user_file(str(gg.token_file), list(scopes_for(settings)))
        granted = json.loads(gg.token_file.read_text(encoding="utf-8")).get("scopes")
    except OSError as exc:  # on Windows, most often a token made private to another account
        raise GoogleError(f"Google: cannot read the token file {gg.token_file} as {account_name()} "
                          f"({exc.strerror or type(exc).__name__}): it is private to the account that saved "
                          f"it last; give {account_name()} access (README: Windows Task Scheduler)") from None
    except (ValueError, KeyError, AttributeError, json.JSONDecodeError):
        raise GoogleError(f"Google: token file {gg.token_file} is not usable: run "
                          "'python student_sync.py --authorize' again") from None
    if settings.licenses and isinstance(granted, list) and LICENSING_SCOPE not in granted:
        raise GoogleError(f"Google: the token in {gg.token_file} was authorized without the licensing scope "
                          f"{LICENSING_SCOPE} that [licenses] needs: run 'python student_sync.py "
                          "--authorize' again")
    if credentials.valid:
        return credentials
    if not credentials.refresh_token:
        raise GoogleError(f"Google: token in {gg.token_file} has expired and cannot be refreshed: run "
                          "'python student_sync.py --authorize' again")
    _refresh(credentials, settings, "to refresh the token")
    _save_refreshed_token(gg.token_file, credentials.to_json())
    return credentials


_CLIENT_FILE_KEYS = ("client_id", "client_secret", "auth_uri", "token_uri")


def _check_client_file(path: Path) -> None:
    """Stop unless `path` is a Desktop-app OAuth client file (its content is never shown)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        document = None
    if not isinstance(document, dict):
        problem = "is not JSON" if document is None else "is not an OAuth client file"
    elif "installed" not in document:
        problem = ("is the client of a Web application" if "web" in document else
                   "is not an OAuth client file (a service account key?)")
    elif not isinstance(document["installed"], dict) or not all(
            isinstance(document["installed"].get(k), str) and document["installed"].get(k)
            for k in _CLIENT_FILE_KEYS):
        problem = "lacks some of " + ", ".join(_CLIENT_FILE_KEYS)
    else:
        return
    raise GoogleError(f"Google: {path} {problem}, not a Desktop app OAuth client: in Google Cloud console, "
                      "APIs & Services > Credentials > Create credentials > OAuth client ID, application "
                      "type Desktop app, then download its JSON to this path ([google] credentials_file; "
                      "see credentials.json.example and README)")


def describe_network_error(exc: BaseException, url: str | None = None) -> str:
    """Why a connection failed, in words an administrator can act on: the certificate, the
    proxy, name resolution, a refused connection or no answer."""
    chain: list[BaseException] = []
    pending: list[Any] = [exc]
    while pending and len(chain) < 20:
        each = pending.pop(0)
        if not isinstance(each, BaseException) or any(each is seen for seen in chain):
            continue
        chain.append(each)
        pending += [each.__cause__, each.__context__, getattr(each, "reason", None), *each.args]
    names = {type(e).__name__ for e in chain}
    texts = " ".join(str(e) for e in chain)
    parts = urlsplit(url or "")
    host = parts.hostname or "the server"
    where = f"{host}:{parts.port}" if parts.port else host
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or "CERTIFICATE_VERIFY_FAILED" in texts:
        return (f"the certificate of {host} is not trusted (a proxy or firewall that inspects HTTPS?): add its "
                "root certificate (REQUESTS_CA_BUNDLE for sign-in, HTTPLIB2_CA_CERTS for the directory) or "
                "exempt Google's addresses from inspection")
    if any("Proxy" in name for name in names):  # requests' ProxyError, httplib2's socks errors
        variable = next((v for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY",
                                     "http_proxy") if os.environ.get(v)), None)
        proxy = urlsplit(os.environ.get(variable, "") if variable else "")
        shown = f"{proxy.hostname}:{proxy.port}" if proxy.hostname else "the proxy"
        return (f"{shown} could not be used as the proxy"
                + (f" (set by {variable})" if variable else "") + ": check the proxy, or the variable")
    if any(isinstance(e, socket.gaierror) for e in chain) or names & {"NameResolutionError", "ServerNotFoundError"}:
        return f"the name {host} could not be resolved (DNS): check this computer's network and DNS settings"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return f"{where} refused the connection (a firewall, or nothing listening there)"
    if any(isinstance(e, (TimeoutError, socket.timeout)) for e in chain) or any("Timeout" in n for n in names):
        return f"no answer from {where} in time (a firewall dropping the traffic?)"
    if any(isinstance(e, ConnectionResetError) for e in chain):
        return f"{where} closed the connection (a firewall or proxy in between?)"
    return type(exc).__name__


def _save_refreshed_token(path: Path, text: str) -> None:
    """Keep the refreshed token for the next run.  One that cannot be saved is a warning:
    it is valid for this run, and the next run refreshes again."""
    try:
        warning = write_atomically(path, text, private=True)
    except OSError as exc:
        log.warning("could not save the refreshed token: %s; this run goes on with it",
                    cannot_write("the token file", path, exc))
        return
    if warning:
        log.warning("the token file %s may be readable by other users of this computer: it could not be "
                    "made private (%s)", path, warning)


def _refresh(credentials: Any, settings: Settings, purpose: str) -> None:
    """Get a fresh access token, or stop the run saying what to do."""
    from google.auth.exceptions import GoogleAuthError, RefreshError
    from google.auth.transport.requests import Request

    try:
        credentials.refresh(Request())
    except RefreshError as exc:
        raise GoogleError(_describe_refresh_error(exc, settings)) from None
    except (OSError, GoogleAuthError) as exc:
        uri = getattr(credentials, "token_uri", None) or getattr(credentials, "_token_uri", None)
        raise GoogleError(f"Google: cannot reach Google {purpose}: {describe_network_error(exc, uri)}") from None
    except (ValueError, TypeError, KeyError, AttributeError):
        # google-auth reads any 200 answer as a token: a proxy's page breaks it in odd ways.
        raise GoogleError(f"Google: cannot reach Google {purpose}: Google answered with a non-JSON page "
                          "(a proxy or web filter in between?): let this computer reach Google's sign-in "
                          "(oauth2.googleapis.com) directly") from None


def _authorize_interactively(settings: Settings) -> Any:
    from google_auth_oauthlib.flow import InstalledAppFlow

    gg = settings.google
    if not gg.credentials_file.is_file():
        raise GoogleError(f"Google: OAuth client file {gg.credentials_file} not found "
                          "([google] credentials_file; see credentials.json.example and README)")
    _check_client_file(gg.credentials_file)
    flow = InstalledAppFlow.from_client_secrets_file(str(gg.credentials_file), list(scopes_for(settings)))
    credentials = flow.run_local_server(port=0)
    try:
        warning = write_atomically(gg.token_file, credentials.to_json(), private=True)
    except OSError as exc:
        raise GoogleError("Google: signed in, but " + cannot_write("the token file", gg.token_file, exc)) from None
    if warning:
        log.warning("the token file %s may be readable by other users of this computer: it could not be "
                    "made private (%s)", gg.token_file, warning)
    log.info("Google: authorized; token written to %s", gg.token_file)
    return credentials


def _describe_refresh_error(exc: Exception, settings: Settings) -> str:
    text = str(exc)
    licensing = f" (with [licenses], {LICENSING_SCOPE} too)" if settings.licenses else ""
    if "unauthorized_client" in text:
        return ("Google: domain-wide delegation is not granted for this service account and these "
                "scopes (unauthorized_client): add the client ID and scopes in the Admin console, "
                f"Security > API controls > Domain-wide delegation{licensing} (see README)")
    if "invalid_scope" in text or "access_denied" in text:
        reason = "invalid_scope" if "invalid_scope" in text else "access_denied"
        return (f"Google: the authorization does not cover every scope this run needs{licensing} "
                f"({reason}): run 'python student_sync.py --authorize' again, or with a service account "
                "add the scopes to its domain-wide delegation (see README)")
    if "invalid_grant" in text:
        if settings.google.auth == "service_account":
            return (f"Google: the service account could not act as {settings.google.delegated_admin} "
                    "(invalid_grant): check [google] delegated_admin and the key")
        return ("Google: the saved token has expired or been revoked (invalid_grant): run "
                "'python student_sync.py --authorize' again")
    return f"Google: authorization failed ({type(exc).__name__}): run 'python student_sync.py --authorize'"


def _http_error_class() -> type[Exception]:
    """googleapiclient's HttpError, imported when first needed: loading googleapiclient takes
    a noticeable part of a second, which a --help or a settings error should not pay."""
    from googleapiclient.errors import HttpError

    return HttpError


_RATE_REASONS = {"rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded",
                 "RATE_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"}


def _error_reasons(exc: Exception) -> list[str]:
    """Every reason a Google error body gives: `errors[].reason`, `details[].reason`, `status`.

    googleapiclient keeps only one of these lists in `error_details`, so the body is read
    again here.
    """
    try:
        error = json.loads(getattr(exc, "content", b"") or b"{}").get("error", {})
    except (ValueError, AttributeError):
        return []
    if not isinstance(error, dict):
        return []
    reasons = [e.get("reason") for key in ("errors", "details") for e in error.get(key) or []
               if isinstance(e, dict)]
    if error.get("status"):
        reasons.append(error["status"])
    return [r for r in reasons if isinstance(r, str) and r]


def _http_error_parts(exc: Exception) -> tuple[int, str, str]:
    """(status, reason, message) of an HttpError, whatever its body looked like."""
    status = getattr(exc, "status_code", None) or getattr(getattr(exc, "resp", None), "status", 0) or 0
    details = getattr(exc, "error_details", "")
    reasons = _error_reasons(exc)
    reason = reasons[0] if reasons else ""
    if isinstance(details, list) and details and isinstance(details[0], dict):
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


class NonJsonAnswer(Exception):
    """The Directory API endpoint answered 2xx with a page that is not JSON."""

    def __init__(self, page: str):
        title = re.search(r"<title[^>]*>(.*?)</title>", page, re.IGNORECASE | re.DOTALL)
        shown = " ".join(title.group(1).split())[:80] if title else ""
        super().__init__("Google answered with a non-JSON page" + (f' ("{shown}")' if shown else "")
                         + ": a proxy or web filter in between? Let this computer reach Google's APIs "
                         "directly, or check [google] api_endpoint")


def _describe_any(exc: BaseException) -> str:
    if isinstance(exc, _http_error_class()):
        return describe_http_error(exc)
    if isinstance(exc, NonJsonAnswer):
        return str(exc)
    return type(exc).__name__


def _is_network_error(exc: BaseException, *, may_pass: bool = False) -> bool:
    """A failure to reach the server.  With `may_pass`, only the kind that another try may
    cure: a dropped, refused or timed-out connection, not an unknown host."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import httplib2
        from google.auth.exceptions import TransportError
    except ImportError:
        return not may_pass and isinstance(exc, OSError)
    if isinstance(exc, httplib2.ServerNotFoundError):
        return not may_pass
    if isinstance(exc, (TransportError, httplib2.HttpLib2Error)):
        return True
    return not may_pass and isinstance(exc, OSError)


def is_retryable(exc: BaseException) -> bool:
    """429, 5xx, 403 rate-limit reasons, and dropped connections are worth another try."""
    if isinstance(exc, _http_error_class()):
        status = _http_error_parts(exc)[0]
        return status == 429 or status >= 500 or (
            status == 403 and any(r in _RATE_REASONS for r in _error_reasons(exc)))
    return _is_network_error(exc, may_pass=True)


class RateLimiter:
    """At most `rate` calls start in any window of a second (thread-safe).

    Two rules together: a token bucket lets a short burst (up to BURST calls, a small
    run's few reads) go out at once and then spaces calls evenly at the rate; a sliding
    window over the last `rate` calls makes sure no second ever holds more.  Calls are
    counted when they are let through, and the window has some slack, so that their
    arrival at the server stays inside the limit too.
    """

    BURST = 8
    SLACK = 0.05

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        # Whole calls per second; below one a second, one call per 1/rate seconds.
        self.rate = rate
        self.capacity = max(1, int(rate))
        self.window = max(1.0, 1.0 / rate) + self.SLACK
        self.burst = min(self.BURST, self.capacity)
        self._clock, self._sleep = clock, sleep
        self._granted: collections.deque[float] = collections.deque(maxlen=self.capacity)
        self._tokens = float(self.burst)
        self._filled = clock()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        acquire_together((self,))

    def _wait(self, now: float) -> float:
        """Seconds until a call may start (0: now), the bucket refilled to `now`; lock held."""
        self._tokens = min(self.burst, self._tokens + (now - self._filled) * self.rate)
        self._filled = now
        window_free = len(self._granted) < self.capacity or now >= self._granted[0] + self.window
        if self._tokens >= 1 and window_free:
            return 0.0
        return max((1 - self._tokens) / self.rate, 0.0 if window_free else self._granted[0] + self.window - now)

    def _take(self, now: float) -> None:
        self._tokens -= 1
        self._granted.append(now)


def acquire_together(limiters: Sequence[RateLimiter]) -> None:
    """Wait until every one of `limiters` lets a call start, then count it in all of them
    at that one moment -- the moment it is sent.  Taking one token and then waiting for the
    next (a create waiting for the create limit) would count it in the first limiter
    earlier than it really goes out, and the busiest second could hold more than the limit.
    """
    ordered = sorted(set(limiters), key=id)  # one locking order for every thread: no deadlock
    if not ordered:
        return
    clock, sleep = ordered[0]._clock, ordered[0]._sleep
    while True:
        with contextlib.ExitStack() as locks:
            for limiter in ordered:
                locks.enter_context(limiter._lock)
            now = clock()
            wait = max(limiter._wait(now) for limiter in ordered)
            if wait <= 0:
                for limiter in ordered:
                    limiter._take(now)
                return
        sleep(max(wait, 0.001))


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
            acquire_together(((self.limiter,) if self.limiter else ()) + tuple(limiters))
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


class DirectoryClient:
    """The Directory API: one service object, one HTTP connection per thread, one retry policy.

    httplib2 is not thread-safe, so requests are built from the shared service and
    executed on the calling thread's own connection.
    """

    def __init__(self, settings: Settings, credentials: Any = None, policy: RetryPolicy | None = None):
        self.settings = settings
        self.credentials = credentials
        self.policy = policy or RetryPolicy()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._resources: dict[str, Any] = {}
        self._licence_assignments: Any = None

    def resource(self, name: str) -> Any:
        """`users`, `orgunits`, `groups`, `members` or `schemas` of the shared service."""
        with self._lock:
            if not self._resources:
                service = self._build("admin", "directory_v1")
                for each in ("users", "orgunits", "groups", "members", "schemas"):
                    self._resources[each] = getattr(service, each)()
            return self._resources[name]

    def licence_assignments(self) -> Any:
        """The Licensing API's licenseAssignments, on the same endpoint and credentials."""
        with self._lock:
            if self._licence_assignments is None:
                self._licence_assignments = self._build("licensing", "v1").licenseAssignments()
            return self._licence_assignments

    def call(self, request: Any, *, limiters: Sequence[RateLimiter] = (), attempts: int | None = None) -> Any:
        """Send a built request on this thread's connection under the retry policy (and
        `limiters` besides the policy's own), at most `attempts` tries if given; the last
        error propagates."""
        policy = self.policy if attempts is None else dataclasses.replace(self.policy, attempts=attempts)
        return policy.call(functools.partial(self._send, request), limiters=limiters)

    def _send(self, request: Any) -> Any:
        answer = request.execute(http=self._http())
        if isinstance(answer, str) and answer.strip():
            # googleapiclient hands back a 2xx body that is not JSON as text: a proxy's or a
            # web filter's page, never an answer of the Directory API.
            raise NonJsonAnswer(answer)
        return answer

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

    def _build(self, api: str, version: str) -> Any:
        from googleapiclient.discovery import build

        options = {}
        if self.settings.google.api_endpoint:
            options["api_endpoint"] = self.settings.google.api_endpoint
        return build(
            api, version, http=self._http(), static_discovery=True,
            cache_discovery=False, client_options=options or None,
        )


def read_org_units(client: DirectoryClient) -> dict[str, str]:
    """Every OU of the domain: lower-cased path -> path as Google spells it."""
    request = client.resource("orgunits").list(
        customerId="my_customer", type="all", fields="organizationUnits(orgUnitPath)", prettyPrint=False)
    answer = client.call(request)
    units = {"/": "/"}
    for unit in answer.get("organizationUnits", []) or []:
        path = unit.get("orgUnitPath")
        if path:
            units[path.lower()] = path
    return units


class _TwoEndedListing:
    """Lists the domain's users from both ends of the email order at once.

    One stream pages up from the first address, the other down from the last.  They stop
    once both have seen the same address: the one read everything up to it and the other
    everything from it, in the server's own order, so the whole domain is read in about
    half the time, with no search query (search results can lag writes) and no account
    missed.  If the server does not keep the order it was asked for, the ascending stream
    reads to the end on its own.
    """

    def __init__(self, client: DirectoryClient, settings: Settings, cancel: threading.Event,
                 pages: Callable[[int], None] | None = None):
        self.client, self.settings, self.cancel = client, settings, cancel
        self.pages = pages or (lambda count: None)
        self.category = settings.custom_schema.category
        self.accounts: dict[str, Account] = {}
        self._lock = threading.Lock()
        self._seen = {"ASCENDING": set(), "DESCENDING": set()}  # addresses each stream has read
        self._met_flag = False                 # the streams have an address in common
        self._finished = False                 # one stream read to its end: all is seen
        self._unordered = False                # the server ignored the order: no meeting point

    def _done(self, ascending: bool) -> bool:
        if self._finished or self.cancel.is_set():
            return True
        if self._unordered:
            return not ascending
        return self._met_flag

    def stream(self, order: str) -> None:
        """Read pages in `order` ("ASCENDING" or "DESCENDING") until the streams meet."""
        users = self.client.resource("users")
        request = users.list(
            domain=self.settings.google.domain, maxResults=500, projection="custom",
            customFieldMask=self.category, orderBy="email", sortOrder=order,
            fields=f"nextPageToken,users({_USER_FIELDS})", prettyPrint=False,
        )
        ascending = order == "ASCENDING"
        mine, other = self._seen[order], self._seen["DESCENDING" if ascending else "ASCENDING"]
        previous: str | None = None
        tokens: set[str] = set()
        while request is not None:
            with self._lock:
                if self._done(ascending):
                    return
            answer = self.client.call(request)
            page = [account_from_resource(r, self.category)
                    for r in answer.get("users", []) or [] if r.get("primaryEmail")]
            keys = [_key(a.email) for a in page]
            sequence = keys if previous is None else [previous, *keys]
            in_order = all((a < b) if ascending else (a > b) for a, b in zip(sequence, sequence[1:]))
            token = answer.get("nextPageToken")
            if token in tokens or (token and keys and all(k in mine for k in keys)):
                raise GoogleError("Google: the user listing repeats itself (the same page again); "
                                  "stopping rather than reading forever")
            tokens.add(token)
            request = users.list_next(request, answer)
            self.pages(len(page))
            with self._lock:
                for key, account in zip(keys, page):
                    self.accounts[key] = account
                if not in_order:
                    self._unordered = True
                if not self._unordered and any(k in other for k in keys):
                    self._met_flag = True
                mine.update(keys)
                if request is None and (ascending or not self._unordered):
                    self._finished = True
            if keys:
                previous = keys[-1]


def _customer_id(client: DirectoryClient, settings: Settings) -> str | None:
    """The Workspace customer ID (C0...), as users.list gives it with every account; None
    when the domain has no account at all (then none of it can hold a licence)."""
    request = client.resource("users").list(domain=settings.google.domain, maxResults=1,
                                            fields="users(customerId)", prettyPrint=False)
    users = client.call(request).get("users") or []
    if not users:
        return None
    customer = users[0].get("customerId")
    if not customer:
        raise GoogleError("Google: cannot tell the Workspace customer ID (users.list gives none): set "
                          "[licenses] customer_id (Admin console > Account settings > Customer ID)")
    return customer


def _describe_licensing_error(exc: Exception, settings: Settings, customer: str | None) -> str:
    """What a refused licence listing means, and what to do."""
    status, _, message = _http_error_parts(exc)
    said = describe_http_error(exc)
    lic = settings.licenses
    reasons = set(_error_reasons(exc))
    if status in (401, 403) and (reasons & {"insufficientPermissions", "ACCESS_TOKEN_SCOPE_INSUFFICIENT"}
                                 or "scope" in message.lower()):
        return (f"Google: the authorization lacks the licensing scope {LICENSING_SCOPE} that [licenses] "
                f"needs ({said}): run 'python student_sync.py --authorize' again, or with a service "
                "account add the scope to its domain-wide delegation (see README, Licences)")
    if reasons & _RATE_REASONS or status == 429:
        return (f"Google: the Licensing API's quota is used up ({said}): nothing was changed; the next "
                "run tries again (its daily quota starts again at midnight, Pacific time)")
    if status in (401, 403):
        return (f"Google: licences of customer {customer} may not be read ({said}): check [licenses] "
                "customer_id, and that the administrator may manage licences")
    if status in (400, 404):
        return (f"Google: product {lic.product_id}, SKU {lic.sku_id} ([licenses] product_id and sku_id) "
                f"do not answer ({said}): check them (README, Licences)")
    return f"Google: cannot read who holds the licence {lic.sku_id}: {said}"


def read_license_holders(client: DirectoryClient, settings: Settings) -> frozenset[str]:
    """Lower-cased emails of every account holding [licenses]' SKU.

    One listForProductAndSku listing, 1,000 a page, never one call per account: the Licensing
    API has a daily quota.  It goes out on a connection and rate limiter of its own (the
    Licensing API's quota is not the Directory API's), beside the directory read.
    """
    lic = settings.licenses
    assert lic is not None
    own = DirectoryClient(settings, client.credentials, dataclasses.replace(
        client.policy, limiter=RateLimiter(settings.google.max_requests_per_second)))
    customer = lic.customer_id
    holders: set[str] = set()
    try:
        customer = customer or _customer_id(own, settings)
        if customer is None:
            return frozenset()
        assignments = own.licence_assignments()
        request = assignments.listForProductAndSku(
            productId=lic.product_id, skuId=lic.sku_id, customerId=customer, maxResults=1000,
            fields="nextPageToken,items(userId)", prettyPrint=False)
        tokens: set[str | None] = set()
        while request is not None:
            answer = own.call(request)
            holders.update(_key(item["userId"]) for item in answer.get("items") or [] if item.get("userId"))
            token = answer.get("nextPageToken")
            if token in tokens:
                raise GoogleError("Google: the licence listing repeats itself (the same page again); "
                                  "stopping rather than reading forever")
            tokens.add(token)
            request = assignments.listForProductAndSku_next(request, answer)
    except _http_error_class() as exc:
        raise GoogleError(_describe_licensing_error(exc, settings, customer)) from None
    return frozenset(holders)


class DirectoryRead:
    """The whole directory, read in the background on threads this object owns: the OU list
    and both ends of the user listing at once, while the caller reads PowerSchool.

    Use it as a `with` block: leaving the block waits for the threads, and leaving it on an
    error first stops the listing after the pages in flight (its result is then unused).
    """

    def __init__(self, client: DirectoryClient, settings: Settings,
                 pages: Callable[[int], None] | None = None, *, with_org_units: bool = True,
                 with_licences: bool = True):
        self._cancel = threading.Event()
        self._listing = _TwoEndedListing(client, settings, self._cancel, pages)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="directory")
        self._streams = [self._pool.submit(self._listing.stream, order) for order in ("ASCENDING", "DESCENDING")]
        self._org_units = self._pool.submit(read_org_units, client) if with_org_units else None
        # With [licenses], who holds the licence is read at the same time (SPEC 8).
        self._licensed = (self._pool.submit(read_license_holders, client, settings)
                          if settings.licenses and with_licences else None)

    def accounts(self) -> dict[str, Account]:
        """Every account of the domain keyed by lower-cased primary email, once read."""
        for stream in self._streams:
            stream.result()
        return self._listing.accounts

    def result(self) -> Directory:
        """Accounts and OUs, once both are read; the first error propagates."""
        accounts = self.accounts()
        return Directory(accounts=accounts, org_units=self._org_units.result() if self._org_units else {"/": "/"},
                         licensed=self._licensed.result() if self._licensed else None)

    def __enter__(self) -> DirectoryRead:
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if error is not None:
            self._cancel.set()  # do not wait for a listing nobody will use
        self._pool.shutdown(wait=True)


def read_accounts(client: DirectoryClient, settings: Settings) -> dict[str, Account]:
    """Every account of the domain, in pages of 500, keyed by lower-cased primary email."""
    with DirectoryRead(client, settings, with_org_units=False) as reading:
        return reading.accounts()


def confirm_org_units(client: DirectoryClient, directory: Directory,
                      wanted: Iterable[str], most: int = 50) -> Directory:
    """Ask for each wanted OU that the OU list lacks, one orgunits.get each (at most `most`).

    A student whose OU is missing is reported and left alone, so the listing's word is
    checked before anyone is: a server whose list leaves some OUs out, or an OU made a
    moment ago, does not fail a whole building.
    """
    missing = sorted({ou for ou in wanted if ou.lower() not in directory.org_units})
    if not missing:
        return directory
    units = dict(directory.org_units)
    orgunits = client.resource("orgunits")
    for path in missing[:most]:
        request = orgunits.get(customerId="my_customer", orgUnitPath=path.lstrip("/"),
                               fields="orgUnitPath")
        try:
            found = client.call(request).get("orgUnitPath")
        except _http_error_class() as exc:
            if _http_error_parts(exc)[0] not in (400, 404):
                log.debug("OU %s could not be read: %s", path, describe_http_error(exc))
            continue
        if found:
            units[found.lower()] = found
    return dataclasses.replace(directory, org_units=units)


# =============================================================================
# Plan
# =============================================================================
# The rules of SPEC section 3 as pure functions: PowerSchool rows become one decision per
# student, and a decision and an account become at most one change.  No I/O, no clock, no
# environment: the plan is a value that can be printed, counted, checked and saved.

class Level(StrEnum):
    """How much a notice matters: an error fails the student, a skip leaves them out."""

    ERROR = "error"
    WARNING = "warning"
    SKIP = "skip"


class Action(StrEnum):
    """The one write call a change makes: users.insert, or users.update (a suspension
    first removes the account from its groups), or a licence's insert or delete."""

    CREATE = "create"
    UPDATE = "update"
    SUSPEND = "suspend"
    LICENSE = "license"


# The labels of a licence change (SPEC 8); its before/after are {"license": sku} or None.
ASSIGN_LICENSE, RELEASE_LICENSE = "assign license", "release license"


@dataclass(frozen=True, slots=True)
class Notice:
    """A per-student message: an error (the student failed), a warning, or a skip."""

    level: Level
    student_number: str
    email: str
    message: str


@dataclass(frozen=True, slots=True)
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

    `before` holds the account's current
    values of the fields in `after`, which is the body of the one write call (for a
    create, without the password).  `labels` name the kinds of change for people.
    """

    student_number: int
    email: str
    action: Action
    labels: tuple[str, ...]
    before: Mapping[str, Any] | None     # None only for a licence the account lacks
    after: Mapping[str, Any] | None
    remove_groups: bool = False

    @property
    def sku(self) -> str:
        """A licence change's SKU."""
        return (self.after or self.before or {}).get("license", "")

    def describe(self) -> str:
        if self.action == Action.LICENSE:
            return f"{self.labels[0]} {self.sku}"
        parts = []
        if self.action == Action.CREATE:
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
        """How many students have a bad-data error."""
        return len({(n.student_number, n.email) for n in self.notices if n.level == Level.ERROR})

    def suspensions(self) -> list[Change]:
        """Changes that take an account from active to suspended."""
        return [c for c in self.changes if "suspend" in c.labels]

    def releases(self) -> list[Change]:
        """Licence releases."""
        return [c for c in self.changes if RELEASE_LICENSE in c.labels]


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


@dataclass(frozen=True, slots=True)
class RowStatus:
    """One PowerSchool row weighed by the definitions of SPEC section 3."""

    enroll_status: int
    school_number: int
    class_of: int | None
    graduated: bool
    active: bool
    should_be_active: bool   # active, or a graduate in summer grace


def _row_status(row: StudentRow, settings: Settings, today: dt.date) -> RowStatus:
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
    return RowStatus(enroll_status=status, school_number=school_number, class_of=class_of,
                     graduated=graduated, active=active, should_be_active=active or grace)


def building_ou(school: School, settings: Settings) -> str:
    """`/D118 Students/` + `WHS` + ` Students`."""
    return f"{settings.ous.student_prefix}{school.abbreviation}{settings.ous.building_suffix}"


def _target_ou(row: StudentRow, weighed: RowStatus, settings: Settings) -> str:
    """The OU of SPEC section 3's table.  Raises ValueError when it cannot be named."""
    ous = settings.ous
    if weighed.graduated:
        return ous.graduated
    if not weighed.active:
        return ous.suspended
    school = row.school
    if school is None or not school.abbreviation:
        raise ValueError(f"school {weighed.school_number} has no ABBREVIATION for its building OU")
    building = building_ou(school, settings)
    if weighed.enroll_status == -1 or weighed.school_number in settings.accounts.no_grade_ou_schools:
        return building
    grade = _as_int(row.grade_level)
    if grade is None:
        raise ValueError(_not_a_number("grade (GRADE_LEVEL)", row.grade_level))
    if grade not in ous.grades:
        raise ValueError(f"grade {grade} has no OU in [ous] grades")
    return building + ous.grades[grade]


def _placeholder(row: StudentRow, settings: Settings) -> bool:
    """Is the row's first or last name one of `accounts.bad_names` (a test or placeholder)?"""
    bad_names = settings.accounts.bad_names
    return (_clean_spaces(row.first_name).lower() in bad_names
            or _clean_spaces(row.last_name).lower() in bad_names)


def decide(rows: Sequence[StudentRow], settings: Settings,
           today: dt.date) -> tuple[Decision | None, tuple[Notice, ...]]:
    """The district-wide decision for the rows of one student number (SPEC section 3),
    and what is worth saying about it."""
    student_number = as_student_number(rows[0].student_number)
    email = email_for(student_number, settings)
    notices: list[Notice] = []

    def notice(level: Level, message: str) -> None:
        notices.append(Notice(level, str(student_number), email, message))

    kept = [r for r in rows if not _placeholder(r, settings)]
    if not kept:
        notice(Level.SKIP, "skipped: test or placeholder name "
                           f"({_clean_spaces(rows[0].first_name)} {_clean_spaces(rows[0].last_name)})")
        return None, tuple(notices)
    weighed = []
    for row in kept:
        try:
            weighed.append((_row_status(row, settings, today), row))
        except ValueError as exc:
            notice(Level.ERROR, f"bad PowerSchool data: {exc}; nothing changed for this student")
            return None, tuple(notices)
    if len(kept) > 1:
        schools = ", ".join(str(w.school_number) for w, _ in weighed)
        notice(Level.WARNING, f"{len(kept)} PowerSchool rows for this student (schools {schools}); "
                              "an active row wins, then the lowest school number")
    status, row = min(weighed, key=lambda pair: (not pair[0].should_be_active, pair[0].school_number))
    try:
        target_ou = _target_ou(row, status, settings)
    except ValueError as exc:
        notice(Level.ERROR, f"bad PowerSchool data: {exc}; nothing changed for this student")
        return None, tuple(notices)
    schema = settings.custom_schema
    attributes = {schema.school_field: str(status.school_number)}
    if status.class_of is not None:
        attributes[schema.grad_year_field] = str(status.class_of)
    elif row.class_of is None:
        notice(Level.WARNING, "CLASSOF is empty in PowerSchool: graduation year left out")
    else:
        notice(Level.WARNING, f"CLASSOF {row.class_of!r} is not a year: graduation year left out")
    decision = Decision(
        student_number=student_number, email=email,
        first_name=sys.intern(normalize_name(row.first_name)),
        last_name=sys.intern(normalize_name(row.last_name)),
        should_be_active=status.should_be_active, graduated=status.graduated,
        target_ou=sys.intern(target_ou), attributes=shared_mapping(tuple(attributes.items())),
        school_number=status.school_number,
    )
    return decision, tuple(notices)


def _name_problem(name: str, which: str) -> str | None:
    if not name:
        return f"{which} is empty"
    if len(name) > 60:
        return f"{which} is longer than 60 characters"
    return None


def change_for(decision: Decision, account: Account | None, settings: Settings,
               org_units: Mapping[str, str]) -> tuple[Change | None, tuple[Notice, ...]]:
    """What one account needs to match its decision: rules 1-5 of SPEC section 3."""
    if account is None:
        if not decision.should_be_active or decision.graduated:
            return None, ()  # rule 4, and no account is ever created for a graduate
        return _create_change(decision, settings, org_units)  # rule 1
    if decision.should_be_active:
        return _update_change(decision, account, settings, org_units)  # rule 2
    return _suspend_change(decision, account, settings, org_units)  # rule 3


def _notice(decision: Decision, level: Level, message: str) -> Notice:
    return Notice(level, str(decision.student_number), decision.email, message)


def _create_change(decision: Decision, settings: Settings,
                   org_units: Mapping[str, str]) -> tuple[Change | None, tuple[Notice, ...]]:
    """Rule 1: should be active, no account, not graduated: create it in one insert."""
    problems = [p for p in (_name_problem(decision.first_name, "first name"),
                            _name_problem(decision.last_name, "last name")) if p]
    if problems:
        return None, (_notice(decision, Level.ERROR,
                              f"cannot create the account: {' and '.join(problems)} in PowerSchool"),)
    target_ou = org_units.get(decision.target_ou.lower())
    if target_ou is None:
        return None, (_notice(decision, Level.ERROR,
                              f"cannot create the account: OU {decision.target_ou} does not exist in Google"),)
    after = {
        "primaryEmail": decision.email,
        "name": {"givenName": decision.first_name, "familyName": decision.last_name},
        "changePasswordAtNextLogin": settings.accounts.change_password_at_next_login,
        "orgUnitPath": target_ou,
        "customSchemas": {settings.custom_schema.category: dict(decision.attributes)},
    }
    return Change(decision.student_number, decision.email, Action.CREATE, ("create",), {}, after), ()


def _suspend_change(decision: Decision, account: Account, settings: Settings,
                    org_units: Mapping[str, str]) -> tuple[Change | None, tuple[Notice, ...]]:
    """Rule 3: should be suspended, account exists: suspend it and move it to its target OU
    (frozen OUs do not protect it); names and attributes are left alone."""
    ou_differs = account.org_unit.lower() != decision.target_ou.lower()
    if account.suspended and not ou_differs:
        return None, ()  # rule 5
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    labels: list[str] = []
    if not account.suspended:
        labels.append("suspend")
        before["suspended"], after["suspended"] = False, True
    if ou_differs:
        target_ou = org_units.get(decision.target_ou.lower())
        if target_ou is None:
            return None, (_notice(decision, Level.ERROR,
                                  f"not suspended: OU {decision.target_ou} does not exist in Google"),)
        labels.append("move")
        before["orgUnitPath"], after["orgUnitPath"] = account.org_unit, target_ou
    remove_groups = not account.suspended and settings.accounts.remove_groups_on_suspend
    return Change(decision.student_number, account.email, Action.SUSPEND, tuple(labels),
                  before, after, remove_groups=remove_groups), ()


def _update_change(decision: Decision, account: Account, settings: Settings,
                   org_units: Mapping[str, str]) -> tuple[Change | None, tuple[Notice, ...]]:
    """Rule 2: should be active, account exists: one update that unsuspends, moves (unless
    frozen), renames and sets the attributes, each only where it differs (rule 5)."""
    notices: list[Notice] = []
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    labels: list[str] = []
    if account.suspended:
        labels.append("unsuspend")
        before["suspended"], after["suspended"] = True, False
    if account.org_unit.lower() != decision.target_ou.lower():
        target_ou = org_units.get(decision.target_ou.lower())
        if is_frozen(account.org_unit, settings.ous.frozen):
            notices.append(_notice(decision, Level.WARNING, f"left in frozen OU {account.org_unit} "
                                                            f"(would move to {decision.target_ou})"))
        elif target_ou is None:
            return None, (_notice(decision, Level.ERROR,
                                  f"not changed: OU {decision.target_ou} does not exist in Google"),)
        else:
            labels.append("move")
            before["orgUnitPath"], after["orgUnitPath"] = account.org_unit, target_ou
    # A bad PowerSchool name keeps Google's; the other name is still brought in step.
    given, family = decision.first_name, decision.last_name
    for which, name, current in (("first name", given, account.given_name),
                                 ("last name", family, account.family_name)):
        problem = _name_problem(name, which)
        if problem and name.casefold() != current.casefold():
            notices.append(_notice(decision, Level.WARNING,
                                   f"{which} kept as {current!r} in Google: {problem} in PowerSchool"))
    if _name_problem(given, "first name"):
        given = account.given_name
    if _name_problem(family, "last name"):
        family = account.family_name
    if (given.casefold() != account.given_name.casefold()
            or family.casefold() != account.family_name.casefold()):
        labels.append("rename")
        before["name"] = {"givenName": account.given_name, "familyName": account.family_name}
        after["name"] = {"givenName": given, "familyName": family}
    if any(account.attributes.get(k) != v for k, v in decision.attributes.items()):
        category = settings.custom_schema.category
        labels.append("attributes")
        before["customSchemas"] = {category: {k: account.attributes.get(k) for k in decision.attributes}}
        after["customSchemas"] = {category: dict(decision.attributes)}
    if not labels:
        return None, tuple(notices)
    return Change(decision.student_number, account.email, Action.UPDATE, tuple(labels), before, after), tuple(notices)


def licence_change(decision: Decision, account: Account | None, change: Change | None,
                   settings: Settings, licensed: frozenset[str]) -> Change | None:
    """SPEC 8: release from graduates and from accounts the rules suspend; assign (with
    `assign`) to accounts that should be active, are not a graduate's and lack it, an
    account this run creates included.  Judged on the account as the run leaves it."""
    lic = settings.licenses
    if lic is None:
        return None
    sku = {"license": lic.sku_id}
    if account is None:
        if change is None or change.action != Action.CREATE:
            return None  # no account, none made: nothing to license
        holds = False
    else:
        holds = _key(account.email) in licensed
    if holds and _releases(decision, lic):
        return Change(decision.student_number, decision.email if account is None else account.email,
                      Action.LICENSE, (RELEASE_LICENSE,), sku, None)
    if not holds and _assigns(decision, lic):
        return Change(decision.student_number, decision.email if account is None else account.email,
                      Action.LICENSE, (ASSIGN_LICENSE,), None, sku)
    return None


def _releases(decision: Decision, lic: LicenseSettings) -> bool:
    """SPEC 8's release rule, for an account that holds the licence."""
    return (decision.graduated and lic.release_graduated) or (not decision.should_be_active and lic.release_suspended)


def _assigns(decision: Decision, lic: LicenseSettings) -> bool:
    """SPEC 8's assign rule, for an account that lacks the licence."""
    return lic.assign and decision.should_be_active and not decision.graduated


def stale_reason(change: Change, decision: Decision | None, settings: Settings) -> str | None:
    """Why today's decision no longer wants a reviewed plan's change; None when it does.

    A plan is never the authority on a student (SPEC 7): its change goes out only while
    PowerSchool as it is now calls for that kind of change -- an unsuspend, a move or a
    create for a student who should be active (no create for a graduate), a suspension for
    one who should not, a licence change by the rules of SPEC 8.
    """
    if decision is None:
        return "not a student in PowerSchool now (or bad data): skipped"
    lic = settings.licenses
    if change.action == Action.LICENSE and RELEASE_LICENSE in change.labels:
        if lic is not None and _releases(decision, lic):
            return None
        return "PowerSchool now says the student keeps the licence: not released"
    if change.action == Action.LICENSE:
        if lic is not None and _assigns(decision, lic):
            return None
        return "PowerSchool now says the student should not get the licence: not assigned"
    if change.action == Action.SUSPEND:
        return "PowerSchool now says the student should be active: not suspended" if decision.should_be_active else None
    if change.action == Action.CREATE and decision.graduated:
        return "PowerSchool now says the student has graduated (no account is created for a graduate): not created"
    if not decision.should_be_active:
        done = "created" if change.action == Action.CREATE else "changed (" + "+".join(change.labels) + ")"
        return f"PowerSchool now says the student should be suspended: not {done}"
    return None


def holds_values(account: Account | None, values: Mapping[str, Any]) -> bool:
    """Does the account hold these values, in a change's before/after shape?

    OU paths compare case-insensitively, names exactly, attributes as text; a
    `None` attribute means the field is absent.
    """
    if account is None:
        return False
    for key, value in values.items():
        if key == "suspended" and account.suspended != value:
            return False
        if key == "orgUnitPath" and account.org_unit.lower() != str(value).lower():
            return False
        if key == "name" and (account.given_name, account.family_name) != (
                value.get("givenName"), value.get("familyName")):
            return False
        if key == "customSchemas":
            for fields in value.values():
                for name, text in fields.items():
                    if account.attributes.get(name) != (None if text is None else str(text)):
                        return False
    return True


def _row_order(row: StudentRow) -> tuple:
    school = _as_int(row.school_id)
    return (school is None, school or 0, repr(row.enroll_status), repr(row.grade_level),
            repr(row.first_name), repr(row.last_name), repr(row.class_of), repr(row.student_number))


@dataclass(frozen=True)
class Decisions:
    """The PowerSchool half of a plan: one decision per student in scope, and the notices."""

    by_email: Mapping[str, Decision]
    notices: tuple[Notice, ...]


def decide_all(rows: Iterable[StudentRow], settings: Settings, today: dt.date, scope: Scope) -> Decisions:
    """Weigh every student with a row in scope; needs nothing from Google."""
    notices: list[Notice] = []
    by_number: dict[int, list[StudentRow]] = {}
    for row in rows:
        number = as_student_number(row.student_number)
        in_scope = row.school is not None and row.school.number in scope.school_numbers
        if number is None or number <= 0:
            if in_scope:
                who = f"{_clean_spaces(row.first_name)} {_clean_spaces(row.last_name)}".strip() or "(no name)"
                notices.append(Notice(Level.ERROR, _clean_spaces(row.student_number) or "(none)", "",
                                      f"bad PowerSchool data: STUDENT_NUMBER {row.student_number!r} "
                                      f"for {who} at school {row.school.number}; nothing changed"))
            continue
        by_number.setdefault(number, []).append(row)

    decisions: dict[str, Decision] = {}
    for number in sorted(by_number):
        # In a fixed order, so that the same rows give the same plan and messages every night
        # whatever order the database returns them in.
        student_rows = sorted(by_number[number], key=_row_order)
        in_scope = [r for r in student_rows if r.school is not None and r.school.number in scope.school_numbers]
        if not in_scope:
            continue
        if all(_placeholder(r, settings) for r in in_scope) and not all(_placeholder(r, settings) for r in student_rows):
            # Rows skipped for a bad name are dropped first (SPEC 3): a placeholder row at a
            # school of the scope does not bring the student's real rows elsewhere into it.
            notices.append(Notice(Level.SKIP, str(number), email_for(number, settings), (
                "skipped: test or placeholder name "
                f"({_clean_spaces(in_scope[0].first_name)} {_clean_spaces(in_scope[0].last_name)}) on every row "
                f"at the schools of {scope.describe()}; the student's other rows are at schools outside it")))
            continue
        # Rows whose SCHOOLID names no school belong to no scope and are not weighed,
        # but a NULL or non-numeric SCHOOLID is bad data for the student.
        weighable = [r for r in student_rows if r.school is not None or _as_int(r.school_id) is None]
        decision, said = decide(weighable, settings, today)
        notices.extend(said)
        if decision is not None and not decision.should_be_active:
            # Yet PowerSchool enrolls the student at a school it has no row for: that is doubt
            # enough not to suspend (a building's run never suspends a student active elsewhere).
            unknown = sorted({_as_int(r.school_id) for r in student_rows if r.school is None
                              and _as_int(r.school_id) is not None and _as_int(r.enroll_status) in (0, -1)})
            if unknown:
                notices.append(Notice(Level.ERROR, str(number), decision.email, (
                    f"not suspended: enrolled (ENROLL_STATUS 0 or -1) at school {', '.join(map(str, unknown))}, "
                    "which has no SCHOOLS row; add the school to SCHOOLS or end that enrollment in "
                    "PowerSchool; nothing changed")))
                continue
        if decision is not None:
            decisions[_key(decision.email)] = decision
    return Decisions(by_email=MappingProxyType(decisions), notices=tuple(notices))


def plan_changes(decisions: Decisions, directory: Directory, settings: Settings) -> Plan:
    """The Google half of a plan: what each decided student's account needs."""
    notices = list(decisions.notices)
    changes: list[Change] = []
    licences: list[Change] = []
    unchanged = 0
    for key, decision in decisions.by_email.items():
        account = directory.accounts.get(key)
        change, own = change_for(decision, account, settings, directory.org_units)
        notices.extend(own)
        failed = any(n.level == Level.ERROR for n in own)
        # A student failed for bad data keeps whatever licence they hold.
        licence = (None if failed or directory.licensed is None else
                   licence_change(decision, account, change, settings, directory.licensed))
        if change is not None:
            changes.append(change)
        if licence is not None:
            licences.append(licence)
        if change is None and licence is None and not failed:
            unchanged += 1
    # Licence changes follow the account changes: apply sends them after, releases first.
    return Plan(changes=tuple(changes + licences), notices=tuple(notices),
                decisions=decisions.by_email, unchanged=unchanged)


def plan(rows: Iterable[StudentRow], directory: Directory, settings: Settings,
         today: dt.date, scope: Scope) -> Plan:
    """Every change the scope needs, as a value.  No I/O, no clock, no environment."""
    return plan_changes(decide_all(rows, settings, today, scope), directory, settings)


def unowned_accounts(directory: Directory, numbers: set[int], settings: Settings) -> list[Account]:
    """Accounts under the student OU prefix whose address is none of these student numbers'."""
    prefix = settings.ous.student_prefix.lower()
    suffix = settings.google.email_suffix
    found = []
    for key, account in sorted(directory.accounts.items()):
        if not (account.org_unit.lower() + "/").startswith(prefix):
            continue
        local, _, domain = key.partition("@")
        # Only the exact address a student number gives: 01002@ is not student 1002's.
        number = int(local) if "@" + domain == suffix and local.isdigit() and str(int(local)) == local else None
        if number is None or number not in numbers:
            found.append(account)
    return found


# =============================================================================
# Safety rules
# =============================================================================
# When a plan must not be applied without --allow-mass-changes: PowerSchool returned
# nobody, a school lost too many students since the last run, or too many suspensions.
# Pure, like the plan.


def enrolled_counts(rows: Iterable[StudentRow], scope: Scope) -> dict[int, int]:
    """Students with ENROLL_STATUS 0 or -1 per school of the scope, the figures the
    school-drop rule compares from run to run.  Graduates told apart by their school's
    name, not their status, are counted too (in the Graduated Students school)."""
    students: dict[int, set[int]] = {n: set() for n in scope.school_numbers}
    for row in rows:
        number = as_student_number(row.student_number)
        if row.school is None or row.school.number not in students or number is None:
            continue
        if _as_int(row.enroll_status) in (0, -1):
            students[row.school.number].add(number)
    return {school: len(numbers) for school, numbers in students.items()}


def school_drops(previous: Mapping[int, int], current: Mapping[int, int], percent: float) -> list[str]:
    """Schools that had at least 20 active students and lost more than `percent` of them."""
    drops = []
    for school, now in sorted(current.items()):
        before = previous.get(school)
        if before is None or before < 20:
            continue
        # Exactly: "more than" the percentage, and 20 * (1 - 0.70) is 6.000000000000001 in floats.
        if now == 0 or (before - now) * 100 > decimal.Decimal(repr(percent)) * before:
            lost = 100 * (before - now) / before
            drops.append(f"school {school}: {before} -> {now} active students (-{lost:.0f}%)")
    return drops


def _had_students(scope: Scope, previous_counts: Mapping[int, int], directory: Directory | None,
                  settings: Settings) -> bool:
    """Did the scope have students before this run?  The school counts of the last run say so;
    for a school they have never counted, open accounts carrying its school number do."""
    if any(previous_counts.get(n, 0) > 0 for n in scope.school_numbers):
        return True
    never_counted = {str(n) for n in scope.school_numbers if n not in previous_counts}
    if not never_counted or directory is None:
        return False
    school_field = settings.custom_schema.school_field
    return any(not a.suspended and a.attributes.get(school_field) in never_counted
               for a in directory.accounts.values())


def _safety_problems(plan_: Plan, row_count: int, active: Mapping[int, int], scope: Scope,
                     settings: Settings, previous_counts: Mapping[int, int],
                     directory: Directory | None = None) -> list[str]:
    """Why this run must not go ahead without --allow-mass-changes; empty when it may."""
    # An empty read is alarming only for a scope that had students: a new building has none yet.
    if not row_count and _had_students(scope, previous_counts, directory, settings):
        return [f"PowerSchool returned no students for {scope.describe()} "
                f"({len(scope.school_numbers)} school(s)): stopping rather than suspending everyone; "
                "check the database"]
    problems = []
    drops = school_drops(previous_counts, active, settings.safety.max_school_drop_percent)
    if drops:
        problems.append(f"active students dropped by more than [safety] max_school_drop_percent = "
                        f"{settings.safety.max_school_drop_percent:g}% since the last run: " + "; ".join(drops))
    suspensions = plan_.suspensions()
    limit = settings.safety.max_suspensions
    if len(suspensions) > limit:
        by_school: Counter[str] = Counter()
        for change in suspensions:
            decision = plan_.decisions.get(change.email.lower())
            by_school[str(decision.school_number) if decision else "?"] += 1
        where = ", ".join(f"school {s}: {n}" for s, n in sorted(by_school.items()))
        problems.append(f"this run would suspend {len(suspensions)} accounts, more than "
                        f"[safety] max_suspensions = {limit} ({where})")
    releases = plan_.releases()
    if settings.licenses and len(releases) > settings.licenses.max_releases:
        problems.append(f"this run would release {len(releases)} licences {settings.licenses.sku_id}, more "
                        f"than [licenses] max_releases = {settings.licenses.max_releases}")
    return problems


def change_limit_problems(changes: Sequence[Change], settings: Settings, what: str) -> list[str]:
    """The mass-change limits for changes that are not a sync's plan (an undo): more
    suspensions than [safety] max_suspensions, or releases than [licenses] max_releases."""
    problems = []
    suspensions = sum("suspend" in c.labels for c in changes)
    if suspensions > settings.safety.max_suspensions:
        problems.append(f"{what} would suspend {suspensions} accounts, more than [safety] max_suspensions = "
                        f"{settings.safety.max_suspensions}")
    releases = sum(RELEASE_LICENSE in c.labels for c in changes)
    if settings.licenses and releases > settings.licenses.max_releases:
        problems.append(f"{what} would release {releases} licences {settings.licenses.sku_id}, more than "
                        f"[licenses] max_releases = {settings.licenses.max_releases}")
    return problems


# =============================================================================
# Apply
# =============================================================================
# Executes a plan's changes through the Directory API, one outcome per change; it decides
# nothing (a create that meets an existing account asks the runner's `reconcile`).


class Status(StrEnum):
    """What became of a change."""

    APPLIED = "applied"
    FAILED = "failed"
    STALE = "stale"                # the account changed since the plan: skipped
    PLANNED = "planned"            # a dry run's
    NOT_APPLIED = "not applied"    # stopped by a safety limit
    NOT_TRIED = "not tried"        # the run stopped handing out changes before this one


# Changes in a row that failed, none succeeding in between, before the run decides Google
# is down and stops: in an outage every change costs its whole retry schedule (about 30 s).
MAX_CONSECUTIVE_FAILURES = 20


class StopReason(StrEnum):
    """Why a run stopped handing out changes before the end of its plan."""

    INTERRUPTED = "interrupted"
    AUTHORIZATION_LOST = "Google's authorization was lost"
    JOURNAL_FAILED = "the journal could not be written"
    DEFECT = "an unexpected error"
    OUTAGE = f"a Google outage ({MAX_CONSECUTIVE_FAILURES} changes in a row failed)"

    @property
    def exit_code(self) -> int:
        return {StopReason.INTERRUPTED: EXIT_INTERRUPTED, StopReason.OUTAGE: EXIT_FAILURES}.get(self, EXIT_ERROR)


class Halt:
    """The one way to stop handing out changes: the first reason (and its message) wins.

    Called from worker threads, the journal writer and signal handlers; the lock is
    re-entrant because a signal handler runs on the main thread, possibly inside `stop`.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.reason: StopReason | None = None
        self.message = ""

    def stop(self, reason: StopReason, message: str) -> bool:
        """Stop for `reason`; False when the run was already stopping."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason, self.message = reason, message
            return True

    def __bool__(self) -> bool:
        return self.reason is not None


@dataclass
class Outcome:
    """What became of one change: its status and, unless applied or planned, why."""

    change: Change
    status: Status
    detail: str = ""
    groups_removed: tuple[str, ...] = ()
    note: str = ""
    # What was really sent when it differs from `change` (a create that met 409 and was
    # reconciled): None means `change` itself, () means nothing.
    made: tuple[Change, ...] | None = None
    # What the rules said about an account met on the way (a create's 409), for the log.
    notices: tuple[Notice, ...] = ()

    @property
    def result(self) -> str:
        """The outcome as the log, the report and the journal write it: `failed: <detail>`."""
        return f"{self.status}: {self.detail}" if self.detail else str(self.status)

    @property
    def ok(self) -> bool:
        return self.status == Status.APPLIED

    @property
    def sent(self) -> tuple[Change, ...]:
        return (self.change,) if self.made is None else self.made

    @property
    def failed(self) -> bool:
        return self.status == Status.FAILED


def failed_students(notices: Iterable[Notice], outcomes: Iterable[Outcome] = ()) -> set[tuple[str, str]]:
    """(student number, email) of every student with a bad-data error or a failed change."""
    failed = {(n.student_number, n.email) for n in notices if n.level == Level.ERROR}
    return failed | {(str(o.change.student_number), o.change.email) for o in outcomes if o.failed}


def _answer_lost(exc: BaseException) -> bool:
    """Could the call that raised `exc` have been applied?  Only when its answer was lost:
    a timeout, a dropped connection, a 5xx.  A 429 or 403 rate-limit refusal was not applied."""
    if isinstance(exc, _http_error_class()):
        return _http_error_parts(exc)[0] >= 500
    return _is_network_error(exc) and not isinstance(exc, ConnectionRefusedError)


class _WatchedRequest:
    """A built request that remembers whether one of its tries lost its answer: a create
    answered 409, or a group removal answered 404, after such a try met what that try did."""

    def __init__(self, request: Any):
        self.request, self.answer_lost = request, False

    def execute(self, **options: Any) -> Any:
        try:
            return self.request.execute(**options)
        except Exception as exc:
            self.answer_lost = self.answer_lost or _answer_lost(exc)
            raise


# What a create that met an existing account does instead: given the planned create and
# the account Google holds, the update the rules want (None: in step) and their notices.
Reconcile = Callable[[Change, Account], tuple[Change | None, tuple[Notice, ...]]]


# Google's answer to an assign when every licence of the SKU is taken ("There aren't enough
# available licenses for the specified product-SKU pair"), in the words it has used.
_OUT_OF_SEATS = re.compile(r"enough\s+(available\s+)?licen[cs]es|no\s+(more\s+)?(available\s+)?licen[cs]es"
                           r"|insufficient\s+(number\s+of\s+)?licen[cs]es|out\s+of\s+(seats|licen[cs]es)"
                           r"|licen[cs]es?\s+(limit|quota|count)\s+(is\s+|has\s+been\s+)?(reached|exceeded)"
                           r"|seats?\b", re.IGNORECASE)
# An assign answered that the account holds the licence already (409 duplicate, or in words).
_ALREADY_HELD = re.compile(r"already\s+(has|have|holds?|assigned|exists)|duplicate", re.IGNORECASE)
_OTHER_SKU = re.compile(r"another|different|other\s+sku", re.IGNORECASE)
# A release answered that the account holds no such licence (404, or in words).
_NOT_HELD = re.compile(r"(does\s+not|doesn't)\s+have\s+(a|the|this|any)\s+licen[cs]e", re.IGNORECASE)
# A licence call for an account the Licensing API does not know yet (just created).
_UNKNOWN_USER = re.compile(r"not\s+(been\s+)?found|does\s+not\s+exist|not\s+yet|provision", re.IGNORECASE)


class Applier:
    """Executes a plan's changes through the Directory API.

    It plans nothing: a create answered 409 (the account exists) is handed to `reconcile`,
    built by the runner from the rules; without one (a reviewed plan, an undo) the account
    must already hold the planned values.
    """

    def __init__(self, client: DirectoryClient, settings: Settings, password: str | None,
                 creates: RateLimiter, reconcile: Reconcile | None = None, workers: int = 8,
                 halt: Halt | None = None):
        self.client, self.settings, self._password = client, settings, password
        self.creates, self.reconcile, self.workers = creates, reconcile, workers
        self.halt = halt if halt is not None else Halt()
        self._failed_in_a_row = 0
        self._outage_lock = threading.Lock()
        # Google's word that no licences of the SKU are left; then the assigns not made.
        self.seats_gone: str | None = None
        self.seatless: list[Outcome] = []

    def apply(self, changes: Sequence[Change], progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        """Account changes first; then licence releases, then assigns, so that the seats freed
        tonight serve tonight's new students (SPEC 8).  A licence change waits for its
        account's change: when that did not go through, neither does the licence change."""
        accounts = [c for c in changes if c.action != Action.LICENSE]
        outcomes = self._apply_together(accounts, progress)
        undone = {_key(o.change.email) for o in outcomes if not o.ok}
        for label in (RELEASE_LICENSE, ASSIGN_LICENSE):
            wave = [c for c in changes if c.action == Action.LICENSE and label in c.labels]
            waiting = [c for c in wave if _key(c.email) not in undone]
            for change in wave:
                if _key(change.email) in undone:
                    outcome = (Outcome(change, Status.NOT_TRIED, str(self.halt.reason)) if self.halt else
                               Outcome(change, Status.FAILED, "not attempted: the account change before it "
                                                              "did not go through"))
                    outcomes.append(outcome)
                    if progress and not self.halt:
                        progress(outcome)
            outcomes += self._apply_together(waiting, progress)
        return outcomes

    def _apply_together(self, changes: Sequence[Change],
                        progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        """Apply `changes` on the worker threads, handing them out one at a time until they
        end or `halt` stops the run; a change never handed out is NOT_TRIED.  The ones in
        flight when the run stops finish.  `progress` gets each outcome as it arrives, on
        the calling thread (the journal is written there); outcomes in the order of `changes`."""
        outcomes: list[Outcome | None] = [None] * len(changes)
        arrived: queue.Queue[tuple[int, Outcome] | None] = queue.Queue()
        pending = iter(enumerate(changes))
        handing = threading.Lock()

        def next_change() -> tuple[int, Change] | None:
            with handing:
                return None if self.halt else next(pending, None)

        def work() -> None:
            try:
                while (item := next_change()) is not None:
                    outcome = self.apply_one(item[1])
                    self._watch_for_outage(outcome)  # here, before this worker takes another
                    arrived.put((item[0], outcome))
            finally:
                arrived.put(None)  # this worker is done

        workers = min(self.workers, len(changes))
        failure: BaseException | None = None
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(workers, 1),
                                                   thread_name_prefix="apply") as pool:
            running = [pool.submit(work) for _ in range(workers)]
            done = 0
            while done < workers:
                try:
                    try:  # a short wait, so that Ctrl-C is handled promptly on Windows too
                        item = arrived.get(timeout=0.25)
                    except queue.Empty:
                        continue
                    if item is None:
                        done += 1
                        continue
                    outcomes[item[0]] = item[1]
                    if progress:
                        progress(item[1])
                except BaseException as exc:  # re-raised below, once the workers stopped
                    # Whatever broke here (a defect while logging or journalling, a Ctrl-C
                    # with no handler), the workers must not go on applying changes nobody
                    # records: stop handing them out, and keep collecting (and journalling
                    # where possible) the ones under way before raising it.
                    self._stop_for(exc)
                    if failure is None:
                        failure = exc
                    else:
                        log.debug("again while stopping: %s", _describe_any(exc), exc_info=True)
        if failure is not None:
            raise failure
        for future in running:
            future.result()  # a defect in a worker is not swallowed
        return [outcome or Outcome(change, Status.NOT_TRIED, str(self.halt.reason))
                for outcome, change in zip(outcomes, changes)]

    def _stop_for(self, exc: BaseException) -> None:
        """Stop handing out changes because `exc` broke the collecting of outcomes."""
        if isinstance(exc, KeyboardInterrupt):
            self.halt.stop(StopReason.INTERRUPTED, "interrupted (Ctrl-C): no new change was started")
        else:
            self.halt.stop(StopReason.DEFECT, f"an unexpected error ({type(exc).__name__}) while an outcome "
                           "was logged or journalled: no new change was started; see the log")

    def _watch_for_outage(self, outcome: Outcome) -> None:
        if any(outcome is seatless for seatless in self.seatless):
            return  # Google said no licences are left: one answer, not an outage
        with self._outage_lock:
            if outcome.ok:
                self._failed_in_a_row = 0
                return
            if not outcome.failed:
                return
            self._failed_in_a_row += 1
            if self._failed_in_a_row >= MAX_CONSECUTIVE_FAILURES:
                self.halt.stop(StopReason.OUTAGE, f"{self._failed_in_a_row} changes in a row failed, none "
                               f"succeeding in between (the last: {outcome.detail}): an outage at Google, "
                               "so the run stopped applying; the next run tries the rest")

    def apply_one(self, change: Change) -> Outcome:
        """Apply one change; every failure becomes the change's outcome."""
        try:
            if change.action == Action.CREATE:
                return self._create(change)
            if change.action == Action.SUSPEND:
                return self._suspend(change)
            if change.action == Action.LICENSE:
                return self._licence(change)
            return Outcome(change, Status.APPLIED, note=self._update(change.email, change.after))
        except Exception as exc:  # one student's failure must not stop the others' outcomes
            return self._failure(change, exc)

    def _failure(self, change: Change, exc: Exception, notices: tuple[Notice, ...] = ()) -> Outcome:
        """The outcome of a change whose call raised `exc`."""
        from google.auth.exceptions import RefreshError

        if isinstance(exc, _http_error_class()):
            return Outcome(change, Status.FAILED, f"{describe_http_error(exc)}", notices=notices)
        if isinstance(exc, RefreshError):
            # Nothing after this can succeed: stop handing out changes.
            self.halt.stop(StopReason.AUTHORIZATION_LOST, _describe_refresh_error(exc, self.settings))
            return Outcome(change, Status.FAILED, "Google authorization was lost", notices=notices)
        if _is_network_error(exc):
            return Outcome(change, Status.FAILED, f"connection error ({type(exc).__name__})", notices=notices)
        log.debug("unexpected error applying %s", change.email, exc_info=True)
        return Outcome(change, Status.FAILED, f"unexpected {type(exc).__name__} (details in the log)", notices=notices)

    def _update(self, email: str, body: Mapping[str, Any]) -> str:
        """Send an update; its note ("" as a rule).  When every try failed and one of them lost
        its answer, the update may have been applied all the same: one read tells."""
        users = self.client.resource("users")
        update = _WatchedRequest(users.update(userKey=email, body=dict(body), fields="primaryEmail"))
        try:
            self.client.call(update)
            return ""
        except Exception:
            if not update.answer_lost or not self._holds(email, body):
                raise
        return "applied although its answers were lost: the account read back holds the new values"

    def _holds(self, email: str, body: Mapping[str, Any]) -> bool:
        """Does the account hold `body`'s values now?  One try (an outage must not cost another
        retry schedule per change); False when it cannot be read."""
        category = self.settings.custom_schema.category
        get = self.client.resource("users").get(userKey=email, projection="custom", customFieldMask=category,
                                                fields=_USER_FIELDS)
        try:
            resource = self.client.call(get, attempts=1)
        except Exception:  # the update's own error is the one to report
            return False
        account = account_from_resource(resource, category)
        return account.email.lower() == email.lower() and holds_values(account, body)

    def _create(self, change: Change) -> Outcome:
        users = self.client.resource("users")
        insert = _WatchedRequest(users.insert(body=dict(change.after, password=self._password),
                                              fields="primaryEmail"))
        try:
            self.client.call(insert, limiters=(self.creates,))
            return Outcome(change, Status.APPLIED)
        except _http_error_class() as exc:
            if _http_error_parts(exc)[0] != 409:
                raise
        # 409: the address exists after all.  After a try whose answer was lost it is our
        # own account; otherwise it was there before (a 429 refusal created nothing).  Either
        # way, read it and bring it in step by rule 2 -- unless the address belongs to
        # another account: a get by an alias answers with the alias's owner.
        ours = insert.answer_lost
        made: tuple[Change, ...] = (change,) if ours else ()
        note = "created (the first answer was lost)" if ours else "account already existed"
        notices: tuple[Notice, ...] = ()
        step = "reading the account back"
        try:
            get = users.get(userKey=change.email, projection="custom",
                            customFieldMask=self.settings.custom_schema.category, fields=_USER_FIELDS)
            account = account_from_resource(self._read_new_account(get), self.settings.custom_schema.category)
            if account.email.lower() != change.email.lower():
                return Outcome(change, Status.FAILED, f"address {change.email} is an alias of {account.email}; "
                               "nothing was changed (remove the alias in the Admin console, then the next run "
                               "creates the account)", made=())
            if self.reconcile is None:
                # A reviewed plan: no PowerSchool decision to fall back on, only the plan.
                if holds_values(account, {k: v for k, v in change.after.items() if k != "primaryEmail"}):
                    return Outcome(change, Status.APPLIED, note=f"{note}, as planned", made=made)
                if ours:  # made by us, yet not as planned: a failure, but the create stays in the record
                    return Outcome(change, Status.FAILED, "the account does not hold the planned values",
                                   note=note, made=made)
                return Outcome(change, Status.STALE, "the account exists now, unlike when the plan was made", made=())
            step = "weighing the account"
            follow_up, notices = self.reconcile(change, account)
            if follow_up is None:
                return Outcome(change, Status.APPLIED, note=f"{note}, in step", made=made, notices=notices)
            if follow_up.action == Action.SUSPEND:  # cannot happen for a should-be-active decision
                return Outcome(change, Status.FAILED, "account exists and would be suspended", note=note if ours else "",
                               made=made, notices=notices)
            step = f"bringing it in step ({follow_up.describe()})"
            self._update(follow_up.email, follow_up.after)
        except Exception as exc:  # the rules' notices still reach the log
            if ours:
                # Our own create went through: whatever failed after it, the account we made
                # must be in the journal (as applied), so that --undo suspends it.
                failure = self._failure(change, exc, notices)
                return dataclasses.replace(failure, detail=f"{step}: {failure.detail}", note=note, made=made)
            if step.startswith("bringing"):
                return self._failure(change, exc, notices)
            raise
        return Outcome(change, Status.APPLIED, note=f"{note}: {follow_up.describe()}", made=made + (follow_up,),
                       notices=notices)

    def _read_new_account(self, get: Any) -> Any:
        """Read an account that "already exists": Google may answer 404 for a few seconds
        after it was created."""
        for wait in (1.0, 2.0, 4.0, None):
            try:
                return self.client.call(get)
            except _http_error_class() as exc:
                if _http_error_parts(exc)[0] != 404 or wait is None:
                    raise
                self.client.policy.sleep(wait)
        raise AssertionError("unreachable")

    def _suspend(self, change: Change) -> Outcome:
        removed: list[str] = []
        step = "listing its groups"
        try:
            if change.remove_groups:
                # Groups go first: if a removal fails the account stays active, and the next
                # run, seeing it active, removes and suspends again.
                members = self.client.resource("members")
                for group in self._groups_of(change.email):
                    step = f"removing from group {group}"
                    if self._remove_member(members, group, change.email):
                        removed.append(group)
            step = "suspending after group removal" if change.remove_groups else ""
            note = self._update(change.email, change.after)
        except Exception as exc:  # any failure, authorization lost included: keep what was removed
            failure = self._failure(change, exc)
            detail = failure.detail if not step else f"{step}: {failure.detail}" + (
                "" if step.startswith("suspending") else "; not suspended")
            return dataclasses.replace(failure, detail=detail, groups_removed=tuple(removed))
        return Outcome(change, Status.APPLIED, groups_removed=tuple(removed), note=note)

    def _licence(self, change: Change) -> Outcome:
        """Release or assign the licence of [licenses]; a plan's other SKU is never sent."""
        lic = self.settings.licenses
        if lic is None or change.sku != lic.sku_id:
            return Outcome(change, Status.FAILED, f"not sent: the settings' [licenses] is not for {change.sku}")
        assignments = self.client.licence_assignments()
        if RELEASE_LICENSE in change.labels:
            return self._release(change, _WatchedRequest(assignments.delete(
                productId=lic.product_id, skuId=lic.sku_id, userId=change.email)))
        return self._assign(change, _WatchedRequest(assignments.insert(
            productId=lic.product_id, skuId=lic.sku_id, body={"userId": change.email})))

    def _release(self, change: Change, delete: _WatchedRequest) -> Outcome:
        try:
            self.client.call(delete)
        except _http_error_class() as exc:
            status, _, message = _http_error_parts(exc)
            gone = status == 404 or (400 <= status < 500 and bool(_NOT_HELD.search(message)))
            if gone and delete.answer_lost:  # our own earlier try released it
                return Outcome(change, Status.APPLIED, note="released (the first answer was lost)")
            if gone:  # the licence is gone already: what the release wanted
                return Outcome(change, Status.APPLIED, note="the licence was gone already", made=())
            if status == 412 and "auto" in message.lower():
                return Outcome(change, Status.FAILED, (
                    f"the licence was given by automatic licensing and cannot be taken back through the "
                    f"API ({describe_http_error(exc)}): turn off automatic licensing for this account's "
                    "organizational unit in the Admin console (Billing > Subscriptions > the "
                    "subscription > Licence settings), or release it there"))
            raise
        return Outcome(change, Status.APPLIED)

    def _assign(self, change: Change, insert: _WatchedRequest) -> Outcome:
        sku = change.sku
        if self.seats_gone is not None:
            return self._seatless(Outcome(change, Status.FAILED, f"not assigned: no licences {sku} left"))
        # A new account may be unknown to the Licensing API for a few seconds.
        for wait in (1.0, 2.0, 4.0, None):
            try:
                self.client.call(insert)
                return Outcome(change, Status.APPLIED)
            except _http_error_class() as exc:
                status, _, message = _http_error_parts(exc)
                said = " ".join([message, *_error_reasons(exc)])
                # A 409 naming another SKU is a conflict, not this licence held already.
                held = ((status == 409 or (400 <= status < 500 and bool(_ALREADY_HELD.search(said))))
                        and not _OTHER_SKU.search(said))
                if held and insert.answer_lost:  # our own earlier try assigned it
                    return Outcome(change, Status.APPLIED, note="assigned (the first answer was lost)")
                if held:  # held already: what the assign wanted
                    return Outcome(change, Status.APPLIED, note="the account held the licence already", made=())
                if 400 <= status < 500 and _OUT_OF_SEATS.search(message):
                    self.seats_gone = self.seats_gone or describe_http_error(exc)
                    return self._seatless(Outcome(change, Status.FAILED, f"not assigned: no licences {sku} left"))
                unknown = status == 404 or (400 <= status < 500 and bool(_UNKNOWN_USER.search(message)))
                if not unknown or wait is None:
                    raise
                self.client.policy.sleep(wait)
        raise AssertionError("unreachable")

    def _seatless(self, outcome: Outcome) -> Outcome:
        self.seatless.append(outcome)
        return outcome

    def _remove_member(self, members: Any, group: str, email: str) -> bool:
        """Remove `email` from `group`; False when somebody else had already removed it.

        A 404 after one of our own tries lost its answer is that try's doing: ours.
        """
        delete = _WatchedRequest(members.delete(groupKey=group, memberKey=email))
        try:
            self.client.call(delete)
            return True
        except _http_error_class() as exc:
            if _http_error_parts(exc)[0] != 404:
                raise
            return delete.answer_lost

    def _groups_of(self, email: str) -> list[str]:
        groups_api = self.client.resource("groups")
        request = groups_api.list(userKey=email, maxResults=200, fields="nextPageToken,groups(email)",
                                  prettyPrint=False)
        groups = []
        while request is not None:
            answer = self.client.call(request)
            groups.extend(g["email"] for g in answer.get("groups", []) or [] if g.get("email"))
            request = groups_api.list_next(request, answer)
        return groups


# =============================================================================
# Run files
# =============================================================================
# What a run keeps in the logs folder: plan files for review, the journal that --undo
# reads (and the changes that reverse it), the school counts of the last run, the lock that
# keeps runs apart, and the run's log file.

PLAN_FORMAT = "student_sync plan 1"


# A run id: the start time, the mark of the settings file that ran it (none in the ids of runs
# from before marks existed), and a counter for the second run started in the same second.
_RUN_ID = re.compile(r"(\d{8}-\d{6})(?:-([0-9a-f]{8}))?(?:-(\d+))?")


def run_mark(run_id: Any) -> str | None:
    """The settings file's mark a run id carries; None for an id from before marks (or no run id)."""
    match = _RUN_ID.fullmatch(run_id) if isinstance(run_id, str) else None
    return match.group(2) if match else None


def _jsonable(value: Any) -> Any:
    """Plain JSON values from settings records, sets and read-only mappings."""
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def settings_fingerprint(settings: Settings) -> str:
    """A digest of the settings that decide what a change is (not logging, limits or auth)."""
    deciding = {
        "domain": settings.google.domain,
        "email_suffix": settings.google.email_suffix,
        "accounts": _jsonable(settings.accounts),
        "ous": _jsonable(settings.ous),
        "custom_schema": _jsonable(settings.custom_schema),
    }
    if settings.licenses:  # left out without, so that older plans keep their fingerprint
        deciding["licenses"] = {key: value for key, value in _jsonable(settings.licenses).items()
                                if key not in ("max_releases", "customer_id")}
    text = json.dumps(deciding, sort_keys=True, ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def change_to_json(change: Change) -> dict[str, Any]:
    return {
        "student_number": change.student_number, "email": change.email, "action": change.action,
        "labels": list(change.labels), "before": _jsonable(change.before),
        "after": _jsonable(change.after), "remove_groups": change.remove_groups,
        "detail": change.describe(),
    }


def change_from_json(entry: Mapping[str, Any]) -> Change:
    """A Change from a plan file or journal entry; KeyError/TypeError/ValueError when malformed."""
    action = entry["action"]
    if action not in tuple(Action):
        raise ValueError(f"unknown action {action!r}")
    if action == Action.LICENSE:
        return _licence_change_from_json(entry)
    if not isinstance(entry["before"], dict) or not isinstance(entry["after"], dict):
        raise ValueError("before and after must be objects")
    return Change(
        student_number=int(entry["student_number"]), email=str(entry["email"]), action=Action(action),
        labels=tuple(str(label) for label in entry["labels"]), before=entry["before"],
        after=entry["after"], remove_groups=bool(entry.get("remove_groups", False)),
    )


def _licence_change_from_json(entry: Mapping[str, Any]) -> Change:
    """A licence change: exactly one label, and {"license": sku} on one side, null on the other."""
    labels = tuple(entry["labels"])
    before, after = entry["before"], entry["after"]
    if labels == (RELEASE_LICENSE,):
        held, other = before, after
    elif labels == (ASSIGN_LICENSE,):
        held, other = after, before
    else:
        raise ValueError(f'a licence change is labelled "{ASSIGN_LICENSE}" or "{RELEASE_LICENSE}", not {list(labels)}')
    if (other is not None or not isinstance(held, dict) or set(held) != {"license"}
            or not isinstance(held["license"], str) or not held["license"]):
        raise ValueError('a licence change goes from {"license": SKU} to null, or back')
    return Change(student_number=int(entry["student_number"]), email=str(entry["email"]),
                  action=Action.LICENSE, labels=labels, before=before, after=after)


# What each label changes, and which labels each action may carry (SPEC section 3).
_LABEL_FIELDS = {"suspend": "suspended", "unsuspend": "suspended", "move": "orgUnitPath",
                 "rename": "name", "attributes": "customSchemas"}
_ACTION_LABELS = {"create": {"create"}, "update": {"unsuspend", "move", "rename", "attributes"},
                  "suspend": {"suspend", "move"}}
_CREATE_FIELDS = ("primaryEmail", "name", "changePasswordAtNextLogin", "orgUnitPath", "customSchemas")


def student_number_of(address: str, settings: Settings) -> int | None:
    """The student number whose address this is by rule "email" (digits, no leading zero,
    then `email_suffix`); None for any other address: staff, leading zeros, other domains."""
    # ASCII first: str.lower() maps look-alikes onto ASCII (KELVIN SIGN U+212A -> "k").
    local, at, domain = address.partition("@")
    if not address.isascii() or not at or ("@" + domain).lower() != settings.google.email_suffix.lower():
        return None
    if not (local.isascii() and local.isdigit()) or local != str(int(local)) or int(local) <= 0:
        return None
    return int(local)


def change_problem(entry: Any, settings: Settings, *, restoring: bool = False) -> str | None:
    """Why a change read from a plan file (or, `restoring`, a journal) is not one the rules
    could have made; None when it is.

    A plan or journal is input, not authority: it may only touch a student's address, with
    the actions and fields the rules write, and must carry the "now" value of every field
    it changes.  A journal's undo restores earlier values, so its OUs and names are those
    the accounts had, not only those the rules target.
    """
    if not isinstance(entry, Mapping):
        return "is not an object"
    address, number = entry.get("email"), entry.get("student_number")
    if not isinstance(address, str):
        return f"email {address!r} is not an address"
    if type(number) is not int:
        return f"student_number {number!r} is not a student number"
    if student_number_of(address, settings) != number:
        return (f"{address} is not the address of student {number} "
                f"({number}{settings.google.email_suffix}): only student accounts can be changed")
    action, labels = entry.get("action"), entry.get("labels")
    before, after = entry.get("before"), entry.get("after")
    if action == Action.LICENSE:
        return _licence_problem(labels, before, after, settings, restoring)
    if action not in _ACTION_LABELS:
        return f"action {action!r} is not create, update, suspend or license"
    if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels)
            or len(set(labels)) != len(labels)):
        return f"labels {labels!r} must be a list of different kinds of change"
    allowed = _ACTION_LABELS[action]
    if restoring and action != "create":  # an undo's reversal: suspend+rename, unsuspend+move...
        allowed = {"suspend", "move", "rename", "attributes"} if action == "suspend" else set(allowed)
    wrong = [x for x in labels if x not in allowed]
    if wrong:
        return f"label {wrong[0]!r} is not one {'an' if action[0] in 'aeiou' else 'a'} {action} has"
    if action == "suspend" and "suspend" not in labels and "move" not in labels:
        return "a suspend change must suspend or move"
    if not isinstance(before, Mapping) or not isinstance(after, Mapping):
        return "before and after must be objects"
    remove_groups = entry.get("remove_groups", False)
    if type(remove_groups) is not bool or (remove_groups and (action != "suspend" or "suspend" not in labels)):
        return "remove_groups belongs to a suspension that takes an active account to suspended only"
    if remove_groups and not restoring and not settings.accounts.remove_groups_on_suspend:
        return "remove_groups is true, but [accounts] remove_groups_on_suspend is off"
    if action == "create":
        return _create_problem(address, labels, before, after, settings, restoring)
    return _update_problem(action, labels, before, after, settings, restoring)


def _licence_problem(labels: Any, before: Any, after: Any, settings: Settings, restoring: bool) -> str | None:
    """A licence change assigns or releases the configured SKU, and nothing else (SPEC 8)."""
    if labels == [RELEASE_LICENSE]:
        held, other = before, after
    elif labels == [ASSIGN_LICENSE]:
        held, other = after, before
    else:
        return f'a licence change is labelled "{ASSIGN_LICENSE}" or "{RELEASE_LICENSE}", not {labels!r}'
    if (other is not None or not isinstance(held, Mapping) or set(held) != {"license"}
            or not isinstance(held["license"], str) or not held["license"]):
        return 'a licence change goes from {"license": SKU} to null, or back'
    if restoring:  # an undo gives back what the run took, whatever the settings say now
        return None
    if settings.licenses is None:
        return "these settings have no [licenses] section: no licence change can be applied"
    if held["license"] != settings.licenses.sku_id:
        return f"licence {held['license']} is not [licenses] sku_id {settings.licenses.sku_id}"
    return None


def _unknown_fields(values: Mapping[str, Any], known: Iterable[str]) -> str | None:
    extra = sorted(set(values) - set(known))
    if extra:
        return f"field {', '.join(map(str, extra))} is not one the rules write"
    return None


def _create_problem(address: str, labels: list, before: Mapping, after: Mapping,
                    settings: Settings, restoring: bool) -> str | None:
    if before:
        return "a create has no before values"
    problem = _unknown_fields(after, _CREATE_FIELDS)
    if problem:
        return problem
    missing = [f for f in _CREATE_FIELDS if f not in after]
    if missing:
        return f"a create must send {', '.join(missing)}"
    primary = after["primaryEmail"]
    if not isinstance(primary, str) or not primary.isascii() or primary.lower() != address.lower():
        return f"primaryEmail {primary!r} is not the change's address"
    if type(after["changePasswordAtNextLogin"]) is not bool:
        return "changePasswordAtNextLogin must be true or false"
    if restoring:  # what the run created under the settings of its day: only its shape is checked
        if not isinstance(after["orgUnitPath"], str) or not after["orgUnitPath"].startswith("/"):
            return f"orgUnitPath {after['orgUnitPath']!r} is not an OU path"
        return (_name_value_problem(after["name"], "after", check_rules=True)
                or _attributes_problem(after["customSchemas"], "after", settings, restoring=True))
    if after["changePasswordAtNextLogin"] is not settings.accounts.change_password_at_next_login:
        return ("changePasswordAtNextLogin differs from [accounts] change_password_at_next_login = "
                f"{str(settings.accounts.change_password_at_next_login).lower()}")
    return (_name_value_problem(after["name"], "after", check_rules=True)
            or _target_ou_problem(after["orgUnitPath"], "create", settings)
            or _attributes_problem(after["customSchemas"], "after", settings, create=True))


def _update_problem(action: str, labels: list, before: Mapping, after: Mapping,
                    settings: Settings, restoring: bool) -> str | None:
    fields = {_LABEL_FIELDS[x] for x in labels}
    problem = _unknown_fields(after, _LABEL_FIELDS.values()) or _unknown_fields(before, _LABEL_FIELDS.values())
    if problem:
        return problem
    if set(after) != fields:
        return f"labels {', '.join(labels)} do not match the fields it sends ({', '.join(sorted(after)) or 'none'})"
    missing = sorted(fields - set(before))
    if missing or set(before) != fields:
        return (f"before must hold the now value of every field it changes (missing: "
                f"{', '.join(missing) or 'none'})")
    if "suspended" in fields:
        suspending = "suspend" in labels
        if before["suspended"] is suspending or after["suspended"] is not suspending:
            return (f"label {'suspend' if suspending else 'unsuspend'} must take suspended from "
                    f"{str(not suspending).lower()} to {str(suspending).lower()}")
    if "orgUnitPath" in fields:
        for side, value in (("before", before["orgUnitPath"]), ("after", after["orgUnitPath"])):
            if not isinstance(value, str) or not value.startswith("/"):
                return f"{side} orgUnitPath {value!r} is not an OU path"
        if not restoring:
            problem = _target_ou_problem(after["orgUnitPath"], action, settings)
            if problem:
                return problem
            if action == "update" and is_frozen(before["orgUnitPath"], settings.ous.frozen):
                return f"moves an active student out of the frozen OU {before['orgUnitPath']}"
    if "name" in fields:
        problem = (_name_value_problem(before["name"], "before", check_rules=False)
                   or _name_value_problem(after["name"], "after", check_rules=not restoring))
        if problem:
            return problem
    if "customSchemas" in fields:
        problem = (_attributes_problem(before["customSchemas"], "before", settings, restoring=restoring)
                   or _attributes_problem(after["customSchemas"], "after", settings, restoring=restoring))
        if problem:
            return problem
        if (set(before["customSchemas"]) != set(after["customSchemas"]) or set(next(iter(
                before["customSchemas"].values()))) != set(next(iter(after["customSchemas"].values())))):
            return "before must hold the now value of every attribute it changes"
    return None


def _look_alike(text: str) -> bool:
    """Does the text hold a character that str.lower() maps onto ASCII from outside it
    (KELVIN SIGN U+212A -> "k"), so that it would pass for another path?"""
    return not text.isascii() and any(not ch.isascii() and ch.lower().isascii() for ch in text)


def is_student_ou(path: str, settings: Settings) -> bool:
    """Is this an OU the rules put a student in: under the student prefix, or the suspended
    or graduated OU (case-insensitive, as Google compares OU paths)?"""
    ous, lower = settings.ous, path.lower()
    if _look_alike(path):
        return False
    return ((lower + "/").startswith(ous.student_prefix.lower())
            or lower in (ous.suspended.lower(), ous.graduated.lower()))


def _target_ou_problem(path: Any, action: str, settings: Settings) -> str | None:
    """An OU the rules can send: a create or update goes under the student prefix (or, for a
    graduate in summer grace, the graduated OU); a suspension to the suspended or graduated OU."""
    ous = settings.ous
    if not isinstance(path, str) or not path.startswith("/"):
        return f"orgUnitPath {path!r} is not an OU path"
    if _look_alike(path):
        return f"orgUnitPath {path!r} holds a character that only looks like a letter of the alphabet"
    lower = path.lower()
    under_prefix = (lower + "/").startswith(ous.student_prefix.lower())
    if action == "suspend":
        ok = lower in (ous.suspended.lower(), ous.graduated.lower())
        where = f"[ous] suspended or graduated ({ous.suspended}, {ous.graduated})"
    elif action == "create":
        ok = under_prefix
        where = f"under [ous] student_prefix {ous.student_prefix}"
    else:
        ok = under_prefix or lower == ous.graduated.lower()
        where = f"under [ous] student_prefix {ous.student_prefix} or [ous] graduated {ous.graduated}"
    if ok:
        return None
    return f"orgUnitPath {path} is not an OU the rules send for {'an' if action[0] in 'aeiou' else 'a'} {action} ({where})"


def _name_value_problem(value: Any, side: str, *, check_rules: bool) -> str | None:
    if not isinstance(value, Mapping) or set(value) != {"givenName", "familyName"} or not all(
            isinstance(v, str) for v in value.values()):
        return f"{side} name must hold exactly givenName and familyName, as text"
    if check_rules:
        for which, text in (("givenName", value["givenName"]), ("familyName", value["familyName"])):
            if not text.strip() or len(text) > 60:
                return f"{side} name {which} {text!r} is empty or longer than 60 characters"
    return None


def _attributes_problem(value: Any, side: str, settings: Settings, *, create: bool = False,
                        restoring: bool = False) -> str | None:
    cs = settings.custom_schema
    if restoring:  # a journal's: the category and fields of its day, which the settings may have renamed since
        return _journal_attributes_problem(value, side)
    if not isinstance(value, Mapping) or set(value) != {cs.category}:
        names = ", ".join(map(str, value)) if isinstance(value, Mapping) else repr(value)
        return f"{side} customSchemas must hold only the category {cs.category} (it holds {names})"
    fields = value[cs.category]
    if not isinstance(fields, Mapping) or not fields:
        return f"{side} customSchemas {cs.category} must hold {cs.school_field} and/or {cs.grad_year_field}"
    problem = _unknown_fields(fields, (cs.school_field, cs.grad_year_field))
    if problem:
        return f"{side} customSchemas {cs.category}: {problem}"
    if create and cs.school_field not in fields:
        return f"a create must send {cs.school_field}"
    for name, text in fields.items():
        if side == "before" or restoring:  # what the account held: any text, or absent
            if text is not None and not isinstance(text, str):
                return f"{side} customSchemas {cs.category}.{name} {text!r} is not text"
        elif not isinstance(text, str) or not (text.isascii() and text.lstrip("-").isdigit()):
            return f"{side} customSchemas {cs.category}.{name} {text!r} is not a number as text"
    return None


_SCHEMA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,99}")


def _journal_attributes_problem(value: Any, side: str) -> str | None:
    """A journal's custom attributes: one category of two fields at most, names as Google
    writes them, values as text (or null for an absent field)."""
    if (not isinstance(value, Mapping) or len(value) != 1
            or not all(isinstance(k, str) and _SCHEMA_NAME.fullmatch(k) for k in value)):
        return f"{side} customSchemas must hold one custom attribute category"
    [(category, fields)] = value.items()
    if (not isinstance(fields, Mapping) or not 1 <= len(fields) <= 2
            or not all(isinstance(k, str) and _SCHEMA_NAME.fullmatch(k) for k in fields)):
        return f"{side} customSchemas {category} must hold the school and/or graduation year field"
    for name, text in fields.items():
        if text is not None and not isinstance(text, str):
            return f"{side} customSchemas {category}.{name} {text!r} is not text"
    return None


def change_problems(entries: Any, settings: Settings, *, restoring: bool = False) -> list[tuple[int, str, str]]:
    """(index, address, problem) of every change that the rules could not have made."""
    found = []
    for index, entry in enumerate(entries):
        problem = change_problem(entry, settings, restoring=restoring)
        if problem:
            address = entry.get("email") if isinstance(entry, Mapping) else None
            found.append((index, str(address) if isinstance(address, str) else "no address", problem))
    return found


def write_plan_file(path: Path, plan_: Plan, *, scope: Scope, today: dt.date,
                    settings: Settings, run_id: str, active: Mapping[int, int],
                    last_applied_run: str | None = None) -> None:
    """The plan as JSON, for review and for --apply-plan.

    `active` (active students per school) becomes the source-sanity baseline once the
    plan is applied.
    """
    counts: Counter[str] = Counter(label for c in plan_.changes for label in c.labels)
    document = {
        "format": PLAN_FORMAT,
        "run_id": run_id,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "run_date": today.isoformat(),
        "scope": {"kind": scope.kind, "schools": sorted(scope.school_numbers)},
        "domain": settings.google.domain,
        "settings_fingerprint": settings_fingerprint(settings),
        # The run that had last applied changes when the plan was made: a later one makes
        # this plan an older plan (SPEC section 7).
        "last_applied_run": last_applied_run,
        "counts": dict(sorted(counts.items())),
        "active_students": {str(k): v for k, v in sorted(active.items())},
        "changes": [change_to_json(c) for c in plan_.changes],
        "notices": [dataclasses.asdict(n) for n in plan_.notices],
    }
    write_atomically(path, json.dumps(document, indent=1, ensure_ascii=False) + "\n")


def read_plan_file(path: Path, settings: Settings) -> tuple[dict[str, Any], list[Change]]:
    """A reviewed plan, checked against the current settings."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise StopRun(f"plan file {path} not found") from None
    except (OSError, ValueError) as exc:
        raise StopRun(f"plan file {path} cannot be read: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != PLAN_FORMAT:
        raise StopRun(f"plan file {path} is not a student_sync plan (format {PLAN_FORMAT!r})")
    if document.get("settings_fingerprint") != settings_fingerprint(settings):
        raise StopRun(
            f"plan file {path} was made with other settings (fingerprint "
            f"{document.get('settings_fingerprint')}, now {settings_fingerprint(settings)}): "
            "make a new plan with the current settings")
    # The same rules in another settings file are still another district's record of applied
    # runs, which is what tells an older plan (a plan from before marks has the fingerprint only).
    mark = run_mark(document.get("run_id"))
    if mark is not None and mark != settings.instance:
        raise StopRun(
            f"plan file {path} is refused, nothing was changed: it was written by run {document['run_id']}, "
            f"which carries the mark {mark} of another settings file, and this settings file "
            f"({settings.path}) has the mark {settings.instance}; apply it with that run's settings file, "
            "or make a new plan with this one (--dry-run --plan-out FILE)")
    entries = document.get("changes")
    if not isinstance(entries, list):
        raise StopRun(f"plan file {path} has no list of changes")
    _refuse_changes(f"plan file {path}", "changes[{}]", change_problems(entries, settings) or twice_named(entries))
    try:
        changes = [change_from_json(entry) for entry in entries]
    except (KeyError, TypeError, ValueError) as exc:
        raise StopRun(f"plan file {path} has a malformed change: {exc}") from None
    return document, changes


def twice_named(entries: Sequence[Mapping[str, Any]]) -> list[tuple[int, str, str]]:
    """(index, address, problem) of every change of a plan for an account an earlier one
    changes already: the rules make one account change and one licence change per account."""
    first: dict[tuple[str, bool], int] = {}
    found = []
    for index, entry in enumerate(entries):
        key = (str(entry["email"]).lower(), entry["action"] == Action.LICENSE)
        if key in first:
            found.append((index, str(entry["email"]), f"changes the same {'licence' if key[1] else 'account'} as "
                                                      f"changes[{first[key]}]: a plan names each account once"))
        else:
            first[key] = index
    return found


def _refuse_changes(what: str, where: str, problems: Sequence[tuple[int, str, str]]) -> None:
    """Stop, naming every change of a plan or journal that the rules could not have made."""
    if not problems:
        return
    lines = [f"  {where.format(index)} ({address}): {problem}" for index, address, problem in problems[:20]]
    if len(problems) > 20:
        lines.append(f"  ... and {len(problems) - 20} more")
    raise StopRun(f"{what} is refused, nothing was changed: {len(problems)} change(s) are not ones "
                  "the rules make (only student addresses, with the fields the rules write and "
                  "the values they had):\n" + "\n".join(lines))


class Journal:
    """Every applied change of a run, one JSON line each, in the logs folder."""

    def __init__(self, folder: Path, run_id: str, kind: str):
        make_folder(folder)
        self.path = folder / f"journal-{run_id}.jsonl"
        self.run_id, self.kind = run_id, kind

    def record(self, outcome: Outcome) -> None:
        """One line per change really sent (a reconciled create may have sent another, or none).

        A failed outcome that names what it `made` (our own create, then a failed read-back or
        update) records those changes as applied, with the failure in the note: they were."""
        lines = []
        result, note = outcome.result, outcome.note
        if outcome.failed and outcome.made:
            result, note = str(Status.APPLIED), "; ".join(filter(None, [note, f"then {outcome.result}"]))
        for change in outcome.sent or (outcome.change,):
            entry = change_to_json(change)
            entry.update(run_id=self.run_id, kind=self.kind,
                         result=result if outcome.sent else "nothing sent",
                         time=dt.datetime.now().isoformat(timespec="seconds"),
                         groups_removed=list(outcome.groups_removed), note=note)
            lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
        with open(self.path, "a", encoding="utf-8", opener=owner_only) as stream:
            stream.writelines(lines)


def _settings_in_log(folder: Path, run_id: str) -> str | None:
    """The settings file that a run's log says the run read (its first, debug, line); None
    when the log is gone or does not say."""
    said = re.compile(rf" run {re.escape(run_id)}, settings (.+?), arguments")
    try:
        with open(folder / f"student_sync-{run_id}.log", encoding="utf-8", errors="replace") as stream:
            for line in itertools.islice(stream, 20):
                match = said.search(line)
                if match:
                    return match.group(1)
    except OSError:
        pass
    return None


def _not_this_settings_files_run(folder: Path, run_id: str, settings: Settings) -> str | None:
    """Why this settings file may not undo run `run_id`; None when the run is its own.

    Another settings file sharing the logs folder undoes its own runs: with its scope, its
    rules and its record of undone runs.  A run from before run ids carried the mark is this
    settings file's when its log names this settings file by its whole path; when nobody can
    tell, the administrator says whose it is by giving the journal the mark.
    """
    match = _RUN_ID.fullmatch(run_id)
    base, mark, counter = match.groups()
    if mark == settings.instance:
        return None
    named = _settings_in_log(folder, run_id)
    refused = f"--undo {run_id} is refused, nothing was changed: "
    again = f"run the undo with that run's settings file (--config {named or 'FILE'} --undo {run_id})"
    if mark is not None:
        return (refused + f"that run carries the mark {mark} of another settings file"
                + (f" ({named}, as its log says)" if named else "")
                + f", and this settings file ({settings.path}) has the mark {settings.instance}; " + again)
    if named is not None and Path(named).is_absolute():
        if settings_mark(Path(named)) == settings.instance:
            return None
        return (refused + f"that run is from before run ids carried the settings file's mark, and its log "
                          f"says it ran with the settings file {named}, not this one ({settings.path}); " + again)
    claimed = f"{base}-{settings.instance}" + (f"-{counter}" if counter else "")
    why = (f"its log names its settings file only as {named}" if named else
           f"its log student_sync-{run_id}.log is gone or does not name its settings file")
    return (refused + f"that run is from before run ids carried the settings file's mark, and {why}, so "
                      f"which settings file ran it cannot be told. If it was this one ({settings.path}), "
                      f"rename journal-{run_id}.jsonl in {folder} to journal-{claimed}.jsonl and run "
                      f"--undo {claimed}; otherwise " + again)


def read_journal(folder: Path, run_id: str, settings: Settings) -> list[dict[str, Any]]:
    """A run's journal entries, when the run is this settings file's; a journal is input
    like a plan, and every entry must be a change the rules (or an undo) could have made."""
    if not _RUN_ID.fullmatch(run_id):
        raise StopRun(f"{run_id!r} is not a run id (like 20261128-020003-1a2b3c4d)")
    path = folder / f"journal-{run_id}.jsonl"
    if run_mark(run_id) in (None, settings.instance) and not path.is_file():
        known = sorted(p.stem[len("journal-"):] for p in folder.glob(f"journal-*-{settings.instance}*.jsonl")
                       if run_mark(p.stem[len("journal-"):]) == settings.instance)[-5:]
        raise StopRun(f"no journal for run {run_id} in {folder}"
                      + (f" (latest runs with this settings file: {', '.join(known)})" if known else ""))
    problem = _not_this_settings_files_run(folder, run_id, settings)
    if problem:
        raise StopRun(problem)
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((number for number, line in enumerate(lines, start=1) if line.strip()), default=0)
    entries, problems = [], []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except ValueError:
                if number == last:  # cut short as it was written (a full disk, a power cut)
                    log.warning("journal %s: its last line (line %d) is incomplete; every line before it "
                                "is undone", path, number)
                    entries.append(_incomplete_entry(line, number))
                    break
                raise StopRun(f"journal {path} line {number} is not valid JSON") from None
            problems += [(number, address, problem) for _, address, problem
                         in change_problems(entries[-1:], settings, restoring=True)]
    _refuse_changes(f"journal {path}", "line {}", problems)
    return entries


_INCOMPLETE = "incomplete"   # the result of the entry standing for a journal's cut-short last line


def _incomplete_entry(line: str, number: int) -> dict[str, Any]:
    """What can be read of a half-written journal line: whose change it was, if that much was written."""
    student = re.search(r'"student_number":\s*(\d+)', line)
    address = re.search(r'"email":\s*"([^"\\]+)"', line)
    return {"result": _INCOMPLETE, "line": number, "student_number": student.group(1) if student else "?",
            "email": address.group(1) if address else ""}


_OPPOSITE = {"suspend": "unsuspend", "unsuspend": "suspend"}


def undo_changes(entries: Sequence[Mapping[str, Any]], directory: Directory, settings: Settings,
                 students: Collection[int]) -> tuple[list[Change], list[Notice], int]:
    """The changes that reverse a run's applied changes, what cannot be reversed, and how
    many accounts are as the undo would leave them already (an undo run again after an
    outage stopped it).

    Created accounts are suspended, never deleted.  An account changed since the run
    is reported and left alone; so is the account of a number that is not among
    `students` (those PowerSchool knows now), and one the undo would move out of the
    student OUs -- a journal is input, not authority.
    """
    changes: list[Change] = []
    notices: list[Notice] = []
    already = 0
    for entry in reversed(entries):
        if entry.get("result") == _INCOMPLETE:
            notices.append(Notice(Level.ERROR, str(entry["student_number"]), str(entry["email"]),
                                  f"not undone: the journal's last line (line {entry['line']}) is incomplete, "
                                  "cut short when it was written; check this account by hand"))
            continue
        if entry.get("result") != Status.APPLIED:
            continue
        try:
            done = change_from_json(entry)
        except (KeyError, TypeError, ValueError) as exc:
            notices.append(Notice(Level.ERROR, str(entry.get("student_number", "?")), str(entry.get("email", "")),
                                  f"journal entry cannot be read: {exc}"))
            continue
        number, email = str(done.student_number), done.email
        if done.student_number not in students:
            notices.append(Notice(Level.ERROR, number, email, f"not undone: PowerSchool has no student {number} "
                                  "now, and an undo changes students' accounts only; check this account by hand"))
            continue
        account = directory.accounts.get(email.lower())
        if account is None:
            notices.append(Notice(Level.WARNING, number, email, "not undone: the account no longer exists"))
            continue
        if done.action == Action.LICENSE:
            reverse, said = _undo_licence(done, account, directory)
            changes.extend([reverse] if reverse else [])
            notices.extend([said] if said else [])
            continue
        problem = _undo_problem(done, settings)
        if problem:
            notices.append(Notice(problem[0], number, email, problem[1]))
            continue
        after = {k: v for k, v in done.after.items() if k not in ("primaryEmail", "changePasswordAtNextLogin")}
        if done.action == Action.CREATE:
            after["suspended"] = False  # a created account is open; suspended since means changed since
            if _category_of(after) not in (None, settings.custom_schema.category):
                del after["customSchemas"]  # a category renamed since cannot be read: the rest must match
        if not holds_values(account, after):
            if account.suspended if done.action == Action.CREATE else holds_values(account, done.before):
                already += 1  # as before that run already: undone by an earlier, stopped undo
                continue
            notices.append(Notice(Level.WARNING, number, email, "not undone: the account was changed since that run"))
            continue
        if done.action == Action.CREATE:
            changes.append(Change(done.student_number, account.email, Action.SUSPEND, ("suspend",),
                                  {"suspended": False}, {"suspended": True}))
            continue
        labels = tuple(_OPPOSITE.get(label, label) for label in done.labels)
        action = Action.SUSPEND if "suspend" in labels else Action.UPDATE
        changes.append(Change(done.student_number, account.email, action, labels,
                              dict(done.after), dict(done.before)))
        if entry.get("groups_removed"):
            notices.append(Notice(Level.WARNING, number, email, "was removed from groups "
                                  + ", ".join(entry["groups_removed"]) + " by that run: not re-added"))
    return changes, notices, already


def _category_of(values: Mapping[str, Any]) -> str | None:
    attributes = values.get("customSchemas")
    return next(iter(attributes), None) if isinstance(attributes, Mapping) else None


def _undo_problem(done: Change, settings: Settings) -> tuple[Level, str] | None:
    """Why an applied change of a journal cannot be reversed under today's settings: an
    error when it would take a student out of the student OUs, a warning when its custom
    attributes are in a category the settings no longer read."""
    if done.action == Action.CREATE:
        return None  # reversed by a suspension: nothing is restored
    restored = done.before.get("orgUnitPath")
    if restored is not None and not is_student_ou(str(restored), settings):
        ous = settings.ous
        return Level.ERROR, (f"not undone: it would move the account back to {restored}, which is not a "
                             f"student OU (under [ous] student_prefix {ous.student_prefix}, or {ous.suspended} "
                             f"or {ous.graduated}); check this account by hand")
    category = _category_of(done.before)
    if category is not None and category != settings.custom_schema.category:
        return Level.WARNING, (f"not undone: its custom attributes are in the category {category}, not "
                               f"[custom_schema] category {settings.custom_schema.category} of these settings")
    return None


def _undo_licence(done: Change, account: Account, directory: Directory) -> tuple[Change | None, Notice | None]:
    """The reverse of an applied licence change: an assign is released, a release assigned
    again; an account whose licence changed since is reported and left alone."""
    number = str(done.student_number)
    if directory.licensed is None:
        return None, Notice(Level.ERROR, number, done.email, f"licence {done.sku} not undone: the settings "
                                                             "have no [licenses] section")
    holds = _key(account.email) in directory.licensed
    if (RELEASE_LICENSE in done.labels) == holds:
        return None, Notice(Level.WARNING, number, done.email,
                            "not undone: the licence was changed since that run")
    label = ASSIGN_LICENSE if RELEASE_LICENSE in done.labels else RELEASE_LICENSE
    return Change(done.student_number, account.email, Action.LICENSE, (label,), done.after, done.before), None


def load_school_counts(path: Path) -> dict[int, int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {int(k): int(v) for k, v in data.get("active_students", {}).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError, TypeError):
        log.warning("school counts in %s cannot be read; starting them again", path)
        return {}


def save_school_counts(path: Path, counts: Mapping[int, int], settings_path: Path | None = None) -> None:
    """Merge these schools' figures into the counts file, whole or not at all (OSError)."""
    merged = load_school_counts(path)
    merged.update(counts)
    document = {"updated": dt.datetime.now().isoformat(timespec="seconds"),
                "settings": str(settings_path) if settings_path else None,
                "active_students": {str(k): v for k, v in sorted(merged.items())}}
    write_atomically(path, json.dumps(document, indent=1) + "\n")


class AppliedRuns:
    """Which run last applied changes with one settings file, which reviewed plans were
    applied and which runs were undone: a small JSON file beside the school counts.

    A reviewed plan is the newest word only while no run has applied changes since it was
    written (SPEC section 7); the same plan, or the same undo, a second time is recognised.
    """

    KEEP = 200  # plans and undos remembered

    def __init__(self, path: Path):
        self.path = path
        self.last: dict[str, Any] | None = None
        self.plans: dict[str, dict[str, Any]] = {}
        self.undone: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            last = data.get("last_applied")
            self.last = last if isinstance(last, dict) and isinstance(last.get("run_id"), str) else None
            self.plans = {str(k): v for k, v in (data.get("applied_plans") or {}).items() if isinstance(v, dict)}
            self.undone = {str(k): v for k, v in (data.get("undone_runs") or {}).items() if isinstance(v, dict)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError):
            log.warning("the record of applied runs %s cannot be read; starting it again", path)

    @property
    def last_run_id(self) -> str | None:
        return self.last["run_id"] if self.last else None

    def applied(self, run_id: str, kind: str, *, plan: str | None = None, undone: str | None = None,
                finished: bool = True) -> None:
        """Record a run that applied changes (and the plan it applied, or the run it undid,
        as done once `finished`); OSError when the file cannot be written."""
        stamp = {"run_id": run_id, "kind": kind, "time": dt.datetime.now().isoformat(timespec="seconds")}
        # A plan that a stopped run left half done is not older than that run: it may be
        # applied again to finish it.
        self.last = {**stamp, "plan": plan} if plan else stamp
        if plan and finished:
            self.plans[plan] = stamp
        if undone and finished:
            self.undone[undone] = stamp
        document = {"last_applied": self.last, "applied_plans": dict(list(self.plans.items())[-self.KEEP:]),
                    "undone_runs": dict(list(self.undone.items())[-self.KEEP:])}
        write_atomically(self.path, json.dumps(document, indent=1) + "\n")

    def plan_is_older(self, document: Mapping[str, Any], digest: str) -> bool:
        """Was this plan written before the last run that applied changes?  A plan that
        does not name that run as the last one it knew of is older, whatever its dates say;
        only a stopped run of this same plan leaves it the newest word."""
        if self.last is None or self.last.get("plan") == digest:
            return False
        return document.get("last_applied_run") != self.last["run_id"]

    @staticmethod
    def when(stamp: Mapping[str, Any]) -> str:
        """A stamp's time for people: 2026-11-30 at 02:00:03."""
        return str(stamp.get("time", "an unknown date")).replace("T", " at ", 1)


def plan_digest(document: Mapping[str, Any]) -> str:
    """The identity of a plan: the run that wrote it, when, and its changes, whatever file
    they are in -- a new plan whose changes equal an old one's is another plan."""
    identity = {"run_id": document.get("run_id"), "created": document.get("created"),
                "changes": document.get("changes")}
    text = json.dumps(identity, sort_keys=True, ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]


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
        try:
            make_folder(self.path.parent)
            stream = open(self.path, "a+", encoding="utf-8", opener=owner_only)
        except OSError as exc:  # a lock file an administrator's run left read-only to this account
            raise StopRun(cannot_write("the run lock", self.path, exc)
                          + "; this run stops without changing anything") from None
        try:
            self._lock(stream)
        except OSError:
            stream.seek(0)
            holder = stream.read(500).strip() or "unknown"
            stream.close()
            raise StopRun(f"another student_sync run is in progress ({holder}; lock {self.path}); "
                          "this run stops without changing anything") from None
        stream.seek(0)
        stream.truncate()
        stream.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{dt.datetime.now():%Y-%m-%d %H:%M:%S}")
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
        if WINDOWS:
            import msvcrt

            stream.seek(self._OFFSET)
            msvcrt.locking(stream.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(self, stream: Any) -> None:
        if WINDOWS:
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


def open_run_log(settings: Settings, now: dt.datetime) -> tuple[str, logging.Handler, Path]:
    """Claim a run id and open its log file in the logs folder; StopRun naming the folder
    when this account cannot write there.

    The run id is the start time and the settings file's mark, `20261128-020003-1a2b3c4d`,
    with a counter when that second's is taken: the log file is created exclusively, so two
    runs never share an id, and every log and journal says which settings file it belongs to.
    """
    folder = settings.logging.dir
    base = f"{now:%Y%m%d-%H%M%S}-{settings.instance}"
    try:
        make_folder(folder)
        # After the highest counter of this second in use, so that an id freed by pruning
        # is never given out again, out of order.
        same_second = re.compile(rf"(?:student_sync|journal)-{re.escape(base)}(?:-(\d+))?\.(?:log|jsonl)")
        taken = [int(m.group(1) or 1) for p in folder.glob(f"*-{base}*") if (m := same_second.fullmatch(p.name))]
        for n in itertools.count(max(taken, default=0) + 1):
            run_id = base if n == 1 else f"{base}-{n}"
            path = folder / f"student_sync-{run_id}.log"
            if (folder / f"journal-{run_id}.jsonl").exists():
                continue
            try:
                open(path, "x", encoding="utf-8", opener=owner_only).close()
                break
            except FileExistsError:
                continue
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise StopRun(cannot_write("in the logs folder", folder, exc)) from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    handler.setLevel(logging.DEBUG)
    handler._student_sync = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    return run_id, handler, path


def prune_run_files(settings: Settings) -> None:
    """Keep this settings file's newest `[logging] keep` logs and, apart from them, its newest
    `keep` journals and its newest `keep` plans that safety stops wrote.  Files of other
    settings files sharing the logs folder (another mark in the name) are theirs to prune;
    files named before marks existed are nobody's, and so is a plan file named any other way
    (an administrator's --plan-out)."""
    folder = settings.logging.dir
    mine = re.compile(rf"(\d{{8}}-\d{{6}})-{re.escape(settings.instance)}(?:-(\d+))?")
    for prefix, suffix in (("student_sync-", ".log"), ("journal-", ".jsonl"), ("plan-", ".json")):
        files = []
        for path in folder.glob(f"{prefix}*{suffix}"):
            match = mine.fullmatch(path.name[len(prefix):-len(suffix)])
            if match:  # oldest first: by start time, then by the counter of runs started in one second
                files.append((match.group(1), int(match.group(2) or 1), path))
        files.sort()
        for _, _, stale in files[:max(0, len(files) - settings.logging.keep)]:
            with contextlib.suppress(OSError):
                stale.unlink()


# =============================================================================
# Report
# =============================================================================
# What people read: console lines, one log line per notice and outcome, the CSV report,
# the end-of-run summary, the progress counter and the summary email.


class _ConsoleFormatter(logging.Formatter):
    """Plain lines; warnings and errors say so, unless the line already does (`extra=PLAIN`)."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING and not getattr(record, "plain", False):
            return f"{record.levelname}: {text}"
        return text


PLAIN = {"plain": True}


class _ConsoleHandler(logging.StreamHandler):
    """The console: when nobody reads it any more (`| head`, a closed window), it goes quiet and
    the run goes on; the log file keeps every line."""

    progress: "Progress | None" = None   # a counter on the terminal, taken off for each line

    def emit(self, record: logging.LogRecord) -> None:
        progress = self.progress
        if progress is None:
            super().emit(record)
            return
        with progress.lock:  # no step can draw between the clearing and the line
            progress.clear()
            super().emit(record)
            progress.redraw()

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # EPIPE; EINVAL on Windows
            self.stream = _silence_stdout()  # not setStream: it would flush the broken stream
            return
        super().handleError(record)


def _silence_stdout() -> Any:
    """Point stdout at the null device, so that nothing written (or flushed at exit) fails."""
    devnull = open(os.devnull, "w", encoding="utf-8")
    try:
        os.dup2(devnull.fileno(), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor (an embedding host)
        pass
    return devnull


# A line the command was asked for (a dry run's plan and its summary): on the console even
# with -q, which quiets what a run says along the way, not what it was run to show.
ASKED_FOR = {"asked_for": True}


def setup_logging(verbosity: int) -> logging.Handler:
    """Console logging: -q warnings (and the lines asked for) only, default info, -v debug."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    try:  # a console or a redirected file in a narrow code page must not lose a line over one name
        sys.stdout.reconfigure(errors="backslashreplace")
    except (AttributeError, ValueError):
        pass
    handler = _ConsoleHandler(sys.stdout)
    handler.setFormatter(_ConsoleFormatter())
    handler.addFilter(lambda record: record.levelno >= level or getattr(record, "asked_for", False))
    for old in [h for h in log.handlers if getattr(h, "_student_sync", False)]:
        log.removeHandler(old)
    handler._student_sync = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    return handler


def _log_notice(notice: Notice) -> None:
    who = notice.student_number + (f" ({notice.email})" if notice.email else "")
    level = {Level.ERROR: logging.ERROR, Level.WARNING: logging.WARNING}.get(notice.level, logging.INFO)
    log.log(level, "student %s: %s", who, notice.message)


def _outcome_detail(outcome: Outcome) -> str:
    detail = outcome.change.describe()
    if outcome.note:
        detail += f" ({outcome.note})"
    if outcome.groups_removed:
        detail += "; removed from " + ", ".join(outcome.groups_removed)
    return detail


def _log_outcome(outcome: Outcome) -> None:
    change = outcome.change
    text = f"{change.email}: {_outcome_detail(outcome)}"  # the detail names each change, once
    if outcome.ok:
        log.info("%s", text)
    elif outcome.failed:
        log.error("student %s: %s: %s", change.student_number, text, outcome.result)
    else:
        log.warning("student %s: %s: %s", change.student_number, text, outcome.result)


# A cell starting with one of these is a formula to a spreadsheet (CSV injection): names and
# student numbers come from PowerSchool, so every cell that starts so gets a leading quote.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> str:
    """The cell's text, with a single quote before a leading =, +, -, @, tab or carriage return
    (OWASP's advice), so that Excel shows it as text and never runs it."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


class _SafeCsvWriter:
    """A csv writer whose every cell goes through spreadsheet_safe."""

    def __init__(self, writer: Any):
        self.writer = writer

    def writerow(self, row: Iterable[Any]) -> None:
        self.writer.writerow([spreadsheet_safe(cell) for cell in row])


def write_report(path: Path, outcomes: Sequence[Outcome], notices: Sequence[Notice],
                 unowned: Sequence[Account] = ()) -> None:
    """CSV, one row per change with its outcome, then errors, warnings, skips and unowned accounts.

    UTF-8 with a byte-order mark, so that Excel opens it cleanly.
    """
    with open(path, "w", encoding="utf-8-sig", newline="", opener=owner_only) as stream:
        writer = _SafeCsvWriter(csv.writer(stream))
        writer.writerow(["student_number", "email", "action", "detail", "result"])
        for outcome in outcomes:
            change = outcome.change
            writer.writerow([change.student_number, change.email, "+".join(change.labels),
                             _outcome_detail(outcome), outcome.result])
        for notice in notices:
            result = "failed: " + notice.message if notice.level == Level.ERROR else notice.level
            writer.writerow([notice.student_number, notice.email, notice.level, notice.message, result])
        for account in unowned:
            writer.writerow(["", account.email, "unowned",
                             f"in {account.org_unit}, matches no PowerSchool student", "report only"])


@dataclass
class Summary:
    """The end-of-run figures, for the log, the email and the exit code."""

    counts: Counter
    unchanged: int
    skipped: int
    warnings: int
    failures: int
    stale: int
    seconds: float
    dry_run: bool
    unowned: int = 0
    not_tried: int = 0
    stopped: str = ""       # why the run stopped handing out changes, when it did
    removing_groups: int = 0  # planned suspensions that remove group memberships (dry run)

    def text(self) -> str:
        order = [("create", "creates"), ("move", "moves"), ("rename", "renames"),
                 ("attributes", "attribute updates"), ("unsuspend", "unsuspends"),
                 ("suspend", "suspends"), ("group removals", "group removals")]
        if self.counts[ASSIGN_LICENSE] or self.counts[RELEASE_LICENSE]:
            order += [(ASSIGN_LICENSE, "license assigns"), (RELEASE_LICENSE, "license releases")]
        if self.dry_run:
            # Which groups an account leaves is read when its suspension is applied: a
            # planned figure would always say 0.
            order.remove(("group removals", "group removals"))
        parts = ", ".join(f"{self.counts[key]} {label}" for key, label in order)
        if self.removing_groups:
            parts += f" (group removals for {self.removing_groups} of them are counted when applied)"
        text = (f"summary ({'planned' if self.dry_run else 'done'}): {parts}; "
                f"{self.unchanged} already in step, {self.skipped} skipped, {self.warnings} warnings, "
                f"{self.failures} failed")
        if self.stale:
            text += f", {self.stale} stale"
        if self.not_tried:
            text += f", {self.not_tried} not tried"
        if self.stopped:
            text += f"; stopped early: {self.stopped}"
        if self.unowned:
            text += f"; {self.unowned} accounts nobody owns"
        return text + f"; {self.seconds:.1f} s"


def summarize(outcomes: Sequence[Outcome], notices: Sequence[Notice], unchanged: int,
              dry_run: bool, seconds: float, unowned: int = 0, stopped: str | None = None) -> Summary:
    counts: Counter[str] = Counter()
    for outcome in outcomes:
        # What was really sent: a create answered 409 counts as its follow-up, if any.
        # A failure that names what it made before failing (our own create) counts that.
        if outcome.ok or (dry_run and outcome.status == Status.PLANNED) or (outcome.failed and outcome.made):
            counts.update(label for change in outcome.sent for label in change.labels)
        # A removal stays made when the suspension after it failed.
        counts["group removals"] += len(outcome.groups_removed)
    levels = Counter(n.level for n in notices)
    return Summary(counts=counts, unchanged=unchanged, skipped=levels[Level.SKIP], warnings=levels[Level.WARNING],
                   failures=len(failed_students(notices, outcomes)), stale=sum(o.status == Status.STALE for o in outcomes),
                   seconds=seconds, dry_run=dry_run, unowned=unowned,
                   not_tried=sum(o.status == Status.NOT_TRIED for o in outcomes), stopped=stopped or "",
                   removing_groups=sum(o.status == Status.PLANNED and o.change.remove_groups for o in outcomes)
                   if dry_run else 0)


class Progress:
    """A one-line counter on the terminal; silent when output goes to a file or a scheduler.

    A log line printed while the counter shows takes it off the line first and draws it
    again below, so that the two never run together (`applying: 1/2640create ...`).
    """

    def __init__(self, label: str, total: int | None = None, stream: Any = None):
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(sys.stdout, "isatty", lambda: False)()) and bool(
            getattr(self.stream, "isatty", lambda: False)())
        self.label, self.total, self.done = label, total, 0
        self.lock = threading.RLock()
        self._shown = 0  # characters of the counter on the screen now
        if self.enabled:
            for handler in log.handlers:
                if isinstance(handler, _ConsoleHandler):
                    handler.progress = self

    def step(self, count: int = 1) -> None:
        with self.lock:
            self.done += count
            self._draw()

    def _draw(self) -> None:
        if self.enabled:
            of = f"/{self.total}" if self.total else ""
            text = f"{self.label}: {self.done}{of}"
            self.stream.write("\r" + text)
            self.stream.flush()
            self._shown = len(text)

    def clear(self) -> None:
        """Take the counter off the screen (before a log line); the caller holds the lock."""
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0

    def redraw(self) -> None:
        """Draw the counter again (after a log line); the caller holds the lock."""
        if self.done:
            self._draw()

    def close(self) -> None:
        """End the line (once: closing again does nothing)."""
        with self.lock:
            if self.enabled and self._shown:
                self.stream.write("\n")
                self.stream.flush()
            self.enabled, self._shown = False, 0
            for handler in log.handlers:
                if isinstance(handler, _ConsoleHandler) and handler.progress is self:
                    handler.progress = None


EMAIL_DEADLINE_SECONDS = 60.0   # the whole send, however slowly the server answers


def send_summary_email(settings: Settings, subject: str, body: str) -> None:
    """Send the run summary; a failure is logged and never changes the run's outcome.

    The whole send has one deadline: a server that answers a byte at a time cannot hold
    the run (and its lock) longer than EMAIL_DEADLINE_SECONDS.  The conversation runs in a
    thread; at the deadline its connection is shut, which ends it.
    """
    # Imported here: they take a noticeable share of start-up (the benchmark measures it)
    # and only a run that emails needs them.
    import smtplib
    from email.message import EmailMessage

    em = settings.email
    if em is None:
        return
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = em.sender, ", ".join(em.to), subject
    message.set_content(body)
    deadline = EMAIL_DEADLINE_SECONDS
    connection: list[Any] = []   # the SMTP object, so that the deadline can hang up on it
    result: list[BaseException | str | None] = []
    sender = threading.Thread(target=_send_email, args=(em, message, deadline, connection, result),
                              name="email", daemon=True)
    sender.start()
    try:
        # In short waits, not one long one: a Ctrl-C that the system hands to another thread
        # would otherwise wait for the deadline before the main thread saw it.
        end = time.monotonic() + deadline
        while sender.is_alive() and time.monotonic() < end:
            sender.join(min(0.2, max(0.0, end - time.monotonic())))
    except KeyboardInterrupt:  # Ctrl-C: hang up, so that the abandoned send ends too
        for smtp in connection:
            _hang_up(smtp)
        raise
    if sender.is_alive() or not result:
        for smtp in connection:
            _hang_up(smtp)
        log.error("could not email the summary through %s:%s (timed out: the whole send may take %g s); "
                  "the run's result is unchanged", em.smtp_host, em.smtp_port, deadline)
        return
    outcome = result[0]
    if outcome is None:
        log.info("summary emailed to %s", ", ".join(em.to))
    elif isinstance(outcome, str):
        log.error("%s", outcome)
    else:
        reason = (outcome.smtp_code if isinstance(outcome, smtplib.SMTPResponseException)
                  else "timed out" if isinstance(outcome, TimeoutError) else type(outcome).__name__)
        log.error("could not email the summary through %s:%s (%s); the run's result is unchanged",
                  em.smtp_host, em.smtp_port, reason)


def _hang_up(smtp: Any) -> None:
    """End a send that met its deadline: shut the socket, so that a blocked read returns
    (the sending thread then closes the connection itself)."""
    sock = getattr(smtp, "sock", None)
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)


def _send_email(em: EmailSettings, message: Any, timeout: float, connection: list[Any],
                result: list[BaseException | str | None]) -> None:
    """The SMTP conversation, in the "email" thread; its outcome goes into `result`: None
    when sent, a refusal in words, or the exception.  No secret reaches `result`."""
    import smtplib

    user = read_secret(em.user_env).value if em.user_env else ""
    password = read_secret(em.password_env).value if em.password_env else ""
    implicit_tls = em.smtp_port == 465
    try:
        smtp = (smtplib.SMTP_SSL(timeout=timeout, context=ssl.create_default_context())
                if implicit_tls else smtplib.SMTP(timeout=timeout))
        connection.append(smtp)   # before connecting: the greeting itself may trickle
        try:
            smtp.connect(em.smtp_host, em.smtp_port)
            smtp.ehlo()
            encrypted = implicit_tls
            if not encrypted and smtp.has_extn("starttls"):
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
                encrypted = True
            if user and password:
                if not encrypted and not _is_loopback(em.smtp_host):
                    result.append(f"not emailing the summary: {em.smtp_host}:{em.smtp_port} offers no "
                                  "STARTTLS, and the SMTP password is not sent unencrypted (use port 587 "
                                  "with STARTTLS, or 465)")
                    return
                smtp.login(user, password)
            smtp.send_message(message)
            with contextlib.suppress(OSError, smtplib.SMTPException):
                smtp.quit()
        finally:
            smtp.close()
        result.append(None)
    except (OSError, smtplib.SMTPException) as exc:
        result.append(exc)


# =============================================================================
# Runs
# =============================================================================
# One function per kind of run (sync, apply a reviewed plan, undo, check), each reading
# top to bottom: read, plan, check safety, apply, report.


def _scope_kind(args: argparse.Namespace) -> str | None:
    if args.all:
        return "all"
    if args.state_reporting:
        return "state-reporting"
    if args.building:
        return "building"
    return None


@dataclass
class Run:
    """One invocation: its id, its files, and what the summary email will say."""

    args: argparse.Namespace
    settings: Settings
    run_id: str
    log_path: Path | None = None
    summary: Summary | None = None
    failures_to_email: list[str] = field(default_factory=list)   # the email's "Failures:" lines
    started: float = field(default_factory=time.monotonic)
    source_version: str = ""                        # PowerSchool's, once connected
    halt: Halt = field(default_factory=Halt)        # why the applying stopped early, if it did

    @property
    def logs(self) -> Path:
        return self.settings.logging.dir

    @property
    def counts_path(self) -> Path:
        return self.logs / f"school_counts-{self.settings.instance}.json"

    @property
    def lock_path(self) -> Path:
        return self.logs / f"student_sync-{self.settings.instance}.lock"

    @property
    def applied_path(self) -> Path:
        return self.logs / f"applied_runs-{self.settings.instance}.json"

    def today(self) -> dt.date:
        return self.args.as_of or dt.date.today()


@contextlib.contextmanager
def _powerschool(run: Run) -> Iterator[Any]:
    """An open PowerSchool connection for the block (a PowerSchoolApi with source = "api");
    a driver's error in it becomes a stop."""
    if run.settings.powerschool.source == "api":
        with open_powerschool_api(run.settings) as api:
            run.source_version = f"PowerSchool {api.version or '(version not given)'}, plugin API at {api.url}"
            log.debug("PowerSchool: %s, pages of %d", run.source_version, api.page_size)
            yield api
        return
    connection = connect_powerschool(run.settings)
    run.source_version = getattr(connection, "version", None) or f"SQLite {sqlite3.sqlite_version}"
    log.debug("PowerSchool: %s", run.source_version)
    try:
        yield connection
    except StopRun:
        raise
    except Exception as exc:  # any DB-API driver's error class
        if not _is_db_error(exc):
            raise
        raise SourceError(f"PowerSchool: query failed: {_describe_db_error(exc)}") from None
    finally:
        connection.close()


def _read_school_rows(connection: Any) -> dict[int, School]:
    """SCHOOLS from a DB-API connection or the plugin API."""
    return read_api_schools(connection) if isinstance(connection, PowerSchoolApi) else read_schools(connection)


def _read_rows(connection: Any, scope: Scope, schools: Mapping[int, School]) -> list[StudentRow]:
    if isinstance(connection, PowerSchoolApi):
        rows = read_api_students(connection, scope, schools)
        log.info("PowerSchool: %d rows for %s (%d schools), read through the API in %d requests",
                 len(rows), scope.describe(), len(scope.school_numbers), connection.requests)
        return rows
    rows = read_students(connection, scope, schools)
    log.info("PowerSchool: %d rows for %s (%d schools)", len(rows), scope.describe(), len(scope.school_numbers))
    return rows


def _check_api(run: Run, api: PowerSchoolApi, check: Callable[[bool, str], None]) -> None:
    """--check with source = "api": the token, the metadata, the plugin's access to each column."""
    ps = run.settings.powerschool
    check(True, f"PowerSchool API token from {api.url}/oauth/access_token for the client ID and "
                f"secret in {ps.client_id_env} and {ps.client_secret_env}")
    check(True, f"PowerSchool API metadata: {run.source_version}; maximum page size {api.page_size}")
    missing = check_api_access(api)
    if missing:
        raise SourceError(
            f"PowerSchool: the plugin has no access to {', '.join(missing)}: install the plugin.xml of "
            "powerschool-plugin/ and approve its access request in PowerSchool's Plugin Management")
    count = sum(len(columns) for columns in _API_TABLES.values())
    check(True, f"PowerSchool plugin has access to every column student_sync reads ({count}) and to the "
                f"{_API_SORT.upper()} the pages are sorted on")


def _read_powerschool(run: Run, kind: str,
                      check: Callable[[bool, str], None] | None = None) -> tuple[Scope, list[StudentRow]]:
    """The scope and its rows.  With `check` (--check), the API source's token, metadata and
    column access are reported first."""
    with _powerschool(run) as connection:
        if check and isinstance(connection, PowerSchoolApi):
            _check_api(run, connection, check)
        schools = _read_school_rows(connection)
        scope = resolve_scope(kind, schools, run.args.building or ())
        return scope, _read_rows(connection, scope, schools)


@dataclass(frozen=True)
class _Weighed:
    """What a sync keeps of PowerSchool's rows once they are weighed (the rows themselves,
    the largest thing a run holds, are let go)."""

    decisions: Decisions
    enrolled: Mapping[int, int]     # per school, for the school-drop rule
    row_count: int
    student_numbers: frozenset[int]  # for the unowned-account report


def _weigh(rows: Sequence[StudentRow], scope: Scope, settings: Settings, today: dt.date) -> _Weighed:
    numbers = frozenset(n for n in (as_student_number(r.student_number) for r in rows) if n is not None)
    return _Weighed(decisions=decide_all(rows, settings, today, scope), enrolled=enrolled_counts(rows, scope),
                    row_count=len(rows), student_numbers=numbers)


def _google_client(run: Run) -> DirectoryClient:
    """An authorized client with the run's rate limit (or a stop with what to do)."""
    settings = run.settings
    policy = RetryPolicy(limiter=RateLimiter(settings.google.max_requests_per_second))
    return DirectoryClient(settings, google_credentials(settings), policy)


def _wait_for_directory(run: Run, reading: DirectoryRead, progress: Progress) -> Directory:
    """The directory a read brings; its errors become a stop that says what failed."""
    from google.auth.exceptions import RefreshError

    settings = run.settings
    try:
        directory = reading.result()
    except _http_error_class() as exc:
        raise GoogleError(f"Google: cannot read the directory of {settings.google.domain}: "
                          f"{describe_http_error(exc)}") from None
    except RefreshError as exc:
        raise GoogleError(_describe_refresh_error(exc, settings)) from None
    except NonJsonAnswer as exc:
        raise GoogleError(str(exc)) from None
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        where = settings.google.api_endpoint or "Google"
        url = settings.google.api_endpoint or "https://admin.googleapis.com/"
        raise GoogleError(f"Google: cannot reach {where}: {describe_network_error(exc, url)}") from None
    finally:
        progress.close()
    log.info("Google: %d accounts, %d OUs in %s", len(directory.accounts), len(directory.org_units),
             settings.google.domain)
    if directory.licensed is not None:
        log.info("Google: %d accounts hold the licence %s", len(directory.licensed), settings.licenses.sku_id)
    return directory


def _read_whole_directory(run: Run, *, with_licences: bool = True) -> tuple[DirectoryClient, Directory]:
    """An authorized client, and every account and OU of the domain read through it (and,
    with [licenses], who holds the licence)."""
    client = _google_client(run)
    progress = Progress("reading Google accounts")
    with DirectoryRead(client, run.settings, progress.step, with_licences=with_licences) as reading:
        return client, _wait_for_directory(run, reading, progress)


def _new_account_password(settings: Settings, changes: Sequence[Change],
                          dry_run: bool) -> tuple[str | None, StopRun | None]:
    """The new-account password, checked when the run would create accounts.

    A real run without a usable one stops here (StopRun).  A dry run warns, shows its whole
    plan, and then answers as the real run would: the returned stop is raised after it."""
    creates = sum(c.action == Action.CREATE for c in changes)
    if not creates:
        return None, None
    secret = read_secret(settings.accounts.new_password_env)
    problem = _password_problem(secret)
    if not problem:
        return secret.value, None
    problem = f"{problem}; accounts to create: {creates}"
    if not dry_run:
        raise StopRun(problem)
    log.warning("%s: a real run would stop here", problem)
    return None, StopRun("a real run would stop here (dry run): " + problem)


def _password_problem(secret: Secret) -> str | None:
    if not secret.value:
        return secret.missing("the new-account password")
    where = f"{secret.name} ({secret.source})"
    if len(secret.value) < 8:
        return f"the new-account password in {where} is shorter than 8 characters"
    if len(secret.value) > 100:
        return f"the new-account password in {where} is longer than 100 characters"
    return None


def _simple(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _check_schema(client: DirectoryClient, settings: Settings) -> tuple[bool, str]:
    """Does the custom attribute category hold both fields, with these names?"""
    cs = settings.custom_schema
    schemas = client.resource("schemas")
    try:
        schema = client.call(schemas.get(customerId="my_customer", schemaKey=cs.category))
    except _http_error_class() as exc:
        if _http_error_parts(exc)[0] != 404:
            raise
        listing = client.call(schemas.list(customerId="my_customer"))
        names = [s.get("schemaName", "") for s in listing.get("schemas", []) or []]
        close = [n for n in names if _simple(n) == _simple(cs.category)]
        hint = (f"; the domain has {', '.join(close)}: set [custom_schema] category to that" if close else
                f"; the domain has: {', '.join(names) or 'no custom attributes'}")
        return False, f"custom attribute category {cs.category} does not exist{hint}"
    fields = [f.get("fieldName", "") for f in schema.get("fields", []) or []]
    problems = []
    for key, wanted in (("school_field", cs.school_field), ("grad_year_field", cs.grad_year_field)):
        if wanted not in fields:
            close = [f for f in fields if _simple(f) == _simple(wanted)]
            problems.append(f"field {wanted} ([custom_schema] {key}) is missing"
                            + (f"; the domain calls it {close[0]}" if close else ""))
    if problems:
        return False, f"custom attribute category {cs.category}: " + "; ".join(problems) + \
            f" (its fields: {', '.join(fields) or 'none'})"
    return True, f"custom attribute category {cs.category} has {cs.school_field} and {cs.grad_year_field}"


def _schema_problem(client: DirectoryClient, settings: Settings, changes: Sequence[Change]) -> str | None:
    """Why the custom attributes cannot be sent, found once before any change; None when they
    can, or when no change sends them.  A category or field missing in Google would
    otherwise fail every create and update one by one."""
    if not any("customSchemas" in (change.after or {}) for change in changes):
        return None
    try:
        ok, text = _check_schema(client, settings)
    except _http_error_class() as exc:
        ok, text = False, (f"custom attributes could not be read: {describe_http_error(exc)} (does the "
                           "authorization include the userschema.readonly scope?)")
    if ok:
        return None
    return (f"{text}; nothing was changed: fix the custom attributes in the Admin console or "
            "[custom_schema] in the settings (--check shows what the domain has)")


def _reconciler(decisions: Mapping[str, Decision], directory: Directory, settings: Settings) -> Reconcile:
    """Rule 2 for a create that met an existing account: bring that account in step."""

    def reconcile(change: Change, account: Account) -> tuple[Change | None, tuple[Notice, ...]]:
        return change_for(decisions[_key(change.email)], account, settings, directory.org_units)

    return reconcile


def _apply(run: Run, kind: str, client: DirectoryClient, changes: Sequence[Change], password: str | None,
           reconcile: Reconcile | None = None) -> list[Outcome]:
    """Apply changes, logging and journalling each outcome as it arrives.

    The run stops handing out changes (`run.halt` says why) on Ctrl-C, when the journal
    cannot be written, when Google's authorization is lost, and in an outage; the changes
    under way finish and are journalled.
    """
    if not changes:
        return []
    journal = Journal(run.logs, run.run_id, kind)
    applier = Applier(client, run.settings, password, RateLimiter(run.settings.google.max_creates_per_second),
                      reconcile, halt=run.halt)
    progress = Progress("applying", len(changes))
    journal_error: list[str] = []

    def record(outcome: Outcome) -> None:
        if journal_error:
            return  # after a failed write, a line appended behind a half-written one would be lost too
        try:
            journal.record(outcome)
        except OSError as exc:
            journal_error.append(f"cannot write the journal {journal.path} ({exc.strerror or exc}): "
                                 f"is the disk of {run.logs} full? No new change was started; free some "
                                 "space there before the next run")
        except Exception as exc:  # a defect (say a value that cannot be encoded): the same stop
            log.debug("the journal's error in full:", exc_info=True)
            journal_error.append(f"cannot write the journal {journal.path} (unexpected {type(exc).__name__}: "
                                 f"{exc}): no new change was started; please report it with this log")
        if journal_error:
            log.error("%s", journal_error[0])
            run.halt.stop(StopReason.JOURNAL_FAILED, journal_error[0])

    def arrived(outcome: Outcome) -> None:
        progress.step()
        try:
            record(outcome)  # first: whatever happens while logging, the change is in the journal
        finally:
            for notice in outcome.notices:
                _log_notice(notice)
            if any(outcome is seatless for seatless in applier.seatless):
                log.info("student %s: %s", outcome.change.student_number, outcome.result)  # one error says it all
            else:
                _log_outcome(outcome)

    with _stop_signals(run.halt):
        try:
            outcomes = applier.apply(changes, progress=arrived)
        finally:
            progress.close()
    log.info("journal: %s (undo with --undo %s)", journal.path, run.run_id)
    if run.halt:
        applied = sum(o.ok for o in outcomes)
        not_tried = sum(o.status == Status.NOT_TRIED for o in outcomes)
        message = (f"{run.halt.message}; {applied} changes were applied before the run stopped, "
                   f"{not_tried} were not tried")
        log.error("%s", message)
        run.failures_to_email.append(message)
        if journal_error and run.halt.reason != StopReason.JOURNAL_FAILED:
            run.failures_to_email.append(journal_error[0])
    if applier.seatless:
        lic = run.settings.licenses
        message = (f"licences: no licences {lic.sku_id} (product {lic.product_id}) are left "
                   f"({applier.seats_gone}): {len(applier.seatless)} assigns were not made and those "
                   "students count as failed; free or buy seats in the Admin console, and the next run "
                   "assigns them")
        log.error("%s", message)
        run.failures_to_email.append(message)
    return outcomes


_SIGNAL_NAMES = {"SIGINT": "Ctrl-C", "SIGBREAK": "Ctrl-Break or the console closing",
                 "SIGTERM": "a request to stop (SIGTERM)"}


@contextlib.contextmanager
def _signal_handlers(names: Iterable[str], handler: Callable[[int, Any], None]) -> Iterator[None]:
    """`handler` for each of the named signals this platform has (SIGBREAK is Windows's
    only), while the block runs.  Handlers can only be set on the main thread; the previous
    ones come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in names:
        number = getattr(signal, name, None)
        if number is not None:
            try:
                previous[number] = signal.signal(number, handler)
            except (OSError, ValueError):
                pass
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _stop_signals(halt: Halt) -> Iterator[None]:
    """While changes are applied, Ctrl-C -- and Ctrl-Break, a closing console window or a
    stop request, where Python can catch them -- stop handing out changes instead of
    ending the run in the middle of one; a second one changes nothing."""
    def handler(number: int, frame: Any) -> None:
        name = _SIGNAL_NAMES.get(signal.Signals(number).name, signal.Signals(number).name)
        if halt.stop(StopReason.INTERRUPTED, f"interrupted ({name}): no new change was started, the ones "
                     "under way finished and are in the journal"):
            log.warning("%s: finishing the changes under way, then stopping", name)
        else:
            log.warning("%s again: still finishing the changes under way, so that the journal has them", name)

    with _signal_handlers(_SIGNAL_NAMES, handler):
        yield


@contextlib.contextmanager
def _stop_requests_interrupt() -> Iterator[None]:
    """Outside the applying, a stop request (Ctrl-Break or the console closing, the task
    ended: SIGBREAK, SIGTERM) ends the run as Ctrl-C does, so that the log, the email and
    the exit code say "interrupted" instead of the process just vanishing mid-read.  While
    changes are applied, _stop_signals takes over and finishes the changes under way."""
    def handler(number: int, frame: Any) -> None:
        name = signal.Signals(number).name
        raise KeyboardInterrupt(_SIGNAL_NAMES.get(name, name))

    with _signal_handlers(("SIGBREAK", "SIGTERM"), handler):  # SIGINT raises KeyboardInterrupt already
        yield


def _write_report_or_say(path: Path, outcomes: Sequence[Outcome], notices: Sequence[Notice],
                         unowned: Sequence[Account]) -> None:
    """Write the CSV report; a report that cannot be written (open in Excel, say) is logged
    and never changes the run's outcome."""
    try:
        write_report(path, outcomes, notices, unowned)
        log.info("report written to %s", path)
    except OSError as exc:
        log.error("could not write the report %s: %s", path, exc.strerror or exc)


def _save_counts(run: Run, counts: Mapping[int, int]) -> str | None:
    """Save the school counts once changes are applied; what went wrong, when they could not
    be saved (the run still writes its report, summary and email, then stops with exit 2)."""
    try:
        save_school_counts(run.counts_path, counts, run.settings.path)
    except OSError as exc:
        return ("the changes were applied, but the school counts were not saved: "
                + cannot_write("the school counts", run.counts_path, exc)
                + "; the next run's source-sanity check compares against the figures before this run")
    return None


def _record_applied(run: Run, applied: AppliedRuns, kind: str, outcomes: Sequence[Outcome], *,
                    plan: str | None = None, undone: str | None = None) -> str | None:
    """Note a run that sent changes (any reviewed plan written before it is now an older
    plan), and the plan or undo as done when the run finished every change of it; what
    went wrong, when the record could not be written."""
    if not outcomes and not plan and not undone:
        return None
    # A stopped or failed plan or undo is not done: running it again finishes it.
    finished = not run.halt and not any(o.failed or o.status == Status.NOT_TRIED for o in outcomes)
    try:
        applied.applied(run.run_id, kind, plan=plan, undone=undone, finished=finished)
    except OSError as exc:
        return ("the changes were applied, but " + cannot_write("the record of applied runs", applied.path, exc)
                + "; a plan written before this run would not be recognised as older")
    return None


def _stop_if(problems: Sequence[str | None], code: int) -> int:
    """The run's exit code, or a stop (exit 2) when a state file could not be saved."""
    said = [problem for problem in problems if problem]
    if said:
        raise StopRun("; ".join(said))
    return code


def _interrupted(run: Run, code: int) -> int:
    """The exit code of a run that a Ctrl-C (or the like) met after its summary was made."""
    if run.halt.reason == StopReason.INTERRUPTED and code in (EXIT_OK, EXIT_FAILURES):
        log.warning("interrupted as the run ended: its changes, journal, state files and summary are written")
        return EXIT_INTERRUPTED
    return code


def _finish(run: Run, outcomes: Sequence[Outcome], notices: Sequence[Notice], unchanged: int,
            dry_run: bool = False, unowned: Sequence[Account] = ()) -> int:
    if run.args.report:
        _write_report_or_say(run.args.report, outcomes, notices, unowned)
    run.summary = summarize(outcomes, notices, unchanged, dry_run, time.monotonic() - run.started,
                            len(unowned), run.halt.reason)
    for outcome in outcomes:
        if outcome.failed:
            run.failures_to_email.append(f"student {outcome.change.student_number} ({outcome.change.email}): {outcome.result}")
    for notice in notices:
        if notice.level == Level.ERROR:
            run.failures_to_email.append(f"student {notice.student_number} ({notice.email}): {notice.message}")
    log.info("%s", run.summary.text(), extra=ASKED_FOR if dry_run else None)
    if run.halt.reason is not None:
        return run.halt.reason.exit_code
    return EXIT_FAILURES if run.summary.failures else EXIT_OK


def run_sync(run: Run) -> int:
    """A sync run (or dry run) for a scope."""
    args, settings = run.args, run.settings
    today = run.today()
    with _powerschool(run) as connection:
        schools = _read_school_rows(connection)
        scope = resolve_scope(_scope_kind(args), schools, args.building or ())
        # Google's listing is mostly waiting: once PowerSchool has vouched for the scope, the
        # directory is read while the students are read and weighed.
        client = _google_client(run)
        # Loading and building the client is CPU work: done here, before the listing's
        # waiting starts, it does not compete with the PowerSchool rows for the interpreter.
        client.resource("users")
        progress = Progress("reading Google accounts")
        with DirectoryRead(client, settings, progress.step) as reading, contextlib.closing(progress):
            weighed = _weigh(_read_rows(connection, scope, schools), scope, settings, today)
            directory = _wait_for_directory(run, reading, progress)
    directory = confirm_org_units(client, directory, {d.target_ou for d in weighed.decisions.by_email.values()})
    plan_ = plan_changes(weighed.decisions, directory, settings)
    for notice in plan_.notices:
        _log_notice(notice)
    unowned = unowned_accounts(directory, weighed.student_numbers, settings) if scope.kind == "all" else []
    for account in unowned[:50]:
        log.info("account %s in %s matches no PowerSchool student (report only)", account.email, account.org_unit)
    if len(unowned) > 50:
        log.info("... and %d more accounts nobody owns (see --report)", len(unowned) - 50)
    applied = AppliedRuns(run.applied_path)
    if args.plan_out:
        write_plan_file(args.plan_out, plan_, scope=scope, today=today, settings=settings, run_id=run.run_id,
                        active=weighed.enrolled, last_applied_run=applied.last_run_id)
        log.info("plan written to %s", args.plan_out)

    problems = _safety_problems(plan_, weighed.row_count, weighed.enrolled, scope, settings,
                                load_school_counts(run.counts_path), directory)
    # A dry run meets the stops of the real run after showing the whole plan.
    stop: StopRun | None = None
    if problems and not args.allow_mass_changes:
        if args.dry_run:
            stop = SafetyStop(
                "a real run would stop here (safety stop, dry run): " + "; ".join(problems) + ". If the "
                "plan is right (for example graduates on September 1), write it with --plan-out FILE "
                "and apply it with --apply-plan FILE, or run again with --allow-mass-changes")
        else:
            saved = run.logs / f"plan-{run.run_id}.json"
            write_plan_file(saved, plan_, scope=scope, today=today, settings=settings, run_id=run.run_id,
                            active=weighed.enrolled, last_applied_run=applied.last_run_id)
            if args.report:
                stopped = [Outcome(c, Status.NOT_APPLIED, "safety stop") for c in plan_.changes]
                _write_report_or_say(args.report, stopped, plan_.notices, unowned)
            raise SafetyStop(
                "safety stop, nothing was changed: " + "; ".join(problems) + f". The plan is in {saved} "
                "(review it, or run with --dry-run --report FILE). If it is right (for example "
                "graduates on September 1), apply it with --apply-plan " + str(saved)
                + " or run again with --allow-mass-changes")
    elif problems:
        for problem in problems:
            log.warning("allowed by --allow-mass-changes: %s", problem)

    password, no_password = _new_account_password(settings, plan_.changes, args.dry_run)
    stop = stop or no_password
    schema = None if stop else _schema_problem(client, settings, plan_.changes)
    if schema:
        if not args.dry_run:
            raise StopRun(schema)
        stop = StopRun("a real run would stop here (dry run): " + schema)
    if args.dry_run:
        code = _finish(run, _preview(plan_.changes), plan_.notices, plan_.unchanged, True, unowned)
        if stop:
            raise stop
        return code
    # Ctrl-C stays a stop until the run's record is written: the state files, the report, the summary.
    with _stop_signals(run.halt):
        outcomes = _apply(run, "sync", client, plan_.changes, password,
                          _reconciler(plan_.decisions, directory, settings))
        problems = [_save_counts(run, weighed.enrolled), _record_applied(run, applied, "sync", outcomes)]
        code = _finish(run, outcomes, plan_.notices, plan_.unchanged, False, unowned)
    return _stop_if(problems, _interrupted(run, code))


def _nothing_to_do(run: Run) -> int:
    """A plan or undo already done: exit 0 with no summary of figures (nothing was weighed),
    and the asked-for report, empty, so that a scheduled job finds its file."""
    if run.args.report:
        _write_report_or_say(run.args.report, [], [], [])
    return EXIT_OK


def run_apply_plan(run: Run) -> int:
    """Apply a reviewed plan: its changes only, each while today's decision (PowerSchool as it
    is now) still calls for it and the account still holds the planned 'now'."""
    args, settings = run.args, run.settings
    document, changes = read_plan_file(args.apply_plan, settings)
    scope = document.get("scope")
    log.info("plan %s: %d changes, made %s for %s", args.apply_plan, len(changes), document.get("created"),
             scope.get("kind") if isinstance(scope, dict) else "(no scope)")
    applied = AppliedRuns(run.applied_path)
    digest = plan_digest(document)
    before = applied.plans.get(digest)
    if before:
        log.info("nothing to do: plan %s was already applied on %s (run %s); for what changed since, "
                 "make a new plan with --dry-run --plan-out FILE", args.apply_plan, applied.when(before),
                 before.get("run_id"))
        return _nothing_to_do(run)
    older = applied.plan_is_older(document, digest)
    if older and not args.allow_older_plan:
        raise StopRun(
            f"plan file {args.apply_plan} was written before run {applied.last_run_id} applied changes "
            f"({applied.last.get('time')}): applying it could undo that run's work, for example suspend "
            "a student who re-enrolled since. Make a new plan (--dry-run --plan-out FILE), or apply this "
            "one anyway with --allow-older-plan (its changes are then checked against PowerSchool as "
            "it is now)")
    if older:
        log.warning("plan %s is older than run %s (--allow-older-plan): its figures will not become the "
                    "source-sanity baseline", args.apply_plan, applied.last_run_id)
    decisions = _decisions_now(run, changes) if changes else {}
    # Who holds the licence is read only when the plan has licence changes to weigh.
    client, directory = _read_whole_directory(run, with_licences=any(c.action == Action.LICENSE for c in changes))
    current, stale = _current_changes(changes, decisions, directory, settings)
    for outcome in stale:
        _log_outcome(outcome)
    dry_run = args.dry_run
    password, stop = _new_account_password(settings, current, dry_run)
    schema = None if stop else _schema_problem(client, settings, current)
    if schema and not dry_run:
        raise StopRun(schema)
    if schema:
        stop = StopRun("a real run would stop here (dry run): " + schema)
    if dry_run:
        code = _finish(run, [*_preview(current), *stale], [], 0, dry_run)
        if stop:
            raise stop
        return code
    try:
        active = {int(k): int(v) for k, v in (document.get("active_students") or {}).items()}
    except (AttributeError, TypeError, ValueError):
        active = {}
    # Ctrl-C stays a stop until the run's record is written: the state files, the report, the summary.
    with _stop_signals(run.halt):
        outcomes = _apply(run, "apply-plan", client, current, password)
        problems = [_record_applied(run, applied, "apply-plan", outcomes, plan=digest)]
        if active and not older:  # the reviewed figures become the source-sanity baseline
            problems.insert(0, _save_counts(run, active))
        code = _finish(run, [*outcomes, *stale], [], 0, dry_run)
    return _stop_if(problems, _interrupted(run, code))


def _decisions_now(run: Run, changes: Sequence[Change]) -> Mapping[str, Decision]:
    """Today's decision for every student a plan names, weighed district-wide.

    The plan's own `scope` is not trusted: PowerSchool is read for the whole district and
    each named student is weighed across all their rows, as a nightly run would."""
    numbers = {change.student_number for change in changes}
    with _powerschool(run) as connection:
        schools = _read_school_rows(connection)
        scope = resolve_scope("all", schools)
        rows = [row for row in _read_rows(connection, scope, schools)
                if as_student_number(row.student_number) in numbers]
    return decide_all(rows, run.settings, run.today(), scope).by_email


def _current_changes(changes: Sequence[Change], decisions: Mapping[str, Decision], directory: Directory,
                     settings: Settings) -> tuple[list[Change], list[Outcome]]:
    """The changes of a reviewed plan that today's decision still wants and whose account
    still holds the planned "now", in the plan's order; the others as stale outcomes."""
    reasons: dict[int, str | None] = {}
    accounts = [directory.accounts.get(change.email.lower()) for change in changes]
    for index, change in enumerate(changes):
        if change.action == Action.LICENSE:
            continue
        reason = stale_reason(change, decisions.get(_key(change.email)), settings)
        if reason is None:
            account = accounts[index]
            current = account is None if change.action == Action.CREATE else holds_values(account, change.before)
            reason = None if current else "the account changed since the plan was made; skipped"
        reasons[index] = reason
    # An assign to an account that the plan creates is current only while that create goes out.
    creating = {_key(c.email) for i, c in enumerate(changes) if c.action == Action.CREATE and reasons[i] is None}
    for index, change in enumerate(changes):
        if change.action != Action.LICENSE:
            continue
        reason = stale_reason(change, decisions.get(_key(change.email)), settings)
        if reason is None and not _licence_still_current(change, accounts[index], directory, creating):
            reason = "the account's licence changed since the plan was made; skipped"
        reasons[index] = reason
    current = [change for index, change in enumerate(changes) if reasons[index] is None]
    stale = [Outcome(change, Status.STALE, reasons[index]) for index, change in enumerate(changes)
             if reasons[index] is not None]
    return current, stale


def _licence_still_current(change: Change, account: Account | None, directory: Directory,
                           creating: set[str]) -> bool:
    """A planned release is stale once the account no longer holds the licence, an assign once
    it holds it (SPEC 8); an assign to an account the plan creates is current."""
    holds = directory.licensed is not None and _key(change.email) in directory.licensed
    if RELEASE_LICENSE in change.labels:
        return account is not None and holds
    return not holds and (account is not None or _key(change.email) in creating)


def _students_known(run: Run, entries: Sequence[Mapping[str, Any]]) -> set[int]:
    """Which of a journal's student numbers PowerSchool has a row for now, district-wide."""
    numbers = {entry.get("student_number") for entry in entries if entry.get("result") == Status.APPLIED}
    if not numbers:
        return set()
    with _powerschool(run) as connection:
        schools = _read_school_rows(connection)
        rows = _read_rows(connection, resolve_scope("all", schools), schools)
    return {n for n in (as_student_number(row.student_number) for row in rows) if n in numbers}


def _preview(changes: Sequence[Change]) -> list[Outcome]:
    """A dry run's outcomes: every change printed, none sent."""
    for change in changes:
        verbs = "+".join("update attributes" if label == "attributes" else label for label in change.labels)
        log.info("would %s: %s (%s)", verbs, change.email, change.describe(), extra=ASKED_FOR)
    return [Outcome(c, Status.PLANNED) for c in changes]


def run_undo(run: Run) -> int:
    """Reverse an earlier run from its journal, under the limits of any run."""
    args, settings = run.args, run.settings
    entries = read_journal(run.logs, args.undo, settings)
    applied = AppliedRuns(run.applied_path)
    before = applied.undone.get(args.undo)
    if before:
        log.info("nothing to do: run %s was already undone on %s (run %s)", args.undo, applied.when(before),
                 before.get("run_id"))
        return _nothing_to_do(run)
    log.info("undo of run %s: %d journal entries", args.undo, len(entries))
    students = _students_known(run, entries)
    client, directory = _read_whole_directory(
        run, with_licences=any(entry.get("action") == Action.LICENSE for entry in entries))
    changes, notices, already = undo_changes(entries, directory, settings, students)
    for notice in notices:
        _log_notice(notice)
    log.info("the undo would suspend %d accounts ([safety] max_suspensions = %d)",
             sum("suspend" in c.labels for c in changes), settings.safety.max_suspensions)
    stop: StopRun | None = None
    problems = change_limit_problems(changes, settings, f"the undo of run {args.undo}")
    if problems and args.allow_mass_changes:
        for problem in problems:
            log.warning("allowed by --allow-mass-changes: %s", problem)
    elif problems and args.dry_run:
        stop = SafetyStop("a real run would stop here (safety stop, dry run): " + "; ".join(problems)
                          + "; if it is right, run the undo with --allow-mass-changes")
    elif problems:
        raise SafetyStop("safety stop, nothing was changed: " + "; ".join(problems) + f". Review it with "
                         f"--undo {args.undo} --dry-run; if it is right, run the undo again with "
                         "--allow-mass-changes")
    schema = None if stop else _schema_problem(client, settings, changes)
    if schema and not args.dry_run:
        raise StopRun(schema)
    if schema:
        stop = StopRun("a real run would stop here (dry run): " + schema)
    if args.dry_run:
        code = _finish(run, _preview(changes), notices, already, dry_run=True)
        if stop:
            raise stop
        return code
    # Ctrl-C stays a stop until the run's record is written: the state files, the report, the summary.
    with _stop_signals(run.halt):
        outcomes = _apply(run, "undo", client, changes, None)
        problems = [_record_applied(run, applied, "undo", outcomes, undone=args.undo)]
        code = _finish(run, outcomes, notices, already)
    return _stop_if(problems, _interrupted(run, code))


def run_check(run: Run) -> int:
    """Preflight: one line per check, OK or FAIL with what to do.  Changes nothing."""
    settings = run.settings
    results: list[bool] = []

    def report(ok: bool, text: str) -> None:
        results.append(ok)
        if ok:
            log.info("OK   %s", text)
        else:  # shown with -q too
            log.error("FAIL %s", text, extra=PLAIN)

    report(True, f"settings {settings.path} are valid")
    rows: list[StudentRow] = []
    scope: Scope | None = None
    counts: dict[int, int] = {}
    try:
        scope, rows = _read_powerschool(run, _scope_kind(run.args) or "all", report)
        counts = enrolled_counts(rows, scope)
        report(True, f"PowerSchool reachable ({run.source_version}); active students per school for "
               f"{scope.describe()}: "
               + ", ".join(f"{school}: {n}" for school, n in sorted(counts.items())))
    except StopRun as exc:
        report(False, str(exc))

    directory = None
    try:
        client, directory = _read_whole_directory(run, with_licences=False)
        report(True, f"Google authorized {_who(settings)}; {len(directory.accounts)} accounts in "
               f"{settings.google.domain}")
    except StopRun as exc:
        report(False, str(exc))

    weighed: Decisions | None = None
    if directory is not None:
        needed = {settings.ous.suspended, settings.ous.graduated}
        decisions: Mapping[str, Decision] | None = None
        if scope is not None:
            weighed = decide_all(rows, settings, run.today(), scope)
            decisions = weighed.by_email
            needed |= {d.target_ou for d in decisions.values()}
            schools = {r.school for r in rows if r.school is not None and r.school.number in scope.school_numbers}
            needed |= {building_ou(school, settings)
                       for school in schools if school.abbreviation and counts.get(school.number)}
        directory = confirm_org_units(client, directory, needed)
        missing = sorted(ou for ou in needed if ou.lower() not in directory.org_units)
        report(not missing, f"all {len(needed)} OUs the rules target exist" if not missing else
               f"{len(missing)} OUs the rules target are missing in Google (create them in the Admin "
               f"console, or fix [ous]): " + ", ".join(missing))
        try:
            report(*_check_schema(client, settings))
        except _http_error_class() as exc:
            report(False, f"custom attributes could not be read: {describe_http_error(exc)} (does the "
                   "authorization include the userschema.readonly scope?)")
        if settings.licenses:
            report(*_check_licences(client, settings, None if decisions is None else set(decisions)))
    for ok, text in _secret_checks(settings):
        report(ok, text)
    for ok, text in _state_file_checks(run):
        if ok is None:
            log.warning("%s", text)
        else:
            report(ok, text)
    if scope is not None:
        for ok, text in _next_run_figures(run, scope, len(rows), counts, weighed, directory):
            report(ok, text)
    return EXIT_OK if all(results) else EXIT_ERROR


def _next_run_figures(run: Run, scope: Scope, row_count: int, counts: Mapping[int, int],
                      weighed: Decisions | None, directory: Directory | None) -> Iterator[tuple[bool, str]]:
    """The safety figures the next run would meet (SPEC section 7): each school's drop since
    the last run, and the planned suspensions against [safety] max_suspensions; a FAIL when
    the next run would stop on them."""
    settings, safety = run.settings, run.settings.safety
    previous = load_school_counts(run.counts_path)
    allow = " (if that is right, run with --allow-mass-changes, or review and apply its plan)"
    if not row_count and _had_students(scope, previous, directory, settings):
        yield False, (f"the next run would stop (source sanity): PowerSchool returned no students for "
                      f"{scope.describe()}")
    else:
        drops = school_drops(previous, counts, safety.max_school_drop_percent)
        compared = sum(1 for school, n in previous.items() if school in counts and n >= 20)
        if drops:
            yield False, ("the next run would stop (source sanity): active students dropped by more than "
                          f"[safety] max_school_drop_percent = {safety.max_school_drop_percent:g}% since the "
                          "last run: " + "; ".join(drops) + allow)
        else:
            yield True, (f"source sanity: no school dropped by more than [safety] max_school_drop_percent = "
                         f"{safety.max_school_drop_percent:g}% since the last run ({compared} schools of 20 "
                         "or more students compared)")
    if weighed is None or directory is None:
        return
    suspensions = len(plan_changes(weighed, directory, settings).suspensions())
    if suspensions > safety.max_suspensions:
        yield False, (f"the next run would stop (mass change): it would suspend {suspensions} accounts, more "
                      f"than [safety] max_suspensions = {safety.max_suspensions}" + allow)
    else:
        yield True, (f"the next run would suspend {suspensions} accounts ([safety] max_suspensions = "
                     f"{safety.max_suspensions})")


def _check_licences(client: DirectoryClient, settings: Settings, students: set[str] | None) -> tuple[bool, str]:
    """[licenses]: the product and SKU answer, and how many accounts of the scope hold it."""
    from google.auth.exceptions import RefreshError

    lic = settings.licenses
    try:
        holders = read_license_holders(client, settings)
    except StopRun as exc:
        return False, str(exc)
    except RefreshError as exc:
        return False, _describe_refresh_error(exc, settings)
    except NonJsonAnswer as exc:
        return False, f"licences could not be read: {exc}"
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        return False, f"licences could not be read: cannot reach Google ({describe_network_error(exc)})"
    held = (f"{len(holders & students)} accounts of the scope hold it ({len(holders)} in all)"
            if students is not None else f"{len(holders)} accounts hold it")
    return True, f"licences: product {lic.product_id}, SKU {lic.sku_id} answer; {held}"


def _secret_checks(settings: Settings) -> Iterator[tuple[bool, str]]:
    """Where each secret the settings name was found (never its value), one line each."""
    ps, em = settings.powerschool, settings.email
    named = []
    if ps.source == "oracle":
        named += [(ps.user_env, "the PowerSchool database user"), (ps.password_env, "its password"),
                  (ps.dsn_env, "the PowerSchool database DSN")]
    elif ps.source == "api":
        named += [(ps.client_id_env, "the PowerSchool plugin's client ID"),
                  (ps.client_secret_env, "the plugin's client secret")]
    named.append((settings.accounts.new_password_env, "the new-account password"))
    if em is not None:
        named += [(name, what) for name, what in ((em.user_env, "the SMTP user"), (em.password_env, "the SMTP password"))
                  if name]
    for name, what in named:
        secret = read_secret(name)
        if not secret.value:
            yield False, f"secret {name} ({what}) missing: {secret.nowhere()}"
        elif name == settings.accounts.new_password_env and _password_problem(secret):
            yield False, f"{_password_problem(secret)} (needed to create accounts)"
        else:
            yield True, f"secret {name} ({what}) found in the {secret.source}"


def _state_file_checks(run: Run) -> Iterator[tuple[bool | None, str]]:
    """Every file a run writes, tried by writing one: (passed, line), or (None, a warning)."""
    refused, _ = try_writing(run.logs, folder=True)
    if refused:
        yield False, cannot_write("in the logs folder", run.logs, refused)
        return
    files = [("the run lock", run.lock_path, False), ("the school counts", run.counts_path, False),
             ("the record of applied runs", run.applied_path, False)]
    if run.settings.google.auth == "oauth":
        files.append(("the token file", run.settings.google.token_file, True))
    passed = True
    for what, path, private in files:
        refused, warning = try_writing(path, private=private)
        if refused:
            passed = False
            yield False, cannot_write(what, path, refused)
        elif warning:
            yield None, (f"{what} {path}: files in {path.parent} cannot be made private ({warning}), so other "
                         "users of this computer may be able to read the token")
    if passed:
        yield True, (f"logs folder {run.logs} can be written as {account_name()}, and "
                     + ", ".join(what.removeprefix("the ") for what, _, _ in files))


def _who(settings: Settings) -> str:
    gg = settings.google
    if gg.auth == "service_account":
        return f"as service account {gg.service_account_file.name} acting for {gg.delegated_admin}"
    if gg.auth == "oauth":
        return f"with the token in {gg.token_file}"
    return f"(no authorization: local endpoint {gg.api_endpoint})"


# =============================================================================
# Command line
# =============================================================================
# Options, their combinations, and `main`, which turns every way a run can end into an
# exit code.


def _parse_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2026-09-01") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="student_sync.py",
        description="Keep Google Workspace student accounts in step with PowerSchool.",
        epilog="Exit codes: 0 in step, 1 some students failed (or a long outage stopped the changes), "
               "2 usage/settings/connection/authorization error (or, part-way, authorization lost or the "
               "journal unwritable), 3 stopped by a safety limit, 130 interrupted (Ctrl-C): the changes "
               "under way finished and are in the journal.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--all", action="store_true", help="every building")
    scope.add_argument("--state-reporting", action="store_true",
                       help="buildings not excluded from state reporting")
    scope.add_argument("--building", type=int, nargs="+", action="extend", metavar="N",
                       help="these building numbers (repeat --building to add more)")
    parser.add_argument("--config", type=Path, default=SCRIPT_DIR / "student_sync.toml",
                        metavar="FILE", help="settings file (default: student_sync.toml beside the script)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    parser.add_argument("--report", type=Path, metavar="FILE", help="write every change and its outcome as CSV")
    parser.add_argument("--as-of", type=_parse_date, metavar="YYYY-MM-DD",
                        help="evaluate date rules (summer grace) as of this date")
    parser.add_argument("--allow-mass-changes", action="store_true",
                        help="let this one run go past the [safety] limits")
    parser.add_argument("--plan-out", type=Path, metavar="FILE", help="write the plan as JSON for review")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--apply-plan", type=Path, metavar="FILE",
                      help="apply a reviewed plan file: its changes only, where still current")
    parser.add_argument("--allow-older-plan", action="store_true",
                        help="with --apply-plan: apply a plan written before the last run that applied "
                             "changes (its changes are checked against PowerSchool as it is now)")
    mode.add_argument("--undo", metavar="RUN_ID", help="reverse the changes of an earlier run")
    mode.add_argument("--check", action="store_true", help="preflight checks; changes nothing")
    mode.add_argument("--authorize", action="store_true",
                      help="sign in to Google once in a browser and save the token")
    mode.add_argument("--store-secret", metavar="NAME",
                      help="save a secret in the operating system's credential store under NAME "
                           "(asked twice, not shown)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more output")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return parser


def _usage_problem(args: argparse.Namespace) -> str | None:
    """A combination of options that makes no sense, in words; None when fine."""
    kind = _scope_kind(args)
    if args.allow_older_plan and not args.apply_plan:
        return "--allow-older-plan goes with --apply-plan FILE"
    if args.apply_plan or args.undo:
        option = "--apply-plan" if args.apply_plan else "--undo"
        if kind:
            return f"{option} takes no scope: it applies exactly what it names"
        if args.plan_out or args.as_of:
            return f"{option} cannot be combined with --plan-out or --as-of"
        return None
    if args.store_secret:
        if kind or args.plan_out or args.report or args.dry_run:
            return "--store-secret takes only a NAME (and --config)"
        if not _VARIABLE_NAME.fullmatch(args.store_secret):
            return f"--store-secret {args.store_secret!r}: a secret's name is an environment variable's name, like NEW_USER_PASSWORD"
        return None
    if args.check or args.authorize:
        return None
    if kind is None:
        return "choose a scope: --all, --state-reporting or --building N [N ...]"
    return None


def _store_secret(name: str, config: Path) -> int:
    """--store-secret NAME: ask for the secret twice without echo and put it in the credential
    store.  The value is never printed, logged or put in a message."""
    import getpass

    try:  # a name the settings do not use is most likely a typing mistake: say so, store anyway
        settings = load_settings(config)
    except StopRun:
        settings = None
    if settings is not None and name not in _secret_names(settings):
        log.warning("%s is not a name the settings file %s uses for a secret (it uses: %s)",
                    name, settings.path, ", ".join(_secret_names(settings)))
    try:
        first = getpass.getpass(f"{name}: ")
        second = getpass.getpass(f"{name} again: ")
    except (EOFError, KeyboardInterrupt):
        log.error("nothing stored")
        return EXIT_ERROR
    if not first:
        log.error("%s: an empty secret; nothing stored", name)
        return EXIT_ERROR
    if first != second:
        log.error("%s: the two entries differ; nothing stored", name)
        return EXIT_ERROR
    try:
        import keyring

        keyring.set_password(SECRET_SERVICE, name, first)
    except ImportError:
        log.error("cannot use the credential store: the keyring package is not installed "
                  "(pip install -r requirements.txt); nothing stored")
        return EXIT_ERROR
    except Exception as exc:  # each backend fails its own way: NoKeyringError, a locked store, D-Bus
        log.error("cannot store %s in the credential store: %s; nothing stored (use the environment "
                  "variable instead)", name, _keyring_error(exc, first))
        return EXIT_ERROR
    log.info("%s stored in the credential store for %s (service %s)", name, account_name(), SECRET_SERVICE)
    if os.environ.get(name):
        log.warning("the environment variable %s is set here, and wins over the stored secret", name)
    return EXIT_OK


def _secret_names(settings: Settings) -> list[str]:
    """Every secret name the settings file uses (whether or not this source needs it)."""
    ps, em = settings.powerschool, settings.email
    names = [ps.user_env, ps.password_env, ps.dsn_env, ps.client_id_env, ps.client_secret_env,
             settings.accounts.new_password_env]
    if em is not None:
        names += [n for n in (em.user_env, em.password_env) if n]
    return names


def _run_authorize(settings: Settings) -> int:
    if settings.google.auth != "oauth":
        log.error('--authorize is for [google] auth = "oauth"; this settings file uses "%s"',
                  settings.google.auth)
        return EXIT_ERROR
    google_credentials(settings, interactive=True)
    return EXIT_OK


def _email_after(run: Run, code: int, fatal: str | None) -> None:
    em = run.settings.email
    if em is None or run.args.check or (em.when == "problems" and code == EXIT_OK):
        return
    outcome = {EXIT_OK: "OK", EXIT_FAILURES: "some students failed", EXIT_ERROR: "could not run",
               EXIT_SAFETY: "stopped by a safety limit", EXIT_INTERRUPTED: "interrupted"}.get(code, f"exit {code}")
    if run.halt.reason is not None and run.halt.reason != StopReason.INTERRUPTED:
        outcome = f"stopped early, {run.halt.reason}"
    what = ("undo " + run.args.undo if run.args.undo else "apply-plan" if run.args.apply_plan
            else _scope_kind(run.args) or "run")
    if run.args.dry_run:  # nothing was changed, whatever the outcome says
        what += " (dry run)"
    body = [f"student_sync {what} on {socket.gethostname()}, run {run.run_id}: {outcome} (exit {code})", ""]
    if run.args.dry_run:
        body += ["This was a dry run: nothing was changed.", ""]
    if fatal:
        body += [fatal, ""]
    if run.summary:
        body += [run.summary.text(), ""]
    if run.failures_to_email:
        body += ["Failures:"] + [f"  {line}" for line in run.failures_to_email[:100]]
        if len(run.failures_to_email) > 100:
            body.append(f"  ... and {len(run.failures_to_email) - 100} more")
        body.append("")
    body.append(f"Log: {run.log_path or '(no log file)'}")
    send_summary_email(run.settings, f"student_sync {what}: {outcome}", "\n".join(body))


def _email_and_exit_code(run: Run, code: int, fatal: str | None) -> int:
    """Email the summary, if set up, and give the run's exit code.

    The email is best effort: a Ctrl-C while it is sent abandons the email, not the run.
    As for a Ctrl-C that meets a run after its summary is made (_interrupted), a run that
    finished exits 130 and a run that a stop ended keeps that stop's code.
    """
    try:
        _email_after(run, code, fatal)
    except KeyboardInterrupt:
        log.warning("interrupted (Ctrl-C) while the summary email was being sent: the email was abandoned "
                    "and may not arrive; the run had ended (exit %d) and its log says what it did", code)
        return EXIT_INTERRUPTED if code in (EXIT_OK, EXIT_FAILURES) else code
    return code


def _same_file(one: Path, other: Path) -> bool:
    """Do two spellings name the same file (relative or absolute, any case on Windows)?"""
    try:
        if one.exists() and other.exists():
            return os.path.samefile(one, other)
        return os.path.normcase(one.resolve()) == os.path.normcase(other.resolve())
    except OSError:
        return False


def _one_of_the_inputs(path: Path | None, settings: Settings, args: argparse.Namespace) -> str | None:
    """Which of the tool's inputs an output path names, in words; None when it is none of them."""
    if path is None:
        return None
    gg = settings.google
    inputs = [("the settings file", settings.path),
              ("the PowerSchool database ([powerschool] sqlite)", settings.powerschool.sqlite),
              ("the OAuth client file ([google] credentials_file)", gg.credentials_file),
              ("the token file ([google] token_file)", gg.token_file),
              ("the service account key ([google] service_account_file)", gg.service_account_file),
              ("the plan given to --apply-plan", args.apply_plan)]
    if path is args.report and args.plan_out is not None:
        inputs.append(("the --plan-out file", args.plan_out))
    for what, candidate in inputs:
        if candidate is not None and _same_file(Path(path), Path(candidate)):
            return what
    return None


def _unwritable(path: Path | None) -> str | None:
    """Why an output file named on the command line cannot be written, found before any
    change by writing there (os.access ignores Windows access lists)."""
    if path is None:
        return None
    if path.is_dir():
        return "it is a folder"
    refused, _ = try_writing(path)
    if refused:
        return (f"{refused.strerror or type(refused).__name__} for {account_name()}"
                + (" (is it open in another program?)" if path.exists() else ""))
    return None


def _beside_settings(args: argparse.Namespace, settings: Settings) -> None:
    """Relative --report, --plan-out and --apply-plan paths are relative to the settings
    file's folder: Task Scheduler starts a task in System32."""
    base = settings.path.resolve().parent
    for name in ("report", "plan_out", "apply_plan"):
        value = getattr(args, name)
        if value is not None and not value.is_absolute():
            setattr(args, name, base / value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has said what is wrong (or printed --help): its code is the answer
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    setup_logging(-1 if args.quiet else args.verbose)
    problem = _usage_problem(args)
    if problem:
        parser.print_usage(sys.stderr)
        log.error("%s", problem)
        return EXIT_ERROR
    if args.store_secret:
        return _store_secret(args.store_secret, args.config)
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

    _beside_settings(args, settings)
    for option, path in (("--report", args.report), ("--plan-out", args.plan_out)):
        problem = _one_of_the_inputs(path, settings, args)
        if problem:
            log.error("%s %s is %s, one of this tool's inputs: writing there would overwrite it; "
                      "choose another file", option, path, problem)
            return EXIT_ERROR
        problem = _unwritable(path)
        if problem:
            log.error("%s %s cannot be written: %s", option, path, problem)
            return EXIT_ERROR
    now = dt.datetime.now()
    try:
        run_id, handler, log_path = open_run_log(settings, now)
    except StopRun as exc:
        run_id, handler, log_path = f"{now:%Y%m%d-%H%M%S}-{settings.instance}", None, None
        if not args.check:  # --check goes on without a log, and fails the logs folder's line
            log.error("%s", exc)
            return _email_and_exit_code(Run(args, settings, run_id), exc.exit_code, str(exc))
    run = Run(args, settings, run_id, log_path)
    code, fatal = EXIT_ERROR, None
    try:
        log.debug("student_sync %s, run %s, settings %s, arguments %s", __version__, run.run_id,
                  settings.path, " ".join(argv if argv is not None else sys.argv[1:]))
        task = (run_check if args.check else run_apply_plan if args.apply_plan
                else run_undo if args.undo else run_sync)
        with _stop_requests_interrupt():
            if args.check or args.dry_run:  # changes nothing: no need to wait for another run
                code = task(run)
            else:
                with RunLock(run.lock_path):
                    code = task(run)
    except StopRun as exc:
        log.error("%s", exc)
        code, fatal = exc.exit_code, str(exc)
    except KeyboardInterrupt as exc:  # outside the applying, where Ctrl-C is only a stop
        fatal = f"interrupted ({exc.args[0] if exc.args and isinstance(exc.args[0], str) else 'Ctrl-C'})"
        log.error("%s", fatal)
        code = EXIT_INTERRUPTED
    except OSError as exc:  # the computer refused a file (a full disk, no rights): which, and to whom
        log.debug("the refusal in full:", exc_info=True)
        fatal = (f"the system refused a file operation to {account_name()}: {exc.strerror or type(exc).__name__}"
                 + (f" ({exc.filename})" if exc.filename else "") + "; see the log for what was done before")
        log.error("%s", fatal)
        code = EXIT_ERROR
    except Exception:  # a defect: keep the whole story in the log and say so
        log.exception("unexpected error; please report it with this log")
        code, fatal = EXIT_ERROR, "unexpected error: see the log"
    finally:
        try:
            code = _email_and_exit_code(run, code, fatal)
        finally:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()
                prune_run_files(settings)
    return code


if __name__ == "__main__":
    sys.exit(main())
