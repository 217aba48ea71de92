"""Tests for the PPO loop: train_ppo.py and the pieces it calls (minirlhf/ppo.py).

The losses themselves (the clipped policy loss in its four sign/ratio cases with gradients, value
clipping, KL-shaped rewards, the KL controllers) are graded in tests/test_losses.py, GAE in
tests/test_kernels.py. Here: how the loop puts them together, each with a plain reference or a
hand-worked value:

* rewards and advantages (steps 4-6 of train_ppo.py's loop: `kl_shaped_rewards`, `gae`,
  `masked_whiten`): a row worked by hand, a Python-loop reference, rows summing to
  score - kl_coef * sum(kl), returns taken before whitening;
* alignment: the recomputed logprobs equal the sampler's (off-by-one and temperature), the values
  sit at "state before token t", padding is trimmed without changing anything;
* the first minibatch of an update has ratio exactly 1, clipfrac 0, approximate KL 0 (with a model
  built with dropout, so leaving dropout on would fail it; and under bf16 autocast); every sample
  once per epoch. `ppo_update` below is step 7 of the script's loop (epochs x minibatches) built
  from the same pieces, so that toy models can run it;
* policy = reference gives zero KL and rewards equal to the score on the last valid token;
* toy bandits: +1 on one token makes it more likely (less when negated); with a KL penalty PPO
  approaches pi_ref * exp(r / beta) / Z;
* the script: --preset smoke end to end (subprocess), --resume, one-line errors for bad input, and
  its own loop watched from inside (every update's first minibatch has ratio 1 with a policy built
  with dropout; its rollouts hold the rewards, returns and whitened advantages the pure functions give).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from minirlhf import labeler, world
from minirlhf.checkpoint import load_checkpoint, save_checkpoint
from minirlhf.generate import generate
from minirlhf.kernels import gae
from minirlhf.losses import (AdaptiveKLController, kl_shaped_rewards, masked_whiten, ppo_policy_loss,
                             ppo_value_loss)
from minirlhf.model import GPT, GPTConfig, RewardModel, ValueModel
from minirlhf.ppo import (Rollout, critic_from_reward_model, critic_values, minibatch_orders, minibatch_stats,
                          optimizer_step, policy_logprobs, rollout_logprobs, rollout_stats, rollout_values,
                          score_rollout, token_share)
from minirlhf.reward import RewardScorer
from minirlhf.runtime import Runtime
from helpers import assert_smoke_run_wrote, run_in_process, toy_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS, PAD = 6, 7  # token ids of the toy models below (vocabulary 8)


pytestmark = pytest.mark.usefixtures("one_thread")   # (tests/conftest.py)


def toy_gpt(seed: int, vocab_size: int = 8, dropout: float = 0.0, d_model: int = 16, n_layer: int = 1) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=n_layer, n_head=2, d_model=d_model,
                          dropout=dropout))
    with torch.no_grad():
        model.wte.weight.normal_(0.0, 0.5)  # larger than GPT-2's init: a distribution far from uniform...
        model.ln_f.weight.fill_(0.2)        # ...but not peaked: EOS is likely enough to give mixed lengths
    return model


def toy_critic(seed: int, config: GPTConfig) -> ValueModel:
    torch.manual_seed(seed)
    critic = ValueModel(config)
    with torch.no_grad():
        critic.head.weight.normal_(0.0, 0.3)  # non-zero, so misaligned values would show
    return critic


def toy_generation(policy: GPT, seed: int = 0, n: int = 6, max_new_tokens: int = 5, temperature: float = 1.0):
    """Prompts of different lengths (so left padding matters), responses of different lengths."""
    prompts = [[1, 2, 3], [4], [2, 5], [3, 3, 1, 2], [5], [1, 4, 2]][:n]
    return generate(policy, prompts, max_new_tokens=max_new_tokens, eos_id=EOS, pad_id=PAD,
                    temperature=temperature, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------------------------


def compute_advantages(scores, logprobs, ref_logprobs, values, mask, *, kl_coef, gamma=1.0, lam=0.95,
                       whiten=True, all_reduce=None):
    """Steps 4-6 of train_ppo.py's loop, in its order: KL-shaped rewards, GAE, whitening (after the
    returns). Returns (rewards, kl, advantages, returns), all (B, T)."""
    rewards, kl = kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, mask, all_reduce=all_reduce)
    return rewards, kl, advantages, returns


def fill_advantages(rollout: Rollout, kl_coef: float, all_reduce=None) -> Rollout:
    """`compute_advantages` on a rollout whose logprobs and values are filled; sets its rewards,
    kl, advantages and returns."""
    rollout.rewards, rollout.kl, rollout.advantages, rollout.returns = compute_advantages(
        rollout.scores, rollout.logprobs, rollout.ref_logprobs, rollout.values, rollout.response_mask,
        kl_coef=kl_coef, all_reduce=all_reduce)
    return rollout


def test_compute_advantages_hand_worked_row():
    # one response of 2 tokens + 1 PAD; gamma = 1, lam = 0.5 (numbers easy by hand), kl_coef = 0.5
    logprobs = torch.tensor([[-1.0, -2.0, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, 0.0]])       # kl = logp - ref = [0.5, -1.0]
    values = torch.tensor([[0.2, 0.4, 99.0]])              # 99 at the PAD: must never be read
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    score = torch.tensor([2.0])
    rewards, kl, advantages, returns = compute_advantages(score, logprobs, ref_logprobs, values, mask, kl_coef=0.5,
                                                          gamma=1.0, lam=0.5, whiten=False)
    # rewards: [-0.5 * 0.5, -0.5 * -1.0 + 2.0 (the score, on the last valid token)] = [-0.25, 2.5], 0 at PAD
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0]]), msg="kl")
    torch.testing.assert_close(rewards, torch.tensor([[-0.25, 2.5, 0.0]]), msg="rewards")
    # last token: delta_1 = 2.5 - 0.4 = 2.1 (no bootstrap past the end, not 2.5 + 99 - 0.4); A_1 = 2.1
    # first:      delta_0 = -0.25 + 0.4 - 0.2 = -0.05; A_0 = -0.05 + 1 * 0.5 * 2.1 = 1.0
    torch.testing.assert_close(advantages, torch.tensor([[1.0, 2.1, 0.0]]), msg="advantages")
    torch.testing.assert_close(returns, torch.tensor([[1.2, 2.5, 0.0]]), msg="returns = advantages + values")


def test_compute_advantages_against_python_loop_and_whitening_after_returns():
    generator = torch.Generator().manual_seed(3)
    B, T = 5, 7
    lengths = [7, 1, 4, 0, 3]  # a full row, a one-token row, an empty row
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    logprobs = -torch.rand(B, T, generator=generator) * 3
    ref_logprobs = -torch.rand(B, T, generator=generator) * 3
    values = torch.randn(B, T, generator=generator)
    score = torch.randn(B, generator=generator)
    kl_coef, gamma, lam = 0.3, 0.9, 0.8
    rewards, kl, advantages, returns = compute_advantages(score, logprobs, ref_logprobs, values, mask,
                                                          kl_coef=kl_coef, gamma=gamma, lam=lam)

    # plain reference: loops over rows and tokens, floats only
    raw_advantages = []
    for b in range(B):
        n = lengths[b]
        row_rewards = [-kl_coef * (logprobs[b, t].item() - ref_logprobs[b, t].item()) for t in range(n)]
        if n:
            row_rewards[-1] += score[b].item()
            assert math.isclose(sum(row_rewards), score[b].item() - kl_coef * sum(
                logprobs[b, t].item() - ref_logprobs[b, t].item() for t in range(n)), abs_tol=1e-5)
        torch.testing.assert_close(rewards[b, :n], torch.tensor(row_rewards), msg=f"rewards row {b}")
        torch.testing.assert_close(rewards[b].sum(), torch.tensor(float(sum(row_rewards))),
                                   msg=f"row {b} rewards sum to score - kl_coef * sum(kl)")
        advantage, row_advantages = 0.0, [0.0] * n
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = row_rewards[t] + gamma * next_value - values[b, t].item()
            advantage = delta + gamma * lam * advantage
            row_advantages[t] = advantage
        expected_returns = [a + values[b, t].item() for t, a in enumerate(row_advantages)]
        torch.testing.assert_close(returns[b, :n], torch.tensor(expected_returns),
                                   msg=f"returns row {b} (advantages + values, before whitening)")
        assert (returns[b, n:] == 0).all(), f"returns row {b}: padding must be 0"
        raw_advantages += row_advantages
    mean = sum(raw_advantages) / len(raw_advantages)
    std = math.sqrt(sum((a - mean) ** 2 for a in raw_advantages) / len(raw_advantages))
    expected = [(a - mean) / std for a in raw_advantages]
    got = advantages[mask.bool()]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-5,
                               msg="advantages whitened over all valid tokens of the batch")
    assert (advantages[~mask.bool()] == 0).all(), "whitened advantages must be 0 at padding"


# ---------------------------------------------------------------------------------------------
# Alignment of the forward passes
# ---------------------------------------------------------------------------------------------


def forward_rollout(rollout: Rollout, policy, ref_policy, critic, *, temperature: float, minibatches) -> Rollout:
    """Step 3 of train_ppo.py's loop: the old logprobs, the reference logprobs and the values."""
    rollout.logprobs, rollout.entropy = rollout_logprobs(policy, rollout, minibatches, temperature)
    rollout.ref_logprobs, _ = rollout_logprobs(ref_policy, rollout, minibatches, temperature)
    rollout.values = rollout_values(critic, rollout, minibatches)
    return rollout


def rollout_for(policy, generation, scores=None, critic=None, ref_policy=None, temperature=1.0, num_minibatches=2,
                seed=0):
    B = generation.prompt_ids.shape[0]
    scores = torch.zeros(B) if scores is None else scores
    rollout = Rollout.from_generation(generation, scores)
    orders = minibatch_orders(B, num_minibatches, 2, torch.Generator().manual_seed(seed))
    forward_rollout(rollout, policy, ref_policy or policy, critic or toy_critic(1, policy.config),
                    temperature=temperature, minibatches=orders[0])
    return rollout, orders


def test_old_logprobs_equal_the_samplers_at_the_sampling_temperature():
    # catches the off-by-one (logits at P - 1 + t predict token t) and a forgotten temperature
    policy = toy_gpt(0)
    generation = toy_generation(policy, temperature=0.7)
    rollout, _ = rollout_for(policy, generation, temperature=0.7)
    torch.testing.assert_close(rollout.logprobs, generation.logprobs * generation.response_mask, atol=1e-5, rtol=1e-5,
                               msg="old logprobs vs the sampler's logprobs (same tokens, same temperature)")
    assert generation.response_mask.sum(1).unique().numel() > 1, "the test needs responses of different lengths"


def test_values_are_read_at_the_state_before_each_token():
    policy = toy_gpt(0)
    critic = toy_critic(1, policy.config)
    generation = toy_generation(policy)
    rollout, _ = rollout_for(policy, generation, critic=critic)
    for b in range(generation.prompt_ids.shape[0]):
        prompt = generation.prompt_ids[b][generation.prompt_mask[b].bool()].tolist()
        response = generation.response_ids[b][generation.response_mask[b].bool()].tolist()
        for t in range(len(response)):
            prefix = torch.tensor([prompt + response[:t]])  # what the model has seen before emitting token t
            expected = critic(prefix)[0, -1]
            torch.testing.assert_close(rollout.values[b, t], expected, atol=1e-5, rtol=1e-5,
                                       msg=f"value of row {b}, token {t}: V(prompt + response[:{t}])")
        assert (rollout.values[b, len(response):] == 0).all(), f"row {b}: values must be 0 at padding"


def test_select_trims_pad_only_columns_and_keeps_the_tokens():
    policy = toy_gpt(0)
    generation = toy_generation(policy)
    rollout = Rollout.from_generation(generation, torch.zeros(6))
    index = torch.tensor([1, 4])  # the two one-token prompts: 3 PAD-only prompt columns to cut
    batch = rollout.select(index)
    lengths = generation.response_mask[index].sum(1)
    assert batch.prompt_len == 1, f"prompt columns: expected 1 (both prompts are one token), got {batch.prompt_len}"
    assert batch.response_mask.shape == (2, int(lengths.max())), "response columns cut to the longest response"
    P = generation.prompt_ids.shape[1]
    full, _ = generation.sequences()
    torch.testing.assert_close(batch.sequences, full[index, P - 1:P + int(lengths.max())])


# ---------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------


def ppo_update(rollout: Rollout, policy, critic, policy_optimizer, value_optimizer, *, orders, temperature: float,
               clip_range: float = 0.2, clip_range_value: float = 0.2, grad_clip: float = 1.0,
               target_kl: float = 0.0, runtime: Runtime | None = None) -> dict:
    """Step 7 of train_ppo.py's loop (without PPO-ptx), from the same minirlhf.ppo pieces: epochs x
    minibatches, each stepping the policy on the clipped surrogate and the critic on the clipped
    value loss, an early stop once the approximate KL passes `target_kl`. Under torchrun pass the
    DDP-wrapped models. Returns {"minibatch_stats": [one dict per minibatch run], "policy/early_stop"}."""
    runtime = runtime or Runtime(device=rollout.sequences.device)
    stats = []
    for minibatches in orders:
        for index in minibatches:
            batch = rollout.select(index)
            mask = batch.response_mask
            share = token_share(mask.sum().item(), runtime)
            logprobs, entropy = policy_logprobs(policy, batch, temperature)
            policy_loss, policy_stats = ppo_policy_loss(logprobs, batch.logprobs, batch.advantages, mask, clip_range)
            policy_grad_norm = optimizer_step(policy_optimizer, policy, policy_loss * share, grad_clip=grad_clip,
                                              step=1, what="the policy loss")
            values = critic_values(critic, batch)
            value_loss, value_stats = ppo_value_loss(values, batch.values, batch.returns, mask, clip_range_value)
            value_grad_norm = optimizer_step(value_optimizer, critic, value_loss * share, grad_clip=grad_clip,
                                             step=1, what="the value loss")
            stats.append(minibatch_stats(runtime, mask, policy_stats=policy_stats, entropy=entropy,
                                         policy_grad_norm=policy_grad_norm, value_stats=value_stats,
                                         value_grad_norm=value_grad_norm))
            if target_kl > 0 and stats[-1]["policy/approxkl"] > target_kl:
                return {"minibatch_stats": stats, "policy/early_stop": 1.0}
    return {"minibatch_stats": stats, "policy/early_stop": 0.0}


def run_one_update(policy, critic, rollout, orders, lr=1e-2, **kwargs):
    policy_optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    value_optimizer = torch.optim.Adam(critic.parameters(), lr=lr)
    return ppo_update(rollout, policy, critic, policy_optimizer, value_optimizer, orders=orders,
                      temperature=kwargs.pop("temperature", 1.0), clip_range=0.2, clip_range_value=0.2, **kwargs)


def test_minibatch_orders_every_sample_once_per_epoch():
    orders = minibatch_orders(10, 3, 4, torch.Generator().manual_seed(0))
    assert len(orders) == 4, "one list of minibatches per epoch"
    for epoch, minibatches in enumerate(orders):
        assert [len(m) for m in minibatches] == [4, 3, 3], f"epoch {epoch}: sizes {[len(m) for m in minibatches]}"
        assert sorted(torch.cat(minibatches).tolist()) == list(range(10)), f"epoch {epoch}: not a permutation"
    assert torch.cat(orders[0]).tolist() != torch.cat(orders[1]).tolist(), "each epoch reshuffles"
    with pytest.raises(ValueError, match="num_minibatches"):
        minibatch_orders(3, 4, 1)


def update_on_a_sampled_rollout(policy, critic):
    """ppo_update (2 epochs x 3 minibatches) on 6 responses sampled at temperature 0.8 with seeded
    random scores and kl_coef 0.1: the first minibatch of the first epoch should see ratio 1."""
    generation = toy_generation(policy, temperature=0.8)
    rollout, orders = rollout_for(policy, generation, scores=torch.randn(6, generator=torch.Generator().manual_seed(1)),
                                  critic=critic, temperature=0.8, num_minibatches=3)
    fill_advantages(rollout, kl_coef=0.1)
    return run_one_update(policy, critic, rollout, orders, temperature=0.8)


def test_first_minibatch_has_ratio_exactly_one_even_with_dropout_configured():
    # dropout 0.3 in the config: a loop that left the model in train() mode would not give ratio 1
    policy = toy_gpt(0, dropout=0.3).train()
    critic = toy_critic(1, policy.config).train()
    stats = update_on_a_sampled_rollout(policy, critic)
    first = stats["minibatch_stats"][0]
    assert first["policy/ratio_mean"] == 1.0, f"first minibatch ratio_mean {first['policy/ratio_mean']!r}, expected 1"
    assert first["policy/ratio_max"] == 1.0, f"first minibatch ratio_max {first['policy/ratio_max']!r}"
    assert first["policy/clipfrac"] == 0.0, f"first minibatch clipfrac {first['policy/clipfrac']!r}"
    assert first["policy/approxkl"] == 0.0, f"first minibatch approxkl {first['policy/approxkl']!r}"
    later = stats["minibatch_stats"][1:]
    assert len(later) == 5, f"2 epochs x 3 minibatches: expected 6 minibatches, got {len(later) + 1}"
    assert any(s["policy/approxkl"] > 0 for s in later), "the policy should have moved after its first step"
    assert not policy.training and not critic.training, "the rollout's forward passes leave the models in eval() mode"


def test_first_minibatch_has_ratio_exactly_one_under_bf16():
    # --dtype bf16: the blocks run under bf16 autocast, the old and the new logprobs alike; they
    # still come out of the same arithmetic on the same minibatch, so the ratio is still exactly 1
    runtime = Runtime(device=torch.device("cpu"), dtype="bf16")
    policy = runtime.prepare(toy_gpt(0))
    critic = runtime.prepare(toy_critic(1, policy.config))
    assert policy.autocast_dtype == torch.bfloat16, "Runtime.prepare should switch bf16 autocast on"
    stats = update_on_a_sampled_rollout(policy, critic)
    first = stats["minibatch_stats"][0]
    assert first["policy/ratio_mean"] == 1.0 and first["policy/ratio_max"] == 1.0, f"bf16 first minibatch: {first}"
    assert first["policy/approxkl"] == 0.0 and first["policy/clipfrac"] == 0.0, f"bf16 first minibatch: {first}"
    assert any(s["policy/approxkl"] > 0 for s in stats["minibatch_stats"][1:]), "the policy should have moved"


def test_target_kl_stops_the_update_early():
    policy = toy_gpt(0)
    critic = toy_critic(1, policy.config)
    rollout, orders = rollout_for(policy, toy_generation(policy), scores=torch.tensor([3.0, -3, 3, -3, 3, -3]),
                                  critic=critic, num_minibatches=3)
    fill_advantages(rollout, kl_coef=0.0)
    stats = run_one_update(policy, critic, rollout, orders, lr=0.3, target_kl=1e-6)
    assert stats["policy/early_stop"] == 1.0
    assert len(stats["minibatch_stats"]) < 6, "the update should stop before its last minibatch"


def test_policy_equal_to_reference_gives_zero_kl_and_the_score_on_the_last_token():
    policy = toy_gpt(0)
    reference = copy.deepcopy(policy)
    generation = toy_generation(policy)
    scores = torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75, 1.5])
    rollout, _ = rollout_for(policy, generation, scores=scores, ref_policy=reference)
    rewards, kl, _, _ = compute_advantages(rollout.scores, rollout.logprobs, rollout.ref_logprobs, rollout.values,
                                           rollout.response_mask, kl_coef=0.7)
    assert (kl == 0).all(), f"policy == reference must give KL exactly 0, got max |kl| {kl.abs().max().item()}"
    lengths = generation.response_mask.sum(1).long()
    expected = torch.zeros_like(rewards)
    expected[torch.arange(6), lengths - 1] = scores  # the EOS (or the last token of a cut-off response)
    torch.testing.assert_close(rewards, expected, msg="rewards: the score on the last valid token, 0 elsewhere")


# ---------------------------------------------------------------------------------------------
# Toy bandits: one-token responses from a fixed prompt; the probabilities can be enumerated
# ---------------------------------------------------------------------------------------------


def action_probs(policy: GPT) -> torch.Tensor:
    """pi(token | prompt [0]) at temperature 1, all 8 tokens."""
    with torch.no_grad():
        return torch.softmax(policy(torch.tensor([[0]])).logits[0, -1], dim=-1)


def bandit_round(policy, ref_policy, critic, score_of, *, kl_coef, generator, lr, batch_size=128, epochs=1):
    generation = generate(policy, [[0]] * batch_size, max_new_tokens=1, eos_id=EOS, pad_id=PAD, generator=generator)
    scores = score_of(generation.response_ids[:, 0])
    rollout = Rollout.from_generation(generation, scores)
    orders = minibatch_orders(batch_size, 2, epochs, generator)
    forward_rollout(rollout, policy, ref_policy, critic, temperature=1.0, minibatches=orders[0])
    fill_advantages(rollout, kl_coef=kl_coef)
    return run_one_update(policy, critic, rollout, orders, lr=lr)


@pytest.mark.parametrize("sign", [+1.0, -1.0])
def test_bandit_reward_on_one_token_moves_its_probability(sign):
    policy = toy_gpt(0)
    critic = toy_critic(1, policy.config)
    token = 3
    before = action_probs(policy)[token].item()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        bandit_round(policy, copy.deepcopy(policy), critic, lambda ids: sign * (ids == token).float(), kl_coef=0.0,
                     generator=generator, lr=3e-3)
    after = action_probs(policy)[token].item()
    if sign > 0:
        assert after > before + 0.02, f"reward +1 on token {token}: p went {before:.3f} -> {after:.3f}, expected up"
    else:
        assert after < before - 0.02, f"reward -1 on token {token}: p went {before:.3f} -> {after:.3f}, expected down"


def test_bandit_with_kl_penalty_approaches_the_tilted_reference():
    # the maximiser of E[r] - beta * KL(pi || pi_ref) is pi_ref * exp(r / beta) / Z
    policy = toy_gpt(0)
    reference = copy.deepcopy(policy).requires_grad_(False)
    critic = toy_critic(1, policy.config)
    reward = torch.tensor([1.0, 0.0, -0.5, 0.5, 0.0, 1.0, -1.0, 0.25])
    beta = 0.5
    ref_probs = action_probs(reference)
    target = ref_probs * torch.exp(reward / beta)
    target /= target.sum()
    generator = torch.Generator().manual_seed(0)
    for round_ in range(60):
        bandit_round(policy, reference, critic, lambda ids: reward[ids], kl_coef=beta, generator=generator,
                     lr=1e-2 if round_ < 40 else 2e-3, batch_size=128)
    probs = action_probs(policy)
    start_gap = (ref_probs - target).abs().sum().item() / 2  # 0.42
    gap = (probs - target).abs().sum().item() / 2  # total variation distance (0.016 when written)
    assert gap < 0.05, (
        f"total variation to pi_ref*exp(r/beta)/Z: {gap:.4f} (it started at {start_gap:.4f});\n"
        f"policy {[round(p, 3) for p in probs.tolist()]}\ntarget {[round(p, 3) for p in target.tolist()]}")


# ---------------------------------------------------------------------------------------------
# Scores and the critic's initialisation
# ---------------------------------------------------------------------------------------------


class FixedScorer:
    """Stands in for a RewardScorer: returns the given normalised scores."""

    def __init__(self, scores):
        self.scores = torch.tensor(scores)

    def score(self, prompts, responses, ended):
        return self.scores


def test_score_rollout_uses_the_penalty_for_responses_without_eos():
    policy = toy_gpt(0)
    generation = toy_generation(policy, n=4, max_new_tokens=3)
    generation.ended = torch.tensor([True, False, True, False])
    prompts = ["what does a cow eat?", "what is 2 plus 3?", "what does a cow eat?", "what is 2 plus 3?"]
    texts = ["A cow eats grass.", "2 plus 3 is 5.", "A cow eats rocks.", "blah"]
    scores, gold, rm = score_rollout(generation, prompts, texts, reward="rm", reward_scorer=FixedScorer([0.5, 0.7, -0.2, 1.0]),
                                     missing_eos_penalty=-1.5)
    torch.testing.assert_close(scores, torch.tensor([0.5, -1.5, -0.2, -1.5]), msg="RM score, or the penalty without EOS")
    expected_gold = [labeler.score(p, t, e).total for p, t, e in zip(prompts, texts, [True, False, True, False])]
    torch.testing.assert_close(gold, torch.tensor(expected_gold), msg="gold totals (logged, never trained on)")
    torch.testing.assert_close(rm, torch.tensor([0.5, 0.7, -0.2, 1.0]), msg="RM scores before the penalty")

    scores, gold, _ = score_rollout(generation, prompts, texts, reward="gold", gold_normaliser=(4.0, 2.0),
                                    missing_eos_penalty=-1.5)
    torch.testing.assert_close(scores[[0, 2]], (gold[[0, 2]] - 4.0) / 2.0, msg="gold reward, normalised")
    torch.testing.assert_close(scores[[1, 3]], torch.tensor([-1.5, -1.5]), msg="penalty without EOS (gold reward)")


def test_critic_from_reward_model_starts_at_the_normalised_score():
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(vocab_size=8, block_size=16, n_layer=1, n_head=2, d_model=16)).requires_grad_(False)
    scorer = RewardScorer(rm, tokenizer=None, bias=0.7, gain=1.5)
    critic = critic_from_reward_model(scorer)
    ids = torch.tensor([[7, 1, 2, 3, 6], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(critic(ids, mask)[:, -1], scorer.score_tokens(ids, mask),
                               msg="critic at the last token vs the normalised RM score")
    assert all(p.requires_grad for p in critic.parameters()), "the critic is trained"
    assert not any(p.requires_grad for p in rm.parameters()), "the reward model stays frozen"
    assert critic.head.weight.data_ptr() != rm.head.weight.data_ptr(), "the critic is a copy, not a view"


def test_adaptive_kl_controller_moves_towards_the_target():
    controller = AdaptiveKLController(0.2, target=3.0, horizon=1000)
    assert controller.update(4.5, 64) == pytest.approx(0.2 * (1 + 0.2 * 64 / 1000)), "above target: up (error clipped)"
    controller = AdaptiveKLController(0.2, target=3.0, horizon=1000)
    assert controller.update(2.7, 64) == pytest.approx(0.2 * (1 - 0.1 * 64 / 1000)), "below target: down"


# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A data dir and an out dir with an (untrained) smoke-size sft.pt and rm.pt: seconds to build."""
    splits = world.split_prompts(0)
    rng = random.Random(0)
    text = " ".join(t.prompt + " " + world.good_response(t, rng) for t in splits.sft[:200])
    data_dir, out_dir, tokenizer = toy_world(tmp_path_factory, "ppo_world", text)
    for name, tasks in (("ppo", splits.ppo), ("eval", splits.eval)):
        with open(data_dir / f"{name}_prompts.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": t.prompt}) + "\n" for t in tasks)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    policy, rm = GPT(config), RewardModel(config)
    common = dict(model_config=config, tokenizer_identity=tokenizer.identity, train_config={}, step=0, metrics={})
    save_checkpoint(out_dir / "sft.pt", kind="sft", model_state=policy.state_dict(), **common)
    save_checkpoint(out_dir / "rm.pt", kind="rm", model_state=rm.state_dict(), reward_bias=0.1, reward_gain=2.0,
                    **common)
    return {"data": str(data_dir), "out": str(out_dir), "config": config}


def run_ppo(monkeypatch, capsys, *args):
    """Run train_ppo the way the command line does (run_main), without a new interpreter."""
    return run_in_process("train_ppo", list(args), monkeypatch, capsys)


@pytest.fixture(scope="module")
def smoke_run(tiny_world, tmp_path_factory):
    """`python train_ppo.py --preset smoke` in a fresh interpreter, as a user runs it."""
    out = tmp_path_factory.mktemp("ppo_smoke")
    for name in ("sft.pt", "rm.pt"):
        shutil.copy(os.path.join(tiny_world["out"], name), out / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "train_ppo.py", "--preset", "smoke", "--data-dir", tiny_world["data"],
                             "--out-dir", str(out), "--device", "cpu"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    return out, result


def test_smoke_preset_end_to_end(smoke_run):
    out, result = smoke_run
    assert_smoke_run_wrote(result, "train_ppo.py", out, ("ppo.pt", "ppo_metrics.jsonl", "ppo_curves.png",
                                                         "ppo_overopt.png"))

    ckpt = load_checkpoint(out / "ppo.pt", kind="ppo")
    for field in ("value_model", "policy_optimizer", "value_optimizer", "kl_coef", "rng_state"):
        assert field in ckpt, f"ppo.pt lacks {field!r} (needed by --resume)"
    assert ckpt["step"] == 3
    GPT(GPTConfig(**ckpt["model_config"])).load_state_dict(ckpt["model"])  # usable like sft.pt
    # the smoke preset freezes the critic's embeddings and lowest block: they stay the RM's, the rest trained
    rm = load_checkpoint(out / "rm.pt", kind="rm")["model"]
    critic = ckpt["value_model"]
    assert all(torch.equal(critic[k], rm[k]) for k in critic if k.startswith(("trunk.wte", "trunk.wpe", "trunk.blocks.0.")))
    assert not torch.equal(critic["trunk.blocks.1.mlp.c_fc.weight"], rm["trunk.blocks.1.mlp.c_fc.weight"])

    records = [json.loads(line) for line in open(out / "ppo_metrics.jsonl")]
    assert [r["step"] for r in records] == [0, 1, 2, 3], "one record per update, plus the evaluation at 0"
    for key in ("objective/scores", "objective/gold", "objective/kl", "objective/rlhf_reward", "objective/entropy",
                "policy/clipfrac", "policy/approxkl", "policy/ratio_mean", "val/vf_loss", "val/clipfrac",
                "val/explained_variance", "kl_coef", "response_length", "eos_rate", "time/episodes_per_s"):
        assert key in records[1], f"metric {key!r} missing from the per-update records"
    assert records[1]["objective/kl"] == 0.0, "the first rollout comes from the reference itself: KL 0"
    for key in ("eval/gold", "eval/kl", "eval/rm"):
        assert key in records[0] and key in records[-1], f"{key!r} missing from the held-out evaluations"


def test_resume_continues_from_the_checkpoint(smoke_run, tiny_world, tmp_path, monkeypatch, capsys):
    smoke_out, result = smoke_run
    assert result.returncode == 0, "the smoke run failed (see test_smoke_preset_end_to_end)"
    out = tmp_path / "out"
    shutil.copytree(smoke_out, out)
    first = load_checkpoint(out / "ppo.pt", kind="ppo")
    code, stdout, stderr = run_ppo(monkeypatch, capsys, "--preset", "smoke", "--data-dir", tiny_world["data"],
                                   "--out-dir", str(out), "--device", "cpu", "--total-updates", "4", "--resume")
    assert code == 0, stderr
    assert "resumed from" in stdout and "at update 3" in stdout, stdout
    second = load_checkpoint(out / "ppo.pt", kind="ppo")
    assert second["step"] == 4
    assert second["metrics"]["sft/gold"] == first["metrics"]["sft/gold"], "the SFT baseline carries over"
    steps = [json.loads(line)["step"] for line in open(out / "ppo_metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4], f"the resumed run appends to the metrics: steps {steps}"
    assert not torch.equal(first["model"]["wte.weight"], second["model"]["wte.weight"]), "the policy kept training"


def test_the_scripts_own_loop_ratio_one_and_advantages(tiny_world, tmp_path, monkeypatch, capsys):
    """train_ppo.py's loop watched from inside: its policy loss and its rollouts are recorded as it
    runs (a policy built with dropout 0.3, so a training forward left in train() mode shows up).

    * the first minibatch of EVERY update has ratio exactly 1, clipfrac 0 and approximate KL 0, and
      each update runs --ppo-epochs x --num-minibatches minibatches;
    * the rewards, the returns and the whitened advantages the loop trained on are the ones the pure
      functions give from the rollout's own logprobs, values and the update's beta, in the
      documented order (returns before whitening, whitening over the valid tokens).
    """
    import train_ppo

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(os.path.join(tiny_world["out"], "rm.pt"), out / "rm.pt")
    sft = load_checkpoint(os.path.join(tiny_world["out"], "sft.pt"), kind="sft")
    config = dict(sft["model_config"], dropout=0.3)
    save_checkpoint(out / "sft.pt", kind="sft", model_state=sft["model"], model_config=config,
                    tokenizer_identity=sft["tokenizer"], train_config={}, step=0, metrics={})
    events = []   # ("rollout", rollout, kl_coef) once per update, then ("policy_loss", stats) per minibatch

    def watched_rollout_stats(rollout, kl_coef, *args, **kwargs):
        events.append(("rollout", rollout, kl_coef))
        return rollout_stats(rollout, kl_coef, *args, **kwargs)

    def watched_policy_loss(*args, **kwargs):
        loss, stats = ppo_policy_loss(*args, **kwargs)
        events.append(("policy_loss", stats))
        return loss, stats

    monkeypatch.setattr(train_ppo, "rollout_stats", watched_rollout_stats)
    monkeypatch.setattr(train_ppo, "ppo_policy_loss", watched_policy_loss)
    code, _, stderr = run_ppo(monkeypatch, capsys, "--preset", "smoke", "--data-dir", tiny_world["data"],
                              "--out-dir", str(out), "--device", "cpu", "--eval-prompts", "0",
                              "--ppo-epochs", "2", "--num-minibatches", "2")
    assert code == 0, stderr
    starts = [i for i, event in enumerate(events) if event[0] == "rollout"]
    assert len(starts) == 3, f"one rollout per update of the smoke preset, got {len(starts)}"
    for update, (start, end) in enumerate(zip(starts, starts[1:] + [len(events)]), start=1):
        losses = [event[1] for event in events[start + 1:end]]
        assert len(losses) == 2 * 2, f"update {update}: {len(losses)} minibatches, expected 2 epochs x 2"
        first = losses[0]
        assert first["ratio_mean"] == 1.0 and first["ratio_max"] == 1.0, f"update {update}, first minibatch: {first}"
        assert first["clipfrac"] == 0.0 and first["approxkl"] == 0.0, f"update {update}, first minibatch: {first}"

        _, rollout, kl_coef = events[start]
        rewards, kl, advantages, returns = compute_advantages(
            rollout.scores, rollout.logprobs, rollout.ref_logprobs, rollout.values, rollout.response_mask,
            kl_coef=kl_coef, gamma=train_ppo.PPOConfig.gamma, lam=train_ppo.PPOConfig.lam)
        for name, expected in (("rewards", rewards), ("kl", kl), ("returns", returns), ("advantages", advantages)):
            torch.testing.assert_close(getattr(rollout, name), expected, atol=1e-6, rtol=1e-6,
                                       msg=f"update {update}: the loop's {name}")


def test_held_out_subset_is_evenly_spaced_over_the_file():
    from minirlhf.data import evenly_spaced   # what read_sampling_prompts picks PPO's held-out prompts with
    # the prompt files list one family after another: the first n would cover one or two families
    families = ["facts"] * 6 + ["arithmetic"] * 3 + ["explain"] * 3
    assert evenly_spaced(families, 4) == ["facts", "facts", "arithmetic", "explain"]
    assert evenly_spaced(families, 50) == families, "n >= len: every item"
    assert evenly_spaced(families, 0) == []


@pytest.mark.parametrize("case", ["missing_rm", "wrong_kind", "bad_prompts", "out_of_range", "critic_too_frozen"])
def test_bad_input_is_one_clear_line(case, tiny_world, tmp_path, monkeypatch, capsys):
    args = ["--preset", "smoke", "--data-dir", tiny_world["data"], "--out-dir", tiny_world["out"], "--device", "cpu"]
    if case == "missing_rm":
        args += ["--reward-model", str(tmp_path / "nope.pt")]
        expected = "nope.pt not found"
    elif case == "wrong_kind":
        args += ["--init", os.path.join(tiny_world["out"], "rm.pt")]
        expected = "is a 'rm' checkpoint"
    elif case == "bad_prompts":
        bad = tmp_path / "prompts.jsonl"
        bad.write_text('{"prompt": "hello"}\n{"prompt": \n')
        args += ["--prompts", str(bad)]
        expected = "prompts.jsonl:2: not valid JSON"
    elif case == "critic_too_frozen":
        args += ["--critic-freeze-layers", "9"]
        expected = "--critic-freeze-layers 9: the critic has only"
    else:
        args += ["--clip-range=-0.1"]
        expected = "--clip-range: must be >= 0.0"
    code, stdout, stderr = run_ppo(monkeypatch, capsys, *args)
    assert code == 2, f"{case}: exit code {code}, expected 2; stderr: {stderr}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], f"{case}: expected one line containing {expected!r}, got {stderr!r}"
    assert not os.path.exists(os.path.join(tiny_world["out"], "ppo.pt")), "a failed run must not write ppo.pt"
