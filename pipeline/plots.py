"""One comparison figure of several models (the AR-init baseline, the trained model, checkpoints):
likelihood per block size and, beside it, downstream accuracy per block size, on the same axes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

ACCURACY_METRICS = ("acc", "acc_norm", "exact_match")


def plot_comparison(
    likelihood: Mapping[str, Sequence[dict]],
    downstream: Mapping[str, Sequence[dict]] | None,
    path,
    title: str,
) -> None:
    """PNG at ``path``, titled ``title`` (the run's name).

    likelihood: model label -> rows of a ``pipeline.eval --out`` JSON (``block_size``, ``ppl_bound``,
        ``stderr``): the left panel, perplexity bound against block size, one line per model.
    downstream: model label -> rows of a ``pipeline.eval --tasks --out`` JSON (``task``, ``metric``,
        ``block_size``, ``value``, ``stderr``): the right panel, each accuracy-like metric of each task
        against block size, one line per (model, task, metric). None or empty: the left panel alone.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if downstream and any(downstream.values()) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    for label, rows in likelihood.items():
        rows = sorted(rows, key=lambda r: r["block_size"])
        ys = [r["ppl_bound"] for r in rows]
        errs = [r["ppl_bound"] * r["stderr"] for r in rows]  # delta method: d exp(x) = exp(x) dx
        ax.errorbar([r["block_size"] for r in rows], ys, yerr=errs, marker="o", capsize=3, label=label)
    ax.set_ylabel("perplexity bound (exp NELBO)")
    ax.set_title("likelihood")
    if panels == 2:
        ax = axes[0][1]
        for label, rows in downstream.items():
            keys = sorted({(r["task"], r["metric"]) for r in rows if r["metric"] in ACCURACY_METRICS})
            for task, metric in keys:
                rs = sorted(
                    (r for r in rows if (r["task"], r["metric"]) == (task, metric)),
                    key=lambda r: r["block_size"],
                )
                errs = [0.0 if r["stderr"] is None or math.isnan(r["stderr"]) else r["stderr"] for r in rs]
                ax.errorbar(
                    [r["block_size"] for r in rs],
                    [r["value"] for r in rs],
                    yerr=errs,
                    marker="o",
                    capsize=3,
                    label=f"{label}: {task} {metric}",
                )
        ax.set_ylabel("accuracy")
        ax.set_title("downstream tasks")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size L'")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
