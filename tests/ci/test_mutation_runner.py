"""``tests/mutation.py``: mutmut's mutants of a module, run fork-per-mutant against given tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here spawns processes or trains for seconds (pytest -m 'not slow' skips them)

pytest.importorskip("mutmut", reason="mutmut is in the test extra: pip install -e '.[test]'")
SCRIPT = Path(__file__).resolve().parents[1] / "mutation.py"

MODULE = "def affine(x):\n    return 2 * x + 1\n"
WEAK = "from pkg.mod import affine\n\ndef test_at_zero():\n    assert affine(0) == 1\n"  # blind to the slope
STRONG = WEAK + "\ndef test_at_three():\n    assert affine(3) == 7\n"


def run(tmp_path: Path, tests: str) -> dict:
    tmp_path.mkdir()
    (tmp_path / "pkg").mkdir(exist_ok=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mod.py").write_text(MODULE)
    (tmp_path / "tests").mkdir(exist_ok=True)
    (tmp_path / "tests" / "test_mod.py").write_text(tests)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", "out.json", "pkg/mod.py", "tests/test_mod.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "pkg" / "mod.py").read_text() == MODULE  # restored
    return json.loads((tmp_path / "out.json").read_text())


@pytest.mark.slow
def test_stronger_tests_kill_more_mutants(tmp_path):
    weak = run(tmp_path / "weak", WEAK)
    strong = run(tmp_path / "strong", STRONG)
    # mutmut's mutants of 2 * x + 1: 2 -> 3, * -> /, + -> -, 1 -> 2
    assert weak["summary"]["mutants_total"] == strong["summary"]["mutants_total"] == 4
    survivors = [m["mutated"] for m in weak["mutants"] if m["outcome"] == "passed"]
    assert survivors == ["return 3 * x + 1"] and weak["summary"]["score"] == 75.0  # affine(0) cannot see the slope
    assert strong["summary"]["killed"] == 4 and strong["summary"]["score"] == 100.0


def test_failing_baseline_is_a_one_line_error(tmp_path):
    (tmp_path / "mod.py").write_text(MODULE)
    (tmp_path / "test_bad.py").write_text("def test_bad():\n    assert False\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "mod.py", "test_bad.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "do not pass on the unmutated" in done.stderr
