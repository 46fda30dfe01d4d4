"""Log-likelihood of a continuation given a clean context, at any block size (plain PyTorch).

A request is the token row ``context + continuation`` on a block grid: by default (``align_context``)
the continuation's blocks start right after the context, as ``pipeline.sample --align-prompt`` (the
sampler's ``align_prompt``) generates after a prompt: the context's first ``len(context) mod L'`` tokens
form a shorter first block. Without it the grid is aligned at position 0, the training layout and
``pipeline.sample``'s default, and the continuation's first tokens share a block with the context's
last ones. The context is clean and never masked; continuation tokens are masked with their block's
noise level t. The value is the negative NELBO of the continuation,

    -sum over masked continuation positions l of (1/t_{blk(l)}) * -log p(x_l | x_t of l's block, clean earlier blocks),

averaged over Monte-Carlo draws of (t, masks) with t ~ U[1e-3, 1] per block. At block size 1
(t = 1, every position masked) it is the exact AR log-probability.

Noise is a pure function of (context tokens, seed, draw index): the choices of one multiple-choice
question share their context, hence every draw of t and of the per-position uniforms (common random
numbers), so their difference carries no noise of its own beyond the model's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from pipeline.diffusion.noise import MIN_T
from pipeline.diffusion.objective import hidden_states, score_positions
from pipeline.diffusion.sampler import SamplerConfig, generate


def noise_seed(context: Sequence[int], seed: int) -> int:
    """A 63-bit seed from the context's token ids and ``seed`` (the same for every choice of a question)."""
    h = hashlib.sha256(str(int(seed)).encode() + b":" + ",".join(map(str, context)).encode())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def draw_noise(context: Sequence[int], seed: int, mc_samples: int, capacity: int):
    """(t, u), both (mc_samples, capacity) float32: t[j, b] is the noise level of block b in draw j
    (in [1e-3, 1]); u[j, l] the uniform that masks position l (masked when u < t of its block).

    Fixed shapes (``capacity`` = the longest row the model scores) keep a position's draws the same
    whatever the length of the continuation."""
    g = torch.Generator().manual_seed(noise_seed(context, seed))
    t = MIN_T + (1.0 - MIN_T) * torch.rand(mc_samples, capacity, generator=g)
    u = torch.rand(mc_samples, capacity, generator=g)
    return t, u


def pad_rows(rows: Sequence[Sequence[int]], block_size: int, fill: int, device, left=None) -> torch.Tensor:
    """(n, Lp) ids, Lp the longest row (after ``left[i]`` leading ``fill`` tokens) rounded up to a
    multiple of ``block_size``; the rest ``fill``."""
    left = left or [0] * len(rows)
    longest = max(len(r) + s for r, s in zip(rows, left))
    Lp = -(-longest // block_size) * block_size
    out = torch.full((len(rows), Lp), fill, dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, left)):
        out[i, s : s + len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out.to(device)


def grid_shift(n_context: int, block_size: int, align_context: bool) -> int:
    """Leading pad positions that put a row's continuation at the start of a block (0 on the grid
    aligned at position 0)."""
    return (-n_context) % block_size if align_context else 0


@torch.no_grad()
def continuation_bound(
    model,
    rows: Sequence[Sequence[int]],
    n_context: Sequence[int],
    t: torch.Tensor,
    u: torch.Tensor,
    block_size: int,
    shift: bool,
    chunk: int = 4096,
    align_context: bool = True,
) -> torch.Tensor:
    """Negative NELBO of each row's continuation for one noise draw per row: (n,) float64.

    Args:
        rows: n token rows, context then continuation (context length >= 1).
        n_context: context length of each row.
        t, u: (n, >= Lp) noise levels per block and uniforms per position (``draw_noise``'s rows), indexed
            by block and position of the laid-out row (pad included).
        block_size: L'; 1 gives the exact AR log-probability of the continuation (t and u unused).
        align_context: the continuation's blocks start right after the context: each row is preceded by
            ``grid_shift`` pad positions in a document of their own (per-document masking: no real token
            sees them) and the real tokens keep rotary positions 0, 1, ...
    Positions past a row's end are mask tokens in both halves: the shape a block has when the sampler
    cuts its last block, and invisible to earlier blocks, so padding never changes a row's value.
    """
    left = [grid_shift(k, block_size, align_context) for k in n_context]
    if len(set(left)) > 1:  # one forward per grid shift: their masks are shared by every row
        out = torch.zeros(len(rows), dtype=torch.float64)
        for shift_ in sorted(set(left)):
            idx = [i for i, s in enumerate(left) if s == shift_]
            sub = torch.tensor(idx, device=t.device)
            out[idx] = continuation_bound(
                model, [rows[i] for i in idx], [n_context[i] for i in idx], t[sub], u[sub],
                block_size, shift, chunk, align_context,
            )  # fmt: skip
        return out
    mask_id = model.config.mask_token_id
    device = model.lm_head.weight.device
    x0 = pad_rows(rows, block_size, mask_id, device, left)
    n, Lp = x0.shape
    pos = torch.arange(Lp, device=device)
    start = left[0]
    lengths = torch.tensor([len(r) for r in rows], device=device)[:, None] + start
    ctx = torch.tensor(list(n_context), device=device)[:, None] + start
    scored = (pos[None] >= ctx) & (pos[None] < lengths)
    if block_size == 1:
        masked, weight = scored, torch.ones(n, Lp, device=device)
    else:
        t_tok = t[:, : Lp // block_size].to(device).repeat_interleave(block_size, dim=1)
        masked = scored & (u[:, :Lp].to(device) < t_tok)
        weight = 1.0 / t_tok
    xt = torch.where(masked | (pos[None] >= lengths), torch.full_like(x0, mask_id), x0)
    doc_ids = positions = None
    if start:  # (1, Lp): one mask for every row (broadcast), not one per row
        doc_ids = (pos >= start).long()[None]
        positions = (pos - start).clamp(min=0)[None]
    h_noisy, h_clean = hidden_states(model, x0, xt, block_size, shift, None, doc_ids, positions)
    r, c = masked.nonzero(as_tuple=True)
    ce = score_positions(model, h_noisy, h_clean, x0, r, c, block_size, shift, chunk)
    out = torch.zeros(n, dtype=torch.float64, device=device)
    return (-out.index_add(0, r, (weight[r, c] * ce).double())).cpu()


@torch.no_grad()
def ar_scores(model, rows: Sequence[Sequence[int]], n_context: Sequence[int]) -> list[tuple[float, bool]]:
    """Block size 1 in one causal forward: (log-probability of each row's continuation, whether every
    continuation token is the argmax). The output layer runs on the continuation positions only (the
    V-wide logits of the context are never needed)."""
    device = model.lm_head.weight.device
    x = pad_rows(rows, 1, model.config.mask_token_id, device)
    h = model(x[:, :-1], return_hidden=True)
    spans = [(i, k - 1, len(r) - 1) for i, (r, k) in enumerate(zip(rows, n_context))]
    sel = torch.cat([h[i, a:b] for i, a, b in spans])
    logits = model.lm_head(sel).float()
    logits[:, model.invalid_output_ids.to(device)] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1)
    out, start = [], 0
    for (i, a, b), (r, k) in zip(spans, zip(rows, n_context)):
        lp, target = logp[start : start + b - a], x[i, k : len(r)]
        start += b - a
        out.append((lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())))
    return out


def greedy_decode(model, context: Sequence[int], n_tokens: int, sampler: SamplerConfig) -> list[int]:
    """Greedy block decoding (temperature 0) of ``n_tokens`` after ``context`` with ``sampler``'s
    in-block denoiser, block size and grid (``align_prompt``: blocks start after the context, as
    ``continuation_bound``'s ``align_context``): what ``is_greedy`` compares the continuation with.

    Without the KV cache (the same tokens inside the context length, by the sampler's contract): a
    continuation of a few tokens then costs a few forwards over the whole row, where the cache would
    first write the context block by block, one forward (and one pass over the weights) per block."""
    cfg = SamplerConfig(
        **{
            **sampler.__dict__,
            "max_new_tokens": n_tokens,
            "temperature": 0.0,
            "stop_at_eos": False,
            "use_kv_cache": False,
        }
    )
    prompt = torch.tensor([list(context)], device=model.lm_head.weight.device)
    return generate(model, prompt, cfg).tokens[0].tolist()
