"""Tests for the gold labeler (minirlhf/labeler.py): the rubric that plays the human labelers.

1. Hand-worked scores, a few per family, the arithmetic written next to each one. If you change a
   weight or an ideal length, these are the numbers to redo by hand.
2. Each rubric part moves the way its docstring says (graded, monotone, floors at 0).
3. Graded parts make ties rare between different responses to one prompt (a win rate with ties
   counted half can never exceed 0.5 + half the share of non-tied pairs).
4. `rank`: noise = 0 sorts by total; noise > 0 samples a permutation whose pairwise marginal is the
   Bradley-Terry probability sigmoid((total_i - total_j) / noise) - checked statistically, seeded.
5. Responses that never end lose well_formed.
"""

import itertools
import math
import random

import pytest

from minirlhf import labeler, world

PARTS = ("correct", "harmless", "on_topic", "concise", "well_formed")


def parts_of(prompt, response, ended=True):
    return labeler.score(prompt, response, ended).parts


def total_of(prompt, response, ended=True):
    return labeler.score(prompt, response, ended).total


# ----------------------------------------------------------------------------------------------
# 1. Hand-worked scores. WEIGHTS: correct 3, harmless 2, on_topic 1, concise 1, well_formed 1.


def test_labeler_weights_and_max_score():
    assert labeler.WEIGHTS == {"correct": 3.0, "harmless": 2.0, "on_topic": 1.0, "concise": 1.0, "well_formed": 1.0}
    assert labeler.MAX_SCORE == 8.0


# (prompt, response, ended, expected parts, expected total), the arithmetic written above each
HAND_WORKED = [
    # "A cow eats grass." -> words a, cow, eats, grass (4)
    #   correct  1     the one "eats" value said is grass, the answer
    #   harmless 1     no rude word
    #   on_topic 1/1   names "cow", no other animal/topic
    #   concise  1     4 words <= ideal 5
    #   well_formed 1  0.5 ended + 0.25 capital + 0.25 full stop
    # total = 3*1 + 2*1 + 1 + 1 + 1 = 8 = MAX_SCORE
    pytest.param("what does a cow eat?", "A cow eats grass.", True,
                 dict(correct=1, harmless=1, on_topic=1, concise=1, well_formed=1), 8.0,
                 id="facts_perfect"),
    # "A cow eats hay. You are stupid." -> 7 words, 2 sentences
    #   correct  0     the value said (hay) is not the answer (grass)
    #   harmless 0.5   1 - 0.5 * 1 rude word ("stupid")
    #   on_topic 1/2   sentence 2 names no subject
    #   concise  5/7   ideal 5 words / 7 words
    #   well_formed 1
    # total = 0 + 2*0.5 + 0.5 + 5/7 + 1 = 2.5 + 5/7 = 3.2142857...
    pytest.param("what does a cow eat?", "A cow eats hay. You are stupid.", True,
                 dict(correct=0, harmless=0.5, on_topic=0.5, concise=5 / 7, well_formed=1), 2.5 + 5 / 7,
                 id="facts_wrong_and_rude"),
    # "A cow eats grass or hay." -> 6 words
    #   correct  0.5   right value, hedged with a wrong one (hay)
    #   concise  5/6
    # total = 3*0.5 + 2 + 1 + 5/6 + 1 = 6.333...
    pytest.param("what does a cow eat?", "A cow eats grass or hay.", True,
                 dict(correct=0.5, harmless=1, on_topic=1, concise=5 / 6, well_formed=1), 5.5 + 5 / 6,
                 id="facts_hedged"),
    # "4 plus 3 is 8." for 4 + 3 = 7: a wrong result
    #   correct  0     (no credit for a near miss)
    #   on_topic 1     the sentence names 4, 3 and "plus"
    #   concise  1     5 words = ideal 5
    # total = 0 + 2 + 1 + 1 + 1 = 5
    pytest.param("what is 4 plus 3?", "4 plus 3 is 8.", True,
                 dict(correct=0, harmless=1, on_topic=1, concise=1, well_formed=1), 5.0,
                 id="arithmetic_wrong_sum"),
    # "2 plus 4 is 6." to "what is 3 plus 3?": 6 is the answer, but of another (true) sum
    #   correct  0     the stated sum is not the one asked
    #   on_topic 0     the sentence does not name 3
    # total = 0 + 2 + 0 + 1 + 1 = 4
    pytest.param("what is 3 plus 3?", "2 plus 4 is 6.", True,
                 dict(correct=0, harmless=1, on_topic=0, concise=1, well_formed=1), 4.0,
                 id="arithmetic_right_number_in_a_false_sum"),
    # "The moon is a big rock in the sky. It shines at night." cut off at the budget (ended=False)
    #   correct  2/3   2 of the moon's key facts, 3 earn full marks, no other topic's fact
    #   on_topic 2/2   "moon", then "it"
    #   concise  1     13 words <= ideal 16
    #   well_formed 0.5  0 (did not end) + 0.25 capital + 0.25 full stop
    # total = 3*(2/3) + 2 + 1 + 1 + 0.5 = 6.5
    pytest.param("explain the moon to a 6 year old.", "The moon is a big rock in the sky. It shines at night.", False,
                 dict(correct=2 / 3, harmless=1, on_topic=1, concise=1, well_formed=0.5), 6.5,
                 id="explain_not_ended"),
    # "The moon is a big rock in the sky. It is frozen water." - the second fact is the snow's
    #   correct  1/3 - 0.25 * 1 = 1/12
    #   on_topic 1     "It ..." names no other subject
    #   concise  1     13 words
    # total = 3/12 + 2 + 1 + 1 + 1 = 5.25
    pytest.param("explain the moon to a 6 year old.", "The moon is a big rock in the sky. It is frozen water.", True,
                 dict(correct=1 / 12, harmless=1, on_topic=1, concise=1, well_formed=1), 5.25,
                 id="explain_with_a_false_fact"),
    # "The dog is kind and brave. The dog is kind and brave." -> 12 words, 1 repeated sentence
    #   correct  2/3   2 distinct kind words (kind, brave); 3 earn full marks
    #   concise  7/12  ideal 7 words / 12
    #   well_formed 0.75  0.5 + 0.25 + 0.25 - 0.25 (one repeated sentence)
    # total = 3*(2/3) + 2 + 1 + 7/12 + 0.75 = 5.75 + 7/12 = 6.333...
    pytest.param("say something nice about the dog.", "The dog is kind and brave. The dog is kind and brave.", True,
                 dict(correct=2 / 3, harmless=1, on_topic=1, concise=7 / 12, well_formed=0.75), 5.75 + 7 / 12,
                 id="kindness_repeated"),
    # "" that ended at once (an immediate EOS): nothing said
    #   correct 0, harmless 1, on_topic 0 (no sentence), concise 0 (no word), well_formed 0.5 (ended only)
    # total = 0 + 2 + 0 + 0 + 0.5 = 2.5
    pytest.param("what does a cow eat?", "", True,
                 dict(correct=0, harmless=1, on_topic=0, concise=0, well_formed=0.5), 2.5,
                 id="empty_response"),
    # no task: correct 0 (nothing to check), on_topic 1 (nothing to be off), ideal length 12
    # total = 0 + 2 + 1 + 1 + 1 = 5
    pytest.param("tell me a joke.", "No.", True,
                 dict(correct=0, harmless=1, on_topic=1, concise=1, well_formed=1), 5.0,
                 id="prompt_outside_the_world"),
]


@pytest.mark.parametrize("prompt, response, ended, expected_parts, expected_total", HAND_WORKED)
def test_labeler_hand_worked(prompt, response, ended, expected_parts, expected_total):
    score = labeler.score(prompt, response, ended)
    assert set(score.parts) == set(PARTS), f"parts are {sorted(score.parts)}"
    for name in PARTS:
        assert score.parts[name] == pytest.approx(expected_parts[name], abs=1e-9), (
            f"{prompt!r} -> {response!r}: part {name} = {score.parts[name]}, expected {expected_parts[name]}")
    assert score.total == pytest.approx(expected_total, abs=1e-9), (
        f"{prompt!r} -> {response!r}: total {score.total}, expected {expected_total}")


def test_labeler_total_is_the_weighted_sum_of_parts(monkeypatch):
    rng = random.Random(0)
    tasks = world.all_tasks()
    for _ in range(50):
        task = rng.choice(tasks)
        _, response, ends = world.base_model_response(task, rng)
        score = labeler.score(task.prompt, response, ends)
        assert score.total == pytest.approx(sum(labeler.WEIGHTS[k] * v for k, v in score.parts.items()))
        assert all(0.0 <= v <= 1.0 for v in score.parts.values()), score.parts
        assert 0.0 <= score.total <= labeler.MAX_SCORE
    # "change it in one line": a weight change moves the total accordingly
    monkeypatch.setitem(labeler.WEIGHTS, "harmless", 10.0)
    assert total_of("what does a cow eat?", "A cow eats grass.") == 3 + 10 + 1 + 1 + 1


# ----------------------------------------------------------------------------------------------
# 2. Each part moves the way its docstring says


def test_labeler_correct_facts_right_hedged_wrong():
    prompt = "what colour is a frog?"   # green
    assert parts_of(prompt, "A frog is green.")["correct"] == 1.0
    assert parts_of(prompt, "A frog is green or brown.")["correct"] == 0.5
    assert parts_of(prompt, "A frog is brown.")["correct"] == 0.0
    assert parts_of(prompt, "I do not know.")["correct"] == 0.0


@pytest.mark.parametrize("response, expected", [
    ("4 plus 3 is 7.", 1.0), ("4 plus 3 is 8.", 0.0), ("4 plus 3 is 6.", 0.0),       # right, or wrong: no near misses
    ("It is 7.", 1.0), ("The answer is 7.", 1.0),                                     # the result alone
    ("4 plus 2 is 7.", 0.0), ("3 plus 4 is 7.", 0.0), ("4 minus 3 is 7.", 0.0),       # 7 in a sum not asked
    ("4 plus the cow is 7.", 0.0), ("14 plus 3 is 7.", 0.0),
    ("4 plus 3 is 7. 2 plus 2 is 5.", 1.0), ("4 plus 3 is 8. It is 7.", 0.0),         # the first result counts
])
def test_labeler_correct_arithmetic(response, expected):
    assert parts_of("compute 4 plus 3.", response)["correct"] == expected


def test_labeler_correct_arithmetic_without_a_number_is_zero():
    assert parts_of("what is 4 plus 3?", "It is a lot.")["correct"] == 0.0


def test_labeler_correct_explain_grows_with_key_facts_and_drops_with_false_ones():
    prompt, facts = "explain the sun to a 5 year old.", world.EXPLAIN_FACTS["sun"]
    coverage = [parts_of(prompt, world._explain_sentences("sun", list(facts[:k])))["correct"] for k in (1, 2, 3, 4)]
    assert coverage == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0]), f"correct by number of key facts: {coverage}"
    # each fact of another topic costs 0.25, floored at 0
    one_false = parts_of(prompt, "The sun is a hot star. It gives us light. It makes the day warm. It is frozen water.")
    assert one_false["correct"] == pytest.approx(0.75)
    all_false = parts_of(prompt, "The sun is frozen water. It is moving air. It has big waves.")
    assert all_false["correct"] == 0.0


def test_labeler_correct_kindness_counts_distinct_kind_words():
    prompt = "praise the farmer."
    scores = [parts_of(prompt, world._kind_sentence("farmer", list(world.NICE_WORDS[:k])))["correct"]
              for k in (1, 2, 3, 4)]
    assert scores == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert parts_of(prompt, "The farmer is a farmer.")["correct"] == 0.0
    # saying the same kind word twice does not count twice
    assert parts_of(prompt, "The farmer is kind. The farmer is very kind.")["correct"] == pytest.approx(1 / 3)


def test_labeler_harmless_loses_half_per_rude_word():
    prompt = "what does a cow eat?"
    assert parts_of(prompt, "A cow eats grass.")["harmless"] == 1.0
    assert parts_of(prompt, "A cow eats grass. You are silly.")["harmless"] == 0.5
    assert parts_of(prompt, "A cow eats grass. You are silly and lazy.")["harmless"] == 0.0
    assert parts_of(prompt, "You are silly, lazy and dumb.")["harmless"] == 0.0   # floored at 0
    assert parts_of(prompt, "A cow eats grass. You are SILLY.")["harmless"] == 0.5   # case does not hide it


def test_labeler_on_topic_is_the_share_of_sentences_about_the_subject():
    prompt = "where does a dog live?"
    assert parts_of(prompt, "A dog lives in a kennel.")["on_topic"] == 1.0
    assert parts_of(prompt, "A dog lives in a kennel. It says woof.")["on_topic"] == 1.0   # "it" is the dog
    assert parts_of(prompt, "A dog lives in a kennel. The cat says meow.")["on_topic"] == 0.5
    assert parts_of(prompt, "A dog lives in a kennel. The cat says meow. 2 plus 2 is 4.")["on_topic"] == pytest.approx(1 / 3)
    assert parts_of(prompt, "The cat and the dog are friends.")["on_topic"] == 0.0   # its subject is another animal
    # arithmetic: a sentence is on topic when it names both numbers and the operation
    assert parts_of("what is 3 minus 1?", "3 minus 1 is 2. 4 plus 4 is 8.")["on_topic"] == 0.5


def test_labeler_concise_is_one_up_to_the_ideal_then_decays():
    prompt = "say something nice about the nurse."   # ideal 7 words
    lengths = [4, 7, 8, 14, 28]
    # "The nurse is very ... very kind." has exactly n words
    scores = [parts_of(prompt, "The nurse is " + "very " * (n - 4) + "kind.")["concise"] for n in lengths]
    assert scores == pytest.approx([1.0, 1.0, 7 / 8, 7 / 14, 7 / 28]), f"concise by length {lengths}: {scores}"


def test_labeler_well_formed_components():
    prompt = "what does a pig eat?"
    assert parts_of(prompt, "A pig eats corn.", ended=True)["well_formed"] == 1.0
    assert parts_of(prompt, "A pig eats corn.", ended=False)["well_formed"] == 0.5    # did not end
    assert parts_of(prompt, "a pig eats corn.", ended=True)["well_formed"] == 0.75    # no capital
    assert parts_of(prompt, "A pig eats corn", ended=True)["well_formed"] == 0.75     # no full stop
    assert parts_of(prompt, "7 pigs eat corn.", ended=True)["well_formed"] == 1.0     # a digit counts as a capital
    assert parts_of(prompt, "A pig eats corn. A pig eats corn.", ended=True)["well_formed"] == 0.75   # one repeat
    assert parts_of(prompt, "x. x. x. x. x", ended=False)["well_formed"] == 0.0       # floored at 0


def test_labeler_responses_that_never_end_lose_well_formed():
    rng = random.Random(3)
    for task in world.all_tasks()[::37]:
        response = world.good_response(task, rng)
        ended, cut = labeler.score(task.prompt, response, True), labeler.score(task.prompt, response, False)
        assert cut.parts["well_formed"] == pytest.approx(ended.parts["well_formed"] - 0.5)
        assert cut.total == pytest.approx(ended.total - 0.5 * labeler.WEIGHTS["well_formed"])
        for name in ("correct", "harmless", "on_topic", "concise"):
            assert cut.parts[name] == ended.parts[name], f"ended should only move well_formed, moved {name}"


def test_labeler_prompt_whitespace_does_not_change_the_task():
    assert total_of("  what does a cow eat?\n", "A cow eats grass.") == total_of("what does a cow eat?", "A cow eats grass.")


# ----------------------------------------------------------------------------------------------
# 3. Graded parts: ties are rare


@pytest.mark.parametrize("family", world.FAMILIES)
def test_labeler_tie_rate_between_different_responses_is_low(family):
    """Base-model-like responses (every behaviour, two of each) to 30 prompts of a family: the share
    of pairs of DIFFERENT responses with equal totals. A 0/1 rubric ties 35-66% of pairs; measured
    here 1-4% per family; the bound leaves room for a small rubric change."""
    rng = random.Random(11)
    tasks = rng.sample([t for t in world.all_tasks() if t.family == family], 30)
    ties = pairs = 0
    for task in tasks:
        responses = {}
        for name, (_, make) in world.BASE_BEHAVIOUR.items():
            for _ in range(2):
                responses[make(task, rng)] = name != "endless"
        totals = [labeler.score(task.prompt, r, e).total for r, e in responses.items()]
        for a, b in itertools.combinations(totals, 2):
            pairs += 1
            ties += abs(a - b) < 1e-9
    assert pairs > 500
    assert ties / pairs < 0.10, f"{family}: {ties}/{pairs} pairs of different responses tie ({ties / pairs:.1%})"


# ----------------------------------------------------------------------------------------------
# 4. rank


RANK_PROMPT = "what does a cow eat?"
RANK_RESPONSES = [
    "A cow eats hay. You are stupid.",   # 2.5 + 5/7 = 3.214...
    "A cow eats grass.",                 # 8
    "A cow eats grass or hay.",          # 5.5 + 5/6 = 6.333...
    "",                                  # 2.5
]


def test_labeler_rank_without_noise_sorts_by_total():
    totals = [total_of(RANK_PROMPT, r) for r in RANK_RESPONSES]
    assert labeler.rank(RANK_PROMPT, RANK_RESPONSES) == [1, 2, 0, 3]
    assert labeler.rank(RANK_PROMPT, RANK_RESPONSES, noise=0.0) == sorted(range(4), key=lambda i: -totals[i])


def test_labeler_rank_without_noise_keeps_ties_in_given_order():
    responses = ["A cow eats grass.", "A cow eats hay.", "A cow eats grass."]   # 0 and 2 tie at 8
    assert labeler.rank(RANK_PROMPT, responses) == [0, 2, 1]


def test_labeler_rank_puts_a_response_that_did_not_end_below_the_same_one_that_did():
    responses = ["A cow eats grass.", "A cow eats grass."]
    assert labeler.rank(RANK_PROMPT, responses, ended=[False, True]) == [1, 0]


def test_labeler_rank_with_noise_is_a_seeded_permutation():
    for seed in range(20):
        order = labeler.rank(RANK_PROMPT, RANK_RESPONSES, noise=2.0, rng=random.Random(seed))
        assert sorted(order) == [0, 1, 2, 3], f"not a permutation: {order}"
        assert order == labeler.rank(RANK_PROMPT, RANK_RESPONSES, noise=2.0, rng=random.Random(seed)), \
            "the same rng seed should give the same ranking"


def test_labeler_rank_with_noise_follows_bradley_terry():
    """Plackett-Luce's pairwise marginal: P(i above j) = sigmoid((total_i - total_j) / noise), for
    every pair of the K = 4 responses, and P(i first) = softmax(totals / noise)_i.
    N = 4000 seeded draws; each frequency within 4 standard errors of its probability."""
    noise, n = 1.5, 4000
    totals = [total_of(RANK_PROMPT, r) for r in RANK_RESPONSES]
    rng = random.Random(1234)
    above = {(i, j): 0 for i in range(4) for j in range(4) if i != j}
    first = [0] * 4
    for _ in range(n):
        order = labeler.rank(RANK_PROMPT, RANK_RESPONSES, noise=noise, rng=rng)
        position = {index: place for place, index in enumerate(order)}
        first[order[0]] += 1
        for i, j in above:
            above[(i, j)] += position[i] < position[j]
    for (i, j), count in above.items():
        p = 1.0 / (1.0 + math.exp(-(totals[i] - totals[j]) / noise))
        tolerance = 4 * math.sqrt(p * (1 - p) / n) + 1e-3
        assert abs(count / n - p) < tolerance, (
            f"P({i} above {j}): measured {count / n:.4f}, Bradley-Terry {p:.4f} (+-{tolerance:.4f})")
    softmax_denominator = sum(math.exp(t / noise) for t in totals)
    for i in range(4):
        p = math.exp(totals[i] / noise) / softmax_denominator
        tolerance = 4 * math.sqrt(p * (1 - p) / n) + 1e-3
        assert abs(first[i] / n - p) < tolerance, f"P({i} first): measured {first[i] / n:.4f}, expected {p:.4f}"


def test_labeler_rank_with_tiny_noise_is_the_noiseless_ranking():
    rng = random.Random(0)
    for noise in (1e-3, 1e-6):   # exp(total / 1e-6) overflows unless the max is subtracted first
        for _ in range(10):
            assert labeler.rank(RANK_PROMPT, RANK_RESPONSES, noise=noise, rng=rng) == [1, 2, 0, 3]
