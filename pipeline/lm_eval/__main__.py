"""``python -m pipeline.lm_eval --model bd3 --model_args pretrained=DIR,block_size=4 --tasks ...``:
lm-eval's own command line (every flag of ``lm-eval run``) with the ``bd3`` model registered first;
the results are lm-eval's own JSON (``--output_path``)."""

from __future__ import annotations

import sys


def offline_dataset(error: BaseException) -> str | None:
    """The hub dataset a failed ``datasets.load_dataset`` call asked for, when ``error`` came from one
    that could not reach the hub (offline); else None."""
    tb, path = error.__traceback__, None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "load_dataset" and "path" in frame.f_locals:
            path = frame.f_locals["path"]
        tb = tb.tb_next
    text = f"{type(error).__name__} {error}".lower()
    network = any(
        w in text for w in ("offline", "connection", "resolve", "couldn't reach", "not find", "notfound")
    )
    return path if path is not None and network else None


def main(argv: list[str] | None = None) -> int:
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    import pipeline.lm_eval.model  # noqa: F401  (registers "bd3")

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    try:
        parser.execute(args)
    except Exception as e:
        dataset = offline_dataset(e)
        if dataset is None:
            raise
        print(
            f"error: the task's dataset {dataset!r} is on the Hugging Face hub, which is not reachable: download "
            "it where the hub is reachable, or write a task YAML with `dataset_path: json` and "
            "`dataset_kwargs: {data_files: {test: FILE.jsonl}}` and pass its folder with --include_path",
            file=sys.stderr,
        )
        return 2
    from pipeline.eval import close_distributed

    close_distributed()  # several processes: none exits before the others have what it sent
    return 0


if __name__ == "__main__":
    sys.exit(main())
