"""Tests for minirlhf/metrics.py and minirlhf/plots.py: the JSONL log, EMA, correlations, PNG files."""

import json
import math
import struct

import numpy as np
import pytest
import torch

from minirlhf.cli import UserError
from minirlhf.metrics import MetricsLogger, ema, pearson_r, read_metrics, spearman_rho
from minirlhf.plots import DPI, PANEL_SIZE, curve_smoothing, plot_curves, plot_scatter, save_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels, read from the PNG's IHDR chunk (bytes 16..24)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# --------------------------------------------------------------------------------------------------
# MetricsLogger / read_metrics


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "run" / "sft_metrics.jsonl"  # the directory is created
    with MetricsLogger(path) as metrics:
        metrics.log(1, **{"loss/sft": 2.5, "lr": 3e-4, "tokens": 512})
        metrics.log(2, **{"loss/sft": torch.tensor(2.25), "policy/clipfrac": np.float32(0.125), "phase": "eval"})
        metrics.log(3, done=True)
    assert read_metrics(path) == [
        {"step": 1, "loss/sft": 2.5, "lr": 3e-4, "tokens": 512},
        {"step": 2, "loss/sft": 2.25, "policy/clipfrac": 0.125, "phase": "eval"},
        {"step": 3, "done": True},
    ]
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines), "one JSON object per line"


def test_nan_and_inf_are_written_as_null(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as metrics:
        metrics.log(1, loss=float("nan"), kl=float("inf"), reward=torch.tensor(float("-inf")), ok=1.0)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text, f"not valid JSON for other readers: {text!r}"
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert read_metrics(path) == [{"step": 1, "loss": None, "kl": None, "reward": None, "ok": 1.0}]


def test_lines_reach_the_file_at_commit_and_replace_it_whole(tmp_path):
    """The file goes with a checkpoint: an earlier run's file stays whole until the new run commits
    (just before its first save), and a run that stops with an error commits nothing."""
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as metrics:
        metrics.log(1, loss=1.0)
        metrics.log(2, loss=0.5)
    earlier = path.read_bytes()

    metrics = MetricsLogger(path)
    metrics.log(1, loss=3.0)
    assert path.read_bytes() == earlier, "a fresh run must not touch the file before its first commit"
    metrics.commit()
    assert read_metrics(path) == [{"step": 1, "loss": 3.0}], "a commit replaces the file with this run's lines"
    metrics.log(2, loss=2.0)
    metrics.close()   # close commits
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    with pytest.raises(ValueError, match="closed"):
        metrics.log(3, loss=1.0)

    with pytest.raises(RuntimeError, match="diverged"):
        with MetricsLogger(path) as metrics:
            metrics.log(1, loss=float("nan"))
            raise RuntimeError("diverged")
    assert [r["step"] for r in read_metrics(path)] == [1, 2], "a failed run left the earlier file as it was"
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"], "no temporary file left behind"


def test_resume_keeps_the_lines_up_to_the_checkpoint(tmp_path):
    """A run interrupted at step 5 with its checkpoint at step 3 logged 4 and 5 already: the resumed
    run drops them (it logs them again), keeping the earlier lines byte for byte."""
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as metrics:
        for step in range(6):
            metrics.log(step, loss=1.0 / (step + 1), note="x")
    kept_bytes = b"".join(path.read_bytes().splitlines(keepends=True)[:4])
    with MetricsLogger(path, resume_step=3) as metrics:
        metrics.log(4, loss=9.0)
    assert path.read_bytes().startswith(kept_bytes)
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3, 4]
    assert read_metrics(path)[-1] == {"step": 4, "loss": 9.0}
    with MetricsLogger(tmp_path / "missing.jsonl", resume_step=3) as metrics:   # no file: nothing to keep
        metrics.log(4, loss=1.0)
    assert read_metrics(tmp_path / "missing.jsonl") == [{"step": 4, "loss": 1.0}]


def test_a_disabled_logger_writes_nothing(tmp_path):
    with MetricsLogger(tmp_path / "m.jsonl", enabled=False) as metrics:   # a rank other than 0
        metrics.log(1, loss=1.0)
        metrics.commit()
    assert list(tmp_path.iterdir()) == []


def test_logger_rejects_what_is_not_a_metric(tmp_path):
    with MetricsLogger(tmp_path / "m.jsonl") as metrics:
        with pytest.raises(TypeError, match="'logits'"):
            metrics.log(1, logits=torch.ones(3))
        with pytest.raises(TypeError, match="'config'"):
            metrics.log(1, config={"lr": 1})
        with pytest.raises(ValueError, match="step"):
            metrics.log(1, step=2)


def test_read_metrics_tolerates_a_cut_last_line_only(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # killed mid-write
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]

    path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"m\.jsonl:2: not valid JSON"):
        read_metrics(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"m\.jsonl:2: expected a JSON object"):
        read_metrics(path)
    with pytest.raises(UserError, match="missing.jsonl"):
        read_metrics(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------------------------------
# ema


def test_ema_hand_worked():
    # alpha 0.5: 1 -> (0.5*3 + 0.5*1) = 2 -> (0.5*5 + 0.5*2) = 3.5; the gaps do not move it
    assert ema([1, None, 3, float("nan"), 5], alpha=0.5) == [1.0, None, 2.0, None, 3.5]
    # alpha 0.25 on a step: 0, then 0.25*4 = 1, then 0.25*4 + 0.75*1 = 1.75
    assert ema([0, 4, 4], alpha=0.25) == [0.0, 1.0, 1.75]
    assert ema([None, None, 2.0, 4.0], alpha=0.5) == [None, None, 2.0, 3.0], "starts at the first valid value"
    assert ema([3, 1, 4], alpha=1.0) == [3.0, 1.0, 4.0], "alpha 1 is no smoothing"
    assert ema([]) == []


def test_ema_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    values = rng.normal(size=50).tolist()
    values[7] = float("nan")
    values[20] = None
    alpha = 0.15
    expected, average = [], None
    for value in values:  # the textbook recurrence, written out
        if value is None or value != value:
            expected.append(None)
            continue
        average = value if average is None else average + alpha * (value - average)
        expected.append(average)
    got = ema(values, alpha)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert (g is None and e is None) or math.isclose(g, e, rel_tol=1e-12), f"ema[{i}]: expected {e}, got {g}"


def test_ema_rejects_bad_alpha():
    for alpha in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            ema([1.0], alpha)


# --------------------------------------------------------------------------------------------------
# correlations


def test_pearson_hand_worked():
    # dx = dy' = [-1.5, -0.5, 0.5, 1.5]; dy = [-1.5, 0.5, -0.5, 1.5]; sum dx*dy = 4, sum dx^2 = sum dy^2 = 5
    assert pearson_r([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson_r([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson_r([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)
    assert math.isnan(pearson_r([1, 2, 3], [5, 5, 5])), "undefined for a constant input"
    assert math.isnan(pearson_r([1], [2])), "undefined for one point"


def test_spearman_uses_ranks_with_averaged_ties():
    x = [1, 2, 3, 4]
    assert spearman_rho(x, [1, 8, 27, 64]) == pytest.approx(1.0), "any increasing function has rho = 1"
    assert pearson_r(x, [1, 8, 27, 64]) < 0.99, "...while Pearson sees the curve"
    # ranks of [10, 20, 20, 30] are [1, 2.5, 2.5, 4]; against [1, 2, 3, 4]:
    # dx = [-1.5, 0, 0, 1.5], dy = [-1.5, -0.5, 0.5, 1.5]: r = 4.5 / sqrt(4.5 * 5) = 0.9487
    assert spearman_rho([10, 20, 20, 30], x) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_correlations_agree_with_scipy():
    stats = pytest.importorskip("scipy.stats")  # an independent oracle, when installed
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    y = 0.5 * x + rng.normal(size=40)
    y[::5] = np.round(y[::5])  # a few ties
    x[::7] = 0.0
    assert pearson_r(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman_rho(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


# --------------------------------------------------------------------------------------------------
# plots


def fake_records(n=60):
    rng = np.random.default_rng(0)
    records = []
    for step in range(1, n + 1):
        record = {"step": step, "loss/sft": 3.0 * math.exp(-step / 20) + 0.1 * rng.random(),
                  "lr": 3e-4 * min(1.0, step / 10)}
        if step % 10 == 0:
            record["eval/loss"] = 3.2 * math.exp(-step / 25)
        if step == 30:
            record["loss/sft"] = None  # a NaN logged as null
        records.append(record)
    return records


PANELS = [
    {"keys": ["loss/sft", "eval/loss"], "title": "loss", "ylabel": "nats per token", "logy": True},
    {"keys": ["objective/kl"], "title": "KL (PPO only)", "ylabel": "nats", "hline": 6.0},  # absent: left out
    {"keys": ["lr", "not_logged"], "title": "learning rate", "ylabel": "lr", "smooth": False},
]


def test_plot_curves_writes_a_png_and_skips_missing_keys(tmp_path):
    path = tmp_path / "out" / "sft_curves.png"
    plot_curves(fake_records(), PANELS, path, title="SFT")
    width, height = png_size(path)
    # the KL panel has no data: 2 panels remain, side by side
    assert (width, height) == (round(2 * PANEL_SIZE[0] * DPI), round((PANEL_SIZE[1] + 0.5) * DPI))
    assert sorted(p.name for p in path.parent.iterdir()) == ["sft_curves.png"], "no temporary file left"


def test_plot_curves_grid_and_edge_cases(tmp_path):
    records = [{"step": 1, "a": 1.0, "b": -2.0, "c": 0.5, "d": 3.0}, {"step": 2, "a": 0.5, "b": 1.0, "d": 2.0}]
    panels = [{"keys": [k], "title": k, "ylabel": k, "logy": True} for k in "abcd"]  # b <= 0: symlog
    path = tmp_path / "grid.png"
    plot_curves(records, panels, path, title="four panels", smoothing=0.5)
    assert png_size(path) == (round(2 * PANEL_SIZE[0] * DPI), round((2 * PANEL_SIZE[1] + 0.5) * DPI)), "2 x 2"

    path = tmp_path / "empty.png"
    plot_curves([], PANELS, path, title="no data yet")  # still a figure, saying so
    assert png_size(path)[0] > 0

    with pytest.raises(ValueError, match="ylable"):
        plot_curves(records, [{"keys": ["a"], "ylable": "typo"}], tmp_path / "x.png", title="t")
    with pytest.raises(TypeError, match="list of metric names"):
        plot_curves(records, [{"keys": "a"}], tmp_path / "x.png", title="t")


def test_curve_smoothing_range():
    assert curve_smoothing(1) == 1.0 and curve_smoothing(20) == 1.0, "short series are not smoothed"
    assert curve_smoothing(500) == pytest.approx(40 / 520)
    assert curve_smoothing(100_000) == 0.02


def test_plot_scatter(tmp_path):
    rng = np.random.default_rng(0)
    gold = rng.normal(size=200)
    rm_score = 0.8 * gold + 0.4 * rng.normal(size=200)
    rm_score[3] = np.nan  # dropped
    path = tmp_path / "rm_vs_gold.png"
    plot_scatter(gold, rm_score, path, xlabel="gold score", ylabel="RM score", title="RM vs gold", annotate="corr")
    assert png_size(path) == (round(6.0 * DPI), round(4.8 * DPI))

    plot_scatter([1, 1, 1], [1, 2, 3], tmp_path / "flat.png", xlabel="x", ylabel="y", title="t", annotate="corr")
    assert png_size(tmp_path / "flat.png")[0] > 0, "a constant x (no fit possible) still plots"
    with pytest.raises(ValueError, match="annotate"):
        plot_scatter([1], [1], tmp_path / "x.png", xlabel="x", ylabel="y", title="t", annotate="r2")
    with pytest.raises(ValueError, match="same length"):
        plot_scatter([1, 2], [1], tmp_path / "x.png", xlabel="x", ylabel="y", title="t")


def test_save_figure_is_atomic(tmp_path):
    from matplotlib.figure import Figure

    path = tmp_path / "curves.png"
    figure = Figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    save_figure(figure, path)
    before = path.read_bytes()
    assert before[:8] == PNG_SIGNATURE

    def crash(*args, **kwargs):
        raise RuntimeError("renderer died")

    figure.savefig = crash
    with pytest.raises(RuntimeError, match="renderer died"):
        save_figure(figure, path)
    assert path.read_bytes() == before, "a failed save must leave the previous PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"], "no temporary file left"


def test_save_figure_closes_pyplot_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")  # tests run headless
    import matplotlib.pyplot as plt

    plt.close("all")
    figure = plt.figure()
    plt.plot([1, 2, 3])
    save_figure(figure, tmp_path / "pyplot.png")
    assert plt.get_fignums() == [], "pyplot would keep the figure alive forever"
    assert png_size(tmp_path / "pyplot.png")[0] > 0
