"""Evaluation callbacks (YAML ``callbacks.block_size_likelihood`` / ``noise_interval_search`` /
``generation``), thin wrappers of ``pipeline.diffusion.metrics`` and ``pipeline.diffusion.sampler``:

- ``BlockSizeLikelihood``: NELBO of the current weights at several block sizes on fixed eval rows.
- ``NoiseIntervalSearch``: the lowest-variance clipped noise interval; optionally trains with it.
- ``Generation``: samples at the training block size, their unigram entropy and generative perplexity.

Each takes its YAML section (``pipeline.trainer.config.schema``), checked with the config.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from pipeline.diffusion.metrics import generation_protocol
from pipeline.trainer.callbacks.eval_base import (
    EvalRows,
    EvalSchedule,
    ScheduledEval,
    isolated_eval,
    params_sharded,
)
from pipeline.trainer.composer_model import live_model
from pipeline.trainer.config.schema import (
    BlockSizeLikelihoodSection,
    GenerationSection,
    NoiseIntervalSearchSection,
)

log = logging.getLogger(__name__)


class BlockSizeLikelihood(ScheduledEval):
    """``evaluate_block_sizes`` of the current weights on fixed eval rows, every ``interval``.

    Logs ``eval/nelbo/bs{N}`` (nats per scored token), ``eval/ppl_bound/bs{N}`` (exp NELBO),
    ``eval/stderr/bs{N}`` (standard error of the NELBO over rows) and ``eval/train_block_size``. With an
    eval mixture (``eval_loader.streams``) each stream's first ``num_batches`` global batches are
    evaluated alone and logged as ``eval/bs{N}/{stream}/{nelbo,ppl_bound,stderr}``; the keys above are
    then the token-weighted total (``combine_results``).
    Runs at BATCH_END on its schedule and at FIT_END when the last batch was not evaluated yet.
    ``last_results`` holds the latest ``BlockSizeResult`` list.
    """

    def __init__(
        self,
        section: BlockSizeLikelihoodSection,
        block_sizes: list[int],
        interval: str | int,
        batch_size: int,
        streams: list[str] | None = None,
    ):
        """``block_sizes``: the section's sizes as integers ("L" resolved); ``interval``: the resolved
        schedule (the section's, else ``eval_interval``); ``batch_size``: eval rows per rank and batch;
        ``streams``: the names of the eval streams of a mixture (``eval_loader.streams``, in order)."""
        self.section = section
        self.block_sizes = list(block_sizes)
        self.schedule = EvalSchedule(interval)
        self.rows = EvalRows(batch_size)
        self.streams = list(streams or [])
        self.last_results: list = []
        self.last_streams: dict[str, list] = {}

    def evaluate(self, state: State) -> list:
        """``BlockSizeResult`` per block size: of the eval rows, or with ``streams`` the token-weighted
        total of the streams' (``last_streams`` then holds each stream's)."""
        from pipeline.diffusion.metrics import combine_results, evaluate_block_sizes

        n, draws, seed = self.section.num_batches, self.section.draws, self.section.seed
        with isolated_eval(state) as bd3:
            diffusion = live_model(state).diffusion
            if not self.streams:
                batches = self.rows.batches(state, n)
                return evaluate_block_sizes(bd3, batches, self.block_sizes, diffusion, draws, seed)
            self.last_streams = {
                name: evaluate_block_sizes(
                    bd3, self.rows.batches(state, n, i), self.block_sizes, diffusion, draws, seed
                )
                for i, name in enumerate(self.streams)
            }
        return combine_results(list(self.last_streams.values()))

    def _run(self, state: State, logger: Logger) -> None:
        results = self.evaluate(state)
        self.schedule.last_batch = int(state.timestamp.batch)
        metrics = {"eval/train_block_size": min(live_model(state).diffusion.block_sizes)}
        for r in results:
            metrics[f"eval/nelbo/bs{r.block_size}"] = r.nelbo
            metrics[f"eval/ppl_bound/bs{r.block_size}"] = r.ppl_bound
            metrics[f"eval/stderr/bs{r.block_size}"] = r.stderr
        for name, stream_results in self.last_streams.items():
            for r in stream_results:
                for key in ("nelbo", "ppl_bound", "stderr"):
                    metrics[f"eval/bs{r.block_size}/{name}/{key}"] = getattr(r, key)
        logger.log_metrics(metrics)
        self.last_results = results

    def latest_table(self) -> dict | None:
        """The last evaluation for a model card: eval rows, draws, seed and one dict per block size
        (``BlockSizeResult.as_dict``); None before the first."""
        if not self.last_results:
            return None
        return {
            "rows": self.last_results[0].rows,
            "draws": self.section.draws,
            "seed": self.section.seed,
            "results": [r.as_dict() for r in self.last_results],
            **(
                {"streams": {n: [r.as_dict() for r in rs] for n, rs in self.last_streams.items()}}
                if self.last_streams
                else {}
            ),
        }


class NoiseIntervalSearch(Callback):
    """``noise_interval_search`` at every training block size on fixed eval rows, every n-th tick.

    Logs the chosen interval and its variance (``eval/noise_interval/{beta,omega,variance}``; with
    several trained sizes ``eval/noise_interval/bs{N}/...`` per size). With ``adopt`` the training
    objective uses them from the next batch on (a mapping L' -> interval when several sizes are
    trained): the chosen intervals are in this callback's ``state_dict`` (Composer checkpoints it) and
    are re-applied when a checkpoint is loaded, so a resumed run trains with the intervals the
    interrupted run had adopted.
    """

    def __init__(self, section: NoiseIntervalSearchSection, interval: str | int, batch_size: int):
        from pipeline.diffusion.metrics import interval_grid

        self.section = section
        self.schedule = EvalSchedule(interval, section.every_n_evals)
        self.rows = EvalRows(batch_size)
        self.adopt = section.adopt
        self.grid = interval_grid(section.widths, section.step)
        self.chosen: dict[int, tuple[float, float]] = {}  # L' -> [beta, omega]
        self.last_records: dict[int, list[dict]] = {}
        self._state: State | None = None

    def search(self, state: State) -> dict[int, tuple[tuple[float, float], list[dict]]]:
        """L' -> (chosen interval, one record per candidate), for every trained block size (or the
        section's ``block_sizes``)."""
        from pipeline.diffusion.metrics import noise_interval_search

        cm = live_model(state)
        with isolated_eval(state) as bd3:
            batches = list(self.rows.batches(state, self.section.num_batches))
            return {
                bs: noise_interval_search(
                    bd3, batches, bs, cm.diffusion, self.grid, criterion=self.section.criterion
                )
                for bs in self.section.block_sizes or cm.diffusion.block_sizes
            }

    def apply(self, state: State) -> None:
        """Set the training objective's noise interval(s) to the chosen ones (when adopting)."""
        if not (self.adopt and self.chosen):
            return
        d = live_model(state).diffusion
        if isinstance(d.block_size, int):
            d.noise_interval = self.chosen[d.block_size]
        else:
            d.noise_interval = {bs: self.chosen.get(bs, d.interval_for(bs)) for bs in d.block_sizes}
        getattr(live_model(state), "_flops_cache", {}).clear()  # FLOPs depend on the masked fraction

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._state = state  # load_state_dict (autoresume) re-applies the interval through it
        elif event == Event.FIT_START:
            self.apply(state)
        elif self.schedule.due(state, event):
            self._run(state, logger)

    def _run(self, state: State, logger: Logger) -> None:
        found = self.search(state)
        self.schedule.last_batch = int(state.timestamp.batch)
        several = len(live_model(state).diffusion.block_sizes) > 1
        metrics = {}
        for bs, (best, records) in found.items():
            var = next(r["variance"] for r in records if tuple(r["interval"]) == tuple(best))
            key = f"eval/noise_interval/bs{bs}/" if several else "eval/noise_interval/"
            metrics.update({key + "beta": best[0], key + "omega": best[1], key + "variance": var})
            self.last_records[bs] = records
            self.chosen[bs] = (float(best[0]), float(best[1]))
        logger.log_metrics(metrics)
        if self.adopt:
            d = live_model(state).diffusion
            before = {bs: d.interval_for(bs) for bs in self.chosen}
            self.apply(state)
            if dist.get_global_rank() == 0 and before != self.chosen:
                log.info("noise_interval_search: training noise intervals %s -> %s", before, self.chosen)

    def state_dict(self) -> dict[str, Any]:
        return {**self.schedule.state_dict(), "chosen": {bs: list(iv) for bs, iv in self.chosen.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)
        self.chosen = {
            int(bs): (float(iv[0]), float(iv[1])) for bs, iv in (state.get("chosen") or {}).items()
        }
        if self._state is not None:
            self.apply(self._state)


class Generation(ScheduledEval):
    """Samples at the (smallest) training block size with the KV-cache sampler, logged as text and statistics.

    The prompt is one BOS token (EOS when the tokenizer has no BOS). Logs ``eval/gen/unigram_entropy``
    (per-sample entropy of the token frequencies, nats, averaged), ``eval/gen/nfe_per_token`` and,
    with a ``reference`` AR model (loaded once, on rank 0), ``eval/gen/ppl`` (its perplexity on the
    samples, ``pipeline.diffusion.metrics.generative_perplexity``). The decoded samples go to stderr,
    tensorboard (``add_text``) and ``logger.log_traces``; ``last_samples`` holds them.

    Every rank generates when the parameters are sharded (FSDP, ZeRO-3: the forward gathers them
    collectively); otherwise only rank 0 does.
    """

    def __init__(self, section: GenerationSection, interval: str | int, tokenizer_file: str | Path):
        self.section = section
        self.schedule = EvalSchedule(interval, section.every_n_evals)
        self.tokenizer_file = Path(tokenizer_file)
        self.reference = None if section.reference is None else Path(section.reference).expanduser()
        self._tokenizer = None
        self._ref: tuple[Any, Any] | None = None
        self.last_samples: list[str] = []
        self.last_metrics: dict[str, float] = {}
        self.last_protocol: dict[str, Any] = {}

    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.tokenizer_file))
        return self._tokenizer

    def reference_model(self, device):
        """(AR model, its tokenizer), loaded once; the run's tokenizer when the folder has none."""
        if self._ref is None:
            from tokenizers import Tokenizer

            from pipeline.save_folder import TOKENIZER_FILE, load_for_inference

            model = load_for_inference(self.reference, device=device)
            tok_file = Path(self.reference) / TOKENIZER_FILE
            tok = Tokenizer.from_file(str(tok_file)) if tok_file.exists() else self.tokenizer()
            self._ref = (model, tok)
        return self._ref

    def sampler_config(self, state: State):
        """The section's sampler settings at the run's block size, EOS id and shift."""
        from pipeline.diffusion.sampler import SamplerConfig

        cm = live_model(state)
        settings = {f.name: getattr(self.section, f.name) for f in dataclasses.fields(SamplerConfig)}
        settings.update(
            block_size=min(cm.diffusion.block_sizes),
            eos_token_id=cm.model.config.eos_token_id,
            shift=cm.diffusion.shift,
        )
        return SamplerConfig(**settings)

    def sample(self, state: State) -> tuple[dict[str, float], list[str]]:
        """(metrics, decoded samples) of the current weights."""
        from pipeline.diffusion.metrics import generative_perplexity, unigram_entropy
        from pipeline.diffusion.sampler import generate

        cfg = self.sampler_config(state)
        with isolated_eval(state) as bd3:
            device = next(bd3.parameters()).device
            if self.reference is not None and dist.get_global_rank() == 0:
                ref, ref_tok = self.reference_model(device)
                out = generative_perplexity(
                    bd3, self.tokenizer(), ref, ref_tok, cfg, self.section.num_samples
                )
                metrics = {
                    "eval/gen/ppl": out["gen_ppl"],
                    "eval/gen/unigram_entropy": out["unigram_entropy"],
                    "eval/gen/nfe_per_token": out["nfe_per_token"],
                }
                return metrics, out["samples"]
            c = bd3.config
            start = c.start_token_id
            prompt = torch.full(
                (self.section.num_samples, 1), start if start is not None else 0, device=device
            )
            result = generate(bd3, prompt, cfg)
        rows = [row[:n] for row, n in zip(result.tokens.tolist(), result.lengths)]
        texts = [self.tokenizer().decode(ids, skip_special_tokens=True) for ids in rows]
        metrics = {
            "eval/gen/unigram_entropy": sum(unigram_entropy(r) for r in rows) / max(len(rows), 1),
            "eval/gen/nfe_per_token": result.nfe / max(sum(result.lengths), 1),
        }
        return metrics, texts

    def _run(self, state: State, logger: Logger) -> None:
        self.schedule.last_batch = int(state.timestamp.batch)
        if dist.get_global_rank() != 0 and not params_sharded(state):
            return
        metrics, texts = self.sample(state)
        if dist.get_global_rank() != 0:
            return
        self.last_metrics, self.last_samples = metrics, texts
        batch = int(state.timestamp.batch)
        logger.log_metrics(metrics)
        logger.log_traces({f"eval/gen/sample{i}": t for i, t in enumerate(texts)})
        from pipeline.trainer.seams import tensorboard_writers

        for writer in tensorboard_writers(logger):
            for i, t in enumerate(texts):
                writer.add_text(f"eval/gen/sample{i}", t, global_step=batch)
        stats = ", ".join(f"{k.rsplit('/', 1)[1]} {v:.4g}" for k, v in metrics.items() if math.isfinite(v))
        protocol = generation_protocol(self.sampler_config(state), self.section.num_samples, self.reference)
        self.last_protocol = protocol
        logger.log_hyperparameters({f"eval/gen/protocol/{k}": v for k, v in protocol.items()})
        shown = ", ".join(f"{k} {v}" for k, v in protocol.items() if k != "num_samples")
        lines = [f"[generation] batch {batch}: {stats} ({shown})"]
        lines += [f"[generation] sample {i}: {t!r}" for i, t in enumerate(texts)]
        print("\n".join(lines), file=sys.stderr, flush=True)


def eval_callbacks(cfg, tokenizer_file: str | Path) -> list:
    """The callbacks of the ``callbacks.block_size_likelihood``, ``noise_interval_search``,
    ``generation`` and ``downstream_eval`` sections of a checked ``TrainConfig`` (all off unless configured).

    They share one schedule: ``callbacks.block_size_likelihood.interval`` (default ``eval_interval``);
    noise_interval_search and generation may set their own ``interval`` and run on every
    ``every_n_evals``-th tick of it.
    """
    from pipeline.trainer.config import block_size_list

    c = cfg.callbacks
    base = (c.block_size_likelihood.interval if c.block_size_likelihood else None) or cfg.eval_interval
    eval_batch = cfg.device_eval_batch_size or cfg.device_train_microbatch_size
    out = []
    if c.block_size_likelihood is not None:
        streams = list(cfg.eval_loader.streams or {})
        out.append(
            BlockSizeLikelihood(c.block_size_likelihood, block_size_list(cfg), base, eval_batch, streams)
        )
    if c.noise_interval_search is not None:
        n = c.noise_interval_search
        out.append(NoiseIntervalSearch(n, n.interval or base, eval_batch))
    if c.generation is not None:
        out.append(Generation(c.generation, c.generation.interval or base, tokenizer_file))
    if c.downstream_eval is not None:
        from pipeline.trainer.callbacks.downstream import DownstreamEval

        out.append(DownstreamEval(c.downstream_eval, c.downstream_eval.interval or base, tokenizer_file))
    return out
