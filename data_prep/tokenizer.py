"""Loading a `tokenizers` tokenizer with its EOS/BOS ids, and training a byte-level BPE offline."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer

from data_prep.errors import DataPrepError
from pipeline.hf_names import TOKENIZER_FILE

# Tried in order when the tokenizer's folder does not name its EOS/BOS token.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>")

# Reserved by `train_tokenizer` at ids 0 and 1: EOS, and the diffusion mask token.
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"


@dataclass(frozen=True)
class TokenizerInfo:
    """What the manifest records about the tokenizer; `sha256` is of its JSON serialization."""

    source: str
    sha256: str
    vocab_size: int
    eos_token: str
    eos_id: int
    bos_token: str | None
    bos_id: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def load_tokenizer(
    source: str, *, eos_token: str | None = None, bos: bool = False
) -> tuple[Tokenizer, TokenizerInfo]:
    """Load a tokenizer from a tokenizer.json file, a local HF model folder, or a hub model name.

    EOS (always needed) and BOS (only with `bos=True`) come from `eos_token`, else from the
    folder's tokenizer_config.json / special_tokens_map.json, else from well-known token names.
    """
    path = Path(source)
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise DataPrepError(
                f"tokenizer folder {source} has no {TOKENIZER_FILE} (only fast tokenizers are supported)"
            )
        file, config_dir = path / TOKENIZER_FILE, path
    elif path.is_file():
        file, config_dir = path, path.parent if path.name == TOKENIZER_FILE else None
    elif source.endswith(".json") or source.startswith(("/", ".", "~")):
        raise DataPrepError(f"tokenizer file or folder not found: {source}")
    else:
        file = config_dir = None

    try:
        tok = Tokenizer.from_file(str(file)) if file else Tokenizer.from_pretrained(source)
    except Exception as exc:  # tokenizers raises bare Exceptions for parse and network errors
        where = str(file) if file else f"the hub model {source!r} (no such local file or folder either)"
        raise DataPrepError(f"cannot load tokenizer from {where}: {exc}") from exc

    named = _special_tokens_from_config(config_dir) if config_dir else {}
    eos_token, eos_id = _pick_token(
        tok, "EOS", eos_token, named.get("eos_token"), EOS_CANDIDATES, source, "--eos-token"
    )
    bos_token = bos_id = None
    if bos:
        bos_token, bos_id = _pick_token(
            tok, "BOS", None, named.get("bos_token"), BOS_CANDIDATES, source, None
        )
    info = TokenizerInfo(
        source=source,
        sha256=tokenizer_sha256(tok),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eos_token=eos_token,
        eos_id=eos_id,
        bos_token=bos_token,
        bos_id=bos_id,
    )
    return tok, info


def tokenizer_sha256(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's JSON serialization (stable across processes and runs)."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def _special_tokens_from_config(folder: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    # tokenizer_config.json wins over special_tokens_map.json, as in transformers.
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataPrepError(f"cannot read {file}: {exc}") from exc
        for key in ("eos_token", "bos_token"):
            value = config.get(key)
            if isinstance(value, dict):  # {"content": "</s>", "lstrip": false, ...}
                value = value.get("content")
            if isinstance(value, str) and value:
                found[key] = value
    return found


def _pick_token(
    tok: Tokenizer,
    what: str,
    override: str | None,
    configured: str | None,
    candidates: Sequence[str],
    source: str,
    flag: str | None,
) -> tuple[str, int]:
    if override is not None:
        token_id = tok.token_to_id(override)
        if token_id is None:
            raise DataPrepError(f"{flag} {override!r} is not in the vocabulary of tokenizer {source}")
        return override, token_id
    for token in ([configured] if configured else []) + list(candidates):
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token, token_id
    hint = f"; name it with {flag}" if flag else ""
    raise DataPrepError(f"tokenizer {source} has no {what} token (tried {[configured, *candidates]}){hint}")


def train_tokenizer(
    inputs: Sequence[str],
    vocab_size: int,
    out: str,
    *,
    text_field: str = "text",
    doc_sep: str | None = None,
    min_frequency: int = 2,
    progress: bool = True,
) -> TokenizerInfo:
    """Train a byte-level BPE on the documents of `inputs` and write it to `out` (tokenizer.json).

    `<|endoftext|>` (id 0) and `<|mask|>` (id 1) are reserved. Deterministic for the same input.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from data_prep.sources import count_documents, iter_documents, resolve_inputs

    specials = [EOS_TOKEN, MASK_TOKEN]
    min_vocab = len(specials) + 256
    if vocab_size < min_vocab:
        raise DataPrepError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {min_vocab}"
        )
    sources = resolve_inputs(inputs)
    counts = [count_documents(s, text_field=text_field, doc_sep=doc_sep) for s in sources]
    total = sum(counts)
    if total == 0:
        raise DataPrepError(f"the inputs hold no documents: {list(inputs)}")
    texts = (
        text
        for text, _ in iter_documents(sources, counts, 0, total, text_field=text_field, doc_sep=doc_sep)
        if text and not text.isspace()
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=total)
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, out)
    _, info = load_tokenizer(out)
    return info
