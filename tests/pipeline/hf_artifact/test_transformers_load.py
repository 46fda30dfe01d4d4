"""The exported folder loads with plain ``transformers`` (trust_remote_code) and behaves as pipeline's model."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from pipeline.diffusion.sampler import SamplerConfig, generate
from pipeline.hf_artifact import CardFacts, write_artifact
from pipeline.model import from_pretrained
from tests.factories import TINY_HF, write_tiny_hf_checkpoint, write_tokenizer

PROMPT_LEN = 5
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def load(folder, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained block sizes warn
        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kw).eval()


def sharpened(model, folder, scale=4.0):
    """(a copy of pipeline's model, the loaded export), both with the output layer times ``scale``:
    peaked distributions, so that the confidence sampler unmasks several tokens per step."""
    model, hf = copy.deepcopy(model), load(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
        hf.lm_head.weight.mul_(scale)
    return model, hf


ARCHS = ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_classes_load_with_the_bd3_config(tiny_export, arch):
    model, folder = tiny_export(arch)
    hf = load(folder)
    config = json.loads((folder / "config.json").read_text())
    assert type(hf).__name__ == config["architectures"][0] and arch in type(hf).__name__.lower()
    assert hf.config.bd3["mask_token_id"] == model.config.mask_token_id == 250
    assert hf.config.vocab_size == model.config.vocab_size == 256
    if arch == "qwen2":  # tied embeddings stay tied
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    # transformers 5's AutoTokenizer makes every qwen2 folder a Qwen2Tokenizer, which rebuilds Qwen's
    # byte-level BPE from tokenizer.json's vocabulary (right for Qwen's tokenizer, not for this word-level
    # one); PreTrainedTokenizerFast loads tokenizer.json as it is under 4.57 and 5.x alike.
    classes = [PreTrainedTokenizerFast] + ([] if TRANSFORMERS_5 and arch == "qwen2" else [AutoTokenizer])
    for cls in classes:
        tok = cls.from_pretrained(folder)
        assert tok.mask_token_id == model.config.mask_token_id
        assert tok.eos_token_id == model.config.eos_token_id and tok.bos_token_id == model.config.bos_token_id
        assert tok("w3 w7").input_ids[-2:] == [4, 8]


@pytest.mark.parametrize("arch", ARCHS)
def test_ar_logits_equal_pipeline_model(tiny_export, arch):
    model, folder = tiny_export(arch)
    hf = load(folder)
    x = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 1e-5


def _both(model, hf, prompt, **kw):
    eos = kw.pop("eos_token_id", None)
    cfg = SamplerConfig(eos_token_id=eos, stop_at_eos=eos is not None, **kw)
    ours = generate(model, prompt, cfg).tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = hf.bd3_generate(
            prompt, kw["max_new_tokens"], kw["block_size"], sampler=kw["sampler"], threshold=kw["threshold"],
            top_p=kw.get("top_p", 1.0), seed=kw["seed"], stop_at_eos=eos is not None, eos_token_id=eos,
            steps_per_block=kw.get("steps_per_block"),
        )  # fmt: skip
    assert torch.equal(theirs[:, : prompt.shape[1]], prompt)
    return ours, theirs[:, prompt.shape[1] :]


# Both denoise whole blocks (cut afterwards) and take a token's confidence from the plain softmax, so
# they draw the same numbers at any length and top-p. The full grid on llama; the other shapes at the
# trained block size.
GRID = [("llama", 1), ("llama", 4), ("llama", 16), ("mistral", 4), ("qwen2", 4)]


@pytest.mark.parametrize("sampler", ["confidence", "first_hitting", "ddpm_cache"])
@pytest.mark.parametrize("arch, block_size", GRID)
def test_bd3_generate_equals_pipeline_sampler(tiny_export, arch, block_size, sampler):
    model, hf = sharpened(*tiny_export(arch))
    prompt = torch.randint(3, 250, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    n = 3 * 16 - PROMPT_LEN  # ends on the grid of every block size
    ours, theirs = _both(
        model, hf, prompt, block_size=block_size, max_new_tokens=n, sampler=sampler, threshold=0.3, seed=7
    )
    assert ours.shape == theirs.shape == (2, n)
    assert torch.equal(ours, theirs)
    assert not (theirs >= 250).any()  # never the mask token or a padding row
    if sampler == "confidence" and block_size > 1:  # threshold 0.3 unmasks several tokens per step
        steps = generate(
            model, prompt, SamplerConfig(block_size=block_size, max_new_tokens=n, threshold=0.3, seed=7)
        )
        assert steps.nfe < n


@pytest.mark.parametrize("sampler", ["confidence", "first_hitting", "ddpm_cache"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_bd3_generate_equals_pipeline_off_the_grid_with_top_p(tiny_export, block_size, sampler):
    """A length that ends inside a block (the last block is denoised whole, then cut) and top-p 0.9."""
    model, hf = sharpened(*tiny_export("llama"))
    prompt = torch.randint(3, 250, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(4))
    n = 3 * 16 - PROMPT_LEN - 3
    ours, theirs = _both(
        model,
        hf,
        prompt,
        block_size=block_size,
        max_new_tokens=n,
        sampler=sampler,
        threshold=0.3,
        top_p=0.9,
        seed=5,
    )
    assert ours.shape == theirs.shape == (2, n)
    assert torch.equal(ours, theirs)


def test_bd3_generate_ddpm_cache_skips_the_network_when_nothing_changes(tiny_export):
    """ddpm_cache with more steps than positions (8 steps for blocks of 4): many steps unmask nothing
    and reuse the last probabilities. Same tokens as pipeline.sample, and the transformers model runs
    exactly as many forwards as pipeline's network calls plus cache writes, fewer than the steps."""
    model, hf = sharpened(*tiny_export("llama"))
    prompt = torch.randint(3, 250, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(2))
    kw = dict(block_size=4, max_new_tokens=3 * 16 - PROMPT_LEN, sampler="ddpm_cache", threshold=0.9, seed=11)
    calls = []
    hook = hf.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        ours, theirs = _both(model, hf, prompt, steps_per_block=8, **kw)
    finally:
        hook.remove()
    assert torch.equal(ours, theirs)
    result = generate(model, prompt, SamplerConfig(steps_per_block=8, **kw))
    assert len(calls) == result.nfe + result.cache_writes
    blocks = -(-(PROMPT_LEN + kw["max_new_tokens"]) // 4) - PROMPT_LEN // 4
    assert result.nfe < 8 * blocks


def test_bd3_generate_stops_at_eos_like_pipeline(tiny_export):
    model, hf = sharpened(*tiny_export("llama"))
    prompt = torch.randint(3, 250, (3, PROMPT_LEN), generator=torch.Generator().manual_seed(2))
    kw = dict(block_size=4, max_new_tokens=35, sampler="first_hitting", threshold=0.9, seed=3)
    free, _ = _both(model, hf, prompt, **kw)
    eos = int(free[0, 6])  # a token that the first row generates early
    ours, theirs = _both(model, hf, prompt, eos_token_id=eos, **kw)
    assert torch.equal(ours, theirs)
    first = int((theirs[0] == eos).nonzero()[0])
    assert first <= 6 and (theirs[0, first:] == eos).all()


def test_bf16_loading_generates(tiny_export):
    model, folder = tiny_export("qwen2")
    hf = load(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    x = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        logits = hf(x).logits.float()
    assert (logits - ref).abs().max() < 0.1 * ref.abs().max()  # bf16 rounding, not a different model
    out = hf.bd3_generate(x[:, :4], max_new_tokens=12, block_size=4, seed=0)
    assert out.shape == (1, 16) and not (out >= 250).any()


def test_remote_code_imports_only_torch_and_transformers(tiny_export, tmp_path):
    """Load and sample in a fresh interpreter where this project cannot be imported."""
    _, folder = tiny_export("mistral")
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("pipeline", "tests", "data_prep"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        out = m.bd3_generate(torch.tensor([[1, 5, 9]]), max_new_tokens=5, block_size=4, seed=0)
        print("OK", tuple(out.shape), sorted(k for k in sys.modules if k.split(".")[0] == "pipeline"))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK (1, 8) []" in res.stdout


def test_blocks_are_denoised_whole_and_cut_afterwards(tiny_export):
    """A shorter request is a prefix of a longer one: the last block is never shortened (the random
    draws of a partial block would differ)."""
    _, hf = sharpened(*tiny_export("llama"))
    prompt = torch.randint(3, 250, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(4))
    kw = dict(block_size=4, sampler="confidence", threshold=0.3, seed=5)
    long = hf.bd3_generate(prompt, max_new_tokens=11, **kw)
    for n in (9, 10):
        assert torch.equal(hf.bd3_generate(prompt, max_new_tokens=n, **kw), long[:, : PROMPT_LEN + n])


def test_confidence_is_the_plain_softmax_whatever_top_p(tiny_export):
    """Greedy candidates do not depend on top-p; with the plain-softmax confidence neither do the
    positions unmasked, so top_p changes nothing (a confidence after top-p renormalization would)."""
    _, hf = sharpened(*tiny_export("llama"), scale=2.0)
    prompt = torch.randint(3, 250, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=27, block_size=16, sampler="confidence", threshold=0.3, temperature=0, seed=0)
    plain = hf.bd3_generate(prompt, top_p=1.0, **kw)
    assert torch.equal(hf.bd3_generate(prompt, top_p=0.3, **kw), plain)


def test_modeling_defaults_are_the_samplers():
    """modeling_bd3.py imports only torch and transformers, so it restates SamplerConfig's defaults."""
    from pipeline.hf_artifact.modeling_bd3 import GENERATION_DEFAULTS

    d = SamplerConfig()
    assert GENERATION_DEFAULTS == {
        k: None if k == "block_size" else getattr(d, k) for k in GENERATION_DEFAULTS
    }


def test_generation_config_holds_the_sampling_defaults_and_arguments_override(tiny_export):
    """Without an evaluation given, the defaults are pipeline.sample's at the trained block size; the
    model card states them; an argument given wins over generation_config.json."""
    model, folder = tiny_export("llama")
    saved = json.loads((folder / "generation_config.json").read_text())["bd3"]
    d = SamplerConfig()
    assert {k: v for k, v in saved.items() if k != "source"} == {
        "max_new_tokens": d.max_new_tokens, "block_size": 4, "sampler": d.sampler, "threshold": d.threshold,
        "top_p": d.top_p, "temperature": d.temperature, "seed": d.seed, "stop_at_eos": d.stop_at_eos,
        "steps_per_block": d.steps_per_block,
    }  # fmt: skip
    assert "`block_size=4`" in (folder / "README.md").read_text()
    hf = load(folder)
    assert hf.generation_config.bd3 == saved
    prompt = torch.randint(3, 250, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=12, top_p=0.8, seed=9, stop_at_eos=False)
    ours = generate(model, prompt, SamplerConfig(block_size=4, **kw)).tokens
    assert torch.equal(hf.bd3_generate(prompt, **kw)[:, PROMPT_LEN:], ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # block size 2 was not trained
        other = hf.bd3_generate(prompt, block_size=2, **kw)[:, PROMPT_LEN:]
    assert torch.equal(other, generate(model, prompt, SamplerConfig(block_size=2, **kw)).tokens)


@pytest.mark.parametrize("sampler", ["confidence", "first_hitting", "ddpm_cache"])
def test_return_nfe_counts_the_denoising_calls_as_pipeline_sample(tiny_export, sampler):
    """``return_nfe`` gives pipeline's ``GenerationResult.nfe``; the model's forwards are those plus
    the cache writes (``GenerationResult.cache_writes``)."""
    model, hf = sharpened(*tiny_export("llama"))
    prompt = torch.randint(3, 250, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(8))
    kw = dict(block_size=4, max_new_tokens=23, sampler=sampler, threshold=0.3, seed=2, steps_per_block=6)
    result = generate(model, prompt, SamplerConfig(stop_at_eos=False, **kw))
    calls = []
    hook = hf.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        ids, nfe = hf.bd3_generate(prompt, stop_at_eos=False, return_nfe=True, **kw)
    finally:
        hook.remove()
    assert torch.equal(ids[:, PROMPT_LEN:], result.tokens)
    assert nfe == result.nfe and len(calls) == result.nfe + result.cache_writes
    if sampler == "confidence":  # threshold 0.3 unmasks several tokens per call
        assert nfe < result.tokens.shape[1]


def test_the_demos_evaluated_sampling_is_the_exports_default(tiny_export, tmp_path):
    """The demo's stage 6 (``pipeline.sample`` with the demo's own arguments, ``--out``) given to the
    export (``--sample-json``): ``bd3_generate(input_ids)`` alone gives pipeline.sample's tokens and
    NFE, under whichever transformers this runs (4.57 in .venv, 5.x in .venv-compat)."""
    from pipeline import sample
    from pipeline.demo import SAMPLING, sampling_args

    model, folder = tiny_export("llama")
    out = tmp_path / "sample.json"
    assert (
        sample.main(["--checkpoint", str(folder), *sampling_args(40), "--device", "cpu", "--out", str(out)])
        == 0
    )
    evaluated = json.loads(out.read_text())
    assert {k: evaluated["settings"][k] for k in SAMPLING} == SAMPLING
    export = write_artifact(model, tmp_path / "export", CardFacts.from_files(sample_json=out))
    hf = load(export)
    ids, nfe = hf.bd3_generate(torch.tensor([[TINY_HF["bos_token_id"]]]), return_nfe=True)
    tokens = evaluated["tokens"]
    assert ids[0, 1 : 1 + len(tokens)].tolist() == tokens and nfe == evaluated["nfe"]
    assert (ids[0, 1 + len(tokens) :] == TINY_HF["eos_token_id"]).all()  # stopped at EOS, as the CLI


def test_eager_and_sdpa_attention_take_the_same_mask(tiny_export):
    """The 4D additive mask goes to transformers' eager and SDPA attention as is, in 4.57 and 5.x."""
    _, folder = tiny_export("mistral")
    prompt = torch.randint(3, 250, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=11, sampler="first_hitting", seed=4, stop_at_eos=False)
    eager = load(folder, attn_implementation="eager").bd3_generate(prompt, **kw)
    assert torch.equal(load(folder, attn_implementation="sdpa").bd3_generate(prompt, **kw), eager)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_theta": 500000.0},
        {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ],
    ids=["theta", "llama3", "linear"],
)  # fmt: skip
def test_rotary_settings_survive_the_export(tmp_path, rope):
    """A checkpoint written by this transformers (rope_parameters in 5.x, rope_theta/rope_scaling in
    4.57) loads into pipeline's model and back out through the export with the same AR logits."""
    ckpt, ar = write_tiny_hf_checkpoint(tmp_path / "ar", "llama", **rope)
    write_tokenizer(ckpt / "tokenizer.json", n_words=TINY_HF["vocab_size"] - 1)
    model = from_pretrained(ckpt, block_size=4).eval()
    folder = write_artifact(model, tmp_path / "export")
    x = torch.randint(0, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, ours, theirs = ar(x).logits, model(x)[..., :250], load(folder)(x).logits[..., :250]
    assert (ours - reference).abs().max() < 1e-4
    assert (theirs - reference).abs().max() < 1e-4
