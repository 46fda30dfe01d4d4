"""The Composer training layer: YAML config, run inputs, start-up, ComposerModel adapter, streaming
data, callbacks.

``load_config(yaml, overrides)`` -> ``TrainConfig`` (raises ``ConfigError``), ``run(cfg)`` trains.
``pipeline.model`` and ``pipeline.diffusion`` stay plain PyTorch: Composer is imported by this
package's modules (not by ``config`` and ``run_inputs``, so that a bad config fails fast) and by
``pipeline.save_folder`` to read checkpoints.
"""

from pipeline.trainer.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "build_trainer", "resolve_run_inputs", "load_config", "run"]


def __getattr__(name):
    # Composer takes seconds to import: config errors are reported without it.
    if name in ("run", "build_trainer"):
        from pipeline.trainer import build

        return getattr(build, name)
    if name == "resolve_run_inputs":
        from pipeline.trainer.run_inputs import resolve_run_inputs

        return resolve_run_inputs
    raise AttributeError(name)
