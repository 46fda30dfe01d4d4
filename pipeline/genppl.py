"""Generative perplexity by BD3-LM's protocol (``diffusion.py``, ``metrics.py``, ``log_sample_stats.py``).

- Samples have a fixed length: the start token then ``max_new_tokens`` (the paper's ``model.length`` of
  1,024 is the start token and 1,023 generated ones, on the block grid aligned at 0 that holds the
  start token in its first block; one token per step, nucleus 0.9); EOS does not stop them.
- A sample is redrawn when, after any block whose end lies past 256 tokens, the unigram entropy of its
  last 256 tokens is below 4 nats (BD3-LM's ``_check_stop_conds``); after 10 draws of one sample it is
  an error.
- The scorer is any ``transformers`` causal LM (``AutoModelForCausalLM``; the paper uses GPT-2 large)
  with its own tokenizer. BD3-LM decodes a sample with its special tokens and re-encodes the text with
  the scorer's tokenizer (the same GPT-2 tokenizer there, so its BOS/EOS text becomes the scorer's EOS
  id); for any pair of tokenizers this is done piecewise: the text between the model's special tokens is
  re-encoded (no special tokens added), the start token becomes the scorer's BOS (its EOS when it has
  none, as GPT-2) and every model EOS the scorer's EOS. The ids are cut at the sample's length (BD3-LM's
  ``max_length=model.length``), scored from the second one on in windows of the scorer's context moved
  by half of it (BD3-LM's sliding window, which at 1,024 tokens under GPT-2 is one window), and tokens
  equal to the scorer's EOS are not counted.
- Reported: the mean of per-sample perplexities (BD3-LM's figure, ``log_sample_stats.py``), the
  perplexity of all tokens pooled, and the mean per-sample unigram entropy of the scorer's ids
  (``metrics.py``: the whole re-tokenized sample, its BOS/EOS ids included).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.diffusion.sampler import SamplerConfig, generate

ENTROPY_WINDOW = 256
ENTROPY_MIN = 4.0
MAX_DRAWS = 10
# BD3-LM's paper settings: ``--genppl-protocol bd3lm`` (small defaults stay for CPU).
# 1,023 generated tokens after the start token: samples of BD3-LM's model.length, 1,024.
BD3LM_PROTOCOL = {"max_new_tokens": 1023, "num_samples": 300, "sampler": "first_hitting", "top_p": 0.9}


def entropy(tokens) -> float:
    """Unigram entropy (nats) of ``tokens``, as BD3-LM's ``_compute_entropy``."""
    _, counts = torch.unique(torch.as_tensor(list(tokens)), return_counts=True)
    return float(torch.special.entr(counts.double() / counts.sum()).sum())


def degenerate(row: list[int], block_size: int) -> bool:
    """Whether BD3-LM would redraw ``row`` (the start token and what followed, on the grid aligned at 0:
    block k ends at (k + 1) x block_size tokens): low entropy of the last 256 tokens after any block that
    ends past 256 tokens."""
    ends = [e for e in range(ENTROPY_WINDOW + 1, len(row) + 1) if e % block_size == 0 or e == len(row)]
    return any(entropy(row[e - ENTROPY_WINDOW : e]) < ENTROPY_MIN for e in ends)


def draw_samples(
    model, cfg: SamplerConfig, num_samples: int, start_token: int
) -> tuple[list[list[int]], int]:
    """``num_samples`` fixed-length samples (token ids after the start token) and the number of redraws.
    Draw d of sample i is seeded ``cfg.seed + i * MAX_DRAWS + d``: a sample does not depend on the others."""
    cfg = replace(cfg, stop_at_eos=False)
    device = model.lm_head.weight.device
    out, redraws = [], 0
    for i in range(num_samples):
        for d in range(MAX_DRAWS):
            res = generate(
                model,
                torch.tensor([[start_token]], device=device),
                replace(cfg, seed=cfg.seed + i * MAX_DRAWS + d),
            )
            row = res.tokens[0].tolist()
            if not degenerate([start_token, *row], cfg.block_size):
                out.append(row)
                break
            redraws += 1
        else:
            raise ValueError(
                f"sample {i}: {MAX_DRAWS} draws all had unigram entropy below {ENTROPY_MIN} nats over "
                f"{ENTROPY_WINDOW} tokens (BD3-LM's filter): the model generates degenerate text"
            )
    return out, redraws


def load_scorer(name: str | Path, device):
    """(model, tokenizer) of any ``transformers`` causal LM: a folder or a hub name."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(name)).to(device).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(name))


def scorer_ids(row: list[int], tokenizer, specials: set[int], scorer_tokenizer) -> list[int]:
    """The scorer's ids of a sample ``row`` (start token first; ``tokenizer`` a ``tokenizers.Tokenizer``):
    text between the model's special tokens (``specials``) re-encoded without added special tokens, the
    start token as the scorer's BOS (else its EOS), other special tokens as the scorer's EOS; cut at
    ``len(row)`` ids."""
    eos = scorer_tokenizer.eos_token_id
    bos = scorer_tokenizer.bos_token_id if scorer_tokenizer.bos_token_id is not None else eos
    out, piece = ([bos] if bos is not None else []), []

    def flush():
        if piece:
            text = tokenizer.decode(piece, skip_special_tokens=True)
            out.extend(scorer_tokenizer(text, add_special_tokens=False)["input_ids"])
            piece.clear()

    for t in row[1:]:
        if t in specials:
            flush()
            if eos is not None:
                out.append(eos)
        else:
            piece.append(t)
    flush()
    return out[: len(row)]


def scorer_context(scorer) -> int:
    return getattr(scorer.config, "n_positions", None) or scorer.config.max_position_embeddings


@torch.no_grad()
def score_ids(samples: list[list[int]], scorer, eos: int | None) -> list[tuple[float, int, float]]:
    """(NLL sum, scored tokens, unigram entropy of the ids) per sample of scorer ids: every id from the
    second one is scored once, in windows of the scorer's context moved by half of it (BD3-LM's sliding
    window); ids equal to ``eos`` are not counted."""
    device = next(scorer.parameters()).device
    context = scorer_context(scorer)
    stride = max(context // 2, 1)
    out = []
    for ids in samples:
        if len(ids) < 2:
            out.append((0.0, 0, entropy(ids) if ids else 0.0))
            continue
        x = torch.tensor(ids, device=device)
        nll = torch.zeros(len(ids), dtype=torch.float64, device=device)  # nll[l]: of id l given ids < l
        n_windows = max(math.ceil((len(ids) - context + stride) / stride), 1)
        for w in range(n_windows):
            start = w * stride
            end = min(start + context, len(ids))
            logp = torch.log_softmax(scorer(x[None, start:end]).logits[0, :-1].double(), dim=-1)
            window = -logp.gather(-1, x[start + 1 : end, None]).squeeze(-1)  # ids start+1 .. end-1
            first = start + 1 if w == 0 else start + context - stride  # the ids no earlier window scored
            nll[first:end] = window[first - start - 1 :]
        valid = x[1:] != eos if eos is not None else torch.ones(len(ids) - 1, dtype=torch.bool, device=device)
        out.append((float(nll[1:][valid].sum()), int(valid.sum()), entropy(ids)))
    return out


def generative_perplexity(model, tokenizer, scorer_name, cfg: SamplerConfig, num_samples: int) -> dict:
    """BD3-LM's generative perplexity of ``model`` (a ``BD3LM``; ``tokenizer`` a ``tokenizers.Tokenizer``)
    under the causal LM ``scorer_name``."""
    c = model.config
    start = c.start_token_id if c.start_token_id is not None else 0
    rows, redraws = draw_samples(model, cfg, num_samples, start)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    scorer, scorer_tok = load_scorer(scorer_name, model.lm_head.weight.device)
    specials = {t for t in (c.bos_token_id, c.eos_token_id, c.pad_token_id, start) if t is not None}
    ids = [scorer_ids([start, *r], tokenizer, specials, scorer_tok) for r in rows]
    scores = score_ids(ids, scorer, scorer_tok.eos_token_id)
    per_sample = [math.exp(s / n) for s, n, _ in scores if n > 0]
    total, count = sum(s for s, _, _ in scores), sum(n for _, n, _ in scores)
    return {
        "gen_ppl_mean": sum(per_sample) / len(per_sample) if per_sample else float("nan"),
        "gen_ppl_pooled": math.exp(total / count) if count else float("nan"),
        "entropy_mean": sum(e for _, _, e in scores) / max(len(scores), 1),
        "scored_tokens": count,
        "redraws": redraws,
        "samples": texts,
    }
