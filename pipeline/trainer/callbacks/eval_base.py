"""What the evaluation callbacks share: their schedule, the eval rows they read, isolation from training.

They tick on one schedule (``EvalSchedule``): at BATCH_END when the timestamp crosses the interval and
at the last batch. Evaluation never touches the training dataloader or the global RNG (seeded
generators only; the global states are also forked around it), runs under ``torch.no_grad`` in eval
mode and puts the model back in train mode, so with ``adopt: false`` the training losses are bitwise
those of the same run without them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from pipeline.rows import stack_rows
from pipeline.trainer.composer_model import live_model


class EvalSchedule:
    """Ticks when the timestamp crosses ``interval`` (BATCH_END; EPOCH_END for epoch units) and at
    the last batch of training; at most once per batch. ``every_n`` keeps every n-th tick.

    The tick count and the batch of the last run are part of the owner's ``state_dict``, so a resumed
    run keeps counting where the interrupted one stopped.
    """

    def __init__(self, interval: str | int, every_n: int = 1):
        from composer.utils.misc import create_interval_scheduler

        self.interval = interval
        self.every_n = every_n
        self._check = create_interval_scheduler(
            interval, include_end_of_training=True, checkpoint_events=False, final_events={Event.BATCH_END}
        )
        self.ticks = 0
        self.last_tick = -1  # batch of the last tick
        self.last_batch = -1  # batch of the owner's last run

    def due(self, state: State, event: Event) -> bool:
        """True when the owner should run now (call on every event)."""
        if event not in (Event.BATCH_END, Event.EPOCH_END) or not self._check(state, event):
            return False
        batch = int(state.timestamp.batch)
        if batch == self.last_tick:
            return False
        self.last_tick = batch
        self.ticks += 1
        return self.ticks % self.every_n == 0

    def state_dict(self) -> dict[str, int]:
        return {"ticks": self.ticks, "last_tick": self.last_tick, "last_batch": self.last_batch}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.ticks = int(sd.get("ticks", 0))
        self.last_tick = int(sd.get("last_tick", -1))
        self.last_batch = int(sd.get("last_batch", -1))


def params_sharded(state: State) -> bool:
    """FSDP or DeepSpeed ZeRO-3: a forward gathers the parameters collectively (all ranks must run it)."""
    return state.fsdp_enabled or any(hasattr(p, "ds_id") for p in live_model(state).model.parameters())


def full_model_copy(state: State) -> torch.nn.Module:
    """A plain ``BD3LM`` (no hooks, no sharding) with the full current weights of the live model whose
    parameters FSDP or ZeRO-3 shard, on every rank: collective, every rank calls it. In the dtype of
    the gathered weights (rotary frequencies float32), on the device of this rank's computation.

    It costs one full copy of the weights per rank while it lives; in exchange its forwards need no
    collective, so ranks can run different work (an evaluation split over them)."""
    from pipeline.model import BD3LM

    bd3 = live_model(state).model
    if state.fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(bd3, options=StateDictOptions(full_state_dict=True))
    else:  # DeepSpeed ZeRO-3: the partitions gathered for the copy, then released
        import deepspeed

        params = dict(bd3.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            full = {name: p.detach().clone() for name, p in params.items()}
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    copy = BD3LM(bd3.config, attn_backend=bd3.attn_backend)
    copy.load_state_dict(full, strict=False)  # (a tied lm_head may be listed once)
    copy.to(device=device, dtype=next(iter(full.values())).dtype)
    copy.inv_freq = bd3.inv_freq.detach().to(device=copy.lm_head.weight.device, dtype=torch.float32)
    missing = {n for n, _ in copy.named_parameters()} - set(full)  # (tied: one name per tensor)
    if missing:
        raise RuntimeError(f"the gathered weights lack {sorted(missing)[:5]}")
    return copy.eval()


@contextlib.contextmanager
def isolated_eval(state: State):
    """No gradients, the run's precision, and the global RNG states put back afterwards.

    ``evaluate_block_sizes``, ``noise_interval_search`` and ``generate`` draw only from their own
    seeded generators (tested); forking the global states keeps that true whatever a model does.
    """
    from composer.core import get_precision_context

    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    bd3 = live_model(state).model
    was_training = bd3.training
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            with get_precision_context(state.precision, state.precision_config):
                yield bd3
        finally:
            bd3.train(was_training)


class EvalRows:
    """The first global eval batches as this rank's batches, read by index from the run's eval set.

    Uses random access into the trainer's eval ``StreamingDataset`` (never iterates it, so the
    evaluator and the training loader are untouched). Global batch j holds eval rows
    ``j * B * world ... (j + 1) * B * world - 1``; rank r takes every world-th row from r, so the
    ranks' rows are disjoint, together cover the first ``num_batches`` global batches, and every rank
    gets the same number of batches (the collectives of the evaluation stay in step). Each batch's
    ``sample_index`` is the row's index in the eval split: its fixed evaluation noise id.
    """

    def __init__(self, batch_size: int, label: str = "eval"):
        self.batch_size = batch_size
        self.label = label

    def dataset(self, state: State):
        for ev in state.evaluators:
            if ev.label == self.label:
                loader = ev.dataloader.dataloader
                return getattr(loader, "dataset", loader)
        raise RuntimeError(
            f"the evaluation callbacks need the trainer's {self.label!r} evaluator (set eval_loader)"
        )

    def indices(self, total: int, num_batches: int) -> list[int]:
        world, rank = dist.get_world_size(), dist.get_global_rank()
        n = min(num_batches * self.batch_size * world, (total // world) * world)
        return list(range(rank, n, world))

    def batches(
        self, state: State, num_batches: int, stream: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of the first ``num_batches`` global batches of the eval rows, or of the
        rows of stream ``stream`` of a mixture (its rows in the dataset, numbered from 0 within the
        stream: a stream's noise ids, and so its numbers, are those of evaluating it alone)."""
        ds = self.dataset(state)
        if stream is None:
            offset, total = 0, int(getattr(ds, "num_samples", None) or len(ds))
        else:
            from pipeline.streaming_seams import stream_rows

            ids = stream_rows(ds)[stream]
            offset, total = ids.start, len(ids)
        mine = self.indices(total, num_batches)
        for s in range(0, len(mine), self.batch_size):
            rows = [ds[offset + i] for i in mine[s : s + self.batch_size]]
            yield stack_rows(rows, [r["dataset_index"] - offset for r in rows])


class ScheduledEval(Callback):
    """Runs ``_run`` on each tick of ``self.schedule`` and at FIT_END when the last batch was not evaluated."""

    schedule: EvalSchedule

    def _run(self, state: State, logger: Logger) -> None:
        raise NotImplementedError

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if self.schedule.due(state, event):
            self._run(state, logger)
        elif event == Event.FIT_END and self.schedule.last_batch != int(state.timestamp.batch):
            self._run(state, logger)

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)
