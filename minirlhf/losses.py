"""Every loss and RL quantity of the RLHF recipe, as pure functions on tensors.

This file is the lesson on *what is optimised*: the supervised loss of step 1 (SFT), the
preference losses of step 2 (reward model), and the pieces of step 3 (PPO with a KL penalty):
KL estimators, KL-shaped per-token rewards, the clipped policy and value losses, advantage
whitening and the KL coefficient controllers. Nothing here owns a model or an optimizer.

Conventions used throughout (see docs/design.md, "Conventions every RL quantity follows"):

* Token tensors are ``(B, T)``: batch of ``B`` rows, ``T`` positions. A *mask* of the same shape
  is 1 (or ``True``) where a token counts and 0 at padding. Masks may be bool or float; they are
  cast to the data's dtype.
* Every mean over tokens is **one** mean over all valid tokens of the batch,
  ``sum(x * mask) / sum(mask)``, never a mean of per-row means (that would weigh a token of a
  short response more than a token of a long one).
* Losses are 0-d tensors, ready for ``.backward()``. Statistics for logging are Python floats.
* Sign convention: every function returns something to *minimise*.

Papers, by short name:

* InstructGPT: Ouyang et al. 2022, "Training language models to follow instructions with human
  feedback", section 3.5 (SFT, RM eq. 1, RL eq. 2).
* Stiennon et al. 2020, "Learning to summarize from human feedback", section 3.4.
* Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2.
* PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", section 3 (eq. 7).
* Schulman 2020, "Approximating KL Divergence" (blog note): the k1/k2/k3 estimators.
* Huang et al. 2024, "The N Implementation Details of RLHF with PPO": the conventions of
  OpenAI's lm-human-preferences (LHP) and of TRL that we follow (score on the last token,
  per-token KL, whitening, clipped value loss).

Each function body sits between a pair of BEGIN SOLUTION / END SOLUTION comment lines: the
assignment version of the repo blanks those regions and ``tests/test_losses.py`` grades them.
"""

import math

import torch
import torch.nn.functional as F

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "sft_loss",
    "pairwise_reward_loss",
    "ranking_reward_loss",
    "classifier_reward_loss",
    "kl_penalty",
    "kl_shaped_rewards",
    "ppo_policy_loss",
    "ppo_value_loss",
    "entropy_from_logits",
    "explained_variance",
    "FixedKLController",
    "AdaptiveKLController",
    "rloo_advantages",
    "grpo_advantages",
    "dpo_loss",
]


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1.

    ``masked_mean(x, mask) = sum(x * mask) / sum(mask)``

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: bool or 0/1 float, broadcastable to ``x``; cast to ``x.dtype``.
        dim: ``None`` (default) for one mean over *all* valid entries (a 0-d tensor), or an int /
            tuple of ints to reduce only those dimensions (e.g. ``dim=1`` gives one mean per row).

    Conventions:
        * ``dim=None`` is the token mean used by every loss here: a batch with rows of 2 and 6
          valid tokens averages 8 tokens, each with weight 1/8 (a mean of per-row means would give
          the short row's tokens weight 1/4 and the long row's 1/12).
        * Padded entries never leak in, even when they hold ``inf`` or ``nan`` (``0 * inf`` is
          ``nan``, so they are selected away with ``torch.where`` instead of multiplied by 0).
        * A mean over no valid entry is 0 (not ``nan``), so an empty row cannot poison a batch.
    """
    # BEGIN SOLUTION
    mask = mask.to(x.dtype).expand_as(x)
    # trap: x * mask would turn an inf/nan at a padded position into nan; select instead.
    x = torch.where(mask != 0, x, 0.0)
    total = x.sum(dim=dim)
    count = mask.sum(dim=dim)
    # count is a whole number (masks are 0/1); clamp only changes the empty case 0/0 -> 0/1 = 0.
    return total / count.clamp(min=1.0)
    # END SOLUTION


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of ``x`` over the entries where ``mask`` is 1 (a 0-d tensor).

    ``mean = masked_mean(x, mask)``;
    ``var = masked_mean((x - mean)**2, mask)``                  (population variance, the default)
    ``var * n / (n - 1)`` with ``n = sum(mask)`` when ``unbiased=True`` (Bessel's correction).

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: bool or 0/1 float of the same (or a broadcastable) shape.
        unbiased: apply Bessel's correction. ``masked_whiten`` uses the population variance
            (``unbiased=False``), as docs/design.md pins.

    Raises:
        ValueError: ``unbiased=True`` with fewer than 2 valid entries (the correction divides by 0).
    """
    # BEGIN SOLUTION
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).expand_as(x).sum()
        if n.item() < 2:  # one host sync, only on this optional path
            raise ValueError(f"masked_var(unbiased=True) needs at least 2 valid entries, got {n.item():g}")
        var = var * n / (n - 1)
    return var
    # END SOLUTION


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, *, all_reduce=None
) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over its valid entries.

    ``whitened = (x - mean) / sqrt(var + eps)``, with ``mean`` and ``var`` the mean and the
    *population* variance of the valid entries (``masked_mean``, ``masked_var(unbiased=False)``).
    With ``shift_mean=False`` the mean is added back, ``whitened + mean``: only the scale changes.
    This is how TRL and LHP whiten advantages (``shift_mean=True``) and rewards
    (``shift_mean=False``, so that the sign of a reward is kept); Huang et al. 2024.

    Args:
        x: ``(B, T)`` (any shape works), e.g. GAE advantages.
        mask: bool or 0/1 float, same shape.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance, so a constant ``x`` gives 0 rather than ``nan``.
        all_reduce: data parallelism. ``None`` (the default): the statistics of this ``x`` alone.
            Otherwise a function returning the sum over the processes of a tensor (e.g.
            ``Runtime.all_reduce_sum``), and ``x`` is this process's share of the batch: the mean
            and variance are then those of *every* process's valid entries, so each process whitens
            its share exactly as one process would whiten the whole batch (with per-process
            statistics, a process whose advantages happen to be high would call them average).
            Two passes: the global sum and count give the mean, then the global sum of squared
            deviations from it gives the variance (``masked_var``'s arithmetic; a one-pass
            ``E[x^2] - E[x]^2`` would lose digits to cancellation). ``Runtime.all_reduce_sum``
            returns detached sums, so no gradient flows through the statistics: fine for
            advantages, which are constants to the losses anyway.

    Returns:
        Same shape and dtype as ``x``; **0 at padded positions** (like every per-token quantity in
        this library: nothing meaningful lives there, and a stray unmasked sum then adds nothing).
    """
    # BEGIN SOLUTION
    if all_reduce is None:
        mean = masked_mean(x, mask)
        var = masked_var(x, mask, unbiased=False)  # population variance, as LHP/TRL
    else:
        # masked_mean's arithmetic, with the sums and the count taken over every process
        weights = mask.to(x.dtype).expand_as(x)
        count = all_reduce(weights.sum()).clamp(min=1.0)
        mean = all_reduce(torch.where(weights != 0, x, 0.0).sum()) / count
        var = all_reduce(torch.where(weights != 0, (x - mean) ** 2, 0.0).sum()) / count
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean  # trap: keep the mean, rescale only
    return torch.where(mask.to(x.dtype) != 0, whitened, 0.0)
    # END SOLUTION


# ---------------------------------------------------------------------------------------------
# Step 1: supervised fine-tuning
# ---------------------------------------------------------------------------------------------


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (InstructGPT section 3.5, "SFT").

    ``loss = sum_{b,t} mask[b,t] * -log softmax(logits[b,t])[targets[b,t]] / sum_{b,t} mask[b,t]``

    Args:
        logits: ``(B, T, V)``. ``logits[b, t]`` predicts ``targets[b, t]``: **the caller shifts**
            (with a model's output ``out`` for tokens ``ids``: ``logits = out[:, :-1]``,
            ``targets = ids[:, 1:]``, ``mask = loss_mask[:, 1:]``).
        targets: ``(B, T)`` token ids. Values at masked positions are ignored, whatever they are
            (PAD id, or -100 as in Hugging Face).
        mask: ``(B, T)`` bool or 0/1 float: 1 on the tokens to learn (the response, in SFT), 0 on
            the prompt and the padding.

    Returns:
        0-d tensor: one mean over all valid target tokens of the batch (not a mean of per-row
        means), computed in at least fp32 (bf16/fp16 logits are upcast; fp64 stays fp64).
    """
    # BEGIN SOLUTION
    vocab_size = logits.shape[-1]
    # softmax in at least fp32: log_softmax in bf16 loses the small probabilities
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    mask = mask.to(logits.dtype)
    # masked targets may be -100 or any junk id: point them at id 0 so the gather is in range
    safe_targets = torch.where(mask != 0, targets, torch.zeros_like(targets))
    nll = F.cross_entropy(logits.reshape(-1, vocab_size), safe_targets.reshape(-1), reduction="none").view_as(
        safe_targets
    )  # (B, T)
    return masked_mean(nll, mask)
    # END SOLUTION


# ---------------------------------------------------------------------------------------------
# Step 2: reward model losses
# ---------------------------------------------------------------------------------------------


def pairwise_reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry preference loss for pairs (Stiennon et al. 2020 section 3.4; InstructGPT eq. 1, K=2).

    ``loss = mean_b -log sigmoid(r_chosen[b] - r_rejected[b])``

    The Bradley-Terry model says a labeler prefers ``y_c`` over ``y_r`` with probability
    ``sigmoid(r(x, y_c) - r(x, y_r))``; this is the negative log-likelihood of the labels.
    Only the difference of the rewards matters: adding a constant to both changes nothing (which
    is why the RM is normalised afterwards).

    Args:
        r_chosen, r_rejected: ``(B,)`` scalar rewards of the preferred and the rejected response.

    Returns:
        0-d tensor. ``log(2) ~ 0.693`` when both rewards are equal. ``-logsigmoid`` is used rather
        than ``-log(sigmoid(.))``, which underflows to ``inf`` for a large negative margin.
    """
    # BEGIN SOLUTION
    margin = r_chosen - r_rejected  # (B,)
    return -F.logsigmoid(margin).mean()
    # END SOLUTION


def ranking_reward_loss(rewards: torch.Tensor, valid: torch.Tensor | None = None,
                        tiers: torch.Tensor | None = None) -> torch.Tensor:
    """InstructGPT's K-wise ranking loss (Ouyang et al. 2022, section 3.5, eq. 1).

    For a prompt with ``K`` ranked responses (best first), every one of its ``C(K, 2)`` pairs
    ``i < j`` is a comparison "response i beats response j":

    ``loss(prompt) = 1 / C(K, 2) * sum_{i < j} -log sigmoid(r_i - r_j)``

    and the batch loss is the mean of ``loss(prompt)`` over prompts. Two traps: it is a **mean**
    over a prompt's pairs (not a sum), and every **prompt counts equally** (not every pair):
    InstructGPT treats all comparisons of a prompt as one batch element, which avoids overfitting
    to prompts with many correlated comparisons.

    Args:
        rewards: ``(B, K)`` rewards of the ``K`` responses of each prompt, **best first**
            (``rewards[b, 0]`` is the top-ranked response).
        valid: optional ``(B, K)`` bool (or 0/1): ``False`` for missing responses, for prompts with
            fewer than ``K``. A pair with a missing member is left out, ``loss(prompt)`` is the mean
            over the pairs that remain, and a prompt with no pair left (fewer than 2 responses) is
            left out of the mean over prompts. The valid responses keep their best-first order.
            Values of ``rewards`` at missing positions are ignored (they may be ``nan``).
        tiers: optional ``(B, K)`` integers, non-decreasing along each row: responses with equal
            tiers are TIES (the labeler preferred neither), and a pair ``i < j`` is a comparison
            only when ``tiers[b, i] < tiers[b, j]``. A tie is not a preference: training it as one
            would teach the RM an order that is only the order the responses were listed in.
            ``None``: a strict ranking (every pair counts).

    Returns:
        0-d tensor. With ``K = 2`` it equals ``pairwise_reward_loss(rewards[:, 0], rewards[:, 1])``.
    """
    # BEGIN SOLUTION
    num_responses = rewards.shape[1]  # K
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    valid = valid.to(torch.bool)
    # zero the missing rewards first: a nan there would reach the valid ones' gradients
    rewards = torch.where(valid, rewards, 0.0)

    # margins[b, i, j] = r_i - r_j: how much the model prefers response i to response j
    margins = rewards[:, :, None] - rewards[:, None, :]  # (B, K, K)
    # the pairs "i beats j" are the strict upper triangle i < j (best-first order)
    better_first = torch.ones(num_responses, num_responses, dtype=torch.bool, device=rewards.device)
    better_first = torch.triu(better_first, diagonal=1)  # (K, K)
    pair_mask = better_first & valid[:, :, None] & valid[:, None, :]  # (B, K, K)
    if tiers is not None:  # a tied pair is no comparison
        pair_mask = pair_mask & (tiers[:, :, None] < tiers[:, None, :])

    pair_losses = -F.logsigmoid(margins)  # (B, K, K)
    per_prompt = masked_mean(pair_losses, pair_mask, dim=(1, 2))  # (B,) mean over each prompt's pairs
    has_pairs = pair_mask.flatten(1).any(dim=1)  # (B,) prompts with at least one comparison
    return masked_mean(per_prompt, has_pairs)  # each prompt counts once
    # END SOLUTION


def classifier_reward_loss(logit_margin: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary-classifier reward model: each response labelled good (1) or bad (0) on its own.

    ``logit_margin = log p(good) - log p(bad)`` is the classifier's logit, so
    ``p(good) = sigmoid(logit_margin)`` and the loss is the mean binary cross-entropy

    ``loss = mean_b -[ y_b * log sigmoid(m_b) + (1 - y_b) * log sigmoid(-m_b) ]``

    This is the alternative to learning from comparisons (the "binary discrimination" baseline
    that Askell et al. 2021, "A General Language Assistant as a Laboratory for Alignment", compare
    with ranked preference modelling). Unlike the pairwise loss, it pins the absolute level of the
    score (``m = 0`` means "as likely good as bad").

    Args:
        logit_margin: ``(B,)`` classifier logits.
        labels: ``(B,)`` 1 for good, 0 for bad (bool, int or float; cast to the logits' dtype).

    Returns:
        0-d tensor, computed with ``binary_cross_entropy_with_logits`` (stable for large ``|m|``).
    """
    # BEGIN SOLUTION
    labels = labels.to(logit_margin.dtype)
    return F.binary_cross_entropy_with_logits(logit_margin, labels)
    # END SOLUTION


# ---------------------------------------------------------------------------------------------
# Step 3: PPO with a KL penalty
# ---------------------------------------------------------------------------------------------


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens (Schulman 2020).

    The tokens were sampled from the policy ``q``; ``logp = log q(token)``,
    ``ref_logp = log p(token)`` for the reference ``p`` (the frozen SFT model). With
    ``log_ratio = logp - ref_logp`` and ``r = p / q = exp(ref_logp - logp)``:

    * ``"k1"``: ``log_ratio``.  Unbiased, high variance, can be negative per token. This is the
      penalty of InstructGPT eq. 2 / Ziegler et al. 2019, and the default (LHP, TRL).
    * ``"k2"``: ``0.5 * log_ratio**2``.  Biased (small bias when q ~ p), low variance, >= 0.
    * ``"k3"``: ``(r - 1) - log r``.  Unbiased, low variance, >= 0 (as ``log r <= r - 1``).
    * ``"abs"``: ``|log_ratio|``.  A biased, non-negative variant some libraries offer.

    Args:
        logp, ref_logp: ``(B, T)`` log-probabilities of the *same* sampled tokens, computed with the
            same temperature-scaled logits for both models.
        kind: ``"k1"``, ``"k2"``, ``"k3"`` or ``"abs"``.

    Returns:
        ``(B, T)`` per-token KL estimate (unmasked: the caller masks).
    """
    # BEGIN SOLUTION
    log_ratio = logp - ref_logp  # log q/p, (B, T)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        # (r - 1) - log r with log r = -log_ratio; expm1 keeps precision when r ~ 1
        return torch.expm1(-log_ratio) + log_ratio
    if kind == "abs":
        return log_ratio.abs()
    raise ValueError(f"kl_penalty: unknown kind {kind!r}, expected 'k1', 'k2', 'k3' or 'abs'")
    # END SOLUTION


def kl_shaped_rewards(
    score: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards for PPO: a KL penalty on every token, the RM score on the last one.

    InstructGPT eq. 2 / Ziegler et al. 2019 section 2.2 maximise
    ``R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))``. The sequence-level KL splits into
    per-token terms, so as in LHP and TRL (Huang et al. 2024) the reward of response token t is

    ``rewards[b, t] = -kl_coef * kl[b, t] + (score[b] if t is the last valid token of row b else 0)``

    with ``kl = kl_penalty(logp, ref_logp, kl_kind)``.

    Conventions:
        * "last valid token" is the position of the last 1 in the row's mask: the EOS itself, never
          the PAD after it (trap: putting the score on the first PAD, or at ``T - 1``).
        * rewards and kl are 0 at padded positions. A row with no valid token gets all 0 (and no
          score).
        * **Returns a tuple** ``(rewards, kl)``: the API lists only the rewards; the per-token kl
          is returned too because the PPO loop logs it (``objective/kl`` is ``kl.sum(1).mean()``,
          the quantity the adaptive controller uses).

    Args:
        score: ``(B,)`` reward-model scores (already normalised / penalised by the caller).
        logp, ref_logp: ``(B, T)`` log-probs of the response tokens under the policy at rollout time
            and under the reference model.
        mask: ``(B, T)`` bool or 0/1 float, 1 on response tokens up to and including the EOS.
        kl_coef: beta, a float (e.g. ``AdaptiveKLController.value``).
        kl_kind: estimator passed to ``kl_penalty``.

    Returns:
        ``(rewards, kl)``, both ``(B, T)`` in ``logp``'s dtype.
    """
    # BEGIN SOLUTION
    batch_size, seq_len = logp.shape
    valid = mask.to(logp.dtype) != 0  # (B, T) bool
    kl = torch.where(valid, kl_penalty(logp, ref_logp, kl_kind), 0.0)  # (B, T), 0 at pads
    rewards = -kl_coef * kl

    # index of the last valid token of each row; -1 for a row with no valid token
    positions = torch.arange(seq_len, device=logp.device).expand(batch_size, seq_len)  # (B, T)
    last_index = torch.where(valid, positions, -1).max(dim=1).values  # (B,)
    is_last = positions == last_index[:, None]  # (B, T), one True per non-empty row
    rewards = rewards + torch.where(is_last, score.to(logp.dtype).reshape(batch_size, 1), 0.0)
    return rewards, kl
    # END SOLUTION


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate objective, as a loss (Schulman et al. 2017, eq. 7).

    ``ratio = exp(logp - old_logp)``
    ``loss  = masked_mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )``

    which is ``-L^CLIP``: the max of the two losses is the min of the two objectives, a pessimistic
    bound. For ``A > 0`` the gradient stops once ``ratio > 1 + eps``; for ``A < 0`` once
    ``ratio < 1 - eps`` (trap: the clipping direction depends on the sign of the advantage, so
    clipping the ratio alone, without the max, is wrong).

    Args:
        logp: ``(B, T)`` log-probs of the sampled tokens under the current policy (with grad).
        old_logp: ``(B, T)`` the same under the policy that sampled them (rollout time, no grad).
        advantages: ``(B, T)`` GAE advantages, usually whitened (constants: computed without grad;
            this function does not detach them, the caller does).
        mask: ``(B, T)`` bool or 0/1 float, 1 on response tokens.
        clip_range: eps, e.g. 0.2.

    Returns:
        ``(loss, stats)``: a 0-d loss (one mean over all valid tokens) and a dict of Python floats:

        * ``clipfrac``: fraction of valid tokens where the clipped term is the active one, i.e.
          ``-A * clip(ratio) > -A * ratio`` strictly (there the token's gradient is 0);
        * ``approxkl``: ``masked_mean(0.5 * (logp - old_logp)**2)`` (the k2 estimator of
          KL(old || new), as LHP/TRL log it);
        * ``ratio_mean``, ``ratio_max``: of the ratio over valid tokens (exactly 1 on the first
          minibatch of an update; 0 when there is no valid token);
        * ``policy_loss``: the loss as a float.
    """
    # BEGIN SOLUTION
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)

    with torch.no_grad():
        valid = mask.to(ratio.dtype) != 0
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).item(),
            "approxkl": masked_mean(0.5 * log_ratio**2, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "ratio_max": torch.where(valid, ratio, 0.0).max().item() if ratio.numel() else 0.0,
            "policy_loss": loss.item(),
        }
    return loss, stats
    # END SOLUTION


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict]:
    """Clipped value-function loss, as in OpenAI baselines, LHP and TRL (Huang et al. 2024).

    ``v_clipped = old_values + clamp(values - old_values, -c, c)``
    ``loss = 0.5 * masked_mean( max((values - R)**2, (v_clipped - R)**2) )``

    The value head may move at most ``c`` away from its rollout-time prediction before the loss
    stops pulling it further (the same pessimistic max as the policy loss). The 0.5 makes the
    gradient ``values - R`` when unclipped.

    Args:
        values: ``(B, T)`` current value predictions (with grad).
        old_values: ``(B, T)`` value predictions at rollout time (no grad).
        returns: ``(B, T)`` GAE returns, ``advantages + old_values`` before whitening.
        mask: ``(B, T)`` bool or 0/1 float, 1 on response tokens.
        clip_range_value: ``c``, e.g. 0.2.

    Returns:
        ``(loss, stats)``: a 0-d loss (one mean over all valid tokens) and a dict of Python floats:

        * ``clipfrac``: fraction of valid tokens where the clipped squared error is strictly larger
          (there the token's gradient is 0);
        * ``value_loss``: the loss as a float.
    """
    # BEGIN SOLUTION
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    error_unclipped = (values - returns) ** 2  # (B, T)
    error_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error_unclipped, error_clipped), mask)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((error_clipped > error_unclipped).to(values.dtype), mask).item(),
            "value_loss": loss.item(),
        }
    return loss, stats
    # END SOLUTION


# ---------------------------------------------------------------------------------------------
# Step 3 without a critic: the group of samples of one prompt is the baseline (RLOO, GRPO)
# ---------------------------------------------------------------------------------------------


def rloo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """REINFORCE Leave-One-Out: each sample's score minus the mean score of the OTHER samples of
    its prompt (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et
    al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs").

    ``A[p, i] = s[p, i] - 1/(k-1) * sum_{j != i} s[p, j]``

    The baseline of sample i is built from the k-1 other samples only, so it does not depend on
    sample i itself: the policy gradient stays unbiased, and no value model is needed. Two facts
    that follow from the formula (and that the tests check):

    * raising one score by ``d`` raises its own advantage by ``d`` and lowers each of the k-1
      others' by ``d / (k-1)``; a group's advantages sum to 0;
    * ``A = k/(k-1) * (s - mean_j s[p, j])``: RLOO is the plain group-mean baseline
      (``grpo_advantages(scale=False)``) times the constant ``k/(k-1)``.

    Args:
        scores: ``(P, k)`` the scalar scores of k samples of each of P prompts (one row per
            prompt), k >= 2.

    Returns:
        ``(P, k)`` advantages, in ``scores``' dtype. A group of equal scores gets exactly 0.

    Raises:
        ValueError: ``scores`` is not 2-D, or k < 2 (one sample has no "others").
    """
    # BEGIN SOLUTION
    # HINT: (P, k) in, (P, k) out; the others' sum is the group's sum minus the sample's own score
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"rloo_advantages needs scores of shape (prompts, k) with k >= 2 samples per prompt, "
                         f"got {tuple(scores.shape)}")
    k = scores.shape[1]
    # trap: k equal floats need not sum to exactly k times one of them (0.1 + 0.1 + 0.1 != 0.3);
    # measured from the group's first score, an equal group is exactly 0 (advantages ignore a shift)
    scores = scores - scores[:, :1]
    others_mean = (scores.sum(dim=1, keepdim=True) - scores) / (k - 1)   # (P, k): leave sample i out
    return scores - others_mean
    # END SOLUTION


def grpo_advantages(scores: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """GRPO's group-normalised advantages (Shao et al. 2024, "DeepSeekMath", section 4.1), or
    with ``scale=False`` the unscaled ones of Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
    Training: A Critical Perspective").

    ``mean[p] = 1/k * sum_j s[p, j]``
    ``std[p]  = sqrt( 1/(k-1) * sum_j (s[p, j] - mean[p])**2 )``       (unbiased, as DeepSeekMath)
    ``A[p, i] = (s[p, i] - mean[p]) / (std[p] + eps)``                   (scale=True: GRPO)
    ``A[p, i] =  s[p, i] - mean[p]``                                     (scale=False: Dr. GRPO)

    Why Dr. GRPO drops the division: it weighs each prompt by ``1 / std[p]``, so prompts whose k
    samples score nearly alike - the ones the policy already almost always gets right, or almost
    always gets wrong - get larger updates than the prompts whose outcomes are mixed (a
    question-level difficulty bias: with a 0/1 reward, std = sqrt(q (1 - q)) for a success rate q,
    smallest near q = 0 and q = 1). Unscaled, every unit of score difference counts the same on
    every prompt, and ``A`` is ``(k-1)/k`` times RLOO's (see `rloo_advantages`).

    Args:
        scores: ``(P, k)`` the scalar scores of k samples of each of P prompts, k >= 2.
        eps: added to the std (not the variance), so a group of equal scores gives 0 / eps = 0.
        scale: divide by the group's std (GRPO) or not (Dr. GRPO).

    Returns:
        ``(P, k)`` advantages, in ``scores``' dtype; each group's advantages sum to 0, and a group
        of equal scores gets exactly 0 (GRPO cannot learn from it: no sample is better than another).

    Raises:
        ValueError: ``scores`` is not 2-D, or k < 2 (the std of one sample is undefined).
    """
    # BEGIN SOLUTION
    # HINT: mean and std over dim=1 (the std with k - 1); an equal group must give exactly 0
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"grpo_advantages needs scores of shape (prompts, k) with k >= 2 samples per prompt, "
                         f"got {tuple(scores.shape)}")
    # trap: the mean of k equal floats need not be that float, and divided by a std near 0 the
    # rounding would become an advantage; measured from the group's first score, an equal group is
    # exactly 0 (the advantages are unchanged by a shift of the group's scores)
    scores = scores - scores[:, :1]
    centred = scores - scores.mean(dim=1, keepdim=True)                   # (P, k)
    if not scale:
        return centred
    std = scores.std(dim=1, keepdim=True, correction=1)                   # (P, 1), divides by k - 1
    return centred / (std + eps)
    # END SOLUTION


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position.

    ``H = -sum_v p_v log p_v`` with ``p = softmax(logits)``.

    Args:
        logits: ``(..., V)``, e.g. ``(B, T, V)``; divide by the sampling temperature first if the
            entropy of the sampling distribution is wanted. Entries may be ``-inf`` (top-k masking).

    Returns:
        ``(...)``, e.g. ``(B, T)``, in nats; between 0 and ``log V``.
    """
    # BEGIN SOLUTION
    log_probs = torch.log_softmax(logits, dim=-1)  # (..., V)
    probs = log_probs.exp()
    # trap: a -inf logit gives p * log p = 0 * -inf = nan; its contribution is 0, so clamp log p
    log_probs = log_probs.clamp(min=torch.finfo(log_probs.dtype).min)
    return -(probs * log_probs).sum(dim=-1)
    # END SOLUTION


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """How much of the returns' variance the value head explains (CleanRL, TRL).

    ``explained_variance = 1 - Var[R - V] / Var[R]`` over the valid tokens (population variances).

    1 is a perfect critic, 0 is no better than predicting the mean return, < 0 is worse than that.

    Args:
        values, returns: ``(B, T)``. mask: ``(B, T)`` bool or 0/1 float.

    Returns:
        A Python float; ``nan`` when the returns have zero variance (nothing to explain).
    """
    # BEGIN SOLUTION
    with torch.no_grad():
        var_returns = masked_var(returns, mask).item()
        var_residual = masked_var(returns - values, mask).item()
    if var_returns == 0.0:
        return math.nan
    return 1.0 - var_residual / var_returns
    # END SOLUTION


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient beta (InstructGPT uses a fixed beta = 0.02).

    Same interface as ``AdaptiveKLController``: ``.value`` is the coefficient (a float) and
    ``update(current_kl, n_steps)`` returns it, unchanged.
    """

    def __init__(self, kl_coef: float):
        # BEGIN SOLUTION
        self.value = float(kl_coef)
        # END SOLUTION

    def update(self, current_kl: float, n_steps: int) -> float:
        """Ignore the measurement; return the fixed coefficient."""
        # BEGIN SOLUTION
        return self.value
        # END SOLUTION


class AdaptiveKLController:
    """Adapt beta so the policy's KL to the reference tracks a target (Ziegler et al. 2019, section 2.2).

    A proportional controller on the log-space error, clipped to +/-20%:

    ``error = clip(current_kl / target - 1, -0.2, 0.2)``
    ``value <- value * (1 + error * n_steps / horizon)``

    Too much KL (error > 0) raises beta, too little lowers it. Ziegler et al. write
    ``beta <- beta * (1 + K_beta * e)`` with ``K_beta = 0.1``; LHP/TRL, as here, use
    ``K_beta = n_steps / horizon`` (``n_steps`` = samples in the batch just seen).

    Args:
        init_kl_coef: beta at the start.
        target: the KL to aim for (nats per sequence), e.g. 6.
        horizon: samples over which the error is corrected, e.g. 10000.

    ``current_kl`` passed to ``update`` is the per-sequence **sum** of per-token KL, averaged over
    the batch: ``kl.sum(dim=1).mean()`` with ``kl`` from ``kl_shaped_rewards``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        # BEGIN SOLUTION
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        # END SOLUTION

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move ``value`` towards the target KL; return the new value (a float).

        Args:
            current_kl: per-sequence summed KL averaged over the batch (float or 0-d tensor).
            n_steps: how many samples (sequences) that measurement covers.
        """
        # BEGIN SOLUTION
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value
        # END SOLUTION


# ---------------------------------------------------------------------------------------------
# DPO: the preference loss with the policy as its own reward model
# ---------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Direct Preference Optimization: fit the labels' preferences with the policy itself.

    With ``h = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))``, how
    much more the policy has raised the chosen response than the rejected one, relative to the
    frozen reference:

    * ``"sigmoid"`` (DPO, Rafailov et al. 2023, eq. 7):  ``loss = mean_b -log sigmoid(beta * h_b)``
    * with ``label_smoothing = eps`` (cDPO: each label assumed flipped with probability eps):
      ``loss = mean_b [ -(1 - eps) log sigmoid(beta h_b) - eps log sigmoid(-beta h_b) ]``
    * ``"ipo"`` (IPO, Azar et al. 2023, eq. 17):  ``loss = mean_b (h_b - 1 / (2 beta))^2``

    Where it comes from. RLHF maximises ``E[r(x, y)] - beta KL(pi || pi_ref)``; its optimum is
    ``pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x)`` (the bandit test of tests/test_ppo.py
    watches PPO approach it). Solved for the reward: ``r(x, y) = beta log pi*(y|x) / pi_ref(y|x)
    + beta log Z(x)``. Put that into the Bradley-Terry model of the labels,
    ``P(y_c beats y_r) = sigmoid(r_c - r_r)`` (``pairwise_reward_loss``): ``Z(x)`` cancels (both
    responses answer the same prompt) and the labels' negative log-likelihood is the loss above,
    now a function of the policy alone. No reward model, no sampling: the policy IS the reward
    model, with the implicit reward ``beta * log pi / pi_ref``; ``beta`` plays the KL coefficient's
    part (small beta: the same margin in reward needs a larger change in log-probability).

    Where each loss stops pushing: DPO's keeps falling as ``h`` grows (a perfectly separated pair
    is pushed further without end, which is how DPO overfits deterministic labels); cDPO's minimum
    is at ``beta h = log((1 - eps) / eps)``; IPO's at ``h = 1 / (2 beta)``, a fixed margin.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` log pi(response | prompt) of the
            chosen and rejected responses: the SUM over each response's tokens (the EOS included).
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` the same under the frozen reference (no
            gradient needed: they are constants).
        beta: > 0.
        loss_type: ``"sigmoid"`` or ``"ipo"``.
        label_smoothing: cDPO's eps in ``[0, 0.5)``; for ``"sigmoid"`` only.

    Returns:
        ``(loss, stats)``: a 0-d loss to minimise, and Python floats named as TRL names them:
        ``rewards/chosen`` (mean of ``beta (pc - rc)``), ``rewards/rejected`` (mean of
        ``beta (pr - rr)``), ``rewards/margins`` (mean of their difference, ``beta h``) and
        ``rewards/accuracies`` (share of pairs whose chosen reward is strictly higher).
        Policy = reference gives ``h = 0``: the sigmoid loss is ``log 2`` and the accuracy 0.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (the chance a label is flipped), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing (cDPO) applies to loss_type 'sigmoid', not {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    # BEGIN SOLUTION
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps  # (B,) log pi / pi_ref of y_c
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps  # (B,) of y_r
    h = chosen_log_ratio - rejected_log_ratio  # (B,)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    with torch.no_grad():
        chosen_rewards = beta * chosen_log_ratio  # the implicit rewards, for the logs
        rejected_rewards = beta * rejected_log_ratio
        stats = {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        }
    return losses.mean(), stats
    # END SOLUTION
