"""A training ``save_folder``: every file name, tag and rule about what is in it, and loading it.

What the trainer writes there (each name and pattern is defined in ``layout``; the tokenizer's file
name is ``pipeline.model``'s, a Hugging Face folder has it too)::

    hf_config.json               the model config, rank 0 at start      MODEL_CONFIG_FILE
    run_config.json              the resolved training config (card)     RUN_CONFIG_FILE
    tokenizer.json               the run's tokenizer, beside it          TOKENIZER_FILE
    ep{E}-ba{N}-rank0.pt         Composer's checkpoint of batch N        composer_checkpoints
    ep{E}-ba{N}/                 the same, FSDP sharded (.metadata last)
    latest-rank0.pt -> ...       symlink to the newest                   LATEST
    latest-rank0.pt.symlink      the same in a bucket (the newest's key) REMOTE_LATEST
    deepspeed/ba{N}/             the ZeRO partitions of batch N          ds_checkpoints, ds_tag
    .partial.<name>              a file still being written              partial_file
    deepspeed/ba{N}.partial/     partitions still being written          partial_tag
    deepspeed/ba{N}.universal/   ba{N} converted for another world size  universal_tag
    tensorboard/{run_name}/      the default TensorBoard log dir         tensorboard_dir
    .write-probe-node{K}         node K's write check (removed at once)  write_probe

The modules:

- ``layout``: the names and patterns above, and which checkpoints a folder holds;
- ``remote``: a save_folder in object storage (listing, upload, fetch, rotation);
- ``repair``: the checks before training, the repair of a killed run's folder, DeepSpeed rotation;
- ``run_files``: the run's config and tokenizer files, its TensorBoard folder;
- ``loading``: a ``BD3LM`` from any checkpoint the project writes (``load_for_inference``).

Nothing here imports the trainer; Composer (object stores) and DeepSpeed (consolidation) are
imported where they are used.
"""

from pipeline.save_folder.layout import (
    DS_SUBDIR,
    LATEST,
    LATEST_ANY_RANK,
    MODEL_CONFIG_FILE,
    PARTIAL,
    REMOTE_LATEST,
    RUN_CONFIG_FILE,
    SHARDED_METADATA,
    TENSORBOARD_SUBDIR,
    TOKENIZER_FILE,
    WRITE_PROBE,
    batch_of,
    composer_checkpoints,
    ds_batch,
    ds_checkpoints,
    ds_folder,
    ds_node_staging,
    ds_owner_batch,
    ds_staging,
    ds_tag,
    is_one_checkpoint,
    is_remote,
    latest_ds_tag,
    partial_file,
    partial_tag,
    rank_files,
    run_config_file,
    sharded_batch_of,
    tensorboard_run_dir,
    universal_tag,
    write_probe,
    zero_partitions,
)
from pipeline.save_folder.loading import (
    consolidated_state_dict,
    load_for_inference,
    load_training_checkpoint,
    sharded_model_state,
)
from pipeline.save_folder.remote import (
    download_ds_tag,
    fetch_save_folder,
    local_checkpoint,
    remote_checkpoints,
    remote_ds_tag_files,
    remove_autoresume_copy,
    rotate_remote_checkpoints,
    upload_ds_tag,
    upload_files,
    upload_paths,
)
from pipeline.save_folder.repair import (
    check_save_folder,
    checkpoint_bytes,
    prepare_save_folder,
    repair_remote_save_folder,
    repair_save_folder,
    rotate_deepspeed_partitions,
)
from pipeline.save_folder.run_files import tensorboard_dir, write_run_files, write_run_metadata

__all__ = [
    "DS_SUBDIR",
    "LATEST",
    "LATEST_ANY_RANK",
    "MODEL_CONFIG_FILE",
    "PARTIAL",
    "REMOTE_LATEST",
    "RUN_CONFIG_FILE",
    "SHARDED_METADATA",
    "TENSORBOARD_SUBDIR",
    "TOKENIZER_FILE",
    "WRITE_PROBE",
    "batch_of",
    "check_save_folder",
    "checkpoint_bytes",
    "composer_checkpoints",
    "consolidated_state_dict",
    "download_ds_tag",
    "ds_batch",
    "ds_checkpoints",
    "ds_folder",
    "ds_node_staging",
    "ds_owner_batch",
    "ds_staging",
    "ds_tag",
    "fetch_save_folder",
    "is_one_checkpoint",
    "is_remote",
    "latest_ds_tag",
    "load_for_inference",
    "load_training_checkpoint",
    "local_checkpoint",
    "partial_file",
    "partial_tag",
    "prepare_save_folder",
    "rank_files",
    "remote_checkpoints",
    "remote_ds_tag_files",
    "remove_autoresume_copy",
    "repair_remote_save_folder",
    "repair_save_folder",
    "rotate_deepspeed_partitions",
    "rotate_remote_checkpoints",
    "run_config_file",
    "sharded_batch_of",
    "sharded_model_state",
    "tensorboard_dir",
    "tensorboard_run_dir",
    "universal_tag",
    "upload_ds_tag",
    "upload_files",
    "upload_paths",
    "write_probe",
    "write_run_files",
    "write_run_metadata",
    "zero_partitions",
]
