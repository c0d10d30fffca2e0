"""Scheduled job: sync the buildings included in state reporting.  Further arguments pass through:

    python sync_state_reporting.py -q
"""

import sys

import student_sync

if __name__ == "__main__":
    sys.exit(student_sync.main(["--state-reporting", *sys.argv[1:]]))
