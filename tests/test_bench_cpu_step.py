"""bench/cpu_step.py --dots: each timed call is the matmul its label names (the transposed-rhs form
included), and the table's ratio and GFLOP/s are computed from the right operand sizes."""

import importlib.util
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "cpu_step.py")


def load_bench():
    if "cpu_step" not in sys.modules:
        spec = importlib.util.spec_from_file_location("cpu_step", SCRIPT)
        sys.modules["cpu_step"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["cpu_step"])
    return sys.modules["cpu_step"]


@pytest.mark.parametrize("side", ["mmdit", "peer"])
def test_each_dot_call_computes_its_labelled_matmul(side):
    if side == "peer":
        pytest.importorskip("torch")
    bench = load_bench()
    calls = bench.dot_calls(side, seed=0)
    rng = np.random.default_rng(0)  # the operands dot_calls draws, in the same order
    for label, a, b, transposed in bench.DOT_SHAPES:
        x, w = rng.standard_normal(a, np.float32), rng.standard_normal(b, np.float32)
        want = np.matmul(x, np.swapaxes(w, -1, -2) if transposed else w)
        got = np.asarray(calls[label]["dot"]())
        assert got.shape == want.shape, label
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3, err_msg=label)


def test_dot_table_ratio_and_throughput():
    bench = load_bench()
    timing = lambda s: {label: {"dot": {"median_s": s}} for label, *_ in bench.DOT_SHAPES}  # noqa: E731
    rows = bench.print_dots(timing(0.002), timing(0.001))
    up = rows["ffn up x W [640,256]x[256,1024]"]
    assert up["ratio"] == pytest.approx(2.0)
    assert up["gflops_mmdit"] == pytest.approx(2 * 640 * 256 * 1024 / 0.001 / 1e9)
    scores = rows["scores q k^T [8,320,64]x[8,64,320]"]
    assert scores["gflops_peer"] == pytest.approx(2 * 8 * 320 * 64 * 320 / 0.002 / 1e9)
    dgrad = rows["dgrad g W^T [640,1024]x[256,1024]^T"]
    assert dgrad["gflops_peer"] == pytest.approx(2 * 640 * 1024 * 256 / 0.002 / 1e9)
