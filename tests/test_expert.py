"""Tests for train_expert.py: expert iteration (best-of-n from the policy, the RM's favourite distilled).

* the selection: the favourite of each prompt is the argmax of `RewardScorer.reward` over its n
  samples that ended (canned samples and rewards, so the right answer is known) - never one
  without EOS, however the RM scores it - and a prompt none of whose samples ended is dropped;
* the script: --preset smoke end to end (outputs, kind, samples drawn, metric names, the first
  evaluation is the SFT policy's own), and torchrun with 2 processes (rank 0 alone writes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from minirlhf.checkpoint import load_checkpoint, load_policy, save_checkpoint
from minirlhf.cli import UserError
from minirlhf.runtime import setup_runtime
from minirlhf.tokenizer import Tokenizer, render_chat
from helpers import assert_smoke_run_wrote, run_in_process
from ranks import ROOT, torchrun
from test_ppo import tiny_world  # noqa: F401 (a fixture)

import train_expert


class CannedScorer:
    """Stands in for a RewardScorer: the reward of a text is the number after its last space (even
    without EOS: the selection itself must skip those)."""

    def reward(self, prompts, texts, ended):
        return torch.tensor([float(t.split()[-1]) for t in texts])


def test_the_favourite_is_the_argmax_of_the_reward_and_one_without_eos_drops_its_prompt(tiny_world, monkeypatch):
    tokenizer = Tokenizer.from_file(os.path.join(tiny_world["data"], "tokenizer.tiktoken"))
    prompts = ["what does a cow eat?", "what is 2 plus 3?", "what color is a frog?"]
    canned = {   # per prompt: 3 samples (text ending in its reward, ended)
        prompts[0]: [("grass 0.5", True), ("hay 2.0", True), ("rocks -3", True)],
        prompts[1]: [("five 9", False), ("5 1.5", True), ("six 0.2", True)],   # the best by RM never ended
        prompts[2]: [("green 0.1", True), ("blue 0.3", True), ("red 0.2", True)],
    }

    def fake_sample(policy, tok, repeated, **kwargs):
        seen = {}
        texts, ended = [], []
        for prompt in repeated:
            text, end = canned[prompt][seen.get(prompt, 0)]
            seen[prompt] = seen.get(prompt, 0) + 1
            texts.append(text)
            ended.append(end)
        return texts, ended, []

    monkeypatch.setattr(train_expert, "sample_responses", fake_sample)
    cfg = SimpleNamespace(n=3, sample_batch_size=6, max_new_tokens=8, temperature=1.0)
    runtime = setup_runtime("cpu", "fp32", 0)
    examples, stats = train_expert.best_of_n_examples(None, tokenizer, CannedScorer(), prompts, cfg, None, runtime)
    # prompt 1: "five 9" has the highest reward but never ended: "5 1.5" is the favourite
    expected = [(prompts[0], "hay 2.0"), (prompts[1], "5 1.5"), (prompts[2], "blue 0.3")]
    assert examples == [(render_chat(tokenizer, p), render_chat(tokenizer, p, t)[len(render_chat(tokenizer, p)):])
                        for p, t in expected]
    assert examples[0][1][-1] == tokenizer.eos_id, "the distilled response ends with EOS: the model learns to stop"
    assert stats["select/kept"] == 1.0
    assert stats["select/reward_chosen"] == pytest.approx((2.0 + 1.5 + 0.3) / 3)
    assert stats["select/reward_mean"] == pytest.approx(((0.5 + 2 - 3) / 3 + (9 + 1.5 + 0.2) / 3 + 0.6 / 3) / 3)

    # a prompt none of whose samples stopped is dropped
    canned[prompts[2]] = [("green 0.1", False), ("blue 0.3", False), ("red 0.2", False)]
    examples, stats = train_expert.best_of_n_examples(None, tokenizer, CannedScorer(), prompts, cfg, None, runtime)
    assert len(examples) == 2 and stats["select/kept"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def smoke_run(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("expert_smoke")
    for name in ("sft.pt", "rm.pt"):
        shutil.copy(os.path.join(tiny_world["out"], name), out / name)
    command = [sys.executable, "train_expert.py", "--preset", "smoke", "--data-dir", tiny_world["data"],
               "--out-dir", str(out), "--device", "cpu"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=120)
    return out, result


def metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_smoke_preset_end_to_end(smoke_run):
    out, result = smoke_run
    assert_smoke_run_wrote(result, "train_expert.py", out, ("expert.pt", "expert_metrics.jsonl", "expert_curves.png"))
    policy, ckpt = load_policy(out / "expert.pt", kinds=("expert",))
    assert ckpt["kind"] == "expert"
    summary = ckpt["metrics"]
    assert summary["samples_drawn"] == 16 * 4, "rounds x prompts per round x n (smoke: 1 x 16 x 4)"
    for key in ("minutes", "eval/gold", "eval/kl", "eval/gold_gain_sd", "sft/gold", "loss/train"):
        assert key in summary, f"summary metric {key!r} missing from expert.pt"
    records = metrics(out / "expert_metrics.jsonl")
    assert records[0]["step"] == 0 and records[0]["eval/gold_gain_sd"] == 0.0 and abs(records[0]["eval/kl"]) < 1e-4, \
        "step 0 is the SFT policy itself"
    assert [r["step"] for r in records] == list(range(ckpt["step"] + 1))
    assert {"select/reward_chosen", "select/reward_mean"} <= set(records[1]) and 0 < records[1]["select/kept"] <= 1
    assert "eval/gold" in records[-1], "the held-out evaluation after the last round"


def test_torchrun_two_processes_write_once(tiny_world, smoke_run, tmp_path):
    for name in ("sft.pt", "rm.pt"):
        shutil.copy(os.path.join(tiny_world["out"], name), tmp_path / name)
    result = torchrun("train_expert.py", 2, "--preset", "smoke", "--data-dir", tiny_world["data"],
                      "--out-dir", str(tmp_path), "--device", "cpu")
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert result.stdout.splitlines().count("train_expert") == 1 and result.stdout.count("wrote ") == 1
    records = metrics(tmp_path / "expert_metrics.jsonl")
    single = metrics(smoke_run[0] / "expert_metrics.jsonl")
    assert [list(r) for r in records] == [list(r) for r in single], "one writer, the metric names of one process"
    for record in records:
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in record.values()), record
    assert load_checkpoint(tmp_path / "expert.pt", kind="expert")["metrics"]["samples_drawn"] == 64


@pytest.mark.parametrize("flags, expected", [
    (["--lr", "0"], "argument --lr: must be > 0.0, got 0.0"),
    (["--lr", "1e-6"], "--min-lr 5e-06 is above --lr 1e-06: the schedule would decay upwards"),
])
def test_learning_rates_that_would_not_train(flags, expected, tmp_path, monkeypatch, capsys):
    code, _, err = run_in_process("train_expert", ["--out-dir", str(tmp_path), *flags], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "error:" in lines[0] and expected in lines[0], err
    assert os.listdir(tmp_path) == [], "a bad flag must stop the run before anything is written"


def test_resume_refuses_a_finished_run_and_evaluate_refuses_an_unfinished_one(tiny_world, smoke_run, tmp_path,
                                                                              monkeypatch, capsys):
    """--resume continues an interval save (tests/test_resume.py: a real Ctrl-C); a finished expert.pt
    holds none of what it needs. An interval save (`finished: False`) is refused by every reader but
    --resume, with the command that finishes it."""
    for name in ("sft.pt", "rm.pt"):
        shutil.copy(os.path.join(tiny_world["out"], name), tmp_path / name)
    shutil.copy(smoke_run[0] / "expert.pt", tmp_path / "expert.pt")
    code, _, err = run_in_process("train_expert", ["--preset", "smoke", "--data-dir", tiny_world["data"], "--out-dir",
                                                   str(tmp_path), "--device", "cpu", "--resume"], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "expert.pt holds no optimizer" in lines[0], err
    assert "cannot resume from it" in lines[0], err

    finished = torch.load(tmp_path / "expert.pt", weights_only=True)
    save_checkpoint(tmp_path / "expert.pt", kind="expert", model_state=finished["model"],
                    model_config=finished["model_config"], tokenizer_identity=finished["tokenizer"], train_config={},
                    step=1, metrics={}, finished=False, optimizer={}, examples=[], rng_state=None)
    with pytest.raises(UserError, match=r"expert.pt is an unfinished run, saved at step 1: .*train_expert.py --resume"):
        load_policy(tmp_path / "expert.pt")   # what evaluate.py and chat.py load it with
