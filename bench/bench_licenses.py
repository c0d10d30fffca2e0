"""Benchmark the licence read (SPEC section 8) on a district in step.

Builds one synthetic district of N active students (bench_sync's builder) whose accounts
all hold the Education Plus licence, serves it from the testkit Directory API server (which
also answers the Licensing API) with a fixed latency per request, and runs the nightly
command line (``sync_all.py --config FILE``) as a child process, alternately with and
without a ``[licenses]`` section (``assign = true``), ``--repeat`` times each. It reports
the median wall time of each, their ratio, and the licensing calls the server saw against
the target ``ceil(holders / 1000) + 2``.

    python bench/bench_licenses.py --students 100000 --latency-ms 20 --repeat 3

Standard library and the project's test kit only.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_sync import TOOL, _child_env, _warm_up, run_child  # noqa: E402
from testkit.directory_server import DirectoryServer  # noqa: E402
from testkit.district import DOMAIN, SUFFIX, build_synthetic_district, write_settings  # noqa: E402

PRODUCT, SKU = "101031", "1010310008"
LICENSING = "/apps/licensing/v1/"


def _settings(folder: Path, server: DirectoryServer, database: Path, students: int,
              licences: bool) -> Path:
    overrides = {
        "powerschool": {"sqlite": str(database)},
        "safety": {"max_suspensions": max(100, students)},
        "logging": {"dir": str(folder / "logs")},
    }
    if licences:
        overrides["licenses"] = {"product_id": PRODUCT, "sku_id": SKU, "assign": True,
                                 "max_releases": max(100, students)}
    name = "with-licences.toml" if licences else "without-licences.toml"
    return write_settings(folder / name, server.url, overrides)


def _licence_calls(server: DirectoryServer) -> Counter:
    calls: Counter = Counter()
    for record in server.requests:
        if record.path.startswith(LICENSING):
            kind = "list" if record.method == "GET" and record.path.endswith("/users") else record.method
            calls[kind] += 1
    return calls


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/bench_licenses.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=100_000)
    parser.add_argument("--latency-ms", type=float, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each kind (default 3)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)

    print(f"licence benchmark: {args.students:,} students, all holding {SKU}, "
          f"{args.latency_ms:g} ms latency, {args.repeat} runs each\n")
    _warm_up()
    folder = Path(tempfile.mkdtemp(prefix="bench-licences-"))
    server = DirectoryServer(domain=DOMAIN, latency_ms=args.latency_ms)
    try:
        started = time.perf_counter()
        database = build_synthetic_district(folder, server, args.students)
        server.licensing.assign_many((f"{100000 + i}{SUFFIX}" for i in range(args.students)), SKU)
        holders = server.licensing.in_use(SKU)
        print(f"district built in {time.perf_counter() - started:.1f} s (not timed); {holders:,} holders")
        gc.collect()
        gc.freeze()
        server.start()
        configs = {False: _settings(folder, server, database, args.students, False),
                   True: _settings(folder, server, database, args.students, True)}
        walls: dict[bool, list[float]] = {False: [], True: []}
        calls: Counter = Counter()
        codes = []
        for _ in range(args.repeat):
            for licences in (False, True):  # alternate, so that a busy moment hits both
                server.clear_requests()
                run = run_child([sys.executable, str(TOOL), "--config", str(configs[licences])],
                                cwd=folder, env=_child_env(), timeout=args.timeout,
                                log_name="with" if licences else "without")
                codes.append(run.exit_code)
                walls[licences].append(run.wall_s)
                seen = _licence_calls(server)
                if licences:
                    calls = seen
                elif seen:
                    print(f"  MISSED: a run without [licenses] made licensing calls: {dict(seen)}")
                if run.exit_code != 0:
                    print(f"  run exit {run.exit_code}: {' / '.join(run.output_tail)}")
        without, with_ = statistics.median(walls[False]), statistics.median(walls[True])
        ratio = with_ / without if without else float("nan")
        limit = math.ceil(holders / 1000) + 2
        reads = sum(calls.values()) - calls["POST"] - calls["DELETE"]
        print(f"without [licenses]   median {without:.2f} s ({', '.join(f'{w:.2f}' for w in walls[False])})")
        print(f"with [licenses]      median {with_:.2f} s ({', '.join(f'{w:.2f}' for w in walls[True])})")
        print(f"ratio                {ratio:.3f} ({(ratio - 1) * 100:+.1f} %)")
        print(f"licensing calls      {dict(calls)} (reads {reads}; writes {calls['POST'] + calls['DELETE']})")
        checks = [
            ("exit code 0 every run", all(code == 0 for code in codes)),
            (f"licence reads <= ceil(holders/1000)+2 = {limit}", reads <= limit),
            ("no licence writes (in step)", calls["POST"] + calls["DELETE"] == 0),
            ("with [licenses] within 20 % of without", ratio <= 1.20),
        ]
        for text, ok in checks:
            print(f"  target: {text:<48} {'ok' if ok else 'MISSED'}")
        if args.json:
            args.json.write_text(json.dumps({
                "students": args.students, "latency_ms": args.latency_ms, "holders": holders,
                "wall_without_s": walls[False], "wall_with_s": walls[True], "ratio": ratio,
                "licence_calls": dict(calls), "targets": {t: ok for t, ok in checks}}, indent=2),
                encoding="utf-8")
        return 0 if all(ok for _, ok in checks) else 1
    finally:
        server.stop()
        gc.unfreeze()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"(kept {folder})")


if __name__ == "__main__":
    sys.exit(main())
