"""Scheduled job: sync the given buildings.  Building numbers first, then any further arguments:

    python sync_building.py 123 456 --dry-run
"""

import sys

try:
    import student_sync
except ImportError as exc:  # Python older than 3.11: student_sync says which one is needed
    sys.stderr.write(f"{exc}\n")
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(student_sync.main(["--building", *sys.argv[1:]]))
