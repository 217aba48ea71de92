"""The reward model: the batches and losses that train it, how it is judged, and how it is used.

Training (`train_rm.py`, InstructGPT section 3.5). A comparison is one prompt with K responses
ranked best first. `encode_ranked` renders each response as the policy produced it,

    [USER] prompt [ASSISTANT] response [EOS]        ([EOS] left off a response that never stopped)

`score_comparisons` scores a batch of comparisons into a best-first grid, and `comparison_loss`
applies one of two objectives:

    ranking     InstructGPT's K-wise loss (eq. 1): all C(K, 2) pairs of a prompt are one batch
                element, loss = mean over pairs of -log sigmoid(r_better - r_worse)
                (`losses.ranking_reward_loss`; prompts with different K share a batch through a
                valid mask);
    classifier  a good/bad classifier: the best response of each ranking is labelled 1, the
                worst 0, cross-entropy (`losses.classifier_reward_loss`); the RM's scalar output is
                the classifier's logit margin log p(good) - log p(bad) (a two-class softmax
                depends only on the difference of its two logits, so one scalar is all it needs).

Both losses are means over the comparisons (prompts) of the batch. Under torchrun each rank scores
its share of a global batch (`batch_share`) and weights its mean so that DDP's average of the
ranks' gradients is the gradient of the global mean.

Judging it: `pairwise_accuracy` against the labeler's rankings, and `gold_agreement` against the
noiseless gold labeler (pairwise accuracy per prompt family, rank correlation, top choice).

Using it. The RM's raw outputs have an arbitrary offset and scale (the ranking loss only sees
differences), so after training `train_rm.py` stores a bias and a gain (`fit_normalisation`) that
make the SFT policy's samples score mean 0, std 1 (InstructGPT normalises its RM the same way
before RL; so does TRL). Every user of the RM - PPO, GRPO, best-of-n, evaluation - goes through
`RewardScorer` (`load_reward_model`), which applies them:

    score = (raw - bias) * gain

One token sequence. The RM always reads the response as TEXT rendered by `render_chat` - the
canonical token split of what the gold labeler reads - in training, in the normalisation and when
scoring a rollout. A sampler can emit a non-canonical split of the same text (BPE allows many);
scored on its raw ids, a policy could find splits the RM never saw and the labeler cannot see.

What RL maximises (`task_reward`): the normalised score of a response that ended with EOS, and
`MISSING_EOS_PENALTY` (-1: one SFT standard deviation below the SFT mean) for one that ran out of
tokens, whatever the RM thinks of it. So the normalisation is fitted on the SFT samples that ended
(the ones whose RM score RL uses), and best-of-n and the KL-regularised optimum rank responses by
the same `RewardScorer.reward` that PPO and GRPO train on.
"""

from __future__ import annotations

import math
from itertools import combinations

import torch

from minirlhf import labeler, world
from minirlhf.labeling import POLICY
from minirlhf.checkpoint import load_checkpoint
from minirlhf.data import Comparison, pad_sequences
from minirlhf.losses import classifier_reward_loss, ranking_reward_loss
from minirlhf.metrics import pearson_r, spearman_rho
from minirlhf.model import GPTConfig, RewardModel
from minirlhf.tokenizer import Tokenizer, render_chat

RM_OBJECTIVES = ("ranking", "classifier")
MISSING_EOS_PENALTY = -1.0   # the reward of a response without EOS, on the normalised scale (see above)


# ----------------------------------------------------------------------------------------------
# Training batches and losses

def encode_ranked(tokenizer: Tokenizer, comparison: Comparison, block_size: int,
                  ended: list[bool] | None = None) -> list[list[int]]:
    """Token ids of each response of a comparison, BEST FIRST (in `comparison.ranking` order).

    `ended[i]` (default: the comparison's own `ended`, else all True) is False for a response that
    ran out of tokens without EOS: it is rendered without the EOS, as the policy left it. A
    sequence longer than `block_size` is cut (its reward is then read at the cut).
    """
    ended = ended if ended is not None else getattr(comparison, "ended", None) or [True] * len(comparison.responses)
    return [render_chat(tokenizer, comparison.prompt, comparison.responses[i], add_eos=ended[i])[:block_size]
            for i in comparison.ranking]


def score_rows(model: RewardModel, rows: list[list[int]], pad_id: int, rows_per_chunk: int = 32) -> torch.Tensor:
    """Raw rewards (N,) of N token lists, in their order. Each is read at its row's last real
    token, so padding (its length, or the PAD id) does not change it.

    Rows are sorted by length and scored in chunks of `rows_per_chunk`, each right-padded only to
    its own longest row: responses range from an empty one to the whole budget, and one batch
    padded to the longest row would spend half its compute on PAD. (Gradients flow through every
    chunk; the result is the same as one big batch up to float rounding.)
    """
    device = next(model.parameters()).device
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    rewards = []
    for start in range(0, len(rows), rows_per_chunk):
        chunk = by_length[start:start + rows_per_chunk]
        ids, mask = pad_sequences([rows[i] for i in chunk], pad_id, side="right")   # (n, T) each
        rewards.append(model(ids.to(device), attention_mask=mask.to(device)).float())
    order = torch.tensor(by_length, device=device).argsort()   # position of each row among the sorted ones
    return torch.cat(rewards)[order]


def score_comparisons(model: RewardModel, batch: list[list[list[int]]], pad_id: int,
                      tiers: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every response of a batch of B comparisons: (rewards, valid, tier_grid), each (B, K_max).

    batch[b] is comparison b's responses as token lists, best first (`encode_ranked`); prompts may
    have different numbers of responses K_b >= 2. tiers[b] (`RankedComparison.tiers`, best first;
    None: strict rankings) marks ties: equal tiers are responses the labeler preferred neither of.
    The rewards are placed in a best-first grid; `valid` is False where a prompt has fewer than
    K_max responses (its reward there is 0, ignored by the losses), and `tier_grid` repeats a
    row's last tier there. A comparison whose responses are all tied prefers nothing and is an
    error (`labeling.drop_all_tied` leaves those out first). `model` may be DDP-wrapped.
    """
    B, k_max = len(batch), max(len(responses) for responses in batch)
    device = next(model.parameters()).device
    tiers = tiers or [list(range(len(responses))) for responses in batch]
    if any(row[0] == row[-1] for row in tiers):
        raise ValueError("a comparison whose responses are all tied prefers nothing: leave it out "
                         "(labeling.drop_all_tied)")
    tier_grid = torch.tensor([row + [row[-1]] * (k_max - len(row)) for row in tiers], device=device)  # (B, K_max)
    rows = [tokens for responses in batch for tokens in responses]                          # N = sum of K_b
    slots = torch.tensor([b * k_max + i for b, responses in enumerate(batch) for i in range(len(responses))],
                         device=device)                                                     # (N,) flat grid index
    scores = score_rows(model, rows, pad_id)                                                # (N,)
    rewards = torch.zeros(B * k_max, device=device).index_put((slots,), scores).view(B, k_max)
    valid = torch.zeros(B * k_max, dtype=torch.bool, device=device).index_fill(0, slots, True).view(B, k_max)
    return rewards, valid, tier_grid


def classifier_objective(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The good/bad classifier's loss on a best-first (B, K_max) grid: the best response of each
    prompt is labelled 1, the worst (its last valid one) 0; the middle ones get no label. The best
    and the worst are in different tiers, since an all-tied comparison is refused when scoring."""
    B = rewards.shape[0]
    worst = rewards.gather(1, (valid.sum(dim=1) - 1)[:, None]).squeeze(1)   # (B,) last valid = worst
    margins = torch.cat([rewards[:, 0], worst])                             # (2B,) logit margins
    labels = torch.cat([torch.ones(B), torch.zeros(B)]).to(rewards.device)   # good 1, bad 0
    return classifier_reward_loss(margins, labels)


def comparison_loss(model: RewardModel, batch: list[list[list[int]]], objective: str,
                    pad_id: int, tiers: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of a batch of B comparisons (`score_comparisons`), and their rewards:

        ranking:     ranking_reward_loss(rewards, valid, tier_grid): the mean over each prompt's
                     C(K, 2) pairs less its ties, then over prompts;
        classifier:  `classifier_objective` (all responses are scored all the same, so that both
                     objectives report accuracy on the same pairs).

    Returns (loss, rewards): a 0-d loss to minimise and the detached grid, NaN where a prompt has
    fewer than K_max responses. train_rm.py writes these steps out in its training loop.
    """
    if objective not in RM_OBJECTIVES:
        raise ValueError(f"objective must be one of {RM_OBJECTIVES}, got {objective!r}")
    rewards, valid, tier_grid = score_comparisons(model, batch, pad_id, tiers)
    if objective == "ranking":
        loss = ranking_reward_loss(rewards, valid, tier_grid)
    else:
        loss = classifier_objective(rewards, valid)
    return loss, rewards.detach().masked_fill(~valid, math.nan)


def batch_share(runtime, batch: list) -> tuple[list, float]:
    """This rank's comparisons of a GLOBAL batch, and the weight to multiply their mean loss by.

    `comparison_loss` is a mean over the comparisons (prompts) it is given, and DDP AVERAGES the
    gradients of the W ranks. Rank r holds B_r of the batch's B comparisons; weighting its mean by
    B_r * W / B makes that average the gradient of the mean over the whole batch:

        1/W * sum_r (B_r * W / B) * mean_r = 1/B * sum_r B_r * mean_r = mean over all B comparisons

    (without the weight, a rank with 2 comparisons would count as much as a rank with 3). The
    classifier objective's mean over 2B margins weights the same way (two margins per comparison).
    In one process the weight is exactly 1 and the share is the batch: nothing changes.

    A rank whose share is empty (a last, short batch with fewer comparisons than ranks) must still
    run a forward and a backward pass - DDP's gradient all-reduce waits for every rank - so it
    gets the batch's first comparison with weight 0: it adds nothing to the gradient.
    """
    share = runtime.shard(batch)
    if not share:
        return batch[:1], 0.0
    return share, len(share) * runtime.world_size / len(batch)


def pairwise_counts(rewards_best_first: torch.Tensor, tiers: list[list[int]] | None = None) -> tuple[float, float]:
    """(correct, pairs): over all rows of a (B, K) best-first grid, the pairs i < j (i ranked above
    j by the labeler) with r_i > r_j - an RM tie counts half - and the number of pairs. NaN entries
    (missing responses) are skipped, and so are the labeler's ties (tiers[b][i] == tiers[b][j];
    None: strict rankings): a tie has no right order. Counts, not a ratio, so that data-parallel
    ranks can add theirs up and divide once (`pairwise_accuracy` is correct / pairs).
    """
    correct = total = 0.0
    for b, row in enumerate(rewards_best_first.tolist()):
        row_tiers = tiers[b] if tiers is not None else list(range(len(row)))
        scored = [(r, t) for r, t in zip(row, row_tiers) if not math.isnan(r)]
        for (better, better_tier), (worse, worse_tier) in combinations(scored, 2):
            if better_tier == worse_tier:
                continue
            correct += 1.0 if better > worse else 0.5 if better == worse else 0.0
            total += 1
    return correct, total


def pairwise_accuracy(rewards_best_first: torch.Tensor, tiers: list[list[int]] | None = None) -> float:
    """The share of pairs i < j (i ranked above j by the labeler) with r_i > r_j, over all rows
    of a (B, K) best-first grid; an RM tie counts half, NaN entries (missing responses) and the
    labeler's ties are skipped (see `pairwise_counts`).

        pairwise_accuracy(torch.tensor([[3.0, 1.0, 2.0]])) -> 2/3   (3>1 yes, 3>2 yes, 1>2 no)
        pairwise_accuracy(torch.tensor([[3.0, 1.0, 2.0]]), tiers=[[0, 1, 1]]) -> 1   (1 vs 2: tied)
    """
    correct, total = pairwise_counts(rewards_best_first, tiers)
    return correct / total if total else math.nan


def fit_normalisation(raw_scores: torch.Tensor) -> tuple[float, float]:
    """(bias, gain) such that (raw - bias) * gain has mean 0 and standard deviation 1 on `raw_scores`
    (the RM's raw scores of SFT-policy samples). The std is the sample std (n - 1); a constant
    sample (std ~ 0) keeps gain 1. The map is increasing, so every ranking - and so the RM's
    pairwise accuracy - is unchanged.

        fit_normalisation(torch.tensor([1.0, 3.0]))  ->  (2.0, 0.7071...)   # std = sqrt(2)
    """
    raw_scores = raw_scores.detach().double().flatten()
    if raw_scores.numel() < 2:
        raise ValueError(f"need at least 2 scores to fit a normalisation, got {raw_scores.numel()}")
    bias = raw_scores.mean().item()
    std = raw_scores.std().item()
    return bias, (1.0 / std if std > 1e-6 else 1.0)


# ----------------------------------------------------------------------------------------------
# Judging a reward model against the gold labeler

def gold_agreement(comparisons: list[Comparison], rm_scores: list[list[float]]) -> tuple[dict, list[float], list[float]]:
    """How a reward model agrees with the NOISELESS gold labeler on some (held-out) comparisons.

    comparisons[c].responses are scored by the RM as rm_scores[c] (same order); the gold totals
    come from `labeler.score` (with each response's `ended`, if the comparison has it). The
    headline numbers use the responses sampled from the policy (`sources` "policy"; all of them
    for comparisons without `sources`), the distribution PPO starts from:

        gold/accuracy         pairwise accuracy on the pairs whose gold totals differ (RM ties count half)
        gold/accuracy/FAMILY  the same for each prompt family
        gold/accuracy/correctness  the pairs whose rubric part `correct` differs: does the RM check
                              whether the answer is right (the fact, the sum, how many key facts)?
        gold/accuracy/form    the pairs that are equally correct: length, tone, staying on topic
        gold/spearman_within  rank correlation of RM and gold scores among each prompt's samples,
                              averaged over prompts: what the ranking loss trains
        gold/spearman         the same over all samples pooled. Lower, and that is expected: the
                              ranking loss sees only differences between responses to ONE prompt,
                              so it never learns that (say) sums score lower than facts overall
        gold/pearson          linear correlation, pooled
        gold/top_choice       share of prompts where the RM's favourite has the highest gold total
                              (chance: about 1/K)
        gold/accuracy/degenerate   pairs of a policy sample and an added degenerate response
                                   (`labeling.add_degenerate`), when there are any
        gold/accuracy/all     every pair of the comparisons whose gold totals differ, both kinds

    Returns (report, rm_deviation, gold_deviation): the report, and for a scatter plot each
    policy sample's RM and gold score minus the mean of its prompt's samples.
    """
    hits_by_family: dict[str, list[float]] = {}
    hits_by_kind: dict[str, list[float]] = {"correctness": [], "form": []}
    degenerate_hits, top_hits, within_rhos, all_rm, all_gold, rm_deviation, gold_deviation = [], [], [], [], [], [], []
    for comparison, rm in zip(comparisons, rm_scores):
        ended = getattr(comparison, "ended", None) or [True] * len(rm)
        from_policy = [s == POLICY for s in (getattr(comparison, "sources", None) or [POLICY] * len(rm))]
        scores = [labeler.score(comparison.prompt, r, e) for r, e in zip(comparison.responses, ended)]
        gold = [score.total for score in scores]
        correct = [score.parts["correct"] for score in scores]
        task = world.task_for_prompt(comparison.prompt)
        family = task.family if task else "other"
        for i, j in combinations(range(len(gold)), 2):
            if gold[i] == gold[j] or not (from_policy[i] or from_policy[j]):
                continue
            agree = (rm[i] - rm[j]) * (gold[i] - gold[j])   # > 0: the same order
            hit = 1.0 if agree > 0 else 0.5 if agree == 0 else 0.0
            if from_policy[i] and from_policy[j]:
                hits_by_family.setdefault(family, []).append(hit)
                hits_by_kind["correctness" if correct[i] != correct[j] else "form"].append(hit)
            else:
                degenerate_hits.append(hit)
        policy = [i for i in range(len(rm)) if from_policy[i]]
        if not policy:
            continue
        favourite = max(policy, key=rm.__getitem__)
        top_hits.append(float(gold[favourite] == max(gold[i] for i in policy)))
        rm_here, gold_here = [rm[i] for i in policy], [gold[i] for i in policy]
        within = spearman_rho(rm_here, gold_here)   # NaN when either side is constant: skipped
        if not math.isnan(within):
            within_rhos.append(within)
        all_rm += rm_here
        all_gold += gold_here
        rm_deviation += [r - sum(rm_here) / len(rm_here) for r in rm_here]
        gold_deviation += [g - sum(gold_here) / len(gold_here) for g in gold_here]

    def mean(values):
        return sum(values) / len(values) if values else math.nan

    report = {"gold/accuracy": mean([hit for hits in hits_by_family.values() for hit in hits]),
              "gold/spearman_within": mean(within_rhos), "gold/spearman": spearman_rho(all_rm, all_gold),
              "gold/pearson": pearson_r(all_rm, all_gold), "gold/top_choice": mean(top_hits)}
    for family in sorted(hits_by_family):
        report[f"gold/accuracy/{family}"] = mean(hits_by_family[family])
    for kind, hits in hits_by_kind.items():
        if hits:
            report[f"gold/accuracy/{kind}"] = mean(hits)
    if degenerate_hits:
        report["gold/accuracy/degenerate"] = mean(degenerate_hits)
        report["gold/accuracy/all"] = mean([hit for hits in hits_by_family.values() for hit in hits] + degenerate_hits)
    return report, rm_deviation, gold_deviation


# ----------------------------------------------------------------------------------------------
# Using a trained reward model

def task_reward(scores: torch.Tensor, ended, missing_eos_penalty: float = MISSING_EOS_PENALTY) -> torch.Tensor:
    """What RL maximises: `scores` (N,) where the response ended with EOS, the penalty where it did not.

        task_reward(torch.tensor([0.5, 2.0]), [True, False])  ->  tensor([0.5, -1.0])
    """
    ended = torch.as_tensor(ended, dtype=torch.bool, device=scores.device)
    return torch.where(ended, scores, torch.full_like(scores, missing_eos_penalty))


class RewardScorer:
    """A frozen reward model with its normalisation. `score` is the RM's opinion of a response;
    `reward` is what RL maximises (`task_reward`: the penalty for a response without EOS)."""

    def __init__(self, model: RewardModel, tokenizer: Tokenizer, bias: float = 0.0, gain: float = 1.0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.bias = float(bias)
        self.gain = float(gain)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_tokens(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised scores (B,) of token sequences [USER] prompt [ASSISTANT] response [EOS] (+ PAD).
        The reward is read at each row's last non-PAD token: the EOS when the response ended."""
        raw = self.model(ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return (raw.float() - self.bias) * self.gain

    def score(self, prompts: list[str], responses: list[str], ended: list[bool] | None = None,
              batch_size: int = 64) -> torch.Tensor:
        """Normalised scores (N,) of text pairs, each rendered by `render_chat` (the one token
        sequence the RM reads, see the module docstring). A response that did not end (no EOS within
        the budget) is rendered without the EOS, as the policy left it."""
        ended = ended if ended is not None else [True] * len(prompts)
        scores = []
        for start in range(0, len(prompts), batch_size):
            rows = [render_chat(self.tokenizer, p, r, add_eos=e) for p, r, e in
                    zip(prompts[start:start + batch_size], responses[start:start + batch_size],
                        ended[start:start + batch_size])]
            ids, mask = pad_sequences(rows, self.tokenizer.pad_id, side="right",
                                      length=min(max(map(len, rows)), self.model.trunk.config.block_size))
            scores.append(self.score_tokens(ids, mask).cpu())
        return torch.cat(scores)

    def reward(self, prompts: list[str], responses: list[str], ended: list[bool] | None = None,
               missing_eos_penalty: float = MISSING_EOS_PENALTY) -> torch.Tensor:
        """What RL maximises (N,): `score`, or the penalty for a response without EOS (`task_reward`)."""
        ended = ended if ended is not None else [True] * len(prompts)
        return task_reward(self.score(prompts, responses, ended), ended, missing_eos_penalty)


def load_reward_model(path: str, tokenizer: Tokenizer, runtime=None) -> RewardScorer:
    """`rm.pt` -> a frozen, normalised `RewardScorer` (a clear error for a wrong kind or tokenizer), on
    `runtime`'s device and precision (None: CPU, fp32)."""
    ckpt = load_checkpoint(path, kind="rm", tokenizer_identity=tokenizer.identity)
    model = RewardModel(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    if runtime is not None:
        runtime.prepare(model)
    model.requires_grad_(False)
    return RewardScorer(model, tokenizer, bias=ckpt.get("reward_bias", 0.0), gain=ckpt.get("reward_gain", 1.0))
