"""Fixtures: a local Directory API server, a SQLite PowerSchool, and a way to run the CLI."""

from __future__ import annotations

import copy
import json
import email as email_lib
import re
import socket
import sys
import threading
from email import policy as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import student_sync  # noqa: E402
from testkit import district  # noqa: E402
from testkit.directory_server import DirectoryServer  # noqa: E402

PASSWORD = "Welcome-Sync-2026"
WHS_9 = district.building_ou("WHS") + "/9th"
WHS_10 = district.building_ou("WHS") + "/10th"
LMS_7 = district.building_ou("LMS") + "/7th"
FROZEN = district.building_ou("WHS") + "/Restricted"
SCHOOLS = [
    (101, "Washington High School", "WHS", 0),
    (102, "Lincoln Middle School", "LMS", None),
    (901, "Early Childhood Center", "ECC", 1),
    (999999, "Graduated Students", "GRAD", 1),
]


def email(number: int) -> str:
    return f"{number}{district.SUFFIX}"


def make_settings(**overrides_by_section: dict) -> student_sync.Settings:
    """The test district's settings with some keys replaced, e.g. accounts={"bad_names": []}."""
    raw = copy.deepcopy(district.BASE_SETTINGS)
    for section, keys in overrides_by_section.items():
        raw.setdefault(section, {}).update(keys)
    return student_sync.settings_from_dict(raw, Path("student_sync.toml"))


def state(server, number):
    """(given name, family name, suspended, OU) of a student's account; None without one."""
    user = server.user(email(number))
    if user is None:
        return None
    return (user["name"]["givenName"], user["name"]["familyName"], user["suspended"], user["orgUnitPath"])


def withdrawn(sync, numbers_at_101, numbers_at_102=()):
    """Active accounts of students who left: each one is a suspension."""
    for number in numbers_at_101:
        sync.student(number, status=2)
        sync.account(number)
    for number in numbers_at_102:
        sync.student(number, status=2, school=102, grade=7)
        sync.account(number, org_unit=LMS_7, school=102)


@pytest.fixture(autouse=True)
def empty_credential_store():
    """No test reads this computer's credential store: a secret missing from a test's
    environment is missing everywhere, unless the test puts one in a keyring of its own."""
    try:
        import keyring
        from keyring.backends import null
    except ImportError:
        yield
        return
    previous = keyring.get_keyring()
    keyring.set_keyring(null.Keyring())
    yield
    keyring.set_keyring(previous)


@pytest.fixture
def no_backoff(monkeypatch):
    """Retries happen as often as ever, without the waiting."""
    monkeypatch.setattr(student_sync.RetryPolicy, "delay", lambda self, retry: 0.0)


@dataclass
class Result:
    code: int
    output: str


class Sync:
    """A district under test: PowerSchool rows, Google accounts, and the command line."""

    def __init__(self, folder: Path, server: DirectoryServer, capsys: Any):
        self.folder = folder
        self.server = server
        self.capsys = capsys
        self.ps = district.PowerSchool(folder / "powerschool.sqlite3")
        for school in SCHOOLS:
            self.ps.school(*school)
        self.settings_path = self.settings()

    def settings(self, overrides: dict | None = None, remove: tuple = ()) -> Path:
        self.settings_path = district.write_settings(self.folder / "student_sync.toml", self.server.url,
                                                     overrides, remove)
        return self.settings_path

    def student(self, number: Any, first: Any = "Ann", last: Any = "Lee", class_of: Any = 2030,
                status: Any = 0, school: Any = 101, grade: Any = 9) -> None:
        self.ps.student(number, first, last, class_of, status, school, grade)

    def account(self, number: int, given: str = "Ann", family: str = "Lee", org_unit: str = WHS_9,
                suspended: bool = False, school: int = 101, class_of: int | None = 2030) -> None:
        self.server.add_user(email(number), given=given, family=family, org_unit=org_unit,
                             suspended=suspended, custom=district.attributes(school, class_of))

    def run(self, *arguments: str) -> Result:
        self.ps.connection.commit()
        self.capsys.readouterr()
        code = student_sync.main(["--config", str(self.settings_path), *arguments])
        captured = self.capsys.readouterr()
        return Result(code, captured.out + captured.err)

    def writes(self) -> list:
        return [r for r in self.server.requests if r.method in ("POST", "PUT", "PATCH", "DELETE")]


@pytest.fixture
def server():
    with DirectoryServer(domain=district.DOMAIN) as srv:
        district.prepare_directory(srv, [s[2] for s in SCHOOLS], frozen=[FROZEN])
        yield srv


@pytest.fixture
def sync(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setenv("NEW_USER_PASSWORD", PASSWORD)
    district_ = Sync(tmp_path, server, capsys)
    yield district_
    district_.ps.close()


# ---------------------------------------------------------------------------------------------
# Shared by several test modules: a directory without the custom schema, a terminal, and a
# local SMTP server (aiosmtpd)
# ---------------------------------------------------------------------------------------------

SMTP_PASSWORD = "SMTPPASS-4e8d21"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_ous_only(srv: DirectoryServer) -> None:
    """prepare_directory without the custom schema: the tests add their own."""
    for abbreviation in (s[2] for s in SCHOOLS):
        for grade_ou in set(district.GRADES.values()):
            srv.add_orgunit(district.building_ou(abbreviation) + grade_ou)
    for path in (district.SUSPENDED_OU, district.GRADUATED_OU, FROZEN):
        srv.add_orgunit(path)


@pytest.fixture
def bare_sync(tmp_path, capsys, monkeypatch):
    """A district whose directory has every OU but no custom schema: call it with the
    schema to register (name, fields) and get a Sync."""
    monkeypatch.setenv("NEW_USER_PASSWORD", PASSWORD)
    servers, districts = [], []

    def make(schema_name: str, fields: dict[str, str]) -> Sync:
        srv = DirectoryServer(domain=district.DOMAIN).start()
        servers.append(srv)
        prepare_ous_only(srv)
        srv.add_schema(schema_name, fields)
        district_ = Sync(tmp_path, srv, capsys)
        districts.append(district_)
        return district_

    yield make
    for district_ in districts:
        district_.ps.close()
    for srv in servers:
        srv.stop()


class FakeTty:
    def __init__(self, tty: bool = True):
        self.text, self.tty = "", tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


class Mailbox:
    """An aiosmtpd handler that keeps every message, and an authenticator that accepts one login."""

    def __init__(self) -> None:
        self.messages: list = []
        self.logins: list[tuple[str, str]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
        self.messages.append(email_lib.message_from_bytes(envelope.original_content or envelope.content,
                                                          policy=email_policy.default))
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult

        login = auth_data.login.decode() if isinstance(auth_data.login, bytes) else auth_data.login
        password = auth_data.password.decode() if isinstance(auth_data.password, bytes) else auth_data.password
        self.logins.append((login, password))
        return AuthResult(success=(login, password) == ("sync-mailer", SMTP_PASSWORD), handled=False)

    def bodies(self) -> list[str]:
        return [m.get_body(preferencelist=("plain",)).get_content() for m in self.messages]


@pytest.fixture
def smtp():
    from aiosmtpd.controller import Controller

    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port(), auth_require_tls=False,
                            authenticator=mailbox.authenticate)
    controller.start()
    mailbox.port = controller.port
    yield mailbox
    controller.stop()


def email_settings(port: int, **more) -> dict:
    return {"email": {"smtp_host": "127.0.0.1", "smtp_port": port, "from": "sync@d118.org",
                      "to": ["tech@d118.org"], **more}}


# ---------------------------------------------------------------------------------------------
# Shared by the plan/journal test modules: what an account looks like, the logs folder, the
# run ID a run prints
# ---------------------------------------------------------------------------------------------

JOURNAL_LINE = re.compile(r"journal: (\S+) \(undo with --undo (\S+)\)")


def looks(user: dict | None):
    """What the rules manage on an account."""
    if user is None:
        return None
    return (user["suspended"], user["orgUnitPath"], user["name"]["givenName"],
            user["name"]["familyName"], user.get("customSchemas"))


def looks_of(server, number: int):
    return looks(server.user(email(number)))


def logs(sync) -> Path:
    return sync.folder / "logs"


def run_id_of(result) -> str:
    match = JOURNAL_LINE.search(result.output)
    assert match, f"no 'journal: ... (undo with --undo RUN_ID)' line in:\n{result.output}"
    return match.group(2)


def run_with(sync, settings: Path, *arguments: str) -> Result:
    """A run of `sync` with another settings file (sharing its logs folder, say)."""
    saved = sync.settings_path
    sync.settings_path = settings
    try:
        return sync.run(*arguments)
    finally:
        sync.settings_path = saved


def counts_file(sync) -> Path:
    settings = student_sync.load_settings(sync.settings_path)
    return logs(sync) / f"school_counts-{settings.instance}.json"


# ---------------------------------------------------------------------------------------------
# Shared by test_safety and test_windows: Google's OAuth token endpoint on the loopback
# ---------------------------------------------------------------------------------------------


class TokenEndpoint(ThreadingHTTPServer):
    """Stands in for Google's OAuth token endpoint: every POST gets `status` and `answer`
    (both may be changed while it serves); `posts` counts the POSTs."""

    daemon_threads = True

    def __init__(self, status: int, answer: dict) -> None:
        self.status, self.answer, self.posts = status, answer, 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler) -> None:  # noqa: N805 - `self` is the server here
                handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
                self.posts += 1
                body = json.dumps(self.answer).encode()
                handler.send_response(self.status)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args) -> None:  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/token"


def serve_token_endpoint(monkeypatch, status: int, answer: dict) -> Iterator[TokenEndpoint]:
    """A loopback token endpoint, for a fixture to yield from.  google-auth (2.63) replaces an
    authorized-user file's token_uri with Google's address when it loads the file, so that
    address points here."""
    import google.oauth2.credentials

    endpoint = TokenEndpoint(status, answer)
    monkeypatch.setattr(google.oauth2.credentials, "_GOOGLE_OAUTH2_TOKEN_ENDPOINT", endpoint.url)
    thread = threading.Thread(target=endpoint.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield endpoint
    endpoint.shutdown()
    endpoint.server_close()
