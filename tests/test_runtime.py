"""minirlhf/runtime.py: the one place where devices, precision and processes are decided.

* No other file makes a `torch.Generator` or picks a device for one: the first GPU run crashed at
  its first sample because train_base.py made its sampling generator on the CPU ("Expected a
  'cuda' device type for generator but found 'cpu'"). The scan below would have caught it.
* bf16: the transformer runs under autocast, but the hidden states, logprobs and GAE come out fp32,
  and the LM head is never computed in bf16.
* The reductions, on two real Gloo processes: sums, means, gathers and shards agree with what one
  process computes on the whole batch.
* On CUDA (skipped without one): a model prepared by the runtime samples with the runtime's dice.
"""

import ast
import os
import random

import numpy as np
import pytest
import torch

from minirlhf.generate import generate
from minirlhf.kernels import gae, token_logprobs
from minirlhf.model import GPT, GPTConfig
from minirlhf.runtime import Runtime, resolve_device, resolve_dtype, seed_everything
from minirlhf.cli import UserError
from ranks import run_on_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def project_sources():
    """Every .py file a user runs or imports: the scripts, the library, data/ and experiments/."""
    for folder in ("", "minirlhf", "minirlhf/kernels", "data", "experiments"):
        directory = os.path.join(ROOT, folder)
        if os.path.isdir(directory):
            for name in sorted(os.listdir(directory)):
                if name.endswith(".py"):
                    yield os.path.join(folder, name)


def test_only_the_runtime_makes_generators():
    offenders = []
    for path in project_sources():
        if path == os.path.join("minirlhf", "runtime.py"):
            continue
        tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Generator" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                offenders.append(f"{path}:{node.lineno}")
    assert not offenders, ("make generators with Runtime.generator / Runtime.cpu_generator (the device is then "
                           f"the model's), not torch.Generator: {offenders}")


def test_generators_live_on_the_runtime_device_and_differ_by_rank():
    rank0, rank1 = Runtime(CPU, rank=0, world_size=2), Runtime(CPU, rank=1, world_size=2)
    assert rank0.generator(5).device == CPU
    a = torch.rand(4, generator=rank0.generator(5))
    b = torch.rand(4, generator=rank1.generator(5))
    shared = torch.rand(4, generator=rank1.generator(5, shared=True))
    assert not torch.equal(a, b)            # each rank its own dice...
    assert torch.equal(a, shared)           # ...unless asked to share (rank 0's stream)
    assert torch.equal(torch.rand(4, generator=rank0.cpu_generator(3)), torch.rand(4, generator=rank1.cpu_generator(3)))
    # one process: rank 0's seed is the seed itself, so single-process runs are unchanged
    assert torch.equal(torch.rand(4, generator=rank0.generator(5)), torch.rand(4, generator=torch.manual_seed(5)))


def test_resolve_dtype():
    assert resolve_dtype("auto", CPU) == "fp32"
    assert resolve_dtype("bf16", CPU) == "bf16"   # CPU autocast supports bf16: the tests use it
    assert resolve_dtype("fp32", CPU) == "fp32"
    with pytest.raises(UserError, match="--dtype"):
        resolve_dtype("fp16", CPU)


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, d_model=32))


def test_bf16_runs_the_blocks_in_bf16_but_hands_out_fp32():
    model = tiny_model()
    idx = torch.randint(0, 97, (3, 20), generator=torch.manual_seed(1))
    fp32_hidden = model(idx, return_hidden=True).hidden
    Runtime(CPU, dtype="bf16").prepare(model)
    out = model(idx, return_hidden=True)
    assert out.hidden.dtype == torch.float32
    # bf16 matmuls change the hidden states by about bf16's resolution (2^-8 relative), no more
    difference = (out.hidden - fp32_hidden).abs().max().item()
    assert 0 < difference < 0.1, difference
    # the LM head on those hidden states is fp32 even when the caller is inside an autocast region
    targets = idx[:, 1:]
    hidden = out.hidden[:, :-1]
    exact = torch.log_softmax(hidden.double() @ model.lm_head.weight.double().T, -1).gather(-1, targets[..., None])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs = token_logprobs(hidden, model.lm_head.weight, targets)
    assert logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs.double(), exact.squeeze(-1), atol=1e-5, rtol=0)
    # and the gradients still reach the fp32 weights
    logprobs.sum().backward()
    assert model.blocks[0].attn.c_attn.weight.grad.dtype == torch.float32


def test_gae_is_fp32_under_autocast():
    rewards = torch.randn(4, 70, generator=torch.manual_seed(2))
    values = torch.randn(4, 70, generator=torch.manual_seed(3))
    mask = torch.ones(4, 70)
    expected = gae(rewards, values, mask, 1.0, 0.95)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gae(rewards, values, mask, 1.0, 0.95)
    for e, g in zip(expected, got):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, atol=0, rtol=0)


def test_prepared_model_samples_with_runtime_dice_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    runtime = Runtime(torch.device("cuda"), dtype=resolve_dtype("auto", torch.device("cuda")))
    model = runtime.prepare(tiny_model()).eval()
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=5, eos_id=0, pad_id=96,
                   generator=runtime.generator(0))
    assert out.response_ids.device.type == "cuda"


# ----------------------------------------------------------------------------------------------
# Reductions on two real processes (Gloo), as torchrun starts them


def _reductions(runtime):
    rows = list(range(10))
    mine = runtime.shard(rows)
    total = runtime.all_reduce_sum(torch.tensor([float(sum(mine)), float(len(mine))]))
    return {"shard": mine, "sum": total.tolist(), "gathered": runtime.gather_objects([f"r{runtime.rank}"]),
            "mean": runtime.mean_over_ranks({"x": float(runtime.rank), "name": "kept"}),
            "sums": runtime.sum_over_ranks(1.0, float(runtime.rank)), "main": runtime.is_main}


def test_reductions_on_two_processes():
    rank0, rank1 = run_on_ranks(_reductions, 2)
    assert rank0["shard"] == [0, 2, 4, 6, 8] and rank1["shard"] == [1, 3, 5, 7, 9]   # a partition
    assert rank0["sum"] == rank1["sum"] == [45.0, 10.0]
    assert rank0["gathered"] == rank1["gathered"] == ["r0", "r1"]
    assert rank0["mean"] == rank1["mean"] == {"x": 0.5, "name": "kept"}
    assert rank0["sums"] == [2.0, 1.0]
    assert rank0["main"] and not rank1["main"]


def test_one_process_reductions_are_the_identity():
    runtime = Runtime(CPU)
    assert runtime.shard([1, 2, 3]) == [1, 2, 3]
    assert runtime.sum_over_ranks(2.0, 3.0) == [2.0, 3.0]
    assert runtime.mean_over_ranks({"a": 1.5}) == {"a": 1.5}
    assert runtime.wrap(tiny_model()).__class__ is GPT


# --------------------------------------------------------------------------------------------------
# device and seeds


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(UserError, match="tpu"):
        resolve_device("tpu")


def test_resolve_device_auto_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    seed_everything(1234)
    first = draw()
    seed_everything(1234)
    assert draw() == first, "same seed must give the same numbers from random, numpy and torch"
    seed_everything(1235)
    assert draw() != first
