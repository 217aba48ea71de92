"""Generalized Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
Using Generalized Advantage Estimation", eq. 16), per token of a batch of responses.

For one response with rewards ``r_t``, values ``V_t`` and a 0/1 mask ``m_t`` (1 on response
tokens), with ``gamma`` the discount and ``lam`` the GAE lambda::

    delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t              (TD error; V_{T} = 0)
    A_t     = m_t * (delta_t + gamma * lam * m_{t+1} * A_{t+1})  (A_T = 0)
    R_t     = m_t * (A_t + V_t)                                (the value targets, "returns")

Conventions (docs/design.md):
- no bootstrap past the last valid token: ``m_{t+1} = 0`` there, so the last token's TD error is
  ``r_t - V_t`` (the RM score sits in ``r_t`` at that token, the EOS);
- advantages and returns are 0 at padded positions, and a row with no valid token is all 0;
  rewards and values at padded positions are never read (they may hold anything, even NaN);
- returns = advantages + values, computed before the advantages are whitened (by the caller);
- masks may be bool or float; a position is valid where the mask is nonzero.
  Valid tokens are a prefix of each row in practice (a right-padded response), but any mask works:
  each maximal run of valid tokens is treated as its own episode (nothing flows across a gap),
  exactly as the loop above does (CleanRL's ``nextnonterminal`` convention).
- defaults follow LHP/TRL: gamma = 1, lam = 0.95.

Three paths behind `gae` (see `dispatch.py`): the per-timestep loop (the reference), a blocked
scan in plain torch (the CPU default), and a Triton kernel (CUDA).
"""

from __future__ import annotations

import functools

import torch

from minirlhf.kernels.dispatch import resolve_impl, triton_kernels

# The fused path splits time into blocks of this many steps (see `discounted_reverse_cumsum`).
GAE_BLOCK = 32


def _check_gae_inputs(rewards, values, mask) -> None:
    if rewards.dim() != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            "gae expects rewards, values and mask of the same shape (B, T); got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )


# ------------------------------------------------------------------------------------------------
# Path 1: the reference, one Python iteration per timestep (the oracle).
# ------------------------------------------------------------------------------------------------


def gae_reference(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE by the backward loop over timesteps written in the module docstring. (B, T) each."""
    # BEGIN SOLUTION
    batch_size, n_steps = rewards.shape
    valid = mask != 0  # (B, T) bool
    # padded positions may hold anything: never let it reach the arithmetic (0 * NaN = NaN)
    rewards = torch.where(valid, rewards, 0.0)
    values = torch.where(valid, values, 0.0)
    valid = valid.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_advantage = values.new_zeros(batch_size)  # A_{t+1}
    next_value = values.new_zeros(batch_size)  # V_{t+1}
    next_valid = values.new_zeros(batch_size)  # m_{t+1}: 0 after the last step -> no bootstrap
    for t in reversed(range(n_steps)):
        delta = rewards[:, t] + gamma * next_valid * next_value - values[:, t]
        next_advantage = valid[:, t] * (delta + gamma * lam * next_valid * next_advantage)
        advantages[:, t] = next_advantage
        next_value, next_valid = values[:, t], valid[:, t]
    returns = valid * (advantages + values)
    return advantages, returns
    # END SOLUTION


# ------------------------------------------------------------------------------------------------
# Path 2: the fused torch path: a blocked scan (CPU default).
# ------------------------------------------------------------------------------------------------
#
# Written as a linear recurrence, GAE is a discounted reverse cumulative sum:
#
#     A_t = x_t + c * A_{t+1}      with  x_t = m_t * delta_t  and  c = gamma * lam,
#     i.e.  A_t = sum_{s >= t} c^(s - t) x_s.
#
# On a row whose valid tokens form ONE run (a prefix, or any contiguous span), x_s is 0 after the
# run, so the sum stops by itself at the last valid token, and masking A afterwards zeroes the
# positions before the run: no per-step mask is needed inside the sum. A Python loop over T steps
# costs ~T small torch calls; the blocked version below does the same sum with two small matmuls.


@functools.lru_cache(maxsize=64)
def _decay_matrix(n: int, discount: float, stride: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n, n) upper-triangular ``M[i, k] = discount^(stride * (k - i))`` for ``k >= i``, else 0.

    Built in fp64, then cast; cached, since PPO calls gae with the same sizes every step. Entries
    too small to matter are set to exactly 0: denormal operands would make the CPU matmul crawl,
    and they change no result.
    """
    steps = torch.arange(n, dtype=torch.float64)
    distance = steps[None, :] - steps[:, None]  # (n, n): k - i
    powers = torch.tensor(discount, dtype=torch.float64) ** (stride * distance.clamp(min=0))
    matrix = torch.where((distance >= 0) & (powers >= 1e-30), powers, 0.0)
    return matrix.to(dtype=dtype, device=device)


def discounted_reverse_cumsum(x: torch.Tensor, discount: float, block: int = GAE_BLOCK) -> torch.Tensor:
    """``out[:, t] = sum_{s >= t} discount^(s - t) x[:, s]`` for (B, T) ``x``: a two-level scan.

    1. Cut time into blocks of ``L = block`` steps: (B, nb, L). Inside each block, the sum that
       ignores later blocks is one matmul with the (L, L) decay matrix ``discount^(k - j)``.
    2. The value at each block's first step, ``head_i``, misses the contribution of the blocks
       after it: ``H_i = head_i + discount^L H_{i+1}``. That is the same problem on nb numbers:
       one (nb, nb) matmul with ``discount^(L (i' - i))``.
    3. Step j of block i then adds ``discount^(L - j) H_{i+1}`` (the carry from the next block).

    No division by powers of ``discount`` (which would overflow for small ``discount``) and no
    subtraction of cumulative sums (which would cancel): every term is a power times ``x``.
    """
    batch_size, n_steps = x.shape
    n_blocks = -(-n_steps // block)
    if n_blocks * block != n_steps:
        x = torch.nn.functional.pad(x, (0, n_blocks * block - n_steps))  # zeros after the end
    blocks = x.reshape(batch_size, n_blocks, block)  # (B, nb, L)

    in_block = _decay_matrix(block, discount, 1, x.dtype, x.device)  # (L, L)
    local = blocks @ in_block.T  # (B, nb, L): sums within each block only
    across_blocks = _decay_matrix(n_blocks, discount, block, x.dtype, x.device)  # (nb, nb)
    heads = local[:, :, 0] @ across_blocks.T  # (B, nb): the true value at each block's start
    next_heads = torch.nn.functional.pad(heads[:, 1:], (0, 1))  # (B, nb): H_{i+1}, 0 at the end
    carry_decay = _decay_matrix(block + 1, discount, 1, x.dtype, x.device)[0, 1:].flip(0)  # (L,): d^(L - j)
    out = local.addcmul_(next_heads[:, :, None], carry_decay)  # (B, nb, L)
    return out.view(batch_size, n_blocks * block)[:, :n_steps]


def linear_recurrence_log_depth(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``a_t = x_t + coef_t * a_{t+1}`` (a_T = 0) for (B, T) tensors: a log-depth (doubling) scan.

    After the round with stride k, ``a_t`` holds the sum over ``s`` in ``[t, t + 2k)`` and
    ``coef_t`` the product ``coef_t ... coef_{t+2k-1}`` (Hillis & Steele 1986). log2(T) rounds of
    whole-tensor ops; works for any per-step coefficient, zeros included.
    """
    acc, factor = x.clone(), coef.clone()
    n_steps = x.shape[1]
    stride = 1
    while stride < n_steps:
        new_acc = acc.clone()
        new_acc[:, :-stride] += factor[:, :-stride] * acc[:, stride:]
        new_factor = torch.zeros_like(factor)
        new_factor[:, :-stride] = factor[:, :-stride] * factor[:, stride:]
        acc, factor = new_acc, new_factor
        stride *= 2
    return acc


def gae_fused(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE with whole-tensor ops: the blocked scan when each row's valid tokens form one run (the
    usual case), the log-depth scan otherwise. Same results as `gae_reference`.

    CPU trap: ``torch.where``/``masked_fill`` with a bool mask run ~15x slower than a multiply by
    a 0/1 float mask here, so padded positions are zeroed by multiplying. But ``0 * inf`` and
    ``0 * nan`` are NaN: if anything non-finite shows up, redo that step with ``torch.where``.
    """
    if values.numel() == 0:  # B = 0 or T = 0
        return torch.zeros_like(values), torch.zeros_like(values)
    valid = mask if mask.dtype == torch.bool else mask != 0  # (B, T)
    valid_float = valid.to(values.dtype)
    clean_rewards = rewards * valid_float
    clean_values = values * valid_float  # 0 at pads, so that m_{t+1} V_{t+1} is values[t + 1]
    # x_t = m_t * delta_t = m_t * (r_t + gamma * V_{t+1} - V_t), with V_T = 0
    deltas = clean_rewards - clean_values
    deltas[:, :-1].add_(clean_values[:, 1:], alpha=gamma)
    deltas.mul_(valid_float)
    if not torch.isfinite(deltas.sum()):  # NaN/inf somewhere: keep only what valid positions hold
        clean_rewards = torch.where(valid, rewards, 0.0)
        clean_values = torch.where(valid, values, 0.0)
        deltas = torch.where(valid, clean_rewards - clean_values, 0.0)
        deltas[:, :-1] += torch.where(valid[:, :-1], gamma * clean_values[:, 1:], 0.0)

    # number of runs of valid tokens in each row: the rises 0 -> 1, counting one at t = 0
    rises = (valid_float[:, 1:] - valid_float[:, :-1]).clamp_(min=0)  # (B, T-1)
    n_runs = rises.sum(dim=1) + valid_float[:, 0]  # (B,)
    if n_runs.numel() == 0 or n_runs.max() <= 1:
        # one run per row: x is 0 after it, so the plain discounted sum stops at its end;
        # then zero the steps before it (left padding), which the sum also covered
        advantages = discounted_reverse_cumsum(deltas, gamma * lam).mul_(valid_float)
    else:
        # a gap ends an episode: A_t gets nothing from after it, so the coefficient is per step
        next_valid = torch.nn.functional.pad(valid[:, 1:], (0, 1))
        coef = (gamma * lam) * (valid & next_valid).to(values.dtype)
        advantages = linear_recurrence_log_depth(deltas, coef)
    returns = advantages + clean_values  # both are 0 at padded positions already
    return advantages, returns


# ------------------------------------------------------------------------------------------------
# The public function.
# ------------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    *,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and returns (value targets) for a batch of responses.

    Args:
        rewards: (B, T) per-token rewards (e.g. -kl_coef * KL, plus the RM score at the last
            valid token: `losses.kl_shaped_rewards`).
        values: (B, T) value estimates V(s_t) from the critic (detached).
        mask: (B, T) bool or float, nonzero on response tokens.
        gamma: discount (LHP: 1.0).
        lam: GAE lambda (LHP: 0.95). lam = 0 gives one-step TD errors; lam = 1 (with gamma = 1)
            gives returns-to-go minus the value.
        impl: None (the default set by `set_kernel_impl`), "auto", "reference", "fused", "triton"
            ("triton_tiled", a second token-logprobs kernel, runs GAE's "triton" path).

    Returns:
        ``(advantages, returns)``, (B, T) each, in the dtype of ``values``; 0 at padded positions.
        See the module docstring for the formulas and the conventions.

    Example (gamma = 1, lam = 0.95, rewards [0, 0, 1], values 0)::

        A_2 = 1;  A_1 = 0 + 0.95 * 1 = 0.95;  A_0 = 0.95 * 0.95 = 0.9025
    """
    _check_gae_inputs(rewards, values, mask)
    path = resolve_impl(impl, values)
    rewards = rewards.to(values.dtype)
    # GAE's outputs are targets: never differentiated through; fp32 even under autocast (the fused
    # path's block recurrence is a matmul, which autocast would run in bf16)
    with torch.no_grad(), torch.autocast(values.device.type, enabled=False):
        if path == "reference":
            return gae_reference(rewards, values, mask, gamma, lam)
        if path == "fused":
            return gae_fused(rewards, values, mask, gamma, lam)
        return triton_kernels().triton_gae(rewards, values, mask, gamma, lam)
