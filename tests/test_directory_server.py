"""The local Directory API server, driven through the real googleapiclient."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httplib2
import pytest
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testkit.directory_server import DirectoryServer, FaultPlan  # noqa: E402

DOMAIN = "d118.org"
WHS = "/D118 Students/WHS Students"
CATEGORY = "Synchronization_Data"
BATCH_LIST_FIELDS = ("nextPageToken,users(primaryEmail,name(givenName,familyName),suspended,"
                     "orgUnitPath,customSchemas)")


def client(srv: DirectoryServer):
    return build("admin", "directory_v1", static_discovery=True, cache_discovery=False,
                 client_options={"api_endpoint": srv.url}, http=httplib2.Http())


def attrs(school: int | str, year: int | str) -> dict:
    return {CATEGORY: {"Homeschool_ID": str(school), "Graduation_Year": str(year)}}


@pytest.fixture
def srv():
    with DirectoryServer(domain=DOMAIN) as server:
        server.add_schema(CATEGORY, {"Homeschool_ID": "INT64", "Graduation_Year": "INT64"})
        server.add_orgunit(WHS + "/9th")
        server.add_orgunit(WHS + "/10th")
        server.add_orgunit("/D118 Students/LMS Students")
        server.add_orgunit("/Suspended Accounts/Graduated Students")
        yield server


@pytest.fixture
def api(srv):
    return client(srv)


def error_of(call) -> HttpError:
    with pytest.raises(HttpError) as info:
        call.execute()
    return info.value


def assert_error(call, status: int, reason: str, message: str | None = None) -> HttpError:
    error = error_of(call)
    assert error.status_code == status
    assert error.error_details[0]["reason"] == reason
    if message is not None:
        assert error.error_details[0]["message"] == message
        assert error.reason == message
    return error


def new_user(email: str, **extra) -> dict:
    body = {"primaryEmail": email, "name": {"givenName": "Ann", "familyName": "Lee"},
            "password": "Welcome-2026"}
    body.update(extra)
    return body


# ---------------------------------------------------------------------------------------------
# users.list
# ---------------------------------------------------------------------------------------------


def test_list_pages_with_list_next_in_email_order(srv, api):
    for number in (5, 3, 1, 4, 2):
        srv.add_user(f"{number}@d118.org", given="A", family="B", org_unit=WHS + "/9th")
    request = api.users().list(domain=DOMAIN, maxResults=2)
    pages = []
    while request is not None:
        response = request.execute()
        assert response["kind"] == "admin#directory#users"
        pages.append([u["primaryEmail"] for u in response["users"]])
        request = api.users().list_next(request, response)
    assert pages == [["1@d118.org", "2@d118.org"], ["3@d118.org", "4@d118.org"], ["5@d118.org"]]
    last = api.users().list(customer="my_customer", maxResults=5).execute()
    assert "nextPageToken" not in last and len(last["users"]) == 5


def test_list_empty_omits_users(api):
    response = api.users().list(customer="my_customer").execute()
    assert "users" not in response and "nextPageToken" not in response


def test_list_default_page_size_is_100_and_max_500(srv, api):
    for number in range(120):
        srv.add_user(f"{1000 + number}@d118.org", given="A", family="B")
    assert len(api.users().list(domain=DOMAIN).execute()["users"]) == 100
    assert len(api.users().list(domain=DOMAIN, maxResults=500).execute()["users"]) == 120
    assert_error(api.users().list(domain=DOMAIN, maxResults=501), 400, "invalid")
    assert_error(api.users().list(domain=DOMAIN, maxResults=0), 400, "invalid")


def test_list_scope_errors(srv, api):
    assert_error(api.users().list(), 400, "badRequest", "Bad Request")
    assert_error(api.users().list(domain="other.org"), 403, "forbidden",
                 "Not Authorized to access this resource/api")
    assert_error(api.users().list(customer="C0nothere"), 400, "badRequest")
    assert api.users().list(customer=srv.customer_id).execute()["kind"]
    assert_error(api.users().list(domain=DOMAIN, pageToken="!!garbage"), 400, "invalid")


def test_fields_mask_selects_and_drops_next_page_token(srv, api):
    for number in range(3):
        srv.add_user(f"{number}@d118.org", given="Ann", family="Lee", org_unit=WHS + "/9th",
                     custom=attrs(101, 2030))
    request = api.users().list(domain=DOMAIN, maxResults=2, projection="full",
                               fields=BATCH_LIST_FIELDS)
    response = request.execute()
    assert set(response) == {"users", "nextPageToken"}
    assert response["users"][0] == {
        "primaryEmail": "0@d118.org", "name": {"givenName": "Ann", "familyName": "Lee"},
        "suspended": False, "orgUnitPath": WHS + "/9th",
        "customSchemas": {CATEGORY: {"Homeschool_ID": "101", "Graduation_Year": "2030"}}}
    forgetful = api.users().list(domain=DOMAIN, maxResults=2, fields="users(primaryEmail)")
    page = forgetful.execute()
    assert page == {"users": [{"primaryEmail": "0@d118.org"}, {"primaryEmail": "1@d118.org"}]}
    assert api.users().list_next(forgetful, page) is None


def test_fields_syntax_variants(srv, api):
    srv.add_user("1@d118.org", given="Ann", family="Lee")
    get = api.users().get
    assert get(userKey="1@d118.org", fields="name/givenName,id").execute().keys() == {"name", "id"}
    assert get(userKey="1@d118.org", fields="name/givenName").execute() == {
        "name": {"givenName": "Ann"}}
    assert get(userKey="1@d118.org", fields="name(*)").execute()["name"]["fullName"] == "Ann Lee"
    assert "kind" in get(userKey="1@d118.org", fields="*").execute()
    listed = api.users().list(domain=DOMAIN, fields="users/name/familyName,kind").execute()
    assert listed == {"kind": "admin#directory#users", "users": [{"name": {"familyName": "Lee"}}]}
    for bad in ("users(primaryEmail", "users()", "a,,b", "users)", "primaryEmail/"):
        assert_error(api.users().list(domain=DOMAIN, fields=bad), 400, "invalidParameter")
    for unknown in ("usrs(primaryEmail)", "users(primaryEmial)", "users(name(first))",
                    "users(suspended(x))"):
        assert_error(api.users().list(domain=DOMAIN, fields=unknown), 400, "invalidParameter")


def test_projections(srv, api):
    srv.add_user("1@d118.org", given="Ann", family="Lee",
                 custom={**attrs(101, 2030), "Other": {"x": "y"}})
    get = api.users().get
    assert "customSchemas" not in get(userKey="1@d118.org").execute()
    assert set(get(userKey="1@d118.org", projection="full").execute()["customSchemas"]) == {
        CATEGORY, "Other"}
    custom = get(userKey="1@d118.org", projection="custom", customFieldMask=CATEGORY).execute()
    assert custom["customSchemas"] == attrs(101, 2030)
    listed = api.users().list(domain=DOMAIN, projection="custom", customFieldMask="Other").execute()
    assert listed["users"][0]["customSchemas"] == {"Other": {"x": "y"}}
    message = "Custom field mask is only applicable with custom projection"
    assert_error(get(userKey="1@d118.org", customFieldMask=CATEGORY), 400, "invalid", message)
    assert_error(api.users().list(domain=DOMAIN, projection="full", customFieldMask=CATEGORY),
                 400, "invalid", message)


def test_a_search_query_is_refused_rather_than_ignored(srv, api):
    srv.add_user("1@d118.org", given="A", family="Z")
    assert_error(api.users().list(domain=DOMAIN, query="isSuspended=false"), 400, "invalid")


def test_order_by_and_sort_order(srv, api):
    srv.add_user("1@d118.org", given="A", family="Cole")
    srv.add_user("2@d118.org", given="B", family="adams")
    srv.add_user("3@d118.org", given="C", family="Brown")
    by_family = api.users().list(domain=DOMAIN, orderBy="familyName").execute()["users"]
    assert [u["name"]["familyName"] for u in by_family] == ["adams", "Brown", "Cole"]
    request = api.users().list(domain=DOMAIN, orderBy="email", sortOrder="DESCENDING",
                               maxResults=2)
    first = request.execute()
    second = api.users().list_next(request, first).execute()
    assert [u["primaryEmail"] for u in first["users"] + second["users"]] == [
        "3@d118.org", "2@d118.org", "1@d118.org"]


def test_pagination_survives_inserts_between_pages(srv, api):
    for number in (1, 3, 5):
        srv.add_user(f"{number}@d118.org", given="A", family="B")
    request = api.users().list(domain=DOMAIN, maxResults=2)
    first = request.execute()
    srv.add_user("0@d118.org", given="A", family="B")
    second = api.users().list_next(request, first).execute()
    assert [u["primaryEmail"] for u in second["users"]] == ["5@d118.org"]


# ---------------------------------------------------------------------------------------------
# users.get / insert / update / patch
# ---------------------------------------------------------------------------------------------


def test_get_by_email_case_insensitive_and_by_id(srv, api):
    stored = srv.add_user("12345@d118.org", given="Ann", family="Lee", org_unit=WHS + "/9th")
    user = api.users().get(userKey="12345@D118.org").execute()
    assert user["id"] == stored["id"] and user["id"].isdigit()
    assert user["kind"] == "admin#directory#user"
    assert user["name"] == {"givenName": "Ann", "familyName": "Lee", "fullName": "Ann Lee"}
    assert user["suspended"] is False and user["isAdmin"] is False
    assert "password" not in user and "suspensionReason" not in user
    assert api.users().get(userKey=stored["id"]).execute()["primaryEmail"] == "12345@d118.org"
    assert_error(api.users().get(userKey="nobody@d118.org"), 404, "notFound",
                 "Resource Not Found: userKey")


def test_insert_creates_user_with_everything_in_one_call(srv, api):
    body = new_user("777@d118.org", orgUnitPath="/d118 students/whs students/9TH",
                    changePasswordAtNextLogin=True,
                    customSchemas={CATEGORY: {"Homeschool_ID": 101, "Graduation_Year": "2030"}})
    created = api.users().insert(body=body).execute()
    assert created["primaryEmail"] == "777@d118.org"
    assert created["orgUnitPath"] == WHS + "/9th"           # canonical case
    assert created["changePasswordAtNextLogin"] is True
    assert created["customSchemas"] == attrs(101, 2030)     # INT64 as text
    assert "password" not in created
    assert srv.user("777@D118.ORG")["id"] == created["id"]
    recorded = srv.requests[-1]
    assert (recorded.method, recorded.path) == ("POST", "/admin/directory/v1/users")
    assert recorded.status == 200
    assert recorded.body["password"] == "Welcome-2026"


def test_insert_validation(srv, api):
    srv.add_user("1@d118.org", given="A", family="B")
    insert = api.users().insert
    assert_error(insert(body=new_user("1@D118.org")), 409, "duplicate", "Entity already exists.")
    assert_error(insert(body=new_user("2@d118.org", orgUnitPath="/Nope")), 400, "invalid",
                 "Invalid Ou Id")
    assert_error(insert(body=new_user("2@d118.org", password="short")), 400, "invalid",
                 "Invalid Password")
    assert_error(insert(body=new_user("2@d118.org", password="x" * 101)), 400, "invalid")
    no_password = new_user("2@d118.org")
    del no_password["password"]
    assert_error(insert(body=no_password), 400, "invalid", "Invalid Password")
    assert_error(insert(body=new_user("2@d118.org", name={"givenName": "A" * 61,
                                                           "familyName": "B"})),
                 400, "invalid", "Invalid Given/Family Name: GivenName")
    assert_error(insert(body=new_user("2@d118.org", name={"givenName": "A", "familyName": " "})),
                 400, "invalid", "Invalid Given/Family Name: FamilyName")
    assert_error(insert(body=new_user("2@other.org")), 403, "forbidden")
    assert_error(insert(body=new_user("not-an-email")), 400, "invalid")
    assert_error(insert(body=new_user("2@d118.org", customSchemas={
        CATEGORY: {"Graduation_Year": "20x0"}})), 400, "invalid")
    assert_error(insert(body=new_user("2@d118.org", customSchemas={
        CATEGORY: {"Nope": "1"}})), 400, "invalid")
    assert_error(insert(body=new_user("2@d118.org", customSchemas={
        "Unregistered": {"Nope": "1"}})), 400, "invalid")
    assert_error(insert(body=new_user("2@d118.org", suspended="yes")), 400, "invalid")
    assert_error(insert(body=new_user("2@d118.org", surname="typo")), 400, "invalid")
    assert srv.user("2@d118.org") is None


def test_update_has_patch_semantics(srv, api):
    srv.add_user("5@d118.org", given="Ann", family="Lee", org_unit=WHS + "/9th",
                 custom=attrs(101, 2030))
    updated = api.users().update(userKey="5@d118.org", body={
        "name": {"familyName": "Smith-Jones"}, "suspended": True,
        "orgUnitPath": "/suspended accounts", "customSchemas": {CATEGORY: {"Homeschool_ID": 102}},
    }).execute()
    assert updated["name"] == {"givenName": "Ann", "familyName": "Smith-Jones",
                               "fullName": "Ann Smith-Jones"}
    assert updated["suspended"] is True and updated["suspensionReason"] == "ADMIN"
    assert updated["orgUnitPath"] == "/Suspended Accounts"
    assert updated["customSchemas"] == attrs(102, 2030)
    api.users().update(userKey="5@d118.org", body={
        "suspended": False, "customSchemas": {CATEGORY: {"Graduation_Year": None}}}).execute()
    stored = srv.user("5@d118.org")
    assert stored["suspended"] is False and "suspensionReason" not in stored
    assert stored["customSchemas"] == {CATEGORY: {"Homeschool_ID": "102"}}
    assert stored["name"]["familyName"] == "Smith-Jones"
    api.users().update(userKey="5@d118.org", body={
        "customSchemas": {CATEGORY: {"Homeschool_ID": None}}}).execute()
    assert "customSchemas" not in srv.user("5@d118.org")


def test_update_errors_leave_user_unchanged(srv, api):
    srv.add_user("5@d118.org", given="Ann", family="Lee")
    srv.add_user("6@d118.org", given="Bo", family="Lee")
    update = api.users().update
    assert_error(update(userKey="nobody@d118.org", body={"suspended": True}), 404, "notFound",
                 "Resource Not Found: userKey")
    assert_error(update(userKey="5@d118.org", body={"suspended": True, "orgUnitPath": "/Nope"}),
                 400, "invalid", "Invalid Ou Id")
    assert_error(update(userKey="5@d118.org", body={"name": {"givenName": ""}}), 400, "invalid",
                 "Invalid Given/Family Name: GivenName")
    assert_error(update(userKey="5@d118.org", body={"primaryEmail": "6@d118.org"}), 409,
                 "duplicate")
    assert srv.user("5@d118.org")["suspended"] is False


def test_rename_keeps_groups(srv, api):
    srv.add_user("5@d118.org", given="Ann", family="Lee")
    srv.add_group("band@d118.org", members=["5@d118.org"])
    api.users().update(userKey="5@d118.org", body={"primaryEmail": "55@d118.org"}).execute()
    assert srv.user("5@d118.org") is None
    assert srv.groups_of("55@d118.org") == {"band@d118.org"}


def test_write_returns_fields_mask(srv, api):
    srv.add_user("5@d118.org", given="Ann", family="Lee")
    response = api.users().update(userKey="5@d118.org", body={"suspended": True},
                                  fields="primaryEmail,suspended").execute()
    assert response == {"primaryEmail": "5@d118.org", "suspended": True}
    assert_error(api.users().update(userKey="5@d118.org", body={"suspended": False},
                                    fields="bogus"), 400, "invalidParameter")
    assert srv.user("5@d118.org")["suspended"] is True   # rejected before applying


# ---------------------------------------------------------------------------------------------
# org units, groups, members, schemas
# ---------------------------------------------------------------------------------------------


def test_orgunits_list_types(srv, api):
    orgunits = api.orgunits()

    def paths(**kwargs) -> list[str]:
        response = orgunits.list(customerId="my_customer", **kwargs).execute()
        assert response["kind"] == "admin#directory#orgUnits"
        return [ou["orgUnitPath"] for ou in response.get("organizationUnits", [])]

    assert paths() == ["/D118 Students", "/Suspended Accounts"]         # children by default
    assert paths(orgUnitPath="/D118 Students", type="children") == [
        "/D118 Students/LMS Students", WHS]
    assert paths(orgUnitPath="D118 Students/WHS Students", type="all") == [WHS + "/10th",
                                                                           WHS + "/9th"]
    assert paths(orgUnitPath=WHS, type="allIncludingParent") == [WHS, WHS + "/10th", WHS + "/9th"]
    assert len(paths(type="all")) == 7
    assert paths(orgUnitPath=WHS + "/9th") == []
    ou = orgunits.list(customerId="my_customer", orgUnitPath=WHS).execute()[
        "organizationUnits"][0]
    assert set(ou) >= {"kind", "name", "orgUnitPath", "orgUnitId", "parentOrgUnitPath",
                       "parentOrgUnitId"}
    assert ou["name"] == "10th" and ou["parentOrgUnitPath"] == WHS
    assert_error(orgunits.list(customerId="my_customer", orgUnitPath="/Nope"), 404, "notFound")
    assert_error(orgunits.list(customerId="C0other"), 400, "badRequest")


def test_orgunits_get_by_path_and_id(srv, api):
    orgunits = api.orgunits()
    ou = orgunits.get(customerId="my_customer", orgUnitPath="D118 Students/WHS Students").execute()
    assert ou["orgUnitPath"] == WHS and ou["orgUnitId"].startswith("id:")
    assert srv.requests[-1].path == "/admin/directory/v1/customer/my_customer/orgunits/" + WHS[1:]
    same = orgunits.get(customerId=srv.customer_id, orgUnitPath="d118 students/whs students")
    assert same.execute()["orgUnitId"] == ou["orgUnitId"]
    by_id = orgunits.get(customerId="my_customer", orgUnitPath=ou["orgUnitId"]).execute()
    assert by_id["orgUnitPath"] == WHS
    assert_error(orgunits.get(customerId="my_customer", orgUnitPath="D118 Students/Nope"), 404,
                 "notFound", "Org unit not found")


def test_groups_list_by_user_and_pagination(srv, api):
    srv.add_user("1@d118.org", given="A", family="B")
    srv.add_user("2@d118.org", given="A", family="B")
    for name in ("band", "chess", "drama"):
        srv.add_group(f"{name}@d118.org", members=["1@d118.org", "outside@gmail.com"])
    groups = api.groups()
    request = groups.list(userKey="1@D118.org", maxResults=2)
    first = request.execute()
    assert first["kind"] == "admin#directory#groups"
    group = first["groups"][0]
    assert group["kind"] == "admin#directory#group" and group["email"] == "band@d118.org"
    assert group["directMembersCount"] == "2" and group["id"] and group["name"] == "band"
    second = groups.list_next(request, first).execute()
    assert [g["email"] for g in second["groups"]] == ["drama@d118.org"]
    assert "nextPageToken" not in second
    assert "groups" not in groups.list(userKey="2@d118.org").execute()
    assert len(groups.list(userKey="outside@gmail.com").execute()["groups"]) == 3
    assert len(groups.list(customer="my_customer").execute()["groups"]) == 3
    assert_error(groups.list(userKey="nobody@d118.org"), 404, "notFound")
    assert_error(groups.list(), 400, "badRequest")
    assert_error(groups.list(customer="my_customer", maxResults=201), 400, "invalid")


def test_members_delete(srv, api):
    srv.add_user("1@d118.org", given="A", family="B")
    srv.add_group("band@d118.org", members=["1@d118.org"])
    members = api.members()
    assert members.delete(groupKey="band@d118.org", memberKey="1@D118.org").execute() in ("", {})
    assert srv.requests[-1].status == 204
    assert srv.groups_of("1@d118.org") == set()
    assert_error(members.delete(groupKey="band@d118.org", memberKey="1@d118.org"), 404,
                 "notFound", "Resource Not Found: memberKey")
    assert_error(members.delete(groupKey="nope@d118.org", memberKey="1@d118.org"), 404,
                 "notFound", "Resource Not Found: groupKey")


def test_member_delete_by_user_id(srv, api):
    user = srv.add_user("1@d118.org", given="A", family="B")
    group = srv.add_group("band@d118.org", members=["1@d118.org"])
    api.members().delete(groupKey=group["id"], memberKey=user["id"]).execute()
    assert srv.groups_of("1@d118.org") == set()


def test_schemas(srv, api):
    schemas = api.schemas()
    listed = schemas.list(customerId="my_customer").execute()
    assert listed["kind"] == "admin#directory#schemas"
    schema = listed["schemas"][0]
    assert schema["kind"] == "admin#directory#schema" and schema["schemaName"] == CATEGORY
    fields = {f["fieldName"]: f for f in schema["fields"]}
    assert fields["Graduation_Year"]["fieldType"] == "INT64"
    assert fields["Graduation_Year"]["kind"] == "admin#directory#schema#fieldspec"
    assert fields["Graduation_Year"]["multiValued"] is False
    got = schemas.get(customerId="my_customer", schemaKey=CATEGORY).execute()
    assert got["schemaId"] == schema["schemaId"]
    assert schemas.get(customerId="my_customer", schemaKey=schema["schemaId"]).execute()
    assert_error(schemas.get(customerId="my_customer", schemaKey="Nope"), 404, "notFound")


# ---------------------------------------------------------------------------------------------
# faults, latency, robustness
# ---------------------------------------------------------------------------------------------


def test_fault_instead_of_executing(srv, api):
    srv.faults = FaultPlan(rate=1.0, statuses=(429,), seed=1)
    error = assert_error(api.users().insert(body=new_user("1@d118.org")), 429, "rateLimitExceeded")
    assert error.status_code == 429
    assert srv.user("1@d118.org") is None
    assert api.users().list(domain=DOMAIN).execute()["kind"]      # reads are not eligible
    srv.faults = FaultPlan(rate=1.0, statuses=("403-quotaExceeded",), only_writes=False)
    assert_error(api.users().list(domain=DOMAIN), 403, "quotaExceeded")
    srv.faults = FaultPlan(rate=1.0, statuses=(403,), only_writes=False)
    assert_error(api.users().list(domain=DOMAIN), 403, "userRateLimitExceeded")
    srv.faults = FaultPlan(rate=1.0, statuses=(500, 502, 503), only_writes=False)
    error = error_of(api.users().list(domain=DOMAIN))
    assert error.status_code in (500, 502, 503)
    assert error.error_details[0]["reason"] == "backendError"


def test_fault_html_502(srv, api):
    srv.faults = FaultPlan(rate=1.0, statuses=("502-html",), only_writes=False)
    error = error_of(api.users().list(domain=DOMAIN))
    assert error.status_code == 502
    assert error.resp["content-type"] == "text/html"
    assert error.error_details == "<html><body>502 Bad Gateway</body></html>"


def test_fault_applied_then_error(srv, api):
    srv.faults = FaultPlan(applied_then_error_rate=1.0, seed=3)
    assert_error(api.users().insert(body=new_user("1@d118.org")), 503, "backendError")
    assert srv.user("1@d118.org") is not None
    assert_error(api.users().insert(body=new_user("1@d118.org")), 409, "duplicate")
    assert [r.status for r in srv.requests] == [503, 409]


def test_faults_are_deterministic(srv, api):
    def pattern(plan: FaultPlan) -> list:
        return [plan.draw("POST") for _ in range(50)]

    plan = dict(rate=0.3, statuses=(429, 503), applied_then_error_rate=0.2, seed=7)
    assert pattern(FaultPlan(**plan)) == pattern(FaultPlan(**plan))
    assert {d[0] for d in pattern(FaultPlan(**plan))} == {None, "429", "503"}
    assert {d[0] for d in [FaultPlan(rate=1.0).draw("GET") for _ in range(5)]} == {None}
    with pytest.raises(ValueError):
        FaultPlan(statuses=(418,))


def test_latency_applies_per_request():
    with DirectoryServer(domain=DOMAIN, latency_ms=60) as slow:
        started = time.perf_counter()
        client(slow).users().list(domain=DOMAIN).execute()
        assert time.perf_counter() - started >= 0.06


def test_unknown_routes_and_bad_bodies(srv):
    http = httplib2.Http()
    for method, path in (("GET", "admin/directory/v1/nothing"), ("DELETE", "admin/directory/v1/"
                         "users/x@d118.org"), ("GET", "elsewhere")):
        response, content = http.request(srv.url + path, method)
        assert response.status == 404
        assert json.loads(content)["error"]["errors"][0] == {
            "message": "Not Found", "domain": "global", "reason": "notFound"}
        assert response["content-type"] == "application/json; charset=UTF-8"
    response, content = http.request(srv.url + "admin/directory/v1/users", "POST", body="{nope",
                                     headers={"content-type": "application/json"})
    assert response.status == 400
    assert json.loads(content)["error"]["errors"][0]["reason"] == "parseError"
    assert srv.count() == 4 and srv.count("GET") == 2
    response, _ = http.request(srv.url + "admin/directory/v1/users?domain=d118.org", "GET")
    assert response.status == 200          # the connection still works after errors


def test_handler_exception_becomes_backend_error(srv, api, monkeypatch, capsys):
    def boom(call):
        raise RuntimeError("bug")

    monkeypatch.setattr(srv._api, "users_get", boom)
    assert_error(api.users().get(userKey="1@d118.org"), 500, "backendError")
    assert api.users().list(domain=DOMAIN).execute()["kind"]
    capsys.readouterr()


def test_method_override_for_long_get(srv):
    srv.add_user("1@d118.org", given="A", family="B")
    api = client(srv)
    fields = "users(" + ",".join(["primaryEmail"] * 200) + ")"
    request = api.users().list(domain=DOMAIN, fields=fields)
    assert len(request.uri) > 2048               # googleapiclient tunnels it as a POST
    assert request.execute()["users"][0]["primaryEmail"] == "1@d118.org"
    assert srv.requests[-1].method == "GET"


def test_concurrent_writes(srv):
    def worker(start: int) -> None:
        api = client(srv)
        for number in range(start, start + 15):
            api.users().insert(body=new_user(f"{number}@d118.org")).execute()

    threads = [threading.Thread(target=worker, args=(n * 100,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(srv.users()) == 90 and srv.count("POST") == 90
    assert len({u["id"] for u in srv.users().values()}) == 90


# ---------------------------------------------------------------------------------------------
# helpers, persistence, command line
# ---------------------------------------------------------------------------------------------


def test_fixture_helpers(srv):
    added = srv.add_user("ABC@D118.org", given="A", family="B", org_unit="/New/Deep",
                         custom={CATEGORY: {"Graduation_Year": 2031}})
    assert added["primaryEmail"] == "abc@d118.org"
    assert "/New" in srv.orgunits() and "/New/Deep" in srv.orgunits()
    assert srv.user("abc@d118.org")["customSchemas"] == {CATEGORY: {"Graduation_Year": "2031"}}
    copy = srv.users()["abc@d118.org"]
    copy["suspended"] = True
    assert srv.user("abc@d118.org")["suspended"] is False
    with pytest.raises(ValueError):
        srv.add_user("abc@d118.org", given="A", family="B")
    srv.add_group("Band@d118.org", members=["ABC@d118.org"])
    assert srv.groups_of("abc@D118.org") == {"Band@d118.org"}
    srv.clear_requests()
    assert srv.requests == []


def test_save_and_load_state(srv, api, tmp_path):
    srv.add_user("1@d118.org", given="A", family="B", org_unit=WHS + "/9th",
                 custom=attrs(101, 2030), suspended=True)
    srv.add_group("band@d118.org", members=["1@d118.org"])
    state = tmp_path / "state.json"
    srv.save(state)
    loaded = DirectoryServer.load_state(state)
    assert loaded.customer_id == srv.customer_id and loaded.domain == DOMAIN
    with loaded:
        again = client(loaded)
        assert again.users().get(userKey="1@d118.org", projection="full").execute() == \
            api.users().get(userKey="1@d118.org", projection="full").execute()
        assert loaded.groups_of("1@d118.org") == {"band@d118.org"}
        assert again.schemas().get(customerId="my_customer", schemaKey=CATEGORY).execute()
        created = again.users().insert(body=new_user("2@d118.org")).execute()
        assert created["id"] not in {u["id"] for u in srv.users().values()}


@pytest.mark.skipif(sys.platform == "win32", reason="terminate() is not a signal on Windows")
def test_command_line_serves_until_interrupted(tmp_path):
    with DirectoryServer(domain="example.org") as seed:
        seed.add_user("1@example.org", given="A", family="B")
        seed.save(tmp_path / "state.json")
    process = subprocess.Popen(
        [sys.executable, "-m", "testkit.directory_server", "--port", "0", "--state",
         str(tmp_path / "state.json"), "--save", str(tmp_path / "after.json")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        url = line.split(" on ")[1].split()[0]
        api = build("admin", "directory_v1", static_discovery=True, cache_discovery=False,
                    client_options={"api_endpoint": url}, http=httplib2.Http())
        api.users().update(userKey="1@example.org", body={"suspended": True}).execute()
    finally:
        process.terminate()
        process.wait(timeout=10)
    saved = json.loads((tmp_path / "after.json").read_text(encoding="utf-8"))
    assert saved["users"][0]["suspended"] is True
