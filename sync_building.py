"""Scheduled job: sync the given buildings.  Building numbers first, then any further arguments:

    python sync_building.py 123 456 --dry-run
"""

import sys

import student_sync

if __name__ == "__main__":
    sys.exit(student_sync.main(["--building", *sys.argv[1:]]))
