"""Step 3: PPO against the reward model, with a KL penalty to the SFT model.

Reads  out/sft.pt (the policy's start and the frozen reference), out/rm.pt (the reward model, also
       the critic's start), data/ppo_prompts.jsonl, data/eval_prompts.jsonl (held-out judging)
Writes out/ppo.pt, out/ppo_metrics.jsonl, out/ppo_curves.png, out/ppo_overopt.png

InstructGPT section 3.5 ("Reinforcement learning"): maximise, over prompts x and sampled responses y,

    objective = r(x, y) - beta * log(pi(y|x) / pi_sft(y|x))            (eq. 2, without the ptx term)

with PPO (Schulman et al. 2017). The reward model r was trained on rankings; the KL term keeps the
policy near the SFT model, where r was trained and can be trusted. The loop (see minirlhf/ppo.py):
sample a batch of responses, score them, compute per-token KL-shaped rewards and GAE advantages,
then a few epochs of clipped policy and value updates. The gold labeler scores every sample too,
for the logs only: it shows whether the reward model's opinion of "better" is the real one.

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
      over the tokens of all processes' minibatch (see minirlhf/ppo.py), so an update is one
      process's update on the whole batch. Rank 0 alone prints and writes.
Resume an interrupted run:  python train_ppo.py --resume   (same flags as the first run; under
      torchrun each process gets back its own sampling state)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from minirlhf.checkpoint import load_checkpoint, load_policy, save_checkpoint
from minirlhf.cli import Progress, UserError, make_out_dir, parse_config, print_config, run_main
from minirlhf.data import evenly_spaced, random_windows, read_prompts, read_text
from minirlhf.evaluation import HeldOutEvaluation
from minirlhf.losses import AdaptiveKLController, FixedKLController
from minirlhf.metrics import MetricsLogger, read_metrics
from minirlhf.plots import plot_curves
from minirlhf.ppo import (Rollout, compute_advantages, critic_from_policy, critic_from_reward_model,
                          forward_rollout, means_over_ranks, minibatch_orders, ppo_update, rollout_stats,
                          score_rollout)
from minirlhf.reward import load_reward_model
from minirlhf.runtime import setup_runtime
from minirlhf.tokenizer import Tokenizer, render_chat
from minirlhf.training import cosine_lr, sample_responses


@dataclass
class PPOConfig:
    preset: str = field(default="tiny", metadata={"help": "size preset: smoke (tests), tiny (CPU), medium (~26M, one GPU), small (GPT-2 small shape, GPU)"})
    data_dir: str = field(default="data", metadata={"help": "where the prompts and the tokenizer are"})
    out_dir: str = field(default="out", metadata={"help": "where sft.pt/rm.pt are read and ppo.pt and logs go"})
    init: str = field(default="", metadata={"help": "policy to start from, also the KL reference (default: OUT_DIR/sft.pt)"})
    reward_model: str = field(default="", metadata={"help": "reward model checkpoint (default: OUT_DIR/rm.pt)"})
    prompts: str = field(default="", metadata={"help": "RL prompts JSONL (default: DATA_DIR/ppo_prompts.jsonl)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda", "choices": ["auto", "cpu", "cuda"]})
    dtype: str = field(default="auto", metadata={"help": "precision: auto (bf16 on a GPU that has it, else fp32), "
                                                         "fp32 or bf16 (autocast; weights stay fp32)",
                                                 "choices": ["auto", "fp32", "bf16"]})
    seed: int = field(default=1337, metadata={"help": "random seed"})
    reward: str = field(default="rm", metadata={"help": "what PPO maximises: rm (the learned reward model) or gold "
                                                       "(the gold labeler itself: the upper bound)", "choices": ["rm", "gold"]})
    total_updates: int = field(default=48, metadata={"help": "PPO updates (one rollout batch each)", "min": 1})
    batch_size: int = field(default=64, metadata={"help": "prompts (one response each) per rollout", "min": 1})
    num_minibatches: int = field(default=4, metadata={"help": "minibatches per PPO epoch", "min": 1})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout batch", "min": 1})
    lr: float = field(default=1e-4, metadata={"help": "policy learning rate (AdamW)", "above": 0.0})
    value_lr: float = field(default=2e-4, metadata={"help": "critic learning rate (AdamW)", "min": 0.0})
    critic_freeze_layers: int = field(default=2, metadata={"help": "freeze the critic's embeddings and lowest N blocks "
                                                                   "(a cheaper backward pass; 0: train all)", "min": 0})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "both learning rates decay (cosine) to this fraction",
                                                       "min": 0.0, "max": 1.0})
    warmup_updates: int = field(default=2, metadata={"help": "linear learning-rate warmup, in updates", "min": 0})
    grad_clip: float = field(default=1.0, metadata={"help": "clip each model's gradient norm to this (0: off)", "min": 0.0})
    clip_range: float = field(default=0.2, metadata={"help": "PPO ratio clip epsilon", "min": 0.0})
    clip_range_value: float = field(default=0.2, metadata={"help": "value clip: how far a value may move from its "
                                                                  "rollout-time prediction", "min": 0.0})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount", "min": 0.0, "max": 1.0})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda", "min": 0.0, "max": 1.0})
    kl_coef: float = field(default=0.2, metadata={"help": "KL penalty beta (the start value when adaptive)", "min": 0.0})
    adaptive_kl: bool = field(default=True, metadata={"help": "adapt beta towards --kl-target (Ziegler et al. 2019)"})
    kl_target: float = field(default=1.0, metadata={"help": "target KL to the reference, nats per response", "min": 1e-6})
    kl_horizon: float = field(default=1000.0, metadata={"help": "adaptive controller horizon, in samples", "min": 1.0})
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL estimator in the reward",
                                                      "choices": ["k1", "k2", "k3"]})
    target_kl: float = field(default=0.0, metadata={"help": "stop an update early when a minibatch's approximate "
                                                           "KL exceeds this (0: off)", "min": 0.0})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (logprobs use it too)", "min": 0.05})
    max_new_tokens: int = field(default=48, metadata={"help": "response budget in tokens", "min": 1})
    missing_eos_penalty: float = field(default=-1.0, metadata={"help": "score of a response with no EOS "
                                                                      "(normalised RM units)"})
    ptx_coef: float = field(default=0.0, metadata={"help": "weight of the pretraining LM loss (InstructGPT's "
                                                          "PPO-ptx); 0: off", "min": 0.0})
    ptx_batch_size: int = field(default=8, metadata={"help": "pretraining windows per minibatch (PPO-ptx)", "min": 1})
    ptx_seq_len: int = field(default=64, metadata={"help": "pretraining window length (PPO-ptx)", "min": 2})
    eval_every: int = field(default=16, metadata={"help": "held-out evaluation every N updates (0: only at the "
                                                         "start and the end)", "min": 0})
    eval_prompts: int = field(default=48, metadata={"help": "held-out prompts per evaluation, evenly spaced in the "
                                                           "file (0: none)", "min": 0})
    eval_samples: int = field(default=2, metadata={"help": "samples per held-out prompt", "min": 1})
    sample_every: int = field(default=10, metadata={"help": "print a few samples every N updates", "min": 1})
    save_every: int = field(default=20, metadata={"help": "write ppo.pt every N updates (and at the end)", "min": 1})
    resume: bool = field(default=False, metadata={"help": "continue from OUT_DIR/ppo.pt"})
    kernels: str = field(default="auto", metadata={"help": "logprob/GAE kernels: auto (fused) or reference",
                                                   "choices": ["auto", "reference"]})
    debug: bool = field(default=False, metadata={"help": "show tracebacks"})


PRESETS = {
    "smoke": dict(total_updates=3, batch_size=8, num_minibatches=2, max_new_tokens=16, eval_every=2,
                  critic_freeze_layers=1,
                  eval_prompts=4, eval_samples=1, sample_every=2, save_every=2, warmup_updates=0),
    "tiny": {},
    "medium": {},
    "small": dict(total_updates=200, batch_size=128, ppo_epochs=4, lr=1.4e-5, value_lr=5e-5, eval_prompts=111,
                  eval_samples=4, kl_horizon=10000.0, kl_target=6.0, max_new_tokens=64),
}


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


def restore_sample_generator(generator, ckpt: dict, runtime) -> None:
    """Give this rank the sampling dice it had when the checkpoint was written.

    A checkpoint stores every rank's generator state (`sample_rng_states`; older ones only rank 0's,
    `sample_rng_state`). Written with another number of processes, the ranks the checkpoint knows
    restore their own state and any other rank keeps its fresh stream (seed + rank * stride: dice
    that the earlier run never drew from), so no two ranks repeat each other's samples.
    """
    states = ckpt.get("sample_rng_states") or [ckpt["sample_rng_state"]]
    if runtime.rank < len(states):
        generator.set_state(states[runtime.rank])
    if len(states) != runtime.world_size:
        print(f"note: the checkpoint holds the sampling dice of {len(states)} process(es), this run has "
              f"{runtime.world_size}: ranks below {min(len(states), runtime.world_size)} restore their own, "
              "any other rank starts a fresh stream")


def plot_overoptimisation(records: list[dict], reward: str, out_path: str) -> None:
    """Proxy score (what PPO optimises) and gold score against sqrt(KL to the reference), as Gao et
    al. 2022 plot them, from the held-out evaluations. Both are changes since SFT in units of the SFT
    policy's spread: the RM is normalised that way already; gold is (gold - gold_sft) / sd_sft."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from minirlhf.plots import save_figure

    evals = [r for r in records if r.get("eval/gold") is not None and r.get("eval/kl") is not None]
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(f"Over-optimisation view (held-out prompts, reward = {reward})")
    if not evals:
        ax.text(0.5, 0.5, "no held-out evaluation (--eval-prompts 0)", ha="center", va="center",
                transform=ax.transAxes)
        save_figure(fig, out_path)
        return
    gold0, sd0 = evals[0]["eval/gold"], max(evals[0].get("eval/gold_sd") or 1.0, 1e-6)
    sqrt_kl = [math.sqrt(max(r["eval/kl"], 0.0)) for r in evals]  # k1 KL of a few samples can dip below 0
    if all(r.get("eval/rm") is not None for r in evals):
        label = "proxy: reward model score" if reward == "rm" else "reward model score (not optimised here)"
        ax.plot(sqrt_kl, [r["eval/rm"] - evals[0]["eval/rm"] for r in evals], "o-", color="C0", label=label)
    gold = [(r["eval/gold"] - gold0) / sd0 for r in evals]
    ax.plot(sqrt_kl, gold, "s-", color="C3", label="gold labeler score")
    for x, y, record in zip(sqrt_kl, gold, evals):   # which update each point is
        ax.annotate(str(record["step"]), (x, y), fontsize=7, alpha=0.6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xlabel("sqrt(KL(policy || SFT))   (KL in nats per response; labels: PPO update)")
    ax.set_ylabel("change since SFT (SFT standard deviations)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, out_path)


def main() -> None:
    cfg = parse_config(PPOConfig, PRESETS, description=__doc__)
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed, kernels=cfg.kernels)
    print_config(cfg, "train_ppo")   # after setup_runtime: under torchrun rank 0 alone prints
    check_processes(cfg, runtime.world_size)

    # ---- models: policy (trained), reference (frozen SFT), reward model (frozen), critic (trained)
    tokenizer = Tokenizer.from_file(os.path.join(cfg.data_dir, "tokenizer.tiktoken"))
    init_path = cfg.init or os.path.join(cfg.out_dir, "sft.pt")
    policy, _ = load_policy(init_path, tokenizer.identity, runtime)
    ref_policy, _ = load_policy(init_path, tokenizer.identity, runtime)
    ref_policy.requires_grad_(False)
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
    policy_optimizer = policy.configure_optimizer(0.0, cfg.lr)
    value_optimizer = critic.configure_optimizer(0.0, cfg.value_lr)
    kl_controller = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                     else FixedKLController(cfg.kl_coef))

    # ---- prompts
    prompts = read_prompts(cfg.prompts or os.path.join(cfg.data_dir, "ppo_prompts.jsonl"))
    eval_prompts = evenly_spaced(read_prompts(os.path.join(cfg.data_dir, "eval_prompts.jsonl")), cfg.eval_prompts)
    longest = max(len(render_chat(tokenizer, p)) for p in prompts + eval_prompts)
    if longest + cfg.max_new_tokens > policy.config.block_size:
        raise UserError(f"the longest prompt ({longest} tokens) + --max-new-tokens {cfg.max_new_tokens} exceeds "
                        f"the model's block_size {policy.config.block_size}")
    if runtime.is_main:
        make_out_dir(cfg.out_dir)   # a file, or read-only: one line now, not at the first save
    rng = runtime.cpu_generator(cfg.seed)            # prompt order, minibatches, ptx: the same on every rank
    sample_generator = runtime.generator(cfg.seed)   # the policy's sampling: each rank its own dice
    ptx_batch = pretraining_batches(cfg, tokenizer, runtime, rng)

    # ---- resume
    out_path = os.path.join(cfg.out_dir, "ppo.pt")
    metrics_path = os.path.join(cfg.out_dir, "ppo_metrics.jsonl")
    start_update, gold_normaliser, baseline = 0, None, {}
    prompt_order: list[int] = []   # the prompts of this pass over the file not drawn yet (indices)
    if cfg.resume:
        ckpt = load_checkpoint(out_path, kind="ppo", tokenizer_identity=tokenizer.identity)
        policy.load_state_dict(ckpt["model"])
        critic.load_state_dict(ckpt["value_model"])
        policy_optimizer.load_state_dict(ckpt["policy_optimizer"])
        value_optimizer.load_state_dict(ckpt["value_optimizer"])
        kl_controller.value = float(ckpt["kl_coef"])
        rng.set_state(ckpt["rng_state"])
        prompt_order = list(ckpt.get("prompt_order", []))   # the rest of this pass (older checkpoints: reshuffled)
        restore_sample_generator(sample_generator, ckpt, runtime)
        start_update = ckpt["step"]
        gold_normaliser = tuple(ckpt["gold_normaliser"]) if ckpt.get("gold_normaliser") else None
        baseline = {k: v for k, v in ckpt["metrics"].items() if k.startswith("sft/")}
        print(f"resumed from {out_path} at update {start_update}, kl_coef {kl_controller.value:.4g}")
        if start_update >= cfg.total_updates:
            raise UserError(f"{out_path} is already at update {start_update} >= --total-updates {cfg.total_updates}")
    # the modules the TRAINING forwards go through: DistributedDataParallel under torchrun (its
    # backward averages the gradients over the ranks), the models themselves in one process
    train_policy, train_critic = runtime.wrap(policy), runtime.wrap(critic)

    # evaluate(update): the held-out eval/* metrics; the first call (the SFT policy) fills `baseline`
    evaluate = HeldOutEvaluation(policy, ref_policy, tokenizer, eval_prompts, samples_per_prompt=cfg.eval_samples,
                                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                                 batch_size=cfg.batch_size, runtime=runtime, reward_scorer=reward_scorer,
                                 baseline=baseline)

    def save(update: int, summary: dict) -> None:
        # every rank's sampling dice (a collective: all ranks call save), so that --resume gives each its own
        sample_rng_states = runtime.gather_objects([sample_generator.get_state().cpu()])
        if not runtime.is_main:
            return   # rank 0 alone writes
        save_checkpoint(out_path, kind="ppo", model_state=policy.state_dict(), model_config=asdict(policy.config),
                        tokenizer_identity=tokenizer.identity, train_config=asdict(cfg), step=update,
                        metrics={**summary, **baseline}, value_model=critic.state_dict(),
                        value_model_config=asdict(critic.config), policy_optimizer=policy_optimizer.state_dict(),
                        value_optimizer=value_optimizer.state_dict(), kl_coef=float(kl_controller.value),
                        rng_state=rng.get_state(), prompt_order=list(prompt_order),
                        sample_rng_state=sample_rng_states[0], sample_rng_states=sample_rng_states,   # (older readers: one)
                        gold_normaliser=list(gold_normaliser) if gold_normaliser else None, reward=cfg.reward)

    # ---- the loop
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
            t0 = time.time()
            lr_scale = cosine_lr(update, cfg.total_updates, 1.0, cfg.warmup_updates, cfg.min_lr_ratio)
            for optimizer, lr in ((policy_optimizer, cfg.lr), (value_optimizer, cfg.value_lr)):
                for group in optimizer.param_groups:
                    group["lr"] = lr * lr_scale

            # 1-2. rollout and scores. Every rank draws the same global batch; each samples its share.
            while len(prompt_order) < cfg.batch_size:        # passes over the prompts, reshuffled each time
                prompt_order += torch.randperm(len(prompts), generator=rng).tolist()
            global_batch = [prompts[i] for i in prompt_order[:cfg.batch_size]]
            del prompt_order[:cfg.batch_size]
            batch_prompts = runtime.shard(global_batch)   # this rank's B / W of them (all B in one process)
            texts, _, (generation,) = sample_responses(policy, tokenizer, batch_prompts, max_new_tokens=cfg.max_new_tokens,
                                                       temperature=cfg.temperature, generator=sample_generator,
                                                       batch_size=len(batch_prompts))   # one batch: one Generation
            if cfg.reward == "gold" and gold_normaliser is None:
                # the SFT policy's gold mean and spread on this first batch (every rank's samples)
                # give the gold reward the RM's scale
                _, first_gold, _ = score_rollout(generation, batch_prompts, texts, reward="gold")
                first_gold = torch.tensor(runtime.gather_objects(first_gold.tolist()))
                gold_normaliser = (first_gold.mean().item(), max(first_gold.std(unbiased=False).item(), 1e-3))
                print(f"gold reward normalised with the SFT batch's mean {gold_normaliser[0]:.3f}, "
                      f"sd {gold_normaliser[1]:.3f}")
            scores, gold, rm = score_rollout(generation, batch_prompts, texts, reward=cfg.reward,
                                             reward_scorer=reward_scorer, gold_normaliser=gold_normaliser or (0, 1),
                                             missing_eos_penalty=cfg.missing_eos_penalty)
            rollout = Rollout.from_generation(generation, scores)
            rollout_seconds = time.time() - t0

            # 3-4. old logprobs, reference logprobs, values (this rank's rows, no gradient: the
            # models themselves, not the DDP wrappers); rewards and advantages, whitened over all ranks
            orders = minibatch_orders(rollout.batch_size, cfg.num_minibatches, cfg.ppo_epochs, rng)
            forward_rollout(rollout, policy, ref_policy, critic, temperature=cfg.temperature, minibatches=orders[0])
            kl_coef = kl_controller.value
            rollout.rewards, rollout.kl, rollout.advantages, rollout.returns = compute_advantages(
                rollout.scores, rollout.logprobs, rollout.ref_logprobs, rollout.values, rollout.response_mask,
                kl_coef=kl_coef, gamma=cfg.gamma, lam=cfg.lam, kl_estimator=cfg.kl_estimator,
                all_reduce=runtime.all_reduce_sum)
            record = rollout_stats(rollout, kl_coef, runtime)   # means over every rank's rows
            objective = {"objective/gold": (gold.mean().item(), len(gold))}   # (this rank's mean, its samples)
            if rm is not None:
                objective["objective/rm"] = (rm.mean().item(), len(rm))
            record.update(means_over_ranks(runtime, objective))

            # 5. PPO epochs, then the KL controller sees this batch's KL
            t1 = time.time()
            update_stats = ppo_update(rollout, train_policy, train_critic, policy_optimizer, value_optimizer,
                                      orders=orders, temperature=cfg.temperature, clip_range=cfg.clip_range,
                                      clip_range_value=cfg.clip_range_value, grad_clip=cfg.grad_clip,
                                      target_kl=cfg.target_kl, ptx_batch=ptx_batch, ptx_coef=cfg.ptx_coef,
                                      step=update + 1, runtime=runtime)
            update_stats.pop("minibatch_stats")
            kl_controller.update(record["objective/kl"], cfg.batch_size)
            (n_tokens,) = runtime.sum_over_ranks(rollout.response_mask.sum().item())   # every rank's (progress line)
            record.update(update_stats)
            record.update({"kl_coef": kl_coef, "lr": cfg.lr * lr_scale, "time/rollout_s": rollout_seconds,
                           "time/update_s": time.time() - t1,
                           "time/episodes_per_s": cfg.batch_size / (time.time() - t0)})

            step = update + 1
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
                save(step, summary)

    minutes = (time.time() - start) / 60
    summary["minutes"] = minutes
    save(cfg.total_updates, summary)
    if not runtime.is_main:
        return   # rank 0 alone plots and reports
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
    if "eval/gold" in summary:
        print(f"held-out gold: SFT {baseline['sft/gold']:.3f} -> PPO {summary['eval/gold']:.3f} "
              f"({summary['eval/gold_gain_sd']:+.2f} SFT standard deviations), KL {summary['eval/kl']:.2f} nats")
    print(f"done in {minutes:.1f} min")
    print(f"wrote {out_path}, {metrics_path}, {curves}, {overopt}")


if __name__ == "__main__":
    run_main(main)
