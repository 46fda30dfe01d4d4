"""Generative perplexity by BD3-LM's protocol: a tiny GPT-2 as the scorer, fixed-length samples, the
entropy filter, both averages."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.genppl import degenerate, draw_samples, entropy, score_ids, scorer_ids
from tests.factories import random_model, tiny_model_config, write_tiny_hf_checkpoint, write_tokenizer


def _gpt2(folder, n_positions: int):
    """A tiny GPT-2 (``transformers.GPT2Config``) with a word-level tokenizer of the words w0..w248."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=250, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2, eos_token_id=0
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tok = write_tokenizer(folder / "tokenizer.json", n_words=249)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok), eos_token="<|endoftext|>").save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return _gpt2(tmp_path_factory.mktemp("gpt2"), 512)


def _bd3lms_scores(texts, scorer, tok, max_length, context):
    """BD3-LM's ``Metrics.record_generative_perplexity`` and entropy (metrics.py), transcribed for one
    sample per batch (the paper's ``eval_batch_size=1``), its eval_context_size and stride (1024 and 512
    for GPT-2) given as the scorer's context and half of it: (perplexity, valid tokens, entropy)."""
    import torch.nn.functional as F

    stride = context // 2
    tok.pad_token = tok.eos_token  # as Metrics.__init__
    out = []
    for text in texts:
        samples = tok([text], return_tensors="pt", truncation=True, padding=True, max_length=max_length)[
            "input_ids"
        ]
        nlls_accum = torch.zeros_like(samples, dtype=torch.float64)
        valid_accum = torch.zeros_like(samples, dtype=torch.float64)
        num_strides = max(math.ceil((samples.shape[-1] - context + stride) / stride), 1)
        for i in range(num_strides):
            start = 0 if i == 0 else i * stride
            end = min(start + context, samples.shape[-1])
            chunk = samples[..., start:end]
            with torch.no_grad():
                logits = scorer(chunk)[0].double().transpose(-1, -2)
            nlls = F.cross_entropy(logits[..., :-1], chunk[..., 1:], reduction="none")
            valid = (chunk[..., 1:] != tok.eos_token_id).double()
            if i == 0:
                nlls_accum[..., start + 1 : end] += nlls
                valid_accum[..., start + 1 : end] += valid
            else:
                update_start = start + context - stride
                window = end - update_start
                nlls_accum[..., update_start:end] += nlls[..., -window:]
                valid_accum[..., update_start:end] += valid[..., -window:]
        avg_nll = (nlls_accum * valid_accum).sum() / valid_accum.sum()
        _, counts = torch.unique(samples[0], return_counts=True, sorted=False)
        ent = torch.special.entr(counts.double() / counts.sum()).sum()
        out.append((float(avg_nll.exp()), int(valid_accum.sum()), float(ent)))
    return out


@pytest.mark.parametrize("n_positions", [512, 16], ids=["one_window", "sliding_window"])
def test_scorer_is_bd3lms_transcribed(tmp_path, n_positions):
    """Samples with EOS inside, scored as BD3-LM does when the model's tokenizer is the scorer's (its
    case: GPT-2 for both): the decoded text with its special tokens, re-encoded, cut at the sample's
    length, scored in sliding windows past the scorer's context. The same ids, perplexities, counts and
    entropies as the transcription."""
    import transformers
    from tokenizers import Tokenizer

    folder = _gpt2(tmp_path / "gpt2", n_positions)
    scorer = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (40, 37, 12):  # the start token (EOS, as GPT-2's BOS) and n more, some of them EOS
        row = [0, *torch.randint(1, 250, (n,), generator=g).tolist()]
        row[5], row[9] = 0, 0
        rows.append(row)
    texts = [model_tok.decode(r, skip_special_tokens=False) for r in rows]
    want = _bd3lms_scores(texts, scorer, tok, max_length=41, context=n_positions)
    ids = [scorer_ids(r, model_tok, {0}, tok) for r in rows]
    assert [i[:41] for i in ids] == [tok(t, truncation=True, max_length=41)["input_ids"] for t in texts]
    got = score_ids(ids, scorer, tok.eos_token_id)
    for (ppl, n, ent), (nll, m, e) in zip(want, got):
        assert m == n and math.exp(nll / m) == pytest.approx(ppl, rel=1e-9) and e == pytest.approx(ent)


def test_entropy_is_bd3lms_and_the_filter_sees_the_last_256_tokens():
    assert entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    varied = list(range(300))
    assert not degenerate([0, *varied], 4)
    assert degenerate([0, *varied, *[7] * 260], 4)  # the last 256 tokens repeat one token
    assert not degenerate([0, *[7] * 200], 4)  # never checked before 256 tokens


def test_degenerate_model_is_redrawn_then_refused():
    from pipeline.diffusion.sampler import SamplerConfig

    cfg = tiny_model_config(max_position_embeddings=512)
    flat = random_model(cfg, seed=0).eval()
    sampler = SamplerConfig(block_size=4, max_new_tokens=300, sampler="first_hitting", top_p=0.9, seed=1)
    rows, redraws = draw_samples(flat, sampler, 2, 0)
    assert [len(r) for r in rows] == [300, 300] and redraws == 0  # fixed length, no EOS stop
    stuck = random_model(cfg, seed=0).eval()
    with torch.no_grad():  # every position predicts token 7 or 8: entropy of the last 256 tokens <= ln 2
        stuck.lm_head.weight.zero_()
        stuck.lm_head.weight[7, 0], stuck.lm_head.weight[8, 0] = 1.0, -1.0
        stuck.model.norm.weight.zero_()
        stuck.model.norm.weight[0] = 100.0
    with pytest.raises(ValueError, match="10 draws"):
        draw_samples(stuck, sampler, 1, 0)


def test_gpt2_scores_both_averages(gpt2_dir, tmp_path):
    import transformers

    from pipeline.eval import main

    scorer = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(gpt2_dir)

    ckpt, _ = write_tiny_hf_checkpoint(tmp_path / "bd3", "llama", max_position_embeddings=512)
    write_tokenizer(ckpt / "tokenizer.json", n_words=249)
    out = tmp_path / "g.json"
    args = ["--checkpoint", str(ckpt), "--data", "unused", "--genppl", "--reference", str(gpt2_dir)]
    args += [
        "--genppl-protocol",
        "bd3lm",
        "--num-samples",
        "2",
        "--gen-tokens",
        "20",
        "--gen-block-size",
        "4",
    ]
    from tests.factories import packed_rows, write_data_folder

    data = write_data_folder(tmp_path / "data", {"val": packed_rows(2, 0)}, ckpt / "tokenizer.json", 250)
    args[args.index("unused")] = str(data)
    assert main([*args, "--block-sizes", "4", "--out", str(out)]) == 0
    g = json.loads(out.read_text())["generation"]
    assert len(g["samples"]) == 2 and g["scored_tokens"] > 0 and g["protocol"]["protocol"] == "bd3lm"
    # the texts (special tokens skipped) re-encoded after the scorer's BOS (here its EOS, id 0)
    ids = [[0, *tok(t, add_special_tokens=False)["input_ids"]][:21] for t in g["samples"]]
    per = [math.exp(s / n) for s, n, _ in score_ids(ids, scorer, tok.eos_token_id) if n]
    assert g["gen_ppl_mean"] == pytest.approx(sum(per) / len(per), rel=1e-9)
    assert g["gen_ppl_pooled"] > 0 and g["entropy_mean"] > 0 and g["protocol"]["max_new_tokens"] == 20
