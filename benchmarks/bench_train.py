"""Benchmark: training throughput and model FLOPs utilisation (MFU) of a GPT training step.

What it measures, in one run:
1. this machine's fp32 matmul peak: the best GFLOP/s of n x n @ n x n matmuls (n = 2048: 2 n^3 FLOPs each);
2. for each thread count and batch size asked for, a full training step of the chosen preset
   (forward, cross-entropy, backward, AdamW step) on random tokens at full block_size, reporting
   tokens/s and MFU = achieved FLOP/s / the peak of (1) at the same thread count.

FLOP accounting (nanoGPT's, after the PaLM paper, appendix B): a training step costs 6 N FLOPs per
token -- 2 N forward (one multiply-add per parameter) and 4 N backward (gradients with respect to
activations and to weights) -- with N the parameters that take part in matmuls: every parameter
except the position embeddings (the token embeddings count, as the tied LM head). Attention's own
matmuls (q k^T and att v) add 12 * n_layer * d_model * T FLOPs per token; they are reported as a
second, "with attention" figure, not folded into the 6N MFU.

How to run (from the repository root):

    python benchmarks/bench_train.py                                   # tiny preset, V=2048, batch 4/8/16
    python benchmarks/bench_train.py --batch-sizes 8 --threads 1,2     # compare thread counts
    python benchmarks/bench_train.py --preset small --device cuda --batch-sizes 8 --vocab-size 50257

What to expect: DESIGN.md's target is MFU >= 50% for the tiny preset on a 2-core CPU (measured
there: fp32 matmul peak ~175 GFLOP/s; a 4M-parameter GPT with V=4096 reached ~60%). The step is
mostly d x 4d and d x V matmuls, which run near the peak; LayerNorm, GELU, softmax and the
optimizer are memory-bound and pull the figure down. On a machine shared with other jobs both the
peak and the step slow down, so compare the ratio, not the absolute numbers, and rerun if the two
measurements were taken under different loads.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from minirlhf.model import GPT, MODEL_PRESETS, GPTConfig  # noqa: E402


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(n: int, repeats: int, device: str) -> float:
    """Best fp32 GFLOP/s over `repeats` n x n matmuls (TF32 off on CUDA: an fp32 peak)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def training_step_seconds(model, optimizer, batch, targets, steps: int, device: str) -> float:
    """Median seconds of one forward + backward + AdamW step (after one warm-up step)."""
    times = []
    for step in range(steps + 1):
        synchronize(device)
        start = time.perf_counter()
        logits = model(batch).logits  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step > 0:  # step 0 warms up the allocator and the optimizer state
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS), help="model size preset")
    parser.add_argument("--vocab-size", type=int, default=2048, help="vocabulary size of the model")
    parser.add_argument("--batch-sizes", default="4,8,16", help="comma-separated batch sizes (sequences of block_size)")
    parser.add_argument("--threads", default=None, help="comma-separated torch.set_num_threads values (default: torch's)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting (median reported)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n for the n x n fp32 matmul peak")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and tokens")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 peak and fp32 training
        torch.backends.cudnn.allow_tf32 = False

    config = GPTConfig(vocab_size=args.vocab_size, **MODEL_PRESETS[args.preset])
    T, d, n_layer = config.block_size, config.d_model, config.n_layer
    n_params = sum(p.numel() for p in GPT(config).parameters())
    n_matmul = n_params - T * d  # nanoGPT's N: everything but the position embeddings
    flops_per_token = 6 * n_matmul
    attention_flops_per_token = 12 * n_layer * d * T
    print(f"preset {args.preset}: {n_params / 1e6:.2f}M parameters (N = {n_matmul / 1e6:.2f}M without wpe), "
          f"V={args.vocab_size}, T={T}, d={d}, L={n_layer}; {args.device}")
    print(f"FLOPs per token: 6N = {flops_per_token / 1e6:.1f}M, attention +{attention_flops_per_token / 1e6:.1f}M")

    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"{'threads':>7} {'peak GFLOP/s':>12} {'batch':>5} {'tokens/s':>9} {'step s':>7} "
          f"{'GFLOP/s':>8} {'MFU 6N':>7} {'MFU +attn':>9}")
    for threads in thread_counts:
        torch.set_num_threads(threads)
        peak = matmul_peak_gflops(args.matmul_size, repeats=5, device=args.device)
        for batch_size in batch_sizes:
            torch.manual_seed(args.seed)
            model = GPT(config).to(args.device).train()
            optimizer = model.configure_optimizer(weight_decay=0.1, lr=3e-4, betas=(0.9, 0.95))
            tokens = torch.randint(0, args.vocab_size, (batch_size, T + 1), device=args.device)
            inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # targets = inputs shifted by 1
            seconds = training_step_seconds(model, optimizer, inputs, targets, args.steps, args.device)
            tokens_per_s = batch_size * T / seconds
            achieved = tokens_per_s * flops_per_token / 1e9
            with_attention = tokens_per_s * (flops_per_token + attention_flops_per_token) / 1e9
            print(f"{threads:>7} {peak:>12.1f} {batch_size:>5} {tokens_per_s:>9.0f} {seconds:>7.3f} "
                  f"{achieved:>8.1f} {achieved / peak:>7.1%} {with_attention / peak:>9.1%}")
    print("target (DESIGN.md): MFU 6N >= 50% of the peak measured in the same run")


if __name__ == "__main__":
    main()
