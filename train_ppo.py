"""Step 3: PPO against the reward model, with a KL penalty to the SFT model.

Reads  out/sft.pt (the policy's start and the frozen reference), out/rm.pt (the reward model, also
       the critic's start), data/ppo_prompts.jsonl, data/eval_prompts.jsonl (held-out judging)
Writes out/ppo.pt, out/ppo_metrics.jsonl, out/ppo_curves.png, out/ppo_overopt.png

InstructGPT section 3.5 ("Reinforcement learning"): maximise, over prompts x and sampled responses y,

    objective = r(x, y) - beta * log(pi(y|x) / pi_sft(y|x))            (eq. 2, without the ptx term)

with PPO (Schulman et al. 2017). The reward model r was trained on rankings; the KL term keeps the
policy near the SFT model, where r was trained and can be trusted. `main()` below is one PPO update
after another, each written out step by step: sample a batch of responses, score them, compute the
old and reference logprobs and the values, per-token KL-shaped rewards, GAE advantages, whiten them,
then a few epochs of clipped policy and value updates, and let the KL controller adjust beta. The
maths is in minirlhf/losses.py and minirlhf/kernels/ (pure functions, graded in tests/), the
batch-handling around it in minirlhf/ppo.py. The gold labeler scores every sample too, for the
logs only: it shows whether the reward model's opinion of "better" is the real one.

CPU:  python train_ppo.py                        (preset tiny, ~3 minutes on 2 cores)
      python train_ppo.py --reward gold          (the upper bound: optimise the gold score itself)
      python train_ppo.py --no-adaptive-kl --kl-coef 0 --total-updates 120
                                                 (no KL penalty: watch the RM get over-optimised)
      python train_ppo.py --preset smoke
GPU:  python train_ppo.py --preset medium --device cuda     (bf16 by default on a GPU)
      python train_ppo.py --preset small --device cuda
Several processes (data parallel): torchrun --standalone --nproc_per_node=2 train_ppo.py --preset smoke
      --batch-size stays the prompts of one update, split evenly over the processes; each samples,
      scores and runs the forward passes of its share with its own dice. Advantages are whitened
      and every logged mean is taken over all processes' samples, and each PPO loss is the mean
      over the tokens of all processes' minibatch (`token_share`, see minirlhf/ppo.py), so an
      update is one process's update on the whole batch. Rank 0 alone prints and writes.
Resume an interrupted run:  python train_ppo.py --resume   (same flags as the first run; ppo.pt is
      written every --save-every updates; under torchrun each process gets back its own sampling state)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from minirlhf.checkpoint import load_policy
from minirlhf.cli import UserError, make_out_dir, option, parse_config, print_config, run_main
from minirlhf.data import random_windows, read_sampling_prompts, read_text
from minirlhf.evaluation import HeldOutEvaluation
from minirlhf.kernels import gae
from minirlhf.losses import (AdaptiveKLController, FixedKLController, kl_shaped_rewards, masked_whiten,
                             ppo_policy_loss, ppo_value_loss)
from minirlhf.metrics import MetricsLogger, Progress, read_metrics
from minirlhf.plots import plot_curves, plot_overoptimisation
from minirlhf.ppo import (RLConfig, Rollout, critic_from_policy, critic_from_reward_model, critic_values,
                          draw_prompts, fit_gold_normaliser, mean_over_minibatches, minibatch_orders, minibatch_stats,
                          optimizer_step, policy_logprobs, resume_run, rollout_logprobs, rollout_stats,
                          rollout_values, save_run, score_rollout, token_share)
from minirlhf.reward import load_reward_model
from minirlhf.runtime import setup_runtime
from minirlhf.tokenizer import Tokenizer
from minirlhf.training import cosine_lr, lm_loss, sample_responses, set_lr


@dataclass
class PPOConfig(RLConfig):
    """PPO's own options. The ones it shares with GRPO (prompts, updates, epochs x minibatches, lr,
    --clip-range, sampling, evaluation) are `RLConfig`'s (minirlhf/ppo.py); `--help` lists them all."""

    batch_size: int = option(64, "prompts (one response each) per rollout", min=1)
    value_lr: float = option(2e-4, "critic learning rate (AdamW)", min=0.0)
    critic_freeze_layers: int = option(2, "freeze the critic's embeddings and lowest N blocks (a cheaper backward pass;"
                                          " 0: train all)", min=0)
    clip_range_value: float = option(0.2, "value clip: how far a value may move from its rollout-time prediction", min=0.0)
    gamma: float = option(1.0, "GAE discount", min=0.0, max=1.0)
    lam: float = option(0.95, "GAE lambda", min=0.0, max=1.0)
    kl_coef: float = option(0.2, "KL penalty beta (the start value when adaptive)", min=0.0)
    adaptive_kl: bool = option(True, "adapt beta towards --kl-target (Ziegler et al. 2019)")
    kl_target: float = option(1.0, "target KL to the reference, nats per response", min=1e-6)
    kl_horizon: float = option(1000.0, "adaptive controller horizon, in samples", min=1.0)
    kl_estimator: str = option("k1", "per-token KL estimator in the reward", choices=["k1", "k2", "k3"])
    target_kl: float = option(0.0, "stop an update early when a minibatch's approximate KL exceeds this (0: off)", min=0.0)
    ptx_coef: float = option(0.0, "weight of the pretraining LM loss (InstructGPT's PPO-ptx); 0: off", min=0.0)
    ptx_batch_size: int = option(8, "pretraining windows per minibatch (PPO-ptx)", min=1)
    ptx_seq_len: int = option(64, "pretraining window length (PPO-ptx)", min=2)


PRESETS = {
    "smoke": dict(total_updates=3, batch_size=8, num_minibatches=2, max_new_tokens=16, eval_every=2,
                  critic_freeze_layers=1,
                  eval_prompts=4, eval_samples=1, sample_every=2, save_every=2, warmup_updates=0),
    "tiny": {},
    "medium": {},
    "small": dict(total_updates=200, batch_size=128, ppo_epochs=4, lr=1.4e-5, value_lr=5e-5, eval_prompts=111,
                  eval_samples=4, kl_horizon=10000.0, kl_target=6.0, max_new_tokens=64),
}


def main() -> None:
    cfg = parse_config(PPOConfig, PRESETS, description=__doc__)
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed, kernels=cfg.kernels)
    print_config(cfg, "train_ppo")   # after setup_runtime: under torchrun rank 0 alone prints
    check_processes(cfg, runtime.world_size)

    # ---- models: the policy pi (trained) and the reference pi_ref (frozen), both the SFT model; the
    # reward model r (frozen); the critic V (trained), which starts as a copy of r (InstructGPT)
    tokenizer = Tokenizer.from_file(os.path.join(cfg.data_dir, "tokenizer.tiktoken"))
    init_path = cfg.init or os.path.join(cfg.out_dir, "sft.pt")
    policy, _ = load_policy(init_path, tokenizer.identity, runtime)
    ref_policy, _ = load_policy(init_path, tokenizer.identity, runtime)
    ref_policy.requires_grad_(False)
    reward_scorer, critic = load_reward_model_and_critic(cfg, tokenizer, policy, runtime)
    policy_optimizer = policy.configure_optimizer(0.0, cfg.lr)
    value_optimizer = critic.configure_optimizer(0.0, cfg.value_lr)
    kl_controller = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                     else FixedKLController(cfg.kl_coef))

    # ---- prompts
    prompts, eval_prompts = read_sampling_prompts(cfg, tokenizer, policy.config.block_size)
    if runtime.is_main:
        make_out_dir(cfg.out_dir)   # a file, or read-only: one line now, not at the first save
    rng = runtime.cpu_generator(cfg.seed)            # prompt order, minibatches, ptx: the same on every rank
    sample_generator = runtime.generator(cfg.seed)   # the policy's sampling: each rank its own dice
    ptx_batch = pretraining_batches(cfg, tokenizer, runtime, rng)

    # ---- resume: ppo.pt holds the weights and, for --resume, the rest of the run's state
    out_path = os.path.join(cfg.out_dir, "ppo.pt")
    metrics_path = os.path.join(cfg.out_dir, "ppo_metrics.jsonl")
    run_state = dict(policy=policy, critic=critic, policy_optimizer=policy_optimizer, value_optimizer=value_optimizer,
                     kl_controller=kl_controller, rng=rng, sample_generator=sample_generator)
    start_update, prompt_order, gold_normaliser, baseline = 0, [], None, {}
    if cfg.resume:
        start_update, prompt_order, gold_normaliser, baseline = resume_run(out_path, cfg.total_updates,
                                                                           tokenizer=tokenizer, runtime=runtime,
                                                                           **run_state)
    # the modules the TRAINING forwards go through: DistributedDataParallel under torchrun (its
    # backward averages the gradients over the ranks), the models themselves in one process. Every
    # model stays in eval() mode, training too: dropout off, and nothing else changes
    train_policy, train_critic = runtime.wrap(policy), runtime.wrap(critic)
    # evaluate(update): the held-out eval/* metrics; the first call (the SFT policy) fills `baseline`
    evaluate = HeldOutEvaluation(policy, ref_policy, tokenizer, eval_prompts, samples_per_prompt=cfg.eval_samples,
                                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                                 batch_size=cfg.batch_size, runtime=runtime, reward_scorer=reward_scorer,
                                 baseline=baseline)

    # ---- the loop: one PPO update per batch of prompts
    print(f"PPO: {cfg.total_updates} updates x {cfg.batch_size} prompts, reward = {cfg.reward}, "
          f"{len(prompts)} prompts, {len(eval_prompts)} x {cfg.eval_samples} held-out samples per evaluation")
    if runtime.distributed:
        print(f"data parallel: {runtime.world_size} processes x {cfg.batch_size // runtime.world_size} prompts "
              f"({runtime.device}, {runtime.dtype})")
    progress = Progress(cfg.total_updates, desc="ppo", every=1, start=start_update)
    start = time.time()
    summary: dict = {}
    with MetricsLogger(metrics_path, resume_step=start_update if cfg.resume else None,
                       enabled=runtime.is_main) as log:
        if start_update == 0 and eval_prompts:
            log.log(0, **evaluate(0))
        for update in range(start_update, cfg.total_updates):
            step = update + 1
            t0 = time.time()
            lr_scale = cosine_lr(update, cfg.total_updates, 1.0, cfg.warmup_updates, cfg.min_lr_ratio)
            set_lr(policy_optimizer, cfg.lr * lr_scale)
            set_lr(value_optimizer, cfg.value_lr * lr_scale)

            # 1. sample y ~ pi(. | x): one response per prompt. Every rank draws the same B prompts
            #    and samples its share, B / W of them (all B in one process), with its own dice
            batch_prompts = runtime.shard(draw_prompts(prompts, prompt_order, cfg.batch_size, rng))
            texts, _, (generation,) = sample_responses(policy, tokenizer, batch_prompts,
                                                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                                       generator=sample_generator,
                                                       batch_size=len(batch_prompts))   # one batch: one Generation

            # 2. score: s = r(x, y), the RM's normalised score (or gold's); -1 if y never ended (no EOS)
            if cfg.reward == "gold" and gold_normaliser is None:
                gold_normaliser = fit_gold_normaliser(generation, batch_prompts, texts, runtime)   # SFT: mean 0, sd 1
            scores, gold, rm = score_rollout(generation, batch_prompts, texts, reward=cfg.reward,
                                             reward_scorer=reward_scorer, gold_normaliser=gold_normaliser or (0, 1),
                                             missing_eos_penalty=cfg.missing_eos_penalty)   # (B,) each
            rollout = Rollout.from_generation(generation, scores)
            mask = rollout.response_mask   # (B, R): 1 on the response's tokens up to and including its EOS
            rollout_seconds = time.time() - t0

            # 3. old logprobs, reference logprobs, values, (B, R) each: no gradient, computed over the very
            #    minibatches the first epoch will use (so that its first minibatch has ratio exactly 1)
            orders = minibatch_orders(rollout.batch_size, cfg.num_minibatches, cfg.ppo_epochs, rng)
            # old logprobs: log pi_old(y_t | x, y_<t), the policy before this update, logits / temperature
            rollout.logprobs, rollout.entropy = rollout_logprobs(policy, rollout, orders[0], cfg.temperature)
            # reference logprobs: log pi_ref(y_t | x, y_<t), the frozen SFT model, the same temperature
            rollout.ref_logprobs, _ = rollout_logprobs(ref_policy, rollout, orders[0], cfg.temperature)
            # values: V_t = V(x, y_<t), the critic's estimate of the return from the state before token t
            rollout.values = rollout_values(critic, rollout, orders[0])

            # 4. per-token KL and KL-shaped rewards: kl_t = log pi_old(y_t) - log pi_ref(y_t) (k1, --kl-estimator),
            #    r_t = -beta * kl_t, plus s on the last valid token (the EOS): sum_t r_t = s - beta * KL
            kl_coef = kl_controller.value
            rollout.rewards, rollout.kl = kl_shaped_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs,
                                                            mask, kl_coef, kl_kind=cfg.kl_estimator)   # (B, R) each

            # 5. GAE advantages and returns: delta_t = r_t + gamma * V_{t+1} - V_t,
            #    A_t = delta_t + gamma * lam * A_{t+1} (nothing past the last valid token), R_t = A_t + V_t
            advantages, rollout.returns = gae(rollout.rewards, rollout.values, mask, cfg.gamma, cfg.lam)

            # 6. whitened advantages: A_t <- (A_t - mean) / std over every rank's valid tokens (after R_t: trap)
            rollout.advantages = masked_whiten(advantages, mask, all_reduce=runtime.all_reduce_sum)
            # the logged objective/*, means over every rank's rows: objective/kl = mean over responses of sum_t kl_t
            record = rollout_stats(rollout, kl_coef, runtime, gold=gold, rm=rm)

            # 7. PPO epochs: every sample once per epoch, in shuffled minibatches; each minibatch
            #    steps the policy (clipped surrogate) and the critic (clipped value loss)
            t1 = time.time()
            stats, epochs_run, stopped_early = [], 0, False
            for minibatches in orders:
                if stopped_early:
                    break
                epochs_run += 1
                for index in minibatches:
                    batch = rollout.select(index)   # these rows, trimmed to the columns they use: (b, R')
                    share = token_share(batch.response_mask.sum().item(), runtime)   # 1.0 in one process
                    # policy: ratio_t = pi(y_t) / pi_old(y_t) = exp(logp_t - old_logp_t)  (1 on the first minibatch)
                    #   L_clip = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))
                    #   policy_stats: clipfrac = share of tokens where the clipped term is the larger,
                    #                 approxkl = mean_t (logp_t - old_logp_t)^2 / 2
                    logprobs, entropy = policy_logprobs(train_policy, batch, cfg.temperature)   # (b, R'), with gradient
                    policy_loss, policy_stats = ppo_policy_loss(logprobs, batch.logprobs, batch.advantages,
                                                                batch.response_mask, cfg.clip_range)
                    loss = policy_loss * share   # this rank's share of the global minibatch's token mean
                    ptx_stats = {}
                    if ptx_batch is not None:    # PPO-ptx: + ptx_coef * LM loss on pretraining text
                        ptx_inputs, ptx_targets = ptx_batch()
                        ptx_loss = lm_loss(train_policy, ptx_inputs, ptx_targets)
                        loss = loss + cfg.ptx_coef * ptx_loss
                        ptx_stats["loss/ptx"] = (ptx_loss.item(), ptx_targets.numel())
                    policy_grad_norm = optimizer_step(policy_optimizer, train_policy, loss, grad_clip=cfg.grad_clip,
                                                      step=step, what="the policy loss")   # backward, clip, step
                    # critic: L_V = 0.5 * mean_t max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2)
                    values = critic_values(train_critic, batch)                           # (b, R'), with gradient
                    value_loss, value_stats = ppo_value_loss(values, batch.values, batch.returns,
                                                             batch.response_mask, cfg.clip_range_value)
                    value_grad_norm = optimizer_step(value_optimizer, train_critic, value_loss * share,
                                                     grad_clip=cfg.grad_clip, step=step, what="the value loss")
                    # the minibatch's stats over every rank's tokens; stop early past --target-kl (every rank)
                    stats.append(minibatch_stats(runtime, batch.response_mask, policy_stats=policy_stats,
                                                 entropy=entropy, policy_grad_norm=policy_grad_norm,
                                                 value_stats=value_stats, value_grad_norm=value_grad_norm,
                                                 extra=ptx_stats))
                    if cfg.target_kl > 0 and stats[-1]["policy/approxkl"] > cfg.target_kl:
                        stopped_early = True   # the policy moved too far from pi_old: end this update
                        break
            record.update(mean_over_minibatches(stats))
            record.update({"val/vf_loss": record["loss/value"], "policy/epochs": epochs_run,
                           "policy/early_stop": float(stopped_early)})

            # 8. KL controller, with this batch's KL = objective/kl (nats per response; fixed beta: no change):
            #    beta <- beta * (1 + clip(KL / kl_target - 1, -0.2, 0.2) * B / kl_horizon)
            kl_controller.update(record["objective/kl"], cfg.batch_size)

            # ---- logs, held-out evaluation, ppo.pt every --save-every updates
            (n_tokens,) = runtime.sum_over_ranks(mask.sum().item())   # every rank's (progress line)
            record.update({"kl_coef": kl_coef, "lr": cfg.lr * lr_scale, "time/rollout_s": rollout_seconds,
                           "time/update_s": time.time() - t1,
                           "time/episodes_per_s": cfg.batch_size / (time.time() - t0)})
            if step % cfg.sample_every == 0 or step == 1:   # (rank 0's samples)
                for prompt, text, score, g in list(zip(batch_prompts, texts, scores.tolist(), gold.tolist()))[:3]:
                    print(f"  [sample] {prompt!r} -> {text!r} | score {score:+.2f} | gold {g:.2f}")
            if step == cfg.total_updates or (cfg.eval_every and step % cfg.eval_every == 0):
                record.update(evaluate(step))
            log.log(step, **record)
            progress.log(step, tokens=int(n_tokens), score=record["objective/scores"], gold=record["objective/gold"],
                         kl=record["objective/kl"], beta=kl_coef, clipfrac=record["policy/clipfrac"])
            summary = {k: v for k, v in record.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            if step % cfg.save_every == 0 or step == cfg.total_updates:
                log.commit()   # the metrics first: a stop during the save leaves them ahead, never behind
                save_run(out_path, step, {**summary, **baseline}, cfg=cfg, tokenizer=tokenizer, runtime=runtime,
                         prompt_order=prompt_order, gold_normaliser=gold_normaliser, **run_state)

    minutes = (time.time() - start) / 60
    summary["minutes"] = minutes
    save_run(out_path, cfg.total_updates, {**summary, **baseline}, cfg=cfg, tokenizer=tokenizer, runtime=runtime,
             prompt_order=prompt_order, gold_normaliser=gold_normaliser, **run_state)
    if not runtime.is_main:
        return   # rank 0 alone plots and reports
    curves, overopt = plot_run(cfg, metrics_path)
    if "eval/gold" in summary:
        evaluate.print_result("PPO", summary)
    print(f"done in {minutes:.1f} min")
    print(f"wrote {out_path}, {metrics_path}, {curves}, {overopt}")


# ----------------------------------------------------------------------------------------------
# Helpers: the reward model and the critic, PPO-ptx's batches, the processes, the plots
# ----------------------------------------------------------------------------------------------


def load_reward_model_and_critic(cfg: PPOConfig, tokenizer: Tokenizer, policy, runtime):
    """The reward model (frozen; None with --reward gold and no rm.pt) and the critic (trained): a
    copy of the reward model (InstructGPT), or the SFT trunk with a value head at zero without one.
    The critic's embeddings and lowest --critic-freeze-layers blocks are frozen."""
    rm_path = cfg.reward_model or os.path.join(cfg.out_dir, "rm.pt")
    reward_scorer = None
    if cfg.reward == "rm" or os.path.exists(rm_path):
        reward_scorer = load_reward_model(rm_path, tokenizer, runtime)
        if reward_scorer.model.config.block_size < policy.config.block_size:
            raise UserError(f"{rm_path}: block_size {reward_scorer.model.config.block_size} is shorter than the "
                            f"policy's {policy.config.block_size}")
        critic = critic_from_reward_model(reward_scorer)   # InstructGPT: the value function starts as the RM
    else:
        print(f"note: {rm_path} not found: no RM score in the logs, and the critic starts from the SFT model")
        critic = critic_from_policy(policy)
    if cfg.critic_freeze_layers > critic.config.n_layer:
        raise UserError(f"--critic-freeze-layers {cfg.critic_freeze_layers}: the critic has only "
                        f"{critic.config.n_layer} blocks")
    runtime.prepare(critic)   # a new module: give it the device and precision of the others
    critic.trunk.freeze_lower(cfg.critic_freeze_layers)
    return reward_scorer, critic


def pretraining_batches(cfg: PPOConfig, tokenizer: Tokenizer, runtime, generator):
    """PPO-ptx: a function returning random windows of the pretraining corpus (InstructGPT eq. 2's
    gamma * E_pretrain[log pi(x)] term), or None when --ptx-coef is 0. Every rank draws the same
    --ptx-batch-size windows (`generator` is shared) and keeps its equal share of them."""
    if cfg.ptx_coef == 0:
        return None
    path = os.path.join(cfg.data_dir, "corpus.txt")
    if not os.path.exists(path):
        raise UserError(f"{path}: file not found (--ptx-coef needs the pretraining corpus; run data/prepare.py)")
    tokens = torch.tensor(tokenizer.encode(read_text(path), allow_special=True), dtype=torch.long)
    if len(tokens) <= cfg.ptx_seq_len + 1:
        raise UserError(f"{path}: corpus too small for --ptx-seq-len {cfg.ptx_seq_len}")

    def batch():
        inputs, targets = random_windows(tokens, cfg.ptx_batch_size, cfg.ptx_seq_len, generator)   # (n, L) each
        return runtime.shard(inputs).to(runtime.device), runtime.shard(targets).to(runtime.device)
    return batch


def check_processes(cfg: PPOConfig, world_size: int) -> None:
    """Under torchrun the --batch-size prompts of an update are split evenly over the processes, and
    each process cuts its share into --num-minibatches (the same number everywhere: DDP steps in
    lockstep). A one-line error when that cannot be done."""
    if cfg.batch_size % world_size:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {world_size} processes")
    if cfg.num_minibatches > cfg.batch_size // world_size:
        raise UserError(f"--num-minibatches {cfg.num_minibatches} must be <= --batch-size / processes = "
                        f"{cfg.batch_size // world_size}")
    if cfg.ptx_coef > 0 and cfg.ptx_batch_size % world_size:
        raise UserError(f"--ptx-batch-size {cfg.ptx_batch_size} must be divisible by the {world_size} processes")


def plot_run(cfg: PPOConfig, metrics_path: str) -> tuple[str, str]:
    """ppo_curves.png (the training curves) and ppo_overopt.png (proxy and gold score against
    sqrt(KL), Gao et al. 2022) from the metrics file. Returns their paths."""
    curves = os.path.join(cfg.out_dir, "ppo_curves.png")
    overopt = os.path.join(cfg.out_dir, "ppo_overopt.png")
    records = read_metrics(metrics_path)
    kl_line = cfg.kl_target if cfg.adaptive_kl else None
    plot_curves(records, [
        {"keys": ["objective/scores", "objective/rlhf_reward", "eval/rm"], "title": "reward (what PPO maximises)",
         "ylabel": "normalised score"},
        {"keys": ["objective/gold", "eval/gold"], "title": "gold labeler score (never trained on)", "ylabel": "gold total"},
        {"keys": ["objective/kl", "eval/kl"], "title": "KL(policy || SFT) per response", "ylabel": "nats",
         "hline": kl_line, "hline_label": "target" if kl_line else None},
        {"keys": ["kl_coef"], "title": "KL coefficient beta", "ylabel": "beta", "smooth": False},
        {"keys": ["objective/entropy"], "title": "policy entropy per token", "ylabel": "nats"},
        {"keys": ["policy/clipfrac", "val/clipfrac", "policy/approxkl"], "title": "clipping and approximate KL",
         "ylabel": "fraction / nats"},
        {"keys": ["val/vf_loss", "val/explained_variance"], "title": "critic", "ylabel": "loss / explained variance"},
        {"keys": ["response_length", "eval/response_length"], "title": "response length", "ylabel": "tokens"},
        {"keys": ["eos_rate", "eval/eos_rate"], "title": "share of responses that end (EOS)", "ylabel": "fraction"},
    ], curves, title=f"PPO (reward = {cfg.reward})", xlabel="PPO update")
    plot_overoptimisation(records, cfg.reward, overopt)
    return curves, overopt


if __name__ == "__main__":
    run_main(main)
