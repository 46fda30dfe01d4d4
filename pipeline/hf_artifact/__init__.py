"""The exported model as a self-contained Hugging Face folder (``trust_remote_code=True``).

``write_artifact`` writes what ``pipeline.model.save_pretrained`` writes (config.json with its
``bd3`` section, model.safetensors, tokenizer.json) plus:

- ``configuration_bd3.py`` and ``modeling_bd3.py`` (copied from this package; they import only
  torch and transformers) and ``auto_map`` in config.json pointing at them;
- ``tokenizer_config.json`` / ``special_tokens_map.json`` (BOS, EOS, mask) so that
  ``AutoTokenizer.from_pretrained(DIR)`` works; the mask token is added to tokenizer.json;
- ``generation_config.json`` with a ``bd3`` section: the sampling settings ``bd3_generate`` defaults to
  (``generation_settings``: how the run was evaluated, where the export knows it);
- ``README.md``, the model card (``pipeline.hf_artifact.card``), and the likelihood plot if given.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.hf_artifact.card import CardFacts, render_card

__all__ = ["CardFacts", "write_artifact"]

HERE = Path(__file__).parent
REMOTE_CODE = ("configuration_bd3.py", "modeling_bd3.py")
CLASS_PREFIX = {"llama": "BD3Llama", "qwen2": "BD3Qwen2", "mistral": "BD3Mistral"}
MASK_TOKEN = "<|mask|>"
PLOT_FILE = "likelihood_by_block_size.png"


def write_artifact(
    model, out_dir: str | os.PathLike, facts: CardFacts | None = None, tokenizer_dir=None
) -> Path:
    """Export ``model`` (a ``BD3LM``) to ``out_dir`` as a folder anyone can load with ``transformers``.

    ``facts``: what the model card says about the run (a section without facts says so);
    ``tokenizer_dir``: where tokenizer.json is (default: the folder the model came from).
    """
    from pipeline.model import save_pretrained

    facts = facts or CardFacts()
    out = save_pretrained(model, out_dir, tokenizer_dir=tokenizer_dir)
    add_remote_code(out)
    write_tokenizer_config(out)
    generation = generation_settings(model.config, facts)
    write_generation_config(out, generation)
    if facts.plot is not None:
        shutil.copyfile(facts.plot, out / PLOT_FILE)
    (out / "README.md").write_text(
        render_card(json.loads((out / "config.json").read_text()), facts, PLOT_FILE, generation)
    )
    return out


def add_remote_code(folder: Path) -> None:
    """Copy the modeling files into ``folder`` and point config.json's ``auto_map`` at them."""
    for name in REMOTE_CODE:
        shutil.copyfile(HERE / name, folder / name)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    prefix = CLASS_PREFIX[config["model_type"]]
    config["architectures"] = [f"{prefix}ForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": f"configuration_bd3.{prefix}Config",
        "AutoModelForCausalLM": f"modeling_bd3.{prefix}ForCausalLM",
    }
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


GENERATION_KEYS = (
    "max_new_tokens", "block_size", "sampler", "threshold", "top_p", "temperature", "seed", "stop_at_eos",
    "steps_per_block",
)  # fmt: skip  # bd3_generate's arguments, SamplerConfig's fields


def generation_settings(config, facts: CardFacts) -> dict:
    """The sampling settings ``bd3_generate`` defaults to, and where they come from (``source``).

    In order, later over earlier: ``pipeline.diffusion.sampler.SamplerConfig``'s defaults at the
    trained block size (``config.block_size``, the smallest trained L'); the run's ``callbacks.generation``
    section (``facts.run_config``: what it sampled with at its evaluations, at that block size);
    ``facts.generation`` (a ``pipeline.sample --out`` JSON's ``settings``: an evaluation of this model).
    """
    import dataclasses

    from pipeline.diffusion.sampler import SamplerConfig

    defaults = {f.name: f.default for f in dataclasses.fields(SamplerConfig)}
    settings = {k: defaults[k] for k in GENERATION_KEYS}
    settings["block_size"] = config.block_size
    source = "pipeline.diffusion.sampler defaults at the trained block size"
    section = ((facts.run_config or {}).get("callbacks") or {}).get("generation")
    if section:
        settings.update({k: section[k] for k in GENERATION_KEYS if k != "block_size" and k in section})
        source = "the run's callbacks.generation (its evaluations' samples)"
    if facts.generation:
        settings.update({k: facts.generation[k] for k in GENERATION_KEYS if k in facts.generation})
        source = "the pipeline.sample evaluation given to the export"
    SamplerConfig(**{k: v for k, v in settings.items() if v is not None})  # refuses bad values early
    return {**settings, "source": source}


def write_generation_config(folder: Path, settings: dict) -> None:
    """Add ``settings`` as the ``bd3`` section of generation_config.json (other keys, e.g. the AR
    checkpoint's, are kept: ``generate()`` still reads them)."""
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    model_config = json.loads((folder / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = model_config.get(key)
        if value is not None:
            config.setdefault(key, value)
    # A file marked as derived from config.json is rebuilt from it on load, dropping the bd3 section.
    config.pop("_from_model_config", None)
    config["bd3"] = settings
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_tokenizer_config(folder: Path) -> None:
    """Add the mask token to tokenizer.json and write tokenizer_config.json / special_tokens_map.json.

    The special tokens are the ids of config.json (``bos_token_id``, ``eos_token_id``,
    ``bd3.mask_token_id``) named as tokenizer.json names them; a new mask token gets ``MASK_TOKEN``
    (when its id follows the tokenizer's last id; otherwise the tokenizer has no mask token and its id
    is only in config.json).
    Keys of tokenizer_config.json / special_tokens_map.json copied from the AR checkpoint (a chat
    template, the unknown and padding tokens...) are kept; ``added_tokens_decoder`` is dropped
    (tokenizer.json holds the added tokens).
    """
    from pipeline.model.hf_io import TOKENIZER_FILE

    tok_path = folder / TOKENIZER_FILE
    if not tok_path.exists():
        return
    config = json.loads((folder / "config.json").read_text())
    tok = json.loads(tok_path.read_text())
    mask_id = config["bd3"]["mask_token_id"]
    names = {i: t for t, i in _vocab(tok).items()}
    # tokenizers numbers added tokens after the existing ones: a new mask token can only be the next id.
    if mask_id not in names and mask_id == max(names) + 1:
        tok.setdefault("added_tokens", []).append(
            {"id": mask_id, "content": MASK_TOKEN, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
        )  # fmt: skip
        tok_path.write_text(json.dumps(tok, ensure_ascii=False))
        names[mask_id] = MASK_TOKEN
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    special = {
        key: names[i]
        for key, i in (("bos_token", config.get("bos_token_id")), ("eos_token", eos), ("mask_token", mask_id))
        if i is not None and i in names
    }
    tc_path = folder / "tokenizer_config.json"
    previous = json.loads(tc_path.read_text()) if tc_path.exists() else {}
    for stale in ("added_tokens_decoder", "auto_map", "tokenizer_file", "name_or_path"):
        previous.pop(stale, None)
    tokenizer_config = {
        **previous,
        **special,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    tc_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    sm_path = folder / "special_tokens_map.json"
    previous = json.loads(sm_path.read_text()) if sm_path.exists() else {}
    sm_path.write_text(json.dumps({**previous, **special}, indent=2, sort_keys=True) + "\n")


def _vocab(tok: dict) -> dict[str, int]:
    """token -> id of a tokenizer.json (model vocabulary and added tokens)."""
    vocab = tok["model"].get("vocab", {})
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
    return {**vocab, **{a["content"]: a["id"] for a in tok.get("added_tokens", [])}}
