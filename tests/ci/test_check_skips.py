"""``.ci/check_skips.py``: prints every skip with its reason, fails when the SLURM tests skip (or
none ran) on a machine that can run them, from a real pytest junit report or ``-rs`` text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "check_skips.py"

SLURM_SKIPS = '''
import pytest

@pytest.fixture
def cluster():
    pytest.skip("SLURM binaries not installed: run .ci/install_slurm.sh")

def test_job(cluster):
    pass
'''
SLURM_RUNS = "def test_job():\n    pass\n"
OTHER_SKIPS = 'import pytest\n\n@pytest.mark.skip(reason="needs a GPU")\ndef test_gpu():\n    pass\n\ndef test_cpu():\n    pass\n'


def run_pytest(root: Path, files: dict[str, str]) -> tuple[Path, Path]:
    """A real pytest run over ``files`` under ``root``: (junit xml, -rs text log)."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "pytest.ini").write_text("[pytest]\n")
    junit, log = root / "junit.xml", root / "pytest.log"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           "tests"], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    log.write_text(done.stdout)
    return junit, log


def check(report: Path, can_run: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(report), "--slurm-can-run", can_run],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def skipped_slurm(tmp_path_factory):
    return run_pytest(tmp_path_factory.mktemp("skipped"), {"tests/slurm/test_cluster.py": SLURM_SKIPS,
                                                           "tests/perf/test_gpu.py": OTHER_SKIPS})


@pytest.mark.parametrize("kind", [0, 1], ids=["junit", "text"])
def test_slurm_skip_fails_where_slurm_can_run_and_names_the_reason(skipped_slurm, kind):
    done = check(skipped_slurm[kind], "yes")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "needs a GPU" in done.stdout and "run .ci/install_slurm.sh" in done.stdout  # every skip is printed
    assert "2 skipped" in done.stdout
    err = done.stderr.strip()
    assert "\n" not in err and err.startswith("error: 1 SLURM test(s) skipped") and "tests/slurm/" in err


@pytest.mark.parametrize("kind", [0, 1], ids=["junit", "text"])
def test_skips_are_only_reported_where_slurm_cannot_run(skipped_slurm, kind):
    done = check(skipped_slurm[kind], "no")
    assert done.returncode == 0 and done.stderr == ""
    assert "needs a GPU" in done.stdout and "2 skipped" in done.stdout


def test_slurm_tests_that_ran_pass_the_check(tmp_path):
    junit, _ = run_pytest(tmp_path, {"tests/slurm/test_cluster.py": SLURM_RUNS, "tests/perf/test_gpu.py": OTHER_SKIPS})
    done = check(junit, "yes")
    assert done.returncode == 0, done.stderr
    assert "1 skipped" in done.stdout and "tests/perf/test_gpu.py::test_gpu: needs a GPU" in done.stdout


def test_no_slurm_test_at_all_fails_where_slurm_can_run(tmp_path):
    junit, _ = run_pytest(tmp_path, {"tests/perf/test_gpu.py": OTHER_SKIPS})
    done = check(junit, "yes")
    assert done.returncode == 1 and "no SLURM test ran" in done.stderr


def test_missing_or_broken_report_is_a_one_line_error(tmp_path):
    done = check(tmp_path / "nope.xml", "auto")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--junitxml=" in done.stderr
    bad = tmp_path / "bad.xml"
    bad.write_text("<testsuites><testcase")
    done = check(bad, "auto")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not valid junit XML" in done.stderr
