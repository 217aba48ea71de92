"""Training metrics: one JSON object per logged step, the small statistics the plots use, and the
one progress line per interval that a run prints (`sft step 120/500 | loss 1.93 | 5.1k tok/s | eta 1m12s`).

Every stage writes `out/<stage>_metrics.jsonl`:

    {"step": 1, "loss/sft": 4.12, "lr": 3e-05}
    {"step": 2, "loss/sft": 3.97, "lr": 6e-05}
    {"step": 100, "loss/sft": 1.93, "eval/loss": null}     <- NaN is written as null

JSONL (JSON Lines) because every tool reads it: `read_metrics` here,
`pandas.read_json(path, lines=True)`, `jq`. JSON has no NaN or Infinity, so a non-finite number is
written as `null`: a diverged loss is visible as a gap, and the file stays valid JSON for every
reader.

The file goes with the checkpoint beside it. A run keeps its lines in memory and writes the whole
file atomically (a temporary file, then a rename) at each `commit()`: just BEFORE each checkpoint
save, and at the end. So a run that stops - a NaN, a crash, Ctrl-C, `kill -9` - leaves the file as
it was at its last commit: never the previous run's lines half replaced, and never behind the
checkpoint (at most one save interval ahead of it, if it stopped during the save). A `--resume`d
run keeps the lines up to its checkpoint's step and drops the rest: they are logged again.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from minirlhf.checkpoint import atomic_write
from minirlhf.cli import UserError

__all__ = ["MetricsLogger", "read_metrics", "ema", "pearson_r", "spearman_rho", "Progress", "format_duration",
           "format_number"]


class MetricsLogger:
    """One JSON object per `log(step, **metrics)` call, written to a JSONL file by `commit()`.

        with MetricsLogger("out/sft_metrics.jsonl") as metrics:
            for step in ...:
                metrics.log(step, **{"loss/sft": loss, "lr": lr})
                if step % save_every == 0:
                    metrics.commit()          # first the metrics up to this step,
                    save_checkpoint(...)      # then the checkpoint they belong to
        # leaving the block without an error commits the last lines; an error commits nothing

    Values may be Python numbers, bools, strings, None, NumPy scalars or one-element tensors
    (converted with `.item()`, which syncs a GPU: log at intervals, not every step, on CUDA).
    NaN and +-Inf are written as `null`.

    Args:
        path: the JSONL file; its directory is created at the first commit.
        resume_step: a `--resume`d run: keep the file's lines up to this step (the checkpoint's)
            and drop later ones; None: a fresh run, which replaces the file at its first commit.
        enabled: False makes `log` and `commit` write nothing (data-parallel ranks other than 0).
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._lines: list[str] = []
        if enabled and resume_step is not None and self.path.exists():
            self._lines = [_json_line(record) for record in read_metrics(self.path) if record["step"] <= resume_step]
        self._closed = False

    def log(self, step: int, /, **metrics) -> dict[str, Any]:
        """Add `{"step": step, **metrics}` as one line; returns the record as written."""
        if self._closed:
            raise ValueError(f"MetricsLogger for {self.path} is closed")
        if "step" in metrics:
            raise ValueError("'step' is the record's key; pass it as the first argument")
        record = {"step": int(step)}
        for name, value in metrics.items():
            record[name] = _json_value(value, name)
        if self.enabled:
            self._lines.append(_json_line(record))
        return record

    def commit(self) -> None:
        """Write every line so far to the file, atomically (readers see the old file or the new)."""
        if self.enabled:
            with atomic_write(self.path, "w") as f:
                f.writelines(self._lines)

    def close(self) -> None:
        """Commit, then refuse further lines."""
        if not self._closed:
            self.commit()
            self._closed = True

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True   # an error: the file stays as at the last commit, with its checkpoint


def _json_line(record: dict) -> str:
    # allow_nan=False: a NaN that slipped through would make the file invalid JSON for other tools
    return json.dumps(record, allow_nan=False) + "\n"


def _json_value(value, name: str):
    """One metric value as a JSON-ready Python value (None for NaN/Inf)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {name!r}: expected a number, got a tensor of shape {tuple(value.shape)} "
                            "(reduce it first, e.g. .mean())")
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {name!r}: cannot log a {type(value).__name__}; expected a number")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a metrics JSONL file into a list of dicts (`null` comes back as None).

    A last line cut short by a crash (no final newline, not valid JSON) is dropped; any other bad
    line is a `UserError` naming the file and the line number.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"metrics file {path} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read metrics file {path}: {error}") from None
    lines = text.split("\n")
    records = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            cut_short = line_number == len(lines)  # only the last line can lack its "\n"
            if cut_short:
                break
            raise UserError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def ema(values: Iterable, alpha: float = 0.1) -> list[float | None]:
    """Exponential moving average that skips missing values.

        s_1 = x_1   (the first valid value: no warm-up bias towards 0)
        s_t = alpha * x_t + (1 - alpha) * s_{t-1}

    `alpha` is the weight of the newest value (1 = no smoothing); the average spans roughly the
    last 2/alpha - 1 values. None and NaN entries are skipped: they do not move the average, and
    their output is None (so the output lines up with the input). Example, alpha = 0.5:

        ema([1, None, 3, nan, 5], 0.5) == [1.0, None, 2.0, None, 3.5]
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"ema alpha must be in (0, 1], got {alpha}")
    smoothed: list[float | None] = []
    average = None
    for value in values:
        if value is None or math.isnan(float(value)):
            smoothed.append(None)
            continue
        value = float(value)
        average = value if average is None else alpha * value + (1.0 - alpha) * average
        smoothed.append(average)
    return smoothed


def pearson_r(x, y) -> float:
    """Pearson correlation: how well a straight line relates x and y, in [-1, 1].

        r = sum((x - mean x)(y - mean y)) / sqrt(sum((x - mean x)^2) * sum((y - mean y)^2))

    NaN when there are fewer than 2 points or either input is constant (r is undefined).
    """
    x, y = _paired_arrays(x, y)
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum()) / denominator if denominator > 0 else math.nan


def spearman_rho(x, y) -> float:
    """Spearman rank correlation: the Pearson correlation of the ranks, in [-1, 1].

    It asks only whether y goes up when x goes up, not by how much, which is what matters when
    comparing a reward model's scores with the gold labeler's: a reward model only needs to
    order responses correctly. Tied values get the average of their ranks, so
    ranks([10, 20, 20, 30]) = [1, 2.5, 2.5, 4].
    """
    x, y = _paired_arrays(x, y)
    return pearson_r(_average_ranks(x), _average_ranks(y))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the average of the ranks they span."""
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)  # the group of the j-th smallest value spans ranks last-count+1 .. last
    average_rank = last_rank - (counts - 1) / 2.0
    return average_rank[inverse].astype(np.float64)


def _paired_arrays(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    return x, y


# --------------------------------------------------------------------------------------------------
# The progress line


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
