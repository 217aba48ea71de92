"""Tests for minirlhf/data.py: JSONL readers that check their input, padding, and the SFT loss mask.

Readers: a malformed line is a `UserError` naming `file:line`; wrong or missing fields are named;
TRL's conversational format (lists of {"role", "content"} messages) is read like plain strings;
rankings must be permutations of 0..K-1; chosen/rejected become ranking [0, 1].

Batches: `pad_sequences` pads left or right; `sft_batch` builds the SFT loss mask. The SFT mask is
where classic bugs hide, so it is checked on a batch worked by hand and on a real tokenizer:
prompt tokens never count, the EOS target counts (that is how the model learns to stop), PAD
targets never count, and targets are the inputs shifted by one (targets[t] == inputs[t + 1]).
"""

import json
import os
import random
import sys

import pytest
import torch

from minirlhf import world
from minirlhf.cli import UserError
from minirlhf.data import (Comparison, pad_sequences, read_comparisons, read_jsonl, read_prompts, read_sft,
                           sft_batch, write_jsonl)
from minirlhf.tokenizer import Tokenizer, render_chat, train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_sft  # noqa: E402   (the script's encode_demos, checked against render_chat below)


def write_lines(path, lines) -> str:
    """Write raw lines (strings, or objects dumped as JSON) and return the path as a string."""
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# ----------------------------------------------------------------------------------------------
# read_jsonl: the errors name file:line


def test_data_read_jsonl_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": "a"}, "", '{"prompt": "b"', {"prompt": "c"}])
    with pytest.raises(UserError) as error:
        read_jsonl(path)
    # the blank line 2 still counts: the broken line is line 3 of the file
    assert f"{path}:3:" in str(error.value), str(error.value)
    assert "JSON" in str(error.value)


def test_data_read_jsonl_non_object_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "list.jsonl", [{"prompt": "a"}, "[1, 2]"])
    with pytest.raises(UserError, match=r"list\.jsonl:2: expected a JSON object, got list"):
        read_jsonl(path)


def test_data_field_errors_after_blank_lines_name_the_file_line(tmp_path):
    """A missing field is reported at the line an editor shows, not the record's number."""
    lines = [{"prompt": "a", "completion": "b"}, "", "", {"prompt": "c"}]
    path = write_lines(tmp_path / "sft.jsonl", lines)
    with pytest.raises(UserError, match=r"sft\.jsonl:4: missing field 'completion'"):
        read_sft(path)
    path = write_lines(tmp_path / "cmp.jsonl", ["", {"prompt": "p", "responses": ["x", "y"], "ranking": [0, 0]}])
    with pytest.raises(UserError, match=r"cmp\.jsonl:2: 'ranking'"):
        read_comparisons(path)
    path = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "a"}, "", {"text": "b"}])
    with pytest.raises(UserError, match=r"prompts\.jsonl:3: missing field 'prompt'"):
        read_prompts(path)


def test_data_read_jsonl_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        read_jsonl(str(tmp_path / "nope.jsonl"))
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(UserError, match="empty"):
        read_jsonl(path)


def test_data_write_jsonl_round_trip(tmp_path):
    records = [{"prompt": "café ☕", "completion": "ok"}, {"prompt": "b", "completion": "c"}]
    path = str(tmp_path / "sub" / "out.jsonl")
    write_jsonl(path, records)
    assert read_jsonl(path) == records
    assert [name for name in os.listdir(tmp_path / "sub")] == ["out.jsonl"], "a temporary file was left behind"


# ----------------------------------------------------------------------------------------------
# read_prompts / read_sft: plain and conversational shapes, wrong fields


def test_data_read_prompts_plain_and_conversational(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "what does a cow eat?"}, {"prompt": user("praise the dog.")},
                                              {"messages": user("what is 2 plus 2?")}])
    assert read_prompts(path) == ["what does a cow eat?", "praise the dog.", "what is 2 plus 2?"]


@pytest.mark.parametrize("record, message", [
    ({"question": "hi"}, r"p\.jsonl:2: missing field 'prompt'"),
    ({"prompt": 3}, r"p\.jsonl:2: field 'prompt' must be a string or a list of messages, got int"),
    ({"prompt": assistant("hi")}, r"p\.jsonl:2: field 'prompt' must hold exactly one 'user' message"),
    ({"prompt": user("a") + user("b")}, r"p\.jsonl:2: field 'prompt' must hold exactly one 'user' message"),
    ({"prompt": [{"role": "user", "content": 5}]}, r"p\.jsonl:2: .*string content"),
])
def test_data_read_prompts_wrong_fields(tmp_path, record, message):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "ok"}, record])
    with pytest.raises(UserError, match=message):
        read_prompts(path)


def test_data_read_sft_plain_and_conversational(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [
        {"prompt": "what does a cow eat?", "completion": "A cow eats grass."},
        {"prompt": user("praise the dog."), "completion": assistant("The dog is kind.")},
        {"messages": user("what is 2 plus 2?") + assistant("2 plus 2 is 4.")},
    ])
    assert read_sft(path) == [("what does a cow eat?", "A cow eats grass."), ("praise the dog.", "The dog is kind."),
                              ("what is 2 plus 2?", "2 plus 2 is 4.")]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "hi"}, r"sft\.jsonl:1: missing field 'completion'"),
    ({"prompt": "hi", "response": "yo"}, r"sft\.jsonl:1: missing field 'completion'"),
    ({"completion": "yo"}, r"sft\.jsonl:1: missing field 'prompt'"),
    ({"prompt": "hi", "completion": user("yo")}, r"sft\.jsonl:1: field 'completion' must hold exactly one 'assistant'"),
    ({"prompt": "hi", "completion": None}, r"sft\.jsonl:1: field 'completion' must be a string"),
    ({"messages": user("hi")}, r"sft\.jsonl:1: field 'messages' must hold exactly one 'assistant'"),
])
def test_data_read_sft_wrong_fields(tmp_path, record, message):
    path = write_lines(tmp_path / "sft.jsonl", [record])
    with pytest.raises(UserError, match=message):
        read_sft(path)


# ----------------------------------------------------------------------------------------------
# read_comparisons: chosen/rejected -> ranking [0, 1]; ranked shape validated


def test_data_read_comparisons_chosen_rejected_becomes_ranking(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": user("p2"), "chosen": assistant("good2"), "rejected": assistant("bad2")},
    ])
    first, second = read_comparisons(path)
    assert (first.prompt, first.responses, first.ranking) == ("p", ["good", "bad"], [0, 1])
    assert (second.prompt, second.responses, second.ranking) == ("p2", ["good2", "bad2"], [0, 1])
    assert first.ranked() == ["good", "bad"]


def test_data_read_comparisons_ranked_shape(tmp_path):
    record = {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}
    path = write_lines(tmp_path / "c.jsonl", [record])
    (comparison,) = read_comparisons(path)
    assert comparison.ranking == [2, 0, 1]
    assert comparison.ranked() == ["c", "a", "b"], "ranking lists indices best first: [2, 0, 1] -> c is best"
    assert comparison.to_json() == record
    # conversational responses
    path = write_lines(tmp_path / "c2.jsonl", [{"prompt": user("p"), "responses": [assistant("a"), assistant("b")],
                                                "ranking": [1, 0]}])
    assert read_comparisons(path)[0].ranked() == ["b", "a"]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, "must list each index 0..2 once"),   # repeat
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 3]}, "must list each index 0..2 once"),   # out of range
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]}, "must list each index 0..2 once"),      # too short
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [-1, 0]}, "must list each index 0..1 once"),          # negative
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2]}, "must list each index 0..1 once"),           # 1-based
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, "1"]}, "must list each index"),                   # not an int
    ({"prompt": "p", "responses": ["a", "b"], "ranking": "0 1"}, "must list each index"),                      # not a list
    ({"prompt": "p", "responses": ["a"], "ranking": [0]}, "at least 2 responses"),
    ({"prompt": "p", "responses": "ab", "ranking": [0, 1]}, "at least 2 responses"),
    ({"prompt": "p", "chosen": "a"}, "expected fields 'chosen' and 'rejected', or 'responses' and 'ranking'"),
    ({"prompt": "p", "responses": ["a", "b"]}, "expected fields 'chosen' and 'rejected', or 'responses' and 'ranking'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
])
def test_data_read_comparisons_rejects_bad_records(tmp_path, record, message):
    path = write_lines(tmp_path / "c.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(UserError) as error:
        read_comparisons(path)
    assert f"{path}:2:" in str(error.value), f"the error should name the line: {error.value}"
    assert message in str(error.value), str(error.value)


def test_data_read_comparisons_rejects_boolean_ranking(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": [True, False]}])
    with pytest.raises(UserError, match="ranking"):
        read_comparisons(path)


# ----------------------------------------------------------------------------------------------
# pad_sequences


def test_data_pad_sequences_right():
    ids, mask = pad_sequences([[1, 2, 3], [4], []], pad_id=9, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == torch.long


def test_data_pad_sequences_left():
    # left padding: every row's last real token sits at the last position (ready to be continued)
    ids, mask = pad_sequences([[1, 2, 3], [4], []], pad_id=9, side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_data_pad_sequences_to_a_given_length():
    ids, mask = pad_sequences([[1, 2], [3]], pad_id=0, side="left", length=4)
    assert ids.tolist() == [[0, 0, 1, 2], [0, 0, 0, 3]]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="side"):
        pad_sequences([[1]], pad_id=0, side="middle")


# ----------------------------------------------------------------------------------------------
# sft_batch: the loss mask, worked by hand

USER, ASSISTANT, EOS, PAD = 10, 12, 99, 98


def test_data_sft_batch_hand_worked():
    examples = [
        ([USER, 11, ASSISTANT], [20, 21, EOS]),   # a 2-token response and its EOS
        ([USER, ASSISTANT], [EOS]),               # an empty response: only the EOS is learned
    ]
    batch = sft_batch(examples, pad_id=PAD, max_len=16)
    # sequences: [10 11 12 20 21 99] and [10 12 99 PAD PAD PAD]; inputs drop the last column,
    # targets drop the first (off-by-one: the logits at t predict token t + 1)
    assert batch.inputs.tolist() == [[USER, 11, ASSISTANT, 20, 21], [USER, ASSISTANT, EOS, PAD, PAD]]
    assert batch.targets.tolist() == [[11, ASSISTANT, 20, 21, EOS], [ASSISTANT, EOS, PAD, PAD, PAD]]
    #                  targets:  11  [A]  20  21  EOS         [A]  EOS  PAD PAD PAD
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def check_sft_invariants(batch, examples, eos_id, pad_id):
    """What must hold for any SFT batch (failure messages name the row and position)."""
    inputs, targets, mask = batch.inputs, batch.targets, batch.loss_mask
    assert inputs.shape == targets.shape == mask.shape == batch.attention_mask.shape
    # off-by-one: the target at t is the input at t + 1
    assert torch.equal(targets[:, :-1], inputs[:, 1:]), "targets are not the inputs shifted left by one"
    for row, (prompt_ids, response_ids) in enumerate(examples):
        # the first target that counts is the first response token, predicted from the last prompt token
        counted = mask[row].nonzero().flatten().tolist()
        n_kept = min(len(response_ids), inputs.shape[1] + 1 - len(prompt_ids))
        assert len(counted) == n_kept, f"row {row}: {len(counted)} targets count, expected {n_kept}"
        assert counted == list(range(len(prompt_ids) - 1, len(prompt_ids) - 1 + n_kept)), f"row {row}: {counted}"
        assert targets[row, counted].tolist() == response_ids[:n_kept], f"row {row}: counted targets != response"
        for t in range(mask.shape[1]):
            if targets[row, t] == pad_id:
                assert mask[row, t] == 0, f"row {row}, position {t}: a PAD target counts"
            if targets[row, t] == eos_id and t < len(prompt_ids) + len(response_ids) - 1:
                assert mask[row, t] == 1, f"row {row}, position {t}: the EOS target does not count"


def test_data_sft_batch_invariants_on_hand_built_examples():
    rng = random.Random(0)
    examples = []
    for _ in range(8):
        prompt = [USER] + [rng.randint(0, 9) for _ in range(rng.randint(0, 5))] + [ASSISTANT]
        response = [rng.randint(20, 30) for _ in range(rng.randint(0, 6))] + [EOS]
        examples.append((prompt, response))
    check_sft_invariants(sft_batch(examples, PAD, max_len=32), examples, EOS, PAD)


def test_data_sft_batch_truncates_to_max_len():
    examples = [([USER, 1, 2, ASSISTANT], [20, 21, 22, 23, EOS]), ([USER, ASSISTANT], [20, EOS])]
    batch = sft_batch(examples, PAD, max_len=6)
    assert batch.inputs.shape == (2, 6), "inputs and targets hold at most max_len tokens"
    # row 0 keeps 7 tokens [U 1 2 A 20 21 22]: 3 response targets count (the cut-off EOS cannot)
    assert batch.targets[0].tolist() == [1, 2, ASSISTANT, 20, 21, 22]
    assert batch.loss_mask[0].tolist() == [0, 0, 0, 1, 1, 1]
    check_sft_invariants(batch, examples, EOS, PAD)


# ----------------------------------------------------------------------------------------------
# sft_batch with the real chat renderer


@pytest.fixture(scope="module")
def tokenizer():
    """A BPE trained in a fraction of a second on tiny-world text."""
    rng = random.Random(0)
    tasks = world.all_tasks()
    text = " ".join(world.good_response(rng.choice(tasks), rng) for _ in range(300))
    text += " " + " ".join(t.prompt for t in tasks[::20])
    return Tokenizer(train_bpe(text, 300))


def test_data_sft_batch_with_render_chat(tokenizer):
    demos = [("what does a cow eat?", "A cow eats grass."), ("praise the teacher.", "The teacher is kind and clever."),
             ("what is 7 plus 5?", "7 plus 5 is 12.")]
    examples = []
    for prompt, completion in demos:
        prompt_ids = render_chat(tokenizer, prompt)                 # [USER] prompt [ASSISTANT]
        full = render_chat(tokenizer, prompt, completion)           # ... completion [EOS]
        assert full[:len(prompt_ids)] == prompt_ids, "the rendered prompt must be a prefix of prompt + response"
        examples.append((prompt_ids, full[len(prompt_ids):]))
    batch = sft_batch(examples, tokenizer.pad_id, max_len=64)
    check_sft_invariants(batch, examples, tokenizer.eos_id, tokenizer.pad_id)
    for row, (prompt, completion) in enumerate(demos):
        counted = batch.loss_mask[row].bool()
        learned = batch.targets[row][counted].tolist()
        assert learned[-1] == tokenizer.eos_id, f"row {row}: the last learned target is not EOS"
        assert tokenizer.decode(learned) == completion, f"row {row}: the learned tokens are not the completion"
        # the first learned target is predicted from the [ASSISTANT] marker
        first = counted.nonzero()[0].item()
        assert batch.inputs[row, first] == tokenizer.assistant_id
        assert tokenizer.eos_id != tokenizer.pad_id


def test_data_sft_batch_matches_train_sft_encode_demos(tokenizer):
    """train_sft.py's encode_demos splits prompt and response the same way."""
    demos = [("what does a cow eat?", "A cow eats grass."), ("praise the dog.", "The dog is kind.")]
    examples = train_sft.encode_demos(tokenizer, demos, block_size=64)
    for (prompt, completion), (prompt_ids, response_ids) in zip(demos, examples):
        assert prompt_ids == render_chat(tokenizer, prompt)
        assert prompt_ids + response_ids == render_chat(tokenizer, prompt, completion)
        assert response_ids[-1] == tokenizer.eos_id


def test_data_comparison_dataclass():
    comparison = Comparison("p", ["a", "b", "c"], [1, 2, 0])
    assert comparison.ranked() == ["b", "c", "a"]
