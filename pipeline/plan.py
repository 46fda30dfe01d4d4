"""Will it fit? ``python -m pipeline.plan CONFIG.yaml [key=value ...] --gpus N --gpu-memory GB``.

Resolves the YAML exactly as ``pipeline.train`` does (same overrides, same errors, exit code 2), builds
no weights and no data loader, and prints the per-GPU memory (model states under the configured
parallelism + one microbatch's activations traced on fake tensors), the largest microbatch that fits,
FLOPs per step in two conventions and the time at ``--mfu`` of ``--peak-tflops``. Exit code 3 with a
one-line reason when the run does not fit (launch scripts gate on it). GB means GiB (2**30 bytes).
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__)
    p.add_argument("yaml", help="training config, e.g. yamls/bd3_1b.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for pipeline.train")
    p.add_argument("--gpus", type=int, required=True, help="processes of the run (world size)")
    p.add_argument("--gpu-memory", type=float, required=True, help="memory per GPU in GiB (80 for an H100)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization assumed (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak TFLOP/s per GPU (H100 SXM bf16)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="plan the run on this device")
    p.add_argument("--offline", action="store_true", help="never fetch a hub config.json")
    p.add_argument("--json", metavar="OUT", help="also write the plan as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # flags before or after the overrides
    from pipeline.planning import plan_run, write_json
    from pipeline.trainer import ConfigError, load_config

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        cfg = load_config(args.yaml, args.overrides, world_size=args.gpus)
        plan = plan_run(
            cfg,
            gpus=args.gpus,
            gpu_memory_gib=args.gpu_memory,
            mfu=args.mfu,
            peak_tflops=args.peak_tflops,
            device=args.device,
            online=not args.offline,
        )
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(plan.table())
    if args.json:
        write_json(plan, args.json)
    if not plan.fits:
        print(
            f"does not fit: peak {plan.peak_bytes / 2**30:.2f} GiB per GPU > {args.gpu_memory:g} GiB "
            f"(largest microbatch that fits: {plan.max_microbatch}); lower device_train_microbatch_size, "
            "turn on model.activation_checkpointing, or shard more (ZeRO-3, offload_optimizer: cpu)",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
