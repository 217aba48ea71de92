"""Tests for minirlhf/cli.py: config flags, presets, --help, option(), StageConfig, one-line errors."""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from minirlhf.cli import StageConfig, UserError, config_to_dict, option, parse_config, print_config, run_main


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
    debug: bool = field(default=False, metadata={"help": "debug mode"})

    def __post_init__(self):
        if self.max_steps is not None and self.max_steps < len(self.layers):
            raise ValueError("--max-steps must be at least the number of layers")


def test_optional_list_max_and_post_init(capsys):
    cfg = parse([], presets={}, cls=RichConfig)
    assert (cfg.max_steps, cfg.layers, cfg.run_name, cfg.debug) == (None, [2, 4], None, False)
    cfg = parse(["--max-steps", "10", "--layers", "1", "2", "3", "--run-name", "a", "--debug"], {}, RichConfig)
    assert (cfg.max_steps, cfg.layers, cfg.run_name, cfg.debug) == (10, [1, 2, 3], "a", True)
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
# option() and StageConfig: the one-line form every script uses


@dataclass
class OneLineConfig(StageConfig):
    steps: int = option(10, "optimizer steps", min=1)
    lr: float = option(3e-4, "peak learning rate", above=0.0)
    sizes: list[int] = option([2, 4], "layer sizes", min=1)
    mode: str = option("fast", "how", choices=["fast", "slow"])

    def __post_init__(self):
        if self.steps < len(self.sizes):
            raise ValueError(f"--steps {self.steps} is below the number of --sizes")


ONE_LINE_PRESETS = {"smoke": {"steps": 2}, "tiny": {}}


def test_option_is_a_field_with_its_help_and_bounds():
    long_form = field(default=10, metadata={"help": "optimizer steps", "min": 1})
    short = option(10, "optimizer steps", min=1)
    assert (short.default, dict(short.metadata)) == (long_form.default, dict(long_form.metadata))
    assert dict(option(0.5, "x", min=0.0, max=1.0, above=None, choices=None).metadata) == {"help": "x", "min": 0.0, "max": 1.0}


def test_option_list_default_is_a_fresh_copy_per_config():
    first, second = OneLineConfig(), OneLineConfig()
    first.sizes.append(8)
    assert second.sizes == [2, 4], "a list default must not be shared between configs"


def test_stage_config_gives_every_stage_the_common_flags(capsys):
    cfg = parse_config(OneLineConfig, ONE_LINE_PRESETS, argv=["--preset", "smoke", "--device", "cpu", "--seed", "7",
                                                              "--resume", "--sizes", "1", "2"])
    assert (cfg.preset, cfg.device, cfg.seed, cfg.resume, cfg.steps, cfg.sizes) == ("smoke", "cpu", 7, True, 2, [1, 2])
    assert (cfg.data_dir, cfg.out_dir, cfg.dtype, cfg.kernels) == ("data", "out", "auto", "auto")
    with pytest.raises(SystemExit):
        parse_config(OneLineConfig, ONE_LINE_PRESETS, argv=["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--preset", "--data-dir", "--out-dir", "--device", "--dtype", "--seed", "--kernels", "--resume",
                 "--debug", "--steps", "--lr", "--sizes", "--mode"):
        assert flag in text, f"--help does not list {flag}"
    assert "optimizer steps (default: 10; smoke: 2)" in text and "layer sizes (default: 2 4)" in text


def test_option_bounds_and_post_init_are_one_line_errors(capsys):
    err = parse_error(capsys, ["--lr", "0"], ONE_LINE_PRESETS, OneLineConfig)
    assert "--lr" in err and "must be > 0.0" in err, "above= is an exclusive bound"
    err = parse_error(capsys, ["--mode", "medium"], ONE_LINE_PRESETS, OneLineConfig)
    assert "--mode" in err and "invalid choice" in err
    err = parse_error(capsys, ["--lr", "nan"], ONE_LINE_PRESETS, OneLineConfig)
    assert "--lr" in err and "finite" in err, "nan passes every comparison, so it is refused outright"
    err = parse_error(capsys, ["--preset", "smoke", "--sizes", "1", "2", "3"], ONE_LINE_PRESETS, OneLineConfig)
    assert "below the number of --sizes" in err


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
