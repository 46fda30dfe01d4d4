"""Composer callbacks of the BD3 trainer.

- ``training``: the mechanics of a run (noise ids, clipping, NaN/Inf guard, loss log, TensorBoard
  upload, HF export);
- ``eval_base``: the schedule, eval rows and isolation that the evaluation callbacks share;
- ``evaluation``: likelihood across block sizes, the noise-interval search, generation;
- ``downstream``: lm-evaluation-harness tasks on the live model.
"""

from pipeline.trainer.callbacks.downstream import DownstreamEval
from pipeline.trainer.callbacks.evaluation import (
    BlockSizeLikelihood,
    Generation,
    NoiseIntervalSearch,
    eval_callbacks,
)
from pipeline.trainer.callbacks.training import (
    GlooFSDPGradMean,
    GradientClipping,
    HFExport,
    LossLog,
    NonFiniteLoss,
    SampleIndexer,
    TensorboardUpload,
)

__all__ = [
    "BlockSizeLikelihood",
    "DownstreamEval",
    "Generation",
    "GlooFSDPGradMean",
    "GradientClipping",
    "HFExport",
    "LossLog",
    "NoiseIntervalSearch",
    "NonFiniteLoss",
    "SampleIndexer",
    "TensorboardUpload",
    "eval_callbacks",
]
