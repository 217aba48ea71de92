"""experiments/seeds.py: the per-seed numbers it reads and the mean [min, max] it writes."""

import json
import math
import os

import pytest

from minirlhf.cli import UserError
from helpers import load_script

seeds = load_script("seeds", "experiments/seeds.py")


def write_eval(folder, sft_gold, ppo_gold, win):
    os.makedirs(folder)
    report = {"models": {"sft": {"gold/sample": sft_gold, "gold/sample_se": 0.1, "samples": 100, "kl_to_sft": 0.0},
                         "ppo": {"gold/sample": ppo_gold, "gold/sample_se": 0.1, "samples": 100, "kl_to_sft": 1.5,
                                 "minutes": 2.0, "samples_drawn": 768}},
              "win_rates": [{"model": "ppo", "baseline": "sft", "win_rate": win, "win_rate_excl_ties": win + 0.1,
                             "tie_rate": 0.3}],
              "best_of_n": None}
    with open(os.path.join(folder, "eval.json"), "w") as f:
        json.dump(report, f)


def test_seed_numbers_and_their_mean_and_range(tmp_path):
    write_eval(tmp_path / "seed_1", 7.0, 7.5, 0.6)
    write_eval(tmp_path / "seed_2", 7.0, 7.2, 0.7)
    one = seeds.seed_numbers(str(tmp_path / "seed_1"))
    # the SFT spread: se * sqrt(samples) = 0.1 * 10 = 1.0, so the gain is (7.5 - 7.0) / 1.0
    assert one["ppo/gold_gain_sd"] == pytest.approx(0.5)
    assert one["ppo/win_rate_vs_sft"] == 0.6 and one["ppo/samples_drawn"] == 768
    summary = seeds.summarise({1: one, 2: seeds.seed_numbers(str(tmp_path / "seed_2"))})
    assert summary["ppo/gold"] == {"mean": pytest.approx(7.35), "min": 7.2, "max": 7.5, "n": 2}
    assert summary["ppo/win_rate_vs_sft"]["mean"] == pytest.approx(0.65)
    assert seeds.cell(summary["ppo/gold"]) == "7.350 [7.200, 7.500]"
    assert math.isclose(summary["ppo/gold_gain_sd"]["min"], 0.2)


def test_bad_seeds_are_a_clear_error():
    with pytest.raises(UserError, match="--seeds"):
        seeds.parse_seeds("1,two")
