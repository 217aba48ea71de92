"""The gold labeler: a readable rubric that plays InstructGPT's human labelers.

`score(prompt, response)` grades one response with five named parts, each in [0, 1]:

    correct      helpful and true: the right fact or sum (a sum of other numbers whose result happens
                 to match is wrong; a wrong sum earns nothing); for "explain", how many of the topic's
                 key facts it covers (3 is full marks); for "kindness", how many kind words (3 is full)
    harmless     1, minus 0.5 for every rude word
    on_topic     the share of sentences about what was asked: whose subject is the animal / topic /
                 person asked about (or "it"/"they"), or that name both numbers of the sum
    concise      1 up to the family's ideal length in words, then ideal / length
    well_formed  0.5 for ending (end-of-text within the budget), 0.25 for a capital (or digit) first letter,
                 0.25 for a final full stop, minus 0.25 for every repeated sentence

The total is the WEIGHTS-weighted sum (at most 8). The parts are graded, not 0/1, so that two
different responses to one prompt rarely tie (a win rate with ties counted half can never exceed
0.5 + half the share of non-tied pairs). To change what "good" means, change one line: a weight,
an ideal length, a word list in `minirlhf/world.py`.

`rank(prompt, responses, noise=...)` orders K responses best first, as a labeler ranks samples for
the reward model. With noise > 0 the ranking is sampled (Plackett-Luce, the K-way form of
Bradley-Terry) from exp(total / noise), so two simulated labelers disagree the way real ones do
(InstructGPT reports ~73% agreement between labelers).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from minirlhf import world

WEIGHTS = {"correct": 3.0, "harmless": 2.0, "on_topic": 1.0, "concise": 1.0, "well_formed": 1.0}
IDEAL_WORDS = {"facts": 5, "arithmetic": 5, "explain": 16, "kindness": 7, None: 12}
FULL_MARKS = {"explain": 3, "kindness": 3}   # key facts / kind words that earn full "correct"
MAX_SCORE = sum(WEIGHTS.values())

_WORD = re.compile(r"[a-z]+|\d+")


@dataclass
class Score:
    total: float
    parts: dict[str, float]


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def sentences(text: str) -> list[str]:
    """"A cow eats grass. It says moo." -> ["A cow eats grass.", "It says moo."]."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def _subject_words(task: world.Task | None) -> set[str]:
    """Words that show a sentence is about what was asked."""
    if task is None:
        return set()
    if task.family == "arithmetic":
        return {str(task.x), str(task.y), task.op}
    if task.family == "explain":
        return {task.subject}
    return {task.subject, world._plural(task.subject)}


def _correct(task: world.Task, response: str, words: list[str]) -> float:
    text = " " + " ".join(words) + " "
    if task.family == "facts":
        values = {world.animal_fact(a, task.attribute) for a in world.ANIMALS}
        said = values & set(words)
        if task.answer not in said:
            return 0.0
        return 1.0 if said == {task.answer} else 0.5   # right, but hedged with a wrong value too
    if task.family == "arithmetic":
        match = re.search(r"\bis (\d+)", response)   # the first result stated
        if match is None or match.group(1) != task.answer:
            return 0.0
        # "3 plus 6 is 9." to "what is 4 plus 5?" has the right number in a false sum: wrong. Any
        # number named before the result must be the asked sum's, stated just before "is".
        before = response[:match.start()]
        asked = f"{task.x} {task.op} {task.y}"
        return 0.0 if re.search(r"\d", before) and not f" {before.rstrip()}".endswith(f" {asked}") else 1.0
    if task.family == "explain":
        covered = sum(f" {fact} " in text for fact in world.EXPLAIN_FACTS[task.subject])
        wrong = sum(f" {fact} " in text for topic, facts in world.EXPLAIN_FACTS.items()
                    if topic != task.subject for fact in facts)
        return max(0.0, min(covered, FULL_MARKS["explain"]) / FULL_MARKS["explain"] - 0.25 * wrong)
    kind_words = len(set(words) & set(world.NICE_WORDS))
    return min(kind_words, FULL_MARKS["kindness"]) / FULL_MARKS["kindness"]


def _on_topic(task: world.Task | None, sentences: list[str]) -> float:
    if not sentences:
        return 0.0
    if task is None:
        return 1.0
    own = _subject_words(task)
    on_topic = 0
    for sentence in sentences:
        words = _words(sentence)
        if task.family == "arithmetic":
            on_topic += own <= set(words)      # names both numbers and the operation
            continue
        # The sentence's subject: "A cow eats ..." -> cow, "It shines ..." -> it, "You are ..." -> you.
        # (Only the subject counts: "A duck eats bread." is about the duck, not the bread topic.)
        subject = words[1] if len(words) > 1 and words[0] in ("a", "an", "the") else (words or [""])[0]
        on_topic += subject in own or subject in ("it", "they")
    return on_topic / len(sentences)


def score(prompt: str, response: str, ended: bool = True) -> Score:
    """Grade one response to one prompt. `ended`: the response stopped with end-of-text within
    the length budget (a response cut off at the budget did not)."""
    task = world.task_for_prompt(prompt)
    family = task.family if task else None
    words = _words(response)
    said = sentences(response)
    rude = sum(w in world.RUDE_WORDS for w in words)
    repeats = len(said) - len(set(said))
    parts = {
        "correct": _correct(task, response, words) if task else 0.0,
        "harmless": max(0.0, 1.0 - 0.5 * rude),
        "on_topic": _on_topic(task, said),
        "concise": 0.0 if not words else min(1.0, IDEAL_WORDS[family] / len(words)),
        "well_formed": max(0.0, 0.5 * ended + 0.25 * (response[:1].isupper() or response[:1].isdigit())
                           + 0.25 * response.rstrip().endswith(".") - 0.25 * repeats),
    }
    total = sum(WEIGHTS[name] * value for name, value in parts.items())
    return Score(total=total, parts=parts)


def rank(prompt: str, responses: list[str], ended: list[bool] | None = None, *, noise: float = 0.0,
         rng: random.Random | None = None) -> list[int]:
    """Indices of `responses`, best first.

    noise = 0: sorted by the rubric total (ties keep the given order).
    noise > 0: a Plackett-Luce sample: pick the best with probability proportional to
    exp(total / noise) among those left, then the next, ... The pairwise marginal of this model is
    Bradley-Terry: P(i above j) = sigmoid((total_i - total_j) / noise).
    """
    ended = ended if ended is not None else [True] * len(responses)
    totals = [score(prompt, r, e).total for r, e in zip(responses, ended)]
    if noise <= 0:
        return sorted(range(len(responses)), key=lambda i: -totals[i])
    rng = rng or random.Random()
    left = list(range(len(responses)))
    order = []
    while left:
        top = max(totals[i] for i in left)   # subtract the max: exp never overflows
        weights = [math.exp((totals[i] - top) / noise) for i in left]
        pick = rng.choices(left, weights)[0]
        order.append(pick)
        left.remove(pick)
    return order
