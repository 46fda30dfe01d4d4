"""Helpers of the multi-process training tests: the composer launcher, killing a run and cleaning up
after it, and loss-curve checks."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pipeline.trainer import load_config, run
from tests.factories import REPO, YAMLS, tiny_overrides

# float32 on CPU: the runs differ only in summation order (all-reduce, microbatch grouping).
LOSS_RTOL = 1e-5  # measured: at most 1.2e-7 over 12 batches (1 vs 2 processes)
COMMON = [
    "max_duration=20ba",
    "scheduler.t_max=20ba",
    "eval_loader=null",
    "run_name=dist-test",
    "callbacks.loss_log.sample_ids=true",  # the rows of each global batch (compared across world sizes)
]
# FULL folds more into the same 20 batches, so that one launch proves several things: several block
# sizes (each step draws L' from (seed, step), the same on every rank) and the evaluation callbacks
# at batches 10 and 20 (likelihood per block size, the noise-interval search without adopting,
# generation), which never touch the training data or noise.
MIXED = [
    "diffusion.block_size=[2, 4, 8]",
    "diffusion.noise_interval={2: [0.001, 1.0], 4: [0.45, 0.95], 8: [0.3, 0.8]}",
    "callbacks.loss_log.sample_ids=true",
]
EVALUATION = [
    "eval_interval=10ba",
    "device_eval_batch_size=8",
    "callbacks.block_size_likelihood.block_sizes=[1,4,8,L]",
    "callbacks.block_size_likelihood.num_batches=2",
    "callbacks.noise_interval_search.num_batches=1",
    "callbacks.noise_interval_search.adopt=false",
    "callbacks.noise_interval_search.widths=[0.5,0.9]",  # 9 candidates (the default grid is larger)
    "callbacks.noise_interval_search.step=0.1",
    "callbacks.generation.max_new_tokens=8",
]
# The INFO line of a DeepSpeed run resumed on another number of processes (pipeline.trainer.elastic).
UNIVERSAL_LINE = "loading DeepSpeed's universal checkpoint"
FULL = [*(c for c in COMMON if c != "eval_loader=null"), *MIXED, *EVALUATION]


def downstream(tiny_data, out: Path) -> list[str]:
    """Overrides that add ``callbacks.downstream_eval`` (lm-eval's ``tiny_mc`` task of
    ``tests.factories.write_lm_eval_tasks``, written beside the tiny data on first use) and an
    ``hf_export`` of the final weights to a launch of ``FULL`` saving under ``out``."""
    from tests.factories import downstream_overrides, write_lm_eval_tasks

    tasks = tiny_data[0].parent / "lm_eval_tasks"
    if not (tasks / "tiny_mc.yaml").exists():
        write_lm_eval_tasks(tasks)
    return [*downstream_overrides(tasks), f"callbacks.hf_export.folder={out}/hf"]


def assert_same_downstream(tiny_data, out: Path, tensorboard: Path | None = None) -> None:
    """``callbacks.downstream_eval`` under 2 processes: what it logged at batch 20 (TensorBoard files
    under ``tensorboard``, by default out/ckpt/tensorboard) equals ``pipeline.lm_eval`` run in this
    one process on the run's final weights (its hf export)."""
    from tests.factories import check_downstream_scalars, downstream_reference

    reference = downstream_reference(out / "hf", tiny_data[0].parent / "lm_eval_tasks")
    scalars = tensorboard_scalars(tensorboard or out / "ckpt" / "tensorboard")
    check_downstream_scalars(scalars, reference, batch=20)


def assert_downstream_split(output: str) -> None:
    """``callbacks.downstream_eval`` under 2 processes split tiny_mc's 4 documents (16 requests): rank 0's
    progress bars (``output``) counted 8 requests at every evaluation and block size."""
    import re

    bars = re.findall(r"bd3 loglikelihood: 100%[^\n\r]*?\| *(\d+)/(\d+)", output)
    assert bars and set(bars) == {("8", "8")}, bars


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_command(
    tiny_data, out: Path, *extra: str, nproc: int = 2, common=COMMON, entry=("-m", "pipeline.train")
) -> tuple[list[str], dict]:
    """(argv, env) of ``composer -n N -m pipeline.train`` on bd3_tiny (``python -m`` when nproc is 0);
    ``entry=("launch",)`` runs the repository's ``launch`` file instead of the module.

    Losses go to out/loss.jsonl, checkpoints to out/ckpt, rank logs to out/rank{r}.{out,err}.
    """
    data, tok = tiny_data
    out.mkdir(exist_ok=True)
    args = tiny_overrides(
        data, tok, out / "ckpt", *common, f"callbacks.loss_log.path={out}/loss.jsonl", *extra
    )
    yaml = str(YAMLS / "bd3_tiny.yaml")
    if nproc == 0:
        cmd = [sys.executable, "-m", "pipeline.train", yaml, *args]
    else:
        launcher = str(Path(sys.executable).with_name("composer"))
        logs = ["--stdout", f"{out}/rank{{rank}}.out", "--stderr", f"{out}/rank{{rank}}.err"]
        cmd = [launcher, "-n", str(nproc), *logs, *entry, yaml, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return cmd, env


# Every process a launch starts carries this variable (children inherit the environment), so the
# processes it leaves behind can be found after the launcher has exited, reparented or not.
LAUNCH_MARK = "PIPELINE_TEST_LAUNCH"
LEFTOVER_GRACE_S = 30.0  # a killed rank's DataLoader workers notice within 5 s; trackers at once


def launched_by(mark: str) -> list:
    """The live processes whose environment carries ``LAUNCH_MARK=mark`` (psutil.Process objects)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(LAUNCH_MARK) == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def kill_launched(mark: str) -> list[str]:
    """SIGKILL what is left of the launch ``mark``; returns the command lines it killed."""
    import psutil

    killed = []
    for proc in launched_by(mark):
        try:
            killed.append(f"{proc.pid}: {' '.join(proc.cmdline())[:300]}")
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    return killed


def run_launch(cmd: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a training launch) to its end and return its exit code and output; then fail the
    test if any process it started outlives it by ``LEFTOVER_GRACE_S``, after killing those.

    The output goes through files, not pipes: a leftover process holding the launcher's stdout (the
    composer launcher gives local rank 0 its own, and rank 0 gives them to what it spawns) would keep
    a pipe open, and the test would wait for its end until the timeout instead of naming it (the CI
    failure of stop 36: the Manager process Composer spawned for a remote save_folder)."""
    mark = uuid.uuid4().hex
    env = {**env, LAUNCH_MARK: mark}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        try:
            p = subprocess.run(
                cmd, cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            kill_launched(mark)
            raise
        stdout.seek(0)
        stderr.seek(0)
        done = subprocess.CompletedProcess(cmd, p.returncode, stdout.read(), stderr.read())
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while launched_by(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = kill_launched(mark)
    assert not left, (
        f"the launch (exit code {done.returncode}) left {len(left)} process(es) running "
        f"{LEFTOVER_GRACE_S:.0f} s after it ended (now killed):\n" + "\n".join(left)
    )
    return done


def launch(
    tiny_data, out: Path, *extra: str, nproc: int = 2, entry=("-m", "pipeline.train"), common=COMMON
) -> subprocess.CompletedProcess:
    """``composer -n 2 -m pipeline.train yamls/bd3_tiny.yaml ...`` logging losses to out/loss.jsonl;
    fails the test unless it exits 0. Returns the finished process (rank 0's output in it)."""
    cmd, env = train_command(tiny_data, out, *extra, nproc=nproc, entry=entry, common=common)
    p = run_launch(cmd, env)
    rank1 = (out / "rank1.err").read_text() if (out / "rank1.err").exists() else ""
    assert p.returncode == 0, f"{p.stderr[-3000:]}\n--- rank 1 ---\n{rank1[-3000:]}"
    return p


def last_batch(loss_log: Path) -> int:
    """The last batch ``loss_log`` (a loss_log callback's JSON lines) has recorded; 0 before any."""
    if not loss_log.exists():
        return 0
    lines = [line for line in loss_log.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["batch"] if lines else 0


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the process group ``proc`` leads (started with ``start_new_session``),
    and reap ``proc``: no rank or launcher outlives the test holding ports, files or shared memory."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def started(cmd: list[str], env: dict, out: Path) -> Iterator[subprocess.Popen]:
    """``cmd`` running in its own session, its output appended to out/launcher.log; on leaving, its
    whole process group is killed (``kill_group``)."""
    with open(out / "launcher.log", "a") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            kill_group(proc)


def kill_a_rank_after(
    proc: subprocess.Popen, out: Path, batch: int, rng: random.Random, max_delay: float, nproc: int = 2
) -> int | None:
    """SIGKILL one training process of ``proc`` once out/loss.jsonl has logged ``batch``, after a random
    delay of up to ``max_delay`` seconds (to land anywhere inside the next batch or checkpoint write).

    The victim is a random rank of the composer launcher ``proc``, or ``proc`` itself when ``nproc``
    is 0 (``python -m``). Returns the batch logged when the signal went, None if the run ended first.
    """
    import psutil

    deadline = time.monotonic() + 300
    while last_batch(out / "loss.jsonl") < batch:
        if proc.poll() is not None:
            return None
        assert time.monotonic() < deadline, f"batch {batch} not logged in 300 s"
        time.sleep(0.02)
    time.sleep(rng.uniform(0, max_delay))
    if proc.poll() is not None:
        return None
    victim = proc.pid if nproc == 0 else rng.choice(psutil.Process(proc.pid).children()).pid
    logged = last_batch(out / "loss.jsonl")
    os.kill(victim, signal.SIGKILL)
    return logged


# -- the fault tests' recipe and its checks (test_faults.py, test_soak.py, test_object_storage.py) --
ROWS_PER_EPOCH = 256  # the tiny_data train split; 16 rows per global batch
FAULT_COMMON = [
    "max_duration=20ba",
    "scheduler.t_max=20ba",
    "eval_loader=null",
    "run_name=fault-test",
    "save_interval=3ba",
    "callbacks.loss_log.sample_ids=true",
]
VARIANTS = {  # name: (processes, overrides, trains on the two-stream mixture of ``web_stream``)
    "1proc": (0, [], True),
    "zero2": (2, ["parallelism.deepspeed.zero_optimization.stage=2"], True),
    "zero3": (2, ["parallelism.deepspeed.zero_optimization.stage=3"], False),
}
WEB_ROWS = 64  # the second stream's train rows: 0.4 of every batch, so they are repeated


def web_stream(tiny_data) -> Path:
    """The second stream of the fault tests' mixture, written beside the ``tiny_data`` folder on first
    use: a compatible data_prep-style folder (same tokenizer) whose rows no other stream holds."""
    from tests.factories import write_stream_folder

    data, tok = tiny_data
    root = data.parent / "web"
    if not (root / "manifest.json").exists():
        write_stream_folder(root, tok, 1, train_rows=WEB_ROWS)
    return root


def mixture(tiny_data, local_a: Path | None = None, remote_a: str | None = None) -> list[str]:
    """Overrides that train on stream ``a`` (the tiny data, 0.6 of every batch; read from ``remote_a``
    through the cache ``local_a`` when given) and ``web`` (0.4), with a fixed num_canonical_nodes."""
    from tests.factories import mixture_overrides

    out = mixture_overrides({"a": (local_a or tiny_data[0], 0.6), "web": (web_stream(tiny_data), 0.4)})
    out.append("train_loader.num_canonical_nodes=1")
    return out + ([f"train_loader.streams.a.remote={remote_a}"] if remote_a else [])


def same_reference(variant: str):
    """Mark of the tests that read ``reference(variant)`` (tests/pipeline/trainer/conftest.py): they run
    on one pytest-xdist worker, so that the run is launched once (the two mixture runs together: one
    test compares them)."""
    return pytest.mark.xdist_group("reference-mixture" if VARIANTS[variant][2] else f"reference-{variant}")


def command(tiny_data, out: Path, variant: str, *extra: str, nproc: int | None = None):
    """(argv, env) of the fault tests' recipe for ``variant``; ``extra`` overrides go last; ``nproc``
    (0: ``python -m``) replaces the variant's number of processes."""
    processes, overrides, mixed = VARIANTS[variant]
    nproc = processes if nproc is None else nproc
    overrides = [*overrides, *(mixture(tiny_data) if mixed else [])]
    return train_command(
        tiny_data,
        out,
        *overrides,
        f"callbacks.hf_export.folder={out}/hf",
        *extra,
        nproc=nproc,
        common=FAULT_COMMON,
    )


def run_to_end(cmd, env, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    if fault:
        env = {**env, "PIPELINE_TEST_FAULTS": fault}
    return run_launch(cmd, env)


def rank_logs(out: Path) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.read_text()[-2000:]}" for p in sorted(out.glob("rank*.err")))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no weights in {folder}"
    return out


def final_records(out: Path) -> dict[int, dict]:
    """The loss log of a run that was killed and resumed: the last record of each batch."""
    return {r["batch"]: r for r in records(out / "loss.jsonl")}


def assert_same_run(ref: Path, got: Path) -> None:
    """Per-batch rows and losses, and final weights, equal to the reference run; a single-stream run
    reads every row once in its first epoch (16 batches), a mixture reads both streams."""
    want = final_records(ref)
    have = final_records(got)
    assert sorted(have) == sorted(want) == list(range(1, 21))
    for b in want:
        assert have[b]["rows"] == want[b]["rows"], f"batch {b}: other rows than the uninterrupted run"
        for key in ("loss/train/total", "loss/train/nelbo"):
            # Exact: a resumed run replays the same arithmetic (same ranks, same order).
            assert have[b][key] == want[b][key], (b, key, have[b][key], want[b][key])
    ids = [r for b in range(1, 21) for r in want[b]["rows"]]
    if max(ids) < ROWS_PER_EPOCH:  # one stream: the first 16 batches are one pass over its 256 rows
        assert sorted(ids[: 16 * 16]) == list(range(ROWS_PER_EPOCH))
    else:  # the mixture: sample ids past stream a's 256 rows are web's
        assert 0.3 < sum(i >= ROWS_PER_EPOCH for i in ids) / len(ids) < 0.5
    w_ref, w_got = weights(ref / "hf"), weights(got / "hf")
    assert w_ref.keys() == w_got.keys()
    for k in w_ref:
        assert torch.equal(w_ref[k], w_got[k]), k


def one_process_run(tiny_data, out: Path, *extra: str, common=COMMON):
    """The reference: the config trained in this process (1 thread); (loss records, final weights,
    save_folder, {block size: NELBO} of the last ``BlockSizeLikelihood`` evaluation or None)."""
    data, tok = tiny_data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = tiny_overrides(
            data, tok, out / "ckpt", *common, f"callbacks.loss_log.path={out}/loss.jsonl", *extra
        )
        trainer = run(load_config(YAMLS / "bd3_tiny.yaml", overrides, world_size=1))
    finally:
        torch.set_num_threads(threads)
    likelihood = [cb for cb in trainer.state.callbacks if type(cb).__name__ == "BlockSizeLikelihood"]
    evaluation = {r.block_size: r.nelbo for r in likelihood[0].last_results} if likelihood else None
    return records(out / "loss.jsonl"), trainer.state.model.model.state_dict(), out / "ckpt", evaluation


def assert_same_curve(one: list[dict], two: list[dict]) -> None:
    assert [r["batch"] for r in one] == [r["batch"] for r in two] == list(range(1, 21))
    print("\nbatch  1 process   2 processes  rel. diff")
    for ra, rb in zip(one, two):
        la, lb = ra["loss/train/total"], rb["loss/train/total"]
        print(f"{ra['batch']:5d}  {la:.7f}  {lb:.7f}  {abs(la - lb) / la:.1e}")
    for ra, rb in zip(one, two):
        # (loss/train/masked_ce is a per-microbatch ratio averaged by rows: it depends on the grouping.)
        for key in ("loss/train/total", "loss/train/nelbo"):
            assert rb[key] == pytest.approx(ra[key], rel=LOSS_RTOL), (ra["batch"], key)
    # The curve must move: matching a flat line would prove nothing.
    assert one[-1]["loss/train/total"] < one[0]["loss/train/total"] - 0.2


def assert_block_sizes_drawn(one: list[dict], two: list[dict], nranks: int | dict[int, int] = 2) -> None:
    """MIXED: both runs drew, at every step, the L' that (seed, step) gives, the same on every rank
    (``nranks`` of them, or ``nranks[batch]`` for a run that changed its number of processes), and
    logged that step's NELBO under its size."""
    from pipeline.diffusion.objective import DiffusionConfig

    cfg = DiffusionConfig(block_size=[2, 4, 8], seed=0)
    for r1, r2 in zip(one, two):
        bs = cfg.block_size_at(r2["batch"] - 1)  # the step counter before the batch
        ranks = nranks[r2["batch"]] if isinstance(nranks, dict) else nranks
        assert r1["block_size_by_rank"] == [bs] and r2["block_size_by_rank"] == [bs] * ranks
        per_size = {k: v for k, v in r2.items() if k.startswith("loss/train/nelbo/bs")}
        assert per_size == {f"loss/train/nelbo/bs{bs}": r2["loss/train/nelbo"]}
    assert {r["block_size_by_rank"][0] for r in two} == {2, 4, 8}


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over every event file Composer's TensorboardLogger wrote under folder."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, {})[event.step] = v.simple_value
                elif v.HasField("tensor") and v.tensor.dtype == 1 and v.tensor.float_val:  # DT_FLOAT scalar
                    out.setdefault(v.tag, {})[event.step] = v.tensor.float_val[0]
    return out


def assert_same_evaluation(
    one: dict[int, float], out: Path, output: str, tensorboard: Path | None = None
) -> None:
    """EVALUATION in 2 processes: each rank reads its half of the global eval batches and the sums are
    all-reduced, so the last evaluation (batch 20, from the run's TensorBoard files) equals one process
    with the whole global batch; FSDP2 and ZeRO-3 gather the sharded parameters for each forward, and
    generation runs on every rank in step. ``output``: the launch's rank-0 output; ``tensorboard``: the
    run's TensorBoard folder (by default out/ckpt/tensorboard)."""
    assert "[generation] sample 0:" in output
    scalars = tensorboard_scalars(tensorboard or out / "ckpt" / "tensorboard")
    assert sorted(one) == [1, 4, 8, 32]
    for bs, nelbo in one.items():
        assert scalars[f"eval/nelbo/bs{bs}"][20] == pytest.approx(nelbo, rel=LOSS_RTOL), bs


# -- elastic resumption (test_elastic.py) ----------------------------------------------------------
def copy_run_until(ref: Path, out: Path, batch: int) -> None:
    """``out`` as the run in ``ref`` was right after batch ``batch``: the save_folder with that batch's
    checkpoint (Composer's file or sharded folder, DeepSpeed's tag) as its latest, and the loss log
    up to it. ``ref`` must have kept that checkpoint (``save_num_checkpoints_to_keep=-1``)."""
    from pipeline.save_folder import LATEST, batch_of, composer_checkpoints, ds_folder, ds_tag

    src, dst = ref / "ckpt", out / "ckpt"
    dst.mkdir(parents=True)
    for p in src.iterdir():  # the run's config and tokenizer files
        if p.is_file() and not p.is_symlink() and batch_of(p.name) is None:
            shutil.copy2(p, dst / p.name)
    ckpt = composer_checkpoints(src)[batch]
    (shutil.copytree if ckpt.is_dir() else shutil.copy2)(ckpt, dst / ckpt.name)
    if (ds_folder(src) / ds_tag(batch)).is_dir():
        shutil.copytree(ds_folder(src) / ds_tag(batch), ds_folder(dst) / ds_tag(batch))
    (dst / LATEST).symlink_to(ckpt.name)
    kept = [r for r in records(ref / "loss.jsonl") if r["batch"] <= batch]
    (out / "loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


def assert_continues(ref: Path, got: Path, after: int, rtol: float = LOSS_RTOL) -> None:
    """Every global batch after ``after`` holds the rows of the uninterrupted run ``ref`` (exact) and its
    losses agree to ``rtol`` (another world size sums in another order)."""
    want, have = final_records(ref), final_records(got)
    assert sorted(have) == sorted(want) == list(range(1, 21))
    worst = 0.0
    for b in range(after + 1, 21):
        assert have[b]["rows"] == want[b]["rows"], f"batch {b}: other rows than the uninterrupted run"
        for key in ("loss/train/total", "loss/train/nelbo"):
            assert have[b][key] == pytest.approx(want[b][key], rel=rtol), (b, key)
            worst = max(worst, abs(have[b][key] - want[b][key]) / abs(want[b][key]))
    print(f"\nbatches {after + 1}-20: rows identical, largest relative loss difference {worst:.1e}")


def optimizer_state(ckpt: Path, batch: int, scratch: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{parameter: {"exp_avg", "exp_avg_sq", "step"}} of the save_folder ``ckpt``'s checkpoint of
    ``batch``, whole tensors whatever the world size that wrote it: from DeepSpeed's partitions
    (converted to a universal checkpoint in a copy under ``scratch``), Composer's file, or FSDP shards.
    The step is a float (DeepSpeed keeps an int, torch a tensor)."""
    from pipeline.save_folder import composer_checkpoints, ds_folder, ds_tag
    from pipeline.trainer.elastic import convert_to_universal

    keys = ("exp_avg", "exp_avg_sq")
    tag = ds_folder(ckpt) / ds_tag(batch)
    if tag.is_dir():
        copy = scratch / f"{ckpt.parent.name}-{tag.name}"
        shutil.copytree(tag, copy)
        zero = convert_to_universal(copy) / "zero"
        out = {}
        for param in sorted(p for p in zero.iterdir() if p.is_dir()):
            # ZeRO-1/2 write {"param": tensor, ...} and a step per parameter; ZeRO-3 writes the bare
            # (flattened) tensors, and its step only in the optimizer's group state.
            loaded = {k: torch.load(param / f"{k}.pt", weights_only=False) for k in keys}
            state = {k: v["param"] if isinstance(v, dict) else v for k, v in loaded.items()}
            if (param / "step.pt").exists():
                step = torch.load(param / "step.pt", weights_only=False)
                state["step"] = float(step["param"] if isinstance(step, dict) else step)
            else:
                groups = torch.load(zero / "optimizer_state.pt", weights_only=False)["optimizer_state_dict"]
                (state["step"],) = {float(s["step"]) for s in groups["state"].values()}
            out[param.name] = state
        return out
    path = composer_checkpoints(ckpt)[batch]
    if path.is_dir():  # FSDP sharded: read the optimizer's tensors into full ones, in this process
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        reader = dcp.FileSystemReader(str(path))
        prefix = "state.optimizers.DecoupledAdamW.state."
        wanted = {
            key: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in reader.read_metadata().state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
        }
        dcp.load(wanted, storage_reader=reader, no_dist=True)
        out = {}
        for key, value in wanted.items():
            name, _, what = key[len(prefix) :].rpartition(".")
            out.setdefault(name, {})[what] = float(value) if what == "step" else value
        return out
    state = torch.load(path, map_location="cpu", weights_only=False)["state"]["optimizers"]["DecoupledAdamW"]
    return {name: {**{k: s[k] for k in keys}, "step": float(s["step"])} for name, s in state["state"].items()}


def assert_same_optimizer_state(want: dict, have: dict, rtol: float = LOSS_RTOL) -> None:
    """Adam's moments of every parameter agree to ``rtol`` relative to each tensor's norm, and the
    step counts are equal: the run continued Adam, it did not restart it."""
    assert sorted(have) == sorted(want) and want
    worst = 0.0
    for name in want:
        assert have[name]["step"] == want[name]["step"], name
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = have[name][key].double(), want[name][key].double()
            assert a.shape == b.shape, (name, key)
            err = float((a - b).norm() / b.norm().clamp_min(1e-30))
            worst = max(worst, err)
            assert err <= rtol, (name, key, err)
    print(f"optimizer state: {len(want)} parameters, largest relative difference {worst:.1e}")
