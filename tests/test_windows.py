"""Windows, where the tool lives (issue 13), exercised on Linux through the same code paths.

There is no Windows machine here.  Each Windows behaviour is reproduced at the boundary
where the operating system answers: files the account may not write are `PermissionError`s
injected into `open`, `os.open`, `os.replace` and `os.mkdir` (the suite runs as root, which
chmod cannot stop); the Windows branch of the code runs under `student_sync.WINDOWS = True`
with a fake `msvcrt` in `sys.modules` and a recorded `icacls`.  Secrets come from an
in-memory keyring backend.  Everything else is real: the command line, the Directory API
server, a SQLite PowerSchool, an OAuth token endpoint on the loopback.
"""

from __future__ import annotations

import builtins
import errno
import getpass
import io
import json
import os
import re
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import PASSWORD, WHS_9, TokenEndpoint, email, run_with, serve_token_endpoint
import student_sync
from testkit import district

ACCESS_TOKEN = "ya29.OLD-TOKEN-4411"
NEW_ACCESS_TOKEN = "ya29.NEW-TOKEN-7720"
REFRESH_TOKEN = "1//REFRESH-TOKEN-3355"
CLIENT_SECRET = "GOCSPX-WIN-9911"
USER = getpass.getuser()


# ---------------------------------------------------------------------------------------------
# The operating system's answers
# ---------------------------------------------------------------------------------------------


class Denied:
    """Files and folders this account may read but not write, as an ACL would have it.

    A denied folder refuses new files in it (and in folders below); a denied file refuses
    being opened for writing and being replaced.  Reading is never refused.
    """

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self, monkeypatch):
        self.paths: set[Path] = set()
        real_open, real_os_open = builtins.open, os.open
        real_replace, real_mkdir = os.replace, os.mkdir

        def check(path) -> None:
            if isinstance(path, int):
                return
            target = Path(os.fsdecode(path)).absolute()
            if any(target == p or p in target.parents for p in self.paths):
                raise PermissionError(errno.EACCES, "Permission denied", str(target))

        def opener(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                check(file)
            return real_open(file, mode, *args, **kwargs)

        def os_opener(path, flags, *args, **kwargs):
            if flags & self.WRITE_FLAGS:
                check(path)
            return real_os_open(path, flags, *args, **kwargs)

        def replacer(src, dst, *args, **kwargs):
            check(dst)
            return real_replace(src, dst, *args, **kwargs)

        def mkdirer(path, *args, **kwargs):
            check(path)
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", opener)
        monkeypatch.setattr(io, "open", opener)
        monkeypatch.setattr(os, "open", os_opener)
        monkeypatch.setattr(os, "replace", replacer)
        monkeypatch.setattr(os, "mkdir", mkdirer)

    def deny(self, path: Path) -> Path:
        self.paths.add(Path(path).absolute())
        return path


@pytest.fixture
def denied(monkeypatch):
    return Denied(monkeypatch)


class FakeMsvcrt(types.ModuleType):
    """Windows byte-range locks as msvcrt.locking gives them: `nbytes` from the handle's
    current position, refused to any other handle while held, unlocked only by the same
    handle at the same offset and length."""

    LK_UNLCK, LK_LOCK, LK_NBLCK, LK_RLCK, LK_NBRLCK = 0, 1, 2, 3, 4

    def __init__(self) -> None:
        super().__init__("msvcrt")
        self.held: dict[tuple[int, int], tuple[int, int, int]] = {}   # file -> (fd, offset, length)
        self.calls: list[tuple[int, int, int]] = []                   # (mode, offset, length)

    def locking(self, fd: int, mode: int, nbytes: int) -> None:
        info = os.fstat(fd)
        file, offset = (info.st_dev, info.st_ino), os.lseek(fd, 0, os.SEEK_CUR)
        self.calls.append((mode, offset, nbytes))
        held = self.held.get(file)
        if mode == self.LK_UNLCK:
            if held != (fd, offset, nbytes):
                raise PermissionError(errno.EACCES, "Permission denied (the range is not locked)")
            del self.held[file]
            return
        if held is not None and offset < held[1] + held[2] and held[1] < offset + nbytes:
            raise PermissionError(errno.EACCES, "Permission denied")
        self.held[file] = (fd, offset, nbytes)

    def locked_range(self, path: Path) -> tuple[int, int] | None:
        info = os.stat(path)
        held = self.held.get((info.st_dev, info.st_ino))
        return None if held is None else (held[1], held[1] + held[2])


@pytest.fixture
def windows(monkeypatch):
    """The Windows branch of every platform choice, with a fake msvcrt and a recorded icacls."""
    fake = FakeMsvcrt()
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    monkeypatch.setattr(student_sync, "WINDOWS", True)
    fake.icacls = []
    fake.icacls_code = 0
    real_run = subprocess.run

    def run(command, *args, **kwargs):
        if isinstance(command, (list, tuple)) and command and re.search(r"icacls(\.exe)?$", str(command[0]), re.I):
            fake.icacls.append([str(part) for part in command])
            return subprocess.CompletedProcess(command, fake.icacls_code, "", "" if fake.icacls_code == 0
                                               else "Access is denied.")
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    return fake


@pytest.fixture
def token_endpoint(monkeypatch):
    """A loopback token endpoint (see conftest) that answers every refresh with a new token."""
    answer = {"access_token": NEW_ACCESS_TOKEN, "expires_in": 3599, "token_type": "Bearer",
              "scope": " ".join(student_sync.SCOPES)}
    yield from serve_token_endpoint(monkeypatch, 200, answer)


def expired_token(sync, endpoint: TokenEndpoint) -> Path:
    """An OAuth settings file and a token whose access token has expired."""
    sync.settings({"google": {"auth": "oauth", "token_file": "token.json", "api_endpoint": sync.server.url}})
    path = sync.folder / "token.json"
    path.write_text(json.dumps({
        "token": ACCESS_TOKEN, "refresh_token": REFRESH_TOKEN, "token_uri": endpoint.url,
        "client_id": "118-sync.apps.googleusercontent.com", "client_secret": CLIENT_SECRET,
        "scopes": list(student_sync.SCOPES), "expiry": "2020-01-01T00:00:00Z",
    }), encoding="utf-8")
    return path


class MemoryKeyring:
    """Built on demand (keyring is imported lazily by the tool): an in-memory backend."""

    @staticmethod
    def make():
        import keyring.backend

        class Memory(keyring.backend.KeyringBackend):
            priority = 1

            def __init__(self) -> None:
                super().__init__()
                self.items: dict[tuple[str, str], str] = {}

            def get_password(self, service, username):
                return self.items.get((service, username))

            def set_password(self, service, username, password):
                self.items[(service, username)] = password

            def delete_password(self, service, username):
                self.items.pop((service, username), None)

        return Memory()


@pytest.fixture
def vault():
    """The operating system's credential store, in memory."""
    import keyring

    previous = keyring.get_keyring()
    backend = MemoryKeyring.make()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


def logs(sync) -> Path:
    return sync.folder / "logs"


def instance(sync) -> str:
    return student_sync.load_settings(sync.settings_path).instance


def counts_path(sync) -> Path:
    return logs(sync) / f"school_counts-{instance(sync)}.json"


def lock_path(sync) -> Path:
    return logs(sync) / f"student_sync-{instance(sync)}.lock"


def created_passwords(sync) -> list[str]:
    return [r.body.get("password") for r in sync.writes()
            if r.method == "POST" and r.path.rstrip("/").endswith("/users") and r.body]


def no_surprise(output: str) -> None:
    assert "unexpected error" not in output
    assert "Traceback" not in output


# ---------------------------------------------------------------------------------------------
# 1. Files the service account cannot write
# ---------------------------------------------------------------------------------------------


def test_a_lock_file_the_account_cannot_write_stops_the_run_naming_file_and_account(sync, denied):
    sync.student(1001)
    logs(sync).mkdir()
    lock_path(sync).write_text("", encoding="utf-8")     # made by an administrator's first run
    denied.deny(lock_path(sync))

    result = sync.run("--all")

    assert result.code == 2, result.output
    no_surprise(result.output)
    assert str(lock_path(sync)) in result.output
    assert USER in result.output
    assert sync.writes() == []


def test_a_refreshed_token_that_cannot_be_saved_is_a_warning_and_the_run_finishes(
        sync, denied, token_endpoint):
    token = expired_token(sync, token_endpoint)
    before = token.read_text(encoding="utf-8")
    denied.deny(token)
    sync.student(1002)

    result = sync.run("--all")

    assert result.code == 0, result.output
    no_surprise(result.output)
    assert token_endpoint.posts == 1
    warning = [line for line in result.output.splitlines() if line.startswith("WARNING") and str(token) in line]
    assert warning and USER in warning[0], result.output
    assert sync.server.user(email(1002)) is not None
    assert token.read_text(encoding="utf-8") == before
    assert NEW_ACCESS_TOKEN not in result.output and REFRESH_TOKEN not in result.output


def test_school_counts_that_cannot_be_written_still_give_report_summary_and_email(
        sync, denied, tmp_path, monkeypatch):
    sent = []
    monkeypatch.setattr("smtplib.SMTP", lambda *a, **k: Mailer(sent))
    sync.settings({"email": {"smtp_host": "127.0.0.1", "smtp_port": 25, "from": "sync@d118.org",
                             "to": ["tech@d118.org"], "when": "problems"}})
    sync.student(1003)
    sync.student(1004)
    counts = counts_path(sync)
    counts.parent.mkdir(exist_ok=True)
    counts.write_text('{"active_students": {"101": 1}}\n', encoding="utf-8")
    denied.deny(counts)
    report = tmp_path / "report.csv"

    result = sync.run("--all", "--report", str(report))

    assert result.code == 2, result.output
    no_surprise(result.output)
    assert sync.server.user(email(1003)) is not None and sync.server.user(email(1004)) is not None
    errors = [line for line in result.output.splitlines() if str(counts) in line]
    assert errors and USER in errors[0], result.output
    assert "summary" in result.output
    assert report.is_file() and "1004" in report.read_text(encoding="utf-8-sig")
    assert len(sent) == 1 and str(counts) in sent[0]
    assert counts.read_text(encoding="utf-8") == '{"active_students": {"101": 1}}\n'


class Mailer:
    """smtplib.SMTP as far as send_summary_email uses it; keeps each message's text."""

    def __init__(self, sent: list):
        self.sent = sent

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def connect(self, host, port):
        return 220, b"ok"

    def ehlo(self):
        return 250, b"ok"

    def has_extn(self, name):
        return False

    def quit(self):
        return 221, b"bye"

    def close(self):
        pass

    def send_message(self, message):
        self.sent.append(message.get_body(preferencelist=("plain",)).get_content())


@pytest.mark.parametrize("which", ["counts", "lock", "logs"])
def test_check_tries_every_state_file_it_will_write(sync, denied, which):
    sync.student(1005)
    logs(sync).mkdir()
    counts_path(sync).write_text('{"active_students": {}}\n', encoding="utf-8")
    lock_path(sync).write_text("", encoding="utf-8")
    target = {"counts": counts_path(sync), "lock": lock_path(sync), "logs": logs(sync)}[which]
    denied.deny(target)
    assert os.access(target, os.W_OK)                      # what os.access says proves nothing

    result = sync.run("--check")

    assert result.code == 2, result.output
    no_surprise(result.output)
    fails = [line for line in result.output.splitlines() if line.startswith("FAIL") and str(target) in line]
    assert fails and USER in fails[0], result.output


def test_check_tries_the_token_file(sync, denied, token_endpoint):
    token = expired_token(sync, token_endpoint)
    denied.deny(token)

    result = sync.run("--check")

    no_surprise(result.output)
    fails = [line for line in result.output.splitlines() if line.startswith("FAIL") and str(token) in line]
    assert fails and USER in fails[0], result.output


def test_check_passes_the_state_files_when_they_can_be_written(sync):
    sync.student(1006)
    result = sync.run("--check")
    assert result.code == 0, result.output
    assert re.search(r"^OK .*logs folder .*can be written", result.output, re.MULTILINE), result.output
    assert not list(logs(sync).glob("*probe*")) and not list(logs(sync).glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# 2. State files written atomically; the token private to its owner
# ---------------------------------------------------------------------------------------------


def test_a_refreshed_token_is_saved_private_and_whole(sync, token_endpoint):
    token = expired_token(sync, token_endpoint)
    token.chmod(0o644)
    sync.student(1010)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert token_endpoint.posts == 1
    saved = json.loads(token.read_text(encoding="utf-8"))
    assert saved["token"] == NEW_ACCESS_TOKEN and saved["refresh_token"] == REFRESH_TOKEN
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert sorted(p.name for p in sync.folder.iterdir() if "token" in p.name) == ["token.json"]
    assert sync.server.user(email(1010)) is not None


def test_on_windows_a_refreshed_token_is_made_private_with_icacls_before_it_replaces_the_old(
        sync, token_endpoint, windows, monkeypatch):
    monkeypatch.setenv("USERDOMAIN", "D118")
    monkeypatch.setenv("USERNAME", "svc-sync")
    token = expired_token(sync, token_endpoint)
    sync.student(1011)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert json.loads(token.read_text(encoding="utf-8"))["token"] == NEW_ACCESS_TOKEN
    [command] = windows.icacls
    assert Path(command[1]).parent == token.parent and Path(command[1]).name != token.name
    assert command[2:5] == ["/inheritance:r", "/grant:r", "D118\\svc-sync:F"]
    assert set(command[5:]) <= {"*S-1-5-32-544:F", "*S-1-5-18:F"}  # Administrators, SYSTEM: by SID
    assert not Path(command[1]).exists()                  # it became token.json
    assert windows.held == {}                             # the run's lock went through msvcrt and was freed
    assert any(mode == FakeMsvcrt.LK_NBLCK for mode, _, _ in windows.calls)


def test_on_windows_a_token_that_cannot_be_made_private_is_saved_with_a_warning(
        sync, token_endpoint, windows):
    windows.icacls_code = 5
    token = expired_token(sync, token_endpoint)
    sync.student(1012)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert json.loads(token.read_text(encoding="utf-8"))["token"] == NEW_ACCESS_TOKEN
    assert re.search(r"WARNING: .*" + re.escape(str(token)) + r".*other users", result.output), result.output


def test_check_on_windows_says_when_the_token_cannot_be_made_private(sync, token_endpoint, windows):
    windows.icacls_code = 5
    expired_token(sync, token_endpoint)

    result = sync.run("--check")

    assert re.search(r"^(FAIL|WARNING:).*token.*other users", result.output, re.MULTILINE), result.output


def test_atomic_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old\n", encoding="utf-8")
    student_sync.write_atomically(path, "new\n")
    assert path.read_text(encoding="utf-8") == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_retries_a_sharing_violation(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_text("old\n", encoding="utf-8")
    real_replace, refusals = os.replace, [PermissionError(errno.EACCES, "in use")] * 2

    def replace(src, dst):
        if refusals:
            raise refusals.pop()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(student_sync.time, "sleep", lambda seconds: None)
    student_sync.write_atomically(path, "new\n")
    assert path.read_text(encoding="utf-8") == "new\n"
    assert refusals == []
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_that_fails_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_text("old\n", encoding="utf-8")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        student_sync.write_atomically(path, "new\n" * 1000)
    assert path.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def disk_full_for(monkeypatch, prefix: str) -> None:
    """os.fsync fails as on a full disk (ENOSPC) for a file whose name, seen through /proc,
    starts with `prefix` (the temporary file an atomic write makes beside its target)."""
    real_fsync = os.fsync

    def full(descriptor):
        if Path(f"/proc/self/fd/{descriptor}").resolve().name.startswith(prefix):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", full)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an open file through /proc")
def test_school_counts_on_a_full_disk_keep_the_last_figures(sync, monkeypatch):
    sync.student(1013)
    assert sync.run("--all").code == 0
    counts = counts_path(sync)
    before = counts.read_text(encoding="utf-8")
    sync.student(1014)
    disk_full_for(monkeypatch, f".{counts.name}")
    result = sync.run("--all")

    assert result.code == 2, result.output
    no_surprise(result.output)
    assert sync.server.user(email(1014)) is not None
    assert counts.read_text(encoding="utf-8") == before
    assert not [p for p in logs(sync).iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an open file through /proc")
def test_a_plan_file_on_a_full_disk_is_exit_2_naming_the_reason_not_a_defect(sync, tmp_path, monkeypatch):
    sync.student(1015)
    plan = tmp_path / "night-plan.json"
    plan.write_text("the last reviewed plan\n", encoding="utf-8")
    disk_full_for(monkeypatch, f".{plan.name}.")
    result = sync.run("--all", "--dry-run", "--plan-out", str(plan))

    assert result.code == 2, result.output
    no_surprise(result.output)
    assert "No space left on device" in result.output and USER in result.output
    assert plan.read_text(encoding="utf-8") == "the last reviewed plan\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".night")] == []


# ---------------------------------------------------------------------------------------------
# 3. Secrets in the operating system's credential store
# ---------------------------------------------------------------------------------------------


def test_a_secret_missing_from_the_environment_comes_from_the_credential_store(sync, vault, monkeypatch):
    monkeypatch.delenv("NEW_USER_PASSWORD")
    vault.set_password("student_sync", "NEW_USER_PASSWORD", "Vault-Password-551")
    sync.student(1020)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert created_passwords(sync) == ["Vault-Password-551"]
    assert "Vault-Password-551" not in result.output


def test_the_environment_wins_over_the_credential_store(sync, vault):
    vault.set_password("student_sync", "NEW_USER_PASSWORD", "Vault-Password-552")
    sync.student(1021)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert created_passwords(sync) == [PASSWORD]


def test_powerschool_secrets_come_from_the_credential_store(sync, vault, monkeypatch):
    sync.settings({"powerschool": {"sqlite": None, "connect_timeout": 2}})
    for name in ("POWERSCHOOL_READ_USER", "POWERSCHOOL_DB_PASSWORD", "POWERSCHOOL_PROD_DB"):
        monkeypatch.delenv(name, raising=False)
    vault.set_password("student_sync", "POWERSCHOOL_READ_USER", "psnavigator")
    vault.set_password("student_sync", "POWERSCHOOL_DB_PASSWORD", "DB-Vault-8812")
    vault.set_password("student_sync", "POWERSCHOOL_PROD_DB", "127.0.0.1:9/PSPRODDB")

    result = sync.run("--all")

    assert result.code == 2, result.output
    assert "is not set" not in result.output
    assert "127.0.0.1:9/PSPRODDB" in result.output        # it got as far as connecting
    assert "DB-Vault-8812" not in result.output


def test_smtp_login_comes_from_the_credential_store(sync, vault, monkeypatch):
    logins = []

    class LoginMailer(Mailer):
        def login(self, user, password):
            logins.append((user, password))

    monkeypatch.setattr("smtplib.SMTP", lambda *a, **k: LoginMailer([]))
    sync.settings({"email": {"smtp_host": "127.0.0.1", "smtp_port": 25, "from": "sync@d118.org",
                             "to": ["tech@d118.org"], "when": "always", "user_env": "SMTP_USER",
                             "password_env": "SMTP_PASSWORD"}})
    monkeypatch.delenv("SMTP_USER", raising=False)
    monkeypatch.delenv("SMTP_PASSWORD", raising=False)
    vault.set_password("student_sync", "SMTP_USER", "sync-mailer")
    vault.set_password("student_sync", "SMTP_PASSWORD", "Smtp-Vault-3321")
    sync.student(1022)

    result = sync.run("--all")

    assert result.code == 0, result.output
    assert logins == [("sync-mailer", "Smtp-Vault-3321")]
    assert "Smtp-Vault-3321" not in result.output


def store_secret(sync, name: str, typed: list[str], monkeypatch):
    answers = iter(typed)
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    return sync.run("--store-secret", name)


def test_store_secret_asks_twice_stores_it_and_never_prints_it(sync, vault, monkeypatch):
    result = store_secret(sync, "NEW_USER_PASSWORD", ["Stored-Secret-774", "Stored-Secret-774"], monkeypatch)

    assert result.code == 0, result.output
    assert vault.get_password("student_sync", "NEW_USER_PASSWORD") == "Stored-Secret-774"
    assert "Stored-Secret-774" not in result.output
    assert "NEW_USER_PASSWORD" in result.output
    for path in logs(sync).glob("*") if logs(sync).exists() else ():
        assert "Stored-Secret-774" not in path.read_text(encoding="utf-8", errors="replace")


def test_store_secret_with_two_different_answers_stores_nothing(sync, vault, monkeypatch):
    result = store_secret(sync, "NEW_USER_PASSWORD", ["Stored-Secret-775", "Stored-Secret-776"], monkeypatch)

    assert result.code == 2, result.output
    assert vault.get_password("student_sync", "NEW_USER_PASSWORD") is None
    assert "Stored-Secret-775" not in result.output and "Stored-Secret-776" not in result.output


def test_store_secret_refuses_an_empty_answer(sync, vault, monkeypatch):
    result = store_secret(sync, "NEW_USER_PASSWORD", ["", ""], monkeypatch)
    assert result.code == 2, result.output
    assert vault.get_password("student_sync", "NEW_USER_PASSWORD") is None


def test_store_secret_warns_about_a_name_the_settings_do_not_use_and_refuses_a_non_name(sync, vault, monkeypatch):
    result = store_secret(sync, "NEW_USER_PASSWRD", ["Stored-Secret-778"] * 2, monkeypatch)
    assert result.code == 0, result.output
    assert re.search(r"WARNING: NEW_USER_PASSWRD is not a name the settings file .* uses", result.output)
    assert "NEW_USER_PASSWORD" in result.output                # the names it does use

    refused = store_secret(sync, "NEW USER PASSWORD", ["Stored-Secret-779"] * 2, monkeypatch)
    assert refused.code == 2, refused.output
    assert vault.items == {("student_sync", "NEW_USER_PASSWRD"): "Stored-Secret-778"}


def test_check_says_where_each_secret_was_found_never_its_value(sync, vault, monkeypatch):
    sync.settings({"email": {"smtp_host": "127.0.0.1", "smtp_port": 25, "from": "sync@d118.org",
                             "to": ["tech@d118.org"], "user_env": "SMTP_USER", "password_env": "SMTP_PASSWORD"}})
    monkeypatch.setenv("SMTP_USER", "sync-mailer")
    monkeypatch.delenv("SMTP_PASSWORD", raising=False)
    monkeypatch.delenv("NEW_USER_PASSWORD")
    vault.set_password("student_sync", "NEW_USER_PASSWORD", "Vault-Password-553")

    result = sync.run("--check")

    lines = result.output.splitlines()
    assert any("NEW_USER_PASSWORD" in line and "credential store" in line for line in lines), result.output
    assert any("SMTP_USER" in line and "environment" in line for line in lines), result.output
    assert any(line.startswith("FAIL") and "SMTP_PASSWORD" in line and "missing" in line
               for line in lines), result.output
    assert "Vault-Password-553" not in result.output and "sync-mailer" not in result.output
    assert result.code == 2


def test_no_credential_store_is_a_clear_message_not_a_traceback(sync, monkeypatch):
    import keyring
    import keyring.backends.fail

    previous = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.fail.Keyring())
    try:
        monkeypatch.delenv("NEW_USER_PASSWORD")
        sync.student(1023)
        result = sync.run("--all")
        stored = store_secret(sync, "NEW_USER_PASSWORD", ["Stored-Secret-777"] * 2, monkeypatch)
    finally:
        keyring.set_keyring(previous)

    assert result.code == 2, result.output
    no_surprise(result.output)
    assert "NEW_USER_PASSWORD" in result.output and "credential store" in result.output
    assert sync.writes() == []
    assert stored.code == 2, stored.output
    no_surprise(stored.output)
    assert "credential store" in stored.output and "Stored-Secret-777" not in stored.output


def test_requirements_pin_keyring():
    text = (Path(student_sync.__file__).parent / "requirements.txt").read_text(encoding="utf-8")
    assert re.search(r"^keyring==\d+\.\d+(\.\d+)?$", text, re.MULTILINE)


# ---------------------------------------------------------------------------------------------
# 4. Task Scheduler: started in System32
# ---------------------------------------------------------------------------------------------


def test_relative_report_and_plan_paths_are_beside_the_settings_file(sync, tmp_path, monkeypatch):
    system32 = tmp_path / "System32"
    system32.mkdir()
    monkeypatch.chdir(system32)
    sync.student(1030)

    result = sync.run("--all", "--dry-run", "--report", "night.csv", "--plan-out", "night-plan.json")

    assert result.code == 0, result.output
    assert (sync.folder / "night.csv").is_file() and (sync.folder / "night-plan.json").is_file()
    assert list(system32.iterdir()) == []

    applied = sync.run("--apply-plan", "night-plan.json")

    assert applied.code == 0, applied.output
    assert sync.server.user(email(1030)) is not None


def test_a_report_folder_the_account_cannot_write_stops_before_any_change(sync, denied, tmp_path):
    folder = tmp_path / "reports"
    folder.mkdir()
    denied.deny(folder)
    assert os.access(folder, os.W_OK)
    sync.student(1031)

    result = sync.run("--all", "--report", str(folder / "night.csv"))

    assert result.code == 2, result.output
    no_surprise(result.output)
    assert str(folder / "night.csv") in result.output
    assert sync.writes() == []


# ---------------------------------------------------------------------------------------------
# 5. The run lock's Windows branch
# ---------------------------------------------------------------------------------------------


def test_windows_lock_refuses_a_second_handle_and_keeps_the_note_readable(tmp_path, windows):
    path = tmp_path / "student_sync-test.lock"
    holder = student_sync.RunLock(path)
    holder.acquire()
    try:
        [(mode, offset, length)] = windows.calls
        assert mode == FakeMsvcrt.LK_NBLCK and length >= 1
        note = path.read_text(encoding="utf-8")
        assert f"pid {os.getpid()}" in note
        start, end = windows.locked_range(path)
        assert start >= len(note.encode("utf-8"))        # the note lies outside the locked bytes

        with pytest.raises(student_sync.StopRun) as stopped:
            student_sync.RunLock(path).acquire()
        assert f"pid {os.getpid()}" in str(stopped.value)
        assert windows.locked_range(path) == (start, end)
    finally:
        holder.release()

    unlock = windows.calls[-1]
    assert unlock == (FakeMsvcrt.LK_UNLCK, offset, length)
    assert windows.locked_range(path) is None
    again = student_sync.RunLock(path)
    again.acquire()
    again.release()
    assert windows.held == {}


def test_windows_lock_as_a_context_manager_frees_the_lock_on_an_error(tmp_path, windows):
    path = tmp_path / "student_sync-test.lock"
    with pytest.raises(RuntimeError):
        with student_sync.RunLock(path):
            assert windows.locked_range(path) is not None
            raise RuntimeError("the run failed")
    assert windows.locked_range(path) is None


# ---------------------------------------------------------------------------------------------
# 6. The logs folder
# ---------------------------------------------------------------------------------------------


def test_a_logs_folder_that_cannot_be_written_is_exit_2_naming_it(sync, denied):
    logs(sync).mkdir()
    denied.deny(logs(sync))
    sync.student(1040)

    result = sync.run("--all")

    assert result.code == 2, result.output
    no_surprise(result.output)
    assert str(logs(sync)) in result.output
    assert sync.writes() == []


def test_a_logs_folder_that_cannot_be_made_is_exit_2_naming_it(sync, denied):
    denied.deny(sync.folder)                              # logs/ does not exist and cannot be made
    sync.student(1041)

    result = sync.run("--all")

    assert result.code == 2, result.output
    no_surprise(result.output)
    assert str(logs(sync)) in result.output
    assert sync.writes() == []


def second_district(sync, keep: int) -> Path:
    """Another settings file in its own folder whose logs go to `sync`'s logs folder."""
    folder = sync.folder / "other"
    folder.mkdir(exist_ok=True)
    path = district.write_settings(folder / "student_sync.toml", sync.server.url,
                                   {"logging": {"dir": str(logs(sync)), "keep": keep},
                                    "powerschool": {"sqlite": str(sync.ps.path)}})
    return path


def test_settings_files_sharing_a_logs_folder_each_keep_their_own_logs_and_journals(sync):
    first_ids, second_ids = [], []
    for number in (1050, 1051, 1052):
        sync.student(number)
        result = sync.run("--all")
        assert result.code == 0, result.output
        first_ids.append(re.search(r"--undo (\S+)\)", result.output).group(1))
    other = second_district(sync, keep=2)
    for number in (1053, 1054, 1055, 1056):
        sync.student(number)
        result = run_with(sync, other, "--all")
        assert result.code == 0, result.output
        second_ids.append(re.search(r"--undo (\S+)\)", result.output).group(1))

    def present(kind: str, ids: list[str]) -> list[str]:
        pattern = "student_sync-{}.log" if kind == "log" else "journal-{}.jsonl"
        return [i for i in ids if (logs(sync) / pattern.format(i)).exists()]

    assert present("log", first_ids) == first_ids
    assert present("journal", first_ids) == first_ids
    assert present("log", second_ids) == second_ids[-2:]
    assert present("journal", second_ids) == second_ids[-2:]

    undone = sync.run("--undo", first_ids[0])            # the first district's run ids still work
    assert undone.code == 0, undone.output
    assert sync.server.user(email(1050))["suspended"] is True
