"""Tests for DPO: the loss (minirlhf/losses.py `dpo_loss`) and its script (train_dpo.py).

The loss, graded like tests/test_losses.py (``pytest tests/test_dpo.py -k dpo_loss``): policy =
reference gives log 2; only the log-ratios to the reference matter; IPO's minimum sits at
h = 1/(2 beta) and cDPO's at beta h = log((1 - eps) / eps) (value and zero gradient there); the
gradient raises the chosen response and lowers the rejected one; a plain Python loop for each loss
type on random inputs; the logged implicit rewards worked by hand on two rows; clear errors.

The script, on a smoke world built in seconds (an untrained 2-layer "SFT" checkpoint and a
hand-written comparisons file): --preset smoke end to end in a fresh interpreter, the reference
log-probabilities computed once as constants that never change, a bad comparisons file as one
`error:` line, and a 2-process torchrun run that writes once and trains as one process does.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from minirlhf import world
from minirlhf.checkpoint import load_checkpoint, load_policy, save_checkpoint
from minirlhf.cli import UserError
from minirlhf.labeling import read_ranked_comparisons
from minirlhf.losses import dpo_loss
from minirlhf.metrics import read_metrics
from minirlhf.model import GPT, GPTConfig
from minirlhf.runtime import Runtime
from helpers import assert_smoke_run_wrote, run_in_process, toy_world
from ranks import torchrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LN2, LN3 = math.log(2.0), math.log(3.0)
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")   # (tests/conftest.py)


def t64(values, grad=False):
    return torch.tensor(values, dtype=F64, requires_grad=grad)


def assert_close(actual, expected, name, tol=1e-10):
    actual = actual.detach().to(F64) if torch.is_tensor(actual) else torch.as_tensor(actual, dtype=F64)
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=F64), atol=tol, rtol=tol,
                               msg=lambda m: f"{name}: {m}")


def py_log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def py_dpo_loss(pc, pr, rc, rr, beta, loss_type, eps=0.0):
    """Plain reference, one pair at a time, floats and the math module only."""
    losses = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        h = (a - c) - (b - d)
        if loss_type == "sigmoid":
            losses.append(-(1 - eps) * py_log_sigmoid(beta * h) - eps * py_log_sigmoid(-beta * h))
        else:
            losses.append((h - 1 / (2 * beta)) ** 2)
    return sum(losses) / len(losses)


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def test_dpo_loss_policy_equal_to_reference_is_log2():
    # h = 0 for every pair: -log sigmoid(0) = log 2, whatever the log-probabilities themselves are
    logps_c, logps_r = t64([-3.0, -10.0, -0.5]), t64([-7.0, -1.0, -0.5])
    loss, stats = dpo_loss(logps_c, logps_r, logps_c.clone(), logps_r.clone(), beta=0.1)
    assert loss.dim() == 0, f"dpo_loss must return a 0-d loss, got shape {tuple(loss.shape)}"
    assert_close(loss, LN2, "dpo_loss with policy = reference")
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert stats[name] == 0.0, f"{name}: policy = reference has implicit reward 0, got {stats[name]}"
    assert stats["rewards/accuracies"] == 0.0, "a tie (0 > 0 is false) is not counted as ordered right"


def test_dpo_loss_depends_only_on_log_ratios_to_the_reference():
    generator = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-5 * torch.rand(6, generator=generator, dtype=F64) for _ in range(4))
    for loss_type in ("sigmoid", "ipo"):
        loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type)
        # the same constant on a response's policy and reference log-probabilities: same log-ratio
        shifted, shifted_stats = dpo_loss(pc - 7.0, pr + 2.0, rc - 7.0, rr + 2.0, beta=0.3, loss_type=loss_type)
        assert_close(shifted, loss.item(), f"{loss_type}: shifting pc and rc (or pr and rr) together", tol=1e-9)
        for name, value in stats.items():
            assert math.isclose(shifted_stats[name], value, abs_tol=1e-9), f"{loss_type}: {name} changed"


def test_dpo_loss_ipo_minimum_at_half_over_beta():
    # beta = 0.25: IPO's target margin is h = 1 / (2 * 0.25) = 2
    pc = t64([-3.0], grad=True)
    loss, _ = dpo_loss(pc, t64([-4.0]), t64([-5.0]), t64([-4.0]), beta=0.25, loss_type="ipo")   # h = 2 - 0
    loss.backward()
    assert_close(loss, 0.0, "ipo loss at h = 1/(2 beta)")
    assert_close(pc.grad, [0.0], "ipo gradient at its minimum")
    # h = 0: (0 - 2)^2 = 4, and d/d pc = 2 (h - 2) = -4: raise the chosen response
    pc = t64([-5.0], grad=True)
    loss, _ = dpo_loss(pc, t64([-4.0]), t64([-5.0]), t64([-4.0]), beta=0.25, loss_type="ipo")
    loss.backward()
    assert_close(loss, 4.0, "ipo loss at h = 0")
    assert_close(pc.grad, [-4.0], "d ipo / d pc at h = 0")


def test_dpo_loss_cdpo_label_smoothing_hand_worked():
    # beta = 1, eps = 1/4, h = ln 3: sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4
    # loss = -(3/4) log(3/4) - (1/4) log(1/4) = (3/4) ln(4/3) + (1/4) ln 4 ~ 0.5623
    # its gradient in z = beta h is sigmoid(z) - (1 - eps) = 3/4 - 3/4 = 0: cDPO stops pushing at
    # z = log((1 - eps) / eps) = ln 3, where plain DPO would keep going
    pc = t64([LN3 - 1.0], grad=True)
    loss, _ = dpo_loss(pc, t64([-2.0]), t64([-1.0]), t64([-2.0]), beta=1.0, label_smoothing=0.25)
    loss.backward()
    assert not math.isclose(loss.item(), math.log(4 / 3), rel_tol=1e-6), "label_smoothing was ignored"
    assert_close(loss, 0.75 * math.log(4 / 3) + 0.25 * math.log(4), "cDPO loss")
    assert_close(pc.grad, [0.0], "cDPO gradient at beta h = log((1 - eps) / eps)")


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected():
    # d/d pc of -log sigmoid(beta h) / B = -beta * sigmoid(-beta h) / B; beta = 1/2, B = 2
    # h = 0: -1/2 * 1/2 / 2 = -1/8;  beta h = ln 3: -1/2 * 1/4 / 2 = -1/16 (a pair already ordered pushes less)
    pc, pr = t64([-2.0, -1.0], grad=True), t64([-2.0, -1.0 - 2 * LN3], grad=True)
    rc, rr = t64([-2.0, -1.0], grad=True), t64([-2.0, -1.0], grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    loss.backward()
    assert_close(pc.grad, [-1 / 8, -1 / 16], "d dpo_loss / d policy_chosen_logps")
    assert_close(pr.grad, [1 / 8, 1 / 16], "d dpo_loss / d policy_rejected_logps")
    with torch.no_grad():
        higher, _ = dpo_loss(pc + 0.1, pr, rc, rr, beta=0.5)
    assert higher < loss, "raising the chosen response's log-probability must lower the loss"
    generator = torch.Generator().manual_seed(1)
    inputs = tuple(torch.randn(4, generator=generator, dtype=F64, requires_grad=True) for _ in range(4))
    for loss_type, eps in (("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)):
        assert torch.autograd.gradcheck(lambda *x: dpo_loss(*x, beta=0.7, loss_type=loss_type,
                                                            label_smoothing=eps)[0], inputs)


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_loss_matches_python_loop(loss_type, eps):
    generator = torch.Generator().manual_seed(2)
    pc, pr, rc, rr = (-20 * torch.rand(11, generator=generator, dtype=F64) for _ in range(4))
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type, label_smoothing=eps)
    expected = py_dpo_loss(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), 0.2, loss_type, eps)
    assert_close(loss, expected, f"dpo_loss({loss_type}, eps {eps}) vs a Python loop")


def test_dpo_loss_stats_hand_worked():
    # beta = 1/2. Row 0: log-ratios chosen +3, rejected -1 -> rewards 1.5, -0.5 (ordered right)
    #             Row 1: log-ratios chosen  0, rejected +2 -> rewards 0.0,  1.0 (ordered wrong)
    # means: chosen 0.75, rejected 0.25, margins (2 + -1) / 2 = 0.5, accuracies 1/2
    # loss: beta h = [2, -1]: (log(1 + e^-2) + log(1 + e)) / 2
    pc, rc = t64([-1.0, -4.0]), t64([-4.0, -4.0])
    pr, rr = t64([-3.0, -1.0]), t64([-2.0, -3.0])
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert set(stats) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert all(isinstance(v, float) for v in stats.values()), "stats are Python floats (for the logs)"
    assert stats["rewards/chosen"] != 1.5, "rewards/chosen is beta * log-ratio, averaged: beta was left out"
    expected = {"rewards/chosen": 0.75, "rewards/rejected": 0.25, "rewards/margins": 0.5, "rewards/accuracies": 0.5}
    for name, value in expected.items():
        assert math.isclose(stats[name], value, abs_tol=1e-12), f"{name}: expected {value}, got {stats[name]}"
    assert_close(loss, (math.log1p(math.exp(-2)) + math.log1p(math.e)) / 2, "dpo_loss on the two rows")


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="hinge"), "loss_type must be one of"),
    (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(label_smoothing=-0.1), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(loss_type="ipo", label_smoothing=0.1), "applies to loss_type 'sigmoid'"),
    (dict(beta=0.0), "beta must be > 0"),
])
def test_dpo_loss_bad_arguments_are_clear_errors(kwargs, message):
    x = t64([-1.0])
    with pytest.raises(ValueError, match=message):
        dpo_loss(x, x, x, x, **{"beta": 0.1, **kwargs})


# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------


def write_comparisons(path, tasks):
    """Hand-written preferences in both shapes: K = 3 rankings (one response marked as not ended)
    and a few chosen/rejected pairs; 3 pairs per ranking."""
    rng = random.Random(0)
    records = []
    for number, task in enumerate(tasks):
        if number % 4 == 3:
            records.append({"prompt": task.prompt, "chosen": world.good_response(task, rng),
                            "rejected": world.rude_response(task, rng)})
            continue
        responses = [world.wrong_response(task, rng), world.good_response(task, rng), world.rude_response(task, rng)]
        record = {"prompt": task.prompt, "responses": responses, "ranking": [1, 0, 2]}
        if number % 4 == 1:
            record["ended"] = [True, True, False]
        records.append(record)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


@pytest.fixture(scope="module")
def dpo_world(tmp_path_factory):
    """A data dir (tokenizer, held-out prompts) and an out dir with an untrained smoke-size sft.pt
    and 12 comparisons (9 rankings of 3 and 3 chosen/rejected: 30 pairs): seconds to build."""
    splits = world.split_prompts(0)
    rng = random.Random(0)
    text = " ".join(t.prompt + " " + world.good_response(t, rng) for t in splits.sft[:200])
    data_dir, out_dir, tokenizer = toy_world(tmp_path_factory, "dpo_world", text)
    with open(data_dir / "eval_prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": t.prompt}) + "\n" for t in splits.eval)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    save_checkpoint(out_dir / "sft.pt", kind="sft", model_state=GPT(config).state_dict(), model_config=config,
                    tokenizer_identity=tokenizer.identity, train_config={}, step=0, metrics={})
    write_comparisons(out_dir / "rm_comparisons.jsonl", splits.rm[:12])
    return {"data": str(data_dir), "out": str(out_dir), "tokenizer": tokenizer}


def smoke_args(world_dirs, out_dir):
    # --batch-size 5: 30 pairs -> shares of 3 and 2 under 2 processes, so the weighting matters
    return ["--preset", "smoke", "--data-dir", world_dirs["data"], "--out-dir", str(out_dir), "--device", "cpu",
            "--init", os.path.join(world_dirs["out"], "sft.pt"),
            "--comparisons", os.path.join(world_dirs["out"], "rm_comparisons.jsonl"), "--batch-size", "5"]


@pytest.fixture(scope="module")
def smoke_run(dpo_world, tmp_path_factory):
    """`python train_dpo.py --preset smoke` in a fresh interpreter, as a user runs it."""
    out = tmp_path_factory.mktemp("dpo_smoke")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "train_dpo.py", *smoke_args(dpo_world, out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    return out, result


def run_dpo(monkeypatch, capsys, *args):
    """Run train_dpo the way the command line does (run_main), without a new interpreter."""
    return run_in_process("train_dpo", list(args), monkeypatch, capsys)


def test_train_dpo_smoke_preset_end_to_end(smoke_run):
    out, result = smoke_run
    assert_smoke_run_wrote(result, "train_dpo.py", out, ("dpo.pt", "dpo_metrics.jsonl", "dpo_curves.png"))
    policy, ckpt = load_policy(out / "dpo.pt", kinds=("dpo",))
    assert ckpt["kind"] == "dpo" and isinstance(policy, GPT) and ckpt["step"] == 4
    metrics = ckpt["metrics"]
    assert metrics["samples_drawn"] == 0, "DPO draws no samples while training"
    assert metrics["comparisons"] == 12 and metrics["pairs"] == 30, metrics
    for key in ("minutes", "eval/gold", "eval/kl", "eval/gold_gain_sd", "sft/gold", "loss/train", "rewards/margins"):
        assert key in metrics, f"summary metric {key!r} missing from dpo.pt"

    records = read_metrics(str(out / "dpo_metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4], "one record per step, plus the evaluation at 0"
    for key in ("loss/train", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "lr",
                "grad_norm"):
        assert key in records[1], f"metric {key!r} missing from the per-step records"
    # step 1's policy is the reference: h = 0 for every pair (up to the padding of the batches)
    assert abs(records[1]["loss/train"] - LN2) < 1e-5, f"the first step's loss is log 2, got {records[1]['loss/train']}"
    assert records[1]["rewards/accuracies"] == 0.0 or abs(records[1]["rewards/margins"]) < 1e-5
    for key in ("eval/gold", "eval/kl", "eval/gold_gain_sd"):
        assert key in records[0] and key in records[2] and key in records[4], f"{key!r} missing from the evaluations"
    assert records[0]["eval/gold_gain_sd"] == 0.0 and abs(records[0]["eval/kl"]) < 1e-4, "step 0 is the SFT policy"


def test_train_dpo_reference_logprobs_are_computed_once_and_never_change(dpo_world, tmp_path, monkeypatch, capsys):
    import train_dpo

    calls = []
    original = train_dpo.reference_logprobs

    def recording(*args, **kwargs):
        values = original(*args, **kwargs)
        calls.append((values, values.clone(), args[1]))   # the tensor the loop uses, a copy, the rows
        return values

    monkeypatch.setattr(train_dpo, "reference_logprobs", recording)
    code, _, err = run_dpo(monkeypatch, capsys, *smoke_args(dpo_world, tmp_path))
    assert code == 0, err
    assert len(calls) == 1, f"the reference log-probabilities must be computed once, before training ({len(calls)} calls)"
    values, copy, rows = calls[0]
    assert not values.requires_grad and values.grad_fn is None, "the reference log-probabilities carry no gradient"
    assert torch.equal(values, copy), "the reference log-probabilities changed during training"
    # they are sft.pt's, recomputed now: the reference is the starting checkpoint, frozen
    sft, _ = load_policy(os.path.join(dpo_world["out"], "sft.pt"))
    runtime = Runtime(torch.device("cpu"))
    assert torch.equal(original(sft, rows, dpo_world["tokenizer"].pad_id, 10, runtime), values)
    # ... and not the trained policy's (training moved it)
    trained, _ = load_policy(tmp_path / "dpo.pt")
    moved = original(trained, rows, dpo_world["tokenizer"].pad_id, 10, runtime)
    assert (moved - values).abs().max() > 1e-4, "the policy did not move away from the reference"


@pytest.mark.parametrize("case", ["bad_json", "missing_field", "no_file", "smoothing_flag"])
def test_train_dpo_bad_comparisons_are_one_error_line(case, dpo_world, tmp_path, monkeypatch, capsys):
    args = smoke_args(dpo_world, tmp_path)
    bad = tmp_path / "prefs.jsonl"
    if case == "bad_json":
        bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
        expected = "prefs.jsonl:2: not valid JSON"
    elif case == "missing_field":
        bad.write_text('{"prompt": "hi", "chosen": "a"}\n')
        expected = "prefs.jsonl:1: expected fields 'chosen' and 'rejected'"
    elif case == "no_file":
        args = [a for a in args if a != os.path.join(dpo_world["out"], "rm_comparisons.jsonl")]
        args.remove("--comparisons")   # the default, OUT_DIR/rm_comparisons.jsonl, is not there
        expected = "rm_comparisons.jsonl not found: run train_rm.py first"
    else:
        args += ["--label-smoothing", "0.5"]
        expected = "--label-smoothing must be < 0.5"
    if case in ("bad_json", "missing_field"):
        args += ["--comparisons", str(bad)]   # the last one given wins
    code, _, err = run_dpo(monkeypatch, capsys, *args)
    assert code == 2, f"{case}: exit code {code}, expected 2; stderr: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and expected in lines[0], f"{case}: {err!r}"
    assert not (tmp_path / "dpo.pt").exists(), "a failed run must not write dpo.pt"


@pytest.mark.parametrize("flags, expected", [
    (["--lr", "0"], "argument --lr: must be > 0.0, got 0.0"),
    (["--lr", "1e-6"], "--min-lr 5e-06 is above --lr 1e-06: the schedule would decay upwards"),
])
def test_train_dpo_learning_rates_that_would_not_train(flags, expected, dpo_world, tmp_path, monkeypatch, capsys):
    code, _, err = run_dpo(monkeypatch, capsys, *smoke_args(dpo_world, tmp_path), *flags)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "error:" in lines[0] and expected in lines[0], err
    assert os.listdir(tmp_path) == [], "a bad flag must stop the run before anything is written"


def test_train_dpo_resume_refuses_a_finished_run_and_evaluate_refuses_an_unfinished_one(dpo_world, smoke_run,
                                                                                        tmp_path, monkeypatch, capsys):
    """--resume continues an interval save (tests/test_resume.py: a real Ctrl-C); a finished dpo.pt has
    nothing left to do. An interval save (`finished: False`) is refused by every reader but --resume,
    with the command that finishes it."""
    finished = torch.load(smoke_run[0] / "dpo.pt", weights_only=True)
    shutil.copy(smoke_run[0] / "dpo.pt", tmp_path / "dpo.pt")
    code, _, err = run_dpo(monkeypatch, capsys, *smoke_args(dpo_world, tmp_path), "--resume")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "dpo.pt is already at step 4 of 4: that run finished" in lines[0], err

    save_checkpoint(tmp_path / "dpo.pt", kind="dpo", model_state=finished["model"],
                    model_config=finished["model_config"], tokenizer_identity=finished["tokenizer"], train_config={},
                    step=2, metrics={}, finished=False, optimizer={})
    with pytest.raises(UserError, match=r"dpo.pt is an unfinished run, saved at step 2: .*python train_dpo.py --resume"):
        load_policy(tmp_path / "dpo.pt")   # what evaluate.py and chat.py load it with


def test_train_dpo_torchrun_two_processes_write_once_and_train_as_one(dpo_world, smoke_run, tmp_path):
    one_out, one = smoke_run
    assert one.returncode == 0, "the one-process smoke run failed (see test_train_dpo_smoke_preset_end_to_end)"
    child = torchrun("train_dpo.py", 2, *smoke_args(dpo_world, tmp_path), timeout=180)
    assert child.returncode == 0, f"torchrun failed:\n{child.stdout[-2000:]}\n{child.stderr[-3000:]}"
    assert child.stdout.count("train_dpo\n") == 1, "the config should be printed once (rank 0 alone prints)"
    two_records = read_metrics(str(tmp_path / "dpo_metrics.jsonl"))
    assert [r["step"] for r in two_records] == [0, 1, 2, 3, 4], "one metrics line per step, not one per rank"
    assert load_checkpoint(tmp_path / "dpo.pt", kind="dpo")["step"] == 4
    # the global batch's loss and implicit rewards, from shares of 3 and 2 pairs: one process's numbers.
    # (fp32 rounding of differently padded batches and an all-reduce: ~1e-7; a share weighted
    # wrongly is off by ~1e-2.) The held-out samples differ: each rank draws its share with its own dice.
    for one_record, two_record in zip(read_metrics(str(one_out / "dpo_metrics.jsonl"))[1:], two_records[1:]):
        # (accuracy counts strict wins: at step 1, policy = reference, every margin is 0 up to that
        # rounding, so it is compared from step 2 on, where the margins are ~1e-2)
        keys = ("loss/train", "rewards/margins", "rewards/chosen") + (("rewards/accuracies",) if one_record["step"] > 1 else ())
        for key in keys:
            assert abs(one_record[key] - two_record[key]) < 1e-5, (key, one_record[key], two_record[key])
    assert len(read_ranked_comparisons(os.path.join(dpo_world["out"], "rm_comparisons.jsonl"))) == 12


def test_encode_pairs_leaves_out_tied_pairs(dpo_world, capsys):
    import train_dpo
    from minirlhf.labeling import RankedComparison

    tokenizer = dpo_world["tokenizer"]
    tied = RankedComparison("what does a cow eat?", ["grass.", "hay.", "no."], [1, 0, 2], tiers=[0, 0, 1])
    strict = RankedComparison("what does a cow eat?", ["grass.", "hay.", "no."], [1, 0, 2])
    rows, pairs = train_dpo.encode_pairs(tokenizer, [tied, strict], 128, "test")
    # tied: hay = grass (no pair), both beat "no."; strict: hay > grass > no. (3 pairs); rows 0-2, then 3-5
    assert pairs == [(1, 2), (0, 2), (4, 3), (4, 5), (3, 5)], pairs
    assert "1 tied pairs skipped" in capsys.readouterr().out
