"""Tests for `minirlhf.kernels.gae`.

The oracle is `gae_reference` (the per-timestep loop), itself checked against hand-worked values
and a pure-Python loop over floats written here. The fused path (and, on a GPU, the auto path,
i.e. Triton) must match it to 1e-12 in fp64; in fp32 to 2e-6 of the largest advantage (the fp32
loop is no closer to the exact values than that).

The traps: bootstrapping past the last valid token, reading rewards/values at padded positions,
a row with no valid token, masks with gaps, bool vs float masks.
"""

from __future__ import annotations

import pytest
import torch

from minirlhf.kernels import gae, gae_reference, get_kernel_impl, set_kernel_impl

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FAST_PATHS = ["fused"] + (["auto"] if torch.cuda.is_available() else [])


def assert_within(name: str, got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Fail unless ``|got - expected| <= tol`` everywhere; the message names the worst entry."""
    got64, expected64 = got.detach().double().cpu(), expected.detach().double().cpu()
    assert got64.shape == expected64.shape, f"{name}: shape {tuple(got64.shape)} != {tuple(expected64.shape)}"
    error = (got64 - expected64).abs().nan_to_num(nan=float("inf"))
    if (error > tol).any():
        index = tuple(int(i) for i in torch.nonzero(error == error.max())[0])
        pytest.fail(
            f"{name}: at (row, step) {index} expected {expected64[index].item():.12g}, got "
            f"{got64[index].item():.12g} (|diff| {error[index].item():.3g} > {tol:.3g}); "
            f"{int((error > tol).sum())} of {error.numel()} entries out of tolerance"
        )


def python_gae(rewards, values, mask, gamma, lam):
    """Independent GAE over plain Python floats, one row at a time (no torch)."""
    advantages, returns = [], []
    for row_rewards, row_values, row_mask in zip(rewards, values, mask):
        n_steps = len(row_rewards)
        row_adv = [0.0] * n_steps
        for t in reversed(range(n_steps)):
            if not row_mask[t]:
                continue  # padded: advantage 0, and it cuts the chain for step t - 1
            next_ok = t + 1 < n_steps and bool(row_mask[t + 1])
            next_value = row_values[t + 1] if next_ok else 0.0
            next_adv = row_adv[t + 1] if next_ok else 0.0
            delta = row_rewards[t] + gamma * next_value - row_values[t]
            row_adv[t] = delta + gamma * lam * next_adv
        advantages.append(row_adv)
        returns.append([a + v if m else 0.0 for a, v, m in zip(row_adv, row_values, row_mask)])
    return torch.tensor(advantages, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)


def random_batch(batch_size, n_steps, *, dtype=torch.float64, seed=0, lengths=None, device="cpu"):
    """Seeded rewards, values and a right-padded (prefix) mask; garbage at padded positions."""
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch_size, n_steps, generator=generator, dtype=torch.float64)
    values = torch.randn(batch_size, n_steps, generator=generator, dtype=torch.float64)
    if lengths is None:
        lengths = torch.randint(0, n_steps + 1, (batch_size,), generator=generator)
    mask = torch.arange(n_steps)[None, :] < torch.as_tensor(lengths)[:, None]
    rewards[~mask] = 1e6  # must never be read
    values[~mask] = -1e6
    return rewards.to(device, dtype), values.to(device, dtype), mask.to(device)


@pytest.fixture(autouse=True)
def restore_default_impl():
    saved = get_kernel_impl()
    yield
    set_kernel_impl(saved)


# ------------------------------------------------------------------------------------------------
# hand-worked values
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference"] + FAST_PATHS)
def test_hand_worked_issue_example(impl):
    # gamma = 1, lam = 0.95, rewards [0, 0, 1], values 0:
    #   A_2 = 1 (no bootstrap), A_1 = 0 + 0.95 * 1 = 0.95, A_0 = 0.95 * 0.95 = 0.9025
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.zeros(1, 3, dtype=torch.float64)
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95, impl=impl)
    expected = torch.tensor([[0.9025, 0.95, 1.0]], dtype=torch.float64)
    assert_within("advantages", advantages, expected, 1e-12)
    assert_within("returns", returns, expected, 1e-12)


@pytest.mark.parametrize("impl", ["reference"] + FAST_PATHS)
def test_hand_worked_with_values_and_padding(impl):
    # gamma = 0.9, lam = 0.5, one row of 2 valid tokens then 2 PADs holding garbage:
    #   delta_1 = r_1 - V_1 = 1 - 0.2 = 0.8          (last valid token: no bootstrap from the PAD)
    #   delta_0 = r_0 + 0.9 V_1 - V_0 = 0 + 0.18 - 0.5 = -0.32
    #   A_1 = 0.8;  A_0 = -0.32 + 0.9 * 0.5 * 0.8 = 0.04
    #   returns = A + V = [0.54, 1.0], then 0 at the PADs
    rewards = torch.tensor([[0.0, 1.0, 5.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.2, 7.0, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5, impl=impl)
    assert_within("advantages", advantages, torch.tensor([[0.04, 0.8, 0.0, 0.0]], dtype=torch.float64), 1e-12)
    assert_within("returns", returns, torch.tensor([[0.54, 1.0, 0.0, 0.0]], dtype=torch.float64), 1e-12)


def test_reference_matches_a_pure_python_loop():
    rewards, values, mask = random_batch(4, 9, seed=1)
    mask[1, 2] = False  # a gap: two runs in one row
    for gamma, lam in ((1.0, 0.95), (0.9, 0.0), (0.99, 1.0)):
        expected = python_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
        got = gae_reference(rewards, values, mask, gamma, lam)
        assert_within(f"reference advantages (gamma={gamma}, lam={lam})", got[0], expected[0], 1e-12)
        assert_within(f"reference returns (gamma={gamma}, lam={lam})", got[1], expected[1], 1e-12)


# ------------------------------------------------------------------------------------------------
# special cases of gamma and lambda
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference"] + FAST_PATHS)
def test_lambda_zero_is_one_step_td(impl):
    rewards, values, mask = random_batch(3, 10, seed=2, lengths=[10, 6, 1])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.0, impl=impl)
    valid = mask.double()
    clean_values = torch.where(mask, values, 0.0)
    next_values = torch.nn.functional.pad(clean_values[:, 1:], (0, 1))
    td_errors = valid * (torch.where(mask, rewards, 0.0) + 0.9 * next_values - clean_values)
    assert_within("lam=0 advantages vs one-step TD errors", advantages, td_errors, 1e-12)
    assert_within("lam=0 returns = r + gamma V_next", returns, valid * (td_errors + clean_values), 1e-12)


@pytest.mark.parametrize("impl", ["reference"] + FAST_PATHS)
def test_lambda_one_gamma_one_is_returns_to_go_minus_value(impl):
    rewards, values, mask = random_batch(3, 12, seed=3, lengths=[12, 7, 0])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0, impl=impl)
    clean_rewards = torch.where(mask, rewards, 0.0)
    returns_to_go = clean_rewards.flip(1).cumsum(1).flip(1) * mask  # sum of rewards from t to the end
    assert_within("lam=1 returns vs returns-to-go", returns, returns_to_go, 1e-12)
    assert_within("lam=1 advantages", advantages, returns_to_go - torch.where(mask, values, 0.0), 1e-12)


@pytest.mark.parametrize("impl", ["reference"] + FAST_PATHS)
def test_gamma_zero_is_reward_minus_value(impl):
    rewards, values, mask = random_batch(2, 5, seed=4, lengths=[5, 3])
    advantages, _ = gae(rewards, values, mask, gamma=0.0, lam=0.95, impl=impl)
    expected = torch.where(mask, rewards - values, 0.0)
    assert_within("gamma=0 advantages", advantages, expected, 1e-12)


# ------------------------------------------------------------------------------------------------
# masking traps
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference"] + FAST_PATHS)
def test_no_bootstrap_past_the_end_and_score_on_last_token(impl):
    # KL-shaped rewards: small per-token penalties, the RM score on the last valid token (the EOS).
    # A row padded to T must equal the same row computed alone at its true length.
    n_valid = 5
    rewards, values, mask = random_batch(1, 9, seed=5, lengths=[n_valid])
    rewards[0, n_valid - 1] += 3.0  # the score
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95, impl=impl)
    alone = gae(rewards[:, :n_valid], values[:, :n_valid], mask[:, :n_valid], gamma=1.0, lam=0.95, impl="reference")
    assert_within("padded row vs the same row unpadded", advantages[:, :n_valid], alone[0], 1e-12)
    last = n_valid - 1
    expected_last = rewards[0, last] - values[0, last]  # the TD error with V_{T} = 0: no bootstrap
    assert abs(advantages[0, last].item() - expected_last.item()) < 1e-12, (
        f"last valid token: advantage {advantages[0, last].item()} != r - V = {expected_last.item()}"
        " (bootstrapping from the PAD's value?)"
    )
    assert (advantages[0, n_valid:] == 0).all() and (returns[0, n_valid:] == 0).all(), "non-zero at PAD"


@pytest.mark.parametrize("impl", ["reference"] + FAST_PATHS)
def test_empty_rows_and_single_step(impl):
    rewards, values, mask = random_batch(3, 4, seed=6, lengths=[0, 4, 0])
    advantages, returns = gae(rewards, values, mask, impl=impl)
    assert (advantages[[0, 2]] == 0).all() and (returns[[0, 2]] == 0).all(), "a row with no valid token is not all 0"
    # T = 1: advantage = r - V
    one = gae(rewards[1:2, :1], values[1:2, :1], mask[1:2, :1], impl=impl)
    assert_within("T=1 advantage", one[0], rewards[1:2, :1] - values[1:2, :1], 1e-12)
    assert_within("T=1 return", one[1], rewards[1:2, :1], 1e-12)
    # empty batches
    for shape in ((0, 4), (3, 0)):
        empty = torch.zeros(shape, dtype=torch.float64)
        advantages, returns = gae(empty, empty, empty.bool(), impl=impl)
        assert advantages.shape == shape and returns.shape == shape


@pytest.mark.parametrize("impl", FAST_PATHS)
def test_masks_with_gaps_left_padding_and_float_masks(impl):
    rewards, values, _ = random_batch(6, 40, seed=7, lengths=[40] * 6)  # no garbage: masks come next
    generator = torch.Generator().manual_seed(0)
    gappy = torch.rand(6, 40, generator=generator) < 0.6  # many runs per row
    left_padded = torch.arange(40)[None, :] >= torch.tensor([0, 5, 39, 40, 17, 33])[:, None]  # one run, not at 0
    for name, mask in (("gaps", gappy), ("left padding", left_padded)):
        expected = gae_reference(rewards, values, mask, 0.99, 0.9)
        for mask_kind, typed_mask in (("bool", mask), ("float", mask.double()), ("float32", mask.float())):
            got = gae(rewards, values, typed_mask, gamma=0.99, lam=0.9, impl=impl)
            assert_within(f"{name} ({mask_kind} mask) advantages", got[0], expected[0], 1e-12)
            assert_within(f"{name} ({mask_kind} mask) returns", got[1], expected[1], 1e-12)


def test_nan_at_padded_positions_does_not_leak():
    rewards, values, mask = random_batch(4, 50, seed=8)
    rewards[~mask] = float("nan")
    values[~mask] = float("inf")
    for impl in ["reference"] + FAST_PATHS:
        advantages, returns = gae(rewards, values, mask, impl=impl)
        assert torch.isfinite(advantages).all() and torch.isfinite(returns).all(), f"{impl}: NaN/inf leaked from PADs"


# ------------------------------------------------------------------------------------------------
# fused path vs the loop
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_steps", [1, 2, 31, 32, 33, 64, 100])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 0.0), (1.0, 1.0), (0.99, 0.9), (0.5, 0.3)])
def test_fused_matches_loop_fp64(device, n_steps, gamma, lam):
    # the fused path works in blocks of 32 steps: lengths below, on and past block boundaries
    rewards, values, mask = random_batch(5, n_steps, seed=n_steps, device=device)
    expected = gae_reference(rewards, values, mask, gamma, lam)
    for impl in FAST_PATHS:
        got = gae(rewards, values, mask, gamma=gamma, lam=lam, impl=impl)
        assert_within(f"{impl} advantages", got[0], expected[0], 1e-12)
        assert_within(f"{impl} returns", got[1], expected[1], 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_fp32_at_benchmark_size(device):
    # B = 64, T = 1024 in fp32 against the loop in fp64: within 2e-6 of the largest advantage
    rewards, values, mask = random_batch(64, 1024, seed=9, device=device)
    rewards[:, :] *= 0.1
    expected = gae_reference(rewards.double(), values.double(), mask, 1.0, 0.95)
    largest = expected[0].abs().max().item()
    for impl in FAST_PATHS:
        got = gae(rewards.float(), values.float(), mask, gamma=1.0, lam=0.95, impl=impl)
        assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
        assert_within(f"{impl} fp32 advantages", got[0], expected[0], 2e-6 * largest)
        assert_within(f"{impl} fp32 returns", got[1], expected[1], 2e-6 * max(largest, expected[1].abs().max().item()))


def test_default_impl_and_shape_errors():
    rewards, values, mask = random_batch(2, 5, seed=10)
    set_kernel_impl("reference")
    assert get_kernel_impl() == "reference"
    got = gae(rewards, values, mask)
    expected = gae(rewards, values, mask, impl="fused")
    assert_within("default 'reference' vs fused", got[0], expected[0], 1e-12)
    with pytest.raises(ValueError, match="same shape"):
        gae(rewards, values[:, :4], mask)
    with pytest.raises(ValueError, match="same shape"):
        gae(rewards[0], values[0], mask[0])
