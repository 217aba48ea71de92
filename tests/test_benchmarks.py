"""benchmarks/bench_train.py: the GPU peak table and a smoke run of the training-step benchmark.

No timing is checked (the machine may be shared): only that the table names the right chip, and that
a run prints one row per precision with finite numbers and the design target.
"""

import math

import pytest

from helpers import load_script

bench = load_script("bench_train_under_test", "benchmarks/bench_train.py")


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0),          # torch.cuda.get_device_name() of an H100 SXM
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce RTX 4090", 165.0),
    ("NVIDIA H100 NVL", None),                 # lower clocks than the SXM board: not guessed
    ("NVIDIA L40", None),                      # not the L4, not the L40S
    ("NVIDIA GeForce RTX 4090 D", None),
    ("Tesla T4", None),
])
def test_peak_table(name, tflops):
    assert bench.lookup_peak_tflops(name)[1] == tflops


def test_preset_settings_follow_train_base():
    import train_base
    for preset in ("smoke", "medium", "small"):
        settings = bench.preset_settings(preset)
        expected = {**{"batch_size": train_base.BaseConfig.batch_size, "seq_len": train_base.BaseConfig.seq_len},
                    **train_base.PRESETS[preset]}
        assert (settings["batch_size"], settings["seq_len"]) == (expected["batch_size"], expected["seq_len"])
    assert bench.preset_settings("small")["vocab_size"] > bench.preset_settings("smoke")["vocab_size"]


def test_smoke_run_prints_a_row_per_dtype(capsys):
    rows = bench.main(["--device", "cpu", "--presets", "smoke", "--dtypes", "fp32,bf16", "--steps", "2",
                       "--warmup", "1", "--matmul-size", "256", "--threads", "1"])
    out = capsys.readouterr().out
    assert [(row["preset"], row["dtype"], row["compiled"]) for row in rows] == [("smoke", "fp32", False),
                                                                               ("smoke", "bf16", False)]
    for row in rows:
        assert row["tokens_per_s"] > 0 and math.isfinite(row["mfu"]) and row["mfu"] > 0
        assert row["peak_bytes"] is None   # CPU: no peak-memory figure
    assert bench.DESIGN_TARGET in out
    assert "n/a" in out


def test_unknown_options_are_refused(capsys):
    for argv in (["--dtypes", "fp16"], ["--presets", "huge"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    assert "fp16" in capsys.readouterr().err
