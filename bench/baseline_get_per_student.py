"""The old way, for comparison: one users.get per PowerSchool student.

Run by bench_sync.py as a child process, timed from outside like student_sync itself.
Imports googleapiclient, builds the client as student_sync does for a local endpoint,
reads the student numbers from the SQLite PowerSchool copy, then asks the directory
for each student's account one call at a time, as the tool this one replaces did.
Prints one JSON line: {"gets", "not_found", "setup_s", "gets_s"}.

    python bench/baseline_get_per_student.py --endpoint URL --sqlite FILE [--limit N]
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()

import argparse  # noqa: E402 - the clock starts before the imports on purpose
import json  # noqa: E402
import sqlite3  # noqa: E402
import sys  # noqa: E402

import httplib2  # noqa: E402
from googleapiclient.discovery import build  # noqa: E402
from googleapiclient.errors import HttpError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="Directory API endpoint URL")
    parser.add_argument("--sqlite", required=True, help="PowerSchool SQLite copy")
    parser.add_argument("--suffix", default="@d118.org", help="email suffix")
    parser.add_argument("--limit", type=int, default=0, help="only the first N students (0: all)")
    args = parser.parse_args(argv)

    service = build("admin", "directory_v1", http=httplib2.Http(timeout=60),
                    static_discovery=True, cache_discovery=False,
                    client_options={"api_endpoint": args.endpoint})
    connection = sqlite3.connect(args.sqlite)
    try:
        numbers = [row[0] for row in connection.execute(
            "SELECT STUDENT_NUMBER FROM STUDENTS ORDER BY STUDENT_NUMBER")]
    finally:
        connection.close()
    if args.limit > 0:
        numbers = numbers[:args.limit]

    ready = time.perf_counter()
    not_found = 0
    users = service.users()
    for number in numbers:
        try:
            users.get(userKey=f"{int(number)}{args.suffix}", projection="full").execute()
        except HttpError as exc:
            if exc.status_code != 404:
                raise
            not_found += 1
    done = time.perf_counter()
    print(json.dumps({"gets": len(numbers), "not_found": not_found,
                      "setup_s": round(ready - _STARTED, 4), "gets_s": round(done - ready, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
