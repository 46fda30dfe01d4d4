"""A training ``save_folder``: the one home of its layout, and loading its checkpoints for inference.

What the trainer writes there (every name and tag below is built by this module only)::

    hf_config.json               the model config, rank 0 at start      MODEL_CONFIG_FILE
    run_config.json              the resolved training config (card)     RUN_CONFIG_FILE
    tokenizer.json               the run's tokenizer, beside it          TOKENIZER_FILE
    ep{E}-ba{N}-rank0.pt         Composer's checkpoint of batch N        composer_checkpoints
    ep{E}-ba{N}/                 the same, FSDP sharded (.metadata last)
    latest-rank0.pt -> ...       symlink to the newest                   LATEST
    deepspeed/ba{N}/             the ZeRO partitions of batch N          ds_checkpoints, ds_tag
    .partial.<name>              a file still being written              partial_file
    deepspeed/ba{N}.partial/     partitions still being written          partial_tag
    tensorboard/                 the default TensorBoard log dir         TENSORBOARD_SUBDIR

A remote ``save_folder`` (s3://, gs://, oci://) holds the same names as objects; Composer uploads
``latest-rank0.pt.symlink`` (its text: the key of the newest checkpoint) only once every file of
that checkpoint exists remotely, so the symlink never names a partial checkpoint
(``remote_checkpoints``, ``fetch_save_folder``, ``rotate_remote_checkpoints``).

Safe formats only, unless the caller says otherwise: safetensors, DeepSpeed partitions and
``torch.load(weights_only=True)``; a Composer ``.pt`` (a pickle) is opened only with
``trust_checkpoint=True`` (the CLIs' ``--trust-checkpoint``). Nothing here imports the trainer.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data_prep import mds
from data_prep.remote import local_cache_dir

if TYPE_CHECKING:  # the model is imported by the loaders only: the layout helpers stay cheap
    from pipeline.model import BD3LM

MODEL_CONFIG_FILE = "hf_config.json"  # written into save_folder by the trainer (rank 0) at start
RUN_CONFIG_FILE = "run_config.json"  # the resolved TrainConfig, for the exported model card
TOKENIZER_FILE = "tokenizer.json"
LATEST = "latest-rank0.pt"  # Composer's default latest_filename, for rank 0
LATEST_ANY_RANK = "latest-rank*.pt"
REMOTE_LATEST = f"{LATEST}.symlink"  # Composer's remote stand-in for the latest symlink
PARTIAL = ".partial"
DS_SUBDIR = "deepspeed"
TENSORBOARD_SUBDIR = "tensorboard"
WRITE_PROBE = ".write-probe"
SHARDED_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint (a pickle)
_CKPT_RE = re.compile(r"^ep(\d+)-ba(\d+)-rank0\.pt$")
_SHARDED_RE = re.compile(r"^ep(\d+)-ba(\d+)$")


def is_remote(save_folder: str | Path) -> bool:
    """Whether ``save_folder`` names object storage (s3://, gs://, ...) rather than a local or mounted folder."""
    return mds.is_remote(str(save_folder))


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


def _object_store(uri: str):
    """(Composer object store of ``uri``'s bucket, the key prefix of ``uri`` without a trailing '/')."""
    from composer.utils import maybe_create_object_store_from_uri, parse_uri

    return maybe_create_object_store_from_uri(uri), parse_uri(uri)[2].strip("/")


def remote_checkpoints(uri: str) -> tuple[dict[int, str], int | None]:
    """({batch: object key} of the Composer checkpoints under ``uri``, the batch its latest symlink names).

    A monolithic checkpoint is the key of its file; an FSDP sharded one is the key prefix of its
    folder, ending in ``/`` (``runs/x/ep0-ba10/``: a shard per rank and ``.metadata``), listed as soon
    as any of its objects exists. The latest is None when no symlink exists yet (no checkpoint is
    known to be complete): Composer uploads the symlink only after every file it names.
    """
    import tempfile

    store, prefix = _object_store(uri)
    try:
        keys = store.list_objects(f"{prefix}/")
        found = {}
        for key in keys:
            rel = key[len(prefix) + 1 :]
            if "/" not in rel and batch_of(rel) is not None:
                found[batch_of(rel)] = key
            elif "/" in rel and sharded_batch_of(rel.split("/", 1)[0]) is not None:
                folder = rel.split("/", 1)[0]
                found[sharded_batch_of(folder)] = f"{prefix}/{folder}/"
        latest = None
        if f"{prefix}/{REMOTE_LATEST}" in keys:
            with tempfile.TemporaryDirectory() as tmp:
                store.download_object(f"{prefix}/{REMOTE_LATEST}", f"{tmp}/latest")
                named = Path(Path(f"{tmp}/latest").read_text().strip()).name
                latest = batch_of(named) if batch_of(named) is not None else sharded_batch_of(named)
        return found, latest
    finally:
        store.close()


def fetch_save_folder(uri: str, cache: str | Path | None = None, batch: int | None = None) -> Path:
    """A local copy of what loading a remote ``save_folder`` needs: its model and run configs, its
    tokenizer and the checkpoint of ``batch`` (default: the one the latest symlink names, never a
    partial upload): Composer's file or FSDP shards, and the DeepSpeed partitions of that batch.

    The copy goes to ``cache`` (default: a folder under the temp dir named after ``uri``) and is laid
    out like a local save_folder, with ``latest-rank0.pt`` pointing at the fetched checkpoint.
    """
    import os

    found, latest = remote_checkpoints(uri)
    batch = latest if batch is None else batch
    if batch is None or batch not in found:
        what = (
            "no complete checkpoint (no latest symlink)"
            if batch is None
            else f"no checkpoint of batch {batch}"
        )
        raise FileNotFoundError(f"{uri} holds {what}; batches there: {sorted(found)}")
    local = Path(cache) if cache else local_cache_dir("pipeline-checkpoints", uri)
    local.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(found[batch]).name
    store, prefix = _object_store(uri)
    try:
        keys = store.list_objects(f"{prefix}/")
        for name in (MODEL_CONFIG_FILE, RUN_CONFIG_FILE, TOKENIZER_FILE):
            if f"{prefix}/{name}" in keys:
                store.download_object(f"{prefix}/{name}", str(local / name), overwrite=True)
        if found[batch].endswith("/"):  # FSDP sharded: every rank's shard and the metadata
            (local / checkpoint).mkdir(exist_ok=True)
            for key in keys:
                if key.startswith(found[batch]):
                    store.download_object(
                        key, str(local / checkpoint / key[len(found[batch]) :]), overwrite=True
                    )
        else:
            store.download_object(found[batch], str(local / checkpoint), overwrite=True)
        has_partitions = any(k.startswith(f"{prefix}/{DS_SUBDIR}/{ds_tag(batch)}/") for k in keys)
    finally:
        store.close()
    if has_partitions:  # DeepSpeed: every rank's partition of that batch
        download_ds_tag(uri, ds_tag(batch), ds_folder(local))
    tmp_link = local / partial_file(f"{LATEST}.{os.getpid()}")  # ranks of one eval may fetch at once
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(checkpoint)
    os.replace(tmp_link, local / LATEST)
    return local


def local_checkpoint(path: str | Path, batch: int | None = None) -> Path:
    """``path`` itself when local; for a remote save_folder, its fetched local copy (``fetch_save_folder``)."""
    return fetch_save_folder(str(path), batch=batch) if is_remote(path) else Path(path)


def remove_autoresume_copy(uri: str) -> None:
    """Remove the local copy of the latest checkpoint that Composer's autoresume downloads for a
    remote save_folder into ``os.path.abspath(uri)`` (``./s3:/bucket/...`` under the working
    directory), and the folders it made. A copy left there by an earlier run would be loaded instead
    of the bucket's newer latest checkpoint."""
    import os
    import shutil

    folder = Path(os.path.abspath(uri))
    for file in folder.glob(LATEST_ANY_RANK):
        file.unlink(missing_ok=True)
    root = Path(os.path.abspath(uri.split("://", 1)[0] + ":"))  # ./s3:
    while folder != root and root in folder.parents and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
    if folder == root and root.is_dir() and not any(root.iterdir()):
        shutil.rmtree(root, ignore_errors=True)


def upload_files(uri: str, folder: str | Path, under: str = "") -> None:
    """Upload the files of ``folder`` into the remote save_folder ``uri``, below ``under`` (e.g.
    ``deepspeed/ba10``); each returns once its object exists."""
    files = sorted(f for f in Path(folder).iterdir() if f.is_file())
    upload_paths(uri, {f"{under}/{f.name}".lstrip("/"): f for f in files})


def upload_paths(uri: str, files: dict[str, Path]) -> None:
    """Upload each local file of ``files`` ({name below ``uri``: path}) into the remote save_folder ``uri``."""
    store, prefix = _object_store(uri)
    try:
        for name, file in files.items():
            store.upload_object(f"{prefix}/{name}", str(file))
    finally:
        store.close()


def ds_staging(save_folder: str, rank: int) -> Path:
    """The local folder where ``rank`` writes (and reads back) its ZeRO partitions of a remote save_folder."""
    return local_cache_dir("pipeline-deepspeed", save_folder) / f"rank{rank}"


def rank_files(rank: int):
    """A filter of DeepSpeed checkpoint file names: those ``rank`` loads (its ``zero_pp_rank_{rank}_``
    partition and the files shared by all ranks)."""
    return lambda name: "zero_pp_rank_" not in name or name.startswith(f"zero_pp_rank_{rank}_")


def download_ds_tag(uri: str, tag: str, local_ds_dir: str | Path, wanted=lambda name: True) -> Path:
    """Download the objects of ``uri``'s ``deepspeed/{tag}/`` that ``wanted`` accepts into ``local_ds_dir/tag``."""
    store, prefix = _object_store(uri)
    out = Path(local_ds_dir) / tag
    out.mkdir(parents=True, exist_ok=True)
    try:
        for key in store.list_objects(f"{prefix}/{DS_SUBDIR}/{tag}/"):
            name = key.rsplit("/", 1)[1]
            if wanted(name):
                store.download_object(key, str(out / name), overwrite=True)
    finally:
        store.close()
    return out


def rotate_remote_checkpoints(uri: str, keep: int) -> list[int]:
    """Delete the remote Composer checkpoints older than the ``keep`` newest complete ones, with their
    DeepSpeed partitions, and partitions of older batches left by killed runs (s3:// only).

    Complete means: at or before the batch the latest symlink names; newer ones may still be
    uploading and are never touched. Returns the deleted Composer checkpoints' batches.
    """
    if keep <= 0 or not uri.startswith("s3://"):
        return []
    found, latest = remote_checkpoints(uri)
    if latest is None:
        return []
    complete = sorted(b for b in found if b <= latest)
    doomed = complete[: max(0, len(complete) - keep)]
    kept = set(complete) - set(doomed)
    _delete_remote(uri, found, lambda b: b in doomed, lambda b: b < latest and b not in kept)
    return doomed


def repair_remote_save_folder(uri: str) -> list[int]:
    """Delete what a killed run left beyond the latest symlink (s3:// only): checkpoints and DeepSpeed
    partitions of later batches, which the resumed run will write again. Returns their batches."""
    if not uri.startswith("s3://"):
        return []
    found, latest = remote_checkpoints(uri)
    newer = (lambda b: True) if latest is None else (lambda b: b > latest)
    return _delete_remote(uri, found, newer, newer)


def _delete_remote(uri: str, found: dict[int, str], composer_batch, ds_batch_) -> list[int]:
    """Delete the Composer checkpoints (``found``) whose batch ``composer_batch`` accepts and the
    DeepSpeed partition objects whose batch ``ds_batch_`` accepts; returns the batches touched."""
    store, prefix = _object_store(uri)
    touched = {b for b in found if composer_batch(b)}
    try:
        keys = []
        for b in sorted(touched):  # an FSDP sharded checkpoint is every object under its folder
            keys += store.list_objects(found[b]) if found[b].endswith("/") else [found[b]]
        for key in store.list_objects(f"{prefix}/{DS_SUBDIR}/"):
            batch = ds_batch(key[len(prefix) + len(DS_SUBDIR) + 2 :].split("/", 1)[0])
            if batch is not None and ds_batch_(batch):
                keys.append(key)
                touched.add(batch)
        for key in keys:
            store.client.delete_object(Bucket=store.bucket, Key=key)
    finally:
        store.close()
    return sorted(touched)


def consolidated_state_dict(
    save_folder: str | Path, batch: int | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Full fp32 weights from the ZeRO partitions of ``save_folder`` (one process, any world size).

    Returns (the ``BD3ComposerModel`` state dict: ``model.`` + the ``BD3LM`` names, the tag used:
    the latest when ``batch`` is None).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_dir = ds_folder(save_folder)
    if batch is None:
        tag = latest_ds_tag(save_folder)
        if tag is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {ds_dir}")
    else:
        tag = ds_tag(batch)
    return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag), tag


def load_for_inference(
    path: str | Path, device: str | torch.device = "cpu", trust_checkpoint: bool = False, **overrides
) -> BD3LM:
    """A ``BD3LM`` in eval mode from any checkpoint the project writes.

    ``path`` is a Hugging Face-format folder (an export, or an AR checkpoint before any diffusion
    training), a training ``save_folder`` (its latest checkpoint: DeepSpeed partitions of any world
    size, Composer's file or FSDP shards), or one Composer checkpoint (a file, or a sharded folder
    ``ep{E}-ba{N}``). Composer checkpoints are pickles and are opened only with ``trust_checkpoint``.
    """
    from pipeline.model import from_pretrained

    p = Path(path)
    if p.is_dir() and (p / "config.json").exists():
        return from_pretrained(p, device=device, **overrides).eval()
    if (p / MODEL_CONFIG_FILE).exists() or (is_one_checkpoint(p) and (p.parent / MODEL_CONFIG_FILE).exists()):
        model, _ = load_training_checkpoint(p, trust_checkpoint)
        return model.to(device).eval()
    raise FileNotFoundError(
        f"{path} is neither a Hugging Face-format folder (config.json) nor a save_folder of pipeline.train "
        f"({MODEL_CONFIG_FILE}); export a checkpoint with `python -m pipeline.export --checkpoint PATH --out DIR`"
    )


def run_config_file(checkpoint: str | Path) -> Path:
    """Where the resolved training config of the run that wrote ``checkpoint`` (a save_folder, or a
    checkpoint file or sharded folder in it) is; it may not exist (runs before it was written)."""
    p = Path(checkpoint)
    return (p.parent if is_one_checkpoint(p) else p) / RUN_CONFIG_FILE


def sharded_model_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The model weights (``BD3ComposerModel`` names) of an FSDP sharded checkpoint folder, gathered
    into full tensors in this one process, whatever the world size that wrote it. Only the model's
    tensors are read, not the optimizer's. The folder's ``.metadata`` is a pickle: trusted input only.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    if not (folder / SHARDED_METADATA).is_file():
        raise FileNotFoundError(
            f"{folder} is not a complete sharded checkpoint: {SHARDED_METADATA} is missing"
        )
    reader = dcp.FileSystemReader(str(folder))
    prefix = "state.model."  # Composer saves {"state": state.state_dict(), ...}; DCP flattens the keys
    wanted = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not wanted:
        raise ValueError(
            f"{folder} holds no model weights (no {prefix}* tensors): not a checkpoint of pipeline.train"
        )
    with warnings.catch_warnings():  # one process, on purpose: DCP warns about it on every load
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(wanted, storage_reader=reader, no_dist=True)
    return {key[len(prefix) :]: value for key, value in wanted.items()}


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``BD3ComposerModel`` names (``[module.]model.<BD3LM name>``) to ``BD3LM`` names."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if not k.startswith("model."):
            raise ValueError(f"unexpected parameter {k!r}: not a checkpoint of pipeline.train")
        out[k.removeprefix("model.")] = v
    return out


def _config_folder(save_folder: Path) -> Path:
    cfg = save_folder / MODEL_CONFIG_FILE
    if not cfg.exists():
        raise FileNotFoundError(
            f"{cfg} not found: {save_folder} is not a save_folder written by pipeline.train"
        )
    return save_folder


def load_training_checkpoint(path: str | Path, trust_checkpoint: bool = False, batch: int | None = None):
    """A ``BD3LM`` with the weights of a training checkpoint: DeepSpeed partitions, Composer's file or
    an FSDP sharded folder (``batch``: that batch's, default the latest)."""
    from pipeline.model import BD3LM, ModelConfig

    p = Path(path)
    one_checkpoint = is_one_checkpoint(p)
    save_folder = p.parent if one_checkpoint else p
    config = ModelConfig.from_hf_config(
        json.loads((_config_folder(save_folder) / MODEL_CONFIG_FILE).read_text())
    )
    if not one_checkpoint and ds_folder(p).is_dir():
        state, tag = consolidated_state_dict(p, batch)
        source = f"{ds_folder(p) / tag}"
    else:
        file = p
        if not one_checkpoint:
            found = composer_checkpoints(p)
            if batch is not None and batch not in found:
                raise FileNotFoundError(
                    f"no checkpoint of batch {batch} in {p}; batches there: {sorted(found)}"
                )
            latest = sorted(p.glob(f"{LATEST}*"))
            if not latest and not found:
                raise FileNotFoundError(f"no checkpoint in {p} (expected {DS_SUBDIR}/ or {LATEST})")
            if batch is not None:
                file = found[batch]
            else:  # by batch, not by name: ba9 comes before ba10
                file = latest[-1].resolve() if latest else found[max(found)]
        if not trust_checkpoint:
            raise PermissionError(
                f"{file} is a Composer checkpoint, a pickle that can run code when loaded; pass "
                "--trust-checkpoint only if your own run wrote it"
            )
        state = (
            sharded_model_state(file)
            if file.is_dir()
            else torch.load(file, map_location="cpu", weights_only=False)["state"]["model"]
        )
        source = str(file)
    state = _strip(state)
    model = BD3LM(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the model config (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    model.source_dir = save_folder if (save_folder / TOKENIZER_FILE).exists() else None
    return model.eval(), source
