"""The data section of a run's plan: per training stream, its rows and tokens, its share of every global
batch and how many times ``max_duration`` reads it (``pipeline.plan`` and the start-up log print it).

A stream read 0.02 times or 11 times is a mistake to see before the GPU hours. The shares are
Streaming's own (``streaming.Stream.apply_weights``, the rows each stream gives one epoch of the
mixture), so the plan is what the run's ``StreamingDataset`` will draw.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from pipeline.trainer.config import TrainConfig


@dataclass
class StreamPlan:
    """One stream: ``rows`` in its split, ``tokens`` (rows x seq_len), ``epoch_rows`` it gives one
    epoch of the mixture, ``share`` of every global batch (expected fraction), ``epochs`` of it that
    ``max_duration`` reads (None when the duration cannot be converted to rows)."""

    name: str
    rows: int
    tokens: int
    epoch_rows: int
    share: float
    epochs: float | None


@dataclass
class DataPlan:
    """The training data of a run: its streams, the rows of one epoch of the mixture, the global batch
    and the rows ``max_duration`` reads (None when unknown, e.g. "1dur")."""

    streams: list[StreamPlan]
    epoch_rows: int
    global_batch: int
    total_rows: int | None

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        gb = self.global_batch
        total = f"{self.total_rows:,}" if self.total_rows is not None else "unknown"
        lines = [
            f"data: {len(self.streams)} stream(s), {self.epoch_rows:,} rows per epoch of the mixture; "
            f"max_duration reads {total} rows",
            f"  {'stream':<16} {'rows':>10} {'tokens':>14} {'rows/epoch':>11} {'share of a batch':>22} "
            f"{'epochs read':>11}",
        ]
        for s in self.streams:
            share = f"{100 * s.share:.1f}% ({s.share * gb:.1f} of {gb})"
            epochs = f"{s.epochs:.3g}" if s.epochs is not None else "?"
            lines.append(
                f"  {s.name:<16} {s.rows:>10,} {s.tokens:>14,} {s.epoch_rows:>11,} {share:>22} {epochs:>11}"
            )
        return "\n".join(lines)


def duration_rows(cfg: TrainConfig, epoch_rows: int) -> int | None:
    """Rows (samples) of the training stream that ``max_duration`` reads; None for "dur" and unknown units."""
    m = re.match(r"^(\d+(?:\.\d+)?)(ba|sp|tok|ep)$", str(cfg.max_duration))
    if not m:
        return None
    n, unit = float(m[1]), m[2]
    gb = cfg.global_train_batch_size
    if unit == "ep":  # an epoch ends at the last full global batch (drop_last)
        return int(n * (epoch_rows // gb) * gb)
    return int({"ba": n * gb, "sp": n, "tok": n / cfg.max_seq_len}[unit])


def data_plan(cfg: TrainConfig, manifests: dict[str, dict]) -> DataPlan:
    """The plan of ``cfg.train_loader`` given each stream's manifest ({name: manifest}, in stream order,
    as ``RunInputs.streams`` holds them)."""
    import numpy as np
    from streaming import Stream

    section = cfg.train_loader
    resolved = section.resolved_streams("train_loader")
    rows = np.array(
        [int(manifests[s.name].get("splits", {}).get(s.split, {}).get("rows") or 0) for s in resolved],
        np.int64,
    )
    streams = [
        Stream(local=s.local, split=s.split, proportion=s.proportion, repeat=s.repeat, choose=s.choose)
        for s in resolved
    ]
    epoch = Stream.apply_weights(streams, rows, section.epoch_size, section.shuffle_seed)
    total = duration_rows(cfg, epoch)
    plans = []
    for s, stream, n in zip(resolved, streams, rows.tolist()):
        share = int(stream.choose) / epoch if epoch else 0.0
        epochs = total * share / n if total is not None and n else None
        plans.append(StreamPlan(s.name, n, n * cfg.max_seq_len, int(stream.choose), share, epochs))
    return DataPlan(plans, int(epoch), cfg.global_train_batch_size, total)
