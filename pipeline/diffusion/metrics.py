"""Likelihood of one set of weights across block sizes, and the data-driven noise interval.

Plain PyTorch (+ torch.distributed when initialized); the Composer callbacks and
``python -m pipeline.eval`` both call these functions.

Fixed noise: evaluation draw k of eval row i uses noise id ``i + k * DRAW_STRIDE`` with a fixed
seed, so two evaluations of the same weights see the same corruption and their curves compare.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from pipeline.diffusion.noise import EVAL_INTERVAL
from pipeline.diffusion.objective import DiffusionConfig, compute_nelbo
from pipeline.model.masks import check_block_size

DRAW_STRIDE = 1 << 40
EVAL_SEED = 1234
# BD3-LM's clipped-interval widths (its search tries 0.5, 0.6, 0.7, 0.8, 0.9); each slides over beta on the
# ``step`` grid (0.05): 36 candidates with [1e-3, 1]. A finer list is a choice of the YAML, not BD3-LM's.
INTERVAL_WIDTHS = (0.5, 0.6, 0.7, 0.8, 0.9)
# What the interval search minimizes: "block" is BD3-LM's variance of per-block mean losses, "row"
# the variance of per-row NELBO.
SEARCH_CRITERIA = ("block", "row")
SEARCH_CRITERION = "block"
# BD3-LM's generative-perplexity protocol: one token per step (first hitting), nucleus 0.9.
GENPPL_SAMPLER = "first_hitting"
GENPPL_TOP_P = 0.9
# The block sizes a likelihood curve evaluates by default; "L" is the sequence length (MDLM).
EVAL_BLOCK_SIZES = (1, 4, 8, 16, "L")


def resolve_block_sizes(sizes: Sequence[int | str], seq_len: int) -> list[int]:
    """``sizes`` as integers, in order ("L" is ``seq_len``); each must divide ``seq_len`` (ValueError
    naming a divisor otherwise). Strings of digits count as integers (command lines)."""
    out = []
    for b in sizes:
        size = seq_len if b == "L" else int(b)
        check_block_size(seq_len, size)
        out.append(size)
    return out


@dataclass
class BlockSizeResult:
    """NELBO (nats per scored token), its perplexity bound exp(nelbo), std error over rows."""

    block_size: int
    nelbo: float
    ppl_bound: float
    stderr: float
    tokens: int
    rows: int

    def as_dict(self) -> dict:
        return asdict(self)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def _to_model_device(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    x0 = batch["input_ids"].to(device)
    doc = batch.get("doc_starts")
    ids = batch["sample_index"].to(torch.long)
    return x0, (doc.to(device) if doc is not None else None), ids


# Over 60 lines on purpose: one pass over the batches feeds every block size's sums; split, it would pass twice.
@torch.no_grad()
def evaluate_block_sizes(
    model,
    batches: Iterable[dict],
    block_sizes: Sequence[int],
    cfg: DiffusionConfig,
    draws: int = 1,
    seed: int = EVAL_SEED,
) -> list[BlockSizeResult]:
    """NELBO per token at each block size, on the evaluation interval [1e-3, 1].

    Args:
        batches: dicts with ``input_ids`` (b, L), optional ``doc_starts`` (b, L) and
            ``sample_index`` (b,), the row's index in the eval set (fixes its noise).
        draws: Monte Carlo draws per row (averaged per row before the standard error).
    Every rank passes its own rows; sums are all-reduced in float64, so the result does not
    depend on the number of processes.
    """
    was_training = model.training
    model.eval()
    eval_cfg = dataclasses.replace(cfg, seed=seed, stratify_group=1)
    device = next(model.parameters()).device
    # per block size: [sum of row nelbo sums, sum of scored tokens, sum of row means, sum of squares, rows]
    acc = {bs: torch.zeros(5, dtype=torch.float64) for bs in block_sizes}
    for batch in batches:
        x0, doc, ids = _to_model_device(batch, device)
        for bs in block_sizes:
            row_sum = torch.zeros(x0.shape[0], dtype=torch.float64)
            for k in range(draws):
                out = compute_nelbo(
                    model,
                    x0,
                    eval_cfg,
                    ids + k * DRAW_STRIDE,
                    step=cfg.anneal_steps,
                    doc_starts=doc,
                    interval=EVAL_INTERVAL,
                    block_size=bs,
                )
                row_sum += out.nelbo_sum.double().cpu()
            row_sum /= draws
            n = out.n_scored.double().cpu()
            row_mean = row_sum / n.clamp(min=1)
            acc[bs] += torch.stack(
                [
                    row_sum.sum(),
                    n.sum(),
                    row_mean.sum(),
                    (row_mean**2).sum(),
                    torch.tensor(float(len(n)), dtype=torch.float64),
                ]
            )
    model.train(was_training)
    results = []
    for bs in block_sizes:
        total, tokens, s1, s2, rows = _all_reduce(acc[bs]).tolist()
        nelbo = total / max(tokens, 1)
        var = max(s2 / max(rows, 1) - (s1 / max(rows, 1)) ** 2, 0.0) * rows / max(rows - 1, 1)
        results.append(
            BlockSizeResult(
                bs, nelbo, math.exp(min(nelbo, 700)), math.sqrt(var / max(rows, 1)), int(tokens), int(rows)
            )
        )
    return results


def combine_results(per_stream: Sequence[Sequence[BlockSizeResult]]) -> list[BlockSizeResult]:
    """The token-weighted total of several streams' results (one list per stream, same block sizes in
    the same order): NELBO = sum of NELBO x tokens over the streams / all tokens, i.e. the NELBO of all
    their rows together. Its standard error treats the streams as strata with weights tokens / all
    tokens (exact when each stream's rows score the same number of tokens)."""
    out = []
    for same_size in zip(*per_stream):
        tokens = sum(r.tokens for r in same_size)
        nelbo = sum(r.nelbo * r.tokens for r in same_size) / max(tokens, 1)
        var = sum((r.tokens / max(tokens, 1)) ** 2 * r.stderr**2 for r in same_size)
        rows = sum(r.rows for r in same_size)
        bs = same_size[0].block_size
        out.append(BlockSizeResult(bs, nelbo, math.exp(min(nelbo, 700)), math.sqrt(var), tokens, rows))
    return out


def interval_grid(widths: Sequence[float] | None = None, step: float = 0.05) -> list[tuple[float, float]]:
    """Candidate clipped intervals [beta, beta + width] (BD3-LM: widths 0.5..0.9), plus [1e-3, 1]."""
    widths = widths or INTERVAL_WIDTHS
    grid = [EVAL_INTERVAL]
    for w in widths:
        n = int(round((1.0 - w) / step))
        grid += [(round(i * step, 4), round(i * step + w, 4)) for i in range(n + 1)]
    return grid


@torch.no_grad()
def noise_interval_search(
    model,
    batches: Sequence[dict],
    block_size: int,
    cfg: DiffusionConfig,
    grid: Sequence[tuple[float, float]] | None = None,
    seed: int = EVAL_SEED,
    criterion: str = SEARCH_CRITERION,
) -> tuple[tuple[float, float], list[dict]]:
    """The clipped interval whose training loss estimator has the lowest variance.

    For each candidate [beta, omega] the training estimator (t ~ U[beta, omega], 1/t weights, the
    masks resampled into the interval when ``cfg.resample``) is evaluated on the same rows with fixed
    noise. ``criterion``:
      - "block" (BD3-LM): the variance over every (row, block) of all rows (all ranks) of the block's
        mean loss, i.e. its (1/t)-weighted cross-entropy summed over the block / L' (losses reshaped
        (rows, blocks, L') and averaged over L'). BD3-LM sums per-batch variances; the pooled
        variance here does not depend on how rows are split into batches or ranks.
      - "row": the variance over rows of the per-row NELBO (per scored token).
    Returns the chosen interval and one record per candidate (interval, variance, mean_nelbo).
    """
    if criterion not in SEARCH_CRITERIA:
        raise ValueError(f"criterion must be one of {SEARCH_CRITERIA}, got {criterion!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    records = []
    for iv in grid or interval_grid():
        c = dataclasses.replace(cfg, seed=seed, stratify_group=1, noise_interval=iv)
        # [sum, sum of squares, count] of the criterion's values, and [nelbo sum, scored tokens]
        acc = torch.zeros(5, dtype=torch.float64)
        for batch in batches:
            x0, doc, ids = _to_model_device(batch, device)
            out = compute_nelbo(
                model, x0, c, ids, step=cfg.anneal_steps, doc_starts=doc, block_size=block_size
            )
            if criterion == "block":
                values = (out.block_nelbo / block_size).double().cpu().flatten()
            else:
                values = (out.nelbo_sum / out.n_scored.clamp(min=1)).double().cpu()
            acc += torch.stack(
                [
                    values.sum(),
                    (values**2).sum(),
                    torch.tensor(float(len(values)), dtype=torch.float64),
                    out.nelbo_sum.double().sum().cpu(),
                    out.n_scored.double().sum().cpu(),
                ]
            )
        s1, s2, n, total, tokens = _all_reduce(acc).tolist()
        mean = s1 / max(n, 1)
        var = max(s2 / max(n, 1) - mean**2, 0.0) * n / max(n - 1, 1)
        records.append({"interval": list(iv), "variance": var, "mean_nelbo": total / max(tokens, 1)})
    model.train(was_training)
    best = min(records, key=lambda r: r["variance"])
    return tuple(best["interval"]), records


def plot_ppl_bounds(
    results: Sequence[BlockSizeResult],
    path,
    title: str = "",
    ar_ppl: float | None = None,
    streams: dict[str, Sequence[BlockSizeResult]] | None = None,
):
    """PNG of the perplexity bound against block size (log x axis), with the AR line if known; with
    ``streams`` ({name: results}) one line per stream beside ``results`` (their token-weighted total)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    series = {**(streams or {}), "BD3 NELBO bound" + (" (all streams)" if streams else ""): results}
    for label, rs in series.items():
        xs = [r.block_size for r in rs]
        ys = [r.ppl_bound for r in rs]
        errs = [r.ppl_bound * r.stderr for r in rs]  # delta method: d exp(x) = exp(x) dx
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
    if ar_ppl is not None:
        ax.axhline(ar_ppl, color="gray", linestyle="--", label=f"AR (L'=1): {ar_ppl:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size L'")
    ax.set_ylabel("perplexity bound (exp NELBO)")
    ax.set_title(title or "Perplexity bound vs block size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy (nats) of the token frequencies of one sample; degenerate repetition shows as low entropy."""
    if not tokens:
        return 0.0
    counts = torch.bincount(torch.tensor(list(tokens))).double()
    p = counts[counts > 0] / len(tokens)
    return float(-(p * p.log()).sum())


def generation_protocol(sampler_cfg, num_samples: int, reference) -> dict:
    """How samples were drawn (sampler, nucleus, threshold, temperature, L', length, seed), recorded
    next to a generative perplexity: the number means little without it."""
    keys = ("sampler", "top_p", "threshold", "temperature", "block_size", "max_new_tokens", "seed")
    return {
        **{k: getattr(sampler_cfg, k) for k in keys},
        "num_samples": num_samples,
        "reference": None if reference is None else str(reference),
    }


@torch.no_grad()
def generative_perplexity(model, tokenizer, reference, ref_tokenizer, sampler_cfg, num_samples: int) -> dict:
    """Sample ``num_samples`` texts and score them with an AR ``reference`` model (BD3-LM's Gen PPL).

    Samples are decoded with the model's tokenizer and re-encoded with the reference's, so the
    reference may use another vocabulary (the paper scores with GPT2-large). Returns the
    perplexity over all re-encoded tokens after the first, the mean unigram entropy and the samples.
    """
    from pipeline.diffusion.objective import ar_nll
    from pipeline.diffusion.sampler import generate

    c = model.config
    start = c.start_token_id
    device = next(model.parameters()).device
    prompt = torch.full((num_samples, 1), start if start is not None else 0, device=device)
    result = generate(model, prompt, sampler_cfg)
    rc = reference.config
    ref_start = rc.start_token_id
    total, count, entropies, texts = 0.0, 0, [], []
    for row, n in zip(result.tokens.tolist(), result.lengths):
        ids = row[:n]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        texts.append(text)
        entropies.append(unigram_entropy(ids))
        ref_ids = ([ref_start] if ref_start is not None else []) + ref_tokenizer.encode(
            text, add_special_tokens=False
        ).ids
        if len(ref_ids) < 2:
            continue
        x = torch.tensor([ref_ids[: rc.max_position_embeddings]], device=next(reference.parameters()).device)
        nll, scored = ar_nll(reference, x)
        total += float(nll.sum())
        count += int(scored.sum())
    return {
        "gen_ppl": math.exp(total / count) if count else float("nan"),
        "scored_tokens": count,
        "unigram_entropy": sum(entropies) / max(len(entropies), 1),
        "nfe_per_token": result.nfe / max(sum(result.lengths), 1),
        "samples": texts,
    }
