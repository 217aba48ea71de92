"""Tests for the reward-model stage: collecting comparisons (minirlhf/labeling.py), the RM's
batches, metrics and normalisation (minirlhf/reward.py), and train_rm.py end to end.

The losses themselves (pairwise, K-wise, classifier) are graded in tests/test_losses.py; here we
check what the stage builds on top of them: that a batch of comparisons reaches the loss in the
right order (best first, whatever order the file lists the responses in), that prompts with
different K share a batch correctly, that PAD never changes a reward, that normalisation gives
mean 0 / std 1 and keeps every ranking, that the human labelling UI re-asks on a typo and resumes,
and that bad input gives one clear line and exit code 2.

Every model here is a tiny random GPT (1 layer, d=32) with a tokenizer trained in a second on
tiny-world text, so the whole file runs in seconds. One test runs `train_rm.py --preset smoke` as
a real subprocess; the others call `main()` in-process.
"""

import io
import json
import math
import os
import random
import subprocess
import sys
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from minirlhf import labeler, labeling, world
from minirlhf.checkpoint import load_checkpoint, save_checkpoint
from minirlhf.cli import UserError
from minirlhf.data import write_jsonl
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.ppo import score_rollout
from minirlhf.reward import (MISSING_EOS_PENALTY, RewardScorer, task_reward, comparison_loss, encode_ranked, fit_normalisation, gold_agreement, score_rows,
                             load_reward_model, pairwise_accuracy, pairwise_counts)
from minirlhf.tokenizer import Tokenizer
from minirlhf.training import sample_responses
from helpers import assert_smoke_run_wrote, run_in_process, toy_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_rm  # noqa: E402

TINY = dict(n_layer=1, n_head=2, d_model=32, block_size=96)


# ---------------------------------------------------------------------------------------------
# fixtures: a tokenizer, prompts and a random "SFT" checkpoint in a temporary directory
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """data/ (tokenizer + rm_prompts.jsonl) and out/sft.pt, all tiny."""
    rng = random.Random(0)
    tasks = world.all_tasks()
    text = " ".join(world.good_response(rng.choice(tasks), rng) for _ in range(300))
    text += " " + " ".join(t.prompt for t in tasks[::20])
    data_dir, out_dir, tokenizer = toy_world(tmp_path_factory, "rm_stage", text)
    by_family = {f: [t.prompt for t in tasks if t.family == f] for f in world.FAMILIES}
    prompts = [p for f in world.FAMILIES for p in by_family[f][:5]]   # 20 prompts, 5 per family
    write_jsonl(str(data_dir / "rm_prompts.jsonl"), [{"prompt": p} for p in prompts])
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, **TINY)
    save_checkpoint(out_dir / "sft.pt", kind="sft", model_state=GPT(config).state_dict(), model_config=config,
                    tokenizer_identity=tokenizer.identity, train_config={}, step=0, metrics={})
    return {"data": str(data_dir), "out": str(out_dir), "tokenizer": tokenizer, "config": config, "prompts": prompts}


def random_rm(tokenizer, seed=0):
    torch.manual_seed(seed)
    return RewardModel(GPTConfig(vocab_size=tokenizer.vocab_size, **TINY)).eval()


def run_script(monkeypatch, capsys, argv, stdin=None):
    """Run train_rm.main() in-process as the command line would, with `stdin` typed in if given;
    returns (exit code, stdout, stderr)."""
    return run_in_process(train_rm, argv, monkeypatch, capsys, stdin=stdin)


# ---------------------------------------------------------------------------------------------
# batches of comparisons -> the losses
# ---------------------------------------------------------------------------------------------


def plain_ranking_loss(scores_best_first: list[list[float]]) -> float:
    """InstructGPT eq. 1 with Python loops: mean over a prompt's pairs, then over prompts."""
    per_prompt = []
    for scores in scores_best_first:
        pairs = [-math.log(1 / (1 + math.exp(-(scores[i] - scores[j]))))
                 for i, j in combinations(range(len(scores)), 2)]
        per_prompt.append(sum(pairs) / len(pairs))
    return sum(per_prompt) / len(per_prompt)


def alone(model, tokens):
    """The reward of one sequence scored on its own: no batch, no padding."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).item()


def test_comparison_loss_with_mixed_k_matches_a_plain_loop(stage):
    """Prompts with K = 2, 4 and 3 in one batch: each prompt counts once, its pairs averaged."""
    tokenizer, model = stage["tokenizer"], random_rm(stage["tokenizer"])
    comparisons = [
        labeling.RankedComparison("what is 2 plus 3?", ["2 plus 3 is 5.", "It is 7."], [0, 1]),
        labeling.RankedComparison("say something nice about the dog.",
                                  ["The dog is kind.", "No.", "The dog is kind and brave.", "Dogs."], [2, 0, 3, 1]),
        labeling.RankedComparison("what does a cow eat?", ["A cow eats grass.", "A cow", "Cows eat fish."],
                                  [0, 2, 1], ended=[True, False, True]),
    ]
    batch = [encode_ranked(tokenizer, c, 96) for c in comparisons]
    loss, rewards = comparison_loss(model, batch, "ranking", tokenizer.pad_id)
    alone_scores = [[alone(model, tokens) for tokens in responses] for responses in batch]
    assert math.isclose(loss.item(), plain_ranking_loss(alone_scores), rel_tol=1e-5), \
        f"K-wise loss of a mixed-K batch {loss.item()} != plain loop {plain_ranking_loss(alone_scores)}"
    assert rewards.shape == (3, 4), f"rewards grid shape {tuple(rewards.shape)}, expected (3, K_max=4)"
    assert rewards[0, 2:].isnan().all() and rewards[2, 3].isnan(), "missing responses must be NaN in the grid"
    torch.testing.assert_close(rewards[1], torch.tensor(alone_scores[1]), atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"prompt 1's rewards, best first: {m}")
    # a response that did not end is scored without its EOS
    assert batch[2][2][-1] != tokenizer.eos_id and batch[2][0][-1] == tokenizer.eos_id, \
        "ended=False must leave the EOS off (the policy produced none)"


def test_comparison_loss_is_invariant_to_the_order_responses_are_listed(stage):
    """The same ranking presented in a different order (responses shuffled, ranking re-indexed)
    gives the same best-first batch and the same loss: only the ranking decides what is 'better'."""
    tokenizer, model = stage["tokenizer"], random_rm(stage["tokenizer"])
    responses = ["A cow eats grass.", "A cow eats fish.", "You are silly.", "The moon is a rock."]
    ranking = [0, 3, 1, 2]
    listed = labeling.RankedComparison("what does a cow eat?", responses, ranking)
    permutation = [2, 0, 3, 1]   # new position p holds old response permutation[p]
    shuffled = labeling.RankedComparison("what does a cow eat?", [responses[i] for i in permutation],
                                         [permutation.index(i) for i in ranking])
    a = encode_ranked(tokenizer, listed, 96)
    b = encode_ranked(tokenizer, shuffled, 96)
    assert a == b, "best-first token lists differ between two listings of the same ranking"
    loss_a, _ = comparison_loss(model, [a], "ranking", tokenizer.pad_id)
    loss_b, _ = comparison_loss(model, [b], "ranking", tokenizer.pad_id)
    assert loss_a.item() == loss_b.item()
    # and reversing the ranking is NOT the same comparison: the loss changes
    reversed_ = labeling.RankedComparison("what does a cow eat?", responses, ranking[::-1])
    loss_r, _ = comparison_loss(model, [encode_ranked(tokenizer, reversed_, 96)], "ranking", tokenizer.pad_id)
    assert not math.isclose(loss_r.item(), loss_a.item()), "reversing the ranking left the loss unchanged"


def test_classifier_objective_labels_best_good_and_worst_bad(stage):
    """classifier: best -> 1, worst -> 0, BCE on the logit margin; the middle ranks are not scored."""
    tokenizer, model = stage["tokenizer"], random_rm(stage["tokenizer"], seed=3)
    comparisons = [labeling.RankedComparison("what is 4 minus 1?", ["4 minus 1 is 3.", "It is 9.", "Hm."], [0, 2, 1]),
                   labeling.RankedComparison("praise the cat.", ["The cat is kind.", "Bad cat."], [0, 1])]
    batch = [encode_ranked(tokenizer, c, 96) for c in comparisons]
    loss, rewards = comparison_loss(model, batch, "classifier", tokenizer.pad_id)
    margins = [(alone(model, r[0]), alone(model, r[-1])) for r in batch]
    # -[log sigmoid(m_best)] and -[log sigmoid(-m_worst)] = -log(1 - sigmoid(m_worst)), averaged over 2B
    expected = sum(-math.log(1 / (1 + math.exp(-best))) - math.log(1 / (1 + math.exp(worst)))
                   for best, worst in margins) / (2 * len(batch))
    assert math.isclose(loss.item(), expected, rel_tol=1e-5), f"classifier loss {loss.item()} != {expected}"
    assert not rewards.isnan()[0].any() and rewards[1, 2].isnan(), "every response is scored (for accuracy)"
    # the loss reaches the model: a small descent step lowers it
    model.train()
    loss, _ = comparison_loss(model, batch, "classifier", tokenizer.pad_id)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-3 * p.grad
        after, _ = comparison_loss(model, batch, "classifier", tokenizer.pad_id)
    assert after.item() < loss.item(), f"a descent step did not lower the classifier loss: {loss.item()} -> {after.item()}"


def test_comparison_loss_rejects_an_unknown_objective(stage):
    tokenizer = stage["tokenizer"]
    batch = [encode_ranked(tokenizer, labeling.RankedComparison("hi", ["a", "b"], [0, 1]), 96)]
    with pytest.raises(ValueError, match="objective"):
        comparison_loss(random_rm(tokenizer), batch, "pointwise", tokenizer.pad_id)


def test_reward_ignores_appended_pad_and_the_pad_id(stage):
    """The reward is read at the last real token: more PAD columns, or another id in the PAD
    slots, change nothing (a reward read at position -1 would change with both)."""
    tokenizer, model = stage["tokenizer"], random_rm(stage["tokenizer"], seed=1)
    from minirlhf.tokenizer import render_chat
    rows = [render_chat(tokenizer, "what does a cow eat?", "A cow eats grass."),
            render_chat(tokenizer, "what is 2 plus 2?", "4.")]
    T = max(map(len, rows))
    ids = torch.full((2, T + 5), tokenizer.pad_id)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
    with torch.no_grad():
        base = model(ids[:, :T], attention_mask=mask[:, :T])
        more_pad = model(ids, attention_mask=mask)
        other_pad_id = model(ids.masked_fill(mask == 0, tokenizer.eos_id), attention_mask=mask)
    expected = torch.tensor([alone(model, row) for row in rows])
    for name, got in (("minimal padding", base), ("5 more PAD", more_pad), ("PAD slots hold EOS", other_pad_id)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_score_rows_in_length_chunks_keeps_the_order_and_the_gradient(stage):
    """Chunks of 2 rows sorted by length give the same rewards, in the given order, as scoring
    each row alone; and the gradient reaches every chunk."""
    tokenizer, model = stage["tokenizer"], random_rm(stage["tokenizer"], seed=2)
    from minirlhf.reward import score_rows
    from minirlhf.tokenizer import render_chat
    texts = ["A cow eats grass and hay in the big barn.", "", "Hi.", "The moon is a big rock. It shines.", "4."]
    rows = [render_chat(tokenizer, "what does a cow eat?", t) for t in texts]
    chunked = score_rows(model, rows, tokenizer.pad_id, rows_per_chunk=2)
    expected = torch.tensor([alone(model, row) for row in rows])
    torch.testing.assert_close(chunked.detach(), expected, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"chunked rewards, in row order: {m}")
    chunked.sum().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_bf16_rewards_loss_and_scores_come_out_fp32(stage):
    """--dtype bf16: the blocks run under bf16 autocast, but the rewards, the loss and the
    normalised scores are fp32 (the trunk hands out fp32 hidden states and the scalar head runs
    outside autocast), and they stay close to the fp32 model's."""
    from minirlhf.reward import RewardScorer
    from minirlhf.runtime import Runtime

    tokenizer = stage["tokenizer"]
    fp32_model = random_rm(tokenizer)
    bf16_model = Runtime(torch.device("cpu"), dtype="bf16").prepare(random_rm(tokenizer))
    comparison = labeling.RankedComparison("what does a cow eat?", ["A cow eats grass.", "Cows eat fish.", "No."],
                                           [0, 1, 2])
    batch = [encode_ranked(tokenizer, comparison, 96)]
    loss, rewards = comparison_loss(bf16_model, batch, "ranking", tokenizer.pad_id)
    fp32_loss, fp32_rewards = comparison_loss(fp32_model, batch, "ranking", tokenizer.pad_id)
    assert loss.dtype == rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, fp32_rewards, atol=0.05, rtol=0.05)   # bf16: ~3 significant digits
    torch.testing.assert_close(loss, fp32_loss, atol=0.05, rtol=0.05)
    scores = RewardScorer(bf16_model, tokenizer, bias=0.5, gain=2.0).score([comparison.prompt] * 3,
                                                                          comparison.responses)
    assert scores.dtype == torch.float32


def test_pairwise_counts_add_up_over_shards():
    """Accuracy from counts: two halves of a grid, their counts added, give the whole grid's accuracy
    (what data-parallel ranks do with their shares of the held-out set)."""
    from minirlhf.reward import pairwise_counts

    grid = torch.tensor([[3.0, 1.0, 2.0], [5.0, 5.0, math.nan], [0.0, 1.0, 2.0]])
    assert pairwise_counts(grid) == (2.5, 7.0)   # 2/3 + 1/2 + 0/3
    halves = [pairwise_counts(grid[:2]), pairwise_counts(grid[2:])]
    correct, pairs = (sum(column) for column in zip(*halves))
    assert correct / pairs == pairwise_accuracy(grid) == 2.5 / 7


# ---------------------------------------------------------------------------------------------
# metrics and normalisation
# ---------------------------------------------------------------------------------------------


def test_pairwise_accuracy_hand_worked():
    # row 0: 3>1 yes, 3>2 yes, 1>2 no -> 2/3; row 1 (K=2, NaN padded): 5 = 5 tie -> 1/2
    rewards = torch.tensor([[3.0, 1.0, 2.0], [5.0, 5.0, math.nan]])
    assert math.isclose(pairwise_accuracy(rewards), (2 + 0.5) / 4)
    assert math.isnan(pairwise_accuracy(torch.tensor([[1.0, math.nan]]))), "no pair -> NaN"


def test_fit_normalisation_gives_mean_0_std_1_and_keeps_the_order():
    assert fit_normalisation(torch.tensor([1.0, 3.0])) == pytest.approx((2.0, 1 / math.sqrt(2)))
    raw = torch.tensor([4.1, -2.0, 0.3, 7.7, 1.9, 1.8])
    bias, gain = fit_normalisation(raw)
    normalised = (raw - bias) * gain
    assert abs(normalised.mean().item()) < 1e-6 and abs(normalised.std().item() - 1) < 1e-6, \
        f"normalised mean {normalised.mean().item()}, std {normalised.std().item()}; expected 0 and 1"
    assert torch.equal(normalised.argsort(), raw.argsort()), "normalisation changed the order of the scores"
    grid = torch.tensor([[4.1, -2.0, 0.3], [7.7, 1.9, 1.8]])
    assert pairwise_accuracy((grid - bias) * gain) == pairwise_accuracy(grid)
    assert fit_normalisation(torch.tensor([2.0, 2.0, 2.0])) == (2.0, 1.0), "a constant sample keeps gain 1"


def test_gold_agreement_hand_worked():
    """Two prompts; the RM agrees with gold on 2 of the 3 differing pairs of the first and the
    single pair of the second (the tied-gold pair is skipped)."""
    cow = "what does a cow eat?"
    good, wrong, rude = "A cow eats grass.", "A cow eats fish.", "You are stupid."
    gold = [labeler.score(cow, r).total for r in (good, wrong, rude)]
    assert gold[0] > gold[1] > gold[2], f"the rubric's order changed: {gold}"
    comparisons = [labeling.RankedComparison(cow, [good, wrong, rude], [0, 1, 2]),
                   labeling.RankedComparison("what is 2 plus 3?", ["2 plus 3 is 5.", "2 plus 3 is 5."], [0, 1]),
                   labeling.RankedComparison("praise the dog.", ["The dog is kind.", "The dog is bad."], [0, 1])]
    rm = [[1.0, 3.0, 0.0], [0.0, 1.0], [2.0, -1.0]]   # cow: good<wrong (miss), good>rude, wrong>rude
    report, rm_flat, gold_flat = gold_agreement(comparisons, rm)
    assert report["gold/accuracy"] == pytest.approx(3 / 4)
    assert report["gold/accuracy/facts"] == pytest.approx(2 / 3)
    assert report["gold/accuracy/kindness"] == 1.0
    assert "gold/accuracy/arithmetic" not in report, "a prompt whose pairs all tie in gold has no accuracy"
    # correctness differs in good/wrong (missed), good/rude and the two dog answers; wrong/rude are both wrong
    assert report["gold/accuracy/correctness"] == pytest.approx(2 / 3)
    assert report["gold/accuracy/form"] == 1.0
    assert report["gold/top_choice"] == pytest.approx(2 / 3), "cow: the RM's favourite is the wrong answer"
    # within-prompt Spearman: cow ranks rm [2, 3, 1] vs gold [3, 2, 1] -> 0.5; the tied sum is skipped; dog 1.0
    assert report["gold/spearman_within"] == pytest.approx((0.5 + 1.0) / 2)
    assert len(rm_flat) == len(gold_flat) == 7
    assert rm_flat[:3] == pytest.approx([-1 / 3, 5 / 3, -4 / 3]), "scatter values are deviations from the prompt's mean"


# ---------------------------------------------------------------------------------------------
# labelers: agreement, the human UI, files
# ---------------------------------------------------------------------------------------------


def test_expected_agreement_and_accuracy_bound_hand_worked():
    # gold [6, 4], noise 2: p = sigmoid(1) = 0.7311; agreement p^2 + (1-p)^2 = 0.6067; bound max(p, 1-p)
    p = 1 / (1 + math.exp(-1))
    assert labeling.expected_agreement([[6.0, 4.0]], 2.0) == pytest.approx(p * p + (1 - p) ** 2)
    assert labeling.accuracy_bound([[6.0, 4.0]], 2.0) == pytest.approx(p)
    assert labeling.expected_agreement([[6.0, 4.0, 1.0]], 0.0) == 1.0, "noise 0: labelers always agree"
    assert labeling.expected_agreement([[5.0, 5.0]], 1.0) == pytest.approx(0.5), "a gold tie is a coin flip"
    assert labeling.accuracy_bound([[5.0, 5.0]], 1.0) == pytest.approx(0.5), "no RM can call a coin flip"


def test_simulated_agreement_matches_the_closed_form():
    """Two simulated labelers (labeler.rank with noise) agree as often as p^2 + (1-p)^2 says."""
    prompt = "what does a cow eat?"
    responses = ["A cow eats grass.", "A cow eats fish.", "Cows eat grass and fish.", "You are silly.",
                 "The moon is a big rock.", ""]
    group = labeling.Candidates(prompt, responses, [True] * len(responses))
    totals = labeling.gold_totals(group)
    noise = 1.0
    simulated = labeling.simulated_agreement([group], noise, random.Random(0), rounds=1500)
    expected = labeling.expected_agreement([totals], noise)
    assert abs(simulated - expected) < 0.015, f"simulated agreement {simulated:.4f} vs closed form {expected:.4f}"


def test_noise_for_agreement_round_trip():
    groups = [[7.5, 6.0, 3.2, 2.5], [8.0, 7.9, 1.0, 4.4], [5.0, 2.0, 3.0, 6.5]]
    noise = labeling.noise_for_agreement(groups, 0.73)
    assert labeling.expected_agreement(groups, noise) == pytest.approx(0.73, abs=1e-6)
    assert math.isnan(labeling.noise_for_agreement(groups, 0.4)), "agreement never goes below 0.5"


@pytest.mark.parametrize("text, k, expected", [
    ("2 4 1 3", 4, [1, 3, 0, 2]),
    ("2,4,1,3", 4, [1, 3, 0, 2]),
    ("  3 1 2 ", 3, [2, 0, 1]),
    ("2413", 4, [1, 3, 0, 2]),
    ("2 2 1 3", 4, None),     # a repeat
    ("1 2 3", 4, None),       # one missing
    ("1 2 3 5", 4, None),     # out of range
    ("a b c d", 4, None),
    ("", 4, None),
])
def test_parse_ranking(text, k, expected):
    ranking, problem = labeling.parse_ranking(text, k)
    assert ranking == expected, f"parse_ranking({text!r}, {k}) = {ranking}, expected {expected}"
    assert (problem == "") == (expected is not None), f"the message for {text!r} was {problem!r}"


def scripted(answers):
    """An `input` replacement that types `answers` one by one, then Ctrl-D (EOFError)."""
    queue = list(answers)

    def ask(prompt_text):
        if not queue:
            raise EOFError
        return queue.pop(0)
    return ask


def test_human_labeling_reasks_on_typos_saves_as_it_goes_and_resumes(tmp_path):
    groups = [labeling.Candidates("what does a cow eat?", ["Grass.", "Fish.", "Hay.", "Rocks."], [True, True, False, True]),
              labeling.Candidates("what is 2 plus 2?", ["4.", "5."], [True, True]),
              labeling.Candidates("praise the dog.", ["Good dog.", "Bad dog.", "Dog."], [True, True, True])]
    answers = str(tmp_path / "human.jsonl")
    out = io.StringIO()
    # a repeat, a letter, then a good answer; then "2 1"; then quit at the third
    result = labeling.label_by_human(groups, answers, ask=scripted(["2 2 1 3", "x", "2 4 1 3", "2 1", "q"]), out=out)
    shown = out.getvalue()
    assert result is None, "quitting must return None (nothing to train on yet)"
    assert shown.count("  ? ") == 2, f"each of the two typos must be explained once:\n{shown}"
    assert "[did not stop" in shown and "[1/3]" in shown and "[3/3]" in shown, f"progress/flags missing:\n{shown}"
    lines = [json.loads(line) for line in open(answers)]
    assert [line["ranking"] for line in lines] == [[1, 3, 0, 2], [1, 0]], f"saved rankings: {lines}"
    assert lines[0]["ended"] == [True, True, False, True]

    # the next run skips what is saved and asks only the third group ("3 1 2" -> [2, 0, 1])
    out = io.StringIO()
    result = labeling.label_by_human(groups, answers, ask=scripted(["3 1 2"]), out=out)
    assert "resuming: 2 rankings already saved" in out.getvalue()
    assert [c.ranking for c in result] == [[1, 3, 0, 2], [1, 0], [2, 0, 1]]
    assert len(open(answers).readlines()) == 3, "every answer is one line, written once"
    # Ctrl-D (end of input) behaves as q: the saved lines stay
    assert labeling.label_by_human(groups + [labeling.Candidates("hi", ["a", "b"], [True, True])], answers,
                                   ask=scripted([]), out=io.StringIO()) is None
    assert len(open(answers).readlines()) == 3


def test_ranked_comparisons_round_trip_with_ended(tmp_path):
    path = str(tmp_path / "c.jsonl")
    comparisons = [labeling.RankedComparison("p", ["a", "b", "c"], [2, 0, 1], [True, False, True]),
                   labeling.RankedComparison("q", ["x", "y"], [1, 0])]
    labeling.write_comparisons(path, comparisons)
    first, second = (json.loads(line) for line in open(path))
    assert "ended" in first and "ended" not in second, "ended is written only when a response did not end"
    back = labeling.read_ranked_comparisons(path)
    assert [(c.prompt, c.responses, c.ranking, c.ended) for c in back] == \
        [("p", ["a", "b", "c"], [2, 0, 1], [True, False, True]), ("q", ["x", "y"], [1, 0], [True, True])]


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "chosen": "x", "rejected": "y"}', '{"prompt": "b", "chosen": '], r"c\.jsonl:2: not valid JSON"),
    (['{"prompt": "a", "responses": ["x", "y"]}'], r"c\.jsonl:1: expected fields"),
    (['{"prompt": "a", "chosen": "x", "rejected": "y"}', '{"prompt": "a", "responses": ["x", "y", "z"], '
      '"ranking": [0, 0, 1]}'], r"c\.jsonl:2: 'ranking' must list each index"),
    (['{"prompt": "a", "responses": ["x"], "ranking": [0]}'], r"c\.jsonl:1: 'responses' must be a list of at least 2"),
    (['{"prompt": "a", "responses": ["x", "y"], "ranking": [1, 0], "ended": [true]}'], r"c\.jsonl:1: 'ended' must"),
])
def test_malformed_comparison_files_name_the_line(tmp_path, lines, message):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message):
        labeling.read_ranked_comparisons(str(path))


def test_degenerate_responses_are_added_ranked_low_and_reported_apart(stage):
    own, other = "A cow eats grass.", "The moon is a big rock in the sky."
    rng = random.Random(0)
    assert labeling.degenerate_response("empty", own, other, rng) == ("", True)
    cut, _ = labeling.degenerate_response("cut", own, other, rng)
    assert own.startswith(cut) and len(cut.split()) <= 2, f"cut {cut!r} is not the first half of {own!r}"
    repeated, _ = labeling.degenerate_response("repeat", own, other, rng)
    assert repeated.count(own) in (2, 3)
    assert labeling.degenerate_response("ramble", own, other, rng)[0] == f"{own} {other}"
    assert labeling.degenerate_response("swap", own, other, rng) == (other, True)
    two = "A cow eats grass. The cow says moo."
    repeats = {labeling.degenerate_response("repeat", two, other, random.Random(seed))[0] for seed in range(20)}
    assert "A cow eats grass. A cow eats grass. The cow says moo." in repeats, repeats   # one sentence again
    assert f"{two} {two}" in repeats, repeats                                           # or all of it
    with pytest.raises(ValueError, match="unknown degenerate kind"):
        labeling.degenerate_response("rude", own, other, rng)

    # cut at the policy's budget: no room for the EOS -> not ended
    tokenizer = Tokenizer.from_file(stage["data"] + "/tokenizer.tiktoken")
    long_group = labeling.Candidates("what does a cow eat?", [own * 3], [True])
    capped = labeling.add_degenerate([long_group], 1.0, random.Random(0), kinds=("repeat",), tokenizer=tokenizer,
                                     max_new_tokens=6)[0]
    assert len(tokenizer.encode(capped.responses[-1])) == 6 and capped.ended[-1] is False, capped

    # a swap answers another prompt of the same family (a fact about another animal, not a sum)
    swap_groups = [labeling.Candidates("what does a cow eat?", [own], [True]),
                   labeling.Candidates("what is 2 plus 3?", ["2 plus 3 is 5."], [True]),
                   labeling.Candidates("what does a dog eat?", ["A dog eats bones."], [True])]
    swapped = labeling.add_degenerate(swap_groups, 1.0, random.Random(0), kinds=("swap",))
    assert [swapped[0].responses[-1], swapped[2].responses[-1]] == ["A dog eats bones.", own]
    assert swapped[1].responses[-1] in (own, "A dog eats bones."), "no other sum: any other prompt's answer"

    groups = [labeling.Candidates("what does a cow eat?", [own, "A cow eats hay."], [True, True]) for _ in range(200)]
    augmented = labeling.add_degenerate(groups, 0.25, random.Random(1))
    extra = [g for g in augmented if len(g.responses) == 3]
    assert 30 <= len(extra) <= 70, f"{len(extra)} of 200 groups got an extra response; expected about 50"
    assert all(len(g.responses) == 2 for g in groups), "add_degenerate must not modify its input"
    assert {g.sources[-1] for g in extra} == set(labeling.DEGENERATE_KINDS)
    # the gold labeler ranks an immediate EOS below a correct answer, and the report keeps it apart
    empty = next(g for g in extra if g.sources[-1] == "empty")
    ranked = labeling.rank_with_gold([empty])[0]
    assert ranked.ranking[-1] == 2, f"the empty response should be ranked last: {ranked}"
    report, rm, _ = gold_agreement([ranked], [[1.0, 0.0, 5.0]])   # the RM loves the empty response
    assert report["gold/accuracy/degenerate"] == 0.0 and report["gold/accuracy"] == 1.0
    assert report["gold/accuracy/all"] == pytest.approx(1 / 3), "1 policy pair right, 2 degenerate pairs wrong"
    assert len(rm) == 2, "scatter/correlation use the policy's samples only"


def test_split_prompts_by_family_is_disjoint_and_deterministic():
    prompts = [t.prompt for t in world.all_tasks()[::7]]
    train, held_out = labeling.split_prompts(prompts + prompts[:5], 0.1, random.Random(3))
    assert not set(train) & set(held_out) and set(train) | set(held_out) == set(prompts)
    assert {labeling.family_of(p) for p in held_out} == set(world.FAMILIES), "every family must be held out"
    assert (train, held_out) == labeling.split_prompts(list(reversed(prompts)), 0.1, random.Random(3)), \
        "the split must not depend on the order of the prompt file"
    drawn = labeling.cycle_prompts(["a", "b", "c"], 7, random.Random(0))
    assert sorted(drawn.count(p) for p in "abc") == [2, 2, 3], f"cycle_prompts is unbalanced: {drawn}"


# ---------------------------------------------------------------------------------------------
# train_rm.py end to end
# ---------------------------------------------------------------------------------------------


def test_smoke_run_writes_a_normalised_rm_and_its_outputs(stage, tmp_path):
    out_dir = tmp_path / "out"
    args = [sys.executable, os.path.join(ROOT, "train_rm.py"), "--preset", "smoke", "--data-dir", stage["data"],
            "--out-dir", str(out_dir), "--init", os.path.join(stage["out"], "sft.pt"), "--max-new-tokens", "12",
            "--device", "cpu"]
    child = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_smoke_run_wrote(child, "train_rm.py", out_dir, ("rm.pt", "rm_comparisons.jsonl", "rm_metrics.jsonl",
                                                           "rm_curves.png", "rm_scatter.png"))
    ckpt = load_checkpoint(out_dir / "rm.pt", kind="rm")
    assert set(ckpt["model"]) == set(RewardModel(stage["config"]).state_dict()), "rm.pt keys are not trunk.* + head.*"
    assert ckpt["rm_objective"] == "ranking" and ckpt["model_config"]["dropout"] == 0.0
    for key in ("accuracy/val", "gold/accuracy", "gold/spearman", "gold/top_choice", "labeler/agreement"):
        assert key in ckpt["metrics"], f"metric {key} missing from rm.pt"

    # ties: the noiseless gold labeler puts equal totals in one tier; all-tied comparisons are dropped
    scorer = load_reward_model(str(out_dir / "rm.pt"), stage["tokenizer"])
    comparisons = labeling.read_ranked_comparisons(str(out_dir / "rm_comparisons.jsonl"))
    assert len(comparisons) == 24 and all(c.sources[:4] == ["policy"] * 4 for c in comparisons)
    assert any(len(c.responses) == 5 for c in comparisons), "no degenerate response was added"
    for c in comparisons:
        totals = [labeler.score(c.prompt, c.responses[i], c.ended[i]).total for i in c.ranking]
        assert c.tiers == labeling.tiers_of(totals), f"tiers {c.tiers} do not follow the gold totals {totals}"
    dropped = sum(not c.preferences() for c in comparisons)
    assert f"ties: {dropped} comparisons whose responses are all tied are dropped" in child.stdout
    # normalisation: the SFT samples it was fitted on (the comparisons' "policy" responses that ended,
    # the ones whose RM score RL uses) score mean 0, std 1
    samples = [(c.prompt, r, e) for c in comparisons for r, e, s in zip(c.responses, c.ended, c.sources) if s == "policy"]
    samples = [sample for sample in samples if sample[2]]
    if len(samples) < 2:
        pytest.skip("too few smoke samples ended to check the normalisation")
    scores = scorer.score(*(list(column) for column in zip(*samples)))
    assert abs(scores.mean().item()) < 1e-4 and abs(scores.std().item() - 1) < 1e-4, \
        f"normalised SFT samples: mean {scores.mean().item():.5f}, std {scores.std().item():.5f}"


def test_classifier_objective_from_a_comparisons_file(stage, tmp_path, monkeypatch, capsys):
    path = tmp_path / "prefs.jsonl"
    prompts = stage["prompts"]
    write_jsonl(str(path), [{"prompt": p, "chosen": "A good answer.", "rejected": "A bad one."} for p in prompts])
    code, out, err = run_script(monkeypatch, capsys, [
        "--preset", "smoke", "--data-dir", stage["data"], "--out-dir", str(tmp_path / "o"), "--device", "cpu",
        "--init", os.path.join(stage["out"], "sft.pt"), "--comparisons", str(path), "--rm-objective", "classifier",
        "--max-new-tokens", "12"])
    assert code == 0, f"exit {code}: {err}"
    ckpt = load_checkpoint(tmp_path / "o" / "rm.pt", kind="rm")
    assert ckpt["rm_objective"] == "classifier"
    assert ckpt["metrics"]["comparisons/train"] + ckpt["metrics"]["comparisons/val"] == len(prompts)


def test_human_labeler_from_scripted_stdin(stage, tmp_path, monkeypatch, capsys):
    """--labeler human: a typo is re-asked; q saves and exits 0; the next run resumes and trains."""
    args = ["--preset", "smoke", "--data-dir", stage["data"], "--out-dir", str(tmp_path), "--device", "cpu",
            "--init", os.path.join(stage["out"], "sft.pt"), "--labeler", "human", "--num-comparisons", "3",
            "--responses-per-prompt", "2", "--val-fraction", "0", "--max-new-tokens", "8", "--degenerate-fraction", "0"]
    code, out, _ = run_script(monkeypatch, capsys, args, stdin="1 1\n2 1\nq\n")
    assert code == 0 and "each of 1..2 exactly once" in out and "saved 1 rankings" in out, out[-1500:]
    assert not (tmp_path / "rm.pt").exists(), "quitting must not train"
    code, out, err = run_script(monkeypatch, capsys, args, stdin="1 2\n12\n")
    assert code == 0, err
    assert "resuming: 1 rankings already saved" in out
    assert (tmp_path / "rm.pt").exists()
    assert len(labeling.read_ranked_comparisons(str(tmp_path / "rm_comparisons.jsonl"))) == 3


def test_bad_input_gives_one_clear_line_and_exit_2(stage, tmp_path, monkeypatch, capsys):
    base = ["--preset", "smoke", "--data-dir", stage["data"], "--out-dir", str(tmp_path), "--device", "cpu"]
    # an RM checkpoint where the SFT one is expected
    rm_path = tmp_path / "rm.pt"
    save_checkpoint(rm_path, kind="rm", model_state=random_rm(stage["tokenizer"]).state_dict(),
                    model_config=stage["config"], tokenizer_identity=stage["tokenizer"].identity, train_config={},
                    step=0, metrics={})
    code, _, err = run_script(monkeypatch, capsys, base + ["--init", str(rm_path)])
    assert code == 2 and "is a 'rm' checkpoint, expected 'sft'" in err and len(err.strip().splitlines()) == 1, err
    # a malformed comparisons file: the line is named
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "responses": ["x", "y"], "ranking": [0, 1]}\n{"prompt": "b", "responses": ["x"], '
                   '"ranking": [0]}\n')
    code, _, err = run_script(monkeypatch, capsys, base + ["--init", os.path.join(stage["out"], "sft.pt"),
                                                          "--comparisons", str(bad)])
    assert code == 2 and "bad.jsonl:2:" in err and len(err.strip().splitlines()) == 1, err
    # out-of-range option
    code, _, err = run_script(monkeypatch, capsys, base + ["--val-fraction", "0.9"])
    assert code == 2 and "--val-fraction" in err, err
    # more frozen blocks than the model has (checked before any sampling)
    code, _, err = run_script(monkeypatch, capsys, base + ["--init", os.path.join(stage["out"], "sft.pt"),
                                                          "--freeze-layers", "2"])
    assert code == 2 and "has only 1 blocks" in err, err
    # human labels and a comparisons file are two different sources
    code, _, err = run_script(monkeypatch, capsys, base + ["--labeler", "human", "--comparisons", str(bad)])
    assert code == 2 and "cannot be combined" in err, err


def test_sampled_responses_never_hold_pad_or_role_markers(stage):
    tokenizer = stage["tokenizer"]
    torch.manual_seed(1)
    policy = GPT(stage["config"]).eval()
    with torch.no_grad():   # a policy that would rather write PAD and role markers than text
        for token_id in tokenizer.never_sampled_ids:
            policy.lm_head.weight[token_id] += 3.0 * policy.lm_head.weight.norm(dim=1).mean()
    texts, ended, generations = sample_responses(policy, tokenizer, stage["prompts"], max_new_tokens=10,
                                                 generator=torch.Generator().manual_seed(0))
    for generation in generations:
        real = generation.response_ids[generation.response_mask.bool()]
        assert real.numel() and not torch.isin(real, torch.tensor(tokenizer.never_sampled_ids)).any(), \
            "PAD or a role marker was sampled inside a response"


def test_the_rm_scores_a_rollout_as_it_scores_the_same_response_stored_for_training(stage):
    """PPO's score of a sampled response == the RM's score of that response as train_rm stores and
    encodes it (a comparisons record: text + ended), whatever token split the sampler drew."""
    tokenizer = stage["tokenizer"]
    torch.manual_seed(2)
    policy = GPT(stage["config"]).eval()
    scorer = RewardScorer(random_rm(tokenizer, seed=3), tokenizer, bias=0.3, gain=1.7)
    prompts = stage["prompts"][:8]
    texts, ended, (generation,) = sample_responses(policy, tokenizer, prompts, max_new_tokens=12,
                                                   generator=torch.Generator().manual_seed(0))
    _, _, rm = score_rollout(generation, prompts, texts, reward="rm", reward_scorer=scorer)
    records = [labeling.RankedComparison(p, [t, "x"], [0, 1], [e, True]).to_json() for p, t, e in zip(prompts, texts, ended)]
    path = os.path.join(stage["out"], "stored.jsonl")
    write_jsonl(path, records)
    stored = labeling.read_ranked_comparisons(path)
    rows = [encode_ranked(tokenizer, c, stage["config"].block_size)[0] for c in stored]
    with torch.no_grad():
        training_view = (score_rows(scorer.model, rows, tokenizer.pad_id) - 0.3) * 1.7
    torch.testing.assert_close(rm, training_view, atol=1e-5, rtol=1e-5)


def test_gold_ties_are_tiers_not_preferences_and_survive_a_file(tmp_path):
    prompt = world.all_tasks()[0].prompt
    good = world.good_response(world.all_tasks()[0], random.Random(0))
    candidates = [labeling.Candidates(prompt, ["", good, "", "zzz"], [True, True, True, True])]
    (comparison,) = labeling.rank_with_gold(candidates, noise=0.0)
    totals = [labeler.score(prompt, comparison.responses[i]).total for i in comparison.ranking]
    assert totals == sorted(totals, reverse=True)
    assert comparison.tiers == labeling.tiers_of(totals) and len(set(comparison.tiers)) < 4, \
        f"the two empty responses have equal totals {totals}: they must share a tier, got {comparison.tiers}"
    tied = {(a, b) for a, b in combinations(range(4), 2) if labeler.score(prompt, comparison.responses[a]).total
            == labeler.score(prompt, comparison.responses[b]).total}
    assert not tied & {tuple(sorted(p)) for p in comparison.preferences()}, "a tied pair became a preference"
    assert len(comparison.preferences()) == 6 - len(tied)
    path = tmp_path / "c.jsonl"
    labeling.write_comparisons(str(path), [comparison])
    assert json.loads(path.read_text())["tiers"] == comparison.tiers
    assert labeling.read_ranked_comparisons(str(path))[0].tiers == comparison.tiers
    path.write_text(json.dumps({**comparison.to_json(), "tiers": [1, 0, 2, 3]}) + "\n")
    with pytest.raises(UserError, match="c.jsonl:1: 'tiers' must be a list of 4 non-decreasing"):
        labeling.read_ranked_comparisons(str(path))
    # a noisy labeler is forced to choose: a strict ranking
    (noisy,) = labeling.rank_with_gold(candidates, noise=1.0, rng=random.Random(0))
    assert noisy.tiers == [0, 1, 2, 3]
    assert labeling.drop_all_tied([labeling.RankedComparison(prompt, ["a", "b"], [0, 1], tiers=[0, 0]), noisy]) == [noisy]


def test_pairwise_accuracy_skips_the_labelers_ties_and_the_loss_refuses_all_tied(stage):
    grid = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, math.nan]])
    # row 0 tiers [0, 1, 1]: pairs (0,1) yes, (0,2) yes, (1,2) tied -> skipped; row 1: (0,1) no
    assert pairwise_counts(grid, [[0, 1, 1], [0, 1]]) == (2.0, 3.0)
    assert pairwise_counts(grid) == (2.0, 4.0), "strict rankings: every pair counts"
    tokenizer = stage["tokenizer"]
    batch = [encode_ranked(tokenizer, labeling.RankedComparison("hi", ["a", "b"], [0, 1]), 96)]
    with pytest.raises(ValueError, match="all tied"):
        comparison_loss(random_rm(tokenizer), batch, "ranking", tokenizer.pad_id, tiers=[[0, 0]])


def test_task_reward_and_scorer_reward_use_the_penalty_without_eos(stage):
    assert task_reward(torch.tensor([0.5, 2.0, -3.0]), [True, False, True]).tolist() == [0.5, -1.0, -3.0]
    assert task_reward(torch.tensor([0.5, 2.0]), [False, True], missing_eos_penalty=-2.5).tolist() == [-2.5, 2.0]
    scorer = RewardScorer(random_rm(stage["tokenizer"]), stage["tokenizer"], bias=0.1, gain=2.0)
    prompts, responses, ended = stage["prompts"][:3], ["a cow.", "grass", "2"], [True, False, True]
    score = scorer.score(prompts, responses, ended)
    assert scorer.reward(prompts, responses, ended).tolist() == [score[0].item(), MISSING_EOS_PENALTY, score[2].item()]
