"""The local PowerSchool API server (testkit/powerschool_api.py) and the plugin it reads.

Driven over HTTP with `requests`, as any PowerSchool API client would drive a real server.
"""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testkit import district  # noqa: E402
from testkit.powerschool_api import PLUGIN_XML, PowerSchoolApiServer, read_grants  # noqa: E402

SECTION_2 = {
    ("schools", "school_number"), ("schools", "name"), ("schools", "abbreviation"),
    ("schools", "state_excludefromreporting"),
    ("students", "student_number"), ("students", "first_name"), ("students", "last_name"),
    ("students", "classof"), ("students", "enroll_status"), ("students", "schoolid"),
    ("students", "grade_level"),
}
KEYS = {(t, "id") for t in ("schools", "students")}   # the key the paged read sorts on
PROJECTION = "student_number,first_name,last_name,classof,enroll_status,schoolid,grade_level"


@pytest.fixture
def database(tmp_path):
    path = tmp_path / "powerschool.sqlite3"
    with district.PowerSchool(path) as ps:
        ps.school(101, "Washington High School", "WHS", 0)
        ps.school(102, "Lincoln Middle School", "LMS", None)
        for n in range(30):
            ps.student(30000 + n, "Ann", "Lee", 2030, 0, 101 if n % 2 else 102, 9)
        ps.student(30100, "Bo", None, None, -1, 101, 10)  # NULL last name and class
    return path


def start(database: Path, **options) -> PowerSchoolApiServer:
    return PowerSchoolApiServer(database, max_page_size=options.pop("max_page_size", 10), **options).start()


@pytest.fixture
def api(database):
    server = start(database)
    yield server
    server.stop()


def token(server: PowerSchoolApiServer, secret: str | None = None) -> requests.Response:
    return requests.post(f"{server.url}/oauth/access_token", data={"grant_type": "client_credentials"},
                         auth=(server.client_id, secret or server.client_secret), timeout=10)


def session(server: PowerSchoolApiServer) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = "Bearer " + token(server).json()["access_token"]
    s.headers["Accept"] = "application/json"
    return s


def test_plugin_grants_exactly_the_columns_of_section_2_and_the_keys():
    assert read_grants(PLUGIN_XML) == SECTION_2 | KEYS
    text = PLUGIN_XML.read_text(encoding="utf-8")
    assert "<oauth/>" in text and "FullAccess" not in text


def test_plugin_zip_has_plugin_xml_at_its_root(tmp_path):
    spec = importlib.util.spec_from_file_location("build_zip", ROOT / "powerschool-plugin" / "build_zip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = module.build(tmp_path / "plugin.zip")
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["plugin.xml"]
        assert archive.read("plugin.xml") == PLUGIN_XML.read_bytes()


def test_token_for_client_credentials_in_basic_auth(api):
    answer = token(api)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("application/json")
    body = answer.json()
    assert body["token_type"] == "Bearer"
    assert isinstance(body["expires_in"], str) and 3500 < int(body["expires_in"]) <= 3600
    assert token(api).json()["access_token"] == body["access_token"]  # the same while it lives


def test_token_refused_for_a_wrong_secret_or_grant(api):
    assert token(api, secret="wrong").status_code == 401
    answer = requests.post(f"{api.url}/oauth/access_token", data={"grant_type": "password"},
                           auth=(api.client_id, api.client_secret), timeout=10)
    assert answer.status_code == 400


def test_calls_need_a_live_bearer_token(database):
    server = start(database, token_lifetime=0)
    try:
        access = token(server).json()["access_token"]
        answer = requests.get(f"{server.url}/ws/v1/metadata", headers={"Authorization": f"Bearer {access}"},
                              timeout=10)
        assert answer.status_code == 401  # expired at once
        assert requests.get(f"{server.url}/ws/v1/metadata", timeout=10).status_code == 401
    finally:
        server.stop()


def test_metadata_gives_the_page_size_maximum(api):
    answer = session(api).get(f"{api.url}/ws/v1/metadata", timeout=10)
    assert answer.json()["metadata"]["schema_table_query_max_page_size"] == 10


def test_count_and_pages_of_the_students_table(api):
    s = session(api)
    assert s.get(f"{api.url}/ws/schema/table/students/count", timeout=10).json() == {"count": 31}
    seen = []
    for page in range(1, 5):
        body = s.get(f"{api.url}/ws/schema/table/students", params={
            "projection": PROJECTION, "page": page, "pagesize": 500, "sort": "id"}, timeout=10).json()
        assert body["name"].lower() == "students"
        assert len(body["record"]) == (10 if page < 4 else 1)  # capped at the maximum
        seen += body["record"]
    assert len({r["id"] for r in seen}) == 31
    assert [r["id"] for r in seen] == sorted(r["id"] for r in seen)
    first = seen[0]["tables"]["students"]
    assert first == {"student_number": "30000", "first_name": "Ann", "last_name": "Lee", "classof": "2030",
                     "enroll_status": "0", "schoolid": "102", "grade_level": "9"}
    assert seen[-1]["tables"]["students"] == {"student_number": "30100", "first_name": "Bo",
                                              "enroll_status": "-1", "schoolid": "101", "grade_level": "10"}
    past = s.get(f"{api.url}/ws/schema/table/students",
                 params={"projection": PROJECTION, "page": 5, "sort": "id"}, timeout=10).json()
    assert "record" not in past


def test_sort_descending_and_a_filter(api):
    s = session(api)
    body = s.get(f"{api.url}/ws/schema/table/students", params={
        "projection": "student_number", "sort": "student_number", "sortdescending": "true",
        "q": "schoolid==101"}, timeout=10).json()
    numbers = [int(r["tables"]["students"]["student_number"]) for r in body["record"]]
    assert numbers == sorted(numbers, reverse=True) and numbers[0] == 30100
    assert s.get(f"{api.url}/ws/schema/table/students/count", params={"q": "schoolid==101"},
                 timeout=10).json() == {"count": 16}


def test_schools_table(api):
    body = session(api).get(f"{api.url}/ws/schema/table/schools", params={
        "projection": "school_number,name,abbreviation,state_excludefromreporting"}, timeout=10).json()
    rows = sorted((r["tables"]["schools"] for r in body["record"]), key=lambda t: t["school_number"])
    assert rows == [{"school_number": "101", "name": "Washington High School", "abbreviation": "WHS",
                     "state_excludefromreporting": "0"},
                    {"school_number": "102", "name": "Lincoln Middle School", "abbreviation": "LMS"}]


def test_a_column_the_plugin_lacks_is_403_naming_it(database, tmp_path):
    plugin = tmp_path / "plugin.xml"
    plugin.write_text(PLUGIN_XML.read_text(encoding="utf-8").replace(
        '<field table="STUDENTS" field="CLASSOF" access="ViewOnly"/>', ""), encoding="utf-8")
    server = start(database, plugin_xml=plugin)
    try:
        answer = session(server).get(f"{server.url}/ws/schema/table/students",
                                     params={"projection": PROJECTION}, timeout=10)
        assert answer.status_code == 403
        body = answer.json()
        assert "No access to the field" in body["message"] and "CLASSOF" in body["message"]
        assert body["errors"][0]["field"].lower() == "classof"
        unknown = session(server).get(f"{server.url}/ws/schema/table/students",
                                      params={"projection": "nickname"}, timeout=10)
        assert unknown.status_code == 400 and "Invalid field" in unknown.json()["message"]
    finally:
        server.stop()


def test_requests_too_soon_are_refused_with_retry_after(database):
    server = start(database, min_interval_ms=60_000)
    try:
        s = session(server)
        assert s.get(f"{server.url}/ws/v1/metadata", timeout=10).status_code == 200
        refused = s.get(f"{server.url}/ws/v1/metadata", timeout=10)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    finally:
        server.stop()


def test_faults(api):
    s = session(api)
    url = f"{api.url}/ws/schema/table/students"
    params = {"projection": PROJECTION, "page": 1, "sort": "id"}
    api.add_fault("status", r"/students$", status=503)
    assert s.get(url, params=params, timeout=10).status_code == 503
    api.add_fault("short", r"/students$", page=1, drop=3)
    assert len(s.get(url, params=params, timeout=10).json()["record"]) == 7
    api.add_fault("html", r"/students$")
    answer = s.get(url, params=params, timeout=10)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/html")
    api.add_fault("expire", r"/students$")
    assert s.get(url, params=params, timeout=10).status_code == 401
    assert s.get(url, params=params, timeout=10).status_code == 401  # the old token stays dead
    assert len(session(api).get(url, params=params, timeout=10).json()["record"]) == 10


def test_requests_are_recorded_without_secrets(api):
    s = session(api)
    s.get(f"{api.url}/ws/v1/metadata", timeout=10)
    records = api.requests
    assert [(r.method, r.path, r.status, r.auth) for r in records] == [
        ("POST", "/oauth/access_token", 200, "Basic"), ("GET", "/ws/v1/metadata", 200, "Bearer")]
    assert api.client_secret not in repr(records)
