"""The command line every script shares: its options, and how it fails.

A script's options are one dataclass, one line per option, and a few presets:

    @dataclass
    class ExampleConfig(StageConfig):    # preset, data_dir, out_dir, device, dtype, seed, ... come with it
        epochs: int = option(4, "passes over the demonstrations", min=1)
        lr: float = option(5e-4, "peak learning rate (AdamW)", above=0.0)
        val_fraction: float = option(0.1, "share of demonstrations held out", min=0.0, max=0.5)

        def __post_init__(self):         # checks across options
            super().__post_init__()      # StageConfig's: --min-lr <= --lr
            if self.epochs > 1 and self.val_fraction == 0:
                raise ValueError("--epochs > 1 needs a held-out share to watch (--val-fraction)")

    PRESETS = {"smoke": dict(epochs=1), "tiny": {}, "small": dict(epochs=3, lr=1e-4)}

    def main():
        cfg = parse_config(ExampleConfig, PRESETS, description=__doc__)
        ...

    if __name__ == "__main__":
        run_main(main)

- `parse_config`: each field becomes a `--field-name` flag (int, float, str, bool as `--x/--no-x`,
  `Optional[X]` where the word `none` sets None, `list[X]` for several values); `--help` shows
  each option's help and default. A value comes from, lowest first: the field's default < the
  `--preset`'s value < the command line. Bounds (`choices`, `min`, `max`, `above`) are checked on
  the final value; a bad value, or a `ValueError` from `__post_init__`, is one line and exit 2.
- `run_main` + `UserError`: bad input (a missing file, a wrong checkpoint, a malformed JSONL line)
  is ONE line on stderr and a non-zero exit, not a traceback; `--debug` brings the traceback back.
  Bugs (any other exception) keep their traceback: hiding them would make them impossible to fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["UserError", "run_main", "option", "StageConfig", "parse_config", "config_to_dict",
           "print_config", "make_out_dir"]


# --------------------------------------------------------------------------------------------------
# Errors


class UserError(Exception):
    """Bad input from the user: a missing or wrong file, a bad value, an impossible request.

    `run_main` prints it as one line, `error: <message>`, on stderr and exits with status 2. The
    message should name the file (and line or field) and say what was expected, e.g.
    `out/rm.pt is a 'rm' checkpoint, expected 'sft'`.
    """


EXIT_USER_ERROR = 2  # the same status argparse uses for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def run_main(main: Callable[[], None]) -> None:
    """Run a script's `main()` and turn expected failures into one line on stderr.

    - `UserError`          -> `error: <message>`, exit 2.
    - `FileNotFoundError`  -> `error: no such file: <path>`, exit 2. A path that does not exist is
                              nearly always a user's typo or a stage not run yet, and the message
                              names the path; `--debug` shows where it was opened.
    - any other `OSError`  -> `error: <path>: <what went wrong>`, exit 2: a directory where a file
                              is expected, a file where a directory is, no permission, a full disk.
                              These too are the machine's or the user's, not the code's.
    - `KeyboardInterrupt`  -> `interrupted`, exit 130. Checkpoints are written atomically, so the
                              last good one is intact.
    - anything else (ValueError included) propagates with its full traceback: it is a bug, or a
      check that should have raised a `UserError` with a clear message.

    With `--debug` anywhere in `sys.argv`, nothing is caught: every error shows its traceback.
    """
    debug = "--debug" in sys.argv[1:]
    try:
        main()
        _leave_process_group()
    except UserError as error:
        if debug:
            raise
        _print_error(str(error))
        sys.exit(EXIT_USER_ERROR)
    except OSError as error:
        if debug:
            raise
        _print_error(_describe_os_error(error))
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


def _describe_os_error(error: OSError) -> str:
    """One line naming the path and what is wrong with it, in words a student can act on."""
    path = error.filename
    if path is None:
        return str(error)
    if isinstance(error, FileNotFoundError):
        return f"no such file: {path}"
    if isinstance(error, IsADirectoryError):
        return f"{path} is a directory, expected a file"
    if isinstance(error, NotADirectoryError):
        return f"{path}: a part of this path is a file, expected a directory"
    if isinstance(error, FileExistsError):
        return f"{path} exists and is not a directory"
    if isinstance(error, PermissionError):
        return f"{path}: permission denied"
    return f"{path}: {error.strerror or error}"


def _leave_process_group() -> None:
    """Under torchrun: wait until every rank has finished, then close the process group. (A rank
    that leaves while the others still run can tear the connections down under them; a rank that
    fails exits at once instead, and torchrun stops the others.)"""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _print_error(message: str) -> None:
    # The contract is ONE line: fold any newline in the message into a space.
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"error: {one_line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Options


def option(default, help: str, *, choices=None, min=None, max=None, above=None) -> Any:
    """One config field on one line: `lr: float = option(3e-4, "peak learning rate", above=0.0)`.

    `help` is its `--help` line; `choices` lists the values it may take; `min`/`max` are inclusive
    bounds and `above` an exclusive lower bound, checked on every value (each item of a list).
    """
    metadata = {"help": help}
    for key, value in (("choices", choices), ("min", min), ("max", max), ("above", above)):
        if value is not None:
            metadata[key] = value
    if isinstance(default, list):   # a mutable default: every config gets its own copy
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class StageConfig:
    """The options every training stage takes (each stage's config adds its own after these)."""

    preset: str = option("tiny", "size preset: smoke (tests), tiny (CPU), medium (~26M, one GPU), "
                                 "small (GPT-2 small shape, GPU)")
    data_dir: str = option("data", "where data/prepare.py wrote the tokenizer, corpus and prompts")
    out_dir: str = option("out", "where the stages' checkpoints, metrics and plots are read and written")
    device: str = option("auto", "auto (CUDA when present), cpu or cuda", choices=["auto", "cpu", "cuda"])
    dtype: str = option("auto", "precision: auto (bf16 on a GPU that has it, else fp32), fp32 or bf16 "
                                "(autocast; weights stay fp32)", choices=["auto", "fp32", "bf16"])
    seed: int = option(1337, "random seed")
    kernels: str = option("auto", "logprob/GAE kernels: auto (fused) or reference", choices=["auto", "reference"])
    resume: bool = option(False, "continue an interrupted run from this stage's checkpoint in OUT_DIR")
    debug: bool = option(False, "show tracebacks")

    def __post_init__(self):
        """Checks across options (parse_config reports a ValueError as a bad flag). A stage with a
        cosine schedule from --lr down to --min-lr must not decay upwards."""
        if getattr(self, "min_lr", 0.0) > getattr(self, "lr", math.inf):
            raise ValueError(f"--min-lr {self.min_lr} is above --lr {self.lr}: the schedule would decay upwards")


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before an error; with ~30 options that buries the
    message. Print just `prog: error: <message> (see --help)` and exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def parse_config(config_cls: type, presets: dict[str, dict[str, Any]], argv: list[str] | None = None,
                 description: str | None = None, default_preset: str = "tiny") -> Any:
    """The config `config_cls(...)` built from its defaults, the chosen preset and `argv`.

    `presets` maps a preset name to {field: value}; `--preset` is offered when there is more than
    one, and the name used is stored in the config's `preset` field. `--debug` is always accepted
    (`run_main` reads it). A preset naming an unknown field is the script's bug: a `ValueError`.
    Trap (argparse before Python 3.13): `--lr -1e-3` reads as two flags; write `--lr=-1e-3`.
    """
    fields = [f for f in dataclasses.fields(config_cls) if f.init]
    names = {f.name for f in fields}
    hints = typing.get_type_hints(config_cls)   # resolves annotations written as strings
    if presets and default_preset not in presets:
        raise ValueError(f"default preset {default_preset!r} is not one of {sorted(presets)}")
    for preset_name, values in presets.items():
        if set(values) - names:
            raise ValueError(f"preset {preset_name!r} sets unknown fields {sorted(set(values) - names)} "
                             f"of {config_cls.__name__}")

    parser = _OneLineErrorParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if len(presets) > 1:
        preset_help = next((f.metadata.get("help") for f in fields if f.name == "preset"), None) or "size preset"
        parser.add_argument("--preset", choices=list(presets), default=argparse.SUPPRESS,
                            help=f"{preset_help} (default: {default_preset})".replace("%", "%%"))
    for f in fields:
        if not (f.name == "preset" and presets):   # with presets, --preset above stands for it
            _add_flag(parser, f, hints[f.name], presets, default_preset)
    if "debug" not in names:
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show full tracebacks on errors")

    # Every flag defaults to SUPPRESS: a flag not given is absent from `given`, so a flag the user
    # typed is told apart from one left at its default.
    given = vars(parser.parse_args(argv))
    preset_name = given.pop("preset", default_preset) if presets else None
    preset_values = presets[preset_name] if presets else {}
    if "debug" not in names:
        given.pop("debug", None)
    values = {}
    for f in fields:
        if f.name in given:
            values[f.name], source = given[f.name], ""
        elif f.name in preset_values:
            values[f.name], source = preset_values[f.name], f" (from the preset {preset_name!r})"
        else:
            values[f.name], source = _field_default(f), " (from the default)"
            if values[f.name] is dataclasses.MISSING:
                parser.error(f"the argument {_flag(f.name)} is required")
        problem = _check_value(f, values[f.name])
        if problem:
            parser.error(f"argument {_flag(f.name)}: {problem}{source}")
    if "preset" in names and preset_name is not None:
        values["preset"] = preset_name
    try:
        return config_cls(**values)
    except ValueError as error:   # a check across fields in __post_init__
        parser.error(str(error))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _add_flag(parser, f: dataclasses.Field, annotation, presets, default_preset) -> None:
    """The `--field-name` flag of one field; its help ends with the default (and the other presets' values)."""
    kind, optional = annotation, False
    if typing.get_origin(kind) in (typing.Union, types.UnionType):   # Optional[X] or X | None
        (kind,) = [a for a in typing.get_args(kind) if a is not type(None)]
        optional = True
    is_list = typing.get_origin(kind) is list
    item = typing.get_args(kind)[0] if is_list else kind

    shown = presets.get(default_preset, {}).get(f.name, _field_default(f))
    others = [f"{name}: {_show(values[f.name])}" for name, values in presets.items()
              if name != default_preset and f.name in values and values[f.name] != shown]
    help_text = f"{f.metadata.get('help', '')} (default: {_show(shown)}" + (f"; {', '.join(others)})" if others else ")")
    kwargs = dict(default=argparse.SUPPRESS, help=help_text.replace("%", "%%"), choices=f.metadata.get("choices"))
    if item is bool:
        parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
    else:
        parser.add_argument(_flag(f.name), type=_value_parser(item, optional), nargs="+" if is_list else None, **kwargs)


def _value_parser(kind, optional: bool) -> Callable[[str], Any]:
    """The `type=` of a flag: the text as `kind` (an int may be written 1e4), or None for `none`."""
    if kind not in (int, float, str):
        raise TypeError(f"unsupported config field type {kind!r}: use int, float, str, bool, Optional or list")

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            pass
        if kind is int:   # "1e4" steps: a whole number written as a float
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if math.isfinite(number) and number.is_integer():
                return int(number)
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")

    return parse


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _check_value(f: dataclasses.Field, value) -> str | None:
    """What is wrong with a field's value under its `choices`/`min`/`max`/`above`, or None."""
    choices, low, high, above = (f.metadata.get(key) for key in ("choices", "min", "max", "above"))
    for item in value if isinstance(value, list) else [value]:
        if item is None:
            continue
        if choices is not None and item not in choices:
            return f"invalid choice {item!r} (choose from {', '.join(map(repr, choices))})"
        if isinstance(item, float) and not math.isfinite(item):
            return f"must be a finite number, got {item}"   # trap: nan fails no comparison, so no bound
        if above is not None and item <= above:
            return f"must be > {above}, got {item}"
        if low is not None and item < low:
            return f"must be >= {low}, got {item}"
        if high is not None and item > high:
            return f"must be <= {high}, got {item}"
    return None


def config_to_dict(cfg) -> dict[str, Any]:
    """A config (dataclass, or a dict) as a plain dict of plain values, in field order.

    Nested dataclasses become dicts, `Path`s become strings: the result can go into a checkpoint
    (weights_only loading accepts only plain values) or a JSON file.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        raw = dataclasses.asdict(cfg)
    elif isinstance(cfg, dict):
        raw = dict(cfg)
    else:
        raise TypeError(f"config_to_dict needs a dataclass instance or a dict, got {type(cfg).__name__}")
    return {key: _plain_value(value) for key, value in raw.items()}


def _plain_value(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: _plain_value(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_value(v) for v in value)
    return value


def print_config(cfg, title: str, file=None) -> None:
    """Print a config as a title and aligned `name = value` lines, in field order:

        sft config
          preset     = tiny
          batch_size = 32
    """
    values = config_to_dict(cfg)
    width = max((len(name) for name in values), default=0)
    out = file if file is not None else sys.stdout
    print(title, file=out)
    for name, value in values.items():
        print(f"  {name.ljust(width)} = {value}", file=out)
    out.flush()


# --------------------------------------------------------------------------------------------------
# The output directory


def make_out_dir(path: str) -> None:
    """Create `--out-dir` (and its parents) before any training, and check it can be written: a path
    that is a file, lies under a file or is read-only fails now, in one line, not at the first save."""
    os.makedirs(path, exist_ok=True)   # FileExistsError / NotADirectoryError: run_main names the path
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--out-dir {path} is not writable")
