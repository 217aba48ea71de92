"""evaluate.py's outputs: eval.md (tables, and the same prompts answered side by side), eval.png and
eval_bon.png (figures), the summary table printed at the end (run_all.py prints it again), and the
JSON-safe form of eval.json. The numbers come from `evaluation.py` and `stats.py`; nothing here
computes a statistic.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from minirlhf import labeler, world
from minirlhf.checkpoint import atomic_write
from minirlhf.plots import save_figure
from minirlhf.stats import gao_curve, sqrt_kl


# --------------------------------------------------------------------------------------------------
# Figures


PART_COLOURS = {"correct": "#4C72B0", "harmless": "#55A868", "on_topic": "#8172B2", "concise": "#CCB974",
                "well_formed": "#64B5CD"}


def plot_overview(summaries: dict, wins: list[dict], n_prompts: int, out_path: str) -> None:
    """eval.png: left, each model's mean gold score as a stack of its weighted rubric parts (with
    +-1 standard error); right, the win rates (win / tie / loss) of each pair."""
    fig = Figure(figsize=(12.0 if wins else 6.5, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1.0]}) if wins else (fig.subplots(), None)
    names = list(summaries)
    bottom = np.zeros(len(names))
    for part, weight in labeler.WEIGHTS.items():
        heights = np.array([weight * summaries[m][f"gold/sample/{part}"] for m in names])
        left.bar(names, heights, bottom=bottom, color=PART_COLOURS.get(part), label=f"{part} (x{weight:g})")
        bottom += heights
    errors = [summaries[m]["gold/sample_se"] for m in names]
    left.errorbar(names, bottom, yerr=errors, fmt="none", ecolor="black", capsize=4)
    # the totals go under the bars, where neither the max line nor the legend can cover them
    # (three lines each, so that seven models' labels do not run into each other)
    left.set_xticks(range(len(names)), [f"{m}\n{total:.2f}\n± {se:.2f}" for m, total, se in zip(names, bottom, errors)])
    left.set_ylim(0, labeler.MAX_SCORE + 2.0)   # headroom above the max line for the legend
    left.axhline(labeler.MAX_SCORE, color="0.5", linestyle="--", linewidth=1, label="max score")
    left.set_ylabel(f"gold score (max {labeler.MAX_SCORE:g})")
    left.set_title(f"Gold labeler's score on {n_prompts} held-out prompts")
    left.legend(fontsize="small", loc="upper center", ncols=3)

    if right is None:  # one model: nothing to compare
        save_figure(fig, out_path)
        return
    labels = [f"{w['model']} vs {w['baseline']}" for w in wins]
    win = np.array([w["win_rate"] - w["tie_rate"] / 2 for w in wins])
    tie = np.array([w["tie_rate"] for w in wins])
    right.barh(labels, win, color="#55A868", label="wins")
    right.barh(labels, tie, left=win, color="0.75", label="ties")
    right.barh(labels, 1 - win - tie, left=win + tie, color="#C44E52", label="losses")
    for y, w in enumerate(wins):
        right.text(0.02, y, f"win rate {w['win_rate']:.2f} ({w['win_rate_excl_ties']:.2f} excl. ties)",
                   va="center", color="white", fontweight="bold")
    right.axvline(0.5, color="black", linestyle=":", linewidth=1)
    right.set_xlim(0, 1)
    right.invert_yaxis()
    right.set_xlabel("share of paired answers (same prompt, same sample index)")
    right.set_title("Who wins, judged by the gold labeler")
    right.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=3)   # below: never on a bar
    save_figure(fig, out_path)


def plot_bon(bon: dict | None, trajectory: dict | None, fits: dict, method_points: dict, out_path: str) -> None:
    """eval_bon.png: gold (left) and RM (right) score against sqrt(KL to SFT)."""
    fig = Figure(figsize=(14.0, 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    gold_ax, rm_ax = fig.subplots(1, 2)
    if bon is not None:
        d = sqrt_kl(bon["kl"])
        gold_ax.plot(d, bon["gold"], "o", color="C0", label=f"best-of-n from SFT ({bon['prompts']} prompts)")
        gold_ax.plot(d, bon["gold_ranked_by_gold"], "^:", color="C2",
                     label="best-of-n ranked by gold (a perfect RM: the ceiling)")
        for name, colour, what in (("rm", "C0", "RM"), ("gold", "C2", "gold")):
            optimum = bon["optimum"][name]   # from SFT itself (beta = infinity: KL 0) to the smallest beta
            gold_ax.plot(np.concatenate([[0.0], sqrt_kl(optimum["kl"])]), [bon["gold"][0]] + optimum["gold"], "-",
                         color=colour, alpha=0.45, linewidth=2.5,
                         label=f"π_SFT·exp({what}/β): the {what} score's KL-regularised optimum")
        rm_ax.plot(d, bon["rm"], "o-", color="C0", label="best-of-n: RM score of the pick")
        for n, x, y in zip(bon["n"], d, bon["gold"]):
            gold_ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize="small")
    if trajectory is not None:
        d = sqrt_kl(trajectory["kl"])
        gold_ax.plot(d, trajectory["gold"], "s", color="C1", alpha=0.7,
                     label=f"PPO during training ({trajectory['source']})")
        rm = [(x, y) for x, y in zip(d, trajectory["rm"]) if y is not None]
        if rm:
            rm_ax.plot(*zip(*rm), "s-", color="C1", alpha=0.7, label="PPO during training")
    for form, colour, what, data in (("bon", "C0", "best-of-n fit d(α - βd)", bon),
                                     ("rl", "C1", "RL fit d(α - β log d)", trajectory)):
        fit = fits.get(form)
        if fit:  # drawn over the range of its own data only: these fits are not for extrapolating
            curve = np.linspace(0.0, sqrt_kl(data["kl"]).max() * 1.05, 100)
            gold_ax.plot(curve, fit["baseline"] + gao_curve(fit, curve, form), "--", color=colour,
                         label=f"{what}: α={fit['alpha']:.2f}, β={fit['beta']:.2f}, R²={fit['r2']:.2f}")
    markers = {"ppo": ("*", "C3"), "dpo": ("D", "C4"), "grpo": ("P", "C5"), "rloo": ("X", "C6"), "expert": ("^", "C8")}
    for point in method_points.values():   # each trained policy, evaluated here on the best-of-n prompts
        marker, colour = markers.get(point["kind"], ("o", "C7"))
        for ax, key in ((gold_ax, "gold"), (rm_ax, "rm")):
            if point.get(key) is not None:
                ax.plot([point["d"]], [point[key]], marker, color=colour, markersize=13 if marker == "*" else 9,
                        markeredgecolor="black", label=f"{point['model']}: final policy (this evaluation)")
    for ax, ylabel, title in ((gold_ax, "gold score", "Gold score: what we actually want"),
                              (rm_ax, "RM score (normalised)", "RM score: the proxy being optimised")):
        ax.set_xlabel("sqrt(KL to SFT)   (KL in nats per response)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.secondary_xaxis("top", functions=(lambda d: np.square(d), lambda kl: np.sqrt(np.clip(kl, 0, None)))) \
            .set_xlabel("KL (nats)")
        if ax.get_legend_handles_labels()[0]:   # under the axes: the curves fill the plot
            ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2)
    save_figure(fig, out_path)


# --------------------------------------------------------------------------------------------------
# Tables


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value).replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def score_rows(summaries: dict) -> tuple[list[str], list[list]]:
    header = ["model", "gold (sampled)", "± s.e.", "gold (greedy)", *labeler.WEIGHTS, "RM", "EOS rate", "length",
              "KL to SFT"]
    rows = [[name, s["gold/sample"], s["gold/sample_se"], s["gold/greedy"],
             *(s[f"gold/sample/{part}"] for part in labeler.WEIGHTS), s["rm/sample"], s["eos_rate/sample"],
             s["length/sample"], s["kl_to_sft"]] for name, s in summaries.items()]
    return header, rows


def side_by_side_prompts(prompts: list[str], count: int) -> list[int]:
    """Indices of `count` prompts, taking the prompt families in turn so every family shows up."""
    by_family: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_family.setdefault((world.task_for_prompt(p) or world.Task("other", p)).family, []).append(i)
    chosen, queues = [], [list(q) for q in by_family.values()]
    while len(chosen) < min(count, len(prompts)):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def write_report(path: str, report: dict, all_answers: dict, prompts: list[str]) -> None:
    """eval.md: the tables of `report` (eval.json's contents), then the same prompts answered side by side."""
    summaries, cfg = report["models"], report["config"]
    lines = ["# Evaluation: what each stage of RLHF did", "",
             f"{len(prompts)} held-out prompts (`{report['prompts_file']}`), {cfg['samples']} samples each at "
             f"temperature {cfg['temperature']:g} plus one greedy answer, at most {cfg['max_new_tokens']} tokens; "
             f"judged by the gold labeler (`minirlhf/labeler.py`, max {labeler.MAX_SCORE:g}).", ""]
    for note in report["notes"]:
        lines.append(f"- {note}")
    lines += ["", "## Scores", "",
              "Means over all samples. The rubric parts are in [0, 1] (weights: " +
              ", ".join(f"{k} x{v:g}" for k, v in labeler.WEIGHTS.items()) + "). RM: the reward model's "
              "normalised score (SFT samples: mean 0, std 1). Length in tokens, EOS included. KL to SFT: "
              "sum over the response of log pi - log pi_sft, nats.", ""]
    lines += markdown_table(*score_rows(summaries))
    families = sorted({k.rsplit("/", 1)[1] for s in summaries.values() for k in s if "/family/" in k})
    lines += ["", "Gold score (sampled) by prompt family:", ""]
    lines += markdown_table(["model", *families], [[name, *(s.get(f"gold/sample/family/{f}") for f in families)]
                                                   for name, s in summaries.items()])
    judged = {name: s for name, s in summaries.items() if "rm/gold_accuracy" in s}
    if judged:
        lines += ["", "The reward model against the gold labeler, on each model's samples of these held-out prompts "
                      "(pairwise accuracy on the pairs of one prompt's samples whose gold scores differ, by family, "
                      "and split into pairs whose rubric part `correct` differs - is the answer right? - and pairs "
                      "equally correct that differ in form; Spearman within a prompt; how often the RM's favourite "
                      "has the top gold score):", ""]
        lines += markdown_table(["samples of", "RM accuracy", *families, "correctness", "form", "Spearman",
                                 "top choice"],
                                [[name, s["rm/gold_accuracy"], *(s.get(f"rm/gold_accuracy/{f}") for f in families),
                                  s.get("rm/gold_accuracy/correctness"), s.get("rm/gold_accuracy/form"),
                                  s.get("rm/gold_spearman_within"), s.get("rm/gold_top_choice")]
                                 for name, s in judged.items()])
    methods = [name for name, s in summaries.items() if name in report["kinds"] and
               report["kinds"][name] not in ("base", "sft")]
    sft_wins = {w["model"]: w for w in report["win_rates"] if report["kinds"].get(w["baseline"]) == "sft"}
    if methods:
        lines += ["", "## Methods side by side", "",
                  "Each trained policy against SFT on the same prompts (gold score, win rate with ties half and "
                  "without ties, KL to SFT in nats), and what it cost: the minutes of its own training stage and "
                  "the responses it sampled while training (0: offline, like DPO).", ""]
        lines += markdown_table(
            ["method", "gold", "± s.e.", "win rate vs SFT", "excl. ties", "tie rate", "KL to SFT", "minutes",
             "samples drawn"],
            [[name, summaries[name]["gold/sample"], summaries[name]["gold/sample_se"],
              sft_wins.get(name, {}).get("win_rate"), sft_wins.get(name, {}).get("win_rate_excl_ties"),
              sft_wins.get(name, {}).get("tie_rate"), summaries[name]["kl_to_sft"], summaries[name].get("minutes"),
              summaries[name].get("samples_drawn")] for name in methods])
    if report["win_rates"]:
        lines += ["", "## Win rates", "",
                  "Answer j of model A against answer j of model B on the same prompt, judged by gold score; "
                  "ties count half.", ""]
        lines += markdown_table(["model", "vs", "win rate", "tie rate", "win rate excl. ties", "pairs"],
                                [[w["model"], w["baseline"], w["win_rate"], w["tie_rate"], w["win_rate_excl_ties"],
                                  w["pairs"]] for w in report["win_rates"]])
    bon = report["best_of_n"]
    if bon is not None:
        lines += ["", "## Best-of-n from SFT (ranked by the RM, and by gold)", "",
                  f"On {bon['prompts']} prompts, {bon['samples_per_prompt']} SFT samples each; every n is "
                  "estimated from all of them (the unbiased estimator in `best_of_n_expected`). "
                  "KL = log n - (n-1)/n.", ""]
        rows = [[f"best-of-{n}", kl, math.sqrt(kl), rm, gold, ceiling] for n, kl, rm, gold, ceiling in
                zip(bon["n"], bon["kl"], bon["rm"], bon["gold"], bon["gold_ranked_by_gold"])]
        points = list(report["methods_on_bon_prompts"].values())   # the trained policies on the same prompts
        for point in points:
            rows.append([f"{point['model']} (same prompts)", point["kl"], point["d"], point["rm"], point["gold"], None])
        lines += markdown_table(["policy", "KL", "sqrt(KL)", "RM", "gold", "gold if ranked by gold"], rows)
        lines += ["", "The last column ranks the same samples by the gold labeler instead of the RM: what a "
                  "perfect reward model would reach at each KL. The gap to the gold column is what the RM's "
                  "errors cost."]
        optimum = bon["optimum"]
        lines += ["", "### The KL-regularised optimum over the same samples", "",
                  "PPO maximises score - β·KL(π || SFT); the best any policy can do at that is π_SFT·exp(score/β). "
                  "Reweighting the SFT samples above by exp(score/β) gives it (limited to those samples), for "
                  "the RM's score and for the gold score in SFT standard deviations. Win rate: against an SFT "
                  "sample, by gold, ties half.", ""]
        rows = [[beta, optimum["rm"]["kl"][k], optimum["rm"]["gold"][k], optimum["rm"]["win_rate"][k],
                 optimum["gold"]["kl"][k], optimum["gold"]["gold"][k], optimum["gold"]["win_rate"][k]]
                for k, beta in enumerate(optimum["beta"])]
        for point in points:
            rows.append([f"{point['model']} (same prompts)", point["kl"], point["gold"], point.get("win_rate"),
                         None, None, None])
        lines += markdown_table(["β", "RM optimum: KL", "gold", "win rate vs SFT", "gold optimum: KL", "gold",
                                 "win rate vs SFT"], rows)
    for form, what in (("bon", "best-of-n: gold - gold(SFT) = d(α - βd)"),
                       ("rl", "PPO: gold - gold(start) = d(α - β log d)")):
        fit = report["fits"].get(form)
        if fit:
            lines.append(f"\nFit ({what}, d = sqrt(KL)): α = {fit['alpha']:.3f}, β = {fit['beta']:.3f}, "
                         f"R² = {fit['r2']:.3f}")
    lines += ["", "![overview](eval.png)", "", "![best-of-n and PPO against KL](eval_bon.png)", "",
              "## The same prompts, side by side", "",
              "Sample 1 of each model (temperature {:g}), with its gold score; ⏹ = stopped with end-of-text, "
              "… = ran out of tokens.".format(cfg['temperature']), ""]
    for i in side_by_side_prompts(prompts, cfg['side_by_side']):
        lines.append(f"**{prompts[i]}**\n")
        for name, answers in all_answers.items():
            mark = "⏹" if answers.ended[0, i] else "…"
            text = answers.texts[0][i].replace("\n", " ").strip()
            lines.append(f"- {name} (gold {answers.gold[0, i]:.2f}): {text} {mark}")
        lines.append("")
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def print_summary(summaries: dict, wins: list[dict]) -> None:
    header, rows = score_rows(summaries)
    keep = [0, 1, 3, 9, 10, 11, 12]  # model, gold sampled, gold greedy, RM, EOS rate, length, KL
    widths = [max(len(header[k]), 8) for k in keep]
    print("  ".join(header[k].ljust(w) for k, w in zip(keep, widths)))
    for row in rows:
        print("  ".join(("-" if row[k] is None else f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]))
                        .ljust(w) for k, w in zip(keep, widths)))
    for w in wins:
        print(f"win rate {w['model']} vs {w['baseline']}: {w['win_rate']:.3f} "
              f"(ties {w['tie_rate']:.3f}, excluding ties {w['win_rate_excl_ties']:.3f})")


# --------------------------------------------------------------------------------------------------


def json_safe(value):
    """NaN and Inf become null (JSON has neither), NumPy scalars plain numbers, tuples lists."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
