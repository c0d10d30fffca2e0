"""The local Enterprise License Manager API (testkit/licensing.py), driven through the real
googleapiclient built from the bundled licensing v1 discovery document."""

from __future__ import annotations

import sys
from pathlib import Path

import httplib2
import pytest
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testkit.directory_server import DirectoryServer, FaultPlan  # noqa: E402

DOMAIN = "d118.org"
PRODUCT, PLUS, STANDARD = "101031", "1010310008", "1010310005"


def licensing_client(srv: DirectoryServer):
    return build("licensing", "v1", static_discovery=True, cache_discovery=False,
                 client_options={"api_endpoint": srv.url}, http=httplib2.Http())


def directory_client(srv: DirectoryServer):
    return build("admin", "directory_v1", static_discovery=True, cache_discovery=False,
                 client_options={"api_endpoint": srv.url}, http=httplib2.Http())


@pytest.fixture
def srv():
    with DirectoryServer(domain=DOMAIN) as server:
        for n in range(1, 8):
            server.add_user(f"{n}@{DOMAIN}", given="Ann", family="Lee", org_unit="/Students")
        yield server


@pytest.fixture
def lic(srv):
    return licensing_client(srv).licenseAssignments()


def failure(request) -> HttpError:
    with pytest.raises(HttpError) as info:
        request.execute()
    return info.value


def reason(error: HttpError) -> str:
    return error.error_details[0]["reason"]


def holders(lic, customer: str, sku: str = PLUS, page: int = 1000) -> list[str]:
    request = lic.listForProductAndSku(productId=PRODUCT, skuId=sku, customerId=customer,
                                       maxResults=page)
    found = []
    while request is not None:
        answer = request.execute()
        found += [item["userId"] for item in answer.get("items", [])]
        request = lic.listForProductAndSku_next(request, answer)
    return found


def test_listing_pages_through_every_holder_in_assignment_order(srv, lic):
    for n in (3, 1, 2, 5, 4):
        srv.licensing.assign(f"{n}@{DOMAIN}", PLUS)
    srv.licensing.assign(f"6@{DOMAIN}", STANDARD)
    assert holders(lic, srv.customer_id, page=2) == [f"{n}@{DOMAIN}" for n in (3, 1, 2, 5, 4)]
    answer = lic.listForProductAndSku(productId=PRODUCT, skuId=PLUS, customerId=srv.customer_id,
                                      maxResults=2).execute()
    item = answer["items"][0]
    assert answer["kind"] == "licensing#licenseAssignmentList" and answer["nextPageToken"]
    assert item["kind"] == "licensing#licenseAssignment"
    assert (item["userId"], item["productId"], item["skuId"]) == (f"3@{DOMAIN}", PRODUCT, PLUS)
    assert item["skuName"] == "Google Workspace for Education Plus" and item["etags"]
    assert item["selfLink"].endswith(f"/product/{PRODUCT}/sku/{PLUS}/user/3@{DOMAIN}")


def test_listing_last_page_has_no_token_and_empty_sku_has_no_items(srv, lic):
    srv.licensing.assign(f"1@{DOMAIN}", PLUS)
    answer = lic.listForProductAndSku(productId=PRODUCT, skuId=PLUS, customerId=srv.customer_id,
                                      maxResults=1).execute()
    assert "nextPageToken" not in answer
    empty = lic.listForProductAndSku(productId=PRODUCT, skuId=STANDARD,
                                     customerId=srv.customer_id).execute()
    assert "items" not in empty and "nextPageToken" not in empty


def test_listing_default_page_is_100_and_at_most_1000(srv, lic):
    for n in range(8, 1210):
        srv.add_user(f"{n}@{DOMAIN}", given="Bo", family="Ng")
    srv.licensing.assign_many([f"{n}@{DOMAIN}" for n in range(8, 1210)], PLUS)
    first = lic.listForProductAndSku(productId=PRODUCT, skuId=PLUS, customerId=srv.customer_id).execute()
    assert len(first["items"]) == 100
    assert len(holders(lic, srv.customer_id)) == 1202
    error = failure(lic.listForProductAndSku(productId=PRODUCT, skuId=PLUS, customerId=srv.customer_id,
                                             maxResults=1001))
    assert error.status_code == 400
    assert srv.count("GET", "/apps/licensing/v1/product/101031/sku/1010310008/users") == 4


def test_listing_takes_the_customer_id_or_the_primary_domain_only(srv, lic):
    srv.licensing.assign(f"1@{DOMAIN}", PLUS)
    assert srv.customer_id.startswith("C0")
    assert holders(lic, srv.customer_id) == holders(lic, DOMAIN) == [f"1@{DOMAIN}"]
    for other in ("C0999999", "other.org", "my_customer"):
        error = failure(lic.listForProductAndSku(productId=PRODUCT, skuId=PLUS, customerId=other))
        assert error.status_code == 403 and reason(error) == "forbidden"


def test_listing_checks_product_sku_and_page_token(srv, lic):
    error = failure(lic.listForProductAndSku(productId="999", skuId=PLUS, customerId=srv.customer_id))
    assert error.status_code == 400 and "productId" in str(error)
    error = failure(lic.listForProductAndSku(productId=PRODUCT, skuId="123", customerId=srv.customer_id))
    assert error.status_code == 400 and "skuId" in str(error)
    error = failure(lic.listForProductAndSku(productId=PRODUCT, skuId=PLUS, customerId=srv.customer_id,
                                             pageToken="garbage!"))
    assert error.status_code == 400


def test_list_for_product_spans_its_skus(srv, lic):
    srv.licensing.assign(f"1@{DOMAIN}", PLUS)
    srv.licensing.assign(f"2@{DOMAIN}", STANDARD)
    srv.licensing.assign(f"3@{DOMAIN}", "1010370001")
    answer = lic.listForProduct(productId=PRODUCT, customerId=DOMAIN).execute()
    assert [(i["userId"], i["skuId"]) for i in answer["items"]] == [
        (f"1@{DOMAIN}", PLUS), (f"2@{DOMAIN}", STANDARD)]


def test_fields_mask_on_the_listing(srv, lic):
    srv.licensing.assign(f"1@{DOMAIN}", PLUS)
    srv.licensing.assign(f"2@{DOMAIN}", PLUS)
    answer = lic.listForProductAndSku(productId=PRODUCT, skuId=PLUS, customerId=srv.customer_id,
                                      maxResults=1, fields="nextPageToken,items(userId)").execute()
    assert answer == {"items": [{"userId": f"1@{DOMAIN}"}], "nextPageToken": answer["nextPageToken"]}
    error = failure(lic.listForProductAndSku(productId=PRODUCT, skuId=PLUS, customerId=srv.customer_id,
                                             fields="items(nonsense)"))
    assert error.status_code == 400


def test_insert_get_and_delete(srv, lic):
    created = lic.insert(productId=PRODUCT, skuId=PLUS, body={"userId": f"1@{DOMAIN}"}).execute()
    assert (created["userId"], created["skuId"]) == (f"1@{DOMAIN}", PLUS)
    assert srv.licensing.holds(f"1@{DOMAIN}", PLUS)
    got = lic.get(productId=PRODUCT, skuId=PLUS, userId=f"1@{DOMAIN}").execute()
    assert got["userId"] == f"1@{DOMAIN}"
    lic.delete(productId=PRODUCT, skuId=PLUS, userId=f"1@{DOMAIN}").execute()
    assert srv.licensing.holders(PLUS) == set()
    assert [(r.method, r.status) for r in srv.requests] == [("POST", 200), ("GET", 200), ("DELETE", 204)]
    assert srv.requests[0].body == {"userId": f"1@{DOMAIN}"}


def test_user_ids_are_primary_emails_case_insensitive(srv, lic):
    lic.insert(productId=PRODUCT, skuId=PLUS, body={"userId": f"1@{DOMAIN.upper()}"}).execute()
    assert holders(lic, srv.customer_id) == [f"1@{DOMAIN}"]
    lic.delete(productId=PRODUCT, skuId=PLUS, userId=f"1@{DOMAIN.upper()}").execute()
    assert not srv.licensing.holders(PLUS)


def test_licence_not_held_answers_404(srv, lic):
    for request in (lic.get(productId=PRODUCT, skuId=PLUS, userId=f"1@{DOMAIN}"),
                    lic.delete(productId=PRODUCT, skuId=PLUS, userId=f"1@{DOMAIN}"),
                    lic.delete(productId=PRODUCT, skuId=PLUS, userId=f"nobody@{DOMAIN}")):
        error = failure(request)
        assert error.status_code == 404 and reason(error) == "notFound"
        assert "does not have a license" in str(error)


def test_insert_of_a_held_licence_answers_409(srv, lic):
    srv.licensing.assign(f"1@{DOMAIN}", PLUS)
    error = failure(lic.insert(productId=PRODUCT, skuId=PLUS, body={"userId": f"1@{DOMAIN}"}))
    assert error.status_code == 409 and reason(error) == "duplicate"
    assert srv.licensing.in_use(PLUS) == 1


def test_insert_checks_user_and_body(srv, lic):
    error = failure(lic.insert(productId=PRODUCT, skuId=PLUS, body={"userId": f"nobody@{DOMAIN}"}))
    assert error.status_code == 404
    error = failure(lic.insert(productId=PRODUCT, skuId=PLUS, body={}))
    assert error.status_code == 400
    error = failure(lic.insert(productId=PRODUCT, skuId=PLUS, body={"userId": f"1@{DOMAIN}", "sku": "x"}))
    assert error.status_code == 400
    assert not srv.licensing.holders(PLUS)


def test_seat_limit_answers_out_of_seats(srv, lic):
    srv.licensing.seats[PLUS] = 2
    srv.licensing.assign(f"1@{DOMAIN}", PLUS)
    lic.insert(productId=PRODUCT, skuId=PLUS, body={"userId": f"2@{DOMAIN}"}).execute()
    error = failure(lic.insert(productId=PRODUCT, skuId=PLUS, body={"userId": f"3@{DOMAIN}"}))
    assert error.status_code == 412 and reason(error) == "conditionNotMet"
    assert "enough available licenses" in error.error_details[0]["message"]
    lic.insert(productId=PRODUCT, skuId=STANDARD, body={"userId": f"3@{DOMAIN}"}).execute()
    lic.delete(productId=PRODUCT, skuId=PLUS, userId=f"1@{DOMAIN}").execute()
    lic.insert(productId=PRODUCT, skuId=PLUS, body={"userId": f"3@{DOMAIN}"}).execute()
    assert srv.licensing.holders(PLUS) == {f"2@{DOMAIN}", f"3@{DOMAIN}"}


def test_automatic_licence_cannot_be_deleted(srv, lic):
    srv.licensing.assign(f"1@{DOMAIN}", PLUS, auto=True)
    error = failure(lic.delete(productId=PRODUCT, skuId=PLUS, userId=f"1@{DOMAIN}"))
    assert error.status_code == 412 and reason(error) == "conditionNotMet"
    assert error.error_details[0]["message"] == "Auto License un-assignment is not allowed."
    assert srv.licensing.holds(f"1@{DOMAIN}", PLUS)
    srv.licensing.auto_license = True  # the whole customer on automatic licensing
    lic.insert(productId=PRODUCT, skuId=PLUS, body={"userId": f"2@{DOMAIN}"}).execute()
    assert failure(lic.delete(productId=PRODUCT, skuId=PLUS, userId=f"2@{DOMAIN}")).status_code == 412


def test_token_without_the_licensing_scope(srv, lic):
    srv.licensing.scope_granted = False
    error = failure(lic.listForProductAndSku(productId=PRODUCT, skuId=PLUS, customerId=srv.customer_id))
    assert error.status_code == 403
    assert "insufficient authentication scopes" in str(error)
    assert b"ACCESS_TOKEN_SCOPE_INSUFFICIENT" in error.content
    assert directory_client(srv).users().list(domain=DOMAIN).execute()["users"]  # Directory still answers


def test_licence_follows_a_renamed_account(srv, lic):
    srv.licensing.assign(f"1@{DOMAIN}", PLUS)
    directory_client(srv).users().update(userKey=f"1@{DOMAIN}", body={"primaryEmail": f"11@{DOMAIN}"}).execute()
    assert holders(lic, srv.customer_id) == [f"11@{DOMAIN}"]


def test_faults_and_request_record_cover_licensing_calls(srv, lic):
    srv.faults = FaultPlan(rate=1.0, statuses=(503,), only_writes=True, seed=1)
    error = failure(lic.insert(productId=PRODUCT, skuId=PLUS, body={"userId": f"1@{DOMAIN}"}))
    assert error.status_code == 503
    assert not srv.licensing.holders(PLUS)
    assert holders(lic, srv.customer_id) == []  # reads are not faulted with only_writes
    srv.faults = FaultPlan(applied_then_error_rate=1.0, seed=1)
    assert failure(lic.insert(productId=PRODUCT, skuId=PLUS, body={"userId": f"1@{DOMAIN}"})).status_code == 503
    assert srv.licensing.holds(f"1@{DOMAIN}", PLUS)  # applied, then the answer was lost
    assert [r.status for r in srv.requests] == [503, 200, 503]


def test_users_list_gives_the_customer_id_asked_for_in_fields(srv):
    answer = directory_client(srv).users().list(domain=DOMAIN, maxResults=1,
                                                fields="users(primaryEmail,customerId)").execute()
    assert answer["users"][0]["customerId"] == srv.customer_id
