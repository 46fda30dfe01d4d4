"""Tiny corpora and a tiny tokenizer, built in tmp folders; and independent reference computations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_prep import mds

EOS = "<|endoftext|>"


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Documents of very different lengths (some longer than a row, some empty), with non-ASCII text."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "tu", "ré", "zo", "an", "pe", "qu", "—", "ñu", "é", "x"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(150)]
    docs = []
    for i in range(n):
        if i % 17 == 5:
            docs.append("")
            continue
        length = rng.choice([1, 3, 8, 20, 40, 90, 250])
        text = " ".join(rng.choice(words) for _ in range(length))
        docs.append(text + ("." if i % 3 else "\nNew line, and digits 1234."))
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc}) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    """A byte-level BPE (vocab 400) trained directly with `tokenizers`, EOS at id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS, "<|mask|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_docs(300, seed=1), trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def tok(tokenizer_path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_path))


@pytest.fixture
def docs() -> list[str]:
    return make_docs(120)


@pytest.fixture
def corpus(tmp_path, docs) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", docs)


def reference_stream(
    tok: Tokenizer, docs: list[str], bos_id: int | None = None
) -> tuple[list[int], list[int]]:
    """The token stream of `docs` (each tokenized alone, then EOS) and where each document starts.

    Special-token strings inside a document are ordinary text: only EOS/BOS ids added here are special.
    """
    eos_id = tok.token_to_id(EOS)
    tok = Tokenizer.from_str(tok.to_str())
    tok.encode_special_tokens = True
    stream, starts = [], []
    for doc in docs:
        if not doc.strip():
            continue
        starts.append(len(stream))
        stream += (
            ([bos_id] if bos_id is not None else [])
            + tok.encode(doc, add_special_tokens=False).ids
            + [eos_id]
        )
    return stream, starts


def read_rows(split_dir: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """All rows of an MDS split in order: (rows, seq_len) tokens, and each row's document starts."""
    index = mds.read_index(split_dir)
    seq_len = None
    tokens, starts = [], []
    for shard in index["shards"]:
        t, s = mds.read_shard(split_dir, shard)
        tokens += t
        if t:
            seq_len = len(t[0])
        starts += [mds.doc_starts_from_column(c, len(t[0])) for c in s]
    if not tokens:
        return np.zeros((0, seq_len or 0), np.int64), []
    return np.stack(tokens), starts


def file_states(folder: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file under `folder`."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file()
    }
