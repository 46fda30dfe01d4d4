"""Generate text block by block: ``python -m pipeline.sample --checkpoint DIR --block-size 4 ...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pipeline.diffusion.sampler import SAMPLERS, SamplerConfig, generate


def build_parser() -> argparse.ArgumentParser:
    d = SamplerConfig  # the defaults live on the sampler's config
    p = argparse.ArgumentParser(prog="python -m pipeline.sample", description=__doc__)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="Hugging Face-format folder (pipeline.export output or an AR checkpoint), or a training "
        "save_folder",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow unpickling Composer .pt checkpoints (only files your own runs wrote)",
    )
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in the checkpoint folder)")
    p.add_argument("--block-size", type=int, help="L' (default: the block size recorded in the checkpoint)")
    p.add_argument("--prompt", default="", help="text to continue (default: start from BOS/EOS)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument(
        "--steps-per-block", type=int, help="DDPM steps per block (ddpm_cache; default block size)"
    )
    p.add_argument("--sampler", choices=SAMPLERS, default=d.sampler)
    p.add_argument(
        "--threshold",
        type=float,
        default=d.threshold,
        help="confidence sampler: unmask tokens above this probability",
    )
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--no-kv-cache", action="store_true", help="recompute the prefix every call (same tokens, slower)"
    )
    p.add_argument("--no-stop-at-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument(
        "--align-prompt",
        action="store_true",
        help="start the first generated block right after the prompt (default: complete the prompt's "
        "last block, the grid aligned at position 0 that training uses)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--out",
        help="write JSON: tokens, text, nfe, cache_writes, tokens_per_s and the settings (pipeline.export "
        "--sample-json makes them the exported model's sampling defaults)",
    )
    return p


# Over 60 lines on purpose: an entry point: arguments, loading, the settings record; each step calls the library.
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tokenizers import Tokenizer

    from pipeline.hf_artifact import GENERATION_KEYS
    from pipeline.save_folder import TOKENIZER_FILE, load_for_inference, local_checkpoint

    try:
        checkpoint = local_checkpoint(args.checkpoint)
        model = load_for_inference(checkpoint, device=args.device, trust_checkpoint=args.trust_checkpoint)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok_path = Path(args.tokenizer) if args.tokenizer else checkpoint / TOKENIZER_FILE
    if not tok_path.exists():
        print(f"error: no tokenizer at {tok_path}; pass --tokenizer PATH/tokenizer.json", file=sys.stderr)
        return 2
    tokenizer = Tokenizer.from_file(str(tok_path))
    c = model.config
    block_size = args.block_size or c.block_size
    if block_size is None:
        print("error: the checkpoint records no block size; pass --block-size", file=sys.stderr)
        return 2
    prompt = prompt_ids(args.prompt, tokenizer, c)
    if not prompt:
        print("error: empty prompt and the checkpoint names no BOS/EOS token; pass --prompt", file=sys.stderr)
        return 2
    cfg = SamplerConfig(
        block_size=block_size,
        max_new_tokens=args.max_new_tokens,
        sampler=args.sampler,
        steps_per_block=args.steps_per_block,
        threshold=args.threshold,
        top_p=args.top_p,
        temperature=args.temperature,
        stop_at_eos=not args.no_stop_at_eos,
        eos_token_id=c.eos_token_id,
        use_kv_cache=not args.no_kv_cache,
        shift=c.shift,
        seed=args.seed,
        align_prompt=args.align_prompt,
    )
    result = generate(model, torch.tensor([prompt], device=args.device), cfg)
    ids = result.tokens[0, : result.lengths[0]].tolist()
    text = tokenizer.decode(ids, skip_special_tokens=False)
    print(args.prompt + text)
    print(
        f"[{len(ids)} tokens, {result.nfe} denoising NFEs ({result.nfe / max(len(ids), 1):.2f}/token), "
        f"{result.cache_writes} cache writes, {result.tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "tokens": ids,
                    "text": text,
                    "nfe": result.nfe,
                    "cache_writes": result.cache_writes,
                    "tokens_per_s": result.tokens_per_s,
                    "block_size": block_size,
                    "sampler": args.sampler,
                    "settings": {k: getattr(cfg, k) for k in GENERATION_KEYS},
                },
                indent=2,
            )
        )
    return 0


def prompt_ids(text: str, tokenizer, config) -> list[int]:
    """The prompt's token ids, after the model's start token (BOS; EOS when it has no BOS and the
    prompt is empty); empty when there is neither text nor a start token."""
    start = config.start_token_id
    prompt = tokenizer.encode(text, add_special_tokens=False).ids if text else []
    if start is not None and (not prompt or config.bos_token_id is not None):
        prompt = [start] + prompt
    return prompt


if __name__ == "__main__":
    sys.exit(main())
