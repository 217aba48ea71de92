"""`train_grpo.py --resume` gives the run that was never interrupted (GRPO, Dr. GRPO and RLOO: one loop).

The check is tests/test_resume.py's (`check_resume_reproduces`), on its tiny world: the run
uninterrupted; the same run stopped by a real Ctrl-C (SIGINT) as soon as its first interval save is
on disk; then `--resume`. Metrics line for line (wall-clock timings aside) and final weights bit for
bit. What must carry over is `ppo.save_run`'s state, shared with train_ppo.py: the optimizer, the
shared dice (prompt order, minibatches) and each rank's sampling dice, the prompts of this pass not
drawn yet, beta, the gold normaliser and the SFT baseline of the held-out evaluation.

The baseline is checked in the second test: the untrained smoke model grades alike at every
evaluation, so a resumed run that measured its own would pass the first. There, in short runs of
--advantage rloo: `--lr 0`, `--resume` with nothing to resume, an interval save read by the next
stage (refused: it is half trained), the baseline set by hand in the interval save, `--resume` of
a finished run, and of one written before train_grpo.py could resume."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import train_grpo
from minirlhf.checkpoint import load_checkpoint, load_policy
from minirlhf.cli import UserError
from minirlhf.metrics import read_metrics
from minirlhf.ppo import save_run
from helpers import run_in_process
from test_resume import check_resume_reproduces, tiny_world  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")   # (tests/conftest.py)


def test_resume_grpo(tiny_world, tmp_path, monkeypatch, capsys):
    """--reward gold: the gold normaliser, fitted on the first batch, must come back from grpo.pt too."""
    check_resume_reproduces("grpo", "train_grpo.py", ["--preset", "smoke", "--reward", "gold", "--total-updates", "4",
                                                      "--save-every", "1"],
                            ["sft.pt", "rm.pt"], tiny_world, tmp_path, monkeypatch, capsys, total=4)
    resumed = load_checkpoint(tmp_path / "interrupted" / "grpo.pt", kind="grpo")   # finished: no unfinished_ok
    assert resumed["gold_normaliser"] == load_checkpoint(tmp_path / "uninterrupted" / "grpo.pt")["gold_normaliser"]


def one_error_line(code: int, stderr: str, expected: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected in lines[0], f"exit {code}, stderr:\n{stderr}"


def test_what_a_user_meets_around_resume(tiny_world, tmp_path, monkeypatch, capsys):
    """rloo.pt (--advantage rloo) through a Ctrl-C just after its first interval save (raised here in the
    process, right after `save_run`: the real signal is `test_resume_grpo`'s). The held-out
    evaluation's SFT baseline must come from the checkpoint: on an untrained smoke model every
    evaluation grades alike, so the saved baseline is set by hand to one the resumed run could not
    have measured (gold 0, sd 1: the gain is then the gold itself)."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("sft.pt", "rm.pt"):
        shutil.copy(os.path.join(tiny_world["out"], name), out / name)
    flags = ["--preset", "smoke", "--advantage", "rloo", "--total-updates", "2", "--save-every", "1",
             "--data-dir", tiny_world["data"], "--out-dir", str(out), "--device", "cpu"]

    code, _, stderr = run_in_process("train_grpo", [*flags, "--lr", "0"], monkeypatch, capsys)
    one_error_line(code, stderr, "train_grpo.py: error: argument --lr: must be > 0.0, got 0.0")
    code, _, stderr = run_in_process("train_grpo", [*flags, "--resume"], monkeypatch, capsys)
    one_error_line(code, stderr, f"error: checkpoint {out / 'rloo.pt'} not found; run train_grpo.py --advantage rloo")

    def save_then_ctrl_c(*args, finished=None, **kwargs):
        save_run(*args, finished=finished, **kwargs)
        if finished is False:
            raise KeyboardInterrupt
    monkeypatch.setattr(train_grpo, "save_run", save_then_ctrl_c)
    code, _, stderr = run_in_process("train_grpo", flags, monkeypatch, capsys)
    assert code == 130 and stderr.strip() == "interrupted", stderr
    with pytest.raises(UserError, match=r"rloo.pt is an unfinished run, saved at step 1: finish it with "
                                        r"`python train_grpo.py --advantage rloo --resume`"):
        load_policy(out / "rloo.pt")   # what evaluate.py, chat.py and --init read through

    interval = torch.load(out / "rloo.pt", weights_only=True)
    assert interval["metrics"]["sft/gold"] > 0 and interval["finished"] is False
    interval["metrics"].update({"sft/gold": 0.0, "sft/gold_sd": 1.0})
    torch.save(interval, out / "rloo.pt")
    monkeypatch.setattr(train_grpo, "save_run", save_run)
    code, stdout, stderr = run_in_process("train_grpo", [*flags, "--resume"], monkeypatch, capsys)
    assert code == 0 and f"resumed from {out / 'rloo.pt'} at update 1" in stdout, stderr
    assert "[eval 0]" not in stdout, "the resumed run evaluated the SFT policy again"
    last = read_metrics(out / "rloo_metrics.jsonl")[-1]
    assert last["step"] == 2 and last["eval/gold_gain_sd"] == last["eval/gold"], \
        "the held-out gain was not measured against the baseline saved in rloo.pt"
    _, finished = load_policy(out / "rloo.pt")
    assert finished["step"] == 2 and finished["kind"] == "rloo" and finished["train_config"]["advantage"] == "rloo"
    assert finished["metrics"]["sft/gold"] == 0.0
    code, _, stderr = run_in_process("train_grpo", [*flags, "--resume"], monkeypatch, capsys)
    one_error_line(code, stderr, "rloo.pt is already at update 2 >= --total-updates 2")
    for name in ("policy_optimizer", "kl_coef", "rng_state"):   # as train_grpo.py wrote it before --resume existed
        del finished[name]
    torch.save(finished, out / "rloo.pt")
    code, _, stderr = run_in_process("train_grpo", [*flags, "--total-updates", "3", "--resume"], monkeypatch, capsys)
    one_error_line(code, stderr, "rloo.pt holds no policy_optimizer, kl_coef, rng_state (it was not written by a "
                                 "run that can be resumed): cannot resume from it")
