"""Fixtures: a tiny tokenizer and MDS data folder written directly (no dependency on data_prep).

The corpus is synthetic and learnable: documents are arithmetic progressions of word ids
(start a, stride d in {1, 2, 3}, mod 60) separated by EOS, packed into rows of ``SEQ_LEN`` tokens.
The data folder follows data_prep's contract: ``train/`` and ``val/`` MDS datasets with columns
``tokens`` (uint16, SEQ_LEN) and ``doc_starts`` (uint32 positions, ``[SEQ_LEN]`` when a row has
none), plus ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

SEQ_LEN = 32
N_WORDS = 60
EOS = 0


def write_tokenizer(path: Path, n_words: int = N_WORDS) -> Path:
    """A word-level tokenizer: id 0 is <|endoftext|>, ids 1..n_words are w0..w{n-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": EOS, **{f"w{i}": i + 1 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def packed_rows(n_rows: int, seed: int, seq_len: int = SEQ_LEN) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rows of packed synthetic documents and each row's document start positions (some rows none)."""
    rng = np.random.default_rng(seed)
    stream, starts = [], []
    while len(stream) < n_rows * seq_len:
        a, d, n = rng.integers(0, N_WORDS), rng.integers(1, 4), rng.integers(6, 80)
        starts.append(len(stream))
        stream.extend(1 + (a + d * np.arange(n)) % N_WORDS)
        stream.append(EOS)
    tokens = np.asarray(stream[: n_rows * seq_len], dtype=np.uint16).reshape(n_rows, seq_len)
    starts = np.asarray(starts)
    row_starts = [
        starts[(starts >= r * seq_len) & (starts < (r + 1) * seq_len)] - r * seq_len for r in range(n_rows)
    ]
    return tokens, row_starts


def write_mds(folder: Path, tokens: np.ndarray, doc_starts: list[np.ndarray]) -> None:
    from streaming import MDSWriter

    columns = {"tokens": "ndarray:uint16", "doc_starts": "ndarray:uint32"}
    with MDSWriter(out=str(folder), columns=columns, size_limit=1 << 14) as w:
        for row, starts in zip(tokens, doc_starts):
            # MDS cannot store an empty array: a row inside one long document stores [seq_len].
            stored = starts if len(starts) else [len(row)]
            w.write({"tokens": row, "doc_starts": np.asarray(stored, dtype=np.uint32)})


def write_data_folder(
    root: Path, tokenizer: Path, train_rows: int = 256, val_rows: int = 32, seq_len: int = SEQ_LEN
) -> Path:
    """A data_prep-style folder: train/, val/, manifest.json."""
    from tokenizers import Tokenizer

    splits = {}
    for split, rows, seed in (("train", train_rows, 0), ("val", val_rows, 1)):
        tokens, starts = packed_rows(rows, seed, seq_len)
        write_mds(root / split, tokens, starts)
        splits[split] = {"rows": rows, "tokens": rows * seq_len}
    tok = Tokenizer.from_file(str(tokenizer))
    manifest = {
        "format": "bd3-data-prep-mds",
        "format_version": 1,
        "seq_len": seq_len,
        "dtype": "uint16",
        "tokenizer": {
            "source": str(tokenizer),
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "sha256": hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest(),  # data_prep's contract
            "eos_id": EOS,
        },
        "splits": splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, tokenizer.json). Read-only: streaming caches nothing when remote is None."""
    root = tmp_path_factory.mktemp("tiny_data")
    tok = write_tokenizer(root / "tokenizer" / "tokenizer.json")
    return write_data_folder(root / "data", tok), tok


REPO = Path(__file__).resolve().parents[3]
YAMLS = REPO / "yamls"


def tiny_overrides(data: Path, tokenizer: Path, save_folder: Path, *extra: str) -> list[str]:
    """Overrides that point yamls/bd3_tiny.yaml (or ar_tiny.yaml) at the fixture data."""
    return [
        f"variables.data_local={data}",
        f"variables.tokenizer={tokenizer}",
        f"variables.max_seq_len={SEQ_LEN}",
        f"variables.save_folder={save_folder}",
        "loggers.progress_bar=null",
        *extra,
    ]


@pytest.fixture
def one_thread():
    """Single-threaded torch: on a shared 2-core machine extra threads make tiny runs 10-100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
