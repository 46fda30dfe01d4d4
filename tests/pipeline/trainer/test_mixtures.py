"""Data mixtures (``train_loader.streams``): the share of each stream in the rows a run reads (rows told
apart by their tokens), Streaming's own weights for repeat/choose, and the config errors of streams that
do not fit together, all in one process and before any model is built."""

from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import pytest

from pipeline.trainer import ConfigError, load_config
from pipeline.trainer.data import build_dataloader
from pipeline.trainer.run_inputs import resolve_run_inputs
from tests.factories import (
    SEQ_LEN,
    YAMLS,
    mixture_overrides,
    packed_rows,
    rows_by_content,
    tiny_overrides,
    write_data_folder,
    write_stream_folder,
    write_tokenizer,
)


@pytest.fixture(scope="module")
def streams(tiny_data, tmp_path_factory):
    """{name: folder}: the tiny data (a, 256 train rows) and two compatible folders (b: 128, c: 64)."""
    data, tok = tiny_data
    root = tmp_path_factory.mktemp("streams")
    return {
        "a": data,
        "b": write_stream_folder(root / "b", tok, 1, train_rows=128),
        "c": write_stream_folder(root / "c", tok, 2, train_rows=64),
    }


def _config(tiny_data, tmp_path, weights: dict, *extra):
    data, tok = tiny_data
    mixture = mixture_overrides(weights)
    return load_config(YAMLS / "bd3_tiny.yaml", tiny_overrides(data, tok, tmp_path / "run", *mixture, *extra))


def _shares(cfg, lookup, epochs: int) -> tuple[collections.Counter, int]:
    """Rows read per stream (by content) over ``epochs`` passes of the training loader, and the rows."""
    loader = build_dataloader(cfg.train_loader, seq_len=SEQ_LEN, batch_size=cfg.global_train_batch_size)
    counts = collections.Counter()
    for _ in range(epochs):
        for batch in loader.dataloader:
            counts.update(lookup[row.numpy().tobytes()] for row in batch["input_ids"])
    return counts, sum(counts.values())


@pytest.mark.parametrize(
    "proportions", [{"a": 0.7, "b": 0.3}, {"a": 0.2, "b": 0.5, "c": 0.3}], ids=["two", "three"]
)
def test_each_stream_gets_its_proportion_of_the_rows(tiny_data, streams, tmp_path, proportions):
    """c (64 rows) at 0.3 and b (128) at 0.5 are oversampled: Streaming repeats them within an epoch."""
    weights = {name: (streams[name], p) for name, p in proportions.items()}
    cfg = _config(tiny_data, tmp_path, weights)
    inputs = resolve_run_inputs(cfg)
    assert list(inputs.streams) == list(proportions)
    lookup = rows_by_content({name: streams[name] for name in proportions})
    counts, total = _shares(cfg, lookup, epochs=3)
    assert total >= 1000
    print(
        f"\n{total} rows read:",
        ", ".join(f"{n} {counts[n] / total:.4f} (asked {p})" for n, p in proportions.items()),
    )
    for name, p in proportions.items():
        assert abs(counts[name] / total - p) <= 0.02, (name, counts[name] / total, p)


def test_repeat_and_choose_are_streamings_weights(tiny_data, streams, tmp_path):
    """Absolute weights: one epoch holds int(repeat x rows) of a and exactly choose rows of b and all of c."""
    cfg = _config(
        tiny_data,
        tmp_path,
        {"a": (streams["a"], None), "b": (streams["b"], None), "c": (streams["c"], None)},
        "train_loader.streams.a.repeat=0.5",
        "train_loader.streams.b.choose=200",
        "global_train_batch_size=4",
        "device_train_microbatch_size=4",
    )
    lookup = rows_by_content(streams)
    counts, total = _shares(cfg, lookup, epochs=1)
    assert dict(counts) == {"a": 128, "b": 200, "c": 64} and total == 392


def test_one_folder_and_one_stream_read_the_same_rows(tiny_data, tmp_path):
    data, tok = tiny_data
    one = load_config(YAMLS / "bd3_tiny.yaml", tiny_overrides(data, tok, tmp_path / "run"))
    mixture = _config(tiny_data, tmp_path, {"only": (data, None)})
    order = []
    for cfg in (one, mixture):
        loader = build_dataloader(cfg.train_loader, seq_len=SEQ_LEN, batch_size=16).dataloader
        order.append(np.concatenate([b["input_ids"].numpy() for b in loader]))
    np.testing.assert_array_equal(*order)


def _error(tiny_data, tmp_path, weights, *extra) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        resolve_run_inputs(_config(tiny_data, tmp_path, weights, *extra))
    assert "\n" not in str(e.value)
    return e.value


def test_a_stream_with_another_tokenizer_or_seq_len_is_named(tiny_data, streams, tmp_path):
    other_tok = write_tokenizer(tmp_path / "other" / "tokenizer.json", n_words=50)
    other = write_data_folder(tmp_path / "other_tok", {"train": packed_rows(64, 5)}, other_tok)
    e = _error(tiny_data, tmp_path, {"a": (streams["a"], 0.5), "web": (other, 0.5)})
    assert e.key == "train_loader.streams.web" and "tokenizer (sha256)" in str(e) and "'a'" in str(e)
    short = write_data_folder(tmp_path / "short", {"train": packed_rows(64, 5, seq_len=16)}, tiny_data[1])
    e = _error(tiny_data, tmp_path, {"a": (streams["a"], 0.5), "short": (short, 0.5)})
    assert e.key == "train_loader.streams.short" and "seq_len 16" in str(e)
    wide = tmp_path / "wide"
    shutil.copytree(streams["b"], wide)
    manifest = json.loads((wide / "manifest.json").read_text())
    (wide / "manifest.json").write_text(json.dumps({**manifest, "dtype": "uint32"}))
    e = _error(tiny_data, tmp_path, {"a": (streams["a"], 0.5), "wide": (wide, 0.5)})
    assert e.key == "train_loader.streams.wide" and "dtype 'uint32'" in str(e)
    e = _error(tiny_data, tmp_path, {"a": (streams["a"], 0.5), "gone": (tmp_path / "nope", 0.5)})
    assert e.key == "train_loader.streams.gone.local" and "nope" in str(e)


@pytest.mark.parametrize(
    "extra, key, words",
    [
        (["train_loader.streams.b.proportion=0"], "train_loader.streams.b.proportion", "must be > 0"),
        (["train_loader.streams.b.proportion=-0.5"], "train_loader.streams.b.proportion", "must be > 0"),
        (
            ["train_loader.streams.b.proportion=null", "train_loader.streams.b.repeat=2"],
            "train_loader.streams.b",
            "has no proportion but streams.a has one",
        ),
        (["train_loader.streams.b.repeat=2"], "train_loader.streams.b.repeat", "both set"),
        (["train_loader.local=/data"], "train_loader.local", "train_loader.local=null"),
    ],
    ids=["zero", "negative", "mixed", "two_weights", "local_too"],
)
def test_bad_weights_are_config_errors_naming_the_stream(tiny_data, streams, tmp_path, extra, key, words):
    with pytest.raises(ConfigError) as e:
        _config(tiny_data, tmp_path, {"a": (streams["a"], 0.5), "b": (streams["b"], 0.5)}, *extra)
    assert e.value.key == key and words in str(e.value)


def test_a_remote_stream_mixes_with_a_local_one(tiny_data, streams, tmp_path, s3):
    from data_prep.remote import upload_tree

    upload_tree(streams["b"], f"{s3.uri}/b")
    cfg = _config(
        tiny_data,
        tmp_path,
        {"a": (streams["a"], 0.5)},
        f"train_loader.streams.b.remote={s3.uri}/b",
        f"train_loader.streams.b.local={tmp_path / 'cache_b'}",
        "train_loader.streams.b.proportion=0.5",
    )
    assert list(resolve_run_inputs(cfg).streams) == ["a", "b"]
    counts, total = _shares(cfg, rows_by_content({"a": streams["a"], "b": streams["b"]}), epochs=1)
    assert abs(counts["b"] / total - 0.5) <= 0.02


@pytest.mark.parametrize("form", ["stream", "data_remote"])
def test_a_remote_without_manifest_is_one_line_naming_stream_and_url(tiny_data, streams, tmp_path, s3, form):
    """Even with a manifest left in the local cache by an earlier run (the remote is what is read)."""
    cache = tmp_path / "cache"
    shutil.copytree(streams["b"], cache)
    url = f"{s3.uri}/nothing"
    if form == "stream":
        extra = [f"train_loader.streams.b.remote={url}", f"train_loader.streams.b.local={cache}"]
        weights, key = {"a": (streams["a"], None)}, "train_loader.streams.b.remote"
    else:
        extra = [f"variables.data_remote={url}", f"variables.data_local={cache}", "eval_loader=null"]
        weights, key = {}, "train_loader.remote"
    data, tok = tiny_data
    mixture = mixture_overrides(weights) if weights else []
    cfg = load_config(YAMLS / "bd3_tiny.yaml", tiny_overrides(data, tok, tmp_path / "run", *mixture, *extra))
    with pytest.raises(ConfigError) as e:
        resolve_run_inputs(cfg)
    assert e.value.key == key and f"{url}/manifest.json not found" in str(e.value)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_plan_prints_each_streams_rows_share_and_epochs(tiny_data, streams, tmp_path, capsys):
    from pipeline.plan import main as plan_main

    data, tok = tiny_data
    mixture = mixture_overrides({"a": (streams["a"], 0.7), "c": (streams["c"], 0.3)})
    args = tiny_overrides(data, tok, tmp_path / "run", *mixture, "max_duration=40ba")
    out = tmp_path / "plan.json"
    flags = ["--gpus", "1", "--gpu-memory", "1", "--device", "cpu", "--json", str(out)]
    assert plan_main([str(YAMLS / "bd3_tiny.yaml"), *args, *flags]) == 0
    printed = capsys.readouterr().out
    plan = json.loads(out.read_text())["data"]
    assert plan["epoch_rows"] == 256 + 64 and plan["total_rows"] == 40 * 16
    for s, (name, rows, p) in zip(plan["streams"], [("a", 256, 0.7), ("c", 64, 0.3)]):
        assert s["name"] == name and s["rows"] == rows and s["tokens"] == rows * SEQ_LEN
        assert abs(s["share"] - p) < 0.005 and s["share"] == s["epoch_rows"] / plan["epoch_rows"]
        assert s["epochs"] == pytest.approx(640 * s["share"] / rows)
        assert f"{100 * s['share']:.1f}% ({s['share'] * 16:.1f} of 16)" in printed
        assert f"{s['epochs']:.3g}" in printed  # c (64 rows at 30%) is read 3 times
    assert "data: 2 stream(s), 320 rows per epoch" in printed
