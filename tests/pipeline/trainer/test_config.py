"""Config errors name the key and say what to change, before any model is built; valid configs load.

README's "Bad input" rows are tested in ``test_bad_input.py``; this file holds the other properties
of the config (no duplicates of those rows). These tests import no Composer: a config error costs
only the torch import.
"""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.model.config import TINYLLAMA_1B_CONFIG
from pipeline.trainer import ConfigError, load_config
from pipeline.trainer.run_inputs import resolve_run_inputs
from tests.factories import SEQ_LEN, YAMLS, tiny_overrides, write_manifest, write_tokenizer

TINY = YAMLS / "bd3_tiny.yaml"


def _load(tiny_data, tmp_path, *extra, world_size=1, yaml=TINY):
    data, tok = tiny_data
    cfg = load_config(yaml, tiny_overrides(data, tok, tmp_path / "run", *extra), world_size=world_size)
    return cfg, resolve_run_inputs(cfg)


def _error(tiny_data, tmp_path, *extra, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(tiny_data, tmp_path, *extra, **kw)
    return info.value


def test_tiny_yaml_is_valid(tiny_data, tmp_path):
    cfg, res = _load(tiny_data, tmp_path)
    assert cfg.max_seq_len == SEQ_LEN and cfg.train_loader.local == str(tiny_data[0])
    c = res.model_config
    # 61 tokenizer ids, mask token appended at 61, vocabulary padded to a multiple of 64.
    assert (c.base_vocab_size, c.mask_token_id, c.vocab_size) == (61, 61, 64)
    assert (c.block_size, c.shift, c.eos_token_id) == (4, True, 0)


def test_unknown_key_names_it_and_suggests(tiny_data, tmp_path):
    # A close match is suggested (README row "a misspelled YAML key"); otherwise the known keys are listed.
    e = _error(tiny_data, tmp_path, "optimizer.learning_rate=0.1")  # no close match: list the keys
    assert e.key == "optimizer.learning_rate" and "'lr'" in str(e)
    e = _error(tiny_data, tmp_path, "diffusion.blocksize=8")
    assert e.key == "diffusion.blocksize" and "block_size" in str(e)


def test_missing_required_key(tiny_data, tmp_path):
    yaml = tmp_path / "no_block_size.yaml"
    yaml.write_text(TINY.read_text().replace("  block_size: 4\n", ""))
    e = _error(tiny_data, tmp_path, yaml=yaml)
    assert e.key == "diffusion.block_size" and "missing required key" in str(e)


def test_missing_mandatory_variable(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [f"variables.tokenizer={tmp_path}/t.json"])
    assert info.value.key == "variables.data_local" and "variables.data_local=VALUE" in str(info.value)


def test_wrong_type_in_a_union_names_the_key(tiny_data, tmp_path):
    # A pair or a mapping of pairs (README row "a value of the wrong type" covers plain types).
    e = _error(tiny_data, tmp_path, "diffusion.noise_interval=0.5")
    assert e.key == "diffusion.noise_interval"


def test_block_size_error_says_where_the_length_came_from(tiny_data, tmp_path):
    e = _error(tiny_data, tmp_path, "diffusion.block_size=5")
    assert f"does not divide the sequence length {SEQ_LEN}" in str(e)
    assert "${variables.max_seq_len}" in str(e)


def test_several_block_sizes_and_their_intervals(tiny_data, tmp_path):
    cfg, _ = _load(
        tiny_data,
        tmp_path,
        "diffusion.block_size=[4, 8, 16]",
        "diffusion.block_size_weights=[1, 1, 2]",
        "diffusion.noise_interval={4: [0.45, 0.95], 8: [0.3, 0.8], '16': [0.2, 0.7]}",
    )
    d = cfg.diffusion
    assert (
        d.block_sizes == [4, 8, 16] and d.interval_for(16) == (0.2, 0.7) and d.interval_for(4) == (0.45, 0.95)
    )
    # One pair for every size (the YAML's).
    assert _load(tiny_data, tmp_path, "diffusion.block_size=[2, 4]")[0].diffusion.interval_for(2) == (
        0.45,
        0.95,
    )
    cases = [
        (["diffusion.block_size=[4, 5]"], "diffusion.block_size", "does not divide the sequence length"),
        (["diffusion.block_size=[4, 4]"], "diffusion.block_size", "twice"),
        (["diffusion.block_size=[]"], "diffusion.block_size", "non-empty"),
        (
            ["diffusion.block_size=[4, 8]", "diffusion.block_size_weights=[1]"],
            "diffusion.block_size_weights",
            "2",
        ),
        (["diffusion.block_size_weights=[1]"], "diffusion.block_size_weights", "a list"),
        (
            ["diffusion.block_size=[4, 8]", "diffusion.noise_interval={4: [0.45, 0.95]}"],
            "diffusion.noise_interval",
            "one [beta, omega] per trained block size",
        ),
        (
            ["diffusion.block_size=[4, 8]", "diffusion.noise_interval={4: [0.45, 0.95], 8: [0.9, 0.3]}"],
            "diffusion.noise_interval.8",
            "0 <= beta < omega <= 1",
        ),
    ]
    for extra, key, text in cases:
        e = _error(tiny_data, tmp_path, *extra)
        assert e.key == key and text in str(e), (extra, e.key, str(e))


def test_exported_config_records_the_trained_block_sizes(tiny_data, tmp_path):
    """The smallest trained size is the default of sampling and evaluation; all are recorded."""
    config = _load(tiny_data, tmp_path, "diffusion.block_size=[8, 2, 4]")[1].model_config
    assert config.block_size == 2 and config.trained_block_sizes == [2, 4, 8]
    assert config.to_hf_config()["bd3"]["trained_block_sizes"] == [2, 4, 8]


def test_global_batch_divisible_by_world_times_microbatch_loads(tiny_data, tmp_path):
    _load(tiny_data, tmp_path, "device_train_microbatch_size=4", world_size=2)  # 16 = 2 x 4 x 2
    e = _error(tiny_data, tmp_path, "device_train_microbatch_size=3", world_size=2)
    assert "world size 2 x device_train_microbatch_size 3" in str(e)  # both factors are named


def test_tokenizer_larger_than_model_vocab(tiny_data, tmp_path):
    e = _error(tiny_data, tmp_path, "model.vocab_size=40")
    assert e.key == "model.vocab_size" and "61 tokens" in str(e)


def test_init_from_defines_the_shape(tiny_data, tmp_path, tiny_hf_checkpoint, caplog):
    """With init_from, the recipe's shape keys give way to the checkpoint's (one INFO line names them);
    a shape key given on the command line that contradicts the checkpoint is still an error."""
    ckpt, _ = tiny_hf_checkpoint(
        tmp_path / "ckpt", vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=3
    )
    with caplog.at_level("INFO", logger="pipeline.trainer.config.convert"):
        cfg, res = _load(tiny_data, tmp_path, f"variables.init_from={ckpt}")
    c = res.model_config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (32, 96, 3)
    assert c.base_vocab_size == 64 and c.mask_token_id == 64
    assert cfg.model.hidden_size is None  # the recipe's 64 was not used
    notes = [r.getMessage() for r in caplog.records if "were not used" in r.getMessage()]
    assert len(notes) == 1 and "model.hidden_size" in notes[0] and "model.intermediate_size" in notes[0]

    e = _error(tiny_data, tmp_path, f"variables.init_from={ckpt}", "model.intermediate_size=176")
    assert e.key == "model.intermediate_size" and "176" in str(e) and "96" in str(e)
    cfg, res = _load(tiny_data, tmp_path, f"variables.init_from={ckpt}", "model.intermediate_size=96")
    assert res.model_config.intermediate_size == 96


def test_manifest_split_and_rows(tiny_data, tmp_path):
    e = _error(tiny_data, tmp_path, "eval_loader.split=test")
    assert e.key == "eval_loader.split" and "'val'" in str(e)
    e = _error(tiny_data, tmp_path, "global_train_batch_size=512")
    assert e.key == "global_train_batch_size" and "256 rows" in str(e)


def test_data_folder_without_manifest(tiny_data, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_data[0] / "train", bare / "train")
    e = _error(tiny_data, tmp_path, f"train_loader.local={bare}")
    assert e.key == "train_loader.local" and "manifest.json" in str(e)


def test_autoresume_needs_save_folder(tiny_data, tmp_path):
    e = _error(tiny_data, tmp_path, "save_folder=null")
    assert e.key == "save_folder" and "autoresume" in str(e)


@pytest.mark.parametrize(
    "key", ["max_duration", "eval_interval", "scheduler.t_warmup", "callbacks.ema.half_life"]
)
def test_durations_need_a_unit(tiny_data, tmp_path, key):
    """A bare number would be read as epochs by Composer: every duration key, top level or in a section."""
    e = _error(tiny_data, tmp_path, f"{key}=20")
    assert e.key == key and "unit" in str(e) and "'100ba'" in str(e)


def test_bd3_1b_yaml_validates_offline(tmp_path):
    """The flagship YAML: schema, interpolation and consistency with local stand-ins, no download, no model."""
    ckpt = tmp_path / "TinyLlama_v1.1"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(TINYLLAMA_1B_CONFIG))
    tok = write_tokenizer(ckpt / "tokenizer.json", n_words=31999)  # 32000 ids like LLaMA's
    data = write_manifest(tmp_path / "owt", 2048, {"train": 100000, "val": 1000}, tok)
    for split, rows in (("train", 100000), ("val", 1000)):  # one (empty) shard file per split
        (data / split).mkdir()
        (data / split / "shard.00000.mds").write_bytes(b"")
        shard = {
            "column_names": ["doc_starts", "tokens"],
            "column_encodings": ["ndarray:uint32", "ndarray:uint16:2048"],
            "raw_data": {"basename": "shard.00000.mds", "bytes": 0},
            "samples": rows,
        }
        (data / split / "index.json").write_text(json.dumps({"version": 2, "shards": [shard]}))
    overrides = [
        f"variables.data_local={data}",
        f"variables.init_from={ckpt}",
        f"variables.save_folder={tmp_path}/run",
    ]
    cfg = load_config(YAMLS / "bd3_1b.yaml", overrides, world_size=8)
    res = resolve_run_inputs(cfg)
    assert cfg.max_seq_len == 2048 and cfg.diffusion.block_size == 16
    assert cfg.diffusion.noise_interval == (0.3, 0.8) and cfg.diffusion.shift
    assert cfg.global_train_batch_size * cfg.max_seq_len == 524288  # 0.5M tokens per step
    assert cfg.precision == "amp_bf16" and cfg.model.activation_checkpointing
    assert cfg.parallelism.fsdp is None
    assert cfg.parallelism.deepspeed["zero_optimization"]["stage"] == 2
    from pipeline.trainer.config import deepspeed_config

    ds = deepspeed_config(cfg, world=8)
    assert (
        ds["bf16"]["enabled"]
        and ds["gradient_accumulation_steps"] * 8 * cfg.device_train_microbatch_size == 256
    )
    assert res.model_config.mask_token_id == 32000 and res.model_config.vocab_size == 32064
    assert res.model_config.num_hidden_layers == TINYLLAMA_1B_CONFIG["num_hidden_layers"]
    # The hub name is kept as the default: nothing was downloaded here.
    assert "TinyLlama/TinyLlama_v1.1" in (YAMLS / "bd3_1b.yaml").read_text()


@pytest.mark.parametrize(("key", "setting"), [("wandb", "project=x"), ("mlflow", "experiment_name=x")])
def test_optional_logger_without_its_package_is_a_config_error(
    tiny_data, tmp_path, key, setting, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == key else real(name, *a))
    e = _error(tiny_data, tmp_path, f"loggers.{key}.{setting}")
    assert e.key == f"loggers.{key}" and f"pip install {key}" in str(e)


@pytest.mark.parametrize(
    "canonical, nodes, ok", [(8, 2, True), (8, 16, True), (1, 2, True), (8, 3, False), (6, 4, False)]
)
def test_num_canonical_nodes_must_fit_the_node_count(tiny_data, tmp_path, monkeypatch, canonical, nodes, ok):
    data, tok = tiny_data
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node: nodes == world size
    overrides = tiny_overrides(data, tok, tmp_path, f"train_loader.num_canonical_nodes={canonical}")
    overrides += ["global_train_batch_size=96", "device_train_microbatch_size=1"]
    if ok:
        load_config(YAMLS / "bd3_tiny.yaml", overrides, world_size=nodes)
    else:
        with pytest.raises(ConfigError, match=r"train_loader\.num_canonical_nodes.*multiple or a divisor"):
            load_config(YAMLS / "bd3_tiny.yaml", overrides, world_size=nodes)
