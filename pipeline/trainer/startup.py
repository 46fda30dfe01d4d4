"""What a training process does before and around the ``build_*`` functions: start distributed, resolve
the run inputs (one download per node), prepare the node and its save_folder, apply the run-time
switches to the built model (torchtitan style: applied *to* a plain model, never baked into it).

Order in ``pipeline.trainer.build.build_trainer``: ``start_distributed`` -> ``inputs_local_rank_zero_first``
-> ``log_data_plan`` -> ``prepare_node`` -> the crash-safe save patches (``safe_saves``) -> ``build_model`` -> ``prepare_model``
-> the other ``build_*`` -> the Trainer.
"""

from __future__ import annotations

import logging
import os

import torch

from pipeline.model import BD3LM, apply_compile
from pipeline.save_folder import prepare_save_folder
from pipeline.trainer.config import ConfigError, TrainConfig
from pipeline.trainer.config.checks import check_precision_for_device
from pipeline.trainer.run_inputs import RunInputs, resolve_run_inputs

log = logging.getLogger(__name__)


def start_distributed(cfg: TrainConfig):
    """Composer's device of ``cfg.device`` with torch.distributed initialized on it (a world of 1 too)."""
    from composer.utils import dist, get_device

    device = get_device(cfg.device)
    check_precision_for_device(cfg, device.name)
    local_procs = dist.get_local_world_size()
    if device.name == "cpu" and local_procs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # As torchrun does: N processes x all cores each oversubscribes the CPU (10-100x slower).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))
    dist.initialize_dist(device, timeout=cfg.dist_timeout)
    return device


def inputs_local_rank_zero_first(cfg: TrainConfig) -> RunInputs:
    """``resolve_run_inputs`` with downloads: local rank 0 of each node first, the others from its cache.

    Every rank ends up with the same checks (a config error is raised on all of them, no rank waits
    for a failed one); only one process per node talks to the hub.
    """
    from composer.utils import dist

    inputs, err = None, None
    if dist.get_local_rank() == 0:
        try:
            inputs = resolve_run_inputs(cfg, download=True)
        except ConfigError as e:
            err = e
    dist.barrier()
    if err is not None:
        raise err
    return inputs or resolve_run_inputs(cfg, download=True)


def log_data_plan(cfg: TrainConfig, inputs: RunInputs) -> None:
    """Global rank 0 prints the data plan (``pipeline.data_plan``: per stream rows, tokens, share of each
    global batch, epochs read by max_duration) to stderr before training."""
    import sys

    from composer.utils import dist

    from pipeline.data_plan import data_plan

    if dist.get_global_rank() == 0 and inputs.streams:
        print(data_plan(cfg, inputs.streams).table(), file=sys.stderr, flush=True)


def prepare_node(cfg: TrainConfig, inputs: RunInputs) -> None:
    """Before any dataset or Trainer exists: stale shared memory, save_folder checks and repair.

    Local rank 0 of each node removes Streaming's stale shared memory; every process does its part of
    ``prepare_save_folder``. Errors reach every rank (an all-gather), so none waits for a rank that failed.
    """
    from composer.utils import dist

    from pipeline.trainer.data import clean_stale_streaming_memory

    if dist.get_local_rank() == 0:
        clean_stale_streaming_memory()
    problem = prepare_save_folder(
        cfg.save_folder,
        inputs.model_config,
        deepspeed=cfg.uses_deepspeed,
        autoresume=cfg.autoresume,
        local_rank=dist.get_local_rank(),
        global_rank=dist.get_global_rank(),
        node_rank=dist.get_node_rank(),
    )
    problems = [p for p in dist.all_gather_object(problem) if p]
    if problems:
        raise ConfigError("save_folder", problems[0])


def prepare_model(cfg: TrainConfig, model: BD3LM, device_name: str) -> None:
    """The run-time switches of ``model`` (in place): ``model.compile`` (CUDA only) and, under FSDP,
    one FSDP unit per decoder layer."""
    if cfg.model.compile:
        if device_name == "gpu":
            apply_compile(model)
        else:
            log.warning("model.compile: ignored on CPU (torch.compile of FlexAttention needs CUDA)")
    if cfg.parallelism is not None and cfg.parallelism.fsdp is not None:
        from pipeline.model.transformer import DecoderLayer

        # Composer reads fsdp_wrap_fn: prefetch and free layer by layer, the rest in the root unit.
        model.fsdp_wrap_fn = lambda module: isinstance(module, DecoderLayer)
