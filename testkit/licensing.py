"""A local Enterprise License Manager API (``licensing`` v1) beside the Directory API server.

Served by :class:`testkit.directory_server.DirectoryServer` on the same port, under
``/apps/licensing/v1/``, so that a licensing client built with the same
``client_options={"api_endpoint": server.url}`` reaches it::

    with DirectoryServer(domain="d118.org") as srv:
        srv.add_user("12345@d118.org", given="Ann", family="Lee")
        srv.licensing.assign("12345@d118.org", "1010310008")
        srv.licensing.seats["1010310008"] = 500          # an optional seat limit
        licensing = build("licensing", "v1", static_discovery=True, cache_discovery=False,
                          client_options={"api_endpoint": srv.url}, http=httplib2.Http())

The calls follow the discovery document bundled with google-api-python-client
(``licensing.v1.json``) and the answers Google gives in the field:

- ``licenseAssignments.listForProductAndSku`` / ``listForProduct``: ``customerId`` is
  required and must be the customer ID (``C0...``) or, as older versions accepted, the
  primary domain; ``maxResults`` 1-1000 (default 100); ``pageToken``; ``fields``.
- ``get``, ``insert`` (body ``{"userId": email}``), ``delete``.
- 404 ``notFound`` "User does not have a license for specified sku and product" for a get
  or delete of a licence the user does not hold; 409 ``duplicate`` for an insert of a
  licence the user holds already; 412 ``conditionNotMet`` "Auto License un-assignment is not
  allowed." for a delete of a licence assigned automatically (Admin console licence
  settings); 412 ``conditionNotMet`` "There aren't enough available licenses for the
  specified product-SKU pair" when an insert finds no free seat; 403 with
  ``ACCESS_TOKEN_SCOPE_INSUFFICIENT`` when ``scope_granted`` is off (a token without the
  ``apps.licensing`` scope).

Requests are recorded and faults drawn by the Directory API server like its own calls.
Assignments live in memory only (``DirectoryServer.save`` does not keep them).
"""

from __future__ import annotations

import bisect
import copy
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from testkit.directory_server import (
    ApiError, _Response, _decode_token, _encode_json, _encode_token, _error_response, _etag,
    _int_param, _json_answer, _parse_fields)

__all__ = ["Licensing", "LICENSING_PREFIX", "PRODUCTS", "SCOPE"]

LICENSING_PREFIX = "/apps/licensing/v1/"
SCOPE = "https://www.googleapis.com/auth/apps.licensing"
SELF_LINK = "https://licensing.googleapis.com/apps/licensing/v1/product/{}/sku/{}/user/{}"
MAX_RESULTS = 1000

NO_LICENSE = "User does not have a license for specified sku and product"
AUTO_LICENSE = "Auto License un-assignment is not allowed."
OUT_OF_SEATS = "There aren't enough available licenses for the specified product-SKU pair"
ALREADY_ASSIGNED = "User already has a license for the specified product and SKU"
NOT_AUTHORIZED = "Not Authorized to access this resource/api"

# product ID -> (product name, {SKU ID: SKU name}); Google's "Products and SKUs" page.
PRODUCTS: dict[str, tuple[str, dict[str, str]]] = {
    "101031": ("Google Workspace for Education", {
        "1010310002": "Google Workspace for Education Plus - Legacy",
        "1010310003": "Google Workspace for Education Plus - Legacy (Student)",
        "1010310005": "Google Workspace for Education Standard",
        "1010310006": "Google Workspace for Education Standard (Staff)",
        "1010310007": "Google Workspace for Education Standard (Extra Student)",
        "1010310008": "Google Workspace for Education Plus",
        "1010310009": "Google Workspace for Education Plus (Staff)",
        "1010310010": "Google Workspace for Education Plus (Extra Student)",
    }),
    "101037": ("Google Workspace for Education", {
        "1010370001": "Google Workspace for Education: Teaching and Learning Upgrade",
    }),
    "Google-Apps": ("Google Workspace", {
        "1010020020": "Google Workspace Enterprise Plus",
        "1010020025": "Google Workspace Business Plus",
        "1010020028": "Google Workspace Business Starter",
        "Google-Apps-Unlimited": "G Suite Business",
    }),
}

# Response resources, for checking ``fields`` masks as Google does.
_SCHEMAS: dict[str, dict[str, str | None]] = {
    "LicenseAssignmentList": {"kind": None, "etag": None, "nextPageToken": None,
                              "items": "LicenseAssignment"},
    "LicenseAssignment": dict.fromkeys(
        "etags kind productId productName selfLink skuId skuName userId".split()),
}


def _scope_error() -> _Response:
    """What Google answers to a token that lacks the licensing scope."""
    message = "Request had insufficient authentication scopes."
    payload = {"error": {
        "code": 403, "message": message,
        "errors": [{"message": "Insufficient Permission", "domain": "global",
                    "reason": "insufficientPermissions"}],
        "status": "PERMISSION_DENIED",
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                     "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT", "domain": "googleapis.com",
                     "metadata": {"service": "licensing.googleapis.com"}}],
    }}
    return _Response(403, _encode_json(payload))


@dataclass
class _Assignment:
    serial: int          # assignment order: the listing order and its page tokens
    product_id: str
    sku_id: str
    user_id: str         # the Directory user's id: a licence follows an account renamed
    auto: bool = False   # assigned by the Admin console's automatic licensing


class Licensing:
    """Licence assignments of the server's one customer; see the module docstring.

    ``seats``: SKU ID -> how many licences the customer bought (no entry: no limit).
    ``auto_license``: every assignment counts as automatic (a delete answers 412).
    ``scope_granted``: off, every call answers 403 insufficient scopes.
    ``products``: the catalog of products and SKUs that answer (others: 400).
    """

    def __init__(self, server: Any):
        self._server = server
        self.seats: dict[str, int] = {}
        self.auto_license = False
        self.scope_granted = True
        self.products: dict[str, tuple[str, dict[str, str]]] = copy.deepcopy(PRODUCTS)
        self._serial = 0
        self._assignments: dict[tuple[str, str, str], _Assignment] = {}
        self._by_serial: dict[int, _Assignment] = {}
        # (product, sku) and (product,) -> serials in ascending order: a page is a bisection.
        self._index: dict[tuple[str, ...], list[int]] = {}

    # fixtures --------------------------------------------------------------------------------
    def product_of(self, sku_id: str) -> str:
        """The product a SKU belongs to in the catalog."""
        for product_id, (_, skus) in self.products.items():
            if sku_id in skus:
                return product_id
        raise ValueError(f"SKU {sku_id} is in no product of the catalog")

    def assign(self, email: str, sku_id: str, product_id: str | None = None, *,
               auto: bool = False) -> None:
        """Give a user a licence directly (no seat check); ``auto`` as automatic licensing does."""
        product_id = product_id or self.product_of(sku_id)
        with self._server._lock:
            user = self._user(email)
            if user is None:
                raise ValueError(f"no user {email}")
            if (product_id, sku_id, user["id"]) in self._assignments:
                raise ValueError(f"{email} holds {sku_id} already")
            self._add(product_id, sku_id, user["id"], auto)

    def assign_many(self, emails: Iterable[str], sku_id: str, product_id: str | None = None) -> None:
        """``assign`` for many users at once (a large district)."""
        for email in emails:
            self.assign(email, sku_id, product_id)

    def release(self, email: str, sku_id: str, product_id: str | None = None) -> None:
        product_id = product_id or self.product_of(sku_id)
        with self._server._lock:
            user = self._user(email)
            assignment = self._assignments.get((product_id, sku_id, user["id"])) if user else None
            if assignment is None:
                raise ValueError(f"{email} does not hold {sku_id}")
            self._remove(assignment)

    def holders(self, sku_id: str, product_id: str | None = None) -> set[str]:
        """Lower-cased primary emails of the users holding the SKU."""
        product_id = product_id or self.product_of(sku_id)
        with self._server._lock:
            return {self._email_of(self._by_serial[s]).lower()
                    for s in self._index.get((product_id, sku_id), [])}

    def holds(self, email: str, sku_id: str, product_id: str | None = None) -> bool:
        return email.lower() in self.holders(sku_id, product_id)

    def in_use(self, sku_id: str, product_id: str | None = None) -> int:
        product_id = product_id or self.product_of(sku_id)
        with self._server._lock:
            return len(self._index.get((product_id, sku_id), []))

    # state -----------------------------------------------------------------------------------
    def _user(self, email: str) -> dict | None:
        """By primary email only: licences name users by their current primary address."""
        state = self._server._state
        user_id = state.by_email.get(email.lower())
        return state.users.get(user_id) if user_id else None

    def _email_of(self, assignment: _Assignment) -> str:
        return self._server._state.users[assignment.user_id]["primaryEmail"]

    def _add(self, product_id: str, sku_id: str, user_id: str, auto: bool) -> _Assignment:
        self._serial += 1
        assignment = _Assignment(self._serial, product_id, sku_id, user_id, auto)
        self._assignments[(product_id, sku_id, user_id)] = assignment
        self._by_serial[assignment.serial] = assignment
        for key in ((product_id, sku_id), (product_id,)):
            self._index.setdefault(key, []).append(assignment.serial)
        return assignment

    def _remove(self, assignment: _Assignment) -> None:
        del self._assignments[(assignment.product_id, assignment.sku_id, assignment.user_id)]
        del self._by_serial[assignment.serial]
        for key in ((assignment.product_id, assignment.sku_id), (assignment.product_id,)):
            serials = self._index[key]
            del serials[bisect.bisect_left(serials, assignment.serial)]

    def _render(self, assignment: _Assignment) -> dict[str, Any]:
        product_name, skus = self.products.get(assignment.product_id, ("", {}))
        email = self._email_of(assignment)
        resource = {
            "kind": "licensing#licenseAssignment",
            "userId": email,
            "productId": assignment.product_id,
            "skuId": assignment.sku_id,
            "skuName": skus.get(assignment.sku_id, assignment.sku_id),
            "productName": product_name,
            "selfLink": SELF_LINK.format(assignment.product_id, assignment.sku_id, email),
        }
        resource["etags"] = _etag(resource)
        return resource

    # the wire --------------------------------------------------------------------------------
    def execute(self, method: str, path: str, query: dict[str, str], body: bytes) -> _Response:
        """Answer one call under ``/apps/licensing/v1/`` (the server's lock is held)."""
        if not self.scope_granted:
            return _scope_error()
        try:
            handler, schema, params = self._route(method, path)
            fields = _parse_fields(query.get("fields"), schema, _SCHEMAS)
            status, payload = handler(params, query, body)
        except ApiError as error:
            return _error_response(error)
        return _json_answer(status, payload, fields, query)

    def _route(self, method: str, path: str) -> tuple[Callable, str, dict[str, str]]:
        from urllib.parse import unquote

        seg = [unquote(s) for s in path[len(LICENSING_PREFIX):].split("/")]
        if len(seg) >= 2 and seg[0] == "product" and seg[1]:
            params = {"productId": seg[1]}
            if len(seg) == 3 and seg[2] == "users" and method == "GET":
                return self._list_for_product, "LicenseAssignmentList", params
            if len(seg) >= 4 and seg[2] == "sku" and seg[3]:
                params["skuId"] = seg[3]
                if len(seg) == 5 and seg[4] == "users" and method == "GET":
                    return self._list_for_sku, "LicenseAssignmentList", params
                if len(seg) == 5 and seg[4] == "user" and method == "POST":
                    return self._insert, "LicenseAssignment", params
                if len(seg) == 6 and seg[4] == "user" and seg[5]:
                    params["userId"] = seg[5]
                    if method == "GET":
                        return self._get, "LicenseAssignment", params
                    if method == "DELETE":
                        return self._delete, "LicenseAssignment", params
        raise ApiError(404, "notFound", "Not Found")

    def _checked_product(self, params: dict[str, str]) -> tuple[str, str | None]:
        product_id, sku_id = params["productId"], params.get("skuId")
        if product_id not in self.products:
            raise ApiError(400, "invalid", f"Invalid productId: {product_id}")
        if sku_id is not None and sku_id not in self.products[product_id][1]:
            raise ApiError(400, "invalid", f"Invalid skuId: {sku_id} for productId: {product_id}")
        return product_id, sku_id

    def _checked_customer(self, query: dict[str, str]) -> None:
        customer = query.get("customerId", "")
        if not customer:
            raise ApiError(400, "required", "Required parameter: customerId")
        state = self._server._state
        if customer.lower() not in (state.customer_id.lower(), state.domain.lower()):
            raise ApiError(403, "forbidden", NOT_AUTHORIZED)

    def _list(self, key: tuple[str, ...], query: dict[str, str]) -> tuple[int, Any]:
        self._checked_customer(query)
        limit = _int_param(query, "maxResults", 100, 1, MAX_RESULTS)
        serials = self._index.get(key, [])
        start = 0
        if query.get("pageToken"):
            after = _decode_token(query["pageToken"])
            if len(after) != 1 or not after[0].isdigit():
                raise ApiError(400, "invalid", "Invalid Input: pageToken")
            start = bisect.bisect_right(serials, int(after[0]))
        page = [self._by_serial[s] for s in serials[start:start + limit]]
        payload: dict[str, Any] = {"kind": "licensing#licenseAssignmentList"}
        items = [self._render(a) for a in page]
        payload["etag"] = _etag([i["etags"] for i in items])
        if items:
            payload["items"] = items
        if start + limit < len(serials):
            payload["nextPageToken"] = _encode_token((str(page[-1].serial),))
        return 200, payload

    def _list_for_sku(self, params: dict[str, str], query: dict[str, str], body: bytes) -> tuple[int, Any]:
        product_id, sku_id = self._checked_product(params)
        return self._list((product_id, sku_id), query)

    def _list_for_product(self, params: dict[str, str], query: dict[str, str],
                          body: bytes) -> tuple[int, Any]:
        product_id, _ = self._checked_product(params)
        return self._list((product_id,), query)

    def _held(self, params: dict[str, str]) -> _Assignment:
        product_id, sku_id = self._checked_product(params)
        user = self._user(params["userId"])
        assignment = self._assignments.get((product_id, sku_id, user["id"])) if user else None
        if assignment is None:
            raise ApiError(404, "notFound", NO_LICENSE)
        return assignment

    def _get(self, params: dict[str, str], query: dict[str, str], body: bytes) -> tuple[int, Any]:
        return 200, self._render(self._held(params))

    def _delete(self, params: dict[str, str], query: dict[str, str], body: bytes) -> tuple[int, Any]:
        assignment = self._held(params)
        if assignment.auto or self.auto_license:
            raise ApiError(412, "conditionNotMet", AUTO_LICENSE)
        self._remove(assignment)
        return 204, None

    def _insert(self, params: dict[str, str], query: dict[str, str], raw: bytes) -> tuple[int, Any]:
        product_id, sku_id = self._checked_product(params)
        try:
            body = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "parseError", "Parse Error") from None
        if not isinstance(body, dict):
            raise ApiError(400, "parseError", "Parse Error")
        for key in body:
            if key != "userId":
                raise ApiError(400, "invalid", f"Invalid JSON payload received. Unknown name "
                                               f"\"{key}\": Cannot find field.")
        email = body.get("userId")
        if not isinstance(email, str) or not email.strip():
            raise ApiError(400, "required", "Required field must not be blank: userId")
        user = self._user(email)
        if user is None:
            raise ApiError(404, "notFound", f"Resource Not Found: {email}")
        if (product_id, sku_id, user["id"]) in self._assignments:
            raise ApiError(409, "duplicate", ALREADY_ASSIGNED)
        limit = self.seats.get(sku_id)
        if limit is not None and len(self._index.get((product_id, sku_id), [])) >= limit:
            raise ApiError(412, "conditionNotMet", OUT_OF_SEATS)
        return 200, self._render(self._add(product_id, sku_id, user["id"], self.auto_license))
