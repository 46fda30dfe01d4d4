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

from pipeline.diffusion.footprint import train_flops_per_sample
from pipeline.diffusion.objective import DiffusionConfig, NelboOutput, compute_nelbo, eval_nelbo
from pipeline.model import BD3LM

EVAL_METRICS = {"NELBO": "nelbo", "MaskedCE": "masked_ce", "ARNLL": "ar_nll"}


def live_model(state) -> BD3ComposerModel:
    """The run's ``BD3ComposerModel`` in a Composer ``State``: inside DDP's wrapper (``.module``); FSDP2
    shards it in place and the DeepSpeed engine forwards to the same object, so it is the model itself."""
    model = state.model
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model if hasattr(model, "diffusion") else getattr(model, "module", model)


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
            self._flops_cache[L, bs] = train_flops_per_sample(self.model.config, self.diffusion, L, bs)
        return b * self._flops_cache[L, bs]
