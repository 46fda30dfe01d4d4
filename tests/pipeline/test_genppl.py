"""Generative perplexity by BD3-LM's protocol: a tiny GPT-2 as the scorer, fixed-length samples, the
entropy filter, both averages."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.genppl import degenerate, draw_samples, entropy, score_texts
from tests.factories import random_model, tiny_model_config, write_tiny_hf_checkpoint, write_tokenizer


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 (``transformers.GPT2Config``) with a word-level tokenizer of the words w0..w248."""
    import transformers

    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=250, n_positions=512, n_embd=32, n_layer=2, n_head=2, eos_token_id=0
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tok = write_tokenizer(folder / "tokenizer.json", n_words=249)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok), eos_token="<|endoftext|>").save_pretrained(
        folder
    )
    return folder


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
    texts = ["w1 w2 w3 w4", "w5 w5 w6 <|endoftext|> w7"]
    scores = score_texts(texts, scorer, tok)
    for (nll, n, _), text in zip(scores, texts):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(scorer(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        keep = ids[0, 1:] != 0  # the scorer's EOS is not counted
        assert n == int(keep.sum()) and nll == pytest.approx(-float(lp[keep].sum()), rel=1e-9)

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
    per = [math.exp(s / n) for s, n, _ in score_texts(g["samples"], scorer, tok) if n]
    assert g["gen_ppl_mean"] == pytest.approx(sum(per) / len(per), rel=1e-9)
    assert g["gen_ppl_pooled"] > 0 and g["entropy_mean"] > 0 and g["protocol"]["max_new_tokens"] == 20
