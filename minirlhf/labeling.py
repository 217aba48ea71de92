"""Collecting comparisons for the reward model: sample K responses per prompt, have a labeler rank them.

InstructGPT section 3.5 (and appendix B): for each prompt, the SFT model writes K responses
(K = 4 to 9) and a labeler ranks them best to worst. One ranking of K responses gives C(K, 2)
comparisons "a is better than b" at the cost of reading K responses: that is why ranking K at
once is cheaper than asking for pairs. This file collects those rankings in three ways:

    gold labeler   `rank_with_gold`: the rubric of `minirlhf/labeler.py` ranks them; with
                   `noise > 0` the ranking is sampled (Plackett-Luce), so two simulated labelers
                   disagree the way two people do.
    a person       `label_by_human`: the K responses are shown in the terminal and a ranking such
                   as `2 4 1 3` is typed in; every answer is appended to a JSONL file as soon as it
                   is given, so quitting loses nothing and the next run resumes where it stopped.
    a file         `read_ranked_comparisons`: the JSONL shapes of docs/design.md (`data.read_comparisons`).

How noisy is a noisy labeler? Under the Plackett-Luce model the chance that a labeler puts response
i above response j is the Bradley-Terry probability p = sigmoid((gold_i - gold_j) / noise). Two
independent labelers order that pair the same way with probability p^2 + (1 - p)^2: averaged over
the pairs of the collected samples, that is the *inter-labeler agreement* InstructGPT reports
(section 3.4: its training labelers agreed with each other 72.6 +- 1.5% of the time). `expected_agreement` computes it in closed form,
`simulated_agreement` measures it by letting two simulated labelers rank the same samples, and
`noise_for_agreement` finds the noise that gives a target agreement. `accuracy_bound` is the best
pairwise accuracy any reward model can reach against one noisy labeler's held-out rankings
(it predicts the likelier order every time: mean of max(p, 1 - p)).

What the RM is shown matters as much as how it is trained: `drop_duplicates` removes repeated
copies of one answer (a pair of identical texts teaches nothing), and `add_degenerate` gives some
prompts one extra response of a kind the SFT policy rarely writes but PPO readily finds (an
immediate end-of-text, half a sentence, a repetition, a ramble), so the RM learns to score those
low too.

The comparisons are written in docs/design.md's ranked shape plus two optional fields:

    {"prompt": str, "responses": [str, ...], "ranking": [int, ...], "ended": [bool, ...], "sources": [str, ...],
     "tiers": [int, ...]}

`ranking` lists indices into `responses`, best first. `ended[i]` is False when response i ran
out of the token budget without an end-of-text: the reward model then sees it without the EOS,
exactly as the policy produced it (and the gold labeler marks it down). `sources[i]` is "policy"
for a sample of the SFT policy, or the kind of an added degenerate response. Each field is
written only when it says something (a response that did not end, a response not from the
policy); `tiers[p]` is the tier of the response ranked p-th, equal tiers being ties (the noiseless
gold labeler gives equal totals one tier: a tie is not a preference, and the RM's loss, its
accuracy and DPO's pairs all leave tied pairs out). A file without them means every response
ended, came from the policy, and the ranking is strict.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from dataclasses import dataclass, field
from itertools import combinations

import torch

from minirlhf import labeler, world
from minirlhf.cli import UserError
from minirlhf.data import Comparison, numbered_records, read_comparisons, write_jsonl
from minirlhf.tokenizer import Tokenizer
from minirlhf.training import sample_responses


POLICY = "policy"   # the source of a response sampled from the SFT policy; see `add_degenerate`


@dataclass
class Candidates:
    """K responses to one prompt, waiting for a labeler. `ended[i]`: response i stopped with EOS;
    `sources[i]`: where it came from ("policy", or a kind of `add_degenerate`; default all policy)."""

    prompt: str
    responses: list[str]
    ended: list[bool]
    sources: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.sources:
            self.sources = [POLICY] * len(self.responses)

    def key(self) -> tuple:
        """What identifies these candidates when a labelling session resumes."""
        return (self.prompt, tuple(self.responses))


@dataclass
class RankedComparison(Comparison):
    """A `data.Comparison` (prompt, responses, ranking best first) plus, per response, whether it
    ended and where it came from (both optional in a file: all ended, all from the policy), and
    the ties: `tiers[p]` is the tier of the response ranked p-th (non-decreasing; equal tiers are
    responses the labeler preferred neither of; default 0, 1, ..., K-1: a strict ranking)."""

    ended: list[bool] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    tiers: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.ended:
            self.ended = [True] * len(self.responses)
        if not self.sources:
            self.sources = [POLICY] * len(self.responses)
        if not self.tiers:
            self.tiers = list(range(len(self.responses)))

    def preferences(self) -> list[tuple[int, int]]:
        """(better, worse) response indices of every pair the ranking orders: C(K, 2) pairs less the ties."""
        return [(self.ranking[p], self.ranking[q]) for p, q in combinations(range(len(self.ranking)), 2)
                if self.tiers[p] < self.tiers[q]]

    def to_json(self) -> dict:
        record = super().to_json()
        if not all(self.ended):   # the common case keeps the plain docs/design.md shape
            record["ended"] = list(self.ended)
        if any(source != POLICY for source in self.sources):
            record["sources"] = list(self.sources)
        if len(set(self.tiers)) < len(self.tiers):
            record["tiers"] = list(self.tiers)
        return record


def tiers_of(ordered_totals: list[float]) -> list[int]:
    """Tiers of scores listed best first: equal scores share a tier.

        tiers_of([7.0, 7.0, 5.5, 2.0, 2.0])  ->  [0, 0, 1, 2, 2]
    """
    tiers = []
    for p, total in enumerate(ordered_totals):
        tiers.append(0 if p == 0 else tiers[-1] + (total != ordered_totals[p - 1]))
    return tiers


# ----------------------------------------------------------------------------------------------
# Which prompts, and the candidates sampled for them

def family_of(prompt: str) -> str:
    """The tiny-world prompt family ("facts", "arithmetic", ...), or "other" for a foreign prompt."""
    task = world.task_for_prompt(prompt)
    return task.family if task else "other"


def split_prompts(prompts: list[str], val_fraction: float, rng: random.Random) -> tuple[list[str], list[str]]:
    """Distinct prompts -> (train, held out), split BY PROMPT (no prompt's samples on both sides).
    Each family keeps `val_fraction` of its prompts for held-out comparisons (at least one when
    the fraction is > 0 and the family has two prompts or more), so every family is measured."""
    by_family: dict[str, list[str]] = {}
    for prompt in sorted(set(prompts)):   # sorted: the split depends on the seed, not the file order
        by_family.setdefault(family_of(prompt), []).append(prompt)
    train, held_out = [], []
    for family in sorted(by_family):
        group = by_family[family]
        rng.shuffle(group)
        n_val = max(1, round(val_fraction * len(group))) if val_fraction > 0 and len(group) > 1 else 0
        held_out += group[:n_val]
        train += group[n_val:]
    return train, held_out


def cycle_prompts(prompts: list[str], n: int, rng: random.Random) -> list[str]:
    """n prompts drawn with replacement, each about equally often: pass after pass over the list,
    reshuffled each pass (so 800 draws from 200 prompts use every prompt 4 times)."""
    if not prompts:
        return []
    drawn = []
    while len(drawn) < n:
        order = list(prompts)
        rng.shuffle(order)
        drawn += order
    return drawn[:n]


def sample_candidates(model, tokenizer: Tokenizer, prompts: list[str], *, k: int, max_new_tokens: int,
                      temperature: float = 1.0, generator: torch.Generator | None = None,
                      batch_size: int = 64, progress=None) -> list[Candidates]:
    """K sampled responses for each prompt (a prompt listed twice gets two independent sets of K).

    The K copies of a prompt go through the sampler together (one batch holds whole groups), so
    the KV-cache sampler runs `len(prompts) * k` rows in batches of about `batch_size`.
    `progress(done, total)` is called after each batch, if given.
    """
    groups_per_batch = max(1, batch_size // k)
    candidates = []
    for start in range(0, len(prompts), groups_per_batch):
        chunk = prompts[start:start + groups_per_batch]
        repeated = [prompt for prompt in chunk for _ in range(k)]   # p0 p0 p0 p0 p1 p1 ...
        texts, ended, _ = sample_responses(model, tokenizer, repeated, max_new_tokens=max_new_tokens,
                                           temperature=temperature, generator=generator,
                                           batch_size=len(repeated))
        for g, prompt in enumerate(chunk):
            rows = slice(g * k, (g + 1) * k)
            candidates.append(Candidates(prompt, texts[rows], [bool(e) for e in ended[rows]]))
        if progress is not None:
            progress(len(candidates), len(prompts))
    return candidates


def drop_duplicates(candidates: list[Candidates]) -> list[Candidates]:
    """Keep one copy of each distinct response in a group; drop groups left with fewer than two.

    A policy often writes the same short answer twice ("A crow says caw."). A ranking must still
    put one copy above the other, but that pair teaches the RM nothing: both copies get the same
    score, so their gradients cancel exactly, while the pair still counts in the prompt's mean
    (diluting the pairs that do teach) and costs two forward passes. Showing a person the same
    text twice wastes their time too."""
    kept = []
    for group in candidates:
        first = {}
        for i, (response, is_ended) in enumerate(zip(group.responses, group.ended)):
            first.setdefault((response, is_ended), i)
        keep = sorted(first.values())
        if len(keep) >= 2:
            kept.append(Candidates(group.prompt, [group.responses[i] for i in keep], [group.ended[i] for i in keep],
                                   [group.sources[i] for i in keep]))
    return kept


DEGENERATE_KINDS = ("empty", "cut", "repeat", "ramble", "swap")


def degenerate_response(kind: str, own: str, other: str, rng: random.Random) -> tuple[str, bool]:
    """A response of a kind that PPO drifts to when the reward model has never seen it, built
    from one of the policy's own responses (`own`) and the policy's response to another prompt,
    of the same family where there is one (`other`). Returns (text, ended).

        empty    ""                               the immediate end-of-text: nothing said at all
        cut      the first words of `own`          stops mid-sentence
        repeat   `own` two or three times, or one  says the same thing again
                 of its sentences twice
        ramble   `own` followed by `other`         goes on about something else
        swap     `other`                           a fluent answer to another question ("The moon
                                                   shines at night." about the rain, "6 minus 1
                                                   is 5." to "what is 6 plus 1?")
    """
    words = own.split()
    if kind == "empty":
        return "", True
    if kind == "cut":
        return " ".join(words[:rng.randint(1, max(1, len(words) // 2))]), True
    if kind == "repeat":
        sentences = labeler.sentences(own)
        if len(sentences) > 1 and rng.random() < 0.5:
            i = rng.randrange(len(sentences))
            return " ".join(sentences[:i + 1] + sentences[i:]), True
        return " ".join([own.strip()] * rng.randint(2, 3)), True
    if kind == "ramble":
        return f"{own.strip()} {other.strip()}", True
    if kind == "swap":
        return other.strip(), True
    raise ValueError(f"unknown degenerate kind {kind!r}; expected one of {DEGENERATE_KINDS}")


def add_degenerate(candidates: list[Candidates], fraction: float, rng: random.Random,
                   kinds: tuple[str, ...] = DEGENERATE_KINDS, tokenizer: Tokenizer | None = None,
                   max_new_tokens: int | None = None) -> list[Candidates]:
    """Give a `fraction` of the groups one extra, degenerate response (`degenerate_response`, kind
    drawn uniformly), ranked with the others. With a tokenizer and `max_new_tokens`, a response
    longer than the policy's budget is cut there and marked as not ended, as the policy's would be.

    Why: the RM only learns about responses it is shown. The SFT policy almost never answers with
    an immediate EOS, half a sentence, a repetition or another question's answer, so an RM trained
    on its samples alone can score those anything - and PPO, which searches for high scores, finds
    them (probes of this project saw policies learn to answer with an immediate EOS, and to explain
    the moon whatever the topic). A few such responses in the comparisons teach the RM where they
    belong. Returns new groups (K or K + 1).
    """
    pool: dict[str, list[tuple[str, str]]] = {}   # family -> (prompt, policy response)
    for c in candidates:
        pool.setdefault(family_of(c.prompt), []).extend(
            (c.prompt, r) for r, s in zip(c.responses, c.sources) if s == POLICY and r.strip())
    everything = [entry for entries in pool.values() for entry in entries]
    augmented = []
    for group in candidates:
        group = Candidates(group.prompt, list(group.responses), list(group.ended), list(group.sources))
        own = [r for r, s in zip(group.responses, group.sources) if s == POLICY and r.strip()]
        if own and everything and rng.random() < fraction:
            kind = rng.choice(kinds)
            others = ([r for p, r in pool.get(family_of(group.prompt), []) if p != group.prompt]
                      or [r for p, r in everything if p != group.prompt] or [r for _, r in everything])
            text, ended = degenerate_response(kind, rng.choice(own), rng.choice(others), rng)
            if tokenizer is not None and max_new_tokens is not None:
                ids = tokenizer.encode(text)
                if len(ids) >= max_new_tokens:   # no room left for the EOS: cut at the budget, not ended
                    text, ended = tokenizer.decode(ids[:max_new_tokens]), False
            group.responses.append(text)
            group.ended.append(ended)
            group.sources.append(kind)
        augmented.append(group)
    return augmented


# ----------------------------------------------------------------------------------------------
# The gold labeler, and how much two noisy labelers agree

def gold_totals(candidates: Candidates) -> list[float]:
    """The gold rubric's total for each response (`labeler.score`)."""
    return [labeler.score(candidates.prompt, r, e).total for r, e in zip(candidates.responses, candidates.ended)]


def rank_with_gold(candidates: list[Candidates], noise: float = 0.0,
                   rng: random.Random | None = None) -> list[RankedComparison]:
    """Rank every group with the gold labeler (`labeler.rank`).

    noise 0: by the rubric's total, and responses with EQUAL totals are ties (`tiers`), not a
    preference for whichever was listed first. noise > 0: a sampled (Plackett-Luce) ranking,
    strict like a person forced to choose - equal totals then come out in either order by chance.
    """
    rng = rng or random.Random(0)
    ranked = []
    for c in candidates:
        ranking = labeler.rank(c.prompt, c.responses, c.ended, noise=noise, rng=rng)
        if noise <= 0:
            totals = gold_totals(c)
            tiers = tiers_of([totals[i] for i in ranking])
        else:
            tiers = []
        ranked.append(RankedComparison(c.prompt, list(c.responses), ranking, list(c.ended), list(c.sources), tiers))
    return ranked


def drop_all_tied(comparisons: list[RankedComparison]) -> list[RankedComparison]:
    """The comparisons that prefer something: one whose responses are all tied teaches nothing."""
    return [c for c in comparisons if c.preferences()]


def _pair_probability(gap: float, noise: float) -> float:
    """P(the labeler puts the better response first) for gold totals `gap` >= 0 apart:
    sigmoid(gap / noise). With noise 0 the labeler is deterministic: 1 (a tie keeps a fixed order)."""
    if noise <= 0:
        return 1.0
    return 1.0 / (1.0 + math.exp(-gap / noise))


def _pair_gaps(totals_per_group: list[list[float]]) -> list[float]:
    return [abs(a - b) for totals in totals_per_group for a, b in combinations(totals, 2)]


def expected_agreement(totals_per_group: list[list[float]], noise: float) -> float:
    """Inter-labeler agreement implied by `noise`: the mean over all pairs of each group of
    p^2 + (1 - p)^2, the chance that two independent labelers order the pair the same way,
    with p = sigmoid(|gold_i - gold_j| / noise) (the Bradley-Terry marginal of Plackett-Luce).

    Example: gold totals [6, 4] and noise 2: p = sigmoid(1) = 0.731, agreement 0.607."""
    gaps = _pair_gaps(totals_per_group)
    if not gaps:
        return math.nan
    return sum(p * p + (1 - p) * (1 - p) for p in (_pair_probability(g, noise) for g in gaps)) / len(gaps)


def accuracy_bound(totals_per_group: list[list[float]], noise: float) -> float:
    """The best pairwise accuracy a reward model can reach against one noisy labeler's rankings:
    the mean over pairs of max(p, 1 - p) (always predict the likelier order). It is also how often
    the noisy labeler agrees with the noiseless one, a pair of equal gold totals counting 1/2 (the
    labeler orders it either way with probability 1/2)."""
    gaps = _pair_gaps(totals_per_group)
    if not gaps:
        return math.nan
    return sum(max(p, 1 - p) for p in (_pair_probability(g, noise) for g in gaps)) / len(gaps)


def simulated_agreement(candidates: list[Candidates], noise: float, rng: random.Random,
                        rounds: int = 1) -> float:
    """Let two simulated labelers (`labeler.rank` with `noise`) rank the same groups and count
    the pairs they order the same way: the measured counterpart of `expected_agreement`."""
    agree = total = 0
    for _ in range(rounds):
        for c in candidates:
            first = labeler.rank(c.prompt, c.responses, c.ended, noise=noise, rng=rng)
            second = labeler.rank(c.prompt, c.responses, c.ended, noise=noise, rng=rng)
            position_1 = {index: place for place, index in enumerate(first)}
            position_2 = {index: place for place, index in enumerate(second)}
            for i, j in combinations(range(len(c.responses)), 2):
                agree += (position_1[i] < position_1[j]) == (position_2[i] < position_2[j])
                total += 1
    return agree / total if total else math.nan


def noise_for_agreement(totals_per_group: list[list[float]], target: float = 0.73) -> float:
    """The label noise whose `expected_agreement` on these groups is `target` (bisection on a log
    scale: agreement falls from ~1 to 0.5 as the noise grows). NaN if no noise reaches it."""
    low, high = 1e-3, 1e3
    if not expected_agreement(totals_per_group, high) <= target <= expected_agreement(totals_per_group, low):
        return math.nan
    for _ in range(60):
        middle = math.sqrt(low * high)
        if expected_agreement(totals_per_group, middle) > target:
            low = middle      # still too consistent: more noise
        else:
            high = middle
    return math.sqrt(low * high)


# ----------------------------------------------------------------------------------------------
# A person as the labeler

def parse_ranking(text: str, k: int) -> tuple[list[int] | None, str]:
    """A typed ranking -> (0-based indices best first, "") or (None, what is wrong with it).

    Accepts the response numbers 1..k, best first, separated by spaces or commas ("2 4 1 3",
    "2,4,1,3"), or run together when k < 10 ("2413").
        parse_ranking("2 4 1 3", 4) -> ([1, 3, 0, 2], "")
    """
    cleaned = text.replace(",", " ").split()
    if len(cleaned) == 1 and k < 10 and cleaned[0].isdigit() and len(cleaned[0]) == k:
        cleaned = list(cleaned[0])   # "2413"
    example = " ".join(str(i) for i in range(k, 0, -1))
    if not cleaned:
        return None, f"type the {k} response numbers, best first (e.g. {example}), or q to quit"
    if not all(token.isdigit() for token in cleaned):
        return None, f"use only the numbers 1..{k}, best first (e.g. {example}); got {text.strip()!r}"
    numbers = [int(token) for token in cleaned]
    if sorted(numbers) != list(range(1, k + 1)):
        return None, f"each of 1..{k} exactly once, best first (e.g. {example}); got {text.strip()!r}"
    return [n - 1 for n in numbers], ""


def read_human_answers(path: str) -> list[RankedComparison]:
    """The rankings saved so far by `label_by_human` (none if the file does not exist yet)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return []
    return read_ranked_comparisons(path)


def label_by_human(candidates: list[Candidates], answers_path: str, *, ask=input,
                   out=None) -> list[RankedComparison] | None:
    """Show each group of K responses in the terminal and read a ranking from a person.

    Every answer is appended to `answers_path` (JSONL, flushed and synced at once), so quitting
    (`q`, Ctrl-D or Ctrl-C) loses nothing; groups already in the file are skipped, so running the
    same command again resumes. A typo is explained and asked again. Returns every saved
    comparison once all groups are ranked, or None if the person quit first.

    `ask` is the input function (a test passes a scripted one); `out` the stream to print to.
    """
    out = out or sys.stdout
    done = read_human_answers(answers_path)
    done_keys = {(c.prompt, tuple(c.responses)) for c in done}
    todo = [c for c in candidates if c.key() not in done_keys]
    if done:
        print(f"resuming: {len(done)} rankings already saved in {answers_path}, {len(todo)} to go", file=out)
    os.makedirs(os.path.dirname(os.path.abspath(answers_path)), exist_ok=True)
    with open(answers_path, "a", encoding="utf-8") as answers:
        for number, group in enumerate(todo, start=1):
            k = len(group.responses)
            print(f"\n[{number}/{len(todo)}] prompt: {group.prompt}", file=out)
            for i, (response, ended) in enumerate(zip(group.responses, group.ended), start=1):
                cut = "" if ended else "   [did not stop: cut at the length budget]"
                print(f"  {i}) {response.strip() or '(empty response)'}{cut}", file=out)
            while True:
                try:
                    text = ask(f"rank 1..{k}, best first (e.g. {' '.join(map(str, range(k, 0, -1)))}); q = save and quit: ")
                except EOFError:     # Ctrl-D or the end of a scripted input
                    text = "q"
                if text.strip().lower() in ("q", "quit", "exit"):
                    print(f"\nsaved {len(done)} rankings in {answers_path}; run the same command again to continue",
                          file=out)
                    return None
                ranking, problem = parse_ranking(text, k)
                if ranking is not None:
                    break
                print(f"  ? {problem}", file=out)
            comparison = RankedComparison(group.prompt, list(group.responses), ranking, list(group.ended),
                                          list(group.sources))
            record = comparison.to_json()
            record["ended"] = list(group.ended)   # always saved here: the resume key needs nothing else
            answers.write(json.dumps(record, ensure_ascii=False) + "\n")
            answers.flush()
            os.fsync(answers.fileno())   # on disk now: a crash or Ctrl-C a second later loses nothing
            done.append(comparison)
    print(f"all {len(done)} rankings saved in {answers_path}", file=out)
    return done


# ----------------------------------------------------------------------------------------------
# Files

def read_ranked_comparisons(path: str) -> list[RankedComparison]:
    """Comparisons in either docs/design.md shape (`data.read_comparisons` checks them and names the
    line of any error), plus the optional per-response `ended` and `sources` lists written here."""
    comparisons = read_comparisons(path)
    records = numbered_records(path)   # read_comparisons keeps only the shared fields: fetch the others here
    ranked = []
    for comparison, (where, record) in zip(comparisons, records):
        k = len(comparison.responses)
        ended, sources, tiers = record.get("ended"), record.get("sources"), record.get("tiers")
        if ended is not None and (not isinstance(ended, list) or len(ended) != k
                                  or not all(isinstance(e, bool) for e in ended)):
            raise UserError(f"{where}: 'ended' must be a list of {k} true/false values "
                            f"(one per response), got {ended!r}")
        if sources is not None and (not isinstance(sources, list) or len(sources) != k
                                    or not all(isinstance(s, str) for s in sources)):
            raise UserError(f"{where}: 'sources' must be a list of {k} strings (one per response), "
                            f"got {sources!r}")
        if tiers is not None and (not isinstance(tiers, list) or len(tiers) != k
                                  or not all(isinstance(t, int) and not isinstance(t, bool) for t in tiers)
                                  or any(a > b for a, b in zip(tiers, tiers[1:]))):
            raise UserError(f"{where}: 'tiers' must be a list of {k} non-decreasing integers (the tier of "
                            f"each response in ranking order; equal: tied), got {tiers!r}")
        ranked.append(RankedComparison(comparison.prompt, comparison.responses, comparison.ranking,
                                       list(ended or []), list(sources or []), list(tiers or [])))
    return ranked


def write_comparisons(path: str, comparisons: list[RankedComparison]) -> None:
    """Write comparisons as readable JSONL (atomically), in the shape `read_ranked_comparisons` reads."""
    write_jsonl(path, [c.to_json() for c in comparisons])
