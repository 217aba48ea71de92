"""train_rm.py under torchrun: data-parallel reward-model training on 2 CPU processes (Gloo).

* With the same comparisons file, 2 processes train the same reward model as 1: the global batch is
  split over the ranks and each rank's mean loss is weighted (`reward.batch_share`), so DDP's
  averaged gradient is the one of the whole batch; held-out loss and accuracy are added up over
  the ranks' shares.
* A torchrun run that samples its own comparisons writes every output once (rank 0 alone writes).
* The weighting itself, on 2 real processes: unequal halves, and a rank with an empty share (a
  last batch of one comparison), give the gradient one process gets from the whole batch.

The stage (tokenizer, prompts, a random 1-layer "SFT" checkpoint) is test_rm.py's `stage` fixture.
"""

import os
import random

import torch

from minirlhf import world
from minirlhf.checkpoint import load_checkpoint
from minirlhf.data import write_jsonl
from minirlhf.labeling import read_ranked_comparisons
from minirlhf.metrics import read_metrics
from minirlhf.model import GPTConfig, RewardModel
from minirlhf.reward import batch_share, comparison_loss
from minirlhf.runtime import Runtime
from ranks import run_on_ranks, torchrun
from test_rm import TINY, run_script, stage  # noqa: F401  (stage is a pytest fixture)


def write_ranked_file(path, prompts):
    """One comparison per prompt, K = 2, 3 or 4 responses, best first: the right answer, a wrong
    one, a rude one, another prompt's answer (written as they come: no sampling involved)."""
    rng = random.Random(0)
    records = []
    for number, prompt in enumerate(prompts):
        task = world.task_for_prompt(prompt)
        other = world.task_for_prompt(prompts[(number + 7) % len(prompts)])
        responses = [world.good_response(task, rng), world.wrong_response(task, rng), world.rude_response(task, rng),
                     world.good_response(other, rng)][:2 + number % 3]
        records.append({"prompt": prompt, "responses": responses, "ranking": list(range(len(responses)))})
    write_jsonl(str(path), records)


def test_two_processes_train_the_same_rm_as_one_on_a_comparisons_file(stage, tmp_path, monkeypatch, capsys):
    comparisons = tmp_path / "ranked.jsonl"
    write_ranked_file(comparisons, stage["prompts"])
    # 20 prompts, one held out per family: 16 train comparisons. Batches of 5 -> 5, 5, 5, 1: shares
    # of 3 and 2 (the weighting matters), then a batch of one (rank 1 runs a placeholder, weight 0)
    args = ["--preset", "smoke", "--data-dir", stage["data"], "--init", os.path.join(stage["out"], "sft.pt"),
            "--comparisons", str(comparisons), "--batch-size", "5", "--max-new-tokens", "8", "--device", "cpu"]
    code, _, err = run_script(monkeypatch, capsys, args + ["--out-dir", str(tmp_path / "one")])
    assert code == 0, err
    child = torchrun("train_rm.py", 2, *args, "--out-dir", str(tmp_path / "two"), timeout=180)
    assert child.returncode == 0, f"torchrun failed:\n{child.stdout[-2000:]}\n{child.stderr[-3000:]}"

    one, two = (load_checkpoint(tmp_path / name / "rm.pt", kind="rm")["metrics"] for name in ("one", "two"))
    assert one["comparisons/train"] == two["comparisons/train"] == 16
    # Tolerance 1e-5: the two runs add the same terms in a different order, in differently padded
    # batches (each rank pads its share to its own longest row) and through an all-reduce, so they
    # differ by fp32 rounding (~1e-7 relative per operation), which 4 small Adam steps barely grow:
    # measured, 1e-7 on loss/train and 2e-8 on loss/val. A real error is far larger: without the
    # weight (shares of 3 and 2 counted equally) loss/val moves by 2e-4 and the last step's
    # loss/train is halved.
    for key in ("loss/train", "loss/val"):
        assert abs(one[key] - two[key]) < 1e-5, f"{key}: 1 process {one[key]}, 2 processes {two[key]}"
    # accuracy counts the held-out pairs the RM orders right: the same pairs unless two rewards are
    # within float noise of each other, which these random texts are not
    assert abs(one["accuracy/val"] - two["accuracy/val"]) < 1e-9, (one["accuracy/val"], two["accuracy/val"])


def test_torchrun_smoke_run_samples_its_comparisons_and_writes_each_output_once(stage, tmp_path):
    out_dir = tmp_path / "out"
    child = torchrun("train_rm.py", 2, "--preset", "smoke", "--data-dir", stage["data"], "--out-dir", str(out_dir),
                     "--init", os.path.join(stage["out"], "sft.pt"), "--max-new-tokens", "12", "--device", "cpu",
                     timeout=180)
    assert child.returncode == 0, f"torchrun failed:\n{child.stdout[-2000:]}\n{child.stderr[-3000:]}"
    assert child.stdout.count("train_rm\n") == 1, "the config should be printed once (rank 0 alone prints)"
    # the 24 drawn prompts, sampled half on each rank, gathered into one file written once
    comparisons = read_ranked_comparisons(str(out_dir / "rm_comparisons.jsonl"))
    assert len(comparisons) == 24
    ckpt = load_checkpoint(out_dir / "rm.pt", kind="rm")
    # trained on: those that prefer something (a comparison whose responses are all tied is dropped)
    kept = sum(bool(c.preferences()) for c in comparisons)
    assert 0 < kept and ckpt["metrics"]["comparisons/train"] + ckpt["metrics"]["comparisons/val"] == kept
    # one metrics line per step (and step 0's held-out line), not one per rank
    steps = [record["step"] for record in read_metrics(str(out_dir / "rm_metrics.jsonl"))]
    assert steps == list(range(ckpt["step"] + 1)), steps
    for name in ("rm_curves.png", "rm_scatter.png"):
        assert (out_dir / name).exists(), f"{name} was not written"


def test_human_labeler_under_several_processes_is_one_clear_line(stage, tmp_path, monkeypatch, capsys):
    """A person cannot answer N terminals: a one-line error before anything is loaded or sampled.
    (A Runtime that says 2 processes stands in for torchrun: the check happens before any
    collective call.)"""
    import train_rm

    monkeypatch.setattr(train_rm, "setup_runtime",
                        lambda *args, **kwargs: Runtime(torch.device("cpu"), rank=0, world_size=2))
    code, _, err = run_script(monkeypatch, capsys, [
        "--preset", "smoke", "--data-dir", stage["data"], "--out-dir", str(tmp_path), "--device", "cpu",
        "--init", os.path.join(stage["out"], "sft.pt"), "--labeler", "human"])
    assert code == 2 and "--labeler human" in err and "single process" in err, err
    assert len(err.strip().splitlines()) == 1, err


# ---- the loss weighting on 2 real processes ---------------------------------------------------

def random_batch(n, seed=0):
    """n comparisons of 2 to 5 random token lists (ids 1..40, lengths 3..20), best first."""
    rng = random.Random(seed)
    return [[[rng.randrange(1, 41) for _ in range(rng.randint(3, 20))] for _ in range(rng.randint(2, 5))]
            for _ in range(n)]


def weighted_gradients(runtime, batches):
    """For each global batch: this rank's share, weighted, through DDP (`runtime.wrap`); the
    gradient after backward (DDP has averaged it over the ranks), as lists (a tensor sent back
    through the process queue would live in the exiting child's shared memory)."""
    torch.manual_seed(0)
    model = RewardModel(GPTConfig(vocab_size=41, **TINY))
    train_model = runtime.wrap(model)
    gradients = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        share, weight = batch_share(runtime, batch)
        loss, _ = comparison_loss(train_model, share, "ranking", pad_id=0)
        (loss * weight).backward()
        gradients.append({name: p.grad.tolist() for name, p in model.named_parameters()})
    return gradients


def test_global_batch_weighting_gives_one_process_gradient_on_two_ranks():
    # 25 comparisons: shares of 13 and 12 (unequal), each over 32 rows, so DDP sees two forward
    # chunks (`score_rows`) before one backward; then a batch of 1: rank 1 runs a placeholder, weight 0
    batches = [random_batch(25, seed=1), random_batch(1, seed=2)]
    assert min(sum(map(len, batches[0][rank::2])) for rank in range(2)) > 32
    whole = weighted_gradients(Runtime(torch.device("cpu")), batches)
    for rank, halves in enumerate(run_on_ranks(weighted_gradients, 2, batches)):
        for b, (expected, got) in enumerate(zip(whole, halves)):
            for name in expected:
                # the same sums in another order: float rounding only
                torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(expected[name]), rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"rank {rank}, batch {b}, {name}: {m}")
