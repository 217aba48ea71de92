"""PPO under torchrun: 2 CPU processes joined by Gloo (tests/ranks.py starts them).

A whole data-parallel run cannot reproduce a single-process run: each rank samples its share of
the prompts with its own dice (`Runtime.generator`: seed + rank * stride), so the responses, and
with them every metric, differ from one process's. The exact equivalence is therefore checked
function by function, on the SAME experience:

* `masked_whiten(..., all_reduce=...)` of two ranks' halves is `masked_whiten` of the whole batch;
* a PPO update on 2 ranks, each holding half the rows of one fixed rollout, leaves the policy and
  the critic where one process's update on the whole rollout leaves them, and logs the same
  stats, when the minibatches correspond (rank r's minibatch j = its rows of the single process's
  minibatch j). The update is train_ppo.py's epochs x minibatches from the same minirlhf.ppo pieces
  (`token_share`, `optimizer_step`, `minibatch_stats`), as tests/test_ppo.py's `ppo_update` writes
  it. The ranks' minibatches hold different numbers of tokens, so a mean of the ranks' means
  (instead of the mean over every token) would fail it;
* the first minibatch's ratio is still exactly 1 under DDP, in fp32 and in bf16.

Then the script: `torchrun --nproc_per_node=2 train_ppo.py --preset smoke` exits 0, rank 0 alone
prints and writes (one metrics line per logged step), its metrics are finite and have a single
process's keys, and its checkpoint holds each rank's sampling state (for --resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from minirlhf.checkpoint import load_checkpoint
from minirlhf.generate import generate
from minirlhf.losses import masked_whiten
from minirlhf.ppo import Rollout, minibatch_orders, restore_sample_generator
from minirlhf.runtime import Runtime
from ranks import ROOT, run_on_ranks, torchrun
from test_ppo import (EOS, PAD, compute_advantages, forward_rollout, ppo_update, tiny_world,  # noqa: F401 (a fixture)
                      toy_critic, toy_gpt)

WORLD = 2
B = 8                      # rows of the fixed rollout: 4 per rank
NUM_MINIBATCHES, EPOCHS = 2, 2
LR = 0.1                   # plain SGD (see `update`)


# ---------------------------------------------------------------------------------------------
# The fixed experience both sides train on (built the same way in the parent and the ranks)
# ---------------------------------------------------------------------------------------------


def rank_rows(rank: int) -> torch.Tensor:
    """The rows of the batch that rank `rank` holds: every WORLD-th one (as `Runtime.shard`)."""
    return torch.arange(B)[rank::WORLD]


def rows_of(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The rollout restricted to `rows` (every per-row tensor indexed, nothing trimmed)."""
    parts = {}
    for field in dataclasses.fields(Rollout):
        value = getattr(rollout, field.name)
        parts[field.name] = value[rows] if isinstance(value, torch.Tensor) else value
    return Rollout(**parts)


def fixed_rollout() -> tuple[Rollout, list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """One rollout of B rows (prompts and responses of different lengths), its advantages, and the
    minibatches: `local_orders` (each rank's, over its B / WORLD rows, drawn from a generator every
    rank shares, as train_ppo.py does) and `global_orders` (the single process's: minibatch j is
    the union of the ranks' minibatches j)."""
    policy = toy_gpt(0)
    critic = toy_critic(1, policy.config)
    prompts = [[1, 2, 3], [4], [2, 5], [3, 3, 1, 2], [5], [1, 4, 2], [2], [4, 4, 5, 1, 3]]
    generation = generate(policy, prompts, max_new_tokens=6, eos_id=EOS, pad_id=PAD,
                          generator=torch.Generator().manual_seed(0))
    scores = torch.randn(B, generator=torch.Generator().manual_seed(1))
    local_orders = minibatch_orders(B // WORLD, NUM_MINIBATCHES, EPOCHS, torch.Generator().manual_seed(2))
    global_orders = [[torch.cat([rank_rows(r)[m] for r in range(WORLD)]) for m in epoch] for epoch in local_orders]
    rollout = Rollout.from_generation(generation, scores)
    forward_rollout(rollout, policy, policy, critic, temperature=1.0, minibatches=global_orders[0])
    rollout.rewards, rollout.kl, rollout.advantages, rollout.returns = compute_advantages(
        rollout.scores, rollout.logprobs, rollout.ref_logprobs, rollout.values, rollout.response_mask, kl_coef=0.1)
    return rollout, local_orders, global_orders


def update(policy, critic, rollout, orders, runtime=None):
    """One PPO update (tests/test_ppo.py's `ppo_update`) with fresh SGD optimizers; returns its stats.

    SGD, not Adam: Adam divides each gradient entry by its own size, so an entry that is 0 in exact
    arithmetic and float noise in practice (the attention's key bias: softmax ignores a shift that
    every key shares) becomes a full lr-sized step, in a direction set by the noise. SGD's step is
    linear in the gradient: equal gradients give equal parameters."""
    policy_optimizer = torch.optim.SGD(policy.parameters(), lr=LR)
    value_optimizer = torch.optim.SGD(critic.parameters(), lr=LR)
    if runtime is not None:
        policy, critic = runtime.wrap(policy), runtime.wrap(critic)
    return ppo_update(rollout, policy, critic, policy_optimizer, value_optimizer, orders=orders, temperature=1.0,
                      clip_range=0.2, clip_range_value=0.2, runtime=runtime)


def first_minibatch_under_ddp(runtime: Runtime, rollout: Rollout, orders) -> dict:
    """This rank's rows, its own forward passes, global whitening, then a DDP update: the stats of
    the update's first minibatch."""
    policy = runtime.prepare(toy_gpt(0))
    critic = runtime.prepare(toy_critic(1, policy.config))
    forward_rollout(rollout, policy, policy, critic, temperature=1.0, minibatches=orders[0])
    rollout.rewards, rollout.kl, rollout.advantages, rollout.returns = compute_advantages(
        rollout.scores, rollout.logprobs, rollout.ref_logprobs, rollout.values, rollout.response_mask, kl_coef=0.1,
        all_reduce=runtime.all_reduce_sum)
    return update(policy, critic, rollout, orders, runtime)["minibatch_stats"][0]


def rank_work(runtime: Runtime, x: torch.Tensor, mask: torch.Tensor, rollout: Rollout, local_orders) -> dict:
    """Everything the tests below need from one rank (one pair of processes for the whole module).
    `rollout` is the parent's whole rollout: this rank keeps its rows of it."""
    rows = rank_rows(runtime.rank)
    whitened = masked_whiten(x[rows], mask[rows], all_reduce=runtime.all_reduce_sum)

    mine = rows_of(rollout, rows)
    policy = toy_gpt(0)
    critic = toy_critic(1, policy.config)
    stats = update(policy, critic, mine, local_orders, runtime)
    tokens = [[mine.response_mask[m].sum().item() for m in epoch] for epoch in local_orders]

    first = {dtype: first_minibatch_under_ddp(dataclasses.replace(runtime, dtype=dtype), rows_of(rollout, rows),
                                              local_orders) for dtype in ("fp32", "bf16")}
    # tensors as nested lists: a tensor sent back through the queue would be shared memory, gone
    # with the process that made it (float32 -> Python float -> float32 is exact)
    return {"whitened": whitened.tolist(), "policy": {k: v.tolist() for k, v in policy.state_dict().items()},
            "critic": {k: v.tolist() for k, v in critic.state_dict().items()},
            "stats": stats["minibatch_stats"], "tokens": tokens, "first": first}


@contextlib.contextmanager
def one_torch_thread():
    """One torch thread, as the ranks run (tests/ranks.py): the same float summation order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def experience():
    with one_torch_thread():
        return fixed_rollout()


@pytest.fixture(scope="module")
def whiten_input():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(B, 7, generator=generator) * 3 + 1
    lengths = torch.tensor([7, 1, 4, 0, 3, 6, 2, 5])
    mask = (torch.arange(7) < lengths[:, None]).float()   # (B, 7): rows of 0..7 valid entries
    return x, mask


@pytest.fixture(scope="module")
def ranks(whiten_input, experience):
    rollout, local_orders, _ = experience
    return run_on_ranks(rank_work, WORLD, *whiten_input, rollout, local_orders)


@pytest.fixture(scope="module")
def one_process(experience):
    rollout, _, global_orders = experience
    policy = toy_gpt(0)
    critic = toy_critic(1, policy.config)
    with one_torch_thread():
        stats = update(policy, critic, rollout, global_orders)
    return {"policy": policy.state_dict(), "critic": critic.state_dict(), "stats": stats["minibatch_stats"]}


# ---------------------------------------------------------------------------------------------
# Function level: exact equivalence on the same experience
# ---------------------------------------------------------------------------------------------


def test_global_whitening_of_two_halves_is_the_whole_batchs(ranks, whiten_input):
    x, mask = whiten_input
    expected = masked_whiten(x, mask)
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(torch.tensor(result["whitened"]), expected[rank_rows(rank)], atol=1e-6, rtol=0,
                                   msg=f"rank {rank}: its rows whitened with the global statistics")


def test_two_ranks_update_the_models_as_one_process_does(ranks, one_process):
    tokens = [result["tokens"] for result in ranks]
    assert tokens[0] != tokens[1], "the test needs ranks whose minibatches hold different numbers of tokens"
    # Tolerance: the two sides differ only in the order of float32 additions (each rank sums its
    # tokens, then DDP adds the two ranks' gradients), ~1e-7 relative per gradient entry. After
    # these 4 SGD steps (lr 0.1) the parameters were measured to differ by at most 3e-8, so 1e-5
    # leaves room; a wrong normalisation (each rank's plain token mean, i.e. a mean of the ranks'
    # means) was measured to move them by 2e-2, far outside it.
    for name in ("policy", "critic"):
        for key, expected in one_process[name].items():
            for rank, result in enumerate(ranks):
                torch.testing.assert_close(torch.tensor(result[name][key]), expected, atol=1e-5, rtol=0,
                                           msg=f"rank {rank}: {name} {key} after the update")
    for j, expected in enumerate(one_process["stats"]):
        for rank, result in enumerate(ranks):
            for key, value in expected.items():
                assert result["stats"][j][key] == pytest.approx(value, rel=1e-5, abs=1e-6), \
                    f"rank {rank}, minibatch {j}: {key} (a mean over every rank's tokens)"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_first_minibatch_ratio_is_exactly_one_under_ddp(ranks, dtype):
    for rank, result in enumerate(ranks):
        first = result["first"][dtype]
        assert first["policy/ratio_mean"] == 1.0 and first["policy/ratio_max"] == 1.0, f"rank {rank}: {first}"
        assert first["policy/approxkl"] == 0.0 and first["policy/clipfrac"] == 0.0, f"rank {rank}: {first}"


# ---------------------------------------------------------------------------------------------
# The script under torchrun
# ---------------------------------------------------------------------------------------------


def metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def smoke_runs(tiny_world, tmp_path_factory):  # noqa: F811 (the fixture imported from test_ppo)
    """`train_ppo.py --preset smoke` in one process and under torchrun with 2, from the same world."""
    root = tmp_path_factory.mktemp("ppo_ddp")
    outs = {name: root / name for name in ("one", "two")}
    for out in outs.values():
        out.mkdir()
        for name in ("sft.pt", "rm.pt"):
            shutil.copy(os.path.join(tiny_world["out"], name), out / name)
    args = ["--preset", "smoke", "--data-dir", tiny_world["data"], "--device", "cpu"]
    one = subprocess.run([sys.executable, "train_ppo.py", *args, "--out-dir", str(outs["one"])], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    two = torchrun("train_ppo.py", WORLD, *args, "--out-dir", str(outs["two"]))
    return outs, one, two


def test_torchrun_smoke_runs_and_rank_zero_alone_writes(smoke_runs):
    outs, one, two = smoke_runs
    assert one.returncode == 0, f"one process failed:\n{one.stdout[-2000:]}\n{one.stderr[-3000:]}"
    assert two.returncode == 0, f"torchrun failed:\n{two.stdout[-2000:]}\n{two.stderr[-3000:]}"
    lines = two.stdout.splitlines()
    assert lines.count("train_ppo") == 1, "the config is printed once (by rank 0)"
    assert two.stdout.count("wrote ") == 1 and "data parallel: 2 processes x 4 prompts" in two.stdout
    for name in ("ppo.pt", "ppo_metrics.jsonl", "ppo_curves.png", "ppo_overopt.png"):
        assert (outs["two"] / name).exists(), f"{name} was not written"

    records = metrics(outs["two"] / "ppo_metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3], "one line per logged step: one writer"
    for record in records:
        for key, value in record.items():
            assert isinstance(value, (int, float)) and math.isfinite(value), f"step {record['step']}: {key} = {value}"
    reference = metrics(outs["one"] / "ppo_metrics.jsonl")
    assert [list(r) for r in records] == [list(r) for r in reference], "the metric names of a single-process run"
    assert records[1]["objective/kl"] == 0.0, "the first rollout comes from the reference itself: KL 0"


def test_torchrun_checkpoint_keeps_every_ranks_sampling_dice(smoke_runs):
    outs, _, two = smoke_runs
    assert two.returncode == 0, "the torchrun run failed (see the test above)"
    ckpt = load_checkpoint(outs["two"] / "ppo.pt", kind="ppo")
    states = ckpt["sample_rng_states"]
    assert len(states) == WORLD and not torch.equal(states[0], states[1]), "each rank's own sampling state"
    assert torch.equal(ckpt["sample_rng_state"], states[0]), "rank 0's, where older readers look"
    one = load_checkpoint(outs["one"] / "ppo.pt", kind="ppo")
    assert len(one["sample_rng_states"]) == 1


def test_resume_restores_each_ranks_own_dice_and_falls_back_with_another_world_size():
    states = [torch.Generator().manual_seed(seed).get_state() for seed in (10, 11)]
    expected = [torch.Generator().manual_seed(seed).get_state() for seed in (10, 11)]
    for rank in range(2):   # same world size: each rank its own
        generator = torch.Generator().manual_seed(99)
        restore_sample_generator(generator, {"sample_rng_states": states},
                                 Runtime(torch.device("cpu"), rank=rank, world_size=2))
        assert torch.equal(generator.get_state(), expected[rank]), f"rank {rank} restores its own state"
    # written by one process (or before per-rank states existed), resumed by two: rank 1 keeps its fresh stream
    fresh = torch.Generator().manual_seed(99)
    restore_sample_generator(fresh, {"sample_rng_state": states[0]},
                             Runtime(torch.device("cpu"), rank=1, world_size=2))
    assert torch.equal(fresh.get_state(), torch.Generator().manual_seed(99).get_state())
    restored = torch.Generator().manual_seed(99)
    restore_sample_generator(restored, {"sample_rng_state": states[0]},
                             Runtime(torch.device("cpu"), rank=0, world_size=2))
    assert torch.equal(restored.get_state(), expected[0])
