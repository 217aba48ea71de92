"""Benchmark: GAE with whole-tensor scans against the per-timestep loop.

Compared on B = 64 responses of T = 1024 tokens, fp32, right-padded (random lengths):

- ``loop``:   `minirlhf.kernels.gae` with ``impl="reference"``: one Python iteration per timestep
              (what CleanRL and TRL write), ~5 small torch calls per step;
- ``fused``:  ``impl="fused"``: the two-level blocked scan (two small matmuls with decay matrices);
- ``triton``: ``impl="triton"``: one program per row, ``tl.associative_scan`` over time (CUDA only).

Values are checked in the same run: each path against the loop computed in fp64 (fp64 inputs:
max |difference|; fp32 inputs: max |difference| / max |advantage|).

Method: as in bench_logprobs.py, each implementation is measured in fresh processes: one for
memory (a warm-up call, then the peak of one call over what was allocated before it: ``VmHWM``
reset through ``/proc/self/clear_refs`` with ``MALLOC_MMAP_THRESHOLD_=65536`` on the CPU,
``torch.cuda.max_memory_allocated`` on CUDA), one for time (median of ``--repeats`` calls after a
warm-up; CUDA synchronised). Ratios compare with ``loop`` measured in the same run.

Run (CPU, ~20 s):     python benchmarks/bench_gae.py
Run on a GPU:         python benchmarks/bench_gae.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from benchmarks.common import call_times, peak_memory_of, run_child_process  # noqa: E402
from minirlhf.kernels import gae  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    parser.add_argument("--batch", type=int, default=64, help="B, responses (default: 64)")
    parser.add_argument("--seq-len", type=int, default=1024, help="T, tokens per response (default: 1024)")
    parser.add_argument("--gamma", type=float, default=1.0, help="discount (default: 1.0)")
    parser.add_argument("--lam", type=float, default=0.95, help="GAE lambda (default: 0.95)")
    parser.add_argument("--impls", nargs="+", default=None, help="default: loop fused (+ triton on cuda)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: 5 for the loop, 50 else)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "impl,what": one measurement
    args = parser.parse_args(argv)
    if args.impls is None:
        args.impls = ["loop", "fused"] + (["triton"] if args.device == "cuda" else [])
    return args


IMPL_NAMES = {"loop": "reference", "fused": "fused", "triton": "triton"}


def make_batch(args, dtype, device):
    """Seeded rewards (small KL-like terms + a score at the last valid token), values, prefix mask."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, args.seq_len + 1, (args.batch,), generator=generator)
    mask = torch.arange(args.seq_len)[None, :] < lengths[:, None]
    rewards = 0.01 * torch.randn(args.batch, args.seq_len, generator=generator, dtype=torch.float64)
    rewards[torch.arange(args.batch), lengths - 1] += torch.randn(args.batch, generator=generator, dtype=torch.float64)
    values = torch.randn(args.batch, args.seq_len, generator=generator, dtype=torch.float64)
    return rewards.to(device, dtype), values.to(device, dtype), mask.to(device)


# ------------------------------------------------------------------------------------------------
# one measurement, in a fresh process
# ------------------------------------------------------------------------------------------------


def measure_one(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    impl, what = args.child.split(",")
    device = torch.device(args.device)
    rewards, values, mask = make_batch(args, torch.float32, device)

    def call():
        return gae(rewards, values, mask, args.gamma, args.lam, impl=IMPL_NAMES[impl])

    call()  # warm-up (Triton compiles here)
    if what == "memory":
        return peak_memory_of(call, device, fresh_process=True)

    # values: fp32 and fp64 against the fp64 loop
    expected = gae(*make_batch(args, torch.float64, device), args.gamma, args.lam, impl="reference")[0]
    got32 = call()[0].double()
    checks = {"fp32_rel_err": float((got32 - expected).abs().max() / expected.abs().max())}
    if impl != "triton":  # Triton computes in fp32
        got64 = gae(*make_batch(args, torch.float64, device), args.gamma, args.lam, impl=IMPL_NAMES[impl])[0]
        checks["fp64_abs_err"] = float((got64 - expected).abs().max())

    repeats = args.repeats or (5 if impl == "loop" else 50)
    return {"time_s": statistics.median(call_times(call, device, repeats)), **checks}


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------


def run_child(args, impl) -> dict:
    result = {}
    for what in ("memory", "time"):
        command = [sys.executable, __file__, "--device", args.device, "--batch", str(args.batch),
                   "--seq-len", str(args.seq_len), "--gamma", str(args.gamma), "--lam", str(args.lam),
                   "--child", f"{impl},{what}"]
        if args.repeats:
            command += ["--repeats", str(args.repeats)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        measured, error = run_child_process(command, measures_memory=what == "memory")
        if error is not None:
            return {"error": error}
        result.update(measured)
    return result


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(measure_one(args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is available")
    where = (f"{torch.cuda.get_device_name()}" if args.device == "cuda"
             else f"CPU, {args.threads or torch.get_num_threads()} threads")
    print(f"gae: B = {args.batch}, T = {args.seq_len}, gamma = {args.gamma}, lam = {args.lam}, fp32, "
          f"on {where} (torch {torch.__version__}). Each row: fresh processes.\n")
    header = f"{'impl':>7} {'time ms':>10} {'speedup':>9} {'peak KB':>8}  {'fp32 err (rel)':>14} {'fp64 err (abs)':>14}"
    print(header)
    print("-" * len(header))
    results = {impl: run_child(args, impl) for impl in args.impls}
    baseline = results.get("loop", {})
    for impl, result in results.items():
        if "error" in result:
            print(f"{impl:>7}  failed: {result['error']}")
            continue
        speedup = baseline["time_s"] / result["time_s"] if "time_s" in baseline else float("nan")
        fp64 = f"{result['fp64_abs_err']:.1e}" if "fp64_abs_err" in result else "-"
        peak = f"{result['peak_bytes'] / 1e3:>8.0f}" if result["peak_bytes"] is not None else f"{'n/a':>8}"
        print(f"{impl:>7} {result['time_s'] * 1e3:>10.3f} {speedup:>8.1f}x {peak}  "
              f"{result['fp32_rel_err']:>14.1e} {fp64:>14}")
    print("\nspeedup: the loop's time / this time. Errors: against the loop in fp64 (fp32 errors relative "
          "to the largest advantage).")
    print("command: python " + " ".join(["benchmarks/bench_gae.py"] + sys.argv[1:]))


if __name__ == "__main__":
    main()
