"""Mutation testing of one module against the tests that cover it (run by hand, not in CI).

    python tests/mutation.py --sample 40 --seed 0 --json mutation.json \
        opera/engine/optim.py tests/engine/test_schedules.py tests/perf/test_equivalence.py -k "lars or adamw"

(options first: everything after the module is passed to pytest.)

The mutants are mutmut's (``pip install mutmut==2.5.1``; its operators, its ids), run by a
fork-per-mutant runner: torch, timm and pytest are imported once here, then for each mutant the
module's file is rewritten, a child process runs ``pytest.main`` on the given tests (which import
opera afresh) and the file is restored. A mutant is killed when the tests fail or run past
``--timeout``. That avoids mutmut's one pytest start (and one torch import) per mutant, which on a
busy 2-core machine is most of the cost. Without ``--sample`` every mutant runs. See docs/testing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path


def list_mutants(path: Path):
    from mutmut import ALL, Context, list_mutations

    return list_mutations(Context(source=path.read_text(), filename=str(path), mutation_id=ALL))


def mutated_source(path: Path, source: str, mutation_id) -> str:
    from mutmut import Context, mutate

    return mutate(Context(source=source, filename=str(path), mutation_id=mutation_id))[0]


def run_tests(pytest_args: list[str], timeout: float) -> str:
    """``passed``, ``failed`` or ``timeout`` of the tests in a forked child."""
    pid = os.fork()
    if pid == 0:  # child: fresh imports of opera (never imported in the parent), quiet output
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        import pytest

        rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *pytest_args])
        os._exit(int(rc))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "passed" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("module", type=Path, help="the .py file to mutate, relative to the repository root")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="the tests that cover it (pytest arguments)")
    p.add_argument("--sample", type=int, default=0, help="run this many mutants drawn with --seed (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per mutant before it counts as killed")
    p.add_argument("--json", type=Path, help="write the per-mutant results here")
    a = p.parse_args(argv)
    if not a.module.is_file() or not a.pytest_args:
        print(f"error: {a.module} is not a file or no tests were given; run from the repository root as "
              "python tests/mutation.py opera/X.py tests/...", file=sys.stderr)
        return 2
    sys.dont_write_bytecode = True  # a rewritten module must never be read from a stale .pyc
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    import numpy  # noqa: F401  the heavy imports, once, before any fork
    import pytest  # noqa: F401
    import timm  # noqa: F401
    import torch
    import torchvision  # noqa: F401

    torch.set_num_threads(1)
    for pyc in a.module.parent.glob(f"__pycache__/{a.module.stem}.*.pyc"):
        pyc.unlink()
    source = a.module.read_text()
    mutants = list_mutants(a.module)
    chosen = sorted(random.Random(a.seed).sample(range(len(mutants)), a.sample)) if 0 < a.sample < len(mutants) else list(range(len(mutants)))
    baseline = run_tests(a.pytest_args, a.timeout)
    if baseline != "passed":
        print(f"error: the tests do not pass on the unmutated {a.module} ({baseline}); fix them first", file=sys.stderr)
        return 2
    results = []
    t0 = time.time()
    try:
        for n, i in enumerate(chosen, 1):
            mid = mutants[i]
            new = mutated_source(a.module, source, mid)
            a.module.write_text(new)
            outcome = run_tests(a.pytest_args, a.timeout)
            changed = [ln for ln in new.splitlines() if ln not in source.splitlines()]
            results.append({"index": i, "line_number": mid.line_number + 1, "line": mid.line.strip(),
                            "mutated": changed[0].strip() if changed else "", "outcome": outcome})
            print(f"[{n}/{len(chosen)}] {outcome:8s} line {mid.line_number + 1}: {mid.line.strip()}  ->  "
                  f"{results[-1]['mutated']}", flush=True)
    finally:
        a.module.write_text(source)
    killed = sum(r["outcome"] != "passed" for r in results)
    summary = {"module": str(a.module), "tests": a.pytest_args, "mutants_total": len(mutants), "run": len(results),
               "killed": killed, "survived": len(results) - killed,
               "score": round(100.0 * killed / max(len(results), 1), 1), "seconds": round(time.time() - t0)}
    print(json.dumps(summary))
    if a.json:
        a.json.write_text(json.dumps({"summary": summary, "mutants": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
