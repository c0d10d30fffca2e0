"""Benchmark student_sync end to end against the local Directory API server.

For each scenario the benchmark builds a synthetic district of N students (a SQLite
PowerSchool copy, and the testkit Directory API server running in this process on
loopback with a fixed latency per request), writes a settings file, and runs the real
command line as the nightly scheduled task does, ``python sync_all.py --config FILE``
(that is ``student_sync.py --all``), as a child process, with Python's bytecode cache on
as on a district's server. It
reports the wall time of the whole process (start-up and imports included), the
child's peak memory, and what the server saw: Directory calls by method, write rates
and the busiest second.

Scenarios:

  no-change   every account already in step: a nightly run with nothing to do.
              Compared with a baseline child that makes one users.get per student,
              as the tool this one replaces did.
  changed     ``--changed-share`` (1 %) of the accounts need a move, a rename or a
              suspension, a third each (a suspension also lists the account's groups).
  updates     ``--updates`` (1,000) accounts need a move or a rename: the write rate.
  provision   first run: no account exists, every student is created.
  mixed       ``--updates`` (1,000) accounts need a move, a rename or a create, a third each:
              creates mixed in with updates, each create under both rate limits.

Usage::

    python bench/bench_sync.py --students 2000 --latency-ms 20 --scenario no-change
    python bench/bench_sync.py --students 1000 --latency-ms 100 --scenario provision
    python bench/bench_sync.py --students 2000 --latency-ms 20 --scenario mixed
    python bench/bench_sync.py --students 5000 --latency-ms 100 --scenario changed \
        --changed-share 0.2

Rates come from the server's record: each call is stamped when the server starts
handling it (before the simulated latency). "writes/s" is the number of intervals
between the first and the last write divided by that time; "peak in 1 s" is the most
calls whose stamps fit in any window [t, t + 1 s).

Standard library and the project's own test kit only; the baseline child imports
googleapiclient, like student_sync. Every child is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlencode, urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testkit.directory_server import DirectoryServer, Recorded  # noqa: E402
from testkit.district import (  # noqa: E402
    CATEGORY, DOMAIN, SUFFIX, build_synthetic_district, write_settings)

TOOL = ROOT / "sync_all.py"   # what the nightly scheduled task runs
MEASURE = Path(__file__).resolve().parent / "measure_child.py"
BASELINE = Path(__file__).resolve().parent / "baseline_get_per_student.py"
SCENARIOS = ("no-change", "changed", "updates", "provision", "mixed")
SPEC_MAX_RPS = 35.0            # SPEC section 5 defaults
SPEC_MAX_CREATES = 9.0
GOOGLE_CREATES_PER_SECOND = 10
BENCH_PASSWORD = "Bench-Password-2026"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
API = "/admin/directory/v1/"
# The users.list mask student_sync asks for; used by the page-time probe.
LIST_FIELDS = ("nextPageToken,users(primaryEmail,name(givenName,familyName),suspended,"
               "orgUnitPath,customSchemas)")


# --------------------------------------------------------------------------------------------
# Child processes: wall time, exit code, peak RSS
# --------------------------------------------------------------------------------------------


@dataclass
class ChildRun:
    exit_code: int | None          # None: killed at the timeout
    wall_s: float
    peak_rss_mb: float | None      # None: not measurable on this platform
    output_tail: list[str]
    stdout: str = ""
    started_at: float = 0.0        # time.monotonic() at spawn: the server's clock

    @property
    def timed_out(self) -> bool:
        return self.exit_code is None


def _rss_mb(ru_maxrss: int) -> float:
    # Linux reports kilobytes, macOS bytes.
    return ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else ru_maxrss / 1024


def run_child(command: Sequence[str], *, cwd: Path, env: dict[str, str], timeout: float,
              log_name: str) -> ChildRun:
    """Run one child, timing it from spawn to exit; kill it after ``timeout`` seconds.

    Where the platform tells a process's peak memory (os.wait4), the child is started
    through ``measure_child.py``: its peak RSS is then its own, neither the maximum over
    every child the benchmark ran nor the benchmark's memory that a fork would charge it.
    """
    out_path, err_path = cwd / f"{log_name}.out", cwd / f"{log_name}.err"
    report_path = cwd / f"{log_name}.measure.json"
    measured = hasattr(os, "wait4")
    full = [sys.executable, str(MEASURE), str(report_path), *command] if measured else list(command)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started_at = time.monotonic()
        started = time.perf_counter()
        process = subprocess.Popen(full, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=err, start_new_session=measured)
    exit_code: int | None
    rss: float | None = None
    try:
        process.wait(timeout=timeout)
        wall = time.perf_counter() - started
        exit_code = process.returncode
        if measured:
            report = json.loads(report_path.read_text(encoding="utf-8"))
            exit_code, wall = report["exit_code"], report["wall_s"]
            rss = _rss_mb(report["ru_maxrss"])
    except subprocess.TimeoutExpired:
        if measured:
            os.killpg(process.pid, signal.SIGKILL)  # the measured grandchild too
        else:
            process.kill()
        process.wait()
        wall, exit_code = time.perf_counter() - started, None
    stdout = out_path.read_text(encoding="utf-8", errors="replace")
    text = stdout + err_path.read_text(encoding="utf-8", errors="replace")
    tail = [line for line in text.splitlines() if line.strip()][-4:]
    return ChildRun(exit_code, wall, rss, tail, stdout, started_at)


# --------------------------------------------------------------------------------------------
# What the server saw
# --------------------------------------------------------------------------------------------


def method_name(record: Recorded) -> str:
    """The discovery document's method name for a recorded call (``users.list``...)."""
    if not record.path.startswith(API):
        return f"{record.method} {record.path}"
    seg = record.path[len(API):].split("/")
    verb = record.method
    if seg[0] == "users" and len(seg) == 1:
        return {"GET": "users.list", "POST": "users.insert"}.get(verb, f"users {verb}")
    if seg[0] == "users" and len(seg) == 2:
        return {"GET": "users.get", "PUT": "users.update", "PATCH": "users.patch",
                "DELETE": "users.delete"}.get(verb, f"users {verb}")
    if seg[0] == "groups" and len(seg) == 1:
        return "groups.list" if verb == "GET" else f"groups {verb}"
    if seg[0] == "groups" and len(seg) >= 3 and seg[2] == "members":
        return {"DELETE": "members.delete", "GET": "members.get" if len(seg) > 3
                else "members.list"}.get(verb, f"members {verb}")
    if seg[0] == "customer" and len(seg) >= 3:
        kind = seg[2]
        if kind in ("orgunits", "schemas") and verb == "GET":
            return f"{kind}.list" if len(seg) == 3 else f"{kind}.get"
    return f"{verb} {record.path}"


def is_write(record: Recorded) -> bool:
    return record.method in WRITE_METHODS


@dataclass(frozen=True)
class Peak:
    """The most calls stamped inside any half-open window [t, t + 1 s), and the time from
    the first to the last of them."""

    count: int = 0
    span_s: float = 0.0

    def describe(self) -> str:
        return f"{self.count}" + (f" (within {self.span_s:.3f} s)" if self.count > 1 else "")

    def verdict(self, limit: float) -> str:
        """ok, MISSED, or "edge": one over the limit, yet spread at the limit's own spacing.

        A limiter that starts calls exactly 1/r s apart puts the first and the (r+1)-th
        exactly 1 s apart, so the slightest jitter in the server's stamps (loopback, thread
        scheduling) lets all r + 1 fall inside one half-open 1 s window. Two or more over
        the limit, or calls closer together than 1/r on average, is a real burst."""
        if self.count <= limit:
            return "ok"
        if self.count == math.floor(limit) + 1 and self.span_s >= (self.count - 1) / limit * 0.98:
            return "edge (one over, at the limiter's own spacing: jitter, not a burst)"
        return "MISSED"


def peak_in_window(stamps: Iterable[float], width: float = 1.0) -> Peak:
    """The busiest half-open window [t, t + width)."""
    times = sorted(stamps)
    best, left = Peak(), 0
    for right, stamp in enumerate(times):
        while stamp - times[left] >= width:
            left += 1
        if right - left + 1 > best.count:
            best = Peak(right - left + 1, stamp - times[left])
    return best


def sustained_rate(stamps: Sequence[float]) -> float | None:
    """Intervals per second between the first and the last stamp (None for < 2 stamps)."""
    if len(stamps) < 2:
        return None
    span = max(stamps) - min(stamps)
    return (len(stamps) - 1) / span if span > 0 else None


@dataclass
class Traffic:
    by_method: Counter
    calls: int                      # API calls
    writes: int
    creates: int
    errors: Counter                 # status -> count, for answers >= 400
    writes_per_s: float | None
    peak_writes_1s: Peak
    peak_creates_1s: Peak
    peak_calls_1s: Peak
    write_span_s: float | None
    timeline: dict[str, float]      # event -> seconds after the child was spawned
    apply_calls_per_s: float | None  # every call from the first write to the last: writes and
                                     # the group look-ups that suspensions need

    @classmethod
    def of(cls, records: Sequence[Recorded], spawned: float) -> "Traffic":
        names = [method_name(r) for r in records]
        calls = list(records)
        writes = [r.time for r in calls if r.method in WRITE_METHODS]
        creates = [r.time for r, n in zip(records, names) if n == "users.insert"]
        lists = [r.time for r, n in zip(records, names) if n in ("users.list", "orgunits.list")]
        events = {"first call": min((r.time for r in calls), default=None),
                  "last list call": max(lists, default=None),
                  "first write": min(writes, default=None),
                  "last write": max(writes, default=None)}
        return cls(
            timeline={k: v - spawned for k, v in events.items() if v is not None},
            by_method=Counter(names),
            calls=len(calls), writes=len(writes),
            creates=len(creates),
            errors=Counter(r.status for r in calls if r.status >= 400),
            writes_per_s=sustained_rate(writes),
            peak_writes_1s=peak_in_window(writes), peak_creates_1s=peak_in_window(creates),
            peak_calls_1s=peak_in_window(r.time for r in calls),
            write_span_s=(max(writes) - min(writes)) if len(writes) > 1 else None,
            apply_calls_per_s=sustained_rate(sorted(
                r.time for r in calls if writes and min(writes) <= r.time <= max(writes))))

    def describe_methods(self) -> str:
        order = ["users.list", "orgunits.list", "schemas.list", "users.get", "groups.list",
                 "users.update", "users.patch", "users.insert", "members.delete"]
        shown = [m for m in order if m in self.by_method or m in
                 ("users.list", "orgunits.list", "users.update", "users.insert", "groups.list")]
        shown += sorted(m for m in self.by_method if m not in order)
        return ", ".join(f"{m} {self.by_method.get(m, 0)}" for m in shown)


# --------------------------------------------------------------------------------------------
# Server-side page time
# --------------------------------------------------------------------------------------------


def probe_list_pages(server: DirectoryServer, pages: int) -> dict[str, float] | None:
    """Median time to serve a users.list page of 500 with student_sync's fields mask, over
    loopback HTTP with the simulated latency switched off: the server's own cost."""
    if pages <= 0:
        return None
    split = urlsplit(server.url)
    saved_latency = server.latency_ms
    server.latency_ms = 0
    connection = http.client.HTTPConnection(split.hostname, split.port, timeout=60)
    results: dict[str, float] = {}
    try:
        for order in ("ASCENDING", "DESCENDING"):
            query = {"domain": DOMAIN, "maxResults": 500, "projection": "custom",
                     "customFieldMask": CATEGORY, "fields": LIST_FIELDS, "orderBy": "email",
                     "sortOrder": order, "alt": "json"}
            token, times = None, []
            for _ in range(pages + 1):  # the first page may build the server's index
                target = API + "users?" + urlencode(
                    {**query, **({"pageToken": token} if token else {})})
                started = time.perf_counter()
                connection.request("GET", target)
                response = connection.getresponse()
                body = response.read()
                times.append(time.perf_counter() - started)
                if response.status != 200:
                    return None
                token = json.loads(body).get("nextPageToken")
                if not token:
                    break
            steady = times[1:] or times
            results[order] = statistics.median(steady) * 1000
    finally:
        connection.close()
        server.latency_ms = saved_latency
    return results


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    students: int
    latency_ms: float
    max_rps: float
    max_creates: float
    run: ChildRun | None = None
    traffic: Traffic | None = None
    baseline_s: float | None = None
    baseline_note: str = ""
    page_ms: dict[str, float] | None = None
    build_s: float = 0.0
    skipped: str = ""
    repeat_note: str = ""
    checks: list[tuple[str, str]] = field(default_factory=list)

    @property
    def speed_up(self) -> float | None:
        if self.baseline_s and self.run and not self.run.timed_out and self.run.wall_s > 0:
            return self.baseline_s / self.run.wall_s
        return None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NEW_USER_PASSWORD"] = BENCH_PASSWORD
    env.setdefault("PYTHONIOENCODING", "utf-8")
    # As on a district's server: Python keeps compiled modules between runs.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _warm_up() -> None:
    """Compile and cache student_sync once, as the first scheduled run would."""
    subprocess.run([sys.executable, "-c", "import student_sync"], cwd=ROOT, env=_child_env(),
                   check=True, timeout=120)


def _settings(folder: Path, server: DirectoryServer, database: Path,
              args: argparse.Namespace) -> Path:
    return write_settings(folder / "student_sync.toml", server.url, {
        "powerschool": {"sqlite": str(database)},
        "google": {"max_requests_per_second": args.max_rps,
                   "max_creates_per_second": args.max_creates_per_second},
        # A benchmark measures throughput: the suspensions of a large "changed" district
        # must not trip the safety stop (exit 3) before any write.
        "safety": {"max_suspensions": max(100, args.students)},
        "logging": {"dir": str(folder / "logs")},
    })


def _baseline(server: DirectoryServer, folder: Path, database: Path, students: int,
              args: argparse.Namespace) -> tuple[float | None, str]:
    """Wall time of the one-get-per-student child; extrapolated when a full run would
    exceed ``--baseline-budget`` (start-up measured once, gets scaled linearly)."""
    per_get = args.latency_ms / 1000 + 0.003
    limit = 0
    if students * per_get > args.baseline_budget:
        limit = max(100, int(args.baseline_budget / per_get))
    command = [sys.executable, str(BASELINE), "--endpoint", server.url, "--sqlite",
               str(database), "--suffix", SUFFIX]
    if limit:
        command += ["--limit", str(limit)]
    server.clear_requests()
    run = run_child(command, cwd=folder, env=_child_env(),
                    timeout=args.baseline_budget * 2 + 120, log_name="baseline")
    if run.timed_out or run.exit_code != 0:
        return None, f"baseline child failed (exit {run.exit_code}): {' / '.join(run.output_tail)}"
    if not limit:
        return run.wall_s, f"{students:,} users.get, projection=full, one at a time"
    report = json.loads(run.stdout.strip().splitlines()[-1])
    estimate = run.wall_s - report["gets_s"] + report["gets_s"] * students / report["gets"]
    return estimate, (f"estimated: {report['gets']:,} users.get took {report['gets_s']:.1f} s "
                      f"(+{run.wall_s - report['gets_s']:.1f} s start-up), scaled to "
                      f"{students:,}")


def _ok(condition: bool) -> str:
    return "ok" if condition else "MISSED"


def _checks(result: Result) -> list[tuple[str, str]]:
    """The performance targets this benchmark is meant to show, with a verdict each."""
    run, traffic, n = result.run, result.traffic, result.students
    if run is None or traffic is None or run.timed_out:
        return [("finished before --timeout", "MISSED")]
    checks = [("exit code 0", _ok(run.exit_code == 0))]
    if result.scenario == "no-change":
        limit = math.ceil(n / 500) + 10
        checks.append((f"calls <= ceil(N/500)+10 = {limit}", _ok(traffic.calls <= limit)))
        checks.append(("no writes", _ok(traffic.writes == 0)))
        if result.speed_up is not None:
            checks.append(("speed-up >= 100x over one get per student",
                           _ok(result.speed_up >= 100)))
        if n >= 100_000:
            checks.append(("read + plan (whole run) < 15 s", _ok(run.wall_s < 15)))
            if run.peak_rss_mb is not None:
                checks.append(("peak RSS < 300 MB", _ok(run.peak_rss_mb < 300)))
    else:
        checks.append((f"peak writes in 1 s <= {result.max_rps:g} (configured)",
                       traffic.peak_writes_1s.verdict(result.max_rps)))
        checks.append((f"peak calls in 1 s <= {result.max_rps:g} (configured)",
                       traffic.peak_calls_1s.verdict(result.max_rps)))
        checks.append((f"peak creates in 1 s <= {result.max_creates:g} (configured)",
                       traffic.peak_creates_1s.verdict(result.max_creates)))
        checks.append((f"peak creates in 1 s <= {GOOGLE_CREATES_PER_SECOND} (Google)",
                       traffic.peak_creates_1s.verdict(GOOGLE_CREATES_PER_SECOND)))
        if result.scenario == "updates" and traffic.writes >= 500:
            checks.append(("writes/s >= 30 sustained", _ok(
                traffic.writes_per_s is not None and traffic.writes_per_s >= 30)))
        if result.scenario == "changed" and traffic.writes >= 500:
            # A suspension first lists the account's groups: that read shares the quota.
            checks.append(("calls/s while applying >= 30 (writes + group look-ups)", _ok(
                traffic.apply_calls_per_s is not None and traffic.apply_calls_per_s >= 30)))
    return checks


def run_scenario(scenario: str, args: argparse.Namespace, workdir: Path) -> Result:
    result = Result(scenario, args.students, args.latency_ms, args.max_rps,
                    args.max_creates_per_second)
    if scenario == "provision":
        needed = args.students / args.max_creates_per_second
        if needed > args.timeout:
            result.skipped = (f"creating {args.students:,} accounts at "
                              f"{args.max_creates_per_second:g}/s needs about {needed:,.0f} s, "
                              f"more than --timeout {args.timeout:g} s")
            return result
    folder = Path(tempfile.mkdtemp(prefix=f"bench-{scenario}-", dir=workdir))
    server = DirectoryServer(domain=DOMAIN, latency_ms=args.latency_ms)
    try:
        started = time.perf_counter()
        share = {"changed": args.changed_share, "updates": min(1.0, args.updates / args.students),
                 "mixed": min(1.0, args.updates / args.students)}.get(scenario, 0.0)
        kinds = {"updates": ("move", "rename"), "mixed": ("move", "rename", "create")}.get(
            scenario, ("move", "rename", "suspend"))
        database = build_synthetic_district(folder, server, args.students, changed_share=share,
                                            provisioned=scenario != "provision", kinds=kinds)
        result.build_s = time.perf_counter() - started
        # The directory lives as long as the scenario: keep the collector from walking
        # hundreds of thousands of its objects while the server answers.
        gc.collect()
        gc.freeze()
        server.start()
        config = _settings(folder, server, database, args)
        server.clear_requests()
        command = [sys.executable, str(TOOL), "--config", str(config)]
        result.run = run_child(command, cwd=folder, env=_child_env(), timeout=args.timeout,
                               log_name="student_sync")
        result.traffic = Traffic.of(server.requests, result.run.started_at)
        if scenario == "no-change" and args.repeat > 1:
            # Nothing changes between runs: time it again, and report the median, so that
            # one slow start-up on a busy machine does not decide the figure.
            walls = [result.run.wall_s]
            for _ in range(args.repeat - 1):
                again = run_child(command, cwd=folder, env=_child_env(), timeout=args.timeout,
                                  log_name="student_sync")
                walls.append(again.wall_s)
            result.run.wall_s = statistics.median(walls)
            result.repeat_note = (f"median of {len(walls)} runs: "
                                  + ", ".join(f"{w:.2f}" for w in sorted(walls)) + " s")
        if scenario == "no-change" and args.baseline:
            result.baseline_s, result.baseline_note = _baseline(
                server, folder, database, args.students, args)
        if scenario == "no-change":
            result.page_ms = probe_list_pages(server, args.probe_pages)
        result.checks = _checks(result)
        return result
    finally:
        server.stop()
        del server
        gc.unfreeze()
        gc.collect()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"  (kept {folder})")


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{suffix}"


def print_result(result: Result) -> None:
    head = (f"== {result.scenario}: {result.students:,} students, {result.latency_ms:g} ms "
            f"latency, limits {result.max_rps:g} requests/s and {result.max_creates:g} creates/s")
    print(head + " ==")
    if result.skipped:
        print(f"  skipped: {result.skipped}\n")
        return
    run, traffic = result.run, result.traffic
    assert run is not None and traffic is not None
    code = "killed at --timeout" if run.timed_out else str(run.exit_code)
    print(f"  district built in          {result.build_s:.1f} s (not timed)")
    print(f"  exit code                  {code}")
    print(f"  wall                       {run.wall_s:.2f} s (whole process, start-up included)"
          + (f"; {result.repeat_note}" if result.repeat_note else ""))
    if traffic.timeline:
        events = [f"{event} {at:.2f}" for event, at in traffic.timeline.items()]
        print("  timeline (s after spawn)   " + ", ".join(events + [f"exit {run.wall_s:.2f}"])
              + " (call stamps are starts)")
    print(f"  peak RSS of the child      {_num(run.peak_rss_mb, 1, ' MB')}")
    print(f"  Directory calls            {traffic.calls:,}: {traffic.describe_methods()}")
    errors = ", ".join(f"{status} x{count}" for status, count in sorted(traffic.errors.items()))
    print(f"  error answers              {errors or 'none'}")
    print(f"  writes                     {traffic.writes:,}"
          + (f" over {traffic.write_span_s:.1f} s" if traffic.write_span_s else ""))
    print(f"  writes/s                   {_num(traffic.writes_per_s)}")
    print(f"  calls/s while applying     {_num(traffic.apply_calls_per_s)} (writes and the reads between them)")
    print(f"  peak writes in 1 s         {traffic.peak_writes_1s.describe()} "
          f"(limit {result.max_rps:g})")
    print(f"  peak creates in 1 s        {traffic.peak_creates_1s.describe()} "
          f"(limit {result.max_creates:g}; Google allows {GOOGLE_CREATES_PER_SECOND})")
    print(f"  peak calls in 1 s          {traffic.peak_calls_1s.describe()} "
          f"(limit {result.max_rps:g})")
    if result.scenario == "no-change":
        if result.baseline_s is not None:
            print(f"  baseline                   {result.baseline_s:.2f} s "
                  f"({result.baseline_note})")
            print(f"  speed-up                   {_num(result.speed_up)}x")
        elif result.baseline_note:
            print(f"  baseline                   {result.baseline_note}")
        if result.page_ms:
            print("  server users.list page     " + ", ".join(
                f"{order.lower()} {ms:.1f} ms" for order, ms in result.page_ms.items())
                + " (pages of up to 500, fields mask, HTTP, no latency: server cost)")
    for line in run.output_tail:
        print(f"  | {line[:150]}")
    for text, ok in result.checks:
        print(f"  target: {text:<48} {ok}")
    print()


def markdown_table(results: Sequence[Result]) -> str:
    lines = ["| scenario | students | latency | calls | wall s | writes/s | peak writes in 1 s "
             "| peak RSS MB | baseline s | speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r.skipped or r.run is None or r.traffic is None:
            lines.append(f"| {r.scenario} | {r.students:,} | {r.latency_ms:g} ms | skipped "
                         "| | | | | | |")
            continue
        wall = "timeout" if r.run.timed_out else f"{r.run.wall_s:.2f}"
        baseline = "" if r.baseline_s is None else (
            f"{r.baseline_s:.1f}" + (" (est.)" if r.baseline_note.startswith("estimated") else ""))
        speed = "" if r.speed_up is None else f"{r.speed_up:,.0f}x"
        lines.append(
            f"| {r.scenario} | {r.students:,} | {r.latency_ms:g} ms | {r.traffic.calls:,} "
            f"| {wall} | {_num(r.traffic.writes_per_s)} | {r.traffic.peak_writes_1s.count} "
            f"| {_num(r.run.peak_rss_mb)} | {baseline} | {speed} |")
    return "\n".join(lines)


def _as_json(result: Result) -> dict[str, Any]:
    data: dict[str, Any] = {"scenario": result.scenario, "students": result.students,
                            "latency_ms": result.latency_ms, "max_rps": result.max_rps,
                            "max_creates_per_second": result.max_creates,
                            "skipped": result.skipped or None}
    if result.run and result.traffic:
        t = result.traffic
        data.update(exit_code=result.run.exit_code, wall_s=result.run.wall_s,
                    peak_rss_mb=result.run.peak_rss_mb, calls=t.calls,
                    calls_by_method=dict(t.by_method), writes=t.writes, creates=t.creates,
                    writes_per_s=t.writes_per_s, peak_writes_1s=t.peak_writes_1s.count,
                    peak_writes_1s_span_s=t.peak_writes_1s.span_s,
                    peak_creates_1s=t.peak_creates_1s.count,
                    peak_calls_1s=t.peak_calls_1s.count,
                    errors={str(k): v for k, v in t.errors.items()},
                    baseline_s=result.baseline_s, baseline_note=result.baseline_note,
                    speed_up=result.speed_up, list_page_ms=result.page_ms,
                    timeline_s=t.timeline,
                    targets={text: ok for text, ok in result.checks})
    return data


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python bench/bench_sync.py",
        description="Time student_sync's command line on synthetic districts against the "
                    "local Directory API server.")
    parser.add_argument("--students", type=int, default=2000, help="students (default 2000)")
    parser.add_argument("--latency-ms", type=float, default=20,
                        help="server latency per request (default 20)")
    parser.add_argument("--scenario", choices=SCENARIOS + ("all",), default="all")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="time one users.get per student too (no-change only; default on)")
    parser.add_argument("--max-rps", type=float, default=SPEC_MAX_RPS,
                        help="max_requests_per_second in the settings (default 35)")
    parser.add_argument("--max-creates-per-second", type=float, default=SPEC_MAX_CREATES,
                        help="max_creates_per_second in the settings (default 9)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="no-change: time the run this many times and report the median (default 3)")
    parser.add_argument("--updates", type=int, default=1000,
                        help="pending changes in the updates and mixed scenarios (default 1000)")
    parser.add_argument("--changed-share", type=float, default=0.01,
                        help="share of accounts to change in the changed scenario (default 0.01)")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds before a student_sync child is killed (default 900)")
    parser.add_argument("--baseline-budget", type=float, default=240,
                        help="seconds the baseline may take; beyond, a sample is timed and "
                             "scaled (default 240)")
    parser.add_argument("--probe-pages", type=int, default=10,
                        help="users.list pages timed server-side after no-change (default 10)")
    parser.add_argument("--workdir", type=Path, help="folder for scenario files (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep each scenario's folder")
    parser.add_argument("--json", type=Path, help="also write the figures to FILE as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.students < 1:
        parser.error("--students must be at least 1")
    if args.max_rps <= 0 or args.max_creates_per_second <= 0:
        parser.error("rates must be positive")
    if not 0 <= args.changed_share <= 1:
        parser.error("--changed-share must be between 0 and 1")
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    workdir = args.workdir or Path(tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"student_sync benchmark: {sys.executable} ({sys.version.split()[0]}), "
          f"{os.cpu_count()} CPUs, {sys.platform}\n")
    _warm_up()
    results = []
    for scenario in scenarios:
        result = run_scenario(scenario, args, workdir)
        print_result(result)
        results.append(result)
    print(markdown_table(results))
    if args.json:
        args.json.write_text(json.dumps([_as_json(r) for r in results], indent=2),
                             encoding="utf-8")
    return 1 if any(r.run and r.run.timed_out for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
