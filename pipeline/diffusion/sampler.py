"""Block-by-block generation with a KV cache (BD3-LM decoding).

Blocks sit on a grid aligned at position 0 (the training layout), or with ``align_prompt`` on a grid
whose blocks start right after the prompt (the prompt's first ``P mod L'`` tokens then form a shorter
first clean block). For each block: fill the positions not given by the prompt with mask tokens,
denoise them conditioned on the cached clean blocks, then run the finished block once more to write its keys/values into the cache (a *cache write*, counted apart
from the denoising NFEs). With the shift, the first token of a block is predicted by the logits of
the last position of the previous cache write.

In-block denoisers:
- ``first_hitting``: one token per step, at a uniformly random masked position.
- ``ddpm_cache``: DDPM reverse steps on the linear schedule; a step where no token changed reuses
  the previous probabilities instead of calling the network.
- ``confidence``: unmask every token whose probability exceeds ``threshold`` (at least the most
  confident one per step), as in Fast-dLLM. A token's confidence is its plain softmax probability
  (at the temperature), not renormalized over the top-p nucleus it was sampled from (Fast-dLLM v2).

Every block is denoised whole (L' positions, the shape training sees); when ``max_new_tokens`` is not
a multiple of L' the last block is cut afterwards.

``use_kv_cache=False`` recomputes the whole prefix with the ``block_causal`` mask at every call and
consumes the same random draws, so it yields the same tokens (within the context length).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pipeline.model.masks import AttentionMask

SAMPLERS = ("first_hitting", "ddpm_cache", "confidence")


@dataclass
class SamplerConfig:
    """How to generate. ``steps_per_block`` (ddpm_cache) defaults to ``block_size``; ``align_prompt``
    starts the first generated block right after the prompt instead of completing the prompt's last
    partial block (the grid aligned at position 0)."""

    block_size: int = 4
    max_new_tokens: int = 256
    sampler: str = "confidence"
    steps_per_block: int | None = None
    threshold: float = 0.9
    top_p: float = 1.0
    temperature: float = 1.0
    stop_at_eos: bool = True
    eos_token_id: int | None = None
    use_kv_cache: bool = True
    shift: bool = True
    seed: int = 0
    align_prompt: bool = False

    def __post_init__(self):
        # Messages start with the field's name: the trainer reports them under the YAML key.
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


@dataclass
class GenerationResult:
    """tokens: (B, n) generated ids (prompt excluded; after EOS filled with EOS)."""

    tokens: torch.Tensor
    nfe: int = 0
    cache_writes: int = 0
    steps: int = 0
    seconds: float = 0.0
    lengths: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.lengths) / self.seconds if self.seconds > 0 else float("inf")


def filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of (..., V) probabilities, BD3-LM's rule (``_nucleus_sample``): keep the tokens
    whose cumulative probability (sorted, descending) is <= top_p, and always the most probable one;
    renormalized. (The token that crosses top_p is dropped, one fewer than "smallest set with mass >= p".)"""
    if top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) <= top_p
    keep[..., 0] = True
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    out = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return out / out.sum(-1, keepdim=True)


def _probs(
    logits: torch.Tensor, invalid: torch.Tensor, cfg: SamplerConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(nucleus-filtered probabilities to sample from, plain softmax probabilities for confidences)."""
    logits = logits.float()
    logits[..., invalid] = float("-inf")
    # temperature 0 is greedy decoding: candidates are the argmax, confidences the plain softmax.
    plain = torch.softmax(logits / (cfg.temperature or 1.0), dim=-1)
    return filter_top_p(plain, cfg.top_p), plain


class _Context:
    """Clean tokens so far, seen through the KV cache or recomputed each call (no cache)."""

    def __init__(self, model, batch: int, cfg: SamplerConfig, device):
        self.model, self.cfg = model, cfg
        self.capacity = model.config.max_position_embeddings
        self.cache = model.new_kv_cache(batch, device=device) if cfg.use_kv_cache else None
        self.tokens = torch.zeros(batch, 0, dtype=torch.long, device=device)  # no-cache mode
        self.offset = 0  # absolute position of tokens[:, 0]
        # No-cache mode on a grid not aligned at 0: that many pad positions before tokens[:, 0], in a
        # document of their own (per-document masking), so the recomputed prefix keeps the cache's grid.
        self.pad = 0
        self.last_logits: torch.Tensor | None = None  # logits at the last clean position
        self.nfe = 0
        self.writes = 0
        self.steps = 0  # denoising iterations that unmasked at least one token

    @property
    def next_position(self) -> int:
        return self.cache.next_position if self.cache is not None else self.offset + self.tokens.shape[1]

    def block_logits(self, block: torch.Tensor) -> torch.Tensor:
        """(B, n, V) logits of a noisy block conditioned on the clean context (one NFE)."""
        self.nfe += 1
        bs = self.cfg.block_size
        if self.cache is not None:
            self.cache.make_room(block.shape[1])
            return self.model(block, attn=AttentionMask("bd3_decode", bs), kv_cache=self.cache)
        seq = torch.cat([self.tokens, block], dim=1)
        pos = torch.arange(self.offset, self.offset + seq.shape[1], device=seq.device)
        docs = None
        if self.pad:
            B, device = seq.shape[0], seq.device
            seq = torch.cat(
                [torch.full((B, self.pad), self.model.config.mask_token_id, device=device), seq], dim=1
            )
            pos = torch.cat([torch.zeros(self.pad, dtype=pos.dtype, device=device), pos])
            docs = (torch.arange(seq.shape[1], device=device) >= self.pad).long()[None].expand(B, -1)
        logits = self.model(seq, attn=AttentionMask("block_causal", bs), positions=pos, doc_ids=docs)
        n_clean = self.pad + self.tokens.shape[1]
        if self.tokens.shape[1]:
            self.last_logits = logits[:, n_clean - 1]
        return logits[:, n_clean:]

    def write(self, block: torch.Tensor) -> None:
        """Append a finished block to the clean context."""
        self.writes += 1
        bs = self.cfg.block_size
        if self.cache is not None:
            self.cache.make_room(block.shape[1])
            logits = self.model(
                block, attn=AttentionMask("bd3_decode", bs), kv_cache=self.cache, write_cache=True
            )
            self.last_logits = logits[:, -1]
            return
        if not self.tokens.shape[1] and block.shape[1] < bs:  # a shorter first block: shift the grid
            self.pad = bs - block.shape[1]
        self.tokens = torch.cat([self.tokens, block], dim=1)
        # Sliding window: keep whole blocks so the block grid of the recomputed prefix stays aligned.
        keep = ((self.capacity - bs) // bs) * bs
        if self.pad + self.tokens.shape[1] > keep:
            drop = self.pad + self.tokens.shape[1] - keep  # whole blocks, more than the pad
            self.tokens, self.offset = self.tokens[:, drop - self.pad :], self.offset + drop - self.pad
            self.pad = 0
        # In no-cache mode the logits at the last clean position come with the next denoising call.
        self.last_logits = None


def _predictions(ctx: _Context, block: torch.Tensor, masked: torch.Tensor, shift: bool):
    """(B, n, V) logits predicting each position of the block; None entries need no network."""
    need_network = masked[:, 1:].any() if shift else masked.any()
    if shift and ctx.cache is None and ctx.tokens.shape[1] and not need_network and masked[:, 0].any():
        need_network = True  # no-cache mode gets the previous block's logits from the same forward
    logits = ctx.block_logits(block) if need_network else None
    if not shift:
        return logits
    n, B = block.shape[1], block.shape[0]
    first = ctx.last_logits
    if logits is None:
        out = first[:, None].expand(B, n, -1).clone()
        return out
    if first is None:
        first = logits[:, 0]  # no clean context at all (never scored position); unused
    return torch.cat([first[:, None], logits[:, :-1]], dim=1)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, cfg: SamplerConfig) -> GenerationResult:
    """Generate up to ``cfg.max_new_tokens`` tokens after ``prompt_ids`` (B, P) with P >= 1."""
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    if prompt_ids.shape[1] < 1:
        raise ValueError("the prompt needs at least one token (e.g. BOS or EOS) to condition on")
    device = prompt_ids.device
    B, P = prompt_ids.shape
    bs = cfg.block_size
    mask_id = model.config.mask_token_id
    invalid = model.invalid_output_ids.to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    ctx = _Context(model, B, cfg, device)
    was_training = model.training
    model.eval()
    start = time.perf_counter()

    head = P % bs if cfg.align_prompt else 0  # the shorter first block of a grid aligned at the prompt
    if head:
        ctx.write(prompt_ids[:, :head])
    n_full = (P - head) // bs
    for b in range(n_full):
        ctx.write(prompt_ids[:, head + b * bs : head + (b + 1) * bs])
    pending = prompt_ids[:, head + n_full * bs :]  # given tokens of the first block to generate
    out = torch.zeros(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    while out.shape[1] < cfg.max_new_tokens and not done.all():
        n_given = pending.shape[1]
        block = torch.cat([pending, torch.full((B, bs - n_given), mask_id, device=device)], dim=1)
        block = _denoise_block(ctx, block, cfg, invalid, mask_id, gen)
        new = block[:, n_given : n_given + cfg.max_new_tokens - out.shape[1]]
        if cfg.stop_at_eos and cfg.eos_token_id is not None:
            new = torch.where(done[:, None], torch.full_like(new, cfg.eos_token_id), new)
            done |= (new == cfg.eos_token_id).any(dim=1)
        out = torch.cat([out, new], dim=1)
        pending = block[:, :0]
        if out.shape[1] < cfg.max_new_tokens and not done.all():
            ctx.write(block)
    seconds = time.perf_counter() - start
    model.train(was_training)
    lengths = []
    for row in out:
        hit = (
            (row == cfg.eos_token_id).nonzero() if (cfg.stop_at_eos and cfg.eos_token_id is not None) else []
        )
        lengths.append(int(hit[0]) + 1 if len(hit) else row.shape[0])
    return GenerationResult(out, ctx.nfe, ctx.writes, ctx.steps, seconds, lengths)


def _denoise_block(ctx, block, cfg: SamplerConfig, invalid, mask_id, gen) -> torch.Tensor:
    block = block.clone()
    steps = cfg.steps_per_block or cfg.block_size
    step = 0
    probs = plain = None
    while True:
        masked = block == mask_id
        if not masked.any():
            return block
        if probs is None or cfg.sampler != "ddpm_cache":
            probs, plain = _probs(_predictions(ctx, block, masked, cfg.shift), invalid, cfg)
        if cfg.sampler == "first_hitting":
            # One masked position per row, uniformly at random, takes its sampled token.
            score = torch.rand(masked.shape, generator=gen, device=block.device).masked_fill(~masked, -1.0)
            unmask = torch.zeros_like(masked).scatter(1, score.argmax(1, keepdim=True), True) & masked
        elif cfg.sampler == "confidence":
            cand = _sample(probs, gen, cfg.temperature)
            conf = plain.gather(-1, cand[..., None]).squeeze(-1).masked_fill(~masked, -1.0)
            unmask = (conf > cfg.threshold) & masked
            best = torch.zeros_like(masked).scatter(1, conf.argmax(1, keepdim=True), True) & masked
            unmask |= best
            block = torch.where(unmask, cand, block)
            ctx.steps += 1
            continue
        else:  # ddpm_cache: move from t to s on the grid 1 -> 0; each masked token unmasks w.p. (t-s)/t
            t = 1.0 - step / steps
            s = max(1.0 - (step + 1) / steps, 0.0)
            step += 1
            u = torch.rand(masked.shape, generator=gen, device=block.device)
            unmask = masked & (u < (t - s) / t if t > 0 else torch.ones_like(masked))
            if not unmask.any():
                continue  # nothing changed: the cached probabilities stay valid, no network call
        cand = _sample(probs, gen, cfg.temperature)
        block = torch.where(unmask, cand, block)
        ctx.steps += 1
        probs = None


def _sample(probs: torch.Tensor, gen: torch.Generator, temperature: float) -> torch.Tensor:
    if temperature == 0:
        return probs.argmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])
