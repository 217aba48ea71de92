"""Tests for minirlhf/cli.py: config flags, presets, errors, device, seeds, the progress line."""

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from minirlhf.cli import (
    Progress,
    UserError,
    config_to_dict,
    format_duration,
    format_number,
    parse_config,
    print_config,
    resolve_device,
    run_main,
    seed_everything,
)


@dataclass
class SFTConfig:
    """The example config from the stage contract."""

    preset: str = field(default="tiny", metadata={"help": "size preset"})
    out_dir: str = field(default="out", metadata={"help": "where outputs go"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate", "min": 0.0})
    batch_size: int = field(default=32, metadata={"help": "sequences per step", "min": 1})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda", "choices": ["auto", "cpu", "cuda"]})


# tiny overrides batch_size only: lr keeps its dataclass default unless smoke/small say otherwise
PRESETS = {
    "smoke": {"batch_size": 4, "lr": 1e-3},
    "tiny": {"batch_size": 16},
    "small": {"batch_size": 64, "compile": True},
}


def parse(argv, presets=PRESETS, cls=SFTConfig):
    return parse_config(cls, presets, argv=argv)


def parse_error(capsys, argv, presets=PRESETS, cls=SFTConfig) -> str:
    """Parse argv expecting an argparse error; return the stderr text (checked to be one line)."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv, presets, cls)
    assert exit_info.value.code == 2, f"exit code {exit_info.value.code}, expected 2"
    err = capsys.readouterr().err
    assert err.count("\n") == 1, f"expected a one-line error, got:\n{err}"
    return err


# --------------------------------------------------------------------------------------------------
# parse_config: precedence


def test_precedence_default_then_preset_then_flag():
    cfg = parse([])
    assert cfg.batch_size == 16, "the default preset (tiny) should override the dataclass default 32"
    assert cfg.lr == 3e-4, "tiny does not set lr: the dataclass default must stay"
    assert cfg.preset == "tiny", "the config must record the preset used"

    cfg = parse(["--preset", "smoke"])
    assert (cfg.batch_size, cfg.lr, cfg.preset) == (4, 1e-3, "smoke")

    cfg = parse(["--preset", "smoke", "--batch-size", "7"])
    assert (cfg.batch_size, cfg.lr) == (7, 1e-3), "an explicit flag beats the preset; other preset values stay"

    # the order of the flags on the command line does not matter
    cfg = parse(["--batch-size", "7", "--preset", "smoke"])
    assert cfg.batch_size == 7, "a flag given before --preset must still beat the preset"


def test_flag_equal_to_the_default_still_beats_the_preset():
    # trap: telling "given" from "not given" by comparing with the default would lose this flag
    cfg = parse(["--preset", "smoke", "--batch-size", "32"])
    assert cfg.batch_size == 32


def test_no_presets_and_a_single_preset():
    cfg = parse([], presets={})
    assert (cfg.batch_size, cfg.preset) == (32, "tiny"), "without presets the dataclass defaults apply"



def test_single_preset_has_no_preset_flag(capsys):
    # with one preset there is nothing to choose, so no --preset flag; the preset is still recorded
    cfg = parse([], presets={"tiny": {"batch_size": 8}})
    assert (cfg.batch_size, cfg.preset) == (8, "tiny")
    err = parse_error(capsys, ["--preset", "tiny"], presets={"tiny": {}})
    assert "--preset" in err


def test_unknown_preset_is_an_error(capsys):
    err = parse_error(capsys, ["--preset", "huge"])
    assert "--preset" in err and "huge" in err


def test_preset_typo_in_the_script_is_a_value_error():
    with pytest.raises(ValueError, match="batch_sise"):
        parse([], presets={"tiny": {"batch_sise": 3}})
    with pytest.raises(ValueError, match="default preset"):
        parse_config(SFTConfig, {"smoke": {}, "small": {}}, argv=[])


# --------------------------------------------------------------------------------------------------
# parse_config: types, bools, choices, ranges


def test_bool_flags():
    assert parse(["--compile"]).compile is True
    assert parse(["--no-compile"]).compile is False
    assert parse(["--preset", "small"]).compile is True, "preset small turns compile on"
    assert parse(["--preset", "small", "--no-compile"]).compile is False, "--no-compile beats the preset"


def test_types_are_parsed():
    cfg = parse(["--lr", "3e-5", "--out-dir", "runs/a", "--device", "cpu"])
    assert cfg.lr == pytest.approx(3e-5) and isinstance(cfg.lr, float)
    assert cfg.out_dir == "runs/a" and cfg.device == "cpu"
    cfg = parse(["--batch-size", "1e3"])
    assert cfg.batch_size == 1000 and isinstance(cfg.batch_size, int), "a whole number in e-notation is an int"


def test_bad_values_are_one_line_errors(capsys):
    err = parse_error(capsys, ["--lr", "fast"])
    assert "--lr" in err and "expected a number" in err
    err = parse_error(capsys, ["--batch-size", "2.5"])
    assert "--batch-size" in err and "expected an integer" in err
    err = parse_error(capsys, ["--device", "tpu"])
    assert "--device" in err and "invalid choice" in err
    err = parse_error(capsys, ["--no-such-flag"])
    assert "--no-such-flag" in err


def test_min_validation(capsys):
    err = parse_error(capsys, ["--batch-size", "0"])
    assert "--batch-size" in err and "must be >= 1" in err and "got 0" in err
    err = parse_error(capsys, ["--lr", "-0.001"])
    assert "--lr" in err and "must be >= 0.0" in err
    # argparse trap (before Python 3.13): "-1e-3" looks like a flag, not a negative number; use "="
    err = parse_error(capsys, ["--lr=-1e-3"])
    assert "--lr" in err and "must be >= 0.0" in err
    assert parse(["--lr", "0"]).lr == 0.0, "min is inclusive"


def test_range_checks_apply_to_preset_values(capsys):
    err = parse_error(capsys, [], presets={"tiny": {"batch_size": 0}})
    assert "--batch-size" in err and "preset 'tiny'" in err, "the error should say the value came from the preset"


@dataclass
class RichConfig:
    max_steps: Optional[int] = field(default=None, metadata={"help": "stop after this many steps", "min": 1})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature", "min": 0.0, "max": 2.0})
    layers: list[int] = field(default_factory=lambda: [2, 4], metadata={"help": "layer sizes", "min": 1})
    run_name: str | None = field(default=None, metadata={"help": "100% optional name"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas", "min": 0.0, "max": 1.0})
    debug: bool = field(default=False, metadata={"help": "debug mode"})

    def __post_init__(self):
        if self.max_steps is not None and self.max_steps < len(self.layers):
            raise ValueError("--max-steps must be at least the number of layers")


def test_optional_list_max_and_post_init(capsys):
    cfg = parse([], presets={}, cls=RichConfig)
    assert (cfg.max_steps, cfg.layers, cfg.run_name, cfg.debug) == (None, [2, 4], None, False)
    cfg = parse(["--max-steps", "10", "--layers", "1", "2", "3", "--run-name", "a", "--debug"], {}, RichConfig)
    assert (cfg.max_steps, cfg.layers, cfg.run_name, cfg.debug) == (10, [1, 2, 3], "a", True)
    assert parse(["--betas", "0.8", "0.99"], {}, RichConfig).betas == (0.8, 0.99), "a tuple field gets a tuple"
    err = parse_error(capsys, ["--betas", "0.8"], {}, RichConfig)
    assert "--betas" in err and "expected 2 arguments" in err
    assert parse(["--max-steps", "none"], {}, RichConfig).max_steps is None, "'none' resets an Optional field"

    err = parse_error(capsys, ["--temperature", "2.5"], {}, RichConfig)
    assert "--temperature" in err and "must be <= 2.0" in err
    err = parse_error(capsys, ["--layers", "3", "0"], {}, RichConfig)
    assert "--layers" in err and "must be >= 1" in err, "every list item is range-checked"
    err = parse_error(capsys, ["--max-steps", "1"], {}, RichConfig)
    assert "at least the number of layers" in err, "__post_init__'s ValueError becomes a one-line error"


def test_string_annotations_are_resolved():
    @dataclass
    class Config:  # as written under `from __future__ import annotations`
        steps: "int" = field(default=3, metadata={"help": "steps"})
        fast: "bool" = field(default=False, metadata={"help": "go fast"})

    cfg = parse_config(Config, {}, argv=["--steps", "5", "--fast"])
    assert (cfg.steps, cfg.fast) == (5, True)


def test_debug_flag_is_accepted_without_a_debug_field():
    cfg = parse(["--debug"])
    assert not hasattr(cfg, "debug")
    assert parse(["--debug"], {}, RichConfig).debug is True


# --------------------------------------------------------------------------------------------------
# parse_config: --help


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(SFTConfig, PRESETS, argv=["--help"], description="Step 1: supervised fine-tuning.")
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "Step 1: supervised fine-tuning." in text
    expected = {
        "--preset": "size preset (default: tiny)",
        "--out-dir": "where outputs go (default: out)",
        "--lr": "peak learning rate (default: 0.0003; smoke: 0.001)",
        # the default preset's value is shown, not the dataclass's 32; the others are listed
        "--batch-size": "sequences per step (default: 16; smoke: 4, small: 64)",
        "--compile": "torch.compile the model (default: False; small: True)",
        "--device": "auto|cpu|cuda (default: auto)",
    }
    for flag, help_text in expected.items():
        assert flag in text, f"--help does not list {flag}"
        assert help_text in text, f"--help for {flag}: expected {help_text!r} in:\n{text}"
    assert "--no-compile" in text and "{auto,cpu,cuda}" in text and "{smoke,tiny,small}" in text


def test_help_survives_percent_signs(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"], {}, RichConfig)
    assert "100% optional name" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------------------------------
# config_to_dict / print_config


@dataclass
class Inner:
    width: int = 8


@dataclass
class PathConfig:
    out_dir: Path = Path("out")
    inner: Inner = field(default_factory=Inner)
    name: str = "x"


def test_config_to_dict_is_plain_and_ordered():
    values = config_to_dict(PathConfig())
    assert values == {"out_dir": "out", "inner": {"width": 8}, "name": "x"}
    assert list(values) == ["out_dir", "inner", "name"], "field order is kept"
    assert config_to_dict({"a": Path("b")}) == {"a": "b"}
    with pytest.raises(TypeError):
        config_to_dict(PathConfig)  # the class, not an instance


def test_print_config_aligns_names(capsys):
    print_config(SFTConfig(), "sft config")
    assert capsys.readouterr().out == (
        "sft config\n"
        "  preset     = tiny\n"
        "  out_dir    = out\n"
        "  lr         = 0.0003\n"
        "  batch_size = 32\n"
        "  compile    = False\n"
        "  device     = auto\n"
    )


# --------------------------------------------------------------------------------------------------
# run_main


def run(monkeypatch, capsys, main, argv=("script.py",)):
    """Run `run_main(main)` with the given sys.argv; return (exit code or None, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", list(argv))
    code = None
    try:
        run_main(main)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_main_user_error_is_one_line(monkeypatch, capsys):
    def main():
        print("working")
        raise UserError("data/sft.jsonl:3: missing field 'completion'")

    code, out, err = run(monkeypatch, capsys, main)
    assert code == 2
    assert out == "working\n"
    assert err == "error: data/sft.jsonl:3: missing field 'completion'\n", f"stderr was {err!r}"


def test_run_main_folds_a_multiline_message(monkeypatch, capsys):
    def main():
        raise UserError("first part\n  second part\n")

    code, _, err = run(monkeypatch, capsys, main)
    assert (code, err) == (2, "error: first part second part\n")


def test_run_main_file_not_found(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "nope.jsonl"

    def main():
        open(missing)

    code, _, err = run(monkeypatch, capsys, main)
    assert code == 2 and err == f"error: no such file: {missing}\n"


def test_run_main_interrupt(monkeypatch, capsys):
    def main():
        raise KeyboardInterrupt

    code, _, err = run(monkeypatch, capsys, main)
    assert (code, err) == (130, "interrupted\n")


def test_run_main_success_returns(monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys, lambda: print("ok"))
    assert (code, out, err) == (None, "ok\n", "")


def test_run_main_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["script.py", "--debug"])

    def main():
        raise UserError("bad")

    with pytest.raises(UserError, match="bad"):
        run_main(main)


def test_run_main_lets_bugs_through(monkeypatch):
    # a ValueError from deep inside is a bug (or a check that should raise UserError): keep its traceback
    monkeypatch.setattr(sys, "argv", ["script.py"])

    def main():
        raise ValueError("shapes do not match")

    with pytest.raises(ValueError, match="shapes"):
        run_main(main)


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


# --------------------------------------------------------------------------------------------------
# formatting and Progress


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (0.4, "0s"), (5, "5s"), (59.4, "59s"), (59.6, "1m00s"), (60, "1m00s"), (72, "1m12s"),
    (3599, "59m59s"), (3600, "1h00m"), (3725, "1h02m"), (100_000, "27h46m"), (float("nan"), "?"),
    (float("inf"), "?"), (-3, "0s"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("value, text", [
    (1.93127, "1.93"), (0.5, "0.5"), (12.345, "12.3"), (123.4, "123"), (0.0123, "0.0123"),
    (0.001, "0.001"), (3.2e-4, "3.2e-04"), (-3.2e-4, "-3.2e-04"), (5123.0, "5.12k"), (5100.0, "5.1k"),
    (999.9, "1k"), (999_999.0, "1M"), (2.5e6, "2.5M"), (3e9, "3G"), (0.0, "0"), (0, "0"), (42, "42"),
    (1234, "1.23k"), (-7, "-7"), (True, "True"), (float("nan"), "nan"), (float("-inf"), "-inf"),
    (torch.tensor(1.5), "1.5"), (np.float32(2.0), "2"),
])
def test_format_number(value, text):
    assert format_number(value) == text


class FakeClock:
    """Seconds set by the test, so the rate and ETA are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_lines(capsys):
    clock = FakeClock()
    progress = Progress(10, desc="sft", every=5, clock=clock)
    lines = []
    for step in range(1, 11):
        clock.now = float(step)  # one second per step
        lines.append(progress.log(step, tokens=200, loss=2.0 / step))
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line] == printed, "log returns what it prints"
    # 5 steps x 200 tokens in 5 s = 200 tok/s; 5 s for 5 steps -> 5 s for the 5 left
    assert printed == [
        "sft step 5/10 | loss 0.4 | 200 tok/s | eta 5s",
        "sft step 10/10 | loss 0.2 | 200 tok/s | done in 10s",
    ]


def test_progress_always_prints_the_last_step_and_knows_due(capsys):
    progress = Progress(7, every=3, clock=FakeClock())
    due = [step for step in range(1, 8) if progress.due(step)]
    assert due == [3, 6, 7], "every 3rd step, plus the last"
    for step in range(1, 8):
        progress.log(step)
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in out] == ["step 3/7", "step 6/7", "step 7/7"]


def test_progress_default_interval_and_resume(capsys):
    assert Progress(500).every == 25, "about twenty lines per run"
    assert Progress(7).every == 1, "short runs print every step"

    clock = FakeClock()
    clock.now = 100.0
    progress = Progress(10, every=2, start=6, clock=clock)  # resumed at step 6
    clock.now = 104.0
    line = progress.log(8)  # 2 steps in 4 s: the 2 steps left take 4 s
    assert line == "step 8/10 | eta 4s", f"got {line!r}"
