"""Composer callbacks for the mechanics of a BD3 training run.

- ``SampleIndexer`` (always on): writes each training sample's noise id and the step into the batch.
- ``GradientClipping``: clips the global gradient norm (DDP and FSDP2) and logs it.
- ``GlooFSDPGradMean``: FSDP2 on CPU (gloo) sums gradients over ranks; divide them back to the mean.
- ``NonFiniteLoss`` (always on): a NaN/Inf loss on any rank stops the run before the update, or
  drops the batch's update everywhere (``nonfinite_loss: skip``).
- ``LossLog``: rank 0 appends the per-batch training losses (and optionally the rows) to a JSONL file.
- ``TensorboardUpload``: copies the TensorBoard files to a remote save_folder.
- ``HFExport``: writes a Hugging Face-format folder (safetensors) at the end of training.

None of them imports another callback module: what one needs from another (HFExport: the latest
likelihood table) is handed to it when the callbacks are built.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from pipeline.trainer.composer_model import live_model
from pipeline.trainer.data import global_batch_positions

log = logging.getLogger(__name__)


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
    stream order, and ``block_size_by_rank``: the L' each rank's last microbatch trained with.
    A line cut by a kill is dropped when the file is opened again.
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
            sizes = dist.all_gather_object(getattr(live_model(state), "last_block_size", None))
        if dist.get_global_rank() != 0:
            return
        record = {"batch": int(state.timestamp.batch), "time": time.time(), **state.total_loss_dict}
        if rows is not None:
            record["rows"] = rows
            record["block_size_by_rank"] = sizes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class TensorboardUpload(Callback):
    """Rank 0 copies this run's TensorBoard files (``{log_dir}/{run_name}``) to
    ``tensorboard/{run_name}/`` in a remote save_folder, the layout a local save_folder has: after each
    checkpoint, and once the run is over (``post_close``: after the logger closed its last file).
    Files whose size is unchanged since their last upload are skipped. A failed upload is a warning:
    these are logs, not the checkpoint."""

    def __init__(self, log_dir: str | Path, save_folder: str):
        self.log_dir, self.save_folder = Path(log_dir), save_folder
        self.run_name: str | None = None
        self._sizes: dict[Path, int] = {}

    def init(self, state: State, logger: Logger) -> None:
        self.run_name = state.run_name

    def _upload(self) -> None:
        from pipeline.save_folder import tensorboard_run_dir, upload_paths

        folder = self.log_dir / str(self.run_name)
        if dist.get_global_rank() != 0 or self.run_name is None or not folder.is_dir():
            return
        sizes = {p: p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        changed = {p: n for p, n in sizes.items() if self._sizes.get(p) != n}
        if not changed:
            return
        under = tensorboard_run_dir(self.run_name)
        try:
            upload_paths(
                self.save_folder, {f"{under}/{p.relative_to(folder).as_posix()}": p for p in changed}
            )
        except Exception as e:  # noqa: BLE001 - any object-store failure; training goes on
            log.warning("could not upload the TensorBoard files %s to %s: %s", folder, self.save_folder, e)
            return
        self._sizes.update(changed)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._upload()

    def post_close(self) -> None:
        self._upload()


class HFExport(Callback):
    """At FIT_END, write ``folder`` with ``pipeline.hf_artifact.write_artifact`` (rank 0; FSDP gathers
    first): the weights, modeling code for ``transformers``, the run's tokenizer and a model card from
    ``facts`` plus the run's last likelihood table, when it has one.

    Args:
        tokenizer_file: the run's tokenizer, whatever its file name: the folder gets it as
            ``TOKENIZER_FILE`` (with the tokenizer_config.json etc. found beside it).
        latest_eval: returns the latest likelihood table (rows, draws, seed, results) or None
            (``BlockSizeLikelihood.latest_table``).
        latest_downstream: returns the latest downstream table or None (``DownstreamEval.latest_table``).
    """

    def __init__(
        self,
        folder: str | Path,
        tokenizer_file: str | Path | None = None,
        facts=None,
        latest_eval: Callable[[], dict | None] | None = None,
        latest_downstream: Callable[[], dict | None] | None = None,
    ):
        self.folder = Path(folder)
        self.tokenizer_file = None if tokenizer_file is None else Path(tokenizer_file)
        self.facts = facts
        self.latest_eval = latest_eval
        self.latest_downstream = latest_downstream

    def _save(self, bd3, state: State) -> None:
        from pipeline.hf_artifact import CardFacts, write_artifact

        facts = dataclasses.replace(self.facts) if self.facts is not None else CardFacts()
        table = self.latest_eval() if self.latest_eval is not None else None
        if table is not None:
            split = ((facts.run_config or {}).get("eval_loader") or {}).get("split", "eval")
            facts.eval = {"split": split, **table}
        downstream = self.latest_downstream() if self.latest_downstream is not None else None
        if downstream is not None:
            facts.downstream = downstream
        with tempfile.TemporaryDirectory() as tmp:
            write_artifact(bd3, self.folder, facts, tokenizer_dir=self._tokenizer_folder(Path(tmp)))

    def _tokenizer_folder(self, tmp: Path) -> Path | None:
        """``tmp`` holding the run's tokenizer as ``TOKENIZER_FILE`` and its companion files (None
        without a tokenizer: the export then takes the files of the folder the model came from)."""
        from pipeline.model.hf_io import TOKENIZER_FILES
        from pipeline.save_folder import TOKENIZER_FILE

        if self.tokenizer_file is None:
            return None
        for name in TOKENIZER_FILES:
            if name != TOKENIZER_FILE and (self.tokenizer_file.parent / name).exists():
                shutil.copy2(self.tokenizer_file.parent / name, tmp / name)
        shutil.copy2(self.tokenizer_file, tmp / TOKENIZER_FILE)
        return tmp

    def fit_end(self, state: State, logger: Logger) -> None:
        from pipeline.model import BD3LM

        bd3 = live_model(state).model
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
                    self._save(bd3, state)
        elif dist.get_global_rank() == 0:
            self._save(bd3, state)
        dist.barrier()
