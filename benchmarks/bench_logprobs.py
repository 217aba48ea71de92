"""Benchmark: fused token logprobs against plain PyTorch, time and peak memory, on the CPU or a GPU.

What is compared (``h`` (N, d) hidden states, ``W`` (V, d) the LM head, ``y`` (N,) targets):

- ``plain``:    ``log_softmax(h @ W.T, -1).gather(-1, y)``, the baseline of every ratio (it holds
                the (N, V) logits, and autograd keeps their log-softmax too); in bf16 it computes
                bf16 logits and a bf16 log-softmax, as that line of PyTorch does;
- ``rowloop``:  the logits, then ``logsumexp`` over rows of 256 tokens at a time (TRL's
                ``selective_log_softmax``); not in the default list (``--impls`` adds it);
- ``fused``:    `minirlhf.kernels.token_logprobs` on the fused torch path (vocabulary blocks,
                online log-sum-exp, recomputed in backward; fp32 inside);
- ``compile``:  ``torch.compile(plain)`` (CUDA only here: one compilation per shape, dtype and mode);
- ``triton``:   ``token_logprobs(impl="triton")``, the Triton kernel ``auto`` uses on CUDA;
- ``triton_tiled``: ``token_logprobs(impl="triton_tiled")``, the tensor-core kernel of
                `minirlhf/kernels/triton_tiled.py` (opt-in; its speed is what this measures).

at the shapes of ``--shapes`` (tokens x d x V; on CUDA by default the issue's 2048x256x50257, i.e.
B·T = 8 x 256 with GPT-2's vocabulary, and an RLHF-sized 16384x768x50257), in ``--dtypes`` (fp32,
TF32 off; bf16: hidden states and weight in bf16), in two modes, ``fwd+bwd`` (gradients to the
hidden states AND the weight from a random per-token upstream gradient: PPO's policy update) and
``fwd`` (under ``torch.no_grad()``: PPO's old-policy and reference logprobs), at ``--logit-stds``
(std 16: what a trained LM produces, most ``exp`` arguments below -87, the slow denormal range of
CPU ``exp``; std 1).

Method. A first call warms up (thread pools, Triton and torch.compile compilation). Memory: the
peak of one more call on top of what was allocated before it (inputs, weight); the weight's
gradient counts. Time: the median of ``--repeats`` calls (CUDA: synchronised before each clock
read). Ratios compare with ``plain`` measured in the same run, same shape, dtype, std and mode.
- CPU: each variant runs in two FRESH processes, one for memory and one for time, so that no
  variant's memory can hide in another's. Memory is the kernel's peak-resident-set mark ``VmHWM``,
  reset (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) just before the call and read after
  it, minus ``VmRSS`` before it; that process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
  glibc gives freed tensors back to the OS (a reused block never shows in the RSS).
- CUDA: ``torch.cuda.max_memory_allocated()`` during the call minus ``memory_allocated()`` before
  it, which needs no fresh process: each implementation gets one process for all its variants
  (a kernel that crashes the CUDA context takes only its own rows with it).
- ``--same-process``: everything in this process (fast; on the CPU no memory figure).

Run (CPU, several minutes on 2 cores):  python benchmarks/bench_logprobs.py
Run on a GPU (~2-4 minutes):            python benchmarks/bench_logprobs.py --device cuda
Smaller check:                          python benchmarks/bench_logprobs.py --shapes 2048x256x8192 --repeats 1
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
from minirlhf.kernels import token_logprobs, triton_is_available  # noqa: E402

IMPLS = ("plain", "rowloop", "fused", "compile", "triton", "triton_tiled")
DEFAULT_IMPLS = ["plain", "fused", "compile", "triton", "triton_tiled"]
# measured in this order (the table keeps --impls order): plain first, for the ratios of every
# progress line; the one-compilation-per-row torch.compile last, so a time limit cuts it first
MEASURE_ORDER = ("plain", "triton_tiled", "triton", "fused", "rowloop", "compile")
ISSUE_SHAPE = "2048x256x50257"  # the benchmark shape of docs/design.md's targets
RLHF_SHAPE = "16384x768x50257"  # 64 sequences x 256 tokens, a GPT-2-small-sized head
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROW_TOKENS = 256  # rowloop: tokens per row (a sequence of the issue shape)
GOALS = (
    "goals: CPU (docs/design.md), fused vs plain: fwd+bwd >= 1.2x faster with >= 15x less memory, fwd >= 1.7x "
    "and >= 40x; GPU (docs/kernels.md), Triton vs plain: fwd+bwd >= 1.0x with >= 15x less memory, fwd >= 1.5x "
    "and >= 100x"
)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        n_tokens, hidden_size, vocab_size = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is TOKENSxDxV (e.g. {ISSUE_SHAPE}), got {text!r}") from None
    if min(n_tokens, hidden_size, vocab_size) < 1:
        raise argparse.ArgumentTypeError(f"every size of a shape must be >= 1, got {text!r}")
    return n_tokens, hidden_size, vocab_size


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                        help=f"TOKENSxDxV (default: {ISSUE_SHAPE}; on cuda also {RLHF_SHAPE})")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                        help="hidden states' and weight's dtype (default: fp32; on cuda fp32 bf16)")
    parser.add_argument("--logit-stds", type=float, nargs="+", default=None,
                        help="logit scales (default: 16 1; on cuda 16)")
    parser.add_argument("--modes", nargs="+", default=["fwd+bwd", "fwd"], choices=["fwd+bwd", "fwd"])
    parser.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS, choices=IMPLS,
                        help=f"default: {' '.join(DEFAULT_IMPLS)} (plain is always measured first)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default: 3 cpu, 10 cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--same-process", action="store_true",
                        help="measure everything in this process (CUDA memory as usual; CPU: no memory figure)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON: variants to measure here
    args = parser.parse_args(argv)
    on_cuda = args.device == "cuda"
    if args.shapes is None:
        args.shapes = [parse_shape(ISSUE_SHAPE)] + ([parse_shape(RLHF_SHAPE)] if on_cuda else [])
    if args.dtypes is None:
        args.dtypes = ["fp32", "bf16"] if on_cuda else ["fp32"]
    if args.logit_stds is None:
        args.logit_stds = [16.0] if on_cuda else [16.0, 1.0]
    if args.repeats is None:
        args.repeats = 10 if on_cuda else 3
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    args.impls = ["plain"] + [impl for impl in dict.fromkeys(args.impls) if impl != "plain"]
    return args


# ------------------------------------------------------------------------------------------------
# the implementations being compared
# ------------------------------------------------------------------------------------------------


def plain_logprobs(hidden, weight, targets):
    """The baseline: all (N, V) logits, their log-softmax, then a gather."""
    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def rowloop_logprobs(hidden, weight, targets):
    """TRL's ``selective_log_softmax`` (fp32 branch): gather the target logit, logsumexp row by row."""
    logits = hidden @ weight.T  # (N, V)
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    log_norms = torch.cat([torch.logsumexp(row, dim=-1) for row in logits.split(ROW_TOKENS)])  # (N,)
    return target_logits - log_norms


def implementation(impl: str):
    """The function ``(hidden, weight, targets) -> logprobs`` that ``impl`` names."""
    if impl == "plain":
        return plain_logprobs
    if impl == "rowloop":
        return rowloop_logprobs
    if impl == "compile":
        # one compiled graph per shape, dtype and grad mode: allow that many before falling back
        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, 64)
        return torch.compile(plain_logprobs, dynamic=False)
    return lambda h, w, t: token_logprobs(h, w, t, impl=impl)  # fused, triton, triton_tiled


def skip_reason(impl: str, device: str) -> str | None:
    """Why ``impl`` can't run here, or None."""
    if device == "cpu" and impl in ("compile", "triton", "triton_tiled"):
        return "measured on CUDA only"
    if impl in ("triton", "triton_tiled") and not triton_is_available():
        return "Triton is not importable"
    return None


# ------------------------------------------------------------------------------------------------
# measuring, in whatever process runs this
# ------------------------------------------------------------------------------------------------


def make_inputs(variant: dict, device: torch.device):
    """Seeded hidden (N, d), weight (V, d) with logits of std ``variant["std"]``, targets, upstream."""
    n_tokens, hidden_size, vocab_size = variant["shape"]
    dtype = DTYPES[variant["dtype"]]
    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n_tokens, hidden_size, generator=generator)
    weight = torch.randn(vocab_size, hidden_size, generator=generator)
    weight.mul_(variant["std"] / hidden_size**0.5)  # logits h.W ~ N(0, std^2)
    targets = torch.randint(0, vocab_size, (n_tokens,), generator=generator)
    upstream = torch.randn(n_tokens, generator=generator)
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device), upstream.to(device)


def measure_variant(variant: dict, what: list[str], device: torch.device, repeats: int, fresh_process: bool) -> dict:
    """Warm up, then measure ``what`` ("memory": one call; "time": ``repeats`` calls) of one variant."""
    hidden, weight, targets, upstream = make_inputs(variant, device)
    function = implementation(variant["impl"])
    with_grad = variant["mode"] == "fwd+bwd"
    hidden.requires_grad_(with_grad)
    weight.requires_grad_(with_grad)

    def call():
        hidden.grad = weight.grad = None
        if with_grad:
            logprobs = function(hidden, weight, targets)
            logprobs.backward(upstream.to(logprobs.dtype))
        else:
            with torch.no_grad():
                logprobs = function(hidden, weight, targets)
        return logprobs

    # warm-up (thread pools, compilation), kept for the checksums that the "check" column compares
    logprobs = call()
    result = {"logprobs_sum": float(logprobs.detach().double().sum())}
    if with_grad:
        result["grad_hidden_norm"] = float(hidden.grad.double().norm())
        result["grad_weight_norm"] = float(weight.grad.double().norm())
    del logprobs
    hidden.grad = weight.grad = None
    if "memory" in what:
        result.update(peak_memory_of(call, device, fresh_process))
    if "time" in what:
        result["time_s"] = statistics.median(call_times(call, device, repeats))
    return result


def measure_group(variants: list[dict], what: list[str], device_name: str, repeats: int,
                  fresh_process: bool) -> list[dict]:
    """Measure several variants one after the other; a failure is recorded and the next one runs."""
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (docs/design.md)
    results = []
    for variant in variants:
        try:
            results.append(measure_variant(variant, what, device, repeats, fresh_process))
        except Exception as error:  # an OOM or a compiler error: report it, keep going
            first_line = (str(error).strip().splitlines() or [""])[0]
            results.append({"error": f"{type(error).__name__}: {first_line[:150]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------


def run_group(args, variants: list[dict], what: list[str]) -> list[dict]:
    """Measure ``variants`` here (``--same-process``) or in one fresh child process."""
    if args.same_process:
        return measure_group(variants, what, args.device, args.repeats, fresh_process=False)
    spec = json.dumps({"variants": variants, "what": what})
    command = [sys.executable, __file__, "--device", args.device, "--repeats", str(args.repeats), "--child", spec]
    if args.threads:
        command += ["--threads", str(args.threads)]
    results, error = run_child_process(command, measures_memory=args.device == "cpu" and "memory" in what)
    if error is not None:
        return [{"error": f"process failed: {error[:200]}"} for _ in variants]
    return results


def device_line(args) -> str:
    """The chip (GPU name) or the CPU threads, with the versions that matter."""
    versions = f"torch {torch.__version__}"
    if triton_is_available():
        import triton

        versions += f", Triton {triton.__version__}"
    if args.device == "cuda":
        return f"GPU: {torch.cuda.get_device_name()} ({versions})"
    return f"CPU, {args.threads or torch.get_num_threads()} threads ({versions})"


def shape_name(shape) -> str:
    return "x".join(str(size) for size in shape)


def format_row(row: dict, baseline: dict | None) -> str:
    """One line of the table: the variant, its time and memory, and its ratios to plain."""
    label = f"{shape_name(row['shape']):>16} {row['dtype']:>5} {row['std']:>5g} {row['mode']:>8} {row['impl']:>12}"
    if "skipped" in row:
        return f"{label}  skipped: {row['skipped']}"
    if "error" in row:
        return f"{label}  failed: {row['error']}"
    baseline = baseline if baseline and "error" not in baseline and "skipped" not in baseline else {}
    speedup = baseline["time_s"] / row["time_s"] if "time_s" in baseline else float("nan")
    peak = row.get("peak_bytes")
    base_peak = baseline.get("peak_bytes")
    peak_text = f"{peak / 1e6:>9.1f}" if peak is not None else f"{'n/a':>9}"
    less_memory = f"{base_peak / max(peak, 1):>8.1f}x" if peak is not None and base_peak is not None else f"{'n/a':>9}"
    check = ""
    if "logprobs_sum" in baseline:
        diffs = [abs(row[key] - baseline[key]) / max(abs(baseline[key]), 1e-30)
                 for key in ("logprobs_sum", "grad_hidden_norm", "grad_weight_norm") if key in row]
        check = f"rel diff vs plain {max(diffs):.1e}"
    return f"{label} {row['time_s'] * 1e3:>10.2f} {speedup:>7.2f}x {peak_text} {less_memory}  {check}"


def main(argv=None) -> list[dict]:
    """Run the benchmark; returns one dict per row (the tests read them)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure_group(spec["variants"], spec["what"], args.device, args.repeats, fresh_process=True)))
        return []
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is available")

    print(f"token_logprobs on {device_line(args)}")
    for shape in args.shapes:
        n_tokens, hidden_size, vocab_size = shape
        print(f"  {shape_name(shape)}: N = {n_tokens} tokens, d = {hidden_size}, V = {vocab_size}; (N, V) fp32 "
              f"logits {n_tokens * vocab_size * 4 / 1e6:.0f} MB, "
              f"the weight's fp32 gradient {vocab_size * hidden_size * 4 / 1e6:.0f} MB")
    how = ("one process" if args.same_process else
           "one fresh process per implementation" if args.device == "cuda" else "two fresh processes per row")
    print(f"  fp32 with TF32 off; median of {args.repeats} calls after a warm-up; {how}\n")

    variants = [
        {"shape": list(shape), "dtype": dtype, "std": std, "mode": mode, "impl": impl}
        for impl in args.impls for shape in args.shapes for dtype in args.dtypes
        for std in args.logit_stds for mode in args.modes
    ]
    rows = []
    runnable = []
    for variant in variants:
        reason = skip_reason(variant["impl"], args.device)
        if reason:
            rows.append({**variant, "skipped": reason})
        else:
            runnable.append(variant)
    # CPU: each variant alone, memory and time in separate processes; CUDA: one process per impl
    runnable.sort(key=lambda variant: MEASURE_ORDER.index(variant["impl"]))
    if args.same_process or args.device == "cuda":
        impls = dict.fromkeys(variant["impl"] for variant in runnable)
        groups = [([v for v in runnable if v["impl"] == impl], ["memory", "time"]) for impl in impls]
    else:
        groups = [([v], [what]) for v in runnable for what in ("memory", "time")]

    def plain_of(row, candidates):
        """The plain row with the same shape, dtype, std and mode (the baseline of the ratios)."""
        same = ("shape", "dtype", "std", "mode")
        return next((r for r in candidates if r["impl"] == "plain" and all(r[k] == row[k] for k in same)), None)

    header = (f"{'shape':>16} {'dtype':>5} {'std':>5} {'mode':>8} {'impl':>12} {'time ms':>10} {'speedup':>8} "
              f"{'peak MB':>9} {'less mem':>9}  check")
    print(f"as measured (the same columns as the table at the end):\n{header}")
    measured: dict[str, dict] = {}
    for group, what in groups:
        for variant, result in zip(group, run_group(args, group, what)):
            key = json.dumps(variant)
            measured.setdefault(key, dict(variant)).update(result)
            if "time_s" in result or "error" in result:  # this row is finished: print it now
                row = measured[key]
                print(format_row(row, plain_of(row, measured.values())), flush=True)
    rows += list(measured.values())

    # the table, grouped by (shape, dtype, std, mode), implementations in --impls order
    def order(row):
        return (args.shapes.index(tuple(row["shape"])), args.dtypes.index(row["dtype"]),
                args.logit_stds.index(row["std"]), args.modes.index(row["mode"]), args.impls.index(row["impl"]))

    rows.sort(key=order)
    print("\nresults (speedup: plain's time / this time; less mem: plain's peak / this peak; higher is better)")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(format_row(row, plain_of(row, rows)))
    methods = sorted({row["memory_method"] for row in rows if "memory_method" in row})
    print(f"\npeak memory measured with: {', '.join(methods) or '-'}")
    print(GOALS)
    command_args = sys.argv[1:] if argv is None else list(argv)
    print("command: python " + " ".join(["benchmarks/bench_logprobs.py"] + command_args))
    return rows


if __name__ == "__main__":
    main()
