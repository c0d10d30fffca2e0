"""Scheduled job: sync the buildings included in state reporting.  Further arguments pass through:

    python sync_state_reporting.py -q
"""

import sys

try:
    import student_sync
except ImportError as exc:  # Python older than 3.11: student_sync says which one is needed
    sys.stderr.write(f"{exc}\n")
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(student_sync.main(["--state-reporting", *sys.argv[1:]]))
