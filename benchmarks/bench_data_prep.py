"""Benchmark: `python -m data_prep convert` against raw `tokenizers` encode_batch, same text, same cores.

    python -m benchmarks.bench_data_prep [--tokens 50_000_000] [--case web|wikitext] [--input FILES ...]
                                         [--tokenizer TOK.json] [--vocab-size 49152] [--workers W]

(a) is the limit of the job: `Tokenizer.encode_batch` with the Rust thread pool on all cores,
over texts already in memory (in calls of 2,000 documents, so that 50M tokens of `Encoding`
objects never sit in memory at once). (b) is the real command line, `python -m data_prep convert`
in a fresh process (start-up, counting, reading, decoding, tokenizing in --workers processes,
packing, writing zstd MDS shards, manifest) on the same documents. Both count the same tokens (the
documents' tokens, without the EOS convert appends). Two ratios are printed: end to end (the whole
process, start-up included) and over the tokenization phase (from the first document read to
the end). Trials alternate (a) and (b) and the best of each is kept, because the machine may be
shared; tokens per CPU-second are printed too, which other load hardly moves.

Also printed: start-up (`python -m data_prep --help`, and when convert read its first document),
the CPU seconds per million tokens of convert's parent process and of its workers, from them the
tokens/s projected for 16 and 64 cores, and peak RSS of the run and of a run on a tenth of the
corpus (memory must not grow with the corpus).

Corpora (written to a temporary folder, never to the repository):
- web (default): shaped like OpenWebText: many documents whose lengths follow a log-normal
  distribution (median 700 tokens, sigma 0.9, clipped to 200-5,000 tokens), cut at line
  boundaries from the Python sources of the installed packages (sorted, so the same on every
  machine with the same packages), read in order until --tokens tokens.
- wikitext: the articles of WikiText-2 (/work/shared/data/wikitext-2, 122 long articles)
  repeated up to --tokens: few, long documents.
Default tokenizer: a byte-level BPE of --vocab-size tokens trained by `data_prep tokenizer train`
on the first 20 MB of the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

WIKITEXT = Path("/work/shared/data/wikitext-2")
_ARTICLE_HEADER = re.compile(r"^ = [^=].* = $")
CHARS_PER_TOKEN = 4.2  # of the web corpus with a 49k BPE trained on it; only to cut documents
ENCODE_CALL_DOCS = 2000


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


def web_like_documents(n_tokens: int, seed: int = 0):
    """Yield documents of web-text lengths cut from the installed packages' Python sources.

    Target lengths (tokens) are log-normal, median 700, sigma 0.9, clipped to [200, 5000]; a
    document ends at the first line boundary past its target (estimated as CHARS_PER_TOKEN
    characters per token). Lines over 2,000 characters (generated data) are left out.
    """
    rng = np.random.default_rng(seed)

    def target() -> int:
        return int(np.clip(rng.lognormal(np.log(700), 0.9), 200, 5000) * CHARS_PER_TOKEN)

    chars, budget = 0, n_tokens * CHARS_PER_TOKEN
    lines, size, want = [], 0, target()
    for path in sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for line in text.splitlines(keepends=True):
            if len(line) > 2000:
                continue
            lines.append(line)
            size += len(line)
            if size >= want:
                yield "".join(lines)
                chars += size
                if chars >= budget:
                    return
                lines, size, want = [], 0, target()
    raise SystemExit(f"the installed packages hold fewer than {n_tokens:,} tokens of sources")


def write_corpus(case: str, n_tokens: int, path: Path) -> str:
    """Write the corpus as jsonl; returns a description."""
    if case == "web":
        docs = web_like_documents(n_tokens)
        described = "web-shaped documents cut from the installed packages' Python sources"
    else:
        articles = [a for p in sorted(WIKITEXT.glob("*.txt")) for a in wikitext_articles(p)]
        if not articles:
            raise SystemExit(f"no WikiText-2 in {WIKITEXT}")
        per_round = sum(len(a) for a in articles) / CHARS_PER_TOKEN
        rounds = max(1, round(n_tokens / per_round))
        docs = (a for _ in range(rounds) for a in articles)
        described = f"WikiText-2 test+valid, {len(articles)} articles x{rounds}"
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return described


def _cpu() -> tuple[float, float]:
    import resource

    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, ch.ru_utime + ch.ru_stime


def raw_encode(tok_path: str, texts: list[str]) -> tuple[float, float, np.ndarray]:
    """(wall s, CPU s, tokens per document) of encode_batch over `texts` with a fresh tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_path)  # fresh: no warm word cache
    lengths = []
    wall, cpu = time.perf_counter(), _cpu()[0]
    for i in range(0, len(texts), ENCODE_CALL_DOCS):
        encodings = tok.encode_batch(texts[i : i + ENCODE_CALL_DOCS], add_special_tokens=False)
        lengths += [len(e.ids) for e in encodings]
        del encodings
    return time.perf_counter() - wall, _cpu()[0] - cpu, np.array(lengths)


_USAGE = re.compile(
    r"CPU: parent (?P<parent>[\d.]+) s .*start-up (?P<startup>[\d.]+) s more\), workers (?P<workers>[\d.]+) s "
    r".*peak RSS parent "
    r"(?P<rss_parent>[\d.]+) MiB, largest worker (?P<rss_worker>[\d.]+) MiB"
    r"(; first document read (?P<first>[\d.]+) s)?"
)


def run_convert(args: list[str]) -> dict:
    """Run the CLI in a fresh process; its wall time, CPU split, peak RSS and first-document time."""
    cmd = [sys.executable, "-m", "data_prep", "convert", *args, "--no-progress", "--overwrite"]
    wall = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - wall
    if proc.returncode != 0:
        raise SystemExit(f"convert failed:\n{proc.stdout}\n{proc.stderr}")
    m = _USAGE.search(proc.stdout)
    if not m:
        raise SystemExit(f"no usage line in convert's output:\n{proc.stdout}")
    tokens = int(re.search(r"^train\s+[\d,]+\s+([\d,]+)", proc.stdout, re.M).group(1).replace(",", ""))
    return {
        "wall": wall,
        "tokens_with_eos": tokens,
        **{k: float(v) for k, v in m.groupdict().items() if v is not None},
    }


def startup_s() -> float:
    """Best wall seconds of `python -m data_prep --help` over 3 runs."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "data_prep", "--help"], capture_output=True, check=True)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=("web", "wikitext"), default="web")
    parser.add_argument("--input", default=None, help="a .jsonl corpus instead of --case")
    parser.add_argument("--tokens", type=float, default=50e6, help="corpus size (default: 50M tokens)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="cores for both (default: all)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: train a byte-level BPE)")
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument(
        "--small", type=float, default=0.1, help="memory check: also convert this fraction (0: skip)"
    )
    args = parser.parse_args(argv)
    # The Rust pool of (a) gets exactly the cores convert gets as worker processes.
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        if args.input:
            corpus, described = Path(args.input), args.input
        else:
            corpus = tmp / "corpus.jsonl"
            described = write_corpus(args.case, int(args.tokens), corpus)
        with open(corpus, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        print(f"corpus: {described}: {len(texts):,} documents ({time.perf_counter() - t:.0f} s to build)")
        tok_path = args.tokenizer
        if tok_path is None:
            from data_prep.tokenizer import train_tokenizer

            tok_path = str(tmp / "tokenizer.json")
            sample = tmp / "sample.jsonl"
            with open(corpus, "rb") as f, open(sample, "wb") as out:
                out.writelines(f.readlines(20 << 20))
            t = time.perf_counter()
            info = train_tokenizer([str(sample)], args.vocab_size, tok_path, progress=False)
            print(
                f"trained a byte-level BPE of {info.vocab_size:,} tokens in {time.perf_counter() - t:.0f} s"
            )

        common = ["--tokenizer", tok_path, "--seq-len", str(args.seq_len), "--workers", str(args.workers)]
        raw, conv = [], []
        lengths = np.zeros(0)
        for trial in range(args.trials):
            wall, cpu, lengths = raw_encode(tok_path, texts)
            raw.append((wall, cpu))
            n_tokens = int(lengths.sum())
            print(
                f"trial {trial}: encode_batch {n_tokens / wall:,.0f} tokens/s (load {os.getloadavg()[0]:.1f})"
            )
            c0 = _cpu()[1]
            result = run_convert(["--input", str(corpus), "--out", str(tmp / "out"), *common])
            result["cpu_total"] = _cpu()[1] - c0
            conv.append(result)
            assert result["tokens_with_eos"] - len(lengths) == n_tokens, "convert tokenized other tokens"
            print(f"trial {trial}: convert {n_tokens / result['wall']:,.0f} tokens/s end to end")
        small = None
        if args.small:
            n_small = int(len(texts) * args.small)
            small = run_convert(
                ["--input", str(corpus), "--out", str(tmp / "small"), "--max-docs", str(n_small), *common]
            )
            small["tokens"] = int(lengths[:n_small].sum())
        del texts
    help_s = startup_s()
    report(args, described, lengths, raw, conv, small, help_s)


def report(args, described, lengths, raw, conv, small, help_s) -> None:
    n_tokens = int(lengths.sum())
    best_raw = min(raw)
    best = min(conv, key=lambda r: r["wall"])
    raw_rate = n_tokens / best_raw[0]
    e2e = n_tokens / best["wall"]
    phase = n_tokens / (best["wall"] - best.get("first", 0.0))
    pct = np.percentile(lengths, [5, 25, 50, 75, 95]).astype(int).tolist()
    print()
    print(f"input: {described}")
    print(
        f"  {len(lengths):,} documents, {n_tokens:,} tokens; tokens per document: mean {lengths.mean():,.0f}, "
        f"min {lengths.min():,}, p5/p25/p50/p75/p95 {pct}, max {lengths.max():,}"
    )
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; workers / Rust threads: "
        f"{args.workers}; seq_len {args.seq_len}"
    )
    print(
        f"(a) encode_batch          {raw_rate:>12,.0f} tokens/s   {n_tokens / best_raw[1]:>10,.0f} per CPU-second"
        f"  (best of {len(raw)}; median {n_tokens / statistics.median(w for w, _ in raw):,.0f})"
    )
    print(
        f"(b) convert, end to end   {e2e:>12,.0f} tokens/s   {n_tokens / best['cpu_total']:>10,.0f} per CPU-second"
    )
    print(f"(b) convert, tokenization {phase:>12,.0f} tokens/s   (from the first document read to the end)")
    print(f"ratio (b)/(a) end to end        {e2e / raw_rate:6.2f}   (goal >= 0.85)")
    print(f"ratio (b)/(a) tokenization      {phase / raw_rate:6.2f}   (goal >= 0.85)")
    print(
        f"ratio per CPU-second (b)/(a)    {best_raw[1] / best['cpu_total']:6.2f}   (convert's start-up "
        "included; insensitive to other load)"
    )
    print(
        f"start-up: `python -m data_prep --help` {help_s:.2f} s; convert read its first document "
        f"{best.get('first', float('nan')):.2f} s after its start (goal: both < 1 s), having used "
        f"{best['startup']:.2f} CPU-seconds"
    )
    parent, workers = best["parent"] * 1e6 / n_tokens, best["workers"] * 1e6 / n_tokens
    share = parent / (parent + workers)
    print(
        f"CPU per million tokens: parent {parent:.3f} s, workers {workers:.3f} s; parent share {share:.2%} "
        f"(goal < {1 / 64:.2%}, i.e. 1/64)"
    )
    for cores in (16, 64):
        # Workers on every core; the parent can feed at most 1/parent tokens per second.
        projected = min(cores / (parent + workers), 1 / parent) * 1e6
        limit = "the parent" if cores / (parent + workers) > 1 / parent else "tokenization"
        print(f"projected at {cores} cores: {projected:,.0f} tokens/s (limited by {limit})")
    print(
        f"peak RSS: parent {best['rss_parent']:.0f} MiB, largest worker {best['rss_worker']:.0f} MiB "
        f"({n_tokens / 1e6:.0f}M tokens)"
    )
    if small:
        print(
            f"peak RSS: parent {small['rss_parent']:.0f} MiB, largest worker {small['rss_worker']:.0f} MiB "
            f"({small['tokens'] / 1e6:.1f}M tokens); ratio {best['rss_parent'] / small['rss_parent']:.2f} / "
            f"{best['rss_worker'] / small['rss_worker']:.2f} (goal: within 1.20)"
        )


if __name__ == "__main__":
    main()
