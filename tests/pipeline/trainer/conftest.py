"""Fixtures of the training tests (``tiny_data`` and ``one_thread`` are in ``tests/conftest.py``).

Every run made here is made once per session and shared by the tests that only read it:

- ``one_process`` / ``one_process_full``: 1-process references of ``launch.COMMON`` and
  ``launch.FULL`` (several block sizes and the evaluation callbacks folded in), trained in this
  process;
- ``ddp_run``: ``composer -n 2`` DDP of ``FULL`` with the downstream (lm-eval) callback;
- ``reference(variant)``: the fault tests' uninterrupted runs (``launch.FAULT_COMMON``, row ids logged,
  a Hugging Face export; every 5th batch's checkpoint kept for test_elastic.py) for "1proc", "zero2" (both on a two-stream
  mixture, ``launch.mixture``) and "zero3", launched on first use; they are also the comparisons of
  ZeRO-2 with one process on the mixture and of ZeRO-3 with ``one_process``.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def one_process(tiny_data, tmp_path_factory):
    """The 1-process reference run of ``COMMON`` (20 batches): (loss records, final weights, its
    save_folder, None). Read-only."""
    from tests.pipeline.trainer.launch import one_process_run

    return one_process_run(tiny_data, tmp_path_factory.mktemp("one"))


@pytest.fixture(scope="session")
def one_process_full(tiny_data, tmp_path_factory):
    """The 1-process reference run of ``FULL`` with the whole global eval batch on its one device:
    (loss records, final weights, save_folder, {block size: NELBO} of the evaluation at batch 20)."""
    from tests.pipeline.trainer.launch import FULL, one_process_run

    out = tmp_path_factory.mktemp("one-full")
    return one_process_run(tiny_data, out, "device_eval_batch_size=16", common=FULL)


@pytest.fixture(scope="session")
def ddp_run(tiny_data, tmp_path_factory) -> tuple[Path, str]:
    """``composer -n 2 launch yamls/bd3_tiny.yaml`` (the repository's ``launch`` file; every other launch
    is ``-m pipeline.train``) DDP run of ``FULL`` (20 batches), launched once per session: (its folder
    with loss.jsonl, ckpt/ and rank logs; rank 0's output). Read-only."""
    from tests.pipeline.trainer.launch import FULL, downstream, launch

    out = tmp_path_factory.mktemp("ddp-run")
    p = launch(tiny_data, out, *downstream(tiny_data, out), entry=("launch",), common=FULL)
    return out, p.stdout + p.stderr


@pytest.fixture(scope="session")
def reference(tiny_data, tmp_path_factory):
    """``reference(variant)``: the uninterrupted run of ``launch.command(variant)``, launched on first
    use. Read-only."""
    from tests.pipeline.trainer.launch import command, rank_logs, run_to_end

    made: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in made:
            out = tmp_path_factory.mktemp(f"ref-{variant}")
            # Every 5th batch's checkpoint is kept: the world-size switches resume from batch 10.
            cmd, env = command(
                tiny_data, out, variant, "save_interval=5ba", "save_num_checkpoints_to_keep=-1"
            )
            p = run_to_end(cmd, env, out)
            assert p.returncode == 0, p.stderr[-3000:] + rank_logs(out)
            made[variant] = out
        return made[variant]

    return get
