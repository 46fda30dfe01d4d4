"""Which documents a convert writes where, and what of that is already on disk.

The documents used (the first --max-docs of the corpus) are cut into split "train" and split
"val" (the last --val-docs), each is cut to the documents of the slice (--slice i/n: documents
[i*N//n, (i+1)*N//n)), and each split into parts of --docs-per-part documents. A part is done
when its done-marker exists (see `convert` for the layout of an output folder).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import DataPrepError
from data_prep.manifest import MANIFEST, STATE, diff_args, load_json

log = logging.getLogger(__name__)


@dataclass
class SplitPlan:
    """The documents [s, e) of a split (within the slice), and those of each of its parts."""

    doc_range: tuple[int, int]
    parts: list[tuple[int, int]]


def slice_range(n_docs: int, slice_ix: tuple[int, int] | None) -> tuple[int, int]:
    """Documents [s, e) of slice (i, n) of `n_docs` documents; all of them without a slice."""
    if slice_ix is None:
        return 0, n_docs
    i, n = slice_ix
    return i * n_docs // n, (i + 1) * n_docs // n


def plan_splits(n_docs: int, val_docs: int, slice_ix, docs_per_part: int) -> dict[str, SplitPlan]:
    """Document ranges of each split (within the slice) and of its parts; empty splits left out."""
    lo, hi = slice_range(n_docs, slice_ix)
    plans = {}
    for split, (s, e) in (("train", (0, n_docs - val_docs)), ("val", (n_docs - val_docs, n_docs))):
        s, e = max(s, lo), min(e, hi)
        if s < e:
            parts = [(p, min(p + docs_per_part, e)) for p in range(s, e, docs_per_part)]
            plans[split] = SplitPlan((s, e), parts)
    return plans


def marker_path(split_dir: Path, k: int) -> Path:
    """The done-marker of part k of a split."""
    return split_dir / f"part-{k:05d}.done.json"


def part_dir(split_dir: Path, k: int) -> Path:
    """The shard folder of part k of a split."""
    return split_dir / f"part-{k:05d}"


def docs_todo(out_dir: Path, plans: dict[str, SplitPlan]) -> int:
    """Documents in parts without a done-marker."""
    return sum(
        e - s
        for split, plan in plans.items()
        for k, (s, e) in enumerate(plan.parts)
        if not marker_path(out_dir / split, k).is_file()
    )


def prepare_out_dir(out_dir: Path, args: dict, overwrite: bool) -> str:
    """'complete', 'resume' or 'fresh'; refuses an output made with other arguments."""
    for name, what in ((MANIFEST, "a finished"), (STATE, "an unfinished")):
        path = out_dir / name
        if not path.is_file():
            continue
        if overwrite:
            log.info("--overwrite: deleting %s", out_dir)
            shutil.rmtree(out_dir)
            return "fresh"
        diffs = diff_args(load_json(path).get("args", {}), args)
        if diffs:
            raise DataPrepError(
                f"{out_dir} holds {what} output made with different arguments:\n"
                + "\n".join(diffs)
                + "\npass --overwrite to delete it and start again, or choose another --out"
            )
        return "complete" if name == MANIFEST else "resume"
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataPrepError(
            f"{out_dir} exists and is not a data_prep output; refusing to write into it or delete it "
            "(choose an empty or new --out)"
        )
    return "fresh"
