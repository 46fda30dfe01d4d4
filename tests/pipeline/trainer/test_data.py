"""Streaming data: rows come back as the batches the objective needs, and every sample's position in
the global training stream (its noise id) is the same whatever the number of nodes, ranks and workers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.trainer.config import TrainLoaderSection
from pipeline.trainer.data import build_dataloader, global_batch_positions
from tests.factories import SEQ_LEN, packed_rows


def _rank_stream(partition: np.ndarray, node: int, rank: int) -> np.ndarray:
    """Samples in the order a rank's DataLoader yields them (batch k comes from worker k % workers)."""
    per_worker = partition[node, rank]  # (workers, batches per worker, batch size)
    workers, n_batches, _ = per_worker.shape
    return np.concatenate([per_worker[k % workers, k // workers] for k in range(workers * n_batches)])


@pytest.mark.parametrize(
    "nodes,ranks,workers", [(1, 1, 1), (1, 2, 1), (1, 2, 3), (2, 2, 2), (2, 4, 1), (4, 1, 2)]
)
@pytest.mark.parametrize("drop_first", [0, 96])
def test_global_batch_positions_match_streaming_partition(nodes, ranks, workers, drop_first):
    from streaming.base.partition.orig import get_partitions_orig

    n, canonical, global_batch = 1000, 4, 32
    world = nodes * ranks
    b = global_batch // world
    reference = get_partitions_orig(n, canonical, 1, 1, 1, global_batch, drop_first)[0, 0, 0].reshape(-1)
    part = get_partitions_orig(n, canonical, nodes, ranks, workers, b, drop_first)
    for node, rank in itertools.product(range(nodes), range(ranks)):
        stream = _rank_stream(part, node, rank)
        pos = global_batch_positions(b, world, ranks, node, rank).numpy()
        for k in range(len(stream) // b - 1):
            got = stream[k * b : (k + 1) * b]
            if (got < 0).any():  # padding at the end of the epoch
                break
            np.testing.assert_array_equal(got, reference[k * global_batch + pos])


def test_positions_tile_the_global_batch():
    world, local, b = 8, 4, 3
    all_pos = torch.cat(
        [global_batch_positions(b, world, local, g // local, g % local) for g in range(world)]
    )
    assert sorted(all_pos.tolist()) == list(range(world * b))


def test_loader_yields_rows_as_tensors(tiny_data):
    data, _ = tiny_data
    section = TrainLoaderSection(local=str(data), split="val", shuffle=False)
    spec = build_dataloader(section, seq_len=SEQ_LEN, batch_size=8)
    batch = next(iter(spec.dataloader))
    tokens, starts = packed_rows(32, seed=1)  # what conftest wrote to val/
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (8, SEQ_LEN)
    assert batch["doc_starts"].dtype == torch.bool
    for row, idx in enumerate(batch["dataset_index"].tolist()):
        np.testing.assert_array_equal(batch["input_ids"][row].numpy(), tokens[idx])
        assert batch["doc_starts"][row].nonzero().squeeze(1).tolist() == starts[idx].tolist()
    assert spec.get_num_samples_in_batch(batch) == 8 and spec.get_num_tokens_in_batch(batch) == 8 * SEQ_LEN


def test_dataset_state_resumes_at_the_next_sample(tiny_data):
    """Composer checkpoints `dataset.state_dict(samples_in_epoch)`; loading it skips what was seen."""
    data, _ = tiny_data
    section = TrainLoaderSection(local=str(data), split="val", shuffle=True)
    first = build_dataloader(section, seq_len=SEQ_LEN, batch_size=4).dataloader
    order = torch.cat([b["dataset_index"] for b in first])
    resumed = build_dataloader(section, seq_len=SEQ_LEN, batch_size=4).dataloader
    resumed.dataset.load_state_dict(first.dataset.state_dict(8, True))
    assert torch.cat([b["dataset_index"] for b in resumed]).tolist() == order[8:].tolist()
