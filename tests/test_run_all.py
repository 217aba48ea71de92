"""Tests for run_all.py: the whole pipeline at the smoke preset, skipping what exists, and stopping
at the first failing stage with its message.

The end-to-end test is the slowest test of the suite (every stage runs for real, in order, as
separate scripts: under a minute on 2 cores); it is the one that shows the stages fit together.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import run_all
from minirlhf.tokenizer import save_ranks, train_bpe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_STAGES = ["data", "base", "sft", "rm", "ppo", "eval"]   # --methods ppo, the default


def run(*args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "run_all.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def table_rows(stdout: str) -> dict[str, str]:
    """{stage: "ran" or "skipped"} from run_all's final table."""
    table = stdout[stdout.index("stage  run"):].split("\ntotal ")[0]  # the evaluation table follows it
    return {line.split()[0]: line.split()[1] for line in table.splitlines()[1:]}


def test_smoke_pipeline_end_to_end_then_skips_what_exists(tmp_path):
    dirs = ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out")]
    result = run("--preset", "smoke", "--device", "cpu", *dirs)
    assert result.returncode == 0, f"run_all.py --preset smoke failed:\n{result.stdout[-3000:]}\n{result.stderr}"
    for stage in run_all.selected_stages(run_all.RunAllConfig()):
        for path in run_all.output_paths(stage, run_all.RunAllConfig(data_dir=dirs[1], out_dir=dirs[3])):
            assert os.path.exists(path), f"stage {stage.name} did not write {path}"
        log = tmp_path / "out" / "logs" / f"{stage.name}.log"
        assert log.stat().st_size > 0, f"no log for stage {stage.name}"
    assert table_rows(result.stdout) == {name: "ran" for name in DEFAULT_STAGES}, result.stdout[-3000:]
    ending = result.stdout[result.stdout.index("stage  run"):]
    assert "eval.png" in ending and "win rate ppo vs sft" in ending, "the plots and the evaluation close the run"
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert list(report["models"]) == ["base", "sft", "ppo"] and report["best_of_n"] is not None

    # Again: every stage's output exists, so all are skipped except the one asked for.
    eval_mtime = os.path.getmtime(tmp_path / "out" / "eval.json")
    sft_mtime = os.path.getmtime(tmp_path / "out" / "sft.pt")
    again = run("--preset", "smoke", "--device", "cpu", *dirs, "--from-stage", "eval")
    assert again.returncode == 0, again.stderr
    rows = table_rows(again.stdout)
    assert rows == {"data": "skipped", "base": "skipped", "sft": "skipped", "rm": "skipped", "ppo": "skipped",
                    "eval": "ran"}, f"--from-stage eval must run only the evaluation: {rows}"
    assert os.path.getmtime(tmp_path / "out" / "sft.pt") == sft_mtime, "a skipped stage must not rewrite its output"
    assert os.path.getmtime(tmp_path / "out" / "eval.json") >= eval_mtime


def fake_data_dir(folder):
    """Every file data/prepare.py writes (a real tokenizer, placeholder data): the data stage is done."""
    for name in run_all.STAGES[0].outputs:
        (folder / name).write_text('{"prompt": "what does a cow eat?"}\n' if name.endswith(".jsonl") else "{}\n")
    save_ranks(train_bpe("a cow eats grass. a dog says woof.", 260), folder / "tokenizer.tiktoken")


def test_the_first_failing_stage_stops_the_pipeline_with_its_message(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    fake_data_dir(data)
    (out / "base.pt").write_bytes(b"not a checkpoint")  # base is "done", and sft cannot read it
    result = run("--preset", "smoke", "--device", "cpu", "--data-dir", str(data), "--out-dir", str(out))
    assert result.returncode == 2, f"expected exit 2, got {result.returncode}:\n{result.stderr}"
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: stage sft failed"), f"one line naming the stage: {error}"
    assert "base.pt is not a readable torch checkpoint" in error[0], "the stage's own message is repeated"
    assert "=== data: skipped" in result.stdout and "=== base: skipped" in result.stdout
    assert "=== rm" not in result.stdout, "nothing runs after the failing stage"
    assert not (out / "sft.pt").exists()
    assert "not a readable torch checkpoint" in (out / "logs" / "sft.log").read_text()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("extra", [[], ["--nproc-per-node", "1", "--dtype", "fp32"]], ids=["bf16", "fp32"])
def test_smoke_pipeline_on_cuda(tmp_path, extra):
    """Every stage on the GPU, end to end: the first GPU run ever made crashed at its first sample
    (a sampling generator made on the CPU); this is the test that would have shown it."""
    dirs = ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out")]
    result = run("--preset", "smoke", "--device", "cuda", *dirs, *extra, timeout=600)
    assert result.returncode == 0, f"run_all.py on CUDA failed:\n{result.stdout[-3000:]}\n{result.stderr}"
    assert table_rows(result.stdout) == {name: "ran" for name in DEFAULT_STAGES}
    for stage in ("base", "sft", "rm", "ppo"):
        log = (tmp_path / "out" / "logs" / f"{stage}.log").read_text()
        assert re.search(r"\bdevice\s+= cuda\b", log), f"{stage} did not run on CUDA"


def test_stage_commands_pass_the_common_flags():
    cfg = run_all.RunAllConfig(preset="smoke", data_dir="d", out_dir="o", device="cpu", seed=7)
    data, base = run_all.STAGES[0], run_all.STAGES[1]
    assert run_all.stage_command(data, cfg)[2:] == ["--preset", "smoke", "--data-dir", "d"], \
        "data/prepare.py takes no --out-dir, --device or --seed (its seed is the world's)"
    assert run_all.stage_command(base, cfg)[2:] == ["--preset", "smoke", "--data-dir", "d", "--out-dir", "o",
                                                    "--device", "cpu", "--dtype", "auto", "--seed", "7"]
    no_seed = run_all.RunAllConfig(preset="smoke", data_dir="d", out_dir="o")
    assert "--seed" not in run_all.stage_command(base, no_seed), "without --seed each stage keeps its own default"


def test_nproc_per_node_launches_the_training_stages_with_torchrun():
    cfg = run_all.RunAllConfig(preset="smoke", data_dir="d", out_dir="o", device="cpu", nproc_per_node=2)
    by_name = {stage.name: run_all.stage_command(stage, cfg) for stage in run_all.STAGES}
    for name in ("base", "sft", "rm", "ppo"):
        assert by_name[name][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], name
        assert by_name[name][5].endswith(f"train_{name}.py")
    for name in ("dpo", "grpo", "rloo"):
        assert by_name[name][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], name
    assert by_name["rloo"][5].endswith("train_grpo.py") and by_name["rloo"][-2:] == ["--advantage", "rloo"]
    for name in ("data", "eval"):   # one process: nothing to split
        assert "torch.distributed.run" not in by_name[name], name
    assert "torch.distributed.run" not in run_all.stage_command(run_all.STAGES[1], run_all.RunAllConfig())


def test_methods_choose_the_stages_after_the_rm():
    names = [s.name for s in run_all.selected_stages(run_all.RunAllConfig(methods="grpo, dpo"))]
    assert names == ["data", "base", "sft", "rm", "dpo", "grpo", "eval"]
    assert [s.name for s in run_all.selected_stages(run_all.RunAllConfig(until="sft"))] == ["data", "base", "sft"]
    with pytest.raises(run_all.UserError, match="--methods: unknown method 'ppx'"):
        run_all.selected_stages(run_all.RunAllConfig(methods="ppo,ppx"))


@pytest.mark.parametrize("args, message", [(["--until", "nope"], "--until"), (["--from-stage", "x"], "--from-stage"),
                                           (["--seed", "one"], "--seed")])
def test_bad_options_are_one_clear_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_all.parse_config(run_all.RunAllConfig, run_all.PRESETS, argv=args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_an_interrupted_stage_is_continued_with_resume_and_a_finished_one_skipped(tmp_path, monkeypatch, capsys):
    """A checkpoint saved at an interval (`finished: False`, what Ctrl-C after --save-every leaves) makes
    run_all run that stage again with --resume; a finished checkpoint is skipped; --force reruns
    from scratch (no --resume)."""
    from minirlhf.checkpoint import save_checkpoint

    data_dir, out_dir = tmp_path / "data", tmp_path / "out"
    data_dir.mkdir()
    for name in run_all.STAGES[0].outputs:
        (data_dir / name).write_text("{}")
    common = dict(model_state={}, model_config={}, tokenizer_identity={}, train_config={}, metrics={})
    save_checkpoint(out_dir / "base.pt", kind="base", step=10, **common)                  # finished
    save_checkpoint(out_dir / "sft.pt", kind="sft", step=3, finished=False, **common)     # interrupted
    calls = []
    monkeypatch.setattr(run_all, "run_stage", lambda stage, cfg, resume=False: calls.append((stage.name, resume)))
    args = ["run_all.py", "--preset", "smoke", "--data-dir", str(data_dir), "--out-dir", str(out_dir), "--until", "sft"]
    monkeypatch.setattr(sys, "argv", args)
    run_all.main()
    assert calls == [("sft", True)], "data and base are done; sft was interrupted: continue it"
    assert run_all.stage_command(run_all.STAGES[2], run_all.RunAllConfig())[-1] != "--resume"
    calls.clear()
    monkeypatch.setattr(sys, "argv", args + ["--force"])
    run_all.main()
    assert calls == [("data", False), ("base", False), ("sft", False)], "--force starts every stage afresh"
