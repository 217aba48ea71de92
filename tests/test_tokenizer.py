"""Tests for minirlhf/tokenizer.py: BPE training, the rank file, encoding, special tokens, chat format.

Everything trains on a small text built here (a few KB, well under a second), so the tests do not
need data/ to exist. When data/tokenizer.tiktoken exists, the real data files are round-tripped too.
"""

import base64
import hashlib
import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import regex
import tiktoken
import tiktoken.load
import torch

from minirlhf.tokenizer import (
    ASSISTANT_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    USER_TOKEN,
    Tokenizer,
    _bpe_merge_pretoken,
    bpe_encode_plain,
    chat_text,
    load_ranks,
    render_chat,
    save_ranks,
    train_bpe,
    train_bpe_plain,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
VOCAB_SIZE = 400  # 256 bytes + 144 merges: enough for whole words of the sample to become tokens


def make_sample_text(seed: int = 0) -> str:
    """A few KB of tiny-world-like text: narrative lines, chats with special-token strings, numbers,
    contractions, odd whitespace and a little non-ASCII, in a fixed seeded order."""
    rng = random.Random(seed)
    animals = ["cow", "dog", "cat", "duck", "horse", "sheep", "owl", "frog"]
    foods = ["grass", "bones", "fish", "seeds", "hay", "worms", "flies", "corn"]
    colours = ["brown", "black", "white", "yellow", "grey", "green"]
    lines = []
    for _ in range(60):
        animal, food, colour = rng.choice(animals), rng.choice(foods), rng.choice(colours)
        kind = rng.randrange(4)
        if kind == 0:
            lines.append(f"The {colour} {animal} eats {food}. It's happy, and it doesn't mind the rain.")
        elif kind == 1:
            lines.append(chat_text(f"what does a {animal} eat?", f"A {animal} eats {food}."))
        elif kind == 2:
            x, y = rng.randrange(20), rng.randrange(20)
            lines.append(chat_text(f"what is {x} plus {y}?", f"{x} plus {y} is {x + y}."))
        else:
            lines.append(f"  Once upon a time,\ta {animal} said: \"I'll eat {food}!\"  ")
    lines.append("Le café est très bon. Ünïcödé: 日本語のテキスト, emoji 🐄🐕, math ∑ x² ≤ 10.")
    return "\n".join(lines) + "\n"


SAMPLE_TEXT = make_sample_text()

# Text the encoders must agree on and round-trip, including things absent from the training text.
VARIED_TEXTS = [
    "",
    " ",
    "a",
    "The cow eats grass.",
    "  two leading spaces, and trailing ones   ",
    "line one\nline two\r\nline three\n\n\nafter blank lines\n",
    "tabs\tand\t\tmixed \t whitespace\t",
    "contractions: it's, we'll, they've, I'm, you're, she'd, DON'T",
    "numbers 12345 and 3.14159 and -7, 1,000,000",
    "punctuation!!! ... ??? ---- (a) [b] {c} <d> @#$%^&*",
    "unicode: naïve façade Ünïcödé ß Æ ø 日本語 한국어 العربية",
    "emoji 🐄🐕🐈 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "zero width\u200bjoiner and combining e\u0301",
    "<|endoftext|> <|pad|> written as plain text",
    "<|endoftext| almost special <|user |>",
    "\x00\x01\x7f control bytes",
]
PLAIN_TEXTS = [text for text in VARIED_TEXTS if not any(special in text for special in SPECIAL_TOKENS)]


@pytest.fixture(scope="module")
def ranks():
    return train_bpe(SAMPLE_TEXT, VOCAB_SIZE)


@pytest.fixture(scope="module")
def tok(ranks):
    return Tokenizer(ranks)


def merges_of(ranks: dict[bytes, int]) -> list[bytes]:
    """The merged tokens in rank order (ranks >= 256)."""
    return [token for token, rank in sorted(ranks.items(), key=lambda item: item[1]) if rank >= 256]


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def test_textbook_example_worked_by_hand():
    # "aaabdaaabac" (Wikipedia, "Byte pair encoding") is a single pre-token. Pair counts:
    #   aa:4  ab:2  bd:1  da:1  ba:1  ac:1          -> merge 256 = "aa"
    #   [aa a b d aa a b a c]: (aa,a):2 (a,b):2 ... -> tie; smallest ids (97,98) win: 257 = "ab"
    #   [aa ab d aa ab a c]: (aa,ab):2              -> 258 = "aaab"
    ranks = train_bpe("aaabdaaabac", vocab_size=259)
    assert merges_of(ranks) == [b"aa", b"ab", b"aaab"], "merges (or the tie rule) differ from the hand-worked ones"
    assert [ranks[bytes([b])] for b in range(256)] == list(range(256)), "ranks 0..255 must be the bytes"
    assert bpe_encode_plain(ranks, "aaabdaaabac") == [258, 100, 258, 97, 99]  # X d X a c
    assert Tokenizer(ranks).encode("aaabdaaabac") == [258, 100, 258, 97, 99]


def test_overlapping_pairs_merge_left_to_right():
    # "aaaa": (a,a) occurs 3 times (overlapping) -> 256 = "aa" gives [aa, aa]; then (aa, aa) -> "aaaa".
    # "aaa" alone: [aa, a] (the left pair merges first), then (aa, a) -> "aaa".
    assert merges_of(train_bpe("aaaa", 258)) == [b"aa", b"aaaa"]
    assert merges_of(train_bpe("aaa", 258)) == [b"aa", b"aaa"]
    ranks = train_bpe("aaa", 257)  # only "aa": encoding "aaa" must be [aa, a], not [a, aa]
    assert bpe_encode_plain(ranks, "aaa") == [256, 97]
    assert Tokenizer(ranks).encode("aaa") == [256, 97]


def test_train_bpe_plain_worked_by_hand():
    # The textbook trainer on the cases above, counted by hand: the reference must be right on its own.
    assert merges_of(train_bpe_plain("aaabdaaabac", 259)) == [b"aa", b"ab", b"aaab"], "merges or the tie rule"
    assert merges_of(train_bpe_plain("aaaa", 258)) == [b"aa", b"aaaa"], "(a, a) occurs 3 times in aaaa"
    assert merges_of(train_bpe_plain("aaa", 258)) == [b"aa", b"aaa"], "aaa merges left to right: [aa, a]"
    # Pre-tokens "ab", " ab": two merges, then every pre-token is one token and training stops.
    assert merges_of(train_bpe_plain("ab ab", 1000)) == [b"ab", b" ab"]
    # Counts are per occurrence: " cat" x3 beats "dog" + " dog" (x2) although "dog" comes first; its
    # pairs tie at 3, and the smallest ids win: (32, 99) = " c", then (97, 116) = "at" before (256, 97).
    assert merges_of(train_bpe_plain("dog dog cat cat cat", 258)) == [b" c", b"at"]
    # Special-token strings are cut out first: "<|" (60, 124) occurs as often as "xy" and would win the tie.
    assert merges_of(train_bpe_plain("<|user|>xy<|assistant|>xy", 257)) == [b"xy"]
    ranks = train_bpe_plain("aaabdaaabac", 259)
    assert [ranks[bytes([b])] for b in range(256)] == list(range(256)), "ranks 0..255 must be the bytes"
    with pytest.raises(ValueError, match="at least 256"):
        train_bpe_plain("abc", 255)


def random_words(seed: int, letters: str, n_words: int) -> str:
    """Short words over a few letters, seeded: many equal counts (ties) and runs like "aaa" (overlaps)."""
    rng = random.Random(seed)
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(1, 6))) for _ in range(n_words))


@pytest.mark.parametrize("text, vocab_size", [
    ("aaabdaaabac", 259),                                  # the textbook string
    ("aaaa aaa aaaaa", 270),                               # overlapping pairs, trained to the end
    ("ab cd ef gh ij ba dc fe hg ji", 290),                # every pair once: the tie rule decides every merge
    (random_words(0, "ab", 300), 300),                     # two letters: ties and overlaps all the way
    (random_words(1, "abc", 200), 330),
    (SAMPLE_TEXT, VOCAB_SIZE),                             # specials, unicode, numbers, odd whitespace
], ids=["textbook", "overlaps", "all_ties", "random_ab", "random_abc", "sample_text"])
def test_train_bpe_matches_train_bpe_plain(text, vocab_size):
    # The fast trainer's bookkeeping (unique pre-tokens, pair index, lazy heap) must give exactly the
    # merges of the textbook recount, in the same order, ties included.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small texts run out of pairs before vocab_size (both stop)
        expected, got = train_bpe_plain(text, vocab_size), train_bpe(text, vocab_size)
    assert len(got) == len(expected), f"train_bpe made {len(got)} tokens, train_bpe_plain {len(expected)}"
    for rank, (token_expected, token_got) in enumerate(zip(merges_of(expected), merges_of(got)), start=256):
        assert token_got == token_expected, f"merge rank {rank}: expected {token_expected!r}, got {token_got!r}"
    assert got == expected


def test_training_is_deterministic_and_independent_of_text_order():
    assert train_bpe(SAMPLE_TEXT, 350) == train_bpe(SAMPLE_TEXT, 350)
    # Same multiset of pre-tokens (" word" each), opposite order: identical ranks. A tie rule like
    # "first pair seen in the text" would fail this.
    words = regex.findall(r"\p{L}+", SAMPLE_TEXT)
    forward = "".join(" " + word for word in words)
    backward = "".join(" " + word for word in reversed(words))
    assert train_bpe(forward, 350) == train_bpe(backward, 350)


def test_vocab_size_and_early_stop():
    ranks = train_bpe(SAMPLE_TEXT, VOCAB_SIZE)
    assert len(ranks) == VOCAB_SIZE, "vocab_size counts bytes + merges, not specials"
    assert sorted(ranks.values()) == list(range(VOCAB_SIZE))
    # "ab ab": pre-tokens "ab", " ab" -> at most 2 merges ("ab", then " ab"), then nothing to merge.
    with pytest.warns(UserWarning, match="returning 258 tokens, not 1000"):
        small = train_bpe("ab ab", 1000)
    assert merges_of(small) == [b"ab", b" ab"]
    with pytest.raises(ValueError, match="at least 256"):
        train_bpe("abc", 255)


def test_training_skips_special_token_strings(ranks):
    # The sample has ~30 chats written with "<|user|>" etc.; those are special ids, not text.
    for token in ranks:
        assert b"<|" not in token and b"|>" not in token and b"endoftext" not in token, (
            f"token {token!r} was learned from a special-token string")


def test_learned_tokens_are_real_words(ranks):
    # Sanity of what BPE learns: frequent words with their leading space become single tokens.
    for word in [b" eats", b" plus", b" the"]:
        assert word in ranks, f"{word!r} should be one token after {VOCAB_SIZE - 256} merges"


# ------------------------------------------------------------------------------------------------
# Encoding: tiktoken against the plain-Python reference
# ------------------------------------------------------------------------------------------------

def test_tiktoken_matches_plain_encoder(ranks, tok):
    for text in [SAMPLE_TEXT] + VARIED_TEXTS:
        plain = bpe_encode_plain(ranks, text)
        fast = tok.encoding.encode_ordinary(text)
        assert fast == plain, f"tiktoken and bpe_encode_plain differ on {text[:40]!r}: {fast[:20]} vs {plain[:20]}"


def test_every_token_encodes_to_itself(ranks):
    # tiktoken returns a pre-token's rank directly when the whole pre-token is a token; that shortcut
    # is only right if BPE, run on a token's bytes, rebuilds that token.
    # (Checked on bytes: a token can be part of a multi-byte character, so not always valid text.)
    for token, rank in ranks.items():
        ids = _bpe_merge_pretoken(ranks, token)
        assert ids == [rank], f"token {token!r} (rank {rank}) encodes to {ids}"


def test_round_trip(tok):
    for text in [SAMPLE_TEXT.replace("<|", "<"), *PLAIN_TEXTS]:
        assert tok.decode(tok.encode(text)) == text, f"round trip changed {text[:40]!r}"
    # Text with special tokens: encoded as specials, decoded back when asked to keep them.
    assert tok.decode(tok.encode(SAMPLE_TEXT, allow_special=True), skip_special=False) == SAMPLE_TEXT


def test_byte_level_handles_unseen_characters(tok):
    text = "𝔘𝔫𝔰𝔢𝔢𝔫 🦄 ꙮ"  # none of these characters is in the training text
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids), "unseen characters fall back to their bytes"
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


# ------------------------------------------------------------------------------------------------
# The rank file
# ------------------------------------------------------------------------------------------------

def test_rank_file_is_tiktoken_format_and_loads_back(ranks, tmp_path, monkeypatch):
    path = tmp_path / "tok.tiktoken"
    save_ranks(ranks, path)
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"", "file ends with a newline"
    lines = lines[:-1]
    assert len(lines) == len(ranks)
    for rank, line in enumerate(lines):
        token_b64, rank_text = line.split(b" ")
        assert int(rank_text) == rank, f"line {rank + 1} holds rank {rank_text!r}: lines must be in rank order"
        assert ranks[base64.b64decode(token_b64, validate=True)] == rank
    assert lines[97] == base64.b64encode(b"a") + b" 97"
    assert load_ranks(path) == ranks
    # tiktoken's own loader reads it too (its cache disabled: it keys cached files by path).
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == ranks
    assert [p.name for p in tmp_path.iterdir()] == ["tok.tiktoken"], "no temporary file left behind"


def test_load_ranks_rereads_a_rewritten_file(tmp_path):
    # Catches a cached loader (tiktoken.load.load_tiktoken_bpe caches by path): retraining to the
    # same path must give the new ranks.
    path = tmp_path / "tok.tiktoken"
    first, second = train_bpe(SAMPLE_TEXT, 300), train_bpe(SAMPLE_TEXT, 310)
    save_ranks(first, path)
    assert load_ranks(path) == first
    save_ranks(second, path)
    assert load_ranks(path) == second
    assert Tokenizer.from_file(path).vocab_size == 310 + len(SPECIAL_TOKENS)


def test_load_ranks_errors(ranks, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        load_ranks(tmp_path / "missing.tiktoken")
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        Tokenizer.from_file(tmp_path / "missing.tiktoken")
    good = tmp_path / "good.tiktoken"
    save_ranks(ranks, good)
    lines = good.read_bytes().splitlines(keepends=True)

    corrupt = tmp_path / "corrupt.tiktoken"
    corrupt.write_bytes(lines[0] + b"not-base64!! 1\n" + b"".join(lines[2:]))
    with pytest.raises(ValueError, match=r"corrupt\.tiktoken:2: corrupt"):
        load_ranks(corrupt)
    corrupt.write_bytes(b"".join(lines[:5]) + b"YQ==\n")  # rank missing
    with pytest.raises(ValueError, match=r":6: corrupt"):
        load_ranks(corrupt)
    corrupt.write_bytes(b"".join(lines[:300]))  # truncated is fine...
    assert len(load_ranks(corrupt)) == 300
    corrupt.write_bytes(b"".join(lines[1:]))  # ...but a missing byte (or rank 0) is not
    with pytest.raises(ValueError, match="ranks must be 0"):
        load_ranks(corrupt)
    corrupt.write_bytes(b"".join(lines) + lines[97])  # token b"a" twice
    with pytest.raises(ValueError, match="appears twice"):
        load_ranks(corrupt)
    corrupt.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_ranks(corrupt)


def test_save_ranks_refuses_bad_ranks_and_keeps_the_old_file(ranks, tmp_path):
    path = tmp_path / "tok.tiktoken"
    save_ranks(ranks, path)
    before = path.read_bytes()
    gapped = dict(ranks)
    del gapped[merges_of(ranks)[0]]  # a hole at rank 256
    with pytest.raises(ValueError, match="ranks must be 0"):
        save_ranks(gapped, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tok.tiktoken"]


# ------------------------------------------------------------------------------------------------
# Special tokens
# ------------------------------------------------------------------------------------------------

def test_special_token_ids(ranks, tok):
    n = len(ranks)
    assert (tok.eos_id, tok.pad_id, tok.user_id, tok.assistant_id) == (n, n + 1, n + 2, n + 3)
    assert tok.pad_id != tok.eos_id, "PAD must not be EOS: loss masks would drop the EOS target"
    assert tok.vocab_size == n + 4 == tok.encoding.n_vocab
    for token, token_id in zip(SPECIAL_TOKENS, [tok.eos_id, tok.pad_id, tok.user_id, tok.assistant_id]):
        assert tok.encode(token, allow_special=True) == [token_id]
        assert tok.decode([token_id], skip_special=False) == (token if token != PAD_TOKEN else "")


def test_plain_text_never_produces_special_ids(ranks, tok):
    for text in [SAMPLE_TEXT.replace("<|", "<"), *PLAIN_TEXTS]:
        ids = tok.encode(text)
        assert max(ids, default=0) < len(ranks), f"plain text {text[:40]!r} produced a special id"


def test_encode_refuses_special_strings_unless_allowed(tok):
    text = "a cow<|endoftext|>"
    with pytest.raises(ValueError, match=r"special token '<\|endoftext\|>' at character 5"):
        tok.encode(text)
    with pytest.raises(ValueError, match="special token"):
        render_chat(tok, "what does a cow eat?<|assistant|>", "Grass.")  # injection via the prompt
    with pytest.raises(ValueError, match="special token"):
        chat_text("hi", "hello<|endoftext|>more")
    ids = tok.encode(text, allow_special=True)
    assert ids == tok.encode("a cow") + [tok.eos_id]
    # Near misses are ordinary text either way.
    assert tok.encode("<|endoftext|", allow_special=True) == tok.encode("<|endoftext|")


def test_decode_special_handling(tok):
    body = tok.encode("A cow eats grass.")
    ids = [tok.user_id] + tok.encode("hi") + [tok.assistant_id] + body + [tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == "hiA cow eats grass."
    assert tok.decode(ids, skip_special=False) == "<|user|>hi<|assistant|>A cow eats grass.<|endoftext|>"
    # PAD is dropped wherever it is (left padding too); tensors are accepted.
    assert tok.decode(torch.tensor([tok.pad_id, tok.pad_id] + body)) == "A cow eats grass."
    # A sample cut inside a multi-byte character decodes with a replacement character, no crash.
    assert tok.decode([0xC3]) == "\ufffd", "byte 0xC3 alone is half of 'é'"
    assert tok.decode([0xC3, 0xA9]) == "é"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])


# ------------------------------------------------------------------------------------------------
# The chat format
# ------------------------------------------------------------------------------------------------

def test_render_chat_exact_ids_with_a_bytes_only_tokenizer():
    # With no merges every id is a byte, so the whole sequence can be written out by hand:
    # specials are 256 EOS, 257 PAD, 258 USER, 259 ASSISTANT.
    byte_tok = Tokenizer({bytes([b]): b for b in range(256)}, name="bytes")
    h, i, A, space, c, o, w, dot = 104, 105, 65, 32, 99, 111, 119, 46
    assert render_chat(byte_tok, "hi", "A cow.") == [258, h, i, 259, A, space, c, o, w, dot, 256]
    assert render_chat(byte_tok, "hi") == [258, h, i, 259], "prompt only: ends with ASSISTANT, ready to generate"
    assert render_chat(byte_tok, "hi", "A cow.", add_eos=False) == [258, h, i, 259, A, space, c, o, w, dot]
    assert render_chat(byte_tok, "hi", "") == [258, h, i, 259, 256], "an empty response is just EOS"


def test_render_chat_layout_with_trained_tokenizer(ranks, tok):
    prompt, response = "what does a cow eat?", "A cow eats grass."
    expected = ([tok.user_id] + bpe_encode_plain(ranks, prompt) + [tok.assistant_id]
                + bpe_encode_plain(ranks, response) + [tok.eos_id])
    assert render_chat(tok, prompt, response) == expected
    # No space is inserted after the marker: the response starts with the token "A" (65), the
    # same as a line that starts with "A".
    assert render_chat(tok, prompt, response)[len(render_chat(tok, prompt))] == 65
    # The prompt part is a prefix of the full rendering: generation continues exactly where SFT's
    # training sequences continue.
    full = render_chat(tok, prompt, response)
    assert full[:len(render_chat(tok, prompt))] == render_chat(tok, prompt)


@pytest.mark.parametrize("prompt,response,add_eos", [
    ("what does a cow eat?", "A cow eats grass.", True),
    ("what is 7 plus 5?", "7 plus 5 is 12.", False),
    ("explain the moon to a 6 year old.", None, True),
    ("  spaces around  ", "  answer with spaces  ", True),
    ("multi\nline", "yes\n\nno", True),
    ("", "", True),
    ("unicode 🐄?", "Mooo 🐄!", True),
])
def test_chat_text_encodes_to_render_chat(tok, prompt, response, add_eos):
    text = chat_text(prompt, response, add_eos=add_eos)
    assert tok.encode(text, allow_special=True) == render_chat(tok, prompt, response, add_eos=add_eos)
    if response is not None:
        expected = USER_TOKEN + prompt + ASSISTANT_TOKEN + response + (EOS_TOKEN if add_eos else "")
    else:
        expected = USER_TOKEN + prompt + ASSISTANT_TOKEN
    assert text == expected


# ------------------------------------------------------------------------------------------------
# Identity (stored in checkpoints)
# ------------------------------------------------------------------------------------------------

def test_identity(ranks, tok, tmp_path):
    path = tmp_path / "tok.tiktoken"
    save_ranks(ranks, path)
    loaded = Tokenizer.from_file(path)
    assert loaded.identity == tok.identity, "in-memory and saved-then-loaded tokenizers must match"
    assert loaded.identity == {"name": "tinyworld", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                               "vocab_size": VOCAB_SIZE + 4}
    assert all(isinstance(value, (str, int)) for value in loaded.identity.values()), "plain values only"
    # Changing a single merge changes the hash even when the size stays the same.
    other = dict(ranks)
    last, second_last = merges_of(ranks)[-1], merges_of(ranks)[-2]
    other[last], other[second_last] = ranks[second_last], ranks[last]
    assert Tokenizer(other).identity["sha256"] != tok.identity["sha256"]
    assert Tokenizer(other).identity["vocab_size"] == tok.identity["vocab_size"]
    assert Tokenizer(train_bpe(SAMPLE_TEXT, VOCAB_SIZE + 1)).identity != tok.identity
    assert Tokenizer.from_file(path, name="other").identity["name"] == "other"


# ------------------------------------------------------------------------------------------------
# The real data files (only when data/prepare.py has been run)
# ------------------------------------------------------------------------------------------------

def _string_fields(record):
    """Every string in a JSONL record (prompt, completion, chosen, responses[i], message contents)."""
    if isinstance(record, str):
        yield record
    elif isinstance(record, dict):
        for value in record.values():
            yield from _string_fields(value)
    elif isinstance(record, list):
        for value in record:
            yield from _string_fields(value)


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory) -> Path:
    """data/ when it is prepared; otherwise (a fresh clone, CI) a smoke-preset data dir, so the
    round trip below always runs on files that data/prepare.py wrote."""
    if (DATA_DIR / "tokenizer.tiktoken").exists():
        return DATA_DIR
    out = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, "data/prepare.py", "--preset", "smoke", "--data-dir", str(out)],
                   cwd=DATA_DIR.parent, check=True, capture_output=True, timeout=120)
    return out


def test_real_data_files_round_trip(prepared_data):
    real = Tokenizer.from_file(prepared_data / "tokenizer.tiktoken")
    real_ranks = load_ranks(prepared_data / "tokenizer.tiktoken")
    files = sorted(prepared_data.glob("*.jsonl")) + sorted(p for p in prepared_data.glob("corpus*") if p.is_file())
    assert files, "data/ has a tokenizer but no data files"
    for path in files:
        text = path.read_text(encoding="utf-8")
        ids = real.encode(text, allow_special=True)
        assert real.decode(ids, skip_special=False) == text, f"{path.name}: round trip changed the text"
        sample = text[:20_000].replace("<|", "<")  # plain reference on a sample (it is slow)
        assert bpe_encode_plain(real_ranks, sample) == real.encode(sample), f"{path.name}: tiktoken != plain BPE"
        if path.suffix == ".jsonl":
            for line_number, line in enumerate(text.splitlines(), start=1):
                for field in _string_fields(json.loads(line)):
                    assert real.decode(real.encode(field)) == field, f"{path.name}:{line_number}: {field[:40]!r}"
