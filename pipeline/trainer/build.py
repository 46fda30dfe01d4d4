"""Build a Composer ``Trainer`` from a checked ``TrainConfig`` and run it.

``run(cfg)`` = ``build_trainer`` -> (eval first) -> fit. ``build_trainer`` = start-up
(``pipeline.trainer.startup``: distributed, run inputs, node and save_folder, the model's run-time
switches) -> the ``build_*`` functions -> ``Trainer``. Each ``build_*`` function maps YAML sections to
Composer objects (or the model) and changes nothing else.

Checkpoints are Composer's (``save_folder``, ``save_interval``, ``autoresume``): they hold the model,
optimizer, scheduler, timestamp, RNG and the streaming dataset position, and are pickles loaded
with ``torch.load(weights_only=False)``. Only resume from checkpoints your own runs wrote; share
weights as the safetensors folder of ``callbacks.hf_export`` (or ``pipeline.model.save_pretrained``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from pipeline.model import BD3LM, from_pretrained
from pipeline.save_folder import (
    LATEST_ANY_RANK,
    is_remote,
    remove_autoresume_copy,
    tensorboard_dir,
    write_run_metadata,
)
from pipeline.trainer.config import TrainConfig, diffusion_config
from pipeline.trainer.elastic import completion_line, run_is_complete
from pipeline.trainer.run_inputs import RunInputs
from pipeline.trainer.startup import (
    inputs_local_rank_zero_first,
    log_data_plan,
    prepare_model,
    prepare_node,
    start_distributed,
)

log = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, inputs: RunInputs) -> BD3LM:
    """The BD3LM of ``inputs.model_config``: the weights of ``model.init_from``, or a random
    initialization seeded with ``seed`` (the same on every rank)."""
    m = cfg.model
    run = dict(attn_backend=m.attn_backend, activation_checkpointing=m.activation_checkpointing)
    if inputs.init_dir is not None:
        return from_pretrained(inputs.init_dir, config=inputs.model_config, **run)
    model = BD3LM(inputs.model_config, **run)
    model.init_weights(generator=torch.Generator().manual_seed(cfg.seed))
    return model


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    from composer.optim import DecoupledAdamW

    o = cfg.optimizer
    return DecoupledAdamW(
        model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
    )


def build_scheduler(cfg: TrainConfig):
    from composer.optim import (
        ConstantScheduler,
        ConstantWithWarmupScheduler,
        CosineAnnealingWithWarmupScheduler,
        LinearWithWarmupScheduler,
    )

    s = cfg.scheduler
    if s.name == "cosine_with_warmup":
        return CosineAnnealingWithWarmupScheduler(t_warmup=s.t_warmup, t_max=s.t_max, alpha_f=s.alpha_f)
    if s.name == "linear_with_warmup":
        return LinearWithWarmupScheduler(t_warmup=s.t_warmup, t_max=s.t_max, alpha_f=s.alpha_f)
    if s.name == "constant_with_warmup":
        return ConstantWithWarmupScheduler(t_warmup=s.t_warmup, t_max=s.t_max)
    return ConstantScheduler(t_max=s.t_max)


def build_callbacks(
    cfg: TrainConfig, inputs: RunInputs, device_name: str = "cpu", world_size: int = 1
) -> list:
    from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator, SpeedMonitor

    from pipeline.trainer.callbacks import (
        BlockSizeLikelihood,
        DownstreamEval,
        GlooFSDPGradMean,
        GradientClipping,
        HFExport,
        LossLog,
        NonFiniteLoss,
        SampleIndexer,
        TensorboardUpload,
        eval_callbacks,
    )

    c = cfg.callbacks
    out = [SampleIndexer(), NonFiniteLoss(cfg.nonfinite_loss, cfg.save_folder)]  # guard before clipping
    fsdp = cfg.parallelism is not None and cfg.parallelism.fsdp is not None
    if fsdp and device_name == "cpu" and world_size > 1:
        out.append(GlooFSDPGradMean())
    if cfg.algorithms.gradient_clipping is not None and not cfg.uses_deepspeed:  # DeepSpeed clips itself
        out.append(GradientClipping(cfg.algorithms.gradient_clipping.clipping_threshold))
    if c.speed_monitor is not None:
        out.append(
            SpeedMonitor(
                window_size=c.speed_monitor.window_size,
                gpu_flops_available=c.speed_monitor.gpu_flops_available,
            )
        )
    if c.lr_monitor is not None:
        out.append(LRMonitor())
    if c.memory_monitor is not None and torch.cuda.is_available():
        out.append(MemoryMonitor())
    if c.runtime_estimator is not None:
        out.append(RuntimeEstimator(skip_batches=c.runtime_estimator.skip_batches))
    if c.loss_log is not None:
        out.append(LossLog(c.loss_log.path, sample_ids=c.loss_log.sample_ids))
    if cfg.loggers.tensorboard is not None and cfg.save_folder is not None and is_remote(cfg.save_folder):
        out.append(TensorboardUpload(tensorboard_dir(cfg), cfg.save_folder))
    evaluation = eval_callbacks(cfg, inputs.tokenizer_file)
    if c.hf_export is not None:
        from pipeline.hf_artifact import CardFacts

        facts = CardFacts(
            base_model=cfg.model.init_from,
            manifest=inputs.manifest,
            run_config=json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        )
        likelihood = next((cb for cb in evaluation if isinstance(cb, BlockSizeLikelihood)), None)
        latest = likelihood.latest_table if likelihood is not None else None
        downstream = next((cb for cb in evaluation if isinstance(cb, DownstreamEval)), None)
        out.append(
            HFExport(
                c.hf_export.folder,
                inputs.tokenizer_file,
                facts,
                latest_eval=latest,
                latest_downstream=downstream.latest_table if downstream is not None else None,
            )
        )
    return out + evaluation


def build_algorithms(cfg: TrainConfig) -> list:
    """Composer algorithms: EMA. (Gradient clipping is a callback, see ``GradientClipping``.)"""
    from composer.algorithms import EMA

    return [EMA(half_life=cfg.callbacks.ema.half_life)] if cfg.callbacks.ema is not None else []


def build_loggers(cfg: TrainConfig) -> list:
    """TensorBoard by default (offline); Weights & Biases and MLflow when their sections are set."""
    from composer.loggers import TensorboardLogger

    out = []
    tb = cfg.loggers.tensorboard
    if tb is not None:
        out.append(
            TensorboardLogger(
                log_dir=tensorboard_dir(cfg), flush_interval=tb.flush_interval, rank_zero_only=True
            )
        )
    for key in ("wandb", "mlflow"):  # packages checked with the config (check_consistency)
        section = getattr(cfg.loggers, key)
        if section is None:
            continue
        if key == "wandb":
            from composer.loggers import WandBLogger

            out.append(
                WandBLogger(
                    project=section.project,
                    entity=section.entity,
                    name=section.name or cfg.run_name,
                    tags=section.tags,
                    rank_zero_only=True,
                )
            )
        else:
            from composer.loggers import MLFlowLogger

            out.append(
                MLFlowLogger(
                    experiment_name=section.experiment_name,
                    run_name=section.run_name or cfg.run_name,
                    tracking_uri=section.tracking_uri,
                    rank_zero_only=True,
                )
            )
    return out


def build_parallelism(cfg: TrainConfig) -> dict | None:
    """null -> None (Composer wraps the model in DDP when world size > 1); fsdp -> Composer FSDP2 (its
    units: ``startup.prepare_model``)."""
    if cfg.parallelism is None or cfg.parallelism.fsdp is None:
        return None
    from composer.utils.parallelism import FSDP2Config

    f = cfg.parallelism.fsdp
    fsdp2 = FSDP2Config(
        reshard_after_forward=f.sharding_strategy == "FULL_SHARD",
        mixed_precision=f.mixed_precision,
        state_dict_type=f.state_dict_type,
        activation_cpu_offload=f.activation_cpu_offload,
        verbose=f.verbose,
    )
    return {"fsdp": fsdp2}


def build_dataloaders(cfg: TrainConfig, world: int):
    """(train dataloader, eval ``Evaluator`` or None) of ``train_loader`` / ``eval_loader``."""
    from composer.core import Evaluator

    from pipeline.trainer.composer_model import EVAL_METRICS
    from pipeline.trainer.data import build_dataloader

    train = build_dataloader(
        cfg.train_loader, seq_len=cfg.max_seq_len, batch_size=cfg.global_train_batch_size // world
    )
    if cfg.eval_loader is None:
        return train, None
    eval_batch = cfg.device_eval_batch_size or cfg.device_train_microbatch_size
    evaluator = Evaluator(
        label="eval",
        dataloader=build_dataloader(cfg.eval_loader, seq_len=cfg.max_seq_len, batch_size=eval_batch),
        metric_names=list(EVAL_METRICS),
    )
    return train, evaluator


def build_trainer(cfg: TrainConfig, inputs: RunInputs | None = None):
    """A ready ``composer.Trainer`` (distributed initialized, model built, nothing trained)."""
    from composer.utils import dist

    from pipeline.trainer.composer_model import BD3ComposerModel
    from pipeline.trainer.safe_saves import (
        atomic_checkpoint_files,
        node_unique_signal_files,
        safe_trainer_class,
    )

    device = start_distributed(cfg)
    inputs = inputs or inputs_local_rank_zero_first(cfg)
    log_data_plan(cfg, inputs)
    prepare_node(cfg, inputs)
    atomic_checkpoint_files()
    node_unique_signal_files()
    model = build_model(cfg, inputs)
    prepare_model(cfg, model, device.name)
    composer_model = BD3ComposerModel(model, diffusion_config(cfg))
    world = dist.get_world_size()
    train, evaluators = build_dataloaders(cfg, world)
    write_run_metadata(cfg, model, inputs)
    optimizer = build_optimizer(cfg, composer_model)
    trainer_cls, extra = safe_trainer_class(), {"parallelism_config": build_parallelism(cfg)}
    if cfg.uses_deepspeed:
        from pipeline.trainer.config import deepspeed_config
        from pipeline.trainer.deepspeed_trainer import DeepSpeedTrainer

        # The engine holds bf16/fp16 weights itself; DeepSpeedTrainer runs its forward without autocast.
        trainer_cls, extra = DeepSpeedTrainer, {"ds_config": deepspeed_config(cfg, world)}
    return trainer_cls(
        model=composer_model,
        train_dataloader=train,
        eval_dataloader=evaluators,
        eval_interval=cfg.eval_interval if evaluators else 1,
        eval_subset_num_batches=cfg.eval_subset_num_batches if evaluators else -1,
        max_duration=cfg.max_duration,
        optimizers=optimizer,
        schedulers=build_scheduler(cfg),
        step_schedulers_every_batch=True,
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        precision=cfg.precision,
        device=device,
        callbacks=build_callbacks(cfg, inputs, device.name, world),
        loggers=build_loggers(cfg),
        algorithms=build_algorithms(cfg),
        progress_bar=cfg.loggers.progress_bar is not None,
        log_to_console=cfg.loggers.console is not None,
        console_log_interval=cfg.loggers.console.log_interval if cfg.loggers.console else "1ba",
        run_name=cfg.run_name,
        save_folder=cfg.save_folder,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        autoresume=cfg.autoresume,
        **extra,
        seed=cfg.seed,
        dist_timeout=cfg.dist_timeout,
        python_log_level=cfg.python_log_level,
    )


def run(cfg: TrainConfig):
    """Check, build and train; returns the closed ``Trainer`` (its ``state`` holds model and metrics)."""
    if cfg.save_folder and not is_remote(cfg.save_folder):
        if cfg.autoresume and any(Path(cfg.save_folder).glob(LATEST_ANY_RANK)):
            log.warning(
                "autoresume: loading the latest checkpoint in %s (a pickle: only resume from folders your "
                "own runs wrote)",
                cfg.save_folder,
            )
    from composer.utils import dist

    trainer = build_trainer(cfg)
    if cfg.save_folder and is_remote(cfg.save_folder):
        dist.barrier()  # every rank has loaded the autoresume copy
        if dist.get_local_rank() == 0:
            remove_autoresume_copy(cfg.save_folder)
    if run_is_complete(trainer.state):  # requeued after it finished: nothing to train, not an error
        if dist.get_global_rank() == 0:
            print(completion_line(cfg, trainer.state), flush=True)
        trainer.close()
        return trainer
    try:
        if cfg.eval_first and cfg.eval_loader is not None and trainer.state.timestamp.batch.value == 0:
            trainer.eval()
        trainer.fit()
    finally:
        trainer.close()
    return trainer
