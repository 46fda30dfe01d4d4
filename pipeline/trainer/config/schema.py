"""The training YAML's schema: one dataclass per section; a field without a default is a required key.

Sections that configure the plain-PyTorch layer are that layer's own dataclasses (``diffusion`` is
``pipeline.diffusion.objective.DiffusionConfig``; ``callbacks.generation`` extends
``pipeline.diffusion.sampler.SamplerConfig``) or derived from them (``ModelSection``'s shape keys are
``pipeline.model.ModelConfig``'s fields), so every default has one home. Every section checks its own
values in ``__post_init__``; ``checks`` holds what spans sections. A class may name fields that are
not YAML keys in ``NOT_IN_YAML`` (set at run time by the trainer). The data sections are in ``loaders``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pipeline.diffusion.metrics import EVAL_BLOCK_SIZES, EVAL_SEED, INTERVAL_WIDTHS, SEARCH_CRITERION
from pipeline.diffusion.objective import DiffusionConfig
from pipeline.diffusion.sampler import SamplerConfig
from pipeline.model.config import SHAPE_SIZES, ModelConfig
from pipeline.trainer.config.loaders import EvalLoaderSection, TrainLoaderSection

# ---------------------------------------------------------------------------------------------
# Schema. Every section is a dataclass; a field without a default is a required key. A section checks
# its own values in ``__post_init__`` with a ValueError that starts with the field's name (``from_dict``
# reports it under the dotted YAML key); checks that span sections are in ``checks``.
# ---------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\d+(\.\d+)?(ba|ep|sp|tok|dur)$")


def duration_problem(value: str | int) -> str | None:
    """What is wrong with a duration (None when it is one)."""
    # Durations are typed `str | int` only to catch bare numbers here: Composer reads them as epochs.
    if isinstance(value, str) and _DURATION.match(value):
        return None
    return f"{value!r} is not a duration: write a number with a unit (ba, ep, sp, tok, dur), e.g. '100ba'"


def _check_durations(section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and (problem := duration_problem(value)) is not None:
            raise ValueError(f"{name} {problem}")


def _check_at_least_one(section, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(section, name)}")


# Shape fields of a from-scratch model: ``ModelConfig``'s own fields (types and meaning), each optional
# here. With ``init_from`` they are optional assertions: any that is set must match the checkpoint's
# config.json. Left null from scratch, a field takes ``ModelConfig``'s default.
SHAPE_FIELDS = ("architecture", *SHAPE_SIZES, "rope_theta", "rms_norm_eps", "tie_word_embeddings")
REQUIRED_FROM_SCRATCH = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _model_section():
    """``ModelSection``: ``init_from``, the shape fields of ``ModelConfig`` (optional), its
    ``initializer_range`` (with its default) and how the model runs (``BD3LM``'s keyword arguments)."""
    types = typing.get_type_hints(ModelConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    fields = [
        ("init_from", str | None, None),
        *[(name, types[name] | None, None) for name in SHAPE_FIELDS],
        ("initializer_range", float, defaults["initializer_range"]),
        ("attn_backend", Literal["auto", "sdpa", "flex", "flash"], "auto"),
        ("activation_checkpointing", bool, False),
        ("compile", bool, False),
        ("mask_token_id", int | None, None),
    ]
    return dataclasses.make_dataclass("ModelSection", fields, namespace={"__module__": __name__})


ModelSection = _model_section()
ModelSection.__doc__ = """``init_from``: a Hugging Face folder or hub name (AR or BD3 checkpoint); null trains from
scratch with the shape fields (``SHAPE_FIELDS``, those of ``pipeline.model.ModelConfig``). ``vocab_size``
is the base vocabulary before the mask token (default: the tokenizer's). ``mask_token_id``: reuse an
existing unused id instead of adding a new token. ``compile``: ``torch.compile`` each decoder layer
(``pipeline.model.apply_compile``; CUDA only, ignored with a note on CPU)."""


@dataclass
class TokenizerSection:
    """``path``: tokenizer.json or a folder holding one; null uses the init checkpoint's."""

    path: str | None = None


@dataclass
class OptimizerSection:
    """Composer's ``DecoupledAdamW`` (the only optimizer)."""

    lr: float
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class SchedulerSection:
    """``t_max`` defaults to the whole run ("1dur"); set it in batches to make the schedule independent
    of ``max_duration`` (stopping early and resuming then follows the same learning rates)."""

    name: Literal["cosine_with_warmup", "linear_with_warmup", "constant_with_warmup", "constant"]
    t_warmup: str | int = "0ba"
    t_max: str | int = "1dur"
    alpha_f: float = 0.0

    def __post_init__(self):
        _check_durations(self, "t_warmup", "t_max")


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

    def __post_init__(self):
        _check_durations(self, "half_life")


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
    """NELBO of the current weights at several block sizes (``pipeline.diffusion.metrics.evaluate_block_sizes``)
    on the first ``num_batches`` global eval batches, fixed noise (a row's noise id is its index in the
    eval split), every ``interval`` (default: ``eval_interval``) and at the end of training. Logs
    ``eval/nelbo/bs{N}``, ``eval/ppl_bound/bs{N}``, ``eval/stderr/bs{N}`` and ``eval/train_block_size``.
    ``block_sizes``: divisors of max_seq_len; "L" is max_seq_len (MDLM)."""

    block_sizes: list[int | str] = field(default_factory=lambda: list(EVAL_BLOCK_SIZES))
    interval: str | int | None = None
    num_batches: int = 4
    draws: int = 1
    seed: int = EVAL_SEED

    def __post_init__(self):
        _check_durations(self, "interval")
        _check_at_least_one(self, "num_batches", "draws")
        if not self.block_sizes:
            raise ValueError("block_sizes must list at least one block size")
        for b in self.block_sizes:
            if isinstance(b, str) and b != "L":
                raise ValueError(f'block_sizes {b!r} is not a block size: use integers or "L" (max_seq_len)')


@dataclass
class NoiseIntervalSearchSection:
    """BD3-LM's data-driven clipped schedule (``pipeline.diffusion.metrics.noise_interval_search``): on every
    ``every_n_evals``-th tick of the evaluation schedule (``interval``, default: the
    block_size_likelihood interval, else ``eval_interval``), the interval [beta, beta + width] (widths
    x offsets on a ``step`` grid, plus [1e-3, 1]) whose training NELBO estimator has the lowest variance
    over the first ``num_batches`` global eval batches, for every trained block size (``block_sizes``:
    only these of them; the others keep their intervals). ``criterion``: "block" (BD3-LM: variance of
    the per-block mean loss) or "row" (variance of the per-row NELBO). ``adopt``: train with it from
    then on (kept in the checkpoint, re-applied on resume). Logs ``eval/noise_interval/{beta,omega,variance}``
    (``eval/noise_interval/bs{N}/...`` when several sizes are trained)."""

    every_n_evals: int = 1
    block_sizes: list[int] | None = None
    interval: str | int | None = None
    num_batches: int = 4
    widths: list[float] = field(default_factory=lambda: list(INTERVAL_WIDTHS))
    step: float = 0.05
    criterion: Literal["block", "row"] = SEARCH_CRITERION
    adopt: bool = True

    def __post_init__(self):
        _check_durations(self, "interval")
        _check_at_least_one(self, "every_n_evals", "num_batches")
        if not self.widths or not all(0.0 < w <= 1.0 for w in self.widths):
            raise ValueError(f"widths must be numbers in (0, 1], got {self.widths}")
        if not 0.0 < self.step <= 1.0:
            raise ValueError(f"step must be in (0, 1], got {self.step}")


@dataclass
class GenerationSection(SamplerConfig):
    """Samples with the KV-cache sampler (``pipeline.diffusion.sampler``; its fields and defaults) from
    a BOS (else EOS) prompt, on every ``every_n_evals``-th tick of the evaluation schedule and at the end
    of training: the text goes to the console (stderr), tensorboard and ``log_traces``; logs
    ``eval/gen/unigram_entropy`` (nats, mean over samples) and, with ``reference`` (a Hugging Face
    folder of an AR model), the generative perplexity ``eval/gen/ppl``. The block size, EOS id and
    shift are the run's."""

    NOT_IN_YAML: ClassVar[dict[str, str]] = {
        "block_size": "the smallest training block size (diffusion.block_size)",
        "eos_token_id": "the model's EOS id",
        "shift": "diffusion.shift",
    }

    every_n_evals: int = 1
    interval: str | int | None = None
    num_samples: int = 2
    reference: str | None = None

    def __post_init__(self):
        super().__post_init__()
        _check_durations(self, "interval")
        _check_at_least_one(self, "every_n_evals", "num_samples", "max_new_tokens")


@dataclass
class DownstreamEvalSection:
    """lm-evaluation-harness tasks on the live model (the ``bd3`` model of ``pipeline.lm_eval``, in the
    style of llm-foundry's ``icl_tasks``) at each of ``block_sizes``, every ``interval`` (default: the
    evaluation schedule) and at the end of training. Logs ``eval/downstream/{task}/{metric}/bs{N}``.
    ``include_path``: a folder of task YAMLs (local files: ``dataset_path: json``); ``limit``: documents
    per task (a number, or a fraction below 1); ``mc_samples``: noise draws per request at L' > 1."""

    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    block_sizes: list[int] = field(default_factory=lambda: [1])
    limit: float | None = None
    mc_samples: int = 8
    num_fewshot: int | None = None
    batch_size: int = 16
    seed: int = EVAL_SEED
    interval: str | int | None = None

    def __post_init__(self):
        _check_durations(self, "interval")
        _check_at_least_one(self, "mc_samples", "batch_size")
        if not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
            raise ValueError(f"tasks must list at least one lm-eval task name, got {self.tasks}")
        if not self.block_sizes or not all(isinstance(b, int) and b >= 1 for b in self.block_sizes):
            raise ValueError(f"block_sizes must list positive integers, got {self.block_sizes}")
        if len(set(self.block_sizes)) != len(self.block_sizes):
            raise ValueError(f"block_sizes lists a block size twice: {self.block_sizes}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be > 0 (or null for every document), got {self.limit}")


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
    downstream_eval: DownstreamEvalSection | None = None


@dataclass
class ProgressBarSection:
    pass


@dataclass
class ConsoleSection:
    log_interval: str | int = "1ba"

    def __post_init__(self):
        _check_durations(self, "log_interval")


@dataclass
class TensorboardSection:
    """``log_dir`` defaults to ``{save_folder}/tensorboard`` (``tensorboard/{run_name}`` without a local one)."""

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
    """Global L2-norm clipping of the gradients (DeepSpeed's ``gradient_clipping`` under DeepSpeed)."""

    clipping_threshold: float = 1.0


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
    """null (the whole section) is DDP; ``fsdp`` is Composer FSDP2; ``deepspeed`` is DeepSpeed ZeRO (any
    DeepSpeed config keys; the batch, precision and clipping keys are derived, see ``deepspeed_config``)."""

    fsdp: FSDPSection | None = None
    deepspeed: dict[str, Any] | None = None


@dataclass
class TrainConfig:
    model: ModelSection
    diffusion: DiffusionConfig
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

    @property
    def uses_deepspeed(self) -> bool:
        """``parallelism.deepspeed`` is set: the DeepSpeed engine owns the optimizer step."""
        return self.parallelism is not None and self.parallelism.deepspeed is not None
