"""Tests for minirlhf/eval_report.py: the pieces of eval.md and eval.json that are not drawing."""

from __future__ import annotations

import math

import numpy as np

from minirlhf import eval_report


def test_side_by_side_prompts_take_the_families_in_turn():
    prompts = ["what does a cow eat?", "what does a dog eat?", "what is 3 plus 4?", "praise the dog.",
               "what is 4 minus 1?"]
    chosen = eval_report.side_by_side_prompts(prompts, 3)
    assert chosen == [0, 2, 3], f"one prompt per family first, got {chosen}"
    assert sorted(eval_report.side_by_side_prompts(prompts, 10)) == list(range(5))


def test_markdown_table_formats_cells():
    lines = eval_report.markdown_table(["model", "gold", "KL"], [["a|b", 1.23456, None], ["sft", float("nan"), 2]])
    assert lines == ["| model | gold | KL |", "|---|---|---|", "| a\\|b | 1.235 | - |", "| sft | - | 2 |"], lines


def test_json_safe_turns_nan_and_numpy_into_plain_json():
    value = {"a": [np.float32(0.5), math.nan, (np.int64(3), math.inf)], "b": "x"}
    assert eval_report.json_safe(value) == {"a": [0.5, None, [3, None]], "b": "x"}
