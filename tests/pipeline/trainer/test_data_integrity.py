"""Data integrity where training reads it: Streaming's decompressed copies, hashes, and a clean stop.

Every case runs on a real ``data_prep convert`` output (zstd shards): Streaming decompresses each
``shard.N.mds.zstd`` into ``shard.N.mds`` beside it on first read and reads that copy from then on,
so a damaged copy must be found by ``verify``, by the trainer's start-up check, by ``validate_hash``,
or, while training, stop the run with one line that names the shard.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep import mds
from data_prep.verify import verify
from pipeline.rows import RowReader, ShardReadError, packed_rows_dataset_class
from pipeline.trainer import ConfigError, load_config
from pipeline.trainer.run_inputs import resolve_run_inputs
from tests.factories import N_WORDS, YAMLS, tiny_overrides, write_tokenizer
from tests.pipeline.trainer.launch import records, run_launch, train_command

SEQ_LEN = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """(data_prep output with ~10 zstd shards per split, its tokenizer); copy it before damaging it."""
    from data_prep.convert import convert

    root = tmp_path_factory.mktemp("prepared")
    tok = write_tokenizer(root / "tokenizer.json")
    rng = np.random.default_rng(0)
    with open(root / "corpus.jsonl", "w") as f:
        for _ in range(600):  # arithmetic progressions of words: learnable, like the tiny fixture
            a, d, n = rng.integers(0, N_WORDS), rng.integers(1, 4), rng.integers(6, 80)
            f.write(json.dumps({"text": " ".join(f"w{(a + d * i) % N_WORDS}" for i in range(n))}) + "\n")
    out = root / "data"
    convert(
        [str(root / "corpus.jsonl")],
        str(out),
        str(tok),
        SEQ_LEN,
        val_docs=60,
        workers=1,
        compression="zstd",
        shard_size_limit=1 << 12,
        progress=False,
    )
    return out, tok


def copy_of(prepared, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(prepared[0], data)
    return data


def shards(data: Path, split: str = "train") -> list[dict]:
    return mds.read_index(data / split)["shards"]


def read_all_rows(data: Path, split: str = "train") -> list[np.ndarray]:
    """Every row through Streaming, which leaves a decompressed copy beside each compressed shard."""
    reader = RowReader(data, split)
    return [reader.dataset[i]["input_ids"].numpy() for i in range(len(reader))]


def copy_path(data: Path, shard: dict, split: str = "train") -> Path:
    return data / split / shard["raw_data"]["basename"]


def flip_byte(path: Path, offset: int = -40) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_the_fixture_has_compressed_shards_and_copies_appear_on_read(prepared, tmp_path):
    data = copy_of(prepared, tmp_path)
    entries = shards(data)
    assert len(entries) >= 4 and all(e.get("zip_data") for e in entries)
    assert not any(copy_path(data, e).exists() for e in entries)
    read_all_rows(data)
    assert all(copy_path(data, e).stat().st_size == e["raw_data"]["bytes"] for e in entries)
    assert verify(data).ok


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_verify_checks_the_decompressed_copies(prepared, tmp_path, damage):
    data = copy_of(prepared, tmp_path)
    read_all_rows(data)
    bad = copy_path(data, shards(data)[2])
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        flip_byte(bad)
    report = verify(data)
    assert not report.ok
    mine = [e for e in report.errors if str(bad) in e]
    assert len(mine) == 1, report.errors
    assert ("bytes" if damage == "truncate" else "sha1 hash") in mine[0] and "delete it" in mine[0]
    bad.unlink()  # the fix the message gives: Streaming recreates the copy
    assert verify(data).ok
    read_all_rows(data)
    assert verify(data).ok


def test_verify_names_a_damaged_compressed_shard_and_the_fix(prepared, tmp_path):
    data = copy_of(prepared, tmp_path)
    zipped = data / "train" / shards(data)[1]["zip_data"]["basename"]
    flip_byte(zipped, offset=len(zipped.read_bytes()) // 2)
    report = verify(data)
    assert not report.ok and any(str(zipped) in e and "--overwrite" in e for e in report.errors)


def config(data: Path, tok: Path, tmp_path: Path, *extra: str):
    overrides = tiny_overrides(data, tok, tmp_path / "run", f"variables.max_seq_len={SEQ_LEN}", *extra)
    return load_config(YAMLS / "bd3_tiny.yaml", overrides, world_size=1)


def test_startup_check_reads_the_decompressed_copies(prepared, tmp_path):
    data = copy_of(prepared, tmp_path)
    cfg = config(data, prepared[1], tmp_path)
    resolve_run_inputs(cfg)  # compressed shards only
    read_all_rows(data)
    resolve_run_inputs(cfg)  # with complete copies
    bad = copy_path(data, shards(data)[3])
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ConfigError) as e:
        resolve_run_inputs(cfg)
    assert e.value.key == "train_loader.local" and str(bad) in str(e.value) and "delete it" in str(e.value)

    # The same through the CLI: one line, exit code 2, before any model is built.
    cmd, env = train_command(
        (data, prepared[1]), tmp_path / "cli", f"variables.max_seq_len={SEQ_LEN}", nproc=0
    )
    p = run_launch(cmd, env, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: train_loader.local:") and str(bad) in last


def test_validate_hash_catches_a_damaged_copy_the_size_check_cannot_see(prepared, tmp_path):
    data = copy_of(prepared, tmp_path)
    clean = read_all_rows(data)
    entry = shards(data)[2]
    bad = copy_path(data, entry)
    flip_byte(bad)  # same size: the start-up check passes
    resolve_run_inputs(config(data, prepared[1], tmp_path))
    dataset_class = packed_rows_dataset_class()
    first = sum(e["samples"] for e in shards(data)[:2])  # the first row of the damaged shard
    plain = dataset_class(seq_len=SEQ_LEN, local=str(data / "train"), split=None, shuffle=False, batch_size=1)
    assert not all(  # without the check Streaming serves the damaged bytes silently
        np.array_equal(plain[i]["input_ids"].numpy(), clean[i])
        for i in range(first, first + entry["samples"])
    )
    checked = dataset_class(
        seq_len=SEQ_LEN,
        local=str(data / "train"),
        split=None,
        shuffle=False,
        batch_size=1,
        validate_hash="sha1",
    )
    assert np.array_equal(checked[0]["input_ids"].numpy(), clean[0])
    with pytest.raises(ShardReadError, match="sha1 hash does not match") as e:
        checked[first]
    assert str(bad) in str(e.value)

    with pytest.raises(ConfigError) as e:
        resolve_run_inputs(config(data, prepared[1], tmp_path, "train_loader.validate_hash=md5"))
    assert e.value.key == "train_loader.validate_hash" and "sha1" in str(e.value)


def test_a_shard_deleted_while_reading_names_the_shard(prepared, tmp_path):
    """Also through a DataLoader worker, whose error comes back wrapped in its traceback."""
    from torch.utils.data import DataLoader

    data = copy_of(prepared, tmp_path)
    dataset = packed_rows_dataset_class()(
        seq_len=SEQ_LEN, local=str(data / "train"), split=None, shuffle=False, batch_size=8
    )
    assert dataset[0]["input_ids"].shape == (SEQ_LEN,)
    last = shards(data)[-1]
    gone = data / "train" / last["zip_data"]["basename"]
    gone.unlink()
    copy_path(data, last).unlink(missing_ok=True)
    with pytest.raises(ShardReadError) as e:
        dataset[dataset.num_samples - 1]
    assert str(gone) in str(e.value) and "data_prep verify" in str(e.value)

    loader = DataLoader(dataset, batch_size=8, num_workers=1)
    with pytest.raises(ShardReadError) as e:
        for _ in loader:
            pass
    line = ShardReadError.one_line(e.value)
    assert "\n" not in line and line.startswith(f"shard {gone}")


@pytest.mark.slow
def test_a_shard_failing_mid_run_stops_cleanly_and_resumes_exactly(prepared, tmp_path):
    """A shard whose bytes were replaced (same size, so the start-up check passes) fails when training
    reaches it: exit code 4, the last line names the shard and the checkpoint; after the repair the
    same command resumes and ends with the losses of an undamaged run."""
    common = [
        f"variables.max_seq_len={SEQ_LEN}",
        "max_duration=24ba",
        "scheduler.t_max=24ba",
        "eval_loader=null",
        "run_name=integrity",
        "save_interval=4ba",
        "train_loader.shuffle=false",
        "train_loader.predownload=32",  # Streaming prepares shards this many rows ahead
    ]
    data = copy_of(prepared, tmp_path)
    reference_cmd, env = train_command((data, prepared[1]), tmp_path / "ref", *common, nproc=0)
    p = run_launch(reference_cmd, env)
    assert p.returncode == 0, p.stderr[-3000:]
    reference = [(r["batch"], r["loss/train/total"]) for r in records(tmp_path / "ref" / "loss.jsonl")]

    damaged = copy_of(prepared, tmp_path / "d")
    entries = shards(damaged)
    rows_per_batch = 16
    # A shard that the prefetch reaches after the checkpoint of batch 12 and training before batch 24.
    k = next(
        i for i, e in enumerate(entries) if sum(x["samples"] for x in entries[:i]) >= 16 * rows_per_batch
    )
    assert sum(x["samples"] for x in entries[:k]) < 22 * rows_per_batch
    zipped = damaged / "train" / entries[k]["zip_data"]["basename"]
    original = zipped.read_bytes()
    zipped.write_bytes(np.random.default_rng(0).bytes(len(original)))  # not a zstd frame any more
    cmd, env = train_command((damaged, prepared[1]), tmp_path / "run", *common, nproc=0)
    p = run_launch(cmd, env)
    assert p.returncode == 4, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"training stopped: shard {zipped}") and "data_prep verify" in last
    assert "The last good checkpoint is" in last and "Traceback" in p.stderr  # the traceback goes first
    assert "exception calling callback" not in p.stderr  # (Streaming's threads report nothing twice)
    stopped = records(tmp_path / "run" / "loss.jsonl")
    assert 12 <= len(stopped) < 24

    zipped.write_bytes(original)  # the repair
    copy_path(damaged, entries[k]).unlink(missing_ok=True)
    p = run_launch(cmd, env)
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = {}
    for r in records(tmp_path / "run" / "loss.jsonl"):
        resumed[r["batch"]] = r["loss/train/total"]  # a replayed batch overwrites its first record
    assert sorted(resumed.items()) == reference


def test_a_shard_failing_in_a_background_thread_is_raised_by_the_reader_and_logged_by_nobody(
    prepared, tmp_path
):
    """Streaming prepares shards on background threads too; one that fails there must reach the reader
    as the same ShardReadError, and nothing may print it later (``concurrent.futures`` logged it from
    a done-callback at any moment, once after training's last line)."""
    import logging
    import time

    data = copy_of(prepared, tmp_path)
    last = shards(data)[-1]
    zipped = data / "train" / last["zip_data"]["basename"]
    zipped.write_bytes(np.random.default_rng(0).bytes(zipped.stat().st_size))  # not a zstd frame
    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append
    futures_log = logging.getLogger("concurrent.futures")
    futures_log.addHandler(handler)
    try:
        dataset = packed_rows_dataset_class()(
            seq_len=SEQ_LEN, local=str(data / "train"), split=None, shuffle=False, batch_size=8
        )
        with pytest.raises(ShardReadError) as e:
            for _ in dataset:
                time.sleep(0.002)  # the reader lags behind the background threads
        assert str(e.value).startswith(f"shard {zipped}: ") and "data_prep verify" in str(e.value)
        time.sleep(1.0)  # the background threads have long ended
    finally:
        futures_log.removeHandler(handler)
    assert [r.getMessage() for r in logged] == []
