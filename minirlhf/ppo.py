"""The pieces of PPO's loop that train_ppo.py calls (step 3 of the recipe); train_grpo.py shares them.

train_ppo.py writes one PPO *update* out in full: sample, score, old/reference logprobs and values,
KL-shaped rewards, GAE, whitening, epochs x minibatches of clipped losses, the KL controller. The
maths lives in `losses.py` and `kernels/` (pure functions on (B, T) tensors). This file holds what
the loop needs around them:

* `Rollout`: one batch of experience, and `Rollout.select`, the trimmed rows of a minibatch;
* sampling and scoring: `draw_prompts`, `score_rollout`, `fit_gold_normaliser`;
* the forward passes: `minibatch_orders`, `policy_logprobs` and `critic_values` (one minibatch,
  with gradient), `rollout_logprobs` and `rollout_values` (the whole rollout at rollout time, no
  gradient: the old logprobs, the reference logprobs, the values);
* one gradient step, `optimizer_step`; the logged stats, `minibatch_stats`, `mean_over_minibatches`,
  `rollout_stats`;
* data parallelism: `token_share`, `means_over_ranks`;
* saving and resuming a run (PPO's and GRPO's): `save_run`, `resume_run`; the critic's start:
  `critic_from_reward_model`.

The shape is InstructGPT's (Ouyang et al. 2022, section 3.5, eq. 2) as OpenAI's lm-human-preferences
(LHP) and TRL implement it (Huang et al. 2024, "The N Implementation Details of RLHF with PPO").
Three details that are easy to get wrong, pinned here and in `tests/test_ppo.py`:

* **The first minibatch has ratio exactly 1.** The old logprobs are recomputed by a forward pass
  (not taken from the sampler, whose KV-cache arithmetic differs in the last bits), over the very
  same minibatches, trimmed the same way, that the first epoch will use (`rollout_logprobs` over
  the first epoch of `minibatch_orders`). So the first minibatch's new logprobs are bit-for-bit the
  old ones: ratio 1, clipfrac 0, approxkl 0. Anything else (dropout left on, a different
  temperature, a different batch split) shows up there first.
* **Dropout off everywhere.** Every model here stays in ``eval()`` mode, training included:
  ``eval()`` only switches dropout off; gradients flow the same.
* **The KL the adaptive controller sees** is the per-sequence *sum* of per-token KL, averaged over
  the batch (``objective/kl``), in nats per response.

**Data parallelism** (``torchrun --nproc_per_node=W train_ppo.py``). The B prompts of an update
are split over the W ranks; each rank samples, scores and runs the forward passes of its B/W rows
alone, with its own dice. What must see the whole batch is reduced over the ranks (the functions
that do it take a `Runtime`, or `all_reduce`; in one process they are exactly the single-process
functions):

* advantages are whitened with the mean and variance of *every* rank's valid tokens
  (`losses.masked_whiten(..., all_reduce=runtime.all_reduce_sum)`);
* each rank cuts its rows into the same number of minibatches; minibatch j of the update is the
  union of every rank's minibatch j. A loss that is a mean over valid tokens is multiplied by
  `token_share` (this rank's tokens over the global minibatch's / W): DDP averages the W gradients,
  so the step is exactly one process's step on the global minibatch;
* the logged means, the KL the controller sees and the approximate KL that stops an update early
  (`--target-kl`) are means over every rank's tokens or samples (all ranks stop together; a rank
  that skipped a minibatch would leave the others waiting in DDP's all-reduce).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from minirlhf import labeler
from minirlhf.checkpoint import load_checkpoint, save_checkpoint
from minirlhf.cli import UserError, option
from minirlhf.evaluation import PolicyConfig
from minirlhf.losses import masked_mean
from minirlhf.model import GPT, ValueModel
from minirlhf.reward import MISSING_EOS_PENALTY, task_reward
from minirlhf.runtime import Runtime
from minirlhf.training import check_finite, response_logprobs

__all__ = [
    "RLConfig",
    "Rollout",
    "Minibatch",
    "draw_prompts",
    "score_rollout",
    "fit_gold_normaliser",
    "minibatch_orders",
    "policy_logprobs",
    "critic_values",
    "rollout_logprobs",
    "rollout_values",
    "optimizer_step",
    "minibatch_stats",
    "mean_over_minibatches",
    "rollout_stats",
    "token_share",
    "means_over_ranks",
    "save_run",
    "resume_run",
    "restore_sample_generator",
    "critic_from_reward_model",
    "critic_from_policy",
]


# ----------------------------------------------------------------------------------------------
# The options PPO and GRPO/RLOO share
# ----------------------------------------------------------------------------------------------


@dataclass
class RLConfig(PolicyConfig):
    """The options of online RL against the reward model, shared by train_ppo.py and train_grpo.py:
    the prompts, the updates (epochs x minibatches of a clipped ratio), the learning-rate schedule,
    sampling, and the periodic evaluation. Each script's config adds its own (PPO: the critic, GAE,
    the KL controller; GRPO: the group)."""

    reward_model: str = option("", "reward model checkpoint (default: OUT_DIR/rm.pt)")
    prompts: str = option("", "RL prompts JSONL (default: DATA_DIR/ppo_prompts.jsonl)")
    reward: str = option("rm", "what is maximised: rm (the learned reward model) or gold (the gold labeler itself: "
                               "the upper bound)", choices=["rm", "gold"])
    total_updates: int = option(48, "updates (one batch of rollouts each)", min=1)
    num_minibatches: int = option(4, "minibatches per epoch", min=1)
    ppo_epochs: int = option(2, "passes over each batch", min=1)
    lr: float = option(1e-4, "policy learning rate (AdamW)", above=0.0)
    min_lr_ratio: float = option(0.1, "learning rates decay (cosine) to this fraction", min=0.0, max=1.0)
    warmup_updates: int = option(2, "linear learning-rate warmup, in updates", min=0)
    grad_clip: float = option(1.0, "clip each model's gradient norm to this (0: off)", min=0.0)
    clip_range: float = option(0.2, "ratio clip epsilon", min=0.0)
    temperature: float = option(1.0, "sampling temperature (logprobs use it too)", min=0.05)
    missing_eos_penalty: float = option(-1.0, "score of a response with no EOS (normalised RM units)")
    eval_every: int = option(16, "held-out evaluation every N updates (0: only at the start and the end)", min=0)
    sample_every: int = option(10, "print samples every N updates", min=1)
    save_every: int = option(20, "write the checkpoint every N updates (and at the end)", min=1)


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

    Filled by train_ppo.py's loop, at rollout time (no gradient):
    logprobs        (B, R)  log pi_old(token), at the sampling temperature ("old" logprobs)
    ref_logprobs    (B, R)  log pi_ref(token), same temperature
    values          (B, R)  V(state before token t) from the critic
    entropy         (B, R)  entropy of the policy's sampling distribution at each token
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
# Sample and score
# ----------------------------------------------------------------------------------------------


def draw_prompts(prompts: list[str], order: list[int], n: int, generator: torch.Generator) -> list[str]:
    """The next `n` prompts of passes over `prompts`, each pass in a fresh random order.

    `order` holds the indices of the current pass not drawn yet, and is updated in place: ppo.pt
    saves it, so a resumed run draws the prompts the interrupted one would have drawn. Every rank
    draws the same prompts (`generator` is shared) and then takes its share (`Runtime.shard`).
    """
    while len(order) < n:   # a new pass, reshuffled
        order += torch.randperm(len(prompts), generator=generator).tolist()
    batch = [prompts[i] for i in order[:n]]
    del order[:n]
    return batch


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


def fit_gold_normaliser(generation, prompts: list[str], texts: list[str], runtime: Runtime) -> tuple[float, float]:
    """`--reward gold`: the (mean, sd) of the gold scores of the first batch, the SFT policy's
    samples (every rank's), which give the gold reward the RM's scale (`score_rollout`)."""
    _, gold, _ = score_rollout(generation, prompts, texts, reward="gold")
    gold = torch.tensor(runtime.gather_objects(gold.tolist()))
    normaliser = (gold.mean().item(), max(gold.std(unbiased=False).item(), 1e-3))
    print(f"gold reward normalised with the SFT batch's mean {normaliser[0]:.3f}, sd {normaliser[1]:.3f}")
    return normaliser


# ----------------------------------------------------------------------------------------------
# Forward passes (policy, reference, critic)
# ----------------------------------------------------------------------------------------------


def minibatch_orders(batch_size: int, num_minibatches: int, ppo_epochs: int,
                     generator: torch.Generator | None = None) -> list[list[torch.Tensor]]:
    """The minibatches of every epoch of one update: `ppo_epochs` lists of `num_minibatches` index
    tensors. Each epoch is a fresh permutation of 0..B-1 cut into near-equal parts, so every
    sample appears exactly once per epoch (sizes differ by at most 1 when B is not divisible).

    Drawn before the rollout's forward passes, so that they can use the first epoch's split
    (see `rollout_logprobs`: that is what makes the first minibatch's ratio exactly 1).
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
def rollout_logprobs(model: GPT, rollout: Rollout, minibatches: list[torch.Tensor],
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) logprobs of the rollout's response tokens under `model` and the (B, R) entropies of
    its distributions there (logits / temperature), 0 at padding, without gradient: the old
    logprobs (`model` = the policy as it is now) or the reference logprobs (the SFT model).

    The passes run over `minibatches` (pass the first epoch's split from `minibatch_orders`), each
    trimmed as `Rollout.select` trims it, so the first minibatch of the update recomputes exactly
    these numbers (ratio 1, bit for bit).
    """
    model.eval()   # dropout off (the only thing eval() changes here)
    return _over_minibatches(rollout, minibatches, lambda batch: policy_logprobs(model, batch, temperature))


@torch.no_grad()
def rollout_values(critic: ValueModel, rollout: Rollout, minibatches: list[torch.Tensor]) -> torch.Tensor:
    """(B, R) values V(state before token t) of the rollout under `critic`, 0 at padding, without
    gradient; over `minibatches` as `rollout_logprobs`."""
    critic.eval()   # dropout off
    (values,) = _over_minibatches(rollout, minibatches, lambda batch: (critic_values(critic, batch),))
    return values


def _over_minibatches(rollout: Rollout, minibatches: list[torch.Tensor], forward) -> list[torch.Tensor]:
    """Run `forward(minibatch)` (a tuple of (b, R') tensors) on each minibatch of the rollout and
    scatter the results back into (B, R) tensors, 0 at padding."""
    B, R = rollout.response_mask.shape
    device = rollout.response_mask.device
    outputs: list[torch.Tensor] = []
    for index in minibatches:
        index = index.to(device)
        batch = rollout.select(index)
        width = batch.response_mask.shape[1]
        results = forward(batch)
        if not outputs:
            outputs = [torch.zeros(B, R, device=device) for _ in results]
        for output, value in zip(outputs, results):
            output[index, :width] = value.float() * batch.response_mask   # 0 at padding
    return outputs


# ----------------------------------------------------------------------------------------------
# One gradient step, and what a minibatch logs
# ----------------------------------------------------------------------------------------------


def optimizer_step(optimizer: torch.optim.Optimizer, model: torch.nn.Module, loss: torch.Tensor, *,
                   grad_clip: float, step: int, what: str) -> float:
    """One gradient step on `loss`: stop the run if it is NaN/Inf (`check_finite`: the last
    checkpoint stays intact), zero the gradients, backward (under torchrun `model` is the DDP
    wrapper, and the gradients are averaged over the ranks here), clip the gradient norm to
    `grad_clip` (0: no clipping), step. Returns the gradient norm before clipping.

    `step` (the update) and `what` ("the policy loss") name the failure in the message."""
    check_finite(loss, step, what)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    optimizer.step()
    return grad_norm.item()


MINIBATCH_STATS = ("loss/policy", "loss/value", "policy/clipfrac", "policy/approxkl", "policy/ratio_mean",
                   "policy/ratio_max", "policy/entropy", "policy/grad_norm", "val/clipfrac", "val/grad_norm")


def minibatch_stats(runtime: Runtime, mask: torch.Tensor, *, policy_stats: dict, entropy: torch.Tensor,
                    policy_grad_norm: float, value_stats: dict | None = None, value_grad_norm: float | None = None,
                    extra: dict[str, tuple[float, float]] | None = None) -> dict:
    """The logged stats of one minibatch, over the GLOBAL minibatch (every rank's rows), the same on
    every rank: `MINIBATCH_STATS` (the value ones only with `value_stats`), then `extra`.

    policy_stats, value_stats: the stats of `losses.ppo_policy_loss` and `ppo_value_loss` on this
    rank's rows; entropy: (b, R') the policy's entropies; mask: (b, R') its valid tokens; extra:
    name -> (this rank's mean, its weight), e.g. ``{"loss/ptx": (ptx_loss, n_windows)}``.
    Token means are weighted by each rank's valid tokens (`means_over_ranks`), the ratio's max is
    the max over the ranks, and the gradient norms need nothing: after DDP's all-reduce every rank
    holds the same gradients.
    """
    n_tokens = mask.sum().item()
    local = {"loss/policy": policy_stats["policy_loss"], "policy/clipfrac": policy_stats["clipfrac"],
             "policy/approxkl": policy_stats["approxkl"], "policy/ratio_mean": policy_stats["ratio_mean"],
             "policy/entropy": masked_mean(entropy.detach(), mask).item()}
    if value_stats is not None:
        local.update({"loss/value": value_stats["value_loss"], "val/clipfrac": value_stats["clipfrac"]})
    weighted = {name: (value, n_tokens) for name, value in local.items()}
    means = means_over_ranks(runtime, {**weighted, **(extra or {})})
    means["policy/ratio_max"] = max(runtime.gather_objects([policy_stats["ratio_max"]]))
    means["policy/grad_norm"] = policy_grad_norm
    if value_stats is not None:
        means["val/grad_norm"] = value_grad_norm
    return {name: means[name] for name in (*MINIBATCH_STATS, *(extra or {})) if name in means}


def mean_over_minibatches(stats: list[dict]) -> dict:
    """Each stat averaged over the minibatches of an update (the ones run: an early stop runs fewer)."""
    return {name: sum(s[name] for s in stats) / len(stats) for name in stats[0]}


def rollout_stats(rollout: Rollout, kl_coef: float, runtime: Runtime | None = None, *,
                  gold: torch.Tensor | None = None, rm: torch.Tensor | None = None) -> dict:
    """The per-update objective metrics of a rollout (TRL's names). Sums are per sequence.

    Means over every rank's rows: this rank's per-sample means weighted by its rows, its per-token
    means by its valid tokens (`means_over_ranks`); the explained variance from global variances.
    gold, rm: the (B,) gold totals and RM scores of `score_rollout`, logged as objective/gold and
    objective/rm (never trained on, unless they are the reward).
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
    stats = {
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
    objective = {}
    if gold is not None:
        objective["objective/gold"] = (gold.mean().item(), len(gold))   # (this rank's mean, its samples)
    if rm is not None:
        objective["objective/rm"] = (rm.mean().item(), len(rm))
    if objective:
        stats.update(means_over_ranks(runtime, objective))
    return stats


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
# Saving and resuming a run (train_ppo.py and train_grpo.py --resume)
# ----------------------------------------------------------------------------------------------


def save_run(path: str, step: int, metrics: dict, *, cfg, tokenizer, runtime: Runtime, policy: GPT,
             policy_optimizer, kl_controller, rng: torch.Generator, sample_generator: torch.Generator,
             prompt_order: list[int], gold_normaliser: tuple[float, float] | None,
             critic: ValueModel | None = None, value_optimizer=None, kind: str = "ppo",
             finished: bool | None = None, **extra) -> None:
    """Write the run's checkpoint: the policy (loadable as sft.pt is), and everything `resume_run`
    needs to go on as if the run had never stopped - the policy's optimizer, the KL coefficient, the
    shared dice (`rng`), the prompts of this pass not drawn yet, every rank's sampling dice, the
    gold normaliser (`--reward gold`), and PPO's critic and its optimizer (GRPO has none).

    kind: "ppo" (ppo.pt), or train_grpo.py's "grpo" / "rloo", which pass no critic.
    finished: False marks an interval save of a run not done yet: every reader but `--resume`
        refuses it (`load_checkpoint`), and run_all.py continues it with --resume (train_grpo.py's
        saves). None writes no mark (ppo.pt's, never marked: evaluating a PPO run half way is a
        use of its own).
    extra: more fields of the kind (train_grpo.py: `advantage`, `kl_mode`).

    A collective (it gathers every rank's sampling dice): every rank calls it; rank 0 alone writes.
    `cfg` is the run's config (stored as `train_config`); `metrics` the summary to store.
    """
    sample_rng_states = runtime.gather_objects([sample_generator.get_state().cpu()])
    if not runtime.is_main:
        return
    fields = {"policy_optimizer": policy_optimizer.state_dict()}
    if critic is not None:   # PPO's critic
        fields.update(value_model=critic.state_dict(), value_model_config=asdict(critic.config),
                      value_optimizer=value_optimizer.state_dict())
    if finished is not None:
        fields["finished"] = finished
    save_checkpoint(path, kind=kind, model_state=policy.state_dict(), model_config=asdict(policy.config),
                    tokenizer_identity=tokenizer.identity, train_config=asdict(cfg), step=step,
                    metrics=metrics, **fields, kl_coef=float(kl_controller.value),
                    rng_state=rng.get_state(), prompt_order=list(prompt_order),
                    sample_rng_state=sample_rng_states[0], sample_rng_states=sample_rng_states,   # (older readers: one)
                    gold_normaliser=list(gold_normaliser) if gold_normaliser else None, reward=cfg.reward, **extra)


def resume_run(path: str, total_updates: int, *, tokenizer, runtime: Runtime, policy: GPT, policy_optimizer,
               kl_controller, rng: torch.Generator, sample_generator: torch.Generator,
               critic: ValueModel | None = None, value_optimizer=None,
               kind: str = "ppo") -> tuple[int, list[int], tuple[float, float] | None, dict]:
    """Load what `save_run` wrote into the run's objects, in place: the weights of the policy (and
    of PPO's critic), the optimizers, the KL coefficient, the shared dice and this rank's sampling
    dice. An interval save marked unfinished is what it is for.

    Returns (the update to start from, the prompts of this pass not drawn yet, the gold normaliser
    or None, the SFT baseline of the held-out evaluation). A one-line error if the run is finished,
    or if the checkpoint holds no optimizer (written by a script that could not resume).
    """
    ckpt = load_checkpoint(path, kind=kind, tokenizer_identity=tokenizer.identity, unfinished_ok=True)
    needs = ("policy_optimizer", "kl_coef", "rng_state")
    if critic is not None:
        needs += ("value_model", "value_optimizer")
    missing = [name for name in needs if name not in ckpt]
    if missing:
        raise UserError(f"{path} holds no {', '.join(missing)} (it was not written by a run that can be "
                        "resumed): cannot resume from it")
    policy.load_state_dict(ckpt["model"])
    if critic is not None:
        critic.load_state_dict(ckpt["value_model"])
    policy_optimizer.load_state_dict(ckpt["policy_optimizer"])
    if value_optimizer is not None:
        value_optimizer.load_state_dict(ckpt["value_optimizer"])
    kl_controller.value = float(ckpt["kl_coef"])
    rng.set_state(ckpt["rng_state"])
    prompt_order = list(ckpt.get("prompt_order", []))   # the rest of this pass (older checkpoints: reshuffled)
    restore_sample_generator(sample_generator, ckpt, runtime)
    start_update = ckpt["step"]
    gold_normaliser = tuple(ckpt["gold_normaliser"]) if ckpt.get("gold_normaliser") else None
    baseline = {k: v for k, v in ckpt["metrics"].items() if k.startswith("sft/")}
    print(f"resumed from {path} at update {start_update}, kl_coef {kl_controller.value:.4g}")
    if start_update >= total_updates:
        raise UserError(f"{path} is already at update {start_update} >= --total-updates {total_updates}")
    return start_update, prompt_order, gold_normaliser, baseline


def restore_sample_generator(generator: torch.Generator, ckpt: dict, runtime: Runtime) -> None:
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
