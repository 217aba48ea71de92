"""The stages' figures: training curves, score scatter plots and RL's over-optimisation view, as PNG files.

Every stage ends with

    plot_curves(read_metrics("out/sft_metrics.jsonl"), SFT_PANELS, "out/sft_curves.png", title="SFT")

where a panel spec says which metrics share a subplot:

    SFT_PANELS = [
        {"keys": ["loss/sft", "eval/loss"], "title": "loss", "ylabel": "nats per token", "logy": True},
        {"keys": ["lr"], "title": "learning rate", "ylabel": "lr", "smooth": False},
    ]

Each metric is drawn twice in the same colour: the raw values faint, and an exponential moving
average on top, so both the noise and the trend are visible. A key no record has is skipped
(one spec serves runs with and without optional metrics); a panel with no data is left out.

Figures are built with `matplotlib.figure.Figure` on the Agg canvas, never through `pyplot`:
no GUI backend is needed (servers, CI), no global state changes for a notebook user, and no
figure piles up in pyplot's registry. Every PNG is written by `save_figure`, atomically.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from minirlhf.checkpoint import atomic_write
from minirlhf.metrics import ema, pearson_r, spearman_rho

__all__ = ["plot_curves", "plot_scatter", "plot_overoptimisation", "save_figure", "curve_smoothing", "DPI"]

DPI = 110
PANEL_SIZE = (5.2, 3.6)  # inches per subplot: ~570 x 400 pixels at DPI, readable on a laptop screen
RAW_ALPHA = 0.25  # the raw series is drawn faint under its moving average
PANEL_FIELDS = {"keys", "title", "ylabel", "logy", "hline", "hline_label", "smooth"}


def save_figure(fig, out_path: str | os.PathLike, dpi: int = DPI) -> None:
    """Write a figure to `out_path` atomically (the format comes from the suffix, PNG by default).

    The one image writer: `plot_curves`, `plot_scatter` and any stage's own figure go through it.
    A figure made with `pyplot` is closed afterwards, or pyplot would keep every figure alive.
    """
    out_path = Path(out_path)
    # explicit format: matplotlib would guess it from the temporary file's name (".tmp")
    image_format = out_path.suffix.lstrip(".").lower() or "png"
    try:
        with atomic_write(out_path, "wb") as f:
            fig.savefig(f, format=image_format, dpi=dpi)
    finally:
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close(fig)  # a no-op for a figure pyplot does not manage


def curve_smoothing(n_points: int) -> float:
    """The EMA weight `plot_curves` uses for a series of `n_points`: about a twentieth of the
    series in the average (alpha = 40 / (n + 20), so an average over ~2/alpha = n/20 values),
    between 0.02 (at most ~100 values) and 1 (no smoothing for 20 points or fewer)."""
    return min(1.0, max(0.02, 40.0 / (n_points + 20)))


def plot_curves(
    records: Sequence[dict[str, Any]],
    panels: Sequence[dict[str, Any]],
    out_path: str | os.PathLike,
    *,
    title: str,
    x_key: str = "step",
    xlabel: str = "step",
    smoothing: float | None = None,
) -> None:
    """Plot metric records (as from `read_metrics`) as a grid of panels and save a PNG.

    Args:
        records: dicts such as `{"step": 10, "loss/sft": 2.1}`; None/NaN values are skipped. When
            several records share an x value (a resumed run re-logs the steps after its
            checkpoint), the later one wins and the series is sorted by x.
        panels: one dict per subplot: `keys` (metric names, one line each), `title`, `ylabel`,
            and optionally `logy` (log y axis; symlog when a value is <= 0), `hline` (a dashed
            reference line, e.g. a target KL) with `hline_label`, and `smooth` (default True;
            False draws the raw values only, for a schedule such as the learning rate, which is
            not noisy and which a moving average would only show late).
        out_path: the PNG to write.
        title: the figure's title.
        x_key, xlabel: the record field used as x, and its axis label.
        smoothing: the EMA weight (see `metrics.ema`); default `curve_smoothing(len(series))`.
    """
    drawable = []  # (panel, [(key, xs, ys), ...]) for panels with at least one series
    for panel in panels:
        unknown = set(panel) - PANEL_FIELDS
        if unknown:
            raise ValueError(f"unknown panel fields {sorted(unknown)}; expected some of {sorted(PANEL_FIELDS)}")
        if isinstance(panel["keys"], str):
            raise TypeError(f"panel 'keys' must be a list of metric names, got the string {panel['keys']!r}")
        series = [(key, *_series(records, x_key, key)) for key in panel["keys"]]
        series = [(key, xs, ys) for key, xs, ys in series if xs]
        if series:
            drawable.append((panel, series))

    n_panels = max(1, len(drawable))
    n_cols = 1 if n_panels == 1 else 2 if n_panels in (2, 4) else 3
    n_rows = math.ceil(n_panels / n_cols)
    fig = Figure(figsize=(PANEL_SIZE[0] * n_cols, PANEL_SIZE[1] * n_rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    fig.suptitle(title, fontsize="x-large")

    if not drawable:
        axes[0].text(0.5, 0.5, "no metrics recorded", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, (panel, series) in zip(axes, drawable):
        all_values = []
        for color_index, (key, xs, ys) in enumerate(series):
            color = f"C{color_index}"
            # markers on sparse series (held-out evaluations every N steps): a single point would draw no
            # line at all, and a few points joined by straight lines look like measurements in between
            marker = "o" if len(xs) <= 12 else None
            if panel.get("smooth", True):
                ema_weight = smoothing if smoothing is not None else curve_smoothing(len(ys))
                ax.plot(xs, ys, color=color, alpha=RAW_ALPHA, linewidth=1.0, marker=marker)
                ax.plot(xs, ema(ys, ema_weight), color=color, linewidth=1.8, label=key, marker=marker)
            else:
                ax.plot(xs, ys, color=color, linewidth=1.8, label=key, marker=marker)
            all_values += ys
        if panel.get("hline") is not None:
            ax.axhline(panel["hline"], color="0.35", linestyle="--", linewidth=1.0,
                       label=panel.get("hline_label"))
        if panel.get("logy"):
            # a log axis cannot show values <= 0 (a loss can't, but a reward can): fall back to symlog
            ax.set_yscale("log" if min(all_values) > 0 else "symlog")
        ax.set_title(panel.get("title", ", ".join(key for key, _, _ in series)))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    first_unused = len(drawable) if drawable else 1
    for ax in axes[first_unused:]:
        ax.set_visible(False)  # the empty cells at the end of the grid
    save_figure(fig, out_path)


def _series(records, x_key: str, key: str) -> tuple[list[float], list[float]]:
    """The (x, y) points of one metric: finite values only, the last record per x, sorted by x."""
    points: dict[float, float] = {}
    for record in records:
        x, y = record.get(x_key), record.get(key)
        if x is None or y is None or isinstance(y, str) or isinstance(x, str):
            continue
        x, y = float(x), float(y)
        if math.isfinite(x) and math.isfinite(y):
            points[x] = y
    xs = sorted(points)
    return xs, [points[x] for x in xs]


def plot_scatter(
    x,
    y,
    out_path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    annotate: str | None = None,
) -> None:
    """A scatter plot of paired values, e.g. reward-model score (y) against gold score (x).

    With `annotate="corr"`: a least-squares line, and the Pearson and Spearman correlations in the
    legend (see `metrics.pearson_r` / `metrics.spearman_rho`). Non-finite pairs are dropped.
    """
    if annotate not in (None, "corr"):
        raise ValueError(f"annotate must be None or 'corr', got {annotate!r}")
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]

    fig = Figure(figsize=(6.0, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(x, y, s=16, alpha=0.5, color="C0", edgecolors="none", label=f"{len(x)} points")
    if annotate == "corr":
        correlations = f"Pearson r = {pearson_r(x, y):.3f}, Spearman ρ = {spearman_rho(x, y):.3f}"
        if len(x) >= 2 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, deg=1)
            ends = np.array([x.min(), x.max()])
            ax.plot(ends, slope * ends + intercept, color="C3", linewidth=1.5,
                    label=f"fit y = {slope:.3g}x {'-' if intercept < 0 else '+'} {abs(intercept):.3g}\n{correlations}")
        else:
            ax.plot([], [], " ", label=correlations)  # a legend entry without a line: no fit possible
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, out_path)


def plot_overoptimisation(records: list[dict], reward: str, out_path: str | os.PathLike) -> None:
    """Proxy score (what PPO optimises) and gold score against sqrt(KL to the reference), as Gao et
    al. 2022 plot them, from the held-out evaluations of an RL run's metrics (`eval/gold`, `eval/kl`,
    `eval/rm`; `reward`: what the run optimised, "rm" or "gold"). Both are changes since SFT in units
    of the SFT policy's spread: the RM is normalised that way already; gold is
    (gold - gold_sft) / sd_sft."""
    evals = [r for r in records if r.get("eval/gold") is not None and r.get("eval/kl") is not None]
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(f"Over-optimisation view (held-out prompts, reward = {reward})")
    if not evals:
        ax.text(0.5, 0.5, "no held-out evaluation (--eval-prompts 0)", ha="center", va="center",
                transform=ax.transAxes)
        save_figure(fig, out_path)
        return
    gold0, sd0 = evals[0]["eval/gold"], max(evals[0].get("eval/gold_sd") or 1.0, 1e-6)
    sqrt_kl = [math.sqrt(max(r["eval/kl"], 0.0)) for r in evals]  # k1 KL of a few samples can dip below 0
    if all(r.get("eval/rm") is not None for r in evals):
        label = "proxy: reward model score" if reward == "rm" else "reward model score (not optimised here)"
        ax.plot(sqrt_kl, [r["eval/rm"] - evals[0]["eval/rm"] for r in evals], "o-", color="C0", label=label)
    gold = [(r["eval/gold"] - gold0) / sd0 for r in evals]
    ax.plot(sqrt_kl, gold, "s-", color="C3", label="gold labeler score")
    for x, y, record in zip(sqrt_kl, gold, evals):   # which update each point is
        ax.annotate(str(record["step"]), (x, y), fontsize=7, alpha=0.6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xlabel("sqrt(KL(policy || SFT))   (KL in nats per response; labels: PPO update)")
    ax.set_ylabel("change since SFT (SFT standard deviations)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, out_path)
