"""benchmarks.suite_cpu: each process on its path logs one line at exit; the report sums them."""

from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.suite_cpu.__main__ import kind, main, summarize
from tests.factories import REPO


def test_each_process_logs_its_own_cpu_and_the_test_that_started_it(tmp_path, capsys):
    log = tmp_path / "procs.tsv"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "benchmarks" / "suite_cpu"),
        "BD3_SUITE_LOG": str(log),
    }
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", busy], env=env, check=True, timeout=60)
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=60)
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    fields = [line.split("\t") for line in lines]
    assert all(len(f) == 8 for f in fields)
    assert float(fields[0][4]) >= 0.3 > float(fields[1][4])  # its own CPU time, not its wall time
    test = os.environ["PYTEST_CURRENT_TEST"].rsplit(" (", 1)[0]
    assert all(f[6].startswith(test) for f in fields) and fields[0][7].endswith("pass")
    kinds, tests = summarize(lines)
    assert kinds == {"other": [2, float(fields[0][4]) + float(fields[1][4])]}
    assert list(tests) == [test] and tests[test][0] == 2
    # Nothing is written without BD3_SUITE_LOG.
    env.pop("BD3_SUITE_LOG")
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=60)
    assert len(log.read_text().splitlines()) == 2
    assert main([str(log), "--tests", "1"]) == 0
    assert "in 2 logged processes" in capsys.readouterr().out


def test_process_kinds():
    assert kind("/v/bin/python /v/bin/composer -n 2 -m pipeline.train y.yaml") == "composer launcher"
    assert kind("/v/bin/python -m pipeline.train y.yaml a=b") == "training rank (pipeline.train)"
    assert kind("/v/bin/python -u -c import sys;exec(eval(sys.stdin.readline()))") == (
        "pytest and its xdist workers"
    )
    assert kind("/v/bin/python /v/site-packages/cpuinfo/cpuinfo.py --json") == "py-cpuinfo subprocess"
    assert kind("/v/bin/python -m pipeline.eval --checkpoint c") == "python -m pipeline.eval"
