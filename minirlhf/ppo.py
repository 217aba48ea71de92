"""PPO for RLHF: rollout -> rewards -> advantages -> minibatch updates (step 3 of the recipe).

Lesson: this file is the RL loop of InstructGPT (Ouyang et al. 2022, section 3.5, eq. 2), in the
shape OpenAI's lm-human-preferences (LHP) and TRL give it (Huang et al. 2024, "The N Implementation
Details of RLHF with PPO"). One PPO *update* is:

1. **Rollout.** Sample one response per prompt from the policy with the KV cache
   (`training.sample_responses`): each row stops at its first EOS (kept; PAD after it).
2. **Score.** The reward model scores each (prompt, response) once (`score_rollout`), normalised so
   that SFT samples have mean 0 and std 1. A response that never emitted EOS gets a fixed penalty
   score instead (the RM has no sensible score for a cut-off text). The gold labeler scores it too,
   for the logs only: PPO never sees the gold score unless `--reward gold` is asked for.
3. **Forward passes** (`forward_rollout`): the log-probabilities of the sampled tokens under the
   policy ("old" logprobs) and the frozen reference (the SFT model), both with the logits divided by
   the sampling temperature, and the critic's values. Same convention everywhere: the hidden state
   at position ``P - 1 + t`` of a (prompt + response) sequence predicts response token ``t``, and
   the value read there is V(state before token t).
4. **Rewards and advantages** (`compute_advantages`): per token ``-kl_coef * (logp - ref_logp)``,
   plus the score once, on the last valid token (the EOS); GAE (gamma, lambda) that does not
   bootstrap past the end; returns = advantages + values; then advantages whitened over the valid
   tokens of the batch.
5. **Update** (`ppo_update`): ``ppo_epochs`` passes over the batch in shuffled minibatches (every
   sample once per pass); the clipped policy loss (PPO, Schulman et al. 2017, eq. 7) steps the
   policy, the clipped value loss steps the critic (separate models, separate optimizers).

Three details that are easy to get wrong, pinned here and in `tests/test_ppo.py`:

* **The first minibatch has ratio exactly 1.** The old logprobs are recomputed by a forward pass
  (not taken from the sampler, whose KV-cache arithmetic differs in the last bits), over the very
  same minibatches, trimmed the same way, that the first epoch will use. So the first minibatch's
  new logprobs are bit-for-bit the old ones: ratio 1, clipfrac 0, approxkl 0. Anything else
  (dropout left on, a different temperature, a different batch split) shows up there first.
* **Dropout off everywhere.** Every model here stays in ``eval()`` mode, training included:
  ``eval()`` only switches dropout off; gradients flow the same.
* **The KL the adaptive controller sees** is the per-sequence *sum* of per-token KL, averaged over
  the batch (``objective/kl``), in nats per response.

**Data parallelism** (``torchrun --nproc_per_node=W train_ppo.py``). The B prompts of an update
are split over the W ranks; each rank samples, scores and runs the forward passes of its B/W rows
alone, with its own dice. What must see the whole batch is reduced over the ranks (the functions
that do it take an optional `Runtime`, or `all_reduce`; without one, or in one process, they are
exactly the single-process functions):

* advantages are whitened with the mean and variance of *every* rank's valid tokens;
* each rank cuts its rows into the same number of minibatches; minibatch j of the update is the
  union of every rank's minibatch j. A loss that is a mean over valid tokens divides this rank's
  sum by (tokens of the global minibatch / W) (`token_share`): DDP averages the W gradients, so
  the step is exactly one process's step on the global minibatch;
* the logged means, the KL the controller sees and the approximate KL that stops an update early
  (`target_kl`) are means over every rank's tokens or samples (all ranks stop together; a rank
  that skipped a minibatch would leave the others waiting in DDP's all-reduce).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minirlhf import labeler
from minirlhf.kernels import gae
from minirlhf.losses import kl_shaped_rewards, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss
from minirlhf.model import GPT, ValueModel
from minirlhf.reward import MISSING_EOS_PENALTY, task_reward
from minirlhf.runtime import Runtime
from minirlhf.training import check_finite, lm_loss, response_logprobs, unwrap

__all__ = [
    "Rollout",
    "Minibatch",
    "score_rollout",
    "minibatch_orders",
    "policy_logprobs",
    "critic_values",
    "forward_rollout",
    "compute_advantages",
    "ppo_update",
    "rollout_stats",
    "token_share",
    "means_over_ranks",
    "critic_from_reward_model",
    "critic_from_policy",
]


# ----------------------------------------------------------------------------------------------
# The batch of experience
# ----------------------------------------------------------------------------------------------


@dataclass
class Minibatch:
    """Some rows of a `Rollout`, with the columns no row uses cut off (PAD-only prompt columns on
    the left, PAD-only response columns on the right): a short minibatch costs a short forward.

    sequences, attention_mask  (b, P' + R')   prompt_len = P'
    every response tensor      (b, R')
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None
    values: torch.Tensor | None
    advantages: torch.Tensor | None
    returns: torch.Tensor | None


@dataclass
class Rollout:
    """One batch of experience. B rows, P prompt columns (left-padded), R response columns.

    sequences       (B, P + R) int64  prompt then response, as `Generation.sequences()`
    attention_mask  (B, P + R) int64  1 on real tokens (prompt and response up to its EOS)
    prompt_len      P
    response_mask   (B, R) float      1 on response tokens up to and including the first EOS
    ended           (B,) bool         the response emitted EOS within the budget
    scores          (B,) float        what PPO maximises: normalised RM score, or the penalty

    Filled by `forward_rollout` (no gradient; the state of the models at rollout time):
    logprobs        (B, R)  log pi_old(token), at the sampling temperature ("old" logprobs)
    ref_logprobs    (B, R)  log pi_ref(token), same temperature
    values          (B, R)  V(state before token t) from the critic
    entropy         (B, R)  entropy of the policy's sampling distribution at each token

    Filled by `compute_advantages`:
    rewards, kl     (B, R)  KL-shaped per-token rewards and the per-token KL estimate
    advantages      (B, R)  whitened GAE advantages
    returns         (B, R)  value targets, advantages + values (before whitening)

    Every per-token tensor is 0 at padded positions (where the losses never look anyway).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response_mask: torch.Tensor
    ended: torch.Tensor
    scores: torch.Tensor
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.sequences.shape[0]

    @classmethod
    def from_generation(cls, generation, scores: torch.Tensor) -> "Rollout":
        """A rollout from a `Generation` (the sampled tokens) and the (B,) scores of its responses."""
        sequences, attention_mask = generation.sequences()
        return cls(sequences=sequences, attention_mask=attention_mask, prompt_len=generation.prompt_ids.shape[1],
                   response_mask=generation.response_mask.float(), ended=generation.ended,
                   scores=scores.to(generation.response_ids.device, torch.float32))

    def select(self, index: torch.Tensor) -> Minibatch:
        """The rows `index` (a 1-D tensor of row numbers), trimmed to the columns they use."""
        index = index.to(self.sequences.device)
        P = self.prompt_len
        response_mask = self.response_mask[index]                              # (b, R)
        response_len = max(1, int(response_mask.sum(dim=1).max().item()))     # R': the longest response here
        prompt_real = self.attention_mask[index, :P].bool().any(dim=0)         # (P,) columns some row uses
        first = int(prompt_real.float().argmax().item())                       # first such column
        columns = slice(first, P + response_len)

        def rows(tensor):
            return None if tensor is None else tensor[index, :response_len]

        return Minibatch(sequences=self.sequences[index, columns], attention_mask=self.attention_mask[index, columns],
                         prompt_len=P - first, response_mask=response_mask[:, :response_len],
                         logprobs=rows(self.logprobs), values=rows(self.values),
                         advantages=rows(self.advantages), returns=rows(self.returns))


# ----------------------------------------------------------------------------------------------
# Steps 1-2: sample and score
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def score_rollout(generation, prompts: list[str], texts: list[str], *, reward: str, reward_scorer=None,
                  gold_normaliser: tuple[float, float] = (0.0, 1.0),
                  missing_eos_penalty: float = MISSING_EOS_PENALTY):
    """The scores PPO maximises, and what the logs show beside them.

    reward="rm":   score = the reward model's normalised score (`RewardScorer.score`) of the
                   response's text - the same token sequence the RM was trained and normalised
                   on, and the text the gold labeler reads (reward.py: "One token sequence").
    reward="gold": score = (gold total - mean) / std with `gold_normaliser = (mean, std)` of the SFT
                   policy's gold scores, so the gold reward has the RM's scale (SFT: mean 0, std 1)
                   and the same KL coefficient means the same trade-off.
    Either way a response without EOS gets `missing_eos_penalty` instead (`reward.task_reward`).

    Returns (scores, gold, rm): (B,) tensors on the CPU: the scores to train on, the raw gold
    totals (0..labeler.MAX_SCORE), and the RM's normalised scores before the penalty (None without
    a reward model).
    """
    ended = generation.ended.cpu()
    gold = torch.tensor([labeler.score(p, t, bool(e)).total for p, t, e in zip(prompts, texts, ended)])
    rm = None
    if reward_scorer is not None:
        rm = reward_scorer.score(prompts, texts, ended.tolist()).cpu()
    if reward == "rm":
        if rm is None:
            raise ValueError("reward='rm' needs a reward_scorer")
        raw = rm
    elif reward == "gold":
        mean, std = gold_normaliser
        raw = (gold - mean) / std
    else:
        raise ValueError(f"reward must be 'rm' or 'gold', got {reward!r}")
    return task_reward(raw, ended, missing_eos_penalty), gold, rm


# ----------------------------------------------------------------------------------------------
# Step 3: forward passes (policy, reference, critic)
# ----------------------------------------------------------------------------------------------


def minibatch_orders(batch_size: int, num_minibatches: int, ppo_epochs: int,
                     generator: torch.Generator | None = None) -> list[list[torch.Tensor]]:
    """The minibatches of every epoch of one update: `ppo_epochs` lists of `num_minibatches` index
    tensors. Each epoch is a fresh permutation of 0..B-1 cut into near-equal parts, so every
    sample appears exactly once per epoch (sizes differ by at most 1 when B is not divisible).

    Drawn before the rollout's forward passes, so that they can use the first epoch's split
    (see `forward_rollout`: that is what makes the first minibatch's ratio exactly 1).
    """
    if not 1 <= num_minibatches <= batch_size:
        raise ValueError(f"num_minibatches must be in [1, batch_size={batch_size}], got {num_minibatches}")
    return [list(torch.randperm(batch_size, generator=generator).tensor_split(num_minibatches))
            for _ in range(ppo_epochs)]


def policy_logprobs(policy: GPT, minibatch: Minibatch, temperature: float):
    """(b, R') logprobs and entropies of the minibatch's response tokens under `policy`
    (logits / temperature). Position P' - 1 + t predicts response token t (see `response_logprobs`)."""
    return response_logprobs(policy, minibatch.sequences, minibatch.attention_mask, minibatch.prompt_len,
                              temperature=temperature, return_entropy=True)


def critic_values(critic: ValueModel, minibatch: Minibatch) -> torch.Tensor:
    """(b, R') values V(state before response token t), read at position P' - 1 + t: the state that
    has seen the prompt and tokens < t. Same alignment as the logprobs (LHP, TRL)."""
    values = critic(minibatch.sequences, minibatch.attention_mask)     # (b, P' + R')
    return values[:, minibatch.prompt_len - 1:-1].float()               # (b, R')


@torch.no_grad()
def forward_rollout(rollout: Rollout, policy: GPT, ref_policy: GPT, critic: ValueModel, *,
                    temperature: float, minibatches: list[torch.Tensor]) -> Rollout:
    """Fill `rollout.logprobs`, `.ref_logprobs`, `.values` and `.entropy` (no gradient).

    The passes run over `minibatches` (pass the first epoch's split from `minibatch_orders`), each
    trimmed as `Rollout.select` trims it, so the first minibatch of the update recomputes exactly
    these numbers (ratio 1, bit for bit). Results are scattered back to (B, R), 0 at padding.
    """
    for model in (policy, ref_policy, critic):
        model.eval()  # dropout off (the only thing eval() changes here)
    B, R = rollout.response_mask.shape
    device = rollout.response_mask.device
    outputs = {name: torch.zeros(B, R, device=device) for name in ("logprobs", "ref_logprobs", "values", "entropy")}
    for index in minibatches:
        index = index.to(device)
        batch = rollout.select(index)
        width = batch.response_mask.shape[1]
        logprobs, entropy = policy_logprobs(policy, batch, temperature)
        ref_logprobs, _ = policy_logprobs(ref_policy, batch, temperature)
        values = critic_values(critic, batch)
        for name, value in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("values", values),
                            ("entropy", entropy)):
            outputs[name][index, :width] = value.float() * batch.response_mask  # 0 at padding
    rollout.logprobs, rollout.ref_logprobs = outputs["logprobs"], outputs["ref_logprobs"]
    rollout.values, rollout.entropy = outputs["values"], outputs["entropy"]
    return rollout


# ----------------------------------------------------------------------------------------------
# Step 4: rewards and advantages
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_advantages(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                       values: torch.Tensor, response_mask: torch.Tensor, *, kl_coef: float,
                       gamma: float = 1.0, lam: float = 0.95, kl_estimator: str = "k1", whiten: bool = True,
                       all_reduce=None):
    """KL-shaped rewards -> GAE -> returns -> whitened advantages. All (B, R) but `scores` (B,).

        kl[t]       = kl_penalty(logprobs, ref_logprobs)[t]       (k1: log pi(y_t) - log pi_ref(y_t))
        rewards[t]  = -kl_coef * kl[t]  + score on the last valid token (the EOS)
        advantages, returns = GAE(rewards, values; gamma, lam), no bootstrap past the last token
        returns     = advantages + values           (computed BEFORE whitening: the critic's target)
        advantages  = whiten(advantages) over the valid tokens of the whole batch

    So a row's rewards sum to ``score - kl_coef * sum_t kl[t]``: the sequence-level objective of
    InstructGPT eq. 2, ``r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))``, paid out token by token.

    Everything is per row except the whitening: under data parallelism pass
    ``all_reduce=runtime.all_reduce_sum`` so that the batch whitened over is every rank's rows.

    Returns (rewards, kl, advantages, returns).
    """
    rewards, kl = kl_shaped_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef, kl_kind=kl_estimator)
    advantages, returns = gae(rewards, values, response_mask, gamma, lam)
    if whiten:   # trap: after `returns`, never before
        advantages = masked_whiten(advantages, response_mask, all_reduce=all_reduce)
    return rewards, kl, advantages, returns


# ----------------------------------------------------------------------------------------------
# Data parallelism: from this rank's share to the whole batch
# ----------------------------------------------------------------------------------------------


def token_share(n_tokens: float, runtime: Runtime) -> float:
    """The factor that turns this rank's token-mean loss into its share of the GLOBAL minibatch's.

    n_tokens: n_r, the valid tokens of rank r's part of the minibatch. A token-mean loss
    ``masked_mean(l, mask)`` is ``S_r / n_r``, the loss summed over those tokens divided by their
    number. DDP averages the W ranks' gradients, so for the mean over all ``N = n_1 + ... + n_W``
    tokens each rank must contribute ``S_r / (N / W)``:

        1/W * (S_1 + ... + S_W) / (N / W)  =  (S_1 + ... + S_W) / N

    That is its token mean times ``n_r / (N / W)``, the factor returned: a rank with more tokens
    weighs more (a plain average of the ranks' means would overweight the tokens of a rank with
    short responses). One all-reduce; exactly 1.0 in one process, where the loss stays bit for bit
    what it was.
    """
    (total,) = runtime.sum_over_ranks(n_tokens)
    return n_tokens * runtime.world_size / max(total, 1.0)


def means_over_ranks(runtime: Runtime, local: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Means over every rank's tokens (or samples) from each rank's own means.

    local: name -> (this rank's mean, its weight: the number of tokens or samples it averages).
    Returns name -> sum_r(weight_r * mean_r) / sum_r(weight_r), 0 where no rank has any weight
    (as `masked_mean` of nothing). One all-reduce for every name.

    In one process this is each mean itself, bit for bit: a float32 mean has 24 significant bits
    and a count n < 2^29 another 29, so ``mean * n`` is exact in float64 and dividing it by n gives
    the mean back - the single-process metrics stay exactly what they were.
    """
    pairs = list(local.values())
    totals = runtime.sum_over_ranks(*(mean * weight for mean, weight in pairs), *(weight for _, weight in pairs))
    weighted, weights = totals[:len(pairs)], totals[len(pairs):]
    return {name: total / weight if weight else 0.0 for name, total, weight in zip(local, weighted, weights)}


def masked_var_over_ranks(x: torch.Tensor, mask: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """`losses.masked_var` (population) of every rank's valid entries: the same arithmetic, with the
    sums and counts all-reduced (two passes: the mean, then the squared deviations from it)."""
    weights = mask.to(x.dtype).expand_as(x)
    count = runtime.all_reduce_sum(weights.sum()).clamp(min=1.0)
    mean = runtime.all_reduce_sum(torch.where(weights != 0, x, 0.0).sum()) / count
    return runtime.all_reduce_sum(torch.where(weights != 0, (x - mean) ** 2, 0.0).sum()) / count


def single_process(device: torch.device) -> Runtime:
    """The runtime of a plain `python` run: every reduction above is the identity."""
    return Runtime(device=torch.device(device))


# ----------------------------------------------------------------------------------------------
# Step 5: the PPO update
# ----------------------------------------------------------------------------------------------


def ppo_update(rollout: Rollout, policy: GPT, critic: ValueModel, policy_optimizer, value_optimizer, *,
               orders: list[list[torch.Tensor]], temperature: float, clip_range: float, clip_range_value: float,
               grad_clip: float = 1.0, target_kl: float = 0.0, ptx_batch=None, ptx_coef: float = 0.0,
               step: int = 0, runtime: Runtime | None = None) -> dict:
    """PPO epochs over shuffled minibatches of one rollout; steps both optimizers once per minibatch.

    Per minibatch (Schulman et al. 2017; the LHP/TRL variant, Huang et al. 2024):
        policy loss  = ppo_policy_loss(logp, old_logp, advantages)            (clipped surrogate)
                     + ptx_coef * LM loss on a pretraining batch               (InstructGPT "PPO-ptx")
        value loss   = ppo_value_loss(values, old_values, returns)            (clipped, critic only)
    The policy and the critic are separate networks with separate optimizers, so the two losses
    need no relative weight (no ``vf_coef``). Gradients are clipped to `grad_clip` (0: off).

    Args:
        rollout: this rank's rows (all of them in one process).
        policy, critic: the models to train. Under torchrun pass them wrapped ONCE per run,
            ``runtime.wrap(model)`` (DistributedDataParallel): the training forwards run through
            the wrapper, whose backward averages the gradients over the ranks.
        orders: from `minibatch_orders`: the minibatches of each epoch (the first epoch's split must
            be the one `forward_rollout` used). Every rank must have as many minibatches.
        target_kl: stop the update early (skip its remaining minibatches) once a minibatch's
            approximate KL to the rollout policy exceeds it; 0 disables.
        ptx_batch: a function returning (inputs, targets) of pretraining text, or None. Under
            torchrun, this rank's equal share of the pretraining batch.
        step: the update number, for the message if a loss is NaN/Inf (`check_finite` stops the run).
        runtime: the processes (see the module docstring); None: one process.

    Returns the stats: means over the minibatches run (``policy/approxkl``, ...), ``minibatch_stats``
    (one dict per minibatch, in order: the first has ratio 1) and ``policy/epochs`` (epochs started).
    Every stat is over the global minibatch (all ranks' rows), and the same on every rank.
    """
    runtime = runtime or single_process(rollout.sequences.device)
    if runtime.distributed and (unwrap(policy) is policy or unwrap(critic) is critic):
        raise ValueError("under torchrun, pass ppo_update the DDP-wrapped models (runtime.wrap(model))")
    policy.eval()  # dropout off: eval() only switches dropout; gradients flow as in train()
    critic.eval()
    minibatch_stats = []
    epochs_run = 0
    stop = False
    for epoch_minibatches in orders:
        epochs_run += 1
        for index in epoch_minibatches:
            batch = rollout.select(index)
            mask = batch.response_mask
            n_tokens = mask.sum().item()             # this rank's valid tokens in the minibatch
            share = token_share(n_tokens, runtime)   # 1.0 in one process

            # ---- policy: clipped surrogate (+ optional pretraining mix)
            logprobs, entropy = policy_logprobs(policy, batch, temperature)             # (b, R') each
            policy_loss, policy_stats = ppo_policy_loss(logprobs, batch.logprobs, batch.advantages, mask, clip_range)
            loss = policy_loss * share   # this rank's share of the global minibatch's token mean
            ptx_loss = None
            if ptx_batch is not None and ptx_coef > 0:
                # this rank's share of the windows; every rank holds as many full windows, so its
                # plain mean is already its share of the global mean (DDP averages)
                inputs, targets = ptx_batch()
                ptx_loss = lm_loss(policy, inputs, targets)
                loss = loss + ptx_coef * ptx_loss
            check_finite(loss, step, "the policy loss")
            policy_optimizer.zero_grad(set_to_none=True)
            loss.backward()   # under DDP: the gradients are averaged over the ranks here
            policy_grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip or float("inf"))
            policy_optimizer.step()

            # ---- critic: clipped value loss
            values = critic_values(critic, batch)                                        # (b, R')
            value_loss, value_stats = ppo_value_loss(values, batch.values, batch.returns, mask, clip_range_value)
            check_finite(value_loss, step, "the value loss")
            value_optimizer.zero_grad(set_to_none=True)
            (value_loss * share).backward()
            value_grad_norm = torch.nn.utils.clip_grad_norm_(critic.parameters(), grad_clip or float("inf"))
            value_optimizer.step()

            # ---- stats of the global minibatch: token-weighted means over the ranks. The gradient
            # norms need none: after DDP's all-reduce every rank holds the same gradients.
            token_means = {
                "loss/policy": policy_stats["policy_loss"],
                "loss/value": value_stats["value_loss"],
                "policy/clipfrac": policy_stats["clipfrac"],
                "policy/approxkl": policy_stats["approxkl"],
                "policy/ratio_mean": policy_stats["ratio_mean"],
                "policy/entropy": masked_mean(entropy.detach(), mask).item(),
                "val/clipfrac": value_stats["clipfrac"],
            }
            local = {name: (value, n_tokens) for name, value in token_means.items()}
            if ptx_loss is not None:
                local["loss/ptx"] = (ptx_loss.item(), targets.numel())
            stats = means_over_ranks(runtime, local)
            minibatch_stats.append({
                "loss/policy": stats["loss/policy"],
                "loss/value": stats["loss/value"],
                "policy/clipfrac": stats["policy/clipfrac"],
                "policy/approxkl": stats["policy/approxkl"],
                "policy/ratio_mean": stats["policy/ratio_mean"],
                "policy/ratio_max": max(runtime.gather_objects([policy_stats["ratio_max"]])),
                "policy/entropy": stats["policy/entropy"],
                "policy/grad_norm": policy_grad_norm.item(),
                "val/clipfrac": stats["val/clipfrac"],
                "val/grad_norm": value_grad_norm.item(),
            })
            if ptx_loss is not None:
                minibatch_stats[-1]["loss/ptx"] = stats["loss/ptx"]
            # the global approximate KL: every rank takes the same decision (DDP needs them in step)
            if target_kl > 0 and stats["policy/approxkl"] > target_kl:
                stop = True
                break
        if stop:
            break

    stats = {name: sum(s[name] for s in minibatch_stats) / len(minibatch_stats) for name in minibatch_stats[0]}
    stats["val/vf_loss"] = stats["loss/value"]
    stats["policy/epochs"] = epochs_run
    stats["policy/early_stop"] = float(stop)
    stats["minibatch_stats"] = minibatch_stats
    return stats


def rollout_stats(rollout: Rollout, kl_coef: float, runtime: Runtime | None = None) -> dict:
    """The per-update objective metrics of a rollout (TRL's names). Sums are per sequence.

    Means over every rank's rows: this rank's per-sample means weighted by its rows, its per-token
    means by its valid tokens (`means_over_ranks`); the explained variance from global variances.
    """
    runtime = runtime or single_process(rollout.sequences.device)
    mask = rollout.response_mask
    kl_per_sequence = rollout.kl.sum(dim=1)                                   # (B,)
    rows, tokens = rollout.batch_size, mask.sum().item()
    mean = means_over_ranks(runtime, {
        "scores": (rollout.scores.mean().item(), rows),
        "kl": (kl_per_sequence.mean().item(), rows),
        "non_score_reward": ((-kl_coef * kl_per_sequence).mean().item(), rows),
        "rlhf_reward": (rollout.rewards.sum(dim=1).mean().item(), rows),      # = scores - kl_coef * kl
        "entropy": (masked_mean(rollout.entropy, mask).item(), tokens),
        "values": (masked_mean(rollout.values, mask).item(), tokens),
        "returns": (masked_mean(rollout.returns, mask).item(), tokens),
        "length": (mask.sum(dim=1).mean().item(), rows),
        "eos": (rollout.ended.float().mean().item(), rows),
    })
    # losses.explained_variance (1 - Var[R - V] / Var[R]), with the variances of every rank's tokens
    var_returns = masked_var_over_ranks(rollout.returns, mask, runtime).item()
    var_residual = masked_var_over_ranks(rollout.returns - rollout.values, mask, runtime).item()
    return {
        "objective/scores": mean["scores"],
        "objective/kl": mean["kl"],
        "objective/non_score_reward": mean["non_score_reward"],
        "objective/rlhf_reward": mean["rlhf_reward"],
        "objective/entropy": mean["entropy"],
        "val/explained_variance": math.nan if var_returns == 0.0 else 1.0 - var_residual / var_returns,
        "val/mean": mean["values"],
        "val/returns_mean": mean["returns"],
        "response_length": mean["length"],
        "eos_rate": mean["eos"],
    }


# ----------------------------------------------------------------------------------------------
# The critic's initialisation
# ----------------------------------------------------------------------------------------------


def critic_from_reward_model(reward_scorer) -> ValueModel:
    """The critic as InstructGPT starts it: a copy of the reward model (trunk and head).

    The RM's head gives raw scores; PPO's rewards use the normalised ``(raw - bias) * gain``. The
    normalisation is folded into the copied head (``w <- gain * w``, ``b <- gain * (b - bias)``), so
    at every position the critic starts by predicting the normalised score there, not the raw one
    (whose offset would otherwise cost the critic its first updates).
    """
    critic = ValueModel.from_reward_model(reward_scorer.model)
    with torch.no_grad():
        critic.head.weight.mul_(reward_scorer.gain)
        critic.head.bias.sub_(reward_scorer.bias).mul_(reward_scorer.gain)
    return critic.requires_grad_(True).eval()


def critic_from_policy(policy: GPT) -> ValueModel:
    """A critic when there is no reward model (``--reward gold`` without rm.pt): the SFT trunk and a
    value head at zero (docs/design.md)."""
    critic = ValueModel(policy.config).to(policy.lm_head.weight.device)
    critic.trunk.load_state_dict(policy.state_dict())
    return critic.eval()
