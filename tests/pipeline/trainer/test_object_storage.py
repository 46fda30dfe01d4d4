"""Training against a real S3 API (moto's server on 127.0.0.1, fixture ``s3``): data read from the
bucket through a node-local cache, checkpoints written to and resumed from the bucket.

Every byte goes through boto3 and HTTP; nothing in the project is patched.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from data_prep import mds
from data_prep.remote import upload_tree
from pipeline.eval import main as eval_main
from pipeline.export import main as export_main
from pipeline.model import from_pretrained
from pipeline.sample import main as sample_main
from pipeline.save_folder import LATEST, REMOTE_LATEST
from pipeline.trainer import ConfigError, load_config
from pipeline.trainer.run_inputs import resolve_run_inputs
from tests.factories import REPO, YAMLS, tiny_overrides
from tests.pipeline.trainer.launch import (
    FULL,
    MIXED,
    UNIVERSAL_LINE,
    assert_block_sizes_drawn,
    assert_downstream_split,
    assert_same_curve,
    assert_same_downstream,
    assert_same_evaluation,
    assert_same_optimizer_state,
    assert_same_run,
    command,
    copy_run_until,
    downstream,
    kill_a_rank_after,
    last_batch,
    launch,
    mixture,
    optimizer_state,
    rank_logs,
    records,
    run_launch,
    run_to_end,
    same_reference,
    started,
    train_command,
)
from tests.s3 import SECRET


def assert_no_secret(s3, prefix: str, tmp_path) -> None:
    """The secret access key is in no file under tmp_path (logs, checkpoints, caches, exports) and in
    no object under ``prefix`` of the bucket ("": all of it)."""
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked + [k for k in s3.keys(prefix) if SECRET.encode() in s3.get(k)] == []


def test_missing_bucket_or_credentials_is_a_config_error_before_any_model(
    tiny_data, tmp_path, s3, monkeypatch
):
    data, tok = tiny_data

    def inputs(remote):
        overrides = tiny_overrides(data, tok, tmp_path / "ckpt", f"variables.data_remote={remote}")
        cfg = load_config(YAMLS / "bd3_tiny.yaml", [*overrides, f"variables.data_local={tmp_path / 'cache'}"])
        return resolve_run_inputs(cfg)

    with pytest.raises(
        ConfigError,
        match=r"train_loader.remote.*bucket s3://no-such-bucket at http://127.0.0.1:\d+ does not exist",
    ):
        inputs("s3://no-such-bucket/owt")
    upload_tree(data, f"{s3.uri}/owt")
    assert inputs(f"{s3.uri}/owt")  # the same config with the right bucket passes
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="train_loader.remote.*no credentials"):
        inputs(f"{s3.uri}/owt")


def test_wrong_credentials_are_a_config_error_naming_the_key(tiny_data, tmp_path, monkeypatch):
    """A server that checks signatures (moto with IAM on, its own port): the user's key passes, a
    wrong secret or an unknown key id is a config error on the key that names the remote, and the
    message holds no secret."""
    from tests.s3 import MotoS3

    data, tok = tiny_data
    server = MotoS3().start()
    try:
        bucket = server.new_bucket()
        good = server.require_signatures()
        for key, value in good.items():
            monkeypatch.setenv(key, value)

        def inputs():
            overrides = tiny_overrides(data, tok, f"s3://{bucket}/runs/x")
            return resolve_run_inputs(load_config(YAMLS / "bd3_tiny.yaml", overrides))

        assert inputs()  # the user's own key
        for key_id, secret in ((good["AWS_ACCESS_KEY_ID"], SECRET), ("AKIAUNKNOWN0000000000", SECRET)):
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            with pytest.raises(ConfigError, match=rf"save_folder.*access to s3://{bucket} at .* denied") as e:
                inputs()
            assert secret not in str(e.value) and good["AWS_SECRET_ACCESS_KEY"] not in str(e.value)
    finally:
        server.allow_anyone()
        server.stop()


@pytest.mark.xdist_group("ddp_run")
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_with_data_and_checkpoints_on_s3_match_the_local_run(tiny_data, tmp_path, s3, ddp_run):
    """2 processes (DDP), data read from the bucket through a node cache, save_folder in the bucket,
    stopped at batch 10 and autoresumed from the bucket to 20: the losses equal, bit for bit, those of
    an uninterrupted run on the local copy (the session's ``ddp_run``, which also ran the evaluation
    callbacks, which leave training bitwise unchanged, and was started by the repository's ``launch``
    file: it trains like ``-m pipeline.train``, used here); rotation keeps one remote checkpoint; export, eval and
    sample read ``--checkpoint s3://...``; the secret key is in no file any of it wrote."""
    ddp_run, _ = ddp_run
    data, _ = tiny_data
    upload_tree(data, f"{s3.uri}/owt")
    run_uri, cache = f"{s3.uri}/runs/ddp", tmp_path / "cache"
    remote = (
        f"variables.data_remote={s3.uri}/owt",
        f"variables.data_local={cache}",
        f"variables.save_folder={run_uri}",
        "save_interval=5ba",
        f"loggers.tensorboard.log_dir={tmp_path / 'tb'}",  # (the default is under the working directory)
        *MIXED,
    )
    launch(tiny_data, tmp_path / "remote", *remote, "max_duration=10ba")
    stored = s3.keys("runs/ddp/")
    assert {"runs/ddp/ep0-ba10-rank0.pt", "runs/ddp/hf_config.json", "runs/ddp/tokenizer.json"} <= set(stored)
    assert "runs/ddp/ep0-ba5-rank0.pt" not in stored  # rotated: save_num_checkpoints_to_keep=1
    assert s3.get("runs/ddp/latest-rank0.pt.symlink").decode().endswith("ep0-ba10-rank0.pt")
    launch(tiny_data, tmp_path / "remote", *remote)  # autoresume from the bucket
    local, resumed = records(ddp_run / "loss.jsonl"), records(tmp_path / "remote" / "loss.jsonl")
    assert [r["batch"] for r in resumed] == list(range(1, 21))
    assert [r["loss/train/total"] for r in resumed] == [r["loss/train/total"] for r in local]
    assert [k for k in s3.keys("runs/ddp/") if k.endswith(".pt")] == ["runs/ddp/ep1-ba20-rank0.pt"]
    assert not (REPO / f"s3:/{s3.name}").exists()  # Composer's autoresume copy was removed after loading
    # Both runs' TensorBoard files were copied under the run, as a local save_folder would hold them.
    events = {p: p.stat().st_size for p in (tmp_path / "tb" / "dist-test").iterdir()}
    assert len(events) >= 2 and all(events.values())
    assert s3.keys("runs/ddp/tensorboard/") == {
        f"runs/ddp/tensorboard/dist-test/{p.name}": n for p, n in events.items()
    }
    # The run read the bucket: the shards it trained on are now in the (empty before) node cache.
    index = mds.read_index(data / "train")
    assert all((cache / "train" / mds.stored_file(s)["basename"]).is_file() for s in index["shards"])

    # Export from the bucket = export of the local run's checkpoint, bit for bit.
    for name, ckpt in (("from_s3", run_uri), ("from_local", str(ddp_run / "ckpt"))):
        assert export_main(["--checkpoint", ckpt, "--trust-checkpoint", "--out", str(tmp_path / name)]) == 0
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("from_s3", "from_local"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    common = ["--data", str(data), "--block-sizes", "1,4", "--max-rows", "8", "--trust-checkpoint"]
    assert eval_main(["--checkpoint", run_uri, *common, "--out", str(tmp_path / "eval.json")]) == 0
    sample = ["--max-new-tokens", "8", "--seed", "3", "--trust-checkpoint", "--device", "cpu"]
    assert sample_main(["--checkpoint", run_uri, *sample, "--out", str(tmp_path / "sample.json")]) == 0
    assert len(json.loads((tmp_path / "sample.json").read_text())["tokens"]) > 0

    # The secret access key is in no log, checkpoint, cache, export or object the runs wrote.
    assert_no_secret(s3, "", tmp_path)


@same_reference("zero2")
@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero2_on_s3_survives_a_rank_killed_mid_upload_and_at_a_random_batch(
    tiny_data, tmp_path, s3, reference, kill_rng
):
    """ZeRO-2, 2 processes, the mixture's stream ``a`` and save_folder in the bucket (``web`` local), a
    checkpoint every 3 batches. Run 1
    has rank 1 SIGKILLed right after uploading its batch-9 partition (rank 0's Composer file never
    follows); run 2 resumes from the bucket's latest complete checkpoint and has a rank SIGKILLed at
    a random batch (seeded); run 3 finishes. The partial batch-9 tag is never taken as the latest; every batch's rows and losses
    and the final weights equal the uninterrupted local ZeRO-2 run (``reference("zero2")``);
    rotation leaves one checkpoint with its partitions; the export of the bucket is the local one."""
    ref = reference("zero2")
    data, _ = tiny_data
    upload_tree(data, f"{s3.uri}/owt")
    run_uri, out = f"{s3.uri}/runs/zero2", tmp_path / "remote"
    cmd, env = command(
        tiny_data,
        out,
        "zero2",
        *mixture(tiny_data, local_a=tmp_path / "cache", remote_a=f"{s3.uri}/owt"),
        f"variables.save_folder={run_uri}",
        "loggers.tensorboard=null",
    )
    assert run_to_end(cmd, env, out, fault="kill@deepspeed_upload:9:1").returncode != 0
    stored = s3.keys("runs/zero2/")
    assert any(k.startswith("runs/zero2/deepspeed/ba9/zero_pp_rank_1_") for k in stored)  # partial tag
    assert not any("ba9-rank0.pt" in k for k in stored)
    link = "runs/zero2/latest-rank0.pt.symlink"  # uploaded once every file it names is stored
    if link in stored:  # (Composer checks for that between batches, so batch 6's may not be there yet)
        assert s3.get(link).decode().endswith(("ep0-ba3-rank0.pt", "ep0-ba6-rank0.pt"))
    with started(cmd, env, out) as proc:  # resumes from the latest; killed inside a batch or a save
        logged = kill_a_rank_after(proc, out, kill_rng.randint(10, 16), kill_rng, max_delay=0.3)
        assert logged is not None, (out / "launcher.log").read_text()[-3000:] + rank_logs(out)
        proc.wait(timeout=120)
    print(f"\nkilled after batch {logged}; objects {sorted(s3.keys('runs/zero2/'))}")
    assert last_batch(out / "loss.jsonl") < 20, "finished before the kill"
    p = run_to_end(cmd, env, out)
    assert p.returncode == 0, p.stderr[-3000:] + rank_logs(out)
    assert_same_run(ref, out)
    after = set(s3.keys("runs/zero2/"))
    assert {k for k in after if k.endswith(".pt") and "/deepspeed/" not in k} == {
        "runs/zero2/ep0-ba20-rank0.pt"  # the mixture's epoch is 320 rows: batch 20 is in epoch 0
    }
    assert {k.split("/")[3] for k in after if "/deepspeed/" in k} == {"ba20"}
    assert s3.get("runs/zero2/latest-rank0.pt.symlink").decode().endswith("ep0-ba20-rank0.pt")
    for name, ckpt in (("from_s3", run_uri), ("from_local", str(ref / "ckpt"))):
        assert export_main(["--checkpoint", ckpt, "--out", str(tmp_path / name)]) == 0
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("from_s3", "from_local"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_no_secret(s3, "runs/zero2/", tmp_path)


@pytest.mark.slow
def test_store_stopped_mid_run_fails_with_one_line_and_the_run_resumes_later(
    tiny_data, tmp_path, s3, monkeypatch
):
    """The S3 server goes away after batch 2 of a run saving every 3 batches: the save fails after
    the retries with exit code 5 and one `training stopped:` line; with a server back (same
    objects), the latest symlink, if any, names a complete checkpoint and the same command finishes."""
    from tests.s3 import MotoS3

    private = MotoS3().start()
    monkeypatch.setenv("S3_ENDPOINT_URL", private.endpoint)
    run_uri = f"{s3.uri}/runs/stopped"
    cmd, env = train_command(
        tiny_data,
        tmp_path,
        f"variables.save_folder={run_uri}",
        "save_interval=3ba",
        "loggers.tensorboard=null",
        nproc=0,
    )
    with started(cmd, env, tmp_path) as proc:
        while last_batch(tmp_path / "loss.jsonl") < 2:
            assert proc.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            time.sleep(0.02)
        private.stop()
        assert proc.wait(timeout=600) == 5
    log = (tmp_path / "launcher.log").read_text()
    stopped = [line for line in log.splitlines() if line.startswith("training stopped:")]
    assert len(stopped) == 1 and stopped[0].startswith(
        f"training stopped: saving to {run_uri} failed after retries"
    )
    assert last_batch(tmp_path / "loss.jsonl") < 20
    back = MotoS3().start()  # moto keeps the objects in this process: the store comes back as it was
    try:
        env["S3_ENDPOINT_URL"] = back.endpoint
        stored = s3.keys("runs/stopped/")
        if "runs/stopped/latest-rank0.pt.symlink" in stored:
            named = s3.get("runs/stopped/latest-rank0.pt.symlink").decode().strip()
            assert named in stored and stored[named] > 0
        p = run_launch(cmd, env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert last_batch(tmp_path / "loss.jsonl") == 20
    finally:
        back.stop()


def stored_checkpoints(s3, run: str) -> set[str]:
    """The checkpoint objects under ``run`` (``runs/NAME/``), relative to it, without the run's files."""
    return {k[len(run) :] for k in s3.keys(run) if k.startswith(f"{run}ep") or "/deepspeed/" in k}


def assert_same_adam(s3, run: str, one_process_ckpt, tmp_path) -> None:
    """Adam's state in the bucket's batch-20 checkpoint equals the 1-process run's: it continued
    across the world-size switches, it did not restart."""
    local = tmp_path / "downloaded"
    for key in s3.keys(run):
        (local / key[len(run) :]).parent.mkdir(parents=True, exist_ok=True)
        (local / key[len(run) :]).write_bytes(s3.get(key))
    assert_same_optimizer_state(
        optimizer_state(one_process_ckpt, 20, tmp_path), optimizer_state(local, 20, tmp_path)
    )


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero1_checkpoints_to_s3_switch_world_size_resume_and_export(tiny_data, tmp_path, s3, one_process):
    """ZeRO-1, 2 processes, save_folder in the bucket, a save every 5 batches, stopped at 10, continued
    from the bucket on 1 process to 15 (through universal checkpoints converted on the node), then on 2
    again to 20: the rows equal and the curve agrees with the 1-process run, and so does Adam's state
    at 20 after the switches; rotation left only batch 10's (then 20's) checkpoint with its partitions;
    ``pipeline.export --checkpoint s3://...`` holds the 1-process weights. (The data is local here:
    reading the bucket is the DDP test's.)"""
    run_uri, run = f"{s3.uri}/runs/zero1", "runs/zero1/"
    remote = (
        "parallelism.deepspeed.zero_optimization.stage=1",
        f"variables.save_folder={run_uri}",
        "save_interval=5ba",
        "loggers.tensorboard=null",
    )
    launch(tiny_data, tmp_path, *remote, "max_duration=10ba")
    assert s3.get(f"{run}latest-rank0.pt.symlink").decode() == f"{run}ep0-ba10-rank0.pt"
    stored = stored_checkpoints(s3, run)
    assert {k for k in stored if not k.startswith("deepspeed/")} == {"ep0-ba10-rank0.pt"}
    assert {k.split("/")[1] for k in stored if k.startswith("deepspeed/")} == {"ba10"}
    per_rank = {f"deepspeed/ba10/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)}
    assert not per_rank & stored  # (ZeRO-1/2 keep the model states in rank 0's file)
    # elastic: the same command on 1 process to batch 15, then 2 again
    p = launch(tiny_data, tmp_path, *remote, "max_duration=15ba", nproc=0)
    assert UNIVERSAL_LINE in p.stdout + p.stderr, p.stderr[-3000:]
    p = launch(tiny_data, tmp_path, *remote)  # the same command to 20 batches: autoresume from the bucket
    assert UNIVERSAL_LINE in p.stdout + p.stderr + rank_logs(tmp_path)
    two = records(tmp_path / "loss.jsonl")
    assert_same_curve(one_process[0], two)
    assert [r["rows"] for r in two] == [r["rows"] for r in one_process[0]]
    assert_same_adam(s3, run, one_process[2], tmp_path)
    after = stored_checkpoints(s3, run)
    assert after and all(k.startswith(("ep1-ba20", "deepspeed/ba20/")) for k in after), after

    assert (
        export_main(["--checkpoint", run_uri, "--trust-checkpoint", "--out", str(tmp_path / "export")]) == 0
    )
    exported = from_pretrained(tmp_path / "export").state_dict()
    for k, v in one_process[1].items():
        torch.testing.assert_close(exported[k], v, rtol=1e-4, atol=1e-5)
    card = (tmp_path / "export" / "README.md").read_text()  # its training section reads run_config.json
    assert "- parallelism: DeepSpeed ZeRO-1\n" in card
    assert_no_secret(s3, run, tmp_path)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_on_s3_switches_world_size_and_sharding_and_matches_one_process(
    tiny_data, tmp_path, s3, one_process_full, capsys
):
    """FSDP2 with ``launch.FULL`` (several block sizes, the evaluation callbacks) and the downstream
    (lm-eval) callback, save_folder in the bucket, a save every 5 batches (two kept): FULL_SHARD on 2
    processes to batch 10, continued from the bucket on 1 process to 15, then SHARD_GRAD_OP on 2 to
    20. The rows equal the 1-process run's and the curve, the block sizes drawn, Adam's state at 20
    and the evaluations at batch 20 (likelihood; downstream tasks split over the ranks) agree with
    it; each checkpoint is a shard folder (a shard per rank); the callback's Hugging Face export
    (gathered full state dict) holds the 1-process weights and the trained sizes;
    ``pipeline.export --checkpoint s3://...`` gathers the shards of the latest checkpoint in one
    process into the callback's weights bit for bit, and ``--batch`` picks another one."""
    import json

    run_uri, run = f"{s3.uri}/runs/fsdp2", "runs/fsdp2/"
    tb = tmp_path / "tb"
    remote = (
        f"variables.save_folder={run_uri}",
        "save_interval=5ba",
        "save_num_checkpoints_to_keep=2",
        f"loggers.tensorboard.log_dir={tb}",
        *downstream(tiny_data, tmp_path),  # with the hf_export of tmp_path/hf
    )
    sharding = "parallelism.fsdp.sharding_strategy="
    launch(tiny_data, tmp_path, f"{sharding}FULL_SHARD", *remote, "max_duration=10ba", common=FULL)
    assert s3.get(f"{run}latest-rank0.pt.symlink").decode() == f"{run}ep0-ba10"
    shards = {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert stored_checkpoints(s3, run) == {f"ep0-ba{b}/{f}" for b in (5, 10) for f in shards}
    p = launch(
        tiny_data, tmp_path, f"{sharding}FULL_SHARD", *remote, "max_duration=15ba", nproc=0, common=FULL
    )
    assert UNIVERSAL_LINE not in p.stdout + p.stderr  # (DeepSpeed's; FSDP2 shards load on any world size)
    p = launch(tiny_data, tmp_path, f"{sharding}SHARD_GRAD_OP", *remote, common=FULL)
    output = p.stdout + p.stderr
    one, two = one_process_full[0], records(tmp_path / "loss.jsonl")
    assert_same_curve(one, two)
    assert [r["rows"] for r in two] == [r["rows"] for r in one]
    assert_block_sizes_drawn(one, two, {b: 1 if 10 < b <= 15 else 2 for b in range(1, 21)})
    assert_same_evaluation(one_process_full[3], tmp_path, output, tensorboard=tb)
    assert_same_downstream(tiny_data, tmp_path, tensorboard=tb)
    assert_downstream_split(output)  # on a copy of the full weights, gathered once
    assert_same_adam(s3, run, one_process_full[2], tmp_path)
    one_shard = {".metadata", "__0_0.distcp"}  # batch 15's, written by 1 process
    assert stored_checkpoints(s3, run) == {f"ep0-ba15/{f}" for f in one_shard} | {
        f"ep1-ba20/{f}" for f in shards
    }

    bd3 = json.loads((tmp_path / "hf" / "config.json").read_text())["bd3"]
    assert bd3["block_size"] == 2 and bd3["trained_block_sizes"] == [2, 4, 8]
    exported = from_pretrained(tmp_path / "hf").state_dict()
    for k, v in one_process_full[1].items():
        torch.testing.assert_close(exported[k], v, rtol=1e-4, atol=1e-5)
    args = ["--checkpoint", run_uri, "--trust-checkpoint", "--out"]
    assert export_main([*args, str(tmp_path / "export")]) == 0
    from_shards = from_pretrained(tmp_path / "export").state_dict()
    assert from_shards.keys() == exported.keys()
    assert all(torch.equal(from_shards[k], exported[k]) for k in exported)
    card = (tmp_path / "export" / "README.md").read_text()  # its training section reads run_config.json
    assert "- parallelism: FSDP\n" in card
    assert export_main([*args, str(tmp_path / "export15"), "--batch", "15"]) == 0  # the 1-process run's
    at15 = from_pretrained(tmp_path / "export15").state_dict()
    assert not all(torch.equal(at15[k], exported[k]) for k in exported)
    assert export_main([*args, str(tmp_path / "export7"), "--batch", "7"]) == 2
    assert "no checkpoint of batch 7" in capsys.readouterr().err
    # eval reads the shards of the bucket's latest checkpoint too
    common = ["--data", str(tiny_data[0]), "--block-sizes", "4", "--max-rows", "8"]
    assert (
        eval_main(
            ["--checkpoint", run_uri, "--trust-checkpoint", *common, "--out", str(tmp_path / "eval.json")]
        )
        == 0
    )
    assert_no_secret(s3, run, tmp_path)


@same_reference("zero3")
@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_resumes_from_the_bucket_and_saves_each_ranks_model_states(tiny_data, tmp_path, s3, reference):
    """ZeRO-3, 2 processes, save_folder in the bucket: the bucket holds the uninterrupted ZeRO-3 run
    (``reference("zero3")``) as it was after batch 10, laid out as a save to it leaves it (its files,
    its DeepSpeed tag, the latest symlink object last); the same recipe autoresumes from there to 20,
    saving every 5 batches. Every batch's rows and losses and the final weights equal the
    uninterrupted run's exactly; the bucket keeps only batch 20's checkpoint (rotation removed 10 and
    15), with each rank's model states (ZeRO-3's own files); ``pipeline.export --checkpoint s3://...``
    equals the export of the local run's checkpoint, bit for bit."""
    ref = reference("zero3")
    seeded = tmp_path / "seeded"
    copy_run_until(ref, seeded, 10)
    run_uri, run = f"{s3.uri}/runs/zero3", "runs/zero3/"
    latest = seeded / "ckpt" / LATEST
    target = latest.readlink().name
    latest.unlink()
    upload_tree(seeded / "ckpt", run_uri, last=())
    s3.put(f"{run}{REMOTE_LATEST}", f"{run}{target}".encode())

    out = tmp_path / "remote"
    out.mkdir()
    (out / "loss.jsonl").write_bytes((seeded / "loss.jsonl").read_bytes())
    cmd, env = command(
        tiny_data,
        out,
        "zero3",
        f"variables.save_folder={run_uri}",
        "save_interval=5ba",
        "loggers.tensorboard=null",
    )
    p = run_to_end(cmd, env, out)
    assert p.returncode == 0, p.stderr[-3000:] + rank_logs(out)
    # It resumed from the bucket's batch 10: it logged batches 11-20 once, after the seeded 1-10.
    assert [r["batch"] for r in records(out / "loss.jsonl")] == list(range(1, 21))
    assert_same_run(ref, out)
    stored = {k[len(run) :] for k in s3.keys(run) if k.startswith(f"{run}ep") or "/deepspeed/" in k}
    assert {k for k in stored if not k.startswith("deepspeed/")} == {"ep1-ba20-rank0.pt"}, stored
    assert {k.split("/")[1] for k in stored if k.startswith("deepspeed/")} == {"ba20"}
    assert {f"deepspeed/ba20/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)} <= stored
    assert s3.get(f"{run}{REMOTE_LATEST}").decode() == f"{run}ep1-ba20-rank0.pt"
    for name, ckpt in (("from_s3", run_uri), ("from_local", str(ref / "ckpt"))):
        assert export_main(["--checkpoint", ckpt, "--trust-checkpoint", "--out", str(tmp_path / name)]) == 0
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("from_s3", "from_local"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "- parallelism: DeepSpeed ZeRO-3\n" in (tmp_path / "from_s3" / "README.md").read_text()
    assert_no_secret(s3, run, tmp_path)
