"""``BD3ComposerModel``: the plain ``BD3LM`` and the BD3 objective behind Composer's model interface.

Training: ``forward`` runs ``compute_nelbo`` with each sample's noise id = its global index in the
training stream (``batch["sample_index"]``, written by ``SampleIndexer``), so one process and N
processes corrupt every sample identically. With several block sizes (``diffusion.block_size`` a
list) the step's L' is ``diffusion.block_size_at(step)``, the same on every rank and microbatch.
``loss`` returns the backpropagated total plus the weighted NELBO and masked cross-entropy for
logging (``loss/train/*``), and with several sizes the NELBO under ``loss/train/nelbo/bs{N}``.

Evaluation (``metrics/eval/*``): NELBO per token at the (smallest) training block size with the valid
bound's t ~ U[1e-3, 1], the unweighted masked cross-entropy, and the AR NLL (block size 1), all
token-weighted over the whole eval set and summed over ranks.
"""

from __future__ import annotations

import torch
from composer.models import ComposerModel
from torchmetrics import Metric

from pipeline.diffusion.noise import MIN_T
from pipeline.diffusion.objective import DiffusionConfig, NelboOutput, compute_nelbo, eval_nelbo
from pipeline.model import BD3LM

EVAL_METRICS = {"NELBO": "nelbo", "MaskedCE": "masked_ce", "ARNLL": "ar_nll"}


class TokenAverage(Metric):
    """sum / count accumulated in float64 and summed over ranks (per-token averages of a data set)."""

    full_state_update = False

    def __init__(self, key: str):
        super().__init__()
        self.key = key
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, total: torch.Tensor, count: torch.Tensor) -> None:
        self.total += total.detach().double()
        self.count += count.detach().double()

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


def attention_pairs(seq_len: int, block_size: int, shift: bool) -> tuple[int, int]:
    """(tokens in the forward, allowed query-key pairs) of one sample's training forward."""
    L, bs = seq_len, block_size
    if bs == 1 and shift:
        return L, L * (L + 1) // 2  # the causal clean pass only
    if bs == L:
        return L, L * L  # the bidirectional noisy pass only
    # concat(x_t, x_0) under the bd3_train mask: block-diagonal in x_t (L * L'), offset
    # block-causal x_t -> x_0 and block-causal x_0 -> x_0 (together L^2).
    return 2 * L, L * L + L * bs


def train_flops_per_sample(model: BD3LM, diffusion: DiffusionConfig, seq_len: int, block_size: int) -> float:
    """Model FLOPs of one training sample at ``block_size`` (forward + backward, no recomputation counted).

    6 x matmul parameters x forward tokens (2L for 1 < L' < L), plus 12 x layers x heads x head_dim
    per attended query-key pair (only pairs the mask allows: kernels that skip masked blocks do no
    other work), plus the output head on the positions actually scored (expected masked fraction
    of the noise interval). Complementary masks double the body; the auxiliary AR loss adds a
    causal pass.
    """
    c = model.config
    L, bs = seq_len, block_size
    attn_dim = c.num_attention_heads * c.head_dim
    kv_dim = c.num_key_value_heads * c.head_dim
    body = c.num_hidden_layers * (
        2 * c.hidden_size * attn_dim + 2 * c.hidden_size * kv_dim + 3 * c.hidden_size * c.intermediate_size
    )
    head = c.hidden_size * c.vocab_size
    tokens, pairs = attention_pairs(L, bs, diffusion.shift)
    copies = 2 if diffusion.complementary_mask and bs > 1 else 1
    beta, omega = diffusion.interval_for(bs)
    masked_fraction = 1.0 if bs == 1 else (max(beta, MIN_T) + omega) / 2
    scored = (L - 1) * (1.0 if copies == 2 else masked_fraction)
    flops = copies * (6 * body * tokens + 12 * c.num_hidden_layers * attn_dim * pairs) + 6 * head * scored
    if diffusion.aux_ar_weight > 0:
        flops += 6 * body * L + 12 * c.num_hidden_layers * attn_dim * L * (L + 1) // 2 + 6 * head * (L - 1)
    return float(flops)


class BD3ComposerModel(ComposerModel):
    """Composer adapter; ``self.model`` is the plain ``BD3LM`` (what checkpoints and exports hold)."""

    def __init__(self, model: BD3LM, diffusion: DiffusionConfig):
        super().__init__()
        self.model = model
        self.diffusion = diffusion
        self._flops_cache: dict[tuple[int, int], float] = {}
        self.last_block_size: int | None = None  # L' of the last training forward (diagnostics)

    def forward(self, batch: dict[str, torch.Tensor]) -> NelboOutput:
        if "sample_index" not in batch:
            raise KeyError(
                "training batch has no 'sample_index' (the noise ids): the SampleIndexer callback writes it; "
                "build the Trainer with pipeline.trainer.build_trainer"
            )
        step = int(batch["step"][0]) if "step" in batch else 0
        out = compute_nelbo(
            self.model,
            batch["input_ids"],
            self.diffusion,
            batch["sample_index"],
            step=step,
            doc_starts=batch["doc_starts"],
        )
        self.last_block_size = out.block_size
        return out

    def loss(self, outputs: NelboOutput, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # compute_nelbo divides by the scored tokens of this microbatch. Composer weights microbatches
        # and ranks by their number of rows, so renormalize to rows x (L - 1): the total is then the
        # same sum over the global batch / (B x (L - 1)) on any number of processes (factor exactly 1
        # unless per-document masking leaves rows with fewer scored tokens).
        b, L = batch["input_ids"].shape
        total = outputs.loss * (outputs.n_scored.sum() / (b * (L - 1)))
        out = {"total": total, "nelbo": outputs.nelbo.detach(), "masked_ce": outputs.masked_ce.detach()}
        if len(self.diffusion.block_sizes) > 1:
            # Every rank and microbatch of a step uses the same size, so the keys agree for Composer's
            # reduction; each size's curve has points at the steps that drew it.
            out[f"nelbo/bs{outputs.block_size}"] = outputs.nelbo.detach()
        return out

    def eval_forward(
        self, batch: dict[str, torch.Tensor], outputs=None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if outputs is not None:
            return outputs
        x0, ids, doc_starts = batch["input_ids"], batch["dataset_index"], batch["doc_starts"]
        out = eval_nelbo(
            self.model, x0, min(self.diffusion.block_sizes), ids, self.diffusion, doc_starts=doc_starts
        )
        ar = eval_nelbo(self.model, x0, 1, ids, self.diffusion, doc_starts=doc_starts)
        return {
            "nelbo": (out.nelbo_sum.sum(), out.n_scored.sum()),
            "masked_ce": (out.masked_ce_sum.sum(), out.n_masked.sum()),
            "ar_nll": (ar.nelbo_sum.sum(), ar.n_scored.sum()),
        }

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        # Training values come from `loss` (no second forward per microbatch).
        return {} if is_train else {name: TokenAverage(key) for name, key in EVAL_METRICS.items()}

    def update_metric(self, batch, outputs, metric: Metric) -> None:
        metric.update(*outputs[metric.key])

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        b, L = batch["input_ids"].shape
        step = int(batch["step"][0]) if "step" in batch else 0
        bs = self.diffusion.block_size_at(step)
        if (L, bs) not in self._flops_cache:
            self._flops_cache[L, bs] = train_flops_per_sample(self.model, self.diffusion, L, bs)
        return b * self._flops_cache[L, bs]
