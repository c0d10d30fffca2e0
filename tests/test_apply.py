"""The rate limiter and the retry policy, on a fake clock; and writes under injected 429/503."""

from __future__ import annotations

import json

import httplib2
import pytest
from googleapiclient.errors import HttpError

import student_sync
from conftest import WHS_10, email
from testkit.directory_server import FaultPlan


class FakeClock:
    """time.monotonic and time.sleep that only move when somebody sleeps."""

    def __init__(self):
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def http_error(status: int, reason: str = "", body: bytes | None = None) -> HttpError:
    if body is None:
        body = json.dumps({"error": {"code": status, "message": "m",
                                     "errors": [{"reason": reason, "domain": "global", "message": "m"}]}}).encode()
    return HttpError(httplib2.Response({"status": status}), body, uri="http://127.0.0.1/x")


# --- rate limiter -------------------------------------------------------------------------------


def starts_of(limiter: student_sync.RateLimiter, clock: FakeClock, calls: int) -> list[float]:
    starts = []
    for _ in range(calls):
        limiter.acquire()
        starts.append(clock.now)
    return starts


def busiest_second(starts: list[float]) -> int:
    return max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)


def test_limiter_lets_a_small_burst_through_at_once():
    clock = FakeClock()
    limiter = student_sync.RateLimiter(35, clock=clock.clock, sleep=clock.sleep)

    starts = starts_of(limiter, clock, 7)

    assert clock.slept == []
    assert starts == [1000.0] * 7


@pytest.mark.parametrize("rate", [35, 9, 2.5, 0.5])
def test_limiter_never_starts_more_than_the_rate_in_any_second(rate):
    clock = FakeClock()
    limiter = student_sync.RateLimiter(rate, clock=clock.clock, sleep=clock.sleep)

    starts = starts_of(limiter, clock, 200)

    assert busiest_second(starts) <= max(1, int(rate))
    whole_calls = int(rate) if rate >= 1 else rate     # 2.5 a second is 2 in any second
    assert 200 / (starts[-1] - starts[0] + 1 / whole_calls) > whole_calls * 0.9   # and not much fewer


def test_limiter_sustains_its_rate_over_a_long_run():
    clock = FakeClock()
    limiter = student_sync.RateLimiter(35, clock=clock.clock, sleep=clock.sleep)

    starts = starts_of(limiter, clock, 35 * 60)

    observed = len(starts) / (starts[-1] - starts[0] + 1)
    assert 35 / (1 + student_sync.RateLimiter.SLACK) * 0.97 <= observed <= 35


# --- retry policy -------------------------------------------------------------------------------


def policy_on(clock: FakeClock, attempts: int = 6) -> student_sync.RetryPolicy:
    return student_sync.RetryPolicy(attempts=attempts, sleep=clock.sleep, jitter=lambda: 0.5)


class Flaky:
    """A request that fails with the given errors, then answers."""

    def __init__(self, *errors: BaseException):
        self.errors = list(errors)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return {"ok": True}


@pytest.mark.parametrize("error", [
    http_error(429, "rateLimitExceeded"),
    http_error(403, "rateLimitExceeded"),
    http_error(403, "userRateLimitExceeded"),
    http_error(403, "quotaExceeded"),
    http_error(500, "backendError"),
    http_error(503, "backendError"),
    http_error(502, body=b"<html><body>502 Bad Gateway</body></html>"),
    ConnectionResetError(),
    TimeoutError(),
], ids=["429", "403-rate", "403-user-rate", "403-quota", "500", "503", "502-html", "reset", "timeout"])
def test_retryable_answers_are_retried_with_exponential_backoff_and_jitter(error):
    clock = FakeClock()
    request = Flaky(error, error, error)

    assert policy_on(clock).call(request) == {"ok": True}

    assert request.calls == 4
    assert clock.slept == [1.5, 2.5, 4.5]             # 2**n + jitter, n = 0, 1, 2


def test_a_quota_error_with_google_details_is_retried():
    # admin.googleapis.com answers with both `errors` and `details`; googleapiclient keeps
    # only `details` in error_details.
    body = json.dumps({"error": {
        "code": 403, "message": "Quota exceeded", "status": "PERMISSION_DENIED",
        "errors": [{"message": "Quota exceeded", "domain": "usageLimits", "reason": "userRateLimitExceeded"}],
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "RATE_LIMIT_EXCEEDED",
                     "domain": "googleapis.com"}]}}).encode()
    clock = FakeClock()
    request = Flaky(http_error(403, body=body))

    assert policy_on(clock).call(request) == {"ok": True}
    assert request.calls == 2


@pytest.mark.parametrize("error", [
    http_error(400, "invalid"), http_error(404, "notFound"), http_error(409, "duplicate"),
    http_error(403, "forbidden"), http_error(401, "authError"),
], ids=["400", "404", "409", "403-forbidden", "401"])
def test_other_answers_are_not_retried(error):
    clock = FakeClock()
    request = Flaky(error)

    with pytest.raises(HttpError):
        policy_on(clock).call(request)

    assert request.calls == 1
    assert clock.slept == []


def test_retries_stop_after_the_last_attempt_and_the_error_propagates():
    clock = FakeClock()
    request = Flaky(*[http_error(503, "backendError")] * 10)

    with pytest.raises(HttpError) as raised:
        policy_on(clock, attempts=5).call(request)

    assert raised.value.status_code == 503
    assert request.calls == 5
    assert clock.slept == [1.5, 2.5, 4.5, 8.5]


def test_backoff_is_capped():
    policy = student_sync.RetryPolicy(max_delay=32, jitter=lambda: 1.0)
    assert [policy.delay(n) for n in range(8)] == [2, 3, 5, 9, 17, 33, 33, 33]


def test_a_refused_connection_fails_fast():
    clock = FakeClock()
    request = Flaky(*[ConnectionRefusedError()] * 10)

    with pytest.raises(ConnectionRefusedError):
        policy_on(clock).call(request)

    assert request.calls == student_sync.RetryPolicy().refused_attempts


def test_every_attempt_is_counted_in_every_rate_limiter_at_the_moment_it_is_sent():
    clock = FakeClock()
    overall = student_sync.RateLimiter(35, clock=clock.clock, sleep=clock.sleep)
    creates = student_sync.RateLimiter(1, clock=clock.clock, sleep=clock.sleep)
    policy = student_sync.RetryPolicy(sleep=clock.sleep, jitter=lambda: 0, limiter=overall)
    sent = []
    request = Flaky(http_error(503, "backendError"))

    def send():
        sent.append(clock.now)
        return request()

    policy.call(send, limiters=(creates,))

    assert len(sent) == 2 and sent[1] >= sent[0] + 1.0        # the second try waited for the create limit
    assert list(overall._granted) == sent and creates._granted[-1] == sent[-1]   # counted when sent


def test_an_unexpected_transport_error_fails_one_student_and_the_rest_is_applied_and_journalled(
        sync, monkeypatch):
    sync.student(8101, grade=10)
    sync.account(8101)
    for number in range(8102, 8110):
        sync.student(number, grade=10)
        sync.account(number)
    real_request = httplib2.Http.request

    def request(self, uri, method="GET", *args, **kwargs):
        if method == "PUT" and "8101%40" in uri:
            raise httplib2.ServerNotFoundError("Unable to find the server")
        return real_request(self, uri, method, *args, **kwargs)

    monkeypatch.setattr(httplib2.Http, "request", request)
    result = sync.run("--all")

    assert result.code == 1, result.output
    assert "8101" in result.output and "ServerNotFoundError" in result.output
    journals = list((sync.folder / "logs").glob("journal-*.jsonl"))
    entries = [json.loads(line) for line in journals[0].read_text().splitlines()]
    assert sorted(e["student_number"] for e in entries) == list(range(8101, 8110))
    assert {e["result"] for e in entries if e["student_number"] != 8101} == {"applied"}
    for number in range(8102, 8110):
        assert sync.server.user(email(number))["orgUnitPath"] == WHS_10


# --- end to end: every change lands although the server answers 429/503 for a share of writes --


def test_run_applies_every_change_while_the_server_sheds_load(sync, no_backoff):
    for number in range(8000, 8070):
        sync.student(number, grade=10)
        sync.account(number)                 # 9th-grade OU: every one moves
    for number in range(8070, 8100):
        sync.student(number, grade=10)       # new: created
    # About one answer in seven refused: six refused tries in a row is one change in 90,000.
    sync.server.faults = FaultPlan(rate=0.15, statuses=(429, 503, "403-userRateLimitExceeded"),
                                   only_writes=True, seed=4)

    result = sync.run("--all")

    assert result.code == 0, result.output
    refused = [r for r in sync.server.requests if r.status in (403, 429, 503)]
    assert len(refused) >= 5
    for number in range(8000, 8100):
        user = sync.server.user(email(number))
        assert user is not None and user["orgUnitPath"] == WHS_10, number
