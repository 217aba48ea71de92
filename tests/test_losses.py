"""Grading tests for minirlhf/losses.py.

Every function gets: a case worked by hand (the arithmetic is in the comments), a comparison with
an independent plain-Python implementation (loops over lists and the ``math`` module, no torch),
its gradient (``torch.autograd.gradcheck`` in fp64, and the gradient's value or sign where it
teaches something), and the classic mistakes (unmasked mean, mean of per-row means, score on the
PAD token, clipping direction for negative advantages, ...). The constants are chosen so that
each classic mistake gives a different number.

Run one function's tests with ``pytest tests/test_losses.py -k <prefix>``, e.g.
``-k masked_mean``, ``-k sft_loss``, ``-k ranking_reward_loss``, ``-k ppo_policy_loss``,
``-k kl_controller``.
"""

import itertools
import math

import pytest
import torch

from minirlhf.losses import (
    AdaptiveKLController,
    FixedKLController,
    classifier_reward_loss,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    kl_shaped_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
    ranking_reward_loss,
    sft_loss,
)

LN2, LN3, LN4 = math.log(2.0), math.log(3.0), math.log(4.0)
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def assert_close(actual, expected, name, atol=1e-10, rtol=1e-10):
    """torch.testing.assert_close with the quantity's name in front of the mismatch report."""
    actual = torch.as_tensor(actual, dtype=F64) if not torch.is_tensor(actual) else actual.detach().to(F64)
    expected = torch.as_tensor(expected, dtype=F64)
    shapes = f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert actual.shape == expected.shape, f"{name}: {shapes}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_float(actual, expected, name, tol=1e-9):
    assert isinstance(actual, float), f"{name}: expected a Python float, got {type(actual).__name__}"
    close = math.isclose(actual, expected, rel_tol=tol, abs_tol=tol)
    assert close, f"{name}: expected {expected!r}, got {actual!r}"


def assert_not_the_mistake(actual, mistaken_value, message):
    """Fail with a message naming a classic mistake when ``actual`` is the value that mistake gives."""
    assert not math.isclose(actual, mistaken_value, rel_tol=1e-6, abs_tol=1e-9), message


def t64(values):
    return torch.tensor(values, dtype=F64)


def random_mask(batch_size, seq_len, generator):
    """A right-padded mask with rows of different lengths (>= 1 valid token each)."""
    lengths = torch.randint(1, seq_len + 1, (batch_size,), generator=generator)
    return torch.arange(seq_len)[None, :] < lengths[:, None]  # (B, T) bool


def py_masked_mean(x, mask):
    """Plain reference: one mean over all valid entries of nested lists."""
    total, count = 0.0, 0
    for x_row, m_row in zip(x, mask):
        for value, keep in zip(x_row, m_row):
            if keep:
                total += value
                count += 1
    return total / count


def py_log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


# plain per-token KL estimators (a = log policy prob, b = log reference prob), written from Schulman 2020
PY_KL = {
    "k1": lambda a, b: a - b,
    "k2": lambda a, b: 0.5 * (a - b) ** 2,
    "k3": lambda a, b: (math.exp(b - a) - 1) - (b - a),
    "abs": lambda a, b: abs(a - b),
}


def py_population_variance(values):
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


# A (2, 4) batch used by several hand-worked cases: rows of 2 and 3 valid tokens, so that a mean
# of per-row means differs from the token mean, and a junk value (1000) at every padded position,
# so that an unmasked mean is far off.
HAND_X = [[1.0, 2.0, 1000.0, 1000.0], [10.0, 20.0, 30.0, 1000.0]]
HAND_MASK = [[1, 1, 0, 0], [1, 1, 1, 0]]


# ---------------------------------------------------------------------------------------------
# masked_mean / masked_var / masked_whiten
# ---------------------------------------------------------------------------------------------


def test_masked_mean_hand_worked_is_token_mean():
    # valid entries: 1, 2 | 10, 20, 30  ->  (1 + 2 + 10 + 20 + 30) / 5 = 63 / 5 = 12.6
    # (mean of per-row means would be (1.5 + 20) / 2 = 10.75; unmasked mean (4063) / 8 = 507.875)
    got = masked_mean(t64(HAND_X), t64(HAND_MASK))
    assert got.dim() == 0, f"masked_mean(dim=None) must be 0-d, got shape {tuple(got.shape)}"
    mistake = "masked_mean returned the mean of per-row means (10.75), expected the token mean 12.6"
    assert_not_the_mistake(got.item(), 10.75, mistake)
    assert_close(got, 12.6, "masked_mean")


def test_masked_mean_dim_gives_per_row_means():
    # row 0: (1 + 2) / 2 = 1.5; row 1: (10 + 20 + 30) / 3 = 20
    assert_close(masked_mean(t64(HAND_X), t64(HAND_MASK), dim=1), [1.5, 20.0], "masked_mean(dim=1)")
    # columns: (1 + 10) / 2, (2 + 20) / 2, 30 / 1, empty -> 0
    assert_close(
        masked_mean(t64(HAND_X), t64(HAND_MASK), dim=0), [5.5, 11.0, 30.0, 0.0], "masked_mean(dim=0)"
    )


def test_masked_mean_bool_and_float_masks_agree():
    x = t64(HAND_X)
    bool_mask = torch.tensor(HAND_MASK, dtype=torch.bool)
    assert_close(
        masked_mean(x, bool_mask), masked_mean(x, bool_mask.float()), "masked_mean bool vs float mask"
    )
    assert_close(masked_mean(x, bool_mask), masked_mean(x, bool_mask.long()), "masked_mean bool vs int mask")
    x32 = x.float()
    assert masked_mean(x32, bool_mask).dtype == torch.float32, "masked_mean must keep the data's dtype"


def test_masked_mean_ignores_inf_and_nan_at_padded_positions():
    x = t64([[1.0, float("inf")], [3.0, float("nan")]])
    mask = torch.tensor([[True, False], [True, False]])
    assert_close(masked_mean(x, mask), 2.0, "masked_mean with inf/nan under the mask (0 * inf = nan trap)")


def test_masked_mean_empty_mask_is_zero_not_nan():
    x = t64([[1.0, 2.0]])
    assert_close(masked_mean(x, torch.zeros(1, 2, dtype=torch.bool)), 0.0, "masked_mean over no valid entry")


def test_masked_mean_matches_python_loop():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=generator, dtype=F64)
    mask = random_mask(5, 7, generator)
    expected = py_masked_mean(x.tolist(), mask.tolist())
    assert_close(masked_mean(x, mask), expected, "masked_mean vs loop")


def test_masked_mean_gradient_is_mask_over_count():
    # d/dx [sum(x * m) / sum(m)] = m / sum(m) = m / 5
    x = t64(HAND_X).requires_grad_()
    masked_mean(x, t64(HAND_MASK)).backward()
    assert_close(x.grad, t64(HAND_MASK) / 5.0, "d masked_mean / dx")
    assert torch.autograd.gradcheck(
        lambda x: masked_mean(x, t64(HAND_MASK)), (x.detach().clone().requires_grad_(),)
    )


def test_masked_var_hand_worked():
    # valid: 1, 2 | 3, 6 -> mean 3; squared deviations 4, 1, 0, 9 -> sum 14
    # population variance 14 / 4 = 3.5; unbiased 14 / 3
    x = t64([[1.0, 2.0, -50.0], [3.0, 6.0, 99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert_close(masked_var(x, mask), 3.5, "masked_var (population)")
    assert_close(masked_var(x, mask, unbiased=True), 14.0 / 3.0, "masked_var(unbiased=True)")


def test_masked_var_matches_python_loop():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, generator=generator, dtype=F64)
    mask = random_mask(4, 9, generator)
    valid = [v for row, m_row in zip(x.tolist(), mask.tolist()) for v, m in zip(row, m_row) if m]
    assert_close(masked_var(x, mask), py_population_variance(valid), "masked_var vs loop")


def test_masked_var_unbiased_needs_two_entries():
    with pytest.raises(ValueError):
        masked_var(t64([[1.0, 2.0]]), torch.tensor([[1, 0]]), unbiased=True)


def test_masked_whiten_hand_worked():
    # valid: 1, 2, 3, 6: mean 3, population variance 3.5 (see test_masked_var_hand_worked)
    # whitened = (x - 3) / sqrt(3.5 + 1e-8) at valid positions, 0 at padding
    x = t64([[1.0, 2.0, -50.0], [3.0, 6.0, 99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    std = math.sqrt(3.5 + 1e-8)
    expected = [[-2.0 / std, -1.0 / std, 0.0], [0.0, 3.0 / std, 0.0]]
    assert_close(masked_whiten(x, mask), expected, "masked_whiten(shift_mean=True)")


def test_masked_whiten_shift_mean_false_keeps_the_mean():
    # only the scale changes: (x - 3) / std + 3; the valid mean stays 3 (trap: returning (x - mean) / std)
    x = t64([[1.0, 2.0, -50.0], [3.0, 6.0, 99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    std = math.sqrt(3.5 + 1e-8)
    got = masked_whiten(x, mask, shift_mean=False)
    expected = [[-2.0 / std + 3.0, -1.0 / std + 3.0, 0.0], [3.0, 3.0 / std + 3.0, 0.0]]
    assert_close(got, expected, "masked_whiten(shift_mean=False)")
    valid_out = got[mask.bool()].tolist()
    assert_float(sum(valid_out) / len(valid_out), 3.0, "mean after masked_whiten(shift_mean=False)")


def test_masked_whiten_matches_python_loop_and_normalises():
    generator = torch.Generator().manual_seed(2)
    x = 5.0 + 3.0 * torch.randn(6, 11, generator=generator, dtype=F64)
    mask = random_mask(6, 11, generator)
    valid = [v for row, m_row in zip(x.tolist(), mask.tolist()) for v, m in zip(row, m_row) if m]
    mean = sum(valid) / len(valid)
    std = math.sqrt(py_population_variance(valid) + 1e-8)  # population, not Bessel-corrected
    expected = [
        [(v - mean) / std if m else 0.0 for v, m in zip(row, m_row)]
        for row, m_row in zip(x.tolist(), mask.tolist())
    ]
    got = masked_whiten(x, mask)
    assert_close(got, expected, "masked_whiten vs loop", atol=1e-9)
    valid_out = got[mask].tolist()
    assert_float(sum(valid_out) / len(valid_out), 0.0, "mean of masked_whiten output")
    assert_float(
        py_population_variance(valid_out), 1.0, "population variance of masked_whiten output", tol=1e-6
    )


def test_masked_whiten_bool_float_masks_and_constant_input():
    x = t64([[2.0, 2.0, 7.0]])
    mask = torch.tensor([[True, True, False]])
    assert_close(masked_whiten(x, mask), masked_whiten(x, mask.to(F64)), "masked_whiten bool vs float mask")
    # a constant input has zero variance: eps keeps the output 0 rather than nan
    assert_close(masked_whiten(x, mask), [[0.0, 0.0, 0.0]], "masked_whiten of a constant")


def test_masked_whiten_gradcheck():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=generator, dtype=F64, requires_grad=True)
    mask = random_mask(3, 5, generator)
    assert torch.autograd.gradcheck(lambda x: masked_whiten(x, mask), (x,))
    assert torch.autograd.gradcheck(lambda x: masked_whiten(x, mask, shift_mean=False), (x,))


# ---------------------------------------------------------------------------------------------
# sft_loss
# ---------------------------------------------------------------------------------------------


def _sft_hand_case():
    # V = 2. Logits [ln 3, 0] give p = [3/4, 1/4]; logits [0, 0] give p = [1/2, 1/2].
    # row 0: t0 [ln3, 0] target 0 -> -ln(3/4) = ln(4/3)
    #        t1 [0, 0]   target 1 -> ln 2
    #        t2 pad (junk logits, target -100)
    # row 1: t0 [ln3, 0] target 1 -> -ln(1/4) = ln 4
    #        t1, t2 pad (junk logits, PAD target id 1)
    # token mean = (ln(4/3) + ln 2 + ln 4) / 3 = ln(32/3) / 3 ~ 0.78898
    # per-row means mistake: ((ln(4/3) + ln 2) / 2 + ln 4) / 2 ~ 0.93136
    logits = t64(
        [
            [[LN3, 0.0], [0.0, 0.0], [-40.0, 40.0]],
            [[LN3, 0.0], [40.0, -40.0], [40.0, -40.0]],
        ]
    )
    targets = torch.tensor([[0, 1, -100], [1, 1, 1]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    return logits, targets, mask


def test_sft_loss_hand_worked():
    logits, targets, mask = _sft_hand_case()
    got = sft_loss(logits, targets, mask)
    assert got.dim() == 0, f"sft_loss must be 0-d, got shape {tuple(got.shape)}"
    per_row_means = ((math.log(4 / 3) + LN2) / 2 + LN4) / 2
    mistake = "sft_loss is the mean of per-row means; expected one mean over all valid tokens"
    assert_not_the_mistake(got.item(), per_row_means, mistake)
    assert_close(got, math.log(32 / 3) / 3, "sft_loss")


def test_sft_loss_bool_and_float_masks_agree():
    logits, targets, mask = _sft_hand_case()
    assert_close(
        sft_loss(logits, targets, mask.bool()),
        sft_loss(logits, targets, mask.float()),
        "sft_loss bool vs float mask",
    )


def test_sft_loss_does_not_shift():
    # logits[b, t] predicts targets[b, t]: confident correct logits at the SAME position give ~0 loss.
    # An implementation that shifts again (logits[:, :-1] vs targets[:, 1:]) gets a loss of ~20.
    targets = torch.tensor([[2, 0, 1, 3]])
    logits = 20.0 * torch.nn.functional.one_hot(targets, num_classes=4).to(F64)  # (1, 4, 4)
    got = sft_loss(logits, targets, torch.ones(1, 4))
    message = (
        f"sft_loss where logits[b, t] predict targets[b, t]: expected ~0, got {got.item():.4f} (shifted?)"
    )
    assert got.item() < 1e-6, message


def test_sft_loss_matches_python_loop():
    generator = torch.Generator().manual_seed(4)
    batch_size, seq_len, vocab_size = 3, 6, 7
    logits = torch.randn(batch_size, seq_len, vocab_size, generator=generator, dtype=F64)
    targets = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    mask = random_mask(batch_size, seq_len, generator)
    nll = []
    for b in range(batch_size):
        row = []
        for t in range(seq_len):
            z = logits[b, t].tolist()
            log_normaliser = math.log(sum(math.exp(v) for v in z))
            row.append(log_normaliser - z[targets[b, t].item()])
        nll.append(row)
    assert_close(sft_loss(logits, targets, mask), py_masked_mean(nll, mask.tolist()), "sft_loss vs loop")


def test_sft_loss_gradient():
    # d loss / d logits[b, t] = (softmax(logits[b, t]) - onehot(target)) / N at valid positions, 0 at pads
    logits, targets, mask = _sft_hand_case()
    logits.requires_grad_()
    sft_loss(logits, targets, mask).backward()
    expected = torch.zeros_like(logits)
    expected[0, 0] = t64([3 / 4 - 1, 1 / 4]) / 3
    expected[0, 1] = t64([1 / 2, 1 / 2 - 1]) / 3
    expected[1, 0] = t64([3 / 4, 1 / 4 - 1]) / 3
    assert_close(logits.grad, expected, "d sft_loss / d logits")

    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 5, generator=generator, dtype=F64, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3), generator=generator)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.autograd.gradcheck(lambda z: sft_loss(z, targets, mask), (logits,))


def test_sft_loss_low_precision_logits():
    logits, targets, mask = _sft_hand_case()
    got = sft_loss(logits.to(torch.bfloat16), targets, mask)
    assert got.dtype == torch.float32, f"sft_loss should compute bf16 logits in fp32, got {got.dtype}"
    assert_close(got, math.log(32 / 3) / 3, "sft_loss(bf16 logits)", atol=1e-2, rtol=0)


# ---------------------------------------------------------------------------------------------
# pairwise_reward_loss / ranking_reward_loss / classifier_reward_loss
# ---------------------------------------------------------------------------------------------


def test_pairwise_reward_loss_hand_worked():
    # margins rc - rr: ln 3, 0, -ln 3
    # -log sigmoid(ln 3) = -log(3/4) = ln(4/3); -log sigmoid(0) = ln 2; -log sigmoid(-ln 3) = -log(1/4) = ln 4
    # mean = (ln(4/3) + ln 2 + ln 4) / 3 = ln(32/3) / 3
    r_chosen = t64([LN3 + 1.0, 5.0, -2.0])
    r_rejected = t64([1.0, 5.0, -2.0 + LN3])
    got = pairwise_reward_loss(r_chosen, r_rejected)
    assert got.dim() == 0, f"pairwise_reward_loss must be 0-d, got shape {tuple(got.shape)}"
    assert_close(got, math.log(32 / 3) / 3, "pairwise_reward_loss")


def test_pairwise_reward_loss_matches_python_loop_and_is_shift_invariant():
    generator = torch.Generator().manual_seed(6)
    r_chosen = 3.0 * torch.randn(9, generator=generator, dtype=F64)
    r_rejected = 3.0 * torch.randn(9, generator=generator, dtype=F64)
    expected = sum(-py_log_sigmoid(c - r) for c, r in zip(r_chosen.tolist(), r_rejected.tolist())) / 9
    assert_close(pairwise_reward_loss(r_chosen, r_rejected), expected, "pairwise_reward_loss vs loop")
    assert_close(
        pairwise_reward_loss(r_chosen + 7.0, r_rejected + 7.0),
        expected,
        "pairwise_reward_loss after adding 7 to both",
    )


def test_pairwise_reward_loss_is_stable_for_large_margins():
    # -log sigmoid(-1000) = 1000 + log(1 + e^-1000) ~ 1000 (naive -log(sigmoid) gives inf)
    got = pairwise_reward_loss(torch.tensor([0.0]), torch.tensor([1000.0]))
    assert torch.isfinite(got), "pairwise_reward_loss overflowed for a margin of -1000 (use logsigmoid)"
    assert_close(got, 1000.0, "pairwise_reward_loss(margin=-1000)", atol=1e-3)


def test_pairwise_reward_loss_gradient():
    # d/d rc of -log sigmoid(m) / B = -(1 - sigmoid(m)) / B: pushes the chosen reward UP, the rejected DOWN
    r_chosen = t64([LN3, 0.0]).requires_grad_()
    r_rejected = t64([0.0, 0.0]).requires_grad_()
    pairwise_reward_loss(r_chosen, r_rejected).backward()
    # margin ln 3: 1 - 3/4 = 1/4; margin 0: 1/2; divided by B = 2
    assert_close(r_chosen.grad, [-1 / 8, -1 / 4], "d pairwise_reward_loss / d r_chosen")
    assert_close(r_rejected.grad, [1 / 8, 1 / 4], "d pairwise_reward_loss / d r_rejected")
    generator = torch.Generator().manual_seed(7)
    inputs = (
        torch.randn(4, generator=generator, dtype=F64, requires_grad=True),
        torch.randn(4, generator=generator, dtype=F64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(pairwise_reward_loss, inputs)


def py_ranking_loss(rewards, valid=None, tiers=None):
    """Plain reference: per prompt, mean over its valid pairs (i < j, best first, not tied); mean over prompts."""
    per_prompt = []
    for b, row in enumerate(rewards):
        keep = [k for k in range(len(row)) if valid is None or valid[b][k]]
        pairs = [(i, j) for i, j in itertools.combinations(keep, 2)  # (i, j) with i < j: i is ranked better
                 if tiers is None or tiers[b][i] < tiers[b][j]]
        if pairs:
            per_prompt.append(sum(-py_log_sigmoid(row[i] - row[j]) for i, j in pairs) / len(pairs))
    return sum(per_prompt) / len(per_prompt)


def test_ranking_reward_loss_hand_worked_mean_over_pairs():
    # K = 3, best first, rewards [ln 3, 0, ln 3]; the C(3, 2) = 3 pairs:
    # (0 beats 1): margin ln 3 -> ln(4/3); (0 beats 2): margin 0 -> ln 2; (1 beats 2): margin -ln 3 -> ln 4
    # mean over pairs = ln(32/3) / 3 ~ 0.78898   (sum over pairs, a classic mistake, = ln(32/3) ~ 2.367)
    got = ranking_reward_loss(t64([[LN3, 0.0, LN3]]))
    assert got.dim() == 0, f"ranking_reward_loss must be 0-d, got shape {tuple(got.shape)}"
    mistake = "ranking_reward_loss summed over pairs; expected the mean over C(K,2) pairs"
    assert_not_the_mistake(got.item(), math.log(32 / 3), mistake)
    assert_close(got, math.log(32 / 3) / 3, "ranking_reward_loss")


def test_ranking_reward_loss_order_is_best_first():
    # rewards that agree with the best-first ranking give a small loss; reversed, a large one
    agree = t64([[9.0, 0.0, -9.0]])
    agree_loss = ranking_reward_loss(agree).item()
    reversed_loss = ranking_reward_loss(agree.flip(1)).item()
    assert agree_loss < 1e-3, f"ranking_reward_loss: column 0 is the BEST response, got loss {agree_loss}"
    assert reversed_loss > 5.0, f"ranking_reward_loss: reversed rankings must cost, got loss {reversed_loss}"


def test_ranking_reward_loss_k2_equals_pairwise():
    generator = torch.Generator().manual_seed(8)
    rewards = torch.randn(6, 2, generator=generator, dtype=F64)
    assert_close(
        ranking_reward_loss(rewards),
        pairwise_reward_loss(rewards[:, 0], rewards[:, 1]),
        "ranking_reward_loss(K=2) vs pairwise",
    )


def test_ranking_reward_loss_matches_python_loop():
    generator = torch.Generator().manual_seed(9)
    rewards = 2.0 * torch.randn(4, 5, generator=generator, dtype=F64)
    assert_close(
        ranking_reward_loss(rewards), py_ranking_loss(rewards.tolist()), "ranking_reward_loss vs loop"
    )


def test_ranking_reward_loss_leaves_out_tied_pairs():
    # K = 3, best first, rewards [ln 3, 0, ln 3], responses 0 and 1 TIED (tiers [0, 0, 1]):
    # pairs (0, 2): margin 0 -> ln 2; (1, 2): margin -ln 3 -> ln 4; the tie (0, 1) is no comparison
    # mean over the 2 pairs = (ln 2 + ln 4) / 2 = 1.5 ln 2   (the strict ranking's 3 pairs: ln(32/3) / 3)
    got = ranking_reward_loss(t64([[LN3, 0.0, LN3]]), tiers=torch.tensor([[0, 0, 1]]))
    assert_not_the_mistake(got.item(), math.log(32 / 3) / 3, "a tied pair was trained as a preference")
    assert_close(got, 1.5 * LN2, "ranking_reward_loss with a tie")
    # a prompt whose responses are all tied has no comparison: it leaves the mean over prompts
    rewards = t64([[LN3, 0.0, LN3], [5.0, -5.0, 0.0]])
    got = ranking_reward_loss(rewards, tiers=torch.tensor([[0, 0, 1], [0, 0, 0]]))
    assert_close(got, 1.5 * LN2, "an all-tied prompt must not count")


def test_ranking_reward_loss_with_ties_and_missing_matches_python_loop():
    generator = torch.Generator().manual_seed(10)
    rewards = 2.0 * torch.randn(5, 4, generator=generator, dtype=F64)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    tiers = torch.tensor([[0, 1, 1, 2], [0, 0, 1, 9], [0, 1, 9, 9], [0, 1, 2, 3], [0, 0, 0, 1]])
    got = ranking_reward_loss(rewards, valid, tiers)
    assert_close(got, py_ranking_loss(rewards.tolist(), valid.tolist(), tiers.tolist()),
                 "ranking_reward_loss with ties and missing responses vs loop")
    # gradients: a tied pair pushes neither member
    row = t64([[0.0, 0.0, 0.0]]).requires_grad_()
    ranking_reward_loss(row, tiers=torch.tensor([[0, 1, 1]])).backward()
    # pairs (0,1), (0,2), margin 0 each: d/dr0 = 2 * -(1/2) / 2 = -1/2, d/dr1 = d/dr2 = +1/4
    assert_close(row.grad, [[-0.5, 0.25, 0.25]], "gradient with a tie: only the preferences push")


def test_ranking_reward_loss_prompts_count_equally():
    # prompt 0: K = 3 valid, rewards [ln 3, 0, ln 3] -> mean over its 3 pairs = ln(32/3) / 3
    # prompt 1: 2 valid responses out of 3 (third missing, nan): one pair, margin 0 -> ln 2
    # batch loss = (ln(32/3) / 3 + ln 2) / 2 ~ 0.74106
    # (mean over the 4 pairs, prompts weighted by pair count: (ln(32/3) + ln 2) / 4 ~ 0.76503)
    rewards = t64([[LN3, 0.0, LN3], [1.5, 1.5, float("nan")]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    got = ranking_reward_loss(rewards, valid)
    assert_close(
        got,
        (math.log(32 / 3) / 3 + LN2) / 2,
        "ranking_reward_loss with missing responses (prompts count equally)",
    )
    assert_close(
        got, py_ranking_loss(rewards.tolist(), valid.tolist()), "ranking_reward_loss with valid vs loop"
    )


def test_ranking_reward_loss_valid_mask_in_the_middle_and_empty_prompts():
    generator = torch.Generator().manual_seed(10)
    rewards = torch.randn(4, 4, generator=generator, dtype=F64)
    valid = torch.tensor(
        [[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0], [1, 1, 0, 0]]
    )  # row 2: one response, no pair
    assert_close(
        ranking_reward_loss(rewards, valid),
        py_ranking_loss(rewards.tolist(), valid.tolist()),
        "ranking_reward_loss with holes in valid",
    )
    assert_close(
        ranking_reward_loss(rewards, valid.bool()),
        ranking_reward_loss(rewards, valid.float()),
        "ranking_reward_loss bool vs float valid",
    )


def test_ranking_reward_loss_gradient():
    # nan at a missing response must not reach the gradient of the valid ones
    rewards = t64([[LN3, 0.0, LN3], [1.5, 1.5, float("nan")]]).requires_grad_()
    valid = torch.tensor([[True, True, True], [True, True, False]])
    ranking_reward_loss(rewards, valid).backward()
    assert torch.isfinite(rewards.grad).all(), f"ranking_reward_loss gradient not finite: {rewards.grad}"
    assert rewards.grad[1, 2].item() == 0.0, "ranking_reward_loss: a missing response must get zero gradient"
    # prompt 1, one pair with margin 0: d/dr_0 = -(1 - 1/2) * (1/1 pair) * (1/2 prompts) = -1/4
    assert_close(rewards.grad[1], [-0.25, 0.25, 0.0], "d ranking_reward_loss / d rewards[1]")
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, generator=generator, dtype=F64, requires_grad=True)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1], [0, 1, 1, 0]]).bool()
    assert torch.autograd.gradcheck(lambda r: ranking_reward_loss(r, valid), (x,))


def test_classifier_reward_loss_hand_worked():
    # logit margins m = [0, ln 3, ln 3, -ln 3], labels [1, 1, 0, 0]; p(good) = sigmoid(m) = [1/2, 3/4, 3/4, 1/4]
    # y=1, m=0:     -log(1/2)     = ln 2
    # y=1, m=ln 3:  -log(3/4)     = ln(4/3)
    # y=0, m=ln 3:  -log(1 - 3/4) = ln 4
    # y=0, m=-ln 3: -log(1 - 1/4) = ln(4/3)
    # mean = (ln 2 + 2 ln(4/3) + ln 4) / 4 = ln(128/9) / 4 ~ 0.66371   (labels flipped: ln(128/3) / 4 ~ 0.93836)
    got = classifier_reward_loss(t64([0.0, LN3, LN3, -LN3]), torch.tensor([1, 1, 0, 0]))
    assert got.dim() == 0, f"classifier_reward_loss must be 0-d, got shape {tuple(got.shape)}"
    assert_close(got, math.log(128 / 9) / 4, "classifier_reward_loss (label 1 = good)")


def test_classifier_reward_loss_matches_python_loop_and_label_dtypes():
    generator = torch.Generator().manual_seed(12)
    margins = 3.0 * torch.randn(8, generator=generator, dtype=F64)
    labels = torch.randint(0, 2, (8,), generator=generator)
    expected = (
        sum(
            -(py_log_sigmoid(m) if y else py_log_sigmoid(-m))
            for m, y in zip(margins.tolist(), labels.tolist())
        )
        / 8
    )
    assert_close(
        classifier_reward_loss(margins, labels), expected, "classifier_reward_loss vs loop (int labels)"
    )
    assert_close(
        classifier_reward_loss(margins, labels.bool()), expected, "classifier_reward_loss (bool labels)"
    )
    assert_close(
        classifier_reward_loss(margins, labels.to(F64)), expected, "classifier_reward_loss (float labels)"
    )


def test_classifier_reward_loss_gradient():
    # d/dm = (sigmoid(m) - y) / B: m = ln 3, y = 0 -> (3/4 - 0) / 2; m = 0, y = 1 -> (1/2 - 1) / 2
    margins = t64([LN3, 0.0]).requires_grad_()
    classifier_reward_loss(margins, torch.tensor([0, 1])).backward()
    assert_close(margins.grad, [3 / 8, -1 / 4], "d classifier_reward_loss / d margin")
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(5, generator=generator, dtype=F64, requires_grad=True)
    labels = torch.tensor([1, 0, 0, 1, 1])
    assert torch.autograd.gradcheck(lambda m: classifier_reward_loss(m, labels), (x,))


# ---------------------------------------------------------------------------------------------
# kl_penalty / kl_shaped_rewards
# ---------------------------------------------------------------------------------------------


def test_kl_penalty_hand_worked():
    # token 0: policy p = 1/2, reference 1/4: log ratio = ln 2, r = ref/policy = 1/2
    #   k1 = ln 2 ~ 0.6931; k2 = (ln 2)^2 / 2 ~ 0.2402; k3 = (1/2 - 1) - ln(1/2) = ln 2 - 1/2 ~ 0.1931
    # token 1: policy 1/4, reference 1/2: log ratio = -ln 2, r = 2
    #   k1 = -ln 2; k2 = (ln 2)^2 / 2; k3 = (2 - 1) - ln 2 ~ 0.3069
    logp = t64([[math.log(0.5), math.log(0.25)]])
    ref_logp = t64([[math.log(0.25), math.log(0.5)]])
    assert_close(kl_penalty(logp, ref_logp, "k1"), [[LN2, -LN2]], "kl_penalty k1")
    assert_close(kl_penalty(logp, ref_logp), [[LN2, -LN2]], "kl_penalty default kind (k1)")
    assert_close(kl_penalty(logp, ref_logp, "k2"), [[LN2**2 / 2, LN2**2 / 2]], "kl_penalty k2")
    assert_close(
        kl_penalty(logp, ref_logp, "k3"), [[LN2 - 0.5, 1.0 - LN2]], "kl_penalty k3 (r = exp(ref - logp))"
    )
    assert_close(kl_penalty(logp, ref_logp, "abs"), [[LN2, LN2]], "kl_penalty abs")


def test_kl_penalty_k1_k3_are_unbiased_for_kl_policy_to_reference():
    # Exact expectation over a small vocabulary, tokens drawn from the POLICY q:
    # sum_x q(x) k(x) must equal KL(q || p) for k1 and k3 (and k3 >= 0 per token).
    # Using r = exp(logp - ref) in k3 (wrong direction) gives a different number.
    q = t64([0.5, 0.3, 0.15, 0.05])
    p = t64([0.1, 0.2, 0.3, 0.4])
    kl_q_p = sum(qi * math.log(qi / pi) for qi, pi in zip(q.tolist(), p.tolist()))  # ~ 0.7194
    logp, ref_logp = q.log()[None], p.log()[None]
    for kind in ("k1", "k3"):
        expectation = (q * kl_penalty(logp, ref_logp, kind)[0]).sum()
        assert_close(expectation, kl_q_p, f"E_q[{kind}] vs KL(policy || reference)")
    for kind in ("k2", "k3", "abs"):
        non_negative = (kl_penalty(logp, ref_logp, kind) >= 0).all()
        assert non_negative, f"kl_penalty {kind} must be non-negative per token"


def test_kl_penalty_matches_python_loop_and_rejects_unknown_kind():
    generator = torch.Generator().manual_seed(14)
    logp = -torch.rand(3, 5, generator=generator, dtype=F64) * 3
    ref_logp = -torch.rand(3, 5, generator=generator, dtype=F64) * 3
    for kind, formula in PY_KL.items():
        expected = [
            [formula(a, b) for a, b in zip(ra, rb)] for ra, rb in zip(logp.tolist(), ref_logp.tolist())
        ]
        assert_close(kl_penalty(logp, ref_logp, kind), expected, f"kl_penalty {kind} vs loop")
    with pytest.raises(ValueError):
        kl_penalty(logp, ref_logp, "k4")


def test_kl_penalty_gradcheck():
    generator = torch.Generator().manual_seed(15)
    logp = torch.randn(2, 3, generator=generator, dtype=F64, requires_grad=True)
    ref_logp = torch.randn(2, 3, generator=generator, dtype=F64, requires_grad=True)
    for kind in ("k1", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda a, b: kl_penalty(a, b, kind), (logp, ref_logp))


def _kl_rewards_hand_case():
    # B = 2, T = 5. Row 0: 3 valid tokens (EOS at t=2) then 2 PAD; row 1: all 5 valid (no PAD).
    # log ratio (logp - ref_logp) at valid tokens: row 0: 0.5, -0.2, 1.0; row 1: 0.1, 0.2, 0.3, 0.4, 0.5
    # Padded positions hold junk (-inf logp): they must give 0, not nan.
    ninf = float("-inf")
    logp = t64([[-1.0, -2.0, -0.5, ninf, ninf], [-1.0, -1.0, -1.0, -1.0, -1.0]])
    ref_logp = t64([[-1.5, -1.8, -1.5, ninf, -3.0], [-1.1, -1.2, -1.3, -1.4, -1.5]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    score = t64([2.0, -1.0])
    return score, logp, ref_logp, mask


def test_kl_shaped_rewards_hand_worked():
    # kl_coef = 0.1, k1:
    # row 0: kl = [0.5, -0.2, 1.0, 0, 0]; rewards = [-0.05, 0.02, -0.1 + 2.0 (score on the EOS at t=2), 0, 0]
    # row 1: kl = [0.1, 0.2, 0.3, 0.4, 0.5]; rewards = [-0.01, -0.02, -0.03, -0.04, -0.05 - 1.0 (score at t=4)]
    score, logp, ref_logp, mask = _kl_rewards_hand_case()
    result = kl_shaped_rewards(score, logp, ref_logp, mask, kl_coef=0.1)
    assert isinstance(result, tuple) and len(result) == 2, "kl_shaped_rewards returns the tuple (rewards, kl)"
    rewards, kl = result
    assert_close(
        kl, [[0.5, -0.2, 1.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5]], "kl_shaped_rewards kl", atol=1e-12
    )
    expected = [[-0.05, 0.02, 1.9, 0.0, 0.0], [-0.01, -0.02, -0.03, -0.04, -1.05]]
    assert_close(rewards, expected, "kl_shaped_rewards rewards", atol=1e-12)


def test_kl_shaped_rewards_score_on_last_valid_token_not_pad():
    # the classic mistakes: score at t = T-1 (a PAD for row 0), or at the first PAD (t = 3)
    score, logp, ref_logp, mask = _kl_rewards_hand_case()
    rewards, _ = kl_shaped_rewards(score, logp, ref_logp, mask, kl_coef=0.0)
    row0 = rewards[0].tolist()
    assert row0[2] == 2.0, f"score must sit on the last valid token (the EOS, t=2); rewards row 0 = {row0}"
    assert row0[3] == 0.0 and row0[4] == 0.0, f"padded positions must be 0; rewards row 0 = {row0}"
    assert rewards[1, 4].item() == -1.0, "a row with no PAD gets its score at t = T-1"
    # "last valid token" is the last 1 of the mask, even with a hole before it
    holey_mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
    zeros = torch.zeros(2, 5, dtype=F64)
    rewards, kl = kl_shaped_rewards(score, zeros, zeros, holey_mask, kl_coef=0.0)
    assert_close(
        rewards,
        [[0.0, 0.0, 0.0, 2.0, 0.0], [0.0] * 5],
        "kl_shaped_rewards with a hole in the mask and an empty row",
    )


def test_kl_shaped_rewards_bool_float_masks_and_kinds():
    score, logp, ref_logp, mask = _kl_rewards_hand_case()
    for kind in ("k1", "k2", "k3"):
        r_bool, kl_bool = kl_shaped_rewards(score, logp, ref_logp, mask.bool(), 0.3, kl_kind=kind)
        r_float, kl_float = kl_shaped_rewards(score, logp, ref_logp, mask.float(), 0.3, kl_kind=kind)
        assert_close(r_bool, r_float, f"kl_shaped_rewards bool vs float mask ({kind})")
        expected_kl = [
            [PY_KL[kind](a, b) if m else 0.0 for a, b, m in zip(ra, rb, rm)]
            for ra, rb, rm in zip(logp.tolist(), ref_logp.tolist(), mask.tolist())
        ]
        assert_close(kl_bool, expected_kl, f"kl_shaped_rewards kl with kl_kind={kind}")


def test_kl_shaped_rewards_matches_python_loop():
    generator = torch.Generator().manual_seed(16)
    batch_size, seq_len, kl_coef = 4, 7, 0.05
    logp = -3 * torch.rand(batch_size, seq_len, generator=generator, dtype=F64)
    ref_logp = -3 * torch.rand(batch_size, seq_len, generator=generator, dtype=F64)
    score = torch.randn(batch_size, generator=generator, dtype=F64)
    mask = random_mask(batch_size, seq_len, generator)
    expected = []
    for b in range(batch_size):
        row = [0.0] * seq_len
        last = max(t for t in range(seq_len) if mask[b, t])
        for t in range(seq_len):
            if mask[b, t]:
                row[t] = -kl_coef * (logp[b, t].item() - ref_logp[b, t].item())
        row[last] += score[b].item()
        expected.append(row)
    rewards, kl = kl_shaped_rewards(score, logp, ref_logp, mask, kl_coef)
    assert_close(rewards, expected, "kl_shaped_rewards vs loop")
    # summed over a row: score - kl_coef * sum(log ratio) (the sequence-level reward of InstructGPT eq. 2)
    assert_close(rewards.sum(1), score - kl_coef * kl.sum(1), "sum_t rewards = score - kl_coef * sum_t kl")


# ---------------------------------------------------------------------------------------------
# ppo_policy_loss
# ---------------------------------------------------------------------------------------------


def _policy_hand_case():
    # clip_range eps = 0.2 -> clip(ratio) to [0.8, 1.2]. Per token: max(-A * ratio, -A * clip(ratio)).
    # row 0: ratio 1.5, A = +1: max(-1.5, -1.2) = -1.2   clipped term active (gain capped above 1+eps)
    #        ratio 0.5, A = +1: max(-0.5, -0.8) = -0.5   unclipped (no cap when moving away from the action)
    #        ratio 1.1, A = +2: max(-2.2, -2.2) = -2.2   inside the range: tie, not counted as clipped
    #        PAD (ratio e^3 ~ 20, A = 100: junk)
    # row 1: ratio 0.5, A = -1: max(0.5, 0.8)   = 0.8    clipped term active (negative A: floor at 1-eps)
    #        ratio 1.5, A = -1: max(1.5, 1.2)   = 1.5    unclipped
    #        PAD, PAD
    # loss = (-1.2 - 0.5 - 2.2 + 0.8 + 1.5) / 5 = -1.6 / 5 = -0.32
    #   (mean of per-row means: (-1.3 + 1.15) / 2 = -0.075; "clip the ratio only": (-1.2-0.8-2.2+0.8+1.2)/5 = -0.44)
    # clipfrac = 2 / 5 = 0.4; ratio_mean = (1.5 + 0.5 + 1.1 + 0.5 + 1.5) / 5 = 1.02; ratio_max = 1.5
    old_logp = t64([[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0]])
    ratios = t64([[1.5, 0.5, 1.1, math.exp(3.0)], [0.5, 1.5, 1.0, 1.0]])
    logp = old_logp + ratios.log()
    advantages = t64([[1.0, 1.0, 2.0, 100.0], [-1.0, -1.0, 50.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    return logp, old_logp, advantages, mask


def test_ppo_policy_loss_hand_worked():
    logp, old_logp, advantages, mask = _policy_hand_case()
    loss, stats = ppo_policy_loss(logp, old_logp, advantages, mask, clip_range=0.2)
    assert loss.dim() == 0, f"ppo_policy_loss must return a 0-d loss, got shape {tuple(loss.shape)}"
    clip_only = "ppo_policy_loss clipped the ratio without the max(unclipped, clipped)"
    assert_not_the_mistake(loss.item(), -0.44, clip_only)
    per_row = "ppo_policy_loss averaged per-row means; expected one mean over valid tokens"
    assert_not_the_mistake(loss.item(), -0.075, per_row)
    assert_close(loss, -0.32, "ppo_policy_loss")
    assert_float(stats["clipfrac"], 0.4, "clipfrac (2 of 5 valid tokens have the clipped term active)")
    assert_float(stats["ratio_mean"], 1.02, "ratio_mean")
    assert_float(stats["ratio_max"], 1.5, "ratio_max (over valid tokens only)")
    assert_float(stats["policy_loss"], -0.32, "stats['policy_loss']")
    log_ratios = [math.log(1.5), math.log(0.5), math.log(1.1), math.log(0.5), math.log(1.5)]
    assert_float(
        stats["approxkl"],
        sum(0.5 * lr**2 for lr in log_ratios) / 5,
        "approxkl = masked_mean(0.5 * log_ratio^2)",
    )


def test_ppo_policy_loss_gradient_is_zero_where_clipped():
    # d/dlogp of -A * ratio = -A * ratio; divided by N = 5 valid tokens; 0 where the clipped term is active
    # row 0: [0 (clipped), -0.5/5, -2*1.1/5, 0 (pad)]; row 1: [0 (clipped), +1.5/5, 0, 0]
    logp, old_logp, advantages, mask = _policy_hand_case()
    logp.requires_grad_()
    loss, _ = ppo_policy_loss(logp, old_logp, advantages, mask, clip_range=0.2)
    loss.backward()
    expected = [[0.0, -0.1, -0.44, 0.0], [0.0, 0.3, 0.0, 0.0]]
    assert_close(logp.grad, expected, "d ppo_policy_loss / d logp")


def test_ppo_policy_loss_ratio_one_on_first_minibatch():
    # logp == old_logp: ratio 1, nothing clipped, loss = -masked_mean(A), gradient -A / N
    generator = torch.Generator().manual_seed(17)
    logp = -torch.rand(3, 6, generator=generator, dtype=F64)
    advantages = torch.randn(3, 6, generator=generator, dtype=F64)
    mask = random_mask(3, 6, generator)
    loss, stats = ppo_policy_loss(logp, logp.clone(), advantages, mask, clip_range=0.2)
    assert_close(loss, -py_masked_mean(advantages.tolist(), mask.tolist()), "ppo_policy_loss at ratio 1")
    assert_float(stats["clipfrac"], 0.0, "clipfrac at ratio 1")
    assert_float(stats["approxkl"], 0.0, "approxkl at ratio 1")
    assert_float(stats["ratio_mean"], 1.0, "ratio_mean at ratio 1")
    assert_float(stats["ratio_max"], 1.0, "ratio_max at ratio 1")


def test_ppo_policy_loss_matches_python_loop():
    generator = torch.Generator().manual_seed(18)
    batch_size, seq_len, eps = 4, 9, 0.2
    old_logp = -2 * torch.rand(batch_size, seq_len, generator=generator, dtype=F64)
    logp = old_logp + 0.5 * torch.randn(batch_size, seq_len, generator=generator, dtype=F64)
    advantages = torch.randn(batch_size, seq_len, generator=generator, dtype=F64)
    mask = random_mask(batch_size, seq_len, generator)
    losses, clipped_flags, ratios = [], [], []
    for b in range(batch_size):
        for t in range(seq_len):
            if not mask[b, t]:
                continue
            ratio = math.exp(logp[b, t].item() - old_logp[b, t].item())
            a = advantages[b, t].item()
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            losses.append(max(unclipped, clipped))
            clipped_flags.append(1.0 if clipped > unclipped else 0.0)
            ratios.append(ratio)
    loss, stats = ppo_policy_loss(logp, old_logp, advantages, mask, eps)
    assert_close(loss, sum(losses) / len(losses), "ppo_policy_loss vs loop")
    assert_float(stats["clipfrac"], sum(clipped_flags) / len(clipped_flags), "clipfrac vs loop")
    assert_float(stats["ratio_max"], max(ratios), "ratio_max vs loop")
    assert 0.0 < stats["clipfrac"] < 1.0, "this case should clip some tokens and not others"


def test_ppo_policy_loss_bool_float_masks_and_gradcheck():
    logp, old_logp, advantages, mask = _policy_hand_case()
    loss_bool, stats_bool = ppo_policy_loss(logp, old_logp, advantages, mask.bool(), 0.2)
    loss_float, stats_float = ppo_policy_loss(logp, old_logp, advantages, mask.float(), 0.2)
    assert_close(loss_bool, loss_float, "ppo_policy_loss bool vs float mask")
    assert stats_bool == pytest.approx(
        stats_float
    ), f"ppo_policy_loss stats bool vs float mask: {stats_bool} vs {stats_float}"
    # gradcheck away from the kinks at ratio = 1 +- eps
    logp = logp.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda lp: ppo_policy_loss(lp, old_logp, advantages, mask, 0.2)[0], (logp,)
    )


# ---------------------------------------------------------------------------------------------
# ppo_value_loss
# ---------------------------------------------------------------------------------------------


def _value_hand_case():
    # clip_range_value c = 0.2: v_clipped = old + clamp(v - old, -0.2, 0.2)
    # row 0: old 0, v 0.5, R 1:    (0.5 - 1)^2 = 0.25, v_clipped 0.2: (0.2 - 1)^2 = 0.64 -> 0.64 (clipped larger)
    #        old 0, v 0.5, R 0:    0.25 vs (0.2 - 0)^2 = 0.04 -> 0.25
    #        old 0, v -0.1, R 1:   inside the range, v_clipped = v: 1.21 vs 1.21 -> 1.21 (tie: not clipped)
    # row 1: old 1, v 0.5, R 1.2:  (0.5 - 1.2)^2 = 0.49, v_clipped 0.8: (0.8 - 1.2)^2 = 0.16 -> 0.49
    #        PAD, PAD (junk)
    # loss = 0.5 * (0.64 + 0.25 + 1.21 + 0.49) / 4 = 0.5 * 2.59 / 4 = 0.32375;  clipfrac = 1 / 4
    #   (mean of per-row means: 0.5 * ((2.1 / 3) + 0.49) / 2 = 0.2975; without the 0.5: 0.6475)
    values = t64([[0.5, 0.5, -0.1], [0.5, 9.0, 9.0]])
    old_values = t64([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    returns = t64([[1.0, 0.0, 1.0], [1.2, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return values, old_values, returns, mask


def test_ppo_value_loss_hand_worked():
    values, old_values, returns, mask = _value_hand_case()
    loss, stats = ppo_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    assert loss.dim() == 0, f"ppo_value_loss must return a 0-d loss, got shape {tuple(loss.shape)}"
    assert_close(loss, 0.32375, "ppo_value_loss = 0.5 * masked_mean(max(unclipped, clipped squared error))")
    assert_float(stats["clipfrac"], 0.25, "value clipfrac (strictly larger clipped error on 1 of 4 tokens)")
    assert_float(stats["value_loss"], 0.32375, "stats['value_loss']")


def test_ppo_value_loss_gradient_is_zero_where_clipped():
    # d/dv of 0.5 * (v - R)^2 / N = (v - R) / 4 where unclipped; 0 where the clipped error is larger
    # row 0: [0 (clipped), 0.5 / 4, -1.1 / 4]; row 1: [-0.7 / 4, 0, 0]
    values, old_values, returns, mask = _value_hand_case()
    values.requires_grad_()
    ppo_value_loss(values, old_values, returns, mask, 0.2)[0].backward()
    assert_close(values.grad, [[0.0, 0.125, -0.275], [-0.175, 0.0, 0.0]], "d ppo_value_loss / d values")


def test_ppo_value_loss_matches_python_loop():
    generator = torch.Generator().manual_seed(19)
    batch_size, seq_len, c = 3, 8, 0.2
    old_values = torch.randn(batch_size, seq_len, generator=generator, dtype=F64)
    values = old_values + 0.4 * torch.randn(batch_size, seq_len, generator=generator, dtype=F64)
    returns = torch.randn(batch_size, seq_len, generator=generator, dtype=F64)
    mask = random_mask(batch_size, seq_len, generator)
    errors, flags = [], []
    for b in range(batch_size):
        for t in range(seq_len):
            if mask[b, t]:
                v, old, ret = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
                v_clipped = old + min(max(v - old, -c), c)
                unclipped, clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
                errors.append(max(unclipped, clipped))
                flags.append(1.0 if clipped > unclipped else 0.0)
    loss, stats = ppo_value_loss(values, old_values, returns, mask, c)
    assert_close(loss, 0.5 * sum(errors) / len(errors), "ppo_value_loss vs loop")
    assert_float(stats["clipfrac"], sum(flags) / len(flags), "value clipfrac vs loop")


def test_ppo_value_loss_bool_float_masks_and_gradcheck():
    values, old_values, returns, mask = _value_hand_case()
    loss_bool, _ = ppo_value_loss(values, old_values, returns, mask.bool(), 0.2)
    loss_float, _ = ppo_value_loss(values, old_values, returns, mask.float(), 0.2)
    assert_close(loss_bool, loss_float, "ppo_value_loss bool vs float mask")
    # gradcheck away from the ties and the clip boundary
    generator = torch.Generator().manual_seed(20)
    values = torch.randn(2, 4, generator=generator, dtype=F64, requires_grad=True)
    old_values = values.detach() + t64([[0.5, -0.5, 0.05, 0.0], [0.3, -0.3, 0.1, -0.1]])
    returns = torch.randn(2, 4, generator=generator, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert torch.autograd.gradcheck(lambda v: ppo_value_loss(v, old_values, returns, mask, 0.2)[0], (values,))


# ---------------------------------------------------------------------------------------------
# entropy_from_logits / explained_variance
# ---------------------------------------------------------------------------------------------


def test_entropy_from_logits_hand_worked():
    # uniform over 4: ln 4; p = [1/4, 3/4]: -(1/4 ln 1/4 + 3/4 ln 3/4) = ln 4 - (3/4) ln 3 ~ 0.5623
    # top-k masked [0, -inf, -inf, 0]: uniform over 2 -> ln 2 (and no nan from 0 * -inf)
    ninf = float("-inf")
    logits = t64([[[0.0, 0.0, 0.0, 0.0], [0.0, LN3, ninf, ninf], [0.0, ninf, ninf, 0.0]]])
    got = entropy_from_logits(logits)
    assert got.shape == (1, 3), f"entropy_from_logits shape {tuple(got.shape)}, expected (1, 3)"
    assert_close(got, [[LN4, LN4 - 0.75 * LN3, LN2]], "entropy_from_logits")


def test_entropy_from_logits_matches_python_loop_and_gradient_is_finite():
    generator = torch.Generator().manual_seed(21)
    logits = 2 * torch.randn(2, 3, 6, generator=generator, dtype=F64)
    expected = []
    for b in range(2):
        row = []
        for t in range(3):
            z = logits[b, t].tolist()
            normaliser = sum(math.exp(v) for v in z)
            row.append(-sum(math.exp(v) / normaliser * math.log(math.exp(v) / normaliser) for v in z))
        expected.append(row)
    assert_close(entropy_from_logits(logits), expected, "entropy_from_logits vs loop")
    masked = logits.clone()
    masked[..., :2] = float("-inf")
    masked.requires_grad_()
    entropy_from_logits(masked).sum().backward()
    assert torch.isfinite(masked.grad).all(), "entropy_from_logits gradient is not finite with -inf logits"


def test_explained_variance_hand_worked():
    # valid returns R = [1, 2 | 3, 4]: mean 2.5, Var[R] = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    # V = R            -> residual 0, EV = 1
    # V = R + 1        -> residual constant -1, Var = 0, EV = 1 (a constant offset is "explained")
    # V = 2.5          -> residual = R - 2.5, EV = 0
    # V = [4, 3 | 2, 1] -> residual [-3, -1, 1, 3], Var = 5, EV = 1 - 5 / 1.25 = -3
    returns = t64([[1.0, 2.0, 99.0], [3.0, 4.0, -99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    junk = t64([[0.0, 0.0, 7.0], [0.0, 0.0, 7.0]])
    cases = {
        "V = R": (returns, 1.0),
        "V = R + 1": (returns + 1.0, 1.0),
        "V = mean(R)": (t64([[2.5, 2.5, 0.0], [2.5, 2.5, 0.0]]), 0.0),
        "V reversed": (t64([[4.0, 3.0, 0.0], [2.0, 1.0, 0.0]]) + junk, -3.0),
    }
    for name, (values, expected) in cases.items():
        assert_float(explained_variance(values, returns, mask), expected, f"explained_variance ({name})")


def test_explained_variance_matches_python_loop_and_constant_returns():
    generator = torch.Generator().manual_seed(22)
    returns = torch.randn(3, 7, generator=generator, dtype=F64)
    values = returns + 0.5 * torch.randn(3, 7, generator=generator, dtype=F64)
    mask = random_mask(3, 7, generator)
    valid_r = [r for row, m_row in zip(returns.tolist(), mask.tolist()) for r, m in zip(row, m_row) if m]
    valid_v = [v for row, m_row in zip(values.tolist(), mask.tolist()) for v, m in zip(row, m_row) if m]
    expected = 1 - py_population_variance([r - v for r, v in zip(valid_r, valid_v)]) / py_population_variance(
        valid_r
    )
    assert_float(explained_variance(values, returns, mask), expected, "explained_variance vs loop")
    assert math.isnan(
        explained_variance(values, torch.ones(3, 7, dtype=F64), mask)
    ), "explained_variance of constant returns should be nan"


# ---------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------


def test_fixed_kl_controller_never_changes():
    controller = FixedKLController(0.02)
    assert_float(controller.value, 0.02, "FixedKLController.value")
    for current_kl in (0.0, 6.0, 100.0):
        assert_float(controller.update(current_kl, 256), 0.02, f"FixedKLController.update({current_kl})")
    assert_float(controller.value, 0.02, "FixedKLController.value after updates")


def test_adaptive_kl_controller_hand_worked():
    # init 0.1, target 6, horizon 10000, n_steps 100 -> n_steps / horizon = 0.01
    # KL 6.6: error = 6.6/6 - 1 = 0.1            -> 0.1 * (1 + 0.1 * 0.01) = 0.1001
    # KL 5.4: error = -0.1                       -> 0.1 * (1 - 0.001)      = 0.0999
    # KL 6:   error 0                            -> unchanged 0.1
    for current_kl, expected in ((6.6, 0.1001), (5.4, 0.0999), (6.0, 0.1)):
        controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
        returned = controller.update(current_kl, n_steps=100)
        assert_float(returned, expected, f"AdaptiveKLController.update(current_kl={current_kl}) return value")
        assert_float(controller.value, expected, f"AdaptiveKLController.value after update({current_kl})")


def test_adaptive_kl_controller_clips_error_at_0_2():
    # KL 9: error 9/6 - 1 = 0.5  -> clipped to +0.2 -> 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    #   (unclipped would give 0.1 * (1 + 0.5 * 0.0256) = 0.10128)
    # KL 0: error -1             -> clipped to -0.2 -> 0.1 * (1 - 0.2 * 0.0256) = 0.099488
    # KL 3: error -0.5           -> clipped to -0.2 -> 0.099488 as well
    for current_kl, expected in ((9.0, 0.100512), (0.0, 0.099488), (3.0, 0.099488)):
        controller = AdaptiveKLController(0.1, 6.0, 10000)
        got = controller.update(current_kl, 256)
        assert_float(
            got,
            expected,
            f"AdaptiveKLController.update(current_kl={current_kl}): error must be clipped to +-0.2",
        )


def test_adaptive_kl_controller_sequence_matches_python_loop_and_accepts_tensors():
    measurements = [12.0, 7.0, 6.2, 5.0, 1.0, 6.0, torch.tensor(8.0)]
    controller = AdaptiveKLController(0.2, 6.0, 1000)
    beta = 0.2
    for current_kl in measurements:
        error = min(max(float(current_kl) / 6.0 - 1.0, -0.2), 0.2)
        beta *= 1.0 + error * 64 / 1000
        got = controller.update(current_kl, 64)
        assert_float(got, beta, f"AdaptiveKLController after update({float(current_kl)})")
    assert isinstance(controller.value, float), "AdaptiveKLController.value must be a Python float"
