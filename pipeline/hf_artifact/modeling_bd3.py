"""BD3-LM (block diffusion, arXiv 2503.09573) on top of the LLaMA / Qwen2 / Mistral classes of transformers.

The weights are an ordinary causal LM with one extra token, the mask token. ``model(input_ids)`` is
the AR forward of that LM (causal logits, as the backbone class gives them). ``model.bd3_generate``
decodes block by block:

1. the text is cut into blocks of ``block_size`` tokens aligned at position 0; the prompt's whole
   blocks are written to the KV cache (a ``DynamicCache``);
2. the next block is filled with mask tokens (after the prompt tokens it already holds) and denoised:
   each step runs the block over the cache with a 4D attention mask that lets every query see the
   whole cache and the whole block, then unmasks some positions (``sampler``);
3. the finished (clean) block is run once more and its keys/values stay in the cache.

With ``shift`` (config ``bd3.shift``) the logits at position l - 1 predict token l, as in the AR model:
the first token of a block is predicted by the last logits of the previous cache write. Blocks are
always denoised whole; the output is cut to ``max_new_tokens`` afterwards.

The sampling settings default to the ``bd3`` section of generation_config.json (the settings the run
was evaluated with, written by the export) and then to ``GENERATION_DEFAULTS``; arguments override.

One file for transformers 4.57+ and 5.x: a noisy block leaves the cache with ``crop(-n)`` (5.x refuses
a positive length), the cache goes to ``forward`` under the name its signature has (``cache`` from
5.24, ``past_key_values`` before), and the mask is a 4D additive float mask, which both pass to the
attention as is. Only ``torch`` and ``transformers`` are imported: this file travels with the weights.
"""

import inspect
import warnings

import torch
from transformers import DynamicCache, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from .configuration_bd3 import BD3LlamaConfig, BD3MistralConfig, BD3Qwen2Config

SAMPLERS = ("confidence", "first_hitting", "ddpm_cache")
# What bd3_generate does when neither its arguments nor generation_config.json's ``bd3`` section say
# (block_size None: the trained ``bd3.block_size``); pipeline.diffusion.sampler.SamplerConfig's defaults.
GENERATION_DEFAULTS = {
    "max_new_tokens": 256, "block_size": None, "sampler": "confidence", "threshold": 0.9, "top_p": 1.0,
    "temperature": 1.0, "seed": 0, "stop_at_eos": True, "steps_per_block": None,
}  # fmt: skip


def top_p_filter(probs, top_p):
    """Nucleus filtering of (..., V) probabilities, BD3-LM's rule: the tokens whose cumulative probability
    is <= top_p plus the most probable one, renormalized."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) <= top_p
    keep[..., 0] = True
    kept = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    out = torch.zeros_like(probs).scatter(-1, order, kept)
    return out / out.sum(-1, keepdim=True)


class BD3Mixin:
    """Block-diffusion decoding for a transformers causal LM whose config has a ``bd3`` section."""

    def _bd3_forward(self, block, cache, keep):
        """(B, n, V) float logits of ``block`` over the cached clean tokens; ``keep``: cache the block."""
        B, n = block.shape
        past = cache.get_seq_length()
        positions = torch.arange(past, past + n, device=block.device)[None].expand(B, -1)
        # Every query sees the whole cache and the whole block: a 4D additive mask of zeros.
        mask = torch.zeros(B, 1, n, past + n, dtype=self.dtype, device=block.device)
        out = self(
            input_ids=block, attention_mask=mask, position_ids=positions, use_cache=True, **{_cache_arg(self): cache}
        )  # fmt: skip
        if not keep:
            cache.crop(-n)  # a noisy block is never part of the context
        return out.logits.float()

    def _bd3_settings(self, **given):
        """The sampling settings: ``given`` (not None) over generation_config.json's ``bd3`` section
        over ``GENERATION_DEFAULTS``."""
        saved = getattr(getattr(self, "generation_config", None), "bd3", None) or {}
        settings = {**GENERATION_DEFAULTS, **{k: v for k, v in saved.items() if k in GENERATION_DEFAULTS}}
        settings.update({k: v for k, v in given.items() if v is not None})
        return settings

    def _bd3_probs(self, logits, invalid, temperature, top_p):
        """(plain softmax, top-p filtered softmax) of (B, n, V) logits; ``invalid`` ids get zero mass."""
        logits = logits.clone()
        logits[..., invalid] = float("-inf")
        plain = torch.softmax(logits / (temperature or 1.0), dim=-1)  # temperature 0: greedy
        return plain, top_p_filter(plain, top_p)

    @staticmethod
    def _bd3_draw(probs, gen, temperature):
        if temperature == 0:
            return probs.argmax(-1)
        return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).view(probs.shape[:-1])

    # Over 60 lines on purpose: this file travels alone with the weights; the nested helpers share the cache and the settings.
    @torch.no_grad()
    def bd3_generate(
        self,
        input_ids,
        max_new_tokens=None,
        block_size=None,
        sampler=None,
        threshold=None,
        top_p=None,
        temperature=None,
        seed=None,
        stop_at_eos=None,
        eos_token_id=None,
        steps_per_block=None,
        return_nfe=False,
    ):
        """Generate up to ``max_new_tokens`` tokens after ``input_ids`` (B, P), P >= 1.

        Every setting left out (None) is generation_config.json's (``bd3`` section: how the run was
        evaluated), else ``GENERATION_DEFAULTS``: ``model.bd3_generate(input_ids)`` samples as the run did.

        Args:
            block_size: tokens per block L' (default: the trained ``bd3.block_size``).
            sampler: ``"confidence"`` unmasks every position whose sampled token has probability
                above ``threshold`` (at least the most confident one per step; Fast-dLLM);
                ``"first_hitting"`` unmasks one uniformly random masked position per step;
                ``"ddpm_cache"`` takes ``steps_per_block`` (default ``block_size``) DDPM reverse
                steps on the linear schedule, each masked position unmasking with probability
                (t - s) / t, and reuses the last probabilities when a step unmasked nothing.
            top_p, temperature: how candidates are drawn (temperature 0: argmax). The confidence of
                a candidate is its plain softmax probability, whatever ``top_p``.
            seed: seeds the one ``torch.Generator`` of all random draws.
            stop_at_eos: a row stops at its first EOS (``eos_token_id``, default the config's); the
                rest of the row is filled with EOS and generation ends when every row has stopped.
            return_nfe: also return the number of denoising network calls (NFE), as
                ``pipeline.sample`` counts them: cache writes (the prompt's whole blocks, then one
                forward per finished block) are not included.
        Returns:
            (B, P + n) token ids, prompt included, n <= max_new_tokens; with ``return_nfe`` the pair
            (ids, nfe).
        """
        s = self._bd3_settings(
            max_new_tokens=max_new_tokens, block_size=block_size, sampler=sampler, threshold=threshold,
            top_p=top_p, temperature=temperature, seed=seed, stop_at_eos=stop_at_eos,
            steps_per_block=steps_per_block,
        )  # fmt: skip
        max_new_tokens, block_size, sampler, threshold = (
            s["max_new_tokens"], s["block_size"], s["sampler"], s["threshold"]
        )  # fmt: skip
        top_p, temperature, seed = s["top_p"], s["temperature"], s["seed"]
        stop_at_eos, steps_per_block = s["stop_at_eos"], s["steps_per_block"]
        bd3 = self.config.bd3
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if bd3.get("mask_token_id") is None:
            raise ValueError("config.json has no bd3.mask_token_id: this is not a BD3-LM checkpoint")
        trained = bd3.get("block_sizes") or [bd3.get("block_size")]
        bs = block_size or trained[0]
        if not bs or bs < 1:
            raise ValueError("give block_size (the config records no trained block size)")
        if bs not in trained:
            warnings.warn(
                f"block_size {bs} was not trained (trained: {trained}); expect worse samples", stacklevel=2
            )
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        B, P = input_ids.shape
        if P < 1:
            raise ValueError("the prompt needs at least one token (e.g. BOS) to condition on")
        window = getattr(self.config, "sliding_window", None)
        context = min(self.config.max_position_embeddings, window or self.config.max_position_embeddings)
        if -(-(P + max_new_tokens) // bs) * bs > context:
            raise ValueError(f"prompt + max_new_tokens in whole blocks exceeds the context length {context}")
        eos = eos_token_id if eos_token_id is not None else self.config.eos_token_id
        if isinstance(eos, list):
            eos = eos[0]
        stop = stop_at_eos and eos is not None
        mask_id, shift = bd3["mask_token_id"], bd3.get("shift", True)
        device = input_ids.device
        invalid = list(range(bd3["base_vocab_size"], self.config.vocab_size))
        invalid = torch.tensor(sorted(set(invalid + [mask_id])), device=device)
        gen = torch.Generator(device=device).manual_seed(seed)
        cache = DynamicCache()
        last = None  # logits at the last clean position (the shift's prediction of the next token)

        steps = steps_per_block or bs
        nfe = 0

        def denoising_forward(block):
            nonlocal nfe
            nfe += 1
            return self._bd3_forward(block, cache, keep=False)

        def predictions(block, masked, last):
            """(B, L', V) logits predicting each position of ``block``."""
            if not shift:
                return denoising_forward(block)
            if masked[:, 1:].any():
                logits = denoising_forward(block)
                # Without a clean block before (a short prompt) position 0 is given: never predicted.
                first = logits[:, :1] if last is None else last[:, None]
                return torch.cat([first, logits[:, :-1]], dim=1)
            return last[:, None].expand(B, bs, -1)  # only first positions masked: the last write's logits

        def denoise(block, last):
            """Unmask every mask token of ``block`` (B, L'), conditioned on the cache."""
            step, probs = 0, None
            while (block == mask_id).any():
                masked = block == mask_id
                if probs is None or sampler != "ddpm_cache":
                    plain, probs = self._bd3_probs(
                        predictions(block, masked, last), invalid, temperature, top_p
                    )
                if sampler == "ddpm_cache":  # draw order as pipeline.sample: the coins, then tokens
                    t, s = 1.0 - step / steps, max(1.0 - (step + 1) / steps, 0.0)
                    step += 1
                    coins = torch.rand(masked.shape, generator=gen, device=device)
                    unmask = masked & ((coins < (t - s) / t) if t > 0 else torch.ones_like(masked))
                    if not unmask.any():
                        continue  # nothing changed: the same probabilities hold, no network call
                    cand = self._bd3_draw(probs, gen, temperature)
                    probs = None
                elif sampler == "first_hitting":  # draw order as pipeline.sample: positions, then tokens
                    score = torch.rand(masked.shape, generator=gen, device=device).masked_fill(~masked, -1.0)
                    cand = self._bd3_draw(probs, gen, temperature)
                    unmask = torch.zeros_like(masked).scatter(1, score.argmax(1, keepdim=True), True)
                else:
                    cand = self._bd3_draw(probs, gen, temperature)
                    conf = plain.gather(-1, cand[..., None]).squeeze(-1).masked_fill(~masked, -1.0)
                    best = torch.zeros_like(masked).scatter(1, conf.argmax(1, keepdim=True), True)
                    unmask = (conf > threshold) | best
                block = torch.where(unmask & masked, cand, block)
            return block

        n_full = P // bs
        for b in range(n_full):
            last = self._bd3_forward(input_ids[:, b * bs : (b + 1) * bs], cache, keep=True)[:, -1]
        given = input_ids[:, n_full * bs :]  # the prompt's tokens in the first block to generate
        out = input_ids[:, :0]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        while out.shape[1] < max_new_tokens and not done.all():
            masks = torch.full((B, bs - given.shape[1]), mask_id, device=device)
            block = denoise(torch.cat([given, masks], dim=1), last)
            new = block[:, given.shape[1] :]
            if stop:
                new = torch.where(done[:, None], torch.full_like(new, eos), new)
                done |= (new == eos).any(dim=1)
            out = torch.cat([out, new], dim=1)
            if out.shape[1] < max_new_tokens and not done.all():
                last = self._bd3_forward(block, cache, keep=True)[:, -1]
            given = block[:, :0]
        ids = torch.cat([input_ids, out[:, :max_new_tokens]], dim=1)
        return (ids, nfe) if return_nfe else ids


def _cache_arg(model):
    """The name ``forward`` takes the KV cache under: ``cache`` from transformers 5.24 on (the old name
    warns), ``past_key_values`` before."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class BD3LlamaForCausalLM(BD3Mixin, LlamaForCausalLM):
    config_class = BD3LlamaConfig


class BD3Qwen2ForCausalLM(BD3Mixin, Qwen2ForCausalLM):
    config_class = BD3Qwen2Config


class BD3MistralForCausalLM(BD3Mixin, MistralForCausalLM):
    config_class = BD3MistralConfig
