"""Run one command and report its wall time and its own peak memory (for bench_sync.py).

The benchmark starts this small process, which starts the measured one: on Linux a
child forked straight from the benchmark (which holds the whole test directory) would
be charged the benchmark's memory in its peak RSS.

    python measure_child.py REPORT.json COMMAND [ARG ...]
"""

import json
import os
import subprocess
import sys
import time


def main() -> int:
    report, command = sys.argv[1], sys.argv[2:]
    started = time.perf_counter()
    process = subprocess.Popen(command)  # stdio, folder and environment are this process's
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    with open(report, "w", encoding="utf-8") as stream:
        json.dump({"exit_code": os.waitstatus_to_exitcode(status), "wall_s": wall,
                   "ru_maxrss": usage.ru_maxrss}, stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
