"""Every file name, tag and pattern of a training ``save_folder`` (the table is in the package docstring).

Names only: nothing here reads a checkpoint, touches an object store or imports the trainer.
"""

from __future__ import annotations

import re
from pathlib import Path

from data_prep.remote import is_remote as is_remote_uri
from data_prep.remote import local_cache_dir
from pipeline.model.hf_io import TOKENIZER_FILE as TOKENIZER_FILE  # a Hugging Face folder's name too

MODEL_CONFIG_FILE = "hf_config.json"  # written into save_folder by the trainer (rank 0) at start
RUN_CONFIG_FILE = "run_config.json"  # the resolved TrainConfig, for the exported model card
LATEST = "latest-rank0.pt"  # Composer's default latest_filename, for rank 0
LATEST_ANY_RANK = "latest-rank*.pt"
REMOTE_LATEST = f"{LATEST}.symlink"  # Composer's remote stand-in for the latest symlink
PARTIAL = ".partial"
DS_SUBDIR = "deepspeed"
UNIVERSAL = ".universal"  # DeepSpeed's universal checkpoint of a tag (a resume on another world size)
TENSORBOARD_SUBDIR = "tensorboard"
WRITE_PROBE = ".write-probe"
SHARDED_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint (a pickle)
_CKPT_RE = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")
_SHARDED_RE = re.compile(r"^ep(\d+)-ba(\d+)$")
# A ZeRO optimizer partition: (bf16_)zero_pp_rank_{R}_mp_rank_{M}_optim_states.pt, one per data-parallel rank.
_ZERO_PARTITION_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def is_remote(save_folder: str | Path) -> bool:
    """Whether ``save_folder`` names object storage (s3://, gs://, ...) rather than a local or mounted folder."""
    return is_remote_uri(str(save_folder))


def write_probe(node_rank: int) -> str:
    """The file node ``node_rank`` writes (and removes) to check that it can write to the save_folder."""
    return f"{WRITE_PROBE}-node{node_rank}"


def partial_file(name: str) -> str:
    """The name a checkpoint file ``name`` has while it is being written (``"*"``: a glob of them)."""
    return f"{PARTIAL}.{name}"


def ds_tag(batch: int) -> str:
    """The DeepSpeed checkpoint tag (folder under ``deepspeed/``) of batch ``batch``."""
    return f"ba{batch}"


def partial_tag(tag: str) -> str:
    """The DeepSpeed tag ``tag`` while its partitions are being written (``"*"``: a glob of them)."""
    return f"{tag}{PARTIAL}"


def ds_batch(tag: str) -> int | None:
    """The batch of a complete DeepSpeed tag ``ba{N}``; None for any other name."""
    return int(tag[2:]) if tag.startswith("ba") and tag[2:].isdigit() else None


def universal_tag(tag: str) -> str:
    """The folder (beside ``tag``) of the universal checkpoint converted from ``tag``'s partitions."""
    return f"{tag}{UNIVERSAL}"


def ds_owner_batch(name: str) -> int | None:
    """The batch whose checkpoint the folder ``name`` under ``deepspeed/`` belongs to: a tag ``ba{N}``
    or its universal conversion ``ba{N}.universal`` (rotated with it); None for any other name."""
    return ds_batch(name[: -len(UNIVERSAL)] if name.endswith(UNIVERSAL) else name)


def zero_partitions(names) -> int:
    """How many data-parallel ranks wrote the ZeRO checkpoint whose file names are ``names`` (0: none)."""
    ranks = {int(m.group(1)) for m in map(_ZERO_PARTITION_RE.search, names) if m}
    return len(ranks)


def ds_folder(save_folder: str | Path) -> Path:
    """Where the DeepSpeed partitions of ``save_folder`` go."""
    return Path(save_folder) / DS_SUBDIR


def ds_checkpoints(save_folder: str | Path) -> dict[int, Path]:
    """{batch: path} of the DeepSpeed tags ``deepspeed/ba{N}`` in ``save_folder`` (not the partial ones)."""
    out = {}
    for p in ds_folder(save_folder).glob("ba*"):
        batch = ds_batch(p.name)
        if batch is not None:
            out[batch] = p
    return out


def latest_ds_tag(save_folder: str | Path) -> str | None:
    """The tag of the newest DeepSpeed checkpoint in ``save_folder`` (None: there is none)."""
    tags = ds_checkpoints(save_folder)
    return tags[max(tags)].name if tags else None


def ds_staging(save_folder: str, rank: int) -> Path:
    """The local folder where ``rank`` writes (and reads back) its ZeRO partitions of a remote save_folder."""
    return local_cache_dir("pipeline-deepspeed", save_folder) / f"rank{rank}"


def ds_node_staging(save_folder: str) -> Path:
    """The local folder where a node converts a remote save_folder's partitions to a universal checkpoint."""
    return local_cache_dir("pipeline-deepspeed", save_folder) / "node"


def rank_files(rank: int):
    """A filter of DeepSpeed checkpoint file names: those ``rank`` loads (its ``zero_pp_rank_{rank}_``
    partition and the files shared by all ranks)."""
    return lambda name: "zero_pp_rank_" not in name or name.startswith(f"zero_pp_rank_{rank}_")


def batch_of(name: str) -> int | None:
    """The batch of a Composer checkpoint file name ``ep{E}-ba{N}-rank0.pt``; None for any other name."""
    m = _CKPT_RE.match(name)
    return int(m.group(2)) if m else None


def sharded_batch_of(name: str) -> int | None:
    """The batch of an FSDP sharded checkpoint folder name ``ep{E}-ba{N}``; None for any other name."""
    m = _SHARDED_RE.match(name)
    return int(m.group(2)) if m else None


def is_one_checkpoint(path: Path) -> bool:
    """Whether ``path`` is one Composer checkpoint (a file, or a sharded folder ``ep{E}-ba{N}``) inside
    a save_folder, rather than the save_folder itself."""
    return path.is_file() or (path.is_dir() and sharded_batch_of(path.name) is not None)


def composer_checkpoints(folder: str | Path, complete: bool = True) -> dict[int, Path]:
    """{batch: path} of the Composer checkpoints in ``folder``.

    A monolithic checkpoint is the file ``ep{E}-ba{N}-rank0.pt`` (complete when it has its final
    name); an FSDP sharded one is the folder ``ep{E}-ba{N}``, complete once torch.distributed.checkpoint
    wrote its ``.metadata`` (last, after every shard). ``complete=False`` also lists sharded folders
    without it.
    """
    out = {}
    for p in Path(folder).glob("ep*-ba*"):
        batch = batch_of(p.name)
        if batch is not None and p.is_file():
            out[batch] = p
            continue
        sharded = sharded_batch_of(p.name)
        if sharded is not None and p.is_dir() and (not complete or (p / SHARDED_METADATA).is_file()):
            out[sharded] = p
    return out


def run_config_file(checkpoint: str | Path) -> Path:
    """Where the resolved training config of the run that wrote ``checkpoint`` (a save_folder, or a
    checkpoint file or sharded folder in it) is; it may not exist (runs before it was written)."""
    p = Path(checkpoint)
    return (p.parent if is_one_checkpoint(p) else p) / RUN_CONFIG_FILE


def tensorboard_run_dir(run_name: str) -> str:
    """Where a run's TensorBoard files are inside a save_folder (``tensorboard/{run_name}``: the
    default log dir of a local one, and the copy in a remote one)."""
    return f"{TENSORBOARD_SUBDIR}/{run_name}"
