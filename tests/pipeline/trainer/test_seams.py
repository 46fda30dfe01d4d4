"""The seams of Composer, DeepSpeed and Streaming (``pipeline.seams``): the installed libraries have
them, each one is checked, the installed versions are the ones they were written for, and training
does not start when the checkpoint saver cannot be found."""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest

from pipeline import streaming_seams
from pipeline.save_folder import composer_checkpoints
from pipeline.seams import WRITTEN_FOR, SeamError, check_seams
from pipeline.trainer import seams
from tests.factories import REPO, YAMLS, tiny_overrides

ALL = [*seams.COMPOSER_SEAMS, *seams.DEEPSPEED_SEAMS, *streaming_seams.SEAMS]


def test_the_installed_libraries_have_every_seam():
    seams.check_deepspeed_seams()  # Composer's and Streaming's were checked by the imports above
    assert {s.library for s in ALL} == set(WRITTEN_FOR)


def test_the_installed_versions_are_the_ones_the_seams_were_written_for():
    pyproject = (REPO / "pyproject.toml").read_text()
    for library, (distribution, version) in WRITTEN_FOR.items():
        assert importlib.metadata.version(distribution) == version, library
        assert f'"{distribution}=={version}"' in pyproject, library


@pytest.mark.parametrize("seam", ALL, ids=lambda s: f"{s.library}-{s.label}")
def test_a_missing_seam_is_one_error_naming_it_and_its_version(seam, monkeypatch):
    owner = seam.owner_object()
    if seam.set_in is None:
        monkeypatch.delattr(owner, seam.name)
    else:  # an instance attribute: the method that sets it now sets another name
        method, getsource = getattr(owner, seam.set_in), inspect.getsource
        attribute = f"{seam.target}.{seam.name}"

        def renamed_source(obj):
            source = getsource(obj)
            return source.replace(attribute, f"{attribute}_renamed") if obj is method else source

        monkeypatch.setattr(inspect, "getsource", renamed_source)
    with pytest.raises(SeamError) as error:
        check_seams(ALL, "pipeline.somewhere")
    message = str(error.value)
    named = [s.label for s in ALL if f"{s.library} {s.label} " in message]
    assert named == [seam.label]
    assert f"{seam.library} {WRITTEN_FOR[seam.library][1]} (installed: " in message
    assert "\n" not in message


def test_training_refuses_to_start_without_the_checkpoint_saver(
    tiny_data, tmp_path, one_thread, monkeypatch, capsys
):
    """A Composer whose Trainer keeps its saver under another name: no batch is trained, no checkpoint
    written, and ``python -m pipeline.train`` says why in one line (exit code 6)."""
    from composer import Trainer

    from pipeline.train import main

    composer_init = Trainer.__init__

    def init_without_saver(self, *args, **kwargs):
        composer_init(self, *args, **kwargs)
        self._renamed_saver = self.__dict__.pop("_checkpoint_saver")

    monkeypatch.setattr(Trainer, "__init__", init_without_saver)
    data, tok = tiny_data
    args = tiny_overrides(
        data, tok, tmp_path / "ckpt", "eval_loader=null", "max_duration=2ba", "save_interval=1ba",
        f"callbacks.loss_log.path={tmp_path}/loss.jsonl",
    )  # fmt: skip
    assert main([str(YAMLS / "bd3_tiny.yaml"), *args]) == 6
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("training refused to start: composer Trainer._checkpoint_saver not found")
    assert "composer 0.32.1" in last
    assert not (tmp_path / "loss.jsonl").exists() and not composer_checkpoints(tmp_path / "ckpt")
