"""The seams of Composer (0.32.1) and DeepSpeed (0.19.8) this project uses: every name inside them
that they do not promise is reached through the functions below, and checked (``pipeline.seams``).

Composer's seams are checked when this module is imported; DeepSpeed's when
``pipeline.trainer.deepspeed_trainer`` is (``check_deepspeed_seams``: a run without DeepSpeed never
imports it). What they are for:

- ``safe_saves`` wraps the Trainer's ``CheckpointSaver`` (its ``_save_checkpoint``, ``batch_end``,
  ``fit_end``): the finite-weights check, DeepSpeed partitions before each save, rotation. Composer's
  ``_write_checkpoint_file`` is replaced by a write-then-rename, ``dist.get_node_signal_file_name``
  by a per-node name.
- ``DeepSpeedTrainer`` replaces ``Trainer._train_batch`` and drops the model and optimizer from
  Composer's ``State.state_dict`` (the engine checkpoints them).
- A remote save_folder's uploads run on threads of the rank: ``upload_on_threads`` swaps the
  executors of Composer's ``RemoteUploader`` (which would spawn processes) before the first save,
  and stops the ``multiprocessing`` Manager its constructor spawned.
- Composer saves the dataset's position through ``State._dataset_of`` (deterministic resumption).
- ``Generation`` writes its samples as text to TensorBoard (``TensorboardLogger.writer``).
- The NaN check reads each rank's ZeRO-3 partition (``param.ds_tensor``); ``HFExport`` tells ZeRO-3
  parameters by ``ds_id``.
- A resume on another world size loads DeepSpeed's universal checkpoint by switching the engine's
  ``_config.load_universal_checkpoint`` on for that one load (``pipeline.trainer.elastic``).
"""

from __future__ import annotations

from contextlib import contextmanager

from composer.core import State
from composer.utils import checkpoint as composer_checkpoint
from composer.utils import dist

from pipeline.seams import WRITTEN_FOR, Seam, SeamError, check_seams, installed_version

_TRAINER = "composer.trainer.trainer:Trainer"
_SAVER = "composer.callbacks.checkpoint_saver:CheckpointSaver"
_STATE = "composer.core.state:State"
_UPLOADER = "composer.utils.remote_uploader:RemoteUploader"
_SAVES = "crash-safe checkpoints, the NaN check and DeepSpeed's partitions"


def _composer(owner: str, name: str, why: str, **kwargs) -> Seam:
    return Seam("composer", owner, name, why, **kwargs)


COMPOSER_SEAMS = [
    _composer(_TRAINER, "_checkpoint_saver", f"the saver wrapped for {_SAVES}", set_in="__init__"),
    _composer(_SAVER, "_save_checkpoint", f"wrapped for {_SAVES}", params=("self", "state", "logger")),
    _composer(_SAVER, "batch_end", "wrapped: object-store errors", params=("self", "state", "logger")),
    _composer(_SAVER, "fit_end", "wrapped: remote rotation", params=("self", "state", "logger")),
    _composer(_SAVER, "num_checkpoints_to_keep", "DeepSpeed and remote rotation", set_in="__init__"),
    _composer(_SAVER, "remote_uploader", "waited for before remote rotation", set_in="__init__"),
    _composer(
        _UPLOADER,
        "upload_executor",
        "uploads run on threads of the rank, not spawned processes",
        set_in="__init__",
    ),
    _composer(
        _UPLOADER,
        "check_remote_files_exist_executor",
        "uploads run on threads of the rank, not spawned processes",
        set_in="__init__",
    ),
    _composer(
        _UPLOADER,
        "is_remote_upload_failed",
        "a threading.Event, and the Manager process that served Composer's is stopped",
        set_in="__init__",
    ),
    _composer(
        _SAVER,
        "_symlink_upload_wait_before_next_try_in_seconds",
        "a remote save_folder's poll interval",
        set_in="__init__",
    ),
    _composer(
        "composer.utils.checkpoint",
        "_write_checkpoint_file",
        "replaced: checkpoint files written under a temporary name, then renamed",
        params=("state_dict", "filename"),
    ),
    _composer(
        "composer.utils.dist",
        "get_node_signal_file_name",
        "replaced: one signal file per node in a shared save_folder",
        params=("rng",),
    ),
    _composer(
        _TRAINER,
        "_train_batch",
        "overridden by DeepSpeedTrainer: the engine's backward and step",
        params=("self", "use_grad_scaling"),
    ),
    _composer(_TRAINER, "_train_data_spec", "DeepSpeedTrainer splits microbatches", set_in="__init__"),
    _composer(_TRAINER, "_original_model", "DeepSpeedTrainer computes the loss", set_in="__init__"),
    _composer(_TRAINER, "first_train_batch_complete", "set by DeepSpeedTrainer", set_in="__init__"),
    _composer(_TRAINER, "engine", "DeepSpeedTrainer runs the Events", set_in="__init__"),
    _composer(
        "composer.core.engine:Engine", "run_event", "DeepSpeedTrainer's Events", params=("self", "event")
    ),
    _composer(_STATE, "get_model_state_dict", "dropped under DeepSpeed", params=("self",)),
    _composer(_STATE, "get_optim_state_dict", "dropped under DeepSpeed", params=("self",)),
    _composer(
        _STATE,
        "_dataset_of",
        "the dataset's position saved in checkpoints",
        params=("self", "dataloader"),
    ),
    _composer(
        "composer.loggers.tensorboard_logger:TensorboardLogger",
        "writer",
        "generated samples as TensorBoard text",
        set_in="__init__",
    ),
    _composer(
        "composer.utils.object_store.s3_object_store:S3ObjectStore",
        "client",
        "deleting rotated remote checkpoints",
        set_in="__init__",
    ),
    _composer(
        "composer.utils.object_store.s3_object_store:S3ObjectStore",
        "bucket",
        "deleting rotated remote checkpoints",
        set_in="__init__",
    ),
]

_ZERO3_INIT = "deepspeed.runtime.zero.partition_parameters:Init"
DEEPSPEED_SEAMS = [
    Seam(
        "deepspeed",
        _ZERO3_INIT,
        "ds_tensor",
        "a ZeRO-3 parameter's partition: the NaN check of this rank's weights",
        set_in="_convert_to_deepspeed_param",
        target="param",
    ),
    Seam(
        "deepspeed",
        _ZERO3_INIT,
        "ds_id",
        "tells a ZeRO-3 parameter: the weights are gathered before HFExport",
        set_in="_convert_to_deepspeed_param",
        target="param",
    ),
    Seam(
        "deepspeed",
        "deepspeed.runtime.engine:DeepSpeedEngine",
        "_config",
        "the engine's config: a universal checkpoint is loaded on another world size (elastic resume)",
        set_in="__init__",
    ),
    Seam(
        "deepspeed",
        "deepspeed.runtime.config:DeepSpeedConfig",
        "load_universal_checkpoint",
        "switched on for the one load of a universal checkpoint (elastic resume)",
        set_in="_initialize_params",
    ),
]

check_seams(COMPOSER_SEAMS, __name__)


def check_deepspeed_seams() -> None:
    """Raise ``SeamError`` when a seam of DeepSpeed is missing (imports DeepSpeed)."""
    check_seams(DEEPSPEED_SEAMS, __name__)


# -- the checkpoint saver -------------------------------------------------------------------------
def checkpoint_saver(trainer, save_folder: str | None):
    """The Trainer's ``CheckpointSaver`` (None without a ``save_folder``).

    Raises ``SeamError`` when it cannot be found: training must not start with checkpoints that are
    not crash-safe, unchecked for NaN or without their DeepSpeed partitions.
    """
    saver = getattr(trainer, "_checkpoint_saver", None)
    if saver is None and (save_folder is not None or not hasattr(trainer, "_checkpoint_saver")):
        raise SeamError(
            f"composer Trainer._checkpoint_saver not found (written for composer "
            f"{WRITTEN_FOR['composer'][1]}, installed {installed_version('composer')}): checkpoints would "
            "be neither crash-safe nor checked for NaN, and DeepSpeed's partitions would not be written; "
            f"install that version or port {__name__}"
        )
    return saver


def saver_save_step(saver):
    """The saver's step that writes one checkpoint: ``step(state, logger)``."""
    return saver._save_checkpoint


def set_saver_save_step(saver, step) -> None:
    """Make the saver write each checkpoint with ``step(state, logger)``."""
    saver._save_checkpoint = step


def upload_on_threads(saver) -> None:
    """Run the uploads of a remote save_folder on threads of this rank instead of Composer's worker
    processes. Composer starts them with ``spawn``: each imports Composer, torch and boto3 again,
    about 10 CPU-seconds and 0.5 GB per worker, two per rank (an upload and a poll for the uploaded
    files before the latest symlink), measured as 27 extra CPU-seconds for one process's 20-batch run.
    The work itself is network I/O (boto3 releases the GIL while it waits), done in the same order:
    one upload at a time, as Composer's single upload worker does. Call before the first save.

    Composer's constructor has also spawned a ``multiprocessing`` Manager server for one Event. It is
    stopped here and the Event becomes a ``threading.Event``: the server does not watch its parent, so
    a rank that was SIGKILLed (the OOM killer, a node agent) left it running for good, and the server
    of local rank 0 holds the launcher's stdout and stderr open, so ``composer ... | tee log`` never
    saw the end of a crashed run (tests/pipeline/trainer/launch.py checks every launch for leftovers).
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    uploader = saver.remote_uploader
    if uploader is None:
        return
    for name, workers in (("upload_executor", 1), ("check_remote_files_exist_executor", 2)):
        getattr(uploader, name).shutdown(wait=False)  # unused so far: no process was started
        setattr(uploader, name, ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name))
    served = uploader.is_remote_upload_failed
    uploader.is_remote_upload_failed = threading.Event()
    # A manager's proxy keeps the manager that made it (``BaseProxy._manager``, the standard
    # library's, unchanged since Python 3.3); its ``shutdown`` stops and joins the server process.
    manager = getattr(served, "_manager", None)  # None: not a Manager's proxy, no process to stop
    if manager is not None:
        manager.shutdown()


def set_symlink_upload_wait(saver, seconds: float) -> None:
    """How long the saver waits between polls for a finished upload before writing the latest symlink."""
    saver._symlink_upload_wait_before_next_try_in_seconds = seconds


# -- checkpoint files and signal files ------------------------------------------------------------
def checkpoint_file_writer():
    """Composer's function that writes one checkpoint file: ``write(state_dict, filename)``."""
    return composer_checkpoint._write_checkpoint_file


def set_checkpoint_file_writer(write) -> None:
    """Make Composer write every checkpoint file with ``write(state_dict, filename)``."""
    composer_checkpoint._write_checkpoint_file = write


def node_signal_file_namer():
    """Composer's ``get_node_signal_file_name(rng=None)``: the name of a node's "local rank 0 is done" file."""
    return dist.get_node_signal_file_name


def set_node_signal_file_namer(namer) -> None:
    """Make Composer name its per-node signal files with ``namer(rng=None)``."""
    dist.get_node_signal_file_name = namer


# -- DeepSpeedTrainer -----------------------------------------------------------------------------
def train_data_spec(trainer):
    """The ``DataSpec`` of the Trainer's training data (splits a batch into microbatches)."""
    return trainer._train_data_spec


def original_model(trainer):
    """The ``ComposerModel`` as it was passed to the Trainer, without a wrapper."""
    return trainer._original_model


def run_event(trainer, event) -> None:
    """Fire ``event`` for the Trainer's algorithms and callbacks."""
    trainer.engine.run_event(event)


def mark_first_batch_complete(trainer) -> None:
    """Tell the Trainer that a training batch has finished (as its own ``_train_batch`` does)."""
    trainer.first_train_batch_complete = True


def skip_model_and_optimizer_state(state: State) -> None:
    """Leave the model and optimizer out of ``state.state_dict()`` (DeepSpeed's engine saves them)."""
    state.get_model_state_dict = dict
    state.get_optim_state_dict = dict


@contextmanager
def loading_universal(engine):
    """While inside, ``engine.load_checkpoint`` reads a universal checkpoint (DeepSpeed's
    ``checkpoint.load_universal`` config key, which is read from the engine's config at each load)."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def zero3_partition(param):
    """This rank's partition of a ZeRO-3 parameter (None for any other parameter)."""
    return getattr(param, "ds_tensor", None)


# -- loggers --------------------------------------------------------------------------------------
def tensorboard_writers(logger) -> list:
    """The open ``SummaryWriter`` of each TensorBoard destination of ``logger``."""
    from composer.loggers import TensorboardLogger

    dests = [d for d in logger.destinations if isinstance(d, TensorboardLogger)]
    return [d.writer for d in dests if getattr(d, "writer", None) is not None]
