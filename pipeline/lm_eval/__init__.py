"""lm-evaluation-harness for this project's checkpoints: the ``bd3`` model (``pipeline.lm_eval.model``),
its command line (``python -m pipeline.lm_eval``, lm-eval's own flags) and a sweep over block sizes
(``pipeline.lm_eval.sweep``, behind ``python -m pipeline.eval --tasks``).

``lm-eval`` is the optional extra ``lmeval`` (in ``dev``); ``scoring`` needs only torch.
"""


def build_parser():
    """The parser of ``python -m pipeline.lm_eval``: lm-eval's own ``run`` command, every flag of it."""
    import argparse

    from lm_eval._cli.run import Run

    sub = argparse.ArgumentParser(prog="python -m pipeline.lm_eval").add_subparsers()
    Run.create(sub)
    return sub.choices["run"]
