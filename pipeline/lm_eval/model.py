"""The ``bd3`` model of lm-evaluation-harness: any checkpoint of this project at any block size.

Tokenization is the ``hf`` backend's own (its ``tok_encode``/``tok_decode``, the same tokenizer
files), so that at block size 1 every request is the same token row as there and its log-likelihood
the same number. See ``pipeline.lm_eval.scoring`` for what a log-likelihood is at block sizes above 1.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from pipeline.diffusion.sampler import SAMPLERS, SamplerConfig, generate
from pipeline.hf_names import TOKENIZER_FILE
from pipeline.lm_eval.scoring import ar_scores, continuation_bound, draw_noise, greedy_decode, noise_seed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MC_SAMPLES = 32
DEFAULT_SEED = 1234
BLOCK_GRIDS = ("context", "sequence")


def load_tokenizer(folder: Path, model_config, tokenizer: str | None = None):
    """The ``transformers`` tokenizer the ``hf`` backend would load for ``folder`` (``AutoTokenizer``);
    for a folder with only tokenizer.json (this project's saves), a fast tokenizer over that file with
    the model's BOS/EOS."""
    import transformers

    src = Path(tokenizer) if tokenizer else folder
    if src.is_dir() and (src / "tokenizer_config.json").exists():
        return transformers.AutoTokenizer.from_pretrained(str(src))
    file = src if src.is_file() else src / TOKENIZER_FILE
    if not file.exists():
        raise FileNotFoundError(
            f"no tokenizer at {file}: pass model_args tokenizer=PATH (a folder or tokenizer.json)"
        )
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(file))
    for name in ("bos", "eos", "pad"):
        token_id = getattr(model_config, f"{name}_token_id")
        if token_id is not None and token_id < tok.vocab_size:
            setattr(tok, f"{name}_token", tok.convert_ids_to_tokens(token_id))
    return tok


@register_model("bd3")
class BD3EvalLM(TemplateLM):
    """lm-eval model over a ``BD3LM``; ``model_args`` are this constructor's arguments."""

    backend = "causal"
    # The hf backend's tokenization, unchanged: the same token rows at block size 1.
    tok_encode = HFLM.tok_encode
    tok_decode = HFLM.tok_decode
    eot_token_id = HFLM.eot_token_id
    prefix_token_id = HFLM.prefix_token_id

    # Over 60 lines on purpose: every model_arg is checked here, with the message that names it.
    def __init__(
        self,
        pretrained: str | torch.nn.Module,
        block_size: int | None = None,
        mc_samples: int = DEFAULT_MC_SAMPLES,
        seed: int = DEFAULT_SEED,
        batch_size: int | str = 16,
        max_batch_size: int | None = None,
        dtype: str = "float32",
        device: str | None = None,
        max_length: int | None = None,
        tokenizer: str | None = None,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        trust_checkpoint: bool = False,
        sampler: str = SamplerConfig.sampler,
        threshold: float = SamplerConfig.threshold,
        top_p: float = SamplerConfig.top_p,
        steps_per_block: int | None = None,
        greedy_check: bool = True,
        block_grid: str = "context",
        **unknown,
    ) -> None:
        """Args (all from ``--model_args k=v,...``):
        pretrained: a Hugging Face folder (an AR checkpoint, or this project's export), a training
            save_folder or a Composer checkpoint (``trust_checkpoint=True`` to unpickle it); or a live
            ``BD3LM`` (the training callback's), used as it is, with ``tokenizer`` the run's
            tokenizer.json. Then every process evaluates every request (one process's view: no split),
            so that sharded parameters are gathered by forwards that run in step on all ranks.
        block_size: L' (default: the checkpoint's smallest trained size; 1 = the AR model exactly).
        mc_samples: noise draws per log-likelihood request at L' > 1 (cost: mc_samples forwards of
            2 x (context + continuation) tokens per request).
        batch_size: requests per forward; at L' > 1 a forward holds batch_size x mc_samples rows.
        sampler, threshold, top_p, steps_per_block: the in-block denoiser of generation
            (``pipeline.sample``'s); temperature and top_p of a task's gen_kwargs override.
        greedy_check: compute ``is_greedy`` at L' > 1 by greedy block decoding (one decode per context).
        block_grid: ``context`` (default): a continuation's blocks start right after its context, in
            scoring, the greedy check and generation (the sampler's ``align_prompt``); ``sequence``: the
            grid aligned at position 0, where the continuation's first tokens complete the context's last
            block (the training layout, ``pipeline.sample``'s default). Equal at L' = 1.
        """
        super().__init__()
        if unknown:
            raise ValueError(
                f"bd3: unknown model_args {sorted(unknown)}; known: pretrained, block_size, mc_samples, seed, "
                "batch_size, dtype, device, max_length, tokenizer, add_bos_token, prefix_token_id, "
                "trust_checkpoint, sampler, threshold, top_p, steps_per_block, greedy_check, block_grid"
            )
        if block_grid not in BLOCK_GRIDS:
            raise ValueError(f"bd3: block_grid must be one of {BLOCK_GRIDS}, got {block_grid!r}")
        if int(mc_samples) < 1:
            raise ValueError(f"bd3: mc_samples must be >= 1, got {mc_samples}")
        if dtype not in DTYPES:
            raise ValueError(f"bd3: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"bd3: sampler must be one of {SAMPLERS}, got {sampler!r}")
        if str(batch_size).startswith("auto"):
            raise ValueError("bd3: batch_size=auto is not supported; give a number of rows per forward")
        from pipeline.save_folder import load_for_inference, local_checkpoint

        live = isinstance(pretrained, torch.nn.Module)
        if live:  # the weights, dtype and device of a training run, untouched
            self.model = pretrained
            self._device = next(pretrained.parameters()).device
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            checkpoint = local_checkpoint(pretrained)
            self.model = load_for_inference(
                checkpoint, device=self._device, trust_checkpoint=bool(trust_checkpoint)
            )
            inv_freq = self.model.inv_freq  # rotary frequencies stay float32 whatever the weights' dtype
            self.model.to(DTYPES[dtype])
            self.model.inv_freq = inv_freq
        c = self.model.config
        self.block_size = int(block_size) if block_size is not None else (c.block_size or 1)
        if self.block_size < 1:
            raise ValueError(f"bd3: block_size must be >= 1, got {block_size}")
        trained = c.trained_block_sizes or ([c.block_size] if c.block_size else [])
        if self.block_size > 1 and trained and self.block_size not in trained:
            warnings.warn(
                f"bd3: block_size {self.block_size} was not trained (the checkpoint was trained for {trained})",
                stacklevel=2,
            )
        folder = Path(tokenizer or ".") if live else checkpoint if checkpoint.is_dir() else checkpoint.parent
        self.tokenizer = load_tokenizer(folder, c, tokenizer)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.mc_samples, self.seed = int(mc_samples), int(seed)
        self._batch_size = int(batch_size)
        self._max_length = int(max_length) if max_length else c.max_position_embeddings
        self.greedy_check = str(greedy_check).lower() not in ("false", "0")
        self._greedy_memo: dict[tuple[int, ...], list[int]] = {}
        self.sampler = SamplerConfig(
            block_size=self.block_size,
            sampler=sampler,
            threshold=float(threshold),
            top_p=float(top_p),
            steps_per_block=int(steps_per_block) if steps_per_block else None,
            eos_token_id=c.eos_token_id,
            shift=c.shift,
            seed=self.seed,
            align_prompt=block_grid == "context",
        )
        self._world_size = 1 if live else int(os.environ.get("WORLD_SIZE", "1"))
        self._rank = 0 if live else int(os.environ.get("RANK", "0"))
        if self._world_size > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self._device.type == "cuda" else "gloo")

    # -- what lm-eval asks of a model ------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def all_gather(self, tensor):
        if self._world_size <= 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if self._world_size <= 1:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            torch.distributed.barrier()

    # -- log-likelihood ---------------------------------------------------------------------------
    def _row(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """(the scored row, its context length), cut from the left as the hf backend cuts: at L' = 1 the
        hf backend's input window (max_length tokens plus the last one, which is never an input); above it
        max_length tokens, so a rolling window's first continuation (max_length tokens) has no context."""
        keep = self.max_length + 1 if self.block_size == 1 else self.max_length
        if len(continuation) > self.max_length:  # (the hf backend asserts the same)
            raise ValueError(
                f"a continuation of {len(continuation)} tokens does not fit the model's window of "
                f"{self.max_length} tokens: shorten the task's choices or raise max_length (model_args) "
                "up to the model's context length"
            )
        row = (context + continuation)[-keep:]
        return row, len(row) - len(continuation)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, greedy: bool = True, **kwargs
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) per (key, context ids, continuation ids); sorted longest first.
        ``greedy=False`` skips the greedy check at L' > 1 (is_greedy False), as rolling windows need."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="bd3 loglikelihood")
        res = []
        for chunk in order.get_batched(n=self.batch_size):
            rows, n_ctx = zip(*(self._row(r[1], r[2]) for r in chunk))
            if self.block_size == 1:
                values, matches = zip(*ar_scores(self.model, rows, n_ctx))
            else:
                values = self._bound(list(rows), list(n_ctx))
                matches = self._is_greedy(list(rows), list(n_ctx), greedy)
            for req, v, g in zip(chunk, values, matches):
                answer = (float(v), bool(g))
                res.append(answer)
                if req[0] is not None:
                    self.cache_hook.add_partial("loglikelihood", req[0], answer)
                pbar.update(1)
        pbar.close()
        return order.get_original(res)

    def _bound(self, rows: list[list[int]], n_ctx: list[int]) -> list[float]:
        if self.block_size == 1:
            return continuation_bound(
                self.model, rows, n_ctx, None, None, 1, self.model.config.shift
            ).tolist()
        # Capacity: the longest laid-out row (max_length tokens, a grid shift, the last block's rest).
        M, cap = self.mc_samples, self.max_length + 2 * self.block_size
        draws = [draw_noise(row[:k], self.seed, M, cap) for row, k in zip(rows, n_ctx)]
        t = torch.cat([d[0] for d in draws])
        u = torch.cat([d[1] for d in draws])
        flat_rows = [row for row in rows for _ in range(M)]
        flat_ctx = [k for k in n_ctx for _ in range(M)]
        values = continuation_bound(
            self.model,
            flat_rows,
            flat_ctx,
            t,
            u,
            self.block_size,
            self.model.config.shift,
            align_context=self.sampler.align_prompt,
        )
        return values.view(len(rows), M).mean(1).tolist()

    def _is_greedy(self, rows: list[list[int]], n_ctx: list[int], check: bool = True) -> list[bool]:
        if not (check and self.greedy_check):
            return [False] * len(rows)
        out = []
        for row, k in zip(rows, n_ctx):
            # Block decoding is prefix-consistent (every block is denoised whole, then cut): the choices
            # of a question share one decode of their context, as long as the longest of them.
            key, need = tuple(row[:k]), len(row) - k
            if len(self._greedy_memo.get(key, ())) < need:
                n = -(-need // self.block_size) * self.block_size
                if len(self._greedy_memo) > 4096:  # bounded: requests come sorted by length, not by question
                    self._greedy_memo.clear()
                self._greedy_memo[key] = greedy_decode(self.model, row[:k], n, self.sampler)
            out.append(self._greedy_memo[key][:need] == row[k:])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum over the hf backend's rolling windows (max_length tokens, disjoint) of each window's value."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        values = (
            self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm, greedy=False) if windows else []
        )
        totals = [0.0] * len(requests)
        for i, (v, _) in zip(owner, values):
            totals[i] += v
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The block sampler with the KV cache. Greedy requests of equal prompt length share a batch;
        sampled ones run one at a time with a seed from (prompt, seed), so batching never changes text."""
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        encoded = [(self.tok_encode(req.args[0]), req.args[1]) for req in requests]
        order = Collator(
            list(range(len(requests))),
            sort_fn=lambda i: (-len(encoded[i][0]), tuple(encoded[i][0])),
        )
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="bd3 generate_until")
        res = []
        for chunk in order.get_batched(n=self.batch_size):
            groups: dict = {}
            for i in chunk:
                kw = normalize_gen_kwargs(encoded[i][1], self.max_gen_toks)
                greedy = float(kw.get("temperature", 0.0)) == 0.0
                key = (len(encoded[i][0]), repr(sorted(kw.items())), i if not greedy else -1)
                groups.setdefault(key, []).append(i)
            texts = {}
            for idx in groups.values():
                texts.update(self._generate([encoded[i][0] for i in idx], encoded[idx[0]][1], eos, idx))
            for i in chunk:
                res.append(texts[i])
                self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
                pbar.update(1)
        pbar.close()
        return order.get_original(res)

    def _generate(
        self, prompts: list[list[int]], gen_kwargs: dict, eos: str, idx: list[int]
    ) -> dict[int, str]:
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kw.pop("until", None), eos=eos)
        n_new = int(kw.pop("max_gen_toks"))
        keep = max(1, self.max_length - n_new)
        prompts = [p[-keep:] for p in prompts]
        temperature = float(kw.get("temperature", 0.0))
        seed = noise_seed(prompts[0], self.seed) if temperature > 0 else self.seed
        cfg = SamplerConfig(
            **{
                **self.sampler.__dict__,
                "max_new_tokens": n_new,
                "temperature": temperature,
                "top_p": float(kw.get("top_p", self.sampler.top_p) or 1.0),
                "seed": seed,
            }
        )
        out = generate(self.model, torch.tensor(prompts, device=self._device), cfg)
        texts = {}
        for i, row, n in zip(idx, out.tokens.tolist(), out.lengths):
            text = self.tok_decode(row[:n])
            texts[i] = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
        return texts
