"""``python -m pipeline.export`` of a tiny run: the model card shows the run's real numbers, and the
folder holds no pickles, no credentials and no path of the training machine."""

from __future__ import annotations

import json

import pytest
import torch

# The run's data is MDS shards: Streaming is a training dependency, absent from .venv-compat.
pytest.importorskip("streaming")

from pipeline import eval as pipeline_eval  # noqa: E402
from pipeline import export
from pipeline.hf_artifact import CardFacts
from pipeline.save_folder import MODEL_CONFIG_FILE, RUN_CONFIG_FILE
from tests.factories import TINY_HF, card_table_rows, tiny_data_folder, write_tiny_export, write_tokenizer

SECRET = "AKIA-DO-NOT-LEAK-1234"
STEPS, BATCH, SEQ = 10, 8, 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A save_folder as pipeline.train leaves it (config, tokenizer, run_config.json, a Composer
    checkpoint), its data folder, and pipeline.eval results of the run and of its AR init."""
    root = tmp_path_factory.mktemp("run")
    model, _ = write_tiny_export(root, "llama")
    data = tiny_data_folder(root / "data", write_tokenizer(root / "data_tok" / "tokenizer.json"), 16, 16)
    save = root / "save"
    save.mkdir()
    (save / MODEL_CONFIG_FILE).write_text(json.dumps(model.config.to_hf_config()))
    write_tokenizer(save / "tokenizer.json", n_words=TINY_HF["vocab_size"] - 1)
    run_config = {
        "model": {"init_from": str(root / "ar")},
        "train_loader": {"local": str(data)},
        "diffusion": {"block_size": 4, "noise_interval": [0.3, 0.8], "shift": True},
        "max_duration": f"{STEPS}ba",
        "global_train_batch_size": BATCH,
        "max_seq_len": SEQ,
        "parallelism": {"deepspeed": {"zero_optimization": {"stage": 2}}},
        "variables": {"aws_secret_access_key": SECRET},
        "callbacks": {
            "generation": {"sampler": "first_hitting", "top_p": 0.8, "max_new_tokens": 20, "num_samples": 2}
        },
    }
    (save / RUN_CONFIG_FILE).write_text(json.dumps(run_config))
    # The "trained" weights differ from the AR init, so that the card's two columns differ.
    state = {f"model.{k}": v * 1.5 if k == "lm_head.weight" else v for k, v in model.state_dict().items()}
    torch.save({"state": {"model": state}}, save / f"ep0-ba{STEPS}-rank0.pt")
    evals = {}
    for name, ckpt in (("bd3", save), ("ar", root / "ar")):
        evals[name] = root / f"eval_{name}.json"
        args = ["--checkpoint", str(ckpt), "--data", str(data), "--block-sizes", "1,4,L", "--max-rows", "8"]
        args += ["--out", str(evals[name]), "--device", "cpu", "--trust-checkpoint"]
        assert pipeline_eval.main(args + (["--plot", str(root / "ppl.png")] if name == "bd3" else [])) == 0
    return root, save, evals


@pytest.fixture(scope="module")
def exported_run(run):
    root, save, evals = run
    out = root / "hf"
    args = ["--checkpoint", str(save), "--out", str(out), "--trust-checkpoint", "--license", "apache-2.0"]
    args += [
        "--eval-json",
        str(evals["bd3"]),
        "--baseline-json",
        str(evals["ar"]),
        "--plot",
        str(root / "ppl.png"),
    ]
    assert export.main(args) == 0
    return out


def test_generation_config_is_the_runs_evaluated_sampling(exported_run):
    """The run's callbacks.generation (its samples at every evaluation, at the smallest trained block
    size) becomes bd3_generate's defaults; what the section leaves out is the sampler's default."""
    saved = json.loads((exported_run / "generation_config.json").read_text())["bd3"]
    assert saved["sampler"] == "first_hitting" and saved["top_p"] == 0.8 and saved["max_new_tokens"] == 20
    assert saved["block_size"] == 4 and saved["threshold"] == 0.9 and saved["seed"] == 0
    assert "callbacks.generation" in saved["source"]
    assert "`sampler='first_hitting'`" in (exported_run / "README.md").read_text()


def test_sample_json_wins_over_the_runs_generation_section(run, exported_run, tmp_path):
    """``--sample-json``: a pipeline.sample evaluation of the model sets the defaults instead."""
    from pipeline import sample

    _, save, _ = run
    out = tmp_path / "sample.json"
    args = ["--checkpoint", str(exported_run), "--block-size", "2", "--top-p", "0.7", "--seed", "3"]
    assert sample.main([*args, "--max-new-tokens", "9", "--device", "cpu", "--out", str(out)]) == 0
    folder = tmp_path / "hf"
    cli = ["--checkpoint", str(save), "--out", str(folder), "--trust-checkpoint", "--sample-json", str(out)]
    assert export.main(cli) == 0
    saved = json.loads((folder / "generation_config.json").read_text())["bd3"]
    assert {k: saved[k] for k in ("block_size", "top_p", "seed", "max_new_tokens", "sampler")} == {
        "block_size": 2, "top_p": 0.7, "seed": 3, "max_new_tokens": 9, "sampler": "confidence",
    }  # fmt: skip
    assert "pipeline.sample" in saved["source"]


def test_card_table_equals_the_eval_json(run, exported_run):
    _, _, evals = run
    card = (exported_run / "README.md").read_text()
    ours = json.loads(evals["bd3"].read_text())["results"]
    base = {r["block_size"]: r for r in json.loads(evals["ar"].read_text())["results"]}
    rows = card_table_rows(card)
    assert [int(r[0]) for r in rows] == [r["block_size"] for r in ours] == [1, 4, 32]
    for row, r in zip(rows, ours):
        assert float(row[1]) == pytest.approx(r["nelbo"], abs=5e-5)
        assert float(row[2]) == pytest.approx(r["ppl_bound"], abs=5e-3)
        assert float(row[3]) == pytest.approx(r["stderr"], abs=5e-5)
        assert float(row[4]) == pytest.approx(base[r["block_size"]]["ppl_bound"], abs=5e-3)
        assert abs(float(row[4]) - float(row[2])) > 0.01  # the columns are two different models
    assert "![perplexity bound vs block size](likelihood_by_block_size.png)" in card
    assert (exported_run / "likelihood_by_block_size.png").read_bytes()[:4] == b"\x89PNG"


def test_card_front_matter_data_and_training_come_from_the_run(run, exported_run):
    root = run[0]
    card = (exported_run / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("library_name: transformers", "pipeline_tag: text-generation", "license: apache-2.0"):
        assert line in front
    assert "  - block-diffusion" in front and "  - bd3lm" in front
    assert "base_model:" not in front  # the run started from a local folder, not a hub id
    assert f"Initialized from a local AR checkpoint, `{root.name}/ar` (not on the hub)." in card
    assert "- train: 16 rows, 512 tokens" in card and "- val: 16 rows, 512 tokens" in card
    assert f"- tokens seen: {STEPS * BATCH * SEQ}" in card
    assert "- noise interval: [0.3, 0.8]" in card and "DeepSpeed ZeRO-2" in card
    assert "No data" not in card


def test_exported_folder_has_no_pickles_credentials_or_machine_paths(run, exported_run):
    root, _, _ = run
    names = sorted(p.name for p in exported_run.rglob("*"))
    assert {
        "config.json",
        "model.safetensors",
        "modeling_bd3.py",
        "configuration_bd3.py",
        "README.md",
    } <= set(names)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(names)
    for path in exported_run.rglob("*"):
        data = path.read_bytes()
        assert path.suffix not in (".pt", ".bin", ".pkl", ".pickle"), path
        assert not (data[:1] == b"\x80" and data[1:2] in b"\x02\x03\x04\x05"), f"{path} is a pickle"
        assert b"PK\x03\x04" not in data[:4], f"{path} is a zip (torch.save) archive"
        for needle in (str(root), SECRET, "/root/", "/home/"):
            assert needle.encode() not in data, f"{path} contains {needle!r}"


def test_license_comes_from_the_base_models_card(run, tmp_path):
    root, save, _ = run
    (root / "ar" / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# AR\n")
    try:
        assert (
            export.main(["--checkpoint", str(save), "--out", str(tmp_path / "hf"), "--trust-checkpoint"]) == 0
        )
    finally:
        (root / "ar" / "README.md").unlink()
    front = (tmp_path / "hf" / "README.md").read_text().split("---")[1]
    assert "license: mit" in front


def test_a_hub_base_model_is_named_in_the_front_matter(tmp_path):
    facts = CardFacts(base_model="TinyLlama/TinyLlama_v1.1")
    card = (write_tiny_export(tmp_path, "llama", facts=facts)[1] / "README.md").read_text()
    assert "base_model: TinyLlama/TinyLlama_v1.1" in card.split("---")[1]
    assert "[`TinyLlama/TinyLlama_v1.1`](https://huggingface.co/TinyLlama/TinyLlama_v1.1)" in card


def test_card_without_facts_says_no_data(tmp_path):
    _, folder = write_tiny_export(tmp_path, "mistral", facts=CardFacts())
    card = (folder / "README.md").read_text()
    for section in ("## Data", "## Likelihood across block sizes"):
        assert card.split(section)[1].split("##")[0].strip().startswith("_No data")
    assert "No data: the base model is not recorded." in card
    assert "license:" not in card.split("---")[1]  # none given, none known
    assert "Block size 4, shift True (config.json)" in card
    assert not card_table_rows(card)


def test_write_artifact_keeps_pipeline_loading(tmp_path):
    """The exported folder (mask token in its tokenizer) still loads in pipeline.model."""
    from pipeline.model import from_pretrained

    model, folder = write_tiny_export(tmp_path, "qwen2")
    again = from_pretrained(folder)
    assert again.config == model.config
    x = torch.randint(0, 250, (1, 8))
    assert torch.equal(again(x), model(x))


def test_the_ar_checkpoints_tokenizer_settings_are_kept(tmp_path):
    """A chat template and the padding token of the AR checkpoint survive; the mask token is added."""
    from transformers import AutoTokenizer

    from pipeline.hf_artifact import write_artifact
    from pipeline.model import from_pretrained

    model, folder = write_tiny_export(tmp_path, "llama")
    source = folder.parent / "ar"
    (source / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ messages }}", "tokenizer_class": "LlamaTokenizer",
                    "added_tokens_decoder": {"0": {"content": "<|endoftext|>"}}})
    )  # fmt: skip
    (source / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    out = write_artifact(from_pretrained(source, block_size=4), tmp_path / "again")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == "{{ messages }}" and tok.pad_token_id == 0
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == model.config.mask_token_id
    assert "added_tokens_decoder" not in json.loads((out / "tokenizer_config.json").read_text())
