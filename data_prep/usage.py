"""Where the CPU time and memory of a convert run went: this process, its worker processes, and
how soon the first document was read."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

_IMPORTED_AT = time.perf_counter()


@dataclass
class RunUsage:
    """Where the CPU and memory of a run went.

    `parent_startup_cpu_s`: this process before the work (imports, tokenizer, counting);
    `parent_cpu_s`: this process during the work (reading, ordering, packing, its threads): the
    part that grows with the corpus; `workers_cpu_s`: the worker processes (decoding, tokenizing,
    encoding/compressing/writing shards); peak resident memory of this process and of the
    largest worker; `first_doc_s`: seconds from process start until the first batch of documents
    was read and handed to tokenization.
    """

    parent_startup_cpu_s: float
    parent_cpu_s: float
    workers_cpu_s: float
    parent_peak_rss_mib: float
    worker_peak_rss_mib: float
    first_doc_s: float | None

    def summary(self, tokens: int) -> str:
        per = 1e6 / tokens if tokens else 0.0
        first = f"; first document read {self.first_doc_s:.2f} s after start" if self.first_doc_s else ""
        return (
            f"CPU: parent {self.parent_cpu_s:.2f} s ({self.parent_cpu_s * per:.4f} s per M tokens; start-up "
            f"{self.parent_startup_cpu_s:.2f} s more), workers {self.workers_cpu_s:.2f} s "
            f"({self.workers_cpu_s * per:.3f} s per M tokens); peak RSS parent {self.parent_peak_rss_mib:.0f} MiB, "
            f"largest worker {self.worker_peak_rss_mib:.0f} MiB{first}"
        )


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds of this process and its threads, of its children that have been waited for)."""
    import resource  # Unix only

    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def usage_since(cpu0: tuple[float, float], first_doc_s: float | None, worker_peak_rss_mib: float) -> RunUsage:
    """The usage of the work that began when `cpu_seconds()` was `cpu0`, its workers waited for."""
    import resource

    parent, workers = cpu_seconds()
    if (parent_rss := peak_rss_mib()) is None:  # not Linux: ru_maxrss (KiB; bytes on macOS)
        parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
            2**20 if sys.platform == "darwin" else 1024
        )
    return RunUsage(
        parent_startup_cpu_s=cpu0[0],
        parent_cpu_s=parent - cpu0[0],
        workers_cpu_s=workers - cpu0[1],
        parent_peak_rss_mib=parent_rss,
        worker_peak_rss_mib=worker_peak_rss_mib,
        first_doc_s=first_doc_s,
    )


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """Peak resident memory of a process (Linux's VmHWM, which, unlike ru_maxrss, does not
    inherit the high-water mark of the process that started this one); None where unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def seconds_since_process_start() -> float:
    """Wall seconds since this process started (Linux: from /proc; elsewhere: since data_prep was imported)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError, IndexError):
        return time.perf_counter() - _IMPORTED_AT
