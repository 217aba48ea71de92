"""Tests for the critic-free methods: the group advantages (minirlhf/losses.py) and train_grpo.py.

* `rloo_advantages` and `grpo_advantages`: hand-worked groups, plain Python-loop references, the
  leave-one-out baseline (raising one score by d moves its own advantage by d and each other's by
  -d/(k-1)), RLOO = k/(k-1) x the unscaled GRPO advantage, a group of equal scores gives exactly 0
  (even where the mean of the floats is not exactly the float), k >= 2 required;
* the update: the first minibatch has ratio exactly 1 (a model configured with dropout), in both
  KL modes; with --kl-mode reward an equal-score group is moved by its KL alone;
* the script: --preset smoke end to end for --advantage grpo and rloo (outputs, kinds, metric
  names), and torchrun with 2 processes (exit 0, rank 0 alone writes).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

from minirlhf.checkpoint import load_checkpoint
from minirlhf.cli import UserError
from minirlhf.losses import grpo_advantages, rloo_advantages
from minirlhf.model import GPT, GPTConfig
from minirlhf.ppo import Rollout, minibatch_orders, rollout_logprobs
from ranks import ROOT, torchrun
from test_ppo import tiny_world, toy_generation, toy_gpt  # noqa: F401 (tiny_world: a fixture)

import train_grpo


pytestmark = pytest.mark.usefixtures("one_thread")   # (tests/conftest.py)


# ---------------------------------------------------------------------------------------------
# The advantage functions
# ---------------------------------------------------------------------------------------------


def test_rloo_advantages_hand_worked():
    scores = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    # the others' means: (2+3+6)/3 = 11/3, (1+3+6)/3 = 10/3, (1+2+6)/3 = 3, (1+2+3)/3 = 2
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0]])     # [-8/3, -4/3, 0, 4]
    torch.testing.assert_close(rloo_advantages(scores), expected)
    # k = 2: the baseline is the other sample, so the advantages are +-(difference)
    torch.testing.assert_close(rloo_advantages(torch.tensor([[5.0, 1.0], [0.0, 0.5]])),
                               torch.tensor([[4.0, -4.0], [-0.5, 0.5]]))


def test_grpo_advantages_hand_worked():
    scores = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    # mean 3, deviations [-2, -1, 0, 3]; unbiased variance (4 + 1 + 0 + 9) / (4 - 1) = 14/3
    deviations = torch.tensor([[-2.0, -1.0, 0.0, 3.0]])
    torch.testing.assert_close(grpo_advantages(scores, eps=0.0), deviations / math.sqrt(14 / 3))
    torch.testing.assert_close(grpo_advantages(scores), deviations / (math.sqrt(14 / 3) + 1e-4), msg="eps on the std")
    assert not torch.allclose(grpo_advantages(scores, eps=0.0), deviations / math.sqrt(14 / 4)), \
        "the std divides by k - 1 (DeepSeekMath), not k"
    torch.testing.assert_close(grpo_advantages(scores, scale=False), deviations, msg="Dr. GRPO: s - mean")
    # k = 2, scores 0 and 2: deviations -+1, std sqrt(2): -+1/sqrt(2) whatever the gap
    torch.testing.assert_close(grpo_advantages(torch.tensor([[0.0, 2.0], [0.0, 200.0]]), eps=0.0),
                               torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]) / math.sqrt(2))


def test_rloo_advantages_leave_one_out_baseline():
    k, d = 5, 0.75
    scores = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    raised = scores.clone()
    raised[1, 2] += d
    change = rloo_advantages(raised) - rloo_advantages(scores)
    # its own baseline does not contain it: its advantage moves by d (= (k-1)/(k-1) * d); each of
    # the k-1 others has it in its baseline with weight 1/(k-1): -d/(k-1); other prompts: 0
    expected = torch.zeros(3, k)
    expected[1] = -d / (k - 1)
    expected[1, 2] = d
    torch.testing.assert_close(change, expected)
    torch.testing.assert_close(rloo_advantages(scores).sum(dim=1), torch.zeros(3), msg="a group's advantages sum to 0")


def test_rloo_advantages_are_k_over_k_minus_1_times_unscaled_grpo_advantages():
    for k in (2, 3, 8):
        scores = torch.randn(4, k, generator=torch.Generator().manual_seed(k))
        torch.testing.assert_close(rloo_advantages(scores), k / (k - 1) * grpo_advantages(scores, scale=False))


def test_grpo_advantages_and_rloo_advantages_are_exactly_zero_for_equal_scores():
    # 7.3 three times in float32: the naive mean is not exactly 7.3, and the rounding divided by a
    # std near 0 (+ eps) would be an advantage of ~5e-3
    scores = torch.tensor([[7.3, 7.3, 7.3], [-1.0, -1.0, -1.0], [0.1, 0.1, 0.1], [0.0, 1.0, 2.0]])
    naive = scores[:1] - scores[:1].mean(dim=1, keepdim=True)
    assert naive.abs().max() > 0, "this group should show the trap (the mean of the floats is not 7.3)"
    for name, advantages in (("grpo", grpo_advantages(scores)), ("grpo scale=False", grpo_advantages(scores, scale=False)),
                             ("rloo", rloo_advantages(scores))):
        assert torch.equal(advantages[:3], torch.zeros(3, 3)), f"{name}: an equal group must give exactly 0, " \
                                                              f"got {advantages[:3].tolist()}"
        assert advantages[3].abs().sum() > 0, f"{name}: an unequal group must not"


def test_grpo_advantages_and_rloo_advantages_against_python_loops():
    generator = torch.Generator().manual_seed(1)
    for k in (2, 3, 6):
        scores = torch.randn(5, k, generator=generator) * 3 + 1
        grpo, drgrpo, rloo = [], [], []
        for row in scores.tolist():
            mean, std = statistics.mean(row), statistics.stdev(row)   # stdev: the k - 1 one
            grpo.append([(s - mean) / (std + 1e-4) for s in row])
            drgrpo.append([s - mean for s in row])
            rloo.append([s - (sum(row) - s) / (k - 1) for s in row])
        torch.testing.assert_close(grpo_advantages(scores), torch.tensor(grpo), msg=f"grpo, k={k}")
        torch.testing.assert_close(grpo_advantages(scores, scale=False), torch.tensor(drgrpo), msg=f"drgrpo, k={k}")
        torch.testing.assert_close(rloo_advantages(scores), torch.tensor(rloo), msg=f"rloo, k={k}")


def test_grpo_advantages_and_rloo_advantages_need_groups_of_two():
    for function in (grpo_advantages, rloo_advantages):
        with pytest.raises(ValueError, match="k >= 2"):
            function(torch.ones(4, 1))
        with pytest.raises(ValueError, match="shape"):
            function(torch.ones(4))


# ---------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------


def test_group_advantages_rows_in_groups_and_the_kl_in_the_reward():
    scores = torch.tensor([1.0, 1.0, 0.0, 2.0])          # k = 2: rows 0-1 one group, rows 2-3 another
    kl = torch.tensor([3.0, 1.0, 0.0, 0.0])
    common = dict(group_size=2, advantage="drgrpo", kl_coef=0.5)
    torch.testing.assert_close(train_grpo.group_advantages(scores, kl, kl_mode="loss", **common),
                               torch.tensor([0.0, 0.0, -1.0, 1.0]))
    # reward mode: s' = s - 0.5 * kl = [-0.5, 0.5, 0, 2]: the equal-score group is moved by its KL alone
    torch.testing.assert_close(train_grpo.group_advantages(scores, kl, kl_mode="reward", **common),
                               torch.tensor([-0.5, 0.5, -1.0, 1.0]))
    # ...and GRPO's division makes that KL difference a full-size advantage
    grpo = train_grpo.group_advantages(scores, kl, kl_mode="reward", group_size=2, advantage="grpo", kl_coef=0.5)
    torch.testing.assert_close(grpo, torch.tensor([-1.0, 1.0, -1.0, 1.0]) / math.sqrt(2), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kl_mode", ["loss", "reward"])
def test_first_minibatch_has_ratio_exactly_one(kl_mode):
    # dropout 0.3 in the config: an update that left the model in train() mode would not give ratio 1
    policy = toy_gpt(0, dropout=0.3).train()
    reference = copy.deepcopy(policy)
    generation = toy_generation(policy, temperature=0.8)      # 6 responses: 2 groups of k = 3
    rollout = Rollout.from_generation(generation, torch.tensor([1.0, 0.0, 2.0, 0.5, -1.0, 3.0]))
    orders = minibatch_orders(6, 3, 2, torch.Generator().manual_seed(0))
    rollout.logprobs, rollout.entropy = rollout_logprobs(policy, rollout, orders[0], 0.8)     # as train_grpo.py
    rollout.ref_logprobs, _ = rollout_logprobs(reference, rollout, orders[0], 0.8)
    kl = (rollout.logprobs - rollout.ref_logprobs).sum(dim=1)
    assert torch.equal(kl, torch.zeros(6)), "policy = reference: zero KL"
    advantages = train_grpo.group_advantages(rollout.scores, kl, group_size=3, advantage="grpo", kl_mode=kl_mode,
                                             kl_coef=0.1)
    rollout.advantages = advantages[:, None] * rollout.response_mask
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    stats = train_grpo.grpo_update(rollout, policy, optimizer, orders=orders, temperature=0.8, clip_range=0.2,
                                   kl_mode=kl_mode, kl_coef=0.1)
    first = stats["minibatch_stats"][0]
    assert first["policy/ratio_mean"] == 1.0 and first["policy/ratio_max"] == 1.0, f"first minibatch: {first}"
    assert first["policy/clipfrac"] == 0.0 and first["policy/approxkl"] == 0.0, f"first minibatch: {first}"
    assert ("loss/kl" in first) == (kl_mode == "loss"), "the k3 term is in the loss only with --kl-mode loss"
    if kl_mode == "loss":
        assert first["loss/kl"] == 0.0, "policy = reference: k3 is 0"
    later = stats["minibatch_stats"][1:]
    assert len(later) == 5 and any(s["policy/approxkl"] > 0 for s in later), "the policy should have moved"
    assert not policy.training, "the update leaves the model in eval() mode"


def test_check_processes_is_one_clear_line():
    cfg = train_grpo.GRPOConfig(batch_size=6, group_size=2, num_minibatches=4)
    train_grpo.check_processes(cfg, 2)   # 3 prompts x 2 = 6 responses per process: fine
    with pytest.raises(UserError, match="divisible by the 4 processes"):
        train_grpo.check_processes(cfg, 4)
    with pytest.raises(UserError, match="responses per process"):
        train_grpo.check_processes(cfg, 6)   # 1 prompt x 2 = 2 responses cannot make 4 minibatches


# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------


def metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def smoke_runs(tiny_world, tmp_path_factory):
    """`python train_grpo.py --preset smoke --advantage {grpo,rloo}`, both at once, in fresh interpreters
    (grpo with the default --kl-mode reward, rloo with --kl-mode loss: each KL path once)."""
    started = {}
    for advantage, kl_mode in (("grpo", "reward"), ("rloo", "loss")):
        out = tmp_path_factory.mktemp(f"{advantage}_smoke")
        for name in ("sft.pt", "rm.pt"):
            shutil.copy(os.path.join(tiny_world["out"], name), out / name)
        command = [sys.executable, "train_grpo.py", "--preset", "smoke", "--advantage", advantage, "--kl-mode", kl_mode,
                   "--data-dir", tiny_world["data"], "--out-dir", str(out), "--device", "cpu"]
        started[advantage] = (out, subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    runs = {}
    for advantage, (out, process) in started.items():
        stdout, stderr = process.communicate(timeout=120)
        runs[advantage] = (out, process.returncode, stdout, stderr)
    return runs


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_smoke_preset_end_to_end(smoke_runs, advantage):
    out, code, stdout, stderr = smoke_runs[advantage]
    assert code == 0, f"train_grpo.py --advantage {advantage} failed:\n{stdout[-2000:]}\n{stderr}"
    kind = advantage
    for name in (f"{kind}.pt", f"{kind}_metrics.jsonl", f"{kind}_curves.png"):
        assert (out / name).exists(), f"{name} was not written"
    other = "rloo" if kind == "grpo" else "grpo"
    assert not (out / f"{other}.pt").exists(), f"--advantage {advantage} must not write {other}.pt"

    ckpt = load_checkpoint(out / f"{kind}.pt", kind=kind)
    assert ckpt["step"] == 3 and ckpt["train_config"]["advantage"] == advantage
    GPT(GPTConfig(**ckpt["model_config"])).load_state_dict(ckpt["model"])  # usable like sft.pt
    assert ckpt["metrics"]["samples_drawn"] == 4 * 2 * 3, "B x k x updates (smoke: 4 prompts x 2 samples x 3)"
    assert ckpt["metrics"]["minutes"] > 0 and "sft/gold" in ckpt["metrics"]

    records = metrics(out / f"{kind}_metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for key in ("eval/gold", "eval/kl", "eval/gold_gain_sd", "eval/rm"):
        assert key in records[0] and key in records[-1], f"held-out {key} at the start and the end"
    for key in ("objective/scores", "objective/kl", "objective/gold", "objective/rm", "objective/entropy",
                "policy/clipfrac", "policy/approxkl", "loss/policy", "group/zero_std_share",
                "group/score_std", "response_length", "eos_rate", "kl_coef", "lr"):
        assert all(key in r for r in records[1:]), f"{key} missing from the update records"
    kl_in_loss = ckpt["train_config"]["kl_mode"] == "loss"
    assert all(("loss/kl" in r) == kl_in_loss for r in records[1:]), "loss/kl: the k3 term, with --kl-mode loss only"
    assert not any(key.startswith("val/") for r in records for key in r), "no critic, no value metrics"
    assert records[1]["objective/kl"] == 0.0, "the first rollout comes from the reference itself: KL 0"


@pytest.fixture(scope="module")
def torchrun_run(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_torchrun")
    for name in ("sft.pt", "rm.pt"):
        shutil.copy(os.path.join(tiny_world["out"], name), out / name)
    result = torchrun("train_grpo.py", 2, "--preset", "smoke", "--data-dir", tiny_world["data"], "--out-dir", str(out),
                      "--device", "cpu")
    return out, result


def test_torchrun_smoke_runs_and_rank_zero_alone_writes(torchrun_run, smoke_runs):
    out, result = torchrun_run
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert result.stdout.splitlines().count("train_grpo") == 1, "the config is printed once (by rank 0)"
    assert result.stdout.count("wrote ") == 1 and "data parallel: 2 processes x 2 prompts x 2 samples" in result.stdout
    for name in ("grpo.pt", "grpo_metrics.jsonl", "grpo_curves.png"):
        assert (out / name).exists(), f"{name} was not written"
    records = metrics(out / "grpo_metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3], "one line per logged step: one writer"
    for record in records:
        for key, value in record.items():
            assert isinstance(value, (int, float)) and math.isfinite(value), f"step {record['step']}: {key} = {value}"
    single = metrics(smoke_runs["grpo"][0] / "grpo_metrics.jsonl")
    assert [list(r) for r in records] == [list(r) for r in single], "the metric names of a single-process run"
    assert load_checkpoint(out / "grpo.pt", kind="grpo")["metrics"]["samples_drawn"] == 4 * 2 * 3, \
        "B is global: 2 prompts per rank x 2 ranks"
