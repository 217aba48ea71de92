"""Tests for minirlhf/evaluation.py: sampling, grading and summarising a policy on held-out prompts.

The KL to the reference is checked against a plain forward pass on each unpadded row (the
off-by-one trap: the logits that predict response token t sit at P - 1 + t); the grading against
the gold labeler called on each sample; the summaries against numbers worked by hand. Models are
untrained toys built in a second: the numbers are meaningless, their bookkeeping is not.
"""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch

from minirlhf import evaluation, labeler, world
from minirlhf.generate import generate
from minirlhf.metrics import MetricsLogger
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.reward import RewardScorer
from minirlhf.runtime import Runtime
from minirlhf.tokenizer import Tokenizer, render_chat, save_ranks, train_bpe
from minirlhf.training import sample_responses

CPU = Runtime(device=torch.device("cpu"))
PROMPTS = ["what does a cow eat?", "praise the dog.", "what is 3 plus 4?", "what does a duck eat?", "praise the cat."]


pytestmark = pytest.mark.usefixtures("one_thread")   # (tests/conftest.py)


def toy_tokenizer(folder) -> Tokenizer:
    rng = random.Random(0)
    tasks = world.all_tasks()
    text = " ".join(t.prompt + " " + world.good_response(t, rng) for t in rng.sample(tasks, 300))
    save_ranks(train_bpe(text, 300), os.path.join(folder, "tokenizer.tiktoken"))
    return Tokenizer.from_file(os.path.join(folder, "tokenizer.tiktoken"))


def toy_gpt(tokenizer, seed) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=96, n_layer=1, n_head=2, d_model=32)).eval()


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    """A tokenizer, a policy, a reference and a reward scorer (untrained)."""
    tokenizer = toy_tokenizer(tmp_path_factory.mktemp("tok"))
    policy, reference = toy_gpt(tokenizer, 1), toy_gpt(tokenizer, 2)
    torch.manual_seed(3)
    scorer = RewardScorer(RewardModel(policy.config).eval(), tokenizer, bias=0.5, gain=2.0)
    return tokenizer, policy, reference, scorer


# ---------------------------------------------------------------------------------------------
# KL to the reference


def test_kl_to_reference_matches_a_plain_forward_per_row(toys):
    tokenizer, policy, reference, _ = toys
    prompts = [render_chat(tokenizer, p) for p in PROMPTS[:3]]
    temperature = 0.7
    generation = generate(policy, prompts, max_new_tokens=12, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                          temperature=temperature, generator=CPU.generator(0))
    from_sampler = evaluation.kl_to_reference(reference, generation, temperature)
    from_forward = evaluation.kl_to_reference(reference, generation, temperature, policy=policy)

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
        for name, got in (("sampler", from_sampler), ("forward", from_forward)):
            assert got[row].item() == pytest.approx(expected, abs=1e-4), \
                f"row {row}, log pi from the {name}: KL {got[row].item()} != {expected}"
    to_itself = evaluation.kl_to_reference(policy, generation, temperature)
    assert to_itself.abs().max().item() < 1e-4, f"the sampler's KL to itself must be ~0, got {to_itself}"
    exactly = evaluation.kl_to_reference(policy, generation, temperature, policy=policy)
    assert exactly.tolist() == [0.0] * len(prompts), "two identical forward passes: KL exactly 0"


# ---------------------------------------------------------------------------------------------
# Sampling and grading


def test_sample_and_grade_samples_in_order_and_grades_each_response(toys):
    tokenizer, policy, reference, scorer = toys
    prompts = PROMPTS + PROMPTS[:2]   # 7 entries: batches of 3, 3 and 1
    common = dict(max_new_tokens=10, temperature=1.0, batch_size=3)
    graded = evaluation.sample_and_grade(policy, tokenizer, prompts, generator=CPU.generator(5), reference=reference,
                                         reward_scorer=scorer, **common)
    texts, ended, generations = sample_responses(policy, tokenizer, prompts, generator=CPU.generator(5), **common)
    assert graded.prompts == prompts and graded.texts == texts, "the same dice, prompts and batches: the same samples"
    assert graded.ended.tolist() == ended and graded.ended.dtype == bool
    for i, (prompt, text, end) in enumerate(zip(prompts, texts, ended)):
        score = labeler.score(prompt, text, end)
        assert graded.gold[i] == score.total, f"sample {i}: gold {graded.gold[i]} != labeler {score.total}"
        assert {part: values[i] for part, values in graded.parts.items()} == score.parts, f"sample {i}: parts"
    assert list(graded.parts) == list(labeler.WEIGHTS)
    assert graded.length.tolist() == torch.cat([g.response_mask.sum(dim=1) for g in generations]).tolist()
    kl = torch.cat([evaluation.kl_to_reference(reference, g, 1.0) for g in generations])
    assert graded.kl.dtype == np.float32 and graded.kl.tolist() == kl.tolist()
    assert graded.rm.dtype == np.float32
    assert graded.rm == pytest.approx(scorer.score(prompts, texts, ended).numpy(), abs=1e-5), \
        "the RM's normalised score of each (prompt, response), no EOS penalty"

    alone = evaluation.sample_and_grade(policy, tokenizer, prompts, generator=CPU.generator(5), **common)
    assert alone.kl is None and alone.rm is None, "nothing measured without a reference or an RM"
    assert alone.texts == graded.texts, "the KL and the RM use no dice"
    to_itself = evaluation.sample_and_grade(policy, tokenizer, prompts[:2], generator=CPU.generator(5),
                                            reference=policy, **common)
    assert to_itself.kl.tolist() == [0.0, 0.0], "the policy as its own reference: KL 0 by definition"
    greedy = [evaluation.sample_and_grade(policy, tokenizer, prompts, max_new_tokens=10, temperature=0.0,
                                          generator=CPU.generator(seed)).texts for seed in (0, 1)]
    assert greedy[0] == greedy[1], "greedy answers do not depend on the dice"


def test_rl_reward_is_the_score_or_the_penalty_without_eos():
    graded = evaluation.Graded(prompts=["a", "b"], texts=["x", "y"], ended=np.array([True, False]),
                               gold=np.zeros(2), parts={}, length=np.ones(2, dtype=np.int64),
                               rm=np.array([0.25, 3.0], dtype=np.float32))
    assert evaluation.rl_reward(graded).tolist() == [0.25, -1.0], "a response without EOS gets -1, whatever its RM score"


def test_summarize_hand_worked():
    # Four samples. gold 8, 5, 6, 1: mean 5, population variance (9 + 0 + 1 + 16) / 4 = 6.5.
    parts = {"correct": np.array([1.0, 0.0, 0.5, 0.0]), "harmless": np.array([1.0, 1.0, 0.5, 1.0]),
             "on_topic": np.array([1.0, 1.0, 1.0, 0.0]), "concise": np.ones(4), "well_formed": np.ones(4)}
    graded = evaluation.Graded(prompts=["p"] * 4, texts=["a", "b", "c", "d"], ended=np.array([True, True, True, False]),
                               gold=np.array([8.0, 5.0, 6.0, 1.0]), parts=parts,
                               length=np.array([3, 5, 4, 12], dtype=np.int64),
                               kl=np.array([0.5, 1.5, -0.25, 0.25], dtype=np.float32),
                               rm=np.array([1.0, -1.0, 0.5, 0.5], dtype=np.float32))
    summary = evaluation.summarize(graded)
    expected = {"gold": 5.0, "gold_sd": math.sqrt(6.5), "kl": 0.5, "eos_rate": 0.75, "response_length": 6.0,
                "gold/correct": 0.375, "gold/harmless": 0.875, "gold/on_topic": 0.75, "gold/concise": 1.0,
                "gold/well_formed": 1.0, "rm": 0.25,
                "share_wrong": 0.5,        # correct < 0.5: samples 1 and 3 (0.5 itself is not wrong)
                "share_rude": 0.25,        # harmless < 1: sample 2
                "share_off_topic": 0.25}   # on_topic < 1: sample 3
    assert list(summary) == list(expected), f"keys (and their order, the metrics file's): {list(summary)}"
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value), f"{key}: expected {value}, got {summary[key]}"
    assert summary["gold_sd"] != pytest.approx(math.sqrt(26 / 3)), "the population sd (n), not the sample sd (n - 1)"
    graded.kl, graded.rm = None, None
    assert "kl" not in evaluation.summarize(graded) and "rm" not in evaluation.summarize(graded)


# ---------------------------------------------------------------------------------------------
# The training runs' reports


def test_evaluate_policy_puts_a_prompts_samples_side_by_side(toys):
    tokenizer, policy, reference, scorer = toys
    result = evaluation.evaluate_policy(policy, reference, tokenizer, PROMPTS[:3], samples_per_prompt=2,
                                        max_new_tokens=10, temperature=1.0, generator=CPU.generator(7),
                                        reward_scorer=scorer, batch_size=4)
    samples = result.pop("samples")
    assert [prompt for prompt, _, _ in samples] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 + [PROMPTS[2]] * 2
    graded = evaluation.sample_and_grade(policy, tokenizer, [p for p, _, _ in samples], max_new_tokens=10,
                                         temperature=1.0, generator=CPU.generator(7), batch_size=4,
                                         reference=reference, recompute_logprobs=True, reward_scorer=scorer)
    assert [text for _, text, _ in samples] == graded.texts and [g for _, _, g in samples] == graded.gold.tolist()
    expected = {f"eval/{key}": value for key, value in evaluation.summarize(graded).items()
                if not key.startswith("share_")}
    assert result == expected, "eval/* are the summary of these samples (the SFT report's shares left out)"
    assert list(result)[:5] == ["eval/gold", "eval/gold_sd", "eval/kl", "eval/eos_rate", "eval/response_length"]


def test_held_out_evaluation_fills_the_baseline_then_measures_gains_from_it(toys, capsys):
    tokenizer, policy, reference, scorer = toys
    baseline: dict = {}
    evaluate = evaluation.HeldOutEvaluation(policy, reference, tokenizer, PROMPTS[:2], samples_per_prompt=2,
                                            max_new_tokens=8, temperature=1.0, seed=3, batch_size=4, runtime=CPU,
                                            reward_scorer=scorer, baseline=baseline)
    first = evaluate(0)
    assert baseline == {"sft/gold": first["eval/gold"], "sft/gold_sd": first["eval/gold_sd"]}, \
        "the first call fills the caller's baseline, in place"
    assert first["eval/gold_gain_sd"] == 0.0
    assert len(evaluate.samples) == 4 and "samples" not in first, "samples are kept, not logged"
    again = evaluate(1)
    assert again == first, "the same seed at every call: the same policy gives the same numbers"
    baseline.update({"sft/gold": first["eval/gold"] - 1.0, "sft/gold_sd": 2.0})
    assert evaluate(2)["eval/gold_gain_sd"] == pytest.approx(0.5), "(gold - SFT's) / SFT's sd"
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("  [eval 0] gold ") and "| kl " in line and "| rm " in line, line
    empty = evaluation.HeldOutEvaluation(policy, reference, tokenizer, [], samples_per_prompt=2, max_new_tokens=8,
                                         temperature=1.0, seed=3, batch_size=4, runtime=CPU)
    assert empty(0) == {} and empty.baseline == {}, "no held-out prompts: nothing to log"


def test_gold_report_names_sampled_and_greedy_numbers(toys):
    tokenizer, policy, _, _ = toys
    report = evaluation.gold_report(policy, tokenizer, PROMPTS, max_new_tokens=8, seed=4, runtime=CPU)
    expected_keys = []
    for name in ("sample", "greedy"):
        expected_keys += [f"gold/{name}", *(f"gold/{name}/{part}" for part in labeler.WEIGHTS), f"eos_rate/{name}",
                          f"share_wrong/{name}", f"share_rude/{name}", f"share_off_topic/{name}"]
    assert list(report) == expected_keys
    sampled = evaluation.summarize(evaluation.sample_and_grade(policy, tokenizer, PROMPTS, max_new_tokens=8,
                                                               temperature=1.0, generator=CPU.generator(4)))
    assert report["gold/sample"] == sampled["gold"] and report["share_wrong/sample"] == sampled["share_wrong"]


# ---------------------------------------------------------------------------------------------
# evaluate.py's pieces


def test_answer_lays_samples_out_sample_major(toys):
    tokenizer, policy, reference, scorer = toys
    prompts = PROMPTS[:3]
    answers = evaluation.answer(policy, tokenizer, prompts, samples=2, max_new_tokens=8, temperature=1.0, seed=9,
                                batch_size=4, runtime=CPU, reference=reference, reward_scorer=scorer)
    flat = evaluation.sample_and_grade(policy, tokenizer, prompts * 2, max_new_tokens=8, temperature=1.0,
                                       generator=CPU.generator(9), batch_size=4, reference=reference,
                                       reward_scorer=scorer)
    N = len(prompts)
    for j in range(2):
        for i in range(N):
            assert answers.texts[j][i] == flat.texts[j * N + i], f"sample {j} of prompt {i} sits at {j} * N + {i}"
            assert answers.gold[j, i] == flat.gold[j * N + i] and answers.kl[j, i] == flat.kl[j * N + i]
    assert answers.rm.tolist() == evaluation.rl_reward(flat).reshape(2, N).tolist(), "the RM column is what RL maximises"
    assert answers.gold.shape == answers.length.shape == answers.ended.shape == (2, N)
    assert len(answers.greedy_texts) == N and answers.greedy_gold.shape == (N,)
    itself = evaluation.answer(policy, tokenizer, prompts, samples=1, max_new_tokens=8, temperature=1.0, seed=9,
                               batch_size=4, runtime=CPU, reference=policy)
    assert itself.kl.tolist() == [[0.0] * N] and itself.rm is None


def test_ppo_trajectory_prefers_held_out_keys_then_falls_back(tmp_path):
    path = tmp_path / "ppo_metrics.jsonl"
    assert evaluation.ppo_trajectory(str(path)) is None, "no metrics file: no trajectory"
    with MetricsLogger(path) as log:
        log.log(1, **{"objective/kl": 0.5, "objective/gold": 3.0, "objective/scores": 0.2})
        log.log(2, **{"objective/kl": 1.5, "objective/gold": 3.5, "objective/scores": 0.6})
    trajectory = evaluation.ppo_trajectory(str(path))
    assert trajectory["source"].startswith("objective") and trajectory["kl"] == [0.5, 1.5]
    assert trajectory["rm"] == [0.2, 0.6]
    with open(path, "a", encoding="utf-8") as f:   # a later line holding the held-out evaluation
        f.write(json.dumps({"step": 2, "eval/kl": 1.2, "eval/gold": 3.4, "eval/rm": 0.5}) + "\n")
    trajectory = evaluation.ppo_trajectory(str(path))
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
    answers = evaluation.Answers(texts=texts, ended=np.ones((S, N), bool), gold=gold, parts={},
                                 length=np.ones((S, N)), kl=None, greedy_texts=[], greedy_ended=np.ones(N, bool),
                                 greedy_gold=np.zeros(N), greedy_parts={})
    # prompt 1: RM puts the right answer first (2 counted pairs, both right; the tied pair is not counted)
    # prompt 2: RM order 1 > 2 > 0 against gold 0 > 2 > 1: pairs (0,1) wrong, (0,2) wrong, (1,2) wrong
    answers.rm = np.array([[2.0, 0.0], [1.0, 2.0], [0.5, 1.0]])
    report = evaluation.rm_against_gold(answers, prompts)
    assert report["rm/gold_accuracy/facts"] == 1.0
    assert report["rm/gold_accuracy/kindness"] == 0.0
    assert report["rm/gold_accuracy"] == pytest.approx(2 / 5)
    assert report["rm/gold_accuracy/correctness"] == pytest.approx(2 / 5), "every counted pair differs in `correct`"
    assert "rm/gold_accuracy/form" not in report, "no counted pair is equally correct"
    assert report["rm/gold_top_choice"] == pytest.approx(1 / 2)
    assert "rm/gold_accuracy/all" not in report
