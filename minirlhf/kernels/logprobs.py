"""Per-token log-probabilities (and entropies) without ever holding the (N, V) logits.

Every RLHF stage needs ``log p(target_t | context)`` for each token: SFT's loss, the reward model's
sampling, and PPO four times per batch (policy, old policy, reference, entropy bonus). The obvious
way is ``log_softmax(hidden @ W.T / T).gather(targets)``; with GPT-2's vocabulary (V = 50257) and
2048 tokens the logits alone are 412 MB in fp32, and autograd keeps two more tensors that size.
But each token only needs two numbers from its row of logits: the target's logit and the row's
log-sum-exp. This file computes those in vocabulary blocks, so memory is one block, not V columns.

The maths, for one token with hidden state ``h`` (d,), LM-head weight ``W`` (V, d), temperature
``T``, scaled logits ``z = W h / T`` (V,) and target ``y``::

    lse       = log sum_j exp(z_j)                      (computed online, block by block)
    logprob   = z_y - lse
    entropy   = -sum_j p_j log p_j = lse - sum_j p_j z_j,      p = softmax(z)

    d logprob / d z_j = 1[j = y] - p_j
    d entropy / d z_j = -p_j (log p_j + entropy)
    dz/dh = W / T,    dz_j/dW_j = h / T

Online log-sum-exp (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"): keep,
per token, the running max ``m``, ``S = sum exp(z_j - m)`` and, for the entropy,
``U = sum exp(z_j - m) (z_j - m)``. Two partial results over disjoint vocab blocks merge exactly
(see `merge_softmax_stats`); at the end ``lse = m + log S`` and ``entropy = log S - U / S``.

Three paths behind `token_logprobs` (see `dispatch.py`): the reference (the oracle the tests use),
`FusedTokenLogprobs` (a custom autograd Function in plain torch: the CPU default), and the Triton
kernels in `triton_kernels.py` (CUDA).
"""

from __future__ import annotations

from typing import Callable

import torch

from minirlhf.kernels.dispatch import resolve_impl, triton_kernels

# CPU trap: exp() of an fp32 input below about -87 produces a denormal (or zero) and runs 10-30x
# slower than a normal exp. Real logits underflow a lot (a std-16 row spans ~130 nats), so every
# shifted logit is clamped to -80 first. exp(-80) = 1.8e-35 is far below fp32/fp64 rounding of a
# sum that contains at least one term equal to 1, so the results don't change.
EXP_CLAMP = -80.0

# Fused path defaults. A (token_block x vocab_block) fp32 block of logits is 2048 x 1024 x 4 B =
# 8 MB: small enough to stay in cache while it is max-ed, exp-ed and summed, big enough that the
# matmul producing it runs near peak. Chunking the vocabulary (all tokens of a block at once)
# measured faster on the CPU than chunking the tokens.
VOCAB_BLOCK = 1024
TOKEN_BLOCK = 4096


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 if any input is fp64: half-precision inputs are computed in fp32."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


# ------------------------------------------------------------------------------------------------
# Path 1: the reference (the oracle).
# ------------------------------------------------------------------------------------------------


def token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain ``log_softmax(hidden @ weight.T / temperature).gather(targets)``: holds all logits.

    Same arguments and results as `token_logprobs`. Obviously correct, memory-hungry: the tests
    compare every other path with this one, and the benchmarks measure what the others save.
    """
    # BEGIN SOLUTION
    dtype = compute_dtype(hidden, weight)
    logits = hidden.to(dtype) @ weight.to(dtype).T / temperature  # (..., V)
    log_probs = torch.log_softmax(logits, dim=-1)  # (..., V)
    valid = targets != ignore_index
    # gather needs an in-range index even where the target is ignored: use 0, then zero it out
    safe_targets = torch.where(valid, targets, 0)
    logprobs = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (...)
    logprobs = torch.where(valid, logprobs, 0.0)
    if not return_entropy:
        return logprobs
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)  # (...)
    return logprobs, torch.where(valid, entropy, 0.0)
    # END SOLUTION


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Log-probability of each target when the logits already exist.

    Args:
        logits: (..., V), any float dtype (computed in at least fp32).
        targets: (...) int64; ``logits[..., i, :]`` predicts ``targets[..., i]`` (the caller shifts).
        temperature: the logits are divided by it (PPO uses the sampling temperature).
        ignore_index: targets equal to it get logprob 0 and no gradient.

    Returns:
        (...) ``log_softmax(logits / temperature)[..., target]``, computed as
        ``z_target - logsumexp(z)``: unlike ``log_softmax(...).gather``, no second (..., V) tensor
        is made (the trick TRL's ``selective_log_softmax`` uses).
    """
    dtype = compute_dtype(logits)
    scaled = logits.to(dtype)
    if temperature != 1.0:
        scaled = scaled / temperature  # (..., V)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    target_logits = scaled.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (...)
    logprobs = target_logits - torch.logsumexp(scaled, dim=-1)
    return torch.where(valid, logprobs, 0.0)


# ------------------------------------------------------------------------------------------------
# Path 2: the fused torch path (CPU default).
# ------------------------------------------------------------------------------------------------

SoftmaxStats = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def block_softmax_stats(logits: torch.Tensor, with_entropy: bool) -> SoftmaxStats:
    """Softmax statistics of one block of logits, relative to the block's own row max.

    Args:
        logits: (n, c) scaled logits; OVERWRITTEN (used as scratch space to save memory).
        with_entropy: also return U (else None).

    Returns:
        ``(m, S, U)``, each (n,): ``m = max_j z_j``, ``S = sum_j exp(z_j - m)``,
        ``U = sum_j exp(z_j - m) (z_j - m)``.
    """
    block_max = logits.amax(dim=1)  # (n,)
    shifted = logits.sub_(block_max[:, None]).clamp_(min=EXP_CLAMP)  # (n, c), <= 0
    if not with_entropy:
        return block_max, shifted.exp_().sum(dim=1), None
    unnormalised_probs = torch.exp(shifted)  # (n, c)
    sum_exp = unnormalised_probs.sum(dim=1)
    sum_exp_shift = unnormalised_probs.mul_(shifted).sum(dim=1)
    return block_max, sum_exp, sum_exp_shift


def merge_softmax_stats(a: SoftmaxStats, b: SoftmaxStats) -> SoftmaxStats:
    """Merge the statistics of two disjoint sets of vocabulary columns (the online softmax step).

    Re-expressing stats kept relative to max ``m`` relative to the new max ``M >= m``::

        S_M = e^(m - M) S_m
        U_M = e^(m - M) (U_m + (m - M) S_m)      since (z - M) = (z - m) + (m - M)

    Both inputs must be finite (a real block), which is why the running stats start from the
    first block instead of from ``m = -inf`` (that would give ``-inf * 0 = nan`` in U).
    """
    max_a, sum_a, shift_a = a
    max_b, sum_b, shift_b = b
    new_max = torch.maximum(max_a, max_b)
    scale_a = torch.exp(max_a - new_max)
    scale_b = torch.exp(max_b - new_max)
    new_sum = scale_a * sum_a + scale_b * sum_b
    if shift_a is None or shift_b is None:
        return new_max, new_sum, None
    new_shift = scale_a * (shift_a + (max_a - new_max) * sum_a) + scale_b * (
        shift_b + (max_b - new_max) * sum_b
    )
    return new_max, new_sum, new_shift


def finish_softmax_stats(stats: SoftmaxStats) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(lse, entropy)`` from merged stats: ``lse = m + log S``, ``entropy = log S - U / S``."""
    row_max, sum_exp, sum_exp_shift = stats
    log_sum = torch.log(sum_exp)
    lse = row_max + log_sum
    entropy = None if sum_exp_shift is None else log_sum - sum_exp_shift / sum_exp
    return lse, entropy


def save_logprobs_context(ctx, hidden, weight, targets, lse, entropy, inv_temperature, with_entropy) -> None:
    """The end of every token-logprobs Function's forward (this one and the Triton ones): keep what
    backward needs; an unused output's gradient arrives as None; no gradient for an unrequested entropy."""
    ctx.save_for_backward(hidden, weight, targets, lse, entropy)
    ctx.inv_temperature, ctx.with_entropy = inv_temperature, with_entropy
    ctx.set_materialize_grads(False)
    if not with_entropy:
        ctx.mark_non_differentiable(entropy)


class FusedTokenLogprobs(torch.autograd.Function):
    """Chunked LM head + log-softmax + gather, with a backward that recomputes the chunks.

    Inputs are already compacted (only tokens whose target is not ignored) and flattened:
    ``hidden`` (N, d), ``weight`` (V, d), ``targets`` (N,) in [0, V), all in the compute dtype.
    Outputs ``(logprobs, entropy)`` (N,) each; ``entropy`` is empty unless ``with_entropy``.

    Saved for backward: the scaled hidden states (N, d), the weight (a reference, not a copy),
    targets, lse (N,) and entropy (N,). Never anything of size N x V.

    Gradients: any upstream gradient for logprobs (a tensor (N,), not only a scalar loss's), and
    for the entropy when it was requested. They flow to ``hidden`` and ``weight``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temperature, with_entropy, vocab_block, token_block):
        n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
        # z = (h / T) @ W.T: scaling the (N, d) hidden states once is cheaper than the (N, V) logits
        scaled_hidden = hidden if inv_temperature == 1.0 else hidden * inv_temperature  # (N, d)
        lse = hidden.new_empty(n_tokens)
        entropy = hidden.new_empty(n_tokens if with_entropy else 0)
        for row_start in range(0, n_tokens, token_block):
            rows = slice(row_start, row_start + token_block)
            stats = None
            for col_start in range(0, vocab_size, vocab_block):
                weight_block = weight[col_start : col_start + vocab_block]  # (c, d) view
                logits = scaled_hidden[rows] @ weight_block.T  # (n, c), the only big temporary
                block_stats = block_softmax_stats(logits, with_entropy)
                stats = block_stats if stats is None else merge_softmax_stats(stats, block_stats)
            if stats is None:  # V == 0 can't happen (checked by the caller); keeps type checkers calm
                raise ValueError("empty vocabulary")
            block_lse, block_entropy = finish_softmax_stats(stats)
            lse[rows] = block_lse
            if with_entropy:
                entropy[rows] = block_entropy
        # the target logit is one dot product per token: (N, d) * (N, d) -> (N,)
        target_logits = (scaled_hidden * weight.index_select(0, targets)).sum(dim=1)
        logprobs = target_logits - lse

        save_logprobs_context(ctx, scaled_hidden, weight, targets, lse, entropy, inv_temperature, with_entropy)
        ctx.vocab_block, ctx.token_block = vocab_block, token_block
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        scaled_hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_tokens, vocab_size = scaled_hidden.shape[0], weight.shape[0]
        if grad_logprobs is None:  # only the entropy was used downstream
            grad_logprobs = lse.new_zeros(n_tokens)
        use_entropy_grad = ctx.with_entropy and grad_entropy is not None

        # Gradients w.r.t. the scaled hidden states and the weight; dz/d(scaled h) = W, dz/dW = h/T
        grad_scaled_hidden = torch.zeros_like(scaled_hidden) if need_hidden_grad else None
        grad_weight = weight.new_zeros(weight.shape) if need_weight_grad else None  # contiguous
        for row_start in range(0, n_tokens, ctx.token_block):
            rows = slice(row_start, row_start + ctx.token_block)
            hidden_rows = scaled_hidden[rows]  # (n, d)
            lse_rows = lse[rows, None]  # (n, 1)
            grad_lp_rows = grad_logprobs[rows, None]  # (n, 1)
            for col_start in range(0, vocab_size, ctx.vocab_block):
                cols = slice(col_start, col_start + ctx.vocab_block)
                weight_block = weight[cols]  # (c, d)
                # recompute this block of logits, turn it into log p in place: (n, c)
                log_probs = torch.mm(hidden_rows, weight_block.T).sub_(lse_rows).clamp_(min=EXP_CLAMP)
                if use_entropy_grad:
                    # dL/dz_j = -p_j * (g_lp + g_ent * (log p_j + H))   (the one-hot part comes later)
                    probs = torch.exp(log_probs)
                    grad_logits = (
                        log_probs.add_(entropy[rows, None])
                        .mul_(grad_entropy[rows, None])
                        .add_(grad_lp_rows)
                        .mul_(probs)
                        .neg_()
                    )
                else:
                    # dL/dz_j = -p_j * g_lp
                    grad_logits = log_probs.exp_().mul_(-grad_lp_rows)
                if need_hidden_grad:
                    grad_scaled_hidden[rows].addmm_(grad_logits, weight_block)  # (n, d)
                if need_weight_grad:
                    grad_weight[cols].addmm_(grad_logits.T, hidden_rows)  # (c, d)
        # The one-hot part, +g_lp at each token's target column, without an (N, V) one-hot matrix.
        grad_logprobs_col = grad_logprobs[:, None]  # (N, 1)
        grad_hidden = None
        if need_hidden_grad:
            grad_scaled_hidden.add_(grad_logprobs_col * weight.index_select(0, targets))
            grad_hidden = grad_scaled_hidden.mul_(ctx.inv_temperature)  # chain rule through h / T
        if need_weight_grad:
            grad_weight.index_add_(0, targets, grad_logprobs_col * scaled_hidden)
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_token_logprobs_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    inv_temperature: float,
    with_entropy: bool,
    vocab_block: int = VOCAB_BLOCK,
    token_block: int = TOKEN_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused torch path on compacted rows: (N, d), (V, d), (N,) -> (logprobs, entropy)."""
    dtype = compute_dtype(hidden, weight)
    return FusedTokenLogprobs.apply(
        hidden.to(dtype), weight.to(dtype), targets, inv_temperature, with_entropy, vocab_block, token_block
    )


# ------------------------------------------------------------------------------------------------
# The public function.
# ------------------------------------------------------------------------------------------------


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    impl: str | None = None,
    vocab_block: int = VOCAB_BLOCK,
    token_block: int = TOKEN_BLOCK,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused LM head + ``log_softmax(logits / temperature)`` + gather, per token.

    Equal to ``log_softmax(hidden @ weight.T / temperature, -1).gather(-1, targets[..., None])``
    without holding the (N, V) logits: vocabulary blocks, online log-sum-exp, and a backward pass
    that recomputes each block (memory O(N·block + V·d) instead of O(N·V)).

    Args:
        hidden: (..., d) final hidden states (after the last LayerNorm); any layout (non-contiguous
            is fine). Convention: the hidden state at position ``prompt_len - 1 + t`` predicts
            response token ``t`` (the caller shifts: ``targets[..., i]`` is the token after
            ``hidden[..., i, :]``).
        weight: (V, d) LM-head weight (the tied token embedding).
        targets: (...) int64, same leading shape as ``hidden``; values in [0, V) or ``ignore_index``.
        temperature: logits are divided by it. PPO uses the sampling temperature for the policy,
            the old policy and the reference alike.
        return_entropy: also return the entropy of each position's temperature-scaled distribution.
        ignore_index: targets equal to it give logprob 0 and entropy 0, and no gradient; these
            positions are dropped before any compute (prompt and padding tokens cost nothing).
        impl: None (the default set by `set_kernel_impl`), "auto", "reference", "fused", "triton",
            or "triton_tiled" (opt-in: the tensor-core kernel of `triton_tiled.py`, speed unmeasured).
        vocab_block, token_block: block sizes of the fused torch path (columns of V, rows of N).

    Returns:
        ``logprobs`` (...) with ``targets``'s shape, or ``(logprobs, entropy)``; fp32 (fp64 if an
        input is fp64), whatever the input dtype.

    Gradients flow to ``hidden`` and ``weight`` from any upstream gradient of ``logprobs`` (per
    token, not only a scalar loss) and of ``entropy`` (e.g. PPO's entropy bonus), on every path.
    Precision: fused torch matches the reference to ~1e-6 in fp32; Triton computes in fp32 with
    TF32 off (to ~1e-5). bf16 hidden states or weights are computed in fp32, and autocast is
    switched off inside: a bf16 LM head would round every logit to ~3 significant digits.
    "triton_tiled" multiplies bf16 inputs as bf16 on the tensor cores (exact products, fp32
    sums: fp32 logprobs as accurate as the fp32 paths' on the same bf16 values; bf16 gradients),
    and fp32 inputs with 3xTF32 (about fp32's accuracy).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be targets {tuple(targets.shape)} + (d,)"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be (V, d={hidden.shape[-1]}), got {tuple(weight.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    with torch.autocast(hidden.device.type, enabled=False):   # the LM head in fp32, even under autocast
        return _token_logprobs(hidden, weight, targets, temperature, return_entropy, ignore_index, impl,
                               vocab_block, token_block)


def _token_logprobs(hidden, weight, targets, temperature, return_entropy, ignore_index, impl, vocab_block,
                    token_block):
    path = resolve_impl(impl, hidden)
    if path == "reference":
        return token_logprobs_reference(
            hidden, weight, targets, temperature=temperature,
            return_entropy=return_entropy, ignore_index=ignore_index,
        )
    if path == "fused":
        def rows_fn(h, w, t):
            return fused_token_logprobs_rows(
                h, w, t, inv_temperature=1.0 / temperature, with_entropy=return_entropy,
                vocab_block=vocab_block, token_block=token_block,
            )
    elif path == "triton":
        def rows_fn(h, w, t):
            return triton_kernels().triton_token_logprobs_rows(
                h, w, t, inv_temperature=1.0 / temperature, with_entropy=return_entropy
            )
    else:  # "triton_tiled": opt-in, its speed unmeasured (see triton_tiled.py)
        def rows_fn(h, w, t):
            return triton_kernels().triton_tiled_token_logprobs_rows(
                h, w, t, inv_temperature=1.0 / temperature, with_entropy=return_entropy
            )
    logprobs, entropy = _on_valid_rows(rows_fn, hidden, weight, targets, ignore_index, return_entropy)
    return (logprobs, entropy) if return_entropy else logprobs


def _on_valid_rows(
    rows_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flatten, keep only tokens whose target isn't ignored, run ``rows_fn``, scatter back.

    Ignored tokens get logprob 0 and entropy 0; ``index_copy`` routes no gradient to them.
    """
    out_shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, d); copies only if it must
    flat_targets = targets.reshape(-1)  # (N,)
    valid = flat_targets != ignore_index
    n_valid = int(valid.sum())
    all_valid = n_valid == flat_targets.numel()
    if all_valid:
        rows_hidden, rows_targets = flat_hidden, flat_targets
    else:
        row_index = valid.nonzero().squeeze(1)  # (n_valid,)
        rows_hidden = flat_hidden.index_select(0, row_index)
        rows_targets = flat_targets.index_select(0, row_index)
    if n_valid and (int(rows_targets.min()) < 0 or int(rows_targets.max()) >= weight.shape[0]):
        raise ValueError(
            f"targets must be in [0, {weight.shape[0]}) or ignore_index={ignore_index}; got "
            f"values in [{int(rows_targets.min())}, {int(rows_targets.max())}]"
        )
    logprobs, entropy = rows_fn(rows_hidden, weight, rows_targets)
    if not all_valid:
        logprobs = logprobs.new_zeros(flat_targets.numel()).index_copy(0, row_index, logprobs)
        if with_entropy:
            entropy = entropy.new_zeros(flat_targets.numel()).index_copy(0, row_index, entropy)
    return logprobs.view(out_shape), (entropy.view(out_shape) if with_entropy else None)
