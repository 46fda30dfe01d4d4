"""Independent references for the BD3 objective tests (not imported by the code under test).

The vectorized objective runs one forward over concat(x_t, x_0) with the ``bd3_train`` mask. The
reference here is the definition instead: for each block b, one forward over
[x_0 blocks < b, x_t block b] with ``block_causal`` attention (the attention of decoding), and
log-probabilities in float64 over the base vocabulary (the mask token and padding excluded).
"""

from __future__ import annotations

import torch

from pipeline.model.masks import AttentionMask

BASE_VOCAB = 250
MASK_ID = 250  # added by from_pretrained; ids 251..255 are vocabulary padding
REUSED_MASK_ID = 7  # an id of the base vocabulary that no test sequence contains


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random ids in [8, BASE_VOCAB): no special token and never REUSED_MASK_ID."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(8, BASE_VOCAB, (batch, length), generator=g)


def valid_log_probs(model, logits: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax over the ids the model may predict (base vocabulary minus the mask id)."""
    c = model.config
    logits = logits[..., : c.base_vocab_size].double().clone()
    if c.mask_token_id < c.base_vocab_size:
        logits[..., c.mask_token_id] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def block_token_ce(model, x0, masked, block_size, block, shift, lookahead=None) -> torch.Tensor:
    """(batch, block_size) float64 CE of x_0 at every position of ``block`` given the noisy block.

    One forward over [x_0 of blocks < block, x_t of block] with block-causal attention. With the
    shift, position l is predicted at l-1: for the first token of the block that is the last clean
    token of the previous block, for the others the noisy block itself. Without it, at l.
    Row position 0 (no context with the shift) gets CE 0; it is never masked anyway.
    """
    s, e = block * block_size, (block + 1) * block_size
    xt = torch.where(masked, torch.full_like(x0, model.config.mask_token_id), x0)
    inp = torch.cat([x0[:, :s], xt[:, s:e]], dim=1)
    lp = valid_log_probs(model, model(inp, attn=AttentionMask("block_causal", block_size, lookahead)))
    out = torch.zeros(x0.shape[0], block_size, dtype=torch.float64)
    for j, pos in enumerate(range(s, e)):
        src = pos - 1 if shift else pos
        if src < 0:
            continue
        out[:, j] = -lp[:, src].gather(1, x0[:, pos : pos + 1]).squeeze(1)
    return out


def loop_reference(model, x0, masked, weights, block_size, shift, lookahead=None) -> dict:
    """Per-row sums of the objective by a loop of one forward per block.

    Args:
        masked: (b, L) bool, the positions replaced by the mask token (and scored).
        weights: (b, L) per-token weight (1/t of the token's block).
    Returns float64 ``nelbo_sum`` (b,), ``ce_sum`` (b,), ``n_masked`` (b,), ``block_nelbo`` (b, n_blocks).
    """
    b, L = x0.shape
    n_blocks = L // block_size
    block_nelbo = torch.zeros(b, n_blocks, dtype=torch.float64)
    ce_sum = torch.zeros(b, dtype=torch.float64)
    for k in range(n_blocks):
        sl = slice(k * block_size, (k + 1) * block_size)
        ce = block_token_ce(model, x0, masked, block_size, k, shift, lookahead)
        m = masked[:, sl].double()
        block_nelbo[:, k] = (m * weights[:, sl].double() * ce).sum(1)
        ce_sum += (m * ce).sum(1)
    return {
        "nelbo_sum": block_nelbo.sum(1),
        "ce_sum": ce_sum,
        "n_masked": masked.sum(1).double(),
        "block_nelbo": block_nelbo,
    }


def token_weights(t: torch.Tensor, block_size: int) -> torch.Tensor:
    """(b, L) 1/t_{blk(l)}."""
    return (1.0 / t.double()).repeat_interleave(block_size, dim=1)
