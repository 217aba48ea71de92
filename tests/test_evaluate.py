"""Tests for evaluate.py: the statistics against plain references, then the script end to end.

The statistics are the lesson: a win rate with ties counted half, best-of-n's KL in closed form,
the unbiased best-of-n estimator (checked against enumerating every n-subset), Gao et al.'s
least-squares fits (they must recover known parameters exactly), and the per-response KL to SFT
(checked against a plain forward pass on each unpadded row). The script runs on untrained toy
checkpoints built in seconds: the numbers are meaningless there, the plumbing is not.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
from minirlhf import stats
from minirlhf import labeler, world
from minirlhf.checkpoint import save_checkpoint
from minirlhf.cli import run_main
from minirlhf.generate import generate
from minirlhf.metrics import MetricsLogger
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.tokenizer import Tokenizer, render_chat, save_ranks, train_bpe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# win rates


def test_win_rate_hand_worked():
    # pairs: 3>1 win, 2=2 tie, 1<3 loss, 5>4 win -> (2 + 0.5) / 4; excluding the tie: 2 of 3
    result = stats.win_rate([3, 2, 1, 5], [1, 2, 3, 4])
    assert result["win_rate"] == pytest.approx(0.625), f"win rate: expected 0.625, got {result['win_rate']}"
    assert result["tie_rate"] == pytest.approx(0.25), f"tie rate: expected 0.25, got {result['tie_rate']}"
    assert result["win_rate_excl_ties"] == pytest.approx(2 / 3), "win rate excluding ties: expected 2/3"
    assert result["pairs"] == 4


def test_win_rate_pairs_answer_j_with_answer_j_and_counts_float_ties():
    # (S=2, N=2) arrays are paired elementwise, not all against all; 0.1 + 0.2 vs 0.3 is a tie
    a = np.array([[0.1 + 0.2, 1.0], [2.0, 0.0]])
    b = np.array([[0.3, 0.0], [1.0, 5.0]])
    result = stats.win_rate(a, b)
    assert result["tie_rate"] == pytest.approx(0.25), "0.1 + 0.2 vs 0.3 must count as a tie"
    assert result["win_rate"] == pytest.approx((2 + 0.5) / 4)
    all_ties = stats.win_rate([1.0, 2.0], [1.0, 2.0])
    assert all_ties["win_rate"] == 0.5 and math.isnan(all_ties["win_rate_excl_ties"])
    with pytest.raises(ValueError):
        stats.win_rate([1.0, 2.0], [1.0])


# ---------------------------------------------------------------------------------------------
# best-of-n


def test_best_of_n_kl_closed_form():
    assert stats.best_of_n_kl(1) == 0.0, "best-of-1 is the policy itself: KL 0"
    assert stats.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert stats.best_of_n_kl(32) == pytest.approx(math.log(32) - 31 / 32)


def test_best_of_n_expected_hand_worked():
    rm, gold = [0.1, 0.9, 0.5], [1.0, 2.0, 3.0]
    # n = 1: the mean, 2. n = 2: subsets {0,1} -> sample 1 (gold 2), {0,2} -> sample 2 (gold 3),
    # {1,2} -> sample 1 (gold 2): 7/3. n = 3: the RM's favourite, sample 1: gold 2.
    for n, expected in ((1, 2.0), (2, 7 / 3), (3, 2.0)):
        got = stats.best_of_n_expected(rm, gold, n)
        assert got == pytest.approx(expected), f"best-of-{n}: expected {expected}, got {got}"
    with pytest.raises(ValueError):
        stats.best_of_n_expected(rm, gold, 4)


def test_best_of_n_expected_matches_enumerating_every_subset():
    rng = random.Random(0)
    N = 7
    rm = [rng.gauss(0, 1) for _ in range(N)]
    gold = [rng.uniform(0, 8) for _ in range(N)]
    for n in range(1, N + 1):
        picks = [gold[max(subset, key=lambda i: rm[i])] for subset in itertools.combinations(range(N), n)]
        expected = sum(picks) / len(picks)
        got = stats.best_of_n_expected(rm, gold, n)
        assert got == pytest.approx(expected, abs=1e-12), f"best-of-{n} of {N}: expected {expected}, got {got}"


def test_kl_regularised_optimum_hand_worked():
    # scores (0, ln 3), beta 1: weights 1/4, 3/4. Values (1, 2): E = 1.75; KL = 1/4 ln(1/2) + 3/4 ln(3/2);
    # sample 1 beats an SFT sample with 1/2 (tie) * 1/2 = 1/4, sample 2 with (1 + 1/2) / 2 = 3/4: 5/8.
    value, kl, win = stats.kl_regularised_optimum([0.0, math.log(3)], [1.0, 2.0], beta=1.0)
    assert value == pytest.approx(1.75)
    assert kl == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert win == pytest.approx(0.625)


def test_kl_regularised_optimum_limits_and_a_plain_loop():
    rng = random.Random(1)
    N = 6
    scores = [rng.gauss(0, 1) for _ in range(N)]
    values = [float(rng.randint(0, 3)) for _ in range(N)]   # small integers: ties happen
    # beta -> infinity: the SFT policy itself (uniform weights): the mean, KL 0, win rate 1/2 against itself
    value, kl, win = stats.kl_regularised_optimum(scores, values, beta=1e9)
    assert value == pytest.approx(sum(values) / N) and kl == pytest.approx(0.0, abs=1e-9) and win == pytest.approx(0.5)
    # beta -> 0: all weight on the top-scoring sample: KL log N
    value, kl, _ = stats.kl_regularised_optimum(scores, values, beta=1e-6)
    assert value == values[scores.index(max(scores))] and kl == pytest.approx(math.log(N))
    # any beta, against a plain loop
    for beta in (0.3, 1.0, 2.0):
        weights = [math.exp(x / beta) for x in scores]
        weights = [w / sum(weights) for w in weights]
        kl_loop = sum(w * math.log(N * w) for w in weights)
        win_loop = 0.0
        for i in range(N):
            for j in range(N):
                win_loop += weights[i] / N * (1.0 if values[i] > values[j] else 0.5 if values[i] == values[j] else 0.0)
        value, kl, win = stats.kl_regularised_optimum(scores, values, beta)
        assert value == pytest.approx(sum(w * v for w, v in zip(weights, values)))
        assert kl == pytest.approx(kl_loop) and win == pytest.approx(win_loop)


# ---------------------------------------------------------------------------------------------
# Gao et al.'s fits


def test_fit_gao_recovers_known_parameters():
    d = np.array([0.0, 0.4, 0.9, 1.3, 2.0, 2.6])
    bon = d * (0.8 - 0.3 * d)
    fit = stats.fit_gao(d, bon, "bon")
    assert fit["alpha"] == pytest.approx(0.8) and fit["beta"] == pytest.approx(0.3), f"best-of-n fit: {fit}"
    assert fit["r2"] == pytest.approx(1.0)
    log_d = np.array([0.0] + [math.log(x) for x in d[1:]])  # d log d -> 0 at d = 0
    rl = d * (1.1 - 0.5 * log_d)
    fit = stats.fit_gao(d, rl, "rl")
    assert fit["alpha"] == pytest.approx(1.1) and fit["beta"] == pytest.approx(0.5), f"RL fit: {fit}"
    assert np.allclose(stats.gao_curve(fit, d, "rl"), rl), "gao_curve must give back the fitted values"


def test_fit_gao_r2_against_plain_formula_and_too_few_points():
    d = [0.0, 1.0, 2.0, 3.0]
    gain = [0.0, 1.0, 1.0, 0.5]
    fit = stats.fit_gao(d, gain, "bon")
    predicted = [x * (fit["alpha"] - fit["beta"] * x) for x in d]
    mean = sum(gain) / len(gain)
    r2 = 1 - sum((g - p) ** 2 for g, p in zip(gain, predicted)) / sum((g - mean) ** 2 for g in gain)
    assert fit["r2"] == pytest.approx(r2), f"R^2: expected {r2}, got {fit['r2']}"
    assert 0 < fit["r2"] < 1
    assert stats.fit_gao([0.0, 1.0], [0.0, 1.0], "rl") is None, "two points cannot judge a two-parameter fit"
    with pytest.raises(ValueError):
        stats.fit_gao(d, gain, "ppo")


def test_ppo_trajectory_prefers_held_out_keys_then_falls_back(tmp_path):
    path = tmp_path / "ppo_metrics.jsonl"
    assert evaluate.ppo_trajectory(str(path)) is None, "no metrics file: no trajectory"
    with MetricsLogger(path) as log:
        log.log(1, **{"objective/kl": 0.5, "objective/gold": 3.0, "objective/scores": 0.2})
        log.log(2, **{"objective/kl": 1.5, "objective/gold": 3.5, "objective/scores": 0.6})
    trajectory = evaluate.ppo_trajectory(str(path))
    assert trajectory["source"].startswith("objective") and trajectory["kl"] == [0.5, 1.5]
    assert trajectory["rm"] == [0.2, 0.6]
    with MetricsLogger(path, append=True) as log:
        log.log(2, **{"eval/kl": 1.2, "eval/gold": 3.4, "eval/rm": 0.5})
    trajectory = evaluate.ppo_trajectory(str(path))
    assert trajectory["source"].startswith("eval") and trajectory["gold"] == [3.4] and trajectory["step"] == [2]


def test_rm_against_gold_on_a_models_own_samples_hand_worked():
    """Two prompts x 3 samples. Gold orders each prompt's samples; the RM gets prompt 1 right and
    prompt 2 half wrong. Pairs with equal gold scores are not counted."""
    prompts = ["what does a cow eat?", "praise the dog."]
    texts = [["A cow eats grass.", "The dog is kind, brave and gentle."],        # gold 8, 8
             ["A cow eats hay.", "The dog is kind."],                             # gold 5, 6
             ["A cow eats hay.", "The dog is kind and brave."]]                   # gold 5 (= sample 1), 7
    S, N = 3, 2
    gold = np.array([[labeler.score(p, texts[j][i]).total for i, p in enumerate(prompts)] for j in range(S)])
    assert gold[0, 0] > gold[1, 0] == gold[2, 0], "prompt 1: the right fact first, then two equal wrong ones"
    assert gold[0, 1] > gold[2, 1] > gold[1, 1], "prompt 2: more kind words score higher"
    answers = evaluate.Answers(texts=texts, ended=np.ones((S, N), bool), gold=gold, parts={}, length=np.ones((S, N)),
                               kl=None, greedy_texts=[], greedy_ended=np.ones(N, bool), greedy_gold=np.zeros(N),
                               greedy_parts={})
    # prompt 1: RM puts the right answer first (2 counted pairs, both right; the tied pair is not counted)
    # prompt 2: RM order 1 > 2 > 0 against gold 0 > 2 > 1: pairs (0,1) wrong, (0,2) wrong, (1,2) wrong
    answers.rm = np.array([[2.0, 0.0], [1.0, 2.0], [0.5, 1.0]])
    report = evaluate.rm_against_gold(answers, prompts)
    assert report["rm/gold_accuracy/facts"] == 1.0
    assert report["rm/gold_accuracy/kindness"] == 0.0
    assert report["rm/gold_accuracy"] == pytest.approx(2 / 5)
    assert report["rm/gold_accuracy/correctness"] == pytest.approx(2 / 5), "every counted pair differs in `correct`"
    assert "rm/gold_accuracy/form" not in report, "no counted pair is equally correct"
    assert report["rm/gold_top_choice"] == pytest.approx(1 / 2)
    assert "rm/gold_accuracy/all" not in report


def test_side_by_side_prompts_take_the_families_in_turn():
    prompts = ["what does a cow eat?", "what does a dog eat?", "what is 3 plus 4?", "praise the dog.",
               "what is 4 minus 1?"]
    chosen = evaluate.side_by_side_prompts(prompts, 3)
    assert chosen == [0, 2, 3], f"one prompt per family first, got {chosen}"
    assert sorted(evaluate.side_by_side_prompts(prompts, 10)) == list(range(5))


# ---------------------------------------------------------------------------------------------
# KL to SFT


def toy_tokenizer(folder) -> Tokenizer:
    rng = random.Random(0)
    tasks = world.all_tasks()
    text = " ".join(t.prompt + " " + world.good_response(t, rng) for t in rng.sample(tasks, 300))
    save_ranks(train_bpe(text, 300), os.path.join(folder, "tokenizer.tiktoken"))
    return Tokenizer.from_file(os.path.join(folder, "tokenizer.tiktoken"))


def toy_gpt(tokenizer, seed) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=96, n_layer=1, n_head=2, d_model=32)).eval()


def test_sequence_kl_matches_a_plain_forward_per_row(tmp_path):
    tokenizer = toy_tokenizer(tmp_path)
    policy, reference = toy_gpt(tokenizer, 1), toy_gpt(tokenizer, 2)
    prompts = [render_chat(tokenizer, p) for p in ("what does a cow eat?", "praise the dog.", "what is 3 plus 4?")]
    temperature = 0.7
    generation = generate(policy, prompts, max_new_tokens=12, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                          temperature=temperature, generator=torch.Generator().manual_seed(0))
    got = evaluate.sequence_kl(reference, generation, temperature)

    for row, prompt in enumerate(prompts):
        response = [t for t, keep in zip(generation.response_ids[row].tolist(), generation.response_mask[row].tolist())
                    if keep]
        ids = torch.tensor([prompt + response])  # the row alone: no padding, no mask
        expected = 0.0
        with torch.no_grad():
            logits_policy = policy(ids).logits[0] / temperature
            logits_reference = reference(ids).logits[0] / temperature
        for t, token in enumerate(response):
            position = len(prompt) - 1 + t  # the logits that predict response token t
            expected += (torch.log_softmax(logits_policy[position], -1)[token]
                         - torch.log_softmax(logits_reference[position], -1)[token]).item()
        assert got[row].item() == pytest.approx(expected, abs=1e-4), f"row {row}: KL {got[row].item()} != {expected}"
    to_itself = evaluate.sequence_kl(policy, generation, temperature)
    assert to_itself.abs().max().item() < 1e-4, f"the sampler's KL to itself must be ~0, got {to_itself}"


# ---------------------------------------------------------------------------------------------
# the script


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
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *args])
    code = 0
    try:
        run_main(evaluate.main)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_smoke_preset_end_to_end(toy_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("base.pt", "sft.pt", "ppo.pt", "rm.pt", "ppo_metrics.jsonl"):
        os.link(os.path.join(toy_run["out"], name), out / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "evaluate.py", "--preset", "smoke", "--data-dir", toy_run["data"],
                             "--out-dir", str(out), "--device", "cpu"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"evaluate.py --preset smoke failed:\n{result.stdout[-2000:]}\n{result.stderr}"
    for name in ("eval.json", "eval.md", "eval.png", "eval_bon.png"):
        assert (out / name).stat().st_size > 0, f"{name} was not written"

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
