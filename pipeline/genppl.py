"""Generative perplexity by BD3-LM's protocol (``diffusion.py``, ``metrics.py``, ``log_sample_stats.py``).

- Samples have a fixed length (the paper: 1,024 tokens, one token per step, nucleus 0.9); EOS does not
  stop them.
- A sample is redrawn when, at any block end past 256 tokens, the unigram entropy of its last 256 tokens
  is below 4 nats (BD3-LM's ``_check_stop_conds``); after 10 draws of one sample it is an error.
- The scorer is any ``transformers`` causal LM (``AutoModelForCausalLM``; the paper uses GPT-2 large)
  with its own tokenizer: text is decoded with the model's tokenizer and re-encoded with the scorer's
  (special tokens as that tokenizer adds them: none for GPT-2), scored from the second token on, tokens
  equal to the scorer's EOS not counted.
- Reported: the mean of per-sample perplexities (BD3-LM's figure), the perplexity of all tokens pooled,
  and the mean per-sample unigram entropy of the scorer's tokens.
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
BD3LM_PROTOCOL = {"max_new_tokens": 1024, "num_samples": 300, "sampler": "first_hitting", "top_p": 0.9}


def entropy(tokens) -> float:
    """Unigram entropy (nats) of ``tokens``, as BD3-LM's ``_compute_entropy``."""
    _, counts = torch.unique(torch.as_tensor(list(tokens)), return_counts=True)
    return float(torch.special.entr(counts.double() / counts.sum()).sum())


def degenerate(row: list[int], block_size: int) -> bool:
    """Whether BD3-LM would redraw ``row`` (the start token, then blocks of ``block_size``): low entropy of
    the last 256 tokens after any block that ends past 256 tokens."""
    ends = [e for e in range(ENTROPY_WINDOW + 1, len(row) + 1) if (e - 1) % block_size == 0 or e == len(row)]
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


@torch.no_grad()
def score_texts(texts: list[str], scorer, scorer_tokenizer) -> list[tuple[float, int, float]]:
    """(NLL sum, scored tokens, unigram entropy of the scorer's tokens) per text."""
    device = next(scorer.parameters()).device
    context = getattr(scorer.config, "n_positions", None) or scorer.config.max_position_embeddings
    eos = scorer_tokenizer.eos_token_id
    out = []
    for text in texts:
        ids = scorer_tokenizer(text)["input_ids"][:context]
        if len(ids) < 2:
            out.append((0.0, 0, entropy(ids) if ids else 0.0))
            continue
        x = torch.tensor([ids], device=device)
        logp = torch.log_softmax(scorer(x).logits[0, :-1].double(), dim=-1)
        nll = -logp.gather(-1, x[0, 1:, None]).squeeze(-1)
        valid = x[0, 1:] != eos if eos is not None else torch.ones_like(nll, dtype=torch.bool)
        out.append((float(nll[valid].sum()), int(valid.sum()), entropy(ids)))
    return out


def generative_perplexity(model, tokenizer, scorer_name, cfg: SamplerConfig, num_samples: int) -> dict:
    """BD3-LM's generative perplexity of ``model`` (a ``BD3LM``; ``tokenizer`` a ``tokenizers.Tokenizer``)
    under the causal LM ``scorer_name``."""
    start = model.config.start_token_id
    rows, redraws = draw_samples(model, cfg, num_samples, start if start is not None else 0)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    scorer, scorer_tok = load_scorer(scorer_name, model.lm_head.weight.device)
    scores = score_texts(texts, scorer, scorer_tok)
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
