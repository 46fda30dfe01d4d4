"""Small Composer callbacks of the BD3 trainer.

- ``SampleIndexer`` (always on): writes each training sample's noise id and the step into the batch.
- ``LossLog``: rank 0 appends the per-batch training losses to a JSONL file.
- ``HFExport``: writes a Hugging Face-format folder (safetensors) at the end of training.
"""

from __future__ import annotations

import json
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


class LossLog(Callback):
    """Rank 0 appends ``{"batch": n, "loss/train/total": ..., ...}`` (rank-averaged) per batch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def batch_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        record = {"batch": int(state.timestamp.batch), **state.total_loss_dict}
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
        if dist.get_global_rank() == 0:
            save_pretrained(bd3, self.folder, tokenizer_dir=self.tokenizer_dir)
        dist.barrier()
