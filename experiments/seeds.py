"""The whole pipeline on several seeds, and every headline number as mean and range over them.

One run on one machine is an anecdote: PPO's win rate against SFT moves by a few points from seed
to seed. This script runs `run_all.py` once per seed (the data are shared: they are the world's,
not the seed's), then reads each run's eval.json and checkpoints and writes

    OUT_ROOT/seeds.md     a table per topic: mean [min, max] over the seeds
    OUT_ROOT/seeds.json   every seed's numbers and the summary

    python experiments/seeds.py                                   # tiny preset, seeds 1,2,3, PPO: ~30 min on 2 cores
    python experiments/seeds.py --methods ppo,dpo,grpo,rloo,expert   # every method after the RM
    python experiments/seeds.py --jobs 3                          # the seeds at once, a thread each
    python experiments/seeds.py --summarize-only                  # re-read finished runs, write the tables again
    python experiments/seeds.py --preset smoke --out-root /tmp/s  # seconds; for tests

A seed whose run already finished is skipped (run_all.py skips what exists), so an interrupted
sweep continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from minirlhf.checkpoint import atomic_write, load_checkpoint  # noqa: E402
from minirlhf.cli import UserError, option, parse_config, print_config, run_main  # noqa: E402


@dataclass
class SeedsConfig:
    preset: str = option("tiny", "preset of every run", choices=["smoke", "tiny", "medium", "small"])
    seeds: str = option("1,2,3", "comma-separated seeds, one pipeline each")
    methods: str = option("ppo", "methods trained after the RM (run_all.py --methods)")
    out_root: str = option("out/seeds", "one folder per seed goes here, and the tables")
    data_dir: str = option("data", "the (shared) data folder")
    device: str = option("auto", "auto, cpu or cuda", choices=["auto", "cpu", "cuda"])
    jobs: int = option(1, "seeds run at once (each with its share of the cores' threads)", min=1)
    summarize_only: bool = option(False, "do not run anything: summarise finished runs")
    debug: bool = option(False, "show tracebacks")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if not seeds:
        raise UserError("--seeds: give at least one seed")
    return seeds


def seed_numbers(out_dir: str) -> dict[str, float]:
    """The headline numbers of one finished run, flat: {"ppo/gold": ..., "rm/accuracy_val": ...}."""
    with open(os.path.join(out_dir, "eval.json"), encoding="utf-8") as f:
        report = json.load(f)
    numbers: dict[str, float] = {}
    for model, summary in report["models"].items():
        for key, name in (("gold/sample", "gold"), ("kl_to_sft", "kl_to_sft"), ("minutes", "minutes"),
                          ("samples_drawn", "samples_drawn"), ("rm/gold_accuracy", "rm_gold_accuracy"),
                          ("eos_rate/sample", "eos_rate")):
            if summary.get(key) is not None:
                numbers[f"{model}/{name}"] = summary[key]
    for win in report["win_rates"]:
        if win["baseline"] == "sft":
            numbers[f"{win['model']}/win_rate_vs_sft"] = win["win_rate"]
            numbers[f"{win['model']}/win_rate_vs_sft_excl_ties"] = win["win_rate_excl_ties"]
            numbers[f"{win['model']}/tie_rate_vs_sft"] = win["tie_rate"]
    sft_sd = None
    if "sft" in report["models"]:
        sft_sd = report["models"]["sft"]["gold/sample_se"] * math.sqrt(report["models"]["sft"]["samples"])
    for model, summary in report["models"].items():
        if sft_sd and model not in ("base", "sft"):   # the gain in SFT standard deviations
            numbers[f"{model}/gold_gain_sd"] = (summary["gold/sample"] - report["models"]["sft"]["gold/sample"]) / sft_sd
    bon = report.get("best_of_n")
    if bon:
        for n, gold, kl in zip(bon["n"], bon["gold"], bon["kl"]):
            if n in (4, 16):
                numbers[f"best_of_{n}/gold_on_bon_prompts"] = gold
                numbers[f"best_of_{n}/kl"] = kl
        for model, point in (report.get("methods_on_bon_prompts") or {}).items():
            numbers[f"{model}/gold_on_bon_prompts"] = point["gold"]
            numbers[f"{model}/kl_on_bon_prompts"] = point["kl"]
    rm_path = os.path.join(out_dir, "rm.pt")
    if os.path.exists(rm_path):
        metrics = load_checkpoint(rm_path, kind="rm")["metrics"]
        for key in ("accuracy/val", "gold/accuracy", "gold/accuracy/correctness", "gold/accuracy/form"):
            if metrics.get(key) is not None:
                numbers[f"rm/{key.replace('/', '_')}"] = metrics[key]
    return numbers


def summarise(per_seed: dict[int, dict[str, float]]) -> dict[str, dict]:
    """{number: {"mean", "min", "max", "n"}} over the seeds that have it."""
    names = sorted({name for numbers in per_seed.values() for name in numbers})
    summary = {}
    for name in names:
        values = [numbers[name] for numbers in per_seed.values() if numbers.get(name) is not None]
        summary[name] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}
    return summary


def cell(stat: dict | None, digits: int = 3) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.{digits}f} [{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"


def markdown(summary: dict, seeds: list[int], cfg) -> str:
    models = [m for m in ("base", "sft", "ppo", "dpo", "grpo", "rloo", "expert") if f"{m}/gold" in summary]
    lines = [f"# {len(seeds)} seeds ({', '.join(map(str, seeds))}), preset {cfg.preset}", "",
             "Each cell: mean [min, max] over the seeds. Command: `python experiments/seeds.py --preset "
             f"{cfg.preset} --seeds {cfg.seeds} --methods {cfg.methods}`.", "",
             "| model | gold | gain (SFT sd) | win rate vs SFT | excl. ties | tie rate | KL to SFT | minutes | samples drawn |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        row = [summary.get(f"{model}/{name}") for name in ("gold", "gold_gain_sd", "win_rate_vs_sft",
                                                            "win_rate_vs_sft_excl_ties", "tie_rate_vs_sft",
                                                            "kl_to_sft")]
        lines.append(f"| {model} | " + " | ".join(cell(s) for s in row) + f" | {cell(summary.get(f'{model}/minutes'), 1)}"
                     f" | {cell(summary.get(f'{model}/samples_drawn'), 0)} |")
    bon_rows = [(name, summary.get(f"{name}/gold_on_bon_prompts"), summary.get(f"{name}/kl_on_bon_prompts")
                 or summary.get(f"{name}/kl")) for name in ("best_of_4", "best_of_16", *models)]
    bon_rows = [row for row in bon_rows if row[1] is not None]
    if bon_rows:
        lines += ["", "On the best-of-n prompts (gold of the RM's pick among n SFT samples, and each method there):", "",
                  "| policy | gold | KL to SFT |", "|---|---|---|"]
        lines += [f"| {name} | {cell(gold)} | {cell(kl)} |" for name, gold, kl in bon_rows]
    rm_rows = [(label, summary.get(key)) for label, key in (
        ("held-out accuracy against the (noisy) labeler", "rm/accuracy_val"),
        ("held-out accuracy against the noiseless gold labeler", "rm/gold_accuracy"),
        ("  on pairs that differ in correctness", "rm/gold_accuracy_correctness"),
        ("  on equally correct pairs (form)", "rm/gold_accuracy_form")) if summary.get(key)]
    if rm_rows:
        lines += ["", "The reward model:", "", "| | accuracy |", "|---|---|"]
        lines += [f"| {label} | {cell(stat)} |" for label, stat in rm_rows]
    return "\n".join(lines) + "\n"


def run_seeds(cfg, seeds: list[int]) -> None:
    """`run_all.py` once per seed, `cfg.jobs` at a time. The data are prepared first, once: runs
    started together would otherwise all write the same data folder."""
    common = ["--preset", cfg.preset, "--data-dir", cfg.data_dir]
    if subprocess.run([sys.executable, os.path.join(ROOT, "run_all.py"), *common, "--until", "data"]).returncode:
        raise UserError("preparing the data failed")
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    pending, running = list(seeds), []
    while pending or running:
        while pending and len(running) < cfg.jobs:
            seed = pending.pop(0)
            out_dir = os.path.join(cfg.out_root, f"seed_{seed}")
            os.makedirs(out_dir, exist_ok=True)
            command = [sys.executable, os.path.join(ROOT, "run_all.py"), *common, "--seed", str(seed),
                       "--out-dir", out_dir, "--device", cfg.device, "--methods", cfg.methods]
            print(f"##### seed {seed}: {' '.join(command[1:])}" + (f" (output: {out_dir}/seed.log)" if cfg.jobs > 1
                                                                   else ""), flush=True)
            log = open(os.path.join(out_dir, "seed.log"), "w") if cfg.jobs > 1 else None
            env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if cfg.jobs > 1 else None
            running.append((seed, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT if log else None,
                                                   env=env), log))
        seed, process, log = running.pop(0)
        if process.wait() != 0:
            raise UserError(f"the run of seed {seed} failed: see {os.path.join(cfg.out_root, f'seed_{seed}', 'logs')}")
        if log:
            log.close()


def main() -> None:
    cfg = parse_config(SeedsConfig, {}, description=__doc__.split("\n\n")[0])
    print_config(cfg, "seeds")
    seeds = parse_seeds(cfg.seeds)
    if not cfg.summarize_only:
        run_seeds(cfg, seeds)
    per_seed = {}
    for seed in seeds:
        out_dir = os.path.join(cfg.out_root, f"seed_{seed}")
        if not os.path.exists(os.path.join(out_dir, "eval.json")):
            raise UserError(f"{out_dir}/eval.json not found: seed {seed} has not finished (run without --summarize-only)")
        per_seed[seed] = seed_numbers(out_dir)
    summary = summarise(per_seed)
    os.makedirs(cfg.out_root, exist_ok=True)
    with atomic_write(os.path.join(cfg.out_root, "seeds.json"), "w") as f:
        json.dump({"seeds": per_seed, "summary": summary, "config": vars(cfg)}, f, indent=2)
    text = markdown(summary, seeds, cfg)
    with atomic_write(os.path.join(cfg.out_root, "seeds.md"), "w") as f:
        f.write(text)
    print("\n" + text)
    print(f"wrote {os.path.join(cfg.out_root, 'seeds.md')}, {os.path.join(cfg.out_root, 'seeds.json')}")


if __name__ == "__main__":
    run_main(main)
