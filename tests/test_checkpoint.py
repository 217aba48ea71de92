"""Tests for minirlhf/checkpoint.py: round trip, atomic writes, and every way a file can be wrong."""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from minirlhf.checkpoint import CHECKPOINT_KINDS, atomic_write, load_checkpoint, save_checkpoint
from minirlhf.cli import UserError

TOKENIZER = {"name": "tinyworld", "sha256": "ab" * 32, "vocab_size": 516}
OTHER_TOKENIZER = {"name": "tinyworld", "sha256": "cd" * 32, "vocab_size": 516}


@dataclass
class TinyModelConfig:
    vocab_size: int = 11
    d_model: int = 4


@dataclass
class TrainConfig:
    lr: float = 1e-2
    out_dir: Path = Path("out")


class TiedModel(nn.Module):
    """An embedding and an LM head that share one weight, as in GPT-2."""

    def __init__(self, config: TinyModelConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.norm = nn.LayerNorm(config.d_model)

    def forward(self, ids):
        return self.lm_head(self.norm(self.wte(ids)))


def train_one_step(model, optimizer, seed):
    torch.manual_seed(seed)
    ids = torch.randint(0, 11, (2, 5))
    loss = model(ids).logsumexp(-1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def make_model_and_optimizer():
    torch.manual_seed(0)
    model = TiedModel(TinyModelConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    train_one_step(model, optimizer, seed=1)  # so the optimizer has state (exp_avg, step...)
    return model, optimizer


def save(path, kind="sft", step=7, tokenizer=TOKENIZER, **extra):
    model, optimizer = make_model_and_optimizer()
    save_checkpoint(path, kind=kind, model_state=model.state_dict(), model_config=TinyModelConfig(),
                    tokenizer_identity=tokenizer, train_config=TrainConfig(), step=step,
                    metrics={"loss/sft": torch.tensor(1.5), "accuracy": np.float32(0.25), "tokens": 1000},
                    **extra)
    return model, optimizer


def assert_user_error(path, match, **load_kwargs):
    """load_checkpoint must raise a one-line UserError naming the file and matching `match`."""
    with pytest.raises(UserError) as error_info:
        load_checkpoint(path, **load_kwargs)
    message = str(error_info.value)
    assert str(path) in message, f"the message should name the file {path}: {message!r}"
    assert "\n" not in message, f"the message should be one line: {message!r}"
    assert match in message, f"expected {match!r} in {message!r}"
    return message


# --------------------------------------------------------------------------------------------------
# round trip


def test_round_trip_restores_everything(tmp_path):
    path = tmp_path / "nested" / "dir" / "sft.pt"  # directories are created
    model, optimizer = make_model_and_optimizer()
    value_head = nn.Linear(4, 1)
    save_checkpoint(
        path, kind="ppo", model_state=model.state_dict(), model_config=TinyModelConfig(),
        tokenizer_identity=TOKENIZER, train_config=TrainConfig(), step=12,
        metrics={"loss/sft": torch.tensor(1.5), "accuracy": np.float32(0.25), "tokens": 1000},
        optimizer=optimizer.state_dict(), value_model=value_head.state_dict(), kl_coef=0.05,
        reward_norm={"bias": torch.tensor(-0.5), "gain": 2.0}, sample_lengths=np.array([3, 4]),
    )
    checkpoint = load_checkpoint(path, kind="ppo", tokenizer_identity=TOKENIZER)

    assert checkpoint["kind"] == "ppo" and checkpoint["step"] == 12 and checkpoint["format_version"] == 1
    assert checkpoint["model_config"] == {"vocab_size": 11, "d_model": 4}, "dataclasses are stored as dicts"
    assert checkpoint["train_config"] == {"lr": 1e-2, "out_dir": "out"}, "Paths are stored as strings"
    assert checkpoint["tokenizer"] == TOKENIZER
    assert checkpoint["metrics"] == {"loss/sft": 1.5, "accuracy": 0.25, "tokens": 1000.0}
    assert all(type(v) is float for v in checkpoint["metrics"].values()), "metrics are plain floats"
    assert checkpoint["kl_coef"] == 0.05
    assert checkpoint["reward_norm"]["gain"] == 2.0
    assert torch.equal(checkpoint["reward_norm"]["bias"], torch.tensor(-0.5))
    assert torch.equal(checkpoint["sample_lengths"], torch.tensor([3, 4])), "NumPy arrays become tensors"

    for name, tensor in model.state_dict().items():
        assert torch.equal(checkpoint["model"][name], tensor), f"model[{name!r}] differs after loading"
    for name, tensor in value_head.state_dict().items():
        assert torch.equal(checkpoint["value_model"][name], tensor), f"value_model[{name!r}] differs"

    # the tied weight is stored once and still shared after loading
    loaded = checkpoint["model"]
    assert loaded["wte.weight"].data_ptr() == loaded["lm_head.weight"].data_ptr(), "tied weights were duplicated"


def test_optimizer_state_resumes_exactly(tmp_path):
    # the real test of a resumable checkpoint: train 1 step, save, load into fresh objects, train
    # another step; the result must equal training 2 steps without stopping
    path = tmp_path / "ppo.pt"
    model, optimizer = make_model_and_optimizer()
    save_checkpoint(path, kind="ppo", model_state=model.state_dict(), model_config=TinyModelConfig(),
                    tokenizer_identity=TOKENIZER, train_config={}, step=1, metrics={},
                    optimizer=optimizer.state_dict())
    train_one_step(model, optimizer, seed=2)

    checkpoint = load_checkpoint(path, kind="ppo")
    resumed = TiedModel(TinyModelConfig())
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2, betas=(0.9, 0.95))
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train_one_step(resumed, resumed_optimizer, seed=2)

    for (name, expected), got in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{name} differs after resuming")


def test_file_is_plain_data_for_weights_only(tmp_path):
    path = tmp_path / "sft.pt"
    save(path)
    # the strict loader, called directly: it would refuse any pickled class
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["kind"] == "sft"


def test_save_refuses_what_would_not_load(tmp_path):
    class Custom:
        pass

    with pytest.raises(TypeError, match=r"schedule\['fn'\]"):
        save(tmp_path / "x.pt", schedule={"fn": Custom()})
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        save(tmp_path / "x.pt", kind="critic")
    with pytest.raises(ValueError, match="clash"):
        save(tmp_path / "x.pt", format_version=2)
    with pytest.raises(TypeError, match="metrics"):
        save_checkpoint(tmp_path / "x.pt", kind="sft", model_state={}, model_config={}, tokenizer_identity={},
                        train_config={}, step=1, metrics={"loss": torch.ones(3)})
    assert not (tmp_path / "x.pt").exists()
    assert list(tmp_path.iterdir()) == [], "a refused save leaves nothing behind"


def test_saved_file_has_normal_permissions(tmp_path):
    # trap: tempfile.mkstemp creates files readable by their owner only; the checkpoint should get
    # the same permissions as any other file the user creates
    save(tmp_path / "sft.pt")
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "sft.pt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_kinds_are_the_stages_and_methods():
    assert CHECKPOINT_KINDS == ("base", "sft", "rm", "ppo", "dpo", "grpo", "rloo", "expert")


# --------------------------------------------------------------------------------------------------
# atomic writes


class SaveCrash(Exception):
    pass


@pytest.mark.parametrize("crash", [SaveCrash, KeyboardInterrupt])
def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, crash):
    path = tmp_path / "sft.pt"
    save(path, step=1)
    before = path.read_bytes()

    real_save = torch.save

    def save_half_then_crash(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the temporary file...
        raise crash("disk full")  # ...then the save dies

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    with pytest.raises(crash):
        save(path, step=2)
    monkeypatch.undo()

    assert path.read_bytes() == before, "a failed save must not touch the previous checkpoint"
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.pt"], "the temporary file must be removed"


def test_save_overwrites(tmp_path):
    path = tmp_path / "sft.pt"
    save(path, step=1)
    save(path, step=2)
    assert load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.pt"]


def test_atomic_write_text(tmp_path):
    path = tmp_path / "out" / "comparisons.jsonl"
    with atomic_write(path, "w") as f:
        f.write('{"prompt": "héllo"}\n')
    assert path.read_text(encoding="utf-8") == '{"prompt": "héllo"}\n'
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write("half")
            raise RuntimeError("crash")
    assert path.read_text(encoding="utf-8") == '{"prompt": "héllo"}\n'
    assert [p.name for p in path.parent.iterdir()] == ["comparisons.jsonl"]


# --------------------------------------------------------------------------------------------------
# wrong files: each a one-line UserError naming the file


def test_missing_file(tmp_path):
    message = assert_user_error(tmp_path / "sft.pt", "not found", kind="sft")
    assert "train_sft.py" in message, "the message should say which script makes the file"
    message = assert_user_error(tmp_path / "base.pt", "'base' or 'sft' checkpoint", kind=("base", "sft"))
    assert "train_base.py" in message
    assert_user_error(tmp_path, "is a directory")


def test_wrong_kind(tmp_path):
    path = tmp_path / "rm.pt"
    save(path, kind="rm")
    assert_user_error(path, "is a 'rm' checkpoint, expected 'sft'", kind="sft")
    assert_user_error(path, "expected 'sft' or 'ppo'", kind=("sft", "ppo"))
    assert load_checkpoint(path, kind=("rm", "ppo"))["kind"] == "rm"


def test_wrong_tokenizer(tmp_path):
    path = tmp_path / "sft.pt"
    save(path)
    message = assert_user_error(path, "another tokenizer", tokenizer_identity=OTHER_TOKENIZER)
    assert "abababababab" in message and "cdcdcdcdcdcd" in message, "both hashes should be shown"
    assert load_checkpoint(path, tokenizer_identity=dict(TOKENIZER))["kind"] == "sft"


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3, 0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, fraction):
    path = tmp_path / "sft.pt"
    save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])  # a copy interrupted part-way
    assert_user_error(path, "not a readable torch checkpoint")


def test_damaged_bytes_inside_a_tensor(tmp_path):
    # trap: torch.load does not check the zip's checksums; this file would load with a wrong weight
    path = tmp_path / "sft.pt"
    save(path)
    data = bytearray(path.read_bytes())
    weight = load_checkpoint(path)["model"]["wte.weight"]
    offset = bytes(data).find(weight.numpy().tobytes())  # where the embedding's bytes sit in the file
    assert offset > 0
    data[offset: offset + 4] = bytes(4)  # zero one float
    path.write_bytes(bytes(data))
    assert_user_error(path, "does not match its checksum")


def test_random_bytes_and_text(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_user_error(path, "not a readable torch checkpoint")
    path.write_text("step,loss\n1,2.0\n")
    assert_user_error(path, "not a readable torch checkpoint")


class Pickled:
    """A class: torch.save pickles it by reference, and weights_only refuses to rebuild it."""

    def __init__(self):
        self.value = 1


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"kind": "sft", "payload": Pickled()}, path)
    message = assert_user_error(path, "pickled Python objects")
    assert "Pickled" in message, "the message should name the refused class"


def test_not_a_minirlhf_checkpoint(tmp_path):
    path = tmp_path / "state.pt"
    torch.save([torch.zeros(2)], path)
    assert_user_error(path, "not a minirlhf checkpoint")
    torch.save({"weight": torch.zeros(2)}, path)  # a bare state dict
    message = assert_user_error(path, "not a minirlhf checkpoint")
    assert "kind" in message and "model_config" in message, "the missing fields should be listed"


def test_newer_format_is_refused(tmp_path):
    path = tmp_path / "sft.pt"
    save(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["format_version"] = 99
    torch.save(checkpoint, path)
    assert_user_error(path, "format 99")


def test_load_accepts_str_paths(tmp_path):
    path = tmp_path / "base.pt"
    save(path, kind="base")
    assert load_checkpoint(os.fspath(path), kind="base")["kind"] == "base"
