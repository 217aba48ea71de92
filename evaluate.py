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
import os
import time
from dataclasses import asdict, dataclass

from minirlhf.checkpoint import atomic_write, load_policy
from minirlhf.cli import UserError, option, parse_config, print_config, run_main
from minirlhf.data import evenly_spaced, read_prompts
from minirlhf.eval_report import json_safe, plot_bon, plot_overview, print_summary, write_report
from minirlhf.evaluation import Answers, answer, best_of_n, gao_fits, ppo_trajectory, summarize_answers
from minirlhf.metrics import format_duration
from minirlhf.reward import load_reward_model
from minirlhf.runtime import setup_runtime
from minirlhf.stats import sqrt_kl, win_rate
from minirlhf.tokenizer import Tokenizer, render_chat


@dataclass
class EvalConfig:
    preset: str = option("tiny", "size preset: smoke (tests), tiny (CPU), medium (~26M, one GPU), small (GPT-2 small "
                                 "shape, GPU)")
    data_dir: str = option("data", "where the prompts and the tokenizer are")
    out_dir: str = option("out", "where the checkpoints are and the report goes")
    checkpoints: list[str] = option([], "policy checkpoints to compare (default: base.pt, sft.pt, ppo.pt in OUT_DIR, "
                                        "those that exist)")
    prompts: str = option("", "prompts JSONL (default: DATA_DIR/eval_prompts.jsonl)")
    reference: str = option("", "the SFT checkpoint KL is measured against (default: OUT_DIR/sft.pt)")
    reward_model: str = option("", "reward model for RM scores and best-of-n (default: OUT_DIR/rm.pt if it exists; "
                                   "'none': skip)")
    max_prompts: int = option(0, "use the first N prompts (0: all)", min=0)
    samples: int = option(4, "samples per prompt and model at --temperature", min=1)
    temperature: float = option(1.0, "sampling temperature", min=1e-3)
    max_new_tokens: int = option(48, "response budget (as in training)", min=1)
    bon_max_n: int = option(32, "best-of-n for n = 1, 2, 4, ... up to this (0: skip)", min=0)
    bon_prompts: int = option(32, "prompts used for best-of-n, the expensive part (0: all)", min=0)
    side_by_side: int = option(8, "prompts shown answered side by side in eval.md", min=0)
    batch_size: int = option(128, "sequences sampled at once", min=1)
    device: str = option("auto", "auto, cpu or cuda", choices=["auto", "cpu", "cuda"])
    dtype: str = option("auto", "precision: auto (bf16 on a GPU that has it, else fp32), fp32 or bf16 (autocast; "
                                "weights stay fp32)", choices=["auto", "fp32", "bf16"])
    seed: int = option(1337, "random seed (every model samples with the same seed)")
    kernels: str = option("auto", "logprob/GAE kernels: auto (fused) or reference", choices=["auto", "reference"])
    debug: bool = option(False, "show tracebacks")


PRESETS = {
    "smoke": dict(max_prompts=12, samples=2, max_new_tokens=24, bon_max_n=8, bon_prompts=6, side_by_side=3),
    "tiny": {},
    "medium": {},
    "small": dict(samples=8, bon_prompts=0),
}
DEFAULT_STAGES = ("base", "sft", "ppo")          # a note says when one of these is missing
METHODS = ("dpo", "grpo", "rloo", "expert")      # evaluated when present (train_dpo.py, train_grpo.py, train_expert.py)


# --------------------------------------------------------------------------------------------------
# Which checkpoints, and what they cost


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
        reference, reference_ckpt = load_policy(reference_path, tokenizer.identity, runtime)
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
            model, ckpt = load_policy(path, tokenizer.identity, runtime)
            check_fits(model, path, longest_prompt, cfg, prompts_file)
        kinds[label], costs[label] = ckpt["kind"], training_cost(ckpt)
        answers = answer(model, tokenizer, prompts, samples=cfg.samples, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, seed=cfg.seed, batch_size=cfg.batch_size, runtime=runtime,
                         reference=reference, reward_scorer=scorer)
        all_answers[label] = answers
        print(f"{label}: {answers.gold.size} samples + {len(prompts)} greedy from {path}, "
              f"gold {answers.gold.mean():.3f} ({format_duration(time.time() - t0)})")
    summaries = {label: {**summarize_answers(a, prompts), **costs[label]} for label, a in all_answers.items()}

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
        bon = best_of_n(reference, all_answers[sft_label], tokenizer, prompts, subset, scorer, max_n=cfg.bon_max_n,
                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                        batch_size=cfg.batch_size, runtime=runtime)
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
    write_report(paths["eval.md"], report, all_answers, prompts)
    plot_overview(summaries, wins, len(prompts), paths["eval.png"])
    plot_bon(bon, trajectory, fits, method_points, paths["eval_bon.png"])
    print()
    print_summary(summaries, wins)
    print(f"done in {format_duration(time.time() - start)}; wrote {', '.join(paths.values())}")


if __name__ == "__main__":
    run_main(main)
