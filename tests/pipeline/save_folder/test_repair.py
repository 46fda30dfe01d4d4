"""The repair of a save_folder left by a killed run (``pipeline.save_folder.repair``); the training
runs that make real ones are in tests/pipeline/trainer/test_faults.py."""

from __future__ import annotations

import os

from pipeline.save_folder import repair_save_folder


def test_repair_save_folder_cases(tmp_path):
    """The states a kill can leave, on files made by hand (the runs of test_faults.py make the real ones)."""

    def folder(name, files=(), dirs=(), latest=None):
        f = tmp_path / name
        f.mkdir()
        for n in files:
            (f / n).parent.mkdir(parents=True, exist_ok=True)
            (f / n).write_bytes(b"x")
        for n in dirs:
            (f / n).mkdir(parents=True)
        if latest:
            os.symlink(latest, f / "latest-rank0.pt")
        return f

    def latest(f):
        return os.readlink(f / "latest-rank0.pt") if (f / "latest-rank0.pt").is_symlink() else None

    # a newer complete file than the symlink's (killed between the write and the symlink update)
    f = folder(
        "newer",
        ["ep0-ba3-rank0.pt", "ep0-ba6-rank0.pt", ".partial.ep0-ba9-rank0.pt"],
        latest="ep0-ba3-rank0.pt",
    )
    assert repair_save_folder(f, deepspeed=False) == 6 and latest(f) == "ep0-ba6-rank0.pt"
    assert not (f / ".partial.ep0-ba9-rank0.pt").exists()
    # DeepSpeed: a Composer file is usable only with its partitions; partial tags are dropped
    f = folder("ds", ["ep0-ba3-rank0.pt", "ep0-ba6-rank0.pt"], ["deepspeed/ba3", "deepspeed/ba6.partial"])
    assert repair_save_folder(f, deepspeed=True) == 3 and latest(f) == "ep0-ba3-rank0.pt"
    assert not (f / "ep0-ba6-rank0.pt").exists() and not (f / "deepspeed/ba6.partial").exists()
    # FSDP sharded folders: complete with .metadata; a newer one without it is removed
    f = folder(
        "sharded", ["ep0-ba3/.metadata", "ep0-ba3/__0_0.distcp", "ep0-ba6/__0_0.distcp"], latest="ep0-ba3"
    )
    assert repair_save_folder(f, deepspeed=False) == 3 and latest(f) == "ep0-ba3"
    assert not (f / "ep0-ba6").exists()
    # a dangling symlink is removed; a symlink to a name this code does not know is left alone
    f = folder("dangling", latest="ep0-ba9-rank0.pt")
    assert repair_save_folder(f, deepspeed=False) is None and latest(f) is None
    f = folder("custom", ["my-checkpoint.pt", "ep0-ba3-rank0.pt"], latest="my-checkpoint.pt")
    assert repair_save_folder(f, deepspeed=False) is None and latest(f) == "my-checkpoint.pt"
