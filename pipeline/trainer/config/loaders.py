"""The data sections of the training YAML: ``train_loader`` / ``eval_loader``, one folder or a mixture.

One folder: ``local`` (and ``remote``, cached in ``local``) with ``split``. A mixture: ``streams``, a
mapping ``{NAME: {local, remote, split, proportion | repeat | choose}}`` (llm-foundry's shape), each
stream one Streaming ``Stream`` of one ``StreamingDataset``. Weights follow Streaming
(``streaming.Stream``): ``proportion`` is relative (every stream then has one; the epoch is
``epoch_size`` rows, default the rows of all streams, split by proportion); ``repeat`` (times the
stream's rows) and ``choose`` (rows) are absolute, and a stream without a weight is read once per epoch.
``resolved_streams()`` gives both forms as one list, the one-folder form as one stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The name of the one stream of the one-folder form (in logs and the plan).
ONE_FOLDER = "data"


@dataclass
class StreamSection:
    """One stream of a mixture. ``split`` defaults to the loader's; ``local`` to a folder of the temp
    directory named after ``remote`` (one per remote, as ``data_prep`` caches). At most one weight."""

    local: str | None = None
    remote: str | None = None
    split: str | None = None
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None

    def __post_init__(self):
        if self.local is None and self.remote is None:
            raise ValueError("local is required (or remote, cached in the temp directory)")
        weights = [k for k in ("proportion", "repeat", "choose") if getattr(self, k) is not None]
        if len(weights) > 1:
            raise ValueError(f"{weights[1]} and {weights[0]} are both set: give at most one weight")
        if self.proportion is not None and self.proportion <= 0:
            raise ValueError(
                f"proportion must be > 0, got {self.proportion} (remove the stream to leave it out)"
            )
        if self.repeat is not None and self.repeat <= 0:
            raise ValueError(f"repeat must be > 0, got {self.repeat} (remove the stream to leave it out)")
        if self.choose is not None and self.choose < 1:
            raise ValueError(f"choose must be >= 1, got {self.choose} (remove the stream to leave it out)")


@dataclass
class ResolvedStream:
    """A stream as the run reads it: ``key`` is its YAML key (for errors), ``local`` always set."""

    name: str
    key: str
    local: str
    remote: str | None
    split: str
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None


@dataclass
class TrainLoaderSection:
    """MDS data written by data_prep: ``local``/``split`` (or ``remote``/``split`` cached in ``local``),
    or a mixture of ``streams`` (then ``local`` and ``remote`` stay null).

    Sampling (Streaming's ``StreamingDataset`` arguments; defaults are Streaming's): ``sampling_method``
    "balanced" (a stream's rows drawn anew each epoch when it is oversampled) or "fixed";
    ``shuffle_algo`` "py1e" (Streaming's default), "py1br", "py1b", "py1s", "py2s" or "naive";
    ``shuffle_block_size`` (rows; null: Streaming's max(4M / num_canonical_nodes, 2^18));
    ``epoch_size`` (rows of one epoch of a mixture weighted by proportion; null: all rows);
    ``num_canonical_nodes`` (null: Streaming's default; keep it fixed for the life of a run).
    """

    local: str | None = None
    remote: str | None = None
    split: str = "train"
    streams: dict[str, StreamSection] | None = None
    shuffle: bool = True
    shuffle_seed: int = 9176
    sampling_method: Literal["balanced", "fixed"] = "balanced"
    shuffle_algo: Literal["py1e", "py1br", "py1b", "py1s", "py2s", "naive"] = "py1e"
    shuffle_block_size: int | None = None
    epoch_size: int | None = None
    num_workers: int = 0
    prefetch_factor: int | None = None
    persistent_workers: bool = False
    pin_memory: bool = False
    predownload: int | None = None
    num_canonical_nodes: int | None = None
    drop_last: bool = True
    # A hash the index records ("sha1" for data_prep output): check each shard file on its first read.
    validate_hash: str | None = None

    def __post_init__(self):
        if self.streams is None:
            if self.local is None:
                raise ValueError("local is required: a data_prep output folder (or give streams)")
            if self.epoch_size is not None:
                raise ValueError("epoch_size applies to streams weighted by proportion; remove it")
            return
        for key in ("local", "remote"):
            if getattr(self, key) is not None:
                raise ValueError(
                    f"{key} is set together with streams: a mixture names its folders per stream; set it to "
                    f"null (on the command line: train_loader.{key}=null, or eval_loader.{key}=null)"
                )
        if not self.streams:
            raise ValueError("streams must name at least one stream (or use local for one folder)")
        names = list(self.streams)
        relative = [n for n in names if self.streams[n].proportion is not None]
        if relative and len(relative) != len(names):
            other = next(n for n in names if n not in relative)
            raise ValueError(
                f"streams.{other} has no proportion but streams.{relative[0]} has one: Streaming weighs "
                "either every stream by proportion or none (repeat, choose or nothing)"
            )
        if self.epoch_size is not None and (not relative or self.epoch_size < 1):
            raise ValueError("epoch_size must be >= 1 and needs streams weighted by proportion")
        if self.shuffle_block_size is not None and self.shuffle_block_size < 1:
            raise ValueError(f"shuffle_block_size must be >= 1, got {self.shuffle_block_size}")

    @property
    def is_mixture(self) -> bool:
        return self.streams is not None

    def resolved_streams(self, role: str) -> list[ResolvedStream]:
        """The streams of this loader (``role``: "train_loader"/"eval_loader", for error keys); the
        one-folder form is one stream named ``ONE_FOLDER`` whose key is the role itself."""
        if self.streams is None:
            return [ResolvedStream(ONE_FOLDER, role, self.local, self.remote, self.split)]
        from data_prep.remote import local_cache_dir

        out = []
        for name, s in self.streams.items():
            split = s.split or self.split
            local = s.local or str(local_cache_dir("streams", s.remote.rstrip("/")))
            w = dict(proportion=s.proportion, repeat=s.repeat, choose=s.choose)
            out.append(ResolvedStream(str(name), f"{role}.streams.{name}", local, s.remote, split, **w))
        return out


@dataclass
class EvalLoaderSection(TrainLoaderSection):
    """As ``train_loader``; with ``streams`` the evaluation callbacks report every stream separately."""

    split: str = "val"
    shuffle: bool = False
    drop_last: bool = False
