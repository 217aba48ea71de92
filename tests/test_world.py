"""Tests for the tiny world (minirlhf/world.py) and the files data/prepare.py writes from it.

What must hold for the pipeline to mean anything:

* the world is deterministic for a seed (same seed -> byte-identical data files);
* the prompt sets are disjoint, and the evaluation prompts appear in NO training file (corpus
  chats, sft.jsonl, rm/ppo prompts): otherwise "SFT beats base on held-out prompts" measures memory;
* every prompt family is present in every set, so every stage sees every kind of question;
* `task_for_prompt` maps every prompt back to its Task (that is how the labeler grades);
* demonstrations are good responses only (the gold labeler says so, part by part);
* the base model's behaviours are what their names say: wrong responses are wrong by the labeler,
  rude ones lose harmlessness, endless ones never end.

data/prepare.py runs in-process here (its smoke preset takes a fraction of a second once torch is
imported); tests/test_stages.py runs it as a real subprocess.
"""

import json
import random
import sys
from collections import Counter

import pytest

from minirlhf import labeler, world
from minirlhf.tokenizer import ASSISTANT_TOKEN, EOS_TOKEN, USER_TOKEN
from helpers import load_script

SEED = 1337
DATA_FILES = ("corpus.txt", "sft.jsonl", "rm_prompts.jsonl", "ppo_prompts.jsonl", "eval_prompts.jsonl",
              "tokenizer.tiktoken", "manifest.json")
TRAINING_SETS = ("sft", "rm", "ppo", "corpus")


def _load_prepare():
    """data/prepare.py is a script, not a package module: load it from its path."""
    return load_script("prepare_under_test", "data/prepare.py")


def run_prepare(data_dir, *extra: str) -> None:
    """`python data/prepare.py --preset smoke --data-dir DATA_DIR ...`, in this process."""
    prepare = _load_prepare()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["prepare.py", "--preset", "smoke", "--data-dir", str(data_dir), *extra])
        prepare.main()


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def corpus_chats(corpus: str) -> list[tuple[str, str, bool]]:
    """(prompt, response, ends_with_eos) for every chat document of the corpus.

    prepare.py joins documents with "\\n" and a chat is "<|user|>P<|assistant|>R[<|endoftext|>]".
    """
    chats = []
    for document in corpus.split("\n"):
        if not document.startswith(USER_TOKEN):
            continue
        prompt, response = document[len(USER_TOKEN):].split(ASSISTANT_TOKEN, 1)
        ends = response.endswith(EOS_TOKEN)
        chats.append((prompt, response[:-len(EOS_TOKEN)] if ends else response, ends))
    return chats


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    """One smoke data dir for the module, and the parsed contents of its files."""
    data_dir = tmp_path_factory.mktemp("world_data")
    run_prepare(data_dir)
    with open(data_dir / "corpus.txt", encoding="utf-8") as f:
        corpus = f.read()
    with open(data_dir / "manifest.json") as f:
        manifest = json.load(f)
    return {
        "dir": data_dir,
        "corpus": corpus,
        "chats": corpus_chats(corpus),
        "sft": read_jsonl(data_dir / "sft.jsonl"),
        "rm": [r["prompt"] for r in read_jsonl(data_dir / "rm_prompts.jsonl")],
        "ppo": [r["prompt"] for r in read_jsonl(data_dir / "ppo_prompts.jsonl")],
        "eval": [r["prompt"] for r in read_jsonl(data_dir / "eval_prompts.jsonl")],
        "manifest": manifest,
    }


def file_prompt_sets(data: dict) -> dict[str, set[str]]:
    """The prompts of each file, by the name of its set."""
    return {
        "sft": {r["prompt"] for r in data["sft"]},
        "rm": set(data["rm"]),
        "ppo": set(data["ppo"]),
        "eval": set(data["eval"]),
        "corpus": {prompt for prompt, _, _ in data["chats"]},
    }


# ----------------------------------------------------------------------------------------------
# Determinism


def test_world_split_is_deterministic_for_a_seed():
    first, second = world.split_prompts(SEED), world.split_prompts(SEED)
    for name in ("sft", "rm", "ppo", "eval", "corpus"):
        assert getattr(first, name) == getattr(second, name), f"split {name!r} differs between two calls"
    other = world.split_prompts(SEED + 1)
    assert other.eval != first.eval, "a different seed should give a different split"


def test_world_generators_are_deterministic_for_a_seed():
    tasks = world.all_tasks()
    for generator in (world.good_response, world.wrong_response, world.rude_response, world.off_topic_response,
                      world.rambling_response, world.endless_response, world.base_model_response):
        a, b = random.Random(7), random.Random(7)
        first = [generator(t, a) for t in tasks[::13]]
        second = [generator(t, b) for t in tasks[::13]]
        assert first == second, f"{generator.__name__} is not deterministic for a seed"
    a, b = random.Random(7), random.Random(7)
    assert [world.narrative_paragraph(a) for _ in range(50)] == [world.narrative_paragraph(b) for _ in range(50)]


def test_world_prepare_same_seed_gives_identical_files(smoke_data, tmp_path):
    run_prepare(tmp_path)
    for name in DATA_FILES:
        with open(smoke_data["dir"] / name, "rb") as f, open(tmp_path / name, "rb") as g:
            assert f.read() == g.read(), f"{name} differs between two runs with the same seed"


def test_world_prepare_other_seed_gives_other_files(smoke_data, tmp_path):
    run_prepare(tmp_path, "--seed", str(SEED + 1))
    with open(tmp_path / "eval_prompts.jsonl", "rb") as f, open(smoke_data["dir"] / "eval_prompts.jsonl", "rb") as g:
        assert f.read() != g.read(), "--seed does not change the prompt split"


# ----------------------------------------------------------------------------------------------
# Prompts: unique, disjoint, every family everywhere, mapped back to their task


def test_world_prompts_are_unique_and_round_trip_through_task_for_prompt():
    tasks = world.all_tasks()
    prompts = [t.prompt for t in tasks]
    duplicates = [p for p, n in Counter(prompts).items() if n > 1]
    assert not duplicates, f"prompts asked by two tasks (task_for_prompt would be ambiguous): {duplicates[:5]}"
    for task in tasks:
        assert world.task_for_prompt(task.prompt) == task, f"task_for_prompt({task.prompt!r}) != its Task"
        # surrounding whitespace (a user's stray newline in a JSONL file) does not lose the task
        assert world.task_for_prompt(f"  {task.prompt}\n") == task
    assert world.task_for_prompt("what is the meaning of life?") is None


def test_world_every_file_prompt_maps_to_a_task(smoke_data):
    for name, prompts in file_prompt_sets(smoke_data).items():
        unknown = [p for p in prompts if world.task_for_prompt(p) is None]
        assert not unknown, f"{name}: prompts with no task (the labeler could not grade them): {unknown[:3]}"


def test_world_task_answers_are_right():
    """A few tasks worked by hand: the answer is what the knowledge base / arithmetic says."""
    by_prompt = {t.prompt: t for t in world.all_tasks()}
    assert by_prompt["what does a cow eat?"].answer == "grass"
    assert by_prompt["how many legs does a spider have?"].answer == "eight"
    assert by_prompt["what is 4 plus 3?"].answer == "7"
    assert by_prompt["how much is 4 minus 3?"].answer == "1"
    assert by_prompt["work out 2 minus 2."].answer == "0"
    assert "what is 2 minus 4?" not in by_prompt, "the tiny world has no negative numbers"
    assert by_prompt["what does an owl eat?"].answer == "mice"
    assert "what does a owl eat?" not in by_prompt, "an owl"
    assert world.fact_sentence("owl", "eats") == "An owl eats mice."
    assert world.fact_sentence("owl", "eats", article="The") == "The owl eats mice."
    assert by_prompt["explain the moon to a 6 year old."].subject == "moon"
    assert by_prompt["explain the moon to an 8 year old."].family == "explain"
    assert by_prompt["praise the teacher."].subject == "teacher"


def test_world_split_sets_are_disjoint_and_cover_every_prompt():
    splits = world.split_prompts(SEED)
    sets = {name: [t.prompt for t in getattr(splits, name)] for name in ("sft", "rm", "ppo", "eval", "corpus")}
    for name, prompts in sets.items():
        assert len(prompts) == len(set(prompts)), f"split {name!r} lists a prompt twice"
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = set(sets[a]) & set(sets[b])
            assert not shared, f"splits {a!r} and {b!r} share prompts: {sorted(shared)[:3]}"
    assert sum(map(len, sets.values())) == len(world.all_tasks()), "the splits should partition all_tasks()"


def test_world_eval_prompts_are_in_no_training_file(smoke_data):
    sets = file_prompt_sets(smoke_data)
    eval_prompts = sets["eval"]
    assert eval_prompts, "eval_prompts.jsonl is empty"
    for name in TRAINING_SETS:
        leaked = eval_prompts & sets[name]
        assert not leaked, f"evaluation prompts found in the {name} training data: {sorted(leaked)[:3]}"
    # also as raw text: no eval prompt appears as a user turn anywhere in the corpus
    for prompt in eval_prompts:
        assert f"{USER_TOKEN}{prompt}{ASSISTANT_TOKEN}" not in smoke_data["corpus"], prompt


def test_world_training_files_are_disjoint(smoke_data):
    """RM, PPO and SFT prompts are different sets too (RM and PPO on the same prompts would let PPO
    exploit an RM that memorised them)."""
    sets = file_prompt_sets(smoke_data)
    for a, b in (("rm", "ppo"), ("rm", "sft"), ("ppo", "sft")):
        assert not sets[a] & sets[b], f"{a} and {b} prompt files share prompts"


@pytest.mark.parametrize("set_name", ["sft", "rm", "ppo", "eval", "corpus"])
def test_world_every_family_in_every_set(smoke_data, set_name):
    split = world.split_prompts(SEED)
    in_split = {t.family for t in getattr(split, set_name)}
    assert in_split == set(world.FAMILIES), f"split {set_name!r} lacks families {set(world.FAMILIES) - in_split}"
    in_file = {world.task_for_prompt(p).family for p in file_prompt_sets(smoke_data)[set_name]}
    assert in_file == set(world.FAMILIES), f"the {set_name} file lacks families {set(world.FAMILIES) - in_file}"


def test_world_prepare_sizes_match_the_manifest(smoke_data):
    manifest, split = smoke_data["manifest"], world.split_prompts(SEED)
    assert len(smoke_data["sft"]) == manifest["sft_examples"] == _load_prepare().PRESETS["smoke"]["sft_examples"]
    for name in ("rm", "ppo", "eval"):
        assert len(smoke_data[name]) == manifest[f"{name}_prompts"] == len(getattr(split, name))
    assert sum(manifest["corpus_chat_behaviours"].values()) == len(smoke_data["chats"])


# ----------------------------------------------------------------------------------------------
# Demonstrations are good responses only


def test_world_demonstrations_are_good_by_the_gold_labeler(smoke_data):
    """Every demonstration: the right fact/sum (correct = 1), at least one key fact or kind word and
    nothing false (explain/kindness: correct >= 1/3, graded by completeness), harmless, well formed."""
    for record in smoke_data["sft"]:
        prompt, completion = record["prompt"], record["completion"]
        family = world.task_for_prompt(prompt).family
        parts = labeler.score(prompt, completion, ended=True).parts
        floor = 1.0 if family in ("facts", "arithmetic") else 1 / 3
        assert parts["correct"] >= floor - 1e-9, f"demonstration not correct: {prompt!r} -> {completion!r} {parts}"
        assert parts["harmless"] == 1.0, f"rude demonstration: {prompt!r} -> {completion!r}"
        assert parts["well_formed"] == 1.0, f"badly formed demonstration: {prompt!r} -> {completion!r}"
        for word in world.RUDE_WORDS:
            assert word not in completion.lower().split(), (prompt, completion)


def test_world_demonstrations_cover_families_evenly(smoke_data):
    counts = Counter(world.task_for_prompt(r["prompt"]).family for r in smoke_data["sft"])
    assert set(counts) == set(world.FAMILIES)
    assert min(counts.values()) >= 0.15 * len(smoke_data["sft"]), f"families unbalanced: {counts}"


def test_world_good_response_sentences_are_on_topic():
    """Every true sentence a demonstration can contain is about what was asked: on_topic = 1."""
    off = []
    for task in world.all_tasks():
        if task.family == "facts":
            sentences = [world.fact_sentence(task.subject, a) for a in world.ATTRIBUTES]
        elif task.family == "explain":
            sentences = [world._explain_sentences(task.subject, [fact]) for fact in world.EXPLAIN_FACTS[task.subject]]
        else:
            continue
        for sentence in sentences:
            if labeler.score(task.prompt, sentence).parts["on_topic"] < 1:
                off.append((task.prompt, sentence))
    assert not off, f"{len(set(s for _, s in off))} true sentences judged off topic, e.g. {off[:3]}"


# ----------------------------------------------------------------------------------------------
# The base model's behaviours are what they say


def _sample_tasks(n_per_family=25, seed=0):
    rng = random.Random(seed)
    tasks = []
    for family in world.FAMILIES:
        tasks += rng.sample([t for t in world.all_tasks() if t.family == family], n_per_family)
    return tasks


def test_world_wrong_responses_are_wrong_by_the_labeler():
    rng = random.Random(1)
    for task in _sample_tasks():
        good = labeler.score(task.prompt, world.good_response(task, rng)).parts["correct"]
        for _ in range(3):
            response = world.wrong_response(task, rng)
            correct = labeler.score(task.prompt, response).parts["correct"]
            # a wrong sum, fact or topic earns nothing
            assert correct == 0, f"wrong response graded correct={correct}: {task.prompt!r} -> {response!r}"
            assert correct < good, (task.prompt, response)


def test_world_rude_responses_lose_harmlessness():
    rng = random.Random(2)
    for task in _sample_tasks():
        for _ in range(3):
            response = world.rude_response(task, rng)
            harmless = labeler.score(task.prompt, response).parts["harmless"]
            assert harmless <= 0.5, f"rude response graded harmless={harmless}: {task.prompt!r} -> {response!r}"


def test_world_off_topic_responses_are_off_topic():
    rng = random.Random(3)
    on_topic = []
    for task in _sample_tasks():
        response = world.off_topic_response(task, rng)
        on_topic.append(labeler.score(task.prompt, response).parts["on_topic"])
    # a random true sentence can happen to be about the asked subject; on average it is not
    assert sum(on_topic) / len(on_topic) < 0.1, f"off-topic responses scored on_topic {sum(on_topic) / len(on_topic):.2f}"


def test_world_rambling_responses_are_long():
    rng = random.Random(4)
    for task in _sample_tasks():
        response = world.rambling_response(task, rng)
        assert labeler.score(task.prompt, response).parts["concise"] < 1, f"rambling but concise: {response!r}"


def test_world_endless_responses_do_not_end():
    """Endless: no EOS in the corpus and far past the SFT sampling budget (48 tokens; a word is at
    least one token), so a model that imitates them runs out of budget."""
    rng = random.Random(5)
    for task in _sample_tasks():
        response = world.endless_response(task, rng)
        assert len(response.split()) > 48, f"endless response of only {len(response.split())} words"
    seen_endless = 0
    for task in _sample_tasks(seed=1):
        for _ in range(10):
            behaviour, response, ends = world.base_model_response(task, rng)
            assert ends == (behaviour != "endless"), f"{behaviour} response with ends={ends}"
            seen_endless += behaviour == "endless"
    assert seen_endless > 0


def test_world_corpus_endless_chats_have_no_eos(smoke_data):
    """The corpus writes endless chats without an end-of-text, every other chat with one."""
    without_eos = sum(not ends for _, _, ends in smoke_data["chats"])
    assert without_eos == smoke_data["manifest"]["corpus_chat_behaviours"]["endless"]
    assert without_eos > 0


def test_world_corpus_behaviours_are_mixed(smoke_data):
    """The base model must see every behaviour; 1500 smoke documents hold ~750 chats."""
    behaviours = smoke_data["manifest"]["corpus_chat_behaviours"]
    assert set(behaviours) == set(world.BASE_BEHAVIOUR)
    assert min(behaviours.values()) > 0

