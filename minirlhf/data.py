"""Data files and batches: JSONL readers that check their input, padding, and loss masks.

The JSONL shapes are the ones TRL uses, so a file can move between stages and libraries:

    SFT            {"prompt": str, "completion": str}
    preferences    {"prompt": str, "chosen": str, "rejected": str}
    ranked         {"prompt": str, "responses": [str, ...], "ranking": [int, ...]}   # best first, 0-based
    RL prompts     {"prompt": str}

TRL's conversational variant is read too: a list of {"role", "content"} messages in place of a
string (one user turn for the prompt, one assistant turn for a response), or a single
"messages" list holding both turns. A malformed line is a `UserError` naming the file, the line
and what was expected; nothing is guessed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from minirlhf.checkpoint import atomic_write
from minirlhf.cli import UserError
from minirlhf.tokenizer import SPECIAL_TOKENS, render_chat


# ----------------------------------------------------------------------------------------------
# JSONL

def read_jsonl(path: str) -> list[dict]:
    """Every line of a JSONL file as a dict. Blank lines are skipped."""
    return [record for _, record in numbered_records(path)]


def numbered_records(path: str) -> list[tuple[str, dict]]:
    """Every record with where it is, "path:line" (line numbers count blank lines too), so that a
    reader's error about a record's fields names the line an editor shows.

    The file is read as bytes and each line decoded on its own: a byte that is not UTF-8 is then
    reported with its line, not as a UnicodeDecodeError at an offset into the whole file."""
    if not os.path.exists(path):
        raise UserError(f"{path}: file not found")
    records = []
    with open(path, "rb") as f:
        for line_no, raw_line in enumerate(f, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw_line[e.start]:02x} at column "
                                f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            records.append((f"{path}:{line_no}", record))
    if not records:
        raise UserError(f"{path}: no records (empty file)")
    return records


def read_text(path: str) -> str:
    """A whole UTF-8 text file (the pretraining corpus), newlines as open() in text mode gives them.
    A byte that is not UTF-8 is a UserError naming the file and its line."""
    if not os.path.exists(path):
        raise UserError(f"{path}: file not found (run python data/prepare.py first)")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")   # universal newlines, as open(path) reads them


def write_jsonl(path: str, records: list[dict]) -> None:
    """Write records atomically (a temporary file, then rename): a crash never leaves half a file."""
    with atomic_write(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _text(value, role: str, where: str, field: str) -> str:
    """A string, or TRL's conversational form: a list with one message of the given role."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        turns = [m for m in value if isinstance(m, dict) and m.get("role") == role]
        if len(turns) == 1 and isinstance(turns[0].get("content"), str):
            return turns[0]["content"]
        raise UserError(f"{where}: field '{field}' must hold exactly one {role!r} message with string content")
    raise UserError(f"{where}: field '{field}' must be a string or a list of messages, "
                    f"got {type(value).__name__}")


def _usable_text(text: str, where: str, field: str) -> str:
    """A prompt or a demonstration must say something (an empty one trains on nothing, or asks
    nothing, silently), and must not hold a special token's string (`render_chat` refuses it)."""
    if not text.strip():
        raise UserError(f"{where}: field '{field}' is empty")
    for token in SPECIAL_TOKENS:
        if token in text:
            raise UserError(f"{where}: field '{field}' contains the special token {token!r}")
    return text


def _prompt_of(record: dict, where: str) -> str:
    if "prompt" in record:
        return _usable_text(_text(record["prompt"], "user", where, "prompt"), where, "prompt")
    if "messages" in record:
        return _usable_text(_text(record["messages"], "user", where, "messages"), where, "messages")
    raise UserError(f"{where}: missing field 'prompt'")


def read_prompts(path: str) -> list[str]:
    """RL / evaluation prompts: {"prompt": ...} per line."""
    return [_prompt_of(record, where) for where, record in numbered_records(path)]


def read_sft(path: str) -> list[tuple[str, str]]:
    """Demonstrations as (prompt, completion) pairs."""
    pairs = []
    for where, record in numbered_records(path):
        prompt = _prompt_of(record, where)
        if "completion" in record:
            completion = _text(record["completion"], "assistant", where, "completion")
        elif "messages" in record:
            completion = _text(record["messages"], "assistant", where, "messages")
        else:
            raise UserError(f"{where}: missing field 'completion' (expected {{\"prompt\", \"completion\"}})")
        field_name = "completion" if "completion" in record else "messages"
        pairs.append((prompt, _usable_text(completion, where, field_name)))
    return pairs


@dataclass
class Comparison:
    """One prompt, K >= 2 responses, and their ranking (indices into responses, best first)."""

    prompt: str
    responses: list[str]
    ranking: list[int]

    def ranked(self) -> list[str]:
        """The responses, best first."""
        return [self.responses[i] for i in self.ranking]

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "responses": self.responses, "ranking": self.ranking}


def read_comparisons(path: str) -> list[Comparison]:
    """Preference data in either shape: chosen/rejected (K = 2) or responses/ranking (any K >= 2)."""
    comparisons = []
    for where, record in numbered_records(path):
        prompt = _prompt_of(record, where)
        if "chosen" in record and "rejected" in record:
            chosen = _text(record["chosen"], "assistant", where, "chosen")
            rejected = _text(record["rejected"], "assistant", where, "rejected")
            comparisons.append(Comparison(prompt, [chosen, rejected], [0, 1]))
            continue
        if "responses" not in record or "ranking" not in record:
            raise UserError(f"{where}: expected fields 'chosen' and 'rejected', or 'responses' and 'ranking'")
        responses = record["responses"]
        ranking = record["ranking"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise UserError(f"{where}: 'responses' must be a list of at least 2 responses")
        responses = [_text(r, "assistant", where, "responses") for r in responses]
        if (not isinstance(ranking, list) or not all(isinstance(j, int) and not isinstance(j, bool) for j in ranking)
                or sorted(ranking) != list(range(len(responses)))):
            raise UserError(f"{where}: 'ranking' must list each index 0..{len(responses) - 1} once "
                            f"(best first), got {ranking!r}")
        comparisons.append(Comparison(prompt, responses, ranking))
    return comparisons


def evenly_spaced(items: list, n: int) -> list:
    """n items at evenly spaced positions (all of them if n >= len): the prompt files list one family
    after another, so the first n would judge the policy on one or two families only."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def read_sampling_prompts(cfg, tokenizer, block_size: int) -> tuple[list[str], list[str]]:
    """The prompts an online method samples (`--prompts`, default DATA_DIR/ppo_prompts.jsonl) and its
    held-out ones (`--eval-prompts` of DATA_DIR/eval_prompts.jsonl, evenly spaced). Each, rendered,
    plus `--max-new-tokens` must fit the model's `block_size`: a `UserError` now, not mid-run."""
    prompts = read_prompts(cfg.prompts or os.path.join(cfg.data_dir, "ppo_prompts.jsonl"))
    eval_prompts = evenly_spaced(read_prompts(os.path.join(cfg.data_dir, "eval_prompts.jsonl")), cfg.eval_prompts)
    longest = max(len(render_chat(tokenizer, p)) for p in prompts + eval_prompts)
    if longest + cfg.max_new_tokens > block_size:
        raise UserError(f"the longest prompt ({longest} tokens) + --max-new-tokens {cfg.max_new_tokens} exceeds "
                        f"the model's block_size {block_size}")
    return prompts, eval_prompts


# ----------------------------------------------------------------------------------------------
# Padding and batches

def pad_sequences(sequences: list[list[int]], pad_id: int, *, side: str = "right",
                  length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to one length: returns ids (B, T) and mask (B, T), 1 at real tokens.

    side="left" is for prompts that a model continues (generation: every row's last real token
    sits at the same position); side="right" for training batches.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    length = length or max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq = seq[:length]
        if side == "right":
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        elif seq:
            ids[row, -len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, -len(seq):] = 1
    return ids, mask


@dataclass
class LMBatch:
    """A next-token batch: `targets[b, t]` is the token that `inputs[b, t]`'s logits predict,
    and `loss_mask[b, t]` is 1 where that target counts."""

    inputs: torch.Tensor      # (B, T)
    targets: torch.Tensor     # (B, T)
    loss_mask: torch.Tensor   # (B, T)
    attention_mask: torch.Tensor  # (B, T)

    def to(self, device) -> "LMBatch":
        return LMBatch(*(t.to(device) for t in (self.inputs, self.targets, self.loss_mask, self.attention_mask)))


def sft_batch(examples: list[tuple[list[int], list[int]]], pad_id: int, max_len: int) -> LMBatch:
    """Batch (prompt_ids, response_ids) pairs for SFT. response_ids end with EOS.

    The loss counts only response tokens, the EOS included (that is how the model learns to
    stop), never the prompt and never PAD:

        tokens   [USER] what ... [ASSISTANT] A  cow eats grass . [EOS] [PAD]
        targets        ...      [ASSISTANT] A  cow ...      .  [EOS] [PAD]
        mask      0    0   ...   0          1  1   ...      1    1     0
    (off-by-one: the logits at position t predict token t + 1, so targets are the tokens shifted left.)
    """
    sequences, masks = [], []
    for prompt_ids, response_ids in examples:
        seq = (prompt_ids + response_ids)[:max_len + 1]
        sequences.append(seq)
        masks.append(([0] * len(prompt_ids) + [1] * len(response_ids))[:max_len + 1])
    ids, attention = pad_sequences(sequences, pad_id, side="right")
    loss_mask, _ = pad_sequences(masks, 0, side="right")
    return LMBatch(inputs=ids[:, :-1], targets=ids[:, 1:], loss_mask=loss_mask[:, 1:],
                   attention_mask=attention[:, :-1])


def random_windows(tokens: torch.Tensor, batch_size: int, seq_len: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pretraining batch: `batch_size` random windows of a 1-D token stream -> inputs, targets (B, T)."""
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]
