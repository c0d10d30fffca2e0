"""Build student_sync_plugin.zip, the file to upload in PowerSchool's Plugin Management.

    python powerschool-plugin/build_zip.py [--out FILE]

PowerSchool wants plugin.xml at the root of the zip, with no folder around it.  The same zip
can be made with the standard library alone, from inside this folder:
``python -m zipfile -c student_sync_plugin.zip plugin.xml``.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(out: Path) -> Path:
    """Write the plugin zip to `out` and return its path."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.write(HERE / "plugin.xml", arcname="plugin.xml")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python powerschool-plugin/build_zip.py",
                                     description="Build the PowerSchool plugin zip for student_sync.")
    parser.add_argument("--out", type=Path, default=HERE / "student_sync_plugin.zip",
                        help="where to write the zip (default: beside plugin.xml)")
    args = parser.parse_args(argv)
    path = build(args.out)
    print(f"wrote {path}: upload it at System > System Settings > Plugin Management Configuration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
