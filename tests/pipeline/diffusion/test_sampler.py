"""Block sampler: KV cache exactness, EOS, samplers' definitions, determinism, and the CLI."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from pipeline.diffusion.sampler import SAMPLERS, SamplerConfig, filter_top_p, generate
from pipeline.model import save_pretrained
from tests.factories import random_model, tiny_model_config

VOCAB = 120


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tiny_model_config(
        VOCAB, hidden_size=48, max_position_embeddings=64, eos_token_id=2, bos_token_id=1, block_size=4
    )
    # Sharper distributions than the 0.02-std init, so samplers make choices.
    return random_model(cfg, logit_scale=40).eval()


def _gen(model, prompt, **kw):
    kw.setdefault("stop_at_eos", False)
    return generate(model, prompt, SamplerConfig(**kw))


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prompt_len", [1, 5, 8])
@pytest.mark.parametrize("align", [False, True], ids=["grid0", "align_prompt"])
def test_kv_cache_gives_the_same_tokens_as_recomputing_the_prefix(model, sampler, prompt_len, align):
    """With ``align_prompt`` the two modes shift the grid independently: the cache writes a shorter first
    block, the recomputed prefix puts pad positions in a document of their own before the prompt."""
    prompt = torch.randint(0, VOCAB, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    kw = dict(block_size=4, max_new_tokens=40, sampler=sampler, seed=7, align_prompt=align)
    # 40 + prompt stays inside the 64-token context, where the cache is exact.
    a = _gen(model, prompt, **kw)
    b = _gen(model, prompt, **kw, use_kv_cache=False)
    assert a.tokens.shape == (2, 40)
    assert torch.equal(a.tokens, b.tokens)
    assert a.cache_writes > 0 and b.cache_writes == a.cache_writes
    if align and prompt_len % 4:  # another grid, other text (at temperature 1 with the same seed)
        assert not torch.equal(a.tokens, _gen(model, prompt, **{**kw, "align_prompt": False}).tokens)


def test_aligned_prompt_generates_as_a_prompt_of_whole_blocks(model):
    """``align_prompt`` after a 5-token prompt equals the grid at 0 after the same prompt preceded by 3
    tokens no query may see: checked through the model's per-document masking and positions, one block
    at a time, with greedy confidence decoding (the reference loop below)."""
    from pipeline.model.masks import AttentionMask

    prompt = torch.tensor([[7, 3, 11, 40, 9]])
    got = _gen(model, prompt, block_size=4, max_new_tokens=8, temperature=0, align_prompt=True).tokens
    mask_id = model.config.mask_token_id
    seq = torch.cat([torch.full((1, 3), mask_id), prompt], dim=1)  # blocks [pad pad pad 7] [3 11 40 9]
    for _ in range(2):  # two blocks of 4, greedy, one token per step (threshold 0.9 rarely passes)
        block = torch.full((1, 4), mask_id)
        while (block == mask_id).any():
            x = torch.cat([seq, block], dim=1)
            docs = (torch.arange(x.shape[1]) >= 3).long()[None]
            pos = (torch.arange(x.shape[1]) - 3).clamp(min=0)
            with torch.no_grad():
                logits = model(x, attn=AttentionMask("block_causal", 4), positions=pos, doc_ids=docs).float()
            logits[..., model.invalid_output_ids] = float("-inf")
            probs = torch.softmax(logits[0, seq.shape[1] - 1 : -1], -1)  # the shift: position l-1 predicts l
            conf, cand = probs.max(-1)
            masked = block[0] == mask_id
            unmask = masked & (conf > 0.9)
            unmask[torch.where(masked, conf, torch.full_like(conf, -1.0)).argmax()] = True
            block[0] = torch.where(unmask, cand, block[0])
        seq = torch.cat([seq, block], dim=1)
    assert got[0].tolist() == seq[0, 8:].tolist()


def test_generation_goes_past_the_context_with_a_sliding_window(model):
    prompt = torch.tensor([[1, 5, 9]])
    r = _gen(model, prompt, block_size=8, max_new_tokens=200, sampler="confidence", temperature=0)
    assert r.tokens.shape == (1, 200)
    assert (r.tokens < VOCAB).all()


def test_eos_stops_generation(model):
    prompt = torch.tensor([[1, 7]])
    free = _gen(model, prompt, block_size=4, max_new_tokens=48, temperature=0, sampler="confidence")
    seq = free.tokens[0].tolist()
    k = 13
    eos = seq[k]
    first = seq.index(eos)  # the first time that token appears is where generation must stop
    stopped = generate(
        model,
        prompt,
        SamplerConfig(block_size=4, max_new_tokens=48, temperature=0, sampler="confidence", eos_token_id=eos),
    )
    assert stopped.lengths == [first + 1]
    assert stopped.tokens[0, : first + 1].tolist() == seq[: first + 1]
    # Generation ends with the block that holds EOS: nothing beyond it was denoised.
    block_end = ((first + 2) // 4 + 1) * 4 - 2  # prompt of 2 tokens shares the first block
    assert stopped.tokens.shape[1] <= block_end
    assert (stopped.tokens[0, first + 1 :] == eos).all()


def test_confidence_with_threshold_one_unmasks_one_token_per_step(model):
    prompt = torch.tensor([[1, 3, 4, 5, 6, 7, 8, 9]])  # one full block: generated blocks start aligned
    r = _gen(model, prompt, block_size=8, max_new_tokens=32, sampler="confidence", threshold=1.0)
    assert r.steps == 32
    r0 = _gen(model, prompt, block_size=8, max_new_tokens=32, sampler="confidence", threshold=0.0)
    assert r0.steps == 32 // 8  # everything above probability 0: one step per block


def test_first_hitting_takes_one_token_per_step(model):
    r = _gen(model, torch.tensor([[1, 3]]), block_size=4, max_new_tokens=22, sampler="first_hitting")
    assert r.steps == 22


def test_ddpm_cache_skips_the_network_when_nothing_changes(model):
    prompt = torch.tensor([[1, 3, 4, 5]])
    r = _gen(model, prompt, block_size=4, max_new_tokens=32, sampler="ddpm_cache", steps_per_block=64)
    # 64 steps per block but at most 4 tokens change per block: the network runs only after changes.
    assert r.nfe <= 32
    assert r.steps <= 32


def test_top_p_definition():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.equal(filter_top_p(p, 1.0), p)
    assert torch.allclose(filter_top_p(p, 0.7), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # 0.8 > 0.7: dropped
    assert torch.allclose(filter_top_p(p, 0.5), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(filter_top_p(p, 0.81), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(filter_top_p(p, 0.3), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # the top token stays


def _reference_nucleus(p_x0, p):
    """BD3-LM's ``Diffusion._nucleus_sample`` (diffusion.py), transcribed line by line on (..., V) rows."""
    p_x0_ = p_x0.clone()
    sorted_probs, sorted_indices = p_x0_.sort(dim=-1, descending=True)
    cum_probs = sorted_probs.cumsum(dim=-1)
    nucleus_mask = cum_probs <= p
    nucleus_mask[..., 0] = 1
    sorted_probs = sorted_probs * nucleus_mask
    p_x0_.scatter_(-1, sorted_indices, sorted_probs * nucleus_mask)
    p_x0_ /= p_x0_.sum(-1, keepdim=True)
    return p_x0_


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_is_bd3lms_nucleus_in_the_sampler_and_the_export(top_p):
    from pipeline.hf_artifact.modeling_bd3 import top_p_filter

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(4, 6, 50, generator=g), dim=-1)
    ref = _reference_nucleus(probs, top_p)
    assert torch.allclose(filter_top_p(probs, top_p), ref, atol=1e-7)
    assert torch.allclose(top_p_filter(probs, top_p), ref, atol=1e-7)


def test_tiny_top_p_samples_the_argmax_and_top_p_one_samples_the_distribution():
    from pipeline.diffusion.sampler import _sample

    probs = torch.softmax(torch.randn(2000, 30, generator=torch.Generator().manual_seed(0)), -1)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(_sample(filter_top_p(probs, 1e-6), gen, 1.0), probs.argmax(-1))
    draws = _sample(probs, gen, 1.0)
    # Unfiltered sampling follows the distribution: the argmax is drawn about mean(max p) of the time.
    hit = (draws == probs.argmax(-1)).float().mean()
    assert abs(hit - probs.max(-1).values.mean()) < 0.04


def test_top_p_changes_generation(model):
    prompt = torch.tensor([[1, 3, 4]])
    base = _gen(model, prompt, block_size=4, max_new_tokens=16, sampler="first_hitting", seed=3)
    same = _gen(model, prompt, block_size=4, max_new_tokens=16, sampler="first_hitting", seed=3, top_p=1.0)
    narrow = _gen(model, prompt, block_size=4, max_new_tokens=16, sampler="first_hitting", seed=3, top_p=0.05)
    assert torch.equal(base.tokens, same.tokens)
    assert not torch.equal(base.tokens, narrow.tokens)


def test_deterministic_under_a_seed(model):
    prompt = torch.tensor([[1, 3, 4]])
    a = _gen(model, prompt, block_size=4, max_new_tokens=24, seed=11)
    b = _gen(model, prompt, block_size=4, max_new_tokens=24, seed=11)
    c = _gen(model, prompt, block_size=4, max_new_tokens=24, seed=12)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)


def test_never_emits_mask_or_padding(model):
    r = _gen(model, torch.tensor([[1]]), block_size=4, max_new_tokens=40, seed=1)
    assert (r.tokens < VOCAB).all()


@pytest.mark.parametrize(
    "field, value",
    [
        ("sampler", "beam"),
        ("threshold", 1.5),
        ("top_p", 0),
        ("temperature", -1.0),
        ("block_size", 0),
        ("max_new_tokens", -1),
    ],
)
def test_bad_sampler_config_is_refused_naming_the_field(field, value):
    """The message starts with the field (the trainer reports it as callbacks.generation.<field>)."""
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplerConfig(**{field: value})


def test_sample_cli_writes_json_and_cache_matches_no_cache(model, tmp_path):
    from pipeline.sample import main

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ckpt = save_pretrained(model, tmp_path / "ckpt")
    tok.save(str(ckpt / "tokenizer.json"))
    outs = []
    for extra in ([], ["--no-kv-cache"]):
        out = tmp_path / f"out{len(extra)}.json"
        args = [
            "--checkpoint",
            str(ckpt),
            "--prompt",
            "w5 w6 w7",
            "--max-new-tokens",
            "20",
            "--seed",
            "3",
            "--sampler",
            "confidence",
            "--no-stop-at-eos",
            "--out",
            str(out),
            *extra,
        ]
        assert main(args) == 0
        outs.append(json.loads(out.read_text()))
    assert outs[0]["tokens"] == outs[1]["tokens"]
    assert len(outs[0]["tokens"]) == 20
    assert {"tokens", "text", "nfe", "tokens_per_s"} <= outs[0].keys()
    assert outs[0]["nfe"] > 0 and outs[0]["tokens_per_s"] > 0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_last_block_is_denoised_whole_then_cut(model, monkeypatch, sampler):
    """max_new_tokens not a multiple of L': the last block still has L' positions (the shape training
    sees), so the kept tokens are those of the longer run that completes the block."""
    from pipeline.diffusion import sampler as sampler_module

    shapes = []
    denoise = sampler_module._denoise_block

    def spy(ctx, block, *args):
        shapes.append(block.shape[1])
        return denoise(ctx, block, *args)

    monkeypatch.setattr(sampler_module, "_denoise_block", spy)
    prompt = torch.tensor([[1, 3, 4, 5]])
    short = _gen(model, prompt, block_size=4, max_new_tokens=6, sampler=sampler, seed=3)
    assert shapes == [4, 4] and short.tokens.shape == (1, 6)
    full = _gen(model, prompt, block_size=4, max_new_tokens=8, sampler=sampler, seed=3)
    assert torch.equal(short.tokens, full.tokens[:, :6])


class _FixedContext:
    """A context whose every prediction is the same distribution (no network)."""

    def __init__(self, probs: list[float], n: int):
        self.logits = torch.tensor(probs).log().expand(1, n, -1).clone()
        self.last_logits = self.logits[:, 0]
        self.cache = object()
        self.tokens = torch.zeros(1, 0, dtype=torch.long)
        self.steps = 0

    def block_logits(self, block):
        return self.logits


def test_confidence_is_the_plain_softmax_not_the_nucleus():
    """p = [0.88, 0.05, 0.04, 0.03], top-p 0.9 keeps the first two: renormalized, the top token has
    0.946 > threshold 0.9, but its plain probability 0.88 does not cross it (Fast-dLLM v2): one token
    per step (the most confident), not the whole block at once."""
    from pipeline.diffusion.sampler import _denoise_block

    cfg = SamplerConfig(block_size=4, sampler="confidence", threshold=0.9, top_p=0.9, temperature=0.0)
    ctx = _FixedContext([0.88, 0.05, 0.04, 0.03], 4)
    mask_id = 9
    block = torch.full((1, 4), mask_id)
    out = _denoise_block(ctx, block, cfg, torch.tensor([], dtype=torch.long), mask_id, torch.Generator())
    assert out.tolist() == [[0, 0, 0, 0]]
    assert ctx.steps == 4
    ctx = _FixedContext([0.92, 0.05, 0.02, 0.01], 4)  # above the threshold: the whole block in one step
    _denoise_block(ctx, block, cfg, torch.tensor([], dtype=torch.long), mask_id, torch.Generator())
    assert ctx.steps == 1
