"""The whole pipeline, one command: data -> base -> SFT -> RM -> PPO -> evaluation.

    python run_all.py                       # preset tiny: the CPU demo, ~10 minutes on 2 cores
    python run_all.py --preset smoke --out-dir /tmp/out --data-dir /tmp/data     # seconds; for tests
    python run_all.py --preset medium --device cuda          # one GPU, bf16
    python run_all.py --preset smoke --nproc-per-node 2      # each training stage under torchrun (2 processes)
    python run_all.py --from-stage ppo      # keep data, base, SFT and RM; train PPO again, then evaluate
    python run_all.py --methods ppo,dpo,grpo,rloo,expert   # after the RM, train every method; evaluate them side by side

Each stage is its own script, run here as a subprocess exactly as you would run it by hand (the
scripts are the lessons; this file only calls them in order):

    stage  script             writes
    data   data/prepare.py    DATA_DIR/corpus.txt, sft.jsonl, *_prompts.jsonl, tokenizer.tiktoken
    base   train_base.py      OUT_DIR/base.pt          pretraining
    sft    train_sft.py       OUT_DIR/sft.pt           InstructGPT step 1
    rm     train_rm.py        OUT_DIR/rm.pt            InstructGPT step 2
    ppo    train_ppo.py       OUT_DIR/ppo.pt           InstructGPT step 3
    dpo    train_dpo.py       OUT_DIR/dpo.pt           (--methods) DPO on the RM's comparisons
    grpo   train_grpo.py      OUT_DIR/grpo.pt          (--methods) critic-free RL, group-normalised advantages
    rloo   train_grpo.py      OUT_DIR/rloo.pt          (--methods) critic-free RL, leave-one-out baseline
    expert train_expert.py    OUT_DIR/expert.pt        (--methods) expert iteration: best-of-n, distilled
    eval   evaluate.py        OUT_DIR/eval.md, eval.json, eval.png, eval_bon.png

--preset, --data-dir, --out-dir, --device, --dtype and --seed are passed to every stage that takes them.
With --nproc-per-node N > 1 the training stages (base, SFT, RM, PPO) run data-parallel, each launched
as `torchrun --standalone --nproc_per_node=N train_x.py ...`; data preparation and evaluation run in one
process.
A stage whose output already exists is skipped, and a stage interrupted after one of its interval
saves (its checkpoint marked unfinished) is continued with --resume - so an interrupted run goes on
where it stopped - unless --force or --from-stage says otherwise; once a stage runs, every later stage runs too,
because its input has changed (the methods after the RM depend on it, not on each other). The first stage that fails stops the pipeline, and its error is
repeated at the end. Every stage's full output is also kept in OUT_DIR/logs/<stage>.log, appended
after a header line with the date and the command: an earlier run's log is never overwritten.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

from minirlhf.checkpoint import load_checkpoint
from minirlhf.cli import UserError, option, parse_config, print_config, run_main
from minirlhf.eval_report import print_summary  # the table evaluate.py prints, printed again at the end
from minirlhf.metrics import format_duration

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Stage:
    name: str
    script: str               # relative to the repository root
    outputs: tuple[str, ...]  # files that say the stage is done: in DATA_DIR for "data", else OUT_DIR
    plots: tuple[str, ...]    # its figures, in OUT_DIR
    common_flags: tuple[str, ...] = ("preset", "data_dir", "out_dir", "device", "dtype", "seed")
    data_parallel: bool = False  # a training stage: runs under torchrun with --nproc-per-node > 1
    extra_flags: tuple[str, ...] = ()   # flags of this stage alone
    method: bool = False                # an RL method after the RM: runs when --methods names it


STAGES = (
    Stage("data", "data/prepare.py", ("corpus.txt", "sft.jsonl", "rm_prompts.jsonl", "ppo_prompts.jsonl",
                                      "eval_prompts.jsonl", "tokenizer.tiktoken", "manifest.json"), (),
          common_flags=("preset", "data_dir")),
    Stage("base", "train_base.py", ("base.pt",), ("base_curves.png",), data_parallel=True),
    Stage("sft", "train_sft.py", ("sft.pt",), ("sft_curves.png",), data_parallel=True),
    Stage("rm", "train_rm.py", ("rm.pt",), ("rm_curves.png", "rm_scatter.png"), data_parallel=True),
    Stage("ppo", "train_ppo.py", ("ppo.pt",), ("ppo_curves.png", "ppo_overopt.png"), data_parallel=True, method=True),
    Stage("dpo", "train_dpo.py", ("dpo.pt",), ("dpo_curves.png",), data_parallel=True, method=True),
    Stage("grpo", "train_grpo.py", ("grpo.pt",), ("grpo_curves.png",), data_parallel=True, method=True),
    Stage("rloo", "train_grpo.py", ("rloo.pt",), ("rloo_curves.png",), data_parallel=True, method=True,
          extra_flags=("--advantage", "rloo")),
    Stage("expert", "train_expert.py", ("expert.pt",), ("expert_curves.png",), data_parallel=True, method=True),
    Stage("eval", "evaluate.py", ("eval.json", "eval.md"), ("eval.png", "eval_bon.png")),
)
STAGE_NAMES = [stage.name for stage in STAGES]
METHOD_NAMES = [stage.name for stage in STAGES if stage.method]

# The numbers each stage's table row shows: (metric in the checkpoint's summary, label), those present.
HEADLINES = {
    "base": [("loss/val", "held-out loss")],
    "sft": [("loss/val", "held-out loss"), ("gold/sample", "gold")],
    "rm": [("accuracy/val", "held-out pair accuracy"), ("gold/spearman", "Spearman with gold")],
    **{method: [("eval/gold", "held-out gold"), ("eval/kl", "KL"), ("eval/gold_gain_sd", "gain in SFT sd")]
       for method in ("ppo", "dpo", "grpo", "rloo", "expert")},
}


@dataclass
class RunAllConfig:
    preset: str = option("tiny", "size preset passed to every stage: smoke (tests), tiny (CPU), medium (~26M, one GPU),"
                                 " small (GPU)")
    data_dir: str = option("data", "where the data files go")
    out_dir: str = option("out", "where the checkpoints, logs and plots go")
    device: str = option("auto", "auto, cpu or cuda", choices=["auto", "cpu", "cuda"])
    dtype: str = option("auto", "precision of every stage: auto (bf16 on a GPU that has it, else fp32), fp32 or bf16",
                         choices=["auto", "fp32", "bf16"])
    nproc_per_node: int = option(1, "processes per training stage (>1: torchrun, data parallel; one per GPU on CUDA)", min=1)
    seed: Optional[int] = option(None, "random seed for every training stage (none: each stage's default)")
    force: bool = option(False, "run every stage, even those whose output exists")
    from_stage: str = option("", "run this stage and the later ones even if their output exists", choices=["", *STAGE_NAMES])
    until: str = option("eval", "stop after this stage", choices=STAGE_NAMES)
    methods: str = option("ppo", f"the methods trained after the RM, comma-separated, of {', '.join(METHOD_NAMES)}")
    debug: bool = option(False, "show tracebacks")


PRESETS = {"smoke": {}, "tiny": {}, "medium": {}, "small": {}}  # the preset is passed on: each stage has its own


def stage_command(stage: Stage, cfg) -> list[str]:
    """`python <script> --preset P --data-dir D ...`: the command a student would type (`python -m
    torch.distributed.run --standalone --nproc_per_node=N <script> ...`, i.e. torchrun, for a training
    stage with --nproc-per-node N > 1)."""
    command = [sys.executable, os.path.join(ROOT, stage.script)]
    if stage.data_parallel and cfg.nproc_per_node > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc_per_node}"]
    for name in stage.common_flags:
        value = getattr(cfg, name)
        if value is not None:
            command += ["--" + name.replace("_", "-"), str(value)]
    return command + list(stage.extra_flags)


def output_paths(stage: Stage, cfg) -> list[str]:
    folder = cfg.data_dir if stage.name == "data" else cfg.out_dir
    return [os.path.join(folder, name) for name in stage.outputs]


def unfinished(stage: Stage, cfg) -> bool:
    """True when the stage's checkpoint is an interval save of an interrupted run (`"finished": False`:
    Ctrl-C or a crash after a `--save-every` save): run_all then continues it with `--resume`."""
    path = output_paths(stage, cfg)[0]
    if not path.endswith(".pt") or not os.path.exists(path):
        return False
    try:
        return load_checkpoint(path, unfinished_ok=True).get("finished") is False
    except UserError:
        return False   # a damaged file: the stage's own run (or the next stage) says what is wrong


def run_stage(stage: Stage, cfg, resume: bool = False) -> None:
    """Run one stage's script (with `--resume` to continue an interrupted run), relaying its output
    line by line and keeping it in OUT_DIR/logs/.

    A non-zero exit raises `UserError` with the stage's last line (its `error: ...` line, or the last
    line of a traceback): the pipeline stops there, and the message is not lost under pages of logs.
    """
    script = os.path.join(ROOT, stage.script)
    if not os.path.exists(script):
        raise UserError(f"stage {stage.name}: {script} not found")
    command = stage_command(stage, cfg) + (["--resume"] if resume else [])
    script_at = command.index(script)
    launcher = " ".join(["torchrun", *command[3:script_at]]) if script_at > 1 else "python"
    print(f"\n=== {stage.name}: {launcher} {' '.join([stage.script, *command[script_at + 1:]])}", flush=True)
    log_path = os.path.join(cfg.out_dir, "logs", f"{stage.name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    last_line = ""
    # PYTHONUNBUFFERED: the child's prints reach us (and the screen) as they happen, not in 8 kB chunks
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a", encoding="utf-8") as log, \
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace") as process:  # same working directory: same relative paths
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")   # below the earlier runs'
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            last_line = line.strip() or last_line
    if process.returncode != 0:
        raise UserError(f"stage {stage.name} failed (exit status {process.returncode}): {last_line} "
                        f"[full output: {log_path}]")
    missing = [path for path in output_paths(stage, cfg) if not os.path.exists(path)]
    if missing:
        raise UserError(f"stage {stage.name} finished but did not write {', '.join(missing)} [output: {log_path}]")


def headline(stage: Stage, cfg) -> str:
    """A few numbers that say how the stage went, read from what it wrote ("?" if it can't be read:
    a skipped stage's damaged output is for the next stage to report, with its own message)."""
    try:
        return read_headline(stage, cfg)
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return "?"


def read_headline(stage: Stage, cfg) -> str:
    if stage.name == "data":
        with open(os.path.join(cfg.data_dir, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        return (f"{manifest.get('corpus_tokens', 0):,} corpus tokens, {manifest.get('sft_examples', '?')} "
                f"demonstrations, vocab {manifest.get('vocab_size', '?')}")
    if stage.name == "eval":
        with open(os.path.join(cfg.out_dir, "eval.json"), encoding="utf-8") as f:
            report = json.load(f)
        parts = ["gold " + ", ".join(f"{name} {s['gold/sample']:.2f}" for name, s in report["models"].items())]
        parts += [f"{w['model']} vs {w['baseline']} win rate {w['win_rate']:.2f}" for w in report["win_rates"][:2]]
        return "; ".join(parts)
    metrics = load_checkpoint(output_paths(stage, cfg)[0])["metrics"]
    shown = [f"{label} {metrics[key]:.3f}" for key, label in HEADLINES.get(stage.name, []) if key in metrics]
    return ", ".join(shown) or "-"


def print_table(rows: list[tuple[str, str, str, str]], total_seconds: float) -> None:
    header = ("stage", "run", "time", "headline")
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(3)]
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[3])
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    print(f"total {format_duration(total_seconds)}")


def selected_stages(cfg) -> list[Stage]:
    """The stages this run goes through, in order: up to --until, the methods among them only if
    --methods names them."""
    methods = [name.strip() for name in cfg.methods.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHOD_NAMES]
    if unknown:
        raise UserError(f"--methods: unknown method {unknown[0]!r} (choose from {', '.join(METHOD_NAMES)})")
    last = STAGE_NAMES.index(cfg.until)
    return [stage for stage in STAGES[:last + 1] if not stage.method or stage.name in methods]


def main() -> None:
    cfg = parse_config(RunAllConfig, PRESETS, description=__doc__)
    print_config(cfg, "run_all")
    start = time.time()
    stages = selected_stages(cfg)
    first_forced = STAGE_NAMES.index(cfg.from_stage) if cfg.from_stage else len(STAGES)
    rows, plots = [], []
    upstream_ran = False  # once a stage runs, the later ones must too: their inputs changed
    method_ran = False    # ... except that the methods depend on the RM, not on each other
    for stage in stages:
        index = STAGE_NAMES.index(stage.name)
        done = all(os.path.exists(path) for path in output_paths(stage, cfg))
        rerun = cfg.force or index >= first_forced or upstream_ran or (method_ran and not stage.method)
        resume = not rerun and done and unfinished(stage, cfg)   # an interrupted stage goes on where it stopped
        if rerun or not done or resume:
            t0 = time.time()
            run_stage(stage, cfg, resume=resume)
            method_ran = method_ran or stage.method
            upstream_ran = upstream_ran or not stage.method
            status, seconds = "ran", format_duration(time.time() - t0)
        else:
            print(f"=== {stage.name}: skipped, {', '.join(output_paths(stage, cfg))} exist (--force to re-run)")
            status, seconds = "skipped", "-"
        rows.append((stage.name, status, seconds, headline(stage, cfg)))
        plots += [path for path in (os.path.join(cfg.out_dir, p) for p in stage.plots) if os.path.exists(path)]

    print_table(rows, time.time() - start)
    if plots:
        print("plots: " + ", ".join(plots))
    eval_json = os.path.join(cfg.out_dir, "eval.json")
    if stages[-1].name == "eval" and os.path.exists(eval_json):
        with open(eval_json, encoding="utf-8") as f:
            report = json.load(f)
        print(f"\nevaluation on {report['prompts']} held-out prompts (details: "
              f"{os.path.join(cfg.out_dir, 'eval.md')}):")
        print_summary(report["models"], report["win_rates"])


if __name__ == "__main__":
    run_main(main)
