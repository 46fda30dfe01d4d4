"""Small Composer callbacks of the BD3 trainer.

- ``SampleIndexer`` (always on): writes each training sample's noise id and the step into the batch.
- ``GradientClipping``: clips the global gradient norm (DDP and FSDP2) and logs it.
- ``GlooFSDPGradMean``: FSDP2 on CPU (gloo) sums gradients over ranks; divide them back to the mean.
- ``LossLog``: rank 0 appends the per-batch training losses to a JSONL file.
- ``HFExport``: writes a Hugging Face-format folder (safetensors) at the end of training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from pipeline.trainer.data import global_batch_positions


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


class LossLog(Callback):
    """Rank 0 appends ``{"batch": n, "time": unix seconds, "loss/train/total": ..., ...}`` per batch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def batch_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        record = {"batch": int(state.timestamp.batch), "time": time.time(), **state.total_loss_dict}
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
