"""Shared fixtures: tiny random Hugging Face checkpoints built offline (never downloaded).

``tiny_hf_checkpoint(path, arch, **config)`` is ``tests.factories.write_tiny_hf_checkpoint``.
``tiny_llama_dir`` and ``tiny_qwen2_dir`` are session-scoped folders: copy them before writing.

``make test`` runs the suite on 2 pytest-xdist workers (``--dist loadgroup``; ``WORKERS=0``: one
process): a launch leaves a core idle while its launcher imports and while it starts and stops, and
the other worker uses it. Tests that read one expensive session run are in one ``xdist_group``
(``tests/pipeline/trainer``), so that each such run is made once; every worker runs the slow tests
first, so that no long test is left alone at the end.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import sys
from pathlib import Path

import pytest

# Importing torch's inductor starts a pool of compile-worker processes, one per core, unless
# TORCH_WARM_POOL=0. Every DeepSpeed rank imports it (deepspeed/runtime/zero/muon applies torch.compile
# at import, from DeepSpeed's engine), and no test compiles with Triton: the idle pool cost about 4
# CPU-seconds per process (measured: 8.7 vs 4.5 CPU-s), several minutes of the suite's CPU time on the
# 2-core machine. Set before any torch import and inherited by every launch; a compile that needs the
# pool still starts it on first use.
os.environ.setdefault("TORCH_WARM_POOL", "0")
# One OpenMP thread per process unless a test asks for more: the suite's 2 workers and their launches
# already keep both cores busy, and extra threads wait spinning for a core (the demo's subprocesses,
# in-process runs of the workers). Each launch of the training tests sets it too (launch.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.factories import tiny_data_folder, write_tiny_hf_checkpoint, write_tokenizer  # noqa: E402


@pytest.fixture
def tiny_hf_checkpoint():
    """Factory: ``tiny_hf_checkpoint(path, arch="llama", seed=0, **config) -> (path, hf_model)``."""
    return write_tiny_hf_checkpoint


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA checkpoint folder (vocab 250, hidden 64, 2 layers, 4 heads, 2 kv heads)."""
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama")[0]


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 checkpoint folder with qkv biases and tied input/output embeddings."""
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    return write_tiny_hf_checkpoint(folder, "qwen2", tie_word_embeddings=True)[0]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, tokenizer.json): a data_prep-style output of the training tests (see
    ``tests.factories.tiny_data_folder``). Read-only: Streaming caches nothing when remote is None."""
    root = tmp_path_factory.mktemp("tiny_data")
    tok = write_tokenizer(root / "tokenizer" / "tokenizer.json")
    return tiny_data_folder(root / "data", tok), tok


@pytest.fixture
def one_thread():
    """Single-threaded torch: on a shared 2-core machine extra threads make tiny runs 10-100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SEED_VARIABLE = "PIPELINE_TEST_SEED"


@pytest.fixture
def kill_rng(request) -> random.Random:
    """The random source of a test's kills (which batch, which rank, how long after): seeded from
    ``PIPELINE_TEST_SEED`` when set, else from a fresh seed. The seed is printed, and pytest shows it
    with a failure, so a failing draw replays exactly."""
    given = os.environ.get(SEED_VARIABLE)
    seed = int(given) if given else random.SystemRandom().randrange(2**32)
    print(f"\n{request.node.nodeid}: random seed {seed} (replay: {SEED_VARIABLE}={seed})")
    return random.Random(seed)


def pytest_collection_modifyitems(items):
    for item in items:  # `-m s3` selects every test that talks to the S3 server
        if "s3" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the same order on every worker (xdist checks it)
        items.sort(key=lambda item: not any(item.get_closest_marker(m) for m in ("slow", "multiprocess")))


@pytest.fixture(scope="session")
def moto_server():
    """A moto S3 server on a free port of 127.0.0.1 for the whole session, stopped at the end."""
    import logging

    from tests.s3 import MotoS3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture
def s3(moto_server, monkeypatch):
    """An empty bucket on the session's moto server, with S3_ENDPOINT_URL and dummy credentials in
    the environment (inherited by subprocesses). Yields a ``tests.s3.S3Bucket``."""
    from tests.s3 import S3Bucket

    for key, value in moto_server.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    return S3Bucket(moto_server, moto_server.new_bucket())


def release_streaming_shared_memory() -> None:
    """Close the shared memory of every ``StreamingDataset`` this process made, and forget it.

    Streaming registers every ``SharedMemory`` it creates with ``atexit``, so an in-process dataset keeps
    its /dev/shm file descriptors until the interpreter exits: about 230 per dataset, measured. Over
    the suite that reaches the machine's limit of 20,000 open files. Each segment released here is
    unlinked once and then dropped from its object: a second ``cleanup()`` (the next module's release,
    or ``atexit``) would unlink the name again, and by then the prefix may belong to another job (its
    lock files go once a minute old), whose memory would vanish under it. A resumed run whose resume
    segment vanishes before its first batch re-reads its first rows: the CI failure of stop 33 had
    exactly the losses of such a run (tests/test_conftest.py).
    """
    memory = sys.modules.get("streaming.base.shared.memory")
    if memory is None:
        return
    # type(), not isinstance(): isinstance on a dead weak proxy raises ReferenceError
    for obj in [obj for obj in gc.get_objects() if type(obj) is memory.SharedMemory]:
        for shms, created in ((obj.created_shms, True), (obj.opened_shms, False)):
            for shm in list(shms):
                try:
                    shm.close()
                except BufferError:  # still mapped by a live array: leave it for a later release
                    continue
                if created:
                    with contextlib.suppress(OSError):  # gone already (a killed job's clean-up took it)
                        shm.unlink()
                shms.remove(shm)


@pytest.fixture(autouse=True, scope="module")
def _release_streaming_shared_memory():
    """A finished module's datasets are never used again: release their shared memory
    (``release_streaming_shared_memory``)."""
    yield
    release_streaming_shared_memory()
