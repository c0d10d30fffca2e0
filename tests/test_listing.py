"""Reading the whole domain from both ends of the email order, against servers that behave oddly.

The local Directory API server sorts as Python does; these stand-ins for other servers
sort by other rules, ignore the order asked for, or ignore the page token.  Whatever
they do, the listing must return every account or stop with an error, never loop.
"""

from __future__ import annotations

import threading
import time

import pytest

import student_sync
from conftest import make_settings

SETTINGS = make_settings()


class Users:
    """users.list/list_next of a server with its own idea of order and paging."""

    def __init__(self, emails, *, key=lambda e: e, honours_descending=True, page=3,
                 ignores_token=False):
        self.emails, self.key, self.page = list(emails), key, page
        self.honours_descending, self.ignores_token = honours_descending, ignores_token

    def list(self, **query):
        descending = query.get("sortOrder") == "DESCENDING" and self.honours_descending
        return {"order": sorted(self.emails, key=self.key, reverse=descending), "position": 0}

    def list_next(self, request, answer):
        if "nextPageToken" not in answer:
            return None
        position = 0 if self.ignores_token else answer["nextPageToken"]
        return {"order": request["order"], "position": position}


class Client:
    """Answers each page after a delay: the descending stream's pages after `slow_descending`,
    the first pages after `first_pages` = (ascending, descending) seconds (the order in
    which pages arrive is what the meeting of the two streams depends on)."""

    def __init__(self, users: Users, slow_descending: float = 0.0, first_pages=(0.0, 0.0),
                 together: bool = False):
        self.users, self.slow, self.first_pages = users, slow_descending, first_pages
        self.calls = 0
        self._lock = threading.Lock()
        # Both first pages answered at the same instant.
        self._together = threading.Barrier(2, timeout=5) if together else None

    def resource(self, name):
        return self.users

    def call(self, request, *, limiters=()):
        with self._lock:
            self.calls += 1
            if self.calls > 500:
                raise AssertionError("still listing after 500 calls")
        ascending = request["order"][:1] == sorted(request["order"], key=self.users.key)[:1]
        start = request["position"]
        if start == 0:
            time.sleep(self.first_pages[0 if ascending else 1])
            if self._together:
                self._together.wait()
        else:
            time.sleep(0.001 if ascending else self.slow)
        chunk = request["order"][start:start + self.users.page]
        answer = {"users": [{"primaryEmail": e, "name": {"givenName": "A", "familyName": "B"},
                             "suspended": False, "orgUnitPath": "/"} for e in chunk]}
        if start + self.users.page < len(request["order"]):
            answer["nextPageToken"] = start + self.users.page
        return answer


def read(client: Client) -> dict:
    return student_sync.read_accounts(client, SETTINGS)


def addresses(*locals_: str) -> list[str]:
    return [f"{name}@d118.org" for name in locals_]


@pytest.mark.parametrize("slow", [0.0, 0.01, 0.05])
def test_every_account_is_read_and_the_streams_stop_where_they_meet(slow):
    emails = addresses(*(str(n) for n in range(1000, 1100)))
    client = Client(Users(emails, page=10), slow_descending=slow)

    accounts = read(client)

    assert set(accounts) == set(emails)
    assert client.calls <= 10 + 2 + 2     # ten pages, and at most a page past the meeting point each


@pytest.mark.parametrize("first_pages, together", [((0.06, 0.03), False), ((0.03, 0.06), False),
                                                   ((0.0, 0.0), True)])
def test_a_server_that_sorts_otherwise_than_python_loses_no_account(first_pages, together):
    # Sorted by the part before "@": ab, ab.c, ab1; Python, comparing whole addresses,
    # puts "ab.c@" and "ab1@" before "ab@".  When both first pages are in before either
    # stream reads on, comparing addresses would wrongly say the streams have met.
    emails = addresses("a", "ab", "ab.c", "ab1", "b")
    client = Client(Users(emails, key=lambda e: e.split("@")[0], page=2), first_pages=first_pages,
                    together=together)

    assert set(read(client)) == set(emails)


def test_a_server_that_ignores_the_descending_order_is_read_to_the_end_by_one_stream():
    emails = addresses(*(str(n) for n in range(2000, 2040)))
    client = Client(Users(emails, honours_descending=False, page=5))

    assert set(read(client)) == set(emails)


def test_a_server_that_ignores_the_page_token_stops_the_run_instead_of_looping():
    emails = addresses(*(str(n) for n in range(3000, 3010)))
    client = Client(Users(emails, ignores_token=True, page=3))

    with pytest.raises(student_sync.GoogleError, match="repeats itself"):
        read(client)
    assert client.calls < 20


def test_a_domain_of_one_page_is_read_in_one_call_per_stream_at_most():
    emails = addresses("1", "2", "3")
    client = Client(Users(emails, page=500))

    assert set(read(client)) == set(emails)
    assert client.calls <= 2       # the second stream may find the first already done
