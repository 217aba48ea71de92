"""Tests for `minirlhf.kernels.token_logprobs` and `logprobs_from_logits`.

The oracle is `token_logprobs_reference` (``log_softmax(h @ W.T / T).gather``), itself checked
against a plain Python loop and a case worked by hand. Every other path is compared with it,
values AND gradients, with a random upstream gradient per token (not only ``.sum()``), at sizes
on and around the block boundaries, with temperature != 1, entropy, ignored targets and
non-contiguous inputs. CUDA paths run too when a GPU is present.

Tolerances (docs/design.md): fp64 to ~1e-12 relative; fp32 to 1e-5 relative to the sum of absolute
terms that produce each number (a long float sum is only that accurate, whatever the code).
"""

from __future__ import annotations

import math

import pytest
import torch

from minirlhf.kernels import (
    get_kernel_impl,
    logprobs_from_logits,
    set_kernel_impl,
    token_logprobs,
    token_logprobs_reference,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def assert_within(name: str, got: torch.Tensor, expected: torch.Tensor, tol) -> None:
    """Fail unless ``|got - expected| <= tol`` everywhere; the message names the worst entry."""
    got64 = got.detach().double().cpu()
    expected64 = expected.detach().double().cpu()
    assert got64.shape == expected64.shape, f"{name}: shape {tuple(got64.shape)} != {tuple(expected64.shape)}"
    bad_values = ~torch.isfinite(got64) & torch.isfinite(expected64)
    if bad_values.any():
        index = tuple(int(i) for i in bad_values.nonzero()[0])
        pytest.fail(f"{name}: non-finite value {got64[index].item()} at index {index}")
    error = (got64 - expected64).abs()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(error)
    excess = error / tol.clamp(min=1e-300)
    if (error > tol).any():
        index = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])
        n_bad = int((error > tol).sum())
        pytest.fail(
            f"{name}: at index {index} expected {expected64[index].item():.12g}, got "
            f"{got64[index].item():.12g} (|diff| {error[index].item():.3g} > tol {tol[index].item():.3g}); "
            f"{n_bad} of {error.numel()} entries out of tolerance"
        )


def make_inputs(n_tokens, vocab_size, hidden_size, *, logit_std=4.0, dtype=torch.float64, device="cpu", seed=0):
    """Seeded hidden (N, d), weight (V, d) with logits of about ``logit_std``, targets (N,)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab_size, hidden_size, generator=generator, dtype=torch.float64)
    weight *= logit_std / math.sqrt(hidden_size)
    targets = torch.randint(0, vocab_size, (n_tokens,), generator=generator)
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device)


def oracle(hidden, weight, targets, temperature, grad_lp, grad_ent, ignore_index=-100):
    """fp64 reference values and gradients, plus error scales for fp32 comparisons.

    Returns (logprobs, entropy, grad_hidden, grad_weight, scales) where ``scales`` holds, per
    output entry, the sum of absolute terms that a float computation of it adds up.
    """
    hidden64 = hidden.detach().double().cpu().requires_grad_()
    weight64 = weight.detach().double().cpu().requires_grad_()
    targets, grad_lp, grad_ent = targets.cpu(), grad_lp.double().cpu(), grad_ent.double().cpu()
    logprobs, entropy = token_logprobs_reference(
        hidden64, weight64, targets, temperature=temperature, return_entropy=True, ignore_index=ignore_index
    )
    loss = (logprobs * grad_lp).sum() + (entropy * grad_ent).sum()
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden64, weight64))
    with torch.no_grad():
        flat_h = hidden64.reshape(-1, hidden64.shape[-1])
        abs_logit_terms = flat_h.abs() @ weight64.abs().T / temperature  # (N, V): sum_k |h_k W_jk| / T
        logit_scale = abs_logit_terms.amax(dim=1).reshape(targets.shape) + 1.0
        # dL/dz for the gradient scales: |g_lp| (1 + p_j) + |g_ent| p_j (|log p_j| + H), bounded by
        # (|g_lp| + |g_ent| (1 + |z| range)) -- take a generous per-token factor
        token_factor = (grad_lp.abs() + grad_ent.abs() * (1 + 2 * logit_scale)).reshape(-1)
        abs_dz = torch.softmax(flat_h @ weight64.T / temperature, dim=-1) + 1.0 / weight64.shape[0]
        abs_dz = abs_dz * token_factor[:, None] / temperature
        scale_h = (abs_dz @ weight64.abs()).reshape(hidden64.shape) + 1e-30
        scale_w = abs_dz.T @ flat_h.abs() + 1e-30
    scales = {"logprobs": logit_scale, "entropy": logit_scale, "grad_hidden": scale_h, "grad_weight": scale_w}
    return logprobs.detach(), entropy.detach(), grad_hidden, grad_weight, scales


def run_path(hidden, weight, targets, temperature, grad_lp, grad_ent, **kwargs):
    """Values and gradients of `token_logprobs` on the given path, with upstream gradients."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logprobs, entropy = token_logprobs(
        hidden, weight, targets, temperature=temperature, return_entropy=True, **kwargs
    )
    loss = (logprobs * grad_lp.to(logprobs)).sum() + (entropy * grad_ent.to(entropy)).sum()
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    return logprobs, entropy, grad_hidden, grad_weight


def check_against_oracle(got, expected, rel_tol):
    names = ("logprobs", "entropy", "grad_hidden", "grad_weight")
    scales = expected[4]
    for name, got_tensor, expected_tensor in zip(names, got, expected[:4]):
        assert_within(name, got_tensor, expected_tensor, rel_tol * scales[name])


def autograd_node_names(tensor: torch.Tensor) -> set[str]:
    """Names of every node in the autograd graph behind ``tensor`` (to see which path ran)."""
    names, seen, stack = set(), {}, [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node  # keep a reference, so that no other node can reuse the id

        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.fixture(autouse=True)
def restore_default_impl():
    saved = get_kernel_impl()
    yield
    set_kernel_impl(saved)


# ------------------------------------------------------------------------------------------------
# the oracle itself
# ------------------------------------------------------------------------------------------------


def test_hand_worked_example():
    # h = [1], W = [[0], [ln 2], [ln 5]]: logits [0, ln 2, ln 5], softmax = [1, 2, 5] / 8.
    #   logprob(target 2) = ln(5/8) = -0.470004; logprob(target 0) = ln(1/8) = -2.079442
    #   entropy = -(1/8 ln 1/8 + 2/8 ln 2/8 + 5/8 ln 5/8) = 1.299460
    # With temperature 2 the logits halve: softmax ∝ [1, √2, √5], logprob(2) = ln(√5 / (1+√2+√5)).
    hidden = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    weight = torch.tensor([[0.0], [math.log(2)], [math.log(5)]], dtype=torch.float64)
    targets = torch.tensor([2, 0])
    expected_lp = torch.tensor([math.log(5 / 8), math.log(1 / 8)], dtype=torch.float64)
    expected_entropy = -sum(p * math.log(p) for p in (1 / 8, 2 / 8, 5 / 8))
    expected_t2 = math.log(math.sqrt(5) / (1 + math.sqrt(2) + math.sqrt(5)))
    for impl in ("reference", "fused"):
        logprobs, entropy = token_logprobs(hidden, weight, targets, return_entropy=True, impl=impl)
        assert_within(f"{impl} logprobs", logprobs, expected_lp, 1e-12)
        assert_within(f"{impl} entropy", entropy, torch.full((2,), expected_entropy, dtype=torch.float64), 1e-12)
        logprob_t2 = token_logprobs(hidden, weight, targets, temperature=2.0, impl=impl)[0]
        assert abs(logprob_t2.item() - expected_t2) < 1e-12, f"{impl}: temperature 2 gives {logprob_t2.item()}"


def test_reference_matches_a_plain_python_loop():
    hidden, weight, targets = make_inputs(5, 7, 3, seed=1)
    temperature = 0.7
    logprobs, entropy = token_logprobs_reference(hidden, weight, targets, temperature=temperature, return_entropy=True)
    for n in range(5):
        logits = [sum(hidden[n, k].item() * weight[j, k].item() for k in range(3)) / temperature for j in range(7)]
        log_norm = math.log(sum(math.exp(z) for z in logits))
        expected_lp = logits[targets[n]] - log_norm
        expected_ent = -sum(math.exp(z - log_norm) * (z - log_norm) for z in logits)
        assert abs(logprobs[n].item() - expected_lp) < 1e-12, f"token {n}: logprob {logprobs[n].item()} vs {expected_lp}"
        assert abs(entropy[n].item() - expected_ent) < 1e-12, f"token {n}: entropy {entropy[n].item()} vs {expected_ent}"


# ------------------------------------------------------------------------------------------------
# fused path vs the oracle
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens", [1, 7, 8, 9, 17])
@pytest.mark.parametrize("vocab_size", [1, 15, 16, 17, 33])
def test_fused_fp64_at_block_boundaries(n_tokens, vocab_size):
    # blocks of 8 tokens x 16 vocabulary columns: sizes below, on and just past the boundaries
    hidden, weight, targets = make_inputs(n_tokens, vocab_size, 5, seed=n_tokens * 100 + vocab_size)
    generator = torch.Generator().manual_seed(7)
    grad_lp = torch.randn(n_tokens, generator=generator, dtype=torch.float64)
    grad_ent = torch.randn(n_tokens, generator=generator, dtype=torch.float64)
    expected = oracle(hidden, weight, targets, 0.7, grad_lp, grad_ent)
    got = run_path(hidden, weight, targets, 0.7, grad_lp, grad_ent, impl="fused", vocab_block=16, token_block=8)
    check_against_oracle(got, expected, rel_tol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("logit_std", [1.0, 16.0])
def test_fused_fp32_default_blocks(device, temperature, logit_std):
    # V = 1500: one full default block of 1024 columns and a ragged one; std 16 = real-model scale,
    # where most exp() arguments fall below -87 (the clamp must not change any result)
    hidden, weight, targets = make_inputs(40, 1500, 24, logit_std=logit_std, dtype=torch.float32, device=device)
    generator = torch.Generator().manual_seed(3)
    grad_lp = torch.randn(40, generator=generator).to(device)
    grad_ent = torch.randn(40, generator=generator).to(device)
    expected = oracle(hidden, weight, targets, temperature, grad_lp, grad_ent)
    got = run_path(hidden, weight, targets, temperature, grad_lp, grad_ent, impl="fused")
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    check_against_oracle(got, expected, rel_tol=1e-5)


def test_fused_gradcheck_fp64():
    hidden, weight, targets = make_inputs(4, 6, 3, seed=5)
    hidden.requires_grad_()
    weight.requires_grad_()

    def both_outputs(h, w):
        return token_logprobs(h, w, targets, temperature=0.8, return_entropy=True, impl="fused", vocab_block=4, token_block=3)

    assert torch.autograd.gradcheck(both_outputs, (hidden, weight), eps=1e-6, atol=1e-8)


def test_upstream_gradient_on_one_output_only():
    # PPO's policy loss uses logprobs and its entropy bonus uses entropy: each alone must work
    hidden, weight, targets = make_inputs(6, 20, 4, seed=9)
    zeros = torch.zeros(6, dtype=torch.float64)
    grad = torch.linspace(-1, 2, 6, dtype=torch.float64)
    for grad_lp, grad_ent, which in ((grad, zeros, "logprobs"), (zeros, grad, "entropy")):
        expected = oracle(hidden, weight, targets, 1.0, grad_lp, grad_ent)
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        logprobs, entropy = token_logprobs(h, w, targets, return_entropy=True, impl="fused", vocab_block=8)
        output = logprobs if which == "logprobs" else entropy
        grad_h, grad_w = torch.autograd.grad((output * grad).sum(), (h, w))
        assert_within(f"grad_hidden from {which} alone", grad_h, expected[2], 1e-12 * expected[4]["grad_hidden"])
        assert_within(f"grad_weight from {which} alone", grad_w, expected[3], 1e-12 * expected[4]["grad_weight"])


def test_frozen_weight_or_frozen_hidden():
    hidden, weight, targets = make_inputs(5, 12, 4, seed=2)
    grad = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = oracle(hidden, weight, targets, 1.0, grad, torch.zeros(5, dtype=torch.float64))
    h = hidden.clone().requires_grad_()
    (token_logprobs(h, weight, targets, impl="fused", vocab_block=5) * grad).sum().backward()
    assert_within("grad_hidden with a frozen weight", h.grad, expected[2], 1e-12 * expected[4]["grad_hidden"])
    w = weight.clone().requires_grad_()
    (token_logprobs(hidden, w, targets, impl="fused", vocab_block=5) * grad).sum().backward()
    assert_within("grad_weight with frozen hidden", w.grad, expected[3], 1e-12 * expected[4]["grad_weight"])


@pytest.mark.parametrize("device", DEVICES)
def test_ignore_index_gives_zero_and_no_gradient(device):
    hidden, weight, targets = make_inputs(4 * 6, 30, 5, device=device, seed=4)
    hidden = hidden.view(4, 6, 5)
    targets = targets.view(4, 6).clone()
    targets[0, :3] = -100  # a prompt
    targets[2, 4:] = -100  # padding
    targets[3, :] = -100  # a row with nothing to score
    valid = targets != -100
    generator = torch.Generator().manual_seed(1)
    grad_lp = torch.randn(4, 6, generator=generator, dtype=torch.float64).to(device)
    grad_ent = torch.randn(4, 6, generator=generator, dtype=torch.float64).to(device)
    expected = oracle(hidden, weight, targets, 0.9, grad_lp, grad_ent)
    for impl in ("reference", "fused", "auto"):
        got = run_path(hidden, weight, targets, 0.9, grad_lp, grad_ent, impl=impl)
        assert (got[0][~valid] == 0).all(), f"{impl}: logprob at an ignored target is not 0"
        assert (got[1][~valid] == 0).all(), f"{impl}: entropy at an ignored target is not 0"
        assert (got[2][~valid] == 0).all(), f"{impl}: gradient reaches the hidden state of an ignored target"
        check_against_oracle(got, expected, rel_tol=1e-5)

    # the values at ignored positions are never read: garbage there changes nothing
    poisoned = hidden.clone()
    poisoned[~valid] = float("nan")
    logprobs = token_logprobs(poisoned, weight, targets, temperature=0.9, impl="fused")
    assert_within("logprobs with NaN hidden at ignored targets", logprobs, expected[0], 1e-12 * expected[4]["logprobs"])


def test_custom_ignore_index_and_all_ignored():
    hidden, weight, targets = make_inputs(5, 9, 3, seed=6)
    targets[1] = -1
    logprobs = token_logprobs(hidden, weight, targets, ignore_index=-1, impl="fused")
    reference = token_logprobs_reference(hidden, weight, targets, ignore_index=-1)
    assert_within("logprobs with ignore_index=-1", logprobs, reference, 1e-12)
    assert logprobs[1] == 0

    # every target ignored: zeros, and backward still runs (gradient exactly zero)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    all_ignored = torch.full((5,), -100)
    logprobs, entropy = token_logprobs(h, w, all_ignored, return_entropy=True, impl="fused")
    assert (logprobs == 0).all() and (entropy == 0).all() and logprobs.shape == (5,)
    (logprobs.sum() + entropy.sum()).backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


def test_out_of_range_target_is_a_clear_error():
    hidden, weight, targets = make_inputs(3, 9, 3)
    targets[2] = 9
    with pytest.raises(ValueError, match=r"targets must be in \[0, 9\)"):
        token_logprobs(hidden, weight, targets, impl="fused")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_and_batch_shapes(device):
    # hidden (B, T, d) as a strided view of a bigger tensor, weight as a transposed view,
    # targets as a column slice: none of them contiguous
    generator = torch.Generator().manual_seed(8)
    big_hidden = torch.randn(3, 2 * 11, 9, generator=generator, dtype=torch.float64).to(device)
    hidden = big_hidden[:, ::2, 1:8]  # (3, 11, 7)
    weight_t = torch.randn(7, 40, generator=generator, dtype=torch.float64).to(device)
    weight = weight_t.T  # (40, 7)
    big_targets = torch.randint(0, 40, (11, 3 * 2), generator=generator).to(device)
    targets = big_targets.T[::2]  # (3, 11)
    assert not (hidden.is_contiguous() or weight.is_contiguous() or targets.is_contiguous())
    grad_lp = torch.randn(3, 11, generator=generator, dtype=torch.float64).to(device)
    grad_ent = torch.randn(3, 11, generator=generator, dtype=torch.float64).to(device)
    expected = oracle(hidden, weight, targets, 1.3, grad_lp, grad_ent)
    got = run_path(hidden, weight, targets, 1.3, grad_lp, grad_ent, impl="fused", vocab_block=16)
    assert got[0].shape == (3, 11) and got[1].shape == (3, 11)
    check_against_oracle(got, expected, rel_tol=1e-12)


def test_no_grad_forward_and_low_precision_inputs():
    hidden, weight, targets = make_inputs(10, 50, 8, dtype=torch.float32, seed=12)
    with torch.no_grad():
        logprobs = token_logprobs(hidden, weight, targets, impl="fused")
    assert logprobs.grad_fn is None and logprobs.dtype == torch.float32
    # bf16 inputs are computed in fp32: same as the fp32 reference on the bf16-rounded values
    hidden_bf16, weight_bf16 = hidden.bfloat16(), weight.bfloat16()
    logprobs = token_logprobs(hidden_bf16, weight_bf16, targets, impl="fused")
    expected = token_logprobs_reference(hidden_bf16.double(), weight_bf16.double(), targets)
    assert logprobs.dtype == torch.float32
    assert_within("logprobs from bf16 inputs", logprobs, expected, 1e-5 * (1 + expected.abs()))


def test_extreme_logits_stay_finite():
    # logits in the thousands: the online log-sum-exp must not overflow, exp() must not underflow to NaN
    hidden, weight, targets = make_inputs(6, 100, 4, logit_std=3000.0, dtype=torch.float32, seed=13)
    expected = token_logprobs_reference(hidden.double(), weight.double(), targets, return_entropy=True)
    got = token_logprobs(hidden, weight, targets, return_entropy=True, impl="fused", vocab_block=32)
    scale = (hidden.double().abs() @ weight.double().abs().T).amax(dim=1)
    assert_within("logprobs at logit scale 3000", got[0], expected[0], 1e-5 * scale)
    assert_within("entropy at logit scale 3000", got[1], expected[1], 1e-5 * scale)


# ------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------


def test_set_kernel_impl_switches_the_default_path():
    hidden, weight, targets = make_inputs(3, 8, 2, seed=14)
    hidden.requires_grad_()
    assert get_kernel_impl() == "auto"
    fused_out = token_logprobs(hidden, weight, targets)
    assert "FusedTokenLogprobsBackward" in autograd_node_names(fused_out), "auto on CPU must be the fused path"
    set_kernel_impl("reference")
    assert get_kernel_impl() == "reference"
    reference_out = token_logprobs(hidden, weight, targets)
    assert "LogSoftmaxBackward0" in autograd_node_names(reference_out), "set_kernel_impl('reference') was ignored"
    assert_within("reference vs fused", reference_out, fused_out, 1e-12)
    with pytest.raises(ValueError, match="kernel impl must be one of"):
        set_kernel_impl("fast")
    with pytest.raises(ValueError):
        token_logprobs(hidden, weight, targets, impl="cuda")


def test_triton_requested_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, targets = make_inputs(3, 8, 2)
    with pytest.raises(RuntimeError, match="triton"):
        token_logprobs(hidden.float(), weight.float(), targets, impl="triton")


def test_bad_shapes_are_clear_errors():
    hidden, weight, targets = make_inputs(3, 8, 2)
    with pytest.raises(ValueError, match="must be targets"):
        token_logprobs(hidden, weight, targets[:2])
    with pytest.raises(ValueError, match="weight must be"):
        token_logprobs(hidden, weight[:, :1], targets)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, weight, targets, temperature=0.0)


# ------------------------------------------------------------------------------------------------
# logprobs_from_logits
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_logits(temperature):
    generator = torch.Generator().manual_seed(15)
    logits = (16 * torch.randn(2, 5, 33, generator=generator, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 33, (2, 5), generator=generator)
    targets[1, 3:] = -100
    got = logprobs_from_logits(logits, targets, temperature=temperature)
    # independent formulation: log_softmax then gather
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    safe = targets.clamp(min=0)
    expected = torch.where(targets != -100, log_probs.gather(-1, safe[..., None]).squeeze(-1), 0.0)
    assert_within("logprobs_from_logits", got, expected, 1e-12)
    upstream = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    (grad_got,) = torch.autograd.grad((got * upstream).sum(), logits)
    (grad_expected,) = torch.autograd.grad((expected * upstream).sum(), logits)
    assert_within("d logprobs_from_logits / d logits", grad_got, grad_expected, 1e-12)
    assert (grad_got[1, 3:] == 0).all(), "gradient reaches logits of ignored targets"
    # and it agrees with the fused LM-head version when logits = h @ W.T
    hidden, weight, token_targets = make_inputs(7, 33, 4, seed=16)
    assert_within(
        "logprobs_from_logits vs token_logprobs",
        logprobs_from_logits(hidden @ weight.T, token_targets, temperature=temperature),
        token_logprobs(hidden, weight, token_targets, temperature=temperature, impl="fused"),
        1e-12 * 50,
    )
