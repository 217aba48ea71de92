"""Tests for evaluate.py, the script end to end: which checkpoints it finds, what eval.json and
eval.md hold, and one-line errors. It runs on untrained toy checkpoints built in seconds: the numbers
are meaningless there, the plumbing is not. The statistics are tested in test_stats.py, sampling,
grading and the KL to SFT in test_evaluation.py, the report's pieces in test_eval_report.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import evaluate
from minirlhf import world
from minirlhf.checkpoint import save_checkpoint
from minirlhf.metrics import MetricsLogger
from minirlhf.model import RewardModel
from minirlhf.tokenizer import Tokenizer
from helpers import assert_smoke_run_wrote, run_in_process
from test_evaluation import toy_gpt, toy_tokenizer   # (tests/ is on the path: the same toy models)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")   # (tests/conftest.py)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """data/ (tokenizer, 8 eval prompts) and out/ with untrained base, sft, ppo and rm checkpoints."""
    root = tmp_path_factory.mktemp("eval_run")
    data, out = root / "data", root / "out"
    data.mkdir()
    out.mkdir()
    tokenizer = toy_tokenizer(data)
    tasks = world.all_tasks()
    prompts = [t.prompt for family in world.FAMILIES for t in [t for t in tasks if t.family == family][:2]]
    with open(data / "eval_prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    config = toy_gpt(tokenizer, 0).config
    common = dict(model_config=config, tokenizer_identity=tokenizer.identity, train_config={}, step=0, metrics={})
    for seed, kind in enumerate(("base", "sft", "ppo")):
        save_checkpoint(out / f"{kind}.pt", kind=kind, model_state=toy_gpt(tokenizer, seed).state_dict(), **common)
    torch.manual_seed(3)
    save_checkpoint(out / "rm.pt", kind="rm", model_state=RewardModel(config).state_dict(), reward_bias=0.0,
                    reward_gain=1.0, **common)
    with MetricsLogger(out / "ppo_metrics.jsonl") as log:
        for step, kl in enumerate([0.0, 0.5, 1.5, 3.0]):
            log.log(step, **{"eval/kl": kl, "eval/gold": 3.0 + 0.4 * kl ** 0.5, "eval/rm": 0.3 * kl})
    return {"data": str(data), "out": str(out), "prompts": prompts}


def run_evaluate(monkeypatch, capsys, *args):
    """evaluate.py the way the command line runs it (run_main), in this interpreter."""
    return run_in_process(evaluate, list(args), monkeypatch, capsys)


def test_smoke_preset_end_to_end(toy_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("base.pt", "sft.pt", "ppo.pt", "rm.pt", "ppo_metrics.jsonl"):
        os.link(os.path.join(toy_run["out"], name), out / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "evaluate.py", "--preset", "smoke", "--data-dir", toy_run["data"],
                             "--out-dir", str(out), "--device", "cpu"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert_smoke_run_wrote(result, "evaluate.py", out, ("eval.json", "eval.md", "eval.png", "eval_bon.png"))

    report = json.loads((out / "eval.json").read_text())
    assert list(report["models"]) == ["base", "sft", "ppo"]
    for name, summary in report["models"].items():
        for key in ("gold/sample", "gold/greedy", "gold/sample/correct", "gold/sample/well_formed", "rm/sample",
                    "eos_rate/sample", "length/sample", "kl_to_sft"):
            assert summary[key] is not None, f"{name}: {key} missing"
        assert summary["samples"] == 8 * 2, "smoke: 8 prompts x 2 samples"
        assert 0.0 <= summary["rm/gold_accuracy"] <= 1.0 or math.isnan(summary["rm/gold_accuracy"]), name
    assert report["models"]["sft"]["kl_to_sft"] == 0.0, "SFT's KL to itself must be exactly 0"
    pairs = [(w["model"], w["baseline"]) for w in report["win_rates"]]
    assert pairs == [("sft", "base"), ("ppo", "sft"), ("ppo", "base")], f"win-rate pairs: {pairs}"
    bon = report["best_of_n"]
    assert bon["n"] == [1, 2, 4, 8] and bon["samples_per_prompt"] == 8 and bon["prompts"] == 6
    assert bon["kl"][0] == 0.0 and bon["rm"] == sorted(bon["rm"]), "the RM score of the pick rises with n"
    ceiling = bon["gold_ranked_by_gold"]
    assert all(b >= a - 1e-9 for a, b in zip(ceiling, ceiling[1:])), "the gold-ranked pick's gold rises with n"
    assert ceiling[0] == pytest.approx(bon["gold"][0]), "best-of-1 is the plain mean whatever ranks it"
    assert all(c >= g - 1e-9 for c, g in zip(ceiling, bon["gold"])), "no ranking beats ranking by gold itself"
    optimum = bon["optimum"]
    assert optimum["beta"] == sorted(optimum["beta"], reverse=True)
    for name in ("rm", "gold"):
        kl = optimum[name]["kl"]
        assert all(b >= a - 1e-9 for a, b in zip(kl, kl[1:])), f"{name} optimum: KL grows as beta falls"
        assert all(0 <= k <= math.log(bon["samples_per_prompt"]) + 1e-9 for k in kl), "KL within [0, log N]"
    gold = optimum["gold"]["gold"]
    assert all(b >= a - 1e-9 for a, b in zip(gold, gold[1:])), "tilting by gold raises gold as beta falls"
    assert 0.0 <= report["ppo_on_bon_prompts"]["win_rate"] <= 1.0
    assert report["ppo_trajectory"]["kl"] == [0.0, 0.5, 1.5, 3.0]
    assert report["fits"]["rl"]["baseline"] == 3.0, "PPO's gain is measured from its own KL = 0 point"
    assert report["ppo_on_bon_prompts"]["model"] == "ppo"

    text = (out / "eval.md").read_text()
    for heading in ("## Scores", "## Win rates", "## Best-of-n", "## The same prompts, side by side"):
        assert heading in text, f"eval.md lacks {heading!r}"
    assert "6 evenly spaced prompts of the 8" in text, "a subset for best-of-n must be said"
    assert "win rate ppo vs sft" in result.stdout


def test_every_method_checkpoint_present_is_evaluated(toy_run, tmp_path, monkeypatch, capsys):
    """dpo.pt, grpo.pt and rloo.pt beside base/sft/ppo are picked up without --checkpoints; each gets
    a win rate against SFT (and base), a point on the best-of-n prompts, and its training cost."""
    tokenizer = Tokenizer.from_file(os.path.join(toy_run["data"], "tokenizer.tiktoken"))
    for name in ("base.pt", "sft.pt", "ppo.pt", "rm.pt"):
        os.link(os.path.join(toy_run["out"], name), tmp_path / name)
    config = toy_gpt(tokenizer, 0).config
    for seed, kind in enumerate(("dpo", "grpo", "rloo"), start=5):
        save_checkpoint(tmp_path / f"{kind}.pt", kind=kind, model_state=toy_gpt(tokenizer, seed).state_dict(),
                        model_config=config, tokenizer_identity=tokenizer.identity, train_config={}, step=3,
                        metrics={"minutes": 0.5, "samples_drawn": 0 if kind == "dpo" else 96})
    code, out, err = run_evaluate(monkeypatch, capsys, "--preset", "smoke", "--data-dir", toy_run["data"],
                                  "--out-dir", str(tmp_path), "--device", "cpu")
    assert code == 0, err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert list(report["models"]) == ["base", "sft", "ppo", "dpo", "grpo", "rloo"]
    pairs = [(w["model"], w["baseline"]) for w in report["win_rates"]]
    for method in ("ppo", "dpo", "grpo", "rloo"):
        assert (method, "sft") in pairs and (method, "base") in pairs, pairs
        assert report["methods_on_bon_prompts"][method]["kind"] == method
    assert ("dpo", "ppo") not in pairs, "methods are compared with the baselines, not with each other"
    assert report["models"]["grpo"]["samples_drawn"] == 96 and report["models"]["dpo"]["samples_drawn"] == 0
    assert report["models"]["ppo"]["samples_drawn"] == 0, "ppo.pt at step 0: no updates, nothing sampled"
    assert "## Methods side by side" in (tmp_path / "eval.md").read_text()


def test_missing_default_checkpoints_are_named_and_skipped(toy_run, tmp_path, monkeypatch, capsys):
    os.link(os.path.join(toy_run["out"], "sft.pt"), tmp_path / "sft.pt")
    code, out, err = run_evaluate(monkeypatch, capsys, "--preset", "smoke", "--data-dir", toy_run["data"],
                                  "--out-dir", str(tmp_path), "--max-prompts", "3", "--samples", "1")
    assert code == 0, err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert list(report["models"]) == ["sft"] and report["win_rates"] == [] and report["best_of_n"] is None
    for missing in ("base.pt not found", "ppo.pt not found", "rm.pt not found"):
        assert any(missing in note for note in report["notes"]), f"no note says {missing!r}: {report['notes']}"
        assert missing in out


def test_bad_inputs_are_one_clear_line(toy_run, tmp_path, monkeypatch, capsys):
    common = ["--preset", "smoke", "--data-dir", toy_run["data"]]
    rm_path = os.path.join(toy_run["out"], "rm.pt")
    code, _, err = run_evaluate(monkeypatch, capsys, *common, "--out-dir", str(tmp_path), "--checkpoints", rm_path)
    assert code == 2 and "is a 'rm' checkpoint" in err and len(err.strip().splitlines()) == 1, err

    code, _, err = run_evaluate(monkeypatch, capsys, *common, "--out-dir", str(tmp_path))
    assert code == 2 and "no checkpoints in" in err, err

    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "what does a cow eat?"}\n{"prompt": \n')
    code, _, err = run_evaluate(monkeypatch, capsys, *common, "--out-dir", toy_run["out"], "--prompts", str(bad))
    assert code == 2 and f"{bad}:2" in err, f"the error must name the file and line: {err}"

    code, _, err = run_evaluate(monkeypatch, capsys, *common, "--samples", "0")
    assert code == 2 and "--samples" in err, err
    assert not (tmp_path / "eval.json").exists(), "a failed run writes nothing"
