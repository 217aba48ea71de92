"""Step 2: the reward model. Sample K responses per prompt from the SFT model, have a labeler rank
them, and train a scalar-headed GPT to score responses the way the labeler ranks them.

Reads  out/sft.pt, data/rm_prompts.jsonl ({"prompt"}), data/tokenizer.tiktoken
       (or --comparisons FILE: ranked {"prompt", "responses", "ranking"} or {"prompt", "chosen", "rejected"})
Writes out/rm.pt, out/rm_comparisons.jsonl (what the labeler ranked, ties included), out/rm_metrics.jsonl,
       out/rm_curves.png (loss and accuracy), out/rm_scatter.png (RM score vs gold score, held out)

InstructGPT section 3.5 ("Reward modeling"): the RM is the SFT model with its LM head replaced by a
scalar head, read at the last token. Labelers rank K responses to a prompt; all C(K, 2) pairs of
one prompt form ONE batch element (eq. 1: the mean of -log sigmoid(r_better - r_worse) over the
pairs), and one epoch is enough (more overfits: the K responses of a prompt are correlated).
The RM only learns score DIFFERENCES, so afterwards a bias and gain are fitted that give the SFT
policy's samples mean 0 and std 1; `minirlhf/reward.py` applies them wherever the RM is used.

`--rm-objective classifier` trains the other formulation instead: a good/bad classifier (best
response of each ranking -> 1, worst -> 0; cross-entropy) whose logit margin log p(good) - log p(bad)
is the reward. Both are measured on the same held-out comparisons.

Labelers: `--labeler gold` (default) ranks with the rubric of minirlhf/labeler.py (`--label-noise`
makes it disagree with itself like real labelers); `--labeler human` shows you the K responses and
reads your ranking (answers saved as you go in out/rm_human_labels.jsonl; re-run to resume).

CPU:  python train_rm.py                    (preset tiny, ~1.5 minutes on 2 cores, sampling included)
      python train_rm.py --preset smoke
      python train_rm.py --preset smoke --dtype bf16 --device cpu     (bf16 autocast; slow on a CPU, for tests)
      python train_rm.py --labeler human --num-comparisons 20
      python train_rm.py --rm-objective classifier --comparisons out/rm_comparisons.jsonl --out-dir out_cls
Resume an interrupted run:  python train_rm.py --resume   (same flags as the first run: every
      --save-every steps rm.pt is written with the optimizer, the held-out split and the samples the
      normalisation needs, after rm_comparisons.jsonl; the run continues from there without
      sampling again, exactly as if it had not stopped)
GPU:  python train_rm.py --preset medium --device cuda                 (bf16 by default on a GPU)
      python train_rm.py --preset small --device cuda
Several processes (data parallel): torchrun --standalone --nproc_per_node=2 train_rm.py --preset smoke
      Each rank samples its share of the prompts with its own dice; the candidates are gathered so
      every rank ranks the same full list. --batch-size stays the GLOBAL number of comparisons per
      step: each rank trains on its share, weighted so that DDP's averaged gradient is the one of
      the mean over the whole batch (`reward.batch_share`). Held-out loss and accuracy and the
      normalisation are computed from every rank's share. Rank 0 alone writes files.
      (--labeler human needs one terminal: a single process.)
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from minirlhf import labeling, world
from minirlhf.checkpoint import load_checkpoint, load_resume_checkpoint, save_checkpoint
from minirlhf.cli import StageConfig, UserError, make_out_dir, option, parse_config, print_config, run_main
from minirlhf.data import read_prompts
from minirlhf.losses import ranking_reward_loss
from minirlhf.metrics import MetricsLogger, Progress, read_metrics
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.plots import plot_curves, plot_scatter
from minirlhf.reward import (RewardScorer, batch_share, classifier_objective, comparison_loss, encode_ranked,
                             fit_normalisation, gold_agreement, pairwise_counts, score_comparisons)
from minirlhf.tokenizer import Tokenizer, render_chat
from minirlhf.training import check_finite, cosine_lr, sample_responses, set_lr
from minirlhf.runtime import setup_runtime


@dataclass
class RMConfig(StageConfig):
    init: str = option("", "SFT checkpoint: the sampler and the RM's trunk (empty: OUT_DIR/sft.pt)")
    prompts: str = option("", "prompts to sample and rank (empty: DATA_DIR/rm_prompts.jsonl)")
    comparisons: str = option("", "train on this comparisons JSONL instead of sampling and ranking")
    labeler: str = option("gold", "who ranks the samples: the gold rubric or you, in the terminal", choices=["gold", "human"])
    label_noise: float = option(0.0, "gold labeler noise (Plackett-Luce temperature; 0: exact)", min=0.0)
    num_comparisons: int = option(1200, "prompts to rank (drawn from the prompt file, each used about equally often), "
                                        "held-out ones included; with --labeler human pick a few dozen", min=2)
    responses_per_prompt: int = option(4, "K: responses ranked together (InstructGPT: 4 to 9)", min=2)
    degenerate_fraction: float = option(0.5, "share of prompts that get one extra degenerate response to rank (empty, "
                                             "cut, repeated, rambling, another question's answer)", min=0.0, max=1.0)
    temperature: float = option(1.0, "sampling temperature of the SFT policy", min=0.0)
    max_new_tokens: int = option(48, "response budget when sampling", min=1)
    sample_batch_size: int = option(256, "sequences sampled at once", min=1)
    val_fraction: float = option(0.1, "share of prompts (per family) whose comparisons are held out", min=0.0, max=0.5)
    rm_objective: str = option("ranking", "ranking: InstructGPT's K-wise loss; classifier: best -> good, worst -> bad, "
                                          "cross-entropy", choices=["ranking", "classifier"])
    freeze_layers: int = option(0, "freeze the embeddings and the lowest N transformer blocks (0: train everything)", min=0)
    epochs: int = option(1, "passes over the comparisons (InstructGPT: 1; more overfits)", min=1)
    batch_size: int = option(16, "comparisons (prompts) per step, over all processes", min=1)
    lr: float = option(3e-4, "peak learning rate (AdamW)", above=0.0)
    min_lr: float = option(1e-5, "learning rate at the end of the cosine decay (<= --lr)", min=0.0)
    warmup_steps: int = option(5, "linear warmup steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay on 2-D weights", min=0.0)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)", min=0.0)
    eval_every: int = option(10, "held-out loss and accuracy every N steps", min=1)
    norm_samples: int = option(256, "SFT samples that fit the normalisation when training on a --comparisons file", min=2)
    save_every: int = option(20, "write rm.pt every N training steps (and at the end)", min=1)


PRESETS = {
    "smoke": dict(num_comparisons=24, max_new_tokens=16, batch_size=4, eval_every=2, val_fraction=0.2, norm_samples=8,
                  save_every=2),
    "tiny": {},
    "medium": {},
    "small": dict(num_comparisons=4000, responses_per_prompt=6, batch_size=32, lr=3e-5, min_lr=3e-6),
}


@torch.no_grad()
def evaluate(model, encoded, tiers, objective, pad_id, batch_size, runtime) -> tuple[float, float]:
    """Held-out (loss, pairwise accuracy against the labeler's rankings, its ties left out) of all
    of `encoded` (best-first token lists of each comparison; `tiers`: the ties of each).

    Each rank scores its share (`runtime.shard`) with the unwrapped model (no gradients, so no
    DDP); the ranks add up their loss sums, comparison counts and pair counts, and the ratios of
    those sums are the numbers one process would get for the whole set.
    """
    model.eval()
    loss_sum = correct = pairs = 0.0
    share = runtime.shard(list(range(len(encoded))))
    for start in range(0, len(share), batch_size):
        chunk = share[start:start + batch_size]
        chunk_tiers = [tiers[i] for i in chunk]
        loss, rewards = comparison_loss(model, [encoded[i] for i in chunk], objective, pad_id, chunk_tiers)
        loss_sum += loss.item() * len(chunk)            # the loss is a mean over the chunk's comparisons
        chunk_correct, chunk_pairs = pairwise_counts(rewards.cpu(), chunk_tiers)
        correct += chunk_correct
        pairs += chunk_pairs
    model.train()
    loss_sum, count, correct, pairs = runtime.sum_over_ranks(loss_sum, len(share), correct, pairs)
    return loss_sum / count, (correct / pairs if pairs else math.nan)


def train_metrics(runtime, loss: torch.Tensor, rewards: torch.Tensor, tiers: list[list[int]], weight: float) -> dict:
    """The GLOBAL batch's loss, pairwise accuracy and margin (best minus worst reward), from this
    rank's share: `loss` and `rewards` (B_r, K_max) of its comparisons (with their `tiers`: ties
    leave the accuracy), `weight` from `batch_share`.

    The loss and the margin are means over the rank's comparisons; weighted like the loss, they sum
    over the ranks to world_size times the global mean. Accuracy is added up as pair counts. A
    rank that ran a placeholder comparison (weight 0) adds nothing. One process: the same numbers
    as before, exactly (the weight is 1).
    """
    rewards = rewards.cpu()                                                # (B_r, K_max) best first
    last_scored = ((~rewards.isnan()).sum(1) - 1).clamp(min=0)   # (clamped: a diverged row is all NaN)
    worst = rewards.gather(1, last_scored[:, None])                       # (B_r, 1) last scored
    margin = (rewards[:, :1] - worst).mean().item()
    correct, pairs = pairwise_counts(rewards, tiers) if weight else (0.0, 0.0)
    loss_sum, margin_sum, correct, pairs = runtime.sum_over_ranks(loss.item() * weight, margin * weight,
                                                                  correct, pairs)
    return {"loss/train": loss_sum / runtime.world_size, "accuracy/train": correct / pairs if pairs else math.nan,
            "margin/train": margin_sum / runtime.world_size}


# ----------------------------------------------------------------------------------------------

def read_prompts_that_fit(cfg, tokenizer, block_size: int) -> list[str]:
    """The prompts to sample from; each with --max-new-tokens of response must fit the SFT model."""
    path = cfg.prompts or os.path.join(cfg.data_dir, "rm_prompts.jsonl")
    prompts = read_prompts(path)
    longest = max(len(render_chat(tokenizer, prompt)) for prompt in prompts)
    if longest + cfg.max_new_tokens > block_size:
        raise UserError(f"{path}: the longest prompt ({longest} tokens) + --max-new-tokens {cfg.max_new_tokens} "
                        f"exceeds the SFT model's block_size {block_size}")
    return prompts


def collect_comparisons(cfg, policy, tokenizer, runtime):
    """Sample and rank the comparisons, or read them from --comparisons. Returns (comparisons,
    held-out prompts, candidates) - the candidates are the SFT samples, which fit the normalisation
    (none when the comparisons come from a file) - or None if a person quit labelling.

    Under torchrun every rank returns the same lists: every rank reads the file, or every rank
    draws the same prompts, samples its share of them with its own dice, and receives the other
    ranks' samples (back in the order the prompts were drawn); the duplicates, the degenerate
    responses and the gold labeler's (seeded) noise are then the same on every rank."""
    rng = random.Random(cfg.seed)
    if cfg.comparisons:
        comparisons = labeling.read_ranked_comparisons(cfg.comparisons)
        print(f"read {len(comparisons)} comparisons from {cfg.comparisons}")
        _, val_prompts = labeling.split_prompts([c.prompt for c in comparisons], cfg.val_fraction, rng)
        return comparisons, set(val_prompts), []

    prompts = read_prompts_that_fit(cfg, tokenizer, policy.config.block_size)
    if runtime.is_main:
        make_out_dir(cfg.out_dir)   # the inputs are read: a bad --out-dir fails now, not after the sampling
    train_prompts, val_prompts = labeling.split_prompts(prompts, cfg.val_fraction, rng)
    n_val = round(cfg.num_comparisons * cfg.val_fraction) if val_prompts else 0
    drawn = (labeling.cycle_prompts(train_prompts, cfg.num_comparisons - n_val, rng)
             + labeling.cycle_prompts(val_prompts, n_val, rng))
    k = cfg.responses_per_prompt
    print(f"sampling {k} responses for each of {len(drawn)} prompts from the SFT policy "
          f"({len(train_prompts)} distinct train prompts, {len(val_prompts)} held out)")
    mine = runtime.shard(list(range(len(drawn))))   # positions in `drawn` this rank samples for
    progress = Progress(len(mine), desc="sampling")
    sampled = labeling.sample_candidates(policy, tokenizer, [drawn[i] for i in mine], k=k,
                                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         batch_size=cfg.sample_batch_size, generator=runtime.generator(cfg.seed),
                                         progress=lambda done, total: progress.log(done))
    # every rank's candidates on every rank, in the order of `drawn` (one process: `sampled` itself)
    gathered = runtime.gather_objects(list(zip(mine, sampled)))
    candidates = [group for _, group in sorted(gathered, key=lambda position_and_group: position_and_group[0])]
    print(f"{sum(not e for c in candidates for e in c.ended)} of {len(candidates) * k} responses did not stop "
          f"within {cfg.max_new_tokens} tokens")
    # what the labeler sees: duplicates removed, a few degenerate responses added
    to_rank = labeling.drop_duplicates(candidates)
    print(f"{len(candidates) - len(to_rank)} prompts whose {k} responses were all the same are dropped; "
          f"{sum(len(c.responses) for c in to_rank)} distinct responses remain")
    if not to_rank:
        why = ("--temperature 0 samples greedily, so the responses to a prompt are always the same: use a "
               "temperature above 0" if cfg.temperature == 0 else "raise --temperature or --max-new-tokens")
        raise UserError(f"the {k} responses to each of the {len(candidates)} prompts were identical: nothing to rank "
                        f"({why})")
    to_rank = labeling.add_degenerate(to_rank, cfg.degenerate_fraction, random.Random(cfg.seed + 2),
                                      tokenizer=tokenizer, max_new_tokens=cfg.max_new_tokens)
    if cfg.labeler == "human":
        comparisons = labeling.label_by_human(to_rank, os.path.join(cfg.out_dir, "rm_human_labels.jsonl"))
    else:
        comparisons = labeling.rank_with_gold(to_rank, cfg.label_noise, random.Random(cfg.seed + 1))
    return None if comparisons is None else (comparisons, set(val_prompts), candidates)


def encode_all(tokenizer, comparisons, block_size, source) -> list[list[list[int]]]:
    """Every comparison as best-first token lists; text that holds a special-token string is a
    clear error naming the comparison (it would smuggle an EOS or a role marker into the input)."""
    encoded = []
    for number, comparison in enumerate(comparisons, start=1):
        try:
            encoded.append(encode_ranked(tokenizer, comparison, block_size))
        except ValueError as error:
            raise UserError(f"{source}:{number}: {error}") from None
    cut = sum(len(tokens) == block_size for responses in encoded for tokens in responses)
    if cut:
        print(f"note: {cut} prompt + response sequences reach the block size ({block_size} tokens) and are cut")
    return encoded


def main() -> None:
    cfg = parse_config(RMConfig, PRESETS, description=__doc__.split("\n\n")[0])
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    print_config(cfg, "train_rm")   # after setup_runtime, which silences every rank but 0: printed once
    if cfg.comparisons and cfg.labeler == "human":
        raise UserError("--labeler human ranks fresh samples; it cannot be combined with --comparisons FILE")
    if cfg.labeler == "human" and runtime.distributed:
        raise UserError(f"--labeler human reads rankings from one terminal, not from {runtime.world_size} processes: "
                        "run it as a single process (python train_rm.py ...), not under torchrun")

    tokenizer = Tokenizer.from_file(os.path.join(cfg.data_dir, "tokenizer.tiktoken"))
    init_path = cfg.init or os.path.join(cfg.out_dir, "sft.pt")
    sft = load_checkpoint(init_path, kind="sft", tokenizer_identity=tokenizer.identity)
    config = GPTConfig(**{**sft["model_config"], "dropout": 0.0})   # dropout off: one score per input
    if cfg.freeze_layers > config.n_layer:
        raise UserError(f"--freeze-layers {cfg.freeze_layers}: {init_path} has only {config.n_layer} blocks")
    policy = GPT(config)
    policy.load_state_dict(sft["model"])
    runtime.prepare(policy).eval()
    out_path = os.path.join(cfg.out_dir, "rm.pt")
    comparisons_path = os.path.join(cfg.out_dir, "rm_comparisons.jsonl")

    # ---- 1. comparisons: sampled from the SFT policy and ranked, or read from a file
    start = time.time()
    resumed = None
    if cfg.resume:   # the interrupted run's comparisons, held-out split and samples: nothing sampled again
        resumed = load_resume_checkpoint(out_path, kind="rm", tokenizer_identity=tokenizer.identity, total_steps=None,
                                         model_config=config, train_config=cfg)
        comparisons = labeling.read_ranked_comparisons(comparisons_path)
        val_prompts = set(resumed["val_prompts"])
        candidates = [labeling.Candidates(**group) for group in resumed["candidates"]]
        print(f"resumed from {out_path} at step {resumed['step']}, with the {len(comparisons)} comparisons of "
              f"{comparisons_path}")
    else:
        collected = collect_comparisons(cfg, policy, tokenizer, runtime)
        if collected is None:
            return   # a person quit labelling; the answers so far are saved, the next run resumes
        comparisons, val_prompts, candidates = collected
    if runtime.is_main:   # rank 0 alone writes files
        make_out_dir(cfg.out_dir)
    all_ranked = comparisons   # everything the labeler ranked, ties included: rm_comparisons.jsonl, beside rm.pt
    ranked = len(comparisons)
    comparisons = labeling.drop_all_tied(comparisons)   # a tie is not a preference: these prefer nothing
    pairs = sum(math.comb(len(c.responses), 2) for c in comparisons)
    tied = pairs - sum(len(c.preferences()) for c in comparisons)
    print(f"ties: {ranked - len(comparisons)} comparisons whose responses are all tied are dropped; "
          f"{tied} of the other {pairs} pairs are ties, left out of the loss and the accuracy")
    encoded = encode_all(tokenizer, comparisons, config.block_size, cfg.comparisons or "comparisons")
    minutes_collect = resumed["metrics"]["minutes/collect"] if resumed else (time.time() - start) / 60
    held_out = [c.prompt in val_prompts for c in comparisons]
    train_encoded = [e for e, h in zip(encoded, held_out) if not h]
    val_encoded = [e for e, h in zip(encoded, held_out) if h]
    train_tiers = [c.tiers for c, h in zip(comparisons, held_out) if not h]
    val_tiers = [c.tiers for c, h in zip(comparisons, held_out) if h]
    val_set = [c for c, h in zip(comparisons, held_out) if h]
    if not train_encoded:
        raise UserError("no comparisons left for training (lower --val-fraction, or give more prompts)")

    # how noisy the simulated labels are: the agreement two gold labelers with this noise would
    # reach (a file's or a person's rankings have their own noise, which we cannot know)
    labels = {}
    print(f"comparisons: {len(train_encoded)} train, {len(val_encoded)} held out (written to {comparisons_path} "
          "with rm.pt)")
    if cfg.labeler == "gold" and not cfg.comparisons:
        gold_groups = [labeling.gold_totals(labeling.Candidates(c.prompt, c.responses, c.ended)) for c in comparisons]
        # (no held-out comparisons, e.g. --val-fraction 0: the bound over all of them)
        held_out_groups = [totals for totals, h in zip(gold_groups, held_out) if h] or gold_groups
        labels = {"labeler/agreement": labeling.expected_agreement(gold_groups, cfg.label_noise),
                  # on the held-out pairs, the ones accuracy/val is measured on
                  "labeler/accuracy_bound": labeling.accuracy_bound(held_out_groups, cfg.label_noise),
                  "labeler/noise_for_73pct": labeling.noise_for_agreement(gold_groups, 0.73)}
        print(f"gold labeler, noise {cfg.label_noise}: two such labelers agree on {labels['labeler/agreement']:.1%} "
              f"of pairs (InstructGPT's labelers: ~73%, which noise {labels['labeler/noise_for_73pct']:.2f} gives "
              f"here); best reachable held-out accuracy {labels['labeler/accuracy_bound']:.1%}")

    # ---- 2. the reward model: the SFT trunk + a scalar head (its init is in RewardModel)
    model = RewardModel(config)
    model.trunk.load_state_dict(sft["model"])
    runtime.prepare(model).train()
    model.trunk.freeze_lower(cfg.freeze_layers)   # keep what the lower layers know; train the top and the head
    # training forward passes go through DDP under torchrun (its backward averages the gradients over
    # the ranks); evaluation and scoring call `model` itself. Wrapped after freezing: DDP then
    # synchronises only the parameters that train.
    train_model = runtime.wrap(model)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.lr)
    total_steps = math.ceil(len(train_encoded) / cfg.batch_size) * cfg.epochs
    print(f"training the reward model ({cfg.rm_objective} objective): {total_steps} steps of {cfg.batch_size} prompts")
    if runtime.distributed:
        print(f"  data parallel over {runtime.world_size} processes ({runtime.device}, {runtime.dtype}): "
              f"each takes its share of every batch of {cfg.batch_size}")

    start_step = 0
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        start_step = resumed["step"]

    metrics_path = os.path.join(cfg.out_dir, "rm_metrics.jsonl")

    def save_interval(step: int, summary: dict) -> None:
        """rm.pt every --save-every steps for --resume (marked unfinished: PPO refuses it), after what it
        goes with: the comparisons and the metrics so far."""
        labeling.write_comparisons(comparisons_path, all_ranked)
        log.commit()
        save_checkpoint(out_path, kind="rm", model_state=model.state_dict(), model_config=asdict(config),
                        tokenizer_identity=tokenizer.identity, train_config=asdict(cfg), step=step, metrics=summary,
                        finished=False, optimizer=optimizer.state_dict(), val_prompts=sorted(val_prompts),
                        candidates=[asdict(group) for group in candidates])

    order_rng = random.Random(cfg.seed)
    progress = Progress(total_steps, desc="rm", start=start_step)
    step, val_loss, val_accuracy = 0, math.nan, math.nan
    with MetricsLogger(metrics_path, resume_step=start_step if resumed else None, enabled=runtime.is_main) as log:
        if val_encoded and start_step == 0:   # step 0: the untrained head, for reference (about chance)
            val_loss, val_accuracy = evaluate(model, val_encoded, val_tiers, cfg.rm_objective, tokenizer.pad_id,
                                              cfg.batch_size, runtime)
            log.log(0, **{"loss/val": val_loss, "accuracy/val": val_accuracy})
        for epoch in range(cfg.epochs):
            order = list(range(len(train_encoded)))
            order_rng.shuffle(order)   # the same seed on every rank: the ranks agree on each global batch
            for first in range(0, len(order), cfg.batch_size):
                if step < start_step:   # a batch the interrupted run trained on before its last save
                    step += 1
                    continue
                lr = set_lr(optimizer, cosine_lr(step, total_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr))
                share, weight = batch_share(runtime, order[first:first + cfg.batch_size])   # this rank's part
                tiers = [train_tiers[i] for i in share]                                     # of the global batch
                # every response of each comparison scored: rewards (B_r, K) best first, r = RM(prompt, response)
                rewards, valid, tier_grid = score_comparisons(train_model, [train_encoded[i] for i in share],
                                                              tokenizer.pad_id, tiers)
                if cfg.rm_objective == "ranking":
                    # InstructGPT eq. 1, per prompt: 1/C(K,2) * sum over pairs i above j (ties left out) of
                    # -log sigmoid(r_i - r_j); then the mean over prompts (each prompt one batch element)
                    loss = ranking_reward_loss(rewards, valid, tier_grid)
                else:   # good/bad classifier: best -> 1, worst -> 0, cross-entropy on the logit margin
                    loss = classifier_objective(rewards, valid)
                record = train_metrics(runtime, loss, rewards.detach().masked_fill(~valid, math.nan), tiers, weight)
                # the global loss, the same on every rank: all of them stop together on a NaN
                check_finite(torch.tensor(record["loss/train"]), step)
                optimizer.zero_grad(set_to_none=True)
                (loss * weight).backward()   # DDP averages the ranks' gradients: the global batch's mean
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                optimizer.step()
                step += 1
                record.update({"lr": lr, "grad_norm": grad_norm.item(), "epoch": epoch})
                if val_encoded and (step % cfg.eval_every == 0 or step == total_steps):
                    val_loss, val_accuracy = evaluate(model, val_encoded, val_tiers, cfg.rm_objective,
                                                      tokenizer.pad_id, cfg.batch_size, runtime)
                    record.update({"loss/val": val_loss, "accuracy/val": val_accuracy})
                log.log(step, **record)
                progress.log(step, loss=record["loss/train"], val_acc=val_accuracy)
                if runtime.is_main and step % cfg.save_every == 0 and step < total_steps:
                    save_interval(step, {"loss/train": record["loss/train"], "loss/val": val_loss,
                                         "accuracy/val": val_accuracy, "minutes/collect": minutes_collect})

    # ---- 3. normalise: (raw - bias) * gain has mean 0, std 1 on the SFT policy's samples that ended
    #      (the ones whose score RL uses: one without EOS gets reward.MISSING_EOS_PENALTY instead).
    #      Each rank scores its share of the samples; the raw scores of all of them are gathered, so
    #      every rank fits the same bias and gain on every sample.
    if candidates:   # the policy's own samples (not the added degenerate ones); every rank holds all of them
        policy_samples = [(c.prompt, r, e) for c in candidates for r, e, source in zip(c.responses, c.ended, c.sources)
                          if source == labeling.POLICY]
        norm_samples = runtime.shard(policy_samples)
    else:   # comparisons from a file need not be the SFT policy's: sample some of its responses
        prompts = read_prompts(cfg.prompts or os.path.join(cfg.data_dir, "rm_prompts.jsonl"))
        norm_prompts = runtime.shard(labeling.cycle_prompts(prompts, cfg.norm_samples, random.Random(cfg.seed)))
        norm_responses, norm_ended, _ = sample_responses(
            policy, tokenizer, norm_prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            generator=runtime.generator(cfg.seed), batch_size=cfg.sample_batch_size)
        norm_samples = list(zip(norm_prompts, norm_responses, norm_ended))
    scorer = RewardScorer(model, tokenizer)   # bias 0, gain 1: raw scores
    raw_here = scorer.score(*(list(column) for column in zip(*norm_samples))) if norm_samples else torch.zeros(0)
    ended_here = torch.tensor([ended for _, _, ended in norm_samples], dtype=torch.bool)
    raw, ended = (torch.cat(parts) for parts in zip(*runtime.gather_objects([(raw_here, ended_here)])))
    # (with fewer than 2 that ended, e.g. a tiny token budget: all of them)
    reward_bias, reward_gain = fit_normalisation(raw[ended] if ended.sum() >= 2 else raw)
    scorer.bias, scorer.gain = reward_bias, reward_gain
    if not runtime.is_main:
        return   # the report, the checkpoint and the plots are rank 0's

    # ---- 4. report: held-out samples against the noiseless gold labeler (rank 0 alone)
    summary = {"loss/train": record["loss/train"], "loss/val": val_loss, "accuracy/val": val_accuracy, **labels,
               "reward_bias": reward_bias, "reward_gain": reward_gain, "comparisons/train": len(train_encoded),
               "comparisons/val": len(val_encoded), "minutes/collect": minutes_collect,
               "minutes": (time.time() - start) / 60}
    rm_held_out, gold_held_out = [], []
    if val_set and all(world.task_for_prompt(c.prompt) for c in val_set):   # gold knows only tiny-world prompts
        val_scores = [scorer.score([c.prompt] * len(c.responses), c.responses, c.ended).tolist() for c in val_set]
        report, rm_held_out, gold_held_out = gold_agreement(val_set, val_scores)
        summary.update(report)
        print("held out, against the noiseless gold labeler: " + ", ".join(f"{k} {v:.3f}" for k, v in report.items()))

    labeling.write_comparisons(comparisons_path, all_ranked)   # (the metrics were written when the loop's block ended)
    save_checkpoint(out_path, kind="rm", model_state=model.state_dict(), model_config=asdict(config),
                    tokenizer_identity=tokenizer.identity, train_config=asdict(cfg), step=step, metrics=summary,
                    reward_bias=reward_bias, reward_gain=reward_gain, rm_objective=cfg.rm_objective)
    curves = os.path.join(cfg.out_dir, "rm_curves.png")
    plot_curves(read_metrics(metrics_path), [
        {"keys": ["loss/train", "loss/val"], "title": f"RM loss ({cfg.rm_objective} objective)", "ylabel": "loss (nats)"},
        {"keys": ["accuracy/train", "accuracy/val"], "title": "pairwise accuracy against the labeler",
         "ylabel": "share of pairs ordered as ranked", "hline": 0.5, "hline_label": "chance"},
    ], curves, title="Reward model")
    written = [out_path, comparisons_path, metrics_path, curves]
    if rm_held_out:
        scatter = os.path.join(cfg.out_dir, "rm_scatter.png")
        plot_scatter(gold_held_out, rm_held_out, scatter, annotate="corr",
                     xlabel="gold score - mean gold score of the prompt's samples",
                     ylabel="RM score - mean RM score of the prompt's samples",
                     title=f"Reward model vs gold labeler ({len(rm_held_out)} held-out samples),\n"
                           f"each relative to its prompt's mean (what a ranking loss learns)")
        written.append(scatter)
    print(f"done in {summary['minutes']:.1f} min (collecting {minutes_collect:.1f}): held-out pairwise accuracy "
          f"{val_accuracy:.3f}; normalisation bias {reward_bias:.3f}, gain {reward_gain:.3f}")
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    run_main(main)
