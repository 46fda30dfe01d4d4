"""The whole pipeline end to end at small scale: ``make demo`` (``python -m pipeline.demo``).

Stages (each reuses its output when rerun; the export is written again):
  1. corpora: OpenWebText's first documents when the Hugging Face hub is reachable, otherwise the
     docstrings of the installed Python packages (real English prose, present on every machine
     that installed this project, never committed here): the "prose" stream; and the Python source
     files of the same packages: the "code" stream;
  2. ``data_prep tokenizer train`` (on both) and ``data_prep convert`` of each, with validation splits;
  3. ``pipeline.train yamls/ar_tiny.yaml``: AR pretraining of a tiny LLaMA-style model;
  4. ``composer -n 2 -m pipeline.train yamls/bd3_tiny.yaml`` from that AR checkpoint under
     DeepSpeed ZeRO-2 (the DiffuLLaMA flow), one model for the block sizes 2, 4, 8 and 16 (each
     step draws one; BD3-LM's clipped intervals where the paper gives them), on a mixture: the
     prose it was pretrained on (``MIXTURE``: 70%, replay) and code (30%, the new domain);
  5. ``pipeline.eval`` across block sizes, each stream alone and their total: the AR-init baseline
     and the trained BD3 model (the per-stream likelihood table), and beside it a downstream table
     (``pipeline.eval --tasks``: a multiple-choice task made from the corpus, ``demo_downstream``) at
     block sizes 1 and 4; one comparison figure (``comparison.png``) of both models;
  6. ``pipeline.sample`` at a trained block size with the KV cache (``SAMPLING``);
  7. ``pipeline.export``: the BD3 run as a Hugging Face folder with its modeling code, a model card
     showing stage 5's table and stage 6's settings as ``bd3_generate``'s defaults
     (``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``);
  8. a summary of where everything is.
Every stage runs the real command line in a subprocess, as a user would type it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.demo_downstream import TASK, downstream_table, run_downstream
from pipeline.plots import plot_comparison

SIZES = {
    # docs, vocab, seq_len, val docs, AR batches, BD3 batches, eval rows, new tokens
    "full": dict(
        code_docs=3000,
        code_val_docs=75,
        docs=12000,
        vocab=4096,
        seq_len=128,
        val_docs=300,
        ar_steps=500,
        bd3_steps=500,
        eval_rows=128,
        new_tokens=256,
        task_docs=64,
    ),
    "quick": dict(
        docs=600,
        vocab=512,
        seq_len=64,
        val_docs=60,
        ar_steps=6,
        bd3_steps=4,
        eval_rows=16,
        new_tokens=24,
        code_docs=150,
        code_val_docs=15,
        task_docs=8,
    ),  # fmt: skip
}
BLOCK_SIZE = 4  # sampled at; the model is trained for all of TRAINED_SIZES
# Stage 6's sampling (pipeline.sample), which the export records as bd3_generate's defaults.
SAMPLING = dict(block_size=BLOCK_SIZE, sampler="confidence", top_p=0.9, seed=0)
TRAINED_SIZES = (2, 4, 8, 16)
# BD3-LM's clipped intervals for L'=4 and 16 (LM1B); unclipped where the paper gives none.
NOISE_INTERVALS = {2: (1e-3, 1.0), 4: (0.45, 0.95), 8: (1e-3, 1.0), 16: (0.3, 0.8)}
# Stage 4's training mixture: stream -> proportion (the folders: ``stream_folders``).
MIXTURE = {"prose": 0.7, "code": 0.3}
CODE_DATA = "data_code"  # the code stream's data_prep output, beside the prose's data/


def stream_folders(out: Path) -> dict[str, Path]:
    """The data_prep output of each stream of ``MIXTURE``."""
    return {"prose": out / "data", "code": out / CODE_DATA}


def mixture_overrides(folders: dict[str, Path]) -> list[str]:
    """Overrides that train on ``MIXTURE`` and evaluate every stream (yamls/bd3_tiny.yaml)."""
    out = []
    for role in ("train_loader", "eval_loader"):
        out += [f"{role}.local=null", f"{role}.remote=null"]
        out += [f"{role}.streams.{name}.local={folder}" for name, folder in folders.items()]
    return out + [f"train_loader.streams.{name}.proportion={p}" for name, p in MIXTURE.items()]


def sampling_args(max_new_tokens: int) -> list[str]:
    """pipeline.sample's arguments for ``SAMPLING``."""
    args = ["--max-new-tokens", str(max_new_tokens)]
    for key, value in SAMPLING.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def write_hub_corpus(out: Path, n_docs: int) -> None:
    """The first ``n_docs`` OpenWebText documents as JSON lines, read with data_prep's hub reader."""
    from data_prep.sources import count_documents, iter_documents, resolve_inputs

    sources = resolve_inputs(["openwebtext"])
    counts = [count_documents(s) for s in sources]
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as f:
        for text, _ in iter_documents(sources, counts, 0, min(n_docs, sum(counts))):
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, out)


def finished_json(path: Path, model: Path) -> bool:
    """A stage's JSON output is there, whole (its command writes it once, at its end) and newer than
    the Hugging Face folder ``model`` it was computed from (a retrained model is evaluated again)."""
    try:
        json.loads(path.read_text())
        return path.stat().st_mtime >= (model / "config.json").stat().st_mtime
    except (OSError, ValueError):
        return False


def header(n: int, title: str) -> None:
    print(f"\n=== [{n}/8] {title} ===", flush=True)


def sh(cmd: list[str], **kw) -> None:
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
    subprocess.run(cmd, check=True, env=env, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common_overrides(data: Path, tok: Path, seq_len: int) -> list[str]:
    """YAML overrides every training stage of the demo shares."""
    return [
        f"variables.data_local={data}",
        f"variables.tokenizer={tok}",
        f"variables.max_seq_len={seq_len}",
        "eval_first=false",
    ]


# Over 60 lines on purpose: stages 1-2 in order, each reused when already done: the demo reads as a script.
def prepare_data(out: Path, size_name: str = "full", corpus_choice: str = "auto") -> tuple[Path, Path]:
    """Stages 1-2 (corpora, tokenizer + MDS shards of each stream), reused when already in ``out``.

    Returns (the prose stream's MDS data folder, tokenizer.json); the code stream's is ``out/CODE_DATA``.
    """
    size = SIZES[size_name]
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    header(1, "corpus")
    corpus = out / "corpus.jsonl"
    use_hub = corpus_choice == "openwebtext" or (corpus_choice == "auto" and hub_reachable())
    if corpus.exists():
        print(f"reusing {corpus}")
    elif use_hub:
        write_hub_corpus(corpus, size["docs"])
        print(f"hub reachable: first {size['docs']} documents of OpenWebText -> {corpus}")
    else:
        from data_prep.docs_corpus import write_docs_corpus

        n = write_docs_corpus(corpus, size["docs"])
        print(f"hub not reachable: {n} docstrings of installed packages -> {corpus}")
    code = out / "code.jsonl"
    if code.exists():
        print(f"reusing {code}")
    else:
        from data_prep.docs_corpus import write_code_corpus

        n = write_code_corpus(code, size["code_docs"])
        print(f"{n} Python source files of installed packages (the code stream) -> {code}")
    source = [str(corpus)]

    header(2, "tokenizer and MDS shards of both streams (data_prep)")
    from pipeline.model.hf_io import TOKENIZER_FILE

    tok = out / TOKENIZER_FILE
    data = out / "data"
    if not tok.exists():
        sh(
            [
                py,
                "-m",
                "data_prep",
                "tokenizer",
                "train",
                "--input",
                *source,
                str(code),
                "--vocab-size",
                str(size["vocab"]),
                "--out",
                str(tok),
            ]
        )

    def convert(inputs: list[str], dest: Path, val_docs: int, *extra: str) -> None:
        sh(
            [py, "-m", "data_prep", "convert", "--input", *inputs, "--out", str(dest), "--tokenizer", str(tok),
             "--seq-len", str(size["seq_len"]), "--val-docs", str(val_docs), *extra]
        )  # fmt: skip

    convert(source, data, size["val_docs"], "--max-docs", str(size["docs"]))
    convert([str(code)], out / CODE_DATA, size["code_val_docs"])
    return data, tok


def prepare_ar(out: Path, size_name: str = "full", corpus_choice: str = "auto") -> tuple[Path, Path, Path]:
    """Stages 1-3 (corpus, tokenizer + shards, AR pretraining), reused when already in ``out``.

    Returns (MDS data folder, tokenizer.json, AR run folder whose ``hf`` the BD3 stage inits from).
    """
    size = SIZES[size_name]
    py = sys.executable
    repo = Path(__file__).resolve().parents[1]
    data, tok = prepare_data(out, size_name, corpus_choice)
    common = common_overrides(data, tok, size["seq_len"])
    header(3, "AR pretraining of a tiny LLaMA-style model (yamls/ar_tiny.yaml)")
    ar_dir = out / "runs" / "ar-tiny"
    if not (ar_dir / "hf" / "config.json").exists():
        sh(
            [
                py,
                "-m",
                "pipeline.train",
                str(repo / "yamls" / "ar_tiny.yaml"),
                *common,
                f"variables.save_folder={ar_dir}",
                f"max_duration={size['ar_steps']}ba",
                f"eval_interval={size['ar_steps']}ba",
                f"save_interval={size['ar_steps']}ba",
            ]
        )
    else:
        print(f"reusing {ar_dir / 'hf'}")

    return data, tok, ar_dir


def per_stream_table(ar: dict, bd3: dict) -> str:
    """PPL bounds per block size of the AR-init baseline and the trained model (``pipeline.eval``
    results with ``streams``), a column each per stream and for the token-weighted total."""
    names = list(bd3["streams"])
    cols = [f"{who} {name}" for name in [*names, "total"] for who in ("AR-init", "BD3")]
    lines = ["\nPPL bound per stream (each evaluated alone) and in total:", f"{'block size':>10}"]
    lines[-1] += "".join(f" {c:>{max(12, len(c))}}" for c in cols)
    for i, r in enumerate(bd3["results"]):
        values = []
        for name in [*names, "total"]:
            for table in (ar, bd3):
                rs = table["results"] if name == "total" else table["streams"][name]
                values.append(rs[i]["ppl_bound"])
        lines.append(
            f"{r['block_size']:>10}" + "".join(f" {v:>{max(12, len(c))}.2f}" for v, c in zip(values, cols))
        )
    return "\n".join(lines)


# Over 60 lines on purpose: the demo's stages in the order a user runs them, each a few lines that call the library.
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", default=os.environ.get("DEMO_OUT", "demo_out"))
    ap.add_argument("--size", choices=sorted(SIZES), default=os.environ.get("DEMO_SIZE", "full"))
    ap.add_argument("--corpus", choices=("auto", "openwebtext", "docstrings"), default="auto")
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    out = Path(args.out).resolve()
    py = sys.executable
    repo = Path(__file__).resolve().parents[1]
    start = time.time()
    data, tok, ar_dir = prepare_ar(out, args.size, args.corpus)
    source = [str(out / "corpus.jsonl")]
    common = common_overrides(data, tok, size["seq_len"])

    mix = ", ".join(f"{name} {100 * p:.0f}%" for name, p in MIXTURE.items())
    header(4, f"BD3 for L' in {list(TRAINED_SIZES)} from the AR checkpoint on {mix}, ZeRO-2, 2 processes")
    bd3_dir = out / "runs" / "bd3-tiny"
    if not (bd3_dir / "hf" / "config.json").exists():
        launcher = str(Path(py).with_name("composer"))
        sh(
            [
                launcher,
                "-n",
                "2",
                "--master_port",
                str(free_port()),
                "-m",
                "pipeline.train",
                str(repo / "yamls" / "bd3_tiny.yaml"),
                *common,
                f"variables.init_from={ar_dir / 'hf'}",
                f"variables.save_folder={bd3_dir}",
                f"max_duration={size['bd3_steps']}ba",
                f"diffusion.block_size=[{', '.join(map(str, TRAINED_SIZES))}]",
                "diffusion.noise_interval={"
                + ", ".join(f"{b}: [{lo}, {hi}]" for b, (lo, hi) in NOISE_INTERVALS.items())
                + "}",
                f"eval_interval={size['bd3_steps']}ba",
                f"save_interval={size['bd3_steps']}ba",
                "parallelism.deepspeed.zero_optimization.stage=2",
                f"callbacks.hf_export.folder={bd3_dir / 'hf'}",
                *mixture_overrides(stream_folders(out)),
            ],
            env={"OMP_NUM_THREADS": "1"},
        )
    else:
        print(f"reusing {bd3_dir / 'hf'}")

    header(5, "likelihood across block sizes (pipeline.eval)")
    sizes = f"1,2,{BLOCK_SIZE},8,16,L"
    tables = {}
    for name, ckpt in (("ar_init_baseline", ar_dir / "hf"), ("bd3_trained", bd3_dir / "hf")):
        res = out / f"eval_{name}.json"
        if finished_json(res, ckpt):
            print(f"reusing {res}")
            tables[name] = json.loads(res.read_text())
            continue
        sh(
            [
                py,
                "-m",
                "pipeline.eval",
                "--checkpoint",
                str(ckpt),
                *[f"--data={name}={folder}" for name, folder in stream_folders(out).items()],
                "--split",
                "val",
                "--block-sizes",
                sizes,
                "--max-rows",
                str(size["eval_rows"]),
                "--out",
                str(res),
            ]
        )
        tables[name] = json.loads(res.read_text())
    print(per_stream_table(tables["ar_init_baseline"], tables["bd3_trained"]))
    models = {"ar_init_baseline": ar_dir / "hf", "bd3_trained": bd3_dir / "hf"}
    downstream = run_downstream(py, out, models, sh, limit=size["task_docs"])
    print(f"\ndownstream: {TASK} (the true next words among 4 of the corpus), accuracy per block size")
    print(downstream_table(downstream))
    plot_comparison(
        {k: t["results"] for k, t in tables.items()},
        {k: t["results"] for k, t in downstream.items()},
        out / "comparison.png",
        title=f"{bd3_dir.name}: AR-init baseline vs trained",
    )

    header(6, f"sampling at block size {BLOCK_SIZE} with the KV cache (pipeline.sample)")
    sample = out / "sample.json"
    if finished_json(sample, bd3_dir / "hf"):
        print(f"reusing {sample}")
    else:
        cmd = [py, "-m", "pipeline.sample", "--checkpoint", str(bd3_dir / "hf")]
        sh([*cmd, *sampling_args(size["new_tokens"]), "--out", str(sample)])

    header(7, "the BD3 model as a Hugging Face folder with a model card (pipeline.export)")
    hf_model = out / "bd3-tiny-hf"
    sh(
        [
            py,
            "-m",
            "pipeline.export",
            "--checkpoint",
            str(bd3_dir),
            "--out",
            str(hf_model),
            "--eval-json",
            str(out / "eval_bd3_trained.json"),
            "--baseline-json",
            str(out / "eval_ar_init_baseline.json"),
            "--plot",
            str(out / "comparison.png"),
            "--downstream-json",
            str(out / "downstream_bd3_trained.json"),
            "--sample-json",
            str(sample),
        ]
    )

    header(8, "summary")
    from pipeline.save_folder import ds_folder

    s = json.loads(sample.read_text())
    minutes = (time.time() - start) / 60
    print(f"""finished in {minutes:.1f} min
  corpus            {source[0]}
  shards            {data}  (manifest.json, train/, val/); code stream: {out / CODE_DATA}
  AR checkpoint     {ar_dir}  (Hugging Face export: {ar_dir / "hf"})
  BD3 checkpoint    {bd3_dir}  (ZeRO partitions: {ds_folder(bd3_dir)}, export: {bd3_dir / "hf"})
  TensorBoard       tensorboard --logdir {out / "runs"}
  eval tables       {out}/eval_ar_init_baseline.json, {out}/eval_bd3_trained.json
  downstream        {out}/downstream_ar_init_baseline.json, {out}/downstream_bd3_trained.json
  plot              {out}/comparison.png  (baseline and trained: likelihood and accuracy per block size)
  transformers      {hf_model}  (trust_remote_code=True; model card README.md)
  sample            {sample}  ({len(s["tokens"])} tokens, {s["tokens_per_s"]:.1f} tokens/s, {s["nfe"]} NFEs)""")
    summary = {"minutes": minutes, "eval": {k: t["results"] for k, t in tables.items()}, "sample": s}
    summary["eval_streams"] = {k: t["streams"] for k, t in tables.items()}
    summary["downstream"] = {k: t["results"] for k, t in downstream.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
