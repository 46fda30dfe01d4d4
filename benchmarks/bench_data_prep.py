"""Benchmark: `data_prep convert` end to end against raw `tokenizers` encode_batch, same input, same cores.

    python -m benchmarks.bench_data_prep [--input FILES ...] [--workers W] [--repeat R]

(a) is the physical limit of the job: one `Tokenizer.encode_batch` call over every document,
with the Rust thread pool on all cores; (a') the same with `encode_batch_fast` (no offsets),
which is what convert's workers call. (b) is `convert` (reading, tokenizing in --workers
processes, packing, writing zstd MDS shards, manifest) on the same documents. Both rates count
the same tokens (the documents' tokens, without the EOS convert appends), so the ratio is the
fraction of the limit convert reaches. Trials alternate (a) and (b) and the best of each is kept,
because the machine may be shared; the load average is printed alongside, and so are tokens per
CPU-second (this process, its threads and its worker processes), which other load hardly moves.

Default input: the wikitext-2 files in /work/shared/data/wikitext-2 if present, split into
articles at their ' = Title = ' headers (written to a temporary .jsonl), else a generated corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import statistics
import tempfile
import time
from pathlib import Path

WIKITEXT = Path("/work/shared/data/wikitext-2")
_ARTICLE_HEADER = re.compile(r"^ = [^=].* = $")


def wikitext_articles(path: Path) -> list[str]:
    """The articles of a raw wikitext file: a new one starts at each level-1 ' = Title = ' line."""
    articles, lines = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if _ARTICLE_HEADER.match(line) and any(x.strip() for x in lines):
            articles.append("\n".join(lines).strip())
            lines = []
        lines.append(line)
    if any(x.strip() for x in lines):
        articles.append("\n".join(lines).strip())
    return articles


def generated_corpus(n_docs: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("etaoinshrdlucmfwypvbgkqjxz") for _ in range(rng.randint(2, 9)))
        for _ in range(5000)
    ]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(50, 1500))) + "." for _ in range(n_docs)]


def prepare_inputs(inputs: list[str] | None, tmp: Path) -> tuple[list[str], str]:
    """Input files convert reads, and a description. .txt inputs are split into wikitext articles."""
    if not inputs:
        inputs = [str(p) for p in sorted(WIKITEXT.glob("*.txt"))]
    docs, described = [], []
    for item in inputs:
        if item.endswith(".txt"):
            articles = wikitext_articles(Path(item))
            docs += articles
            described.append(f"{item} ({len(articles)} articles)")
        else:
            return inputs, ", ".join(inputs)
    if not docs:
        docs = generated_corpus()
        described = [f"generated corpus ({len(docs)} documents)"]
    path = tmp / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return [str(path)], "; ".join(described)


@contextlib.contextmanager
def _timer(trials: list):
    """Append (wall seconds, CPU seconds of this process and of the children it reaped) to `trials`."""

    def cpu() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    wall, cpu0 = time.perf_counter(), cpu()
    yield
    trials.append((time.perf_counter() - wall, cpu() - cpu0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", default=None, help="files (default: wikitext-2 or generated)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="cores for both (default: all)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: train a byte-level BPE)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=4, help="read the input this many times (default: 4)")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args(argv)
    # Explicit, so that (a) uses the Rust thread pool and forked workers are not warned about it.
    os.environ["TOKENIZERS_PARALLELISM"] = "true"

    from tokenizers import Tokenizer

    from data_prep import mds
    from data_prep.convert import convert
    from data_prep.sources import count_documents, iter_documents, resolve_inputs
    from data_prep.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files, described = prepare_inputs(args.input, tmp)
        files = files * args.repeat
        tok_path = args.tokenizer
        if tok_path is None:
            tok_path = str(tmp / "tokenizer.json")
            t = time.perf_counter()
            train_tokenizer(files[:1], args.vocab_size, tok_path, progress=False)
            print(f"trained a byte-level BPE, vocab {args.vocab_size}, in {time.perf_counter() - t:.1f} s")

        sources = resolve_inputs(files)
        counts = [count_documents(s) for s in sources]
        texts = [t for t, _ in iter_documents(sources, counts, 0, sum(counts)) if t and not t.isspace()]
        t = time.perf_counter()
        mds._packed_row_writer_class()  # imports streaming (torch, transformers): once per process
        import_s = time.perf_counter() - t

        raw, fast, conv = [], [], []  # (wall seconds, CPU seconds) per trial
        n_tokens = 0
        for trial in range(args.trials):
            tok = Tokenizer.from_file(tok_path)  # fresh: no warm word cache
            with _timer(raw):
                encodings = tok.encode_batch(texts, add_special_tokens=False)
            n_tokens = sum(len(e.ids) for e in encodings)
            del encodings
            tok = Tokenizer.from_file(tok_path)
            with _timer(fast):
                tok.encode_batch_fast(texts, add_special_tokens=False)
            with _timer(conv):
                result = convert(
                    files,
                    str(tmp / "out"),
                    tok_path,
                    args.seq_len,
                    workers=args.workers,
                    progress=False,
                    overwrite=True,
                )
            stats = result.manifest["splits"]["train"]
            assert stats["tokens"] - stats["documents"] == n_tokens, "convert tokenized different tokens"
            print(
                f"trial {trial}: encode_batch {n_tokens / raw[-1][0]:,.0f}, encode_batch_fast "
                f"{n_tokens / fast[-1][0]:,.0f}, convert {n_tokens / conv[-1][0]:,.0f} tokens/s "
                f"(load average {os.getloadavg()[0]:.1f})"
            )

    def rate(trials, pick=min, which=0):
        return n_tokens / pick(t[which] for t in trials)

    best_raw, best_fast, best_conv = rate(raw), rate(fast), rate(conv)
    print()
    print(f"input: {described} x{args.repeat}: {len(texts):,} documents, {n_tokens:,} tokens")
    print(
        f"machine: {os.cpu_count()} cores; workers/threads: {args.workers}; seq_len {args.seq_len}; "
        f"output {stats['rows']:,} rows, {stats['bytes'] / 2**20:.1f} MiB zstd"
    )
    for name, trials, best in (
        ("(a)  tokenizers encode_batch", raw, best_raw),
        ("(a') encode_batch_fast      ", fast, best_fast),
        ("(b)  data_prep convert      ", conv, best_conv),
    ):
        print(
            f"{name} {best:>12,.0f} tokens/s  (best of {args.trials}; median "
            f"{rate(trials, statistics.median):,.0f}; per CPU-second {rate(trials, min, 1):,.0f})"
        )
    print(f"ratio (b)/(a)                {best_conv / best_raw:>12.2f}   (target >= 0.85)")
    print(f"ratio (b)/(a')               {best_conv / best_fast:>12.2f}")
    print(
        f"ratio per CPU-second (b)/(a) {rate(conv, min, 1) / rate(raw, min, 1):>12.2f}   (insensitive to other load)"
    )
    print(f"one-time import of streaming (torch, transformers) not included: {import_s:.1f} s")


if __name__ == "__main__":
    main()
