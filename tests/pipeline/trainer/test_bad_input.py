"""README's "Bad input" table, row by row, through the real entry points.

Each case provokes one row's input with ``load_config`` + ``resolve_run_inputs`` (as ``pipeline.train``
runs them) or with ``python -m pipeline.train`` in a subprocess, and checks that the message holds the
row's "what you see" fragment, names the offending key or file and says what to do. The table is
parsed from README.md: a row without cases, or a fragment no case produces, fails
``test_every_readme_row_has_cases``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from pipeline.trainer import ConfigError, load_config
from pipeline.trainer.run_inputs import resolve_run_inputs
from tests.factories import (
    REPO,
    SEQ_LEN,
    YAMLS,
    mixture_overrides,
    packed_rows,
    tiny_data_folder,
    tiny_overrides,
    write_data_folder,
    write_tokenizer,
)

TINY = YAMLS / "bd3_tiny.yaml"


def readme_rows() -> dict[str, list[str]]:
    """{input label: the backticked fragments of its "what you see" cell} of README's table."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Bad input", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("input", "---"):
            continue
        rows[cells[0]] = re.findall(r"`([^`]+)`", cells[1])
    return rows


# ------------------------------------------------------------------------------------ provoking


def config_error(tiny_data, tmp_path, *extra, world_size=1, download=False) -> str:
    """The ConfigError text of the bd3_tiny config on the fixture data with ``extra`` overrides."""
    data, tok = tiny_data
    with pytest.raises(ConfigError) as info:
        cfg = load_config(TINY, tiny_overrides(data, tok, tmp_path / "run", *extra), world_size=world_size)
        resolve_run_inputs(cfg, download=download)
    return str(info.value)


def cli_error(tiny_data, tmp_path, *extra, env=None, code=2) -> str:
    """The last stderr line of ``python -m pipeline.train``, which must exit 2 without a traceback
    (``code=4``: a data shard failed while training; the traceback is logged before the line)."""
    data, tok = tiny_data
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.train",
            str(TINY),
            *tiny_overrides(data, tok, tmp_path / "run", *extra),
        ],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == code, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]
    if code == 4:
        return line
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()  # stopped before anything was written
    assert line.startswith("config error: ")
    return line.removeprefix("config error: ")


def checkpoint_config(tmp_path, **fields) -> Path:
    """An init checkpoint folder with only config.json (resolve_run_inputs never reads weights), shaped
    like bd3_tiny.yaml's model."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        **fields,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def data_copy(tiny_data, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_data[0], tmp_path / "data"))


def shard(data: Path, split: str, i: int = 0) -> Path:
    from data_prep import mds

    index = mds.read_index(data / split)
    return data / split / mds.stored_file(index["shards"][i])["basename"]


def foreign_val_split(tiny_data, tmp_path) -> tuple[str, str]:
    """val/ replaced by rows that data_prep wrote with seq_len 64 and uint32 tokens."""
    from data_prep import mds

    data = data_copy(tiny_data, tmp_path)
    shutil.rmtree(data / "val")
    with mds.open_writer(data / "val", dtype="uint32", seq_len=64, compression=None, size_limit=1 << 14) as w:
        for _ in range(4):
            w.write({"tokens": np.ones(64, np.uint32), "doc_starts": np.array([0], np.uint32)})
    return config_error(tiny_data, tmp_path, f"variables.data_local={data}"), str(data / "val" / "index.json")


def missing_shard(tiny_data, tmp_path) -> tuple[str, str]:
    data = data_copy(tiny_data, tmp_path)
    gone = shard(data, "train", 1)
    gone.unlink()
    return cli_error(tiny_data, tmp_path, f"variables.data_local={data}"), str(gone)


def truncated_shard(tiny_data, tmp_path) -> tuple[str, str]:
    data = data_copy(tiny_data, tmp_path)
    cut = shard(data, "val")
    cut.write_bytes(cut.read_bytes()[:100])
    return config_error(tiny_data, tmp_path, f"variables.data_local={data}"), str(cut)


def empty_split(tiny_data, tmp_path) -> str:
    data = tiny_data_folder(tmp_path / "data", tiny_data[1], val_rows=0)
    return config_error(tiny_data, tmp_path, f"variables.data_local={data}")


def zstd_data(tiny_data, tmp_path) -> Path:
    """The fixture's rows stored as ``data_prep convert`` stores them: zstd shards, sha1 in the index."""
    splits = {"train": packed_rows(256, 0), "val": packed_rows(32, 1)}
    return write_data_folder(
        tmp_path / "zdata", splits, tiny_data[1], compression="zstd", size_limit=1 << 12, hashes=["sha1"]
    )


def decompressed_copies(data: Path) -> list[Path]:
    """Read every train row once: Streaming leaves the decompressed copy of each shard beside it."""
    from pipeline.rows import RowReader

    reader = RowReader(data, "train")
    for i in range(len(reader)):
        reader.dataset[i]
    return [data / "train" / s["raw_data"]["basename"] for s in mds_index(data)]


def mds_index(data: Path) -> list[dict]:
    from data_prep import mds

    return mds.read_index(data / "train")["shards"]


def damaged_copy(tiny_data, tmp_path) -> tuple[str, str]:
    data = zstd_data(tiny_data, tmp_path)
    copy = decompressed_copies(data)[1]
    copy.write_bytes(copy.read_bytes()[:100])
    return config_error(tiny_data, tmp_path, f"variables.data_local={data}"), str(copy)


def shard_failing_mid_run(tiny_data, tmp_path) -> tuple[str, str]:
    data = zstd_data(tiny_data, tmp_path)
    zipped = data / "train" / mds_index(data)[-1]["zip_data"]["basename"]
    zipped.write_bytes(np.random.default_rng(0).bytes(zipped.stat().st_size))  # same size, not zstd
    return cli_error(tiny_data, tmp_path, f"variables.data_local={data}", code=4), str(zipped)


def copy_with_other_bytes(tiny_data, tmp_path) -> tuple[str, str]:
    data = zstd_data(tiny_data, tmp_path)
    copy = decompressed_copies(data)[-1]
    raw = bytearray(copy.read_bytes())
    raw[-10] ^= 0xFF  # same size: only a hash sees it
    copy.write_bytes(bytes(raw))
    extra = (f"variables.data_local={data}", "train_loader.validate_hash=sha1")
    return cli_error(tiny_data, tmp_path, *extra, code=4), str(copy)


def unrecorded_hash(tiny_data, tmp_path) -> str:
    data = zstd_data(tiny_data, tmp_path)
    return config_error(tiny_data, tmp_path, f"variables.data_local={data}", "train_loader.validate_hash=md5")


@dataclass
class Case:
    """One way to provoke a README row: ``provoke(tiny_data, tmp_path)`` returns the message (or
    (message, the file it must name)). The message must hold ``seen``, ``names`` and ``todo``."""

    id: str
    provoke: Callable
    seen: str
    names: str | None
    todo: str
    secret: str | None = None  # must not be echoed
    marks: list = field(default_factory=list)


def overrides(*extra, **kw):
    return lambda tiny_data, tmp_path: config_error(tiny_data, tmp_path, *extra, **kw)


def with_checkpoint(*extra, download=False, **config):
    def provoke(tiny_data, tmp_path):
        ckpt = checkpoint_config(tmp_path, **config)
        return config_error(tiny_data, tmp_path, f"variables.init_from={ckpt}", *extra, download=download)

    return provoke


def other_tokenizer(tiny_data, tmp_path):
    other = write_tokenizer(tmp_path / "other" / "tokenizer.json", n_words=59)
    return config_error(tiny_data, tmp_path, f"variables.tokenizer={other}")


def mixture_error(tiny_data, tmp_path, *extra, other: Path | None = None) -> str:
    """The config error of a mixture of the fixture data (a) and ``other`` (b; default: a copy of a)."""
    b = other or data_copy(tiny_data, tmp_path)
    weights = {"a": (tiny_data[0], 0.5), "b": (b, 0.5)}
    return config_error(tiny_data, tmp_path, *mixture_overrides(weights), *extra)


def stream_with_other_tokenizer(tiny_data, tmp_path) -> str:
    tok = write_tokenizer(tmp_path / "other" / "tokenizer.json", n_words=59)
    b = write_data_folder(tmp_path / "b", {"train": packed_rows(64, 5)}, tok)
    return mixture_error(tiny_data, tmp_path, other=b)


def stream_with_other_seq_len(tiny_data, tmp_path) -> str:
    b = write_data_folder(tmp_path / "b", {"train": packed_rows(64, 5, seq_len=16)}, tiny_data[1])
    return mixture_error(tiny_data, tmp_path, other=b)


CASES: dict[str, list[Case]] = {
    "a misspelled YAML key": [
        Case(
            "typo",
            overrides("optimizer.weight_decy=0.1"),
            "unknown key; did you mean",
            "optimizer.weight_decy",
            "did you mean optimizer.weight_decay?",
        ),
    ],
    "a value of the wrong type": [
        Case(
            "not_an_int",
            overrides("global_train_batch_size=sixteen"),
            "expected an integer",
            "global_train_batch_size",
            "'sixteen'",
        ),
        Case("not_a_choice", overrides("precision=bf16"), "must be one of", "precision", "'amp_bf16'"),
    ],
    "`block_size` not dividing `max_seq_len`": [
        Case(
            "block_size",
            overrides("diffusion.block_size=5"),
            "does not divide the sequence length",
            "diffusion.block_size",
            "choose a divisor",
        ),
    ],
    "`max_seq_len` longer than the model's context": [
        Case(
            "checkpoint",
            with_checkpoint(max_position_embeddings=16),
            "is longer than the model's context",
            "max_seq_len",
            'set rope_scaling in that config.json (e.g. {"rope_type": "linear", "factor": 2.0})',
        ),
        Case(
            "from_scratch",
            overrides("model.max_position_embeddings=16"),
            "is longer than the model's context",
            "max_seq_len",
            "raise model.max_position_embeddings",
        ),
    ],
    "a tokenizer that does not fit the model or the data": [
        Case(
            "model_vocab",
            with_checkpoint(vocab_size=50),
            "but the model's embedding table has",
            "tokenizer.path",
            "use the tokenizer the checkpoint was trained with",
        ),
        Case(
            "data_tokenizer",
            other_tokenizer,
            "is not the tokenizer the data was prepared with",
            "tokenizer.path",
            "use that tokenizer",
        ),
    ],
    "MDS data with another seq_len or dtype than the config": [
        Case(
            "seq_len",
            overrides("variables.max_seq_len=64"),
            "has seq_len",
            "max_seq_len",
            f"set max_seq_len (variables.max_seq_len in the shipped YAMLs) to {SEQ_LEN}",
        ),
        Case(
            "foreign_split",
            foreign_val_split,
            "stores tokens as",
            "eval_loader.local",
            "prepare the whole folder again",
        ),
    ],
    "a missing or truncated shard": [
        Case(
            "missing_cli",
            missing_shard,
            "file is missing",
            "train_loader.local",
            "python -m data_prep verify",
            marks=[pytest.mark.slow],  # imports Composer in a subprocess
        ),
        Case(
            "truncated", truncated_shard, "the index says", "eval_loader.local", "python -m data_prep verify"
        ),
    ],
    "a damaged decompressed copy of a shard (the `shard.N.mds` Streaming writes beside `shard.N.mds.zstd`)": [
        Case("damaged_copy", damaged_copy, "decompressed copy", "train_loader.local", "delete it")
    ],
    "a shard that fails while training (damaged after the start-up check, deleted, a failed download)": [
        Case(
            "mid_run",
            shard_failing_mid_run,
            "training stopped: shard",
            "training stopped",
            "data_prep verify",
            marks=[pytest.mark.slow],
        )
    ],
    "a decompressed copy with the right size but other bytes, read with `train_loader.validate_hash`": [
        Case(
            "hash",
            copy_with_other_bytes,
            "hash does not match the index",
            "training stopped",
            "delete a damaged decompressed copy",
            marks=[pytest.mark.slow],
        )
    ],
    "a `validate_hash` the index does not record": [
        Case(
            "unrecorded_hash",
            unrecorded_hash,
            "is not a hash the index records",
            "train_loader.validate_hash",
            "remove validate_hash",
        )
    ],
    "an empty split": [
        Case("empty_val", empty_split, "has no rows", "eval_loader.local", "more documents"),
    ],
    "an init checkpoint that is missing or not LLaMA-family": [
        Case(
            "missing",
            lambda d, t: config_error(d, t, f"variables.init_from={t}/nope", download=True),
            "is not a folder with config.json",
            "model.init_from",
            "give a local Hugging Face model folder",
        ),
        Case(
            "gpt2",
            with_checkpoint(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
            "this project supports",
            "model.init_from",
            "LLaMA-2/3, TinyLlama, Qwen2/2.5, Mistral",
        ),
    ],
    "a mask token id that is also pad, eos or bos": [
        Case(
            "eos",
            overrides("model.mask_token_id=0"),
            "is also the",
            "model.mask_token_id",
            "leave mask_token_id unset",
        ),
        Case(
            "pad",
            with_checkpoint("model.mask_token_id=0"),
            "is also the",
            "model.mask_token_id",
            "pick an unused id",
        ),
    ],
    "a world size that does not divide the global batch": [
        Case(
            "world_3_cli",
            lambda d, t: cli_error(d, t, env={"WORLD_SIZE": "3"}),
            "is not divisible by world size",
            "global_train_batch_size",
            "choose a multiple of 12 or a world size that divides 16",
        ),
        Case(
            "world_8",
            overrides("device_train_microbatch_size=4", world_size=8),
            "is not divisible by world size",
            "global_train_batch_size",
            "choose a multiple of 32 or a microbatch size in [1, 2]",
        ),
    ],
    "a GPU recipe (`precision: amp_bf16`) started on a machine without a GPU": [
        Case(
            "bf16_on_cpu_cli",
            lambda d, t: cli_error(d, t, "device=cpu", "precision=amp_bf16"),
            "needs a GPU",
            "precision",
            "add precision=fp32 to the command",
        ),
    ],
    "a stream of a mixture prepared unlike the first (tokenizer, seq_len, dtype, BOS/EOS)": [
        Case(
            "stream_tokenizer",
            stream_with_other_tokenizer,
            "but stream",
            "train_loader.streams.b",
            "same tokenizer",
        ),
        Case(
            "stream_seq_len",
            stream_with_other_seq_len,
            "but stream",
            "train_loader.streams.b",
            "seq_len, dtype",
        ),
    ],
    "a stream weight of 0 or less, or `proportion` given in some streams only": [
        Case(
            "weight_zero",
            lambda d, t: mixture_error(d, t, "train_loader.streams.b.proportion=0"),
            "must be > 0",
            "train_loader.streams.b.proportion",
            "remove the stream",
        ),
        Case(
            "weights_mixed",
            lambda d, t: mixture_error(
                d, t, "train_loader.streams.b.proportion=null", "train_loader.streams.b.repeat=2"
            ),
            "has no proportion but",
            "train_loader.streams.b",
            "every stream by proportion or none",
        ),
    ],
    "a remote (`data_remote`, a stream's `remote`) without `manifest.json`": [
        Case(
            "remote_manifest",
            lambda d, t: config_error(
                d, t, f"variables.data_remote={t / 'empty'}", f"variables.data_local={t / 'c'}"
            ),
            "manifest.json not found",
            "train_loader.remote",
            "convert the data there first",
        ),
    ],
    "credentials in a URL (`s3://user:secret@...`)": [
        Case(
            "remote",
            overrides("train_loader.remote=s3://AKIAEXAMPLE:hunter2@bucket/owt"),
            "has credentials in the URL",
            "train_loader.remote",
            "AWS_ACCESS_KEY_ID",
            secret="hunter2",
        ),
        Case(
            "save_folder",
            overrides("save_folder=https://user:hunter2@example.com/runs"),
            "has credentials in the URL",
            "save_folder",
            "never from the config",
            secret="hunter2",
        ),
    ],
}


def test_every_readme_row_has_cases():
    rows = readme_rows()
    assert list(rows) == list(CASES), "README's Bad input rows and CASES differ"
    for label, fragments in rows.items():
        assert sorted(set(fragments)) == sorted({c.seen for c in CASES[label]}), label


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id, marks=c.marks) for cases in CASES.values() for c in cases],
)
def test_bad_input_is_named_with_what_to_do(case, tiny_data, tmp_path):
    got = case.provoke(tiny_data, tmp_path)
    message, file = got if isinstance(got, tuple) else (got, None)
    assert case.seen in message, message
    assert message.startswith(f"{case.names}: "), message  # the offending key comes first
    if file is not None:
        assert file in message, message
    assert case.todo in message, message
    if case.secret:
        assert case.secret not in message


def test_rope_scaling_allows_rows_longer_than_the_context(tiny_data, tmp_path):
    data, tok = tiny_data
    ckpt = checkpoint_config(
        tmp_path, max_position_embeddings=16, rope_scaling={"type": "linear", "factor": 2.0}
    )
    cfg = load_config(TINY, tiny_overrides(data, tok, tmp_path / "run", f"variables.init_from={ckpt}"))
    assert resolve_run_inputs(cfg).model_config.max_position_embeddings == 16


def test_shards_compressed_or_cached_raw_pass_the_check(tiny_data, tmp_path):
    """A compressed shard is complete as its zip file, or as the raw file Streaming's cache keeps."""
    from data_prep import mds

    data = data_copy(tiny_data, tmp_path)
    index = mds.read_index(data / "train")
    entry = index["shards"][0]
    raw = data / "train" / entry["raw_data"]["basename"]
    zipped = raw.with_name(raw.name + ".zstd")
    zipped.write_bytes(b"z" * 10)
    compressed = {**entry, "compression": "zstd", "zip_data": {"basename": zipped.name, "bytes": 10}}
    mds.check_shard_file(data / "train", compressed)  # both present
    raw.unlink()
    mds.check_shard_file(data / "train", compressed)  # the stored (zip) file alone
    zipped.write_bytes(b"z" * 3)
    with pytest.raises(mds.ShardError, match="file has 3 bytes, the index says 10"):
        mds.check_shard_file(data / "train", compressed)
