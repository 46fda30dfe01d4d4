"""What a training config points to, resolved and checked: data manifest, tokenizer, model config.

``resolve_run_inputs(cfg)`` reads manifest.json, the tokenizer and the checkpoint's config.json (never
its weights) and returns the resolved ``ModelConfig`` the run will build, raising ``ConfigError``
for a sequence length, vocabulary, tokenizer or mask-token mismatch before any model exists. For a
local dataset (no ``remote``) it also reads each split's index.json and checks that every shard file
is there with the recorded size (a stat per shard, no reads), so a missing or truncated shard fails
at start rather than hours into the run. A mixture (``streams``) is checked stream by stream, and its
streams against each other (``check_compatible``): a stream that differs is named in the error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep import DataPrepError, mds
from data_prep.manifest import INDEX, TOKEN_DTYPES
from data_prep.remote import is_remote
from pipeline.model import ModelConfig, ModelConfigError
from pipeline.model.hf_io import (
    TOKENIZER_FILE,
    check_vocab,
    resolve_checkpoint_dir,
    resolve_config,
    with_mask_token,
)
from pipeline.trainer.config import SHAPE_FIELDS, ConfigError, TrainConfig
from pipeline.trainer.data import read_manifest

log = logging.getLogger(__name__)


@dataclass
class RunInputs:
    """What ``resolve_run_inputs`` found; ``model_config`` has the mask token and padded vocabulary;
    ``manifest`` is the first training stream's."""

    manifest: dict[str, Any]
    tokenizer_file: Path
    tokenizer_vocab_size: int
    model_config: ModelConfig
    init_dir: Path | None
    # name -> manifest of each training / eval stream (the one-folder form: one stream, "data")
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_streams: dict[str, dict[str, Any]] | None = None


def resolve_run_inputs(cfg: TrainConfig, download: bool = False) -> RunInputs:
    """Resolve the model config and check data, tokenizer and model shape against each other and the config.

    Args:
        download: resolve a hub name in ``model.init_from`` by downloading it (config, safetensors,
            tokenizer). Without it, ``model.init_from`` must be a local folder.
    """
    _check_remote_access(cfg)
    init_dir = _init_dir(cfg.model.init_from, download)
    tok_file, tok = resolve_tokenizer(cfg, init_dir)
    tok_vocab = tok.get_vocab_size(with_added_tokens=True)
    streams = _checked_data(cfg, "train_loader", tok, tok_vocab)
    manifest = next(iter(streams.values()))
    eval_streams = None
    if cfg.eval_loader is not None:
        reference = next(iter(streams.items()))
        eval_streams = _checked_data(cfg, "eval_loader", tok, tok_vocab, reference)
    model_config = model_config_from(cfg, init_dir, tok_vocab, manifest)
    try:
        check_vocab(tok_vocab, model_config, where=f"tokenizer.path ({tok_file})")
    except ModelConfigError as e:
        key = "model.vocab_size" if cfg.model.vocab_size is not None else "tokenizer.path"
        raise ConfigError(key, f"{e} (model.init_from: {cfg.model.init_from})") from None
    L = cfg.max_seq_len
    if model_config.sliding_window is not None and L > model_config.sliding_window:
        raise ConfigError(
            "max_seq_len", f"{L} exceeds the checkpoint's sliding_window {model_config.sliding_window}"
        )
    _check_context(cfg, model_config, init_dir)
    return RunInputs(manifest, tok_file, tok_vocab, model_config, init_dir, streams, eval_streams)


def _check_remote_access(cfg: TrainConfig) -> None:
    """A missing bucket or a wrong credential in any remote location: a config error before any model."""
    from data_prep.remote import check_access

    places = []
    for role in ("train_loader", "eval_loader"):
        if getattr(cfg, role) is not None:
            places += [(f"{s.key}.remote", s.remote) for s in getattr(cfg, role).resolved_streams(role)]
    for key, uri in [*places, ("save_folder", cfg.save_folder)]:
        if uri and is_remote(uri):
            try:
                check_access(uri)
            except DataPrepError as e:
                raise ConfigError(key, str(e)) from None


def _check_context(cfg: TrainConfig, config: ModelConfig, init_dir: Path | None) -> None:
    """Rows longer than the model's context need rope scaling (the checkpoint's ``rope_scaling``)."""
    L, ctx = cfg.max_seq_len, config.max_position_embeddings
    if L <= ctx:
        return
    if config.rope_scaling:
        log.warning(
            "max_seq_len %d exceeds max_position_embeddings %d; relying on the checkpoint's rope_scaling %s",
            L,
            ctx,
            config.rope_scaling,
        )
        return
    if init_dir is None:
        raise ConfigError(
            "max_seq_len",
            f"{L} is longer than the model's context (model.max_position_embeddings {ctx}): raise "
            f"model.max_position_embeddings to at least {L} or remove it",
        )
    raise ConfigError(
        "max_seq_len",
        f"{L} is longer than the model's context (max_position_embeddings {ctx} in {init_dir}/config.json, "
        'no rope_scaling): set rope_scaling in that config.json (e.g. {"rope_type": "linear", "factor": '
        f"{-(-L // ctx)}.0}}) or prepare rows of at most {ctx} tokens (data_prep convert --seq-len)",
    )


def _init_dir(init_from: str | None, download: bool) -> Path | None:
    if init_from is None:
        return None
    p = Path(init_from).expanduser()
    if p.is_dir():
        return p
    if not download:
        raise ConfigError(
            "model.init_from",
            f"{init_from!r} is not a folder with config.json: give a local Hugging Face model folder, "
            "or a hub name such as 'TinyLlama/TinyLlama_v1.1' (downloaded at launch)",
        )
    try:
        return resolve_checkpoint_dir(init_from)
    except FileNotFoundError as e:
        raise ConfigError("model.init_from", str(e)) from None


def resolve_tokenizer(cfg: TrainConfig, init_dir: Path | None):
    """(the tokenizer file, the loaded ``tokenizers.Tokenizer``) of ``tokenizer.path``, else the
    tokenizer.json of the init checkpoint folder ``init_dir``; ``ConfigError`` naming tokenizer.path."""
    from tokenizers import Tokenizer

    path = cfg.tokenizer.path
    if path is None:
        if init_dir is None or not (init_dir / TOKENIZER_FILE).exists():
            raise ConfigError(
                "tokenizer.path",
                "is required: give the tokenizer.json the data was prepared with (null only works when "
                "model.init_from is a folder holding a tokenizer.json)",
            )
        file = init_dir / TOKENIZER_FILE
    else:
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / TOKENIZER_FILE
    if not file.is_file():
        raise ConfigError(
            "tokenizer.path", f"{file} not found: give a tokenizer.json file or a folder holding one"
        )
    try:
        return file, Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        raise ConfigError("tokenizer.path", f"cannot load {file}: {e}") from None


def _checked_data(cfg: TrainConfig, role: str, tok, tok_vocab: int, reference=None) -> dict[str, dict]:
    """The manifest of every stream of ``role`` (the one-folder form is one stream), checked: streams
    agree with each other and with ``reference`` (name, manifest: the first training stream), then with
    the config and tokenizer, and every local split's shards are complete."""
    streams = getattr(cfg, role).resolved_streams(role)
    manifests = {}
    for s in streams:
        try:
            manifests[s.name] = read_manifest(s.local, s.remote)
        except (DataPrepError, OSError, ValueError) as e:
            key = f"{s.key}.remote" if s.remote else f"{s.key}.local"
            raise ConfigError(key, str(e)) from None
    ref_name, ref = reference or (streams[0].name, manifests[streams[0].name])
    for s in streams:
        check_compatible(s, manifests[s.name], ref_name, ref)
    rows = sum(_checked_manifest(cfg, role, s, manifests[s.name], tok, tok_vocab) or 0 for s in streams)
    split = cfg.train_loader.split
    if role == "train_loader" and rows and rows < cfg.global_train_batch_size:
        raise ConfigError(
            "global_train_batch_size",
            f"{cfg.global_train_batch_size} is larger than the {rows} rows of split {split!r}",
        )
    return manifests


# What every stream of a run shares with the others: (what it is called in messages, how to read it).
COMPATIBLE = (
    ("tokenizer (sha256)", lambda m: m.get("tokenizer", {}).get("sha256")),
    ("tokenizer vocab_size", lambda m: m.get("tokenizer", {}).get("vocab_size")),
    ("seq_len", lambda m: m.get("seq_len")),
    ("dtype", lambda m: m.get("dtype")),
    ("eos_id", lambda m: m.get("tokenizer", {}).get("eos_id")),
    ("bos_id", lambda m: m.get("tokenizer", {}).get("bos_id")),
    ("BOS convention (--bos)", lambda m: bool(m.get("args", {}).get("bos"))),
)


def check_compatible(stream, manifest: dict, ref_name: str, ref: dict) -> None:
    """ConfigError naming ``stream`` and the first field in which its manifest differs from ``ref``'s."""
    for what, get in COMPATIBLE:
        mine, theirs = get(manifest), get(ref)
        if mine != theirs:
            raise ConfigError(
                stream.key,
                f"stream {stream.name!r} has {what} {mine!r} but stream {ref_name!r} has {theirs!r} "
                f"({stream.local}/manifest.json): every stream must be prepared by data_prep with the same "
                "tokenizer, seq_len, dtype and BOS/EOS convention",
            )


def _checked_manifest(cfg: TrainConfig, role: str, stream, manifest: dict, tok, tok_vocab: int) -> int | None:
    """Rows of ``stream``'s split (None when remote and unknown) after checking its manifest against
    the config and tokenizer and, for a local stream, its shards."""
    from data_prep.tokenizer import tokenizer_sha256

    local_key = f"{stream.key}.local"
    where = f"{stream.local}/manifest.json"
    if manifest.get("seq_len") != cfg.max_seq_len:
        raise ConfigError(
            "max_seq_len",
            f"{cfg.max_seq_len} but the data in {where} has seq_len {manifest.get('seq_len')}: set "
            f"max_seq_len (variables.max_seq_len in the shipped YAMLs) to {manifest.get('seq_len')} "
            "or prepare the data with that length",
        )
    dtype = manifest.get("dtype")
    if dtype not in TOKEN_DTYPES:
        raise ConfigError(local_key, f"{where} has dtype {dtype!r}; expected one of {list(TOKEN_DTYPES)}")
    if tok_vocab > TOKEN_DTYPES[dtype]:
        raise ConfigError(
            "tokenizer.path", f"{tok_vocab} tokens do not fit the data's dtype {dtype} ({where})"
        )
    recorded = manifest.get("tokenizer", {})
    same_vocab = recorded.get("vocab_size") in (None, tok_vocab)
    if not same_vocab or recorded.get("sha256") not in (None, tokenizer_sha256(tok)):
        raise ConfigError(
            "tokenizer.path",
            f"is not the tokenizer the data was prepared with ({where} records vocab_size "
            f"{recorded.get('vocab_size')}, source {recorded.get('source')!r}); use that tokenizer",
        )
    splits = manifest.get("splits", {})
    if stream.split not in splits:
        raise ConfigError(
            f"{stream.key}.split", f"{stream.split!r} is not in {where} (splits: {sorted(splits)})"
        )
    rows = splits[stream.split].get("rows")
    if stream.remote is None:
        rows = _checked_shards(cfg, role, stream, dtype)
    if rows == 0:
        remedy = "" if role == "train_loader" else ", or remove eval_loader"
        raise ConfigError(
            local_key,
            f"split {stream.split!r} of {stream.local} has no rows: prepare it again with more documents "
            f"or a smaller --seq-len (python -m data_prep convert){remedy}",
        )
    return rows


def _checked_shards(cfg: TrainConfig, role: str, stream, dtype: str) -> int:
    """Rows of a local split, after checking its index.json and that every shard file is complete."""
    section = getattr(cfg, role)
    local_key = f"{stream.key}.local"
    split_dir = Path(stream.local) / stream.split
    verify = (
        f"check the folder with `python -m data_prep verify {stream.local}` and rerun the data_prep "
        "command that wrote it (or copy it again)"
    )
    try:
        index = mds.read_index(split_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(local_key, f"cannot read {split_dir / INDEX} ({e}): {verify}") from None
    want = mds.mds_columns(dtype, cfg.max_seq_len)["tokens"]
    rows = 0
    for shard in index.get("shards", []):
        columns = dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))
        tokens = columns.get("tokens", "")
        # data_prep stores the row length in the encoding; other writers may leave the shape out.
        if tokens not in (want, want.rsplit(":", 1)[0]):  # (the row length may be left out)
            raise ConfigError(
                local_key,
                f"{split_dir / INDEX} stores tokens as {tokens!r}, but max_seq_len is "
                f"{cfg.max_seq_len} and {stream.local}/manifest.json says dtype {dtype} ({want!r}): this "
                "split was prepared with other settings than the manifest; prepare the whole folder again "
                "with one data_prep command",
            )
        algo = section.validate_hash
        if algo is not None and algo not in (mds.stored_file(shard).get("hashes") or {}):
            recorded = sorted(mds.stored_file(shard).get("hashes") or {})
            raise ConfigError(
                f"{role}.validate_hash",
                f"{algo!r} is not a hash the index records ({split_dir / INDEX} has {recorded or 'none'}); "
                "use one of those or remove validate_hash",
            )
        try:
            mds.check_shard_file(split_dir, shard)
        except mds.ShardError as e:
            if mds.decompressed_copy(split_dir, shard) is not None:  # the message names the copy and the fix
                raise ConfigError(local_key, str(e)) from None
            name = mds.stored_file(shard)["basename"]
            raise ConfigError(local_key, f"shard {split_dir / name}: {e}; {verify}") from None
        rows += shard.get("samples", 0)
    return rows


def model_config_from(
    cfg: TrainConfig, init_dir: Path | None, tok_vocab: int | None, manifest: dict
) -> ModelConfig:
    """The ModelConfig the run builds: the checkpoint's config.json (shape keys must match it) or the
    shape keys, with the mask token added (vocabulary default: ``tok_vocab``)."""
    m = cfg.model
    sizes = sorted(cfg.diffusion.block_sizes)
    bd3 = dict(block_size=sizes[0], trained_block_sizes=sizes, shift=cfg.diffusion.shift)
    try:
        if init_dir is not None:
            config = resolve_config(init_dir, m.mask_token_id, **bd3)
            for key in SHAPE_FIELDS:
                want = getattr(m, key)
                have = config.base_vocab_size if key == "vocab_size" else getattr(config, key)
                if want is not None and want != have:
                    raise ConfigError(
                        f"model.{key}",
                        f"is {want} but {init_dir}/config.json has {have}: remove model.{key} (the "
                        "checkpoint defines the shape) or set model.init_from: null",
                    )
            return config
        shape = {k: getattr(m, k) for k in SHAPE_FIELDS if getattr(m, k) is not None}
        shape.setdefault("vocab_size", tok_vocab)
        shape.setdefault("max_position_embeddings", cfg.max_seq_len)
        tok = manifest.get("tokenizer", {})
        config = ModelConfig(
            **shape,
            initializer_range=m.initializer_range,
            eos_token_id=tok.get("eos_id"),
            bos_token_id=tok.get("bos_id"),
            **bd3,
        )
        return with_mask_token(config, m.mask_token_id)
    except ModelConfigError as e:
        if "mask_token_id" in str(e):
            raise ConfigError("model.mask_token_id", str(e)) from None
        raise ConfigError("model.init_from" if init_dir else "model", str(e)) from None
    except FileNotFoundError as e:
        raise ConfigError("model.init_from", str(e)) from None
