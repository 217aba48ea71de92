"""Every fault of docs/faults.md, tried the way a student would make it: one `error:` line on stderr
naming the file (and line) or the option, a non-zero exit, no traceback, nothing already written
damaged. (`--resume` after a real Ctrl-C is in tests/test_resume.py.)

The scripts run in this process through `run_main` (what the command line does, without starting
an interpreter); each fails before any training, on a tiny world built in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import run_all
from minirlhf.checkpoint import atomic_write, save_checkpoint
from minirlhf.cli import run_main
from minirlhf.data import read_comparisons, read_prompts, read_sft, read_text
from minirlhf.metrics import MetricsLogger
from minirlhf.tokenizer import save_ranks, train_bpe
from helpers import assert_one_error_line, run_in_process
from test_resume import REPO, tiny_world  # noqa: F401 (tiny_world: a fixture)


pytestmark = pytest.mark.usefixtures("one_thread")   # (tests/conftest.py)


def smoke(world, *args):
    return ["--preset", "smoke", "--data-dir", world["data"], "--device", "cpu", *args]


# ----------------------------------------------------------------------------------------------
# OS errors: a directory where a file is expected, a file where a directory is, no permission


@pytest.mark.parametrize("script, flag", [("train_sft", "--demos"), ("train_ppo", "--prompts"),
                                          ("train_rm", "--comparisons")])
def test_a_directory_given_as_a_data_file(script, flag, tiny_world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(tiny_world["out"], out)
    code, _, stderr = run_in_process(script, smoke(tiny_world, "--out-dir", str(out), flag, str(out)),
                                     monkeypatch, capsys)
    assert_one_error_line(code, stderr, f"{out} is a directory, expected a file")


def test_a_file_given_as_the_data_dir(tiny_world, tmp_path, monkeypatch, capsys):
    sft_file = os.path.join(tiny_world["data"], "sft.jsonl")
    code, _, stderr = run_in_process("train_base", ["--preset", "smoke", "--data-dir", sft_file,
                                                    "--out-dir", str(tmp_path)], monkeypatch, capsys)
    assert_one_error_line(code, stderr, sft_file, "a part of this path is a file")


def test_out_dir_that_is_a_file(tiny_world, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "out"
    a_file.write_text("not a directory")
    code, _, stderr = run_in_process("train_base", smoke(tiny_world, "--out-dir", str(a_file)), monkeypatch, capsys)
    assert_one_error_line(code, stderr, f"{a_file} exists and is not a directory")
    assert a_file.read_text() == "not a directory"


def test_out_dir_under_a_file(tiny_world, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    init = os.path.join(tiny_world["out"], "base.pt")
    code, _, stderr = run_in_process("train_sft", smoke(tiny_world, "--init", init, "--out-dir", str(a_file / "out")),
                                     monkeypatch, capsys)
    assert_one_error_line(code, stderr, str(a_file / "out"), "a part of this path is a file")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_out_dir_read_only(tiny_world, tmp_path, monkeypatch, capsys):
    read_only = tmp_path / "out"
    read_only.mkdir(mode=0o555)
    code, _, stderr = run_in_process("train_base", smoke(tiny_world, "--out-dir", str(read_only)), monkeypatch, capsys)
    assert_one_error_line(code, stderr, f"--out-dir {read_only} is not writable")


@pytest.mark.parametrize("error, expected", [
    (PermissionError(13, "Permission denied", "out/base.pt"), "error: out/base.pt: permission denied"),
    (OSError(28, "No space left on device", "out/base.pt"), "error: out/base.pt: No space left on device"),
    (IsADirectoryError(21, "Is a directory", "out"), "error: out is a directory, expected a file"),
])
def test_any_os_error_is_one_line(error, expected, monkeypatch, capsys):
    """Every OSError goes through the same line in run_main (as root, a read-only directory cannot be
    made, so a PermissionError is raised here by hand)."""
    def main():
        raise error
    monkeypatch.setattr(sys, "argv", ["x.py"])
    with pytest.raises(SystemExit) as exit_:
        run_main(main)
    assert exit_.value.code == 2 and capsys.readouterr().err == expected + "\n"


# ----------------------------------------------------------------------------------------------
# Data files: not UTF-8, empty fields, a special token's string


def write_bytes(path, *lines: bytes):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def test_not_utf8_names_the_file_and_line(tmp_path):
    good = b'{"prompt": "what does a cow eat?", "completion": "Grass."}'
    bad = b'{"prompt": "caf\xe9?", "completion": "Grass."}'   # Latin-1, as an editor might save it
    path = write_bytes(tmp_path / "sft.jsonl", good, b"", bad)
    for reader in (read_sft, read_prompts, read_comparisons):
        with pytest.raises(Exception, match=rf"sft\.jsonl:3: not UTF-8 text \(byte 0xe9") as error:
            reader(path)
        assert type(error.value).__name__ == "UserError"
    corpus = write_bytes(tmp_path / "corpus.txt", b"one", b"two \xff three")
    with pytest.raises(Exception, match=r"corpus\.txt:2: not UTF-8 text \(byte 0xff\)"):
        read_text(corpus)


def test_not_utf8_demonstrations_through_the_script(tiny_world, tmp_path, monkeypatch, capsys):
    demos = write_bytes(tmp_path / "demos.jsonl", b'{"prompt": "hi", "completion": "\xff"}')
    code, _, stderr = run_in_process("train_sft", smoke(tiny_world, "--init", os.path.join(tiny_world["out"], "base.pt"),
                                                        "--out-dir", str(tmp_path / "out"), "--demos", demos),
                                     monkeypatch, capsys)
    assert_one_error_line(code, stderr, f"{demos}:1: not UTF-8 text")


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "", "completion": "A cow eats grass."}', "field 'prompt' is empty"),
    ('{"prompt": "what does a cow eat?", "completion": "  "}', "field 'completion' is empty"),
    ('{"prompt": "what does a cow eat?<|endoftext|>", "completion": "Grass."}', "field 'prompt' contains the special token"),
])
def test_empty_or_special_text_in_demonstrations(line, expected, tiny_world, tmp_path, monkeypatch, capsys):
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"prompt": "what does a cow eat?", "completion": "A cow eats grass."}\n' + line + "\n")
    code, _, stderr = run_in_process("train_sft", smoke(tiny_world, "--init", os.path.join(tiny_world["out"], "base.pt"),
                                                        "--out-dir", str(tmp_path / "out"), "--demos", str(demos)),
                                     monkeypatch, capsys)
    assert_one_error_line(code, stderr, f"{demos}:2: {expected}")
    assert not (tmp_path / "out").exists(), "nothing written for bad input"


def test_empty_prompt_in_a_prompt_file(tiny_world, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "what does a cow eat?"}\n{"messages": [{"role": "user", "content": ""}]}\n')
    out = tmp_path / "out"
    shutil.copytree(tiny_world["out"], out)
    code, _, stderr = run_in_process("train_ppo", smoke(tiny_world, "--out-dir", str(out), "--prompts", str(prompts)),
                                     monkeypatch, capsys)
    assert_one_error_line(code, stderr, f"{prompts}:2: field 'messages' is empty")


def test_corrupt_tokenizer_file(tiny_world, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_world["data"], data)
    lines = (data / "tokenizer.tiktoken").read_bytes().splitlines(keepends=True)
    (data / "tokenizer.tiktoken").write_bytes(lines[0] + b"not-base64!! 1\n" + b"".join(lines[2:]))
    code, _, stderr = run_in_process("train_base", ["--preset", "smoke", "--data-dir", str(data),
                                                    "--out-dir", str(tmp_path / "out")], monkeypatch, capsys)
    assert_one_error_line(code, stderr, f"{data / 'tokenizer.tiktoken'}:2: corrupt rank file")


# ----------------------------------------------------------------------------------------------
# Options: checks that were ValueErrors, NaN passing range checks, values that make no sense


@pytest.mark.parametrize("script, flag", [
    ("train_base", "--lr=nan"), ("train_sft", "--lr=inf"), ("train_ppo", "--temperature=nan"),
    ("train_ppo", "--missing-eos-penalty=-inf"), ("chat", "--top-p=nan"), ("evaluate", "--temperature=nan"),
])
def test_nan_and_inf_fail_the_range_check(script, flag, tmp_path, monkeypatch, capsys):
    code, _, stderr = run_in_process(script, ["--out-dir", str(tmp_path), flag] if script != "chat" else [flag],
                                     monkeypatch, capsys)
    assert code == 2
    assert_one_error_line(code, stderr, flag.split("=")[0], "must be a finite number")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("script, flags, expected", [
    ("train_base", ["--lr", "0"], "--lr: must be > 0.0"),
    ("train_sft", ["--lr", "0"], "--lr: must be > 0.0"),
    ("train_ppo", ["--lr", "0"], "--lr: must be > 0.0"),
    ("train_rm", ["--lr", "0"], "--lr: must be > 0.0"),
    ("train_rm", ["--lr", "1e-6"], "--min-lr 1e-05 is above --lr 1e-06"),
    ("train_base", ["--lr", "1e-4"], "--min-lr 0.0002 is above --lr 0.0001"),
    ("train_sft", ["--lr", "1e-5", "--min-lr", "2e-5"], "--min-lr 2e-05 is above --lr 1e-05"),
])
def test_learning_rates_that_would_not_train(script, flags, expected, tmp_path, monkeypatch, capsys):
    code, _, stderr = run_in_process(script, ["--out-dir", str(tmp_path), *flags], monkeypatch, capsys)
    assert code == 2
    assert_one_error_line(code, stderr, expected)


def test_more_minibatches_than_the_batch(tiny_world, tmp_path, monkeypatch, capsys):
    code, _, stderr = run_in_process("train_ppo", smoke(tiny_world, "--out-dir", str(tmp_path), "--batch-size", "8",
                                                        "--num-minibatches", "9"), monkeypatch, capsys)
    assert_one_error_line(code, stderr, "--num-minibatches 9 must be <= --batch-size / processes = 8")


def test_over_long_prompt_in_train_rm(tiny_world, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "what does a cow eat? " * 40}) + "\n")
    code, _, stderr = run_in_process("train_rm", smoke(tiny_world, "--init", os.path.join(tiny_world["out"], "sft.pt"),
                                                       "--out-dir", str(tmp_path / "out"), "--prompts", str(prompts)),
                                     monkeypatch, capsys)
    assert_one_error_line(code, stderr, str(prompts), "longest prompt", "exceeds the SFT model's block_size 128")
    assert not (tmp_path / "out").exists(), "--out-dir is created once the inputs are read"


def test_train_rm_missing_comparisons_creates_nothing(tiny_world, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nope.jsonl"
    code, _, stderr = run_in_process("train_rm", smoke(tiny_world, "--init", os.path.join(tiny_world["out"], "sft.pt"),
                                                       "--out-dir", str(tmp_path / "out"), "--comparisons", str(missing)),
                                     monkeypatch, capsys)
    assert_one_error_line(code, stderr, str(missing))
    assert not (tmp_path / "out").exists(), "--out-dir was created before the missing input was noticed"


def test_train_rm_greedy_sampling_says_so(tiny_world, tmp_path, monkeypatch, capsys):
    """--temperature 0: every response to a prompt is the same, so nothing is left to rank. The hint
    used to be "lower --val-fraction"; and the earlier run's rm_comparisons.jsonl stays as it was
    (it used to be replaced by an empty file)."""
    out = tmp_path / "out"
    shutil.copytree(tiny_world["out"], out)
    earlier = '{"prompt": "what does a cow eat?", "responses": ["Grass.", "Rocks."], "ranking": [0, 1]}\n' * 3
    (out / "rm_comparisons.jsonl").write_text(earlier)
    code, _, stderr = run_in_process("train_rm", smoke(tiny_world, "--out-dir", str(out), "--temperature", "0"),
                                     monkeypatch, capsys)
    assert_one_error_line(code, stderr, "were identical: nothing to rank", "--temperature 0 samples greedily")
    assert "val-fraction" not in stderr
    assert (out / "rm_comparisons.jsonl").read_text() == earlier


def test_train_rm_failure_in_training_keeps_the_earlier_comparisons(tiny_world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(tiny_world["out"], out)
    earlier = '{"prompt": "what does a cow eat?", "responses": ["Grass.", "Rocks."], "ranking": [0, 1]}\n' * 3
    (out / "rm_comparisons.jsonl").write_text(earlier)
    code, _, stderr = run_in_process("train_rm", smoke(tiny_world, "--out-dir", str(out), "--lr", "1e30",
                                                       "--min-lr", "0", "--save-every", "1000"), monkeypatch, capsys)
    assert_one_error_line(code, stderr, "loss became nan")
    assert (out / "rm_comparisons.jsonl").read_text() == earlier, "the comparisons file is written with rm.pt"


def test_over_long_prompt_in_evaluate(tiny_world, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "what does a cow eat? " * 40}) + "\n")
    sft = os.path.join(tiny_world["out"], "sft.pt")
    code, _, stderr = run_in_process("evaluate", smoke(tiny_world, "--out-dir", str(tmp_path / "out"),
                                                       "--prompts", str(prompts), "--checkpoints", sft,
                                                       "--reference", sft, "--reward-model", "none"),
                                     monkeypatch, capsys)
    assert_one_error_line(code, stderr, str(prompts), "longest prompt", "exceeds the block_size 128")


# ----------------------------------------------------------------------------------------------
# Nothing already written is damaged


def test_a_run_that_fails_leaves_the_earlier_outputs(tiny_world, tmp_path, monkeypatch, capsys):
    """An lr of 1e30 makes the loss NaN within a few steps: the run stops with one line, and the
    earlier run's checkpoint and metrics are as they were (the metrics used to be reopened for
    writing at the start: SFT on a NaN went from 137 lines to 4)."""
    out = tmp_path / "out"
    shutil.copytree(tiny_world["out"], out)
    earlier_metrics = "".join(json.dumps({"step": s, "loss/train": 5.0 - s / 10}) + "\n" for s in range(1, 31))
    (out / "base_metrics.jsonl").write_text(earlier_metrics)
    earlier_checkpoint = (out / "base.pt").read_bytes()
    code, _, stderr = run_in_process("train_base", smoke(tiny_world, "--out-dir", str(out), "--lr", "1e30",
                                                         "--min-lr", "0", "--save-every", "1000"), monkeypatch, capsys)
    assert_one_error_line(code, stderr, "loss became nan")
    assert (out / "base_metrics.jsonl").read_text() == earlier_metrics, "the earlier metrics file was changed"
    assert (out / "base.pt").read_bytes() == earlier_checkpoint, "the earlier checkpoint was changed"


def test_run_all_appends_to_a_stage_log(tmp_path, monkeypatch, capsys):
    """Each run of a stage adds its output below a header line; the earlier runs' output stays."""
    stage = run_all.Stage("base", "train_base.py", (), ())
    cfg = types.SimpleNamespace(out_dir=str(tmp_path), nproc_per_node=1)
    script = os.path.join(run_all.ROOT, stage.script)
    for word in ("first", "second"):
        # the stage's command, as run_all builds it, replaced by one that prints a word (the script's
        # path stays in it: run_stage looks for it there)
        monkeypatch.setattr(run_all, "stage_command", lambda stage, cfg, word=word: [
            sys.executable, "-c", f"print('{word} run')", script])
        run_all.run_stage(stage, cfg)
    log = (tmp_path / "logs" / "base.log").read_text().splitlines()
    assert [line for line in log if not line.startswith("=== ")] == ["first run", "second run"], log
    assert len([line for line in log if line.startswith("=== ")]) == 2, "one header line per run"
    capsys.readouterr()


def test_resume_refuses_what_it_cannot_continue(tiny_world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(tiny_world["out"], out)
    code, _, stderr = run_in_process("train_base", smoke(tiny_world, "--out-dir", str(out), "--resume"),
                                     monkeypatch, capsys)   # an untrained base.pt: no optimizer state
    assert_one_error_line(code, stderr, "base.pt holds no optimizer", "cannot resume")
    code, _, stderr = run_in_process("train_sft", smoke(tiny_world, "--out-dir", str(tmp_path / "empty"), "--resume",
                                                        "--init", str(out / "base.pt")), monkeypatch, capsys)
    assert_one_error_line(code, stderr, "sft.pt not found")


def test_the_next_stage_refuses_an_unfinished_checkpoint(tiny_world, tmp_path, monkeypatch, capsys):
    """Ctrl-C during train_base.py leaves an interval save of base.pt: train_sft.py must not fine-tune
    a half-trained model without a word."""
    out = tmp_path / "out"
    shutil.copytree(tiny_world["out"], out)
    base = torch.load(out / "base.pt", weights_only=True)
    save_checkpoint(out / "base.pt", kind="base", model_state=base["model"], model_config=base["model_config"],
                    tokenizer_identity=base["tokenizer"], train_config={}, step=10, metrics={}, finished=False,
                    optimizer={})
    earlier_sft = (out / "sft.pt").read_bytes()
    code, _, stderr = run_in_process("train_sft", smoke(tiny_world, "--out-dir", str(out)), monkeypatch, capsys)
    assert_one_error_line(code, stderr, "base.pt is an unfinished run, saved at step 10",
                          "python train_base.py --resume")
    assert (out / "sft.pt").read_bytes() == earlier_sft


def test_kill_9_during_a_save_leaves_nothing_for_long(tmp_path):
    """A process killed in the middle of `atomic_write` cannot delete its temporary file; the next
    write of the same target removes it (its process is gone), and leaves a live writer's alone."""
    target = tmp_path / "ppo.pt"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from minirlhf.checkpoint import atomic_write\n"
        f"with atomic_write({str(target)!r}) as f:\n"
        "    f.write(b'half a checkpoint'); f.flush(); print('writing', flush=True); time.sleep(60)")],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()   # SIGKILL: no cleanup runs
    writer.wait()
    stale = [p.name for p in tmp_path.iterdir()]
    assert len(stale) == 1 and stale[0].startswith(".ppo.pt.") and stale[0].endswith(".tmp"), stale
    live = tmp_path / f".ppo.pt.{os.getppid()}.0123abcd.tmp"   # a process that runs: perhaps saving right now
    live.write_bytes(b"")
    other = tmp_path / f".rm.pt.{writer.pid}.0123abcd.tmp"     # another target's: not this save's business
    other.write_bytes(b"")
    with atomic_write(target) as f:
        f.write(b"a whole checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ppo.pt", live.name, other.name])


def test_tokenizer_file_gets_the_usual_permissions(tmp_path):
    old_umask = os.umask(0o022)
    try:
        save_ranks(train_bpe("a cow eats grass. a goat eats grass too.", 260), tmp_path / "tokenizer.tiktoken")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "tokenizer.tiktoken").stat().st_mode & 0o777 == 0o644, "tempfile.mkstemp's 0600 came back"


def test_metrics_file_of_a_failed_commit_is_the_earlier_one(tmp_path):
    """The metrics file is replaced whole or not at all: here the new lines cannot be serialised."""
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as metrics:
        metrics.log(1, loss=1.0)
    before = path.read_bytes()
    metrics = MetricsLogger(path)
    metrics.log(1, loss=2.0)
    metrics._lines.append(object())   # a line that fails to write, half way through the file
    with pytest.raises(TypeError):
        metrics.commit()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]

