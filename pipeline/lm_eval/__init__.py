"""lm-evaluation-harness for this project's checkpoints: the ``bd3`` model (``pipeline.lm_eval.model``),
its command line (``python -m pipeline.lm_eval``, lm-eval's own flags) and a sweep over block sizes
(``pipeline.lm_eval.sweep``, behind ``python -m pipeline.eval --tasks``).

``lm-eval`` is the optional extra ``lmeval`` (in ``dev``); ``scoring`` needs only torch.
"""
