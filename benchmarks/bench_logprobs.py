"""Benchmark: fused token logprobs against the plain implementation and a TRL-style row loop.

What is compared, per token, on B·T = 2048 tokens, d = 256, V = 50257 (GPT-2's vocabulary), fp32:

- ``plain``:   ``log_softmax(h @ W.T, -1).gather(-1, targets)``, the baseline of the targets in
               docs/design.md (it holds the (N, V) logits, and autograd keeps their log-softmax too);
- ``rowloop``: logits ``h @ W.T``, then a loop over batch rows of ``logsumexp`` (TRL's
               ``selective_log_softmax`` for fp32), which avoids the second (N, V) tensor;
- ``fused``:   `minirlhf.kernels.token_logprobs` on the fused torch path (vocabulary blocks,
               online log-sum-exp, recompute in backward);
- ``triton``:  the Triton kernels (CUDA only).

in two modes: ``fwd+bwd`` (gradients to the hidden states AND the weight, from a random per-token
upstream gradient: PPO's policy update) and ``fwd`` (under ``torch.no_grad()``: PPO's old-policy
and reference logprobs), at two logit scales: std 16 (what a trained LM produces; most ``exp``
arguments fall below -87, the slow denormal range of CPU ``exp``) and std 1.

Method. Each (mode, scale, implementation) is measured in two FRESH Python processes, one for
memory and one for time, so that one variant's memory can't hide in another's. In each, a first
call warms up (thread pools, Triton compilation). Memory: the peak of one more call, on top of
what was allocated before it (inputs, model weight); the 51 MB weight gradient counts.
- CPU: the kernel's peak-resident-set mark ``VmHWM`` is reset (``echo 5 > /proc/self/clear_refs``,
  Linux >= 4.0) just before the call and read after it, minus ``VmRSS`` before it. The process
  runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc gives freed tensors back to the OS
  (by default it keeps blocks under 32 MB for reuse, and a reused block never shows in the RSS).
- CUDA: ``torch.cuda.max_memory_allocated()`` during the call minus the memory allocated before.
Time: ``--repeats`` calls after the warm-up, median (CUDA: synchronised before reading the
clock), with malloc's defaults. Ratios compare with ``plain`` measured in the same run.

Run (CPU, ~2-4 minutes on 2 cores):   python benchmarks/bench_logprobs.py
Run on a GPU:                         python benchmarks/bench_logprobs.py --device cuda
Faster, smaller check:                python benchmarks/bench_logprobs.py --vocab 8192 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from minirlhf.kernels import token_logprobs  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    parser.add_argument("--batch", type=int, default=8, help="B, sequences (default: 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="T, tokens per sequence (default: 256)")
    parser.add_argument("--hidden", type=int, default=256, help="d, hidden size (default: 256)")
    parser.add_argument("--vocab", type=int, default=50257, help="V, vocabulary size (default: 50257)")
    parser.add_argument("--logit-stds", type=float, nargs="+", default=[16.0, 1.0], help="logit scales (default: 16 1)")
    parser.add_argument("--modes", nargs="+", default=["fwd+bwd", "fwd"], choices=["fwd+bwd", "fwd"])
    parser.add_argument("--impls", nargs="+", default=None, help="default: plain rowloop fused (+ triton on cuda)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default: 3 cpu, 20 cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "mode,impl,std": one measurement
    args = parser.parse_args(argv)
    if args.impls is None:
        args.impls = ["plain", "rowloop", "fused"] + (["triton"] if args.device == "cuda" else [])
    if args.repeats is None:
        args.repeats = 3 if args.device == "cpu" else 20
    return args


# ------------------------------------------------------------------------------------------------
# the implementations being compared
# ------------------------------------------------------------------------------------------------


def plain_logprobs(hidden, weight, targets):
    """The baseline: all (B, T, V) logits, their log-softmax, then a gather."""
    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def rowloop_logprobs(hidden, weight, targets):
    """TRL's ``selective_log_softmax`` (fp32 branch): gather the target logit, loop logsumexp over rows."""
    logits = hidden @ weight.T  # (B, T, V)
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    log_norms = torch.stack([torch.logsumexp(row_logits, dim=-1) for row_logits in logits])  # (B, T)
    return target_logits - log_norms


IMPLEMENTATIONS = {
    "plain": plain_logprobs,
    "rowloop": rowloop_logprobs,
    "fused": lambda h, w, t: token_logprobs(h, w, t, impl="fused"),
    "triton": lambda h, w, t: token_logprobs(h, w, t, impl="triton"),
}


# ------------------------------------------------------------------------------------------------
# one measurement, in a fresh process
# ------------------------------------------------------------------------------------------------


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_memory_of(call, device: torch.device) -> tuple[int, str]:
    """Peak memory (bytes) that one ``call()`` adds to what was allocated before it, and how.

    ``call`` has already run once (warm-up). On the CPU this relies on the parent having started
    this process with ``MALLOC_MMAP_THRESHOLD_`` set, so that freed tensors go back to the OS and
    the resident size follows the live tensors (otherwise the warm-up's freed blocks, kept by
    malloc, would be reused unseen).
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated"
    if reset_peak_rss():
        before = proc_status_bytes("VmRSS")
        call()
        return proc_status_bytes("VmHWM") - before, "VmHWM after clear_refs (MALLOC_MMAP_THRESHOLD_=65536)"
    raise RuntimeError("can't reset the peak RSS (/proc/self/clear_refs); use the first-call method")


def measure_one(args) -> dict:
    """One variant in this (fresh) process: ``what`` is "memory" (warm-up + one measured call)
    or "time" (warm-up + ``--repeats`` timed calls, and checksums of the results)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    mode, impl, logit_std, what = args.child.split(",")
    logit_std = float(logit_std)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (docs/design.md)
    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(args.batch, args.seq_len, args.hidden, generator=generator).to(device)
    weight = torch.randn(args.vocab, args.hidden, generator=generator).to(device)
    weight.mul_(logit_std / args.hidden**0.5)  # logits h.W ~ N(0, logit_std^2)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=generator).to(device)
    upstream = torch.randn(args.batch, args.seq_len, generator=generator).to(device)
    function = IMPLEMENTATIONS[impl]
    with_grad = mode == "fwd+bwd"
    hidden.requires_grad_(with_grad)
    weight.requires_grad_(with_grad)

    def call():
        hidden.grad = weight.grad = None
        if with_grad:
            logprobs = function(hidden, weight, targets)
            logprobs.backward(upstream)
        else:
            with torch.no_grad():
                logprobs = function(hidden, weight, targets)
        return logprobs

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # warm-up call (lazy initialisation: thread pools, Triton compilation), kept for the checksums
    logprobs = call()
    checksum = {"logprobs_sum": float(logprobs.double().sum())}
    if with_grad:
        checksum["grad_hidden_norm"] = float(hidden.grad.double().norm())
        checksum["grad_weight_norm"] = float(weight.grad.double().norm())
    del logprobs
    hidden.grad = weight.grad = None
    if what == "memory":
        peak, method = peak_memory_of(call, device)
        return {"peak_bytes": peak, "memory_method": method}

    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), **checksum}


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------


def run_child(args, mode, impl, logit_std) -> dict:
    """Measure one variant: memory in one fresh process, time in another."""
    result = {}
    for what in ("memory", "time"):
        command = [sys.executable, __file__, "--device", args.device, "--batch", str(args.batch),
                   "--seq-len", str(args.seq_len), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
                   "--repeats", str(args.repeats), "--child", f"{mode},{impl},{logit_std},{what}"]
        if args.threads:
            command += ["--threads", str(args.threads)]
        env = dict(os.environ)
        if what == "memory":
            # glibc: every allocation >= 64 KiB gets its own mapping, returned to the OS on free,
            # so the resident size tracks live tensors (timing runs keep malloc's defaults)
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        completed = subprocess.run(command, capture_output=True, text=True, env=env)
        if completed.returncode != 0:
            return {"error": (completed.stderr.strip().splitlines() or ["?"])[-1]}
        result.update(json.loads(completed.stdout.strip().splitlines()[-1]))
    return result


def describe_device(args) -> str:
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU, {args.threads or torch.get_num_threads()} threads (torch {torch.__version__})"


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(measure_one(args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is available")
    n_tokens = args.batch * args.seq_len
    print(f"token_logprobs: N = {args.batch} x {args.seq_len} = {n_tokens} tokens, d = {args.hidden}, "
          f"V = {args.vocab}, fp32, on {describe_device(args)}")
    print(f"(N, V) fp32 logits alone: {n_tokens * args.vocab * 4 / 1e6:.0f} MB; the weight's gradient: "
          f"{args.vocab * args.hidden * 4 / 1e6:.0f} MB. Each row below is a fresh process.\n")
    header = f"{'logit std':>9} {'mode':>8} {'impl':>8} {'time ms':>10} {'speedup':>8} {'peak MB':>9} {'mem ratio':>9}  check"
    print(header)
    print("-" * len(header))
    for logit_std in args.logit_stds:
        for mode in args.modes:
            results = {impl: run_child(args, mode, impl, logit_std) for impl in args.impls}
            baseline = results.get("plain", {})
            for impl, result in results.items():
                if "error" in result:
                    print(f"{logit_std:>9g} {mode:>8} {impl:>8}  failed: {result['error']}")
                    continue
                speedup = baseline["time_s"] / result["time_s"] if "time_s" in baseline else float("nan")
                mem_ratio = baseline["peak_bytes"] / max(result["peak_bytes"], 1) if "peak_bytes" in baseline else float("nan")
                check = ""
                if "logprobs_sum" in baseline:
                    diffs = [abs(result[key] - baseline[key]) / max(abs(baseline[key]), 1e-30)
                             for key in ("logprobs_sum", "grad_hidden_norm", "grad_weight_norm") if key in result]
                    check = f"rel diff vs plain {max(diffs):.1e}"
                print(f"{logit_std:>9g} {mode:>8} {impl:>8} {result['time_s'] * 1e3:>10.1f} {speedup:>7.2f}x "
                      f"{result['peak_bytes'] / 1e6:>9.1f} {mem_ratio:>8.1f}x  {check}")
            sys.stdout.flush()
    methods = sorted({r["memory_method"] for r in results.values() if "memory_method" in r})
    print(f"\npeak memory measured with: {', '.join(methods)}")
    print("speedup and mem ratio: plain's time / this time, plain's peak / this peak (higher is better).")
    print("command: python " + " ".join(["benchmarks/bench_logprobs.py"] + sys.argv[1:]))


if __name__ == "__main__":
    main()
