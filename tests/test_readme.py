"""The README cannot rot: its commands name real modules, flags, files and targets, and its YAML
reference covers every section of the training schema."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def shell_commands() -> list[list[str]]:
    """Every command of the README's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


def _parser_flags(module: str, words: list[str]) -> set[str]:
    """Option strings accepted by ``module``'s argparse parser (following subcommands in ``words``)."""
    parser = importlib.import_module(module).build_parser()
    for word in words:
        sub = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not sub or word not in sub[0].choices:
            break
        parser = sub[0].choices[word]
    return {opt for action in parser._actions for opt in action.option_strings}


def test_quick_start_is_the_two_make_commands():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    cmds = [c for c in shell_commands() if " ".join(c) in quick]
    assert [c[:2] for c in cmds] == [["make", "demo"], ["make", "test"]]
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci  # CI runs the README's test command


@pytest.mark.parametrize("cmd", shell_commands(), ids=lambda c: " ".join(c)[:60])
def test_readme_command_names_real_things(cmd):
    makefile = (REPO / "Makefile").read_text()
    if cmd[0] == "make":
        assert re.search(rf"^{cmd[1]}:", makefile, flags=re.M), f"no Makefile target {cmd[1]}"
        return
    if cmd[0] == "composer" and "launch" in cmd and "-m" not in cmd:  # the repository's launch file
        assert os.access(REPO / "launch", os.X_OK)
        rest = cmd[cmd.index("launch") + 1 :]
        assert rest and rest[0].startswith("yamls/") and (REPO / rest[0]).exists(), cmd
        return
    if "-m" not in cmd:
        pytest.fail(f"unexpected README command {cmd}")
    module = cmd[cmd.index("-m") + 1]
    spec = importlib.util.find_spec(module if not module.endswith("__main__") else module)
    assert spec is not None, f"no module {module}"
    rest = cmd[cmd.index("-m") + 2 :]
    for word in rest:
        if word.startswith("yamls/"):
            assert (REPO / word).exists(), word
    if module == "pipeline.train":
        return  # positional YAML + key=value overrides, checked above and by the config tests
    entry = f"{module}.__main__" if module == "data_prep" else module
    flags = _parser_flags(entry, [w for w in rest if not w.startswith("-")])
    for word in rest:
        if word.startswith("--"):
            assert word.split("=")[0] in flags, f"{module} has no flag {word}"


def test_yaml_reference_covers_the_schema():
    from pipeline.trainer.config import TrainConfig

    section = README.split("## Training", 1)[1]
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`{f.name}`" not in section]
    assert not missing, f"README's YAML reference lacks {missing}"
