"""merge: combine finished outputs (typically the slices of one convert) into one dataset per split.

Shards are hard-linked into OUT (copied when OUT is on another file system), so OUT stands on
its own and the inputs may be deleted afterwards:
    OUT/<split>/<input folder name>/part-XXXXX/shard.*.mds.zstd
    OUT/<split>/index.json       the inputs' shards, in slice order
    OUT/manifest.json            summed counts, and the inputs it was made from
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep import mds
from data_prep.errors import DataPrepError
from data_prep.manifest import (
    COUNT_KEYS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SLICE_GLOB,
    SPLITS,
    STATE,
    check_split_has_rows,
    load_json,
    read_manifest,
    write_json_atomic,
)

# Must agree between merged inputs: a row means the same thing in all of them.
_SAME = (("tokenizer", "sha256"), ("seq_len",), ("dtype",), ("columns",))


@dataclass
class MergeResult:
    manifest: dict
    out: str
    already_complete: bool


def merge(inputs: Sequence[str], out: str, *, overwrite: bool = False) -> MergeResult:
    """Merge the finished outputs `inputs` into `out`.

    An input folder that holds `slice-i-of-n/` folders (and no manifest) stands for all of them.
    Slices of one convert are put in slice order, and every slice of that run must be present
    and finished. All inputs must share the tokenizer (sha256), seq_len and dtype.
    """
    folders = _expand(inputs)
    manifests = [read_manifest(f) for f in folders]
    _check_compatible(folders, manifests)
    folders, manifests = _order_slices(folders, manifests)
    out_dir = Path(out)
    sources = [str(f.resolve()) for f in folders]
    if any(out_dir.resolve() == Path(s) or Path(s).is_relative_to(out_dir.resolve()) for s in sources):
        raise DataPrepError(f"--out {out} must be a new folder outside the inputs")

    if (out_dir / MANIFEST).is_file() and not overwrite:
        existing = load_json(out_dir / MANIFEST)
        if existing.get("args", {}).get("inputs") == sources:
            return MergeResult(existing, str(out_dir), True)
        raise DataPrepError(
            f"{out_dir} already holds a finished output made from other inputs; pass --overwrite or choose another --out"
        )
    interrupted_merge = (out_dir / STATE).is_file() and load_json(out_dir / STATE).get("kind") == "merge"
    if (out_dir / MANIFEST).is_file() or interrupted_merge:
        shutil.rmtree(out_dir)  # --overwrite, or a merge that was interrupted: merging is cheap
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise DataPrepError(f"{out_dir} exists and is not a data_prep output; choose an empty or new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / STATE, {"format": FORMAT, "kind": "merge", "args": {"inputs": sources}})

    names = _unique_names(folders)
    splits = {}
    for split in SPLITS:
        totals = _merge_split(split, folders, names, manifests, out_dir)
        if totals is not None:
            splits[split] = totals
    manifest = _manifest(sources, names, manifests, splits)
    write_json_atomic(out_dir / MANIFEST, manifest)
    (out_dir / STATE).unlink(missing_ok=True)
    return MergeResult(manifest, str(out_dir), False)


def _merge_split(
    split: str, folders: list[Path], names: list[str], manifests: list[dict], out_dir: Path
) -> dict | None:
    """Link the shards of `split` of every input into out_dir/split/<name>/, write its index; the
    summed counts, or None when no input has the split."""
    children, totals = [], dict.fromkeys(COUNT_KEYS, 0)
    for folder, name, manifest in zip(folders, names, manifests):
        if split not in manifest["splits"]:
            continue
        index = mds.read_index(folder / split)
        for shard in index["shards"]:
            basename = mds.stored_file(shard)["basename"]
            link_or_copy(folder / split / basename, out_dir / split / name / basename)
        children.append((name, index))
        for key in COUNT_KEYS:
            totals[key] += manifest["splits"][split][key]
    if not children:
        return None
    mds.write_merged_index(out_dir / split, children)
    check_split_has_rows(split, totals, manifests[0]["seq_len"])
    return totals


def _manifest(sources: list[str], names: list[str], manifests: list[dict], splits: dict[str, dict]) -> dict:
    first = manifests[0]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "merge",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": {"inputs": sources},
        "tokenizer": first["tokenizer"],
        "seq_len": first["seq_len"],
        "dtype": first["dtype"],
        "columns": first["columns"],
        "doc_starts_empty_sentinel": first["seq_len"],
        "merged_from": [
            {"path": s, "folder": name, "slice": m.get("slice"), "args": m.get("args"), "splits": m["splits"]}
            for s, name, m in zip(sources, names, manifests)
        ],
        "splits": splits,
    }


def _expand(inputs: Sequence[str]) -> list[Path]:
    if not inputs:
        raise DataPrepError("merge needs at least one input folder")
    folders = []
    for item in inputs:
        folder = Path(item)
        if not folder.is_dir():
            raise DataPrepError(f"merge input {item} is not a folder")
        slices = sorted(folder.glob(SLICE_GLOB), key=_slice_key)
        if not (folder / MANIFEST).is_file() and not (folder / STATE).is_file() and slices:
            folders.extend(slices)
        else:
            folders.append(folder)
    return folders


def _slice_key(path: Path) -> tuple[int, int]:
    _, i, _, n = path.name.split("-")
    return int(n), int(i)


def _check_compatible(folders: list[Path], manifests: list[dict]) -> None:
    def get(manifest: dict, keys: tuple[str, ...]):
        for key in keys:
            manifest = manifest[key]
        return manifest

    for folder, manifest in zip(folders[1:], manifests[1:]):
        for keys in _SAME:
            a, b = get(manifests[0], keys), get(manifest, keys)
            if a != b:
                raise DataPrepError(
                    f"cannot merge {folder} with {folders[0]}: {'.'.join(keys)} differs ({b!r} vs {a!r})"
                )


def _order_slices(folders: list[Path], manifests: list[dict]) -> tuple[list[Path], list[dict]]:
    """Slices of the same run in slice order (where the run's first slice was); all of them present."""
    runs: dict[str, list[int]] = {}  # run key -> positions of its slices
    for pos, manifest in enumerate(manifests):
        if manifest.get("slice"):
            args = {k: v for k, v in manifest["args"].items() if k != "slice"}
            runs.setdefault(json.dumps(args, sort_keys=True), []).append(pos)
    order = list(range(len(folders)))
    for positions in runs.values():
        counts = sorted({manifests[p]["slice"]["count"] for p in positions})
        if len(counts) > 1:
            raise DataPrepError(f"cannot merge slices of one corpus cut into different counts {counts}")
        count = counts[0]
        have = sorted(manifests[p]["slice"]["index"] for p in positions)
        if have != list(range(count)):
            missing = sorted(set(range(count)) - set(have))
            dupes = sorted({i for i in have if have.count(i) > 1})
            what = f"slice(s) {missing} missing" if missing else f"slice(s) {dupes} given twice"
            raise DataPrepError(
                f"cannot merge the slices of {folders[positions[0]].parent}: {what} of {count} "
                f"(run convert with --slice i/{count} for each missing i, and wait for all to finish)"
            )
        ranked = sorted(positions, key=lambda p: manifests[p]["slice"]["index"])
        for slot, p in zip(sorted(positions), ranked):
            order[slot] = p
    return [folders[p] for p in order], [manifests[p] for p in order]


def _unique_names(folders: list[Path]) -> list[str]:
    names: list[str] = []
    for j, folder in enumerate(folders):
        name = folder.resolve().name
        names.append(name if name not in names else f"{name}-{j}")
    return names


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link `src` to `dst` (same file system), else copy it."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
