"""Token logprobs on the tensor cores: logits tiles kept on chip, a chunked backward without atomics.

Opt-in: ``token_logprobs(..., impl="triton_tiled")`` (or ``set_kernel_impl("triton_tiled")``).
``"auto"`` keeps the kernels of `triton_kernels.py`: THE SPEED OF THIS KERNEL HAS NOT BEEN MEASURED.
It was written and tested on a CPU, in Triton's interpreter; `benchmarks/bench_logprobs.py` measures
it against plain PyTorch on a GPU. docs/kernels.md has the design notes.

Why the first Triton kernel (`triton_kernels.py`) is slow on an H100/H200 (0.40x plain PyTorch,
forward+backward, 2048 tokens, d 256, V 50257, fp32):

1. its matmuls run on the CUDA cores. It converts every tile to fp32 and asks ``tl.dot`` for IEEE
   fp32 products, which an H100 computes at ~60 TFLOP/s peak (~20 measured) instead of the tensor
   cores' ~990 (bf16) or ~490 (TF32);
2. its backward adds each (token tile x vocabulary tile)'s share of grad_hidden and grad_weight to
   memory with fp32 atomics: N V d (1/BLOCK_N + 1/BLOCK_V) atomic adds, 0.4 G at that shape and
   10 G at 16,384 tokens and d 768. They also make the last bits change from run to run.

What this kernel does instead (``z = hidden @ weight.T / T``; shapes: hidden (N, d), weight (V, d)):

- **Tensor cores.** ``tl.dot`` gets the inputs' own dtype: bf16/fp16 tiles go to the tensor cores
  as they are (a product of two bf16 numbers is exact in fp32, and the accumulators are fp32);
  fp32 tiles use ``input_precision="tf32x3"`` (each fp32 operand split into a TF32 head and a TF32
  tail, three tensor-core products: about fp32's accuracy, on the tensor cores instead of the
  CUDA cores). All the softmax arithmetic is fp32; the logprobs and entropies come out fp32.
- **Forward: one pass over the vocabulary.** Program (i, s) computes token tile i's logits tile by
  tile over its share s of the vocabulary, in registers, and keeps an online softmax: the running
  max, the sum of exponentials, the entropy's sum (as in `logprobs.py`) and the target's logit
  (picked out of the tile it falls in). A second small kernel merges the shares: log-sum-exp,
  logprob = target logit - lse, entropy. Nothing of size N x V is ever written. The token tile is
  ``program_id(0)``, the index that changes fastest in launch order: programs running at the same
  time read the same vocabulary tiles of the weight, from L2.
- **Backward: the vocabulary in chunks, two launches per chunk, no atomics.** For each chunk of
  ``vocab_chunk`` columns (about V/32):
    1. `_grad_logits_kernel` recomputes the chunk's logits tile by tile (tensor cores) and writes
       only ``dL/dz`` for it, an (N, chunk) buffer in the dot dtype: 1/32 of the logits;
    2. `_grads_kernel` is one launch of two tiled matmuls: ``grad_hidden += dz @ W[chunk]``
       (fp32, accumulated over the chunks) and ``grad_weight[chunk] = dz.T @ hidden``, whose rows
       are complete after this one chunk, so they are written once, straight in the weight's dtype.
  Why not atomics (CCE's choice) or accumulators kept on chip? A program that owns a (tokens x d)
  or (vocab x d) accumulator across the whole other dimension needs BLOCK x d fp32 registers:
  ~200 KB at d 768, more than a streaming multiprocessor has. So the sums over the other
  dimension must leave the chip. Counting bytes (not measured): at d 768 in bf16, dz is written
  once (2 bytes per logit) and read by the two matmuls d/128 times each (24 bytes, mostly from
  L2), against 12 atomic read-modify-writes of 4 bytes per logit (96). The sums run in a fixed
  order, so the results are the same bits on every run. The price: one more pass over the logits
  than plain PyTorch (4 matmuls for forward+backward instead of 3), because the upstream gradient
  is not known in the forward pass (Liger-Kernel computes the gradient in the forward, which works
  for a scalar loss but not for per-token logprobs with any upstream gradient).

Memory, forward+backward, on top of the inputs: grad_weight (V x d, the weight's dtype), grad_hidden
(N x d fp32 + the result), one dz chunk (N x ~V/32), and O(N) statistics. Plain PyTorch holds about
three (N x V) tensors.

Tiles, warps, stages and the chunk size are educated guesses for an H100 (Triton's matmul tutorial
sizes); they have not been tuned on a GPU. `TileSizes` holds them; the tests pass small ones.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from minirlhf.kernels.dispatch import triton_interpreter_enabled
from minirlhf.kernels.logprobs import save_logprobs_context
from minirlhf.kernels.triton_common import grad_logits_tile, n_sms, refuse_float64, vocab_shares

# ------------------------------------------------------------------------------------------------
# Shared pieces.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, rows, cols, n_tokens, vocab_end, hidden_size,
    stride_hn, stride_hd, stride_wv, stride_wd, inv_temperature,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """(BLOCK_N, BLOCK_V) fp32 tile ``hidden[rows] @ weight[cols].T * inv_temperature``.

    Rows past ``n_tokens`` and columns past ``vocab_end`` load zeros (their entries are 0).
    ``UPCAST``: convert the tiles to fp32 before ``tl.dot`` (fp32 or mixed inputs, and the
    interpreter, whose bf16 ``tl.dot`` is wrong); otherwise bf16/fp16 tiles go to the tensor cores.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_tokens
    col_ok = cols < vocab_end
    for d_start in range(0, hidden_size, BLOCK_D):
        dims = d_start + offs_d
        dim_ok = dims < hidden_size
        h = tl.load(
            hidden_ptr + rows[:, None] * stride_hn + dims[None, :] * stride_hd,
            mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        w = tl.load(
            weight_ptr + cols[:, None] * stride_wv + dims[None, :] * stride_wd,
            mask=col_ok[:, None] & dim_ok[None, :], other=0.0,
        )  # (BLOCK_V, BLOCK_D)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc * inv_temperature


# ------------------------------------------------------------------------------------------------
# Forward: per-share online softmax, then a merge.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    hidden_ptr, weight_ptr, targets_ptr,
    part_max_ptr, part_sum_ptr, part_shift_ptr, part_target_ptr,
    n_tokens, vocab_size, hidden_size,
    stride_hn, stride_hd, stride_wv, stride_wd,
    inv_temperature, tiles_per_part,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (i, s): softmax statistics of token tile i over the vocabulary tiles of share s.

    Writes to row s of the (n_parts, N) buffers, per token: ``m`` (max scaled logit), ``S = sum
    exp(z - m)``, ``U = sum exp(z - m) (z - m)`` (entropy only) and the target's logit if the target
    is in this share (else 0).
    """
    tile_n = tl.program_id(0)  # fastest in launch order: neighbours share vocabulary tiles (L2)
    part = tl.program_id(1)
    rows = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: N x V can pass 2^31
    row_ok = rows < n_tokens
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_shift = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_tile = part * tiles_per_part
    last_tile = tl.minimum(first_tile + tiles_per_part, tl.cdiv(vocab_size, BLOCK_V))
    for tile_v in range(first_tile, last_tile):  # every tile here has at least one real column
        cols = (tile_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < vocab_size
        z = _logits_tile(
            hidden_ptr, weight_ptr, rows, cols, n_tokens, vocab_size, hidden_size,
            stride_hn, stride_hd, stride_wv, stride_wd, inv_temperature,
            BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
        )  # (BLOCK_N, BLOCK_V) fp32, on chip only
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))  # finite: the tile has a real column
        rescale = tl.exp(run_max - new_max)  # e^(m - M); 0 at the first tile (m = -inf)
        shifted = tl.where(col_ok[None, :], z - new_max[:, None], 0.0)  # z - M <= 0
        probs = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)  # unnormalised softmax
        if WITH_ENTROPY:
            # U relative to the new max: e^(m - M) (U + (m - M) S) (see logprobs.merge_softmax_stats);
            # before the first tile S = 0 and m - M = -inf: use 0 for m - M, never -inf * 0 = nan
            max_shift = tl.where(run_sum > 0, run_max - new_max, 0.0)
            run_shift = rescale * (run_shift + max_shift * run_sum) + tl.sum(probs * shifted, axis=1)
        run_sum = rescale * run_sum + tl.sum(probs, axis=1)
        run_max = new_max
    out = part * n_tokens + rows
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
    tl.store(part_target_ptr + out, target_logit, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(part_shift_ptr + out, run_shift, mask=row_ok)


@triton.jit
def _merge_kernel(
    part_max_ptr, part_sum_ptr, part_shift_ptr, part_target_ptr,
    logprobs_ptr, lse_ptr, entropy_ptr,
    n_tokens, n_parts,
    WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_PARTS: tl.constexpr,
):
    """Merge the shares of each token: ``lse = M + log sum_s e^(m_s - M) S_s`` and the rest."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    parts = tl.arange(0, BLOCK_PARTS)
    row_ok = rows < n_tokens
    ok = row_ok[:, None] & (parts < n_parts)[None, :]
    offsets = parts[None, :] * n_tokens + rows[:, None]  # (BLOCK_N, BLOCK_PARTS)
    part_max = tl.load(part_max_ptr + offsets, mask=ok, other=float("-inf"))
    part_sum = tl.load(part_sum_ptr + offsets, mask=ok, other=0.0)
    global_max = tl.where(row_ok, tl.max(part_max, axis=1), 0.0)  # padding rows: keep finite
    scale = tl.exp(part_max - global_max[:, None])  # 0 for missing shares
    sum_exp = tl.where(row_ok, tl.sum(scale * part_sum, axis=1), 1.0)  # >= 1 for real rows
    log_sum = tl.log(sum_exp)
    lse = global_max + log_sum
    target_logit = tl.sum(tl.load(part_target_ptr + offsets, mask=ok, other=0.0), axis=1)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logprobs_ptr + rows, target_logit - lse, mask=row_ok)
    if WITH_ENTROPY:
        part_shift = tl.load(part_shift_ptr + offsets, mask=ok, other=0.0)
        max_shift = tl.where(ok, part_max - global_max[:, None], 0.0)  # missing shares: not -inf
        shift = tl.sum(scale * (part_shift + max_shift * part_sum), axis=1)
        tl.store(entropy_ptr + rows, log_sum - shift / sum_exp, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# Backward: dL/dz for one vocabulary chunk, then both gradient matmuls in one launch.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _grad_logits_kernel(
    hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_lp_ptr, grad_ent_ptr,
    grad_logits_ptr,
    n_tokens, vocab_size, hidden_size, chunk_start, chunk_stride,
    stride_hn, stride_hd, stride_wv, stride_wd,
    inv_temperature,
    WITH_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (i, j): recompute logits tile (i, j) of the chunk and write its ``dL/d(h W^T)``.

    ``dL/dz_j = g_lp (1[j = y] - p_j) - g_ent p_j (log p_j + H)`` with ``z = h W^T / T``, times 1/T
    for the chain rule; written to ``grad_logits[rows, cols - chunk_start]`` (row stride
    ``chunk_stride``) in the buffer's dtype.
    """
    tile_n = tl.program_id(0)
    tile_v = tl.program_id(1)
    rows = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    local_cols = (tile_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)  # column within the chunk
    cols = chunk_start + local_cols
    row_ok = rows < n_tokens
    col_ok = cols < vocab_size
    z = _logits_tile(
        hidden_ptr, weight_ptr, rows, cols, n_tokens, vocab_size, hidden_size,
        stride_hn, stride_hd, stride_wv, stride_wd, inv_temperature,
        BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION,
    )
    grad_z = grad_logits_tile(
        z, rows, cols, row_ok, targets_ptr, lse_ptr, entropy_ptr, grad_lp_ptr, grad_ent_ptr, WITH_ENTROPY_GRAD,
    ) * inv_temperature
    tl.store(
        grad_logits_ptr + rows[:, None] * chunk_stride + local_cols[None, :],
        grad_z.to(grad_logits_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _matmul_tile(
    a_ptr, b_ptr, c_ptr, tile_m, tile_n, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of ``C = A @ B`` (``C += A @ B`` if ACCUMULATE), fp32 accumulator."""
    rm = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = (k_start + offs_k).to(tl.int64)
        a = tl.load(
            a_ptr + rm[:, None] * stride_am + ks[None, :] * stride_ak,
            mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        b = tl.load(
            b_ptr + ks[:, None] * stride_bk + rn[None, :] * stride_bn,
            mask=(ks[:, None] < K) & (rn[None, :] < N), other=0.0,
        )  # (BLOCK_K, BLOCK_N)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _grads_kernel(
    grad_logits_ptr, hidden_ptr, weight_ptr, grad_hidden_ptr, grad_weight_ptr,
    n_tokens, chunk_width, hidden_size, chunk_start, chunk_stride,
    stride_hn, stride_hd, stride_wv, stride_wd,
    n_programs_hidden,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Both gradients of one vocabulary chunk (``dz``: (N, c), c = ``chunk_width``), one launch.

    Programs ``[0, n_programs_hidden)``: a tile of ``grad_hidden (N, d) += dz @ W[chunk] (c, d)``
    (fp32, contiguous). The others: a tile of ``grad_weight[chunk] (c, d) = dz.T (c, N) @ h (N, d)``
    (contiguous, the weight's dtype), complete after this chunk, so written once. The d index
    changes fastest: programs launched together read the same rows of ``dz``.
    """
    pid = tl.program_id(0)
    n_tiles_d = tl.cdiv(hidden_size, BLOCK_N)
    if pid < n_programs_hidden:
        _matmul_tile(
            grad_logits_ptr, weight_ptr + chunk_start * stride_wv, grad_hidden_ptr,
            pid // n_tiles_d, pid % n_tiles_d, n_tokens, hidden_size, chunk_width,
            chunk_stride, 1, stride_wv, stride_wd, hidden_size, 1,
            True, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
        )
    else:
        pid_w = pid - n_programs_hidden
        _matmul_tile(
            grad_logits_ptr, hidden_ptr, grad_weight_ptr + chunk_start * hidden_size,
            pid_w // n_tiles_d, pid_w % n_tiles_d, chunk_width, hidden_size, n_tokens,
            1, chunk_stride, stride_hn, stride_hd, hidden_size, 1,
            False, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
        )


# ------------------------------------------------------------------------------------------------
# Launch settings and the autograd Function.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileSizes:
    """Tiles and launch settings (block sizes: powers of two >= 16, ``tl.dot``'s minimum).

    Unmeasured guesses for an H100 (Triton's matmul tutorial sizes); see the module docstring.
    """

    block_n: int = 128  # tokens per logits tile
    block_v: int = 128  # vocabulary columns per logits tile
    block_d: int = 64  # hidden dims per step of a logits tile's inner loop (fp32: 32, half the bytes)
    gemm_m: int = 128  # the gradient matmuls' output tile rows (tokens or vocabulary rows)
    gemm_n: int = 128  # ... output tile columns (hidden dims)
    gemm_k: int = 64  # ... inner-loop step (fp32: 32)
    num_warps: int = 8
    num_stages: int = 3
    vocab_chunk: int = 0  # backward's vocabulary columns per chunk; 0: ~V/32, a multiple of block_v


VOCAB_CHUNKS = 32  # the backward's dz buffer is about 1/VOCAB_CHUNKS of the logits
MAX_PARTS = 64  # vocabulary shares of the forward (the merge kernel holds them in one tile)


def default_tiles(dot_dtype: torch.dtype) -> TileSizes:
    """The defaults: fp32 tiles take twice the bytes, so their inner step is halved."""
    if dot_dtype == torch.float32:
        return TileSizes(block_d=32, gemm_k=32)
    return TileSizes()


def _dot_settings(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, bool, str]:
    """``(dot_dtype, upcast, precision)``: what ``tl.dot`` multiplies, and how.

    Both inputs bf16 (or both fp16): that dtype, on the tensor cores (Triton picks them for 16-bit
    operands whatever ``input_precision`` says). Otherwise fp32 with ``"tf32x3"`` on NVIDIA GPUs
    (``"ieee"`` elsewhere). The interpreter multiplies in exact fp32 whatever it is told (and its
    bf16 ``tl.dot`` is wrong, so 16-bit tiles are upcast there: bf16 x bf16 products are exact in
    fp32, as on the tensor cores).
    """
    half = hidden.dtype == weight.dtype and hidden.dtype in (torch.bfloat16, torch.float16)
    dot_dtype = hidden.dtype if half else torch.float32
    interpreting = triton_interpreter_enabled()
    upcast = not half or interpreting
    nvidia = hidden.is_cuda and torch.version.hip is None and not interpreting
    precision = "tf32x3" if dot_dtype == torch.float32 and nvidia else "ieee"
    return dot_dtype, upcast, precision


def _forward(hidden, weight, targets, inv_temperature, with_entropy, tiles, upcast, precision):
    """Launch the forward and merge kernels: ``(logprobs, lse, entropy-or-empty)``, (N,) fp32."""
    n_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    device = hidden.device
    n_tiles_n = triton.cdiv(n_tokens, tiles.block_n)
    tiles_per_part, n_parts = vocab_shares(n_tiles_n, triton.cdiv(vocab_size, tiles.block_v), device, MAX_PARTS)
    part_max = torch.empty((n_parts, n_tokens), dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    part_target = torch.empty_like(part_max)
    part_shift = torch.empty_like(part_max) if with_entropy else part_max  # unused without entropy
    _forward_kernel[(n_tiles_n, n_parts)](
        hidden, weight, targets, part_max, part_sum, part_shift, part_target,
        n_tokens, vocab_size, hidden_size,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        inv_temperature, tiles_per_part,
        WITH_ENTROPY=with_entropy, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
        UPCAST=upcast, PRECISION=precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    logprobs = torch.empty(n_tokens, dtype=torch.float32, device=device)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty(n_tokens if with_entropy else 0, dtype=torch.float32, device=device)
    block_parts = max(2, triton.next_power_of_2(n_parts))
    block_rows = max(16, 4096 // block_parts)
    _merge_kernel[(triton.cdiv(n_tokens, block_rows),)](
        part_max, part_sum, part_shift, part_target, logprobs, lse, entropy if with_entropy else lse,
        n_tokens, n_parts,
        WITH_ENTROPY=with_entropy, BLOCK_N=block_rows, BLOCK_PARTS=block_parts,
    )
    return logprobs, lse, entropy


def _gemm_tiles(tiles: TileSizes, n_programs: int, n_sms: int) -> tuple[int, int, int]:
    """The gradient matmuls' tiles: halved (to 64 x 64) when the grid would not fill every SM once."""
    if n_programs >= n_sms:
        return tiles.gemm_m, tiles.gemm_n, tiles.num_warps
    return min(tiles.gemm_m, 64), min(tiles.gemm_n, 64), 4


def _backward(hidden, weight, targets, lse, entropy, grad_lp, grad_ent, inv_temperature,
              need_hidden, need_weight, tiles, dot_dtype, upcast, precision):
    """Gradients w.r.t. hidden (N, d) fp32 and weight (V, d) in its dtype, chunk by chunk."""
    n_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    device = hidden.device
    sm_count = n_sms(device)
    chunk = tiles.vocab_chunk or triton.cdiv(triton.cdiv(vocab_size, VOCAB_CHUNKS), tiles.block_v) * tiles.block_v
    chunk = min(chunk, triton.cdiv(vocab_size, tiles.block_v) * tiles.block_v)
    grad_logits = torch.empty((n_tokens, chunk), dtype=dot_dtype, device=device)  # dz of one chunk
    # a gradient that is not needed gets no memory: its programs are not launched (a stand-in pointer)
    grad_hidden = (torch.zeros((n_tokens, hidden_size), dtype=torch.float32, device=device)
                   if need_hidden else grad_logits)
    grad_weight = (torch.empty((vocab_size, hidden_size), dtype=weight.dtype, device=device)
                   if need_weight else grad_logits)
    with_entropy_grad = grad_ent is not None
    for chunk_start in range(0, vocab_size, chunk):
        width = min(chunk, vocab_size - chunk_start)
        _grad_logits_kernel[(triton.cdiv(n_tokens, tiles.block_n), triton.cdiv(width, tiles.block_v))](
            hidden, weight, targets, lse, entropy if with_entropy_grad else lse, grad_lp,
            grad_ent if with_entropy_grad else grad_lp, grad_logits,
            n_tokens, chunk_start + width, hidden_size, chunk_start, chunk,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            inv_temperature,
            WITH_ENTROPY_GRAD=with_entropy_grad,
            BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
            UPCAST=upcast, PRECISION=precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )

        def n_programs(block_m, block_n):
            tiles_d = triton.cdiv(hidden_size, block_n)
            hidden_programs = triton.cdiv(n_tokens, block_m) * tiles_d if need_hidden else 0
            weight_programs = triton.cdiv(width, block_m) * tiles_d if need_weight else 0
            return hidden_programs, weight_programs

        block_m, block_n, num_warps = _gemm_tiles(tiles, sum(n_programs(tiles.gemm_m, tiles.gemm_n)), sm_count)
        hidden_programs, weight_programs = n_programs(block_m, block_n)
        _grads_kernel[(hidden_programs + weight_programs,)](
            grad_logits, hidden, weight, grad_hidden, grad_weight,
            n_tokens, width, hidden_size, chunk_start, chunk,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            hidden_programs,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=tiles.gemm_k,
            UPCAST=upcast, PRECISION=precision, num_warps=num_warps, num_stages=tiles.num_stages,
        )
    return grad_hidden, grad_weight


class TiledTokenLogprobs(torch.autograd.Function):
    """Same contract as `logprobs.FusedTokenLogprobs` (compacted rows in, fp32 logprobs and
    entropies out, gradients to hidden and weight from any upstream gradients), with the kernels
    above. Saved for backward: hidden and weight (references), targets, lse and entropy (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temperature, with_entropy, tiles):
        dot_dtype, upcast, precision = _dot_settings(hidden, weight)
        tiles = tiles or default_tiles(dot_dtype)
        n_tokens = hidden.shape[0]
        if n_tokens:
            logprobs, lse, entropy = _forward(
                hidden, weight, targets, inv_temperature, with_entropy, tiles, upcast, precision
            )
        else:
            logprobs = lse = hidden.new_zeros(0, dtype=torch.float32)
            entropy = hidden.new_zeros(0, dtype=torch.float32)
        save_logprobs_context(ctx, hidden, weight, targets, lse, entropy, inv_temperature, with_entropy)
        ctx.tiles, ctx.dot_settings = tiles, (dot_dtype, upcast, precision)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_tokens = hidden.shape[0]
        if not (need_hidden or need_weight):
            return None, None, None, None, None, None
        if n_tokens == 0:
            return torch.zeros_like(hidden), torch.zeros_like(weight), None, None, None, None
        grad_lp = (lse.new_zeros(n_tokens) if grad_logprobs is None else grad_logprobs.float()).contiguous()
        grad_ent = None
        if ctx.with_entropy and grad_entropy is not None:
            grad_ent = grad_entropy.float().contiguous()
        grad_hidden, grad_weight = _backward(
            hidden, weight, targets, lse, entropy, grad_lp, grad_ent, ctx.inv_temperature,
            need_hidden, need_weight, ctx.tiles, *ctx.dot_settings,
        )
        return (
            grad_hidden.to(hidden.dtype) if need_hidden else None,
            grad_weight if need_weight else None,
            None, None, None, None,
        )


def triton_tiled_token_logprobs_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    inv_temperature: float,
    with_entropy: bool,
    tiles: TileSizes | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled Triton path on compacted rows: (N, d), (V, d), (N,) -> (logprobs, entropy), fp32.

    Any layout (strides are passed to the kernels). ``tiles``: None for `default_tiles`.
    """
    refuse_float64(hidden, weight)
    return TiledTokenLogprobs.apply(
        hidden, weight, targets.contiguous(), float(inv_temperature), with_entropy, tiles
    )
