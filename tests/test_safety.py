"""Safety properties: no unpickling of user files without consent, no credentials in anything a run
writes or prints, and no code from datasets or checkpoints is ever executed.

1. ``torch.load`` (and pickle) in ``pipeline/`` and ``data_prep/`` run with ``weights_only=True``,
   except behind an explicit ``trust_checkpoint`` refusal; ``pipeline.export``, ``pipeline.eval`` and ``pipeline.sample``
   refuse a Composer ``.pt`` without ``--trust-checkpoint`` and never unpickle it.
2. Credentials come from the environment only: URLs with credentials are config errors (see
   tests/pipeline/trainer/test_bad_input.py) and a real training run never writes or prints the values
   of credential variables.
3. Dataset loading scripts and checkpoint code (``auto_map`` modules) are never run, and nothing
   passes ``trust_remote_code``.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from data_prep import DataPrepError, sources
from tests.factories import YAMLS, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
SOURCE_FILES = sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "data_prep").rglob("*.py")])


# ------------------------------------------------------------------------ 1. unpickling


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _refuses_untrusted(func: ast.FunctionDef, before: int) -> bool:
    """Whether ``func`` takes ``trust_checkpoint`` and raises under ``if not trust_checkpoint:``
    before line ``before``."""
    if "trust_checkpoint" not in [a.arg for a in func.args.args + func.args.kwonlyargs]:
        return False
    for node in ast.walk(func):
        if (
            isinstance(node, ast.If)
            and node.lineno < before
            and isinstance(node.test, ast.UnaryOp)
            and isinstance(node.test.op, ast.Not)
            and _dotted(node.test.operand) == "trust_checkpoint"
            and any(isinstance(s, ast.Raise) for s in node.body)
        ):
            return True
    return False


def unpickling_calls() -> tuple[list[str], list[str], list[str]]:
    """(safe, guarded, unsafe) ``file:line`` of torch.load / pickle.load(s) calls in the sources."""
    safe, guarded, unsafe = [], [], []
    for path in SOURCE_FILES:
        tree = ast.parse(path.read_text(), str(path))
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for call in ast.walk(func):
                if not isinstance(call, ast.Call):
                    continue
                name = _dotted(call.func)
                if name not in ("torch.load", "pickle.load", "pickle.loads", "dill.load", "joblib.load"):
                    continue
                where = f"{path.relative_to(REPO)}:{call.lineno}"
                weights_only = [k.value for k in call.keywords if k.arg == "weights_only"]
                if name == "torch.load" and len(weights_only) == 1 and _is_true(weights_only[0]):
                    safe.append(where)
                elif _refuses_untrusted(func, call.lineno):
                    guarded.append(where)
                else:
                    unsafe.append(where)
        # A call at module level has no function to guard it.
        for node in tree.body:
            for call in ast.walk(node):
                if (
                    not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    and isinstance(call, ast.Call)
                    and _dotted(call.func) in ("torch.load", "pickle.load", "pickle.loads")
                ):
                    unsafe.append(f"{path.relative_to(REPO)}:{call.lineno}")
    return sorted(set(safe)), sorted(set(guarded)), sorted(set(unsafe))


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_every_unpickling_call_is_weights_only_or_refused_without_trust():
    safe, guarded, unsafe = unpickling_calls()
    assert not unsafe, f"torch.load/pickle without weights_only=True or a trust_checkpoint refusal: {unsafe}"
    # The scan sees the known call sites (else it would pass by finding nothing).
    assert any(w.startswith("pipeline/model/hf_io.py") for w in safe), safe
    assert any(w.startswith("pipeline/save_folder/loading.py") for w in guarded), guarded


class _RunsCode:
    """Unpickling this creates ``marker``: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled_save_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A folder that looks like a save_folder of pipeline.train whose checkpoint runs code."""
    from pipeline.save_folder import MODEL_CONFIG_FILE

    folder, marker = tmp_path / "run", tmp_path / "pwned"
    folder.mkdir()
    config = {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "eos_token_id": 0,
    }
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps(config))
    with open(folder / "ep0-ba2-rank0.pt", "wb") as f:
        pickle.dump({"state": {"model": _RunsCode(marker)}}, f)
    return folder, marker


def test_the_pickle_stand_in_runs_code_when_trusted(tmp_path):
    from pipeline.save_folder import load_training_checkpoint

    folder, marker = _pickled_save_folder(tmp_path)
    with pytest.raises(Exception):  # noqa: B017 (the marker is what matters, not the error after it)
        load_training_checkpoint(folder / "ep0-ba2-rank0.pt", trust_checkpoint=True)
    assert marker.exists()  # so its absence below means: never unpickled


@pytest.mark.parametrize("entry", ["export", "eval", "sample"])
def test_entry_points_refuse_composer_pickles_without_trust(entry, tmp_path, tiny_data, capsys):
    from pipeline import eval as eval_cli
    from pipeline import export as export_cli
    from pipeline import sample as sample_cli

    folder, marker = _pickled_save_folder(tmp_path)
    if entry == "export":
        rc = export_cli.main(["--checkpoint", str(folder), "--out", str(tmp_path / "out")])
    elif entry == "sample":
        rc = sample_cli.main(["--checkpoint", str(folder), "--device", "cpu"])
    else:
        rc = eval_cli.main(["--checkpoint", str(folder), "--data", str(tiny_data[0]), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "ep0-ba2-rank0.pt is a Composer checkpoint, a pickle" in err and "--trust-checkpoint" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ 2. credentials

SENTINELS = {
    "AWS_ACCESS_KEY_ID": "AKIASENTINEL7C1D0E2F",
    "AWS_SECRET_ACCESS_KEY": "sentinel-aws-secret-5b8e91a0d3",
    "HF_TOKEN": "hf_sentinelToken4f2a7c9e1b",
    "WANDB_API_KEY": "sentinel-wandb-key-0d9c3e7a51",
}


def _strings(obj, seen: set[int]):
    """Every str/bytes reachable from an unpickled object (containers, attributes, keys)."""
    if id(obj) in seen or isinstance(obj, torch.Tensor):
        return
    seen.add(id(obj))
    if isinstance(obj, (str, bytes)):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k, seen)
            yield from _strings(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _strings(v, seen)
    elif hasattr(obj, "__dict__"):
        yield from _strings(vars(obj), seen)


@pytest.mark.slow
def test_training_never_writes_or_prints_credential_variables(
    tiny_data, tmp_path, one_thread, monkeypatch, capfd
):
    from pipeline.trainer import load_config, run

    for name, value in SENTINELS.items():
        monkeypatch.setenv(name, value)
    save, loss_log = tmp_path / "run", tmp_path / "loss.jsonl"
    data, tok = tiny_data
    extra = [
        "max_duration=4ba",
        "save_interval=2ba",
        "save_num_checkpoints_to_keep=-1",
        "eval_interval=2ba",
        f"callbacks.loss_log.path={loss_log}",
        f"callbacks.hf_export.folder={save}/hf",
        "loggers.console.log_interval=1ba",
        "python_log_level=info",
    ]
    run(load_config(YAMLS / "bd3_tiny.yaml", tiny_overrides(data, tok, save, *extra), world_size=1))
    out, err = capfd.readouterr()

    files = [p for p in [*save.rglob("*"), loss_log] if p.is_file()]
    names = {p.name for p in files}
    assert {"loss.jsonl", "model.safetensors"} <= names and any(
        n.startswith("events.out.tfevents") for n in names
    )
    checkpoints = sorted(save.glob("ep*-ba*-rank0.pt"))
    assert len(checkpoints) == 2, names
    for name, value in SENTINELS.items():
        for p in files:
            assert value.encode() not in p.read_bytes(), f"{name} written to {p}"
        assert value not in out and value not in err, f"{name} printed"
    for ckpt in checkpoints:  # our own file: unpickling it is fine here
        blob = torch.load(ckpt, map_location="cpu", weights_only=False)
        texts = [t if isinstance(t, str) else t.decode("latin-1") for t in _strings(blob, set())]
        assert texts, ckpt
        for name, value in SENTINELS.items():
            assert not [t for t in texts if value in t], f"{name} inside {ckpt}"


# ------------------------------------------------------------------------ 3. no foreign code

EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def test_nothing_passes_trust_remote_code():
    found = []
    for path in SOURCE_FILES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    found.append(f"{path.relative_to(REPO)}:{node.value.lineno}")
            if isinstance(node, ast.Dict) and any(
                isinstance(k, ast.Constant) and k.value == "trust_remote_code" for k in node.keys
            ):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, f"trust_remote_code set in {found}"


def test_local_dataset_script_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "my_dataset.py").write_text(EVIL.format(marker=str(marker)))
    with pytest.raises(DataPrepError, match=r"my_dataset\.py and no \.parquet.*never runs dataset scripts"):
        sources.resolve_inputs([str(folder)])
    with pytest.raises(DataPrepError, match=r"my_dataset\.py.*never runs dataset scripts.*convert"):
        sources.resolve_inputs([str(folder / "my_dataset.py")])
    assert not marker.exists()


class _ScriptOnlyHub:
    """HfFileSystem stand-in: a dataset repo holding only a loading script, no parquet conversion."""

    def __init__(self, root: Path):
        self.root = root

    def glob(self, pattern: str) -> list[str]:
        if "@refs/convert/parquet" in pattern:
            return []
        return sorted(str(p.relative_to(self.root)) for p in self.root.glob(pattern))

    def open(self, path, mode="rb"):
        raise AssertionError(f"nothing should be opened, asked for {path}")


def test_hub_dataset_with_only_a_script_is_refused_and_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    repo = tmp_path / "datasets" / "someone" / "scripted"
    repo.mkdir(parents=True)
    (repo / "scripted.py").write_text(EVIL.format(marker=str(marker)))
    (repo / "README.md").write_text("a dataset built by a script")
    monkeypatch.setattr(sources, "_hub_fs", lambda: _ScriptOnlyHub(tmp_path))
    with pytest.raises(
        DataPrepError, match=r"'someone/scripted' holds the dataset loading script scripted\.py.*never runs"
    ):
        sources.resolve_inputs(["someone/scripted"])
    assert not marker.exists()


def _checkpoint_with_code(src: Path, dst: Path, marker: Path, **config_changes) -> Path:
    """A copy of an HF checkpoint whose config.json points to modeling_evil.py (auto_map)."""
    shutil.copytree(src, dst)
    (dst / "modeling_evil.py").write_text(EVIL.format(marker=str(marker)))
    (dst / "configuration_evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((dst / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_checkpoint_code_is_ignored_when_loading(tmp_path, tiny_llama_dir):
    from pipeline.model import from_pretrained
    from pipeline.save_folder import load_for_inference

    marker = tmp_path / "ran"
    folder = _checkpoint_with_code(tiny_llama_dir, tmp_path / "ckpt", marker)
    model = from_pretrained(folder)
    assert model.config.architecture == "llama"
    load_for_inference(folder)
    assert not marker.exists()


def test_checkpoint_with_a_custom_architecture_is_refused_without_running_it(tmp_path, tiny_llama_dir):
    from pipeline.model import ModelConfigError, from_pretrained

    marker = tmp_path / "ran"
    folder = _checkpoint_with_code(tiny_llama_dir, tmp_path / "ckpt", marker, model_type="evil")
    with pytest.raises(ModelConfigError, match="model_type 'evil'.*this project supports"):
        from_pretrained(folder)
    assert not marker.exists()


def test_hub_checkpoint_download_skips_code_files(tmp_path, tiny_llama_dir, monkeypatch):
    import huggingface_hub

    from pipeline.model.hf_io import resolve_checkpoint_dir

    asked = {}

    def fake_snapshot_download(name, allow_patterns=None, **kw):
        asked["patterns"] = allow_patterns
        return str(tiny_llama_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_checkpoint_dir("someone/model") == tiny_llama_dir
    patterns = asked["patterns"]
    for wanted in ("config.json", "model.safetensors", "tokenizer.json"):
        assert any(fnmatch.fnmatch(wanted, p) for p in patterns), wanted
    for code in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py", "evil.so"):
        assert not any(fnmatch.fnmatch(code, p) for p in patterns), code
