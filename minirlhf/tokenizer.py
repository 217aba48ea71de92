"""The tokenizer: a byte-level BPE that this project trains itself, served through tiktoken.

Lesson in four parts:

1. **Training** (`train_bpe_plain`, the textbook version; `train_bpe`, the fast one). Byte-level BPE
   (Sennrich et al. 2016; GPT-2, Radford et al. 2019, §2.2) starts from the 256 single bytes (ranks
   0..255) and repeatedly adds the most frequent adjacent pair of tokens as a new token (ranks 256,
   257, ...). Before counting, the text is cut into pre-tokens by GPT-2's regex (`GPT2_SPLIT_PATTERN`:
   words with their leading space, numbers, punctuation runs, whitespace), and merges never cross a
   pre-token boundary, so " cat" and " cat." share a token. `train_bpe_plain` recounts every pair
   at every merge; `train_bpe` (what data/prepare.py runs) keeps the counts up to date instead, and
   the tests check that both learn the same merges, ties included.

2. **Storage** (`save_ranks` / `load_ranks`). The result is a table `bytes -> rank`, written in
   tiktoken's own rank-file format: one line `<base64 of the token's bytes> <rank>` per token.
   The merge *pairs* are not stored: a token's rank is all an encoder needs (see 3).

3. **Encoding** (`bpe_encode_plain`, the textbook version; `Tokenizer.encode`, the fast one). Split
   the text with the same regex; inside each pre-token start from single bytes and repeatedly merge
   the adjacent pair whose concatenation has the lowest rank, until no adjacent pair concatenates to a
   known token. `Tokenizer` hands the same table to `tiktoken.Encoding` (Rust), and the tests check
   that both encoders give the same ids.

4. **Chat format** (`render_chat` / `chat_text`). Special tokens are added after the trained ranks:

       <|endoftext|>  EOS: ends a document / a response; the model learns to emit it to stop
       <|pad|>        PAD: fills batches; a different id from EOS, so "stop here" and "nothing here"
                      never get confused in loss masks
       <|user|>       marks the start of the prompt
       <|assistant|>  marks the start of the response

   A conversation is  [USER] prompt [ASSISTANT] response [EOS],  with no spaces added around the
   markers: the prompt and the response are encoded verbatim ("A cow eats grass." starts with the
   token "A", exactly as a sentence does at the start of a line of the corpus). `render_chat` is the
   ONE renderer that every stage (SFT, RM, PPO, evaluation, chat) uses; `chat_text` writes the same
   layout as a string for the pretraining corpus, and
   `tok.encode(chat_text(p, r), allow_special=True) == render_chat(tok, p, r)`.

Worked example (the textbook string from Wikipedia's "Byte pair encoding" page)::

    >>> ranks = train_bpe("aaabdaaabac", vocab_size=259)
    >>> [(token, rank) for token, rank in ranks.items() if rank >= 256]
    [(b'aa', 256), (b'ab', 257), (b'aaab', 258)]
    >>> bpe_encode_plain(ranks, "aaabdaaabac")   # "aaab" d "aaab" a c
    [258, 100, 258, 97, 99]

    The first merge is "aa" (4 adjacent occurrences). Then "aa"+"a" and "a"+"b" both occur twice:
    the tie rule (smallest ids first) picks (97, 98) = "ab" over (256, 97) = "aaa".
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import regex  # the `regex` module (a dependency of tiktoken): `re` has no \p{L} classes
import tiktoken

from minirlhf.checkpoint import atomic_write
from minirlhf.cli import UserError

# Order matters: special ids are numbered in this order right after the trained ranks.
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)

# GPT-2's pre-tokenisation regex (the original from openai/gpt-2 encoder.py), in order of preference:
#   's 't 're 've 'm 'll 'd   English contractions
#    ?\p{L}+                  a word (letters of any script) with at most one leading space
#    ?\p{N}+                  a number, same
#    ?[^\s\p{L}\p{N}]+        a run of punctuation/symbols, same
#   \s+(?!\S)                 whitespace, leaving the last space to the next word ("  x" -> " ", " x")
#   \s+                       trailing whitespace
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_SPLIT_RE = regex.compile(GPT2_SPLIT_PATTERN)
# The special-token strings, as tiktoken finds them with allowed_special="all".
_SPECIAL_RE = regex.compile("|".join(regex.escape(token) for token in SPECIAL_TOKENS))


# --------------------------------------------------------------------------------------------------
# 1. Training
# --------------------------------------------------------------------------------------------------

def _pretokens(text: str) -> Iterator[str]:
    """The GPT-2 pre-tokens of `text`, in order, skipping special-token strings.

    The corpus writes chats with the special-token strings in them ("<|user|>..."). Those become
    single special ids at encoding time, so they are not text to learn merges from: the text is cut
    at them first, exactly as tiktoken's `encode(..., allowed_special="all")` does, and each segment
    is split by the regex on its own.
    """
    for segment in _SPECIAL_RE.split(text):
        yield from _SPLIT_RE.findall(segment)


def _count_pretokens(text: str) -> Counter:
    """Count the distinct pre-tokens of `text` (as UTF-8 bytes): {pre-token: occurrences}."""
    counts = Counter(_pretokens(text))
    return Counter({chunk.encode("utf-8"): n for chunk, n in counts.items()})


def _merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids` by `new_id`, scanning left to right.

    Trap: overlapping occurrences. In "aaa" = [a, a, a] the pair (a, a) occurs twice but only the left
    one can merge: [aa, a]. The encoders resolve the same way (leftmost first).
    """
    merged = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def train_bpe_plain(text: str, vocab_size: int) -> dict[bytes, int]:
    """Train a byte-level BPE the textbook way; return the rank table {token bytes: rank}.

    The reference `train_bpe` is tested against: every pre-token occurrence is kept as its own list
    of ids, and every pair is counted again from scratch before each merge (minbpe's trainer):

        repeat until vocab_size tokens exist:
            count every adjacent pair (a, b) of ids, over all pre-tokens
            take the most frequent pair; among equal counts the smallest (a, b), i.e. older tokens
            its bytes vocab[a] + vocab[b] become token 256, 257, ...; replace each (a, b) by it

    Ranks 0..255 are the single bytes; `vocab_size` counts them and the merges, not the special
    tokens. Stops early, with fewer tokens, when every pre-token has become a single token.
    Slow (a full recount per merge): for tests and for reading; data/prepare.py runs `train_bpe`.

    Trap: two pairs could in principle spell the same bytes, e.g. ("ab", "c") and ("a", "bc"). A rank
    table holds each byte string once, so the second one would reuse the existing token's id.

    >>> ranks = train_bpe_plain("aaabdaaabac", vocab_size=259)   # one pre-token
    >>> [token for token, rank in ranks.items() if rank >= 256]  # aa: 4; then (aa, a), (a, b): 2 each
    [b'aa', b'ab', b'aaab']
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the byte tokens), got {vocab_size}")
    # BEGIN SOLUTION
    # HINT: count with Counter(zip(ids, ids[1:])) over every pre-token; replace a pair with _merge_pair
    words = [list(chunk.encode("utf-8")) for chunk in _pretokens(text)]  # each occurrence: its byte ids
    vocab = {byte: bytes([byte]) for byte in range(256)}  # id -> token bytes
    ranks = {token: token_id for token_id, token in vocab.items()}  # token bytes -> id
    while len(vocab) < vocab_size:
        pair_counts: Counter = Counter()  # (a, b) -> how often b follows a, overlaps counted ("aaa": 2)
        for ids in words:
            pair_counts.update(zip(ids, ids[1:]))
        if not pair_counts:
            break  # every pre-token is a single token: nothing left to merge
        pair = min(pair_counts, key=lambda p: (-pair_counts[p], p))  # the most frequent, then smallest ids
        token = vocab[pair[0]] + vocab[pair[1]]
        if token not in ranks:  # (see the trap: otherwise the existing token is reused)
            ranks[token] = len(vocab)
            vocab[ranks[token]] = token
        words = [_merge_pair(ids, pair, ranks[token]) for ids in words]
    return ranks
    # END SOLUTION


def train_bpe(text: str, vocab_size: int, *, verbose: bool = False) -> dict[bytes, int]:
    """Train a byte-level BPE on `text`, fast; return the same rank table as `train_bpe_plain`.

    Ranks 0..255 are the single bytes (rank b == the byte value b); rank 256 + i is the token made by
    the i-th merge. `vocab_size` counts these byte tokens and merges, NOT the special tokens (which
    `Tokenizer` appends after them). Training stops early, with fewer tokens than asked for, only if
    every pre-token of the text has become a single token (nothing left to merge).

    Algorithm (count once, then merge on unique pre-tokens):
      1. split the text into GPT-2 pre-tokens and count each distinct one: a 10 MB corpus of a small
         world has only thousands of distinct pre-tokens, so the work below is on those, each
         weighted by its count, never on the raw text;
      2. count every adjacent pair of ids, weighted: count(a, b) = sum over pre-tokens w of
         n(w) * (number of positions where a is followed by b in w);
      3. merge the most frequent pair into a new id in every pre-token that contains it, and update
         the pair counts of just those pre-tokens (an index pair -> pre-tokens holding it, and a
         heap of counts with stale entries skipped, keep each merge cheap);
      4. repeat 3 until vocab_size tokens exist.

    Tie rule (determinism): among pairs with the same count, the pair with the smallest
    (left id, right id) wins, i.e. the pair made of older tokens. The result depends only on the
    multiset of pre-tokens, never on the order of the text or of Python's hashing.

    Trap: two merges could in principle spell the same bytes, e.g. ("ab", "c") and ("a", "bc").
    A rank table cannot hold one byte string twice, so the second such pair reuses the existing
    token's id and no new rank is spent (the encoders, which look up the concatenation, agree).
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the byte tokens), got {vocab_size}")
    pretoken_counts = _count_pretokens(text)
    # Sorted, so that the pre-token indices (and the verbose output) do not depend on the text order.
    pretokens = sorted(pretoken_counts)
    words = [list(chunk) for chunk in pretokens]  # each pre-token as a list of ids, bytes at first
    counts = [pretoken_counts[chunk] for chunk in pretokens]
    if verbose:
        total = sum(counts)
        print(f"train_bpe: {len(text):,} characters, {total:,} pre-tokens, {len(words):,} distinct")

    pair_counts: Counter = Counter()  # (a, b) -> weighted count
    where: dict[tuple[int, int], set[int]] = {}  # (a, b) -> indices of the pre-tokens that hold it
    for index, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += counts[index]
            where.setdefault(pair, set()).add(index)
    # Max-heap via negated counts; the (a, b) in the key implements the tie rule. An entry is stale
    # when the pair's count has changed since it was pushed: those are skipped when popped.
    heap = [(-n, pair[0], pair[1]) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    vocab = {byte: bytes([byte]) for byte in range(256)}  # id -> token bytes
    ranks = {token: token_id for token_id, token in vocab.items()}  # token bytes -> id
    while len(vocab) < vocab_size:
        while heap and pair_counts.get((heap[0][1], heap[0][2]), 0) != -heap[0][0]:
            heapq.heappop(heap)  # stale entry
        if not heap:
            # Every pre-token is already a single token: a larger vocab_size cannot be filled.
            warnings.warn(f"train_bpe: every pre-token of the text is a single token after "
                          f"{len(vocab) - 256} merges; returning {len(vocab)} tokens, not {vocab_size}")
            break
        neg_count, left, right = heapq.heappop(heap)
        pair = (left, right)
        token = vocab[left] + vocab[right]
        new_id = ranks.get(token)
        if new_id is None:  # the usual case: a new token (see the trap in the docstring otherwise)
            new_id = len(vocab)
            vocab[new_id] = token
            ranks[token] = new_id
        if verbose:
            print(f"merge {len(vocab) - 256}/{vocab_size - 256}: ({left}, {right}) -> {new_id} "
                  f"{token!r} ({-neg_count} occurrences)")

        # Re-count only the pre-tokens that contain the pair: remove their old pairs, add the new.
        for index in sorted(where.pop(pair)):
            old_ids = words[index]
            new_ids = _merge_pair(old_ids, pair, new_id)
            words[index] = new_ids
            old_pairs = Counter(zip(old_ids, old_ids[1:]))
            new_pairs = Counter(zip(new_ids, new_ids[1:]))
            for changed in old_pairs.keys() | new_pairs.keys():
                delta = (new_pairs[changed] - old_pairs[changed]) * counts[index]
                if changed not in new_pairs and changed in where:
                    where[changed].discard(index)
                elif changed in new_pairs:
                    where.setdefault(changed, set()).add(index)
                if delta:
                    pair_counts[changed] += delta
                    if pair_counts[changed] > 0:
                        heapq.heappush(heap, (-pair_counts[changed], changed[0], changed[1]))
                    else:
                        del pair_counts[changed]
        pair_counts.pop(pair, None)  # every occurrence was merged (left to right), none is left
    return ranks


# --------------------------------------------------------------------------------------------------
# 2. Storage: tiktoken's rank-file format
# --------------------------------------------------------------------------------------------------

def _check_ranks(ranks: dict[bytes, int], where: str) -> None:
    """A usable byte-level rank table: ranks 0..n-1 each used once, and every single byte present
    (otherwise text holding an unseen byte could not be encoded at all)."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{where}: ranks must be 0..{len(ranks) - 1}, each used once")
    missing = [byte for byte in range(256) if bytes([byte]) not in ranks]
    if missing:
        raise ValueError(f"{where}: not a byte-level BPE, {len(missing)} single bytes have no rank "
                         f"(first: {missing[0]})")


def _rank_file_bytes(ranks: dict[bytes, int]) -> bytes:
    """The rank file's exact contents: `<base64 token> <rank>\\n` per token, in rank order.
    Same layout as tiktoken.load.dump_tiktoken_bpe, so the file is readable by tiktoken itself."""
    lines = [base64.b64encode(token) + b" " + str(rank).encode("ascii") + b"\n"
             for token, rank in sorted(ranks.items(), key=lambda item: item[1])]
    return b"".join(lines)


def save_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write `ranks` to `path` in tiktoken's rank-file format, atomically.

    Atomic (`checkpoint.atomic_write`): the bytes go to a temporary file in the same directory,
    which is then renamed over `path` (a rename within one filesystem is atomic), so an interrupted
    write never leaves a half-written tokenizer behind. The file gets the usual permissions (0644
    under the usual umask), not tempfile.mkstemp's owner-only 0600.
    """
    path = Path(path)
    _check_ranks(ranks, f"save_ranks({path})")
    with atomic_write(path, "wb") as file:
        file.write(_rank_file_bytes(ranks))


def _parse_rank_file(data: bytes, path: str | os.PathLike) -> dict[bytes, int]:
    """Parse the contents of a rank file; errors name the file and the line."""
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError("expected 2 fields")
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except ValueError as error:  # binascii.Error is a ValueError too
            raise ValueError(f"{path}:{line_number}: corrupt rank file, expected '<base64 token> <rank>', "
                             f"got {line[:60]!r} ({error})") from None
        if token in ranks:
            raise ValueError(f"{path}:{line_number}: token {token!r} appears twice")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: empty rank file")
    _check_ranks(ranks, str(path))
    return ranks


def _read_rank_file(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer rank file not found: {path} "
                                f"(data/prepare.py trains the tokenizer and writes it)") from None


def load_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a rank file written by `save_ranks` (or by tiktoken); clear errors if missing/corrupt.

    Trap: tiktoken.load.load_tiktoken_bpe caches every file it reads under a key made from the
    *path* (in $TMPDIR/data-gym-cache), so after retraining the tokenizer to the same path it would
    keep returning the old ranks. This reader parses the same format without a cache.
    """
    return _parse_rank_file(_read_rank_file(path), path)


# --------------------------------------------------------------------------------------------------
# 3. Encoding: the plain-Python reference
# --------------------------------------------------------------------------------------------------

def _bpe_merge_pretoken(ranks: dict[bytes, int], pretoken: bytes) -> list[int]:
    """Encode one pre-token: start from its bytes, merge the lowest-rank adjacent pair until none.

    "Rank of a pair" = the rank of the two parts' concatenation, the only thing a rank file knows.
    Ties (the same token twice, as in "aaa") go to the leftmost pair, as in tiktoken.
    """
    parts = [pretoken[i:i + 1] for i in range(len(pretoken))]
    while len(parts) > 1:
        best_rank, best_index = None, None
        for index in range(len(parts) - 1):
            rank = ranks.get(parts[index] + parts[index + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_index = rank, index
        if best_index is None:  # no adjacent pair is a token: done
            break
        parts[best_index:best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return [ranks[part] for part in parts]


def bpe_encode_plain(ranks: dict[bytes, int], text: str) -> list[int]:
    """Encode `text` with plain Python (minbpe-style): the reference that tiktoken must agree with.

    Special-token strings are treated as ordinary text here (like tiktoken's `encode_ordinary`).
    Slow (quadratic in the pre-token length): for tests and for reading, not for data pipelines.

    >>> ranks = train_bpe("aaabdaaabac", vocab_size=259)
    >>> bpe_encode_plain(ranks, "aaab aaa")    # pre-tokens "aaab", " aaa"
    [258, 32, 256, 97]
    """
    ids: list[int] = []
    for pretoken in _SPLIT_RE.findall(text):
        ids.extend(_bpe_merge_pretoken(ranks, pretoken.encode("utf-8")))
    return ids


# --------------------------------------------------------------------------------------------------
# 4. The tokenizer used by every stage, and the chat format
# --------------------------------------------------------------------------------------------------

class Tokenizer:
    """The trained ranks plus the special tokens, served by a `tiktoken.Encoding`.

    Ids: 0..n-1 are the trained ranks (n = len(mergeable_ranks)); then EOS = n, PAD = n+1,
    USER = n+2, ASSISTANT = n+3 (the order of SPECIAL_TOKENS). `vocab_size` = n + 4 is the size the
    model's embedding needs.

    `identity` = {name, sha256 of the rank file's bytes, vocab_size} is stored in every checkpoint,
    so a model is never used with a tokenizer other than the one it was trained with.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], *, name: str = "tinyworld",
                 sha256: str | None = None):
        _check_ranks(mergeable_ranks, f"tokenizer {name!r}")
        n = len(mergeable_ranks)
        special_tokens = {token: n + offset for offset, token in enumerate(SPECIAL_TOKENS)}
        self.name = name
        self.encoding = tiktoken.Encoding(
            name,
            pat_str=GPT2_SPLIT_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens=special_tokens,
            explicit_n_vocab=n + len(special_tokens),  # tiktoken checks the ids are 0..V-1
        )
        self.vocab_size = self.encoding.n_vocab
        self.eos_id = special_tokens[EOS_TOKEN]
        self.pad_id = special_tokens[PAD_TOKEN]
        self.user_id = special_tokens[USER_TOKEN]
        self.assistant_id = special_tokens[ASSISTANT_TOKEN]
        # a response is text and (at its end) EOS: the sampler never draws these
        self.never_sampled_ids = (self.pad_id, self.user_id, self.assistant_id)
        # Built from ranks in memory: hash the bytes save_ranks would write, so the identity is the
        # same as after a save + from_file round trip.
        self.sha256 = sha256 or hashlib.sha256(_rank_file_bytes(mergeable_ranks)).hexdigest()

    @classmethod
    def from_file(cls, path: str | os.PathLike, name: str = "tinyworld") -> "Tokenizer":
        """Load the rank file at `path`. A corrupt file is a `UserError` naming the file and line
        (what `load_ranks` raises as a ValueError: here the file is the user's input)."""
        data = _read_rank_file(path)
        try:
            ranks = _parse_rank_file(data, path)
        except ValueError as error:
            raise UserError(f"{error} (data/prepare.py writes the tokenizer file)") from None
        return cls(ranks, name=name, sha256=hashlib.sha256(data).hexdigest())

    @property
    def identity(self) -> dict:
        """What a checkpoint stores to name its tokenizer: plain values only."""
        return {"name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size}

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids.

        allow_special=False (prompts, responses, anything a user typed): a special-token string
        in the text is an error, so typed text can never inject an EOS or a role marker.
        allow_special=True (the pretraining corpus, written by `chat_text`): each special-token
        string becomes its id and the text between them is encoded as usual.
        """
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        found = _SPECIAL_RE.search(text)
        if found:
            raise ValueError(f"text contains the special token {found.group()!r} at character "
                             f"{found.start()}: pass allow_special=True if it is meant as that token")
        return self.encoding.encode_ordinary(text)

    def decode(self, ids, skip_special: bool = True) -> str:
        """Ids (a list, or a 1-D tensor/array) -> text.

        PAD is always dropped (it is never content). With skip_special (the default) EOS and the
        role markers are dropped too; with skip_special=False they come back as their strings.
        Ids that end in the middle of a UTF-8 character (a sample cut short) decode to U+FFFD.
        """
        if hasattr(ids, "tolist"):  # torch tensor / numpy array
            ids = ids.tolist()
        dropped = {self.pad_id}
        if skip_special:
            dropped |= {self.eos_id, self.user_id, self.assistant_id}
        kept = []
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary 0..{self.vocab_size - 1}")
            if token_id not in dropped:
                kept.append(token_id)
        return self.encoding.decode(kept, errors="replace")

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]}...)"


def render_chat(tokenizer: Tokenizer, prompt: str, response: str | None = None, *,
                add_eos: bool = True) -> list[int]:
    """THE chat renderer, used by every stage: SFT, RM, PPO, evaluation and chat.

        [USER] + encode(prompt) + [ASSISTANT] + encode(response) + [EOS]

    With response=None it stops after [ASSISTANT]: the prompt ready for generation, the model's
    first sampled token being the response's first token. add_eos=False leaves the EOS off a
    response (e.g. to score a response that never stopped). The prompt and the response are encoded
    verbatim, with no space added after a marker, and must not contain special-token strings.

    Example (ids depend on the trained ranks; n = number of trained ranks):
        render_chat(tok, "hi", "A cow.")  ->  [n+2, <"hi">, n+3, <"A">, <" cow">, <".">, n]
    """
    ids = [tokenizer.user_id] + tokenizer.encode(prompt) + [tokenizer.assistant_id]
    if response is not None:
        ids += tokenizer.encode(response)
        if add_eos:
            ids.append(tokenizer.eos_id)
    return ids


def chat_text(prompt: str, response: str | None = None, add_eos: bool = True) -> str:
    """The same layout as `render_chat`, as a string, for writing the pretraining corpus:

        "<|user|>" + prompt + "<|assistant|>" + response + "<|endoftext|>"

    Encoded with allow_special=True it gives exactly render_chat's ids, because tiktoken encodes
    the text between special tokens piece by piece, as render_chat does.
    """
    for part in (prompt, response or ""):
        found = _SPECIAL_RE.search(part)
        if found:  # same rule as render_chat: user text never smuggles in a special token
            raise ValueError(f"chat text contains the special token {found.group()!r} at character "
                             f"{found.start()}")
    text = USER_TOKEN + prompt + ASSISTANT_TOKEN
    if response is not None:
        text += response
        if add_eos:
            text += EOS_TOKEN
    return text
