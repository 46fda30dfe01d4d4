"""The comparison figure: baseline and trained model on the same axes, likelihood beside downstream."""

from __future__ import annotations

import pytest

from pipeline.plots import plot_comparison


def test_comparison_figure_is_written_with_both_panels(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    def ppl(scale):
        return [{"block_size": b, "ppl_bound": scale * b, "stderr": 0.01} for b in (1, 4, 16)]

    def acc(v):
        return [
            {"task": "t", "metric": m, "block_size": b, "value": v / b, "stderr": float("nan")}
            for m in ("acc", "acc_norm", "word_perplexity")
            for b in (1, 4)
        ]

    both, alone = tmp_path / "both.png", tmp_path / "alone.png"
    plot_comparison(
        {"AR-init": ppl(2.0), "trained": ppl(1.5)}, {"AR-init": acc(0.5), "trained": acc(0.6)}, both, "run-x"
    )
    plot_comparison({"AR-init": ppl(2.0)}, None, alone, "run-x")
    w_both, w_alone = Image.open(both).size[0], Image.open(alone).size[0]
    assert w_both == 2 * w_alone  # two panels side by side, one without downstream results


def test_plots_are_titled_with_the_run_name(tmp_path):
    """pipeline.eval's plots: the run's name (its save_folder's run_config.json), not "hf"."""
    import json

    from pipeline.eval import run_name
    from pipeline.save_folder import run_config_file

    save = tmp_path / "save"
    (save / "hf").mkdir(parents=True)
    run_config_file(save).write_text(json.dumps({"run_name": "bd3-1b-owt"}))
    assert run_name(save / "hf") == "bd3-1b-owt" and run_name(save) == "bd3-1b-owt"
    (tmp_path / "export" / "hf").mkdir(parents=True)
    assert run_name(tmp_path / "export" / "hf") == "export"
