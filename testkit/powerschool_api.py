"""A local PowerSchool plugin REST API server over a SQLite PowerSchool copy.

It serves the part of PowerSchool's API that a plugin with ``<oauth/>`` uses to read tables,
as PowerSchool documents it (support.powerschool.com/developer), over the same SQLite district
that ``testkit.district`` builds (PowerSchool's table and column names):

- ``POST /oauth/access_token`` -- client credentials in HTTP Basic, form body
  ``grant_type=client_credentials``; answers ``{"access_token", "token_type": "Bearer",
  "expires_in": "<seconds, as a string>"}``.  A token lives ``token_lifetime`` seconds; asking
  again while it lives gives the same token (PowerSchool does the same).  ``token_path``
  serves it at one spelling only (``/oauth/access_token/``, as some of PowerSchool's pages
  write it).
- ``GET /ws/v1/metadata`` -- ``{"metadata": {..., "schema_table_query_max_page_size": N}}``
  (``metadata_page_size`` makes it say another N than the pages are cut at, ``metadata_omits``
  leaves keys out).
- ``GET /ws/schema/table/{table}/count`` -- ``{"count": N}`` (``q`` filters).
- ``GET /ws/schema/table/{table}`` -- ``projection`` (required columns, ``*`` for every
  granted one), ``page`` (from 1), ``pagesize`` (capped at the maximum), ``q`` (FIQL subset:
  ``col==v;col=ge=v``...), ``sort`` and ``sortdescending``.  Answers
  ``{"name": "Students", "record": [{"id": 12, "name": "Students", "tables": {"students":
  {"student_number": "12345", ...}}, "@extensions": ""}]}``: column names in lower case, every
  value a string, NULL columns left out, a page past the end without ``record``.  Without
  ``sort`` the order differs from request to request, as a database's unordered query may.
  Variants: ``number_style`` writes a NUMBER as ``"12345.0"`` or ``" 12345 "`` (in every column,
  or in ``styled_columns``); ``null_as_empty`` sends a NULL column as ``""``;
  ``lone_record_as_object`` sends a page of one record as an object.
- ``GET /ws/schema/table/{table}/{id}`` -- one row, ``{"id", "name", "tables"}``.

The field access check reads the ``access_request`` of a plugin.xml (by default the project's
own ``powerschool-plugin/plugin.xml``): a column not granted (projected, sorted on or queried)
answers 403 with ``{"message": "No access to the field ...", "errors": [{"resource", "field",
"code": "NoAccess"}]}`` (``forbidden_body`` gives other shapes: "message" alone, "qualified"
with ``TABLE.COLUMN`` in ``field``, "error-message" naming it in an error's ``message``); an
unknown column 400 ``Invalid field specified``; with ``hide_ungranted_tables`` a table the
plugin has no column of answers 404, as an unknown table does.

The "minimum time interval between API requests per plugin" (``min_interval_ms``) answers 429
with ``Retry-After`` to a request that comes too soon.  Faults (``add_fault``): 5xx answers, a
token that expires in the middle of a read (401), short pages, an HTML page instead of JSON, a
redirect to the sign-in page, 429.  With ``refusal_names_token`` a refused token is answered
``{"error": "invalid_token", "error_description": "Invalid access token: <token>"}``, the token
repeated back, as OAuth 2.0 resource servers commonly answer.  Every request is recorded
(``requests``), with a ``time.monotonic()`` stamp, and ``latency_ms`` delays each answer (the
benchmark).

    with PowerSchoolApiServer(path_to_sqlite, max_page_size=25) as ps:
        ps.url, ps.client_id, ps.client_secret

``python -m testkit.powerschool_api --sqlite FILE --port 8081`` serves until Ctrl-C.
Standard library only.  Never used by a real run.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import itertools
import json
import math
import random
import re
import secrets
import sqlite3
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qsl, unquote, urlsplit

from testkit._http import Serving, TrackedHandler, TrackedServer

__all__ = ["PowerSchoolApiServer", "Recorded", "Fault", "PLUGIN_XML", "read_grants"]

PLUGIN_XML = Path(__file__).resolve().parent.parent / "powerschool-plugin" / "plugin.xml"
JSON_TYPE = "application/json;charset=UTF-8"
HTML_TYPE = "text/html;charset=UTF-8"
POWERSCHOOL_VERSION = "24.7.0.0.252041"
PLUGIN_ID = 4118
# The tables this server exposes: API name -> (SQLite table, display name).
TABLES = {"students": ("STUDENTS", "Students"), "schools": ("SCHOOLS", "Schools")}
_SIGN_IN_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Sign In</title></head>\n<body><form "
                 b"action=\"/admin/home.html\" method=\"post\"><h1>PowerSchool SIS</h1>"
                 b"<input name=\"username\"><input name=\"password\" type=\"password\">"
                 b"</form></body></html>\n")
_monotonic = time.monotonic


# --------------------------------------------------------------------------------------------
# The plugin's grants
# --------------------------------------------------------------------------------------------


def read_grants(plugin_xml: Path | str = PLUGIN_XML) -> set[tuple[str, str]]:
    """(table, column) pairs, lower case, that the plugin's access_request grants (ViewOnly or
    FullAccess); a plugin without ``<oauth/>`` grants nothing over the API."""
    root = ElementTree.parse(plugin_xml).getroot()

    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1]

    if not any(local(e.tag) == "oauth" for e in root):
        return set()
    grants = set()
    for element in root.iter():
        if local(element.tag) != "field":
            continue
        access = (element.get("access") or "").strip().lower()
        if access in ("viewonly", "fullaccess"):
            grants.add((element.get("table", "").strip().lower(), element.get("field", "").strip().lower()))
    return grants


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


@dataclass
class _Answer:
    status: int
    body: bytes = b""
    content_type: str | None = JSON_TYPE
    headers: dict[str, str] = field(default_factory=dict)


def _json(status: int, payload: Any, **headers: str) -> _Answer:
    return _Answer(status, json.dumps(payload, separators=(",", ":")).encode("utf-8"), JSON_TYPE, headers)


def _message(status: int, message: str, **headers: str) -> _Answer:
    return _json(status, {"message": message}, **headers)


class _Refused(Exception):
    """An error answer, raised from deep inside a handler."""

    def __init__(self, answer: _Answer):
        super().__init__(answer.status)
        self.answer = answer


def _text(value: Any) -> str:
    """A column value as PowerSchool's API writes it: always a string."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# --------------------------------------------------------------------------------------------
# Faults and the record of requests
# --------------------------------------------------------------------------------------------

FAULT_KINDS = ("status", "expire", "short", "html", "429", "login")
SIGN_IN_PATH = "/admin/pw.html"


@dataclass
class Fault:
    """One planned misbehaviour: `kind` is "status" (answer `status`, e.g. 503, without
    serving), "expire" (the caller's token expires just before this request: 401), "short"
    (drop `drop` records from the page), "html" (a 200 sign-in page instead of JSON), "login" (a
    302 redirect to the sign-in page, which answers 200 with HTML) or "429"
    (refused as too soon, Retry-After `retry_after`).  It applies to the next `times` requests
    whose path matches the regular expression `path` (searched) and, when `page` is set,
    whose ``page`` parameter is that page."""

    kind: str
    path: str = ""
    page: int | None = None
    times: int = 1
    status: int = 503
    drop: int = 1
    retry_after: str | None = None   # "status": no Retry-After unless given; "429": "1" unless given

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r}: use one of {FAULT_KINDS}")

    def matches(self, path: str, query: dict[str, str]) -> bool:
        if self.times <= 0 or not re.search(self.path, path):
            return False
        return self.page is None or query.get("page", "1").strip() == str(self.page)


@dataclass(frozen=True)
class Recorded:
    """One request as the server saw it (no secrets: the credentials are not kept)."""

    method: str
    path: str                     # URL-decoded, without the query string
    query: dict[str, str]
    status: int
    auth: str | None              # "Basic", "Bearer" or None: the scheme only
    time: float = field(default_factory=_monotonic, compare=False)  # when handling began


# --------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------

_FIQL = re.compile(r"^\s*([A-Za-z0-9_.]+)\s*(==|!=|=gt=|=ge=|=lt=|=le=)\s*(.*?)\s*$")
_SQL_OPS = {"==": "=", "!=": "<>", "=gt=": ">", "=ge=": ">=", "=lt=": "<", "=le=": "<="}


class _Tables:
    """Reads the SQLite copy: columns, grants, counts and pages."""

    def __init__(self, database: Path, grants: set[tuple[str, str]], forbidden_body: str = "errors"):
        self.database = Path(database)
        self.grants = grants
        self.forbidden_body = forbidden_body
        self._local = threading.local()
        self.columns: dict[str, list[str]] = {}
        with sqlite3.connect(f"{self.database.as_uri()}?mode=ro", uri=True) as connection:
            for api_name, (table, _) in TABLES.items():
                names = [row[1].lower() for row in connection.execute(f"PRAGMA table_info({table})")]
                if "dcid" not in names:
                    names.append("dcid")
                self.columns[api_name] = names

    def connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(f"{self.database.as_uri()}?mode=ro", uri=True)
            self._local.connection = connection
        return connection

    @staticmethod
    def sql_column(table: str, column: str) -> str:
        """SQL for an API column: DCID falls back to ID where the copy leaves it empty."""
        if column == "dcid":
            has_dcid = table == "students"
            return "COALESCE(DCID, ID)" if has_dcid else "ID"
        return column.upper()

    hide_ungranted_tables = False   # a table the plugin has no column of answers 404, as unknown

    def table(self, name: str) -> str:
        key = name.lower()
        hidden = self.hide_ungranted_tables and not any(t == key for t, _ in self.grants)
        if key not in TABLES or hidden:
            raise _Refused(_message(404, f"Database table specified by the URI not found: {name}"))
        return key

    def check_column(self, table: str, name: str, purpose: str) -> str:
        """The lower-case column `name` (``table.column`` allowed), known and granted."""
        column = name.strip().lower()
        if "." in column:
            prefix, column = column.split(".", 1)
            if prefix != table:
                raise _Refused(_message(400, f"Invalid field specified: {name} is not valid column for "
                                             f"table: {TABLES[table][1]}"))
        if column not in self.columns[table]:
            raise _Refused(_message(400, f"Invalid field specified: {name.strip()} is not valid column "
                                         f"for table: {TABLES[table][1]}"))
        if (table, column) not in self.grants:
            raise _Refused(_json(403, self.no_access(table, column, purpose)))
        return column

    def no_access(self, table: str, column: str, purpose: str) -> dict[str, Any]:
        """The 403 body for a column the plugin lacks, in the shape `forbidden_body` names."""
        qualified = f"{TABLES[table][0]}.{column.upper()}"
        if self.forbidden_body == "message":        # the words only
            return {"message": f"No access to the field {qualified}"}
        if self.forbidden_body == "qualified":      # errors[].field as TABLE.COLUMN
            return {"message": "Forbidden", "errors": [{"resource": table, "field": qualified,
                                                        "code": "No access to the field"}]}
        if self.forbidden_body == "error-message":  # the field named in an error's message
            return {"message": "Validation Failed",
                    "errors": [{"resource": TABLES[table][1], "message": f"No access to the field {column}"}]}
        return {"message": f"No access to the field {qualified} ({purpose})",
                "errors": [{"resource": TABLES[table][1], "field": column, "code": "NoAccess"}]}

    def projection(self, table: str, text: str | None) -> list[str]:
        parts = [p.strip() for p in (text or "*").split(",") if p.strip()]
        columns: list[str] = []
        for part in parts or ["*"]:
            if part.lower() in ("*", f"{table}.*"):
                columns += [c for c in self.columns[table] if (table, c) in self.grants]
            else:
                columns.append(self.check_column(table, part, "projection"))
        return list(dict.fromkeys(columns))

    def where(self, table: str, q: str | None) -> tuple[str, list[Any]]:
        if not q or not q.strip():
            return "", []
        clauses, values = [], []
        for clause in q.split(";"):
            match = _FIQL.match(clause)
            if not match:
                raise _Refused(_message(400, f"Invalid query: {clause}"))
            name, op, value = match.groups()
            column = self.check_column(table, name, "query")
            sql = self.sql_column(table, column)
            if op in ("==", "!=") and "*" in value:
                clauses.append(f"{'' if op == '==' else 'NOT '}{sql} LIKE ?")
                values.append(value.replace("*", "%"))
                continue
            clauses.append(f"{sql} {_SQL_OPS[op]} ?")
            try:
                values.append(int(value))
            except ValueError:
                values.append(value)
        return " WHERE " + " AND ".join(clauses), values

    def count(self, table: str, q: str | None) -> int:
        where, values = self.where(table, q)
        sql = f"SELECT COUNT(*) FROM {TABLES[table][0]}{where}"
        return self.connection().execute(sql, values).fetchone()[0]

    def rows(self, table: str, columns: list[str], q: str | None, order: str, limit: int,
             offset: int) -> list[tuple[Any, ...]]:
        where, values = self.where(table, q)
        selected = ", ".join([self.sql_column(table, "dcid")] + [self.sql_column(table, c) for c in columns])
        sql = (f"SELECT {selected} FROM {TABLES[table][0]}{where} ORDER BY {order} "
               f"LIMIT ? OFFSET ?")
        return self.connection().execute(sql, [*values, limit, offset]).fetchall()

    null_as_empty = False   # a NULL column sent as "" instead of left out
    number_style = "plain"  # "decimal": a NUMBER sent as "12345.0"; "padded": as " 12345 "
    styled_columns: frozenset[str] | None = None   # the columns number_style applies to (None: all)

    def value(self, column: str, value: Any) -> str:
        text = _text(value)
        styled = self.styled_columns is None or column in self.styled_columns
        if styled and isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.number_style == "decimal":
                return text if "." in text else f"{text}.0"
            if self.number_style == "padded":
                return f" {text} "
        return text

    def record(self, table: str, columns: list[str], row: tuple[Any, ...]) -> dict[str, Any]:
        values = {c: self.value(c, v) for c, v in zip(columns, row[1:]) if v is not None}
        if self.null_as_empty:
            values = {c: values.get(c, "") for c in columns}
        return {"id": row[0], "name": TABLES[table][1], "tables": {table: values}, "@extensions": ""}


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class _HttpServer(TrackedServer):
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], api: "PowerSchoolApiServer"):
        self.api = api
        super().__init__(address, _Handler)


class _Handler(TrackedHandler):
    server_version = "Apache-Coyote/1.1"
    server: _HttpServer

    def _serve(self) -> None:
        length = self.headers.get("Content-Length", "0").strip() or "0"
        body = self.rfile.read(int(length)) if length.isdigit() else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        answer = self.server.api._handle(self.command, self.path, headers, body)
        self.send_response(answer.status)
        if answer.content_type:
            self.send_header("Content-Type", answer.content_type)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve


class PowerSchoolApiServer(Serving):
    """A local PowerSchool plugin API over a SQLite copy; see the module docstring."""

    def __init__(self, database: Path | str, *, client_id: str = "5c1b2f44-9d3e-4c51-a0f7-0f2d3c4b5a61",
                 client_secret: str = "e7d4c2b1-6a5f-4e3d-9c8b-7a6f5e4d3c2b",
                 plugin_xml: Path | str = PLUGIN_XML, max_page_size: int = 100,
                 token_lifetime: float = 3600.0, min_interval_ms: float = 0.0,
                 latency_ms: float = 0.0, host: str = "127.0.0.1", port: int = 0,
                 lone_record_as_object: bool = False, refusal_names_token: bool = False,
                 forbidden_body: str = "errors", null_as_empty: bool = False, number_style: str = "plain",
                 styled_columns: Iterable[str] | None = None, metadata_page_size: int | None = None,
                 metadata_omits: Iterable[str] = (), hide_ungranted_tables: bool = False,
                 token_path: str | None = None):
        self.client_id, self.client_secret = client_id, client_secret
        # A refused bearer token answered as an OAuth 2.0 resource server commonly does
        # (RFC 6750 "invalid_token", Spring Security's "Invalid access token: <token>"): the
        # token itself comes back in the error text.
        self.refusal_names_token = refusal_names_token
        self.issued_tokens: list[str] = []           # every token handed out (for tests)
        # A page of one record sends it as an object, not a one-item list, as JSON converted
        # from XML (and some PowerSchool answers) does.
        self.lone_record_as_object = lone_record_as_object
        self.grants = read_grants(plugin_xml)
        self._tables = _Tables(Path(database), self.grants, forbidden_body)
        self._tables.null_as_empty = null_as_empty
        self._tables.number_style = number_style
        self._tables.hide_ungranted_tables = hide_ungranted_tables
        self._tables.styled_columns = None if styled_columns is None else frozenset(c.lower() for c in styled_columns)
        self.max_page_size = max_page_size
        # The token endpoint answers at /oauth/access_token with or without the final slash;
        # `token_path` makes it answer at that one spelling only (404 elsewhere).
        self.token_path = token_path
        # What the metadata says (by default the maximum the pages are cut at), and the keys it
        # leaves out: a metadata that disagrees with the server, or says nothing, is met too.
        self.metadata_page_size = metadata_page_size
        self.metadata_omits = frozenset(metadata_omits)
        self.token_lifetime = token_lifetime
        self.min_interval_ms = min_interval_ms
        self.latency_ms = latency_ms
        self._tokens: dict[str, float] = {}           # token -> monotonic expiry
        self._last_request: float | None = None       # the plugin's last accepted API request
        self._faults: list[Fault] = []
        self._requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._host, self._port = host, port
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle (start, stop and ``with`` come from testkit._http.Serving) ----------------------
    _thread_name = "powerschool-api"

    def _make_httpd(self) -> "_HttpServer":
        return _HttpServer((self._host, self._port), self)

    @property
    def url(self) -> str:
        """The server's address, as ``[powerschool] url`` takes it (no trailing slash)."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        return f"http://{self._host}:{self._httpd.server_address[1]}"

    # test controls ---------------------------------------------------------------------------
    def add_fault(self, kind: str, path: str = "", **options: Any) -> Fault:
        """Plan a fault (see ``Fault``); returns it."""
        fault = Fault(kind, path, **options)
        with self._lock:
            self._faults.append(fault)
        return fault

    def expire_tokens(self) -> None:
        """Every token issued so far expires now."""
        with self._lock:
            self._tokens.clear()

    def revoke(self, table: str, column: str) -> None:
        """Take a column's grant away, as if the plugin.xml lacked it."""
        self.grants.discard((table.lower(), column.lower()))

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def count(self, path_pattern: str = "", status: int | None = None) -> int:
        """Recorded requests whose path matches the regular expression (and status)."""
        return sum(1 for r in self.requests if re.search(path_pattern, r.path)
                   and (status is None or r.status == status))

    # handling --------------------------------------------------------------------------------
    def _handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> _Answer:
        started = _monotonic()
        split = urlsplit(target)
        path = unquote(split.path)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        if self.latency_ms:
            time.sleep(self.latency_ms / 1000)
        try:
            answer = self._route(method, path, query, headers, body)
        except _Refused as refused:
            answer = refused.answer
        except Exception as exc:  # noqa: BLE001 - the server must keep serving
            answer = _message(500, f"Internal Server Error: {type(exc).__name__}")
        scheme = headers.get("authorization", "").split(" ", 1)[0] or None
        with self._lock:
            self._requests.append(Recorded(method, path, query, answer.status, scheme, started))
        return answer

    def _take_fault(self, path: str, query: dict[str, str]) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(path, query):
                    fault.times -= 1
                    return fault
        return None

    def _route(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
               body: bytes) -> _Answer:
        if path == self.token_path if self.token_path else path.rstrip("/") == "/oauth/access_token":
            if method != "POST":
                return _message(405, "Method Not Allowed")
            return self._fault_answer(self._take_fault(path, query)) or self._token(headers, body)
        if path == SIGN_IN_PATH:
            return _Answer(200, _SIGN_IN_PAGE, HTML_TYPE)
        if not path.startswith("/ws/"):
            return _Answer(404, b"<html><body><h1>404 Not Found</h1></body></html>", HTML_TYPE)
        fault = self._take_fault(path, query)
        if fault and fault.kind == "expire":
            self.expire_tokens()
        self._authorize(headers)
        self._pace()
        answer = self._fault_answer(fault)
        if answer is not None:
            return answer
        if method != "GET":
            return _message(405, "Method Not Allowed")
        if path.rstrip("/") == "/ws/v1/metadata":
            return _json(200, {"metadata": self._metadata()})
        match = re.fullmatch(r"/ws/schema/table/([^/]+)(?:/([^/]+))?/?", path)
        if not match:
            return _message(404, "Not Found")
        table = self._tables.table(match.group(1))
        rest = match.group(2)
        if rest == "count":
            return _json(200, {"count": self._tables.count(table, query.get("q"))})
        if rest is not None:
            return self._one(table, rest, query)
        return self._page(table, query, fault.drop if fault and fault.kind == "short" else 0)

    @staticmethod
    def _fault_answer(fault: Fault | None) -> _Answer | None:
        """The answer a "status", "429", "html" or "login" fault gives instead of serving; None
        otherwise."""
        if fault and fault.kind == "status":
            if fault.status >= 500 and fault.status != 500:
                return _Answer(fault.status, f"<html><body><h1>{fault.status}</h1></body></html>".encode(),
                               HTML_TYPE, {"Retry-After": fault.retry_after} if fault.retry_after else {})
            return _message(fault.status, "Internal Server Error" if fault.status == 500 else "Error")
        if fault and fault.kind == "429":
            return _message(429, "Too many requests. Please wait before making another request.",
                            **{"Retry-After": fault.retry_after or "1"})
        if fault and fault.kind == "html":
            return _Answer(200, _SIGN_IN_PAGE, HTML_TYPE)
        if fault and fault.kind == "login":
            return _Answer(302, b"", None, {"Location": SIGN_IN_PATH})
        return None

    def _token(self, headers: dict[str, str], body: bytes) -> _Answer:
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        if form.get("grant_type") != "client_credentials":
            return _json(400, {"error": "unsupported_grant_type",
                               "error_description": "grant_type must be client_credentials"})
        scheme, _, encoded = headers.get("authorization", "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user = password = ""
        if scheme.lower() != "basic" or (user, password) != (self.client_id, self.client_secret):
            return _json(401, {"error": "invalid_client", "error_description": "Bad client credentials"},
                         **{"WWW-Authenticate": 'Basic realm="PowerSchool"'})
        now = _monotonic()
        with self._lock:
            live = [(expiry, token) for token, expiry in self._tokens.items() if expiry > now]
            if live:
                expiry, token = max(live)
            else:
                token, expiry = secrets.token_hex(16), now + self.token_lifetime
                self._tokens[token] = expiry
                self.issued_tokens.append(token)
        return _json(200, {"access_token": token, "token_type": "Bearer",
                           "expires_in": str(max(0, int(expiry - now)))},
                     **{"Cache-Control": "no-store"})

    def _authorize(self, headers: dict[str, str]) -> None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        now = _monotonic()
        with self._lock:
            expiry = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
            if expiry is not None and expiry <= now:
                del self._tokens[token.strip()]
                expiry = None
        if expiry is None:
            challenge = {"WWW-Authenticate": 'Bearer realm="PowerSchool", error="invalid_token"'}
            if self.refusal_names_token:
                raise _Refused(_json(401, {"error": "invalid_token",
                                           "error_description": f"Invalid access token: {token.strip()}"},
                                     **challenge))
            raise _Refused(_json(401, {"errorMessage": {"message": "Invalid or expired access token"}}, **challenge))

    def _pace(self) -> None:
        """PowerSchool's minimum time interval between API requests per plugin."""
        if not self.min_interval_ms:
            return
        interval = self.min_interval_ms / 1000
        now = _monotonic()
        with self._lock:
            last = self._last_request
            if last is None or now - last >= interval:
                self._last_request = now
                return
            wait = max(1, math.ceil(interval - (now - last)))
        raise _Refused(_message(429, f"Too many requests. Please wait {wait} seconds before making "
                                     "another request.", **{"Retry-After": str(wait)}))

    def _metadata(self) -> dict[str, Any]:
        size = self.max_page_size if self.metadata_page_size is None else self.metadata_page_size
        metadata = {"plugin_id": PLUGIN_ID, "powerschool_version": POWERSCHOOL_VERSION,
                    "powerteacher_version": "24.7.0", "mobile_api_version": "4.6",
                    "state": "IL", "machine_uptime": "3 days", "powerschool_uptime": "3 days",
                    "schema_table_query_max_page_size": size,
                    "student_max_page_size": 100, "school_max_page_size": 100, "staff_max_page_size": 100,
                    "course_max_page_size": 100, "section_max_page_size": 100, "term_max_page_size": 100,
                    "section_enrollment_max_page_size": 100}
        return {k: v for k, v in metadata.items() if k not in self.metadata_omits}

    @staticmethod
    def _whole(query: dict[str, str], name: str, default: int) -> int:
        text = query.get(name, "").strip()
        if not text:
            return default
        if not re.fullmatch(r"-?[0-9]+", text):
            raise _Refused(_message(400, f"Invalid {name}: {text}"))
        return int(text)

    def _page(self, table: str, query: dict[str, str], drop: int) -> _Answer:
        columns = self._tables.projection(table, query.get("projection"))
        page = max(1, self._whole(query, "page", 1))
        size = self._whole(query, "pagesize", self.max_page_size)
        size = self.max_page_size if size <= 0 else min(size, self.max_page_size)
        sort = [s for s in query.get("sort", "").split(",") if s.strip()]
        if sort:
            descending = query.get("sortdescending", "false").strip().lower() == "true"
            names = [self._tables.check_column(table, s, "sort") for s in sort]
            order = ", ".join(f"{self._tables.sql_column(table, n)} {'DESC' if descending else 'ASC'}"
                              for n in names)
        else:  # no promised order: a paged read without sort may skip or repeat rows
            order = f"(ID * {random.randrange(3, 9973, 2)}) % 10007, ID"
        rows = self._tables.rows(table, columns, query.get("q"), order, size, (page - 1) * size)
        if drop:
            rows = rows[:max(0, len(rows) - drop)]
        payload: dict[str, Any] = {"name": TABLES[table][1]}
        if rows:
            payload["record"] = [self._tables.record(table, columns, row) for row in rows]
            if self.lone_record_as_object and len(rows) == 1:
                payload["record"] = payload["record"][0]
        return _json(200, payload)

    def _one(self, table: str, key: str, query: dict[str, str]) -> _Answer:
        columns = self._tables.projection(table, query.get("projection"))
        if not key.isdigit():
            return _message(404, f"Database row specified by the URI not found: {key}")
        dcid = self._tables.sql_column(table, "dcid")
        selected = ", ".join([dcid] + [self._tables.sql_column(table, c) for c in columns])
        rows = self._tables.connection().execute(
            f"SELECT {selected} FROM {TABLES[table][0]} WHERE {dcid} = ?", [int(key)]).fetchall()
        if not rows:
            return _message(404, f"Database row specified by the URI not found: {key}")
        record = self._tables.record(table, columns, rows[0])
        del record["@extensions"]
        return _json(200, record)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testkit.powerschool_api",
                                     description="Serve a local PowerSchool plugin API until Ctrl-C.")
    parser.add_argument("--sqlite", type=Path, required=True, help="the SQLite PowerSchool copy")
    parser.add_argument("--port", type=int, default=8081, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-page-size", type=int, default=100)
    parser.add_argument("--min-interval-ms", type=float, default=0)
    parser.add_argument("--latency-ms", type=float, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not args.sqlite.is_file():
        parser.error(f"--sqlite: no such file: {args.sqlite}")
    server = PowerSchoolApiServer(args.sqlite, max_page_size=args.max_page_size, host=args.host,
                                  port=args.port, min_interval_ms=args.min_interval_ms,
                                  latency_ms=args.latency_ms).start()
    print(f"PowerSchool API on {server.url} (client id {server.client_id}; the secret is in "
          "testkit/powerschool_api.py) -- Ctrl-C to stop", flush=True)
    try:
        for _ in itertools.count():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
