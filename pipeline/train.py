"""Train a BD3 model from a YAML: ``composer -n N -m pipeline.train yamls/X.yaml [key.sub=value ...]``.

Also ``python -m pipeline.train yamls/X.yaml [key.sub=value ...]`` for one process. A config error
prints one line naming the key and exits with code 2 before any model is built; a NaN/Inf loss
(``nonfinite_loss: stop``) prints the batch and the checkpoint to resume from and exits with code 3;
a data shard that fails while training prints the shard, the fix and the checkpoint to resume from
(the traceback is logged before it) and exits with code 4; an object store that fails while a
checkpoint is saved to it (after the retries) prints one line and exits with code 5; installed
libraries whose private names this project relies on have changed (``pipeline.seams``: crash-safe
checkpoints would switch off) prints one line naming them and exits with code 6 before training; a
DeepSpeed checkpoint that cannot be converted for another number of processes prints one line and
exits with code 7. Rerunning the command of a run that already reached ``max_duration`` (a
scheduler's requeue) prints one line saying so and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__)
    p.add_argument("yaml", help="training config, e.g. yamls/bd3_tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (OmegaConf dotlist)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.rows import ShardReadError
    from pipeline.seams import SeamError
    from pipeline.trainer import ConfigError, load_config
    from pipeline.trainer.elastic import UniversalConversionError
    from pipeline.trainer.safe_saves import NonFiniteError, RemoteSaveError, resume_hint

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    cfg = None
    try:
        cfg = load_config(args.yaml, args.overrides)
        from pipeline.trainer import run

        run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    except RemoteSaveError as e:
        logging.getLogger("pipeline.train").error("writing a checkpoint failed", exc_info=True)
        print(f"training stopped: {e}", file=sys.stderr, flush=True)
        return 5
    except ShardReadError as e:
        logging.getLogger("pipeline.train").error("reading the training data failed", exc_info=True)
        hint = resume_hint(cfg.save_folder) if cfg is not None else ""
        print(f"training stopped: {ShardReadError.one_line(e)}. {hint}", file=sys.stderr, flush=True)
        return 4
    except SeamError as e:
        print(f"training refused to start: {e}", file=sys.stderr, flush=True)
        return 6
    except UniversalConversionError as e:
        print(f"resuming stopped: {e}", file=sys.stderr, flush=True)
        return 7
    return 0


if __name__ == "__main__":
    sys.exit(main())
