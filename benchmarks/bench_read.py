"""Reading training rows with and without ``train_loader.validate_hash``; a mixture against one stream.

    python -m benchmarks.bench_read [--rows 8192] [--seq-len 2048] [--repeats 3]
    python -m benchmarks.bench_read --streams 3 [--rows 6144] [--seq-len 2048] [--repeats 3]

Writes rows with data_prep's own MDS writer (zstd shards of 64 MB before compression, sha1 recorded:
what ``data_prep convert`` writes; token ids drawn from a Zipf-like law over a 32k vocabulary, so
the shards compress like text does), reads every row once to leave Streaming's decompressed copies
beside the shards (as after a first epoch), then times full passes of a fresh ``PackedRowsDataset``
each, alternating without and with ``validate_hash="sha1"``. With the check on, the first read of each
shard in a process hashes its decompressed file. Prints tokens/s of both and their ratio.

``--streams N``: N folders of rows/N rows each, read as training reads them (a shuffled epoch of the
``StreamingDataset``, iterated): as a mixture of N streams with proportion 1/N each, against one
stream of the same shard files (an index.json above the N folders listing all their shards, as
``data_prep merge`` writes it). Prints rows/s of both and rows per CPU-second (medians of ``--repeats`` passes, alternating which goes first, after one pass
that leaves the decompressed copies) and their ratios (the goal: >= 0.95). On a machine shared with
other jobs the CPU-second figure is the steadier one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def zipf_rows(rows: int, seq_len: int, vocab: int, seed: int = 0) -> np.ndarray:
    """(rows, seq_len) uint16 token ids drawn from a Zipf-like law: a few frequent ids, a long tail,
    like BPE text (so the shards compress like text does)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, vocab + 1)
    weights /= weights.sum()
    return rng.choice(vocab, size=(rows, seq_len), p=weights).astype(np.uint16)


def write_rows(folder: Path, rows: int, seq_len: int, vocab: int, tokens: np.ndarray | None = None) -> None:
    """``rows`` Zipf rows (or the given ``tokens``) as data_prep's MDS writer stores them (zstd, sha1)."""
    from data_prep import mds

    tokens = zipf_rows(rows, seq_len, vocab) if tokens is None else tokens
    with mds.open_writer(
        folder, dtype="uint16", seq_len=seq_len, compression="zstd", size_limit=1 << 26
    ) as w:
        for row in tokens:
            w.write({"tokens": row, "doc_starts": mds.doc_starts_column(np.array([0]), seq_len)})


def one_pass(folder: Path, seq_len: int, validate_hash: str | None) -> float:
    """Seconds to read every row through a fresh dataset (no shard hashed yet in this object)."""
    from pipeline.rows import packed_rows_dataset_class

    ds = packed_rows_dataset_class()(
        seq_len=seq_len,
        local=str(folder),
        split=None,
        shuffle=False,
        batch_size=1,
        validate_hash=validate_hash,
    )
    t0 = time.perf_counter()
    for i in range(ds.num_samples):
        ds[i]
    return time.perf_counter() - t0


def epoch_pass(seq_len: int, batch_size: int, **where) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, its prefetch threads included) to iterate one shuffled
    epoch of a fresh dataset over ``where`` (local=... or streams=...)."""
    from pipeline.rows import packed_rows_dataset_class

    ds = packed_rows_dataset_class()(seq_len=seq_len, shuffle=True, batch_size=batch_size, **where)
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(1 for _ in ds)
    assert n == ds.num_samples, (n, ds.num_samples)
    return time.perf_counter() - t0, time.process_time() - c0


def mixture_main(args) -> dict:
    """``--streams N``: rows/s of an N-stream mixture against one stream of the same rows."""
    from streaming import Stream

    from data_prep import mds

    n = args.streams
    per_stream = (args.rows or 6144) // n
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp) / "one"
        for i in range(n):
            tokens = zipf_rows(per_stream, args.seq_len, args.vocab, seed=i)
            write_rows(one / f"s{i}", per_stream, args.seq_len, args.vocab, tokens)
        # One stream of the same shard files: an index listing the N folders' shards (data_prep merge's).
        mds.write_merged_index(one, [(f"s{i}", mds.read_index(one / f"s{i}")) for i in range(n)])
        rows = n * per_stream
        shards = len(mds.read_index(one)["shards"])
        print(
            f"{rows} rows x {args.seq_len} tokens in {shards} shards: {n} streams of {per_stream} rows, and "
            f"one stream of the same {shards} shard files"
        )

        def streams():
            return [Stream(local=str(one / f"s{i}"), proportion=1 / n) for i in range(n)]

        kinds = {
            "one stream": lambda: epoch_pass(args.seq_len, args.batch_size, local=str(one)),
            f"{n} streams": lambda: epoch_pass(args.seq_len, args.batch_size, streams=streams()),
        }
        for run in kinds.values():  # decompress: the copies Streaming reads from then on
            run()
        times = {kind: [] for kind in kinds}
        for r in range(args.repeats):  # alternating which goes first
            for kind in list(kinds)[:: 1 if r % 2 == 0 else -1]:
                times[kind].append(kinds[kind]())
    rate = {kind: rows / statistics.median(w for w, _ in t) for kind, t in times.items()}
    per_cpu = {kind: rows / statistics.median(c for _, c in t) for kind, t in times.items()}
    one, mix = "one stream", f"{n} streams"
    for kind in (one, mix):
        print(
            f"{kind + ':':<13} {rate[kind]:,.0f} rows/s ({rate[kind] * args.seq_len / 1e6:.2f}M tokens/s), "
            f"{per_cpu[kind]:,.0f} rows per CPU-second (medians of {args.repeats})"
        )
    print(
        f"ratio: {rate[mix] / rate[one]:.3f} (rows/s), {per_cpu[mix] / per_cpu[one]:.3f} (rows per CPU-second)"
    )
    return {"rows": rows, "rows_per_s": rate, "rows_per_cpu_s": per_cpu, "ratio": rate[mix] / rate[one]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=None, help="rows in all (default 8192; 6144 with --streams)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--streams", type=int, default=1, help="N > 1: an N-stream mixture against one stream")
    p.add_argument("--batch-size", type=int, default=16, help="rows per device batch (--streams)")
    args = p.parse_args(argv)
    if args.streams > 1:
        mixture_main(args)
        return
    args.rows = args.rows or 8192
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "train"
        write_rows(folder, args.rows, args.seq_len, args.vocab)
        shards = sorted(folder.glob("*.zstd"))
        print(f"{args.rows} rows x {args.seq_len} tokens in {len(shards)} zstd shards")
        one_pass(folder, args.seq_len, None)  # decompress: the copies Streaming reads from then on
        times = {None: [], "sha1": []}
        for _ in range(args.repeats):
            for algo in times:
                times[algo].append(one_pass(folder, args.seq_len, algo))
        tokens = args.rows * args.seq_len
        plain, checked = (tokens / statistics.median(times[a]) for a in (None, "sha1"))
        print(f"without validate_hash: {plain / 1e6:.2f}M tokens/s (median of {args.repeats})")
        print(f"validate_hash: sha1:   {checked / 1e6:.2f}M tokens/s")
        print(f"ratio: {checked / plain:.3f}")


if __name__ == "__main__":
    main()
