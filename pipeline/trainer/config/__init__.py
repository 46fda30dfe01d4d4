"""The training YAML: llm-foundry conventions, a dataclass schema, and checks that run before any model.

- ``schema``: the sections (dataclasses; the plain-PyTorch layer's own configs where they apply);
- ``loaders``: ``train_loader`` / ``eval_loader``: one data folder or a mixture of streams;
- ``convert``: ``load_config(path, overrides)`` -> ``TrainConfig`` (typed conversion, key errors);
- ``checks``: cross-field checks and the configs derived from the YAML (DeepSpeed, objective).

``pipeline.trainer.run_inputs`` then checks the files the config points to (data manifest, tokenizer,
the init checkpoint's config.json) without loading weights. Nothing here imports Composer: a bad YAML
fails in the time it takes to import torch.
"""

from pipeline.trainer.config.checks import (
    block_size_list,
    check_consistency,
    check_no_credentials,
    deepspeed_config,
    diffusion_config,
    world_size_from_env,
)
from pipeline.trainer.config.convert import from_dict, load_config
from pipeline.trainer.config.errors import ConfigError
from pipeline.trainer.config.loaders import ONE_FOLDER, ResolvedStream, StreamSection
from pipeline.trainer.config.schema import (
    SHAPE_FIELDS,
    BlockSizeLikelihoodSection,
    EvalLoaderSection,
    GenerationSection,
    NoiseIntervalSearchSection,
    TrainConfig,
    TrainLoaderSection,
)

__all__ = [
    "ONE_FOLDER",
    "SHAPE_FIELDS",
    "BlockSizeLikelihoodSection",
    "ConfigError",
    "EvalLoaderSection",
    "GenerationSection",
    "NoiseIntervalSearchSection",
    "ResolvedStream",
    "StreamSection",
    "TrainLoaderSection",
    "TrainConfig",
    "block_size_list",
    "check_consistency",
    "check_no_credentials",
    "deepspeed_config",
    "diffusion_config",
    "from_dict",
    "load_config",
    "world_size_from_env",
]
