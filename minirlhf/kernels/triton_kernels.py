"""Triton kernels for CUDA tensors: token logprobs (forward and backward) and GAE.

This module imports Triton at the top, so it is only ever imported through
`dispatch.triton_kernels()`, which catches a missing Triton. To run these kernels on CPU tensors
(slowly, for tests) set ``TRITON_INTERPRET=1`` before Triton is first imported.

All arithmetic is fp32 (half-precision inputs are converted as they are loaded) and every
``tl.dot`` uses ``input_precision="ieee"``: no TF32, so results match the fp32 reference to ~1e-5.

Token logprobs, the tiling. Tokens are cut into tiles of BLOCK_N rows, the vocabulary into tiles
of BLOCK_V columns, the hidden size into chunks of BLOCK_D. One program computes one
(BLOCK_N x BLOCK_V) tile of logits at a time, in registers, and never writes it to memory:

- forward: program (i, s) walks its share ``s`` of the vocabulary tiles for token tile i, keeping
  an online softmax (running max, sum of exp, and the entropy's sum) per token; the few partial
  results per token (one per share) are merged by `logprobs.merge_softmax_stats` in torch.
- backward: program (i, j) recomputes tile (i, j) of logits, turns it into dL/dz, and adds
  ``dz @ W_j`` into grad_hidden[i] and ``dz.T @ h_i`` into grad_weight[j] with atomic adds
  (every vocabulary tile contributes to every token's gradient and vice versa). Atomics make
  the float summation order, hence the last bits, vary from run to run.

GAE: one program per row of the batch; time is walked backwards in tiles of BLOCK_T steps, each
tile solved by ``tl.associative_scan`` over the linear recurrence, with a carry between tiles.

`triton_tiled.py` holds a second token-logprobs kernel (tensor cores, a backward without atomics),
opt-in with ``impl="triton_tiled"`` until a GPU has measured it; it is re-exported here, so that
this module is the one place the dispatch imports Triton code from. `triton_common.py` holds what
the two share: the backward's dL/dz of a logits tile and the split of the vocabulary into shares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minirlhf.kernels.logprobs import finish_softmax_stats, save_logprobs_context
from minirlhf.kernels.triton_common import grad_logits_tile, refuse_float64, vocab_shares
from minirlhf.kernels.triton_tiled import TileSizes, triton_tiled_token_logprobs_rows  # noqa: F401

# ------------------------------------------------------------------------------------------------
# Token logprobs.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, rows, cols, n_tokens, vocab_size, hidden_size,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(BLOCK_N, BLOCK_V) fp32 tile ``hidden[rows] @ weight[cols].T``; out-of-range entries are 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d_start in range(0, hidden_size, BLOCK_D):
        dims = d_start + offs_d
        h = tl.load(
            hidden_ptr + rows[:, None] * stride_hn + dims[None, :] * stride_hd,
            mask=(rows[:, None] < n_tokens) & (dims[None, :] < hidden_size), other=0.0,
        ).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        w = tl.load(
            weight_ptr + cols[:, None] * stride_wv + dims[None, :] * stride_wd,
            mask=(cols[:, None] < vocab_size) & (dims[None, :] < hidden_size), other=0.0,
        ).to(tl.float32)  # (BLOCK_V, BLOCK_D)
        acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
    return acc


@triton.jit
def _logprobs_forward_kernel(
    hidden_ptr, weight_ptr, part_max_ptr, part_sum_ptr, part_shift_ptr,
    n_tokens, vocab_size, hidden_size,
    stride_hn, stride_hd, stride_wv, stride_wd,
    n_parts, tiles_per_part, inv_temperature,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (i, s): online softmax stats of token tile i over vocabulary tiles of share s.

    Writes, for each token of the tile, ``m`` (max scaled logit), ``S = sum exp(z - m)`` and
    ``U = sum exp(z - m) (z - m)`` to column s of the (N, n_parts) partial-result buffers.
    """
    tile_n = tl.program_id(0)
    part = tl.program_id(1)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_shift = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_tile = part * tiles_per_part
    for tile_v in range(first_tile, first_tile + tiles_per_part):
        cols = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab_size  # the last tile may overhang V (or the whole tile may)
        z = _logits_tile(
            hidden_ptr, weight_ptr, rows, cols, n_tokens, vocab_size, hidden_size,
            stride_hn, stride_hd, stride_wv, stride_wd, BLOCK_N, BLOCK_V, BLOCK_D,
        ) * inv_temperature
        z = tl.where(col_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))  # finite once a real column was seen
        # -inf appears in two places: run_max before the first tile, z past the end of V. Keep
        # every product finite (-inf * 0 = nan): substitute finite stand-ins where it can occur.
        new_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # a tile wholly past V
        old_max = tl.where(run_max == float("-inf"), new_max, run_max)
        shifted = tl.where(col_ok[None, :], z - new_max[:, None], 0.0)  # (BLOCK_N, BLOCK_V), <= 0
        probs = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)  # unnormalised softmax
        rescale = tl.exp(run_max - new_max)  # e^(m - M); 0 before the first tile
        if WITH_ENTROPY:
            # U relative to the new max: e^(m - M) (U + (m - M) S)   (see merge_softmax_stats)
            run_shift = rescale * (run_shift + (old_max - new_max) * run_sum) + tl.sum(probs * shifted, axis=1)
        run_sum = rescale * run_sum + tl.sum(probs, axis=1)
        run_max = new_max
    row_ok = rows < n_tokens
    out = rows * n_parts + part
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(part_shift_ptr + out, run_shift, mask=row_ok)


@triton.jit
def _logprobs_backward_kernel(
    hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_lp_ptr, grad_ent_ptr,
    grad_hidden_ptr, grad_weight_ptr,
    n_tokens, vocab_size, hidden_size,
    stride_hn, stride_hd, stride_wv, stride_wd,
    inv_temperature,
    WITH_ENTROPY_GRAD: tl.constexpr, NEED_HIDDEN_GRAD: tl.constexpr, NEED_WEIGHT_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (i, j): recompute logits tile (i, j), form dL/dz, accumulate both gradients.

    ``dL/dz_j = g_lp (1[j = y] - p_j) - g_ent p_j (log p_j + H)``, with ``z = W h / T``;
    grad_hidden += (dz / T) @ W_j and grad_weight_j += (dz / T).T @ h (both contiguous fp32).
    """
    tile_n = tl.program_id(0)
    tile_v = tl.program_id(1)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_tokens
    col_ok = cols < vocab_size
    z = _logits_tile(
        hidden_ptr, weight_ptr, rows, cols, n_tokens, vocab_size, hidden_size,
        stride_hn, stride_hd, stride_wv, stride_wd, BLOCK_N, BLOCK_V, BLOCK_D,
    ) * inv_temperature
    grad_z = grad_logits_tile(
        z, rows, cols, row_ok, targets_ptr, lse_ptr, entropy_ptr, grad_lp_ptr, grad_ent_ptr, WITH_ENTROPY_GRAD,
    )
    grad_z = tl.where(row_ok[:, None] & col_ok[None, :], grad_z, 0.0) * inv_temperature

    offs_d = tl.arange(0, BLOCK_D)
    for d_start in range(0, hidden_size, BLOCK_D):
        dims = d_start + offs_d
        dim_ok = dims < hidden_size
        if NEED_HIDDEN_GRAD:
            w = tl.load(
                weight_ptr + cols[:, None] * stride_wv + dims[None, :] * stride_wd,
                mask=col_ok[:, None] & dim_ok[None, :], other=0.0,
            ).to(tl.float32)  # (BLOCK_V, BLOCK_D)
            grad_h = tl.dot(grad_z, w, input_precision="ieee")  # (BLOCK_N, BLOCK_D)
            tl.atomic_add(
                grad_hidden_ptr + rows[:, None] * hidden_size + dims[None, :], grad_h,
                mask=row_ok[:, None] & dim_ok[None, :],
            )
        if NEED_WEIGHT_GRAD:
            h = tl.load(
                hidden_ptr + rows[:, None] * stride_hn + dims[None, :] * stride_hd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
            ).to(tl.float32)  # (BLOCK_N, BLOCK_D)
            grad_w = tl.dot(tl.trans(grad_z), h, input_precision="ieee")  # (BLOCK_V, BLOCK_D)
            tl.atomic_add(
                grad_weight_ptr + cols[:, None] * hidden_size + dims[None, :], grad_w,
                mask=col_ok[:, None] & dim_ok[None, :],
            )


# Tile sizes. On an H100, (128, 128, 32) with 8 warps measured best among the 9 tried (see
# benchmarks/README.md); the tests pass smaller ones to cover tile edges at tiny sizes.
BLOCK_N, BLOCK_V, BLOCK_D, NUM_WARPS = 128, 128, 32, 8


def _forward_stats(hidden, weight, inv_temperature, with_entropy, block_n, block_v, block_d, num_warps):
    """Launch the forward kernel; return merged (lse, entropy-or-None), (N,) fp32 each."""
    n_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    n_tiles_n = triton.cdiv(n_tokens, block_n)
    tiles_per_part, n_parts = vocab_shares(n_tiles_n, triton.cdiv(vocab_size, block_v), hidden.device)
    part_max = torch.empty((n_tokens, n_parts), dtype=torch.float32, device=hidden.device)
    part_sum = torch.empty_like(part_max)
    part_shift = torch.empty_like(part_max) if with_entropy else part_max  # unused without entropy
    _logprobs_forward_kernel[(n_tiles_n, n_parts)](
        hidden, weight, part_max, part_sum, part_shift,
        n_tokens, vocab_size, hidden_size,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        n_parts, tiles_per_part, inv_temperature,
        WITH_ENTROPY=with_entropy, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    # merge the shares (each column of the buffers) exactly as the torch path merges blocks
    global_max = part_max.amax(dim=1, keepdim=True)  # (N, 1)
    scale = torch.exp(part_max - global_max)  # (N, n_parts)
    sum_exp = (scale * part_sum).sum(dim=1)
    sum_shift = None
    if with_entropy:
        sum_shift = (scale * (part_shift + (part_max - global_max) * part_sum)).sum(dim=1)
    return finish_softmax_stats((global_max.squeeze(1), sum_exp, sum_shift))


class TritonTokenLogprobs(torch.autograd.Function):
    """Same contract as `logprobs.FusedTokenLogprobs`, with Triton kernels. fp32 outputs."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temperature, with_entropy, block_n, block_v, block_d, num_warps):
        n_tokens = hidden.shape[0]
        lse = hidden.new_zeros(n_tokens, dtype=torch.float32)
        entropy = hidden.new_zeros(n_tokens if with_entropy else 0, dtype=torch.float32)
        if n_tokens:
            lse, block_entropy = _forward_stats(
                hidden, weight, inv_temperature, with_entropy, block_n, block_v, block_d, num_warps
            )
            if with_entropy:
                entropy = block_entropy
        # the target logit: one dot product per token, in fp32
        target_logits = (hidden.float() * weight.index_select(0, targets).float()).sum(dim=1)
        logprobs = target_logits * inv_temperature - lse

        save_logprobs_context(ctx, hidden, weight, targets, lse, entropy, inv_temperature, with_entropy)
        ctx.blocks = (block_n, block_v, block_d, num_warps)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_tokens, hidden_size = hidden.shape
        vocab_size = weight.shape[0]
        block_n, block_v, block_d, num_warps = ctx.blocks
        if grad_logprobs is None:
            grad_logprobs = lse.new_zeros(n_tokens)
        use_entropy_grad = ctx.with_entropy and grad_entropy is not None
        grad_logprobs = grad_logprobs.float().contiguous()
        grad_entropy = grad_entropy.float().contiguous() if use_entropy_grad else grad_logprobs
        # fp32 accumulators: atomics add into them, then they are cast to the inputs' dtypes
        grad_hidden = torch.zeros((n_tokens, hidden_size), dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros((vocab_size, hidden_size), dtype=torch.float32, device=hidden.device)
        if n_tokens and (need_hidden_grad or need_weight_grad):
            grid = (triton.cdiv(n_tokens, block_n), triton.cdiv(vocab_size, block_v))
            _logprobs_backward_kernel[grid](
                hidden, weight, targets, lse, entropy if use_entropy_grad else lse,
                grad_logprobs, grad_entropy, grad_hidden, grad_weight,
                n_tokens, vocab_size, hidden_size,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                ctx.inv_temperature,
                WITH_ENTROPY_GRAD=use_entropy_grad,
                NEED_HIDDEN_GRAD=need_hidden_grad, NEED_WEIGHT_GRAD=need_weight_grad,
                BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=num_warps,
            )
        return (
            grad_hidden.to(hidden.dtype) if need_hidden_grad else None,
            grad_weight.to(weight.dtype) if need_weight_grad else None,
            None, None, None, None, None, None, None,
        )


def triton_token_logprobs_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    inv_temperature: float,
    with_entropy: bool,
    block_n: int = BLOCK_N,
    block_v: int = BLOCK_V,
    block_d: int = BLOCK_D,
    num_warps: int = NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path on compacted rows: (N, d), (V, d), (N,) -> (logprobs, entropy), fp32.

    Block sizes must be powers of two >= 16 (``tl.dot``'s minimum).
    """
    refuse_float64(hidden, weight)
    return TritonTokenLogprobs.apply(
        hidden, weight, targets.contiguous(), float(inv_temperature), with_entropy,
        block_n, block_v, block_d, num_warps,
    )


# ------------------------------------------------------------------------------------------------
# GAE.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _first_order_combine(coef_left, x_left, coef_right, x_right):
    """Compose two steps of ``a = x + coef * a_prev`` (left = earlier in the scan order)."""
    return coef_left * coef_right, x_right + coef_right * x_left


@triton.jit
def _gae_kernel(
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr,
    n_steps, gamma, gamma_lam,
    BLOCK_T: tl.constexpr,
):
    """Program b: GAE for row b of contiguous (B, T) inputs, walking time backwards in tiles.

    Each tile is loaded in REVERSED time order (index k <-> t = end - k), which turns the
    backward recurrence ``A_t = x_t + c_t A_{t+1}`` into a forward one that
    ``tl.associative_scan`` solves; ``carry`` is A at the first step of the tile after it.
    """
    row = tl.program_id(0)
    base = row.to(tl.int64) * n_steps
    k = tl.arange(0, BLOCK_T)
    carry = 0.0
    for tile in range(0, tl.cdiv(n_steps, BLOCK_T)):
        tile_end = n_steps - 1 - tile * BLOCK_T  # the last (first visited) step of this tile
        t = tile_end - k  # (BLOCK_T,) reversed times; t < 0 past the row's start
        in_row = t >= 0
        next_in_row = (t + 1 < n_steps) & in_row
        valid = tl.load(mask_ptr + base + t, mask=in_row, other=0) != 0
        next_valid = tl.load(mask_ptr + base + t + 1, mask=next_in_row, other=0) != 0
        # padded rewards/values may hold anything (NaN too): select, never multiply by the mask
        reward = tl.where(valid, tl.load(rewards_ptr + base + t, mask=in_row, other=0.0), 0.0)
        value = tl.where(valid, tl.load(values_ptr + base + t, mask=in_row, other=0.0), 0.0)
        next_value = tl.where(next_valid, tl.load(values_ptr + base + t + 1, mask=next_in_row, other=0.0), 0.0)
        delta = tl.where(valid, reward + gamma * next_value - value, 0.0)  # x_t
        coef = tl.where(valid & next_valid, gamma_lam, 0.0)  # c_t: no link across a gap or the end
        coef_prod, adv = tl.associative_scan((coef, delta), 0, _first_order_combine)
        # coef_prod[k] = c_t ... c_{tile_end}: how much of the carry reaches step t
        adv = adv + coef_prod * carry
        tl.store(adv_ptr + base + t, adv, mask=in_row)
        tl.store(ret_ptr + base + t, tl.where(valid, adv + value, 0.0), mask=in_row)
        carry = tl.sum(tl.where(k == BLOCK_T - 1, adv, 0.0), axis=0)  # A at the tile's first step


def triton_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    *,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE with the Triton kernel: (B, T) each -> (advantages, returns) in fp32, cast to values' dtype."""
    batch_size, n_steps = values.shape
    rewards32 = rewards.float().contiguous()
    values32 = values.float().contiguous()
    mask8 = (mask != 0).to(torch.int8).contiguous()
    advantages = torch.empty_like(values32)
    returns = torch.empty_like(values32)
    if block_t is None:
        block_t = min(1024, max(16, triton.next_power_of_2(n_steps)))
    if batch_size and n_steps:
        _gae_kernel[(batch_size,)](
            rewards32, values32, mask8, advantages, returns,
            n_steps, float(gamma), float(gamma * lam), BLOCK_T=block_t,
        )
    return advantages.to(values.dtype), returns.to(values.dtype)
