"""The training YAML: llm-foundry conventions, a dataclass schema, and checks that run before any model.

``load_config(path, overrides)`` reads the YAML with OmegaConf, merges ``key.sub=value`` overrides,
resolves ``${variables.x}`` interpolations and converts the result into ``TrainConfig``. Unknown or
misspelled keys, missing required keys, wrong types and inconsistent values raise ``ConfigError``
naming the key path and what to change. ``check_resources(cfg)`` then checks the files the config
points to (data manifest, tokenizer, the init checkpoint's config.json) without loading weights.

Nothing here imports Composer: a bad YAML fails in the time it takes to import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.diffusion.noise import MIN_T


class ConfigError(Exception):
    """A training config the pipeline cannot run; the message names the key and what to change."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


# ---------------------------------------------------------------------------------------------
# Schema. Every section is a dataclass; a field without a default is a required key.
# ---------------------------------------------------------------------------------------------

# Shape fields of a from-scratch model. With ``init_from`` they are optional assertions: any that is
# set must match the checkpoint's config.json.
SHAPE_FIELDS = (
    "architecture",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
)
REQUIRED_FROM_SCRATCH = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class ModelSection:
    """``init_from``: a Hugging Face folder or hub name (AR or BD3 checkpoint); null trains from scratch
    with the shape fields. ``vocab_size`` is the base vocabulary before the mask token (default: the
    tokenizer's). ``mask_token_id``: reuse an existing unused id instead of adding a new token."""

    init_from: str | None = None
    architecture: Literal["llama", "qwen2", "mistral"] | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float | None = None
    rms_norm_eps: float | None = None
    tie_word_embeddings: bool | None = None
    initializer_range: float = 0.02
    attn_backend: Literal["auto", "sdpa", "flex", "flash"] = "auto"
    activation_checkpointing: bool = False
    mask_token_id: int | None = None


@dataclass
class DiffusionSection:
    """The BD3 objective (see ``pipeline.diffusion.objective.DiffusionConfig``)."""

    block_size: int
    noise_interval: list[float] = field(default_factory=lambda: [MIN_T, 1.0])
    shift: bool = True
    anneal_steps: int = 0
    aux_ar_weight: float = 0.0
    complementary_mask: bool = False
    per_document: bool = False
    seed: int = 0
    loss_chunk_size: int = 4096


@dataclass
class TokenizerSection:
    """``path``: tokenizer.json or a folder holding one; null uses the init checkpoint's."""

    path: str | None = None


@dataclass
class TrainLoaderSection:
    """MDS data written by data_prep: ``local``/``split`` (or ``remote``/``split`` cached in ``local``)."""

    local: str
    remote: str | None = None
    split: str = "train"
    shuffle: bool = True
    shuffle_seed: int = 9176
    num_workers: int = 0
    prefetch_factor: int | None = None
    persistent_workers: bool = False
    pin_memory: bool = False
    predownload: int | None = None
    num_canonical_nodes: int | None = None
    drop_last: bool = True


@dataclass
class EvalLoaderSection(TrainLoaderSection):
    split: str = "val"
    shuffle: bool = False
    drop_last: bool = False


@dataclass
class OptimizerSection:
    lr: float
    name: Literal["decoupled_adamw"] = "decoupled_adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class SchedulerSection:
    """``t_max`` defaults to the whole run ("1dur"); set it in batches to make the schedule independent
    of ``max_duration`` (stopping early and resuming then follows the same learning rates)."""

    name: Literal["cosine_with_warmup", "linear_with_warmup", "constant_with_warmup", "constant"]
    t_warmup: str | int = "0ba"
    t_max: str | int = "1dur"
    alpha_f: float = 0.0


@dataclass
class SpeedMonitorSection:
    window_size: int = 5
    gpu_flops_available: float | None = None


@dataclass
class LRMonitorSection:
    pass


@dataclass
class MemoryMonitorSection:
    pass


@dataclass
class RuntimeEstimatorSection:
    skip_batches: int = 1


@dataclass
class EMASection:
    half_life: str | int = "1000ba"


@dataclass
class LossLogSection:
    """Rank 0 appends one JSON line per batch: {"batch", "loss/train/total", ...}.

    ``sample_ids``: also log ``rows``, the data rows (index in the split) of the global batch in
    stream order: checks that a resumed run sees every row once (costs one all-gather per batch).
    """

    path: str
    sample_ids: bool = False


@dataclass
class HFExportSection:
    """At the end of training, write a Hugging Face-format folder (safetensors) of the model."""

    folder: str


@dataclass
class BlockSizeLikelihoodSection:
    """NELBO of the current weights at several block sizes (``pipeline.evaluation.evaluate_block_sizes``)
    on the first ``num_batches`` global eval batches, fixed noise (a row's noise id is its index in the
    eval split), every ``interval`` (default: ``eval_interval``) and at the end of training. Logs
    ``eval/nelbo/bs{N}``, ``eval/ppl_bound/bs{N}``, ``eval/stderr/bs{N}`` and ``eval/train_block_size``.
    ``block_sizes``: divisors of max_seq_len; "L" is max_seq_len (MDLM)."""

    block_sizes: list[int | str] = field(default_factory=lambda: [1, 4, 8, 16, "L"])
    interval: str | int | None = None
    num_batches: int = 4
    draws: int = 1
    seed: int = 1234


@dataclass
class NoiseIntervalSearchSection:
    """BD3-LM's data-driven clipped schedule (``pipeline.evaluation.noise_interval_search``): on every
    ``every_n_evals``-th tick of the evaluation schedule (``interval``, default: the
    block_size_likelihood interval, else ``eval_interval``), the interval [beta, beta + width] (widths
    x offsets on a ``step`` grid, plus [1e-3, 1]) whose training NELBO estimator has the lowest variance
    over the first ``num_batches`` global eval batches. ``adopt``: train with it from then on (kept in
    the checkpoint, re-applied on resume). Logs ``eval/noise_interval/{beta,omega,variance}``."""

    every_n_evals: int = 1
    interval: str | int | None = None
    num_batches: int = 4
    widths: list[float] = field(default_factory=lambda: [round(0.5 + 0.05 * i, 2) for i in range(9)])
    step: float = 0.05
    adopt: bool = True


@dataclass
class GenerationSection:
    """Samples at the training block size (KV-cache sampler, ``pipeline.diffusion.sampler``) from a
    BOS (else EOS) prompt, on every ``every_n_evals``-th tick of the evaluation schedule and at the end
    of training: the text goes to the console (stderr), tensorboard and ``log_traces``; logs
    ``eval/gen/unigram_entropy`` (nats, mean over samples) and, with ``reference`` (a Hugging Face
    folder of an AR model), the generative perplexity ``eval/gen/ppl``."""

    every_n_evals: int = 1
    interval: str | int | None = None
    num_samples: int = 2
    max_new_tokens: int = 64
    sampler: Literal["first_hitting", "ddpm_cache", "confidence"] = "confidence"
    threshold: float = 0.9
    top_p: float = 0.9
    seed: int = 0
    stop_at_eos: bool = True
    reference: str | None = None


@dataclass
class CallbacksSection:
    """Set a callback to null to turn it off."""

    speed_monitor: SpeedMonitorSection | None = field(default_factory=SpeedMonitorSection)
    lr_monitor: LRMonitorSection | None = field(default_factory=LRMonitorSection)
    memory_monitor: MemoryMonitorSection | None = field(default_factory=MemoryMonitorSection)
    runtime_estimator: RuntimeEstimatorSection | None = field(default_factory=RuntimeEstimatorSection)
    ema: EMASection | None = None
    loss_log: LossLogSection | None = None
    hf_export: HFExportSection | None = None
    block_size_likelihood: BlockSizeLikelihoodSection | None = None
    noise_interval_search: NoiseIntervalSearchSection | None = None
    generation: GenerationSection | None = None


@dataclass
class ProgressBarSection:
    pass


@dataclass
class ConsoleSection:
    log_interval: str | int = "1ba"


@dataclass
class TensorboardSection:
    """``log_dir`` defaults to ``{save_folder}/tensorboard`` (``tensorboard/{run_name}`` without one)."""

    log_dir: str | None = None
    flush_interval: int = 100


@dataclass
class WandBSection:
    """Weights & Biases (``pip install wandb``; credentials from ``WANDB_API_KEY`` / ``wandb login``)."""

    project: str | None = None
    entity: str | None = None
    name: str | None = None
    tags: list[str] | None = None


@dataclass
class MLFlowSection:
    """MLflow (``pip install mlflow``; the server from ``tracking_uri`` or ``MLFLOW_TRACKING_URI``)."""

    experiment_name: str | None = None
    run_name: str | None = None
    tracking_uri: str | None = None


@dataclass
class LoggersSection:
    progress_bar: ProgressBarSection | None = field(default_factory=ProgressBarSection)
    console: ConsoleSection | None = None
    tensorboard: TensorboardSection | None = field(default_factory=TensorboardSection)
    wandb: WandBSection | None = None
    mlflow: MLFlowSection | None = None


@dataclass
class GradientClippingSection:
    """Global L2-norm clipping (``clipping_type`` accepted for llm-foundry YAMLs; only norm exists)."""

    clipping_threshold: float = 1.0
    clipping_type: Literal["norm"] = "norm"


@dataclass
class AlgorithmsSection:
    gradient_clipping: GradientClippingSection | None = field(default_factory=GradientClippingSection)


@dataclass
class FSDPSection:
    """Composer FSDP2. SHARD_GRAD_OP keeps parameters gathered after forward (ZeRO-2-like)."""

    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP"] = "FULL_SHARD"
    mixed_precision: Literal["DEFAULT", "PURE", "FULL"] = "DEFAULT"
    state_dict_type: Literal["sharded", "full"] = "sharded"
    activation_cpu_offload: bool = False
    verbose: bool = False


@dataclass
class ParallelismSection:
    """null (the whole section) is DDP. ``deepspeed`` is reserved for the DeepSpeed ZeRO integration."""

    fsdp: FSDPSection | None = None
    deepspeed: dict[str, Any] | None = None


@dataclass
class TrainConfig:
    model: ModelSection
    diffusion: DiffusionSection
    train_loader: TrainLoaderSection
    optimizer: OptimizerSection
    scheduler: SchedulerSection
    max_seq_len: int
    global_train_batch_size: int
    device_train_microbatch_size: int
    max_duration: str | int
    autoresume: bool
    variables: dict[str, Any] = field(default_factory=dict)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    eval_loader: EvalLoaderSection | None = None
    device_eval_batch_size: int | None = None
    eval_interval: str | int = "1000ba"
    eval_first: bool = False
    eval_subset_num_batches: int = -1
    precision: Literal["fp32", "amp_bf16"] = "fp32"
    run_name: str | None = None
    save_folder: str | None = None
    save_interval: str | int = "1000ba"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    callbacks: CallbacksSection = field(default_factory=CallbacksSection)
    loggers: LoggersSection = field(default_factory=LoggersSection)
    algorithms: AlgorithmsSection = field(default_factory=AlgorithmsSection)
    parallelism: ParallelismSection | None = None
    seed: int = 17
    dist_timeout: float = 600.0
    device: Literal["cpu", "gpu"] | None = None
    python_log_level: str | None = None
    # NaN/Inf loss on any rank: "stop" (raise before the update, name the checkpoint to resume from)
    # or "skip" (drop the batch's update on every rank and go on).
    nonfinite_loss: Literal["stop", "skip"] = "stop"


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> resolved dict -> TrainConfig.
# ---------------------------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike, overrides: list[str] | None = None, world_size: int | None = None
) -> TrainConfig:
    """Read, merge, resolve, convert and check a training YAML.

    Args:
        path: the YAML file.
        overrides: ``key.sub=value`` strings (OmegaConf dotlist; values parsed as YAML).
        world_size: processes of the run (default: ``$WORLD_SIZE`` as set by the composer launcher, or 1).
    Raises:
        ConfigError: the first problem found, naming its key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file {path} not found")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and OmegaConf errors: report the parser's position
        raise ConfigError("", f"cannot parse {path}: {e}") from None
    for item in overrides or []:
        if "=" not in item or item.startswith("="):
            raise ConfigError("", f"override {item!r} is not of the form key.sub=value")
    try:
        merged = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides or [])))
        data = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        msg = str(e).splitlines()[0]
        if "Missing mandatory value" in msg:
            msg = f"is required ('???' in the YAML): pass {key}=VALUE on the command line"
        else:
            msg = f"{msg} (check the ${{...}} interpolations and the override syntax)"
        raise ConfigError(key, msg) from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must be a mapping of sections, got {type(data).__name__}")
    cfg = from_dict(TrainConfig, data)
    unresolved = OmegaConf.to_container(merged, resolve=False)
    check_consistency(cfg, world_size=world_size, max_seq_len_source=unresolved.get("max_seq_len"))
    return cfg


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list (items: {_type_name(typing.get_args(tp)[0])})"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a section (mapping)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _convert(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, f"must not be null: expected {_type_name(tp)}")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    raise  # a section with a bad key inside: report that key, not the union
                last = e
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}") from last
    if value is None:
        raise ConfigError(key, f"must not be null: expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a section (mapping of keys), got {value!r}")
        return from_dict(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, f"must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    if not ok.get(tp, False):
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return float(value) if tp is float else value


def from_dict(cls, data: dict[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from a plain dict: unknown keys, missing required keys and wrong types
    raise ``ConfigError`` with the dotted key path."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = (
                f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
                if close
                else f"known keys: {names}"
            )
            raise ConfigError(path, f"unknown key; {hint}")
        kwargs[key] = _convert(value, hints[key], path)
    for f in dataclasses.fields(cls):
        if (
            f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            path = f"{prefix}.{f.name}" if prefix else f.name
            raise ConfigError(
                path,
                f"missing required key ({_type_name(hints[f.name])}): add it to the YAML or pass {path}=...",
            )
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Consistency checks that need no files.
# ---------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\d+(\.\d+)?(ba|ep|sp|tok|dur)$")


def _check_time(key: str, value: str | int) -> None:
    # Durations are typed `str | int` only to catch bare numbers here: Composer reads them as epochs.
    if not (isinstance(value, str) and _DURATION.match(value)):
        raise ConfigError(
            key,
            f"{value!r} is not a duration: write a number with a unit (ba, ep, sp, tok, dur), e.g. '100ba'",
        )


# Keys that may name object storage or a hub; credentials in them would be logged and checkpointed.
URL_KEYS = ("train_loader.remote", "eval_loader.remote", "save_folder", "model.init_from")


def check_no_credentials(cfg: TrainConfig) -> None:
    """Refuse URLs with embedded credentials (``scheme://user:password@host``) in ``URL_KEYS``."""
    import urllib.parse

    for key in URL_KEYS:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part, None) if value is not None else None
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
    """Cross-field checks on the converted config (no file access).

    ``max_seq_len_source``: the unresolved YAML value (e.g. "${variables.max_seq_len}") for messages.
    """
    from pipeline.diffusion.masks import check_block_size

    world = world_size or world_size_from_env()
    d = cfg.diffusion
    if cfg.max_seq_len < 2:
        raise ConfigError("max_seq_len", f"must be at least 2, got {cfg.max_seq_len}")
    try:
        check_block_size(cfg.max_seq_len, d.block_size)
    except ValueError as e:
        src = f" = {max_seq_len_source}" if isinstance(max_seq_len_source, str) else ""
        raise ConfigError("diffusion.block_size", f"{e} (max_seq_len{src})") from None
    if len(d.noise_interval) != 2 or not 0.0 <= d.noise_interval[0] < d.noise_interval[1] <= 1.0:
        raise ConfigError(
            "diffusion.noise_interval",
            f"must be [beta, omega] with 0 <= beta < omega <= 1, got {d.noise_interval} "
            "(BD3-LM uses [0.3, 0.8] for block size 16, [0.45, 0.95] for 4)",
        )
    for key in ("anneal_steps", "loss_chunk_size"):
        if getattr(d, key) < (1 if key == "loss_chunk_size" else 0):
            raise ConfigError(f"diffusion.{key}", f"must be positive, got {getattr(d, key)}")
    if d.aux_ar_weight < 0:
        raise ConfigError("diffusion.aux_ar_weight", f"must be >= 0, got {d.aux_ar_weight}")

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

    check_no_credentials(cfg)
    _check_time("max_duration", cfg.max_duration)
    _check_time("eval_interval", cfg.eval_interval)
    _check_time("save_interval", cfg.save_interval)
    _check_time("scheduler.t_warmup", cfg.scheduler.t_warmup)
    _check_time("scheduler.t_max", cfg.scheduler.t_max)
    if cfg.callbacks.ema is not None:
        _check_time("callbacks.ema.half_life", cfg.callbacks.ema.half_life)
    if cfg.loggers.console is not None:
        _check_time("loggers.console.log_interval", cfg.loggers.console.log_interval)
    check_eval_callbacks(cfg)
    if len(cfg.optimizer.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optimizer.betas):
        raise ConfigError("optimizer.betas", f"must be two numbers in [0, 1), got {cfg.optimizer.betas}")
    if cfg.optimizer.lr <= 0:
        raise ConfigError("optimizer.lr", f"must be > 0, got {cfg.optimizer.lr}")

    for key in ("wandb", "mlflow"):
        if getattr(cfg.loggers, key) is not None and importlib.util.find_spec(key) is None:
            raise ConfigError(
                f"loggers.{key}", f"needs the {key} package: pip install {key}, or remove the section"
            )
    if cfg.autoresume and not (cfg.save_folder and cfg.run_name):
        missing = "save_folder" if not cfg.save_folder else "run_name"
        raise ConfigError(missing, "autoresume: true needs save_folder and run_name (the run to resume)")
    if cfg.parallelism is not None and cfg.parallelism.deepspeed is not None:
        check_deepspeed(cfg, world)
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
    """``callbacks.block_size_likelihood.block_sizes`` as integers ("L" is max_seq_len)."""
    return [cfg.max_seq_len if b == "L" else b for b in cfg.callbacks.block_size_likelihood.block_sizes]


def check_eval_callbacks(cfg: TrainConfig) -> None:
    """The evaluation callbacks (block_size_likelihood, noise_interval_search, generation)."""
    from pipeline.diffusion.masks import check_block_size

    c = cfg.callbacks
    on = {
        name: getattr(c, name)
        for name in ("block_size_likelihood", "noise_interval_search", "generation")
        if getattr(c, name) is not None
    }
    for name, sec in on.items():
        if sec.interval is not None:
            _check_time(f"callbacks.{name}.interval", sec.interval)
        for key in ("num_batches", "draws", "every_n_evals", "num_samples", "max_new_tokens"):
            if getattr(sec, key, 1) < 1:
                raise ConfigError(f"callbacks.{name}.{key}", f"must be >= 1, got {getattr(sec, key)}")
        if name != "generation" and cfg.eval_loader is None:
            raise ConfigError(
                f"callbacks.{name}", "evaluates on the eval rows: set eval_loader (or remove this callback)"
            )
    bsl = c.block_size_likelihood
    if bsl is not None:
        key = "callbacks.block_size_likelihood.block_sizes"
        if not bsl.block_sizes:
            raise ConfigError(key, "must list at least one block size")
        for b in bsl.block_sizes:
            if isinstance(b, str) and b != "L":
                raise ConfigError(key, f'{b!r} is not a block size: use integers or "L" (max_seq_len)')
        sizes = block_size_list(cfg)
        for b in sizes:
            try:
                check_block_size(cfg.max_seq_len, b)
            except ValueError as e:
                raise ConfigError(key, f"{e} (max_seq_len = {cfg.max_seq_len})") from None
        if len(set(sizes)) != len(sizes):
            raise ConfigError(
                key, f"lists a block size twice: {bsl.block_sizes} (max_seq_len = {cfg.max_seq_len})"
            )
    nis = c.noise_interval_search
    if nis is not None:
        if not nis.widths or not all(0.0 < w <= 1.0 for w in nis.widths):
            raise ConfigError(
                "callbacks.noise_interval_search.widths", f"must be numbers in (0, 1], got {nis.widths}"
            )
        if not 0.0 < nis.step <= 1.0:
            raise ConfigError("callbacks.noise_interval_search.step", f"must be in (0, 1], got {nis.step}")
    gen = c.generation
    if gen is not None:
        if not 0.0 < gen.top_p <= 1.0:
            raise ConfigError("callbacks.generation.top_p", f"must be in (0, 1], got {gen.top_p}")
        if not 0.0 <= gen.threshold <= 1.0:
            raise ConfigError("callbacks.generation.threshold", f"must be in [0, 1], got {gen.threshold}")


def check_deepspeed(cfg: TrainConfig, world: int) -> None:
    """What DeepSpeed cannot combine with, and the derived DeepSpeed config, checked at load time."""
    from pipeline.save_folder import is_remote
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
    if cfg.save_folder and is_remote(cfg.save_folder):
        raise ConfigError(
            "save_folder",
            "DeepSpeed checkpoints are written per rank to a shared local/network filesystem; use a "
            "local or mounted path (remote object storage is supported without DeepSpeed)",
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


def diffusion_config(cfg: TrainConfig):
    """The objective's ``DiffusionConfig``; t is stratified over one global batch."""
    from pipeline.diffusion.objective import DiffusionConfig

    d = cfg.diffusion
    return DiffusionConfig(
        block_size=d.block_size,
        noise_interval=(d.noise_interval[0], d.noise_interval[1]),
        shift=d.shift,
        anneal_steps=d.anneal_steps,
        aux_ar_weight=d.aux_ar_weight,
        complementary_mask=d.complementary_mask,
        per_document=d.per_document,
        seed=d.seed,
        stratify_group=cfg.global_train_batch_size,
        loss_chunk_size=d.loss_chunk_size,
    )
