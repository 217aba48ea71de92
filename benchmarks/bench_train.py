"""Benchmark: throughput, peak memory and model FLOPs utilisation (MFU) of the base-model training step.

What it measures, in one run, for every preset x precision asked for (and, with --compile, the same
again with the model under torch.compile):

    tokens/s    batch x seq_len / the median time of one training step, after warm-up steps
    step ms     that median (CUDA is synchronised before and after every step)
    peak MiB    CUDA: torch.cuda.max_memory_allocated() over building the model and the steps
                (weights, gradients, AdamW state, activations); CPU: n/a
    MFU         achieved FLOP/s / the peak FLOP/s of the chip

The step is the one `train_base.py` runs, not a look-alike: the model prepared by
`Runtime.prepare` for the precision (bf16: autocast in the blocks, fp32 weights), `lm_loss` (the LM
head fused into the logprob kernel, so the (B, T, V) logits never exist), backward, gradient
clipping, and AdamW from `model.configure_optimizer`. Batch size, sequence length, learning rate,
weight decay and clipping are read from `train_base.PRESETS`; the vocabulary size is the one
`data/prepare.py` trains for the preset, plus the 4 special tokens. Flags override each of them.
Tokens are random: speed does not depend on what they say. Left out: the script's per-step logging
(`loss.item()` and friends), held-out evaluation and sampling. `--kernels reference` swaps the
fused logprob kernel for plain logits + log-softmax, to see what the kernel costs in time.

FLOP accounting (nanoGPT's, after the PaLM paper, appendix B): a training step costs 6 N FLOPs per
token -- 2 N forward (one multiply-add per parameter) and 4 N backward (gradients with respect to
activations and to weights) -- with N the parameters that take part in matmuls: every parameter
except the position embeddings (the token embeddings count, as the tied LM head). Attention's own
matmuls (q k^T and att v) add 12 * n_layer * d_model * T FLOPs per token; they are shown as a second
"MFU +attn" column, not folded into the 6N MFU.

The denominator:
    CUDA  the chip's dense bf16 tensor-core peak, looked up from its name (`PEAK_BF16_TFLOPS`), or
          --peak-tflops. fp32 rows are divided by the same bf16 peak, so the two precisions are on
          one scale; they run with TF32 allowed for matmuls, as the stage scripts do on a GPU.
    CPU   the best fp32 GFLOP/s of n x n matmuls measured in the same run, at the same thread
          count (bf16 rows on the CPU are divided by that fp32 peak too).

How to run (from the repository root):

    python benchmarks/bench_train.py                                   # tiny preset, fp32, CPU
    python benchmarks/bench_train.py --threads 1,2                     # CPU: compare thread counts
    python benchmarks/bench_train.py --device cpu --presets smoke --dtypes fp32,bf16 --steps 2   # seconds
    python benchmarks/bench_train.py --device cuda --presets medium,small --dtypes fp32,bf16 --compile
    python benchmarks/bench_train.py --device cuda --peak-tflops 312   # a GPU not in the table

Targets: on an H100/H200, the small shape in bf16 should reach >= 40% MFU (6N). On a 2-core CPU the
tiny preset in fp32 should reach >= 50% of the matmul peak measured in the same run. On a machine
shared with other jobs both the peak and the step slow down: compare ratios, not absolute numbers,
and rerun if the two were measured under different loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere

from benchmarks.common import call_times  # noqa: E402
from minirlhf.kernels import KERNEL_IMPLS  # noqa: E402
from minirlhf.model import GPT, MODEL_PRESETS, GPTConfig  # noqa: E402
from minirlhf.runtime import setup_runtime  # noqa: E402
from minirlhf.tokenizer import SPECIAL_TOKENS  # noqa: E402
from minirlhf.training import lm_loss  # noqa: E402

# Dense (no 2:4 sparsity) bf16 tensor-core peaks with fp32 accumulation, in TFLOP/s, from NVIDIA's
# datasheets (which print the sparse figure, twice these). The first pattern that matches
# torch.cuda.get_device_name() wins, so the specific names come before the general ones.
PEAK_BF16_TFLOPS: list[tuple[str, str, float | None]] = [
    # NVL boards run at a lower clock than the SXM ones: not in the table, pass --peak-tflops
    (r"\bH[12]00 NVL\b", "H100/H200 NVL", None),
    (r"\bH100 PCIe\b", "H100 PCIe", 756.0),
    (r"\bH100\b", "H100 SXM", 989.0),          # "NVIDIA H100 80GB HBM3" is the SXM board
    (r"\bH200\b", "H200", 989.0),              # the H100 SXM's compute with more, faster memory
    (r"\bA100\b", "A100", 312.0),
    (r"\bL40S\b", "L40S", 362.0),
    (r"\bL4\b", "L4", 121.0),                  # \b: "L40" and "L40S" do not match
    (r"\bRTX 4090$", "RTX 4090", 165.0),       # $: not the "4090 D" or the laptop part
]

DESIGN_TARGET = "target on an H100/H200, small shape, bf16: >= 40% MFU"
CPU_TARGET = "target on a 2-core CPU, tiny preset, fp32: >= 50% of the fp32 matmul peak measured in the same run"


def lookup_peak_tflops(device_name: str) -> tuple[str, float | None]:
    """(label, dense bf16 TFLOP/s) of the first table entry whose pattern is in `device_name`;
    (device_name, None) when none matches or the entry has no figure."""
    for pattern, label, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return label, tflops
    return device_name, None


def load_script(name: str, path: str):
    """Import a top-level script (train_base.py, data/prepare.py) by its path: they are not a package.
    A module of that name already imported from that file (a test's `import train_base`) is reused."""
    path = os.path.join(ROOT, path)
    module = sys.modules.get(name)
    if module is not None and os.path.abspath(getattr(module, "__file__", "") or "") == path:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def preset_settings(preset: str) -> dict:
    """What train_base.py trains the preset with: its config defaults overlaid with its PRESETS entry,
    plus the vocabulary data/prepare.py trains for the preset (BPE tokens + special tokens)."""
    train_base = load_script("train_base", "train_base.py")
    prepare = load_script("data_prepare", "data/prepare.py")
    base = {f.name: f.default for f in dataclasses.fields(train_base.BaseConfig)}
    base.update(train_base.PRESETS[preset])
    data = {f.name: f.default for f in dataclasses.fields(prepare.PrepareConfig)}
    data.update(prepare.PRESETS[preset])
    return {**base, "vocab_size": data["vocab_size"] + len(SPECIAL_TOKENS)}


def matmul_peak_gflops(n: int, repeats: int, device: torch.device) -> float:
    """Best fp32 GFLOP/s over `repeats` n x n matmuls (the CPU denominator)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    torch.mm(a, b, out=out)  # warm-up
    best = min(call_times(lambda: torch.mm(a, b, out=out), device, repeats), default=float("inf"))
    return 2 * n**3 / best / 1e9


def training_step(model, train_model, optimizer, inputs, targets, grad_clip: float) -> None:
    """One step of train_base.py's loop: fused-head LM loss, backward, clip, AdamW."""
    loss = lm_loss(train_model, inputs, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    optimizer.step()


def measure(preset: str, dtype: str, compiled: bool, settings: dict, args) -> dict:
    """Build a fresh model for (preset, dtype), run warm-up steps, then time `args.steps` steps.
    Returns {"seconds": median step time, "peak_bytes": CUDA peak or None}."""
    runtime = setup_runtime(args.device, dtype, args.seed, kernels=args.kernels)  # seeds, TF32 on CUDA, precision
    device = runtime.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    config = GPTConfig(vocab_size=settings["vocab_size"], **MODEL_PRESETS[preset])
    model = runtime.prepare(GPT(config)).train()
    optimizer = model.configure_optimizer(settings["weight_decay"], settings["lr"])
    # torch.compile wraps the module; lm_loss calls the wrapper and reads the tied LM-head weight
    # through it, and the optimizer and clipping keep working on the original parameters
    train_model = torch.compile(model) if compiled else model
    batch, seq_len = settings["batch_size"], settings["seq_len"]
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # targets = inputs shifted by 1

    # warm-up: the allocator, AdamW's state, cuBLAS/Triton autotuning and torch.compile's compilation
    for _ in range(args.warmup):
        training_step(model, train_model, optimizer, inputs, targets, settings["grad_clip"])
    times = call_times(
        lambda: training_step(model, train_model, optimizer, inputs, targets, settings["grad_clip"]), device, args.steps
    )
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if compiled:
        torch._dynamo.reset()  # the next row compiles its own model from scratch
    return {"seconds": sorted(times)[len(times) // 2], "peak_bytes": peak}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS),
                        help="the preset, when --presets is not given")
    parser.add_argument("--presets", default=None, help="comma-separated presets, e.g. tiny,medium,small")
    parser.add_argument("--dtypes", default="fp32", help="comma-separated precisions: fp32, bf16")
    parser.add_argument("--compile", action="store_true", help="also time each row with torch.compile(model)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_argument("--batch-size", type=int, default=0, help="sequences per step (0: train_base's for the preset)")
    parser.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (0: train_base's for the preset)")
    parser.add_argument("--vocab-size", type=int, default=0,
                        help="vocabulary (0: data/prepare.py's for the preset + special tokens)")
    parser.add_argument("--kernels", default="auto", choices=KERNEL_IMPLS,
                        help="logprob kernel under lm_loss: auto (the scripts' default: Triton on CUDA, fused torch on "
                             "the CPU), reference (logits materialised, cuBLAS), fused, triton")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the MFU denominator in TFLOP/s (default: the GPU's bf16 peak from the table; "
                             "on the CPU the fp32 matmul peak measured now)")
    parser.add_argument("--threads", default=None, help="CPU: comma-separated torch.set_num_threads values")
    parser.add_argument("--matmul-size", type=int, default=2048, help="CPU: n of the n x n fp32 matmul peak")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and tokens")
    args = parser.parse_args(argv)
    for name in ("steps", "warmup", "batch_size", "seq_len", "vocab_size"):
        if getattr(args, name) < (1 if name == "steps" else 0):
            parser.error(f"--{name.replace('_', '-')} must be {'>= 1' if name == 'steps' else '>= 0'}")
    args.preset_list = (args.presets or args.preset).split(",")
    args.dtype_list = args.dtypes.split(",")
    for preset in args.preset_list:
        if preset not in MODEL_PRESETS:
            parser.error(f"unknown preset {preset!r} (expected one of {', '.join(MODEL_PRESETS)})")
    for dtype in args.dtype_list:
        if dtype not in ("fp32", "bf16"):
            parser.error(f"unknown precision {dtype!r} (expected fp32 or bf16)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    return args


def preset_shape(preset: str, args) -> dict:
    """The preset's training settings (flags override batch, sequence and vocabulary) and FLOPs per
    token; prints one line describing them."""
    settings = preset_settings(preset)
    for name in ("batch_size", "seq_len", "vocab_size"):
        if getattr(args, name):
            settings[name] = getattr(args, name)
    config = GPTConfig(vocab_size=settings["vocab_size"], **MODEL_PRESETS[preset])
    T = settings["seq_len"]
    if T > config.block_size:
        raise SystemExit(f"--seq-len {T} is longer than {preset}'s block_size {config.block_size}")
    n_params = sum(p.numel() for p in GPT(config).parameters())
    n_matmul = n_params - config.block_size * config.d_model  # nanoGPT's N: all but the position embeddings
    settings["flops_per_token"] = 6 * n_matmul
    settings["attention_flops_per_token"] = 12 * config.n_layer * config.d_model * T
    print(f"{preset}: {n_params / 1e6:.2f}M parameters (N = {n_matmul / 1e6:.2f}M without wpe), "
          f"L={config.n_layer}, d={config.d_model}, V={config.vocab_size}; batch {settings['batch_size']} x seq {T}; "
          f"FLOPs/token 6N = {6 * n_matmul / 1e6:.1f}M, attention +{settings['attention_flops_per_token'] / 1e6:.1f}M")
    return settings


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def main(argv=None) -> list[dict]:
    """Print the table; return its rows (for tests)."""
    args = parse_args(argv)
    cuda = args.device == "cuda"
    print(f"torch {torch.__version__}; device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else f" ({os.cpu_count()} logical CPUs)")
          + f"; logprob kernels: {args.kernels}")

    # ---- the denominator on CUDA: one figure for the whole run
    if cuda:
        label, table_tflops = lookup_peak_tflops(torch.cuda.get_device_name())
        if args.peak_tflops:
            peak_note = f"{args.peak_tflops:.0f} TFLOP/s (--peak-tflops)"
        elif table_tflops:
            peak_note = f"{table_tflops:.0f} TFLOP/s, the dense bf16 peak of the {label} (datasheet table)"
        else:
            peak_note = f"unknown GPU: pass --peak-tflops (no bf16 peak in the table for {label}); MFU not computed"
        print(f"MFU denominator: {peak_note}")
        if "fp32" in args.dtype_list:
            print("fp32 rows: TF32 on for matmuls (as the stage scripts run on a GPU); MFU against the same bf16 peak")
        tflops = args.peak_tflops or table_tflops
        gpu_peak = tflops * 1e12 if tflops else None
    else:
        source = (f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)" if args.peak_tflops
                  else f"the fp32 matmul peak measured now (n={args.matmul_size})")
        print(f"MFU denominator: {source}" + ("; bf16 rows against it too" if "bf16" in args.dtype_list else ""))

    # ---- what each preset trains with, and its FLOPs per token
    shapes = {preset: preset_shape(preset, args) for preset in args.preset_list}

    # ---- the rows: every eager row first, then the compiled ones (a compilation that hangs or
    # fails leaves the eager figures printed)
    plan = [(p, d, False) for p in args.preset_list for d in args.dtype_list]
    if args.compile:
        plan += [(p, d, True) for p in args.preset_list for d in args.dtype_list]
    thread_counts = [int(t) for t in args.threads.split(",")] if (args.threads and not cuda) else [None]
    unit, scale = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)
    rows = []
    for threads in thread_counts:
        if threads:
            torch.set_num_threads(threads)
        if cuda:
            peak = gpu_peak
        elif args.peak_tflops:
            peak = args.peak_tflops * 1e12
        else:  # measured at this thread count, just before the steps it is compared with
            peak = matmul_peak_gflops(args.matmul_size, repeats=5, device=torch.device("cpu")) * 1e9
            print(f"threads {torch.get_num_threads()}: peak {peak / 1e9:.1f} GFLOP/s")
        print(f"{'preset':>7} {'dtype':>5} {'compile':>7} {'threads':>7} {'batch':>5} {'seq':>4} {'tokens/s':>10} "
              f"{'step ms':>8} {'peak MiB':>8} {unit:>8} {'MFU 6N':>7} {'MFU +attn':>9}", flush=True)
        for preset, dtype, compiled in plan:
            shape = shapes[preset]
            row = {"preset": preset, "dtype": dtype, "compiled": compiled,
                   "threads": None if cuda else torch.get_num_threads()}
            start = (f"{preset:>7} {dtype:>5} {'yes' if compiled else 'no':>7} {row['threads'] or '-':>7} "
                     f"{shape['batch_size']:>5} {shape['seq_len']:>4}")
            try:
                result = measure(preset, dtype, compiled, shape, args)
            except torch.OutOfMemoryError:
                print(f"{start} out of memory", flush=True)
                continue
            tokens_per_s = shape["batch_size"] * shape["seq_len"] / result["seconds"]
            achieved = tokens_per_s * shape["flops_per_token"]
            with_attention = tokens_per_s * (shape["flops_per_token"] + shape["attention_flops_per_token"])
            row.update(tokens_per_s=tokens_per_s, step_s=result["seconds"], peak_bytes=result["peak_bytes"],
                       mfu=achieved / peak if peak else None, mfu_attention=with_attention / peak if peak else None)
            memory = f"{result['peak_bytes'] / 2**20:.0f}" if result["peak_bytes"] is not None else "n/a"
            print(f"{start} {tokens_per_s:>10.0f} {result['seconds'] * 1e3:>8.1f} {memory:>8} {achieved / scale:>8.1f} "
                  f"{percent(row['mfu']):>7} {percent(row['mfu_attention']):>9}", flush=True)
            rows.append(row)
            gc.collect()

    # ---- the targets, beside what this run measured for them
    if cuda:
        print(DESIGN_TARGET + _measured(rows, "small", "bf16"))
    else:
        print(DESIGN_TARGET + " (a GPU figure: run with --device cuda)")
        print(CPU_TARGET + _measured(rows, "tiny", "fp32"))
    return rows


def _measured(rows: list[dict], preset: str, dtype: str) -> str:
    """'; this run: 41.2% (eager), 48.0% (compiled)' for the rows of (preset, dtype), or ''."""
    found = [f"{row['mfu']:.1%} ({'compiled' if row['compiled'] else 'eager'}"
             + (f", {row['threads']} thread{'s' if row['threads'] > 1 else ''})" if row["threads"] else ")")
             for row in rows if row["preset"] == preset and row["dtype"] == dtype and row["mfu"] is not None]
    return f"; this run: {', '.join(found)}" if found else ""


if __name__ == "__main__":
    main()
