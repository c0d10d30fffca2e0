"""Run student_sync end to end on a sample district, on any machine, with no accounts.

Builds a sample PowerSchool (SQLite) and starts a local Directory API server with sample
accounts (it also answers the Licensing API: every open account holds the Education Plus
licence), then runs student_sync.py exactly as a district would: a dry run, the real
run, and a second run that finds nothing to do.  Graduates lose their licence and new
students get one.

    python demo.py                # keeps its files in a temporary folder and prints where
    python demo.py --source api   # PowerSchool read through the local plugin REST API server
"""

from __future__ import annotations

import sys

if sys.version_info[:2] < (3, 11):  # before anything that needs a newer Python
    sys.stderr.write(f"Python 3.11 or newer is needed (this is Python {sys.version_info[0]}.{sys.version_info[1]}): "
                     "install it from python.org and run the demo with it, in a virtual environment "
                     "(see README, \"Try it\")\n")
    raise SystemExit(2)

import argparse
import contextlib
import datetime as dt
import os
import subprocess
import tempfile
from pathlib import Path

from testkit import district
from testkit.directory_server import DirectoryServer
from testkit.powerschool_api import PowerSchoolApiServer

HERE = Path(__file__).resolve().parent
PRODUCT, SKU = "101031", "1010310008"   # Google Workspace for Education Plus (Student)


# The PowerSchool plugin's client ID and secret, as a district sets them (README): the demo's
# own, for its local PowerSchool API server only.
DEMO_CLIENT = {"POWERSCHOOL_CLIENT_ID": "demo-client-0001", "POWERSCHOOL_CLIENT_SECRET": "demo-secret-0001"}


def run_sync(settings: Path, *arguments: str) -> int:
    """student_sync.py in a child process, as Task Scheduler would start it."""
    command = [sys.executable, str(HERE / "student_sync.py"), "--all", "--config", str(settings), *arguments]
    print(f"\n$ python student_sync.py --all {' '.join(arguments)}", flush=True)
    environment = dict(os.environ, NEW_USER_PASSWORD="Demo-Start-2026!", **DEMO_CLIENT)
    return subprocess.run(command, env=environment).returncode


def powerschool_settings(folder: Path, source: str, stack: contextlib.ExitStack) -> dict:
    """The [powerschool] section: the SQLite copy, or a local PowerSchool API server over it."""
    database = folder / "powerschool.sqlite3"
    if source == "sqlite":
        return {"sqlite": str(database)}
    api = stack.enter_context(PowerSchoolApiServer(
        database, client_id=DEMO_CLIENT["POWERSCHOOL_CLIENT_ID"],
        client_secret=DEMO_CLIENT["POWERSCHOOL_CLIENT_SECRET"], max_page_size=50))
    print(f"PowerSchool plugin API at {api.url} (pages of up to 50 students)")
    return {"source": "api", "url": api.url, "sqlite": None}


def writes(server: DirectoryServer) -> int:
    return sum(1 for r in server.requests if r.method in ("POST", "PUT", "PATCH", "DELETE"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("sqlite", "api"), default="sqlite",
                        help="read PowerSchool from its SQLite copy (default) or through the plugin "
                             "REST API (a local server over the same copy)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="student_sync_demo_"))
    today = dt.date.today()
    senior_class = today.year + (1 if today.month >= 7 else 0)
    with DirectoryServer(domain=district.DOMAIN) as server, contextlib.ExitStack() as stack:
        cases = district.build_demo_district(folder, server, senior_class)
        for address, user in server.users().items():   # every open account is licensed
            if not user["suspended"]:
                server.licensing.assign(address, SKU)
        settings = district.write_settings(folder / "student_sync.toml", server.url, {
            "powerschool": powerschool_settings(folder, args.source, stack),
            "licenses": {"product_id": PRODUCT, "sku_id": SKU, "assign": True}})
        print(f"Sample district in {folder}: {len(server.users())} Google accounts, local Directory API "
              f"at {server.url}")
        for case, numbers in cases.items():
            print(f"  {case:>10}: {', '.join(numbers)}")

        problems = []
        code = run_sync(settings, "--dry-run", "--report", str(folder / "dry-run.csv"))
        if writes(server):
            problems.append("the dry run wrote to the directory")
        print(f"-> exit {code}; {writes(server)} writes (a dry run changes nothing)")

        code = run_sync(settings, "--report", str(folder / "run.csv"))
        applied = writes(server)
        print(f"-> exit {code}; {applied} writes")

        server.clear_requests()
        code = run_sync(settings)
        print(f"-> exit {code}; {writes(server)} writes, {len(server.requests)} read calls")
        if writes(server):
            problems.append("the second run still had changes to make")

        print("\nEnd state of some accounts:")
        for case in ("create", "move", "unsuspend", "suspend", "graduate", "frozen"):
            number = cases[case][0]
            user = server.user(f"{number}{district.SUFFIX}")
            state = "suspended" if user["suspended"] else "active"
            print(f"  {case:>10} {number}: {user['name']['givenName']} {user['name']['familyName']}, "
                  f"{state}, {user['orgUnitPath']}")
        suspended = cases["suspend"][0]
        print(f"  groups of withdrawn {suspended}: {sorted(server.groups_of(f'{suspended}{district.SUFFIX}')) or 'none'}")

        print(f"\nEducation Plus licences (SKU {SKU}):")
        graduate, created = cases["graduate"][0], cases["create"][0]
        lost = not server.licensing.holds(f"{graduate}{district.SUFFIX}", SKU)
        got = server.licensing.holds(f"{created}{district.SUFFIX}", SKU)
        print(f"    graduate {graduate}: {'released' if lost else 'STILL HELD'}")
        print(f"  new student {created}: {'assigned' if got else 'NOT ASSIGNED'}")
        if not (lost and got):
            problems.append("licences did not follow the students")

    print(f"\nExit 1 above is expected: student {cases['bad data'][0]} has no ENROLL_STATUS in the sample "
          "PowerSchool, and the tool reports it as failed every night until it is fixed.")
    print(f"Logs, reports and settings: {folder}")
    if problems:
        print("DEMO FAILED: " + "; ".join(problems))
        return 1
    print("Demo finished: dry run, real run, and a second run with nothing to do.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
