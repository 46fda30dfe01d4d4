"""What a training run writes into its save_folder besides checkpoints: the model config, the resolved
run config and the tokenizer (at start, read by export, eval and the model card), and where its
TensorBoard files go.

``cfg`` is the run's ``pipeline.trainer.TrainConfig``; it is only read here (the package does not
import the trainer).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.save_folder.layout import (
    MODEL_CONFIG_FILE,
    RUN_CONFIG_FILE,
    TENSORBOARD_SUBDIR,
    TOKENIZER_FILE,
    is_remote,
    tensorboard_run_dir,
)
from pipeline.save_folder.remote import upload_files

if TYPE_CHECKING:
    from pipeline.model import BD3LM
    from pipeline.trainer.config import TrainConfig
    from pipeline.trainer.run_inputs import RunInputs


def tensorboard_dir(cfg: TrainConfig) -> str:
    """TensorBoard's local log dir: ``loggers.tensorboard.log_dir``, else ``{save_folder}/tensorboard``
    for a local save_folder, else ``tensorboard/{run_name}`` under the working directory (a remote
    save_folder gets a copy through ``TensorboardUpload``)."""
    if cfg.loggers.tensorboard.log_dir is not None:
        return cfg.loggers.tensorboard.log_dir
    if cfg.save_folder is not None and not is_remote(cfg.save_folder):
        return f"{cfg.save_folder}/{TENSORBOARD_SUBDIR}"
    return tensorboard_run_dir(cfg.run_name or "run")


def write_run_metadata(cfg: TrainConfig, model: BD3LM, inputs: RunInputs) -> None:
    """Rank 0 puts the model's config.json and the tokenizer beside the checkpoints (for export)."""
    from composer.utils import dist

    if not cfg.save_folder or dist.get_global_rank() != 0:
        return
    if is_remote(cfg.save_folder):
        with tempfile.TemporaryDirectory() as tmp:
            write_run_files(Path(tmp), cfg, model, inputs)
            upload_files(cfg.save_folder, tmp)
    else:
        write_run_files(Path(cfg.save_folder), cfg, model, inputs)


def write_run_files(folder: Path, cfg: TrainConfig, model: BD3LM, inputs: RunInputs) -> None:
    """The model's config.json, the resolved run config (read by the export's model card), the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps(model.config.to_hf_config(), indent=2) + "\n")
    # default=str: a few fields are tuples/paths; the card reads numbers and names only.
    (folder / RUN_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n")
    if inputs.tokenizer_file is not None and inputs.tokenizer_file.exists():
        shutil.copy2(inputs.tokenizer_file, folder / TOKENIZER_FILE)
