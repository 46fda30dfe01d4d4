"""The model card (README.md) of an exported BD3-LM: facts of the run only, nothing invented.

Facts come from files the run wrote: the data's ``manifest.json`` (data_prep), the run's resolved
config (``run_config.json`` in the save_folder), ``pipeline.eval`` result JSONs (the trained model and
the AR-init baseline) and the config.json being exported. A section without facts says so. Paths
of the training machine never appear: a local path is reduced to its last component.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NO_DATA = "_No data: not recorded for this export._"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class CardFacts:
    """What the card says about the run; None means unknown (the section says so).

    Attributes:
        base_model: the AR checkpoint the run started from (a hub id, or a local folder).
        license: the license to declare (given by the user, else the base model's card's).
        manifest: the data's manifest.json (data_prep).
        run_config: the run's resolved training config (``run_config.json``).
        eval: a ``pipeline.eval`` JSON of the exported model (``results``: one row per block size).
        baseline: the same for the AR-init baseline.
        downstream: lm-eval results (``results``: one ``DownstreamResult.as_dict`` per task, metric and
            block size; ``limit``, ``mc_samples``, ``num_fewshot``), from the downstream_eval callback
            or a ``pipeline.eval --tasks`` JSON.
        plot: a PNG of the likelihood across block sizes, copied into the folder.
        generation: the sampling settings of an evaluation of this model (a ``pipeline.sample --out``
            JSON's ``settings``): they become ``bd3_generate``'s defaults.
    """

    base_model: str | None = None
    license: str | None = None
    manifest: dict[str, Any] | None = None
    run_config: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    downstream: dict[str, Any] | None = None
    plot: Path | None = None
    generation: dict[str, Any] | None = None
    extra_tags: list[str] = field(default_factory=list)

    @classmethod
    def from_files(
        cls, *, data=None, run_config=None, eval_json=None, baseline_json=None, plot=None, sample_json=None,
        downstream_json=None, **fields,
    ) -> CardFacts:  # fmt: skip
        """Read the facts from paths (each optional): a data folder or its manifest.json, the run's
        ``run_config.json``, ``pipeline.eval --out`` JSONs (``downstream_json``: of ``--tasks``), a ``--plot`` PNG and a ``pipeline.sample
        --out`` JSON (its ``settings``)."""
        from data_prep.manifest import MANIFEST  # here: the model's imports (a GPU box) carry no data_prep

        def read(path):
            if path is None:
                return None
            path = Path(path)
            if path.is_dir():
                path = path / MANIFEST
            return json.loads(path.read_text())

        run = read(run_config)
        sample = read(sample_json)
        if sample is not None and "settings" not in sample:
            raise ValueError(f"{sample_json} has no 'settings': write it with pipeline.sample --out")
        if data is None and run is not None:  # the run's data folder, when this machine can reach it
            loader = run.get("train_loader") or {}
            first = next(iter((loader.get("streams") or {}).values()), {})  # a mixture: its first stream
            local = loader.get("local") or first.get("local")
            data = local if local and (Path(local) / MANIFEST).exists() else None
        if fields.get("base_model") is None and run is not None:
            fields["base_model"] = (run.get("model") or {}).get("init_from")
        if fields.get("license") is None and fields.get("base_model"):
            fields["license"] = base_model_license(fields["base_model"])
        return cls(
            manifest=read(data),
            run_config=run,
            eval=read(eval_json),
            baseline=read(baseline_json),
            downstream=read(downstream_json),
            plot=Path(plot) if plot else None,
            generation=None if sample is None else sample["settings"],
            **fields,
        )


def base_model_license(folder) -> str | None:
    """The ``license:`` of a local base model's card (its README.md front matter), if it has one."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(errors="replace")
    front = text.split("---")[1] if text.startswith("---") and text.count("---") >= 2 else ""
    m = re.search(r"^license:\s*(\S+)\s*$", front, flags=re.M)
    return m.group(1) if m else None


def hub_id(name: str | None) -> str | None:
    """``name`` if it is a Hugging Face hub id (``owner/name``, not a local folder), else None."""
    if name is None or not HUB_ID.match(str(name)) or Path(name).exists():
        return None
    return str(name)


def public_name(name: str | None, parts: int = 1) -> str | None:
    """A hub id as is; a local path reduced to its last ``parts`` components (no paths of the
    training machine)."""
    if name is None or hub_id(name):
        return name
    tail = Path(str(name).rstrip("/")).parts[-parts:]
    return "/".join(p for p in tail if p not in ("/", "~", ".", "..")) or None


def render_card(
    config: dict[str, Any], facts: CardFacts, plot_file: str, generation: dict[str, Any] | None = None
) -> str:
    """README.md text for the folder whose config.json is ``config``; ``generation``: the ``bd3``
    section of its generation_config.json (``bd3_generate``'s defaults)."""
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if hub_id(facts.base_model):
        front.append(f"base_model: {facts.base_model}")
    if facts.license:
        front.append(f"license: {facts.license}")
    front += ["tags:", *(f"  - {t}" for t in ["block-diffusion", "bd3lm", "diffusion-lm", *facts.extra_tags])]
    front.append("---")
    bd3 = config["bd3"]
    sizes = bd3.get("block_sizes") or [bd3.get("block_size")]
    parts = [
        "\n".join(front),
        "# BD3-LM block diffusion language model",
        f"A {config['model_type']} decoder ({config['num_hidden_layers']} layers, hidden size "
        f"{config['hidden_size']}, vocabulary {config['vocab_size']} with the mask token id "
        f"{bd3['mask_token_id']}) trained as a block diffusion LM (BD3-LM, arXiv 2503.09573) at block "
        f"size{'s' if len(sizes) > 1 else ''} {', '.join(map(str, sizes))}. `model(input_ids)` is its "
        "causal (AR) forward; `model.bd3_generate(...)` samples block by block with the KV cache "
        "(`modeling_bd3.py` in this folder).",
        "## Base model\n\n" + _base_section(facts.base_model, facts.run_config),
        "## Data\n\n" + _data_section(facts.manifest),
        "## Training\n\n" + _training_section(facts.run_config, sizes, bd3),
        "## Likelihood across block sizes\n\n" + _likelihood_section(facts, plot_file),
        *([_downstream_section(facts.downstream)] if (facts.downstream or {}).get("results") else []),
        "## Usage\n\n" + _usage(generation),
    ]
    return "\n\n".join(parts) + "\n"


def _base_section(base, run) -> str:
    if hub_id(base):
        return f"Initialized from the AR checkpoint [`{base}`](https://huggingface.co/{base})."
    if base:  # the folder and its parent (runs/ar-tiny/hf -> ar-tiny/hf): a name, not a path
        return f"Initialized from a local AR checkpoint, `{public_name(base, parts=2)}` (not on the hub)."
    if run is not None and not (run.get("model") or {}).get("init_from"):
        return "Trained from a random initialization (the run's `model.init_from` is null): no base model."
    return "No data: the base model is not recorded."


def _data_section(manifest) -> str:
    if not manifest:
        return NO_DATA
    corpus = manifest.get("corpus") or {}
    tok = manifest.get("tokenizer") or {}
    inputs = [public_name(i) for i in corpus.get("inputs", [])]
    lines = [
        f"- dataset: {', '.join(f'`{i}`' for i in inputs) if inputs else 'not recorded'}",
        f"- tokenizer: {public_name(tok.get('source')) or 'not recorded'} ({tok.get('vocab_size')} tokens, "
        f"sha256 {tok.get('sha256', 'not recorded')})",
        f"- documents: {corpus.get('used_documents', corpus.get('documents', 'not recorded'))}",
        f"- sequence length: {manifest.get('seq_len')}",
    ]
    for split, s in (manifest.get("splits") or {}).items():
        lines.append(f"- {split}: {s.get('rows')} rows, {s.get('tokens')} tokens")
    return "\n".join(lines)


def _training_section(run, sizes, bd3) -> str:
    if not run:
        return (
            f"Block size{'s' if len(sizes) > 1 else ''} {', '.join(map(str, sizes))}, shift "
            f"{bd3.get('shift', True)} (config.json). Other settings: " + NO_DATA
        )
    diff = run.get("diffusion") or {}
    steps = run.get("max_duration")
    batch, seq = run.get("global_train_batch_size"), run.get("max_seq_len")
    m = re.fullmatch(r"(\d+)ba", str(steps))
    tokens = int(m.group(1)) * batch * seq if m and batch and seq else None
    par = run.get("parallelism") or {}
    if par.get("deepspeed"):
        stage = (par["deepspeed"].get("zero_optimization") or {}).get("stage")
        parallel = f"DeepSpeed ZeRO-{stage}"
    elif par.get("fsdp"):
        parallel = "FSDP"
    else:
        parallel = "data parallel (no sharding)"
    return "\n".join(
        [
            f"- block size{'s' if len(sizes) > 1 else ''}: {diff.get('block_size', ', '.join(map(str, sizes)))}",
            f"- noise interval: {diff.get('noise_interval', 'not recorded')}",
            f"- shift: {diff.get('shift', bd3.get('shift', True))}",
            f"- steps: {steps}, global batch {batch} rows of {seq} tokens",
            f"- tokens seen: {tokens if tokens is not None else 'not recorded'}",
            f"- parallelism: {parallel}",
        ]
    )


def likelihood_rows(facts: CardFacts) -> list[dict[str, Any]]:
    """One row per block size: the exported model's NELBO and PPL bound, the baseline's when known."""
    baseline = {r["block_size"]: r for r in (facts.baseline or {}).get("results", [])}
    rows = []
    for r in (facts.eval or {}).get("results", []):
        b = baseline.get(r["block_size"])
        rows.append({**r, "baseline_ppl_bound": b["ppl_bound"] if b else None})
    return rows


def _likelihood_section(facts: CardFacts, plot_file: str) -> str:
    rows = likelihood_rows(facts)
    if not rows:
        return NO_DATA
    e = facts.eval
    head = (
        f"NELBO per token (nats) and its perplexity bound exp(NELBO) on {e.get('rows')} rows of the "
        f"`{e.get('split')}` split ({e.get('draws')} noise draw(s), seed {e.get('seed')}), from `pipeline.eval`."
    )
    table = [
        "| block size | NELBO/token | PPL bound | std err | AR-init PPL bound |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = "not measured" if r["baseline_ppl_bound"] is None else f"{r['baseline_ppl_bound']:.2f}"
        table.append(
            f"| {r['block_size']} | {r['nelbo']:.4f} | {r['ppl_bound']:.2f} | {r['stderr']:.4f} | {base} |"
        )
    out = head + "\n\n" + "\n".join(table)
    if facts.plot is not None:
        out += f"\n\n![perplexity bound vs block size]({plot_file})"
    return out


def _downstream_section(d: dict[str, Any]) -> str:
    """Rows (task, metric), one column per block size: lm-eval's value (± its standard error)."""
    rows = d["results"]
    sizes = sorted({r["block_size"] for r in rows})
    cells = {(r["task"], r["metric"], r["block_size"]): r for r in rows}
    head = (
        f"lm-evaluation-harness tasks through the `bd3` model (`pipeline.lm_eval`): limit {d.get('limit')}, "
        f"{d.get('num_fewshot') or 0}-shot, {d.get('mc_samples')} noise draw(s) per request at block sizes "
        "above 1 (there a log-likelihood is the NELBO bound; at 1 it is the exact AR log-probability)."
    )
    table = [
        "| task | metric | " + " | ".join(f"bs {b}" for b in sizes) + " |",
        "|---|---|" + "---:|" * len(sizes),
    ]
    for task, metric in sorted({(r["task"], r["metric"]) for r in rows}):
        vals = []
        for b in sizes:
            r = cells.get((task, metric, b))
            err = r and r.get("stderr")
            vals.append(
                "-"
                if r is None
                else f"{r['value']:.4f}" + ("" if err is None or err != err else f" ± {err:.4f}")
            )
        table.append(f"| {task} | {metric} | " + " | ".join(vals) + " |")
    return "## Downstream tasks\n\n" + head + "\n\n" + "\n".join(table)


def _usage(generation: dict[str, Any] | None) -> str:
    code = """```python
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

model = AutoModelForCausalLM.from_pretrained("PATH_OR_HUB_ID", trust_remote_code=True)
tokenizer = PreTrainedTokenizerFast.from_pretrained("PATH_OR_HUB_ID")
prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids
ids, nfe = model.bd3_generate(prompt, return_nfe=True)  # the defaults below; any of them can be passed
print(tokenizer.decode(ids[0, prompt.shape[1]:]), f"({nfe} denoising network calls)")
```"""
    if not generation:
        return code
    shown = ", ".join(f"`{k}={v!r}`" for k, v in generation.items() if k != "source")
    return (
        f"{code}\n\n`bd3_generate`'s defaults (generation_config.json, `bd3`; from "
        f"{generation.get('source', 'the export')}): {shown}. Loads with transformers 4.57 and 5.x."
    )
