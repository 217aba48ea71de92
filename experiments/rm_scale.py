"""How big must a reward model be? Gao et al. 2022's over-optimisation scaling, on the tiny world.

Gao, Schulman and Hilton ("Scaling laws for reward model overoptimization", 2022) kept one policy
and one gold reward model fixed and trained proxy RMs from 3M to 3B parameters on the same
gold-labelled comparisons. Optimising each proxy harder - best-of-n with larger n, or longer RL -
its own score keeps rising while the gold score rises, peaks and falls. With d = sqrt(KL to the
initial policy), the gold gain follows

    best-of-n:  R_bon(d) = d (alpha - beta d)          RL:  R_RL(d) = d (alpha - beta log d)

and a bigger proxy has a larger alpha and a smaller beta: its gold peak comes later and higher.
Here the gold RM is a program (`minirlhf/labeler.py`), so the whole ladder fits on a laptop.

The ladder. The policy stays the normal run's SFT model (RUN_DIR/sft.pt), and every RM trains on
the comparisons that run's train_rm.py sampled from it and had the gold labeler rank
(RUN_DIR/rm_comparisons.jsonl): the same data for every size, as in Gao et al. Each rung is

    train_base.py --n-layer L --d-model D --n-head H   a base model of that size, on the corpus
    train_sft.py  --init that base                     the same demonstrations and recipe
    train_rm.py   --init that SFT --comparisons FILE   the RM, from the same comparisons
    train_ppo.py  --init RUN_DIR/sft.pt --reward-model that RM     (--with-ppo)

each stage run as the command a student would type (OUT_DIR/<size>/logs/ keeps its output). Gao
et al. took each proxy from a pretrained model of its size; train_rm.py starts an RM from an SFT
checkpoint (InstructGPT's recipe: the SFT model is also the sampler its normalisation is fitted
on), so each rung gets its own SFT model first. The SFT step is short (4 epochs over 1,080
demonstrations, a quarter of the base's time) and is what the pipeline's own rm.pt went through,
so the rung of the run's own size is exactly the pipeline's RM recipe. (Each RM is normalised on
samples of its own SFT model, not of the policy: best-of-n and the accuracies do not depend on
that; PPO's reward scale does, slightly.)

Reuse. A base model already trained for a size is never trained again: OUT_DIR/<size>/base.pt is
reused when its architecture and recipe match, and a rung of the run's own size uses RUN_DIR/base.pt
and RUN_DIR/sft.pt (the policy) directly. An SFT model, RM or PPO run whose inputs are unchanged
is reused too, so an interrupted ladder continues where it stopped; once a stage runs, the
later stages of that rung run again. Delete a rung's folder to redo it.

Measured for each size, on one shared set of SFT samples (BON_MAX_N samples of each of BON_PROMPTS
held-out prompts, sampled once and scored by every RM and by the gold labeler):
- the RM's held-out accuracy against the noiseless gold labeler (train_rm.py's held-out comparisons:
  overall, on pairs that differ in correctness vs in form, per family), and the same on the samples;
- best-of-n for n = 1, 2, 4, ..., BON_MAX_N (gold and proxy), Gao's best-of-n fit, its fitted peak;
- the KL-regularised optimum pi_SFT exp(RM / beta) over the same samples (what PPO's objective is after);
- with --with-ppo, PPO against that RM with a weak fixed KL penalty (so each run travels far in
  KL), its held-out gold along training, and Gao's RL fit.

Writes OUT_DIR/rm_scale.png (gold vs sqrt(KL), one colour per size; the proxy; accuracy vs size;
alpha and beta vs size), OUT_DIR/rm_scale.json (every number, one entry per size),
OUT_DIR/rm_scale.md (the tables), OUT_DIR/samples.jsonl (the shared samples and their gold scores).

    python run_all.py --until rm                                   # the run the ladder starts from
    python experiments/rm_scale.py                                 # 1.1M, 3.4M, 11M: ~20 min on 2 cores (estimate)
    python experiments/rm_scale.py --with-ppo                      # + a PPO run per size: ~+11 min (estimate)
    python experiments/rm_scale.py --preset gpu --device cuda --with-ppo    # 3.4M to 86M on one GPU (unmeasured)
    python experiments/rm_scale.py --preset smoke --run-dir /tmp/out --data-dir /tmp/data --out-dir /tmp/ladder
    python experiments/rm_scale.py --sizes 2x128x4 4x256x4        # any ladder: LAYERSxWIDTHxHEADS
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from minirlhf import labeler  # noqa: E402
from minirlhf.checkpoint import atomic_write, load_checkpoint, load_policy  # noqa: E402
from minirlhf.cli import UserError, option, parse_config, print_config, run_main  # noqa: E402
from minirlhf.data import evenly_spaced, read_prompts  # noqa: E402
from minirlhf.labeling import RankedComparison  # noqa: E402
from minirlhf.metrics import format_duration, read_metrics  # noqa: E402
from minirlhf.plots import save_figure  # noqa: E402
from minirlhf.reward import gold_agreement, load_reward_model  # noqa: E402
from minirlhf.runtime import setup_runtime  # noqa: E402
from minirlhf.stats import (best_of_n_curve, best_of_n_kl, fit_gao, fit_log_linear, gao_curve, gao_peak,  # noqa: E402
                            kl_regularised_optimum_curve, sqrt_kl)
from minirlhf.tokenizer import Tokenizer  # noqa: E402
from minirlhf.training import sample_responses  # noqa: E402


@dataclass
class RMScaleConfig:
    preset: str = option("cpu", "ladder: smoke (tests), cpu (three sizes around the tiny 3.4M), gpu (3.4M to 86M)")
    sizes: list[str] = option([], "the rungs, LAYERSxWIDTHxHEADS each, smallest first")
    stage_preset: str = option("tiny", "preset every stage script gets (training recipe, block size)",
                               choices=["smoke", "tiny", "medium", "small"])
    run_dir: str = option("out", "the normal run: its sft.pt (the policy), rm_comparisons.jsonl and base.pt")
    data_dir: str = option("data", "the data folder (corpus, prompts, tokenizer)")
    out_dir: str = option("out/rm_scale", "one folder per size goes here, and the report")
    base_steps: int = option(0, "pretraining steps of every base (0: the stage preset's)", min=0)
    bon_prompts: int = option(32, "held-out prompts for best-of-n, evenly spaced (0: all)", min=0)
    bon_max_n: int = option(32, "SFT samples per prompt, the largest n (a power of 2)", min=2)
    max_new_tokens: int = option(48, "response budget of the shared samples", min=1)
    temperature: float = option(1.0, "sampling temperature of the shared samples", min=1e-3)
    with_ppo: bool = option(False, "also run PPO against each RM (the RL fit)")
    ppo_updates: int = option(0, "PPO updates per size (0: the stage preset's)", min=0)
    ppo_kl_coef: float = option(0.1, "PPO's fixed KL penalty: weak, so that each run travels far enough in KL to show "
                                     "the peak", min=0.0)
    ppo_eval_every: int = option(4, "PPO's held-out evaluation every N updates: the points of the RL fit", min=1)
    device: str = option("auto", "auto, cpu or cuda", choices=["auto", "cpu", "cuda"])
    dtype: str = option("auto", "precision of every stage: auto, fp32 or bf16", choices=["auto", "fp32", "bf16"])
    seed: int = option(1337, "random seed of every stage and of the shared samples")
    debug: bool = option(False, "show tracebacks")


PRESETS = {
    "smoke": dict(sizes=["1x32x2", "2x64x2"], stage_preset="smoke", bon_prompts=6, bon_max_n=8, max_new_tokens=16,
                  ppo_updates=2, ppo_eval_every=1),
    "cpu": dict(sizes=["2x192x4", "4x256x4", "6x384x6"]),                                # 1.1M, 3.4M, 11.0M
    "gpu": dict(sizes=["4x256x4", "6x384x6", "8x512x8", "12x768x12"], stage_preset="medium",  # 3.4M ... 86M
                bon_prompts=0, bon_max_n=64),
}
OPTIMUM_BETAS = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)   # KL coefficients of the optimum, in RM units (SFT sd)


def parse_sizes(texts: list[str]) -> list[dict]:
    """["4x256x4", ...] -> [{"name": "L4_d256", "n_layer": 4, "d_model": 256, "n_head": 4}, ...]."""
    sizes = []
    for text in texts:
        try:
            n_layer, d_model, n_head = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise UserError(f"--sizes {text!r}: expected LAYERSxWIDTHxHEADS, e.g. 4x256x4") from None
        if min(n_layer, d_model, n_head) < 1 or d_model % n_head:
            raise UserError(f"--sizes {text!r}: every number must be positive and the width divisible by the heads")
        sizes.append({"name": f"L{n_layer}_d{d_model}", "n_layer": n_layer, "d_model": d_model, "n_head": n_head})
    if not sizes:
        raise UserError("--sizes: give at least one size")
    return sizes


# ----------------------------------------------------------------------------------------------
# The rungs: each stage as a subprocess, skipped when its checkpoint is already what it would write


def run_stage(label: str, command: list[str], log_path: str) -> None:
    """Run one stage script, relaying its output and keeping it in `log_path`; a failure is a
    one-line UserError with the script's last line (its `error: ...`)."""
    shown = [os.path.relpath(part, ROOT) if part.startswith(ROOT) else part for part in command[1:]]
    print(f"\n=== {label}: python {' '.join(shown)}", flush=True)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    last_line = ""
    with open(log_path, "w", encoding="utf-8") as log, \
            subprocess.Popen(command, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, errors="replace") as process:
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
            last_line = line.strip() or last_line
    if process.returncode != 0:
        raise UserError(f"{label} failed (exit status {process.returncode}): {last_line} [full output: {log_path}]")


def matches(path: str, kind: str, tokenizer, expected: dict) -> bool:
    """Whether `path` is a `kind` checkpoint of this tokenizer whose recorded settings are `expected`:
    {"model_config.n_layer": 4, "train_config.init": "out/sft.pt", ...}."""
    if not os.path.exists(path):
        return False
    try:
        ckpt = load_checkpoint(path, kind=kind, tokenizer_identity=tokenizer.identity)
    except UserError as error:
        print(f"note: {error}; it is trained again")
        return False
    return all(ckpt[key.split(".")[0]].get(key.split(".")[1]) == value for key, value in expected.items())


def build_rung(cfg, size: dict, tokenizer) -> dict:
    """Base, SFT and RM (and PPO) of one size, trained or reused. Returns the checkpoint paths and
    where each came from ("trained", "reused", or "run" for the normal run's own files)."""
    folder = os.path.join(cfg.out_dir, size["name"])
    script = lambda name: [sys.executable, os.path.join(ROOT, name)]   # noqa: E731
    common = ["--preset", cfg.stage_preset, "--data-dir", cfg.data_dir, "--device", cfg.device, "--dtype", cfg.dtype,
              "--seed", str(cfg.seed)]
    arch = {f"model_config.{name}": size[name] for name in ("n_layer", "d_model", "n_head")}
    recipe = {"train_config.preset": cfg.stage_preset, **({"train_config.max_steps": cfg.base_steps}
                                                           if cfg.base_steps else {})}
    policy, comparisons = os.path.join(cfg.run_dir, "sft.pt"), os.path.join(cfg.run_dir, "rm_comparisons.jsonl")
    label = f"{size['name']} ({size['n_layer']} layers, d_model {size['d_model']})"
    rung = {"folder": folder}
    ran = False   # once a stage of this rung runs, the later ones must run too: their input changed

    # -- the base model: this folder's, or the normal run's when it is this size, or trained now
    base = os.path.join(folder, "base.pt")
    if matches(base, "base", tokenizer, {**arch, **recipe}):
        rung["base"], rung["base_from"] = base, "reused"
    elif matches(os.path.join(cfg.run_dir, "base.pt"), "base", tokenizer, {**arch, **recipe}) and \
            matches(policy, "sft", tokenizer, arch):
        rung["base"], rung["base_from"] = os.path.join(cfg.run_dir, "base.pt"), "run"
    else:
        steps = ["--max-steps", str(cfg.base_steps)] if cfg.base_steps else []
        run_stage(f"{label}: base", script("train_base.py") + common + [
            "--out-dir", folder, "--n-layer", str(size["n_layer"]), "--d-model", str(size["d_model"]),
            "--n-head", str(size["n_head"]), *steps], os.path.join(folder, "logs", "base.log"))
        rung["base"], rung["base_from"], ran = base, "trained", True

    # -- SFT of that base (the normal run's base has its SFT already: the policy)
    if rung["base_from"] == "run":
        rung["sft"], rung["sft_from"] = policy, "run"
    elif not ran and matches(os.path.join(folder, "sft.pt"), "sft", tokenizer,
                             {**arch, "train_config.init": rung["base"], "train_config.preset": cfg.stage_preset}):
        rung["sft"], rung["sft_from"] = os.path.join(folder, "sft.pt"), "reused"
    else:
        run_stage(f"{label}: SFT", script("train_sft.py") + common + ["--out-dir", folder, "--init", rung["base"]],
                  os.path.join(folder, "logs", "sft.log"))
        rung["sft"], rung["sft_from"], ran = os.path.join(folder, "sft.pt"), "trained", True

    # -- the RM: that SFT's trunk, trained on the run's comparisons (the same file for every size)
    rm = os.path.join(folder, "rm.pt")
    expected = {"train_config.init": rung["sft"], "train_config.comparisons": comparisons,
                "train_config.preset": cfg.stage_preset, "train_config.seed": cfg.seed}
    if not ran and matches(rm, "rm", tokenizer, expected):
        rung["rm_from"] = "reused"
    else:
        run_stage(f"{label}: RM", script("train_rm.py") + common + [
            "--out-dir", folder, "--init", rung["sft"], "--comparisons", comparisons],
            os.path.join(folder, "logs", "rm.log"))
        rung["rm_from"], ran = "trained", True
    rung["rm"] = rm

    # -- PPO from the policy against this RM: a weak fixed KL penalty, held-out gold every few updates
    if cfg.with_ppo:
        ppo_dir = os.path.join(folder, "ppo")
        # the critic starts as a copy of this RM; freeze its lower half, as the tiny default does (2 of 4)
        flags = ["--init", policy, "--reward-model", rm, "--no-adaptive-kl", "--kl-coef", str(cfg.ppo_kl_coef),
                 "--eval-every", str(cfg.ppo_eval_every), "--critic-freeze-layers", str(size["n_layer"] // 2)]
        updates = ["--total-updates", str(cfg.ppo_updates)] if cfg.ppo_updates else []
        expected = {"train_config.init": policy, "train_config.reward_model": rm, "train_config.adaptive_kl": False,
                    "train_config.kl_coef": cfg.ppo_kl_coef, "train_config.eval_every": cfg.ppo_eval_every,
                    "train_config.preset": cfg.stage_preset,
                    **({"train_config.total_updates": cfg.ppo_updates} if cfg.ppo_updates else {})}
        if not ran and matches(os.path.join(ppo_dir, "ppo.pt"), "ppo", tokenizer, expected):
            rung["ppo_from"] = "reused"
        else:
            run_stage(f"{label}: PPO", script("train_ppo.py") + common + ["--out-dir", ppo_dir, *flags, *updates],
                      os.path.join(folder, "logs", "ppo.log"))
            rung["ppo_from"] = "trained"
        rung["ppo"] = os.path.join(ppo_dir, "ppo.pt")
    return rung


# ----------------------------------------------------------------------------------------------
# One shared set of SFT samples, and what each RM makes of it


def shared_samples(cfg, tokenizer, runtime) -> dict:
    """N = bon_max_n samples of each of K held-out prompts from the policy, graded by the gold labeler:
    {"prompts": [K], "texts": [N][K], "ended": (N, K), "gold": (N, K)}, sample j of prompt i at [j][i]."""
    prompts = read_prompts(os.path.join(cfg.data_dir, "eval_prompts.jsonl"))   # in no training file
    prompts = evenly_spaced(prompts, cfg.bon_prompts or len(prompts))           # every family, not the first one
    policy, _ = load_policy(os.path.join(cfg.run_dir, "sft.pt"), tokenizer.identity, runtime)
    N, K = cfg.bon_max_n, len(prompts)
    repeated = [p for _ in range(N) for p in prompts]
    texts, ended, _ = sample_responses(policy, tokenizer, repeated, max_new_tokens=cfg.max_new_tokens,
                                       temperature=cfg.temperature, generator=runtime.generator(cfg.seed),
                                       batch_size=256)
    gold = np.array([labeler.score(p, t, e).total for p, t, e in zip(repeated, texts, ended)]).reshape(N, K)
    return {"prompts": prompts, "texts": [texts[j * K:(j + 1) * K] for j in range(N)],
            "ended": np.array(ended).reshape(N, K), "gold": gold}


def ppo_trajectory(ppo_dir: str) -> dict | None:
    """PPO's held-out evaluations (`eval/gold`, `eval/kl`, `eval/rm` every --eval-every updates)."""
    path = os.path.join(ppo_dir, "ppo_metrics.jsonl")
    if not os.path.exists(path):
        return None
    points = [r for r in read_metrics(path) if r.get("eval/gold") is not None and r.get("eval/kl") is not None]
    return {"step": [r["step"] for r in points], "kl": [r["eval/kl"] for r in points],
            "gold": [r["eval/gold"] for r in points], "rm": [r.get("eval/rm") for r in points]}


def measure(rung: dict, samples: dict, tokenizer, runtime) -> dict:
    """Every number of one rung: accuracies, best-of-n with its fit, the optimum, PPO with its fit."""
    rm_ckpt = load_checkpoint(rung["rm"], kind="rm", tokenizer_identity=tokenizer.identity)
    scorer = load_reward_model(rung["rm"], tokenizer, runtime)
    N, K = samples["gold"].shape
    prompts = samples["prompts"]
    flat_texts = [t for row in samples["texts"] for t in row]
    rm = scorer.score(prompts * N, flat_texts, samples["ended"].ravel().tolist()).numpy().reshape(N, K)
    gold = samples["gold"]
    config = rm_ckpt["model_config"]
    result = {"name": os.path.basename(rung["folder"]), "n_layer": config["n_layer"], "d_model": config["d_model"],
              "n_head": config["n_head"], "parameters": sum(p.numel() for p in scorer.model.parameters()),
              "checkpoints": {key: value for key, value in rung.items() if key != "folder"}}
    for kind in ("base", "sft"):
        metrics = load_checkpoint(rung[kind], kind=kind)["metrics"]
        result[kind] = {key: metrics.get(key) for key in ("loss/val", "gold/sample", "minutes") if key in metrics}

    # accuracy against the noiseless gold labeler: train_rm.py's held-out comparisons, and the shared samples
    rm_metrics = rm_ckpt["metrics"]
    result["rm"] = {key: rm_metrics.get(key) for key in ("comparisons/train", "comparisons/val", "minutes")}
    result["held_out"] = {key: value for key, value in rm_metrics.items()
                          if key.startswith("gold/") or key == "accuracy/val"}
    groups = [RankedComparison(prompt, [samples["texts"][j][i] for j in range(N)], list(range(N)),
                               [bool(samples["ended"][j, i]) for j in range(N)]) for i, prompt in enumerate(prompts)]
    result["on_samples"], _, _ = gold_agreement(groups, rm.T.tolist())

    # best-of-n ranked by this RM: gold (what we want) and proxy (what is optimised), Gao's fit
    ns = [2 ** k for k in range(int(math.log2(N)) + 1)]
    kl = [best_of_n_kl(n) for n in ns]
    bon = {"n": ns, "kl": kl, "gold": best_of_n_curve(rm, gold, ns), "proxy": best_of_n_curve(rm, rm, ns)}
    bon["fit"] = fit_gao(sqrt_kl(kl), np.array(bon["gold"]) - bon["gold"][0], "bon")
    bon["peak"] = gao_peak(bon["fit"], "bon")
    result["best_of_n"] = bon
    optimum = kl_regularised_optimum_curve(rm, gold, OPTIMUM_BETAS)
    best = int(np.argmax(optimum["gold"]))
    optimum["best"] = {"beta": optimum["beta"][best], "gold": optimum["gold"][best], "kl": optimum["kl"][best],
                       "win_rate": optimum["win_rate"][best]}
    result["optimum"] = optimum

    # PPO against this RM: gold along training, relative to the start (KL 0: the policy itself)
    result["ppo"] = None
    trajectory = ppo_trajectory(os.path.dirname(rung["ppo"])) if "ppo" in rung else None
    if trajectory:
        d = sqrt_kl(trajectory["kl"])
        start = int(np.argmin(d))
        trajectory["fit"] = fit_gao(d, np.array(trajectory["gold"]) - trajectory["gold"][start], "rl")
        trajectory["peak"] = gao_peak(trajectory["fit"], "rl")
        trajectory["baseline"] = trajectory["gold"][start]
        result["ppo"] = trajectory
    return result


def trends(results: list[dict]) -> dict:
    """Each headline number against ln(parameters), by least squares (`stats.fit_log_linear`)."""
    sizes = [r["parameters"] for r in results]
    numbers = {"held_out/gold/accuracy": [r["held_out"].get("gold/accuracy") for r in results],
               "on_samples/gold/accuracy": [r["on_samples"].get("gold/accuracy") for r in results],
               "best_of_n/alpha": [(r["best_of_n"]["fit"] or {}).get("alpha") for r in results],
               "best_of_n/beta": [(r["best_of_n"]["fit"] or {}).get("beta") for r in results]}
    if any(r["ppo"] for r in results):
        numbers["ppo/alpha"] = [((r["ppo"] or {}).get("fit") or {}).get("alpha") for r in results]
        numbers["ppo/beta"] = [((r["ppo"] or {}).get("fit") or {}).get("beta") for r in results]
    return {name: fit_log_linear(sizes, values) for name, values in numbers.items()}


# ----------------------------------------------------------------------------------------------
# Figure, tables, JSON


def size_label(result: dict) -> str:
    """"3.42M (4x256)": parameters, then layers x width."""
    count = result["parameters"]
    amount = f"{count / 1e6:.3g}M" if count >= 1e6 else f"{count / 1e3:.0f}k"
    return f"{amount} ({result['n_layer']}x{result['d_model']})"


def plot_ladder(results: list[dict], ceiling: dict, path: str) -> None:
    """rm_scale.png: gold gain and proxy score against sqrt(KL), one colour per RM size (top); the RMs'
    accuracy and the fitted alpha and beta against size, on a log axis (bottom)."""
    fig = Figure(figsize=(14.0, 12.0), layout="constrained")
    FigureCanvasAgg(fig)
    (gold_ax, proxy_ax), (accuracy_ax, coef_ax) = fig.subplots(2, 2)
    colours = [matplotlib.colormaps["viridis"](x) for x in np.linspace(0.0, 0.8, len(results))]   # dark: small
    d_ceiling = sqrt_kl(ceiling["kl"])
    gold_ax.plot(d_ceiling, np.array(ceiling["gold"]) - ceiling["gold"][0], "^:", color="0.55")
    for result, colour in zip(results, colours):
        bon = result["best_of_n"]
        d = sqrt_kl(bon["kl"])
        gold_ax.plot(d, np.array(bon["gold"]) - bon["gold"][0], "o", color=colour, markersize=7)
        if bon["fit"]:   # over the range of its own points: these fits are not for extrapolating
            curve = np.linspace(0.0, d.max() * 1.05, 100)
            gold_ax.plot(curve, gao_curve(bon["fit"], curve, "bon"), "--", color=colour)
        optimum = result["optimum"]
        gold_ax.plot(np.concatenate([[0.0], sqrt_kl(optimum["kl"])]), [0.0, *np.array(optimum["gold"]) - bon["gold"][0]],
                     "-", color=colour, alpha=0.35, linewidth=3)
        proxy_ax.plot(d, bon["proxy"], "o-", color=colour)
        ppo = result["ppo"]
        if ppo:
            d_ppo = sqrt_kl(ppo["kl"])
            gold_ax.plot(d_ppo, np.array(ppo["gold"]) - ppo["baseline"], "s", color=colour, alpha=0.8, markersize=6,
                         markerfacecolor="none")
            if ppo["fit"]:
                curve = np.linspace(1e-3, d_ppo.max() * 1.05, 100)
                gold_ax.plot(curve, gao_curve(ppo["fit"], curve, "rl"), ":", color=colour, linewidth=2)
            rm_points = [(x, y) for x, y in zip(d_ppo, ppo["rm"]) if y is not None]
            if rm_points:
                proxy_ax.plot(*zip(*rm_points), "s:", color=colour, markerfacecolor="none")
    gold_ax.axhline(0.0, color="black", linewidth=0.8)
    size_handles = [Line2D([], [], color=c, linewidth=6, label=f"RM {size_label(r)}") for r, c in zip(results, colours)]
    style_handles = [Line2D([], [], color="0.3", marker="o", linestyle="none", label="best-of-n, n = 1, 2, 4, ..."),
                     Line2D([], [], color="0.3", linestyle="--", label="fit d(α − βd)"),
                     Line2D([], [], color="0.3", linewidth=3, alpha=0.35,
                            label="π_SFT·exp(RM/β): KL-regularised optimum"),
                     Line2D([], [], color="0.55", marker="^", linestyle=":", label="ranked by gold (a perfect RM)")]
    if any(r["ppo"] for r in results):
        style_handles += [Line2D([], [], color="0.3", marker="s", markerfacecolor="none", linestyle="none",
                                 label="PPO, held-out evaluations"),
                          Line2D([], [], color="0.3", linestyle=":", linewidth=2, label="fit d(α − β log d)")]
    # legends under the top panels: the curves fill the axes
    gold_ax.legend(handles=size_handles + style_handles, fontsize="small", loc="upper center",
                   bbox_to_anchor=(0.5, -0.13), ncols=2)
    gold_ax.set_ylabel("gold score − SFT's (max score 8)")
    gold_ax.set_title("Gold score: what we want")
    proxy_ax.legend(handles=size_handles + ([Line2D([], [], color="0.3", marker="o", label="best-of-n: the pick's RM score"),
                                             Line2D([], [], color="0.3", marker="s", markerfacecolor="none", linestyle=":",
                                                    label="PPO")] if any(r["ppo"] for r in results) else []),
                    fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2)
    proxy_ax.set_ylabel("RM score (normalised: its SFT samples mean 0, sd 1)")
    proxy_ax.set_title("Proxy score: what is optimised (each RM its own)")
    for ax in (gold_ax, proxy_ax):
        ax.set_xlabel("sqrt(KL to SFT)   (KL in nats per response)")
        ax.grid(True, alpha=0.3)
        ax.secondary_xaxis("top", functions=(np.square, lambda kl: np.sqrt(np.clip(kl, 0, None)))).set_xlabel("KL (nats)")

    params = [r["parameters"] for r in results]
    for source, key, style, colour, what in (
            ("held_out", "gold/accuracy", "o-", "C0", "held-out comparisons: all pairs"),
            ("held_out", "gold/accuracy/correctness", "s--", "C3", "  pairs differing in correctness"),
            ("held_out", "gold/accuracy/form", "D--", "C2", "  equally correct pairs (form)"),
            ("on_samples", "gold/accuracy", "o:", "0.4", "SFT samples of held-out prompts: all pairs")):
        values = [r[source].get(key) for r in results]
        if any(v is not None for v in values):
            accuracy_ax.plot(params, [math.nan if v is None else v for v in values], style, color=colour, label=what)
    accuracy_ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":", label="chance")
    accuracy_ax.set_ylabel("pairwise accuracy against the gold labeler")
    accuracy_ax.set_title("Reward-model accuracy against size")
    for fit_of, marker, what in (("best_of_n", "o", "best-of-n"), ("ppo", "s", "RL (PPO)")):
        fits = [((r[fit_of] or {}).get("fit") or {}) for r in results]
        if any(fits):
            coef_ax.plot(params, [f.get("alpha", math.nan) for f in fits], marker + "-", color="C0", label=f"α, {what}")
            coef_ax.plot(params, [f.get("beta", math.nan) for f in fits], marker + "--", color="C1", label=f"β, {what}")
    coef_ax.axhline(0.0, color="black", linewidth=0.8)
    coef_ax.set_ylabel("fitted coefficient (gold points per sqrt-nat)")
    coef_ax.set_title("Gao et al.'s coefficients against size: α the gain, β the over-optimisation")
    for ax in (accuracy_ax, coef_ax):
        ax.set_xscale("log")
        ax.set_xticks(params, [size_label(r) for r in results])
        ax.minorticks_off()
        ax.set_xlabel("reward-model parameters (log scale)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    fig.suptitle("Reward-model size and over-optimisation (Gao et al. 2022): one SFT policy, one set of comparisons")
    save_figure(fig, path)


def cell(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(cfg, results: list[dict], ceiling: dict, slopes: dict, samples_shape: tuple, command: str) -> str:
    N, K = samples_shape
    families = sorted({k.rsplit("/", 1)[1] for r in results for k in r["held_out"]
                       if k.startswith("gold/accuracy/") and k.rsplit("/", 1)[1] not in
                       ("correctness", "form", "degenerate", "all")})
    lines = [f"# Reward-model size ladder ({cfg.preset}): {', '.join(size_label(r) for r in results)}", "",
             f"Command: `{command}`. Policy: `{os.path.join(cfg.run_dir, 'sft.pt')}`; every RM trained on "
             f"`{os.path.join(cfg.run_dir, 'rm_comparisons.jsonl')}`; best-of-n on {K} held-out prompts x {N} SFT "
             "samples, the same samples for every RM.", "",
             "## Accuracy against the noiseless gold labeler", "",
             "Held out: train_rm.py's held-out comparisons (pairs of policy samples whose gold scores differ); "
             "correctness: pairs whose rubric part `correct` differs; form: equally correct pairs. Samples: every "
             "pair of the shared SFT samples of one prompt.", "",
             "| RM | parameters | held out | correctness | form | " + " | ".join(families) +
             " | samples | samples: correctness | samples: form |",
             "|---|---|---|---|---|" + "---|" * len(families) + "---|---|---|"]
    for r in results:
        h, s = r["held_out"], r["on_samples"]
        lines.append(f"| {r['name']} | {r['parameters'] / 1e6:.2f}M | {cell(h.get('gold/accuracy'))} | "
                     f"{cell(h.get('gold/accuracy/correctness'))} | {cell(h.get('gold/accuracy/form'))} | " +
                     " | ".join(cell(h.get(f"gold/accuracy/{f}")) for f in families) +
                     f" | {cell(s.get('gold/accuracy'))} | {cell(s.get('gold/accuracy/correctness'))} | "
                     f"{cell(s.get('gold/accuracy/form'))} |")
    ns = results[0]["best_of_n"]["n"]
    lines += ["", "## Best-of-n and the KL-regularised optimum", "",
              "Gold score of the RM's pick among n SFT samples (KL = log n − (n−1)/n); the fit is gold − gold(n=1) "
              "= d(α − βd), d = sqrt(KL), and its peak is at d* = α/2β. Optimum: the best gold of "
              "π_SFT·exp(RM/β) over the same samples, at β in " + ", ".join(f"{b:g}" for b in OPTIMUM_BETAS) + ".", "",
              "| RM | " + " | ".join(f"n={n}" for n in ns) + " | α | β | R² | fitted peak: KL | gain | "
              "optimum: gold | KL |",
              "|---|" + "---|" * len(ns) + "---|---|---|---|---|---|---|"]
    for r in [*results, None]:
        if r is None:   # the ceiling: the same samples ranked by the gold labeler
            lines.append("| ranked by gold | " + " | ".join(cell(g) for g in ceiling["gold"]) + " |" + " - |" * 7)
            continue
        bon, best = r["best_of_n"], r["optimum"]["best"]
        fit, peak = bon["fit"] or {}, bon["peak"] or {}
        lines.append(f"| {r['name']} | " + " | ".join(cell(g) for g in bon["gold"]) +
                     f" | {cell(fit.get('alpha'))} | {cell(fit.get('beta'))} | {cell(fit.get('r2'))} | "
                     f"{cell(peak.get('kl'), 2)} | {cell(peak.get('gain'))} | {cell(best['gold'])} | {cell(best['kl'], 2)} |")
    if any(r["ppo"] for r in results):
        lines += ["", f"## PPO against each RM (fixed KL penalty {cfg.ppo_kl_coef:g})", "",
                  "Held-out gold during training; the fit is gold − gold(start) = d(α − β log d), its peak at "
                  "d* = exp(α/β − 1).", "",
                  "| RM | gold at start | best gold (KL) | last gold (KL) | α | β | R² | fitted peak: KL | gain |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            ppo = r["ppo"]
            if not ppo:
                continue
            fit, peak, top = ppo["fit"] or {}, ppo["peak"] or {}, int(np.argmax(ppo["gold"]))
            lines.append(f"| {r['name']} | {cell(ppo['baseline'])} | {cell(ppo['gold'][top])} ({cell(ppo['kl'][top], 2)}) | "
                         f"{cell(ppo['gold'][-1])} ({cell(ppo['kl'][-1], 2)}) | {cell(fit.get('alpha'))} | "
                         f"{cell(fit.get('beta'))} | {cell(fit.get('r2'))} | {cell(peak.get('kl'), 2)} | "
                         f"{cell(peak.get('gain'))} |")
    lines += ["", "## Against size", "", "Least squares of each number = a + b·ln(parameters); the change per tenfold "
              "size (b·ln 10), with R² (a line through two sizes always has R² = 1).", "",
              "| number | per 10x parameters | R² |", "|---|---|---|"]
    lines += [f"| {name} | {cell(fit['per_10x'])} | {cell(fit['r2'])} |" for name, fit in slopes.items() if fit]
    lines += ["", "![RM size ladder](rm_scale.png)"]
    return "\n".join(lines) + "\n"


def plain(value):
    """NaN and Inf become null (JSON has neither), NumPy values plain ones, tuples lists."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def main() -> None:
    cfg = parse_config(RMScaleConfig, PRESETS, description=__doc__.split("\n\n")[0], default_preset="cpu")
    print_config(cfg, "rm_scale")
    sizes = parse_sizes(cfg.sizes)
    if cfg.bon_max_n & (cfg.bon_max_n - 1):
        raise UserError(f"--bon-max-n {cfg.bon_max_n}: expected a power of 2 (n = 1, 2, 4, ... up to it)")
    for path in (os.path.join(cfg.run_dir, "sft.pt"), os.path.join(cfg.run_dir, "rm_comparisons.jsonl")):
        if not os.path.exists(path):
            raise UserError(f"{path} not found: the ladder starts from a normal run's policy and comparisons "
                            f"(python run_all.py --until rm --out-dir {cfg.run_dir})")
    start = time.time()
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    tokenizer = Tokenizer.from_file(os.path.join(cfg.data_dir, "tokenizer.tiktoken"))

    # ---- 1. each rung: base -> SFT -> RM (-> PPO), trained or reused
    rungs = [build_rung(cfg, size, tokenizer) for size in sizes]

    # ---- 2. one set of SFT samples, graded by gold, then scored by every RM
    t0 = time.time()
    samples = shared_samples(cfg, tokenizer, runtime)
    N, K = samples["gold"].shape
    print(f"\nshared samples: {N} per prompt x {K} held-out prompts, gold {samples['gold'].mean():.3f} "
          f"({format_duration(time.time() - t0)})")
    ns = [2 ** k for k in range(int(math.log2(N)) + 1)]
    ceiling = {"n": ns, "kl": [best_of_n_kl(n) for n in ns],
               "gold": best_of_n_curve(samples["gold"], samples["gold"], ns)}
    results = []
    for rung in rungs:
        result = measure(rung, samples, tokenizer, runtime)
        fit = result["best_of_n"]["fit"] or {}
        print(f"{size_label(result)}: held-out accuracy {cell(result['held_out'].get('gold/accuracy'))}, on the samples "
              f"{cell(result['on_samples'].get('gold/accuracy'))}; best-of-n gold " +
              ", ".join(f"n={n} {g:.2f}" for n, g in zip(ns, result["best_of_n"]["gold"])) +
              f"; α {cell(fit.get('alpha'))}, β {cell(fit.get('beta'))}")
        results.append(result)
    slopes = trends(results)

    # ---- 3. outputs
    command = "python experiments/rm_scale.py " + " ".join(sys.argv[1:])
    paths = {name: os.path.join(cfg.out_dir, f"rm_scale.{name}") for name in ("json", "md", "png")}
    os.makedirs(cfg.out_dir, exist_ok=True)
    with atomic_write(os.path.join(cfg.out_dir, "samples.jsonl"), "w") as f:
        for j in range(N):
            for i, prompt in enumerate(samples["prompts"]):
                f.write(json.dumps({"prompt": prompt, "completion": samples["texts"][j][i],
                                    "ended": bool(samples["ended"][j, i]), "gold": float(samples["gold"][j, i])}) + "\n")
    report = {"config": asdict(cfg), "command": command, "policy": os.path.join(cfg.run_dir, "sft.pt"),
              "comparisons": os.path.join(cfg.run_dir, "rm_comparisons.jsonl"),
              "samples": {"prompts": K, "per_prompt": N, "gold": float(samples["gold"].mean())},
              "ranked_by_gold": ceiling, "sizes": results, "trends": slopes, "minutes": (time.time() - start) / 60}
    with atomic_write(paths["json"], "w") as f:
        json.dump(plain(report), f, indent=2, allow_nan=False)
    with atomic_write(paths["md"], "w") as f:
        f.write(markdown(cfg, results, ceiling, slopes, (N, K), command))
    plot_ladder(results, ceiling, paths["png"])
    print(f"\ndone in {format_duration(time.time() - start)}; wrote {', '.join(paths.values())}")


if __name__ == "__main__":
    run_main(main)
