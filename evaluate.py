"""Step 4: what did RLHF do? Base vs SFT vs PPO (and DPO, GRPO, RLOO), and best-of-n, on held-out prompts.

Reads  out/base.pt, out/sft.pt, out/ppo.pt, out/dpo.pt, out/grpo.pt, out/rloo.pt, out/expert.pt (those that exist),
       out/rm.pt (optional),
       out/ppo_metrics.jsonl (optional), data/eval_prompts.jsonl (prompts in no training file)
Writes out/eval.md   tables, and the same prompts answered side by side by each model
       out/eval.png  gold score per model (split into its rubric parts) and the win rates
       out/eval_bon.png  gold and RM score against sqrt(KL): best-of-n beside PPO, with Gao et al.'s fits
       out/eval.json every number above

Every model answers every prompt `--samples` times at temperature 1 (plus once greedily), and the
gold labeler (`minirlhf/labeler.py`) grades each answer. Per model: the mean gold score and each
rubric part, the RM score, the EOS rate, the length, and the KL to the SFT model. Between models:
win rates (InstructGPT section 4.1 reports its results this way).

Best-of-n is the other way to use a reward model: sample n answers from SFT, keep the one the RM
likes best. Its KL to SFT is known in closed form, log n - (n-1)/n, so it can be drawn on the same
axes as PPO: gold score against sqrt(KL). Gao et al. 2022 ("Scaling Laws for Reward Model
Overoptimization", section 3) fit  gold = d (alpha - beta d)  for best-of-n and
gold = d (alpha - beta log d)  for RL, with d = sqrt(KL): the proxy (RM) score keeps rising with
KL while the gold score peaks and falls. That picture is why PPO pays a KL penalty. Two ceilings
are drawn with it, from the same SFT samples: best-of-n ranked by the gold labeler (a perfect RM),
and the KL-regularised optimum pi_SFT exp(score / beta) that PPO's objective is after, for the RM's
score and for the gold score - what a perfect optimiser of each would reach at each KL.

CPU:  python evaluate.py                     (preset tiny, ~30 s on 2 cores)
      python evaluate.py --preset smoke      (seconds; for tests)
      python evaluate.py --checkpoints out/sft.pt out_kl0/ppo.pt   (any list of policy checkpoints)
GPU:  python evaluate.py --preset small --device cuda
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from minirlhf import labeler, world
from minirlhf import checkpoint
from minirlhf.checkpoint import atomic_write
from minirlhf.cli import UserError, format_duration, parse_config, print_config, run_main
from minirlhf.data import evenly_spaced, read_prompts
from minirlhf.metrics import read_metrics
from minirlhf.model import GPT
from minirlhf.plots import save_figure
from minirlhf.labeling import RankedComparison
from minirlhf.reward import gold_agreement, load_reward_model
from minirlhf.tokenizer import Tokenizer, render_chat
from minirlhf.training import response_logprobs, sample_responses
from minirlhf.runtime import setup_runtime
from minirlhf.stats import (best_of_n_expected, best_of_n_kl, fit_gao, gao_curve, kl_regularised_optimum,
                            sqrt_kl, win_rate)


@dataclass
class EvalConfig:
    preset: str = field(default="tiny", metadata={"help": "size preset: smoke (tests), tiny (CPU), medium (~26M, one GPU), small (GPT-2 small shape, GPU)"})
    data_dir: str = field(default="data", metadata={"help": "where the prompts and the tokenizer are"})
    out_dir: str = field(default="out", metadata={"help": "where the checkpoints are and the report goes"})
    checkpoints: list[str] = field(default_factory=list, metadata={
        "help": "policy checkpoints to compare (default: base.pt, sft.pt, ppo.pt in OUT_DIR, those that exist)",
        "metavar": "PATH"})
    prompts: str = field(default="", metadata={"help": "prompts JSONL (default: DATA_DIR/eval_prompts.jsonl)"})
    reference: str = field(default="", metadata={"help": "the SFT checkpoint KL is measured against "
                                                         "(default: OUT_DIR/sft.pt)"})
    reward_model: str = field(default="", metadata={"help": "reward model for RM scores and best-of-n "
                                                            "(default: OUT_DIR/rm.pt if it exists; 'none': skip)"})
    max_prompts: int = field(default=0, metadata={"help": "use the first N prompts (0: all)", "min": 0})
    samples: int = field(default=4, metadata={"help": "samples per prompt and model at --temperature", "min": 1})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature", "min": 1e-3})
    max_new_tokens: int = field(default=48, metadata={"help": "response budget (as in training)", "min": 1})
    bon_max_n: int = field(default=32, metadata={"help": "best-of-n for n = 1, 2, 4, ... up to this (0: skip)",
                                                 "min": 0})
    bon_prompts: int = field(default=32, metadata={"help": "prompts used for best-of-n, the expensive part "
                                                           "(0: all)", "min": 0})
    side_by_side: int = field(default=8, metadata={"help": "prompts shown answered side by side in eval.md",
                                                   "min": 0})
    batch_size: int = field(default=128, metadata={"help": "sequences sampled at once", "min": 1})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda", "choices": ["auto", "cpu", "cuda"]})
    dtype: str = field(default="auto", metadata={"help": "precision: auto (bf16 on a GPU that has it, else fp32), "
                                                         "fp32 or bf16 (autocast; weights stay fp32)",
                                                 "choices": ["auto", "fp32", "bf16"]})
    seed: int = field(default=1337, metadata={"help": "random seed (every model samples with the same seed)"})
    kernels: str = field(default="auto", metadata={"help": "logprob/GAE kernels: auto (fused) or reference",
                                                   "choices": ["auto", "reference"]})
    debug: bool = field(default=False, metadata={"help": "show tracebacks"})


PRESETS = {
    "smoke": dict(max_prompts=12, samples=2, max_new_tokens=24, bon_max_n=8, bon_prompts=6, side_by_side=3),
    "tiny": {},
    "medium": {},
    "small": dict(samples=8, bon_prompts=0),
}
DEFAULT_STAGES = ("base", "sft", "ppo")          # a note says when one of these is missing
METHODS = ("dpo", "grpo", "rloo", "expert")      # evaluated when present (train_dpo.py, train_grpo.py, train_expert.py)
OPTIMUM_BETAS = (1.0, 0.5, 0.3, 0.2, 0.1)   # KL coefficients of the KL-regularised optimum, in SFT sd units


# --------------------------------------------------------------------------------------------------
# Sampling and scoring one model


@dataclass
class Answers:
    """One model's answers: S samples of each of N prompts, arrays (S, N); `greedy_*` arrays (N,)."""

    texts: list[list[str]]            # [S][N]
    ended: np.ndarray                 # (S, N) bool: stopped with EOS within the budget
    gold: np.ndarray                  # (S, N) gold total
    parts: dict[str, np.ndarray]      # rubric part -> (S, N), each in [0, 1]
    length: np.ndarray                # (S, N) response tokens, EOS included
    kl: np.ndarray | None             # (S, N) sum_t log pi(y_t) - log pi_sft(y_t), or None without SFT
    greedy_texts: list[str]
    greedy_ended: np.ndarray
    greedy_gold: np.ndarray
    greedy_parts: dict[str, np.ndarray]
    rm: np.ndarray | None = None      # (S, N) what RL maximises: the normalised RM score, -1 without EOS (`RewardScorer.reward`)


def load_policy(path: str, tokenizer: Tokenizer, runtime) -> tuple[GPT, dict]:
    """A policy checkpoint as (frozen GPT in eval mode; the checkpoint dict). An rm.pt is a clear error."""
    model, ckpt = checkpoint.load_policy(path, tokenizer.identity, runtime)
    return model.requires_grad_(False), ckpt


def training_cost(ckpt: dict) -> dict:
    """What it cost to train this policy: minutes of its own stage, and responses sampled from a
    policy during training (0 for offline methods: SFT, DPO). From the checkpoint's summary."""
    metrics, config = ckpt.get("metrics", {}), ckpt.get("train_config", {})
    samples = metrics.get("samples_drawn")
    if samples is None and ckpt["kind"] == "ppo":   # one response per prompt per update
        samples = config.get("batch_size", 0) * ckpt.get("step", 0)
    if samples is None and ckpt["kind"] in ("base", "sft"):
        samples = 0
    return {"minutes": metrics.get("minutes"), "samples_drawn": samples}


def grade(prompts: list[str], texts: list[str], ended: list[bool]):
    """Gold totals (K,) and parts {name: (K,)} for K (prompt, text, ended) triples."""
    scores = [labeler.score(p, t, e) for p, t, e in zip(prompts, texts, ended)]
    return (np.array([s.total for s in scores]),
            {part: np.array([s.parts[part] for s in scores]) for part in labeler.WEIGHTS})


@torch.no_grad()
def sequence_kl(reference, generation, temperature: float) -> torch.Tensor:
    """(B,) per-response KL estimate: sum over response tokens of log pi(y_t) - log pi_ref(y_t).

    The tokens were sampled from pi, so the mean of this over samples is an unbiased estimate of
    KL(pi || pi_ref) per response (the k1 estimator summed over the sequence: the quantity PPO's
    `objective/kl` logs). log pi is the sampler's own logprob (`generation.logprobs`, at the sampling
    temperature); log pi_ref is one forward pass of the reference over the same tokens, at the same
    temperature, as PPO computes it.
    """
    ids, mask = generation.sequences()  # (B, P + R) each
    prompt_len = generation.prompt_ids.shape[1]
    ref_logp = response_logprobs(reference, ids, mask, prompt_len, temperature)  # (B, R)
    valid = generation.response_mask.bool()
    return torch.where(valid, generation.logprobs - ref_logp, 0.0).sum(dim=1)


def answer(model, reference, tokenizer, prompts: list[str], cfg, n_samples: int, runtime) -> Answers:
    """Sample `n_samples` answers per prompt at cfg.temperature and one greedy answer; grade them all."""
    N = len(prompts)
    generator = runtime.generator(cfg.seed)  # the same seed for every model
    repeated = [p for _ in range(n_samples) for p in prompts]  # sample j of prompt i at j * N + i
    texts, ended, generations = sample_responses(model, tokenizer, repeated, max_new_tokens=cfg.max_new_tokens,
                                                 temperature=cfg.temperature, generator=generator,
                                                 batch_size=cfg.batch_size)
    length = torch.cat([g.response_mask.sum(dim=1) for g in generations]).cpu().numpy()
    kl = None
    if reference is model:  # the reference itself: KL 0 by definition (no forward pass needed)
        kl = np.zeros(len(repeated))
    elif reference is not None:
        kl = torch.cat([sequence_kl(reference, g, cfg.temperature) for g in generations]).cpu().numpy()
    gold, parts = grade(repeated, texts, ended)
    greedy_texts, greedy_ended, _ = sample_responses(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                                     temperature=0.0, batch_size=cfg.batch_size)
    greedy_gold, greedy_parts = grade(prompts, greedy_texts, greedy_ended)
    shape = (n_samples, N)
    return Answers(
        texts=[texts[j * N:(j + 1) * N] for j in range(n_samples)], ended=np.array(ended).reshape(shape),
        gold=gold.reshape(shape), parts={k: v.reshape(shape) for k, v in parts.items()},
        length=length.reshape(shape), kl=None if kl is None else kl.reshape(shape),
        greedy_texts=greedy_texts, greedy_ended=np.array(greedy_ended), greedy_gold=greedy_gold,
        greedy_parts=greedy_parts)


def summarize(answers: Answers, prompts: list[str]) -> dict:
    """The per-model numbers of eval.json (names as in train_sft's gold report)."""
    S = answers.gold.shape[0]
    summary = {"gold/sample": float(answers.gold.mean()),
               # the standard error treats every sample as independent (a prompt's samples are not quite)
               "gold/sample_se": float(answers.gold.std() / math.sqrt(answers.gold.size)),
               "gold/greedy": float(answers.greedy_gold.mean())}
    for part in labeler.WEIGHTS:
        summary[f"gold/sample/{part}"] = float(answers.parts[part].mean())
    for part in labeler.WEIGHTS:
        summary[f"gold/greedy/{part}"] = float(answers.greedy_parts[part].mean())
    families = np.array([(world.task_for_prompt(p) or world.Task("other", p)).family for p in prompts])
    for family in dict.fromkeys(families):
        summary[f"gold/sample/family/{family}"] = float(answers.gold[:, families == family].mean())
    summary["eos_rate/sample"] = float(answers.ended.mean())
    summary["eos_rate/greedy"] = float(answers.greedy_ended.mean())
    summary["length/sample"] = float(answers.length.mean())
    summary["kl_to_sft"] = float(answers.kl.mean()) if answers.kl is not None else None
    summary["rm/sample"] = float(answers.rm.mean()) if answers.rm is not None else None
    if answers.rm is not None and S > 1:
        summary.update(rm_against_gold(answers, prompts))
    summary["samples"] = S * len(prompts)
    return summary


def rm_against_gold(answers: Answers, prompts: list[str]) -> dict:
    """How well the RM orders this model's own samples of each held-out prompt, against the gold
    labeler (`reward.gold_agreement`: pairs whose gold scores differ): "rm/gold_accuracy" (and
    "/FAMILY"), "rm/gold_spearman_within", "rm/gold_top_choice". On SFT's samples it is the RM's
    held-out accuracy on prompts no stage trained on; on PPO's, how far the RM can still be trusted
    where PPO took the policy."""
    S = answers.gold.shape[0]
    groups = [RankedComparison(prompt, [answers.texts[j][i] for j in range(S)], list(range(S)),
                               [bool(answers.ended[j, i]) for j in range(S)]) for i, prompt in enumerate(prompts)]
    report, _, _ = gold_agreement(groups, answers.rm.T.tolist())
    return {key.replace("gold/", "rm/gold_"): value for key, value in report.items()
            if key.startswith(("gold/accuracy", "gold/spearman_within", "gold/top_choice"))
            and key not in ("gold/accuracy/all", "gold/accuracy/degenerate")}


# --------------------------------------------------------------------------------------------------
# Best-of-n and PPO's trajectory


def best_of_n(sft, sft_answers: Answers, tokenizer, prompts: list[str], subset: list[int], scorer, cfg,
              runtime) -> dict:
    """Best-of-n from SFT, ranked by the RM, for n = 1, 2, 4, ... cfg.bon_max_n, on the prompts whose
    indices are `subset`; beside it, the same samples ranked by the gold labeler (a perfect RM), and
    reweighted into the KL-regularised optimum of the RM and of the gold score (`kl_regularised_optimum`).

    Each prompt gets bon_max_n i.i.d. SFT samples at the evaluation temperature: SFT's evaluation
    samples (already graded and scored) plus fresh ones. Every n is estimated from all of them with
    `best_of_n_expected`, then averaged over the prompts.
    """
    prompts = [prompts[i] for i in subset]
    K = len(prompts)
    ns = [2 ** k for k in range(int(math.log2(cfg.bon_max_n)) + 1)]
    gold, rm = sft_answers.gold[:, subset], sft_answers.rm[:, subset]  # (S, K) each
    extra = ns[-1] - len(gold)
    if extra > 0:
        repeated = [p for _ in range(extra) for p in prompts]
        generator = runtime.generator(cfg.seed + 1)  # not the evaluation samples again
        texts, ended, _ = sample_responses(sft, tokenizer, repeated, max_new_tokens=cfg.max_new_tokens,
                                           temperature=cfg.temperature, generator=generator, batch_size=cfg.batch_size)
        gold = np.concatenate([gold, grade(repeated, texts, ended)[0].reshape(extra, K)])
        rm = np.concatenate([rm, scorer.reward(repeated, texts, ended).numpy().reshape(extra, K)])
    result = {"prompts": K, "samples_per_prompt": len(gold), "n": ns, "kl": [best_of_n_kl(n) for n in ns]}
    result["gold"] = [float(np.mean([best_of_n_expected(rm[:, i], gold[:, i], n) for i in range(K)])) for n in ns]
    result["rm"] = [float(np.mean([best_of_n_expected(rm[:, i], rm[:, i], n) for i in range(K)])) for n in ns]
    # the same samples ranked by the gold labeler itself: what a perfect reward model would pick, the
    # ceiling of any policy at that KL that only reweights SFT's samples
    result["gold_ranked_by_gold"] = [float(np.mean([best_of_n_expected(gold[:, i], gold[:, i], n)
                                                    for i in range(K)])) for n in ns]
    # the KL-regularised optimum pi_SFT exp(score / beta) of the RM, and of the gold score in SFT sd units
    # (the RM is normalised that way), over the same samples: what PPO's objective is after at each beta
    gold_sd = max(float(gold.std()), 1e-6)
    result["optimum"] = {"beta": list(OPTIMUM_BETAS)}
    for name, scores in (("rm", rm), ("gold", gold / gold_sd)):
        points = np.array([[kl_regularised_optimum(scores[:, i], gold[:, i], beta) for i in range(K)]
                           for beta in OPTIMUM_BETAS]).mean(axis=1)                    # (betas, 3)
        result["optimum"][name] = {"gold": points[:, 0].tolist(), "kl": points[:, 1].tolist(),
                                   "win_rate": points[:, 2].tolist()}
    return result


def ppo_trajectory(path: str) -> dict | None:
    """PPO's gold and RM score against KL during training, from ppo_metrics.jsonl (None if absent).

    Prefers the held-out evaluation that train_ppo logs every few updates (`eval/gold`, `eval/kl`,
    `eval/rm`); falls back to the rollout batch's `objective/gold`, `objective/kl`, `objective/scores`.
    """
    if not os.path.exists(path):
        return None
    records = read_metrics(path)
    for prefix, rm_key in (("eval", "eval/rm"), ("objective", "objective/scores")):
        points = [r for r in records if r.get(f"{prefix}/gold") is not None and r.get(f"{prefix}/kl") is not None]
        if points:
            return {"source": f"{prefix}/gold, {prefix}/kl", "step": [r["step"] for r in points],
                    "kl": [float(r[f"{prefix}/kl"]) for r in points],
                    "gold": [float(r[f"{prefix}/gold"]) for r in points],
                    "rm": [r.get(rm_key) for r in points]}
    return None


def gao_fits(bon: dict | None, trajectory: dict | None) -> dict:
    """Gao et al.'s fits of gold gain against d = sqrt(KL), each relative to its own d = 0 point:
    best-of-n's n = 1 (the SFT policy), and PPO's first logged point when its KL is ~0 (else n = 1's)."""
    fits = {}
    if bon is not None:
        fits["bon"] = fit_gao(sqrt_kl(bon["kl"]), np.array(bon["gold"]) - bon["gold"][0], "bon")
        if fits["bon"]:
            fits["bon"]["baseline"] = bon["gold"][0]
    if trajectory is not None:
        d = sqrt_kl(trajectory["kl"])
        start = int(np.argmin(d))
        baseline = trajectory["gold"][start] if d[start] < 0.1 or bon is None else bon["gold"][0]
        fits["rl"] = fit_gao(d, np.array(trajectory["gold"]) - baseline, "rl")
        if fits["rl"]:
            fits["rl"]["baseline"] = baseline
    return fits


# --------------------------------------------------------------------------------------------------
# Figures


PART_COLOURS = {"correct": "#4C72B0", "harmless": "#55A868", "on_topic": "#8172B2", "concise": "#CCB974",
                "well_formed": "#64B5CD"}


def plot_overview(summaries: dict, wins: list[dict], n_prompts: int, out_path: str) -> None:
    """eval.png: left, each model's mean gold score as a stack of its weighted rubric parts (with
    +-1 standard error); right, the win rates (win / tie / loss) of each pair."""
    fig = Figure(figsize=(12.0 if wins else 6.5, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1.0]}) if wins else (fig.subplots(), None)
    names = list(summaries)
    bottom = np.zeros(len(names))
    for part, weight in labeler.WEIGHTS.items():
        heights = np.array([weight * summaries[m][f"gold/sample/{part}"] for m in names])
        left.bar(names, heights, bottom=bottom, color=PART_COLOURS.get(part), label=f"{part} (x{weight:g})")
        bottom += heights
    errors = [summaries[m]["gold/sample_se"] for m in names]
    left.errorbar(names, bottom, yerr=errors, fmt="none", ecolor="black", capsize=4)
    # the totals go under the bars, where neither the max line nor the legend can cover them
    left.set_xticks(range(len(names)), [f"{m}\n{total:.2f} ± {se:.2f}" for m, total, se in zip(names, bottom, errors)])
    left.set_ylim(0, labeler.MAX_SCORE + 2.0)   # headroom above the max line for the legend
    left.axhline(labeler.MAX_SCORE, color="0.5", linestyle="--", linewidth=1, label="max score")
    left.set_ylabel(f"gold score (max {labeler.MAX_SCORE:g})")
    left.set_title(f"Gold labeler's score on {n_prompts} held-out prompts")
    left.legend(fontsize="small", loc="upper center", ncols=3)

    if right is None:  # one model: nothing to compare
        save_figure(fig, out_path)
        return
    labels = [f"{w['model']} vs {w['baseline']}" for w in wins]
    win = np.array([w["win_rate"] - w["tie_rate"] / 2 for w in wins])
    tie = np.array([w["tie_rate"] for w in wins])
    right.barh(labels, win, color="#55A868", label="wins")
    right.barh(labels, tie, left=win, color="0.75", label="ties")
    right.barh(labels, 1 - win - tie, left=win + tie, color="#C44E52", label="losses")
    for y, w in enumerate(wins):
        right.text(0.02, y, f"win rate {w['win_rate']:.2f} ({w['win_rate_excl_ties']:.2f} excl. ties)",
                   va="center", color="white", fontweight="bold")
    right.axvline(0.5, color="black", linestyle=":", linewidth=1)
    right.set_xlim(0, 1)
    right.invert_yaxis()
    right.set_xlabel("share of paired answers (same prompt, same sample index)")
    right.set_title("Who wins, judged by the gold labeler")
    right.legend(fontsize="small", loc="lower right")
    save_figure(fig, out_path)


def plot_bon(bon: dict | None, trajectory: dict | None, fits: dict, method_points: dict, out_path: str) -> None:
    """eval_bon.png: gold (left) and RM (right) score against sqrt(KL to SFT)."""
    fig = Figure(figsize=(14.0, 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    gold_ax, rm_ax = fig.subplots(1, 2)
    if bon is not None:
        d = sqrt_kl(bon["kl"])
        gold_ax.plot(d, bon["gold"], "o", color="C0", label=f"best-of-n from SFT ({bon['prompts']} prompts)")
        gold_ax.plot(d, bon["gold_ranked_by_gold"], "^:", color="C2",
                     label="best-of-n ranked by gold (a perfect RM: the ceiling)")
        for name, colour, what in (("rm", "C0", "RM"), ("gold", "C2", "gold")):
            optimum = bon["optimum"][name]   # from SFT itself (beta = infinity: KL 0) to the smallest beta
            gold_ax.plot(np.concatenate([[0.0], sqrt_kl(optimum["kl"])]), [bon["gold"][0]] + optimum["gold"], "-",
                         color=colour, alpha=0.45, linewidth=2.5,
                         label=f"π_SFT·exp({what}/β): the {what} score's KL-regularised optimum")
        rm_ax.plot(d, bon["rm"], "o-", color="C0", label="best-of-n: RM score of the pick")
        for n, x, y in zip(bon["n"], d, bon["gold"]):
            gold_ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize="small")
    if trajectory is not None:
        d = sqrt_kl(trajectory["kl"])
        gold_ax.plot(d, trajectory["gold"], "s", color="C1", alpha=0.7,
                     label=f"PPO during training ({trajectory['source']})")
        rm = [(x, y) for x, y in zip(d, trajectory["rm"]) if y is not None]
        if rm:
            rm_ax.plot(*zip(*rm), "s-", color="C1", alpha=0.7, label="PPO during training")
    for form, colour, what, data in (("bon", "C0", "best-of-n fit d(α - βd)", bon),
                                     ("rl", "C1", "RL fit d(α - β log d)", trajectory)):
        fit = fits.get(form)
        if fit:  # drawn over the range of its own data only: these fits are not for extrapolating
            curve = np.linspace(0.0, sqrt_kl(data["kl"]).max() * 1.05, 100)
            gold_ax.plot(curve, fit["baseline"] + gao_curve(fit, curve, form), "--", color=colour,
                         label=f"{what}: α={fit['alpha']:.2f}, β={fit['beta']:.2f}, R²={fit['r2']:.2f}")
    markers = {"ppo": ("*", "C3"), "dpo": ("D", "C4"), "grpo": ("P", "C5"), "rloo": ("X", "C6"), "expert": ("^", "C8")}
    for point in method_points.values():   # each trained policy, evaluated here on the best-of-n prompts
        marker, colour = markers.get(point["kind"], ("o", "C7"))
        for ax, key in ((gold_ax, "gold"), (rm_ax, "rm")):
            if point.get(key) is not None:
                ax.plot([point["d"]], [point[key]], marker, color=colour, markersize=13 if marker == "*" else 9,
                        markeredgecolor="black", label=f"{point['model']}: final policy (this evaluation)")
    for ax, ylabel, title in ((gold_ax, "gold score", "Gold score: what we actually want"),
                              (rm_ax, "RM score (normalised)", "RM score: the proxy being optimised")):
        ax.set_xlabel("sqrt(KL to SFT)   (KL in nats per response)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.secondary_xaxis("top", functions=(lambda d: np.square(d), lambda kl: np.sqrt(np.clip(kl, 0, None)))) \
            .set_xlabel("KL (nats)")
        if ax.get_legend_handles_labels()[0]:   # under the axes: the curves fill the plot
            ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2)
    save_figure(fig, out_path)


# --------------------------------------------------------------------------------------------------
# Report


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value).replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def score_rows(summaries: dict) -> tuple[list[str], list[list]]:
    header = ["model", "gold (sampled)", "± s.e.", "gold (greedy)", *labeler.WEIGHTS, "RM", "EOS rate", "length",
              "KL to SFT"]
    rows = [[name, s["gold/sample"], s["gold/sample_se"], s["gold/greedy"],
             *(s[f"gold/sample/{part}"] for part in labeler.WEIGHTS), s["rm/sample"], s["eos_rate/sample"],
             s["length/sample"], s["kl_to_sft"]] for name, s in summaries.items()]
    return header, rows


def side_by_side_prompts(prompts: list[str], count: int) -> list[int]:
    """Indices of `count` prompts, taking the prompt families in turn so every family shows up."""
    by_family: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_family.setdefault((world.task_for_prompt(p) or world.Task("other", p)).family, []).append(i)
    chosen, queues = [], [list(q) for q in by_family.values()]
    while len(chosen) < min(count, len(prompts)):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def write_report(path: str, cfg, report: dict, all_answers: dict, prompts: list[str]) -> None:
    summaries = report["models"]
    lines = ["# Evaluation: what each stage of RLHF did", "",
             f"{len(prompts)} held-out prompts (`{report['prompts_file']}`), {cfg.samples} samples each at "
             f"temperature {cfg.temperature:g} plus one greedy answer, at most {cfg.max_new_tokens} tokens; judged "
             f"by the gold labeler (`minirlhf/labeler.py`, max {labeler.MAX_SCORE:g}).", ""]
    for note in report["notes"]:
        lines.append(f"- {note}")
    lines += ["", "## Scores", "",
              "Means over all samples. The rubric parts are in [0, 1] (weights: " +
              ", ".join(f"{k} x{v:g}" for k, v in labeler.WEIGHTS.items()) + "). RM: the reward model's "
              "normalised score (SFT samples: mean 0, std 1). Length in tokens, EOS included. KL to SFT: "
              "sum over the response of log pi - log pi_sft, nats.", ""]
    lines += markdown_table(*score_rows(summaries))
    families = sorted({k.rsplit("/", 1)[1] for s in summaries.values() for k in s if "/family/" in k})
    lines += ["", "Gold score (sampled) by prompt family:", ""]
    lines += markdown_table(["model", *families], [[name, *(s.get(f"gold/sample/family/{f}") for f in families)]
                                                   for name, s in summaries.items()])
    judged = {name: s for name, s in summaries.items() if "rm/gold_accuracy" in s}
    if judged:
        lines += ["", "The reward model against the gold labeler, on each model's samples of these held-out prompts "
                      "(pairwise accuracy on the pairs of one prompt's samples whose gold scores differ, by family, "
                      "and split into pairs whose rubric part `correct` differs - is the answer right? - and pairs "
                      "equally correct that differ in form; Spearman within a prompt; how often the RM's favourite "
                      "has the top gold score):", ""]
        lines += markdown_table(["samples of", "RM accuracy", *families, "correctness", "form", "Spearman",
                                 "top choice"],
                                [[name, s["rm/gold_accuracy"], *(s.get(f"rm/gold_accuracy/{f}") for f in families),
                                  s.get("rm/gold_accuracy/correctness"), s.get("rm/gold_accuracy/form"),
                                  s.get("rm/gold_spearman_within"), s.get("rm/gold_top_choice")]
                                 for name, s in judged.items()])
    methods = [name for name, s in summaries.items() if name in report["kinds"] and
               report["kinds"][name] not in ("base", "sft")]
    sft_wins = {w["model"]: w for w in report["win_rates"] if report["kinds"].get(w["baseline"]) == "sft"}
    if methods:
        lines += ["", "## Methods side by side", "",
                  "Each trained policy against SFT on the same prompts (gold score, win rate with ties half and "
                  "without ties, KL to SFT in nats), and what it cost: the minutes of its own training stage and "
                  "the responses it sampled while training (0: offline, like DPO).", ""]
        lines += markdown_table(
            ["method", "gold", "± s.e.", "win rate vs SFT", "excl. ties", "tie rate", "KL to SFT", "minutes",
             "samples drawn"],
            [[name, summaries[name]["gold/sample"], summaries[name]["gold/sample_se"],
              sft_wins.get(name, {}).get("win_rate"), sft_wins.get(name, {}).get("win_rate_excl_ties"),
              sft_wins.get(name, {}).get("tie_rate"), summaries[name]["kl_to_sft"], summaries[name].get("minutes"),
              summaries[name].get("samples_drawn")] for name in methods])
    if report["win_rates"]:
        lines += ["", "## Win rates", "",
                  "Answer j of model A against answer j of model B on the same prompt, judged by gold score; "
                  "ties count half.", ""]
        lines += markdown_table(["model", "vs", "win rate", "tie rate", "win rate excl. ties", "pairs"],
                                [[w["model"], w["baseline"], w["win_rate"], w["tie_rate"], w["win_rate_excl_ties"],
                                  w["pairs"]] for w in report["win_rates"]])
    bon = report["best_of_n"]
    if bon is not None:
        lines += ["", "## Best-of-n from SFT (ranked by the RM, and by gold)", "",
                  f"On {bon['prompts']} prompts, {bon['samples_per_prompt']} SFT samples each; every n is "
                  "estimated from all of them (the unbiased estimator in `best_of_n_expected`). "
                  "KL = log n - (n-1)/n.", ""]
        rows = [[f"best-of-{n}", kl, math.sqrt(kl), rm, gold, ceiling] for n, kl, rm, gold, ceiling in
                zip(bon["n"], bon["kl"], bon["rm"], bon["gold"], bon["gold_ranked_by_gold"])]
        points = list(report["methods_on_bon_prompts"].values())   # the trained policies on the same prompts
        for point in points:
            rows.append([f"{point['model']} (same prompts)", point["kl"], point["d"], point["rm"], point["gold"], None])
        lines += markdown_table(["policy", "KL", "sqrt(KL)", "RM", "gold", "gold if ranked by gold"], rows)
        lines += ["", "The last column ranks the same samples by the gold labeler instead of the RM: what a "
                  "perfect reward model would reach at each KL. The gap to the gold column is what the RM's "
                  "errors cost."]
        optimum = bon["optimum"]
        lines += ["", "### The KL-regularised optimum over the same samples", "",
                  "PPO maximises score - β·KL(π || SFT); the best any policy can do at that is π_SFT·exp(score/β). "
                  "Reweighting the SFT samples above by exp(score/β) gives it (limited to those samples), for "
                  "the RM's score and for the gold score in SFT standard deviations. Win rate: against an SFT "
                  "sample, by gold, ties half.", ""]
        rows = [[beta, optimum["rm"]["kl"][k], optimum["rm"]["gold"][k], optimum["rm"]["win_rate"][k],
                 optimum["gold"]["kl"][k], optimum["gold"]["gold"][k], optimum["gold"]["win_rate"][k]]
                for k, beta in enumerate(optimum["beta"])]
        for point in points:
            rows.append([f"{point['model']} (same prompts)", point["kl"], point["gold"], point.get("win_rate"),
                         None, None, None])
        lines += markdown_table(["β", "RM optimum: KL", "gold", "win rate vs SFT", "gold optimum: KL", "gold",
                                 "win rate vs SFT"], rows)
    for form, what in (("bon", "best-of-n: gold - gold(SFT) = d(α - βd)"),
                       ("rl", "PPO: gold - gold(start) = d(α - β log d)")):
        fit = report["fits"].get(form)
        if fit:
            lines.append(f"\nFit ({what}, d = sqrt(KL)): α = {fit['alpha']:.3f}, β = {fit['beta']:.3f}, "
                         f"R² = {fit['r2']:.3f}")
    lines += ["", "![overview](eval.png)", "", "![best-of-n and PPO against KL](eval_bon.png)", "",
              "## The same prompts, side by side", "",
              "Sample 1 of each model (temperature {:g}), with its gold score; ⏹ = stopped with end-of-text, "
              "… = ran out of tokens.".format(cfg.temperature), ""]
    for i in side_by_side_prompts(prompts, cfg.side_by_side):
        lines.append(f"**{prompts[i]}**\n")
        for name, answers in all_answers.items():
            mark = "⏹" if answers.ended[0, i] else "…"
            text = answers.texts[0][i].replace("\n", " ").strip()
            lines.append(f"- {name} (gold {answers.gold[0, i]:.2f}): {text} {mark}")
        lines.append("")
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def print_summary(summaries: dict, wins: list[dict]) -> None:
    header, rows = score_rows(summaries)
    keep = [0, 1, 3, 9, 10, 11, 12]  # model, gold sampled, gold greedy, RM, EOS rate, length, KL
    widths = [max(len(header[k]), 8) for k in keep]
    print("  ".join(header[k].ljust(w) for k, w in zip(keep, widths)))
    for row in rows:
        print("  ".join(("-" if row[k] is None else f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]))
                        .ljust(w) for k, w in zip(keep, widths)))
    for w in wins:
        print(f"win rate {w['model']} vs {w['baseline']}: {w['win_rate']:.3f} "
              f"(ties {w['tie_rate']:.3f}, excluding ties {w['win_rate_excl_ties']:.3f})")


# --------------------------------------------------------------------------------------------------


def json_safe(value):
    """NaN and Inf become null (JSON has neither), NumPy scalars plain numbers, tuples lists."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def check_fits(model, path: str, longest_prompt: int, cfg, prompts_file: str) -> None:
    """Every prompt and its response must fit the model's context: one line naming the files."""
    if longest_prompt + cfg.max_new_tokens > model.config.block_size:
        raise UserError(f"{prompts_file}: the longest prompt ({longest_prompt} tokens) + --max-new-tokens "
                        f"{cfg.max_new_tokens} exceeds the block_size {model.config.block_size} of {path}")


def checkpoint_list(cfg) -> tuple[dict[str, str], list[str]]:
    """{label: path} of the checkpoints to evaluate, and notes about the default ones that are missing."""
    if cfg.checkpoints:
        paths, notes = list(cfg.checkpoints), []
    else:
        paths = [os.path.join(cfg.out_dir, f"{stage}.pt") for stage in DEFAULT_STAGES]
        notes = [f"{p} not found: not evaluated" for p in paths if not os.path.exists(p)]
        paths = [p for p in paths + [os.path.join(cfg.out_dir, f"{m}.pt") for m in METHODS] if os.path.exists(p)]
        if not paths:
            raise UserError(f"no checkpoints in {cfg.out_dir} (expected base.pt, sft.pt, ppo.pt): run the "
                            "training stages first, or pass --checkpoints")
    labels: dict[str, str] = {}
    for path in paths:
        label = os.path.splitext(os.path.basename(path))[0]
        if label in labels:  # two files of one name (out/ppo.pt, out_kl0/ppo.pt): name the folder too
            label = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), label)
        labels[label] = path
    return labels, notes


def main() -> None:
    cfg = parse_config(EvalConfig, PRESETS, description=__doc__)
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed, kernels=cfg.kernels)
    print_config(cfg, "evaluate")   # after setup_runtime: rank 0 alone prints
    if runtime.distributed:
        raise UserError("evaluate.py runs in one process: start it with python, not torchrun")
    start = time.time()

    tokenizer = Tokenizer.from_file(os.path.join(cfg.data_dir, "tokenizer.tiktoken"))
    prompts_file = cfg.prompts or os.path.join(cfg.data_dir, "eval_prompts.jsonl")
    prompts = read_prompts(prompts_file)
    prompts = prompts[:cfg.max_prompts] if cfg.max_prompts else prompts
    longest_prompt = max(len(render_chat(tokenizer, p)) for p in prompts)
    checkpoints, notes = checkpoint_list(cfg)
    reference_path = cfg.reference or os.path.join(cfg.out_dir, "sft.pt")
    reference, reference_ckpt = None, None
    if os.path.exists(reference_path):
        reference, reference_ckpt = load_policy(reference_path, tokenizer, runtime)
        check_fits(reference, reference_path, longest_prompt, cfg, prompts_file)
    else:
        notes.append(f"{reference_path} not found: no KL to SFT")
    rm_path = cfg.reward_model or os.path.join(cfg.out_dir, "rm.pt")
    scorer = None
    if cfg.reward_model.lower() != "none":
        if os.path.exists(rm_path) or cfg.reward_model:
            scorer = load_reward_model(rm_path, tokenizer, runtime)
        else:
            notes.append(f"{rm_path} not found: no RM scores, no best-of-n")
    for note in notes:
        print(f"note: {note}")

    # ---- every model answers every prompt
    sft_label = next((label for label, path in checkpoints.items()
                      if reference is not None and os.path.abspath(path) == os.path.abspath(reference_path)), None)
    all_answers: dict[str, Answers] = {}
    kinds: dict[str, str] = {}
    costs: dict[str, dict] = {}
    for label, path in checkpoints.items():
        t0 = time.time()
        if label == sft_label:
            model, ckpt = reference, reference_ckpt
        else:
            model, ckpt = load_policy(path, tokenizer, runtime)
            check_fits(model, path, longest_prompt, cfg, prompts_file)
        kinds[label], costs[label] = ckpt["kind"], training_cost(ckpt)
        answers = answer(model, reference, tokenizer, prompts, cfg, cfg.samples, runtime)
        if scorer is not None:
            flat_texts = [t for row in answers.texts for t in row]
            answers.rm = scorer.reward(prompts * cfg.samples, flat_texts,
                                      answers.ended.ravel().tolist()).numpy().reshape(answers.gold.shape)
        all_answers[label] = answers
        print(f"{label}: {answers.gold.size} samples + {len(prompts)} greedy from {path}, "
              f"gold {answers.gold.mean():.3f} ({format_duration(time.time() - t0)})")
    summaries = {label: {**summarize(a, prompts), **costs[label]} for label, a in all_answers.items()}

    # ---- win rates: each model against the base and SFT models listed before it
    #      (sft vs base; ppo vs sft, ppo vs base; dpo vs sft, dpo vs base; ...)
    labels = list(all_answers)
    wins = [{"model": a, "baseline": b, **win_rate(all_answers[a].gold, all_answers[b].gold)}
            for i, a in enumerate(labels) for b in reversed(labels[:i]) if kinds[b] in ("base", "sft")]

    # ---- best-of-n from SFT, ranked by the RM; PPO's trajectory from its metrics
    bon, method_points = None, {}
    if cfg.bon_max_n and scorer is not None and sft_label is not None:
        t0 = time.time()
        K = min(cfg.bon_prompts or len(prompts), len(prompts))
        # evenly spaced, not the first K: the prompt file lists one family after another
        subset = evenly_spaced(list(range(len(prompts))), K)
        bon = best_of_n(reference, all_answers[sft_label], tokenizer, prompts, subset, scorer, cfg, runtime)
        if K < len(prompts):
            notes.append(f"best-of-n uses {K} evenly spaced prompts of the {len(prompts)} (--bon-prompts)")
            print(f"note: {notes[-1]}")
        print(f"best-of-n from SFT on {K} prompts x {bon['samples_per_prompt']} samples: gold " +
              ", ".join(f"n={n} {g:.3f}" for n, g in zip(bon["n"], bon["gold"])) +
              f" ({format_duration(time.time() - t0)})")
        # every trained method on the same prompts, for the comparison with best-of-n at equal KL
        for label in labels:
            a = all_answers[label]
            if kinds[label] in ("base", "sft") or a.kl is None:
                continue
            kl = float(a.kl[:, subset].mean())
            method_points[label] = {
                "model": label, "kind": kinds[label], "gold": float(a.gold[:, subset].mean()), "kl": kl,
                "d": float(sqrt_kl(kl)), "rm": float(a.rm[:, subset].mean()),
                "win_rate": win_rate(a.gold[:, subset], all_answers[sft_label].gold[:, subset])["win_rate"]}
    elif cfg.bon_max_n and scorer is not None:
        notes.append(f"no best-of-n: it samples from the SFT model, and {reference_path} is not among the checkpoints")
        print(f"note: {notes[-1]}")
    ppo_point = next((p for p in reversed(method_points.values()) if p["kind"] == "ppo"), None)
    trajectory = ppo_trajectory(os.path.join(cfg.out_dir, "ppo_metrics.jsonl"))
    fits = gao_fits(bon, trajectory)

    # ---- outputs
    report = {"config": asdict(cfg), "prompts_file": prompts_file, "prompts": len(prompts),
              "checkpoints": checkpoints, "kinds": kinds, "notes": notes, "models": summaries, "win_rates": wins,
              "best_of_n": bon, "ppo_on_bon_prompts": ppo_point, "methods_on_bon_prompts": method_points,
              "ppo_trajectory": trajectory, "fits": fits,
              "seconds": time.time() - start}
    paths = {name: os.path.join(cfg.out_dir, name) for name in ("eval.json", "eval.md", "eval.png", "eval_bon.png")}
    with atomic_write(paths["eval.json"], "w") as f:
        json.dump(json_safe(report), f, indent=2, allow_nan=False)
    write_report(paths["eval.md"], cfg, report, all_answers, prompts)
    plot_overview(summaries, wins, len(prompts), paths["eval.png"])
    plot_bon(bon, trajectory, fits, method_points, paths["eval_bon.png"])
    print()
    print_summary(summaries, wins)
    print(f"done in {format_duration(time.time() - start)}; wrote {', '.join(paths.values())}")


if __name__ == "__main__":
    run_main(main)
