"""Bytes per GPU of the model states (weights, gradients, optimizer) under each parallelism scheme.

Plain arithmetic over the parameter count, shared by the planner (``pipeline.planning``) and the GPU
check (``benchmarks.gpu_check``); no Composer or DeepSpeed import. Adam(W) keeps two fp32 moments.

| scheme | weights | gradients | optimizer (fp32 master + moments) |
|---|---|---|---|
| ``ddp`` (Composer; amp_bf16 keeps fp32 weights, autocast copies count as activations) | 4P | 4P | 8P |
| ``zero1`` (DeepSpeed bf16) | 2P | 2P + 4P/N (16-bit full, fp32 partition) | 12P/N |
| ``zero2`` (DeepSpeed bf16) | 2P | 6P/N | 12P/N |
| ``zero3`` (DeepSpeed bf16) | 2P/N + 4 x largest layer (gathered) | 4P/N (fp32) | 12P/N |
| ``fsdp_full_shard`` (FSDP2, fp32 sharded) | 4P/N + 2 x 4 x largest layer (gathered, prefetch) | 4P/N | 8P/N |
| ``fsdp_shard_grad_op`` (FSDP2, kept gathered after forward) | 4P/N + 4P | 4P/N | 8P/N |

ZeRO-2 and ZeRO-3 are DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs``:
2P + 18P/N; ``estimate_zero3_model_states_mem_needs``: 4 x largest layer + 18P/N), split into the
three parts its comments name. With ``offload_optimizer`` the fp32 master weights, moments and fp32
gradients live in CPU memory (GPU: ZeRO-2 2P, ZeRO-3 4 x largest + 2P/N); with ``offload_param``
(ZeRO-3) the 16-bit weights too (GPU: 4 x largest layer). DeepSpeed without bf16/fp16 keeps fp32
weights and gradients: 4P and 4P-based instead of 2P. ZeRO-1 has no DeepSpeed estimator; it is
ZeRO-2 with the 16-bit gradients not partitioned (equal to the ZeRO-2 estimate at N = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("ddp", "zero1", "zero2", "zero3", "fsdp_full_shard", "fsdp_shard_grad_op")


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes per GPU (device memory only; offloaded state is in ``cpu_bytes``)."""

    weights: int
    grads: int
    optimizer: int
    cpu_bytes: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, parameters of the largest module's own tensors), tied weights counted once.

    The largest layer follows DeepSpeed's ``model_to_params`` (a module's non-recursive parameters).
    Works on a model built on the meta device (counts by identity, not by data pointer).
    """
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def model_state_bytes(
    params: int,
    largest_layer: int,
    world: int,
    scheme: str,
    *,
    half_precision: bool = True,
    offload_optimizer: bool = False,
    offload_param: bool = False,
) -> ModelStateBytes:
    """Model-state bytes per GPU for ``params`` parameters on ``world`` GPUs (table in the module doc).

    Args:
        largest_layer: parameters of the largest module (ZeRO-3 / FSDP gather it whole).
        half_precision: DeepSpeed's bf16/fp16 (16-bit weights and gradients); ignored by ddp/fsdp.
        offload_optimizer, offload_param: DeepSpeed's CPU offload (``offload_param`` needs zero3).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme {scheme!r} is not one of {SCHEMES}")
    P, N = params, world
    if scheme == "ddp":
        return ModelStateBytes(4 * P, 4 * P, 8 * P)
    if scheme.startswith("fsdp"):
        gathered = 2 * 4 * largest_layer if scheme == "fsdp_full_shard" else 4 * P
        return ModelStateBytes(4 * P // N + gathered, 4 * P // N, 8 * P // N)
    w = 2 if half_precision else 4  # bytes of a DeepSpeed model weight / gradient
    # DeepSpeed's "18" per partitioned parameter. ZeRO-2: 16-bit grads 2 + fp32 grads 4 + fp32 master 4 +
    # moments 8 (16-bit weights replicated). ZeRO-3: 16-bit weights 2 + fp32 grads 4 + master 4 + moments
    # 8. Without bf16/fp16 there are no 16-bit copies and the master is the weight.
    opt = (12 if half_precision else 8) * P // N
    if scheme == "zero3":
        gathered = 4 * largest_layer
        if offload_param:
            return ModelStateBytes(gathered, 0, 0, cpu_bytes=(w + 16) * P // N)
        weights = gathered + w * P // N
        if offload_optimizer:
            return ModelStateBytes(weights, 0, 0, cpu_bytes=16 * P // N)
        return ModelStateBytes(weights, 4 * P // N, opt)
    if offload_param:
        raise ValueError("offload_param needs ZeRO stage 3")
    if offload_optimizer:
        return ModelStateBytes(w * P, 0, 0, cpu_bytes=16 * P // N)
    if scheme == "zero1":  # 16-bit gradients whole, their fp32 copy partitioned
        return ModelStateBytes(w * P, (w * P + 4 * P // N) if half_precision else 4 * P, opt)
    return ModelStateBytes(w * P, ((w + 4) if half_precision else 4) * P // N, opt)
