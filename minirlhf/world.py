"""The tiny world: the bundled knowledge, prompts and texts that every stage learns from.

Nothing is downloaded. A deterministic generator (seeded) writes everything `data/prepare.py`
needs, small enough for a 1-5M-parameter GPT to learn on a laptop CPU in minutes:

* a fixed knowledge base: animals (what they eat, say, where they live, how many legs, colour),
  things to explain to a child (the moon, rain, ...), small arithmetic, kind words;
* four prompt families:
    facts       "what does a cow eat?"                -> "A cow eats grass."
    arithmetic  "what is 3 plus 4?"                   -> "3 plus 4 is 7."
    explain     "explain the moon to a 6 year old."   -> "The moon is a big rock in the sky. It ..."
    kindness    "say something nice about the dog."   -> "The dog is kind and brave."
* a pretraining corpus: plain narrative text (where the knowledge lives) plus chats in which the
  assistant behaves *inconsistently* - correct, wrong, rude, off-topic, rambling, never stopping -
  the way a model pretrained on the web does before instruction tuning;
* SFT demonstrations: good responses only, and few of them. "Good" still varies the way labelers'
  demonstrations vary (one to four kind words, two to four facts, sometimes an extra sentence), so
  the SFT model is good but not optimal, and the reward model + PPO have something left to teach.

Every prompt string maps back to its `Task` (family, subject, answer), which is how the gold
labeler (`minirlhf/labeler.py`) knows what a correct answer is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------------
# The knowledge base. One line per animal: change a fact here and every file and the labeler follow.

ANIMAL_FACTS = {
    #  name      eats       says      lives in   legs     colour
    "cow":    ("grass",   "moo",    "barn",    "four",  "brown"),
    "dog":    ("bones",   "woof",   "kennel",  "four",  "black"),
    "cat":    ("fish",    "meow",   "house",   "four",  "grey"),
    "horse":  ("hay",     "neigh",  "stable",  "four",  "white"),
    "sheep":  ("clover",  "baa",    "field",   "four",  "white"),
    "pig":    ("corn",    "oink",   "sty",     "four",  "pink"),
    "duck":   ("bread",   "quack",  "pond",    "two",   "yellow"),
    "owl":    ("mice",    "hoot",   "tree",    "two",   "brown"),
    "frog":   ("flies",   "croak",  "lake",    "four",  "green"),
    "bee":    ("nectar",  "buzz",   "hive",    "six",   "yellow"),
    "lion":   ("meat",    "roar",   "den",     "four",  "gold"),
    "mouse":  ("cheese",  "squeak", "hole",    "four",  "grey"),
    "hen":    ("seeds",   "cluck",  "coop",    "two",   "red"),
    "snake":  ("eggs",    "hiss",   "burrow",  "no",    "green"),
    "wolf":   ("rabbits", "howl",   "forest",  "four",  "grey"),
    "crow":   ("worms",   "caw",    "nest",    "two",   "black"),
    "goat":   ("weeds",   "bleat",  "hill",    "four",  "white"),
    "fox":    ("berries", "yelp",   "hollow",   "four",  "orange"),
    "bear":   ("honey",   "growl",  "cave",    "four",  "brown"),
    "spider": ("bugs",    "nothing", "web",    "eight", "black"),
}
ATTRIBUTES = ("eats", "says", "lives", "legs", "colour")
ANIMALS = tuple(ANIMAL_FACTS)


def animal_fact(animal: str, attribute: str) -> str:
    """The value of one attribute, e.g. animal_fact("cow", "eats") == "grass"."""
    return ANIMAL_FACTS[animal][ATTRIBUTES.index(attribute)]


def a_or_an(noun: str) -> str:
    """"a cow", "an owl"."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def fact_sentence(animal: str, attribute: str, article: str = "A") -> str:
    """The one correct sentence for a fact, e.g. "A cow eats grass." / "An owl says hoot." /
    "The cow lives in a barn." (article "A" becomes "An" before a vowel)."""
    value = animal_fact(animal, attribute)
    subject = a_or_an(animal).capitalize() if article == "A" else f"{article} {animal}"
    if attribute == "eats":
        return f"{subject} eats {value}."
    if attribute == "says":
        return f"{subject} says {value}."
    if attribute == "lives":
        return f"{subject} lives in a {value}."
    if attribute == "legs":
        return f"{subject} has {value} legs."
    return f"{subject} is {value}."


# Things to explain to a child: four key facts each, written as they follow "The moon ..." or "It ...".
EXPLAIN_FACTS = {
    "moon":   ("is a big rock in the sky", "shines at night", "goes around the earth", "looks like a ball"),
    "sun":    ("is a hot star", "gives us light", "makes the day warm", "rises in the morning"),
    "rain":   ("is water from the clouds", "falls from the sky", "helps plants grow", "makes puddles"),
    "snow":   ("is frozen water", "is cold and white", "falls in winter", "melts in the sun"),
    "wind":   ("is moving air", "makes trees sway", "can push a boat", "blows the clouds"),
    "sea":    ("is a lot of salty water", "has big waves", "is home to fish", "looks blue"),
    "stars":  ("are far away suns", "twinkle at night", "make shapes in the sky", "are very hot"),
    "clouds": ("are made of tiny drops", "float in the sky", "can bring rain", "move with the wind"),
    "trees":  ("are tall plants", "have green leaves", "give us shade", "grow from seeds"),
    "bread":  ("is made from flour", "is baked in an oven", "is good to eat", "can be made into toast"),
}
EXPLAIN_TOPICS = tuple(EXPLAIN_FACTS)
EXPLAIN_PLURAL = {"stars", "clouds", "trees"}

NICE_WORDS = ("kind", "brave", "gentle", "clever", "friendly", "funny", "lovely", "smart", "sweet", "happy")
RUDE_WORDS = ("stupid", "dumb", "smelly", "lazy", "boring", "silly", "rotten", "nasty")  # none starts with a vowel: "a {w} question"
KIND_SUBJECTS = ANIMALS + ("teacher", "baby", "farmer", "doctor", "friend", "nurse", "baker", "pilot")

# Arithmetic on small numbers: sums up to 8, no negative differences: 26 sums to know, each shown by
# the corpus about twice as often as each animal fact, asked in six phrasings (so the family keeps
# its share of prompts). How many sums decides what the pipeline can learn:
#   1 to 9 (126 sums): the base model learned too few; SFT got 5% of sums fully right.
#   1 to 6 (57 sums): the base model's likeliest answer was right for 79%; SFT got 57% of unseen
#     sums right; the reward model, which must check "x op y is z" (a three-way lookup) from the
#     end-of-text, ranked sums at chance and PPO made them worse (gold 6.81 -> 5.84).
#   1 to 4 (26 sums): the base model's likeliest answer is right for 96% after 500 steps (58% after
#     the default 360; SFT brings it to 92%), and PPO on the learned RM keeps sums about level or
#     lowers them (6.74 -> 6.18..6.63 over eight runs; the RM still cannot check a sum it has not seen).
NUMBER_MIN, NUMBER_MAX = 1, 4

# ----------------------------------------------------------------------------------------------
# Prompt families. Several phrasings per question, so prompt sets can be split without losing
# any question type, and the evaluation prompts are phrasings the model never saw in training.

FACT_TEMPLATES = {
    "eats": ("what does {a} eat?", "what do {p} like to eat?", "tell me what {a} eats."),
    "says": ("what sound does {a} make?", "what does {a} say?", "tell me the sound of {a}."),
    "lives": ("where does {a} live?", "where is the home of {a}?", "tell me where {a} lives."),
    "legs": ("how many legs does {a} have?", "count the legs of {a}.", "tell me how many legs {a} has."),
    "colour": ("what color is {a}?", "what colour is {a}?", "tell me the color of {a}."),
}
ARITHMETIC_TEMPLATES = ("what is {x} {op} {y}?", "compute {x} {op} {y}.", "how much is {x} {op} {y}?",
                        "what do you get from {x} {op} {y}?", "work out {x} {op} {y}.", "tell me {x} {op} {y}.")
EXPLAIN_TEMPLATES = ("explain the {t} to {a} {n} year old.", "tell {a} {n} year old about the {t}.",
                     "what is the {t}? i am {n}.")
KIND_TEMPLATES = ("say something nice about the {s}.", "write a kind sentence about the {s}.",
                  "be nice about the {s}.", "tell me something good about the {s}.",
                  "what is nice about the {s}?", "praise the {s}.")
FAMILIES = ("facts", "arithmetic", "explain", "kindness")


@dataclass(frozen=True)
class Task:
    """What a prompt asks, so that a response can be graded.

    family: one of FAMILIES; subject: the animal / topic / kindness subject ("" for arithmetic);
    attribute: for facts; x, op, y, answer: for arithmetic (answer also holds the fact's value).
    """

    family: str
    prompt: str
    subject: str = ""
    attribute: str = ""
    x: int = 0
    op: str = ""
    y: int = 0
    answer: str = ""


def _plural(animal: str) -> str:
    return {"sheep": "sheep", "mouse": "mice", "fox": "foxes", "wolf": "wolves"}.get(animal, animal + "s")


def all_tasks() -> list[Task]:
    """Every prompt of the world, in a fixed order (the split into sets shuffles them with a seed)."""
    tasks = []
    for attribute, templates in FACT_TEMPLATES.items():
        for animal in ANIMALS:
            for template in templates:
                prompt = template.format(a=a_or_an(animal), p=_plural(animal))
                tasks.append(Task("facts", prompt, subject=animal, attribute=attribute,
                                  answer=animal_fact(animal, attribute)))
    for x in range(NUMBER_MIN, NUMBER_MAX + 1):
        for y in range(NUMBER_MIN, NUMBER_MAX + 1):
            for op in ("plus", "minus"):
                if op == "minus" and y > x:
                    continue   # no negative numbers in the tiny world
                answer = x + y if op == "plus" else x - y
                for template in ARITHMETIC_TEMPLATES:
                    tasks.append(Task("arithmetic", template.format(x=x, op=op, y=y),
                                      x=x, op=op, y=y, answer=str(answer)))
    for topic in EXPLAIN_TOPICS:
        for age in range(3, 10):
            for template in EXPLAIN_TEMPLATES:
                article = "an" if age == 8 else "a"   # "an 8 year old"
                tasks.append(Task("explain", template.format(t=topic, n=age, a=article), subject=topic))
    for subject in KIND_SUBJECTS:
        for template in KIND_TEMPLATES:
            tasks.append(Task("kindness", template.format(s=subject), subject=subject))
    return tasks


_TASKS_BY_PROMPT: dict[str, Task] = {}


def task_for_prompt(prompt: str) -> Task | None:
    """The Task a prompt string asks for, or None for a prompt from outside the tiny world."""
    if not _TASKS_BY_PROMPT:
        _TASKS_BY_PROMPT.update({t.prompt: t for t in all_tasks()})
    return _TASKS_BY_PROMPT.get(prompt.strip())


# ----------------------------------------------------------------------------------------------
# Responses. `good_response` is what a labeler would write; the `bad_*` kinds are what a base
# model pretrained on the web also does.

def _explain_sentences(topic: str, facts: list[str]) -> str:
    """"The moon is a big rock in the sky. It shines at night." - the first names the topic."""
    pronoun = "They" if topic in EXPLAIN_PLURAL else "It"
    sentences = []
    for i, fact in enumerate(facts):
        subject = f"The {topic}" if i == 0 else pronoun
        sentences.append(f"{subject} {fact}.")
    return " ".join(sentences)


def _kind_sentence(subject: str, words: list[str]) -> str:
    """"The dog is kind.", "The dog is kind and brave.", "The dog is kind, brave and gentle."."""
    if len(words) == 1:
        listed = words[0]
    else:
        listed = ", ".join(words[:-1]) + " and " + words[-1]
    return f"The {subject} is {listed}."


def good_response(task: Task, rng: random.Random) -> str:
    """A demonstration: correct, kind, on topic, well formed - but of varying completeness."""
    if task.family == "facts":
        answer = fact_sentence(task.subject, task.attribute)
        if rng.random() < 0.5:   # labelers often add a (true, on-topic, but unasked-for) second sentence
            other = rng.choice([a for a in ATTRIBUTES if a != task.attribute])
            answer += " " + fact_sentence(task.subject, other, article="The")
        return answer
    if task.family == "arithmetic":
        return f"{task.x} {task.op} {task.y} is {task.answer}."
    if task.family == "explain":
        facts = rng.sample(EXPLAIN_FACTS[task.subject], rng.choice([1, 1, 2, 2, 2, 3, 4]))
        return _explain_sentences(task.subject, facts)
    words = rng.sample(NICE_WORDS, rng.choice([1, 1, 1, 2, 2, 3, 4]))
    return _kind_sentence(task.subject, words)


def wrong_response(task: Task, rng: random.Random) -> str:
    """Well formed and confident, but false: a wrong fact, a wrong sum, a fact of the wrong topic."""
    if task.family == "facts":
        values = sorted({animal_fact(a, task.attribute) for a in ANIMALS} - {task.answer})
        wrong = dict(zip(ATTRIBUTES, ANIMAL_FACTS[task.subject]))
        wrong[task.attribute] = rng.choice(values)
        sentence = fact_sentence(task.subject, task.attribute)
        return sentence.replace(f" {task.answer}", f" {wrong[task.attribute]}", 1)
    if task.family == "arithmetic":
        wrong = int(task.answer) + rng.choice([-2, -1, 1, 2, 3])
        return f"{task.x} {task.op} {task.y} is {wrong if wrong >= 0 else int(task.answer) + 1}."
    if task.family == "explain":
        other = rng.choice([t for t in EXPLAIN_TOPICS if t != task.subject])
        facts = rng.sample(EXPLAIN_FACTS[other], 2)
        return _explain_sentences(task.subject, facts)
    return f"The {task.subject} is {rng.choice(['fine', 'okay', 'there', 'a thing'])}."


def rude_response(task: Task, rng: random.Random) -> str:
    """Insults the user or the subject (sometimes after a correct answer)."""
    insult = rng.choice([
        "That is a {w} question.", "Only {w} people ask that.", "You are {w}.", "What a {w} thing to ask.",
    ]).format(w=rng.choice(RUDE_WORDS))
    if task.family == "kindness":
        return f"The {task.subject} is {rng.choice(RUDE_WORDS)} and {rng.choice(RUDE_WORDS)}."
    if rng.random() < 0.5:
        return insult
    return f"{insult} {good_response(task, rng)}"


def narrative_sentence(rng: random.Random) -> str:
    """One true sentence about the world, on a random subject."""
    kind = rng.random()
    if kind < 0.5:
        return fact_sentence(rng.choice(ANIMALS), rng.choice(ATTRIBUTES), article="The")
    if kind < 0.75:
        topic = rng.choice(EXPLAIN_TOPICS)
        return f"The {topic} {rng.choice(EXPLAIN_FACTS[topic])}."
    return _sum_sentence(rng)


def off_topic_response(task: Task, rng: random.Random) -> str:
    """Fluent, true, and about something else."""
    return " ".join(narrative_sentence(rng) for _ in range(rng.randint(1, 2)))


def rambling_response(task: Task, rng: random.Random) -> str:
    """Starts well, then goes on and on about other things."""
    start = good_response(task, rng) if rng.random() < 0.7 else wrong_response(task, rng)
    return start + " " + " ".join(narrative_sentence(rng) for _ in range(rng.randint(3, 7)))


def endless_response(task: Task, rng: random.Random) -> str:
    """Never stops: far past any response budget (the corpus writes it without an end-of-text)."""
    start = good_response(task, rng) if rng.random() < 0.5 else off_topic_response(task, rng)
    return start + " " + " ".join(narrative_sentence(rng) for _ in range(rng.randint(12, 20)))


# How the assistant behaves in the pretraining corpus's chats. Edit to make the base model better/worse.
BASE_BEHAVIOUR = {
    "good": (0.25, good_response),
    "wrong": (0.20, wrong_response),
    "rude": (0.15, rude_response),
    "off_topic": (0.15, off_topic_response),
    "rambling": (0.15, rambling_response),
    "endless": (0.10, endless_response),
}


def base_model_response(task: Task, rng: random.Random) -> tuple[str, str, bool]:
    """Pick a behaviour by BASE_BEHAVIOUR's weights: returns (behaviour, response, ends_with_eos)."""
    names = list(BASE_BEHAVIOUR)
    weights = [BASE_BEHAVIOUR[n][0] for n in names]
    name = rng.choices(names, weights)[0]
    return name, BASE_BEHAVIOUR[name][1](task, rng), name != "endless"


def narrative_paragraph(rng: random.Random) -> str:
    """Plain text for pretraining: a short story or a few facts about one subject."""
    style = rng.random()
    if style < 0.40:   # all the facts about one animal
        animal = rng.choice(ANIMALS)
        attributes = rng.sample(ATTRIBUTES, rng.randint(2, 5))
        sentences = [fact_sentence(animal, a, article="The" if i else "A") for i, a in enumerate(attributes)]
        if rng.random() < 0.5:
            sentences.append(_kind_sentence(animal, rng.sample(NICE_WORDS, rng.randint(1, 3))))
        return " ".join(sentences)
    if style < 0.60:   # a topic explained
        topic = rng.choice(EXPLAIN_TOPICS)
        facts = rng.sample(EXPLAIN_FACTS[topic], rng.randint(2, 4))
        return _explain_sentences(topic, facts)
    if style < 0.85:   # sums (a share that shows each sum about as often as each animal fact)
        return " ".join(narrative_sentence(rng) if rng.random() < 0.2 else
                        _sum_sentence(rng) for _ in range(rng.randint(3, 6)))
    subject = rng.choice(KIND_SUBJECTS)
    mood = rng.random()
    words = rng.sample(NICE_WORDS if mood < 0.8 else RUDE_WORDS, rng.randint(1, 3))
    return f"Tom met the {subject}. " + _kind_sentence(subject, words)


def _sum_sentence(rng: random.Random) -> str:
    x, y = rng.randint(NUMBER_MIN, NUMBER_MAX), rng.randint(NUMBER_MIN, NUMBER_MAX)
    if y > x or rng.random() < 0.5:
        return f"{x} plus {y} is {x + y}."
    return f"{x} minus {y} is {x - y}."


# ----------------------------------------------------------------------------------------------
# Splitting prompts into disjoint sets.

@dataclass
class PromptSplits:
    """Disjoint prompt sets. `eval` prompts appear in no training file (corpus, SFT, RM, PPO)."""

    sft: list[Task] = field(default_factory=list)
    rm: list[Task] = field(default_factory=list)
    ppo: list[Task] = field(default_factory=list)
    eval: list[Task] = field(default_factory=list)
    corpus: list[Task] = field(default_factory=list)   # only in training: corpus chats and SFT demonstrations


SPLIT_FRACTIONS = {"eval": 0.12, "ppo": 0.22, "rm": 0.22, "sft": 0.22}   # the rest: `corpus`


def split_prompts(seed: int) -> PromptSplits:
    """Shuffle every family's prompts with `seed` and cut them by SPLIT_FRACTIONS (per family,
    so each set has every family in the same proportions)."""
    rng = random.Random(seed)
    splits = PromptSplits()
    for family in FAMILIES:
        tasks = [t for t in all_tasks() if t.family == family]
        rng.shuffle(tasks)
        start = 0
        for name, fraction in SPLIT_FRACTIONS.items():
            count = round(fraction * len(tasks))
            getattr(splits, name).extend(tasks[start:start + count])
            start += count
        splits.corpus.extend(tasks[start:])
    return splits
