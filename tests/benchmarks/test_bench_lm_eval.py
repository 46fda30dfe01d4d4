"""``python -m benchmarks.bench_lm_eval --tiny``: the benchmark's code on a tiny shape, its figures present
and its block-size-1 numbers equal to the hf backend's."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")


def test_bench_lm_eval_tiny(tmp_path, one_thread):
    from benchmarks.bench_lm_eval import main

    res = main(["--tiny", "--docs", "3", "--mc-samples", "2", "--mc-requests", "2", "--threads", "1"])
    assert res["max_abs_loglik_diff"] < 1e-4 and res["same_is_greedy"]
    for bs in (4, 16):
        for check in ("with", "without"):
            assert res[f"bs{bs}_{check}_greedy_check_s_per_sample"] > 0
    assert res["hf_requests_per_s"] > 0 and res["bd3_bs1_requests_per_s"] > 0
