"""Tests for minirlhf/model.py: the GPT, its masks and KV cache, and the reward/value heads.

Every test builds a tiny seeded model (odd vocabulary, 3 heads of size 8) so a wrong shape or a
transposed head cannot pass by accident. The oracles are independent of the code under test:
a plain GPT-2 forward written from Hugging Face's weight layout, single unpadded rows, full
forwards without the cache, and indices found with Python loops.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from minirlhf.model import (
    GPT,
    MODEL_PRESETS,
    GPTConfig,
    KVCache,
    RewardModel,
    build_attention_mask,
    ValueModel,
    count_parameters,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {"cpu": 1e-5, "cuda": 1e-4}  # docs/design.md: CPU paths 1e-5, CUDA paths 1e-4 (fp32, TF32 off)

VOCAB = 37
PAD = 36


def small_config(**overrides) -> GPTConfig:
    fields = dict(vocab_size=VOCAB, block_size=24, n_layer=2, n_head=3, d_model=24)
    fields.update(overrides)
    return GPTConfig(**fields)


def make_model(seed=0, device="cpu", **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(small_config(**overrides)).to(device)
    # Trap for the tests themselves: at init the logits are nearly flat (weights ~0.02), so many
    # wrong implementations would pass loose checks. Scale the embeddings up to get real structure.
    with torch.no_grad():
        model.wte.weight.mul_(20.0)
        model.wpe.weight.mul_(20.0)
    return model.eval()


def assert_close(actual, expected, tol, what):
    diff = (actual - expected).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    index = tuple(torch.nonzero(diff == diff.max())[0].tolist()) if diff.numel() else ()
    assert worst <= tol, (
        f"{what}: max |difference| {worst:.3g} > {tol:g} at index {index}: "
        f"expected {expected[index].item() if index else expected}, got {actual[index].item() if index else actual}"
    )


# ----------------------------------------------------------------------------------------------
# Parameters, init, tying
# ----------------------------------------------------------------------------------------------


def test_count_parameters_hand_worked():
    # V=10, T=4, d=2, L=1, bias: embeddings 10*2 + 4*2 = 28; block 12*4 + 2*2 + 11*2 = 74; ln_f 2 + 2 = 4
    config = GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, d_model=2)
    assert count_parameters(config) == 106
    # without biases: 28 + (48 + 4) + 2 = 82
    assert count_parameters(GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, d_model=2, bias=False)) == 82
    # GPT-2 small: the famous 124M (124,439,808 with the tied head counted once)
    gpt2 = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768)
    assert count_parameters(gpt2) == 124_439_808


@pytest.mark.parametrize(
    "config",
    [
        small_config(),
        small_config(bias=False),
        GPTConfig(vocab_size=VOCAB, **MODEL_PRESETS["smoke"]),
        GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, d_model=2),
    ],
    ids=["small", "no-bias", "smoke-preset", "hand-worked"],
)
def test_count_parameters_matches_model(config):
    model = GPT(config)
    unique = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    assert count_parameters(config) == unique, f"formula {count_parameters(config)} != model {unique}"


def test_tied_weights_stay_tied_after_a_step():
    model = make_model().train()
    assert model.lm_head.weight is model.wte.weight, "lm_head.weight must be the same Parameter as wte.weight"
    optimizer = model.configure_optimizer(weight_decay=0.1, lr=1e-2, betas=(0.9, 0.95))
    idx = torch.randint(0, VOCAB, (2, 7))
    loss = F.cross_entropy(model(idx).logits.reshape(-1, VOCAB), idx.roll(-1, dims=1).reshape(-1))
    loss.backward()
    before = model.wte.weight.detach().clone()
    optimizer.step()
    assert model.lm_head.weight is model.wte.weight, "a step untied the LM head"
    assert not torch.equal(before, model.wte.weight), "the step did not update the tied weight"
    # a state dict round trip keeps them tied in the new model
    fresh = GPT(small_config())
    fresh.load_state_dict(model.state_dict())
    assert fresh.lm_head.weight is fresh.wte.weight
    assert torch.equal(fresh.lm_head.weight, model.wte.weight)


def test_optimizer_decays_only_2d_weights():
    model = make_model()
    optimizer = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(ids) == len(set(ids)), "a parameter (the tied weight?) appears twice in the optimizer"
    assert len(ids) == len(list(model.parameters()))


def test_freeze_lower_stops_gradients_below_the_first_trainable_block():
    model = make_model()   # 2 blocks
    model.freeze_lower(1)
    frozen = [model.wte, model.wpe, model.blocks[0]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in model.blocks[1].parameters()) and model.ln_f.weight.requires_grad
    optimizer = model.configure_optimizer(weight_decay=0.1, lr=1e-3)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    # the value model's way of using it: hidden states only (the tied LM head is frozen with wte)
    hidden = model(torch.randint(0, model.config.vocab_size, (2, 5)), return_hidden=True).hidden
    hidden.sum().backward()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert all(p.grad is not None for p in model.blocks[1].parameters())
    assert all(p.requires_grad for p in make_model().freeze_lower(0).parameters())   # 0 freezes nothing


def test_gpt2_init_statistics():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, d_model=128)
    model = GPT(config)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)  # 0.00707
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - residual_std) < 0.1 * residual_std, f"{name} std {p.std():.5f}"
        elif p.dim() == 2:
            assert abs(p.std().item() - 0.02) < 0.002, f"{name} std {p.std():.5f}, expected 0.02"
        elif name.endswith("bias"):
            assert torch.all(p == 0), f"{name} should start at 0"
        else:  # LayerNorm gains
            assert torch.all(p == 1), f"{name} should start at 1"


# ----------------------------------------------------------------------------------------------
# The forward pass: an independent plain GPT-2, causality, padding
# ----------------------------------------------------------------------------------------------


def to_hf_gpt2_state(model: GPT) -> dict:
    """Our state dict in Hugging Face GPT-2's layout: `h.{i}.` names, Conv1D (in, out) weights."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        name = name.replace("blocks.", "h.", 1)
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            tensor = tensor.t()
        state[name] = tensor.clone().contiguous()
    return state


def plain_gpt2_logits(hf: dict, idx: torch.Tensor, n_layer: int, n_head: int) -> torch.Tensor:
    """GPT-2 (Radford et al. 2019) written from HF weights with explicit loops over heads. idx (T,) -> (T, V)."""

    def layer_norm(x, prefix):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * hf[prefix + ".weight"] + hf[prefix + ".bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    T = idx.shape[0]
    x = hf["wte.weight"][idx] + hf["wpe.weight"][:T]  # (T, d)
    d = x.shape[1]
    hs = d // n_head
    for i in range(n_layer):
        h = f"h.{i}."
        qkv = layer_norm(x, h + "ln_1") @ hf[h + "attn.c_attn.weight"] + hf[h + "attn.c_attn.bias"]  # (T, 3d)
        q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
        heads = []
        for head in range(n_head):
            cols = slice(head * hs, (head + 1) * hs)
            scores = q[:, cols] @ k[:, cols].T / math.sqrt(hs)  # (T, T)
            for row in range(T):
                scores[row, row + 1 :] = float("-inf")  # causal
            heads.append(torch.softmax(scores, dim=-1) @ v[:, cols])
        attn = torch.cat(heads, dim=1) @ hf[h + "attn.c_proj.weight"] + hf[h + "attn.c_proj.bias"]
        x = x + attn
        m = gelu_tanh(layer_norm(x, h + "ln_2") @ hf[h + "mlp.c_fc.weight"] + hf[h + "mlp.c_fc.bias"])
        x = x + m @ hf[h + "mlp.c_proj.weight"] + hf[h + "mlp.c_proj.bias"]
    return layer_norm(x, "ln_f") @ hf["wte.weight"].T  # tied head


def randomize_every_parameter(model, seed):
    """Large random values everywhere (biases, LayerNorm gains and shifts too), so that every part of
    the architecture -- the GELU's tanh approximation included -- moves the logits visibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


def test_forward_matches_plain_gpt2_reference():
    model = randomize_every_parameter(make_model(), seed=1)
    hf = to_hf_gpt2_state(model)
    idx = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(3))
    expected = plain_gpt2_logits(hf, idx, n_layer=2, n_head=3)
    with torch.no_grad():
        logits = model(idx[None]).logits[0]
    # 2e-5 on logits of size ~3: exact GELU instead of GPT-2's tanh approximation is off by ~6e-4 here
    assert_close(logits, expected, 2e-5, "GPT logits vs plain GPT-2 reference")


def test_from_hf_gpt2_loads_a_local_checkpoint(tmp_path):
    source = randomize_every_parameter(make_model(), seed=2)
    hf = to_hf_gpt2_state(source)
    hf["h.0.attn.bias"] = torch.tril(torch.ones(24, 24))[None, None]  # buffers HF files carry
    torch.save({"transformer." + k: v for k, v in hf.items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(
        json.dumps(dict(vocab_size=VOCAB, n_positions=24, n_layer=2, n_head=3, n_embd=24))
    )
    loaded = GPT.from_hf_gpt2(str(tmp_path)).eval()
    idx = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = loaded(idx[None]).logits[0]
    assert_close(logits, plain_gpt2_logits(hf, idx, 2, 3), 2e-5, "HF-loaded GPT vs plain GPT-2 reference")
    assert loaded.lm_head.weight is loaded.wte.weight


def test_attention_mask_hand_worked():
    # one row [PAD, a, b]. Query 0 is a PAD with no real token at or before it: it would have no key
    # at all (softmax of all -inf = NaN in older torch), so it attends to itself.
    mask = build_attention_mask(torch.tensor([[0, 1, 1]]), T=3, T_past=0)
    expected = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=torch.bool)
    assert mask.shape == (1, 1, 3, 3) and torch.equal(mask[0, 0], expected), f"got\n{mask[0, 0].int()}"
    # the same row with the PAD cached: two new queries at absolute positions 1 and 2
    mask = build_attention_mask(torch.tensor([[0, 1, 1]]), T=2, T_past=1)
    assert torch.equal(mask[0, 0], expected[1:]), f"got\n{mask[0, 0].int()}"
    # every query of a padded batch has at least one key
    ids, attention_mask = padded_batch(ROWS)
    assert build_attention_mask(attention_mask, T=7, T_past=0).any(dim=-1).all()


def test_causality():
    model = make_model()
    idx = torch.randint(0, VOCAB - 1, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(idx).logits
        for j in (0, 4, 9):
            changed = idx.clone()
            changed[:, j] = (changed[:, j] + 1) % (VOCAB - 1)
            logits = model(changed).logits
            assert_close(logits[:, :j], base[:, :j], 1e-6, f"logits before changed token {j}")
            assert (logits[:, j:] - base[:, j:]).abs().amax(dim=-1).min() > 1e-4, (
                f"logits at/after changed token {j} should change"
            )


def test_return_hidden_skips_the_head():
    model = make_model()
    idx = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        full = model(idx)
        hidden_only = model(idx, return_hidden=True)
    assert hidden_only.logits is None
    assert full.hidden.shape == (2, 5, 24)
    assert_close(hidden_only.hidden @ model.wte.weight.T, full.logits, 1e-5, "hidden @ wte.T vs logits")


def padded_batch(rows, pad_id=PAD, side="left"):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(T - len(row), T) if side == "left" else slice(0, len(row))
        ids[b, span] = torch.tensor(row)
        mask[b, span] = 1
    return ids, mask


ROWS = [[5, 3, 8, 1, 2, 9, 4], [7, 7, 2], [11], [4, 0, 30, 2, 2]]  # odd lengths, one single-token row


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.float32])
def test_left_padded_rows_equal_unpadded_rows(device, mask_dtype):
    model = make_model(device=device)
    ids, mask = padded_batch(ROWS)
    with torch.no_grad():
        batch = model(ids.to(device), attention_mask=mask.to(device=device, dtype=mask_dtype)).logits
        assert torch.isfinite(batch).all(), "PAD positions must stay finite (no fully-masked query row)"
        for b, row in enumerate(ROWS):
            alone = model(torch.tensor([row], device=device)).logits[0]  # (len, V)
            assert_close(batch[b, -len(row):], alone, TOL[device], f"row {b} padded vs alone")


def test_right_padded_rows_equal_unpadded_rows():
    model = make_model()
    ids, mask = padded_batch(ROWS, side="right")
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for b, row in enumerate(ROWS):
            alone = model(torch.tensor([row])).logits[0]
            assert_close(batch[b, : len(row)], alone, 1e-5, f"row {b} right-padded vs alone")


def test_padding_keeps_gradients_finite():
    model = make_model().train()
    ids, mask = padded_batch(ROWS)
    out = model(ids, attention_mask=mask).logits
    (out * mask[..., None]).sum().backward()  # PAD positions masked out of the loss, as a loss would
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}: a NaN at a PAD query leaked"


def test_default_position_ids_skip_padding():
    model = make_model()
    ids, mask = padded_batch(ROWS)
    # by hand: row 1 is [PAD x4, 7, 7, 2] -> positions 0 0 0 0 0 1 2
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 1, 2], [0] * 7, [0, 0, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        default = model(ids, attention_mask=mask).logits
        explicit = model(ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(default, explicit), "default position ids differ from cumsum(mask) - 1"


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_matches_full_forward(device):
    model = make_model(device=device)
    idx = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        full = model(idx).logits  # (3, 13, V)
        # prefill 4 tokens, then a chunk of 3 (several queries after a cache: the offset-causal trap),
        # then one token at a time
        out = model(idx[:, :4], use_cache=True)
        pieces = [out.logits]
        out = model(idx[:, 4:7], past_kv=out.past_kv, use_cache=True)
        pieces.append(out.logits)
        for t in range(7, 13):
            out = model(idx[:, t : t + 1], past_kv=out.past_kv, use_cache=True)
            pieces.append(out.logits)
    assert len(out.past_kv) == 2 and out.past_kv[0][0].shape == (3, 3, 13, 8), "past_kv: per layer (B, nh, T, hs)"
    assert_close(torch.cat(pieces, dim=1), full, TOL[device], "incremental (KV cache) vs full logits")


def test_preallocated_kv_cache_is_filled_in_place():
    model = make_model()
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.config, capacity=9)
    with torch.no_grad():
        full = model(idx).logits
        out = model(idx[:, :5], past_kv=cache, use_cache=True)
        assert out.past_kv is cache and cache.seq_len == 5
        buffer = cache.keys[0]
        pieces = [out.logits]
        for t in range(5, 9):
            pieces.append(model(idx[:, t : t + 1], past_kv=cache, use_cache=True).logits)
    assert cache.keys[0] is buffer and buffer.shape[2] == 9, "a cache with enough capacity must not reallocate"
    assert cache.seq_len == 9 and cache[1][1].shape == (2, 3, 9, 8)
    assert_close(torch.cat(pieces, dim=1), full, 1e-5, "preallocated-cache logits vs full logits")


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_with_left_padding_matches_full_forward(device):
    model = make_model(device=device)
    ids, mask = padded_batch(ROWS)  # (4, 7) left-padded prompts
    extra = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6], [5, 3, 5, 8], [9, 7, 9, 3]])  # 4 more tokens per row
    extra_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])  # row 2: PAD after EOS
    all_ids = torch.cat([ids, extra], dim=1).to(device)
    all_mask = torch.cat([mask, extra_mask], dim=1).to(device)
    with torch.no_grad():
        full = model(all_ids, attention_mask=all_mask).logits
        out = model(all_ids[:, :7], attention_mask=all_mask[:, :7], use_cache=True)
        pieces = [out.logits]
        for t in range(7, 11):
            out = model(all_ids[:, t : t + 1], attention_mask=all_mask[:, : t + 1], past_kv=out.past_kv, use_cache=True)
            pieces.append(out.logits)
    incremental = torch.cat(pieces, dim=1)
    real = all_mask.bool()
    assert_close(incremental[real], full[real], TOL[device], "left-padded incremental vs full logits at real tokens")
    assert torch.isfinite(incremental).all()


def test_block_size_guard():
    model = make_model()  # block_size 24
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 25, dtype=torch.long))
    out = model(torch.zeros(1, 20, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 5, dtype=torch.long), past_kv=out.past_kv)
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2), past_kv=out.past_kv)


# ----------------------------------------------------------------------------------------------
# Reward and value models
# ----------------------------------------------------------------------------------------------


def make_reward_model(seed=0):
    torch.manual_seed(seed)
    return RewardModel(small_config()).eval()


def test_reward_head_init():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=3, d_model=1023)
    rm = RewardModel(config)
    expected_std = 1 / math.sqrt(1023 + 1)  # 0.03125
    assert abs(rm.head.weight.std().item() - expected_std) < 0.1 * expected_std
    assert torch.all(rm.head.bias == 0)


def test_reward_is_read_at_the_last_real_token():
    rm = make_reward_model()
    ids, mask = padded_batch(ROWS, side="right")
    with torch.no_grad():
        rewards = rm(ids, attention_mask=mask)  # (B,)
        per_token = rm.forward_all(ids, attention_mask=mask)  # (B, T)
        assert rewards.shape == (len(ROWS),)
        for b, row in enumerate(ROWS):
            last = max(t for t in range(ids.shape[1]) if mask[b, t] == 1)  # plain loop
            assert rewards[b].item() == per_token[b, last].item(), f"row {b}: reward not read at token {last}"
            alone = rm(torch.tensor([row]))[0]
            assert abs(rewards[b].item() - alone.item()) < 1e-5, f"row {b}: padded reward differs from alone"

        # changing a PAD after the last real token changes nothing...
        changed = ids.clone()
        changed[1, -1] = 3  # row 1 = [7, 7, 2, PAD...]: a PAD position
        assert torch.equal(rm(changed, attention_mask=mask), rewards)
        # ...changing the last real token changes the reward
        changed = ids.clone()
        changed[1, 2] = 3
        assert abs(rm(changed, attention_mask=mask)[1].item() - rewards[1].item()) > 1e-6


def test_reward_left_padded_equals_right_padded():
    rm = make_reward_model()
    with torch.no_grad():
        left = rm(*padded_batch(ROWS, side="left"))
        right = rm(*padded_batch(ROWS, side="right"))
    assert_close(left, right, 1e-5, "reward of left- vs right-padded rows")


def test_reward_rejects_a_row_without_tokens():
    rm = make_reward_model()
    with pytest.raises(ValueError, match="no real token"):
        rm(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0], [0, 0, 0]]))


def test_value_head_is_zero_at_init():
    torch.manual_seed(0)
    vm = ValueModel(small_config())
    ids, mask = padded_batch(ROWS)
    values = vm(ids, attention_mask=mask)
    assert values.shape == ids.shape
    assert torch.all(values == 0), "the value head must start at exactly zero"


def test_value_model_from_reward_model_is_an_independent_copy():
    rm = make_reward_model(seed=5)
    vm = ValueModel.from_reward_model(rm).eval()
    ids, mask = padded_batch(ROWS)
    with torch.no_grad():
        assert torch.equal(vm(ids, attention_mask=mask), rm.forward_all(ids, attention_mask=mask))
        vm.head.bias.add_(1.0)
        vm.trunk.wte.weight.mul_(2.0)
    assert torch.all(rm.head.bias == 0), "ValueModel.from_reward_model shares the head with the RM"
    assert not torch.equal(vm.trunk.wte.weight, rm.trunk.wte.weight), "the trunk is shared, not copied"


def test_gpt_checkpoint_loads_into_scalar_models():
    gpt = make_model(seed=7)
    ids, mask = padded_batch(ROWS)
    torch.manual_seed(0)
    rm, vm = RewardModel(small_config()).eval(), ValueModel(small_config()).eval()
    rm.trunk.load_state_dict(gpt.state_dict())
    vm.trunk.load_state_dict(gpt.state_dict())
    with torch.no_grad():
        hidden = gpt(ids, attention_mask=mask).hidden
        assert_close(rm.forward_all(ids, mask), rm.head(hidden).squeeze(-1), 1e-5, "RM on loaded trunk")
        assert_close(vm(ids, mask), vm.head(hidden).squeeze(-1), 1e-5, "value model on loaded trunk")
