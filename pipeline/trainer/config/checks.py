"""Cross-field checks of a converted ``TrainConfig`` that need no files, and the configs derived from it.

``check_consistency`` runs inside ``load_config``; ``pipeline.trainer.run_inputs`` checks what the
config points to (data, tokenizer, checkpoint). Nothing here imports Composer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from pipeline.diffusion.metrics import EVAL_BLOCK_SIZES, resolve_block_sizes
from pipeline.diffusion.objective import DiffusionConfig
from pipeline.model.masks import check_block_size
from pipeline.trainer.config.errors import ConfigError
from pipeline.trainer.config.schema import REQUIRED_FROM_SCRATCH, TrainConfig, duration_problem


def _check_time(key: str, value: str | int) -> None:
    problem = duration_problem(value)
    if problem is not None:
        raise ConfigError(key, problem)


# Keys that may name object storage or a hub; credentials in them would be logged and checkpointed.
URL_KEYS = ("train_loader.remote", "eval_loader.remote", "save_folder", "model.init_from")


def check_no_credentials(cfg: TrainConfig) -> None:
    """Refuse URLs with embedded credentials (``scheme://user:password@host``) in ``URL_KEYS`` and in
    the streams' ``remote``."""
    import urllib.parse

    places = []
    for key in URL_KEYS:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part, None) if value is not None else None
        places.append((key, value))
    for role in ("train_loader", "eval_loader"):
        for name, stream in (getattr(getattr(cfg, role), "streams", None) or {}).items():
            places.append((f"{role}.streams.{name}.remote", stream.remote))
    for key, value in places:
        if not isinstance(value, str) or "://" not in value:
            continue
        url = urllib.parse.urlsplit(value)
        # oci://bucket@namespace/... is OCI's address form, not a credential.
        if url.password is not None or (url.username is not None and url.scheme != "oci"):
            shown = url._replace(netloc="***@" + url.netloc.rsplit("@", 1)[1]).geturl()
            raise ConfigError(
                key,
                f"{shown} has credentials in the URL; remove them: object-store credentials come from the "
                "environment or the provider's chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                "~/.aws, GOOGLE_APPLICATION_CREDENTIALS, ~/.oci/config, HF_TOKEN), never from the config",
            )


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_consistency(cfg: TrainConfig, world_size: int | None = None, max_seq_len_source=None) -> None:
    """Cross-field checks on the converted config (no file access); each section has checked its own
    values on construction.

    ``max_seq_len_source``: the unresolved YAML value (e.g. "${variables.max_seq_len}") for messages.
    """
    world = world_size or world_size_from_env()
    check_block_sizes(cfg, max_seq_len_source)
    check_batch_sizes(cfg, world)
    check_train_loader(cfg, world)
    check_no_credentials(cfg)
    for key in ("max_duration", "eval_interval", "save_interval"):
        _check_time(key, getattr(cfg, key))
    check_eval_callbacks(cfg)
    check_loggers(cfg)
    if cfg.autoresume and not (cfg.save_folder and cfg.run_name):
        missing = "save_folder" if not cfg.save_folder else "run_name"
        raise ConfigError(missing, "autoresume: true needs save_folder and run_name (the run to resume)")
    if cfg.uses_deepspeed:
        check_deepspeed(cfg, world)
    check_model(cfg)


def check_block_sizes(cfg: TrainConfig, max_seq_len_source=None) -> None:
    """Every ``diffusion.block_size`` divides ``max_seq_len``."""
    if cfg.max_seq_len < 2:
        raise ConfigError("max_seq_len", f"must be at least 2, got {cfg.max_seq_len}")
    for b in cfg.diffusion.block_sizes:
        try:
            check_block_size(cfg.max_seq_len, b)
        except ValueError as e:
            src = f" = {max_seq_len_source}" if isinstance(max_seq_len_source, str) else ""
            raise ConfigError("diffusion.block_size", f"{e} (max_seq_len{src})") from None


def check_batch_sizes(cfg: TrainConfig, world: int) -> None:
    """The global batch splits into ``world`` ranks x whole microbatches."""
    gb, mb = cfg.global_train_batch_size, cfg.device_train_microbatch_size
    if gb < 1 or mb < 1:
        raise ConfigError(
            "global_train_batch_size" if gb < 1 else "device_train_microbatch_size", "must be >= 1"
        )
    if gb % (world * mb):
        ok = [m for m in range(1, gb + 1) if gb % (world * m) == 0]
        other = f" or a microbatch size in {ok[-4:]}" if ok else f" or a world size that divides {gb}"
        raise ConfigError(
            "global_train_batch_size",
            f"{gb} is not divisible by world size {world} x device_train_microbatch_size {mb}; "
            f"choose a multiple of {world * mb}{other}",
        )
    if cfg.device_eval_batch_size is not None and cfg.device_eval_batch_size < 1:
        raise ConfigError("device_eval_batch_size", "must be >= 1")


def check_train_loader(cfg: TrainConfig, world: int) -> None:
    """Full global batches (noise ids), and canonical nodes that fit the node count."""
    if not cfg.train_loader.drop_last:
        raise ConfigError(
            "train_loader.drop_last",
            "must be true: every global batch must be full so that each sample's noise id (its position "
            "in the training stream) is the same on any number of processes",
        )
    nodes = max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    canonical = cfg.train_loader.num_canonical_nodes
    if canonical is not None and (canonical < 1 or (canonical % nodes and nodes % canonical)):
        raise ConfigError(
            "train_loader.num_canonical_nodes",
            f"{canonical} does not fit {nodes} nodes: it must be a multiple or a divisor of the node "
            "count (keep the value the run started with and change the node count, e.g. 8 canonical "
            "nodes run on 1, 2, 4, 8 or 16 nodes)",
        )


def check_loggers(cfg: TrainConfig) -> None:
    """Optional loggers need their package."""
    for key in ("wandb", "mlflow"):
        if getattr(cfg.loggers, key) is not None and importlib.util.find_spec(key) is None:
            raise ConfigError(
                f"loggers.{key}", f"needs the {key} package: pip install {key}, or remove the section"
            )


def check_model(cfg: TrainConfig) -> None:
    """A model from scratch needs its shape; a reused mask token id is an id."""
    m = cfg.model
    if m.init_from is None:
        for key in REQUIRED_FROM_SCRATCH:
            if getattr(m, key) is None:
                raise ConfigError(
                    f"model.{key}", "is required to build a model from scratch (model.init_from is null)"
                )
    if m.mask_token_id is not None and m.mask_token_id < 0:
        raise ConfigError("model.mask_token_id", f"must be >= 0, got {m.mask_token_id}")


def block_size_list(cfg: TrainConfig) -> list[int]:
    """``callbacks.block_size_likelihood.block_sizes`` as integers ("L" is max_seq_len), plus every trained
    block size when the list is the default; ConfigError when one does not divide max_seq_len."""
    key = "callbacks.block_size_likelihood.block_sizes"
    listed = cfg.callbacks.block_size_likelihood.block_sizes
    try:
        sizes = resolve_block_sizes(listed, cfg.max_seq_len)
    except ValueError as e:
        raise ConfigError(key, f"{e} (max_seq_len = {cfg.max_seq_len})") from None
    if list(listed) == list(EVAL_BLOCK_SIZES):  # the default list also evaluates every trained size (e.g. 2)
        sizes = sorted(set(sizes) | set(cfg.diffusion.block_sizes))
    return sizes


def check_eval_callbacks(cfg: TrainConfig) -> None:
    """What the evaluation callbacks need from the rest of the config: eval rows, block sizes that
    divide max_seq_len, trained block sizes to search, a reference model folder."""
    c = cfg.callbacks
    for name in ("block_size_likelihood", "noise_interval_search"):
        if getattr(c, name) is not None and cfg.eval_loader is None:
            raise ConfigError(
                f"callbacks.{name}", "evaluates on the eval rows: set eval_loader (or remove this callback)"
            )
    if c.block_size_likelihood is not None:
        _check_likelihood_block_sizes(cfg)
    nis = c.noise_interval_search
    trained = cfg.diffusion.block_sizes
    if nis is not None and nis.block_sizes is not None:
        if (
            not nis.block_sizes
            or not set(nis.block_sizes) <= set(trained)
            or len(set(nis.block_sizes)) != len(nis.block_sizes)
        ):
            raise ConfigError(
                "callbacks.noise_interval_search.block_sizes",
                f"must list trained block sizes (diffusion.block_size: {trained}) once each, or be null "
                f"for all of them; got {nis.block_sizes}",
            )
    _check_downstream(c.downstream_eval)
    gen = c.generation
    if gen is not None and gen.reference is not None and not Path(gen.reference).expanduser().is_dir():
        raise ConfigError(
            "callbacks.generation.reference",
            f"{gen.reference!r} is not a folder: give a Hugging Face-format folder of an AR model "
            "with the run's tokenizer (config.json, model.safetensors)",
        )


def _check_downstream(section) -> None:
    """lm-eval installed, the task folder present (the task names are checked when lm-eval indexes it)."""
    import importlib.util

    if section is None:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            "callbacks.downstream_eval", "needs lm-evaluation-harness: pip install '.[lmeval]' (or remove it)"
        )
    if section.include_path is not None and not Path(section.include_path).expanduser().is_dir():
        raise ConfigError(
            "callbacks.downstream_eval.include_path",
            f"{section.include_path!r} is not a folder: give the folder of the task YAMLs, or null",
        )


def _check_likelihood_block_sizes(cfg: TrainConfig) -> None:
    sizes = block_size_list(cfg)
    if len(set(sizes)) != len(sizes):
        raise ConfigError(
            "callbacks.block_size_likelihood.block_sizes",
            f"lists a block size twice: {cfg.callbacks.block_size_likelihood.block_sizes} "
            f"(max_seq_len = {cfg.max_seq_len})",
        )


def check_deepspeed(cfg: TrainConfig, world: int) -> None:
    """What DeepSpeed cannot combine with, and the derived DeepSpeed config, checked at load time."""
    from pipeline.trainer.deepspeed_config import DeepSpeedConfigError

    if cfg.parallelism.fsdp is not None:
        raise ConfigError("parallelism", "set either fsdp or deepspeed, not both")
    if cfg.callbacks.ema is not None:
        raise ConfigError(
            "callbacks.ema",
            "EMA is not supported under DeepSpeed (ZeRO partitions the weights it averages); remove it",
        )
    if cfg.nonfinite_loss == "skip":
        raise ConfigError(
            "nonfinite_loss",
            "skip is not supported under DeepSpeed (the engine owns the optimizer step); use stop and "
            "resume from the last checkpoint",
        )
    try:
        deepspeed_config(cfg, world)
    except DeepSpeedConfigError as e:
        raise ConfigError(e.key, str(e).split(": ", 1)[1]) from None


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed config of the run: ``parallelism.deepspeed`` plus the derived keys."""
    from pipeline.trainer.deepspeed_config import build_ds_config

    gc = cfg.algorithms.gradient_clipping
    return build_ds_config(
        cfg.parallelism.deepspeed,
        global_batch=cfg.global_train_batch_size,
        micro_batch=cfg.device_train_microbatch_size,
        world_size=world,
        precision=cfg.precision,
        grad_clip=None if gc is None else gc.clipping_threshold,
    )


def diffusion_config(cfg: TrainConfig) -> DiffusionConfig:
    """The objective's ``DiffusionConfig``: the YAML section, with t stratified over one global batch."""
    return dataclasses.replace(cfg.diffusion, stratify_group=cfg.global_train_batch_size)


def check_precision_for_device(cfg: TrainConfig, device_name: str) -> None:
    """Composer trains on the CPU in fp32 only: a GPU recipe started on a machine without a GPU stops
    here with the override that works, not with Composer's traceback after the model is built.

    ``device_name``: "cpu" or "gpu", the device the run will use (``cfg.device``, else CUDA when there is one).
    Not part of ``check_consistency``: ``pipeline.plan`` checks GPU recipes on machines without one.
    """
    if device_name == "cpu" and cfg.precision != "fp32":
        why = "device: cpu" if cfg.device == "cpu" else "this machine has no CUDA device"
        raise ConfigError(
            "precision",
            f"{cfg.precision} needs a GPU ({why}); Composer trains on the CPU in fp32 only: add "
            "precision=fp32 to the command to try this recipe on the CPU",
        )
