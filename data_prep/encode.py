"""Tokenizing batches of documents into flat token arrays, in worker processes, in corpus order.

Workers are forked (spawned where fork does not exist), each with its own tokenizer, and get
batches of raw records (undecoded jsonl lines, txt pieces, parquet values) in order: decoding,
JSON parsing and tokenizing all happen in the workers, so the parent does no work per character.
At most a few batches are in flight, so memory stays bounded. The same pool runs other tasks
(`submit`), such as compressing and writing shards.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from data_prep.batches import RecordBatch
from data_prep.formats import RowRef, decode_record, read_rows, read_spans
from data_prep.sources import Source
from data_prep.usage import peak_rss_mib


@dataclass
class Encoded:
    """A tokenized `RecordBatch`: `tokens`/`lengths` as from `encode_texts` (non-empty documents only)."""

    tokens: np.ndarray
    lengths: np.ndarray
    n_empty: int  # documents skipped as empty or all whitespace
    invalid: list[int]  # indices (in the batch) of records that were not valid UTF-8


def encode_records(
    tok: Tokenizer, batch: RecordBatch, eos_id: int, bos_id: int | None, dtype: str
) -> Encoded:
    """Decode the raw records of `batch`, skip empty documents and tokenize the rest."""
    texts, invalid, n_empty = [], [], 0
    bounds = [start for start, _, _ in batch.segments[1:]] + [len(batch.records)]
    for (start, path, kind), stop in zip(batch.segments, bounds):
        raws = batch.records[start:stop]
        if raws and isinstance(raws[0], RowRef):
            raws = read_rows(Source(path, kind), batch.text_field, raws)
        elif raws and isinstance(raws[0], tuple):
            raws = read_spans(path, raws)
        for i, raw in enumerate(raws, start):
            text, bad = decode_record(kind, raw, batch.text_field, path, batch.numbers[i])
            if bad:
                invalid.append(i)
            if not text or text.isspace():
                n_empty += 1
            else:
                texts.append(text)
    tokens, lengths = encode_texts(tok, texts, eos_id, bos_id, dtype)
    return Encoded(tokens, lengths, n_empty, invalid)


# Texts per `encode_batch_fast` call: the Rust encodings of a call (about 100 bytes a token) are
# the largest thing a worker holds, so a big batch is tokenized a slice at a time.
ENCODE_CHARS = 1 << 18


def encode_texts(
    tok: Tokenizer, texts: list[str], eos_id: int, bos_id: int | None, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize `texts` (no added special tokens), wrap each as [BOS] ids EOS, concatenate.

    `tok` should encode special-token strings as text (`encoding_tokenizer`). Returns (tokens,
    lengths): tokens is 1-D of `dtype` and length lengths.sum(); lengths[i] is the number of
    tokens of document i including its EOS (and BOS).
    """
    extra = 1 if bos_id is None else 2
    pieces, piece_lengths = [], []
    lo = 0
    while lo < len(texts):
        hi, chars = lo, 0
        while hi < len(texts) and (chars < ENCODE_CHARS or hi == lo):
            chars += len(texts[hi])
            hi += 1
        encodings = tok.encode_batch_fast(texts[lo:hi], add_special_tokens=False)
        lengths = np.fromiter((len(e) + extra for e in encodings), dtype=np.int64, count=len(encodings))
        tokens = np.empty(int(lengths.sum()), dtype=dtype)
        pos = 0
        for i, e in enumerate(encodings):
            # One document's ids as Python ints at a time, each encoding freed once copied.
            encodings[i] = None
            if bos_id is not None:
                tokens[pos] = bos_id
                pos += 1
            n = len(e)
            tokens[pos : pos + n] = e.ids
            pos += n
            tokens[pos] = eos_id
            pos += 1
        pieces.append(tokens)
        piece_lengths.append(lengths)
        lo = hi
    if not pieces:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    if len(pieces) == 1:
        return pieces[0], piece_lengths[0]
    return np.concatenate(pieces), np.concatenate(piece_lengths)


def encoding_tokenizer(tok: Tokenizer) -> Tokenizer:
    """`tok`, set to encode special-token strings found in a document (say a web page quoting
    "<|endoftext|>") as ordinary text, so that only data_prep places EOS/BOS ids."""
    tok.encode_special_tokens = True
    return tok


# State of a worker process, set once by _init_worker.
_worker: dict = {}


def _init_worker(tok: Tokenizer, eos_id: int, bos_id: int | None, dtype: str, parent_pid: int) -> None:
    # One process per core: Rust's own thread pool would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C reaches the whole process group; the parent handles it and shuts the workers down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Again: a spawned worker gets a pickled copy without the setting.
    _worker.update(tok=encoding_tokenizer(tok), eos_id=eos_id, bos_id=bos_id, dtype=dtype)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_when_orphaned(parent_pid: int) -> None:
    # A worker blocks on its task queue, which it holds both ends of: when the parent is
    # SIGKILLed nothing wakes it, so it polls for its parent instead.
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _encode_in_worker(batch: RecordBatch) -> Encoded:
    w = _worker
    return encode_records(w["tok"], batch, w["eos_id"], w["bos_id"], w["dtype"])


def _warm_up() -> None:
    pass


class OrderedEncoder:
    """Encode batches with `workers` processes (in-process when 1); results in input order.

    At most `2 * workers + 1` batches are in flight, so reading never runs ahead of tokenizing
    by more than a few batches (the corpus is never held in memory). A worker that dies
    (e.g. killed for memory) fails the run with BrokenProcessPool instead of hanging it.
    """

    def __init__(self, tok: Tokenizer, eos_id: int, bos_id: int | None, dtype: str, workers: int):
        # The encoder owns `tok` from here: it encodes special-token strings in the text as text.
        self.tok = tok = encoding_tokenizer(tok)
        self.eos_id, self.bos_id, self.dtype = eos_id, bos_id, dtype
        self.workers = workers
        self.pool = None
        self.worker_peak_rss_mib = 0.0  # the largest worker's, known after close()
        if workers > 1:
            # fork where there is one: workers start in milliseconds and, unlike spawn, do not
            # re-import the caller's __main__ (which may be a script without a main guard, or
            # import torch). Forked workers use the parent's tokenizer object as inherited: no
            # parsing per worker, and its vocabulary and merges stay one copy in memory (and in
            # the CPU caches) for all of them. That is safe because the parent never encodes
            # with it (no lock held, Rust's thread pool never started) and workers never use
            # Rust's thread pool (TOKENIZERS_PARALLELISM=false).
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = ProcessPoolExecutor(
                workers,
                mp_context=mp.get_context(method),
                initializer=_init_worker,
                initargs=(tok, eos_id, bos_id, dtype, os.getpid()),
            )
            # The first submit forks the workers: do it now, before the caller starts threads.
            self.pool.submit(_warm_up)

    def map(self, batches: Iterable[RecordBatch]) -> Iterator[tuple[RecordBatch, Encoded]]:
        """Yield (batch, encoded) for each batch, in order (see `encode_records`)."""
        if self.pool is None:
            for batch in batches:
                yield batch, encode_records(self.tok, batch, self.eos_id, self.bos_id, self.dtype)
            return
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, self.pool.submit(_encode_in_worker, batch)))
            if len(pending) > 2 * self.workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()

    def submit(self, fn: Callable, *args) -> Future:
        """Run `fn(*args)` in a worker (here, at once, without workers); `fn` must be picklable."""
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to the future, as the pool would
            future.set_exception(exc)
        return future

    def close(self) -> None:
        if self.pool is not None:
            for pid in list(getattr(self.pool, "_processes", None) or {}):
                self.worker_peak_rss_mib = max(self.worker_peak_rss_mib, peak_rss_mib(pid) or 0.0)
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> OrderedEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
