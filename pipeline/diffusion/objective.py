"""The BD3 training objective: NELBO of masked block diffusion with the SUBS parameterization.

For a row x_0 of L tokens split into blocks of L' tokens, with t_b the noise level of block b and
x_t the copy where each token of block b is replaced by the mask token with probability t_b:

    NELBO(row) = 1/(L-1) * sum over masked positions l >= 1 of (1/t_{blk(l)}) * -log p(x_0[l] | ...)

SUBS: the mask logit (and the vocabulary padding) is -inf, unmasked tokens are copied and cost
nothing. The first token of a row has no context: never masked, never scored.

With ``shift`` (AR initialization, DiffuLLaMA-style) the hidden state at l-1 predicts token l. The
first token of block b is then predicted from the *clean* half at the last position of block b-1
(an AR step), the others from the noisy half at l-1. At L'=1 (t = 1) this is exactly the AR NLL.
Without ``shift`` the noisy half at l predicts token l.

One forward over concat(x_t, x_0) with the ``bd3_train`` mask computes every block at once;
L'=1 needs only the causal clean pass and L'=L only the bidirectional noisy pass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.utils.checkpoint import checkpoint

from pipeline.diffusion.noise import (
    EVAL_INTERVAL,
    MIN_T,
    clipped_counts,
    sample_block_size,
    sample_block_times,
    sample_masks,
)
from pipeline.model.masks import AR, AttentionMask, check_block_size, document_ids


@dataclass
class DiffusionConfig:
    """Switches of the BD3 objective; this dataclass is the ``diffusion`` section of a training YAML.

    Attributes:
        block_size: L'. 1 is the AR model, L is MDLM. A list (e.g. [4, 8, 16]) trains one checkpoint
            for several block sizes: every optimizer step uses one L' of the list, drawn from
            (seed, step) (``block_size_at``), so every rank and microbatch of a step agrees.
        block_size_weights: relative probabilities of the listed sizes (default: uniform).
        noise_interval: [beta, omega] for training t (clipped schedule), one pair for every size or a
            mapping from L' to a pair; evaluation uses [1e-3, 1].
        resample: BD3-LM's ``training.resample``: condition every block's masked fraction to lie in
            the clipped interval (no effect with [1e-3, 1], so never at evaluation).
        shift: hidden state at l-1 predicts token l (keeps the AR head's meaning).
        anneal_steps: DiffuLLaMA attention annealing: in-block attention goes from causal to
            bidirectional over this many steps (0: bidirectional from the start).
        aux_ar_weight: weight of an auxiliary AR NLL on x_0 (one extra causal forward).
        complementary_mask: also score the complementary copy (tokens unmasked in x_t are masked).
        per_document: no attention across document boundaries of packed rows; every document's first
            token is then treated like a row's first token (never masked, never scored).
        seed: noise seed; a sample's draws depend only on (seed, noise id).
        stratify_group: samples stratified together (the trainer sets the global batch size; not a
            YAML key).
        loss_chunk_size: positions per cross-entropy chunk (bounds the V-wide float32 logits).
    """

    NOT_IN_YAML: ClassVar[dict[str, str]] = {"stratify_group": "global_train_batch_size"}

    block_size: int | list[int]
    block_size_weights: list[float] | None = None
    noise_interval: tuple[float, float] | dict[int, tuple[float, float]] = EVAL_INTERVAL
    resample: bool = True
    shift: bool = True
    anneal_steps: int = 0
    aux_ar_weight: float = 0.0
    complementary_mask: bool = False
    per_document: bool = False
    seed: int = 0
    stratify_group: int = 1
    loss_chunk_size: int = 4096

    def __post_init__(self):
        # Messages start with the field's name: the trainer reports them under the YAML key
        # (``diffusion.<field>``); what spans YAML sections (L' dividing max_seq_len) is checked there.
        sizes = self.block_sizes
        if not sizes:
            raise ValueError("block_size must be a block size or a non-empty list of them")
        if not all(isinstance(b, int) and b >= 1 for b in sizes):
            raise ValueError(f"block_size must be positive integers, got {self.block_size}")
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"block_size lists a block size twice: {sizes}")
        self._check_weights()
        self._check_intervals()
        self._warn_single_count()
        for name, low in (("anneal_steps", 0), ("loss_chunk_size", 1), ("stratify_group", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.aux_ar_weight < 0:
            raise ValueError(f"aux_ar_weight must be >= 0, got {self.aux_ar_weight}")

    def _check_weights(self) -> None:
        w, sizes = self.block_size_weights, self.block_sizes
        if w is None:
            return
        if isinstance(self.block_size, int):
            raise ValueError("block_size_weights needs block_size to be a list")
        if len(w) != len(sizes) or not all(x >= 0 for x in w) or sum(w) <= 0:
            raise ValueError(
                f"block_size_weights must be {len(sizes)} non-negative numbers, not all 0 (one per block "
                f"size {sizes}), got {w}"
            )

    def _check_intervals(self) -> None:
        sizes = self.block_sizes
        mapped = isinstance(self.noise_interval, dict)
        intervals = self.noise_interval if mapped else {None: self.noise_interval}
        if mapped and sorted(intervals) != sorted(sizes):
            raise ValueError(
                f"noise_interval maps block sizes {sorted(intervals)} but block_size is {sizes}: give "
                "one [beta, omega] per trained block size"
            )
        for b, iv in intervals.items():
            if not (len(iv) == 2 and 0.0 <= iv[0] < iv[1] <= 1.0):
                raise ValueError(
                    f"noise_interval{'' if b is None else f'.{b}'} must be [beta, omega] with "
                    f"0 <= beta < omega <= 1, got {iv} (BD3-LM uses [0.3, 0.8] for block size 16, "
                    "[0.45, 0.95] for 4)"
                )

    def _warn_single_count(self) -> None:
        # With resampling, a block's masked count is conditioned on the interval: at small L' one interval
        # can allow a single count (L'=2 with [0.45, 0.95], [0.3, 0.8] or [0.25, 0.75]: always 1 of 2).
        for b in self.block_sizes:
            k_min, k_max = clipped_counts(self.interval_for(b), b)
            if self.resample and b > 1 and k_min == k_max:
                warnings.warn(
                    f"noise_interval {list(self.interval_for(b))} at block size {b} allows only {k_min} of {b} "
                    "tokens masked per block (resample): every block is masked alike; give this size a wider "
                    "interval (noise_interval as a mapping per block size)",
                    stacklevel=3,
                )

    @property
    def block_sizes(self) -> list[int]:
        """The trained block sizes, as listed (one element for an integer ``block_size``)."""
        return [self.block_size] if isinstance(self.block_size, int) else list(self.block_size)

    def interval_for(self, block_size: int) -> tuple[float, float]:
        """The training interval [beta, omega] of ``block_size`` (the shared pair, or its mapping entry)."""
        if isinstance(self.noise_interval, dict):
            if block_size not in self.noise_interval:
                raise ValueError(
                    f"diffusion.noise_interval has no entry for block size {block_size} "
                    f"(it maps {sorted(self.noise_interval)})"
                )
            return tuple(self.noise_interval[block_size])
        return tuple(self.noise_interval)

    def block_size_at(self, step: int) -> int:
        """L' of optimizer step ``step``: a pure function of (seed, step)."""
        if isinstance(self.block_size, int):
            return self.block_size
        return sample_block_size(self.block_sizes, self.block_size_weights, self.seed, step)


@dataclass
class NelboOutput:
    """Per-row sums; divide by ``n_scored`` for per-token values.

    loss: scalar to backpropagate (weighted NELBO per scored token, plus the auxiliary AR loss).
    nelbo_sum: (b,) sum of (1/t)-weighted cross-entropy over masked scored positions (nats).
    masked_ce_sum: (b,) unweighted cross-entropy over the masked positions (summed over both copies
        with complementary masks).
    n_scored: (b,) scored positions (L-1, fewer with per-document masking).
    n_masked: (b,) masked positions (summed over both copies with complementary masks).
    block_nelbo: (b, n_blocks) weighted cross-entropy per block (for the noise-interval search).
    t: (b, n_blocks) the noise levels used.
    block_size: the L' of this estimate.
    """

    loss: torch.Tensor
    nelbo_sum: torch.Tensor
    masked_ce_sum: torch.Tensor
    n_scored: torch.Tensor
    n_masked: torch.Tensor
    block_nelbo: torch.Tensor
    t: torch.Tensor
    block_size: int

    @property
    def nelbo(self) -> torch.Tensor:
        """Weighted NELBO per scored token over the batch (nats)."""
        return self.nelbo_sum.sum() / self.n_scored.sum().clamp(min=1)

    @property
    def masked_ce(self) -> torch.Tensor:
        """Unweighted cross-entropy per masked token over the batch (nats)."""
        return self.masked_ce_sum.sum() / self.n_masked.sum().clamp(min=1)


def anneal_lookahead(block_size: int, anneal_steps: int, step: int) -> int | None:
    """In-block look-ahead at ``step``: 0 (causal) growing to bidirectional (None) at ``anneal_steps``."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return None
    return int((block_size - 1) * step / anneal_steps)


def _chunk_ce(hidden, head, targets, invalid_ids):
    logits = (head(hidden) if isinstance(head, torch.nn.Module) else hidden @ head.t()).float()
    logits[:, invalid_ids] = float("-inf")
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None]).squeeze(1)


def chunked_cross_entropy(
    hidden: torch.Tensor, head, targets: torch.Tensor, invalid_ids: torch.Tensor, chunk: int
) -> torch.Tensor:
    """-log softmax(head(hidden))[target] per row (n,), float32, never holding n x V logits.

    ``head`` is the output layer (an ``nn.Linear``, called as a module so that ZeRO-3/FSDP hooks
    gather its sharded weight) or a (V, D) weight matrix. Under autograd each chunk is recomputed in
    backward, so peak memory is one chunk of logits.
    ``invalid_ids`` get -inf logits (SUBS: never predict the mask token or vocabulary padding).
    """
    out = []
    for s in range(0, hidden.shape[0], chunk):
        args = (hidden[s : s + chunk], head, targets[s : s + chunk], invalid_ids)
        if torch.is_grad_enabled() and hidden.requires_grad:
            out.append(checkpoint(_chunk_ce, *args, use_reentrant=False))
        else:
            out.append(_chunk_ce(*args))
    if not out:  # nothing to score: an empty product keeps the graph, so backward still runs everywhere
        return _chunk_ce(hidden, head, targets, invalid_ids)
    return torch.cat(out)


def protected_positions(
    x0: torch.Tensor, doc_starts: torch.Tensor | None, per_document: bool
) -> torch.Tensor:
    """(b, L) bool: tokens never masked nor scored (row starts, and document starts if per-document)."""
    protect = torch.zeros_like(x0, dtype=torch.bool)
    protect[:, 0] = True
    if per_document and doc_starts is not None:
        protect |= doc_starts.bool()
    return protect


def hidden_states(model, x0, xt, block_size, shift, lookahead, doc_ids, positions=None):
    """(h_noisy, h_clean), either may be None when the block size makes it unnecessary.
    ``positions``: optional (B, L) rotary positions of x0 (default 0..L-1), the same for x_t."""
    L = x0.shape[1]
    if block_size == 1 and shift:
        # Every token is the first of its block: all predictions come from the causal clean pass.
        return None, model(x0, attn=AR, positions=positions, doc_ids=doc_ids, return_hidden=True)
    if block_size == L:
        # One block: the first token is never scored, so only the bidirectional noisy pass is needed.
        mdlm = AttentionMask("mdlm", L, lookahead)
        return model(xt, attn=mdlm, positions=positions, doc_ids=doc_ids, return_hidden=True), None
    h = model(
        torch.cat([xt, x0], dim=1),
        attn=AttentionMask("bd3_train", block_size, lookahead),
        positions=None if positions is None else positions.repeat(1, 2),
        doc_ids=doc_ids,
        return_hidden=True,
    )
    return h[:, :L], h[:, L:]


def draw_masks(
    cfg: DiffusionConfig,
    noise_ids: torch.Tensor,
    t: torch.Tensor,
    block_size: int,
    interval: tuple[float, float],
    protect: torch.Tensor,
) -> torch.Tensor:
    """(b, L) bool masks of x_t: independent per token with ``cfg.resample`` conditioning every block's
    masked fraction on ``interval`` (a no-op for [1e-3, 1] and for L' = 1)."""
    counts = clipped_counts(interval, block_size) if cfg.resample and block_size > 1 else None
    return sample_masks(noise_ids, t, block_size, cfg.seed, protect, counts)


def prediction_source(L: int, block_size: int, shift: bool, device=None):
    """For each target position l: (source position, from_clean) with the shift rule applied."""
    pos = torch.arange(L, device=device)
    if not shift:
        return pos, torch.zeros(L, dtype=torch.bool, device=device)
    return (pos - 1).clamp(min=0), (pos % block_size) == 0


def score_masked(model, h_noisy, h_clean, x0, masked, weights, block_size, shift, chunk):
    """Cross-entropy (n,) at the masked positions, their (row, position) index and weights."""
    rows, cols = masked.nonzero(as_tuple=True)
    ce = score_positions(model, h_noisy, h_clean, x0, rows, cols, block_size, shift, chunk)
    return ce, rows, cols, weights[rows, cols]


def score_positions(model, h_noisy, h_clean, x0, rows, cols, block_size, shift, chunk):
    """Cross-entropy (n,) of predicting ``x0[rows, cols]`` from the hidden states (shift rule applied).

    Apart from ``score_masked`` so that a trace under fake tensors (``pipeline.diffusion.footprint``)
    can give the positions itself: choosing them from a mask is data-dependent.
    """
    L = x0.shape[1]
    src, from_clean = prediction_source(L, block_size, shift, device=x0.device)
    src_pos, use_clean = src[cols], from_clean[cols]
    parts = []
    if h_noisy is not None:
        parts.append(h_noisy[rows, src_pos])
    if h_clean is not None:
        parts.append(h_clean[rows, src_pos])
    if h_noisy is not None and h_clean is not None:
        h = torch.where(use_clean[:, None], parts[1], parts[0])
    else:
        h = parts[0]
    invalid = model.invalid_output_ids.to(x0.device)
    return chunked_cross_entropy(h, model.lm_head, x0[rows, cols], invalid, chunk)


# Over 60 lines on purpose: the objective top to bottom (noise, masks, one forward, scores), compared line by line with the paper.
def compute_nelbo(
    model,
    x0: torch.Tensor,
    cfg: DiffusionConfig,
    noise_ids: torch.Tensor,
    *,
    step: int = 0,
    doc_starts: torch.Tensor | None = None,
    interval: tuple[float, float] | None = None,
    t: torch.Tensor | None = None,
    block_size: int | None = None,
) -> NelboOutput:
    """Monte Carlo NELBO of a batch of rows under the BD3 objective.

    Args:
        model: a ``BD3LM`` (or anything with its forward/``lm_head``/``invalid_output_ids``).
        x0: (b, L) clean token ids.
        noise_ids: (b,) global sample indices that seed this batch's noise.
        step: optimizer step (attention annealing; with several block sizes, which one is used).
        doc_starts: (b, L) bool/int marking document starts in packed rows (per-document masking).
        interval: overrides the block size's ``cfg.noise_interval`` (evaluation passes EVAL_INTERVAL).
        t: explicit (b, n_blocks) noise levels (tests, enumeration); skips sampling.
        block_size: overrides ``cfg.block_size_at(step)`` (evaluating the same weights at other L').
    """
    # One function from the corruption to the loss, top to bottom as the module docstring derives it
    # (long on purpose: the steps share x_t, the masks and the weights).
    bsz, L = x0.shape
    bs = cfg.block_size_at(step) if block_size is None else block_size
    check_block_size(L, bs)
    iv = tuple(interval or cfg.interval_for(bs))
    if not 0.0 <= iv[0] < iv[1] <= 1.0:
        raise ValueError(
            f"noise interval (diffusion.noise_interval) must satisfy 0 <= beta < omega <= 1, got {list(iv)}"
        )
    n_blocks = L // bs
    mask_id = model.config.mask_token_id
    noise_ids = noise_ids.to("cpu", torch.long)
    if t is None:
        if bs == 1:
            t = torch.ones(bsz, n_blocks)  # L'=1: the AR model, every block fully masked
        else:
            t = sample_block_times(noise_ids, n_blocks, iv, cfg.seed, cfg.stratify_group)
    t = t.float().clamp(min=MIN_T)
    protect = protected_positions(x0, doc_starts, cfg.per_document)
    masked = draw_masks(cfg, noise_ids, t, bs, iv, protect).to(x0.device)
    t_tok = t.to(x0.device).repeat_interleave(bs, dim=1)
    copies = [(masked, 1.0 / t_tok)]
    if cfg.complementary_mask and bs > 1:
        comp = ~masked & ~protect.to(x0.device)
        copies.append((comp, 1.0 / (1.0 - t_tok).clamp(min=MIN_T)))

    doc_ids = document_ids(doc_starts.bool()) if (cfg.per_document and doc_starts is not None) else None
    lookahead = anneal_lookahead(bs, cfg.anneal_steps, step)
    nelbo_sum = x0.new_zeros(bsz, dtype=torch.float32)
    ce_sum = torch.zeros_like(nelbo_sum)
    n_masked = torch.zeros_like(nelbo_sum)
    block_nelbo = x0.new_zeros(bsz, n_blocks, dtype=torch.float32)
    for m, w in copies:
        xt = torch.where(m, torch.full_like(x0, mask_id), x0)
        h_noisy, h_clean = hidden_states(model, x0, xt, bs, cfg.shift, lookahead, doc_ids)
        ce, rows, cols, wt = score_masked(
            model, h_noisy, h_clean, x0, m, w, bs, cfg.shift, cfg.loss_chunk_size
        )
        nelbo_sum = nelbo_sum.index_add(0, rows, wt * ce)
        ce_sum = ce_sum.index_add(0, rows, ce.detach())
        n_masked = n_masked.index_add(0, rows, torch.ones_like(ce))
        block_nelbo = block_nelbo.index_put((rows, cols // bs), (wt * ce).detach(), accumulate=True)
    # Each copy is an unbiased NELBO estimate: report their mean. The unweighted CE and the masked
    # counts stay sums over the copies, so masked_ce is the CE per masked token.
    k = len(copies)
    nelbo_sum, block_nelbo = nelbo_sum / k, block_nelbo / k
    n_scored = (~protect).sum(1).float().to(x0.device)
    loss = nelbo_sum.sum() / n_scored.sum().clamp(min=1)
    if cfg.aux_ar_weight > 0:
        loss = (
            loss
            + cfg.aux_ar_weight
            * ar_nll(model, x0, doc_ids=doc_ids, protect=protect)[0].sum()
            / n_scored.sum()
        )
    return NelboOutput(loss, nelbo_sum, ce_sum, n_scored, n_masked, block_nelbo, t, bs)


def ar_nll(model, x0: torch.Tensor, doc_ids=None, protect=None, chunk: int = 4096):
    """AR negative log-likelihood per row (b,) summed over positions 1..L-1 (causal pass), and counts."""
    bsz, L = x0.shape
    h = model(x0, attn=AR, doc_ids=doc_ids, return_hidden=True)
    if protect is None:
        protect = protected_positions(x0, None, False)
    scored = ~protect.to(x0.device)
    rows, cols = scored.nonzero(as_tuple=True)
    invalid = model.invalid_output_ids.to(x0.device)
    ce = chunked_cross_entropy(h[rows, cols - 1], model.lm_head, x0[rows, cols], invalid, chunk)
    return x0.new_zeros(bsz, dtype=torch.float32).index_add(0, rows, ce), scored.sum(1)


def eval_nelbo(model, x0, block_size: int, noise_ids, cfg: DiffusionConfig, doc_starts=None) -> NelboOutput:
    """NELBO at ``block_size`` with the evaluation interval [1e-3, 1] and no gradient."""
    with torch.no_grad():
        return compute_nelbo(
            model,
            x0,
            cfg,
            noise_ids,
            step=cfg.anneal_steps,
            doc_starts=doc_starts,
            interval=EVAL_INTERVAL,
            block_size=block_size,
        )
