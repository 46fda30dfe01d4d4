import subprocess
import sys

import pytest

from data_prep.__main__ import main
from data_prep.manifest import read_manifest

from .conftest import make_docs


def test_offline_pipeline_train_convert_verify(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n\n".join(make_docs(150)), encoding="utf-8")
    tok = str(tmp_path / "tok.json")
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(tmp_path / "*.txt"),
                "--doc-sep",
                r"\n\n",
                "--vocab-size",
                "320",
                "--out",
                tok,
                "--no-progress",
            ]
        )
        == 0
    )
    assert "vocab 320" in capsys.readouterr().out

    args = [
        "convert",
        "--input",
        str(tmp_path / "a.txt"),
        "--doc-sep",
        r"\n\n",
        "--out",
        str(tmp_path / "out"),
        "--tokenizer",
        tok,
        "--seq-len",
        "24",
        "--val-docs",
        "12",
        "--workers",
        "1",
        "--no-progress",
        "--shard-size-limit",
        "4kb",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    manifest = read_manifest(tmp_path / "out")
    assert manifest["args"]["doc_sep"] == "\n\n" and manifest["args"]["shard_size_limit"] == 4096
    for split in ("train", "val"):
        assert f"{manifest['splits'][split]['rows']:>12,}" in out
    assert "tokens/s" in out

    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "out")]) == 0


def test_user_errors_exit_2_with_a_message_and_no_traceback(tmp_path, tokenizer_path):
    cmd = [
        sys.executable,
        "-m",
        "data_prep",
        "convert",
        "--input",
        str(tmp_path / "missing.jsonl"),
        "--out",
        str(tmp_path / "out"),
        "--tokenizer",
        str(tokenizer_path),
        "--seq-len",
        "8",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: input file not found: {tmp_path / 'missing.jsonl'}"
    assert not (tmp_path / "out").exists()


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for command in ("convert", "tokenizer", "merge", "verify"):
        assert command in help_text
