"""The command-line plumbing every stage script shares.

A stage script is a config dataclass plus a `main()`:

    @dataclass
    class SFTConfig:
        preset: str = field(default="tiny", metadata={"help": "size preset"})
        lr: float = field(default=3e-4, metadata={"help": "peak learning rate", "min": 0.0})
        batch_size: int = field(default=32, metadata={"help": "sequences per step", "min": 1})
        compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
        device: str = field(default="auto", metadata={"help": "device", "choices": ["auto", "cpu", "cuda"]})

    PRESETS = {"smoke": {"batch_size": 4}, "tiny": {}, "small": {"batch_size": 64, "lr": 6e-4}}

    def main():
        cfg = parse_config(SFTConfig, PRESETS, description=__doc__)
        print_config(cfg, "sft config")
        ...

    if __name__ == "__main__":
        run_main(main)

What this module gives the script:

- `parse_config`: every dataclass field becomes a `--field-name` flag, typed from its annotation, with
  its help string and default shown by `--help`. Values resolve as
  dataclass default < `--preset` values < flags given on the command line.
- `run_main` + `UserError`: bad input (a missing file, a wrong checkpoint, a malformed JSONL line)
  is reported as ONE line on stderr and a non-zero exit code, not a traceback. `--debug` brings the
  traceback back. Bugs (any other exception) still show their traceback: hiding them would make
  them impossible to fix.
- `resolve_device`, `seed_everything`, `Progress`: the device, the seeds, and the one progress line
  per interval (`step 120/500 | loss 1.93 | 5.1k tok/s | eta 1m12s`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "UserError",
    "run_main",
    "parse_config",
    "config_to_dict",
    "print_config",
    "make_out_dir",
    "resolve_device",
    "seed_everything",
    "Progress",
    "format_duration",
    "format_number",
]


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
# Config dataclass -> argparse


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before an error; with ~30 options that buries the
    message. Print just `prog: error: <message> (see --help)` and exit 2, as the contract asks."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def parse_config(
    config_cls: type,
    presets: dict[str, dict[str, Any]],
    argv: list[str] | None = None,
    description: str | None = None,
    default_preset: str = "tiny",
) -> Any:
    """Build a config dataclass instance from presets and command-line flags.

    Precedence, lowest first: the dataclass default < the chosen preset's value < an explicit flag.

    Flags, one per dataclass field (fields with `init=False` are skipped):
      - `batch_size` -> `--batch-size`; the type comes from the annotation: `int`, `float`, `str`,
        `bool` (as `--compile/--no-compile`), `Optional[X]` (the word `none` sets None),
        `list[X]`/`tuple[X, ...]` (several values after the flag), `tuple[X, X]` (exactly two);
      - `field.metadata["help"]` is the help text; `--help` adds `(default: X)`, where X is the
        default preset's value when that preset overrides the dataclass default, and lists the
        other presets' values when they differ;
      - `metadata["metavar"]` names the value in `--help` (default: the type, e.g. `INT`);
      - `metadata["choices"]` restricts the values; `metadata["min"]`/`["max"]` are inclusive
        bounds, `metadata["above"]` an exclusive lower bound (`--lr` must be > 0), all checked on
        the final value (preset values too). A float must be finite: `nan` compares False with
        every bound, so it would pass them all, and no option means anything at infinity. A
        violation is an argparse error: one line on stderr, exit 2.
    `--preset NAME` is added when `presets` has more than one key; the name used is stored in the
    config's `preset` field when the dataclass has one. `--debug` is always accepted: it sets a
    `debug` field when the dataclass has one and is otherwise only read by `run_main`.

    Trap (argparse before Python 3.13): a negative number in e-notation looks like a flag, so
    `--lr -1e-3` fails with "expected one argument"; write `--lr=-1e-3`.

    A `ValueError` raised by the dataclass's `__post_init__` (a check across fields) is reported
    the same way as a bad flag.

    Args:
        config_cls: the dataclass type.
        presets: preset name -> {field name: value}. Keys must be field names (a typo is a
            `ValueError`, raised when the parser is built: it is the script's bug, not the user's).
        argv: the arguments to parse (default: `sys.argv[1:]`).
        description: shown at the top of `--help`, line breaks kept (a script's `__doc__`).
        default_preset: the preset used when `--preset` is not given.
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"parse_config needs a dataclass type, got {config_cls!r}")
    fields = [f for f in dataclasses.fields(config_cls) if f.init]
    field_names = {f.name for f in fields}
    hints = typing.get_type_hints(config_cls)  # resolves string annotations (`from __future__ import annotations`)

    if presets and default_preset not in presets:
        raise ValueError(f"default preset {default_preset!r} is not one of {sorted(presets)}")
    for preset_name, values in presets.items():
        unknown = set(values) - field_names
        if unknown:
            raise ValueError(f"preset {preset_name!r} sets unknown fields {sorted(unknown)} of {config_cls.__name__}")

    parser = _OneLineErrorParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset_field = next((f for f in fields if f.name == "preset"), None)
    if len(presets) > 1:
        preset_help = preset_field.metadata.get("help", "size preset") if preset_field else "size preset"
        parser.add_argument(
            "--preset",
            choices=list(presets),
            default=argparse.SUPPRESS,
            help=_escape_percent(f"{preset_help} (default: {default_preset})"),
        )

    # default=SUPPRESS on every flag: a flag the user did not give is absent from the namespace,
    # which is how explicit flags are told apart from defaults for the precedence rule.
    for f in fields:
        if f.name == "preset" and presets:
            continue  # set from the preset used, not a flag of its own: --preset above stands for it
        _add_field_flag(parser, f, hints[f.name], presets, default_preset)
    if "debug" not in field_names:
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show full tracebacks on errors")

    args = vars(parser.parse_args(argv))
    preset_name = args.pop("preset", default_preset) if presets else None  # None: no presets at all
    if "debug" not in field_names:
        args.pop("debug", None)  # only run_main reads it (from sys.argv)

    # Merge: dataclass default < preset < explicit flag. `source` says where each value came from,
    # so a range error can name it ("from preset 'tiny'").
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for f in fields:
        if f.name in args:
            values[f.name], source[f.name] = _as_annotated(args[f.name], hints[f.name]), "command line"
        elif preset_name is not None and f.name in presets[preset_name]:
            values[f.name], source[f.name] = presets[preset_name][f.name], f"preset {preset_name!r}"
        elif f.default is not dataclasses.MISSING:
            values[f.name], source[f.name] = f.default, "default"
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name], source[f.name] = f.default_factory(), "default"
        else:
            parser.error(f"the argument {_flag(f.name)} is required")
    if preset_field is not None and preset_name is not None:
        values["preset"] = preset_name  # record which preset produced this config

    for f in fields:
        problem = _check_range(f, values[f.name])
        if problem:
            where = "" if source[f.name] == "command line" else f" (from the {source[f.name]})"
            parser.error(f"argument {_flag(f.name)}: {problem}{where}")
    try:
        return config_cls(**values)
    except ValueError as error:
        parser.error(str(error))


def _as_annotated(value, annotation):
    """argparse collects several values in a list; a `tuple[...]` field gets a tuple."""
    base_type, _ = _unwrap_optional(annotation)
    if typing.get_origin(base_type) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _escape_percent(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help strings: "90%" would crash --help


def _add_field_flag(parser, f: dataclasses.Field, annotation, presets, default_preset) -> None:
    """Add the `--field-name` flag for one dataclass field."""
    base_type, optional = _unwrap_optional(annotation)
    help_text = f.metadata.get("help", "")
    shown_default = _shown_default(f, presets, default_preset)
    help_text = f"{help_text} (default: {_show(shown_default)}"
    # the other presets' values, when they differ from the one shown: `--help` documents the presets
    others = [f"{name}: {_show(values[f.name])}" for name, values in presets.items()
              if name != default_preset and f.name in values and values[f.name] != shown_default]
    help_text += (f"; {', '.join(others)})" if others else ")")
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _escape_percent(help_text.strip())}
    if "choices" in f.metadata:
        kwargs["choices"] = list(f.metadata["choices"])

    if base_type is bool:
        # --compile / --no-compile; argparse's BooleanOptionalAction makes the pair
        parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        return
    origin = typing.get_origin(base_type)
    if origin in (list, tuple):
        item_types = [t for t in typing.get_args(base_type) if t is not Ellipsis]
        if len(set(item_types)) != 1:
            raise TypeError(f"unsupported config annotation {base_type!r}: all items must have one type")
        item_type = item_types[0]
        fixed_length = origin is tuple and Ellipsis not in typing.get_args(base_type)
        kwargs["nargs"] = len(item_types) if fixed_length else "+"  # betas: tuple[float, float] takes 2
        kwargs["type"] = _scalar_parser(item_type, optional=False)
        kwargs["metavar"] = f.metadata.get("metavar", item_type.__name__.upper())
    else:
        kwargs["type"] = _scalar_parser(base_type, optional)
        if "choices" not in kwargs:
            kwargs["metavar"] = f.metadata.get("metavar", base_type.__name__.upper())
    parser.add_argument(_flag(f.name), **kwargs)


def _unwrap_optional(annotation) -> tuple[Any, bool]:
    """`Optional[int]` / `int | None` -> (int, True); `int` -> (int, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config annotation {annotation!r}: only Optional[X] unions are allowed")
        return args[0], True
    return annotation, False


def _scalar_parser(kind, optional: bool) -> Callable[[str], Any]:
    """The argparse `type=` callable for a scalar field; raises ArgumentTypeError with a clear message."""
    if kind not in (int, float, str):
        raise TypeError(f"unsupported config field type {kind!r}: use int, float, str, bool, Optional or list of them")

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        if kind is str:
            return text
        if kind is int:
            try:
                return int(text)
            except ValueError:
                pass
            # accept "1e4" for an int flag when it is a whole number: people write step counts that way
            try:
                as_float = float(text)
            except ValueError:
                as_float = math.nan
            if math.isfinite(as_float) and as_float.is_integer():
                return int(as_float)
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None

    return parse


def _shown_default(f: dataclasses.Field, presets, default_preset):
    if presets and f.name in presets.get(default_preset, {}):
        return presets[default_preset][f.name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "required"


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def _check_range(f: dataclasses.Field, value) -> str | None:
    """The problem with a field's final value under its metadata (choices, min, above, max), or None."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    choices = f.metadata.get("choices")
    low, high, above = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("above")
    for item in items:
        if choices is not None and item not in choices:
            return f"invalid choice {item!r} (choose from {', '.join(map(repr, choices))})"
        if isinstance(item, float) and not math.isfinite(item):
            return f"must be a finite number, got {item}"   # trap: nan < low and nan > high are both False
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


# --------------------------------------------------------------------------------------------------
# Device and seeds


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cpu`; `cuda` or `cuda:N` (a `UserError` when CUDA is
    not available, rather than a crash at the first `.to(device)`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            reason = "this torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise UserError(f"--device {name} was requested but CUDA is not available ({reason}); "
                            "use --device cpu or --device auto")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name!r} is not a valid device (expected auto, cpu, cuda or cuda:N)") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return device
    raise UserError(f"--device {name!r} is not a valid device (expected auto, cpu or cuda)")


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy's global generator and torch (CPU and every CUDA device).

    Same seed, same machine -> same numbers. (Across machines, or CPU vs GPU, float results may
    differ in the last bits: different kernels sum in different orders.)
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy's legacy seed must fit in 32 bits
    torch.manual_seed(seed)  # also seeds every CUDA device


# --------------------------------------------------------------------------------------------------
# Progress line


def format_duration(seconds: float) -> str:
    """A duration as people read it: 5 -> "5s", 72 -> "1m12s", 3725 -> "1h02m"; unknown -> "?"."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    total = max(0, int(round(seconds)))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_number(value) -> str:
    """A number with 3 significant digits and a unit suffix, for a log line.

    1.93127 -> "1.93", 0.0123 -> "0.0123", 5123.0 -> "5.12k", 2.5e6 -> "2.5M", 3.2e-4 -> "3.2e-04",
    0 -> "0", 42 -> "42" (ints below 1000 print whole), NaN -> "nan". 0-d tensors are accepted.
    """
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)) and abs(value) < 1000:
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        return f"{value:.1e}"
    # .3g keeps 3 significant digits and switches to exponent notation once the rounded value
    # reaches 1000 (999.9 -> "1e+03"): that is the signal to move up to the next unit.
    for scale, suffix in ((1.0, ""), (1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T")):
        text = f"{value / scale:.3g}"
        if "e" not in text:
            return text + suffix
    return f"{value:.2e}"


class Progress:
    """One readable line per interval: `sft step 120/500 | loss 1.93 | 5.1k tok/s | eta 1m12s`.

    Call `log(step, ...)` every step with the number of steps completed so far (1..total); it
    prints every `every` steps and always at `step == total` (that line says `done in ...`
    instead of an ETA). `tokens=` is the number of tokens this step processed; the throughput is
    the tokens since the last printed line over the time since it. Metrics are printed in the
    order given, formatted by `format_number`. `log` returns the printed line (or None).

    To avoid a GPU sync (`loss.item()`) on steps that print nothing, guard with `due(step)`:

        progress = Progress(cfg.max_steps, desc="sft")
        for step in range(1, cfg.max_steps + 1):
            ...
            if progress.due(step):
                progress.log(step, tokens=batch_tokens, loss=loss.item())
            else:
                progress.log(step, tokens=batch_tokens)   # counts tokens, prints nothing

    Args:
        total: the last step.
        desc: a prefix for the line (the stage name).
        every: steps between lines (default: total // 20, about twenty lines per run).
        start: the step the run starts from (resuming at step 300 of 500: `start=300`), so the ETA
            counts only the steps this run did.
        file: where to print (default: stdout at the time of printing).
        clock: a function returning seconds (tests inject a fake clock).
    """

    def __init__(self, total: int, desc: str = "", every: int | None = None, *, start: int = 0,
                 file=None, clock: Callable[[], float] = time.perf_counter):
        self.total = int(total)
        self.desc = desc
        self.every = max(1, int(every) if every else self.total // 20)
        self.start_step = int(start)
        self.file = file
        self.clock = clock
        self.start_time = clock()
        self._last_print_time = self.start_time
        self._tokens_since_print = 0

    def due(self, step: int) -> bool:
        """Whether `log(step)` will print."""
        return step % self.every == 0 or step >= self.total

    def log(self, step: int, *, tokens: int | None = None, **metrics) -> str | None:
        if tokens:
            self._tokens_since_print += int(tokens)
        if not self.due(step):
            return None
        now = self.clock()
        parts = [f"{self.desc} step {step}/{self.total}".strip()]
        parts += [f"{name} {format_number(value)}" for name, value in metrics.items()]
        interval = now - self._last_print_time
        if self._tokens_since_print and interval > 0:
            parts.append(f"{format_number(self._tokens_since_print / interval)} tok/s")
        elapsed = now - self.start_time
        if step >= self.total:
            parts.append(f"done in {format_duration(elapsed)}")
        else:
            steps_done = step - self.start_step
            eta = elapsed / steps_done * (self.total - step) if steps_done > 0 else math.nan
            parts.append(f"eta {format_duration(eta)}")
        line = " | ".join(parts)
        print(line, file=self.file if self.file is not None else sys.stdout, flush=True)
        self._last_print_time = now
        self._tokens_since_print = 0
        return line
