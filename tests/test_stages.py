"""Tests for the first stages: the training helpers they share (minirlhf/training.py) and the
scripts data/prepare.py, train_base.py and train_sft.py run end to end with `--preset smoke`.

training.py:
* `cosine_lr`: hand-computed values of the warmup + cosine schedule;
* `lm_loss` (LM head fused into the logprob kernel) equals `losses.sft_loss` on explicit logits,
  value and gradient, with a loss mask and padding;
* `response_logprobs` equals a plain full forward + log_softmax(logits / temperature) + gather at
  positions P - 1 + t (the off-by-one every RL stage relies on), and is 0 at PAD.

Scripts (real subprocesses with `sys.executable`, OMP_NUM_THREADS=1): one smoke data dir and one
base -> SFT run per session; outputs exist (checkpoint, metrics JSONL with the expected keys, curves
PNG); checkpoints load with the right kind and tokenizer; the config is recorded. Bad input gets
one line on stderr starting with "error:", a non-zero exit, no traceback, and nothing already
written is damaged (the error cases run `main()` in-process through `run_main`, which is what the
command line does, to save the interpreter start-up; the corrupt-checkpoint case is a subprocess).
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minirlhf.checkpoint import load_checkpoint, save_checkpoint
from minirlhf.cli import UserError
from minirlhf.losses import sft_loss
from minirlhf.model import GPT, GPTConfig
from minirlhf.tokenizer import Tokenizer
from minirlhf.training import cosine_lr, lm_loss, response_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_base  # noqa: E402
import train_sft  # noqa: E402
from helpers import assert_one_error_line, load_script, run_in_process  # noqa: E402  (tests/helpers.py)


# ----------------------------------------------------------------------------------------------
# training.py: cosine_lr


def test_training_cosine_lr_hand_values():
    # lr 1.0, 4 warmup steps, 12 steps in all, min_lr 0.1
    #   warmup: lr * (step + 1) / 4            -> 0.25, 0.5, 0.75, 1.0 at steps 0..3
    #   decay:  progress = (step - 4) / (12 - 4); min + 0.5 (lr - min)(1 + cos(pi progress))
    #     step 4: progress 0   -> 1.0
    #     step 6: progress 1/4 -> 0.1 + 0.45 (1 + cos(pi/4)) = 0.1 + 0.45 * 1.70711 = 0.86820
    #     step 8: progress 1/2 -> 0.1 + 0.45 = 0.55
    #     step 12: progress 1  -> 0.1, and it stays there
    def lr_at(step):
        return cosine_lr(step, total_steps=12, lr=1.0, warmup_steps=4, min_lr=0.1)

    assert [lr_at(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(4) == pytest.approx(1.0)
    assert lr_at(6) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(8) == pytest.approx(0.55)
    assert lr_at(12) == pytest.approx(0.1)
    assert lr_at(20) == pytest.approx(0.1), "past total_steps the lr stays at min_lr"
    decay = [lr_at(s) for s in range(4, 13)]
    assert all(a >= b for a, b in zip(decay, decay[1:])), f"the cosine decay should not increase: {decay}"


def test_training_cosine_lr_without_warmup():
    assert cosine_lr(0, total_steps=10, lr=3e-4, warmup_steps=0, min_lr=3e-5) == pytest.approx(3e-4)
    assert cosine_lr(5, total_steps=10, lr=3e-4, warmup_steps=0, min_lr=3e-5) == pytest.approx(1.65e-4)


# ----------------------------------------------------------------------------------------------
# training.py: lm_loss and response_logprobs against plain references

VOCAB = 23


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=24, n_layer=1, n_head=2, d_model=16))
    return model.eval()


def test_training_lm_loss_equals_sft_loss_on_logits():
    model = tiny_gpt()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, VOCAB, (3, 7), generator=generator)
    targets = torch.randint(0, VOCAB, (3, 7), generator=generator)
    attention_mask = torch.ones(3, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0                                  # right padding on row 1
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0],
                              [0, 1, 1, 1, 1, 0, 0],
                              [1, 1, 1, 1, 1, 1, 1]])
    targets[1, 5:] = -100                                      # junk at masked targets must not matter

    fused = lm_loss(model, inputs, targets, loss_mask, attention_mask)
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    logits = model(inputs, attention_mask=attention_mask).logits   # (B, T, V)
    plain = sft_loss(logits, targets, loss_mask)
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))

    assert fused.item() == pytest.approx(plain.item(), abs=1e-5), f"lm_loss {fused.item()} != sft_loss {plain.item()}"
    for (name, _), a, b in zip(model.named_parameters(), fused_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-5), f"gradient of {name} differs: max {(a - b).abs().max():.2e}"

    # no mask: every target counts (pretraining)
    targets = targets.clamp(min=0)
    no_mask = lm_loss(model, inputs, targets)
    plain = F.cross_entropy(model(inputs).logits.reshape(-1, VOCAB), targets.reshape(-1))
    assert no_mask.item() == pytest.approx(plain.item(), abs=1e-5)


def plain_response_logprobs(model, sequences, attention_mask, prompt_len, temperature):
    """Full forward, log_softmax(logits / T), then a Python loop: the logits that predict response
    token t sit at position P - 1 + t. PAD positions get 0."""
    logits = model(sequences, attention_mask=attention_mask).logits            # (B, P+R, V)
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
    probs = log_probs.exp()
    B, total = sequences.shape
    R = total - prompt_len
    logprobs = torch.zeros(B, R, dtype=torch.float64)
    entropy = torch.zeros(B, R, dtype=torch.float64)
    for b in range(B):
        for t in range(R):
            if attention_mask[b, prompt_len + t]:
                position = prompt_len - 1 + t
                logprobs[b, t] = log_probs[b, position, sequences[b, prompt_len + t]]
                entropy[b, t] = -(probs[b, position] * log_probs[b, position]).sum()
    return logprobs, entropy


def test_training_response_logprobs_match_a_plain_forward():
    model = tiny_gpt(seed=3)
    generator = torch.Generator().manual_seed(2)
    P, R, pad = 5, 6, 0
    prompt_lengths, response_lengths = [5, 3, 1], [6, 2, 4]
    sequences = torch.full((3, P + R), pad, dtype=torch.long)
    attention_mask = torch.zeros(3, P + R, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        sequences[b, P - p:P + r] = torch.randint(1, VOCAB, (p + r,), generator=generator)   # left-padded prompt,
        attention_mask[b, P - p:P + r] = 1                                                   # right-padded response
    temperature = 0.7   # != 1: the logits are divided by the sampling temperature

    logprobs, entropy = response_logprobs(model, sequences, attention_mask, P, temperature, return_entropy=True)
    expected, expected_entropy = plain_response_logprobs(model, sequences, attention_mask, P, temperature)
    assert logprobs.shape == (3, R)
    response_mask = attention_mask[:, P:].bool()
    assert torch.allclose(logprobs.double(), expected, atol=1e-5), (
        f"response logprobs differ from log_softmax(logits / T) at P - 1 + t: max {(logprobs - expected).abs().max():.2e}")
    assert torch.all(logprobs[~response_mask] == 0), "logprobs at PAD positions should be 0"
    assert torch.allclose(entropy.double()[response_mask], expected_entropy[response_mask], atol=1e-5)

    # temperature matters: with T = 1 the values change (so the test above really checked the division)
    at_one = response_logprobs(model, sequences, attention_mask, P, 1.0)
    assert not torch.allclose(at_one[response_mask], logprobs[response_mask], atol=1e-3)


# ----------------------------------------------------------------------------------------------
# The stage scripts, end to end with --preset smoke


def child_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("MPLBACKEND", None)
    return env


def run_script(*args, check=True):
    """`python SCRIPT ARGS...` in a subprocess; returns the CompletedProcess."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """data/prepare.py, train_base.py and train_sft.py with --preset smoke, once for this module."""
    root = tmp_path_factory.mktemp("stages")
    data_dir, out_dir = str(root / "data"), str(root / "out")
    outputs = {
        "prepare": run_script("data/prepare.py", "--preset", "smoke", "--data-dir", data_dir),
        "base": run_script("train_base.py", "--preset", "smoke", "--data-dir", data_dir, "--out-dir", out_dir),
        "sft": run_script("train_sft.py", "--preset", "smoke", "--data-dir", data_dir, "--out-dir", out_dir),
    }
    tokenizer = Tokenizer.from_file(os.path.join(data_dir, "tokenizer.tiktoken"))
    return {"root": root, "data": data_dir, "out": out_dir, "outputs": outputs, "tokenizer": tokenizer}


def read_metrics_file(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_stages_prepare_writes_every_data_file(smoke):
    for name in ("corpus.txt", "sft.jsonl", "rm_prompts.jsonl", "ppo_prompts.jsonl", "eval_prompts.jsonl",
                 "tokenizer.tiktoken", "manifest.json"):
        path = os.path.join(smoke["data"], name)
        assert os.path.getsize(path) > 0, f"prepare.py did not write {name}"
    assert "wrote" in smoke["outputs"]["prepare"].stdout


def test_stages_prepare_is_deterministic_across_processes(smoke, tmp_path, monkeypatch):
    """The same seed in another process (another PYTHONHASHSEED) gives byte-identical files."""
    prepare = load_script("prepare_stage_test", "data/prepare.py")
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--preset", "smoke", "--data-dir", str(tmp_path)])
    prepare.main()
    for name in ("corpus.txt", "sft.jsonl", "eval_prompts.jsonl", "tokenizer.tiktoken", "manifest.json"):
        with open(os.path.join(smoke["data"], name), "rb") as f, open(tmp_path / name, "rb") as g:
            assert f.read() == g.read(), f"{name} differs between two processes with the same seed"


@pytest.mark.parametrize("stage", ["base", "sft"])
def test_stages_outputs_exist(smoke, stage):
    for suffix in (".pt", "_metrics.jsonl", "_curves.png"):
        path = os.path.join(smoke["out"], stage + suffix)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, f"missing output {path}"
    with open(os.path.join(smoke["out"], f"{stage}_curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", "the curves file is not a PNG"
    assert not [n for n in os.listdir(smoke["out"]) if n.endswith(".tmp")], "a temporary file was left behind"
    stdout = smoke["outputs"][stage].stdout
    assert f"{stage}.pt" in stdout and "wrote" in stdout, "the script should say where its outputs are"
    assert "preset" in stdout and "smoke" in stdout, "the script should print its resolved config"


def test_stages_base_metrics_keys(smoke):
    records = read_metrics_file(os.path.join(smoke["out"], "base_metrics.jsonl"))
    preset = train_base.PRESETS["smoke"]
    max_steps, eval_every = preset["max_steps"], preset["eval_every"]
    assert [r["step"] for r in records] == list(range(1, max_steps + 1)), "one record per optimizer step"
    for record in records:
        for key in ("loss/train", "lr", "grad_norm", "tokens_per_s"):
            assert key in record and math.isfinite(record[key]), f"step {record['step']}: {key} missing or not finite"
    with_val = [r["step"] for r in records if "loss/val" in r]
    expected_val = sorted({s for s in range(1, max_steps + 1) if s % eval_every == 0} | {max_steps})
    assert with_val == expected_val, f"held-out loss every {eval_every} steps and at the end, got steps {with_val}"
    assert records[-1]["loss/train"] < records[0]["loss/train"], "pretraining loss did not go down at all"


def test_stages_sft_metrics_keys(smoke):
    records = read_metrics_file(os.path.join(smoke["out"], "sft_metrics.jsonl"))
    assert records[0]["step"] == 0 and "loss/val" in records[0], "SFT logs the held-out loss before training"
    for record in records[1:]:
        for key in ("loss/train", "lr", "grad_norm", "epoch"):
            assert key in record and math.isfinite(record[key]), f"step {record['step']}: {key} missing or not finite"
    assert "loss/val" in records[-1], "the last step logs the held-out loss"
    assert [r["step"] for r in records] == list(range(len(records)))


def test_stages_base_checkpoint_loads(smoke):
    tokenizer = smoke["tokenizer"]
    checkpoint = load_checkpoint(os.path.join(smoke["out"], "base.pt"), kind="base",
                                 tokenizer_identity=tokenizer.identity)
    assert checkpoint["kind"] == "base" and checkpoint["step"] == train_base.PRESETS["smoke"]["max_steps"]
    assert checkpoint["tokenizer"]["sha256"] == tokenizer.identity["sha256"]
    config = GPTConfig(**checkpoint["model_config"])
    assert config.vocab_size == tokenizer.vocab_size
    GPT(config).load_state_dict(checkpoint["model"])   # strict: every weight present, right shapes
    assert checkpoint["train_config"]["preset"] == "smoke"
    assert math.isfinite(checkpoint["metrics"]["loss/val"])


def test_stages_sft_checkpoint_loads_and_records_its_config(smoke):
    tokenizer = smoke["tokenizer"]
    checkpoint = load_checkpoint(os.path.join(smoke["out"], "sft.pt"), kind="sft",
                                 tokenizer_identity=tokenizer.identity)
    assert checkpoint["kind"] == "sft"
    GPT(GPTConfig(**checkpoint["model_config"])).load_state_dict(checkpoint["model"])
    train_config = checkpoint["train_config"]
    assert set(train_config) == {f.name for f in dataclasses.fields(train_sft.SFTConfig)}, "train_config incomplete"
    expected = dict(train_sft.PRESETS["smoke"], preset="smoke", data_dir=smoke["data"], out_dir=smoke["out"])
    for key, value in expected.items():
        assert train_config[key] == value, f"sft.pt train_config[{key!r}] = {train_config[key]!r}, expected {value!r}"
    # steps = ceil(train demonstrations / batch size) * epochs (smoke: 200 demos, 20 held out, batch 8 -> 23)
    with open(os.path.join(smoke["data"], "sft.jsonl")) as f:
        n_demos = sum(1 for line in f if line.strip())
    n_train = n_demos - int(n_demos * train_config["val_fraction"])
    assert checkpoint["step"] == math.ceil(n_train / train_config["batch_size"]) * train_config["epochs"]
    for key in ("loss/train", "loss/val", "gold/sample", "gold/greedy", "eos_rate/greedy"):
        assert key in checkpoint["metrics"], f"sft.pt metrics lack {key}"
    # the SFT weights moved away from the base weights
    base = load_checkpoint(os.path.join(smoke["out"], "base.pt"))
    moved = any(not torch.equal(base["model"][k], v) for k, v in checkpoint["model"].items())
    assert moved, "sft.pt holds the base weights unchanged"


def test_stages_checkpoint_refuses_wrong_kind_and_tokenizer(smoke):
    path = os.path.join(smoke["out"], "base.pt")
    with pytest.raises(UserError, match="is a 'base' checkpoint, expected 'sft'"):
        load_checkpoint(path, kind="sft")
    other = dict(smoke["tokenizer"].identity, sha256="0" * 64)
    with pytest.raises(UserError, match="another tokenizer"):
        load_checkpoint(path, kind="base", tokenizer_identity=other)


# ----------------------------------------------------------------------------------------------
# Bad input: one line, "error: ...", non-zero exit, no traceback, nothing damaged


def test_stages_base_missing_data_dir(smoke, tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "no_such_data")
    code, _, stderr = run_in_process(train_base, ["--preset", "smoke", "--data-dir", missing,
                                                  "--out-dir", str(tmp_path / "out")], monkeypatch, capsys)
    assert_one_error_line(code, stderr, missing)
    assert stderr.startswith("error:")
    assert not os.path.exists(tmp_path / "out" / "base.pt")


def test_stages_sft_corrupt_base_checkpoint(smoke, tmp_path):
    """A base.pt of random bytes: one error line, exit != 0, no traceback, the file left as it was."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    corrupt = os.urandom(4096)
    (out_dir / "base.pt").write_bytes(corrupt)
    result = run_script("train_sft.py", "--preset", "smoke", "--data-dir", smoke["data"], "--out-dir", str(out_dir),
                        check=False)
    assert_one_error_line(result.returncode, result.stderr, "base.pt")
    assert result.stderr.startswith("error:")
    assert (out_dir / "base.pt").read_bytes() == corrupt, "the corrupt input file was modified"
    assert sorted(os.listdir(out_dir)) == ["base.pt"], f"outputs written after the error: {os.listdir(out_dir)}"


def test_stages_sft_refuses_a_checkpoint_of_the_wrong_kind(smoke, tmp_path, monkeypatch, capsys):
    base = load_checkpoint(os.path.join(smoke["out"], "base.pt"))
    rm_like = tmp_path / "rm.pt"
    save_checkpoint(rm_like, kind="rm", model_state=base["model"], model_config=base["model_config"],
                    tokenizer_identity=base["tokenizer"], train_config={}, step=0, metrics={})
    code, _, stderr = run_in_process(train_sft, ["--preset", "smoke", "--data-dir", smoke["data"],
                                                 "--out-dir", str(tmp_path / "out"), "--init", str(rm_like)],
                                     monkeypatch, capsys)
    assert_one_error_line(code, stderr, "rm.pt", "'rm' checkpoint", "expected 'base'")
    assert not os.path.exists(tmp_path / "out" / "sft.pt")


def test_stages_sft_malformed_demonstrations(smoke, tmp_path, monkeypatch, capsys):
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"prompt": "what does a cow eat?", "completion": "A cow eats grass."}\n{"prompt": "x"\n')
    code, _, stderr = run_in_process(train_sft, ["--preset", "smoke", "--data-dir", smoke["data"],
                                                 "--init", os.path.join(smoke["out"], "base.pt"),
                                                 "--out-dir", str(tmp_path / "out"), "--demos", str(demos)],
                                     monkeypatch, capsys)
    assert_one_error_line(code, stderr, f"{demos}:2")
    assert not os.path.exists(tmp_path / "out" / "sft.pt")


@pytest.mark.parametrize("module, flag", [(train_sft, "--lr=-1"), (train_base, "--max-steps=0"),
                                          (train_base, "--device=tpu")])
def test_stages_out_of_range_option_exits_2(module, flag, tmp_path, monkeypatch, capsys):
    code, _, stderr = run_in_process(module, ["--preset", "smoke", "--out-dir", str(tmp_path), flag],
                                     monkeypatch, capsys)
    assert code == 2, f"{flag}: exit code {code}, expected 2 (argparse's usage error)"
    assert_one_error_line(code, stderr, flag.split("=")[0])
    assert os.listdir(tmp_path) == [], "nothing should be written for a bad option"
