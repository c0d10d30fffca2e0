"""Scheduled job: sync every building.  Further arguments pass through:

    python sync_all.py --dry-run --report tonight.csv
"""

import sys

try:
    import student_sync
except ImportError as exc:  # Python older than 3.11: student_sync says which one is needed
    sys.stderr.write(f"{exc}\n")
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(student_sync.main(["--all", *sys.argv[1:]]))
