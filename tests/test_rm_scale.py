"""experiments/rm_scale.py: the reward-model size ladder (Gao et al. 2022) end to end, and its statistics.

* The statistics it adds to minirlhf/stats.py, against plain references: best-of-n averaged over
  prompts (a loop of `best_of_n_expected`), the KL-regularised optimum over prompts, the closed-form
  peak of each Gao curve (against a fine grid), the log-linear trend against size (known a and b
  recovered exactly). That `fit_gao` recovers known alpha and beta is tested in test_evaluate.py.
* The smoke ladder with --with-ppo on a smoke pipeline's outputs (data, base, SFT, RM; run in this
  process to save interpreter start-ups; the ladder's own stages are subprocesses): two sizes, one
  of them the run's own (its base.pt and sft.pt are used, not retrained); writes the figure, the
  JSON (one entry per size, with best-of-n, PPO and both fits) and the markdown tables.
* Run again: no stage script runs at all (base models included), no checkpoint is rewritten, and
  the numbers come out the same.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from minirlhf import stats
from minirlhf.checkpoint import load_checkpoint
from minirlhf.cli import UserError, run_main
from helpers import load_script

rm_scale = load_script("rm_scale", "experiments/rm_scale.py")


# ---------------------------------------------------------------------------------------------
# The statistics


def test_best_of_n_curve_is_the_mean_over_prompts_of_the_estimator():
    rng = np.random.default_rng(0)
    rm, gold = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))   # (N samples, K prompts)
    ns = [1, 2, 4, 8]
    expected = [sum(stats.best_of_n_expected(rm[:, i], gold[:, i], n) for i in range(3)) / 3 for n in ns]
    assert stats.best_of_n_curve(rm, gold, ns) == pytest.approx(expected)
    # n = 1 is the plain mean; n = N the RM's favourite of each prompt, averaged
    assert stats.best_of_n_curve(rm, gold, [1])[0] == pytest.approx(gold.mean())
    assert stats.best_of_n_curve(rm, gold, [8])[0] == pytest.approx(gold[rm.argmax(axis=0), range(3)].mean())
    with pytest.raises(ValueError, match="shape"):
        stats.best_of_n_curve(rm, gold[:, :2], ns)


def test_kl_regularised_optimum_curve_averages_each_beta_over_prompts():
    scores = np.array([[0.0, 1.0], [math.log(3), 0.0]])   # (N = 2 samples, K = 2 prompts)
    values = np.array([[1.0, 5.0], [2.0, 4.0]])
    curve = stats.kl_regularised_optimum_curve(scores, values, [1.0, 0.5])
    for k, beta in enumerate([1.0, 0.5]):
        per_prompt = [stats.kl_regularised_optimum(scores[:, i], values[:, i], beta) for i in range(2)]
        assert curve["gold"][k] == pytest.approx(np.mean([p[0] for p in per_prompt]))
        assert curve["kl"][k] == pytest.approx(np.mean([p[1] for p in per_prompt]))
        assert curve["win_rate"][k] == pytest.approx(np.mean([p[2] for p in per_prompt]))
    # by hand at beta 1: prompt 0 weighs its samples 1 : 3 (exp 0 : exp log 3) -> 1/4 * 1 + 3/4 * 2 = 1.75;
    # prompt 1 weighs them e : 1 -> (5e + 4) / (e + 1); the curve is their mean
    assert curve["gold"][0] == pytest.approx((1.75 + (5 * math.e + 4) / (math.e + 1)) / 2)
    assert curve["beta"] == [1.0, 0.5]


@pytest.mark.parametrize("form, alpha, beta", [("bon", 0.8, 0.3), ("rl", 1.1, 0.5), ("rl", 0.2, 0.4)])
def test_gao_peak_is_the_maximum_of_the_fitted_curve(form, alpha, beta):
    fit = {"alpha": alpha, "beta": beta}
    peak = stats.gao_peak(fit, form)
    grid = np.linspace(1e-6, 20.0, 400_001)
    curve = stats.gao_curve(fit, grid, form)
    top = int(np.argmax(curve))
    assert peak["d"] == pytest.approx(grid[top], abs=1e-4), f"{form}: peak at d={grid[top]}, got {peak}"
    assert peak["gain"] == pytest.approx(curve[top], abs=1e-8)
    assert peak["kl"] == pytest.approx(peak["d"] ** 2)
    if form == "bon":   # by hand: d* = 0.8 / 0.6 = 4/3, gain = 0.64 / 1.2 = 8/15
        assert peak["d"] == pytest.approx(4 / 3) and peak["gain"] == pytest.approx(8 / 15)


def test_gao_peak_needs_a_turning_point():
    assert stats.gao_peak({"alpha": 0.5, "beta": -0.1}, "bon") is None, "beta < 0: the fit never turns down"
    assert stats.gao_peak({"alpha": -0.5, "beta": 0.1}, "bon") is None, "alpha < 0: the fit never rises"
    assert stats.gao_peak(None, "rl") is None
    with pytest.raises(ValueError):
        stats.gao_peak({"alpha": 1.0, "beta": 1.0}, "ppo")


def test_fit_log_linear_recovers_a_known_trend_and_skips_missing_points():
    sizes = [1e6, 3e6, 1e7, 3e7]
    values = [0.6 + 0.05 * math.log(s) for s in sizes]
    fit = stats.fit_log_linear(sizes + [1e8], values + [None])
    assert fit["intercept"] == pytest.approx(0.6) and fit["slope"] == pytest.approx(0.05)
    assert fit["per_10x"] == pytest.approx(0.05 * math.log(10)) and fit["r2"] == pytest.approx(1.0)
    assert stats.fit_log_linear([1e6, 1e6], [0.5, 0.7]) is None, "one distinct size has no trend"


def test_bad_sizes_are_a_clear_error():
    assert rm_scale.parse_sizes(["4x256x4"]) == [{"name": "L4_d256", "n_layer": 4, "d_model": 256, "n_head": 4}]
    with pytest.raises(UserError, match="LAYERSxWIDTHxHEADS"):
        rm_scale.parse_sizes(["4x256"])
    with pytest.raises(UserError, match="divisible"):
        rm_scale.parse_sizes(["4x250x4"])


# ---------------------------------------------------------------------------------------------
# The ladder end to end


def run_in_process(main, *argv: str) -> None:
    """`main()` with this command line, in this interpreter (a new one costs seconds of start-up)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["script", *argv])
        main()


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """A smoke pipeline up to the RM, in process (its sft.pt is the policy, its comparisons every RM's
    data), then `experiments/rm_scale.py --preset smoke --with-ppo`, whose stages are real
    subprocesses: sizes 1x32x2 (base, SFT, RM and PPO trained) and 2x64x2 (the run's own size: its
    base.pt and sft.pt used, RM and PPO trained)."""
    root = tmp_path_factory.mktemp("rm_scale")
    data, run, out = str(root / "data"), str(root / "run"), str(root / "ladder")
    common = ["--preset", "smoke", "--data-dir", data, "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_in_process(load_script("prepare_for_rm_scale", "data/prepare.py").main, "--preset", "smoke", "--data-dir", data)
        import train_base, train_rm, train_sft   # noqa: E401 (the stage scripts, in this process)
        for script in (train_base, train_sft, train_rm):
            run_in_process(script.main, *common, "--out-dir", run)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("OMP_NUM_THREADS", "1")   # for the stage subprocesses
            run_in_process(rm_scale.main, *common, "--run-dir", run, "--out-dir", out, "--with-ppo")
    finally:
        torch.set_num_threads(threads)
    return {"data": data, "run": run, "out": out, "common": common}


def test_smoke_ladder_writes_figure_json_and_table(ladder):
    out = ladder["out"]
    for name in ("rm_scale.json", "rm_scale.md", "rm_scale.png", "samples.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0, f"{name} was not written"
    with open(os.path.join(out, "rm_scale.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = json.load(open(os.path.join(out, "rm_scale.json")))
    sizes = report["sizes"]
    assert [s["name"] for s in sizes] == ["L1_d32", "L2_d64"], "one entry per size, smallest first"
    assert sizes[0]["parameters"] < sizes[1]["parameters"]
    assert (report["samples"]["prompts"], report["samples"]["per_prompt"]) == (6, 8), "the smoke preset: 6 x 8"
    for size in sizes:
        bon = size["best_of_n"]
        assert bon["n"] == [1, 2, 4, 8] and len(bon["gold"]) == len(bon["proxy"]) == 4
        assert bon["kl"][0] == 0.0 and bon["gold"][0] == pytest.approx(report["samples"]["gold"]), \
            "n = 1 is the plain mean of the shared samples, the same for every RM"
        assert set(bon["fit"]) == {"alpha", "beta", "r2"}
        assert "gold/accuracy" in size["held_out"] and "gold/accuracy" in size["on_samples"]
        assert len(size["optimum"]["gold"]) == len(rm_scale.OPTIMUM_BETAS)
        ppo = size["ppo"]
        assert ppo["step"] == [0, 1, 2] and ppo["kl"][0] == 0.0, "held-out evaluations at every update, from KL 0"
        assert set(ppo["fit"]) == {"alpha", "beta", "r2"}
        ckpt = load_checkpoint(size["checkpoints"]["ppo"], kind="ppo")
        assert ckpt["train_config"]["reward_model"] == size["checkpoints"]["rm"]
        assert ckpt["train_config"]["init"] == os.path.join(ladder["run"], "sft.pt"), "the policy is the run's SFT"
    assert report["ranked_by_gold"]["gold"][-1] >= max(s["best_of_n"]["gold"][-1] for s in sizes), \
        "ranking by gold itself is the ceiling of best-of-n"
    assert report["trends"]["best_of_n/alpha"] is not None and report["trends"]["ppo/alpha"] is not None
    table = open(os.path.join(out, "rm_scale.md")).read()
    assert table.count("| L1_d32 |") == 3 and table.count("| L2_d64 |") == 3, "a row per size in the three tables"
    lines = open(os.path.join(out, "samples.jsonl")).read().splitlines()
    assert len(lines) == 6 * 8 and {"prompt", "completion", "ended", "gold"} <= set(json.loads(lines[0]))


def test_the_runs_own_size_uses_its_base_and_sft_and_a_new_size_is_trained(ladder):
    report = json.load(open(os.path.join(ladder["out"], "rm_scale.json")))
    small, own = report["sizes"]
    assert small["checkpoints"]["base_from"] == "trained" and small["checkpoints"]["sft_from"] == "trained"
    assert own["checkpoints"]["base"] == os.path.join(ladder["run"], "base.pt"), "the run's base is that size"
    assert own["checkpoints"]["sft"] == os.path.join(ladder["run"], "sft.pt")
    assert not os.path.exists(os.path.join(ladder["out"], "L2_d64", "base.pt")), "not pretrained a second time"
    base = load_checkpoint(os.path.join(ladder["out"], "L1_d32", "base.pt"), kind="base")
    assert (base["model_config"]["n_layer"], base["model_config"]["d_model"]) == (1, 32)
    for size in report["sizes"]:   # every RM on the run's comparisons, from its own size's SFT
        rm = load_checkpoint(size["checkpoints"]["rm"], kind="rm")
        assert rm["train_config"]["comparisons"] == os.path.join(ladder["run"], "rm_comparisons.jsonl")
        assert rm["train_config"]["init"] == size["checkpoints"]["sft"]


def test_a_second_run_trains_nothing_again(ladder, monkeypatch):
    out = ladder["out"]
    checkpoints = [os.path.join(out, size, name) for size in ("L1_d32", "L2_d64")
                   for name in ("base.pt", "sft.pt", "rm.pt", os.path.join("ppo", "ppo.pt"))
                   if os.path.exists(os.path.join(out, size, name))]
    assert len(checkpoints) == 6, checkpoints   # L1_d32: base, SFT, RM, PPO; L2_d64: RM, PPO
    mtimes = {path: os.path.getmtime(path) for path in checkpoints}
    first = json.load(open(os.path.join(out, "rm_scale.json")))

    def no_stage(label, command, log_path):
        raise AssertionError(f"{label} ran again: {' '.join(command)}")

    monkeypatch.setattr(rm_scale, "run_stage", no_stage)
    run_in_process(rm_scale.main, *ladder["common"], "--run-dir", ladder["run"], "--out-dir", out, "--with-ppo")
    assert all(os.path.getmtime(path) == mtime for path, mtime in mtimes.items()), "a reused checkpoint was rewritten"
    second = json.load(open(os.path.join(out, "rm_scale.json")))
    for before, after in zip(first["sizes"], second["sizes"]):
        assert {after["checkpoints"][f"{kind}_from"] for kind in ("base", "sft", "rm", "ppo")} <= {"reused", "run"}
        assert after["best_of_n"]["gold"] == before["best_of_n"]["gold"], "the same models, the same samples"


def test_missing_run_outputs_are_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rm_scale.py", "--preset", "smoke", "--run-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        run_main(rm_scale.main)
    assert exit_.value.code != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "sft.pt not found" in error[0] and "run_all.py --until rm" in error[0], error
