"""Step -1: write the tiny-world data files and train the tokenizer.

Reads nothing; writes into --data-dir (default data/), deterministically for a seed:

    corpus.txt         pretraining text: narrative paragraphs + chats where the assistant is
                       inconsistent (good, wrong, rude, off-topic, rambling, endless)
    sft.jsonl          {"prompt", "completion"} demonstrations: good responses only, and few
    rm_prompts.jsonl   {"prompt"}: prompts whose samples the labeler ranks for the reward model
    ppo_prompts.jsonl  {"prompt"}: prompts for PPO
    eval_prompts.jsonl {"prompt"}: held-out prompts (in no training file)
    tokenizer.tiktoken the byte-level BPE ranks (tiktoken's rank-file format)
    manifest.json      sizes, seed and the behaviour mix of the corpus

Run:  python data/prepare.py                  (tiny, ~10 s)
      python data/prepare.py --preset smoke --data-dir /tmp/d
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minirlhf import world  # noqa: E402
from minirlhf.cli import option, parse_config, print_config, run_main  # noqa: E402
from minirlhf.data import write_jsonl  # noqa: E402
from minirlhf.tokenizer import SPECIAL_TOKENS, Tokenizer, chat_text, save_ranks, train_bpe  # noqa: E402


@dataclass
class PrepareConfig:
    preset: str = option("tiny", "size preset")
    data_dir: str = option("data", "where the data files go")
    seed: int = option(1337, "seed of the world's generator")
    corpus_docs: int = option(60000, "documents in the pretraining corpus", min=10)
    chat_fraction: float = option(0.5, "share of corpus documents that are chats", min=0.0, max=1.0)
    sft_examples: int = option(1200, "SFT demonstrations (labelers' time is expensive)", min=1)
    vocab_size: int = option(768, "BPE vocabulary (bytes + merges, specials extra)", min=257)


PRESETS = {
    "smoke": dict(corpus_docs=1500, sft_examples=200, vocab_size=384),
    "tiny": {},
    "medium": {},
    "small": dict(corpus_docs=200000, sft_examples=3000, vocab_size=2048),
}


def family_balanced(tasks: list[world.Task], n: int, rng: random.Random) -> list[world.Task]:
    """n tasks drawn with each family equally likely (the families have different prompt counts)."""
    by_family = {f: [t for t in tasks if t.family == f] for f in world.FAMILIES}
    families = [f for f in world.FAMILIES if by_family[f]]
    return [rng.choice(by_family[rng.choice(families)]) for _ in range(n)]


def main() -> None:
    cfg = parse_config(PrepareConfig, PRESETS, description=__doc__.split("\n")[0])
    print_config(cfg, "prepare")
    start = time.time()
    rng = random.Random(cfg.seed)
    splits = world.split_prompts(cfg.seed)
    train_tasks = splits.sft + splits.rm + splits.ppo + splits.corpus   # never splits.eval

    # The pretraining corpus: documents joined by end-of-text; an "endless" chat has no end-of-text
    # of its own, so the model learns that the assistant sometimes just keeps going.
    behaviours = Counter()
    documents = []
    for _ in range(cfg.corpus_docs):
        if rng.random() < cfg.chat_fraction:
            task = rng.choice(train_tasks)
            behaviour, response, ends = world.base_model_response(task, rng)
            behaviours[behaviour] += 1
            documents.append(chat_text(task.prompt, response, add_eos=ends))
        else:
            documents.append(world.narrative_paragraph(rng) + SPECIAL_TOKENS[0])
    corpus = "\n".join(documents)

    # SFT demonstrations: good responses only, families equally often, for the prompts kept out of
    # the RM, PPO and evaluation sets (with only the SFT split's 38 sums, the SFT model learned those
    # by heart and got 37% of unseen sums fully right, against 79% of the seen ones).
    sft = [{"prompt": t.prompt, "completion": world.good_response(t, rng)}
           for t in family_balanced(splits.sft + splits.corpus, cfg.sft_examples, rng)]

    os.makedirs(cfg.data_dir, exist_ok=True)
    corpus_path = os.path.join(cfg.data_dir, "corpus.txt")
    with open(corpus_path + ".tmp", "w", encoding="utf-8") as f:
        f.write(corpus)
    os.replace(corpus_path + ".tmp", corpus_path)
    write_jsonl(os.path.join(cfg.data_dir, "sft.jsonl"), sft)
    for name in ("rm", "ppo", "eval"):
        write_jsonl(os.path.join(cfg.data_dir, f"{name}_prompts.jsonl"),
                    [{"prompt": t.prompt} for t in getattr(splits, name)])

    # The tokenizer learns its merges from the corpus (train_bpe skips the special-token strings).
    ranks = train_bpe(corpus, cfg.vocab_size)
    tokenizer_path = os.path.join(cfg.data_dir, "tokenizer.tiktoken")
    save_ranks(ranks, tokenizer_path)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    n_tokens = len(tokenizer.encode(corpus, allow_special=True))

    manifest = {
        "seed": cfg.seed, "preset": cfg.preset, "corpus_docs": cfg.corpus_docs,
        "corpus_chars": len(corpus), "corpus_tokens": n_tokens, "corpus_chat_behaviours": dict(behaviours),
        "sft_examples": len(sft), "rm_prompts": len(splits.rm), "ppo_prompts": len(splits.ppo),
        "eval_prompts": len(splits.eval), "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.identity,
    }
    with open(os.path.join(cfg.data_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(f"corpus: {len(documents)} documents, {len(corpus) / 1e6:.2f} MB, {n_tokens / 1e6:.2f} M tokens; "
          f"chat behaviours {dict(behaviours)}")
    print(f"sft: {len(sft)} demonstrations | prompts: rm {len(splits.rm)}, ppo {len(splits.ppo)}, "
          f"eval {len(splits.eval)} | vocab {tokenizer.vocab_size}")
    print(f"wrote {cfg.data_dir}/ in {time.time() - start:.1f}s")


if __name__ == "__main__":
    run_main(main)
