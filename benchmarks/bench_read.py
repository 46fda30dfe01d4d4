"""Reading training rows with and without ``train_loader.validate_hash``.

    python -m benchmarks.bench_read [--rows 8192] [--seq-len 2048] [--repeats 3]

Writes rows with data_prep's own MDS writer (zstd shards of 64 MB before compression, sha1 recorded:
what ``data_prep convert`` writes; token ids drawn from a Zipf-like law over a 32k vocabulary, so
the shards compress like text does), reads every row once to leave Streaming's decompressed copies
beside the shards (as after a first epoch), then times full passes of a fresh ``PackedRowsDataset``
each, alternating without and with ``validate_hash="sha1"``. With the check on, the first read of each
shard in a process hashes its decompressed file. Prints tokens/s of both and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def write_rows(folder: Path, rows: int, seq_len: int, vocab: int) -> None:
    from data_prep import mds

    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, vocab + 1)  # Zipf: a few frequent ids, a long tail, like BPE text
    weights /= weights.sum()
    with mds.open_writer(
        folder, dtype="uint16", seq_len=seq_len, compression="zstd", size_limit=1 << 26
    ) as w:
        for _ in range(rows):
            tokens = rng.choice(vocab, size=seq_len, p=weights).astype(np.uint16)
            w.write({"tokens": tokens, "doc_starts": mds.doc_starts_column(np.array([0]), seq_len)})


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
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
