"""A local Admin SDK Directory API server that speaks Google's wire format.

It serves the part of the Directory API (``admin.directory_v1``) that student_sync uses, as the
discovery document bundled with google-api-python-client describes it: users list/get/insert/
update, org units list/get, groups list, members delete and schemas list/get; what the tool
never calls (batch requests, users.patch, users.list search queries) is left out, so a change
that starts calling it fails here first. Google's behaviour is followed closely and strictly --
error codes, reasons and messages, ``fields`` partial responses, pagination tokens,
projections, update's patch semantics, INT64 custom attributes as text -- so code that works
here works against Google.

Usage::

    with DirectoryServer(domain="d118.org") as srv:
        srv.add_user("12345@d118.org", given="Ann", family="Lee", org_unit="/Students")
        service = build("admin", "directory_v1", static_discovery=True, cache_discovery=False,
                        client_options={"api_endpoint": srv.url}, http=httplib2.Http())

Faults (``FaultPlan``), per-request latency and a record of every request (``Recorded``, with
a ``time.monotonic()`` stamp) help test retries, call counts and rates. Built for districts of
100,000 users: users.list keeps a sorted index and finds a page token by bisection, and
concurrent connections are served in parallel. ``python -m testkit.directory_server --port
8080`` serves until Ctrl-C.

Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import copy
import gc
import hashlib
import json
import random
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from json.encoder import encode_basestring as _json_string
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, urlsplit

from testkit._http import Serving, TrackedHandler, TrackedServer

__all__ = ["DirectoryServer", "FaultPlan", "Recorded"]

API_PREFIX = "/admin/directory/v1"
JSON_TYPE = "application/json; charset=UTF-8"
HTML_TYPE = "text/html"
MY_CUSTOMER = "my_customer"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_NAME_LENGTH = 60
FIELD_TYPES = frozenset({"STRING", "INT64", "BOOL", "DOUBLE", "EMAIL", "PHONE", "DATE"})
INT64_RANGE = (-(2**63), 2**63 - 1)
NOT_AUTHORIZED = "Not Authorized to access this resource/api"
UNAVAILABLE = "The service is currently unavailable."
_monotonic = time.monotonic

# --------------------------------------------------------------------------------------------
# Errors and responses
# --------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered in Google's JSON error shape."""

    def __init__(self, status: int, reason: str, message: str, domain: str = "global"):
        super().__init__(message)
        self.status, self.reason, self.message, self.domain = status, reason, message, domain

    def payload(self) -> dict[str, Any]:
        detail = {"message": self.message, "domain": self.domain, "reason": self.reason}
        return {"error": {"code": self.status, "message": self.message, "errors": [detail]}}


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid", message)


def _not_found(what: str) -> ApiError:
    return ApiError(404, "notFound", f"Resource Not Found: {what}")


BAD_REQUEST = ("badRequest", "Bad Request")


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str | None = JSON_TYPE


def _encode_json(payload: Any, pretty: bool = True) -> bytes:
    if pretty:
        try:
            return _pretty_json(payload).encode("utf-8")
        except TypeError:  # a float or an odd key: leave it to the json module
            return json.dumps(payload, indent=2, ensure_ascii=False).encode("utf-8")
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _pretty_json(payload: Any) -> str:
    """``json.dumps(payload, indent=2, ensure_ascii=False)``, byte for byte, for payloads of
    dicts with text keys, lists, text, ints, booleans and None; twice as fast, which counts
    for pages of 500 users. Anything else raises TypeError."""
    parts: list[str] = []
    append = parts.append

    def encode(value: Any, indent: str) -> None:
        kind = type(value)
        if kind is str:
            append(_json_string(value))
        elif kind is dict:
            if not value:
                append("{}")
                return
            inner, opener = indent + "  ", "{"
            for key, item in value.items():
                if type(key) is not str:
                    raise TypeError(key)
                append(opener + inner + _json_string(key) + ": ")
                opener = ","
                encode(item, inner)
            append(indent + "}")
        elif kind is list or kind is tuple:
            if not value:
                append("[]")
                return
            inner, opener = indent + "  ", "["
            for item in value:
                append(opener + inner)
                opener = ","
                encode(item, inner)
            append(indent + "]")
        elif value is True:
            append("true")
        elif value is False:
            append("false")
        elif value is None:
            append("null")
        elif kind is int:
            append(int.__repr__(value))
        else:
            raise TypeError(kind)

    encode(payload, "\n")
    return "".join(parts)


def _error_response(error: ApiError) -> _Response:
    return _Response(error.status, _encode_json(error.payload()))


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------

# key -> (status, reason, message, error domain); "502-html" is answered with an HTML page.
_FAULTS: dict[str, tuple[int, str, str, str]] = {
    "429": (429, "rateLimitExceeded", "Rate Limit Exceeded", "global"),
    "403": (403, "userRateLimitExceeded", "User Rate Limit Exceeded", "usageLimits"),
    "403-userRateLimitExceeded": (403, "userRateLimitExceeded", "User Rate Limit Exceeded",
                                  "usageLimits"),
    "403-rateLimitExceeded": (403, "rateLimitExceeded", "Rate Limit Exceeded", "usageLimits"),
    "403-quotaExceeded": (403, "quotaExceeded", "Quota exceeded for quota metric 'Queries'.",
                          "usageLimits"),
    "401": (401, "authError", "Invalid Credentials", "global"),
    "500": (500, "backendError", "Internal error encountered.", "global"),
    "502": (502, "backendError", "Bad Gateway", "global"),
    "503": (503, "backendError", UNAVAILABLE, "global"),
    "502-html": (502, "", "", ""),
}
_HTML_502 = b"<html><body>502 Bad Gateway</body></html>"


def _fault_key(status: int | str) -> str:
    key = str(status)
    if key not in _FAULTS:
        raise ValueError(f"unsupported fault status {status!r}; use one of {sorted(_FAULTS)}")
    return key


def _fault_response(key: str) -> _Response:
    if key == "502-html":
        return _Response(502, _HTML_502, HTML_TYPE)
    status, reason, message, domain = _FAULTS[key]
    return _error_response(ApiError(status, reason, message, domain))


@dataclass
class FaultPlan:
    """Errors the server answers instead of (or after) executing requests.

    ``rate``: share of eligible requests answered with an error drawn from ``statuses``
    without being executed. ``applied_then_error_rate``: share of writes that are applied and
    then answered 503 anyway. ``only_writes``: only POST/PUT/PATCH/DELETE are eligible for
    ``rate``. Deterministic for a given ``seed`` and request order; thread-safe.
    """

    rate: float = 0.0
    statuses: tuple[int | str, ...] = (503,)
    applied_then_error_rate: float = 0.0
    only_writes: bool = True
    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False, compare=False)
    _lock: threading.Lock = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.statuses = tuple(self.statuses)
        for status in self.statuses:
            _fault_key(status)
        for name in ("rate", "applied_then_error_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.rate and not self.statuses:
            raise ValueError("statuses must not be empty when rate > 0")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self, method: str) -> tuple[str | None, bool]:
        """Return (fault answered instead of executing, or None; answer 503 after applying)."""
        is_write = method.upper() in WRITE_METHODS
        with self._lock:
            fail_roll, after_roll = self._rng.random(), self._rng.random()
            status = self._rng.choice(self.statuses) if self.statuses else None
        if (is_write or not self.only_writes) and fail_roll < self.rate and status is not None:
            return _fault_key(status), False
        return None, is_write and after_roll < self.applied_then_error_rate


# --------------------------------------------------------------------------------------------
# Resource schemas, for validating ``fields`` masks and request bodies
# --------------------------------------------------------------------------------------------

_OPEN = "*"  # any sub-field allowed (maps and "any" typed properties)

_USER_LEAVES = (
    "agreedToTerms aliases archivalTime archived changePasswordAtNextLogin creationTime "
    "customerId deletionTime etag hashFunction id includeInGlobalAddressList ipWhitelisted "
    "isAdmin isDelegatedAdmin isEnforcedIn2Sv isEnrolledIn2Sv isGuestUser isMailboxSetup kind "
    "lastLoginTime nonEditableAliases orgUnitPath password primaryEmail recoveryEmail "
    "recoveryPhone suspended suspensionReason suspensionTime thumbnailPhotoEtag "
    "thumbnailPhotoUrl"
).split()
_USER_OPEN = (
    "addresses customSchemas emails externalIds gender guestAccountInfo ims keywords languages "
    "locations notes organizations phones posixAccounts relations sshPublicKeys websites"
).split()

_SCHEMAS: dict[str, dict[str, str | None]] = {
    "Users": {"kind": None, "etag": None, "trigger_event": None, "nextPageToken": None,
              "users": "User"},
    "User": {**dict.fromkeys(_USER_LEAVES), **dict.fromkeys(_USER_OPEN, _OPEN),
             "name": "UserName"},
    "UserName": dict.fromkeys(["displayName", "familyName", "fullName", "givenName"]),
    "OrgUnits": {"kind": None, "etag": None, "organizationUnits": "OrgUnit"},
    "OrgUnit": dict.fromkeys(
        "blockInheritance description etag kind name orgUnitId orgUnitPath parentOrgUnitId "
        "parentOrgUnitPath".split()),
    "Groups": {"kind": None, "etag": None, "nextPageToken": None, "groups": "Group"},
    "Group": {**dict.fromkeys(
        "adminCreated aliases description directMembersCount email etag id kind name "
        "nonEditableAliases".split()), "externalIds": _OPEN},
    "Schemas": {"kind": None, "etag": None, "schemas": "Schema"},
    "Schema": {**dict.fromkeys("displayName etag kind schemaId schemaName".split()),
               "fields": "SchemaFieldSpec"},
    "SchemaFieldSpec": {**dict.fromkeys(
        "displayName etag fieldId fieldName fieldType indexed kind multiValued "
        "readAccessType".split()), "numericIndexingSpec": _OPEN},
}

# Body keys of a user write: read-only ones are ignored, as Google does; others are stored.
_USER_READ_ONLY = frozenset(
    "kind etag id creationTime lastLoginTime deletionTime customerId isAdmin isDelegatedAdmin "
    "isEnrolledIn2Sv isEnforcedIn2Sv isMailboxSetup agreedToTerms suspensionReason aliases "
    "nonEditableAliases thumbnailPhotoUrl thumbnailPhotoEtag isGuestUser archivalTime "
    "suspensionTime".split())
_USER_HANDLED = frozenset(
    "primaryEmail name password hashFunction suspended orgUnitPath changePasswordAtNextLogin "
    "customSchemas".split())
_USER_BOOLS = ("suspended", "changePasswordAtNextLogin", "includeInGlobalAddressList",
               "ipWhitelisted", "archived")
_USER_STORED = frozenset(_SCHEMAS["User"]) - _USER_READ_ONLY - _USER_HANDLED

# --------------------------------------------------------------------------------------------
# Partial responses: Google's ``fields`` syntax
# --------------------------------------------------------------------------------------------

FieldTree = dict[str, "FieldTree | None"]


class _FieldParser:
    """Parses ``a,b/c,d(e,f(g)),*`` into a tree: name -> subtree, or None for everything."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def parse(self) -> FieldTree:
        tree = self._selection()
        if self.pos != len(self.text):
            raise self._error()
        return tree

    def _error(self) -> ApiError:
        return ApiError(400, "invalidParameter", f"Invalid field selection {self.text}")

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _selection(self) -> FieldTree:
        tree: FieldTree = {}
        while True:
            path = self._path()
            sub = None
            if self._peek() == "(":
                self.pos += 1
                sub = self._selection()
                if self._peek() != ")":
                    raise self._error()
                self.pos += 1
            for name in reversed(path[1:]):
                sub = {name: sub}
            _merge_field(tree, path[0], sub)
            if self._peek() != ",":
                return tree
            self.pos += 1

    def _path(self) -> list[str]:
        names = [self._name()]
        while self._peek() == "/":
            self.pos += 1
            names.append(self._name())
        return names

    def _name(self) -> str:
        match = re.compile(r"\s*([^,/()\s]+)\s*").match(self.text, self.pos)
        if not match:
            raise self._error()
        self.pos = match.end()
        return match.group(1)


def _merge_field(tree: FieldTree, name: str, sub: FieldTree | None) -> None:
    if name not in tree:
        tree[name] = sub
    elif tree[name] is None or sub is None:
        tree[name] = None
    else:
        for key, value in sub.items():
            _merge_field(tree[name], key, value)  # type: ignore[arg-type]


def _check_fields(tree: FieldTree, schema: str | None,
                  schemas: dict[str, dict[str, str | None]] | None = None) -> None:
    """Reject names the response resource does not have, as Google does; ``schemas``: the
    API's resources (the Directory API's by default; the licensing API passes its own)."""
    if schema is None or schema == _OPEN:
        return
    schemas = _SCHEMAS if schemas is None else schemas
    props = schemas[schema]
    for name, sub in tree.items():
        if name == "*":
            continue
        if name not in props:
            raise ApiError(400, "invalidParameter", f"Invalid field selection {name}")
        if sub is not None:
            if props[name] is None:
                raise ApiError(400, "invalidParameter",
                               f"Invalid field selection {name}/{next(iter(sub))}")
            _check_fields(sub, props[name], schemas)


def _apply_fields(value: Any, tree: FieldTree | None) -> Any:
    if tree is None:
        return value
    if isinstance(value, list):
        return [_apply_fields(item, tree) for item in value]
    if not isinstance(value, dict):
        return value
    result: dict[str, Any] = {}
    if "*" in tree:
        result = {key: _apply_fields(item, tree["*"]) for key, item in value.items()}
    for key, sub in tree.items():
        if key != "*" and key in value:
            result[key] = _apply_fields(value[key], sub)
    return result


def _parse_fields(text: str | None, schema: str | None,
                  schemas: dict[str, dict[str, str | None]] | None = None) -> FieldTree | None:
    if text is None or text.strip() == "":
        return None
    tree = _FieldParser(text).parse()
    _check_fields(tree, schema, schemas)
    return tree


def _json_answer(status: int, payload: Any, fields: FieldTree | None,
                 query: dict[str, str]) -> _Response:
    """A call's answer: no body for None, else the payload cut to ``fields``, pretty-printed
    unless ``prettyPrint=false``."""
    if payload is None:
        return _Response(status, b"", None)
    pretty = query.get("prettyPrint", "true").lower() != "false"
    return _Response(status, _encode_json(_apply_fields(payload, fields), pretty))


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()


def _etag(payload: Any) -> str:
    data = json.dumps(payload, sort_keys=True, default=str).encode("utf-8")
    return '"' + base64.urlsafe_b64encode(hashlib.sha1(data).digest()).decode()[:27] + '"'


def _collection(kind: str, field: str, items: list[Any], etag_parts: list[Any],
                token: str | None = None) -> dict[str, Any]:
    """A list answer as Google shapes it: the field is left out when empty, and so is
    nextPageToken on the last page."""
    payload: dict[str, Any] = {"kind": kind, "etag": _etag(etag_parts)}
    if items:
        payload[field] = items
    if token:
        payload["nextPageToken"] = token
    return payload


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _encode_token(key: tuple[str, ...]) -> str:
    raw = json.dumps(list(key), separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_token(token: str) -> tuple[str, ...]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        key = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        key = None
    if not isinstance(key, list) or not all(isinstance(k, str) for k in key):
        raise _invalid("Invalid Input: pageToken")
    return tuple(key)


def _paginate(items: list[dict], key: Callable[[dict], tuple[str, ...]], descending: bool,
              limit: int, token: str | None) -> tuple[list[dict], str | None]:
    """Keyset pagination: the token holds the sort key of the last item returned."""
    ordered = sorted(items, key=key, reverse=descending)
    if token:
        after = _decode_token(token)
        ordered = [i for i in ordered if (key(i) < after if descending else key(i) > after)]
    page = ordered[:limit]
    more = len(ordered) > limit
    return page, (_encode_token(key(page[-1])) if more else None)


def _paginate_index(index: list[tuple[str, ...]], item_of: Callable[[tuple[str, ...]], dict],
                    accept: Callable[[dict], bool], descending: bool, limit: int,
                    token: str | None) -> tuple[list[dict], str | None]:
    """``_paginate`` over keys already sorted ascending: the token is found by bisection and
    only the items of the page (and those the filter skips) are looked at."""
    if token:
        after = _decode_token(token)
        start = (bisect.bisect_left(index, after) - 1 if descending
                 else bisect.bisect_right(index, after))
    else:
        start = len(index) - 1 if descending else 0
    positions = range(start, -1, -1) if descending else range(start, len(index))
    page: list[dict] = []
    last_key: tuple[str, ...] = ()
    for position in positions:
        item = item_of(index[position])
        if not accept(item):
            continue
        if len(page) == limit:
            return page, _encode_token(last_key)
        page.append(item)
        last_key = index[position]
    return page, None


def _int_param(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _invalid(f"Invalid value '{raw}'. Values must match the following regular "
                       "expression: '-?[0-9]+'") from None
    if not low <= value <= high:
        raise _invalid(f"Invalid value '{value}' for {name}: must be between {low} and {high}")
    return value


def _enum_param(query: dict[str, str], name: str, default: str | None,
                allowed: set[str]) -> str | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    for value in allowed:
        if value.lower() == raw.lower():
            return value
    raise _invalid(f"Invalid value for {name}: {raw}")


def _bool_param(query: dict[str, str], name: str) -> bool:
    raw = query.get(name, "false").lower()
    if raw not in ("true", "false", ""):
        raise _invalid(f"Invalid value for {name}: {raw}")
    return raw == "true"


def _ou_parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _ou_in_subtree(path: str, root: str) -> bool:
    if root == "/":
        return True
    path, root = path.lower(), root.lower()
    return path == root or path.startswith(root + "/")


# --------------------------------------------------------------------------------------------
# Directory state
# --------------------------------------------------------------------------------------------


class _State:
    """Users, org units, groups and schemas of one customer. Not locked: callers lock."""

    def __init__(self, domain: str, customer_id: str):
        self.domain = domain.lower()
        self.customer_id = customer_id
        self.users: dict[str, dict] = {}          # id -> stored resource (full projection)
        self.by_email: dict[str, str] = {}        # lower-case primary email -> id
        self.by_alias: dict[str, str] = {}        # lower-case alias address -> id
        self.passwords: dict[str, str] = {}       # id -> sha256 of the password
        self.orgunits: dict[str, dict] = {}       # lower-case path -> OU resource
        self.groups: dict[str, dict] = {}         # lower-case email -> group record
        self.schemas: dict[str, dict] = {}        # schemaName -> schema resource
        self.serial = 0
        self.version = 0                          # bumped by every user write
        # Sorted users.list keys, so that a page costs a bisection, not a sort of every user.
        # The email order is kept up to date on writes; name orders are rebuilt after one.
        self._email_index: list[tuple[str]] | None = None
        self._name_indexes: dict[str, tuple[int, list[tuple[str, str]]]] = {}
        self._add_root_ou()

    # ids -------------------------------------------------------------------------------------
    def next_serial(self) -> int:
        self.serial += 1
        return self.serial

    def new_user_id(self) -> str:
        return str(10**20 + int(_digest(self.domain, "user", self.next_serial())[:15], 16))

    def new_short_id(self, kind: str, length: int = 12) -> str:
        return _digest(self.domain, kind, self.next_serial())[:length]

    # org units -------------------------------------------------------------------------------
    def _add_root_ou(self) -> None:
        root = {"kind": "admin#directory#orgUnit", "name": self.domain, "description": "",
                "orgUnitPath": "/", "orgUnitId": "id:03ph8a2z" + _digest(self.domain, "root")[:7]}
        root["etag"] = _etag(root)
        self.orgunits["/"] = root

    def ensure_ou(self, path: str) -> dict:
        if not path.startswith("/"):
            raise ValueError(f"org unit paths start with '/': {path!r}")
        path = path.rstrip("/") or "/"
        existing = self.orgunits.get(path.lower())
        if existing:
            return existing
        parent = self.ensure_ou(_ou_parent(path))
        ou = {"kind": "admin#directory#orgUnit", "name": path.rsplit("/", 1)[1],
              "orgUnitPath": path, "orgUnitId": "id:03ph8a2z" + self.new_short_id("ou", 7),
              "parentOrgUnitPath": parent["orgUnitPath"],
              "parentOrgUnitId": parent["orgUnitId"]}
        ou["etag"] = _etag(ou)
        self.orgunits[path.lower()] = ou
        return ou

    def find_ou(self, key: str) -> dict | None:
        """By path (case-insensitive, leading slash optional) or by ``id:`` unique id."""
        if key.startswith("id:"):
            return next((ou for ou in self.orgunits.values() if ou["orgUnitId"] == key), None)
        path = "/" + key.strip("/") if key not in ("", "/") else "/"
        return self.orgunits.get(path.lower())

    # users -----------------------------------------------------------------------------------
    def find_user(self, key: str, aliases: bool = True) -> dict | None:
        """By primary email, alias (as Google: an alias answers with its owner) or id."""
        user_id = self.by_email.get(key.lower()) or (self.by_alias.get(key.lower()) if aliases else None)
        return self.users.get(user_id or key)

    def address_taken(self, email: str) -> bool:
        return email.lower() in self.by_email or email.lower() in self.by_alias

    def store_user(self, user: dict, old_email: str | None = None) -> None:
        user["etag"] = _etag({k: v for k, v in user.items() if k != "etag"})
        self.users[user["id"]] = user
        self.version += 1
        new_email = user["primaryEmail"].lower()
        if old_email and old_email != new_email:
            if self.by_email.pop(old_email, None) is not None:
                self._unindex_email(old_email)
            for group in self.groups.values():
                group["members"] = [new_email if m == old_email else m
                                    for m in group["members"]]
        if new_email not in self.by_email:
            self._index_email(new_email)
        self.by_email[new_email] = user["id"]
        for alias in user.get("aliases") or ():
            self.by_alias[alias.lower()] = user["id"]

    def _index_email(self, email: str) -> None:
        if self._email_index is not None:
            bisect.insort(self._email_index, (email,))

    def _unindex_email(self, email: str) -> None:
        index = self._email_index
        if index is not None:
            position = bisect.bisect_left(index, (email,))
            if position < len(index) and index[position] == (email,):
                del index[position]

    def user_index(self, order_by: str) -> list[tuple[str, ...]]:
        """users.list sort keys in ascending order; the last part of each is the email."""
        if order_by == "email":
            if self._email_index is None or len(self._email_index) != len(self.by_email):
                self._email_index = sorted((email,) for email in self.by_email)
            return self._email_index
        cached = self._name_indexes.get(order_by)
        if cached is None or cached[0] != self.version:
            keys = sorted((u["name"].get(order_by, "").lower(), u["primaryEmail"].lower())
                          for u in self.users.values())
            cached = self._name_indexes[order_by] = (self.version, keys)
        return cached[1]

    def user_by_key(self, key: tuple[str, ...]) -> dict:
        return self.users[self.by_email[key[-1]]]

    # groups and schemas ----------------------------------------------------------------------
    def find_group(self, key: str) -> dict | None:
        group = self.groups.get(key.lower())
        return group or next((g for g in self.groups.values() if g["id"] == key), None)

    def find_schema(self, key: str) -> dict | None:
        schema = self.schemas.get(key)
        return schema or next((s for s in self.schemas.values() if s["schemaId"] == key), None)

    def make_schema(self, name: str, fields: dict[str, str]) -> dict:
        specs = []
        for field_name, field_type in fields.items():
            field_type = field_type.upper()
            if field_type not in FIELD_TYPES:
                raise ValueError(f"unknown field type {field_type!r}")
            spec = {"kind": "admin#directory#schema#fieldspec",
                    "fieldId": self.new_short_id("field", 22), "fieldName": field_name,
                    "displayName": field_name, "fieldType": field_type, "multiValued": False,
                    "readAccessType": "ADMINS_AND_SELF"}
            spec["etag"] = _etag(spec)
            specs.append(spec)
        schema = {"kind": "admin#directory#schema", "schemaId": self.new_short_id("schema", 22),
                  "schemaName": name, "displayName": name, "fields": specs}
        schema["etag"] = _etag(schema)
        return schema

    # persistence -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        users = [{**user, "_passwordSha256": self.passwords.get(uid)}
                 for uid, user in self.users.items()]
        return {"version": 1, "domain": self.domain, "customerId": self.customer_id,
                "serial": self.serial, "users": users,
                "orgunits": list(self.orgunits.values()),
                "groups": list(self.groups.values()), "schemas": list(self.schemas.values())}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "_State":
        state = cls(data["domain"], data["customerId"])
        state.serial = data.get("serial", 0)
        state.orgunits = {ou["orgUnitPath"].lower(): ou for ou in data["orgunits"]}
        state.groups = {g["email"].lower(): g for g in data["groups"]}
        state.schemas = {s["schemaName"]: s for s in data["schemas"]}
        for user in data["users"]:
            password = user.pop("_passwordSha256", None)
            if password:
                state.passwords[user["id"]] = password
            state.store_user(user)
        return state


# --------------------------------------------------------------------------------------------
# Request validation helpers for user writes
# --------------------------------------------------------------------------------------------

_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@([A-Za-z0-9-]+\.)+[A-Za-z0-9-]+$")


def _unknown_name(name: str, where: str = "resource") -> ApiError:
    return _invalid(f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': "
                    "Cannot find field.")


def _type_error(where: str, kind: str, value: Any) -> ApiError:
    return _invalid(f"Invalid value at '{where}' ({kind}), {json.dumps(value)}")


def _checked_name(value: Any, which: str) -> str:
    label = "GivenName" if which == "givenName" else "FamilyName"
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME_LENGTH:
        raise _invalid(f"Invalid Given/Family Name: {label}")
    return value


def _checked_password(value: Any) -> str:
    if not isinstance(value, str) or not 8 <= len(value) <= 100:
        raise _invalid("Invalid Password")
    return value


def _checked_bool(body: dict, key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise _type_error(f"resource.{key}", "TYPE_BOOL", value)
    return value


def _as_text_if_int(value: Any) -> Any:
    """INT64 custom attribute values travel as JSON strings."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _coerce_field(spec: dict, where: str, value: Any) -> Any:
    kind = spec["fieldType"]
    if isinstance(value, (list, dict)):
        raise _invalid(f"Invalid Input: {where} is not multi-valued")
    if kind == "INT64":
        text = str(int(value)) if isinstance(value, float) and value.is_integer() else value
        if isinstance(text, bool) or not re.fullmatch(r"-?\d+", str(text)):
            raise _invalid(f"Invalid Input: {where} must be an INT64, got {json.dumps(value)}")
        number = int(str(text))
        if not INT64_RANGE[0] <= number <= INT64_RANGE[1]:
            raise _invalid(f"Invalid Input: {where} is out of the INT64 range")
        return str(number)
    if kind == "BOOL":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise _invalid(f"Invalid Input: {where} must be a BOOL")
        return value
    if kind == "DOUBLE":
        try:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        except (TypeError, ValueError):
            raise _invalid(f"Invalid Input: {where} must be a DOUBLE") from None
    if isinstance(value, bool):
        raise _invalid(f"Invalid Input: {where} must be text")
    return str(value)


# --------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------


@dataclass
class _Call:
    method: str
    query: dict[str, str]
    raw_body: bytes
    params: dict[str, str]

    def body(self) -> dict[str, Any]:
        if not self.raw_body.strip():
            raise _invalid("Invalid Input: empty request body")
        try:
            data = json.loads(self.raw_body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "parseError", "Parse Error") from None
        if not isinstance(data, dict):
            raise ApiError(400, "parseError", "Parse Error")
        return data


Handler = Callable[[_Call], tuple[int, Any]]


class _DirectoryApi:
    """Endpoint implementations over a ``_State``; each returns (status, payload)."""

    def __init__(self, state: _State):
        self.state = state

    # routing ---------------------------------------------------------------------------------
    def route(self, method: str, raw_path: str) -> tuple[Handler, str | None, dict[str, str]]:
        """Map a request to (handler, response schema for ``fields``, decoded path params)."""
        if not raw_path.startswith(API_PREFIX + "/"):
            raise ApiError(404, "notFound", "Not Found")
        seg = raw_path[len(API_PREFIX) + 1:].split("/")
        decoded = [unquote(s) for s in seg]
        n = len(seg)
        if seg[0] == "users" and n == 1:
            if method == "GET":
                return self.users_list, "Users", {}
            if method == "POST":
                return self.users_insert, "User", {}
        if seg[0] == "users" and n == 2 and seg[1]:
            params = {"userKey": decoded[1]}
            if method == "GET":
                return self.users_get, "User", params
            if method == "PUT":
                return self.users_update, "User", params
        if seg[0] == "groups" and n == 1 and method == "GET":
            return self.groups_list, "Groups", {}
        if (seg[0] == "groups" and n == 4 and seg[2] == "members" and method == "DELETE"
                and seg[1] and seg[3]):
            return self.members_delete, None, {"groupKey": decoded[1], "memberKey": decoded[3]}
        if seg[0] == "customer" and n >= 3 and method == "GET" and seg[1]:
            return self._route_customer(seg, decoded)
        raise ApiError(404, "notFound", "Not Found")

    def _route_customer(self, seg: list[str], decoded: list[str]
                        ) -> tuple[Handler, str | None, dict[str, str]]:
        params = {"customerId": decoded[1]}
        if seg[2] == "orgunits" and len(seg) == 3:
            return self.orgunits_list, "OrgUnits", params
        if seg[2] == "orgunits":
            params["orgUnitPath"] = unquote("/".join(seg[3:]))  # {+orgUnitPath}
            return self.orgunits_get, "OrgUnit", params
        if seg[2] == "schemas" and len(seg) == 3:
            return self.schemas_list, "Schemas", params
        if seg[2] == "schemas" and len(seg) == 4 and seg[3]:
            params["schemaKey"] = decoded[3]
            return self.schemas_get, "Schema", params
        raise ApiError(404, "notFound", "Not Found")

    # shared checks ---------------------------------------------------------------------------
    def _check_customer(self, customer: str) -> None:
        if customer not in (MY_CUSTOMER, self.state.customer_id):
            raise ApiError(400, *BAD_REQUEST)

    def _check_scope(self, query: dict[str, str]) -> str | None:
        """Validate ``customer``/``domain`` of a list call; return the domain filter."""
        customer, domain = query.get("customer"), query.get("domain")
        if not customer and not domain:
            raise ApiError(400, *BAD_REQUEST)
        if customer:
            self._check_customer(customer)
        if domain and domain.lower() != self.state.domain:
            raise ApiError(403, "forbidden", NOT_AUTHORIZED)
        return domain.lower() if domain else None

    def _user_or_404(self, key: str) -> dict:
        user = self.state.find_user(key)
        if user is None:
            raise _not_found("userKey")
        return user

    # users -----------------------------------------------------------------------------------
    @staticmethod
    def _projection(query: dict[str, str]) -> tuple[str, list[str]]:
        projection = _enum_param(query, "projection", "basic", {"basic", "custom", "full"})
        mask = query.get("customFieldMask")
        if mask and projection != "custom":
            raise _invalid("Custom field mask is only applicable with custom projection")
        return projection or "basic", [m.strip() for m in (mask or "").split(",") if m.strip()]

    @staticmethod
    def render_user(user: dict, projection: str = "full", mask: list[str] = ()) -> dict:
        out = dict(user)
        custom = out.pop("customSchemas", None) or {}
        if projection == "custom":
            custom = {name: custom[name] for name in mask if name in custom}
        if custom and projection != "basic":
            out["customSchemas"] = custom
        return out

    def users_list(self, call: _Call) -> tuple[int, Any]:
        query = call.query
        domain = self._check_scope(query)
        projection, mask = self._projection(query)
        limit = _int_param(query, "maxResults", 100, 1, 500)
        order_by = _enum_param(query, "orderBy", "email", {"email", "familyName", "givenName"})
        descending = _enum_param(query, "sortOrder", "ASCENDING",
                                 {"ASCENDING", "DESCENDING"}) == "DESCENDING"
        _enum_param(query, "viewType", "admin_view", {"admin_view", "domain_public"})
        if query.get("query"):  # search results can lag writes: student_sync lists instead
            raise _invalid(f"Invalid Input: {query['query']} (this test server does not search)")
        suffix = "@" + domain if domain else None

        def accept(user: dict) -> bool:
            return suffix is None or user["primaryEmail"].endswith(suffix)

        if _bool_param(query, "showDeleted"):
            page, token = [], None
        else:
            page, token = _paginate_index(self.state.user_index(order_by or "email"),
                                          self.state.user_by_key, accept, descending, limit,
                                          query.get("pageToken"))
        return 200, _collection("admin#directory#users", "users",
                                [self.render_user(u, projection, mask) for u in page],
                                [u["etag"] for u in page], token)

    def users_get(self, call: _Call) -> tuple[int, Any]:
        projection, mask = self._projection(call.query)
        _enum_param(call.query, "viewType", "admin_view", {"admin_view", "domain_public"})
        user = self._user_or_404(call.params["userKey"])
        return 200, self.render_user(user, projection, mask)

    def users_insert(self, call: _Call) -> tuple[int, Any]:
        body = call.body()
        self._reject_unknown_user_keys(body)
        email = self._checked_email(body.get("primaryEmail"))
        given, family = self._checked_names(body.get("name"), required=True)
        password = body.get("password")
        if body.get("hashFunction") is None or password is None:
            _checked_password(password)
        if self.state.address_taken(email):
            raise ApiError(409, "duplicate", "Entity already exists.")
        ou = self._checked_ou(body.get("orgUnitPath") or "/")
        user = self._new_user(email, given, family, ou)
        self._apply_flags(user, body)
        user["customSchemas"] = self._merged_custom({}, body.get("customSchemas"))
        if not user["customSchemas"]:
            del user["customSchemas"]
        self._apply_stored(user, body)
        self.state.passwords[user["id"]] = _digest(password)
        self.state.store_user(user)
        return 200, self.render_user(user)

    def users_update(self, call: _Call) -> tuple[int, Any]:
        user = self._user_or_404(call.params["userKey"])
        body = call.body()
        self._reject_unknown_user_keys(body)
        new = copy.deepcopy(user)
        old_email = user["primaryEmail"].lower()
        if body.get("primaryEmail") is not None:
            email = self._checked_email(body["primaryEmail"])
            if email != old_email and self.state.address_taken(email):
                raise ApiError(409, "duplicate", "Entity already exists.")
            new["primaryEmail"] = email
            new["emails"] = [{"address": email, "primary": True}]
        if body.get("name") is not None:
            given, family = self._checked_names(body["name"], required=False)
            new["name"]["givenName"] = given or new["name"]["givenName"]
            new["name"]["familyName"] = family or new["name"]["familyName"]
            new["name"]["fullName"] = f"{new['name']['givenName']} {new['name']['familyName']}"
        password = body.get("password")
        if password is not None and body.get("hashFunction") is None:
            _checked_password(password)
        if body.get("orgUnitPath") is not None:
            new["orgUnitPath"] = self._checked_ou(body["orgUnitPath"])
        self._apply_flags(new, body)
        merged = self._merged_custom(new.get("customSchemas", {}), body.get("customSchemas"))
        new.pop("customSchemas", None)
        if merged:
            new["customSchemas"] = merged
        self._apply_stored(new, body)
        if password is not None:
            self.state.passwords[new["id"]] = _digest(password)
        self.state.store_user(new, old_email)
        return 200, self.render_user(new)

    # user write helpers ----------------------------------------------------------------------
    @staticmethod
    def _reject_unknown_user_keys(body: dict) -> None:
        for key in body:
            if key not in _SCHEMAS["User"]:
                raise _unknown_name(key)

    def _checked_email(self, value: Any) -> str:
        if not isinstance(value, str) or not _EMAIL.match(value):
            raise _invalid("Invalid Input: primary_user_email")
        if value.rsplit("@", 1)[1].lower() != self.state.domain:
            raise ApiError(403, "forbidden", NOT_AUTHORIZED)
        return value.lower()

    @staticmethod
    def _checked_names(value: Any, required: bool) -> tuple[str | None, str | None]:
        if not isinstance(value, dict):
            if required:
                raise _invalid("Invalid Given/Family Name: GivenName")
            raise _type_error("resource.name", "TYPE_MESSAGE", value)
        for key in value:
            if key not in _SCHEMAS["UserName"]:
                raise _unknown_name(key, "resource.name")
        names: list[str | None] = []
        for key in ("givenName", "familyName"):
            if required or value.get(key) is not None:
                names.append(_checked_name(value.get(key), key))
            else:
                names.append(None)
        return names[0], names[1]

    def _checked_ou(self, value: Any) -> str:
        if not isinstance(value, str) or not value.startswith("/"):
            raise _invalid("Invalid Ou Id")
        ou = self.state.orgunits.get((value.rstrip("/") or "/").lower())
        if ou is None:
            raise _invalid("Invalid Ou Id")
        return ou["orgUnitPath"]

    def _new_user(self, email: str, given: str | None, family: str | None, ou: str) -> dict:
        return {
            "kind": "admin#directory#user", "id": self.state.new_user_id(), "etag": "",
            "primaryEmail": email,
            "name": {"givenName": given, "familyName": family, "fullName": f"{given} {family}"},
            "isAdmin": False, "isDelegatedAdmin": False,
            "lastLoginTime": "1970-01-01T00:00:00.000Z", "creationTime": _now(),
            "agreedToTerms": False, "suspended": False, "archived": False,
            "changePasswordAtNextLogin": False, "ipWhitelisted": False,
            "emails": [{"address": email, "primary": True}],
            "customerId": self.state.customer_id, "orgUnitPath": ou,
            "isMailboxSetup": True, "isEnrolledIn2Sv": False, "isEnforcedIn2Sv": False,
            "includeInGlobalAddressList": True,
        }

    @staticmethod
    def _apply_flags(user: dict, body: dict) -> None:
        for key in _USER_BOOLS:
            value = _checked_bool(body, key)
            if value is not None:
                user[key] = value
        if user["suspended"]:
            user.setdefault("suspensionReason", "ADMIN")
        else:
            user.pop("suspensionReason", None)

    @staticmethod
    def _apply_stored(user: dict, body: dict) -> None:
        for key in _USER_STORED - set(_USER_BOOLS):
            if key in body:
                if body[key] is None:
                    user.pop(key, None)
                else:
                    user[key] = copy.deepcopy(body[key])

    def _merged_custom(self, current: dict, patch: Any) -> dict:
        """Merge ``customSchemas`` per schema and per field; ``null`` clears."""
        if patch is None:
            return copy.deepcopy(current)
        if not isinstance(patch, dict):
            raise _type_error("resource.custom_schemas", "TYPE_MESSAGE", patch)
        result = copy.deepcopy(current)
        for schema_name, values in patch.items():
            if values is None:
                result.pop(schema_name, None)
                continue
            if not isinstance(values, dict):
                raise _type_error(f"resource.custom_schemas[{schema_name}]", "TYPE_MESSAGE",
                                  values)
            target = result.get(schema_name, {})
            for field_name, value in values.items():
                if value is None:
                    target.pop(field_name, None)
                else:
                    target[field_name] = self._custom_value(schema_name, field_name, value)
            if target:
                result[schema_name] = target
            else:
                result.pop(schema_name, None)
        return result

    def _custom_value(self, schema_name: str, field_name: str, value: Any) -> Any:
        where = f"{schema_name}.{field_name}"
        schema = self.state.schemas.get(schema_name)
        if schema is None:
            raise _invalid(f"Invalid Input: custom schema {schema_name} does not exist")
        spec = next((f for f in schema["fields"] if f["fieldName"] == field_name), None)
        if spec is None:
            raise _invalid(f"Invalid Input: unknown custom field {where}")
        return _coerce_field(spec, where, value)

    # org units -------------------------------------------------------------------------------
    def orgunits_list(self, call: _Call) -> tuple[int, Any]:
        self._check_customer(call.params["customerId"])
        kind = _enum_param(call.query, "type", "children", {"all", "children",
                                                            "allIncludingParent"})
        parent = self.state.find_ou(call.query.get("orgUnitPath", ""))
        if parent is None:
            raise ApiError(404, "notFound", "Org unit not found")
        root = parent["orgUnitPath"]
        units = []
        for ou in sorted(self.state.orgunits.values(), key=lambda o: o["orgUnitPath"].lower()):
            path = ou["orgUnitPath"]
            if path.lower() == root.lower():
                if kind == "allIncludingParent":
                    units.append(ou)
            elif kind == "children":
                if ou.get("parentOrgUnitId") == parent["orgUnitId"]:
                    units.append(ou)
            elif _ou_in_subtree(path, root):
                units.append(ou)
        return 200, _collection("admin#directory#orgUnits", "organizationUnits", units,
                                [u["etag"] for u in units])

    def orgunits_get(self, call: _Call) -> tuple[int, Any]:
        self._check_customer(call.params["customerId"])
        ou = self.state.find_ou(call.params["orgUnitPath"])
        if ou is None:
            raise ApiError(404, "notFound", "Org unit not found")
        return 200, ou

    # groups ----------------------------------------------------------------------------------
    def groups_list(self, call: _Call) -> tuple[int, Any]:
        query = call.query
        user_key = query.get("userKey")
        if user_key:
            if query.get("customer"):
                raise ApiError(400, *BAD_REQUEST)
            if query.get("domain"):
                self._check_scope(query)
            member = self._member_email(user_key, missing_is_404=True)
            groups = [g for g in self.state.groups.values() if member in g["members"]]
        else:
            domain = self._check_scope(query)
            groups = [g for g in self.state.groups.values()
                      if domain is None or g["email"].lower().endswith("@" + domain)]
        if query.get("query"):
            raise _invalid(f"Invalid Input: {query['query']}")
        limit = _int_param(query, "maxResults", 200, 1, 200)
        _enum_param(query, "orderBy", "email", {"email"})
        descending = _enum_param(query, "sortOrder", "ASCENDING",
                                 {"ASCENDING", "DESCENDING"}) == "DESCENDING"
        page, token = _paginate(groups, lambda g: (g["email"].lower(),), descending, limit,
                                query.get("pageToken"))
        return 200, _collection("admin#directory#groups", "groups",
                                [self.render_group(g) for g in page], [g["id"] for g in page], token)

    def _member_email(self, key: str, missing_is_404: bool) -> str:
        user = self.state.find_user(key)
        if user is not None:
            return user["primaryEmail"].lower()
        in_domain = "@" not in key or key.rsplit("@", 1)[1].lower() == self.state.domain
        if missing_is_404 and in_domain:
            raise _not_found("userKey")
        return key.lower()

    @staticmethod
    def render_group(group: dict) -> dict:
        out = {k: v for k, v in group.items() if k != "members"}
        out["directMembersCount"] = str(len(group["members"]))
        out["etag"] = _etag(out)
        return out

    def members_delete(self, call: _Call) -> tuple[int, Any]:
        group = self.state.find_group(call.params["groupKey"])
        if group is None:
            raise _not_found("groupKey")
        member = self._member_email(call.params["memberKey"], missing_is_404=False)
        if member not in group["members"]:
            raise _not_found("memberKey")
        group["members"].remove(member)
        return 204, None

    # schemas ---------------------------------------------------------------------------------
    def schemas_list(self, call: _Call) -> tuple[int, Any]:
        self._check_customer(call.params["customerId"])
        schemas = list(self.state.schemas.values())
        return 200, _collection("admin#directory#schemas", "schemas", schemas,
                                [s["etag"] for s in schemas])

    def schemas_get(self, call: _Call) -> tuple[int, Any]:
        self._check_customer(call.params["customerId"])
        schema = self.state.find_schema(call.params["schemaKey"])
        if schema is None:
            raise _not_found("schemaKey")
        return 200, schema


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """One request as the server saw it."""

    method: str
    path: str                    # URL-decoded, without the query string
    query: dict[str, str]
    body: dict | None
    status: int
    # time.monotonic() when the server began handling the call (before any latency): for
    # rates. Not part of equality, so records compare as before.
    time: float = field(default_factory=_monotonic, compare=False)


class _HttpServer(TrackedServer):
    request_queue_size = 128  # many clients connecting at once must not wait on SYN retries

    def __init__(self, address: tuple[str, int], directory: "DirectoryServer"):
        self.directory = directory
        super().__init__(address, _RequestHandler)


class _RequestHandler(TrackedHandler):
    server_version = "ESF"
    server: _HttpServer

    def _serve(self) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send(_error_response(ApiError(400, *BAD_REQUEST)))
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        response = self.server.directory._handle_http(self.command, self.path, headers, body)
        self._send(response)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _serve

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not length.strip().isdigit():
            raise ValueError("bad Content-Length")
        return self.rfile.read(int(length))

    def _read_chunked(self) -> bytes:
        data = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(data)
            data += self.rfile.read(size)
            self.rfile.readline()

    def _send(self, response: _Response) -> None:
        self.send_response(response.status)
        if response.content_type and response.status != 204:
            self.send_header("Content-Type", response.content_type)
        if response.content_type == JSON_TYPE:
            self.send_header("Vary", "Origin, X-Origin, Referer")
        if response.status != 204:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD" and response.status != 204:
            self.wfile.write(response.body)


class DirectoryServer(Serving):
    """A local Directory API for one customer and domain; see the module docstring."""

    def __init__(self, domain: str = "d118.org", latency_ms: float = 0, *,
                 host: str = "127.0.0.1", port: int = 0, customer_id: str | None = None,
                 faults: FaultPlan | None = None):
        customer_id = customer_id or "C0" + _digest(domain.lower(), "customer")[:7]
        self._state = _State(domain, customer_id)
        self._api = _DirectoryApi(self._state)
        self._lock = threading.RLock()
        self._requests: list[Recorded] = []
        self._host, self._port = host, port
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self.latency_ms = latency_ms
        self.faults = faults
        # A test's say over single calls: hook(method, path) (path URL-decoded, no query) is
        # called before each call is executed, from the server's threads, and answers like
        # FaultPlan.draw -- (fault status answered instead, or None; answer 503 after
        # applying) -- or None to leave the call to ``faults``. It may also act (sleep, signal).
        self.hook: Callable[[str, str], tuple[int | str | None, bool] | None] | None = None

    # lifecycle (start, stop and ``with`` come from testkit._http.Serving) ----------------------
    _thread_name = "directory-server"

    def _make_httpd(self) -> "_HttpServer":
        return _HttpServer((self._host, self._port), self)

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The api_endpoint for googleapiclient, with a trailing slash."""
        return f"http://{self._host}:{self.port}/"

    @property
    def domain(self) -> str:
        return self._state.domain

    @property
    def customer_id(self) -> str:
        return self._state.customer_id

    @property
    def licensing(self) -> Any:
        """The Enterprise License Manager API served beside this one (testkit/licensing.py)."""
        with self._lock:
            if getattr(self, "_licensing", None) is None:
                from testkit.licensing import Licensing

                self._licensing = Licensing(self)
            return self._licensing

    # fixtures --------------------------------------------------------------------------------
    def add_orgunit(self, path: str) -> dict:
        """Create an org unit and any missing parents; returns the OU resource."""
        with self._lock:
            return copy.deepcopy(self._state.ensure_ou(path))

    def add_user(self, email: str, given: str, family: str, org_unit: str = "/",
                 suspended: bool = False, custom: dict[str, dict[str, Any]] | None = None, *,
                 password: str = "fixture-password",
                 change_password_at_next_login: bool = False,
                 aliases: list[str] | tuple[str, ...] = ()) -> dict:
        """Add a user directly (no API validation); creates ``org_unit`` if missing.

        ``aliases``: other addresses of the account; users.get and users.update by an alias
        answer with this account, and users.insert of an alias address answers 409.
        """
        with self._lock:
            for address in (email, *aliases):
                if self._state.address_taken(address):
                    raise ValueError(f"address {address} is already taken")
            ou = self._state.ensure_ou(org_unit)
            user = self._api._new_user(email.lower(), given, family, ou["orgUnitPath"])
            user["changePasswordAtNextLogin"] = change_password_at_next_login
            _DirectoryApi._apply_flags(user, {"suspended": suspended})
            values = {schema: {key: _as_text_if_int(value) for key, value in fields.items()}
                      for schema, fields in (custom or {}).items()}
            if values:
                user["customSchemas"] = values
            if aliases:
                user["aliases"] = [alias.lower() for alias in aliases]
            self._state.passwords[user["id"]] = _digest(password)
            self._state.store_user(user)
            return copy.deepcopy(user)

    def add_group(self, email: str, members: list[str] | tuple[str, ...] = (),
                  name: str | None = None) -> dict:
        """Add a group whose members are the given addresses; returns the group resource."""
        with self._lock:
            if email.lower() in self._state.groups:
                raise ValueError(f"group {email} already exists")
            group = {"kind": "admin#directory#group", "id": "0" + self._state.new_short_id(
                "group", 14), "email": email, "name": name or email.split("@")[0],
                "description": "", "adminCreated": True,
                "members": list(dict.fromkeys(m.lower() for m in members))}
            self._state.groups[email.lower()] = group
            return self._api.render_group(group)

    def add_schema(self, name: str, fields: dict[str, str]) -> dict:
        """Register a custom schema: ``{"Field": "INT64" | "STRING" | ...}``."""
        with self._lock:
            schema = self._state.make_schema(name, fields)
            self._state.schemas[name] = schema
            return copy.deepcopy(schema)

    # inspection ------------------------------------------------------------------------------
    def user(self, email: str) -> dict | None:
        """The stored user (full projection, deep copy) by primary email or id (not by alias)."""
        with self._lock:
            user = self._state.find_user(email, aliases=False)
            return copy.deepcopy(user) if user else None

    def users(self) -> dict[str, dict]:
        with self._lock:
            return {u["primaryEmail"].lower(): copy.deepcopy(u)
                    for u in self._state.users.values()}

    def orgunits(self) -> list[str]:
        with self._lock:
            return sorted(ou["orgUnitPath"] for ou in self._state.orgunits.values())

    def groups_of(self, email: str) -> set[str]:
        with self._lock:
            user = self._state.find_user(email)
            member = user["primaryEmail"].lower() if user else email.lower()
            return {g["email"] for g in self._state.groups.values() if member in g["members"]}

    def group_members(self, group_email: str) -> list[str]:
        with self._lock:
            group = self._state.find_group(group_email)
            return list(group["members"]) if group else []

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def count(self, method: str | None = None, path_prefix: str | None = None) -> int:
        """Recorded requests with this method and a path starting with ``path_prefix``."""
        return sum(1 for r in self.requests
                   if (method is None or r.method == method.upper())
                   and (path_prefix is None or r.path.startswith(path_prefix)))

    # persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        with self._lock:
            data = json.dumps(self._state.to_json(), indent=1, ensure_ascii=False)
        Path(path).write_text(data, encoding="utf-8")

    @classmethod
    def load_state(cls, path: str | Path, **kwargs: Any) -> "DirectoryServer":
        """A new (not started) server holding the state saved by ``save``."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        server = cls(domain=data["domain"], customer_id=data["customerId"], **kwargs)
        server._state = _State.from_json(data)
        server._api = _DirectoryApi(server._state)
        return server

    # request handling ------------------------------------------------------------------------
    def _handle_http(self, method: str, target: str, headers: dict[str, str],
                    body: bytes) -> _Response:
        """Answer one HTTP request; never raises."""
        try:
            return self._handle_call(method, target, headers, body)
        except Exception:  # noqa: BLE001 - the server must keep serving
            traceback.print_exc()
            return _fault_response("500")

    def _handle_call(self, method: str, target: str, headers: dict[str, str],
                     body: bytes) -> _Response:
        started = _monotonic()
        override = headers.get("x-http-method-override")
        if override:
            method = override.upper()
            if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                target += ("&" if "?" in target else "?") + body.decode("utf-8", "replace")
                body = b""
        if self.latency_ms:
            time.sleep(self.latency_ms / 1000)
        plan, hook = self.faults, self.hook
        said = hook(method, unquote(urlsplit(target).path)) if hook else None
        if said is not None:
            before, after = (_fault_key(said[0]) if said[0] is not None else None), said[1]
        else:
            before, after = plan.draw(method) if plan else (None, False)
        if before:
            response = _fault_response(before)
        else:
            with self._lock:
                response = self._execute(method, target, body)
            if after and 200 <= response.status < 300:
                response = _fault_response("503")
        self._record(method, target, body, response.status, started)
        return response

    def _execute(self, method: str, target: str, body: bytes) -> _Response:
        split = urlsplit(target)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        if split.path.startswith("/apps/licensing/v1/"):
            return self.licensing.execute(method, split.path, query, body)
        try:
            handler, schema, params = self._api.route(method, split.path)
            fields = _parse_fields(query.get("fields"), schema)
            status, payload = handler(_Call(method, query, body, params))
        except ApiError as error:
            return _error_response(error)
        return _json_answer(status, payload, fields, query)

    def _record(self, method: str, target: str, body: bytes | None, status: int,
                started: float | None = None) -> None:
        split = urlsplit(target)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        parsed = None
        if body:
            try:
                value = json.loads(body.decode("utf-8"))
                parsed = value if isinstance(value, dict) else None
            except (ValueError, UnicodeDecodeError):
                parsed = None
        path = unquote(split.path)
        with self._lock:
            self._requests.append(Recorded(method, path, query, parsed, status,
                                           _monotonic() if started is None else started))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testkit.directory_server",
        description="Serve a local Admin SDK Directory API until Ctrl-C.")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--state", type=Path, help="load users, OUs, groups, schemas from FILE")
    parser.add_argument("--save", type=Path, help="write the state to FILE on exit")
    parser.add_argument("--latency-ms", type=float, default=0)
    parser.add_argument("--domain", default="d118.org")
    args = parser.parse_args(argv)

    options = {"latency_ms": args.latency_ms, "host": args.host, "port": args.port}
    if args.state and not args.state.is_file():
        parser.error(f"--state: no such file: {args.state}")
    if args.state:
        server = DirectoryServer.load_state(args.state, **options)
    else:
        server = DirectoryServer(domain=args.domain, **options)
    # A large directory is long-lived: keep the collector from walking it on every page.
    gc.collect()
    gc.freeze()

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    server.start()
    print(f"Directory API server for {server.domain} on {server.url} (Ctrl-C to stop)",
          flush=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if args.save:
            server.save(args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
