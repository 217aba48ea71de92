"""benchmarks/bench_logprobs.py: smoke runs on the CPU at tiny shapes, and the GPU run's matrix.

No timing is checked (the machine may be shared): only that every requested row is printed, measured
or skipped with its reason, with results that agree with plain PyTorch.
"""

import pytest

from helpers import load_script

bench = load_script("bench_logprobs_under_test", "benchmarks/bench_logprobs.py")


def test_same_process_run_measures_or_skips_every_row(capsys):
    rows = bench.main(["--device", "cpu", "--shapes", "40x8x300", "--dtypes", "fp32", "bf16", "--logit-stds", "16",
                       "--repeats", "1", "--threads", "1", "--same-process"])
    out = capsys.readouterr().out
    assert len(rows) == 2 * 2 * len(bench.DEFAULT_IMPLS)  # dtypes x modes x implementations
    for row in rows:
        if row["impl"] in ("compile", "triton", "triton_tiled"):  # CUDA only
            assert row["skipped"] == "measured on CUDA only", row
            continue
        assert "error" not in row, row
        assert row["time_s"] > 0 and row["peak_bytes"] is None  # CPU in one process: no memory figure
        plain = next(r for r in rows if r["impl"] == "plain" and (r["dtype"], r["mode"]) == (row["dtype"], row["mode"]))
        tolerance = 1e-5 if row["dtype"] == "fp32" else 2e-2  # plain's bf16 log-softmax is rounded to bf16
        assert abs(row["logprobs_sum"] - plain["logprobs_sum"]) <= tolerance * abs(plain["logprobs_sum"]), row
    assert "skipped: measured on CUDA only" in out and "rel diff vs plain" in out
    assert bench.GOALS in out


def test_fresh_processes_give_cpu_memory_figures(capsys):
    # the child-process protocol the default CPU run (and the CUDA run) uses: two processes here
    rows = bench.main(["--device", "cpu", "--shapes", "64x16x500", "--logit-stds", "16", "--modes", "fwd+bwd",
                       "--impls", "plain", "--repeats", "1", "--threads", "1"])
    assert len(rows) == 1 and rows[0]["impl"] == "plain", rows
    assert rows[0]["peak_bytes"] is not None and "VmHWM" in rows[0]["memory_method"]
    assert rows[0]["time_s"] > 0 and rows[0]["grad_weight_norm"] > 0
    assert "two fresh processes per row" in capsys.readouterr().out


def test_the_gpu_run_covers_both_shapes_both_dtypes_and_every_implementation():
    args = bench.parse_args(["--device", "cuda"])  # parsing needs no GPU
    assert [bench.shape_name(shape) for shape in args.shapes] == ["2048x256x50257", "16384x768x50257"]
    assert args.dtypes == ["fp32", "bf16"] and args.modes == ["fwd+bwd", "fwd"]
    assert args.impls == ["plain", "fused", "compile", "triton", "triton_tiled"]


def test_bad_options_are_refused(capsys):
    for argv in (["--shapes", "2048x256"], ["--shapes", "0x1x2"], ["--dtypes", "fp16"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    assert "TOKENSxDxV" in capsys.readouterr().err
