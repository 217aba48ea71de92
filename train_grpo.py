"""Step 3 without a critic: GRPO, Dr. GRPO and RLOO, with a KL penalty to the SFT model.

Reads  out/sft.pt (the policy's start and the frozen reference), out/rm.pt (the reward model; with
       --reward gold only for the logs), data/ppo_prompts.jsonl, data/eval_prompts.jsonl
Writes out/grpo.pt (kind "grpo": --advantage grpo or drgrpo) or out/rloo.pt (kind "rloo"),
       with out/<kind>_metrics.jsonl and out/<kind>_curves.png

PPO (train_ppo.py) learns a critic V(state) and uses it as the baseline of every token: the
advantage says "this token did better than the critic expected". The methods here sample k
responses to each prompt instead and let the group be the baseline: a response's advantage is how
much better it scored than its siblings, one number for the whole response, given to each of its
tokens. No value model to train, store or initialise - and no per-token credit assignment.

    --advantage grpo     A = (s - mean) / (std + eps)    GRPO (Shao et al. 2024, DeepSeekMath)
    --advantage drgrpo   A =  s - mean                   Dr. GRPO (Liu et al. 2025): no division by
                                                         the std, which upweights the prompts whose
                                                         samples all score alike (too easy or too hard)
    --advantage rloo     A =  s - mean of the k-1 others RLOO (Kool et al. 2019; Ahmadian et al. 2024)
                           = k/(k-1) * (s - mean)        i.e. Dr. GRPO's advantage times a constant

(`losses.grpo_advantages`, `losses.rloo_advantages`; s is a response's score, mean and std are
over its group of k.) Dr. GRPO's other fix, dropping GRPO's per-response 1/|o_i| (which favours
long wrong answers and short right ones), is already this project's convention: every loss is one
mean over all valid tokens of the minibatch. Dr. GRPO writes grpo.pt (kind "grpo", with
`advantage: drgrpo` in its train_config): it is GRPO with a switch off, not another method, and a
third checkpoint kind would only make evaluate.py and the README list one more file; RLOO has its
own kind because it is the other baseline.

The update is PPO's clipped surrogate (`losses.ppo_policy_loss`) over --ppo-epochs passes of
--num-minibatches minibatches, with the old logprobs recomputed over the first epoch's very
minibatches so that the first one has ratio exactly 1 (as minirlhf/ppo.py explains). RLOO in
Ahmadian et al. is plain REINFORCE, one on-policy step per batch: `--ppo-epochs 1 --num-minibatches 1`
is exactly that (ratio 1, so the clip never acts and the gradient is REINFORCE's).

Where the KL to the SFT model goes (--kl-mode):
    reward  PPO's way, as a per-token penalty -beta * kl_t (k1 = log pi/pi_ref, at rollout time).
            A group baseline compares whole responses, so the per-token rewards are summed first:
            s' = s - beta * sum_t kl_t, and the group advantages are taken on s' (as RLOO does).
    loss    GRPO's way (Shao et al. 2024, eqs. 3-4): beta * k3 per token, k3 = pi_ref/pi - log(pi_ref/pi) - 1
            under the CURRENT policy, added to the loss (a token mean, like the surrogate); the
            scores stay the task's own.
Beware of --kl-mode reward with --advantage grpo: in a group of different responses with equal
scores (a discrete reward such as --reward gold makes them), the only differences left are the KL
terms, and dividing by their tiny std makes them full-size advantages. `group/zero_std_share` logs
the groups whose k scores are equal: on the tiny preset a quarter of them with the RM and 31% with
--reward gold, rising as the policy grows less diverse. The ones checked (64 groups sampled from
sft.pt: 5 equal, by the RM and by gold alike) were k identical responses, whose KL is equal too.

Defaults, measured (tiny preset, 2 CPU cores, the sft.pt and rm.pt of `run_all.py --until rm`):
16 prompts x k = 4 = 64 responses per update, as PPO's 64 prompts x 1, and 48 updates as PPO, so
both draw 3,072 samples. Held-out gold at the last update (48 prompts x 2; SFT 6.91; gain in SFT
standard deviations, whose standard error here is about 0.1) and the KL to SFT:

    run (all else default)                 gold   gain    KL    minutes
    GRPO, KL in the reward, beta 0.2       7.15  +0.20   1.02   1.0     <- the default
    RLOO, same                             7.20  +0.24   1.29   1.1
    Dr. GRPO, same                         7.24  +0.28   0.92
    GRPO, beta 0.2, 96 updates             7.26  +0.29   1.27
    GRPO, KL in the reward, beta 0.1       6.48  -0.37   4.17           (the RM over-optimised)
    GRPO, KL in the loss, beta 0.1         5.53  -1.19  21.5            (responses 9.5 -> 18.8 tokens)
    GRPO, KL in the loss, beta 0.3         6.79  -0.11   1.99
    GRPO, KL in the loss, beta 1.0         6.75  -0.14   0.24
    PPO (train_ppo.py, adaptive beta)      7.24  +0.28   0.86   1.6

So the KL goes in the reward by default (at every beta tried, the loss-mode runs lost gold), with
beta 0.2, PPO's starting beta, at which the KL settles near PPO's 1-nat target on its own. The
three baselines cannot be told apart at this noise, and all three are within it of PPO's gain, on
as many samples, in about two thirds of its time (no critic to run or train). Minutes: one
process, two threads, an otherwise idle machine; the other runs, made two at a time on a shared
machine, have no comparable time.

CPU:  python train_grpo.py                          (preset tiny, GRPO, ~1 minute on 2 cores)
      python train_grpo.py --advantage rloo         (writes out/rloo.pt)
      python train_grpo.py --advantage drgrpo
      python train_grpo.py --reward gold            (optimise the gold score itself)
      python train_grpo.py --preset smoke
GPU:  python train_grpo.py --preset small --device cuda
torchrun --standalone --nproc_per_node=2 train_grpo.py --preset small --device cuda
      (the --batch-size prompts are split over the processes; each samples all k responses of its
       prompts, so a group never straddles two processes and its advantages need no communication)
Resume an interrupted run:  python train_grpo.py --resume   (same flags as the first run, --advantage
      included: every --save-every updates grpo.pt/rloo.pt is written, marked unfinished, with the
      optimizer, beta, the dice, the prompts of this pass not drawn yet and the held-out baseline -
      `ppo.save_run`, as train_ppo.py - so the resumed run ends as if it had never stopped)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from minirlhf.checkpoint import load_policy
from minirlhf.cli import UserError, make_out_dir, option, parse_config, print_config, run_main
from minirlhf.data import read_sampling_prompts
from minirlhf.evaluation import HeldOutEvaluation
from minirlhf.losses import (FixedKLController, grpo_advantages, kl_penalty, masked_mean, ppo_policy_loss,
                             rloo_advantages)
from minirlhf.metrics import MetricsLogger, Progress, read_metrics
from minirlhf.plots import plot_curves
from minirlhf.ppo import (RLConfig, Rollout, draw_prompts, fit_gold_normaliser, mean_over_minibatches, means_over_ranks,
                          minibatch_orders, minibatch_stats, optimizer_step, policy_logprobs, resume_run,
                          rollout_logprobs, save_run, score_rollout, token_share)
from minirlhf.reward import load_reward_model
from minirlhf.runtime import Runtime, setup_runtime
from minirlhf.tokenizer import Tokenizer
from minirlhf.training import cosine_lr, sample_responses, set_lr, unwrap

ADVANTAGES = ("grpo", "drgrpo", "rloo")


@dataclass
class GRPOConfig(RLConfig):
    """GRPO's and RLOO's own options; the ones shared with PPO are `RLConfig`'s (minirlhf/ppo.py)."""

    advantage: str = option("grpo", "the group baseline: grpo ((s - mean) / std), drgrpo (s - mean) or rloo (s - mean "
                                    "of the others; writes rloo.pt)", choices=list(ADVANTAGES))
    batch_size: int = option(16, "prompts per update (all processes together)", min=1)
    group_size: int = option(4, "k: responses sampled per prompt (the group)", min=2)
    kl_mode: str = option("reward", "where the KL to the SFT model goes: loss (beta * k3 per token in the loss, GRPO) "
                                    "or reward (score - beta * summed k1, before the group baseline)", choices=["loss", "reward"])
    kl_coef: float = option(0.2, "KL coefficient beta (fixed)", min=0.0)
    eps: float = option(1e-4, "added to the group std (--advantage grpo)", min=0.0)


PRESETS = {
    "smoke": dict(total_updates=3, batch_size=4, group_size=2, num_minibatches=2, max_new_tokens=16, eval_every=2,
                  eval_prompts=4, eval_samples=1, sample_every=2, save_every=2, warmup_updates=0),
    "tiny": {},
    "medium": {},
    # not measured: PPO's small settings, with 32 prompts x 4 = PPO's 128 responses per update
    "small": dict(total_updates=200, batch_size=32, ppo_epochs=4, lr=1.4e-5, eval_prompts=111, eval_samples=4,
                  max_new_tokens=64),
}


def check_processes(cfg: GRPOConfig, world_size: int) -> None:
    """Under torchrun each process takes --batch-size / processes prompts and all k responses of
    each, and cuts its responses into --num-minibatches (the same number everywhere: DDP steps in
    lockstep). A one-line error when that cannot be done."""
    if cfg.batch_size % world_size:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {world_size} processes")
    rows = cfg.batch_size // world_size * cfg.group_size
    if cfg.num_minibatches > rows:
        raise UserError(f"--num-minibatches {cfg.num_minibatches} must be <= the responses per process "
                        f"(--batch-size / processes x --group-size = {rows})")


# ----------------------------------------------------------------------------------------------
# The pieces of one update (PPO's, less the critic)
# ----------------------------------------------------------------------------------------------


def group_advantages(scores: torch.Tensor, kl_per_response: torch.Tensor, *, group_size: int, advantage: str,
                     kl_mode: str, kl_coef: float, eps: float = 1e-4) -> torch.Tensor:
    """One advantage per response, from its group alone.

    scores, kl_per_response: (B,) for B = P * k responses, each prompt's k in consecutive rows (row
    i is in group i // k); kl_per_response is sum_t kl_t (k1) at rollout time. With --kl-mode
    reward the KL joins the score before the baseline, s' = s - kl_coef * kl (PPO's per-token
    penalty, summed: a group compares whole responses); with --kl-mode loss the scores are used as
    they are (the KL is in the loss instead). Returns (B,).
    """
    if kl_mode == "reward":
        scores = scores - kl_coef * kl_per_response
    groups = scores.view(-1, group_size)                                       # (P, k)
    if advantage == "rloo":
        return rloo_advantages(groups).view(-1)
    return grpo_advantages(groups, eps=eps, scale=advantage == "grpo").view(-1)


def grpo_update(rollout: Rollout, policy, optimizer, *, orders: list[list[torch.Tensor]], temperature: float,
                clip_range: float, kl_mode: str, kl_coef: float, grad_clip: float = 1.0, step: int = 0,
                runtime: Runtime | None = None) -> dict:
    """--ppo-epochs passes over the rollout's minibatches; one optimizer step per minibatch.

        loss = ppo_policy_loss(logp, old_logp, A)                    (A: the response's, on each token)
             + kl_coef * masked_mean(k3(logp, ref_logp))             (--kl-mode loss only)

    Both terms are means over the minibatch's valid tokens; under torchrun each rank's loss is
    scaled by `ppo.token_share` so that DDP's averaged gradient is the one of the mean over every
    rank's tokens. `policy` is the module the training forwards go through (`runtime.wrap(policy)`).
    The pieces are train_ppo.py's (`ppo.optimizer_step`, `ppo.minibatch_stats`), less the critic.
    Returns PPO's stat names, means over the minibatches, plus `minibatch_stats` (the first has ratio 1).
    """
    runtime = runtime or Runtime(device=rollout.sequences.device)
    if runtime.distributed and unwrap(policy) is policy:
        raise ValueError("under torchrun, pass grpo_update the DDP-wrapped policy (runtime.wrap(policy))")
    policy.eval()   # dropout off: eval() only switches dropout; gradients flow as in train()
    stats = []
    for epoch_minibatches in orders:
        for index in epoch_minibatches:
            batch = rollout.select(index)
            mask = batch.response_mask
            share = token_share(mask.sum().item(), runtime)   # 1.0 in one process
            logprobs, entropy = policy_logprobs(policy, batch, temperature)                     # (b, R')
            policy_loss, policy_stats = ppo_policy_loss(logprobs, batch.logprobs, batch.advantages, mask, clip_range)
            loss = policy_loss
            kl_stats = {}
            if kl_mode == "loss":
                ref_logprobs = rollout.ref_logprobs[index.to(mask.device), :mask.shape[1]]     # (b, R')
                kl_loss = masked_mean(kl_penalty(logprobs, ref_logprobs, "k3"), mask)
                loss = loss + kl_coef * kl_loss
                kl_stats["loss/kl"] = (kl_loss.item(), mask.sum().item())
            grad_norm = optimizer_step(optimizer, policy, loss * share, grad_clip=grad_clip, step=step,
                                       what="the policy loss")   # under DDP: averaged over the ranks
            stats.append(minibatch_stats(runtime, mask, policy_stats=policy_stats, entropy=entropy,
                                         policy_grad_norm=grad_norm, extra=kl_stats))
    return {**mean_over_minibatches(stats), "minibatch_stats": stats}


def group_stats(task_scores: torch.Tensor, advantages: torch.Tensor, group_size: int, runtime: Runtime) -> dict:
    """What the group baseline had to work with, over every rank's groups: the share of groups whose
    k task scores are all equal (no response better than another: zero advantage, nothing to learn
    but the KL), the mean within-group std of the scores, and the mean |advantage|."""
    groups = task_scores.view(-1, group_size)                                 # (P, k)
    zero = (groups == groups[:, :1]).all(dim=1).float()                       # (P,)
    n_groups = groups.shape[0]
    return means_over_ranks(runtime, {
        "group/zero_std_share": (zero.mean().item(), n_groups),
        "group/score_std": (groups.std(dim=1).mean().item(), n_groups),
        "group/advantage_abs": (advantages.abs().mean().item(), len(advantages)),
    })


# ----------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------


def main() -> None:
    cfg = parse_config(GRPOConfig, PRESETS, description=__doc__)
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed, kernels=cfg.kernels)
    print_config(cfg, "train_grpo")   # after setup_runtime: under torchrun rank 0 alone prints
    check_processes(cfg, runtime.world_size)
    kind = "rloo" if cfg.advantage == "rloo" else "grpo"
    k = cfg.group_size

    # ---- models: policy (trained), reference (frozen SFT), reward model (frozen). No critic.
    tokenizer = Tokenizer.from_file(os.path.join(cfg.data_dir, "tokenizer.tiktoken"))
    init_path = cfg.init or os.path.join(cfg.out_dir, "sft.pt")
    policy, _ = load_policy(init_path, tokenizer.identity, runtime)
    ref_policy, _ = load_policy(init_path, tokenizer.identity, runtime)
    ref_policy.requires_grad_(False)
    rm_path = cfg.reward_model or os.path.join(cfg.out_dir, "rm.pt")
    reward_scorer = None
    if cfg.reward == "rm" or os.path.exists(rm_path):
        reward_scorer = load_reward_model(rm_path, tokenizer, runtime)
    else:
        print(f"note: {rm_path} not found: no RM score in the logs")
    optimizer = policy.configure_optimizer(0.0, cfg.lr)
    kl_controller = FixedKLController(cfg.kl_coef)   # beta is fixed here; saved and resumed as PPO's

    # ---- prompts
    prompts, eval_prompts = read_sampling_prompts(cfg, tokenizer, policy.config.block_size)
    if runtime.is_main:
        make_out_dir(cfg.out_dir)   # a file, or read-only: one line now, not at the first save
    rng = runtime.cpu_generator(cfg.seed)            # prompt order, minibatches: the same on every rank
    sample_generator = runtime.generator(cfg.seed)   # the policy's sampling: each rank its own dice

    # ---- resume: grpo.pt (rloo.pt) holds the weights and, for --resume, the rest of the run's state
    out_path = os.path.join(cfg.out_dir, f"{kind}.pt")
    metrics_path = os.path.join(cfg.out_dir, f"{kind}_metrics.jsonl")
    run_state = dict(policy=policy, policy_optimizer=optimizer, kl_controller=kl_controller, rng=rng,
                     sample_generator=sample_generator)
    start_update, prompt_order, gold_normaliser, baseline = 0, [], None, {}
    if cfg.resume:
        start_update, prompt_order, gold_normaliser, baseline = resume_run(out_path, cfg.total_updates, kind=kind,
                                                                           tokenizer=tokenizer, runtime=runtime,
                                                                           **run_state)
    kl_coef = kl_controller.value         # fixed: --kl-coef, or the interrupted run's
    train_policy = runtime.wrap(policy)   # DDP under torchrun: its backward averages the gradients

    # evaluate(update): train_ppo.py's held-out evaluation; the first call (the SFT policy) fills `baseline`
    evaluate = HeldOutEvaluation(policy, ref_policy, tokenizer, eval_prompts, samples_per_prompt=cfg.eval_samples,
                                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                                 batch_size=cfg.batch_size * k, runtime=runtime, reward_scorer=reward_scorer,
                                 baseline=baseline)

    # ---- the loop
    print(f"{cfg.advantage.upper()}: {cfg.total_updates} updates x {cfg.batch_size} prompts x {k} samples, "
          f"reward = {cfg.reward}, KL in the {cfg.kl_mode} (beta {kl_coef:g}), {len(prompts)} prompts, "
          f"{len(eval_prompts)} x {cfg.eval_samples} held-out samples per evaluation")
    if runtime.distributed:
        print(f"data parallel: {runtime.world_size} processes x {cfg.batch_size // runtime.world_size} prompts x {k} "
              f"samples ({runtime.device}, {runtime.dtype})")
    progress = Progress(cfg.total_updates, desc=kind, every=1, start=start_update)
    start = time.time()
    summary: dict = {}
    with MetricsLogger(metrics_path, resume_step=start_update if cfg.resume else None,
                       enabled=runtime.is_main) as log:
        if start_update == 0 and eval_prompts:
            log.log(0, **evaluate(0))
        for update in range(start_update, cfg.total_updates):
            t0 = time.time()
            lr_scale = cosine_lr(update, cfg.total_updates, 1.0, cfg.warmup_updates, cfg.min_lr_ratio)
            set_lr(optimizer, cfg.lr * lr_scale)

            # 1. rollout: every rank draws the same B prompts and takes its share; each of its
            #    prompts is sampled k times, in consecutive rows: row i belongs to group i // k
            batch_prompts = runtime.shard(draw_prompts(prompts, prompt_order, cfg.batch_size, rng))   # B / ranks
            rows = [p for p in batch_prompts for _ in range(k)]                                  # (B / ranks) * k
            texts, _, (generation,) = sample_responses(policy, tokenizer, rows, max_new_tokens=cfg.max_new_tokens,
                                                       temperature=cfg.temperature, generator=sample_generator,
                                                       batch_size=len(rows))   # one batch: one Generation

            # 2. scores: the RM's (normalised, the missing-EOS penalty) or gold's, as PPO's
            if cfg.reward == "gold" and gold_normaliser is None:   # the SFT samples' gold mean and sd
                gold_normaliser = fit_gold_normaliser(generation, rows, texts, runtime)
            scores, gold, rm = score_rollout(generation, rows, texts, reward=cfg.reward, reward_scorer=reward_scorer,
                                             gold_normaliser=gold_normaliser or (0, 1),
                                             missing_eos_penalty=cfg.missing_eos_penalty)
            rollout = Rollout.from_generation(generation, scores)
            rollout_seconds = time.time() - t0

            # 3. old and reference logprobs, over the first epoch's minibatches (ratio 1 on the first)
            orders = minibatch_orders(rollout.batch_size, cfg.num_minibatches, cfg.ppo_epochs, rng)
            rollout.logprobs, rollout.entropy = rollout_logprobs(policy, rollout, orders[0], cfg.temperature)
            rollout.ref_logprobs, _ = rollout_logprobs(ref_policy, rollout, orders[0], cfg.temperature)
            mask = rollout.response_mask
            kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, "k1") * mask      # (rows, R), 0 at padding
            kl_per_response = kl.sum(dim=1)                                          # (rows,) nats

            # 4. advantages: one per response, from its group alone (no critic); the KL joins the
            #    score first in --kl-mode reward, the loss in --kl-mode loss
            advantages = group_advantages(rollout.scores, kl_per_response, group_size=k, advantage=cfg.advantage,
                                          kl_mode=cfg.kl_mode, kl_coef=kl_coef, eps=cfg.eps)   # (rows,)
            rollout.advantages = advantages[:, None] * mask                          # each token its response's
            record = means_over_ranks(runtime, {
                "objective/scores": (rollout.scores.mean().item(), len(rows)),
                "objective/kl": (kl_per_response.mean().item(), len(rows)),
                "objective/rlhf_reward": ((rollout.scores - kl_coef * kl_per_response).mean().item(), len(rows)),
                "objective/entropy": (masked_mean(rollout.entropy, mask).item(), mask.sum().item()),
                "objective/gold": (gold.float().mean().item(), len(rows)),
                **({"objective/rm": (rm.mean().item(), len(rows))} if rm is not None else {}),
                "response_length": (mask.sum(dim=1).mean().item(), len(rows)),
                "eos_rate": (rollout.ended.float().mean().item(), len(rows)),
            })
            record.update(group_stats(rollout.scores, advantages, k, runtime))

            # 5. clipped-surrogate epochs; no value loss
            t1 = time.time()
            update_stats = grpo_update(rollout, train_policy, optimizer, orders=orders, temperature=cfg.temperature,
                                       clip_range=cfg.clip_range, kl_mode=cfg.kl_mode, kl_coef=kl_coef,
                                       grad_clip=cfg.grad_clip, step=update + 1, runtime=runtime)
            update_stats.pop("minibatch_stats")
            record.update(update_stats)
            (n_tokens,) = runtime.sum_over_ranks(mask.sum().item())
            record.update({"kl_coef": kl_coef, "lr": cfg.lr * lr_scale, "time/rollout_s": rollout_seconds,
                           "time/update_s": time.time() - t1,
                           "time/episodes_per_s": cfg.batch_size * k / (time.time() - t0)})

            step = update + 1
            if step % cfg.sample_every == 0 or step == 1:   # rank 0's first group: the baseline at work
                print(f"  [group] {rows[0]!r}")
                for text, score, advantage in list(zip(texts, scores.tolist(), advantages.tolist()))[:k]:
                    print(f"     score {score:+.2f} advantage {advantage:+.2f} | {text!r}")
            if step == cfg.total_updates or (cfg.eval_every and step % cfg.eval_every == 0):
                record.update(evaluate(step))
            log.log(step, **record)
            progress.log(step, tokens=int(n_tokens), score=record["objective/scores"], gold=record["objective/gold"],
                         kl=record["objective/kl"], zero_std=record["group/zero_std_share"],
                         clipfrac=record["policy/clipfrac"])
            summary = {name: v for name, v in record.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            if step % cfg.save_every == 0 and step < cfg.total_updates:   # (the last one is saved below)
                log.commit()   # the metrics first: a stop during the save leaves them ahead, never behind
                save_run(out_path, step, {**summary, **baseline}, kind=kind, finished=False, cfg=cfg,
                         tokenizer=tokenizer, runtime=runtime, prompt_order=prompt_order,
                         gold_normaliser=gold_normaliser, advantage=cfg.advantage, kl_mode=cfg.kl_mode, **run_state)

    minutes = (time.time() - start) / 60
    summary.update({"minutes": minutes, "samples_drawn": cfg.batch_size * k * cfg.total_updates})
    save_run(out_path, cfg.total_updates, {**summary, **baseline}, kind=kind, cfg=cfg, tokenizer=tokenizer,
             runtime=runtime, prompt_order=prompt_order, gold_normaliser=gold_normaliser, advantage=cfg.advantage,
             kl_mode=cfg.kl_mode, **run_state)   # (every rank: it gathers their sampling dice)
    if not runtime.is_main:
        return   # rank 0 alone plots and reports
    curves = os.path.join(cfg.out_dir, f"{kind}_curves.png")
    plot_curves(read_metrics(metrics_path), [
        {"keys": ["objective/scores", "objective/rlhf_reward", "eval/rm"], "title": "reward (what is maximised)",
         "ylabel": "normalised score"},
        {"keys": ["objective/gold", "eval/gold"], "title": "gold labeler score (never trained on)", "ylabel": "gold total"},
        {"keys": ["objective/kl", "eval/kl"], "title": "KL(policy || SFT) per response", "ylabel": "nats"},
        {"keys": ["group/zero_std_share"], "title": "groups with equal scores (nothing to learn)", "ylabel": "fraction"},
        {"keys": ["group/score_std", "group/advantage_abs"], "title": "within-group score spread, |advantage|",
         "ylabel": "score units"},
        {"keys": ["objective/entropy"], "title": "policy entropy per token", "ylabel": "nats"},
        {"keys": ["policy/clipfrac", "policy/approxkl"], "title": "clipping and approximate KL",
         "ylabel": "fraction / nats"},
        {"keys": ["response_length", "eval/response_length"], "title": "response length", "ylabel": "tokens"},
        {"keys": ["eos_rate", "eval/eos_rate"], "title": "share of responses that end (EOS)", "ylabel": "fraction"},
    ], curves, title=f"{cfg.advantage.upper()} (reward = {cfg.reward}, KL in the {cfg.kl_mode})", xlabel="update")
    if "eval/gold" in summary:
        evaluate.print_result(cfg.advantage.upper(), summary)
    print(f"done in {minutes:.1f} min, {summary['samples_drawn']} samples")
    print(f"wrote {out_path}, {metrics_path}, {curves}")


if __name__ == "__main__":
    run_main(main)
