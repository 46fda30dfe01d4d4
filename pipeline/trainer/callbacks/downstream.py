"""``callbacks.downstream_eval``: lm-evaluation-harness tasks on the live model during training.

The tasks run through the ``bd3`` model of ``pipeline.lm_eval`` wrapped around the training model
itself (no checkpoint), at each configured block size, on the evaluation schedule and at the end of
training. Under several processes lm-eval splits the documents over the ranks and gathers them on
rank 0, which hands the results to every rank. With replicated weights (DDP, ZeRO-1/2) each rank
evaluates the training model itself. With parameters sharded by FSDP or ZeRO-3 a forward would gather
them collectively, so ranks doing different work would fall out of step (the number of forwards of
greedy checks and generation depends on the requests): the weights are gathered once per evaluation
into a plain copy on every rank (``eval_base.full_model_copy``: one full copy of the weights per rank
while the tasks run), which each rank evaluates its share on. Either way the numbers are those of one
process (the noise is keyed on each request's context). The global RNGs (torch, Python's ``random``, NumPy's, which lm-eval seeds) are put back
afterwards and the noise of the scores comes from the section's seed, so training is untouched.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
from composer.core import State
from composer.loggers import Logger

from pipeline.trainer.callbacks.eval_base import (
    EvalSchedule,
    ScheduledEval,
    full_model_copy,
    isolated_eval,
    params_sharded,
)
from pipeline.trainer.config.schema import DownstreamEvalSection


class DownstreamEval(ScheduledEval):
    """Logs ``eval/downstream/{task}/{metric}/bs{N}`` (lm-eval's value of each metric of each task at
    block size N) every ``interval``; ``last_results`` holds the latest ``DownstreamResult`` list."""

    def __init__(self, section: DownstreamEvalSection, interval: str | int, tokenizer_file: str | Path):
        """``interval``: the resolved schedule (the section's, else the evaluation schedule);
        ``tokenizer_file``: the run's tokenizer.json (lm-eval tokenizes the task text with it)."""
        self.section = section
        self.schedule = EvalSchedule(interval)
        self.tokenizer_file = Path(tokenizer_file)
        self.last_results: list = []
        self._manager = None

    def evaluate(self, state: State) -> list:
        """``DownstreamResult`` per (task, metric, block size) of the current weights."""
        from composer.utils import dist
        from lm_eval import simple_evaluate

        from pipeline.lm_eval.model import BD3EvalLM
        from pipeline.lm_eval.sweep import table_rows, task_manager

        s = self.section
        if self._manager is None:  # indexing the task folder once per run
            self._manager = task_manager(s.tasks, s.include_path)
        py_rng, np_rng = random.getstate(), np.random.get_state()
        local_rank = os.environ.get("LOCAL_RANK")
        world = dist.get_world_size()
        split = world > 1
        out = []
        try:
            with isolated_eval(state) as bd3:
                bd3.eval()
                model = full_model_copy(state) if split and params_sharded(state) else bd3
                for bs in s.block_sizes:
                    lm = BD3EvalLM(
                        model,
                        block_size=bs,
                        mc_samples=s.mc_samples,
                        seed=s.seed,
                        batch_size=s.batch_size,
                        tokenizer=str(self.tokenizer_file),
                    )
                    if split:  # lm-eval gives each rank its share of the documents
                        lm._rank, lm._world_size = dist.get_global_rank(), world
                    # lm-eval 0.4.x also reads LOCAL_RANK (not the model's rank) to decide where the
                    # gathered results are returned, and returns none where it is not 0: while it runs
                    # it sees 0 on every rank, and only global rank 0's results are kept (broadcast).
                    os.environ["LOCAL_RANK"] = "0"
                    results = simple_evaluate(
                        model=lm,
                        tasks=list(s.tasks),
                        task_manager=self._manager,
                        limit=s.limit,
                        num_fewshot=s.num_fewshot,
                        verbosity="WARNING",
                    )
                    if split:  # rank 0 holds the gathered results; every rank logs and keeps them
                        rows = [table_rows(results, bs) if results is not None else None]
                        dist.broadcast_object_list(rows, src=0)
                        out += rows[0]
                    else:
                        out += table_rows(results, bs)
        finally:
            random.setstate(py_rng)
            np.random.set_state(np_rng)
            if local_rank is None:
                os.environ.pop("LOCAL_RANK", None)
            else:
                os.environ["LOCAL_RANK"] = local_rank
        return out

    def _run(self, state: State, logger: Logger) -> None:
        results = self.evaluate(state)
        self.schedule.last_batch = int(state.timestamp.batch)
        logger.log_metrics(
            {f"eval/downstream/{r.task}/{r.metric}/bs{r.block_size}": r.value for r in results}
        )
        self.last_results = results

    def latest_table(self) -> dict | None:
        """The last evaluation for a model card (task x metric x block size); None before the first."""
        if not self.last_results:
            return None
        s = self.section
        return {
            "limit": s.limit,
            "mc_samples": s.mc_samples,
            "num_fewshot": s.num_fewshot,
            "seed": s.seed,
            "results": [r.as_dict() for r in self.last_results],
        }
