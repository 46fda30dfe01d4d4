"""Checkpoint I/O: mask-token bookkeeping, bit-exact save/reload, AR export, sharding, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.model import ModelConfigError, export_ar, from_pretrained, save_pretrained
from tests.factories import TINY_HF

BASE = TINY_HF["vocab_size"]  # 250: mask id 250, rows padded to 256


def _ids(length: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, BASE, (2, length), generator=g)


def _copy(src, tmp_path, name="ckpt"):
    return shutil.copytree(src, tmp_path / name)


def _assert_same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_mask_token_added_with_mean_row_and_padded_vocab(request, fixture):
    from safetensors.torch import load_file

    folder = request.getfixturevalue(fixture)
    raw = load_file(str(folder / "model.safetensors"))
    model = from_pretrained(folder)
    c = model.config
    assert (c.base_vocab_size, c.mask_token_id, c.vocab_size) == (BASE, BASE, 256)
    emb = model.model.embed_tokens.weight
    assert emb.shape == (256, TINY_HF["hidden_size"])
    original = raw["model.embed_tokens.weight"]
    assert torch.equal(emb[:BASE], original)
    torch.testing.assert_close(emb[BASE], original.mean(0), rtol=0, atol=1e-6)
    assert not emb[BASE + 1 :].any()  # padding rows are zero
    if not c.tie_word_embeddings:
        head = model.lm_head.weight
        assert torch.equal(head[:BASE], raw["lm_head.weight"])
        torch.testing.assert_close(head[BASE], raw["lm_head.weight"].mean(0), rtol=0, atol=1e-6)
    assert model.invalid_output_ids.tolist() == list(range(BASE, 256))


def test_vocab_already_a_multiple_of_64_still_gets_a_mask_row(tmp_path, tiny_hf_checkpoint):
    folder, _ = tiny_hf_checkpoint(tmp_path / "v256", "llama", vocab_size=256)
    c = from_pretrained(folder).config
    assert (c.base_vocab_size, c.mask_token_id, c.vocab_size) == (256, 256, 320)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_save_and_reload_is_bit_exact_and_adds_no_second_mask_row(request, tmp_path, fixture):
    folder = request.getfixturevalue(fixture)
    first = from_pretrained(folder)
    save_pretrained(first, tmp_path / "a")
    second = from_pretrained(tmp_path / "a")
    save_pretrained(second, tmp_path / "b")
    third = from_pretrained(tmp_path / "b")
    for reloaded in (second, third):
        _assert_same_tensors(first, reloaded)
        c, r = first.config, reloaded.config
        assert (r.vocab_size, r.base_vocab_size, r.mask_token_id) == (
            c.vocab_size,
            c.base_vocab_size,
            c.mask_token_id,
        )
        assert r.tie_word_embeddings == c.tie_word_embeddings
        if r.tie_word_embeddings:
            assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(first(_ids()), third(_ids()))
    bd3 = json.loads((tmp_path / "b" / "config.json").read_text())["bd3"]
    assert bd3["mask_token_id"] == BASE and bd3["base_vocab_size"] == BASE


def test_save_pretrained_replaces_an_existing_folder_and_copies_tokenizer(tmp_path, tiny_llama_dir):
    folder = _copy(tiny_llama_dir, tmp_path)
    _wordlevel_tokenizer(BASE - 10).save(str(folder / "tokenizer.json"))
    model = from_pretrained(folder)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    save_pretrained(model, out)
    assert (out / "tokenizer.json").exists() and not (out / "stale.bin").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp folder left


@pytest.mark.parametrize(
    "arch,overrides",
    [("llama", {}), ("qwen2", {"tie_word_embeddings": True}), ("mistral", {})],
    ids=["llama", "qwen2_tied", "mistral"],
)
def test_export_ar_loads_in_transformers_with_same_logits(tmp_path, tiny_hf_checkpoint, arch, overrides):
    import transformers

    folder, hf_model = tiny_hf_checkpoint(tmp_path / "src", arch, **overrides)
    model = from_pretrained(folder).eval()
    with torch.no_grad():  # make the mask/padding rows matter: export must drop them, not keep stale rows
        model.model.embed_tokens.weight[BASE:] = 3.0
    export_ar(model, tmp_path / "ar")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ar").eval()
    assert type(exported) is type(hf_model)
    assert exported.config.vocab_size == BASE
    assert "bd3" not in json.loads((tmp_path / "ar" / "config.json").read_text())
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids)[..., :BASE], rtol=0, atol=1e-5)


def test_export_ar_round_trips_through_from_pretrained(tmp_path, tiny_llama_dir):
    model = from_pretrained(tiny_llama_dir)
    export_ar(model, tmp_path / "ar")
    again = from_pretrained(tmp_path / "ar")
    _assert_same_tensors(model, again)


def test_sharded_safetensors_load(tmp_path, tiny_hf_checkpoint, tiny_llama_dir):
    # Same weights as tiny_llama_dir (seed 0), written in shards of 40 kB.
    _, hf_model = tiny_hf_checkpoint(tmp_path / "single", "llama")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB", safe_serialization=True)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    _assert_same_tensors(from_pretrained(tmp_path / "sharded"), from_pretrained(tiny_llama_dir))


def test_pytorch_bin_checkpoint_loads(tmp_path, tiny_hf_checkpoint, tiny_llama_dir):
    # Written by hand: transformers 5 always saves safetensors (safe_serialization=False is gone).
    folder, hf_model = tiny_hf_checkpoint(tmp_path / "single", "llama")
    (tmp_path / "bin").mkdir()
    shutil.copyfile(folder / "config.json", tmp_path / "bin" / "config.json")
    torch.save(hf_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _assert_same_tensors(from_pretrained(tmp_path / "bin"), from_pretrained(tiny_llama_dir))


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn"])
def test_unsupported_rope_scaling_is_refused(tmp_path, tiny_llama_dir, rope_type):
    folder = _copy(tiny_llama_dir, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": rope_type, "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match=rf"{rope_type}.*supported"):
        from_pretrained(folder)


def test_missing_shard_is_named(tmp_path, tiny_hf_checkpoint):
    _, hf_model = tiny_hf_checkpoint(tmp_path / "single", "llama")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB", safe_serialization=True)
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        from_pretrained(tmp_path / "sharded")


def test_reuse_an_unused_id_as_mask_token(tiny_llama_dir):
    model = from_pretrained(tiny_llama_dir, mask_token_id=100)
    c = model.config
    assert (c.vocab_size, c.base_vocab_size, c.mask_token_id) == (BASE, BASE, 100)
    assert model.invalid_output_ids.tolist() == [100]


@pytest.mark.parametrize("special", ["pad_token_id", "eos_token_id", "bos_token_id"])
def test_mask_token_may_not_reuse_a_special_id(tiny_llama_dir, special):
    with pytest.raises(ModelConfigError, match=special.split("_")[0]):
        from_pretrained(tiny_llama_dir, mask_token_id=TINY_HF[special])


def test_mask_token_outside_vocabulary_is_refused(tiny_llama_dir):
    with pytest.raises(ModelConfigError, match="outside the vocabulary"):
        from_pretrained(tiny_llama_dir, mask_token_id=BASE + 3)


def test_unknown_architecture_is_refused(tmp_path, tiny_llama_dir):
    folder = _copy(tiny_llama_dir, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match=r"gpt2.*supports.*llama"):
        from_pretrained(folder)


def _wordlevel_tokenizer(n_tokens: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, n_tokens)}}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return tok


def test_tokenizer_larger_than_embedding_is_refused(tmp_path, tiny_llama_dir):
    folder = _copy(tiny_llama_dir, tmp_path)
    _wordlevel_tokenizer(BASE + 50).save(str(folder / "tokenizer.json"))
    with pytest.raises(ModelConfigError, match=rf"{BASE + 50} tokens.*{BASE}"):
        from_pretrained(folder)


def test_tokenizer_that_fits_is_accepted(tmp_path, tiny_llama_dir):
    folder = _copy(tiny_llama_dir, tmp_path)
    _wordlevel_tokenizer(BASE).save(str(folder / "tokenizer.json"))
    assert from_pretrained(folder).config.mask_token_id == BASE


def test_missing_config_is_named(tmp_path, tiny_llama_dir):
    folder = _copy(tiny_llama_dir, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(folder)


def test_missing_weights_are_named(tmp_path, tiny_llama_dir):
    folder = _copy(tiny_llama_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(folder)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        from_pretrained(tmp_path / "does_not_exist")


def test_embedding_rows_disagreeing_with_config_is_refused(tmp_path, tiny_llama_dir):
    folder = _copy(tiny_llama_dir, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = BASE + 6
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match=rf"{BASE} rows"):
        from_pretrained(folder)


def test_bf16_load_keeps_rope_in_float32(tiny_llama_dir):
    model = from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32
    ref = from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        out = model(_ids()).float()
        torch.testing.assert_close(out, ref(_ids()), rtol=0.05, atol=0.3)
