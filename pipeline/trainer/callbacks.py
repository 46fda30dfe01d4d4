"""Small Composer callbacks of the BD3 trainer.

- ``SampleIndexer`` (always on): writes each training sample's noise id and the step into the batch.
- ``GradientClipping``: clips the global gradient norm (DDP and FSDP2) and logs it.
- ``GlooFSDPGradMean``: FSDP2 on CPU (gloo) sums gradients over ranks; divide them back to the mean.
- ``NonFiniteLoss`` (always on): a NaN/Inf loss on any rank stops the run before the update, or
  drops the batch's update everywhere (``nonfinite_loss: skip``).
- ``LossLog``: rank 0 appends the per-batch training losses (and optionally the rows) to a JSONL file.
- ``HFExport``: writes a Hugging Face-format folder (safetensors) at the end of training.

Evaluation callbacks (YAML ``callbacks.block_size_likelihood`` / ``noise_interval_search`` /
``generation``), thin wrappers of ``pipeline.evaluation`` and ``pipeline.diffusion.sampler``:

- ``BlockSizeLikelihood``: NELBO of the current weights at several block sizes on fixed eval rows.
- ``NoiseIntervalSearch``: the lowest-variance clipped noise interval; optionally trains with it.
- ``Generation``: samples at the training block size, their unigram entropy and generative perplexity.

They tick on one schedule (``EvalSchedule``): at BATCH_END when the timestamp crosses the interval and
at the last batch. Evaluation never touches the training dataloader or the global RNG (seeded
generators only; the global states are also forked around it), runs under ``torch.no_grad`` in eval
mode and puts the model back in train mode, so with ``adopt: false`` the training losses are bitwise
those of the same run without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from pipeline.trainer.data import global_batch_positions

log = logging.getLogger(__name__)


def unwrap(state: State):
    """The ``BD3ComposerModel`` inside a DDP wrapper (FSDP2 shards it in place)."""
    model = state.model
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class SampleIndexer(Callback):
    """Noise ids = global stream index of every sample of the device batch; ``step`` for annealing.

    Runs at AFTER_DATALOADER, before Composer splits the device batch into microbatches, so every
    microbatch carries its own samples' ids. ``state.timestamp.sample`` counts the samples of all
    earlier global batches (it is restored on resume); see ``global_batch_positions`` for where this
    rank's rows sit inside the global batch.
    """

    def after_dataloader(self, state: State, logger: Logger) -> None:
        batch = state.batch
        b = batch["input_ids"].shape[0]
        positions = global_batch_positions(
            b, dist.get_world_size(), dist.get_local_world_size(), dist.get_node_rank(), dist.get_local_rank()
        )
        batch["sample_index"] = int(state.timestamp.sample) + positions
        batch["step"] = torch.full((b,), int(state.timestamp.batch), dtype=torch.long)


class GlooFSDPGradMean(Callback):
    """Make FSDP2 on gloo average gradients over ranks, as DDP and FSDP2 on NCCL do.

    FSDP2 reduce-scatters fp32 gradients with ``ReduceOp.AVG``; gloo's ``reduce_scatter_tensor``
    returns the sum for AVG (torch 2.7), so CPU FSDP runs got world-size-times larger gradients
    (clipping and Adam's eps then act differently). Install before ``GradientClipping``.
    """

    def after_train_batch(self, state: State, logger: Logger) -> None:
        world = dist.get_world_size()
        for p in state.model.parameters():
            if p.grad is not None:
                p.grad.div_(world)


class GradientClipping(Callback):
    """Scale gradients so their global L2 norm is at most ``threshold``; log the norm before clipping.

    Composer 0.32.1's GradientClipping algorithm only knows FSDP1 (it looks for
    ``FullyShardedDataParallel`` roots) and silently clips nothing under FSDP2. Here the norm of
    sharded (DTensor) gradients is reduced over all shards, so DDP and FSDP2 clip identically.
    """

    def __init__(self, threshold: float):
        self.threshold = threshold

    def after_train_batch(self, state: State, logger: Logger) -> None:
        params = [p for p in state.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if hasattr(norm, "full_tensor"):  # a DTensor: partial norms of the shards
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, self.threshold, norm)
        logger.log_metrics({"optim/grad_norm": norm.item()})


class NonFiniteLoss(Callback):
    """Check every microbatch loss before its backward; all ranks agree (one scalar all-reduce).

    ``stop``: raise ``NonFiniteError`` on every rank with the batch and the checkpoint to resume
    from; no update is applied and nothing is saved. ``skip``: the batch's gradients are dropped on
    every rank before the optimizer step (params with no grad are not updated), the run goes on and
    ``loss/train/skipped_batches`` counts them. Install before ``GradientClipping``.
    """

    def __init__(self, policy: str, save_folder: str | None):
        self.policy = policy
        self.save_folder = save_folder
        self.skip_batch = False
        self.skipped = 0

    def after_loss(self, state: State, logger: Logger) -> None:
        from pipeline.trainer.safe_saves import NonFiniteError, resume_hint, test_fault

        batch = int(state.timestamp.batch) + 1  # the batch being trained, numbered as in the loss log
        loss = state.loss["total"] if isinstance(state.loss, dict) else state.loss
        if test_fault("nan_loss", batch, dist.get_global_rank()):
            loss = loss * float("nan")
            if isinstance(state.loss, dict):
                state.loss["total"] = loss
            else:
                state.loss = loss
        bad = not bool(torch.isfinite(loss.detach()).all())
        flag = torch.tensor([float(bad)], device=loss.device)
        dist.all_reduce(flag, reduce_operation="MAX")
        if flag.item() == 0:
            return
        ranks = [r for r, b in enumerate(dist.all_gather_object(bad)) if b]
        if self.policy == "stop":
            raise NonFiniteError(
                f"the training loss is NaN/Inf at batch {batch} (rank {', '.join(map(str, ranks))}); "
                f"stopped before applying it. {resume_hint(self.save_folder)} Or set nonfinite_loss: skip."
            )
        if not self.skip_batch:
            log.warning("NaN/Inf loss at batch %d (rank %s): skipping the batch's update", batch, ranks)
        self.skip_batch = True

    def after_train_batch(self, state: State, logger: Logger) -> None:
        if not self.skip_batch:
            return
        for p in state.model.parameters():
            p.grad = None
        self.skip_batch = False
        self.skipped += 1
        logger.log_metrics({"loss/train/skipped_batches": self.skipped})

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))


class LossLog(Callback):
    """Rank 0 appends ``{"batch": n, "time": unix seconds, "loss/train/total": ..., ...}`` per batch.

    With ``sample_ids`` the record also has ``rows``: the split indices of the global batch's rows in
    stream order. A line cut by a kill is dropped when the file is opened again.
    """

    def __init__(self, path: str | Path, sample_ids: bool = False):
        self.path = Path(path)
        self.sample_ids = sample_ids

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0 or not self.path.exists():
            return
        text = self.path.read_bytes()
        if text and not text.endswith(b"\n"):  # torn last line of a killed run
            self.path.write_bytes(text[: text.rfind(b"\n") + 1])

    def batch_end(self, state: State, logger: Logger) -> None:
        rows = None
        if self.sample_ids:  # collective: every rank contributes its (stream index, row) pairs
            b = state.batch
            mine = list(zip(b["sample_index"].tolist(), b["dataset_index"].tolist()))
            pairs = sorted(p for part in dist.all_gather_object(mine) for p in part)
            rows = [row for _, row in pairs]
        if dist.get_global_rank() != 0:
            return
        record = {"batch": int(state.timestamp.batch), "time": time.time(), **state.total_loss_dict}
        if rows is not None:
            record["rows"] = rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class HFExport(Callback):
    """At FIT_END, write ``folder`` with ``pipeline.model.save_pretrained`` (rank 0; FSDP gathers first)."""

    def __init__(self, folder: str | Path, tokenizer_dir: str | Path | None = None):
        self.folder = Path(folder)
        self.tokenizer_dir = tokenizer_dir

    def fit_end(self, state: State, logger: Logger) -> None:
        from pipeline.model import BD3LM, save_pretrained

        bd3 = unwrap(state).model
        if state.fsdp_enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(bd3, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if dist.get_global_rank() == 0:
                plain = BD3LM(bd3.config)
                plain.load_state_dict(full)
                plain.source_dir = getattr(bd3, "source_dir", None)
                bd3 = plain
        params = list(bd3.parameters())
        if any(hasattr(p, "ds_id") for p in params):  # DeepSpeed ZeRO-3: gather the partitions first
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if dist.get_global_rank() == 0:
                    save_pretrained(bd3, self.folder, tokenizer_dir=self.tokenizer_dir)
        elif dist.get_global_rank() == 0:
            save_pretrained(bd3, self.folder, tokenizer_dir=self.tokenizer_dir)
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Evaluation callbacks.
# ---------------------------------------------------------------------------------------------


class EvalSchedule:
    """Ticks when the timestamp crosses ``interval`` (BATCH_END; EPOCH_END for epoch units) and at
    the last batch of training; at most once per batch. ``every_n`` keeps every n-th tick.

    The tick count and the batch of the last run are part of the owner's ``state_dict``, so a resumed
    run keeps counting where the interrupted one stopped.
    """

    def __init__(self, interval: str | int, every_n: int = 1):
        from composer.utils.misc import create_interval_scheduler

        self.interval = interval
        self.every_n = every_n
        self._check = create_interval_scheduler(
            interval, include_end_of_training=True, checkpoint_events=False, final_events={Event.BATCH_END}
        )
        self.ticks = 0
        self.last_tick = -1  # batch of the last tick
        self.last_batch = -1  # batch of the owner's last run

    def due(self, state: State, event: Event) -> bool:
        """True when the owner should run now (call on every event)."""
        if event not in (Event.BATCH_END, Event.EPOCH_END) or not self._check(state, event):
            return False
        batch = int(state.timestamp.batch)
        if batch == self.last_tick:
            return False
        self.last_tick = batch
        self.ticks += 1
        return self.ticks % self.every_n == 0

    def state_dict(self) -> dict[str, int]:
        return {"ticks": self.ticks, "last_tick": self.last_tick, "last_batch": self.last_batch}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.ticks = int(sd.get("ticks", 0))
        self.last_tick = int(sd.get("last_tick", -1))
        self.last_batch = int(sd.get("last_batch", -1))


def composer_model(state: State):
    """The ``BD3ComposerModel`` of the run (inside DDP; the DeepSpeed engine shares the same object)."""
    model = unwrap(state)
    return getattr(model, "module", model) if not hasattr(model, "diffusion") else model


def params_sharded(state: State) -> bool:
    """FSDP or DeepSpeed ZeRO-3: a forward gathers the parameters collectively (all ranks must run it)."""
    return state.fsdp_enabled or any(hasattr(p, "ds_id") for p in composer_model(state).model.parameters())


@contextlib.contextmanager
def isolated_eval(state: State):
    """No gradients, the run's precision, and the global RNG states put back afterwards.

    ``evaluate_block_sizes``, ``noise_interval_search`` and ``generate`` draw only from their own
    seeded generators (tested); forking the global states keeps that true whatever a model does.
    """
    from composer.core import get_precision_context

    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    bd3 = composer_model(state).model
    was_training = bd3.training
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            with get_precision_context(state.precision, state.precision_config):
                yield bd3
        finally:
            bd3.train(was_training)


class EvalRows:
    """The first global eval batches as this rank's batches, read by index from the run's eval set.

    Uses random access into the trainer's eval ``StreamingDataset`` (never iterates it, so the
    evaluator and the training loader are untouched). Global batch j holds eval rows
    ``j * B * world ... (j + 1) * B * world - 1``; rank r takes every world-th row from r, so the
    ranks' rows are disjoint, together cover the first ``num_batches`` global batches, and every rank
    gets the same number of batches (the collectives of the evaluation stay in step). Each batch's
    ``sample_index`` is the row's index in the eval split: its fixed evaluation noise id.
    """

    def __init__(self, batch_size: int, label: str = "eval"):
        self.batch_size = batch_size
        self.label = label

    def dataset(self, state: State):
        for ev in state.evaluators:
            if ev.label == self.label:
                loader = ev.dataloader.dataloader
                return getattr(loader, "dataset", loader)
        raise RuntimeError(
            f"the evaluation callbacks need the trainer's {self.label!r} evaluator (set eval_loader)"
        )

    def indices(self, total: int, num_batches: int) -> list[int]:
        world, rank = dist.get_world_size(), dist.get_global_rank()
        n = min(num_batches * self.batch_size * world, (total // world) * world)
        return list(range(rank, n, world))

    def batches(self, state: State, num_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        ds = self.dataset(state)
        total = int(getattr(ds, "num_samples", None) or len(ds))
        mine = self.indices(total, num_batches)
        for s in range(0, len(mine), self.batch_size):
            rows = [ds[i] for i in mine[s : s + self.batch_size]]
            yield {
                "input_ids": torch.stack([torch.as_tensor(r["input_ids"]) for r in rows]),
                "doc_starts": torch.stack([torch.as_tensor(r["doc_starts"]) for r in rows]),
                "sample_index": torch.tensor([int(r["dataset_index"]) for r in rows], dtype=torch.long),
            }


class ScheduledEval(Callback):
    """Runs ``_run`` on each tick of ``self.schedule`` and at FIT_END when the last batch was not evaluated."""

    schedule: EvalSchedule

    def _run(self, state: State, logger: Logger) -> None:
        raise NotImplementedError

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if self.schedule.due(state, event):
            self._run(state, logger)
        elif event == Event.FIT_END and self.schedule.last_batch != int(state.timestamp.batch):
            self._run(state, logger)

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)


class BlockSizeLikelihood(ScheduledEval):
    """``evaluate_block_sizes`` of the current weights on fixed eval rows, every ``interval``.

    Logs ``eval/nelbo/bs{N}`` (nats per scored token), ``eval/ppl_bound/bs{N}`` (exp NELBO),
    ``eval/stderr/bs{N}`` (standard error of the NELBO over rows) and ``eval/train_block_size``.
    Runs at BATCH_END on its schedule and at FIT_END when the last batch was not evaluated yet.
    ``last_results`` holds the latest ``BlockSizeResult`` list.
    """

    def __init__(
        self,
        block_sizes: Sequence[int],
        interval: str | int,
        batch_size: int,
        num_batches: int = 4,
        draws: int = 1,
        seed: int = 1234,
    ):
        self.block_sizes = list(block_sizes)
        self.schedule = EvalSchedule(interval)
        self.rows = EvalRows(batch_size)
        self.num_batches, self.draws, self.seed = num_batches, draws, seed
        self.last_results: list = []

    def evaluate(self, state: State) -> list:
        from pipeline.evaluation import evaluate_block_sizes

        with isolated_eval(state) as bd3:
            batches = self.rows.batches(state, self.num_batches)
            return evaluate_block_sizes(
                bd3, batches, self.block_sizes, composer_model(state).diffusion, self.draws, self.seed
            )

    def _run(self, state: State, logger: Logger) -> None:
        results = self.evaluate(state)
        self.schedule.last_batch = int(state.timestamp.batch)
        metrics = {"eval/train_block_size": composer_model(state).diffusion.block_size}
        for r in results:
            metrics[f"eval/nelbo/bs{r.block_size}"] = r.nelbo
            metrics[f"eval/ppl_bound/bs{r.block_size}"] = r.ppl_bound
            metrics[f"eval/stderr/bs{r.block_size}"] = r.stderr
        logger.log_metrics(metrics)
        self.last_results = results


class NoiseIntervalSearch(Callback):
    """``noise_interval_search`` at the training block size on fixed eval rows, every n-th tick.

    Logs the chosen interval and its variance (``eval/noise_interval/{beta,omega,variance}``).
    With ``adopt`` the training objective uses it from the next batch on: the chosen interval is in
    this callback's ``state_dict`` (Composer checkpoints it) and is re-applied when a checkpoint is
    loaded, so a resumed run trains with the interval the interrupted run had adopted.
    """

    def __init__(
        self,
        interval: str | int,
        batch_size: int,
        every_n_evals: int = 1,
        num_batches: int = 4,
        widths: Sequence[float] | None = None,
        step: float = 0.05,
        adopt: bool = True,
    ):
        from pipeline.evaluation import interval_grid

        self.schedule = EvalSchedule(interval, every_n_evals)
        self.rows = EvalRows(batch_size)
        self.num_batches, self.adopt = num_batches, adopt
        self.grid = interval_grid(list(widths) if widths else None, step)
        self.chosen: tuple[float, float] | None = None
        self.last_records: list[dict] = []
        self._state: State | None = None

    def search(self, state: State) -> tuple[tuple[float, float], list[dict]]:
        from pipeline.evaluation import noise_interval_search

        cm = composer_model(state)
        with isolated_eval(state) as bd3:
            batches = list(self.rows.batches(state, self.num_batches))
            return noise_interval_search(bd3, batches, cm.diffusion.block_size, cm.diffusion, self.grid)

    def apply(self, state: State) -> None:
        """Set the training objective's noise interval to the chosen one (when adopting)."""
        if not (self.adopt and self.chosen is not None):
            return
        cm = composer_model(state)
        cm.diffusion.noise_interval = tuple(self.chosen)
        getattr(cm, "_flops_cache", {}).clear()  # the FLOPs estimate depends on the masked fraction

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._state = state  # load_state_dict (autoresume) re-applies the interval through it
        elif event == Event.FIT_START:
            self.apply(state)
        elif self.schedule.due(state, event):
            self._run(state, logger)

    def _run(self, state: State, logger: Logger) -> None:
        best, records = self.search(state)
        self.schedule.last_batch = int(state.timestamp.batch)
        var = next(r["variance"] for r in records if tuple(r["interval"]) == tuple(best))
        logger.log_metrics(
            {
                "eval/noise_interval/beta": best[0],
                "eval/noise_interval/omega": best[1],
                "eval/noise_interval/variance": var,
            }
        )
        self.last_records = records
        self.chosen = (float(best[0]), float(best[1]))
        if self.adopt:
            before = tuple(composer_model(state).diffusion.noise_interval)
            self.apply(state)
            if dist.get_global_rank() == 0 and before != self.chosen:
                log.info(
                    "noise_interval_search: training noise interval %s -> %s", list(before), list(self.chosen)
                )

    def state_dict(self) -> dict[str, Any]:
        return {**self.schedule.state_dict(), "chosen": list(self.chosen) if self.chosen else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)
        chosen = state.get("chosen")
        self.chosen = (float(chosen[0]), float(chosen[1])) if chosen else None
        if self._state is not None:
            self.apply(self._state)


class Generation(ScheduledEval):
    """Samples at the training block size with the KV-cache sampler, logged as text and statistics.

    The prompt is one BOS token (EOS when the tokenizer has no BOS). Logs ``eval/gen/unigram_entropy``
    (per-sample entropy of the token frequencies, nats, averaged), ``eval/gen/nfe_per_token`` and,
    with a ``reference`` AR model (loaded once, on rank 0), ``eval/gen/ppl`` (its perplexity on the
    samples, ``pipeline.evaluation.generative_perplexity``). The decoded samples go to stderr,
    tensorboard (``add_text``) and ``logger.log_traces``; ``last_samples`` holds them.

    Every rank generates when the parameters are sharded (FSDP, ZeRO-3: the forward gathers them
    collectively); otherwise only rank 0 does.
    """

    def __init__(
        self,
        interval: str | int,
        tokenizer_file: str | Path,
        every_n_evals: int = 1,
        num_samples: int = 2,
        max_new_tokens: int = 64,
        sampler: str = "confidence",
        threshold: float = 0.9,
        top_p: float = 0.9,
        seed: int = 0,
        stop_at_eos: bool = True,
        reference: str | Path | None = None,
    ):
        self.schedule = EvalSchedule(interval, every_n_evals)
        self.tokenizer_file = Path(tokenizer_file)
        self.num_samples, self.max_new_tokens = num_samples, max_new_tokens
        self.sampler, self.threshold, self.top_p, self.seed = sampler, threshold, top_p, seed
        self.stop_at_eos = stop_at_eos
        self.reference = reference
        self._tokenizer = None
        self._ref: tuple[Any, Any] | None = None
        self.last_samples: list[str] = []
        self.last_metrics: dict[str, float] = {}

    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.tokenizer_file))
        return self._tokenizer

    def reference_model(self, device):
        """(AR model, its tokenizer), loaded once; the run's tokenizer when the folder has none."""
        if self._ref is None:
            from tokenizers import Tokenizer

            from pipeline.save_folder import load_for_inference

            model = load_for_inference(self.reference, device=device)
            tok_file = Path(self.reference) / "tokenizer.json"
            tok = Tokenizer.from_file(str(tok_file)) if tok_file.exists() else self.tokenizer()
            self._ref = (model, tok)
        return self._ref

    def sampler_config(self, state: State):
        from pipeline.diffusion.sampler import SamplerConfig

        cm = composer_model(state)
        return SamplerConfig(
            block_size=cm.diffusion.block_size,
            max_new_tokens=self.max_new_tokens,
            sampler=self.sampler,
            threshold=self.threshold,
            top_p=self.top_p,
            stop_at_eos=self.stop_at_eos,
            eos_token_id=cm.model.config.eos_token_id,
            shift=cm.diffusion.shift,
            seed=self.seed,
        )

    def sample(self, state: State) -> tuple[dict[str, float], list[str]]:
        """(metrics, decoded samples) of the current weights."""
        from pipeline.diffusion.sampler import generate
        from pipeline.evaluation import generative_perplexity, unigram_entropy

        cfg = self.sampler_config(state)
        with isolated_eval(state) as bd3:
            device = next(bd3.parameters()).device
            if self.reference is not None and dist.get_global_rank() == 0:
                ref, ref_tok = self.reference_model(device)
                out = generative_perplexity(bd3, self.tokenizer(), ref, ref_tok, cfg, self.num_samples)
                metrics = {
                    "eval/gen/ppl": out["gen_ppl"],
                    "eval/gen/unigram_entropy": out["unigram_entropy"],
                    "eval/gen/nfe_per_token": out["nfe_per_token"],
                }
                return metrics, out["samples"]
            c = bd3.config
            start = c.start_token_id
            prompt = torch.full((self.num_samples, 1), start if start is not None else 0, device=device)
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
        from composer.loggers import TensorboardLogger

        for dest in logger.destinations:
            if isinstance(dest, TensorboardLogger) and getattr(dest, "writer", None) is not None:
                for i, t in enumerate(texts):
                    dest.writer.add_text(f"eval/gen/sample{i}", t, global_step=batch)
        stats = ", ".join(f"{k.rsplit('/', 1)[1]} {v:.4g}" for k, v in metrics.items() if math.isfinite(v))
        lines = [f"[generation] batch {batch}: {stats}"]
        lines += [f"[generation] sample {i}: {t!r}" for i, t in enumerate(texts)]
        print("\n".join(lines), file=sys.stderr, flush=True)


def eval_callbacks(cfg, tokenizer_file: str | Path) -> list:
    """The callbacks of the ``callbacks.block_size_likelihood``, ``noise_interval_search`` and
    ``generation`` sections of a ``TrainConfig`` (all off unless configured).

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
        b = c.block_size_likelihood
        out.append(
            BlockSizeLikelihood(
                block_size_list(cfg), base, eval_batch, num_batches=b.num_batches, draws=b.draws, seed=b.seed
            )
        )
    if c.noise_interval_search is not None:
        n = c.noise_interval_search
        out.append(
            NoiseIntervalSearch(
                n.interval or base,
                eval_batch,
                every_n_evals=n.every_n_evals,
                num_batches=n.num_batches,
                widths=n.widths,
                step=n.step,
                adopt=n.adopt,
            )
        )
    if c.generation is not None:
        g = c.generation
        if g.reference is not None and not Path(g.reference).expanduser().is_dir():
            from pipeline.trainer.config import ConfigError

            raise ConfigError(
                "callbacks.generation.reference",
                f"{g.reference!r} is not a folder: give a Hugging Face-format folder of an AR model "
                "with the run's tokenizer (config.json, model.safetensors)",
            )
        out.append(
            Generation(
                g.interval or base,
                tokenizer_file,
                every_n_evals=g.every_n_evals,
                num_samples=g.num_samples,
                max_new_tokens=g.max_new_tokens,
                sampler=g.sampler,
                threshold=g.threshold,
                top_p=g.top_p,
                seed=g.seed,
                stop_at_eos=g.stop_at_eos,
                reference=None if g.reference is None else Path(g.reference).expanduser(),
            )
        )
    return out
