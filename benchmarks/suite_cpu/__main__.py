"""Where a test suite's CPU time goes, process by process.

    BD3_SUITE_LOG=/tmp/procs.tsv PYTHONPATH=benchmarks/suite_cpu make test
    python -m benchmarks.suite_cpu /tmp/procs.tsv [--tests 20]

The first line runs the suite with ``benchmarks/suite_cpu/sitecustomize.py`` on the path of every
process it starts (tests that give a subprocess its own PYTHONPATH escape it); the second sums the log
by kind of process (training ranks, ``composer`` launchers, pytest and its workers, other
``python -m`` commands, py-cpuinfo's subprocess, ...) and by the test that started them.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path


def kind(cmd: str) -> str:
    """The kind of process of a logged command line."""
    if "exec(eval(sys.stdin" in cmd or "-m pytest" in cmd:
        return "pytest and its xdist workers"
    if "bin/composer " in cmd:
        return "composer launcher"
    if "-m pipeline.train " in cmd or " launch " in cmd:
        return "training rank (pipeline.train)"
    if "cpuinfo" in cmd:
        return "py-cpuinfo subprocess"
    if "pip list" in cmd:
        return "pip list (torch's collect_env)"
    if "multiprocessing" in cmd:
        return "multiprocessing helper"
    if " -m " in cmd:
        return "python -m " + cmd.split(" -m ", 1)[1].split()[0]
    return "other"


def summarize(lines: list[str]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """({kind: [processes, CPU seconds]}, {test: [processes, CPU seconds]}) of the log's lines; the
    pytest processes themselves are counted by kind only."""
    kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    tests: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for line in lines:
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 8:
            continue  # a line cut by a full disk or an interrupted write
        cpu, test, cmd = float(fields[4]), fields[6].rsplit(" (", 1)[0], fields[7]
        k = kind(cmd)
        kinds[k][0] += 1
        kinds[k][1] += cpu
        if test and k != "pytest and its xdist workers":
            tests[test][0] += 1
            tests[test][1] += cpu
    return dict(kinds), dict(tests)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite_cpu", description=__doc__)
    p.add_argument("log", type=Path, help="the file BD3_SUITE_LOG named")
    p.add_argument("--tests", type=int, default=20, help="how many of the costliest tests to list")
    args = p.parse_args(argv)
    kinds, tests = summarize(args.log.read_text().splitlines())
    total = sum(cpu for _, cpu in kinds.values())
    print(f"{total:,.0f} CPU-s in {sum(n for n, _ in kinds.values()):.0f} logged processes")
    print(f"{'CPU-s':>8} {'share':>6} {'procs':>6}  kind")
    for name, (n, cpu) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        print(f"{cpu:8.1f} {cpu / total:6.1%} {n:6.0f}  {name}")
    print(f"\nthe {args.tests} tests whose subprocesses used the most CPU:")
    for name, (n, cpu) in sorted(tests.items(), key=lambda kv: -kv[1][1])[: args.tests]:
        print(f"{cpu:8.1f} {n:4.0f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
