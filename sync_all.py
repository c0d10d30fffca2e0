"""Scheduled job: sync every building.  Further arguments pass through:

    python sync_all.py --dry-run --report tonight.csv
"""

import sys

import student_sync

if __name__ == "__main__":
    sys.exit(student_sync.main(["--all", *sys.argv[1:]]))
