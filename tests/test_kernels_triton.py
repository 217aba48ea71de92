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
relative to the sum of absolute terms (docs/design.md allows the CUDA paths 1e-4).
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
