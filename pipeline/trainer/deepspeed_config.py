"""The DeepSpeed config of a run (imports neither Composer nor DeepSpeed).

``build_ds_config`` is called while the YAML is checked, so an inconsistent ``parallelism.deepspeed``
section fails before any model is built.
"""

from __future__ import annotations

import copy
from typing import Any


class DeepSpeedConfigError(ValueError):
    """(key, message): a parallelism.deepspeed setting that cannot work."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


# Over 60 lines on purpose: one derived key after another, each with the error naming it.
def build_ds_config(
    section: dict[str, Any],
    *,
    global_batch: int,
    micro_batch: int,
    world_size: int,
    precision: str,
    grad_clip: float | None,
) -> dict[str, Any]:
    """The DeepSpeed config: the user's section plus the keys derived from the Composer config.

    Batch keys come from ``global_train_batch_size`` / ``device_train_microbatch_size`` and the world
    size; a user value that disagrees is an error. ``precision`` amp_bf16/amp_fp16 turns on DeepSpeed's
    bf16/fp16; the ``algorithms.gradient_clipping`` threshold becomes ``gradient_clipping``.
    """
    ds = copy.deepcopy(dict(section or {}))
    key = "parallelism.deepspeed"
    if global_batch % (micro_batch * world_size):
        raise DeepSpeedConfigError(
            "global_train_batch_size",
            f"{global_batch} is not divisible by device_train_microbatch_size ({micro_batch}) x world size "
            f"({world_size}); DeepSpeed needs whole gradient-accumulation steps",
        )
    derived = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": global_batch // (micro_batch * world_size),
    }
    for k, v in derived.items():
        if k in ds and ds[k] != v:
            raise DeepSpeedConfigError(
                f"{key}.{k}",
                f"is {ds[k]} but the Composer settings give {v}; remove it (it is derived from "
                "global_train_batch_size, device_train_microbatch_size and the world size)",
            )
        ds[k] = v
    if grad_clip is not None:
        if "gradient_clipping" in ds and float(ds["gradient_clipping"]) != float(grad_clip):
            raise DeepSpeedConfigError(
                f"{key}.gradient_clipping",
                f"is {ds['gradient_clipping']} but algorithms.gradient_clipping.clipping_threshold is {grad_clip}; set one",
            )
        ds["gradient_clipping"] = grad_clip
    want = {"amp_bf16": "bf16", "amp_fp16": "fp16"}.get(precision)
    for name in ("bf16", "fp16"):
        enabled = bool(ds.get(name, {}).get("enabled", False))
        if enabled and want != name:
            raise DeepSpeedConfigError(
                f"{key}.{name}.enabled", f"conflicts with precision: {precision}; set precision: amp_{name}"
            )
    if want is not None:
        ds[want] = {**ds.get(want, {}), "enabled": True}
    zero = ds.setdefault("zero_optimization", {"stage": 2})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"{key}.zero_optimization.stage", f"must be 0, 1, 2 or 3, got {stage}")
    for off in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(off), str):  # shorthand `offload_optimizer: cpu`
            zero[off] = {"device": zero[off]}
    if "offload_param" in zero and stage != 3:
        raise DeepSpeedConfigError(f"{key}.zero_optimization.offload_param", "needs stage 3")
    # Our optimizer is Composer's DecoupledAdamW; ZeRO wraps any torch optimizer (also when offloaded).
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
