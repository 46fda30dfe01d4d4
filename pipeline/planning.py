"""Will a training config fit, and what will it cost? (``python -m pipeline.plan``)

``plan_run(cfg, gpus=N, gpu_memory_gib=M)`` resolves the model the run would build (config.json of
``model.init_from`` or the shape keys; no weights, no data loader), then per GPU:

- model states: ``pipeline.model.memory.model_state_bytes`` for the configured parallelism;
- activations of one microbatch forward + backward: measured by tracing the real ``BD3LM`` and the
  objective on fake tensors (``pipeline.diffusion.footprint``) at the run's shapes, dtype, activation
  checkpointing and loss chunk; traced again at a second microbatch size to find the largest that fits
  (activations grow linearly with the microbatch; the candidate is traced to confirm);
- peak = model states + activations; fits when the peak is at most the GPU memory.

The data: per training stream, rows, tokens, share of each global batch and the epochs of it that
``max_duration`` reads (``pipeline.data_plan``). FLOPs per optimizer step in two conventions (allowed query-key pairs, as the speed monitor reports,
and ``FlopCounterMode`` on the fake step with dense attention) and the time at a given MFU.
Not counted: the CUDA context and allocator fragmentation (typically 0.5-2 GiB), communication
buckets of DeepSpeed/NCCL, and data-loader memory on the host.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.data_plan import DataPlan, data_plan
from pipeline.diffusion.footprint import trace_train_step, train_flops_per_sample
from pipeline.model import BD3LM, ModelConfig
from pipeline.model.memory import ModelStateBytes, model_state_bytes, param_counts
from pipeline.trainer.config import ConfigError, TrainConfig, diffusion_config

GIB = 2**30
H100_BF16_TFLOPS = 989.0  # H100 SXM dense bf16 peak


@dataclass
class Plan:
    """Per-GPU memory (bytes), FLOPs per optimizer step and time of one training config."""

    params: int
    gpus: int
    scheme: str
    microbatch: int
    states: ModelStateBytes
    activations_bytes: int
    gpu_memory_bytes: int
    max_microbatch: int
    flops_allowed_pairs: float
    flops_counter: float
    seconds_per_step: float
    tokens_per_s: float
    total_hours: float | None
    mfu: float
    peak_tflops: float
    notes: list[str] = field(default_factory=list)
    data: DataPlan | None = None  # the training streams (None when the data checks were skipped)

    @property
    def peak_bytes(self) -> int:
        return self.states.total + self.activations_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_memory_bytes

    def to_json(self) -> dict:
        return {
            "params": self.params,
            "gpus": self.gpus,
            "per_gpu": {
                "weights_bytes": self.states.weights,
                "grads_bytes": self.states.grads,
                "optimizer_bytes": self.states.optimizer,
                "activations_bytes": self.activations_bytes,
                "peak_bytes": self.peak_bytes,
            },
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "fits": self.fits,
            "max_microbatch": self.max_microbatch,
            "flops_per_step": {"allowed_pairs": self.flops_allowed_pairs, "flop_counter": self.flops_counter},
            "seconds_per_step": self.seconds_per_step,
            "tokens_per_s": self.tokens_per_s,
            "total_hours": self.total_hours,
            "data": self.data.to_json() if self.data is not None else None,
        }

    def table(self) -> str:
        g = lambda n: f"{n / GIB:8.2f} GiB"  # noqa: E731
        s = self.states
        lines = [
            f"parameters              {self.params:,}",
            f"parallelism             {self.scheme} over {self.gpus} GPU(s), microbatch {self.microbatch}",
            "per GPU:",
            f"  weights               {g(s.weights)}",
            f"  gradients             {g(s.grads)}",
            f"  optimizer state       {g(s.optimizer)}",
            f"  activations           {g(self.activations_bytes)}  (one microbatch fwd+bwd, fake-tensor trace)",
            f"  peak                  {g(self.peak_bytes)}",
            f"  GPU memory            {g(self.gpu_memory_bytes)}",
            f"  headroom              {g(self.gpu_memory_bytes - self.peak_bytes)}",
            f"  largest microbatch    {self.max_microbatch}  (device_train_microbatch_size that fits)",
        ]
        if s.cpu_bytes:
            lines.append(f"  offloaded to CPU      {g(s.cpu_bytes)}")
        lines += [
            "FLOPs per optimizer step:",
            f"  {self.flops_allowed_pairs:.3e}  allowed query-key pairs (the speed monitor's MFU convention)",
            f"  {self.flops_counter:.3e}  FlopCounterMode, dense attention (every pair; includes the "
            "chunked loss's recomputed head)",
            f"time at MFU {self.mfu:.2f} of {self.peak_tflops:g} TFLOP/s per GPU (allowed pairs):",
            f"  {self.seconds_per_step:.3f} s/step, {self.tokens_per_s:,.0f} tokens/s"
            + (f", max_duration {self.total_hours:.2f} h" if self.total_hours is not None else ""),
        ]
        if self.data is not None:
            lines.append(self.data.table())
        lines += [f"note: {n}" for n in self.notes]
        lines.append(
            "fits"
            if self.fits
            else f"DOES NOT FIT: peak {self.peak_bytes / GIB:.2f} GiB > {self.gpu_memory_bytes / GIB:.2f} GiB"
        )
        return "\n".join(lines)


def parallelism_scheme(cfg: TrainConfig) -> tuple[str, dict]:
    """(scheme of ``pipeline.model.memory``, keyword arguments of ``model_state_bytes``)."""
    par = cfg.parallelism
    if par is None or (par.fsdp is None and par.deepspeed is None):
        return "ddp", {}
    if par.fsdp is not None:
        return "fsdp_" + par.fsdp.sharding_strategy.lower(), {}
    zero = (par.deepspeed or {}).get("zero_optimization", {"stage": 2})
    stage = zero.get("stage", 0)
    offload = {
        key: (zero.get(key) or {}).get("device", "none") if isinstance(zero.get(key), dict) else zero.get(key)
        for key in ("offload_optimizer", "offload_param")
    }
    kw = dict(
        half_precision=cfg.precision != "fp32",
        offload_optimizer=offload["offload_optimizer"] in ("cpu", "nvme"),
        offload_param=offload["offload_param"] in ("cpu", "nvme"),
    )
    return ("ddp" if stage == 0 else f"zero{stage}"), kw


def resolve_model_config(cfg: TrainConfig, online: bool = True) -> tuple[ModelConfig, dict | None, list[str]]:
    """(the run's ModelConfig, {stream name: data manifest} or None, notes) without loading weights.

    With the local folder of every training stream present (``train_loader.local``, or each of
    ``train_loader.streams``), every check of ``pipeline.train`` runs (manifests, shards, tokenizer);
    otherwise data checks are skipped (one note) and the shape comes from config.json or the shape
    keys alone.
    """
    from pipeline.trainer.run_inputs import model_config_from, resolve_run_inputs

    notes = []
    init_dir = _config_folder(cfg.model.init_from, online)
    if init_dir is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(init_dir)))
    missing = [
        s
        for s in cfg.train_loader.resolved_streams("train_loader")
        if not Path(s.local).expanduser().exists()
    ]
    if not missing:
        inputs = resolve_run_inputs(cfg)
        return inputs.model_config, inputs.streams, notes
    notes.append(f"data checks skipped: {missing[0].key}.local {missing[0].local} does not exist")
    tok_vocab = None
    if cfg.tokenizer.path and Path(cfg.tokenizer.path).expanduser().exists():
        from pipeline.trainer.run_inputs import resolve_tokenizer

        tok_vocab = resolve_tokenizer(cfg, init_dir)[1].get_vocab_size(with_added_tokens=True)
    if init_dir is None and cfg.model.vocab_size is None and tok_vocab is None:
        raise ConfigError(
            "model.vocab_size",
            "is needed to plan a model built from scratch without data: set it, or tokenizer.path",
        )
    return model_config_from(cfg, init_dir, tok_vocab, {}), None, notes


def _config_folder(init_from: str | None, online: bool) -> Path | None:
    """A folder holding the checkpoint's config.json: local, or only that file from the hub."""
    if init_from is None:
        return None
    p = Path(init_from).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError("model.init_from", f"{p} has no config.json")
        return p
    if online and init_from.count("/") == 1 and not init_from.startswith((".", "/", "~")):
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(init_from, "config.json")).parent
        except Exception as e:  # offline, unknown repo, gated: say so in one line
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                "model.init_from",
                f"{init_from!r} is not a local folder and its config.json could not be fetched ({reason}); "
                "give a folder holding the checkpoint's config.json (weights are not needed to plan)",
            ) from None
    raise ConfigError(
        "model.init_from",
        f"{init_from!r} is not a folder with config.json: give a local folder (config.json is enough "
        "to plan) or a hub name such as 'TinyLlama/TinyLlama_v1.1' (fetched when online)",
    )


def _steps(cfg: TrainConfig, data: DataPlan | None) -> float | None:
    m = re.match(r"^(\d+(?:\.\d+)?)(ba|sp|tok|ep|dur)$", str(cfg.max_duration))
    if not m:
        return None
    n, unit = float(m[1]), m[2]
    gb, L = cfg.global_train_batch_size, cfg.max_seq_len
    if unit == "ba":
        return n
    if unit == "sp":
        return n / gb
    if unit == "tok":
        return n / (gb * L)
    if unit == "ep" and data is not None:
        return n * (data.epoch_rows // gb) if data.epoch_rows else None
    return None


def _trace_settings(cfg: TrainConfig, device: str, notes: list[str]) -> dict:
    """``trace_train_step``'s keyword arguments for the run on ``device`` (notes what is planned otherwise)."""
    bf16 = cfg.precision == "amp_bf16" and device == "cuda"
    deepspeed = cfg.uses_deepspeed
    if cfg.precision == "amp_bf16" and device != "cuda":
        notes.append("precision amp_bf16 is planned as fp32 on CPU")
    if cfg.model.compile and device != "cuda":
        notes.append("model.compile is ignored on CPU")
    return dict(
        seq_len=cfg.max_seq_len,
        activation_checkpointing=cfg.model.activation_checkpointing,
        param_dtype=torch.bfloat16 if bf16 and deepspeed else torch.float32,
        autocast_dtype=torch.bfloat16 if bf16 and not deepspeed else None,
        attention="fused" if device == "cuda" else "sdpa",
    )


def _largest_microbatch(
    config: ModelConfig,
    diffusion,
    trace: dict,
    mb_bytes: int,
    mb: int,
    per_gpu_rows: int,
    states_bytes: int,
    budget: int,
) -> int:
    """The largest microbatch dividing ``per_gpu_rows`` whose activations fit beside the model states
    (``states_bytes``) in ``budget`` bytes; 0 when none does.

    Activations grow linearly with the microbatch: a second trace (at 1, or 2 when ``mb`` is 1) gives
    the slope from ``mb_bytes``; the extrapolated candidate is traced to confirm.
    """
    other_mb = 1 if mb > 1 else 2
    other = trace_train_step(config, diffusion, batch=other_mb, **trace).activations_bytes
    per_row = max(1.0, (mb_bytes - other) / (mb - other_mb))
    fixed = mb_bytes - per_row * mb
    fitting = [m for m in range(1, per_gpu_rows + 1) if per_gpu_rows % m == 0]
    fitting = [m for m in fitting if states_bytes + fixed + per_row * m <= budget]
    max_mb = fitting[-1] if fitting else 0
    while max_mb and max_mb not in (mb, other_mb):  # confirm the extrapolation with a trace
        act = trace_train_step(config, diffusion, batch=max_mb, **trace).activations_bytes
        if states_bytes + act <= budget:
            break
        fitting.pop()
        max_mb = fitting[-1] if fitting else 0
    return max_mb


def plan_run(
    cfg: TrainConfig,
    *,
    gpus: int,
    gpu_memory_gib: float,
    mfu: float = 0.4,
    peak_tflops: float = H100_BF16_TFLOPS,
    device: str = "cuda",
    online: bool = True,
) -> Plan:
    """The plan of ``cfg`` on ``gpus`` devices of ``gpu_memory_gib`` GiB each.

    ``device="cpu"`` plans the run as it executes on CPU (SDPA attention, no autocast); "cuda" as on
    a GPU (the fused attention kernels' footprint, bf16 when ``precision: amp_bf16``).
    """
    if gpus < 1:
        raise ConfigError("--gpus", f"must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ConfigError("--mfu", f"must be in (0, 1], got {mfu}")
    config, manifests, notes = resolve_model_config(cfg, online)
    data = data_plan(cfg, manifests) if manifests else None
    if device == "cuda":
        notes.append("not counted: the CUDA context and allocator fragmentation (about 0.5-2 GiB per GPU)")
    with torch.device("meta"):
        params, largest = param_counts(BD3LM(config))
    scheme, kw = parallelism_scheme(cfg)
    states = model_state_bytes(params, largest, gpus, scheme, **kw)
    diffusion = diffusion_config(cfg)
    L, mb, gb = cfg.max_seq_len, cfg.device_train_microbatch_size, cfg.global_train_batch_size
    trace = _trace_settings(cfg, device, notes)
    first = trace_train_step(config, diffusion, batch=mb, count_flops=True, **trace)
    budget = int(gpu_memory_gib * GIB)
    max_mb = _largest_microbatch(
        config, diffusion, trace, first.activations_bytes, mb, gb // gpus, states.total, budget
    )
    flops_allowed = gb * train_flops_per_sample(config, diffusion, L)
    flops_counter = first.flops * (gb / mb)
    seconds = flops_allowed / (gpus * mfu * peak_tflops * 1e12)
    steps = _steps(cfg, data)
    if steps is None:
        notes.append(f"max_duration {cfg.max_duration} cannot be converted to steps without the data")
    return Plan(
        params=params,
        gpus=gpus,
        scheme=scheme,
        microbatch=mb,
        states=states,
        activations_bytes=first.activations_bytes,
        gpu_memory_bytes=budget,
        max_microbatch=max_mb,
        flops_allowed_pairs=flops_allowed,
        flops_counter=flops_counter,
        seconds_per_step=seconds,
        tokens_per_s=gb * L / seconds,
        total_hours=None if steps is None else steps * seconds / 3600,
        mfu=mfu,
        peak_tflops=peak_tflops,
        notes=notes,
        data=data,
    )


def write_json(plan: Plan, path: str | Path) -> None:
    Path(path).write_text(json.dumps(plan.to_json(), indent=2) + "\n")
