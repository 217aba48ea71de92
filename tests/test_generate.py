"""Tests for minirlhf/generate.py: batched sampling with the KV cache.

Oracles: a plain greedy loop that runs each prompt alone through the model without any cache or
padding; a fresh full forward over `Generation.sequences()` for the log-probs (checking the
P - 1 + t alignment); empirical frequencies over many samples for temperature and top-k.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from minirlhf.generate import filter_logits, generate
from minirlhf.model import GPT, GPTConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {"cpu": 1e-5, "cuda": 1e-4}

VOCAB = 29
EOS, PAD = 0, 28
PROMPTS = [[5, 3, 8, 1, 2, 9], [7, 7, 2], [11], [4, 20, 13, 2]]  # different lengths: left padding


def make_model(seed=0, device="cpu", dropout=0.0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, d_model=16, dropout=dropout)
    model = GPT(config).to(device)
    with torch.no_grad():  # sharper, more structured distributions than the near-uniform init
        model.wte.weight.mul_(25.0)
        model.wpe.weight.mul_(25.0)
    return model.eval()


def plain_greedy(model, prompt, max_new_tokens, eos_id):
    """Greedy decoding of ONE prompt with no padding and no cache: rerun the whole prefix each step."""
    tokens = list(prompt)
    response = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([tokens], device=model.wte.weight.device)).logits[0, -1]
            token = int(logits.argmax())
            response.append(token)
            tokens.append(token)
            if token == eos_id:
                break
    return response


def make_varied_model(device="cpu") -> GPT:
    """A model whose greedy runs do not just repeat one token (an untrained tied GPT mostly repeats its
    input): every parameter drawn from N(0, 0.3^2), with a seed checked to give varied runs."""
    model = make_model(device=device)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def latest_new_token(free_run):
    """The token whose first appearance in a greedy run comes latest (at step >= 1). Used as EOS, it
    makes that run stop exactly there, so stopping can be tested on an untrained model."""
    first_step = {}
    for step, token in enumerate(free_run):
        first_step.setdefault(token, step)
    token, step = max(first_step.items(), key=lambda item: item[1])
    assert step >= 1, f"the greedy run {free_run} repeats one token: pick another seed for make_varied_model"
    return token, step


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_equals_plain_loop_and_is_deterministic(device):
    model = make_varied_model(device)
    eos, stop_step = latest_new_token(plain_greedy(model, PROMPTS[0], 10, eos_id=-1))
    gen = generate(model, PROMPTS, max_new_tokens=10, eos_id=eos, pad_id=PAD, temperature=0.0)
    again = generate(model, PROMPTS, max_new_tokens=10, eos_id=eos, pad_id=PAD, temperature=0.0)
    assert torch.equal(gen.response_ids, again.response_ids), "greedy decoding is not deterministic"
    for b, prompt in enumerate(PROMPTS):
        expected = plain_greedy(model, prompt, 10, eos)
        got = gen.response_ids[b][gen.response_mask[b].bool()].tolist()
        assert got == expected, f"row {b}: batched KV-cache greedy {got} != plain loop {expected}"
    assert gen.ended[0] and gen.response_mask[0].sum() == stop_step + 1, "row 0 was built to stop at its EOS"


def test_rows_stop_at_eos_with_pad_after():
    # a near-uniform model at temperature 1: EOS comes with probability ~1/29 per step, so with this
    # seed some rows end early and some run out of tokens
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, d_model=16)).eval()
    gen = generate(model, PROMPTS * 2, max_new_tokens=20, eos_id=EOS, pad_id=PAD, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    B, R = gen.response_ids.shape
    assert 0 < gen.ended.sum() < B, f"the seed should give a mix of ended and unfinished rows, ended={gen.ended}"
    for b in range(B):
        ids, mask = gen.response_ids[b].tolist(), gen.response_mask[b].tolist()
        if EOS in ids:
            stop = ids.index(EOS)  # the first EOS
            assert mask == [1] * (stop + 1) + [0] * (R - stop - 1), f"row {b}: mask must cover through the EOS"
            assert ids[stop + 1 :] == [PAD] * (R - stop - 1), f"row {b}: PAD expected after the EOS"
            assert gen.ended[b]
            assert gen.response_lists()[b] == ids[:stop], f"row {b}: response_lists keeps the text, drops EOS"
        else:
            assert mask == [1] * R and not gen.ended[b]
            assert gen.response_lists()[b] == ids
        assert torch.all(gen.logprobs[b][~gen.response_mask[b].bool()] == 0), f"row {b}: logprob at PAD must be 0"
    # the prompt side is left-padded
    assert gen.prompt_ids[2].tolist() == [PAD] * 5 + [11] and gen.prompt_mask[2].tolist() == [0] * 5 + [1]


def test_stops_early_when_every_row_is_done():
    model = make_varied_model()
    eos, stop_step = latest_new_token(plain_greedy(model, [5, 3], 6, eos_id=-1))
    gen = generate(model, [[5, 3]] * 3, max_new_tokens=6, eos_id=eos, pad_id=PAD, temperature=0.0)
    # identical rows all stop at stop_step: the loop ends there, R = stop_step + 1 < max_new_tokens
    assert gen.response_ids.shape == (3, stop_step + 1), f"got {tuple(gen.response_ids.shape)} columns"
    assert gen.ended.all() and gen.response_mask.all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, None, None), (1.6, 5, None), (0.9, None, 0.8), (0.0, None, None)])
def test_logprobs_equal_a_fresh_full_forward(device, temperature, top_k, top_p):
    model = make_model(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    gen = generate(model, PROMPTS, max_new_tokens=9, eos_id=EOS, pad_id=PAD, temperature=temperature,
                   top_k=top_k, top_p=top_p, generator=generator)
    ids, mask = gen.sequences()
    P, R = gen.prompt_ids.shape[1], gen.response_ids.shape[1]
    assert ids.shape == (len(PROMPTS), P + R)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits  # (B, P + R, V)
    scale = temperature if temperature > 0 else 1.0  # greedy reports temperature-1 logprobs
    # off-by-one: the logits at position P - 1 + t predict response token t; full distribution (no top-k/p)
    logprobs = F.log_softmax(logits[:, P - 1 : P - 1 + R] / scale, dim=-1)
    expected = logprobs.gather(2, gen.response_ids[..., None]).squeeze(2) * gen.response_mask
    assert_msg = f"logprobs vs full forward (T={temperature}, top_k={top_k}, top_p={top_p})"
    diff = (gen.logprobs - expected).abs()
    assert diff.max() <= TOL[device], f"{assert_msg}: max diff {diff.max():.3g} at {divmod(int(diff.argmax()), R)}"


def test_top_k_1_equals_greedy():
    model = make_model()
    greedy = generate(model, PROMPTS, max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=0.0)
    top1 = generate(model, PROMPTS, max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=1.5, top_k=1,
                    generator=torch.Generator().manual_seed(1))
    assert torch.equal(top1.response_ids, greedy.response_ids), "top_k=1 sampling must pick the argmax"


def test_generator_seeding_is_reproducible():
    model = make_model()
    runs = [
        generate(model, PROMPTS, max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=1.0,
                 generator=torch.Generator().manual_seed(seed))
        for seed in (123, 123, 124)
    ]
    assert torch.equal(runs[0].response_ids, runs[1].response_ids), "same seed, different samples"
    assert torch.equal(runs[0].logprobs, runs[1].logprobs)
    assert not torch.equal(runs[0].response_ids, runs[2].response_ids), "different seeds, same samples"


def test_without_cache_gives_the_same_tokens():
    model = make_model()
    kwargs = dict(max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0.8)
    cached = generate(model, PROMPTS, **kwargs, generator=torch.Generator().manual_seed(5))
    recomputed = generate(model, PROMPTS, **kwargs, generator=torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(cached.response_ids, recomputed.response_ids)
    assert (cached.logprobs - recomputed.logprobs).abs().max() < 1e-5


def test_sampling_frequencies_follow_temperature_and_top_k():
    """One step for 4000 copies of a prompt: the empirical frequencies must match softmax(logits / T),
    renormalised over the top k. A sampler that ignores T or filters wrongly is far outside 5 sigma."""
    model = make_model()
    n = 4000
    with torch.no_grad():
        logits = model(torch.tensor([[5, 3, 8]])).logits[0, -1]  # (V,)
    for temperature, top_k in [(0.5, None), (2.0, None), (1.0, 3)]:
        gen = generate(model, [[5, 3, 8]] * n, max_new_tokens=1, eos_id=EOS, pad_id=PAD,
                       temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(7))
        counts = torch.bincount(gen.response_ids[:, 0], minlength=VOCAB).double()
        probs = F.softmax(filter_logits(logits[None] / temperature, top_k=top_k)[0], dim=-1).double()
        sigma = torch.sqrt(probs * (1 - probs) / n) + 1e-3
        z = ((counts / n - probs).abs() / sigma).max().item()
        assert z < 5, f"T={temperature}, top_k={top_k}: empirical frequencies {z:.1f} sigma from the target"
        if top_k is not None:
            assert counts[probs == 0].sum() == 0, "sampled a token outside the top k"


def test_filter_logits_hand_worked():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]]))
    kept = lambda out: torch.isfinite(out).int().tolist()  # noqa: E731
    # top-p 0.7: probability ranked above each token is [0, 0.5, 0.8] -> keep the two most likely
    assert kept(filter_logits(logits, top_p=0.7)) == [[1, 1, 0], [0, 1, 1]]
    # top-p 0.45: the most likely token alone already reaches it (always kept)
    assert kept(filter_logits(logits, top_p=0.45)) == [[1, 0, 0], [0, 1, 0]]
    assert kept(filter_logits(logits, top_p=0.85)) == [[1, 1, 1], [1, 1, 1]]
    assert kept(filter_logits(logits, top_k=2)) == [[1, 1, 0], [0, 1, 1]]
    # ties with the k-th largest are kept
    assert kept(filter_logits(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), top_k=2)) == [[0, 1, 1, 0]]
    # kept logits are unchanged
    assert torch.equal(filter_logits(logits, top_k=2)[0, :2], logits[0, :2])


def test_training_mode_is_restored_and_dropout_is_off():
    model = make_model(dropout=0.5).train()
    kwargs = dict(max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=0.0)
    in_train_mode = generate(model, PROMPTS, **kwargs)
    assert model.training, "generate() must restore the training mode"
    model.eval()
    in_eval_mode = generate(model, PROMPTS, **kwargs)
    assert not model.training
    assert torch.equal(in_train_mode.response_ids, in_eval_mode.response_ids), "dropout was active while sampling"
    assert torch.equal(in_train_mode.logprobs, in_eval_mode.logprobs)


def test_invalid_arguments():
    model = make_model()  # block_size 32
    with pytest.raises(ValueError, match="block_size"):
        generate(model, [[1] * 30], max_new_tokens=3, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="differ"):
        generate(model, [[1]], max_new_tokens=3, eos_id=PAD, pad_id=PAD)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [[1], []], max_new_tokens=3, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=3, eos_id=EOS, pad_id=PAD, top_p=0.0)
    # exactly block_size is allowed
    gen = generate(model, [[1] * 29], max_new_tokens=3, eos_id=EOS, pad_id=PAD, temperature=0.0)
    assert gen.response_ids.shape[1] <= 3
    assert math.isfinite(gen.logprobs.sum().item())


def test_suppressed_ids_are_never_sampled_and_logprobs_stay_those_of_the_full_distribution():
    # a model that loves the ids 3 and 17: without suppression it samples them often
    model = make_model(seed=3)
    with torch.no_grad():
        model.lm_head.weight[3] += 5.0 * model.lm_head.weight.norm(dim=1).mean()
    prompts = [[5, 3, 8], [7, 7, 2], [11], [4, 20, 13, 2]] * 8
    loose = generate(model, prompts, max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=1.0,
                     generator=torch.Generator().manual_seed(0))
    assert (loose.response_ids[loose.response_mask.bool()] == 3).any(), "the test model should sample id 3 unsuppressed"
    for temperature in (1.0, 0.0):
        out = generate(model, prompts, max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=temperature,
                       generator=torch.Generator().manual_seed(0), suppress_ids=(3, 17, PAD))
        real = out.response_ids[out.response_mask.bool()]
        assert not torch.isin(real, torch.tensor([3, 17, PAD])).any(), f"a suppressed id was sampled (T={temperature})"
        # logprobs: of the FULL distribution (a filter, like top-k), as a fresh forward pass recomputes them
        ids, mask = out.sequences()
        T = temperature or 1.0
        logits = model(ids, attention_mask=mask).logits[:, out.prompt_ids.shape[1] - 1:-1] / T
        expected = F.log_softmax(logits, dim=-1).gather(2, out.response_ids[..., None]).squeeze(2)
        torch.testing.assert_close(out.logprobs, expected * out.response_mask, atol=1e-5, rtol=1e-5)
