"""The evaluation callbacks (block_size_likelihood, noise_interval_search, generation) in real runs.

In-process ``pipeline.trainer.run`` of yamls/bd3_tiny.yaml on the fixture data (1 process, CPU).
Logged metrics are captured by an ``InMemoryLogger`` added to the run's loggers. Under 2 processes
(DDP, FSDP2 FULL_SHARD, ZeRO-3) the callbacks run in the shared launches of ``launch.FULL``
(test_multiprocess.py, test_deepspeed.py: ``assert_same_evaluation``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from composer.loggers import InMemoryLogger

from pipeline.trainer import ConfigError, load_config, run
from tests.factories import SEQ_LEN, YAMLS, tiny_overrides

BLOCK_SIZES = [1, 4, 8, SEQ_LEN]
# A small grid (9 candidates) keeps the search fast; the default has 64.
SEARCH = ["callbacks.noise_interval_search.widths=[0.5,0.9]", "callbacks.noise_interval_search.step=0.1"]
COMMON = [
    "max_duration=4ba",
    "scheduler.t_max=4ba",
    "eval_interval=2ba",
    "save_interval=2ba",
    "device_eval_batch_size=8",
]


def callbacks_on(adopt: bool) -> list[str]:
    return [
        "callbacks.block_size_likelihood.block_sizes=[1,4,8,L]",
        "callbacks.block_size_likelihood.num_batches=2",
        "callbacks.noise_interval_search.num_batches=1",
        f"callbacks.noise_interval_search.adopt={str(adopt).lower()}",
        *SEARCH,
    ]


class Capture(InMemoryLogger):
    """InMemoryLogger that also keeps ``log_traces`` (the generated text)."""

    def __init__(self):
        super().__init__()
        self.traces: dict[str, list] = {}

    def log_traces(self, traces):
        for k, v in traces.items():
            self.traces.setdefault(k, []).append(v)


def config(tiny_data, save: Path, *extra: str):
    data, tok = tiny_data
    return load_config(YAMLS / "bd3_tiny.yaml", tiny_overrides(data, tok, save, *extra), world_size=1)


def train(tiny_data, save: Path, *extra: str, monkeypatch=None):
    """Run; returns (trainer, captured metrics or None)."""
    capture = None
    if monkeypatch is not None:
        from pipeline.trainer import build

        capture = Capture()
        original = build.build_loggers
        monkeypatch.setattr(build, "build_loggers", lambda cfg: [*original(cfg), capture])
    return run(config(tiny_data, save, *extra)), capture


def losses(path: Path) -> list[float]:
    return [json.loads(line)["loss/train/total"] for line in path.read_text().splitlines()]


def callback(trainer, name: str):
    return next(cb for cb in trainer.state.callbacks if type(cb).__name__ == name)


def logged(capture, key: str) -> dict[int, float]:
    return {int(ts.batch): v for ts, v in capture.data.get(key, [])}


@pytest.fixture(scope="module")
def reference_dir(tiny_data, tmp_path_factory) -> Path:
    """A Hugging Face folder of a (random) model with the run's tokenizer, as the genppl reference."""
    from pipeline.model import BD3LM, save_pretrained
    from pipeline.trainer import resolve_run_inputs

    folder = tmp_path_factory.mktemp("reference")
    res = resolve_run_inputs(config(tiny_data, folder / "unused"))
    model = BD3LM(res.model_config)
    model.init_weights(generator=torch.Generator().manual_seed(3))
    return save_pretrained(model, folder / "hf", tokenizer_dir=tiny_data[1].parent)


def test_callbacks_log_and_leave_training_bitwise_unchanged(
    tiny_data, tmp_path, one_thread, monkeypatch, capfd, reference_dir
):
    """All three callbacks on (adopt: false): every metric logged at each interval and the text on the
    console; the per-batch training losses equal the run without them bit for bit."""
    on, cap = train(
        tiny_data,
        tmp_path / "on",
        *COMMON,
        *callbacks_on(adopt=False),
        "callbacks.generation.max_new_tokens=16",
        f"callbacks.generation.reference={reference_dir}",
        f"callbacks.loss_log.path={tmp_path}/on.jsonl",
        monkeypatch=monkeypatch,
    )
    train(tiny_data, tmp_path / "off", *COMMON, f"callbacks.loss_log.path={tmp_path}/off.jsonl")
    assert losses(tmp_path / "on.jsonl") == losses(tmp_path / "off.jsonl")
    assert len(losses(tmp_path / "on.jsonl")) == 4

    # block_size_likelihood: every block size at batches 2 and 4.
    for bs in BLOCK_SIZES:
        for kind in ("nelbo", "ppl_bound", "stderr"):
            values = logged(cap, f"eval/{kind}/bs{bs}")
            assert sorted(values) == [2, 4] and all(math.isfinite(v) for v in values.values()), (kind, bs)
        nelbo = logged(cap, f"eval/nelbo/bs{bs}")[4]
        assert logged(cap, f"eval/ppl_bound/bs{bs}")[4] == pytest.approx(math.exp(nelbo))
    assert logged(cap, "eval/train_block_size") == {2: 4, 4: 4}

    # noise_interval_search: logged, not adopted; the chosen interval is the lowest-variance record.
    search = callback(on, "NoiseIntervalSearch")
    best = min(search.last_records[4], key=lambda r: r["variance"])
    assert search.chosen == {4: tuple(best["interval"])}
    assert logged(cap, "eval/noise_interval/beta")[4] == best["interval"][0]
    assert logged(cap, "eval/noise_interval/omega")[4] == best["interval"][1]
    assert logged(cap, "eval/noise_interval/variance")[4] == best["variance"]
    assert on.state.model.diffusion.noise_interval == (0.45, 0.95)  # the YAML's, untouched

    # generation: text (traces, stderr), unigram entropy and a finite generative perplexity.
    assert sorted(logged(cap, "eval/gen/unigram_entropy")) == [2, 4]
    assert all(math.isfinite(v) for v in logged(cap, "eval/gen/ppl").values())
    samples = callback(on, "Generation").last_samples
    assert len(samples) == 2 and all(re.fullmatch(r"(w\d+|<\|endoftext\|>)( \S+)*", s) for s in samples)
    assert cap.traces["eval/gen/sample0"][-1] == samples[0]
    err = capfd.readouterr().err
    assert f"[generation] sample 0: {samples[0]!r}" in err
    protocol = callback(on, "Generation").last_protocol  # how the samples were drawn, logged with them
    assert protocol["block_size"] == 4 and protocol["reference"] is not None
    assert f"sampler {protocol['sampler']}, top_p {protocol['top_p']}" in err


def test_block_size_likelihood_is_reproducible_and_bs1_is_the_ar_nll(tiny_data, tmp_path, one_thread):
    """The same weights give the same values twice (fixed noise); at block size 1 the NELBO is the AR
    NLL of the same eval rows (the first num_batches x device_eval_batch_size rows of the split)."""
    from pipeline.diffusion.objective import ar_nll
    from pipeline.rows import RowReader

    trainer, _ = train(tiny_data, tmp_path / "run", *COMMON, "eval_interval=4ba", *callbacks_on(adopt=False))
    cb = callback(trainer, "BlockSizeLikelihood")
    state = trainer.state
    first, second = cb.evaluate(state), cb.evaluate(state)
    assert [r.as_dict() for r in first] == [r.as_dict() for r in second]
    assert [r.as_dict() for r in first] == [r.as_dict() for r in cb.last_results]  # logged at batch 4
    assert [r.block_size for r in first] == BLOCK_SIZES and all(r.rows == 16 for r in first)

    model = state.model.model
    assert model.training  # put back in train mode
    batch = next(RowReader(tiny_data[0], "val").batches(list(range(16)), 16))
    with torch.no_grad():
        nll, count = ar_nll(model.eval(), batch["input_ids"])
    model.train()
    assert first[0].nelbo == pytest.approx(float(nll.double().sum() / count.sum()), abs=1e-5)
    assert first[0].tokens == int(count.sum()) == 16 * (SEQ_LEN - 1)


def test_adopted_noise_interval_survives_autoresume(tiny_data, tmp_path, one_thread):
    """adopt: true trains with the lowest-variance interval from the batch after the search; a run
    stopped after that search and autoresumed gets it back from the checkpoint and trains bitwise
    like the uninterrupted run."""
    from pipeline.trainer import build_trainer
    from pipeline.trainer.callbacks import NoiseIntervalSearch
    from pipeline.trainer.config import NoiseIntervalSearchSection

    common = [*COMMON, *callbacks_on(adopt=True), "callbacks.block_size_likelihood=null", "run_name=adopt"]
    full, _ = train(tiny_data, tmp_path / "a", *common, f"callbacks.loss_log.path={tmp_path}/a.jsonl")
    search = callback(full, "NoiseIntervalSearch")
    best = tuple(min(search.last_records[4], key=lambda r: r["variance"])["interval"])
    assert search.chosen == {4: best} and best != (
        0.45,
        0.95,
    )  # the test would prove nothing if it kept the YAML's
    assert full.state.model.diffusion.noise_interval == best

    log_b = f"callbacks.loss_log.path={tmp_path}/b.jsonl"
    first, _ = train(tiny_data, tmp_path / "b", *common, "max_duration=2ba", log_b)
    chosen = callback(first, "NoiseIntervalSearch").chosen.get(4)
    assert chosen is not None

    trainer = build_trainer(config(tiny_data, tmp_path / "b", *common, log_b))  # autoresume at batch 2
    try:
        assert int(trainer.state.timestamp.batch) == 2
        assert trainer.state.model.diffusion.noise_interval == chosen  # restored before any batch
        assert callback(trainer, "NoiseIntervalSearch").schedule.ticks == 1
        trainer.fit()
    finally:
        trainer.close()
    assert losses(tmp_path / "b.jsonl") == losses(tmp_path / "a.jsonl")

    # The state dict round trip on its own.
    sd = callback(trainer, "NoiseIntervalSearch").state_dict()
    fresh = NoiseIntervalSearch(NoiseIntervalSearchSection(), "2ba", 8)
    fresh.load_state_dict(json.loads(json.dumps(sd)))
    assert fresh.chosen == callback(trainer, "NoiseIntervalSearch").chosen and fresh.schedule.ticks == 2


def test_search_over_some_of_several_trained_sizes_adopts_only_theirs(
    tiny_data, tmp_path, one_thread, monkeypatch
):
    """diffusion.block_size: [2, 4] with an interval each; the search restricted to [4]: only bs4 is
    searched and logged (under bs4/, since several sizes are trained), its lowest-variance interval is
    adopted, and size 2 keeps the interval the YAML gave it."""
    trainer, cap = train(
        tiny_data,
        tmp_path,
        *COMMON,
        *callbacks_on(adopt=True),
        "callbacks.block_size_likelihood=null",
        "callbacks.generation=null",
        "diffusion.block_size=[2, 4]",
        "diffusion.noise_interval={2: [0.3, 0.8], 4: [0.45, 0.95]}",
        "callbacks.noise_interval_search.block_sizes=[4]",
        monkeypatch=monkeypatch,
    )
    search = callback(trainer, "NoiseIntervalSearch")
    best = min(search.last_records[4], key=lambda r: r["variance"])
    assert sorted(search.last_records) == [4] and search.chosen == {4: tuple(best["interval"])}
    assert tuple(best["interval"]) != (0.45, 0.95)  # else adopting it would prove nothing
    assert trainer.state.model.diffusion.noise_interval == {2: (0.3, 0.8), 4: tuple(best["interval"])}
    assert logged(cap, "eval/noise_interval/bs4/beta")[4] == best["interval"][0]
    assert not [k for k in cap.data if k.startswith(("eval/noise_interval/bs2/", "eval/noise_interval/beta"))]
    with pytest.raises(ConfigError) as e:
        config(
            tiny_data,
            tmp_path / "x",
            "diffusion.block_size=[2, 4]",
            "callbacks.noise_interval_search.block_sizes=[8]",
        )
    assert e.value.key == "callbacks.noise_interval_search.block_sizes" and "[2, 4]" in str(e.value)


def test_evaluation_functions_leave_the_global_rng_alone():
    """evaluate_block_sizes, noise_interval_search and generate draw only from seeded generators."""

    from pipeline.diffusion.metrics import evaluate_block_sizes, interval_grid, noise_interval_search
    from pipeline.diffusion.objective import DiffusionConfig
    from pipeline.diffusion.sampler import SamplerConfig, generate
    from tests.factories import random_model, tiny_model_config

    cfg = tiny_model_config(
        61, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=16, eos_token_id=0,
    )  # fmt: skip
    model = random_model(cfg).train()
    x = torch.randint(1, 61, (4, 16), generator=torch.Generator().manual_seed(1))
    batches = [
        {"input_ids": x, "doc_starts": torch.zeros_like(x, dtype=torch.bool), "sample_index": torch.arange(4)}
    ]
    before = torch.get_rng_state()
    evaluate_block_sizes(model, batches, [1, 4, 16], DiffusionConfig(block_size=4))
    noise_interval_search(model, batches, 4, DiffusionConfig(block_size=4), interval_grid([0.5], 0.25))
    generate(
        model, torch.zeros(2, 1, dtype=torch.long), SamplerConfig(block_size=4, max_new_tokens=8, top_p=0.9)
    )
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training


@pytest.mark.parametrize(
    "override, key",
    [
        (
            "callbacks.block_size_likelihood.block_sizes=[1,4,5]",
            "callbacks.block_size_likelihood.block_sizes",
        ),
        ("callbacks.block_size_likelihood.block_sizes=[1,M]", "callbacks.block_size_likelihood.block_sizes"),
        (
            "callbacks.block_size_likelihood.block_sizes=[4,L,32]",
            "callbacks.block_size_likelihood.block_sizes",
        ),
        ("callbacks.block_size_likelihood.interval=10", "callbacks.block_size_likelihood.interval"),
        ("callbacks.block_size_likelihood.num_batches=0", "callbacks.block_size_likelihood.num_batches"),
        ("callbacks.noise_interval_search.widths=[0.5,1.5]", "callbacks.noise_interval_search.widths"),
        ("callbacks.noise_interval_search.every_n_evals=0", "callbacks.noise_interval_search.every_n_evals"),
        ("callbacks.generation.top_p=0", "callbacks.generation.top_p"),
        ("callbacks.generation.sampler=greedy", "callbacks.generation.sampler"),
    ],
)
def test_config_errors_name_the_key(tiny_data, tmp_path, override, key):
    with pytest.raises(ConfigError) as e:
        config(tiny_data, tmp_path, override)
    assert e.value.key == key, str(e.value)
    if key.endswith("block_sizes") and "5" in override:
        assert "does not divide" in str(e.value) and f"max_seq_len = {SEQ_LEN}" in str(e.value)


def test_config_needs_eval_rows_and_a_reference_folder(tiny_data, tmp_path):
    with pytest.raises(ConfigError) as e:
        config(tiny_data, tmp_path, "eval_loader=null", "callbacks.noise_interval_search.adopt=false")
    assert e.value.key == "callbacks.noise_interval_search" and "eval_loader" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config(tiny_data, tmp_path, f"callbacks.generation.reference={tmp_path}/missing")
    assert e.value.key == "callbacks.generation.reference"


def test_yaml_examples_load(tiny_data, tmp_path):
    """The commented callback blocks of yamls/bd3_tiny.yaml, uncommented, are a valid config."""
    text = (YAMLS / "bd3_tiny.yaml").read_text()
    text = re.sub(
        r"^  # (block_size_likelihood|noise_interval_search|generation):", r"  \1:", text, flags=re.M
    )
    text = re.sub(r"^  #   ", "    ", text, flags=re.M)
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    data, tok = tiny_data
    cfg = load_config(path, tiny_overrides(data, tok, tmp_path / "run"), world_size=1)
    c = cfg.callbacks
    assert c.block_size_likelihood.block_sizes == [1, 4, 8, 16, "L"] and c.noise_interval_search.adopt
    assert c.generation.max_new_tokens == 32
    from pipeline.trainer.config import block_size_list

    assert block_size_list(cfg) == [1, 4, 8, 16, SEQ_LEN]


def test_default_likelihood_sizes_include_every_trained_size(tiny_data, tmp_path):
    from pipeline.trainer.config import block_size_list

    with pytest.warns(UserWarning, match="block size 2 allows only 1"):  # [0.45, 0.95] at L'=2
        cfg = config(tiny_data, tmp_path, "diffusion.block_size=[2,4]", "callbacks.block_size_likelihood={}")
    assert block_size_list(cfg) == [1, 2, 4, 8, 16, SEQ_LEN]
    cfg = config(tiny_data, tmp_path, "callbacks.block_size_likelihood.block_sizes=[1,8]")
    assert block_size_list(cfg) == [1, 8]  # an explicit list is kept as written
