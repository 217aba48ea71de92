"""train_base.py and train_sft.py under torchrun (2 CPU processes, Gloo), and in bf16.

Data parallelism here draws one global batch and gives each rank a slice: base windows come from a
generator every rank shares, SFT demonstrations from an order every rank shares, and the SFT loss
divides by the GLOBAL token count. So 2 ranks make the same updates as 1 process, and the final
metrics agree up to float summation order. Tolerance: the 2-rank gradient is the sum of two
half-batch sums (an all-reduce) instead of one sum, ~1e-7 relative per step; after the smoke runs'
23-30 Adam steps the losses were measured to differ by < 1e-6 absolute (losses ~4.4), so
rel=1e-4 leaves room and would still catch a wrong normalisation (mean of per-rank means, or a
rank training on the other's rows), which moves the SFT loss in the second decimal.

Only rank 0 writes: one metrics line per step, the config printed once.
"""

import json
import os
import subprocess
import sys

import pytest

from ranks import ROOT, torchrun


def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def run_torchrun(script, *args):
    result = torchrun(script, 2, *args)
    assert result.returncode == 0, f"torchrun {script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = str(root / "data")
    run("data/prepare.py", "--preset", "smoke", "--data-dir", data)
    out = {name: str(root / name) for name in ("one", "two", "one_last", "two_last")}
    common = ["--preset", "smoke", "--data-dir", data, "--device", "cpu"]
    logs = {"base_one": run("train_base.py", *common, "--out-dir", out["one"]),
            "base_two": run_torchrun("train_base.py", *common, "--out-dir", out["two"])}
    # both SFT runs start from the same base.pt, so they differ only by the number of processes
    os.makedirs(out["one_last"]), os.makedirs(out["two_last"])
    for name in ("two", "one_last", "two_last"):
        with open(os.path.join(out["one"], "base.pt"), "rb") as src, open(os.path.join(out[name], "base.pt.tmp"), "wb") as dst:
            dst.write(src.read())
        os.replace(os.path.join(out[name], "base.pt.tmp"), os.path.join(out[name], "base.pt"))
    logs["sft_one"] = run("train_sft.py", *common, "--out-dir", out["one"])
    logs["sft_two"] = run_torchrun("train_sft.py", *common, "--out-dir", out["two"])
    # 180 training demonstrations in batches of 179: the last batch has ONE, so rank 1 has none
    last = ["--batch-size", "179", "--report-prompts", "0"]
    logs["last_one"] = run("train_sft.py", *common, *last, "--out-dir", out["one_last"])
    logs["last_two"] = run_torchrun("train_sft.py", *common, *last, "--out-dir", out["two_last"])
    return out, logs


@pytest.mark.parametrize("stage", ["base", "sft"])
def test_two_ranks_match_one_process(runs, stage):
    out, _ = runs
    one, two = metrics(os.path.join(out["one"], f"{stage}_metrics.jsonl")), \
        metrics(os.path.join(out["two"], f"{stage}_metrics.jsonl"))
    assert [r["step"] for r in one] == [r["step"] for r in two]   # one line per step: one writer
    for a, b in zip(one, two):
        for key in ("loss/train", "loss/val"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-4), f"{stage} step {a['step']} {key}"


def test_a_rank_with_no_rows_still_joins_the_update(runs):
    out, _ = runs
    one = metrics(os.path.join(out["one_last"], "sft_metrics.jsonl"))
    two = metrics(os.path.join(out["two_last"], "sft_metrics.jsonl"))
    assert len(one) == len(two) == 3   # step 0 (val) + 2 steps
    assert two[-1]["loss/train"] == pytest.approx(one[-1]["loss/train"], rel=1e-4)
    assert two[-1]["loss/val"] == pytest.approx(one[-1]["loss/val"], rel=1e-4)


def test_only_rank_zero_prints_and_writes(runs):
    out, logs = runs
    for name in ("base_two", "sft_two"):
        assert logs[name].stdout.count("wrote ") == 1, logs[name].stdout[-1000:]
    assert "2 process(es)" in logs["base_two"].stdout
    for name in ("base.pt", "base_metrics.jsonl", "base_curves.png", "sft.pt", "sft_curves.png"):
        assert os.path.exists(os.path.join(out["two"], name))


def test_batch_not_divisible_by_ranks_is_one_line(runs, tmp_path):
    out, _ = runs
    result = torchrun("train_base.py", 2, "--preset", "smoke", "--data-dir", os.path.join(os.path.dirname(out["one"]), "data"),
                      "--out-dir", str(tmp_path), "--batch-size", "7")
    assert result.returncode != 0
    # the script's own line (torchrun then adds its report of the failed child)
    assert "error: --batch-size 7 must be divisible by the 2 processes" in result.stderr


@pytest.mark.parametrize("script", ["train_base.py", "train_sft.py"])
def test_bf16_smoke_runs_on_the_cpu(runs, script, tmp_path):
    out, _ = runs
    data = os.path.join(os.path.dirname(out["one"]), "data")
    if script == "train_sft.py":
        os.link(os.path.join(out["one"], "base.pt"), tmp_path / "base.pt")
    result = run(script, "--preset", "smoke", "--data-dir", data, "--out-dir", str(tmp_path), "--device", "cpu",
                 "--dtype", "bf16", "--report-prompts" if script == "train_sft.py" else "--eval-batches", "2")
    assert "bf16" in result.stdout
    stage = script[len("train_"):-len(".py")]
    last = metrics(tmp_path / f"{stage}_metrics.jsonl")[-1]
    fp32 = metrics(os.path.join(out["one"], f"{stage}_metrics.jsonl"))[-1]
    # bf16 matmuls round at ~2^-8: the loss moves, but stays close to the fp32 run's
    assert last["loss/train"] == pytest.approx(fp32["loss/train"], rel=0.05)
