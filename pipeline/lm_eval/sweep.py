"""lm-eval tasks at several block sizes of one checkpoint: ``python -m pipeline.eval --tasks a,b
--block-sizes 1,4,16``. One table (task x metric x block size), as JSON and on the console, and a PNG
with one panel per task (each metric against the block size)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class DownstreamResult:
    """One (task, metric, block size) cell: lm-eval's value and its standard error (NaN when none)."""

    task: str
    metric: str
    block_size: int
    value: float
    stderr: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def run_tasks(
    checkpoint: str,
    tasks: Sequence[str],
    block_sizes: Sequence[int],
    *,
    include_path: str | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    model_args: dict | None = None,
) -> list[DownstreamResult]:
    """Run lm-eval's ``tasks`` with the ``bd3`` model of ``checkpoint`` at each block size.

    ``model_args`` are further ``bd3`` arguments (mc_samples, seed, batch_size, device, dtype, ...).
    The model is loaded once per block size (lm-eval owns its model object)."""
    from lm_eval import simple_evaluate

    from pipeline.lm_eval.model import BD3EvalLM

    manager = task_manager(tasks, include_path)
    out: list[DownstreamResult] = []
    for bs in block_sizes:
        lm = BD3EvalLM(pretrained=str(checkpoint), block_size=bs, **(model_args or {}))
        results = simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot
        )
        if results is not None:  # None on ranks other than 0 of several processes
            out += table_rows(results, bs)
    return out


def task_manager(tasks: Sequence[str], include_path: str | None = None):
    """lm-eval's ``TaskManager`` for ``tasks``: only the local folder's when it has them all (indexing
    lm-eval's built-in tasks costs about 10 s)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include_path)
    return manager


def table_rows(results: dict, block_size: int) -> list[DownstreamResult]:
    """The (task, metric) cells of one ``simple_evaluate`` result at ``block_size``."""
    out = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, comma, _filter = key.partition(",")
            # metrics are "name,filter"; "alias", "sample_len" and the like are not
            if not comma or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{name}_stderr,{_filter}", float("nan"))
            err = float(err) if isinstance(err, (int, float)) else float("nan")
            out.append(DownstreamResult(task, name, block_size, float(value), err))
    return out


def format_table(results: Sequence[DownstreamResult]) -> str:
    """Rows (task, metric), columns block sizes: ``value ± stderr``."""
    sizes = sorted({r.block_size for r in results})
    cells = {(r.task, r.metric, r.block_size): r for r in results}
    keys = sorted({(r.task, r.metric) for r in results})
    width = max([len(f"{t} {m}") for t, m in keys] + [11])
    lines = [f"{'task metric':<{width}} " + " ".join(f"{f'bs {b}':>17}" for b in sizes)]
    for t, m in keys:
        row = []
        for b in sizes:
            r = cells.get((t, m, b))
            if r is None:
                row.append(f"{'-':>17}")
            else:
                err = "" if math.isnan(r.stderr) else f" ± {r.stderr:.4f}"
                row.append(f"{f'{r.value:.4f}{err}':>17}")
        lines.append(f"{f'{t} {m}':<{width}} " + " ".join(row))
    return "\n".join(lines)


def plot_downstream(results: Sequence[DownstreamResult], path, title: str = "") -> None:
    """PNG: one panel per task, each metric against the block size (log2 x axis), error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r.task for r in results})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), dpi=100, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for metric in sorted({r.metric for r in results if r.task == task}):
            rs = sorted(
                (r for r in results if r.task == task and r.metric == metric), key=lambda r: r.block_size
            )
            errs = [0.0 if math.isnan(r.stderr) else r.stderr for r in rs]
            ax.errorbar(
                [r.block_size for r in rs],
                [r.value for r in rs],
                yerr=errs,
                marker="o",
                capsize=3,
                label=metric,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size L'")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "Downstream tasks vs block size")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
