"""Tests for chat.py: one prompt, the prompt> loop, the default checkpoint, and clear errors.

The checkpoints are untrained toy models (their answers are gibberish); what is tested is the
plumbing a user relies on: the flags, quitting, the gold score, and one-line errors.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

import chat
from minirlhf import world
from minirlhf.checkpoint import save_checkpoint
from minirlhf.model import GPT, GPTConfig, RewardModel
from helpers import run_in_process, toy_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """data/tokenizer.tiktoken and out/ with untrained base.pt, sft.pt and rm.pt (block size 64)."""
    rng = random.Random(0)
    text = " ".join(t.prompt + " " + world.good_response(t, rng) for t in rng.sample(world.all_tasks(), 300))
    data, out, tokenizer = toy_world(tmp_path_factory, "chat_run", text)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, d_model=32)
    common = dict(model_config=config, tokenizer_identity=tokenizer.identity, train_config={}, step=7, metrics={})
    torch.manual_seed(0)
    for kind in ("base", "sft"):
        save_checkpoint(out / f"{kind}.pt", kind=kind, model_state=GPT(config).state_dict(), **common)
    save_checkpoint(out / "rm.pt", kind="rm", model_state=RewardModel(config).state_dict(), **common)
    return {"data": str(data), "out": str(out)}


def run_chat(monkeypatch, capsys, *args, stdin: str = ""):
    """chat.py the way the command line runs it (run_main), in this interpreter, with `stdin` typed in."""
    return run_in_process(chat, list(args), monkeypatch, capsys, stdin=stdin)


def test_one_prompt_with_samples_and_gold_score_as_a_user_runs_it(toy_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "chat.py", "--data-dir", toy_run["data"], "--checkpoint",
                             os.path.join(toy_run["out"], "sft.pt"), "--prompt", "what does a cow eat?",
                             "--n-samples", "2", "--max-new-tokens", "8", "--show-score", "--device", "cpu"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[1] ") and lines[2].startswith("[2] "), f"two numbered answers:\n{result.stdout}"
    assert "gold" in lines[1] and "correct" in lines[1] and "well_formed" in lines[1], "the score and its parts"


def test_greedy_answers_are_deterministic_and_top_k_top_p_are_accepted(toy_run, monkeypatch, capsys):
    args = ["--data-dir", toy_run["data"], "--out-dir", toy_run["out"], "--prompt", "praise the dog.",
            "--max-new-tokens", "6"]
    first = run_chat(monkeypatch, capsys, *args, "--temperature", "0")
    second = run_chat(monkeypatch, capsys, *args, "--temperature", "0", "--seed", "5")
    assert first[0] == 0 and first[1] == second[1], "greedy decoding must not depend on the seed"
    code, out, err = run_chat(monkeypatch, capsys, *args, "--top-k", "5", "--top-p", "0.9")
    assert code == 0 and out.strip(), err


def test_the_loop_answers_until_quit_and_skips_blank_lines(toy_run, monkeypatch, capsys):
    code, out, err = run_chat(monkeypatch, capsys, "--data-dir", toy_run["data"], "--out-dir", toy_run["out"],
                              "--max-new-tokens", "4", stdin="what does a cow eat?\n\nQUIT\nwhat is 1 plus 1?\n")
    assert code == 0, err
    assert "sft.pt (sft, step 7)" in out, f"the default checkpoint is the most trained one present:\n{out}"
    assert out.count("prompt> ") == 3, f"a prompt, a blank line, then quit (the last line is never read):\n{out}"


def test_the_loop_ends_on_eof_and_survives_a_too_long_prompt(toy_run, monkeypatch, capsys):
    long_prompt = "tell me about the cow " * 30
    code, out, err = run_chat(monkeypatch, capsys, "--data-dir", toy_run["data"], "--checkpoint",
                              os.path.join(toy_run["out"], "base.pt"), "--max-new-tokens", "4",
                              stdin=f"{long_prompt}\nwhat is 2 plus 2?\n")
    assert code == 0, err
    assert "error: the prompt is" in err and "window" in err, f"a too-long prompt is explained:\n{err}"
    assert out.count("prompt> ") == 3, "the loop goes on after the error and ends at end of input"


def test_bad_inputs_are_one_clear_line(toy_run, tmp_path, monkeypatch, capsys):
    data = ["--data-dir", toy_run["data"], "--prompt", "hi"]
    code, _, err = run_chat(monkeypatch, capsys, *data, "--checkpoint", os.path.join(toy_run["out"], "rm.pt"))
    assert code == 2 and "is a 'rm' checkpoint" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_chat(monkeypatch, capsys, *data, "--out-dir", str(tmp_path))
    assert code == 2 and "no checkpoint in" in err, err
    code, _, err = run_chat(monkeypatch, capsys, *data, "--checkpoint", str(tmp_path / "missing.pt"))
    assert code == 2 and "missing.pt not found" in err, err
    for flag, value in (("--top-p", "1.5"), ("--temperature", "-1"), ("--n-samples", "0")):
        code, _, err = run_chat(monkeypatch, capsys, *data, flag, value)
        assert code == 2 and flag in err, f"{flag} {value}: {err}"
