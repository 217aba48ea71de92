"""Tests for the Triton kernels (`minirlhf/kernels/triton_kernels.py`).

Where they run:
- with a CUDA GPU (and Triton, which CUDA builds of torch ship): directly, on CUDA tensors;
- on a CPU machine with Triton installed: in Triton's interpreter, on CPU tensors. The interpreter
  is switched on by ``TRITON_INTERPRET=1``, which Triton reads when it is first imported, so it
  can't be flipped inside this pytest process (another test may already have imported Triton, and
  the variable would leak into every later test). `test_triton_kernels_in_the_interpreter` runs
  this same file again in a child pytest with the variable set; in that child the tests below run
  on the CPU. Sizes are tiny: the interpreter executes each program in numpy;
- without Triton: everything here is skipped, and the rest of the suite does not need Triton.

Tolerance: the kernels compute in fp32 with TF32 off; compared with the fp64 reference to 1e-5
relative to the sum of absolute terms (docs/design.md allows the CUDA paths 1e-4). The tiled
tensor-core kernel (``impl="triton_tiled"``, `triton_tiled.py`) is held to the same 1e-5 in fp32
(on a GPU its fp32 products are 3xTF32, about 2^-21 relative; the interpreter multiplies in fp32);
its bf16 tolerance is derived in `test_tiled_bf16_inputs`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minirlhf.kernels import gae, gae_reference, token_logprobs, token_logprobs_reference

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
if TRITON_INSTALLED and IN_INTERPRETER:
    DEVICE = "cpu"
elif TRITON_INSTALLED and torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None

needs_triton_device = pytest.mark.skipif(
    DEVICE is None,
    reason="no CUDA GPU: the Triton kernels run in the interpreter subprocess test instead"
    if TRITON_INSTALLED
    else "Triton is not installed",
)


def triton_module():
    from minirlhf.kernels.dispatch import triton_kernels

    return triton_kernels()


def assert_within(name: str, got: torch.Tensor, expected: torch.Tensor, tol) -> None:
    """Fail unless ``|got - expected| <= tol`` everywhere; the message names the worst entry."""
    got64, expected64 = got.detach().double().cpu(), expected.detach().double().cpu()
    assert got64.shape == expected64.shape, f"{name}: shape {tuple(got64.shape)} != {tuple(expected64.shape)}"
    error = (got64 - expected64).abs().nan_to_num(nan=float("inf"))
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(error)
    if (error > tol).any():
        ratio = error / tol.clamp(min=1e-300)
        index = tuple(int(i) for i in torch.nonzero(ratio == ratio.max())[0])
        pytest.fail(
            f"{name}: at index {index} expected {expected64[index].item():.10g}, got {got64[index].item():.10g} "
            f"(|diff| {error[index].item():.3g} > tol {tol[index].item():.3g}); "
            f"{int((error > tol).sum())} of {error.numel()} entries out of tolerance"
        )


# ------------------------------------------------------------------------------------------------
# the interpreter, in a child process
# ------------------------------------------------------------------------------------------------


def test_triton_kernels_in_the_interpreter():
    if not TRITON_INSTALLED:
        pytest.skip("Triton is not installed")
    if IN_INTERPRETER or torch.cuda.is_available():
        pytest.skip("the Triton tests run directly in this process")
    repo_root = Path(__file__).resolve().parents[1]
    child = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x", "-p", "no:cacheprovider"],
        cwd=repo_root,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, f"Triton tests under TRITON_INTERPRET=1 failed:\n{child.stdout}\n{child.stderr}"
    assert " passed" in child.stdout and "skipped" in child.stdout, child.stdout


# ------------------------------------------------------------------------------------------------
# token logprobs
# ------------------------------------------------------------------------------------------------


def logprob_case(n_tokens, vocab_size, hidden_size, *, temperature, seed, ignore=()):
    """Inputs, random upstream gradients and the fp64 oracle's values, gradients and error scales."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab_size, hidden_size, generator=generator, dtype=torch.float64) * (8 / math.sqrt(hidden_size))
    targets = torch.randint(0, vocab_size, (n_tokens,), generator=generator)
    targets[list(ignore)] = -100
    grad_lp = torch.randn(n_tokens, generator=generator, dtype=torch.float64)
    grad_ent = torch.randn(n_tokens, generator=generator, dtype=torch.float64)

    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logprobs, entropy = token_logprobs_reference(h64, w64, targets, temperature=temperature, return_entropy=True)
    grad_h, grad_w = torch.autograd.grad((logprobs * grad_lp + entropy * grad_ent).sum(), (h64, w64))
    abs_terms = hidden.abs() @ weight.abs().T / temperature  # (N, V): sum of |h_k W_jk| per logit
    value_scale = abs_terms.amax(dim=1) + 1
    grad_scale_h = (grad_lp.abs() + grad_ent.abs() * 2 * value_scale)[:, None] * (weight.abs().sum(0) / temperature + 1)
    grad_scale_w = (grad_lp.abs() + grad_ent.abs() * 2 * value_scale) @ hidden.abs() / temperature + 1
    expected = (logprobs.detach(), entropy.detach(), grad_h, grad_w)
    scales = (value_scale, value_scale, grad_scale_h, grad_scale_w.expand_as(grad_w))
    inputs = (hidden.float().to(DEVICE), weight.float().to(DEVICE), targets.to(DEVICE), grad_lp.float().to(DEVICE), grad_ent.float().to(DEVICE))
    return inputs, expected, scales


def run_triton(inputs, temperature, **blocks):
    """Values and gradients through the public function (impl='triton'); blocks override tiles."""
    hidden, weight, targets, grad_lp, grad_ent = inputs
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    if blocks:  # call the row function directly to force small tiles
        from minirlhf.kernels.logprobs import _on_valid_rows

        def rows_fn(h, w, t):
            return triton_module().triton_token_logprobs_rows(
                h, w, t, inv_temperature=1 / temperature, with_entropy=True, **blocks
            )

        logprobs, entropy = _on_valid_rows(rows_fn, hidden, weight, targets, -100, True)
    else:
        logprobs, entropy = token_logprobs(
            hidden, weight, targets, temperature=temperature, return_entropy=True, impl="triton"
        )
    grad_h, grad_w = torch.autograd.grad((logprobs * grad_lp + entropy * grad_ent).sum(), (hidden, weight))
    return logprobs, entropy, grad_h, grad_w


def check(got, expected, scales, rel_tol=1e-5):
    for name, g, e, s in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), got, expected, scales):
        assert_within(name, g, e, rel_tol * s)


@needs_triton_device
@pytest.mark.parametrize(
    "n_tokens,vocab_size,hidden_size",
    [
        (1, 10, 16),  # one token; V and d smaller than one tile
        (16, 32, 16),  # exactly one / two tiles everywhere
        (21, 75, 40),  # nothing a multiple of the 16-wide tiles
        (33, 17, 5),  # V one past a tile, d far below one
    ],
)
def test_logprobs_small_tiles(n_tokens, vocab_size, hidden_size):
    # 16-wide tiles, so these tiny sizes cross tile boundaries in every dimension
    inputs, expected, scales = logprob_case(n_tokens, vocab_size, hidden_size, temperature=0.7, seed=n_tokens)
    got = run_triton(inputs, 0.7, block_n=16, block_v=16, block_d=16, num_warps=4)
    assert got[0].dtype == torch.float32
    check(got, expected, scales)


@needs_triton_device
def test_logprobs_default_tiles_with_ignored_targets():
    inputs, expected, scales = logprob_case(40, 300, 24, temperature=1.0, seed=3, ignore=(0, 1, 2, 39))
    got = run_triton(inputs, 1.0)
    check(got, expected, scales)
    assert (got[2][[0, 1, 2, 39]] == 0).all(), "gradient reaches the hidden state of an ignored target"


@needs_triton_device
def test_logprobs_forward_only_and_entropy_only_backward():
    inputs, expected, _ = logprob_case(9, 40, 8, temperature=1.0, seed=4)
    hidden, weight, targets, _, grad_ent = inputs
    with torch.no_grad():
        logprobs = token_logprobs(hidden, weight, targets, impl="triton")
    assert logprobs.grad_fn is None
    assert_within("no_grad logprobs", logprobs, expected[0], 1e-5 * (1 + expected[0].abs()))
    # gradient from the entropy alone (PPO's entropy bonus)
    h = hidden.clone().requires_grad_()
    _, entropy = token_logprobs(h, weight, targets, return_entropy=True, impl="triton")
    (grad_h,) = torch.autograd.grad((entropy * grad_ent).sum(), h)
    h64 = hidden.double().cpu().requires_grad_()
    _, entropy64 = token_logprobs_reference(h64, weight.double().cpu(), targets.cpu(), return_entropy=True)
    (grad_h64,) = torch.autograd.grad((entropy64 * grad_ent.double().cpu()).sum(), h64)
    assert_within("grad_hidden from entropy alone", grad_h, grad_h64, 1e-4 * (1 + grad_h64.abs().max()))


@needs_triton_device
def test_logprobs_bf16_inputs_accumulate_in_fp32():
    """bf16 hidden states and weight (what a bf16 model hands the kernel): tl.dot multiplies the bf16
    tiles exactly and accumulates in fp32, so the result matches the fp64 reference ON THE
    bf16-ROUNDED VALUES to fp32 accuracy (1e-5 of the terms' size), not to bf16's 4e-3; the
    logprobs come out fp32 and the gradients in the inputs' dtype (bf16)."""
    inputs, _, _ = logprob_case(21, 75, 40, temperature=1.0, seed=8)
    hidden, weight, targets, grad_lp, _ = inputs
    hidden, weight = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    logprobs = token_logprobs(hidden, weight, targets, impl="triton")
    (grad_h,) = torch.autograd.grad((logprobs * grad_lp).sum(), hidden)
    assert logprobs.dtype == torch.float32 and grad_h.dtype == torch.bfloat16
    h64, w64 = hidden.detach().double().cpu().requires_grad_(), weight.detach().double().cpu()
    expected = token_logprobs_reference(h64, w64, targets.cpu())
    (grad_h64,) = torch.autograd.grad((expected * grad_lp.double().cpu()).sum(), h64)
    scale = (h64.abs() @ w64.abs().T).amax(dim=1) + 1
    assert_within("logprobs from bf16 inputs", logprobs, expected.detach(), 1e-5 * scale)
    # the gradient is rounded to bf16 on the way out: 2^-8 relative
    assert_within("grad_hidden (bf16)", grad_h, grad_h64, 2 ** -8 * grad_h64.abs() + 1e-3)


# ------------------------------------------------------------------------------------------------
# token logprobs, the tiled tensor-core kernel (impl="triton_tiled")
# ------------------------------------------------------------------------------------------------

# 16-wide tiles and 32-column backward chunks: tiny sizes cross every tile and chunk boundary
SMALL_TILES = dict(block_n=16, block_v=16, block_d=16, gemm_m=16, gemm_n=16, gemm_k=16, num_warps=4, vocab_chunk=32)


def run_tiled(inputs, temperature, tiles=None):
    """Values and gradients through the public function (impl="triton_tiled"); ``tiles`` (a dict
    of `TileSizes` fields) calls the row function directly instead, to force small tiles."""
    hidden, weight, targets, grad_lp, grad_ent = inputs
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    if tiles:
        from minirlhf.kernels.logprobs import _on_valid_rows

        def rows_fn(h, w, t):
            return triton_module().triton_tiled_token_logprobs_rows(
                h, w, t, inv_temperature=1 / temperature, with_entropy=True, tiles=triton_module().TileSizes(**tiles)
            )

        logprobs, entropy = _on_valid_rows(rows_fn, hidden, weight, targets, -100, True)
    else:
        logprobs, entropy = token_logprobs(
            hidden, weight, targets, temperature=temperature, return_entropy=True, impl="triton_tiled"
        )
    grad_h, grad_w = torch.autograd.grad(
        (logprobs * grad_lp.to(logprobs) + entropy * grad_ent.to(entropy)).sum(), (hidden, weight)
    )
    return logprobs, entropy, grad_h, grad_w


@needs_triton_device
@pytest.mark.parametrize(
    "n_tokens,vocab_size,hidden_size",
    [
        (1, 10, 16),  # one token; V and d below one tile
        (7, 1, 3),  # a one-word vocabulary: logprob 0, entropy 0, no gradient
        (16, 64, 16),  # exactly one token tile, four vocabulary tiles, two whole backward chunks
        (21, 75, 40),  # nothing a multiple of a tile; chunks of 32, 32 and 11 columns
        (33, 17, 5),  # V one past a tile (one partial chunk), d far below one
        (40, 97, 33),  # three token tiles, d one past two tiles, the vocabulary in several shares
    ],
)
def test_tiled_small_tiles(n_tokens, vocab_size, hidden_size):
    inputs, expected, scales = logprob_case(n_tokens, vocab_size, hidden_size, temperature=0.7, seed=n_tokens)
    got = run_tiled(inputs, 0.7, tiles=SMALL_TILES)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    check(got, expected, scales)


@needs_triton_device
def test_tiled_default_tiles_ignored_targets_and_same_bits_every_run():
    inputs, expected, scales = logprob_case(40, 300, 24, temperature=1.0, seed=3, ignore=(0, 1, 2, 39))
    got = run_tiled(inputs, 1.0)
    check(got, expected, scales)
    assert (got[0][[0, 1, 2, 39]] == 0).all() and (got[1][[0, 1, 2, 39]] == 0).all()
    assert (got[2][[0, 1, 2, 39]] == 0).all(), "gradient reaches the hidden state of an ignored target"
    # no atomics: every sum is done in a fixed order, so a second run gives the same bits
    again = run_tiled(inputs, 1.0)
    for name, first, second in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), got, again):
        assert torch.equal(first, second), f"{name} changed between two identical runs"


@needs_triton_device
def test_tiled_non_contiguous_inputs_and_batch_shapes():
    # hidden (B, T, d) as a strided view, weight as a transposed view, targets a column slice
    generator = torch.Generator().manual_seed(8)
    big_hidden = torch.randn(3, 2 * 11, 9, generator=generator, dtype=torch.float64)
    weight_t = torch.randn(7, 40, generator=generator, dtype=torch.float64) * 2
    big_targets = torch.randint(0, 40, (11, 3 * 2), generator=generator)
    grad_lp = torch.randn(3, 11, generator=generator, dtype=torch.float64)
    grad_ent = torch.randn(3, 11, generator=generator, dtype=torch.float64)
    h64 = big_hidden[:, ::2, 1:8].clone().requires_grad_()
    w64 = weight_t.T.clone().requires_grad_()
    targets = big_targets.T[::2]  # (3, 11)
    lp64, ent64 = token_logprobs_reference(h64, w64, targets, temperature=1.3, return_entropy=True)
    grad_h64, grad_w64 = torch.autograd.grad((lp64 * grad_lp + ent64 * grad_ent).sum(), (h64, w64))

    hidden = big_hidden.float().to(DEVICE)[:, ::2, 1:8].requires_grad_()  # (3, 11, 7)
    weight = weight_t.float().to(DEVICE).T.requires_grad_()  # (40, 7)
    targets = targets.to(DEVICE)
    assert not (hidden.is_contiguous() or weight.is_contiguous() or targets.is_contiguous())
    logprobs, entropy = token_logprobs(
        hidden, weight, targets, temperature=1.3, return_entropy=True, impl="triton_tiled"
    )
    grad_h, grad_w = torch.autograd.grad(
        (logprobs * grad_lp.float().to(DEVICE) + entropy * grad_ent.float().to(DEVICE)).sum(), (hidden, weight)
    )
    assert logprobs.shape == (3, 11) and grad_h.shape == (3, 11, 7) and grad_w.shape == (40, 7)
    value_scale = (h64.detach().abs() @ w64.detach().abs().T).amax(dim=-1) / 1.3 + 1
    assert_within("logprobs", logprobs, lp64.detach(), 1e-5 * value_scale)
    assert_within("entropy", entropy, ent64.detach(), 1e-5 * value_scale)
    assert_within("grad_hidden", grad_h, grad_h64, 1e-5 * (grad_h64.abs().max() + 1))
    assert_within("grad_weight", grad_w, grad_w64, 1e-5 * (grad_w64.abs().max() + 1))


@needs_triton_device
def test_tiled_extreme_logits_stay_finite():
    # logits in the thousands: the online log-sum-exp must not overflow, exp() must not give NaN
    generator = torch.Generator().manual_seed(13)
    hidden = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    weight = torch.randn(100, 4, generator=generator, dtype=torch.float64) * 1500
    targets = torch.randint(0, 100, (6,), generator=generator)
    grad_lp = torch.randn(6, generator=generator, dtype=torch.float64)
    inputs = (hidden.float().to(DEVICE), weight.float().to(DEVICE), targets.to(DEVICE),
              grad_lp.float().to(DEVICE), torch.zeros(6, device=DEVICE))
    got = run_tiled(inputs, 1.0, tiles=SMALL_TILES)
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp64, ent64 = token_logprobs_reference(h64, w64, targets, return_entropy=True)
    grad_h64, grad_w64 = torch.autograd.grad((lp64 * grad_lp).sum(), (h64, w64))
    scale = (hidden.abs() @ weight.abs().T).amax(dim=1)
    assert_within("logprobs at logit scale ~3000", got[0], lp64.detach(), 1e-5 * scale)
    assert_within("entropy at logit scale ~3000", got[1], ent64.detach(), 1e-5 * scale)
    # the softmax is one-hot to fp32's precision: dz = g (1[y] - p) is 0 or +-g, the gradients exact-ish
    assert_within("grad_hidden", got[2], grad_h64, 1e-5 * (grad_h64.abs().max() + 1))
    assert_within("grad_weight", got[3], grad_w64, 1e-5 * (grad_w64.abs().max() + 1))


@needs_triton_device
def test_tiled_forward_only_one_output_and_frozen_inputs():
    inputs, expected, _ = logprob_case(9, 40, 8, temperature=1.0, seed=4)
    hidden, weight, targets, grad_lp, grad_ent = inputs
    with torch.no_grad():
        logprobs = token_logprobs(hidden, weight, targets, impl="triton_tiled")  # no entropy kernel path
    assert logprobs.grad_fn is None
    assert_within("no_grad logprobs", logprobs, expected[0], 1e-5 * (1 + expected[0].abs()))

    h64, w64 = hidden.double().cpu().requires_grad_(), weight.double().cpu().requires_grad_()
    lp64, ent64 = token_logprobs_reference(h64, w64, targets.cpu(), return_entropy=True)
    for name, output64, grad in (("entropy", ent64, grad_ent), ("logprobs", lp64, grad_lp)):
        expected_h, expected_w = torch.autograd.grad(
            (output64 * grad.double().cpu()).sum(), (h64, w64), retain_graph=True
        )
        tol_h, tol_w = 1e-4 * (1 + expected_h.abs().max()), 1e-4 * (1 + expected_w.abs().max())
        # gradient from one output alone (PPO's entropy bonus; a loss on the logprobs only)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = token_logprobs(h, w, targets, return_entropy=True, impl="triton_tiled")
        grad_h, grad_w = torch.autograd.grad(((ent if name == "entropy" else lp) * grad).sum(), (h, w))
        assert_within(f"grad_hidden from {name} alone", grad_h, expected_h, tol_h)
        assert_within(f"grad_weight from {name} alone", grad_w, expected_w, tol_w)
        # a frozen weight, then frozen hidden states: the other gradient alone
        h = hidden.clone().requires_grad_()
        lp, ent = token_logprobs(h, weight, targets, return_entropy=True, impl="triton_tiled")
        (grad_h,) = torch.autograd.grad(((ent if name == "entropy" else lp) * grad).sum(), h)
        assert_within(f"grad_hidden from {name}, weight frozen", grad_h, expected_h, tol_h)
        w = weight.clone().requires_grad_()
        lp, ent = token_logprobs(hidden, w, targets, return_entropy=True, impl="triton_tiled")
        (grad_w,) = torch.autograd.grad(((ent if name == "entropy" else lp) * grad).sum(), w)
        assert_within(f"grad_weight from {name}, hidden frozen", grad_w, expected_w, tol_w)


@needs_triton_device
@pytest.mark.parametrize("hidden_dtype", [torch.bfloat16, torch.float32])
def test_tiled_bf16_inputs(hidden_dtype):
    """A bf16 weight with bf16 hidden states (the tensor cores' bf16 path), or fp32 hidden states
    (mixed: computed in fp32). The oracle is fp64 ON THE SAME bf16-ROUNDED VALUES.

    Values: bf16 x bf16 products are exact in fp32 and summed in fp32, so logprobs and entropies
    hold the fp32 tolerance, 1e-5 of the terms' size, not bf16's 2^-8 (they come out fp32).

    Gradients, bf16 path: dz = dL/dz is rounded to bf16 once (to feed the tensor cores), then
    multiplied exactly and summed in fp32, and the result is rounded to bf16 once. bf16 keeps 8
    significant bits, so each rounding is off by at most u = 2^-8 relative (round to nearest, on a
    GPU) or 2^-7 (the interpreter truncates). With ``A = sum_j |dz_j| |W_jk|`` (or ``|dz_j| |h_k|``)
    the sum of absolute terms: |error| <= u A (dz) + u |grad| (output) + fp32 sums <= 2 u A + 1e-5
    of the fp32 scale. A wrong formula misses by O(A); bf16 logits would miss the values by 2^-8.
    """
    inputs, _, fp32_scales = logprob_case(21, 75, 40, temperature=0.8, seed=8)
    hidden, weight, targets, grad_lp, grad_ent = inputs
    hidden, weight = hidden.to(hidden_dtype), weight.bfloat16()
    got = run_tiled((hidden, weight, targets, grad_lp, grad_ent), 0.8, tiles=SMALL_TILES)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[2].dtype == hidden_dtype and got[3].dtype == torch.bfloat16

    # the fp64 oracle on the rounded values, and dz in fp64 for the error bound
    h64, w64 = hidden.double().cpu().requires_grad_(), weight.double().cpu().requires_grad_()
    targets_cpu, g_lp, g_ent = targets.cpu(), grad_lp.double().cpu(), grad_ent.double().cpu()
    lp64, ent64 = token_logprobs_reference(h64, w64, targets_cpu, temperature=0.8, return_entropy=True)
    grad_h64, grad_w64 = torch.autograd.grad((lp64 * g_lp + ent64 * g_ent).sum(), (h64, w64))
    with torch.no_grad():
        log_p = torch.log_softmax(h64 @ w64.T / 0.8, dim=-1)  # (N, V)
        p = log_p.exp()
        one_hot = torch.nn.functional.one_hot(targets_cpu, 75).double()
        dz = (g_lp[:, None] * (one_hot - p) - g_ent[:, None] * p * (log_p + ent64[:, None])) / 0.8
        abs_h, abs_w = dz.abs() @ w64.abs(), dz.abs().T @ h64.abs()
    value_scale = fp32_scales[0]
    assert_within("logprobs from bf16 weight", got[0], lp64.detach(), 1e-5 * value_scale)
    assert_within("entropy from bf16 weight", got[1], ent64.detach(), 1e-5 * value_scale)
    u = 2.0**-7 if IN_INTERPRETER else 2.0**-8
    if hidden_dtype == torch.bfloat16:
        assert_within("grad_hidden (bf16)", got[2], grad_h64, 2 * u * abs_h + 1e-5 * fp32_scales[2])
    else:  # mixed: fp32 throughout, only grad_weight is rounded (once) to bf16
        assert_within("grad_hidden (fp32, mixed)", got[2], grad_h64, 1e-5 * fp32_scales[2])
    assert_within("grad_weight (bf16)", got[3], grad_w64, 2 * u * abs_w + 1e-5 * fp32_scales[3])


@needs_triton_device
def test_tiled_is_opt_in_and_gae_ignores_it():
    from minirlhf.kernels import get_kernel_impl, set_kernel_impl
    from minirlhf.kernels.dispatch import resolve_impl

    inputs, expected, _ = logprob_case(5, 12, 4, temperature=1.0, seed=2)
    hidden, weight, targets, _, _ = inputs
    saved = get_kernel_impl()
    try:
        assert resolve_impl("auto", hidden) in ("triton", "fused"), "auto must never pick the tiled kernel"
        set_kernel_impl("triton_tiled")
        h = hidden.clone().requires_grad_()
        logprobs = token_logprobs(h, weight, targets)
        assert _graph_has(logprobs, "TiledTokenLogprobsBackward"), "set_kernel_impl('triton_tiled') was ignored"
        assert_within("default set to triton_tiled", logprobs, expected[0], 1e-5 * (1 + expected[0].abs()))
        # GAE has one Triton version: "triton_tiled" runs it
        rewards = torch.randn(2, 9, device=DEVICE)
        values = torch.randn(2, 9, device=DEVICE)
        mask = torch.ones(2, 9, device=DEVICE)
        got = gae(rewards, values, mask, 1.0, 0.95)
        expected_gae = gae_reference(rewards.double().cpu(), values.double().cpu(), mask.cpu(), 1.0, 0.95)
        assert_within("gae under triton_tiled", got[0], expected_gae[0], 1e-5 * (1 + expected_gae[0].abs().max()))
    finally:
        set_kernel_impl(saved)
    with pytest.raises(TypeError, match="float64"):
        token_logprobs(hidden.double(), weight.double(), targets, impl="triton_tiled")


def _graph_has(tensor, name):
    """True when the autograd graph behind ``tensor`` has a node of type ``name``."""
    stack, seen = [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == name:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def test_tiled_on_cpu_tensors_without_the_interpreter_is_a_clear_error(monkeypatch):
    if IN_INTERPRETER:
        pytest.skip("in the interpreter, CPU tensors are what the Triton paths run on")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, targets = torch.randn(3, 4), torch.randn(8, 4), torch.tensor([1, 2, 3])
    with pytest.raises(RuntimeError, match="triton"):
        token_logprobs(hidden, weight, targets, impl="triton_tiled")


# ------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------


@needs_triton_device
@pytest.mark.parametrize("n_steps,block_t", [(1, 16), (16, 16), (37, 16), (37, 64)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.0), (1.0, 1.0)])
def test_gae_tiles(n_steps, block_t, gamma, lam):
    generator = torch.Generator().manual_seed(n_steps)
    rewards = torch.randn(5, n_steps, generator=generator, dtype=torch.float64)
    values = torch.randn(5, n_steps, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([n_steps, 0, max(n_steps - 1, 0), n_steps // 2, 1])
    mask = torch.arange(n_steps)[None, :] < lengths[:, None]
    mask[0, n_steps // 3] = False  # a gap in row 0
    rewards[~mask] = float("nan")  # never read
    values[~mask] = float("inf")
    expected = gae_reference(rewards, values, mask, gamma, lam)
    got = triton_module().triton_gae(
        rewards.float().to(DEVICE), values.float().to(DEVICE), mask.to(DEVICE), gamma, lam, block_t=block_t
    )
    scale = 1e-5 * (1 + expected[0].abs().max().item())
    assert_within("triton advantages", got[0], expected[0], scale)
    assert_within("triton returns", got[1], expected[1], scale)


@needs_triton_device
def test_gae_public_function():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(8, 70, generator=generator)
    values = torch.randn(8, 70, generator=generator)
    mask = (torch.arange(70)[None, :] < torch.randint(0, 71, (8, 1), generator=generator)).float()
    expected = gae_reference(rewards.double(), values.double(), mask, 1.0, 0.95)
    got = gae(rewards.to(DEVICE), values.to(DEVICE), mask.to(DEVICE), impl="triton")
    assert got[0].dtype == torch.float32 and got[0].device.type == DEVICE
    assert_within("triton advantages", got[0], expected[0], 2e-6 * (1 + expected[0].abs().max().item()))
