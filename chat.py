"""Talk to a checkpoint: type a prompt, read the model's answer.

Reads  out/ppo.pt (or any base / SFT / PPO checkpoint), data/tokenizer.tiktoken
Writes nothing.

    python chat.py                                   # the latest policy in out/: ppo.pt, else sft.pt, else base.pt
    python chat.py --checkpoint out/sft.pt           # prompt> loop; quit with "quit" or Ctrl-D
    python chat.py --checkpoint out/base.pt --prompt "what does a cow eat?" --n-samples 4 --show-score
    python chat.py --temperature 0 --prompt "what is 3 plus 4?"    # greedy

The prompt is rendered exactly as in training (`render_chat`: [USER] prompt [ASSISTANT]) and the
answer is sampled with the KV cache until end-of-text or --max-new-tokens. `--show-score` grades each
answer with the gold labeler, part by part, so you can see what the rubric rewards. Try the same
prompt on base.pt, sft.pt and ppo.pt: that is the whole story of RLHF in three answers.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional


from minirlhf import labeler
from minirlhf.checkpoint import load_policy
from minirlhf.cli import UserError, option, parse_config, run_main
from minirlhf.tokenizer import Tokenizer, render_chat
from minirlhf.training import sample_responses
from minirlhf.runtime import setup_runtime


@dataclass
class ChatConfig:
    checkpoint: str = option("", "a base, SFT or PPO checkpoint (default: OUT_DIR/ppo.pt, else sft.pt, else base.pt)")
    out_dir: str = option("out", "where to look for the default checkpoint")
    data_dir: str = option("data", "where the tokenizer is")
    prompt: str = option("", "answer this one prompt and exit (empty: a prompt> loop)")
    n_samples: int = option(1, "answers per prompt", min=1, max=64)
    temperature: float = option(1.0, "sampling temperature (0: greedy)", min=0.0)
    top_k: Optional[int] = option(None, "sample from the k most likely tokens only (none: all)", min=1)
    top_p: Optional[float] = option(None, "nucleus sampling: the smallest set of tokens with this much probability "
                                          "(none: all)", min=1e-6, max=1.0)
    max_new_tokens: int = option(48, "stop an answer after this many tokens", min=1)
    show_score: bool = option(False, "print the gold labeler's score of each answer")
    seed: int = option(1337, "random seed")
    device: str = option("auto", "auto, cpu or cuda", choices=["auto", "cpu", "cuda"])
    dtype: str = option("auto", "precision: auto (bf16 on a GPU that has it, else fp32), fp32 or bf16 (autocast; "
                                "weights stay fp32)", choices=["auto", "fp32", "bf16"])


QUIT_WORDS = {"quit", "exit", ":q"}


def default_checkpoint(out_dir: str) -> str:
    """The most trained policy in out_dir: ppo.pt, else sft.pt, else base.pt."""
    for stage in ("ppo", "sft", "base"):
        path = os.path.join(out_dir, f"{stage}.pt")
        if os.path.exists(path):
            return path
    raise UserError(f"no checkpoint in {out_dir} (expected ppo.pt, sft.pt or base.pt): train one first "
                    "(python run_all.py), or pass --checkpoint")


def reply(model, tokenizer, prompt: str, cfg, generator) -> None:
    """Sample cfg.n_samples answers to one prompt and print them (with their gold score if asked)."""
    block_size = model.config.block_size
    prompt_len = len(render_chat(tokenizer, prompt))
    if prompt_len + cfg.max_new_tokens > block_size:
        raise UserError(f"the prompt is {prompt_len} tokens; with --max-new-tokens {cfg.max_new_tokens} that is more "
                        f"than the model's {block_size}-token window: shorten it or lower --max-new-tokens")
    texts, ended, _ = sample_responses(model, tokenizer, [prompt] * cfg.n_samples,
                                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       top_k=cfg.top_k, top_p=cfg.top_p, generator=generator)
    for i, (text, stopped) in enumerate(zip(texts, ended)):
        prefix = f"[{i + 1}] " if cfg.n_samples > 1 else ""
        suffix = "" if stopped else f"  [no end-of-text within {cfg.max_new_tokens} tokens]"
        print(f"{prefix}{text.strip()}{suffix}")
        if cfg.show_score:
            score = labeler.score(prompt, text, stopped)
            parts = ", ".join(f"{name} {value:.2f}" for name, value in score.parts.items())
            print(f"    gold {score.total:.2f} / {labeler.MAX_SCORE:g}  ({parts})")
    sys.stdout.flush()


def main() -> None:
    cfg = parse_config(ChatConfig, {}, description=__doc__)
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    tokenizer = Tokenizer.from_file(os.path.join(cfg.data_dir, "tokenizer.tiktoken"))
    path = cfg.checkpoint or default_checkpoint(cfg.out_dir)
    model, ckpt = load_policy(path, tokenizer.identity, runtime)
    generator = runtime.generator(cfg.seed)

    if cfg.prompt:
        reply(model, tokenizer, cfg.prompt, cfg, generator)
        return
    print(f"chatting with {path} ({ckpt['kind']}, step {ckpt['step']}); "
          f"temperature {cfg.temperature:g}; type 'quit' or press Ctrl-D to leave")
    while True:
        try:
            prompt = input("prompt> ").strip()
        except EOFError:
            print()
            return
        if prompt.lower() in QUIT_WORDS:
            return
        if not prompt:
            continue
        try:
            reply(model, tokenizer, prompt, cfg, generator)
        except UserError as error:  # a prompt too long: say so and keep the conversation going
            print(f"error: {error}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    run_main(main)
