"""What both Triton token-logprobs kernels share (`triton_kernels.py` and `triton_tiled.py`).

Imports Triton at the top: like those two modules, it is only ever imported through
`dispatch.triton_kernels()`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def grad_logits_tile(
    z, rows, cols, row_ok, targets_ptr, lse_ptr, entropy_ptr, grad_lp_ptr, grad_ent_ptr,
    WITH_ENTROPY_GRAD: tl.constexpr,
):
    """``dL/dz = g_lp (1[j = y] - p_j) - g_ent p_j (log p_j + H)`` for an fp32 tile ``z`` of scaled
    logits (``rows`` x ``cols``), before the chain rule's 1/T; rows past the end read zeros."""
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    grad_lp = tl.load(grad_lp_ptr + rows, mask=row_ok, other=0.0)
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    log_probs = z - lse[:, None]
    probs = tl.exp(log_probs)
    coef = grad_lp[:, None]
    if WITH_ENTROPY_GRAD:
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        grad_ent = tl.load(grad_ent_ptr + rows, mask=row_ok, other=0.0)
        coef = coef + grad_ent[:, None] * (log_probs + entropy[:, None])
    one_hot = tl.where(cols[None, :] == targets[:, None], grad_lp[:, None], 0.0)
    return one_hot - probs * coef


def n_sms(device: torch.device) -> int:
    """Streaming multiprocessors, to size the grids (4 for the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def vocab_shares(n_tiles_n: int, n_tiles_v: int, device: torch.device, max_parts: int | None = None) -> tuple[int, int]:
    """How the forward splits the vocabulary tiles: ``(tiles_per_part, n_parts)``.

    Enough shares (at most ``max_parts``) for a few programs per SM; every share gets at least one
    real tile.
    """
    want_parts = min(n_tiles_v, (4 * n_sms(device)) // n_tiles_n)
    if max_parts is not None:
        want_parts = min(want_parts, max_parts)
    tiles_per_part = triton.cdiv(n_tiles_v, max(1, want_parts))
    return tiles_per_part, triton.cdiv(n_tiles_v, tiles_per_part)


def refuse_float64(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """The Triton kernels compute in fp32: a float64 input is an error, not a silent downcast."""
    if hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        raise TypeError("the Triton paths compute in fp32; use impl='fused' for float64 inputs")
