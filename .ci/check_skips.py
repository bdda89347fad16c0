#!/usr/bin/env python3
"""Make skipped tests visible in CI, and fail when the SLURM tests skip on a machine that can run them.

    python3 .ci/check_skips.py REPORT [--slurm-can-run auto|yes|no]

REPORT is pytest's ``--junitxml`` file, or a saved text log of a run with ``-rs``/``-ra``
(its ``SKIPPED [n] path:line: reason`` lines). Every skip is printed with its reason. The SLURM
tests (``tests/slurm``) can run where we are root and apt-get exists (``.ci/install_slurm.sh``
then installs what their one-node and two-node clusters need); there, any skipped SLURM test
(the two-node tests skip where namespaces cannot be made), or none having run at all, is a
failure (exit 1). ``--slurm-can-run`` overrides the detection. A missing or unreadable report
is a one-line error (exit 2).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

SLURM_DIR = "tests/slurm/"
TEXT_SKIP = re.compile(r"^SKIPPED \[(\d+)\] (\S+?):(\d+): (.*)$")


@dataclass
class Report:
    skips: list[tuple[str, str]]  # (where, reason)
    slurm_ran: int  # SLURM tests that ran (passed or failed); -1 when the report cannot tell


def slurm_can_run() -> bool:
    """Root with apt: ``.ci/install_slurm.sh`` can install the cluster the SLURM tests start."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def test_path(case: ET.Element) -> str:
    """``tests/slurm/test_x.py``-like path of a junit testcase (``file`` or its dotted classname)."""
    if case.get("file"):
        return case.get("file", "").replace(os.sep, "/")
    return case.get("classname", "").replace(".", "/") + ".py"


def read_junit(path: Path) -> Report:
    skips, slurm_ran = [], 0
    for case in ET.parse(path).getroot().iter("testcase"):
        where = f"{test_path(case)}::{case.get('name')}"
        skipped = case.find("skipped")
        if skipped is not None:
            skips.append((where, skipped.get("message") or skipped.text or "no reason given"))
        elif where.startswith(SLURM_DIR):
            slurm_ran += 1
    return Report(skips, slurm_ran)


def read_text(path: Path) -> Report:
    skips = []
    for line in path.read_text(errors="replace").splitlines():
        m = TEXT_SKIP.match(line.strip())
        if m:
            count, where, lineno, reason = m.groups()
            skips += [(f"{where}:{lineno}", reason)] * int(count)
    return Report(skips, -1)


def read_report(path: Path) -> Report:
    if not path.is_file():
        raise SystemExit(f"error: no test report at {path}; run pytest with --junitxml={path} (or save its -rs output there)")
    if path.read_bytes()[:200].lstrip().startswith(b"<"):
        try:
            return read_junit(path)
        except ET.ParseError as exc:
            raise SystemExit(f"error: {path} is not valid junit XML ({exc}); rerun pytest with --junitxml={path}") from None
    return read_text(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path)
    p.add_argument("--slurm-can-run", choices=("auto", "yes", "no"), default="auto")
    a = p.parse_args(argv)
    try:
        report = read_report(a.report)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    for where, reason in report.skips:
        print(f"skipped: {where}: {reason}")
    print(f"{len(report.skips)} skipped")
    can_run = slurm_can_run() if a.slurm_can_run == "auto" else a.slurm_can_run == "yes"
    if not can_run:
        return 0
    slurm_skips = [(w, r) for w, r in report.skips if w.startswith(SLURM_DIR)]
    if slurm_skips:
        where, reason = slurm_skips[0]
        print(f"error: {len(slurm_skips)} SLURM test(s) skipped on a machine that can run them (root with apt), "
              f"first {where}: {reason}; run .ci/install_slurm.sh before pytest", file=sys.stderr)
        return 1
    if report.slurm_ran == 0:
        print("error: no SLURM test ran on a machine that can run them (root with apt); "
              "run pytest over tests/ including tests/slurm", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
