"""DeepSpeed ZeRO (stages 1-3, CPU offload) under the Composer 0.32 Trainer.

Composer removed its DeepSpeed integration in 0.28; this module is the glue around DeepSpeed's own
engine (no ZeRO logic here), written for Composer 0.32.1 and DeepSpeed 0.19.8: the names it uses inside
them are reached through ``pipeline.trainer.seams`` and checked when it is imported, and
tests/pipeline/trainer/test_seams.py fails when the installed versions differ. The seams used
(composer/trainer/trainer.py):

- ``Trainer.__init__`` wraps the model in DDP when the world size is > 1 and FSDP is off: the
  wrapper is taken off again, the DeepSpeed engine does the data parallelism.
- ``Trainer._train_batch`` (split microbatches, backward each, optimizer step) is replaced by the
  same loop with ``engine.backward`` and ``engine.step``: DeepSpeed owns gradient accumulation,
  gradient clipping, loss scaling and the optimizer step. Composer's Events fire as usual, and
  Composer's scheduler keeps setting the learning rate in the optimizer's param groups, which
  DeepSpeed's ZeRO optimizer shares.
- Checkpoints: Composer still writes its own state (timestamp, dataset position, RNG, callbacks,
  schedulers) without the model and optimizer (``save_ignore_keys``); right before each of those
  saves every rank writes its ZeRO partition with ``engine.save_checkpoint`` into
  ``{save_folder}/deepspeed/ba{N}`` (through ``ba{N}.partial``, see ``safe_saves``). A crash
  anywhere leaves the previous pair intact, and autoresume restores the pair of the latest complete
  Composer checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from composer import Trainer
from composer.core import Event

from pipeline.save_folder import (
    DS_SUBDIR,
    download_ds_tag,
    ds_folder,
    ds_staging,
    ds_tag,
    is_remote,
    rank_files,
)
from pipeline.trainer.elastic import run_is_complete, saved_partitions, universal_source
from pipeline.trainer.safe_saves import install_safe_saves
from pipeline.trainer.seams import (
    check_deepspeed_seams,
    loading_universal,
    mark_first_batch_complete,
    original_model,
    run_event,
    skip_model_and_optimizer_state,
    train_data_spec,
)

log = logging.getLogger(__name__)
check_deepspeed_seams()


class DeepSpeedTrainer(Trainer):
    """A Composer ``Trainer`` whose model and optimizer step run inside a DeepSpeed engine."""

    def __init__(
        self, *, ds_config: dict[str, Any], model, optimizers, save_folder: str | None = None, **kwargs
    ):
        import deepspeed
        import torch.distributed as tdist

        if not tdist.is_initialized():
            raise RuntimeError(
                "initialize torch.distributed (composer.utils.dist.initialize_dist) before DeepSpeed"
            )
        deepspeed.init_distributed(dist_backend=tdist.get_backend())
        self.ds_engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizers, config=ds_config, dist_init_required=False
        )
        self.ds_config = ds_config
        # A remote save_folder: each rank stages its partition locally, uploads it and fetches it back.
        self._remote = save_folder if save_folder and is_remote(save_folder) else None
        if self._remote:
            self._ds_dir = ds_staging(self._remote, tdist.get_rank())
        else:
            self._ds_dir = ds_folder(save_folder) if save_folder else None
        ignore = ["state/model", "state/optimizers"]
        super().__init__(
            model=model,
            optimizers=optimizers,
            save_folder=save_folder,
            save_ignore_keys=ignore,
            load_ignore_keys=ignore,
            **kwargs,
        )
        if isinstance(self.state.model, torch.nn.parallel.DistributedDataParallel):
            self.state.model = self.state.model.module  # the engine reduces gradients itself
        # Composer's state_dict() builds model/optimizer dicts before dropping ignored keys; under ZeRO
        # they are partitions it cannot map. The engine's checkpoint holds them instead.
        skip_model_and_optimizer_state(self.state)
        install_safe_saves(self, save_folder, ds_dir=self._ds_dir)
        resumed = int(self.state.timestamp.batch)
        if resumed > 0 and not run_is_complete(self.state):  # Composer's autoresume restored its part
            self.load_deepspeed_checkpoint(resumed)

    # -- checkpoints ------------------------------------------------------------------------
    def load_deepspeed_checkpoint(self, batch: int) -> None:
        """Load the engine's state of ``batch``: this rank's partition, or, when the checkpoint was
        written by another number of data-parallel ranks, its universal conversion (``elastic``)."""
        tag = ds_tag(batch)
        world = self.ds_engine.dp_world_size
        saved = saved_partitions(self._ds_dir, tag, self._remote)
        if saved and saved != world:
            if self.ds_engine.global_rank == 0:
                log.info(
                    "batch %d was saved by %d data-parallel ranks and resumes on %d: loading DeepSpeed's "
                    "universal checkpoint of %s (converted once)",
                    batch,
                    saved,
                    world,
                    tag,
                )
            load_dir, load_tag = universal_source(self._ds_dir, tag, self._remote, batch)
            with loading_universal(self.ds_engine):
                self._load_engine(load_dir, load_tag)
            return
        if self._remote:  # this rank's partition and the shared files, not the other ranks'
            download_ds_tag(self._remote, tag, self._ds_dir, rank_files(self.ds_engine.global_rank))
        if self._ds_dir is None or not any((self._ds_dir / tag).glob("*")):
            raise FileNotFoundError(
                f"resuming at batch {batch} needs the DeepSpeed checkpoint {self._ds_dir}/{tag}, which is "
                f"missing: the save folder is incomplete (copied without {DS_SUBDIR}/?)"
            )
        self._load_engine(self._ds_dir, tag)

    def _load_engine(self, load_dir, tag: str) -> None:
        path, _ = self.ds_engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {load_dir}/{tag}")
        log.info("resumed DeepSpeed state from %s/%s", load_dir, tag)

    # -- the training step ------------------------------------------------------------------
    # Overrides Composer's (a seam, checked in pipeline.trainer.seams).
    def _train_batch(self, use_grad_scaling: bool) -> dict[str, torch.Tensor]:
        state = self.state
        device_batch = state.batch
        data = train_data_spec(self)
        microbatches = data.split_batch(device_batch, state.device_train_microbatch_size)
        sizes = [data.get_num_samples_in_batch(mb) for mb in microbatches]
        total = {"loss/train/total": state.device.tensor_to_device(torch.zeros(1))}
        run_event(self, Event.BEFORE_TRAIN_BATCH)
        for mb, size in zip(microbatches, sizes):
            state.batch = data.microbatch_transforms(state.device.batch_to_device(mb))
            run_event(self, Event.BEFORE_FORWARD)
            state.outputs = self.ds_engine(state.batch)
            run_event(self, Event.AFTER_FORWARD)
            run_event(self, Event.BEFORE_LOSS)
            state.loss = original_model(self).loss(state.outputs, state.batch)
            run_event(self, Event.AFTER_LOSS)
            loss = state.loss["total"] if isinstance(state.loss, dict) else state.loss
            run_event(self, Event.BEFORE_BACKWARD)
            # DeepSpeed divides by gradient_accumulation_steps (equal microbatches: = size / batch).
            self.ds_engine.backward(loss)
            run_event(self, Event.AFTER_BACKWARD)
            self.ds_engine.step()  # applies the update at the accumulation boundary only
            total["loss/train/total"] += loss.detach().float().mean() * (size / sum(sizes))
            if isinstance(state.loss, dict):
                for k, v in state.loss.items():
                    if k != "total":
                        key = f"loss/train/{k}"
                        total.setdefault(key, torch.zeros_like(total["loss/train/total"]))
                        total[key] += v.detach().float().mean() * (size / sum(sizes))
        state.batch = device_batch
        run_event(self, Event.AFTER_TRAIN_BATCH)
        mark_first_batch_complete(self)
        return total
