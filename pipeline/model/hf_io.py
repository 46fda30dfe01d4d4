"""Hugging Face checkpoint conversion: load AR checkpoints, add the mask token, save and export.

Reads ``config.json`` and safetensors (single or sharded) directly, never instantiating the
``transformers`` model. Parameter names are the Hugging Face LLaMA layout, so no name map is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.hf_names import TOKENIZER_FILE
from pipeline.model.config import ModelConfig, ModelConfigError, pad_to_multiple
from pipeline.model.transformer import BD3LM, rope_inv_freq

TOKENIZER_FILES = (
    TOKENIZER_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def resolve_checkpoint_dir(path_or_name: str | os.PathLike) -> Path:
    """A local folder, or a hub name downloaded (config, safetensors, tokenizer only) when online."""
    p = Path(path_or_name).expanduser()
    if p.is_dir():
        return p
    name = str(path_or_name)
    if p.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(
            f"init checkpoint {name!r} is not a folder with config.json; give a local Hugging Face "
            "model folder or a hub name like 'TinyLlama/TinyLlama_v1.1'"
        )
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            name, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
        )
    except Exception as e:  # network, auth, or missing repo
        raise FileNotFoundError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "download it elsewhere and pass the local folder"
        ) from e
    return Path(local)


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: model.safetensors, a sharded index, or a .bin (safe load)."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            if not (folder / shard).exists():
                raise FileNotFoundError(f"{folder / shard} is listed in {index.name} but missing")
            state.update(load_file(str(folder / shard)))
        return state
    binary = folder / "pytorch_model.bin"
    if binary.exists():
        # weights_only=True refuses pickled code: a checkpoint from an untrusted source cannot run anything.
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def read_config(folder: Path, **overrides) -> ModelConfig:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: the init checkpoint folder needs a config.json")
    return ModelConfig.from_hf_config(json.loads(cfg_path.read_text()), **overrides)


def from_pretrained(
    path_or_name: str | os.PathLike,
    *,
    config: ModelConfig | None = None,
    mask_token_id: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_backend: str = "auto",
    activation_checkpointing: bool = False,
    **config_overrides,
) -> BD3LM:
    """Load a LLaMA-family checkpoint as a ``BD3LM`` with a mask token.

    An AR checkpoint gets a new mask token (id = its vocabulary size, embedding and output rows set
    to the mean of the existing rows, vocabulary padded to a multiple of 64) unless ``mask_token_id``
    names an existing id to reuse. A checkpoint this project saved already has its mask token and is
    loaded as is. ``config``: the config already resolved from this folder (``resolve_config``; the
    trainer passes it so config.json is read and the mask token added once); otherwise it is resolved
    here with ``config_overrides`` (e.g. ``block_size``, ``shift``). ``attn_backend`` and
    ``activation_checkpointing`` say how the model runs (``BD3LM``).
    """
    folder = resolve_checkpoint_dir(path_or_name)
    if config is None:
        config = resolve_config(folder, mask_token_id, **config_overrides)
    state = read_state_dict(folder)
    rows = state["model.embed_tokens.weight"].shape[0]
    if rows not in (config.base_vocab_size, config.vocab_size):
        raise ModelConfigError(
            f"{folder}: embedding has {rows} rows but config.json says vocab_size {config.base_vocab_size}"
            + (
                f" ({config.vocab_size} with the mask token)"
                if config.vocab_size != config.base_vocab_size
                else ""
            )
        )
    check_tokenizer_fits(folder, config)

    with torch.device("meta"):
        model = BD3LM(config, attn_backend=attn_backend, activation_checkpointing=activation_checkpointing)
    state = _add_mask_rows(state, config)  # no-op for a checkpoint that has its mask row already
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v.to(dtype) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelConfigError(
            f"{folder}: checkpoint does not match the {config.architecture} layout "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config)  # non-persistent buffer: was built on the meta device
    model.source_dir = folder
    return model.to(device)


def resolve_config(folder: Path, mask_token_id: int | None = None, **overrides) -> ModelConfig:
    """The ``ModelConfig`` a checkpoint folder loads as: its config.json plus the mask token.

    An AR config gets the mask token (``with_mask_token``); a BD3 config keeps its own, and a
    different ``mask_token_id`` is an error. ``overrides`` replace config fields (``block_size``...).
    """
    config = read_config(folder, **overrides)
    if config.mask_token_id is None:
        return with_mask_token(config, mask_token_id)
    if mask_token_id is not None and mask_token_id != config.mask_token_id:
        raise ModelConfigError(
            f"{folder} already has mask token id {config.mask_token_id}; mask_token_id={mask_token_id} "
            "cannot change it (leave mask_token_id unset)"
        )
    return config


def with_mask_token(config: ModelConfig, reuse_id: int | None) -> ModelConfig:
    base = config.vocab_size
    specials = {"pad": config.pad_token_id, "eos": config.eos_token_id, "bos": config.bos_token_id}
    if reuse_id is not None:
        if not 0 <= reuse_id < base:
            raise ModelConfigError(f"mask_token_id {reuse_id} is outside the vocabulary [0, {base})")
        clash = [name for name, i in specials.items() if i == reuse_id]
        if clash:
            raise ModelConfigError(
                f"mask_token_id {reuse_id} is also the {clash[0]} token id; pick an unused id or leave "
                "mask_token_id unset to add a new token"
            )
        return config.replace(base_vocab_size=base, mask_token_id=reuse_id)
    return config.replace(base_vocab_size=base, mask_token_id=base, vocab_size=pad_to_multiple(base + 1))


def _add_mask_rows(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Grow embedding/output matrices to ``vocab_size``: mask row = mean row, padding rows = 0."""
    keys = ["model.embed_tokens.weight"]
    if not config.tie_word_embeddings and "lm_head.weight" in state:
        keys.append("lm_head.weight")
    for key in keys:
        w = state[key]
        if w.shape[0] == config.vocab_size:
            continue
        grown = torch.zeros(config.vocab_size, w.shape[1], dtype=w.dtype)
        grown[: w.shape[0]] = w
        if config.mask_token_id >= w.shape[0]:
            grown[config.mask_token_id] = w.float().mean(0).to(w.dtype)
        state[key] = grown
    return state


def check_tokenizer_fits(folder: Path, config: ModelConfig) -> None:
    """A tokenizer.json beside the weights must not have ids beyond the embedding table."""
    tok = folder / TOKENIZER_FILE
    if not tok.exists():
        return
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tok)).get_vocab(with_added_tokens=True).values()
    # An exported folder's tokenizer names the mask token too (pipeline.hf_artifact): not a data token.
    needed = 1 + max((i for i in ids if i != config.mask_token_id), default=-1)
    check_vocab(needed, config, where=str(tok))


def check_vocab(tokenizer_vocab_size: int, config: ModelConfig, where: str = "the tokenizer") -> None:
    if tokenizer_vocab_size > config.base_vocab_size:
        raise ModelConfigError(
            f"{where} has {tokenizer_vocab_size} tokens but the model's embedding table has "
            f"{config.base_vocab_size} (before the mask token): use the tokenizer the checkpoint was "
            "trained with, or a model whose vocab_size covers the tokenizer"
        )


def _state_for_save(model: BD3LM, rows: int | None = None) -> dict[str, torch.Tensor]:
    state = {}
    for k, v in model.state_dict().items():
        if model.config.tie_word_embeddings and k == "lm_head.weight":
            continue
        if rows is not None and k in ("model.embed_tokens.weight", "lm_head.weight"):
            v = v[:rows]
        state[k] = v.detach().to("cpu").contiguous()
    return state


def _write_folder(out_dir: Path, hf_config: dict, state: dict, source_dir: Path | None) -> Path:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if source_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(source_dir) / name).exists():
                    shutil.copy2(Path(source_dir) / name, tmp / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)  # a half-written folder never carries the final name
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def save_pretrained(
    model: BD3LM, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None
) -> Path:
    """Write a Hugging Face-format folder that ``from_pretrained`` reloads bit-exactly.

    config.json carries the usual fields plus a ``bd3`` section (mask token id, base vocabulary,
    block size); tokenizer files are copied from ``tokenizer_dir`` or the folder the model came from.
    """
    source = tokenizer_dir or getattr(model, "source_dir", None)
    return _write_folder(Path(out_dir), model.config.to_hf_config(), _state_for_save(model), source)


def export_ar(
    model: BD3LM, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None
) -> Path:
    """Write the weights without the mask/padding rows, loadable by the ``transformers`` AR class."""
    c = model.config
    hf = c.to_hf_config()
    hf.pop("bd3")
    hf["vocab_size"] = c.base_vocab_size
    source = tokenizer_dir or getattr(model, "source_dir", None)
    return _write_folder(Path(out_dir), hf, _state_for_save(model, rows=c.base_vocab_size), source)
