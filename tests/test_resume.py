"""`--resume` gives the run that was never interrupted, for every training stage.

Each stage runs three times at `--preset smoke` (shortened where noted) on a tiny world built in
seconds (untrained smoke-size input checkpoints, so no stage depends on another's training):

1. uninterrupted, in this process (`run_main`, what the command line does);
2. interrupted for real: a subprocess gets SIGINT (Ctrl-C) as soon as its first interval checkpoint
   is on disk. It must exit 130 with one line, leaving a checkpoint of an unfinished step and a
   metrics file at that step or ahead of it, never behind;
3. `--resume`, in this process.

The resumed run's metrics file must equal the uninterrupted one line for line (wall-clock timings
aside), with no step logged twice, and its final weights must be equal. One thread everywhere
(OMP_NUM_THREADS=1 in the subprocess, torch.set_num_threads(1) here): the same sums in the same
order, so equal means bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from minirlhf import world
from minirlhf.checkpoint import load_checkpoint, save_checkpoint
from minirlhf.model import GPT, MODEL_PRESETS, GPTConfig, RewardModel
from minirlhf.tokenizer import chat_text
from helpers import run_in_process, toy_world
from test_dpo import write_comparisons

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TIMING_KEYS = ("tokens_per_s",)   # and every "time/..." key: wall-clock, different in every run


pytestmark = pytest.mark.usefixtures("one_thread")   # (tests/conftest.py)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A data dir (tokenizer, corpus, demonstrations, prompt files) and an out dir holding untrained
    smoke-size base.pt, sft.pt and rm.pt: what every stage reads, in a few seconds."""
    splits = world.split_prompts(0)
    rng = random.Random(0)
    demos = [(t.prompt, world.good_response(t, rng)) for t in splits.sft[:120]]
    corpus = "\n".join(chat_text(prompt, response) for prompt, response in demos * 6)
    data_dir, out_dir, tokenizer = toy_world(tmp_path_factory, "resume_world", corpus)
    (data_dir / "corpus.txt").write_text(corpus, encoding="utf-8")
    with open(data_dir / "sft.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in demos)
    for name, tasks in (("rm", splits.rm), ("ppo", splits.ppo), ("eval", splits.eval)):
        with open(data_dir / f"{name}_prompts.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": t.prompt}) + "\n" for t in tasks)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, **MODEL_PRESETS["smoke"])
    torch.manual_seed(0)
    common = dict(model_config=config, tokenizer_identity=tokenizer.identity, train_config={}, step=0, metrics={})
    save_checkpoint(out_dir / "base.pt", kind="base", model_state=GPT(config).state_dict(), **common)
    save_checkpoint(out_dir / "sft.pt", kind="sft", model_state=GPT(config).state_dict(), **common)
    save_checkpoint(out_dir / "rm.pt", kind="rm", model_state=RewardModel(config).state_dict(), reward_bias=0.1,
                    reward_gain=2.0, **common)
    return {"data": str(data_dir), "out": str(out_dir), "tokenizer": tokenizer}


def interrupt_after_first_save(script: str, args: list[str], checkpoint: str, log_dir) -> subprocess.CompletedProcess:
    """Run `python SCRIPT ARGS` and press Ctrl-C (SIGINT) as soon as `checkpoint` appears. The output
    goes to files, not pipes: a pipe nobody reads could fill up and stall the run."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO)
    with open(log_dir / "stdout", "w") as out, open(log_dir / "stderr", "w") as err:
        # SIGINT back to its default in the child: a shell starts background jobs (`pytest ... &`,
        # some CI runners) with SIGINT ignored, and a Python started so never raises KeyboardInterrupt
        process = subprocess.Popen([sys.executable, script, *args], cwd=REPO, env=env, stdout=out, stderr=err,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while not os.path.exists(checkpoint) and process.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, (log_dir / "stdout").read_text(),
                                       (log_dir / "stderr").read_text())


def metrics_without_timings(path) -> list[dict]:
    with open(path) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k not in TIMING_KEYS} for r in records]


def check_resume_reproduces(stage: str, script: str, args: list[str], inputs: list[str], tiny_world, tmp_path,
                            monkeypatch, capsys, total: int | None = None) -> None:
    """The three runs of the module docstring, and every check on them (`total`: the steps of the
    run, when known beforehand)."""
    module = script.removesuffix(".py")
    whole, broken = tmp_path / "uninterrupted", tmp_path / "interrupted"
    for out in (whole, broken):
        out.mkdir()
        for name in inputs:
            shutil.copy(os.path.join(tiny_world["out"], name), out / name)
    common = [*args, "--data-dir", tiny_world["data"], "--device", "cpu"]
    checkpoint, metrics = f"{stage}.pt", f"{stage}_metrics.jsonl"

    code, _, stderr = run_in_process(module, [*common, "--out-dir", str(whole)], monkeypatch, capsys)
    assert code == 0, f"{script} (uninterrupted) failed: {stderr}"
    total = total or load_checkpoint(whole / checkpoint)["step"]

    result = interrupt_after_first_save(script, [*common, "--out-dir", str(broken)], str(broken / checkpoint),
                                        tmp_path)
    assert result.returncode == 130, (f"{script} should stop on Ctrl-C with exit 130 (it finished before the "
                                      f"interrupt, or failed):\n{result.stdout[-1500:]}\n{result.stderr}")
    assert result.stderr.strip() == "interrupted" and "Traceback" not in result.stderr, result.stderr
    saved_at = load_checkpoint(broken / checkpoint, kind=stage, unfinished_ok=True)["step"]
    assert 0 < saved_at < total, f"{checkpoint} at step {saved_at}: not an interval save of the run of {total}"
    logged = [r["step"] for r in metrics_without_timings(broken / metrics)]
    assert logged and logged[-1] >= saved_at, (
        f"the metrics file ends at step {logged[-1] if logged else None}, behind {checkpoint} at {saved_at}")
    assert not [n for n in os.listdir(broken) if n.endswith(".tmp")], "a temporary file was left behind"

    code, stdout, stderr = run_in_process(module, [*common, "--out-dir", str(broken), "--resume"], monkeypatch, capsys)
    assert code == 0, f"{script} --resume failed: {stderr}"
    assert f"resumed from {broken / checkpoint}" in stdout, stdout[-2000:]

    expected, got = metrics_without_timings(whole / metrics), metrics_without_timings(broken / metrics)
    steps = [r["step"] for r in got]
    assert steps == sorted(set(steps)), f"a step is logged twice, or out of order, after --resume: {steps}"
    assert steps == [r["step"] for r in expected], f"steps {steps}, the uninterrupted run logged {expected}"
    for want, have in zip(expected, got):
        assert have == want, (f"step {want['step']} differs after resuming from step {saved_at}: "
                              f"{ {k: (want.get(k), have.get(k)) for k in want if want.get(k) != have.get(k)} }")
    first, second = load_checkpoint(whole / checkpoint), load_checkpoint(broken / checkpoint)
    assert second["step"] == first["step"] == total
    for name, tensor in first["model"].items():
        assert torch.equal(tensor, second["model"][name]), f"{checkpoint}: weight {name} differs after --resume"
    for name in ("reward_bias", "reward_gain"):   # (the RM's normalisation)
        assert second.get(name) == first.get(name), f"{checkpoint}: {name} differs after --resume"
    for name, value in first["metrics"].items():
        if not name.startswith(("minutes", "time/")) and name not in TIMING_KEYS:
            assert second["metrics"][name] == value, f"{checkpoint} summary {name}: {second['metrics'][name]} != {value}"


def test_resume_base(tiny_world, tmp_path, monkeypatch, capsys):
    check_resume_reproduces("base", "train_base.py", ["--preset", "smoke", "--save-every", "3"], [], tiny_world,
                            tmp_path, monkeypatch, capsys, total=30)


def test_resume_sft(tiny_world, tmp_path, monkeypatch, capsys):
    # 108 demonstrations in training (12 held out), batches of 8: 14 steps an epoch, 2 epochs
    check_resume_reproduces("sft", "train_sft.py", ["--preset", "smoke", "--epochs", "2", "--save-every", "3"],
                            ["base.pt"], tiny_world, tmp_path, monkeypatch, capsys, total=28)


def test_resume_ppo(tiny_world, tmp_path, monkeypatch, capsys):
    """The remaining prompts of a pass over the prompt file are part of the saved state: before they
    were, the run diverged at the first update after the checkpoint."""
    check_resume_reproduces("ppo", "train_ppo.py", ["--preset", "smoke", "--total-updates", "6", "--save-every", "1"],
                            ["sft.pt", "rm.pt"], tiny_world, tmp_path, monkeypatch, capsys, total=6)


def test_resume_rm(tiny_world, tmp_path, monkeypatch, capsys):
    """The resumed run samples nothing again: it reads rm_comparisons.jsonl, written beside the interval
    checkpoint, and takes the held-out split and the samples for the normalisation from rm.pt."""
    check_resume_reproduces("rm", "train_rm.py", ["--preset", "smoke", "--num-comparisons", "64", "--save-every", "2"],
                            ["sft.pt"], tiny_world, tmp_path, monkeypatch, capsys)
    whole, broken = tmp_path / "uninterrupted", tmp_path / "interrupted"
    assert (broken / "rm_comparisons.jsonl").read_text() == (whole / "rm_comparisons.jsonl").read_text()


@pytest.fixture(scope="module")
def preference_file(tmp_path_factory):
    """Rankings of 24 of the world's prompts, written by hand (tests/test_dpo.py's `write_comparisons`):
    60 preference pairs, DPO's input."""
    path = tmp_path_factory.mktemp("resume_preferences") / "rm_comparisons.jsonl"
    write_comparisons(path, world.split_prompts(0).rm[:24])
    return str(path)


def test_resume_dpo(tiny_world, preference_file, tmp_path, monkeypatch, capsys):
    """dpo.pt holds the weights and the optimizer only: the resumed run replays the pair order from the
    seed and computes the reference log-probabilities again. 60 pairs in batches of 8: 8 steps an
    epoch, 2 epochs, so the resumed run crosses an epoch boundary (a new shuffle)."""
    check_resume_reproduces("dpo", "train_dpo.py", ["--preset", "smoke", "--comparisons", preference_file,
                                                    "--epochs", "2", "--max-steps", "none", "--save-every", "3"],
                            ["sft.pt"], tiny_world, tmp_path, monkeypatch, capsys, total=16)


@pytest.mark.parametrize("save_every", [2, 3], ids=["within_a_round", "at_a_rounds_end"])
def test_resume_expert(save_every, tiny_world, tmp_path, monkeypatch, capsys):
    """expert.pt holds the round, its steps done, its chosen responses (the resumed run does not sample
    them again), its optimizer and the dice. Two rounds (8, then 9 responses kept here: 3 and 6
    steps): the first save falls inside round 1 (--save-every 2) or at its end (3), and the resumed
    run samples round 2 with the dice it had."""
    check_resume_reproduces("expert", "train_expert.py", ["--preset", "smoke", "--rounds", "2", "--epochs", "3",
                                                          "--max-new-tokens", "48", "--save-every", str(save_every)],
                            ["sft.pt", "rm.pt"], tiny_world, tmp_path, monkeypatch, capsys)
