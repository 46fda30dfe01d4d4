"""What the tests and benchmarks build from: one factory for each fixture, plain functions (no pytest).

- ``tiny_model_config`` / ``random_model``: a random-init ``BD3LM`` (mask token appended, vocabulary
  padded to a multiple of 64), 64 wide and 2 layers unless told otherwise.
- ``write_tiny_hf_checkpoint``: a ``transformers`` LLaMA/Qwen2/Mistral folder written offline.
- ``write_tiny_export``: such a checkpoint exported by ``pipeline.hf_artifact`` (the transformers
  folder with modeling code and card); ``card_table_rows`` reads a card's likelihood table.
- ``write_tokenizer``, ``packed_rows``, ``write_data_folder``, ``write_manifest``: a data_prep-style
  output (MDS splits and manifest.json) written directly, so the training tests do not depend on
  data_prep's code; ``tiny_data_folder`` is the training tests' (``tiny_data``); ``write_stream_folder``
  another compatible folder for mixtures (``mixture_overrides``), whose rows ``rows_by_content`` tells apart.

Benchmarks import them too (``python -m benchmarks.x`` from the repository root). ``streaming``,
``tokenizers`` and ``transformers`` are imported where they are used: each costs seconds.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch

from pipeline.hf_artifact import write_artifact
from pipeline.model import BD3LM, ModelConfig, from_pretrained

# -- models -------------------------------------------------------------------------------------
TINY_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256,
)  # fmt: skip
TINY_HF = dict(  # config.json fields of the tiny Hugging Face checkpoints
    TINY_SHAPE, vocab_size=250, rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)  # fmt: skip


def tiny_model_config(base_vocab_size: int = TINY_HF["vocab_size"], **fields) -> ModelConfig:
    """A ``ModelConfig`` for a model trained from scratch: mask token ``base_vocab_size``, vocabulary
    padded to a multiple of 64, ``TINY_SHAPE`` (intermediate 2 x hidden) unless ``fields`` say
    otherwise."""
    hidden = fields.get("hidden_size", TINY_SHAPE["hidden_size"])
    return ModelConfig(
        **{
            **TINY_SHAPE,
            "intermediate_size": 2 * hidden,
            "vocab_size": -(-(base_vocab_size + 1) // 64) * 64,
            "base_vocab_size": base_vocab_size,
            "mask_token_id": base_vocab_size,
            **fields,
        }
    )


def random_model(
    config: ModelConfig,
    seed: int = 0,
    *,
    attn_backend: str = "sdpa",
    activation_checkpointing: bool = False,
    norm_std: float = 0.0,
    logit_scale: float = 1.0,
    device="cpu",
) -> BD3LM:
    """``BD3LM(config)`` with ``init_weights`` drawn from a generator seeded ``seed`` (train mode).

    Args:
        attn_backend, activation_checkpointing: how the model runs (``BD3LM``; SDPA, exact on CPU, by
            default).
        norm_std: RMSNorm weights get N(0, norm_std) added (same generator), so that norms matter.
        logit_scale: the output layer is multiplied by it; a large scale gives peaked distributions,
            so that confidence-based samplers make choices.
    """
    with torch.device(device):
        model = BD3LM(config, attn_backend=attn_backend, activation_checkpointing=activation_checkpointing)
    g = torch.Generator(device).manual_seed(seed)
    model.init_weights(generator=g)
    with torch.no_grad():
        if norm_std:
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(norm_std * torch.randn(p.shape, generator=g, device=device))
        if logit_scale != 1.0:
            model.lm_head.weight.mul_(logit_scale)
    return model


def _hf_classes(arch: str):
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[arch]


def write_tiny_hf_checkpoint(
    path, arch: str = "llama", seed: int = 0, weight_std: float | None = 0.15, **config_overrides
):
    """Save a random tiny ``transformers`` model of ``arch`` (``TINY_HF`` + overrides) under ``path``.

    With ``weight_std`` (the default) every weight is redrawn at that large scale and norms at
    1 + N(0, 0.2), so that a wrong rotary frequency, a missing bias or a swapped projection moves the
    logits far beyond a float32 tolerance; ``weight_std=None`` keeps ``transformers``' own init.
    Returns (path, the float32 model in eval mode).
    """
    config_cls, model_cls = _hf_classes(arch)
    config = config_cls(**{**TINY_HF, **config_overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    if weight_std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(weight_std * torch.randn_like(p))
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path, model


# -- transformers exports (pipeline.hf_artifact) -------------------------------------------------
TINY_EXPORT_CONFIGS = {  # the shapes exported for transformers: Qwen2 ties its embeddings
    "llama": {},
    "qwen2": {"tie_word_embeddings": True},
    "mistral": {"sliding_window": 128},
}


def write_tiny_export(root, arch: str, block_size: int = 4, facts=None):
    """(pipeline's BD3LM in eval mode, the folder ``write_artifact`` wrote) for a tiny ``arch`` checkpoint
    with a tokenizer of exactly its vocabulary (so the mask token is the tokenizer's next id)."""
    ckpt, _ = write_tiny_hf_checkpoint(root / "ar", arch, **TINY_EXPORT_CONFIGS[arch])
    write_tokenizer(ckpt / "tokenizer.json", n_words=TINY_HF["vocab_size"] - 1)
    model = from_pretrained(ckpt, block_size=block_size).eval()
    return model, write_artifact(model, root / "export", facts)


def card_table_rows(card: str) -> list[list[str]]:
    """The cells of the likelihood table's rows in a model card."""
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in card.splitlines()
        if re.match(r"\| \d", line)
    ]


# -- data_prep output ---------------------------------------------------------------------------
SEQ_LEN = 32  # rows of the tiny training data
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


def packed_rows(
    n_rows: int, seed: int, seq_len: int = SEQ_LEN, strides: tuple[int, ...] = (1, 2, 3)
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A learnable synthetic corpus packed into rows: (tokens (n_rows, seq_len) uint16, each row's
    document start positions, some rows none).

    Documents are arithmetic progressions of word ids (start a, stride d in ``strides``, mod N_WORDS),
    each followed by EOS.
    """
    rng = np.random.default_rng(seed)
    stream, starts = [], []
    while len(stream) < n_rows * seq_len:
        a, d, n = rng.integers(0, N_WORDS), strides[rng.integers(0, len(strides))], rng.integers(6, 80)
        starts.append(len(stream))
        stream.extend(1 + (a + d * np.arange(n)) % N_WORDS)
        stream.append(EOS)
    tokens = np.asarray(stream[: n_rows * seq_len], dtype=np.uint16).reshape(n_rows, seq_len)
    starts = np.asarray(starts)
    row_starts = [
        starts[(starts >= r * seq_len) & (starts < (r + 1) * seq_len)] - r * seq_len for r in range(n_rows)
    ]
    return tokens, row_starts


def write_mds(
    folder: Path,
    tokens: np.ndarray,
    doc_starts,
    compression: str | None = None,
    size_limit: int = 1 << 14,
    hashes: list[str] | None = None,
) -> None:
    """One MDS split in data_prep's row format: ``tokens`` (uint16) and ``doc_starts`` (uint32);
    ``compression="zstd"`` and ``hashes=["sha1"]`` store it as ``data_prep convert`` does."""
    from streaming import MDSWriter

    # The tokens encoding leaves out the row length (data_prep writes "ndarray:uint16:<seq_len>"):
    # the training code accepts both, and the shard bytes of the tests' data stay as they were.
    columns = {"tokens": f"ndarray:{tokens.dtype}", "doc_starts": "ndarray:uint32"}
    with MDSWriter(
        out=str(folder), columns=columns, compression=compression, size_limit=size_limit, hashes=hashes
    ) as w:
        for row, starts in zip(tokens, doc_starts):
            # MDS cannot store an empty array: a row inside one long document stores [seq_len].
            stored = starts if len(starts) else [len(row)]
            w.write({"tokens": row, "doc_starts": np.asarray(stored, dtype=np.uint32)})


def write_manifest(
    root: Path,
    seq_len: int,
    split_rows: dict[str, int],
    tokenizer: Path | None = None,
    vocab_size: int | None = None,
    dtype: str = "uint16",
) -> Path:
    """manifest.json of a finished data_prep output: what ``pipeline.trainer.run_inputs`` checks
    (format, seq_len, dtype, the tokenizer's vocab_size and sha256, rows per split).

    Without ``tokenizer`` only ``vocab_size`` is recorded about it.
    """
    recorded: dict = {"vocab_size": vocab_size}
    if tokenizer is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer))
        recorded = {
            "source": str(tokenizer),
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "sha256": hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest(),  # data_prep's contract
            "eos_id": tok.token_to_id("<|endoftext|>"),
        }
    manifest = {
        "format": "bd3-data-prep-mds",
        "format_version": 1,
        "seq_len": seq_len,
        "dtype": dtype,
        "tokenizer": recorded,
        "splits": {split: {"rows": rows, "tokens": rows * seq_len} for split, rows in split_rows.items()},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def write_data_folder(
    root: Path,
    splits: dict[str, tuple[np.ndarray, list]],
    tokenizer: Path | None = None,
    vocab_size: int | None = None,
    **mds_options,
) -> Path:
    """A data_prep-style folder: one MDS dataset per split ({split: (tokens, doc_starts)}) and
    manifest.json (see ``write_manifest``); ``mds_options`` go to ``write_mds``."""
    for split, (tokens, doc_starts) in splits.items():
        write_mds(root / split, tokens, doc_starts, **mds_options)
    rows = {split: len(tokens) for split, (tokens, _) in splits.items()}
    return write_manifest(root, tokens.shape[1], rows, tokenizer, vocab_size, dtype=str(tokens.dtype))


def tiny_data_folder(
    root: Path, tokenizer: Path, train_rows: int = 256, val_rows: int = 32, seq_len: int = SEQ_LEN
) -> Path:
    """The training tests' data: ``packed_rows`` with seed 0 in train/ and seed 1 in val/."""
    splits = {"train": packed_rows(train_rows, 0, seq_len), "val": packed_rows(val_rows, 1, seq_len)}
    return write_data_folder(root, splits, tokenizer)


def write_stream_folder(
    root: Path,
    tokenizer: Path,
    stream: int,
    train_rows: int = 256,
    val_rows: int = 32,
    seq_len: int = SEQ_LEN,
) -> Path:
    """Another data folder compatible with ``tiny_data_folder`` (same tokenizer, seq_len, dtype) for
    mixtures: its documents use stride ``3 + stream`` (``stream`` >= 1), which no other stream uses, so
    every row (it holds two adjacent tokens of one document) belongs to one stream only: ``rows_by_content``
    tells a row's stream from its tokens."""
    assert stream >= 1
    strides = (3 + stream,)
    splits = {
        "train": packed_rows(train_rows, 2 * stream + 10, seq_len, strides),
        "val": packed_rows(val_rows, 2 * stream + 11, seq_len, strides),
    }
    return write_data_folder(root, splits, tokenizer)


def rows_by_content(folders: dict[str, Path], split: str = "train") -> dict[bytes, str]:
    """{a row's tokens as bytes (int64): the name of the stream whose folder holds it}, read from the
    shards of ``split`` of each folder; a row found in two streams is an error."""
    from data_prep import mds

    out: dict[bytes, str] = {}
    for name, root in folders.items():
        folder = Path(root) / split
        for shard in mds.read_index(folder)["shards"]:
            for tokens in mds.read_shard(folder, shard)[0]:
                key = np.asarray(tokens, dtype=np.int64).tobytes()
                assert out.setdefault(key, name) == name, f"a row of {name} is also in {out[key]}"
    return out


# -- the training recipe's overrides -----------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
YAMLS = REPO / "yamls"


def mixture_overrides(streams: dict[str, tuple[Path, float | None]], role: str = "train_loader") -> list[str]:
    """Overrides that turn ``role`` of yamls/bd3_tiny.yaml into a mixture: {name: (folder, proportion
    or None)}; ``tiny_overrides`` still sets ``variables.data_local`` (the other loader's folder)."""
    out = [f"{role}.local=null", f"{role}.remote=null"]
    for name, (folder, proportion) in streams.items():
        out.append(f"{role}.streams.{name}.local={folder}")
        if proportion is not None:
            out.append(f"{role}.streams.{name}.proportion={proportion}")
    return out


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


# -- lm-evaluation-harness tasks (local files, offline) ------------------------------------------
def write_lm_eval_tasks(
    root: Path,
    n_docs: int = 6,
    n_words: int = N_WORDS,
    seed: int = 0,
    question_words: tuple[int, int] = (3, 9),
) -> Path:
    """Three lm-eval tasks over jsonl files of words ``w0 w7 ...`` (``write_tokenizer``'s vocabulary),
    each read offline (``dataset_path: json``): ``tiny_mc`` (multiple choice, 4 choices of 1-3 words),
    ``tiny_ppl`` (rolling perplexity of ~300-word documents) and ``tiny_gen`` (greedy generation until
    ``w3``, exact match). ``question_words``: the range of a multiple-choice question's length.
    Returns the folder to pass as ``--include_path``."""
    rng = np.random.default_rng(seed)

    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(0, n_words, n))

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    docs = {
        "mc": [
            {"question": words(int(rng.integers(*question_words))), "choices": [" " + words(int(rng.integers(1, 4))) for _ in range(4)],
             "label": int(rng.integers(0, 4))}
            for _ in range(n_docs)
        ],
        "ppl": [{"text": words(int(rng.integers(40, 300)))} for _ in range(n_docs)],
        "gen": [{"question": words(int(rng.integers(2, 12))), "answer": " " + words(2)} for _ in range(n_docs)],
    }  # fmt: skip
    specs = {
        "mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        "gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['w3']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n",
    }
    for name, rows in docs.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"tiny_{name}.yaml").write_text(
            f"task: tiny_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {root / 'cache'}\ntest_split: test\n{specs[name]}"
        )
    return root


def downstream_overrides(task_dir: Path) -> list[str]:
    """yamls/bd3_tiny.yaml overrides that turn ``callbacks.downstream_eval`` on cheaply: the ``tiny_mc``
    task of ``write_lm_eval_tasks(task_dir)``, 4 documents, 2 noise draws, block sizes 1 and 4."""
    return [
        "callbacks.downstream_eval.tasks=[tiny_mc]",
        f"callbacks.downstream_eval.include_path={task_dir}",
        "callbacks.downstream_eval.block_sizes=[1,4]",
        "callbacks.downstream_eval.limit=4",
        "callbacks.downstream_eval.mc_samples=2",
    ]


def downstream_reference(checkpoint: Path, task_dir: Path) -> list:
    """What ``downstream_overrides`` logs, computed in this one process by ``pipeline.lm_eval`` on
    ``checkpoint`` (e.g. the run's ``callbacks.hf_export`` folder: its final weights)."""
    from pipeline.diffusion.metrics import EVAL_SEED
    from pipeline.lm_eval.sweep import run_tasks

    args = dict(mc_samples=2, seed=EVAL_SEED, batch_size=16, device="cpu")
    return run_tasks(checkpoint, ["tiny_mc"], [1, 4], include_path=str(task_dir), limit=4, model_args=args)


def check_downstream_scalars(scalars: dict[str, dict[int, float]], results, batch: int) -> None:
    """Assert the logged ``eval/downstream/...`` scalars at ``batch`` (``{key: {batch: value}}``, e.g.
    ``tests.pipeline.trainer.launch.tensorboard_scalars``) are ``results`` (``DownstreamResult`` list
    of a one-process run, e.g. ``DownstreamEval.last_results``): the same keys, values to 1e-5."""
    want = {f"eval/downstream/{r.task}/{r.metric}/bs{r.block_size}": r.value for r in results}
    got = {k: v[batch] for k, v in scalars.items() if k.startswith("eval/downstream/") and batch in v}
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for key, value in want.items():
        assert abs(got[key] - value) <= 1e-5 * max(1.0, abs(value)), (key, got[key], value)
