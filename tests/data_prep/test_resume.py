"""A convert SIGKILLed anywhere and rerun with the same arguments ends with exactly the rows of a clean run."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.convert import convert
from data_prep.manifest import MANIFEST, STATE, read_manifest
from data_prep.verify import verify

from .conftest import make_docs, read_rows, write_jsonl

ARGS = dict(seq_len=32, val_docs=10, docs_per_part=20)  # train: 6 parts, val: 1 part


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "c.jsonl", make_docs(120, seed=7))


@pytest.fixture(scope="module")
def clean(corpus, tokenizer_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    convert([str(corpus)], str(out), str(tokenizer_path), workers=1, progress=False, **ARGS)
    return out


def _convert_then_maybe_die(kill_at, corpus, out, tokenizer, workers):
    if kill_at:
        os.environ["DATA_PREP_TEST_KILL_AT"] = kill_at
    convert([str(corpus)], str(out), str(tokenizer), workers=workers, progress=False, **ARGS)


def run_killed_at(kill_at, corpus, out, tokenizer, workers=1):
    """Run convert in a forked process that SIGKILLs itself at `kill_at`; its exit code."""
    child = mp.get_context("fork").Process(
        target=_convert_then_maybe_die, args=(kill_at, corpus, out, tokenizer, workers)
    )
    child.start()
    child.join(60)
    return child.exitcode


def assert_same_output(out: Path, clean: Path):
    assert read_manifest(out)["splits"] == read_manifest(clean)["splits"]
    for split in ("train", "val"):
        rows, starts = read_rows(out / split)
        rows_clean, starts_clean = read_rows(clean / split)
        assert np.array_equal(rows, rows_clean)
        assert all(np.array_equal(a, b) for a, b in zip(starts, starts_clean))
    assert not (out / STATE).exists()
    assert verify(out).ok


@pytest.mark.parametrize(
    "kill_points",
    [
        ["train:0:mid"],
        ["train:2:before_marker"],
        ["train:5:after_marker"],  # the last train part: val comes next
        ["val:0:mid"],
        ["before_manifest"],
        ["train:1:mid", "train:1:before_marker", "train:3:mid"],  # killed again while resuming
    ],
)
def test_killed_run_resumes_to_the_clean_rows(kill_points, corpus, clean, tokenizer_path, tmp_path):
    out = tmp_path / "out"
    for point in kill_points:
        assert run_killed_at(point, corpus, out, tokenizer_path) == -signal.SIGKILL
        assert not (out / MANIFEST).exists() and (out / STATE).exists()
    convert([str(corpus)], str(out), str(tokenizer_path), workers=1, progress=False, **ARGS)
    assert_same_output(out, clean)


@pytest.mark.multiprocess
def test_killed_run_with_worker_processes_resumes(corpus, clean, tokenizer_path, tmp_path):
    out = tmp_path / "out"
    assert run_killed_at("train:3:mid", corpus, out, tokenizer_path, workers=2) == -signal.SIGKILL
    assert run_killed_at(None, corpus, out, tokenizer_path, workers=2) == 0
    assert_same_output(out, clean)


def _session_processes(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields[3] is the session id
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow
@pytest.mark.multiprocess
def test_cli_killed_at_random_times_resumes_and_leaves_no_workers(
    corpus, clean, tokenizer_path, tmp_path, kill_rng
):
    """Several trials: the real CLI SIGKILLed at a random moment, rerun, killed again; then finished."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep", "convert", "--input", str(corpus), "--out", str(out)]
    cmd += ["--tokenizer", str(tokenizer_path), "--workers", "2", "--no-progress"]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]
    # One batch per part here: 0.5 s a part, so a kill delay under 0.4 s leaves each trial about one
    # part past the last, and the seven parts (6 train, 1 val) outlast the three trials.
    env = dict(os.environ, DATA_PREP_TEST_BATCH_DELAY="0.5")
    rng = kill_rng
    kills = 0
    for trial in range(3):
        done_before = len(list(out.glob("train/part-*.done.json")))
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            # past the imports and one more part than last time (every trial makes progress)
            while len(list(out.glob("train/part-*.done.json"))) <= done_before:
                if proc.poll() is not None:
                    break
                assert time.monotonic() < deadline, proc.stderr.read().decode()
                time.sleep(0.05)
            delay = rng.uniform(0, 0.4)
            print(f"trial {trial}: kill {delay:.2f} s after part {done_before + 1}")
            time.sleep(delay)
            proc.kill()  # SIGKILL the main process only, as an OOM killer or a preemption would
            proc.wait()
            time.sleep(2.5)  # orphaned tokenizer workers notice within a second
            assert _session_processes(proc.pid) == []
        finally:
            for pid in _session_processes(proc.pid):
                os.kill(pid, signal.SIGKILL)
        if (out / MANIFEST).exists():
            # Finished before the signal landed (possible on a loaded machine): the manifest is
            # written last, so a finished output must already be the clean one.
            assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
        assert (out / STATE).exists()
        kills += 1
    assert kills >= 2, "the run finished before it was killed twice: the test lost its meaning"
    if not (out / MANIFEST).exists():
        result = convert([str(corpus)], str(out), str(tokenizer_path), workers=2, progress=False, **ARGS)
        assert not result.already_complete
    assert_same_output(out, clean)
