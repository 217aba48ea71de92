"""Tests for the progress line in minirlhf/metrics.py: number and duration formats, rates, ETA."""

import numpy as np
import pytest
import torch

from minirlhf.metrics import Progress, format_duration, format_number



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
