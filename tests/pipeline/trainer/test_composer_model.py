"""The Composer adapter: loss normalization that does not depend on how a batch is split, eval
metrics, and a FLOP count that matches the work of the 2L forward."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion.footprint import attention_pairs, train_flops_per_sample
from pipeline.diffusion.objective import DiffusionConfig
from pipeline.model import BD3LM
from pipeline.model.masks import AttentionMask, dense_mask
from pipeline.trainer.composer_model import BD3ComposerModel
from tests.factories import random_model, tiny_model_config

L = 16


def _model() -> BD3LM:
    return random_model(
        tiny_model_config(61, hidden_size=32, max_position_embeddings=L, initializer_range=0.2)
    )


def _batch(b: int = 4, offset: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 61, (b, L), generator=g)
    starts = torch.zeros(b, L, dtype=torch.bool)
    starts[:, 0] = True
    starts[torch.arange(b), torch.arange(b) + 3] = True  # rows with different numbers of documents
    return {
        "input_ids": x,
        "doc_starts": starts,
        "sample_index": torch.arange(b) + offset,
        "dataset_index": torch.arange(b),
    }


@pytest.mark.parametrize("block_size,shift", [(1, True), (1, False), (2, True), (4, True), (L, True)])
def test_attention_pairs_count_the_mask(block_size, shift):
    tokens, pairs = attention_pairs(L, block_size, shift)
    if block_size == 1 and shift:
        mask = dense_mask(AttentionMask("ar"), L, L, L)
    elif block_size == L:
        mask = dense_mask(AttentionMask("mdlm"), L, L, L)
    else:
        mask = dense_mask(AttentionMask("bd3_train", block_size), 2 * L, 2 * L, L)
    assert (tokens, pairs) == (mask.shape[0], int(mask.sum()))


def test_flops_body_matches_a_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model, block = _model(), 4
    d = DiffusionConfig(block_size=block, noise_interval=(0.5, 0.5 + 1e-6))
    x = torch.randint(0, 61, (1, 2 * L))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, attn=AttentionMask("bd3_train", block), return_hidden=True)
    # aten.mm are the projections; attention (bmm/sdpa) runs dense here and is counted by pairs below.
    linear = sum(v for op, v in counter.get_flop_counts()["Global"].items() if str(op) == "aten.mm")
    c = model.config
    tokens, pairs = attention_pairs(L, block, True)
    attn = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * pairs
    head = 6 * c.hidden_size * c.vocab_size * (L - 1) * 0.5
    assert train_flops_per_sample(model.config, d, L, block) == pytest.approx(
        3 * linear + attn + head, rel=1e-5
    )


@pytest.mark.parametrize("per_document", [False, True])
def test_loss_is_the_same_for_any_split_of_the_batch(per_document):
    """Composer averages microbatch/rank losses weighted by rows; the total must equal the one-batch value."""
    model = _model()
    cm = BD3ComposerModel(model, DiffusionConfig(block_size=4, per_document=per_document, stratify_group=4))
    full = _batch()
    whole = cm.loss(cm(full), full)["total"]
    halves = [{k: v[i : i + 2] for k, v in full.items()} for i in (0, 2)]
    split = sum(cm.loss(cm(h), h)["total"] * 0.5 for h in halves)
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-6)
    out = cm(full)
    if not per_document:  # factor exactly 1: the objective's own loss
        assert torch.equal(cm.loss(out, full)["total"], out.loss)


def test_training_forward_needs_noise_ids():
    cm = BD3ComposerModel(_model(), DiffusionConfig(block_size=4))
    batch = _batch()
    del batch["sample_index"]
    with pytest.raises(KeyError, match="SampleIndexer"):
        cm(batch)


def test_eval_metrics_accumulate_token_averages():
    cm = BD3ComposerModel(_model(), DiffusionConfig(block_size=4)).eval()
    metrics = cm.get_metrics(is_train=False)
    assert set(metrics) == {"NELBO", "MaskedCE", "ARNLL"} and cm.get_metrics(is_train=True) == {}
    batch = _batch()
    for half in ({k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}):
        out = cm.eval_forward(half)
        for m in metrics.values():
            cm.update_metric(half, out, m)
    from pipeline.diffusion.objective import eval_nelbo

    ar = eval_nelbo(cm.model, batch["input_ids"], 1, batch["dataset_index"], cm.diffusion)
    torch.testing.assert_close(metrics["ARNLL"].compute().float(), ar.nelbo, rtol=1e-5, atol=1e-6)
    assert 0 < metrics["MaskedCE"].compute() < metrics["NELBO"].compute() * 10
