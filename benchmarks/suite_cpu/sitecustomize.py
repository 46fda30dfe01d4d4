"""Per-process CPU accounting of a test-suite run (``benchmarks.suite_cpu``): imported by every Python
process whose ``PYTHONPATH`` starts with this folder; when ``BD3_SUITE_LOG`` names a file, each process
appends one tab-separated line at exit: pid, parent pid, start time, seconds alive, its own CPU
seconds (user + system, children excluded), whether it imported Composer, the test that started it
(``PYTEST_CURRENT_TEST``, which pytest sets and subprocesses inherit) and its command line.

A process killed by a signal writes nothing (the fault tests' SIGKILLed ranks)."""

import atexit
import os
import resource  # here, not at exit: pip 26 refuses imports once an install has started
import sys
import time

_LOG = os.environ.get("BD3_SUITE_LOG")
_START = time.time()


def _write() -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/self/cmdline", "rb") as f:
        cmd = " ".join(f.read().replace(b"\0", b" ").decode(errors="replace").split())[:300]  # one line
    test = " ".join(os.environ.get("PYTEST_CURRENT_TEST", "").split())[:200]
    fields = (
        os.getpid(),
        os.getppid(),
        f"{_START:.2f}",
        f"{time.time() - _START:.2f}",
        f"{usage.ru_utime + usage.ru_stime:.2f}",
        int("composer" in sys.modules),
        test,
        cmd,
    )
    with open(_LOG, "a") as f:  # one short append per process: lines of parallel processes stay whole
        f.write("\t".join(map(str, fields)) + "\n")


if _LOG:
    atexit.register(_write)
