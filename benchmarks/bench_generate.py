"""Benchmark: generation with the KV cache vs recomputing the whole prefix for every new token.

What it measures: new tokens per second of `minirlhf.generate.generate()` on a randomly
initialised GPT (speed does not depend on the weights), batch 16, prompts of 16-32 tokens
(left-padded), 128 new tokens sampled at temperature 1, first with the KV cache (`use_cache=True`:
the prompt runs once, then one token per step) and then without it (`use_cache=False`: step s
reruns all P + s tokens). Both runs use the same seed and must produce the same tokens.

How to run (from the repository root):

    python benchmarks/bench_generate.py                       # tiny preset, batch 16, 128 new tokens
    python benchmarks/bench_generate.py --preset smoke --new-tokens 32
    python benchmarks/bench_generate.py --device cuda          # on a GPU

What to expect: the recompute path does O(P + s) work per step, the cached one O(1) (plus reading
the cache), so the ratio grows with the number of new tokens. Target (docs/design.md): >= 10x at 128 new
tokens, batch 16, on a 2-core CPU. The cached path is partly bound by per-step Python and kernel
launch overhead at these tiny sizes, so its tokens/s depends more on the machine's load than the
recompute path's does; the run prints both and the ratio.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from minirlhf.generate import generate  # noqa: E402
from minirlhf.model import GPT, MODEL_PRESETS, GPTConfig  # noqa: E402


def time_generate(model, prompts, args, use_cache):
    """Seconds for one generate() call (after the caller's warm-up), and its Generation."""
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    gen = generate(
        model, prompts, max_new_tokens=args.new_tokens, eos_id=args.vocab_size - 2, pad_id=args.vocab_size - 1,
        temperature=1.0, generator=torch.Generator(device=args.device).manual_seed(args.seed), use_cache=use_cache,
    )
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, gen


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS), help="model size preset")
    parser.add_argument("--vocab-size", type=int, default=2048, help="vocabulary size (last two ids: EOS, PAD)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    parser.add_argument("--new-tokens", type=int, default=128, help="max new tokens per prompt")
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt; others are 16..this")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights, prompts and sampling")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=args.vocab_size, **MODEL_PRESETS[args.preset])
    model = GPT(config).to(args.device).eval()
    lengths = torch.randint(min(16, args.prompt_len), args.prompt_len + 1, (args.batch_size,)).tolist()
    prompts = [torch.randint(0, args.vocab_size - 2, (n,)).tolist() for n in lengths]
    print(f"preset {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, V={args.vocab_size}), "
          f"batch {args.batch_size}, prompts {min(lengths)}-{max(lengths)} tokens, {args.new_tokens} new tokens, "
          f"{args.device}, {torch.get_num_threads()} threads")

    # warm-up (allocator, kernels) on a short run of each path
    short = argparse.Namespace(**{**vars(args), "new_tokens": 4})
    time_generate(model, prompts, short, use_cache=True)
    time_generate(model, prompts, short, use_cache=False)

    cached_s, cached = time_generate(model, prompts, args, use_cache=True)
    recompute_s, recomputed = time_generate(model, prompts, args, use_cache=False)
    new_tokens = cached.response_ids.numel()  # B * R: every row runs every step, finished or not
    cached_tps, recompute_tps = new_tokens / cached_s, new_tokens / recompute_s
    print(f"KV cache:          {cached_tps:10.0f} tokens/s  ({cached_s:.2f} s)")
    print(f"recompute prefix:  {recompute_tps:10.0f} tokens/s  ({recompute_s:.2f} s)")
    print(f"speed-up:          {cached_tps / recompute_tps:10.1f}x  (target >= 10x)")
    print(f"same tokens:       {torch.equal(cached.response_ids, recomputed.response_ids)}")


if __name__ == "__main__":
    main()
