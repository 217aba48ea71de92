"""The statistics of the evaluation: pure functions on numbers, each tested against a plain reference.

    win_rate                paired gold scores of two policies -> win rate (ties half), tie rate
    best_of_n_kl            KL of best-of-n to its base policy, in closed form
    best_of_n_expected      the unbiased best-of-n estimator from N >= n samples
    kl_regularised_optimum  pi_SFT * exp(score / beta) restricted to N samples
    fit_gao, gao_curve      Gao et al. 2022's best-of-n and RL functional forms, least squares
    sqrt_kl                 d = sqrt(KL), the x axis of every over-optimisation plot

`evaluation.py` and evaluate.py use them; `tests/test_stats.py` checks them against hand-worked values and
loops.
"""

from __future__ import annotations

import math

import numpy as np

TIE_TOLERANCE = 1e-9  # two gold totals closer than this are a tie (they are sums of fractions)



def win_rate(scores_a, scores_b) -> dict:
    """How often A's answer beats B's, judged by gold scores paired answer by answer.

    win_rate = P(A > B) + 0.5 P(A = B)          (ties count half)
    win_rate_excl_ties = P(A > B) / P(A != B)   (the decided pairs only)
    A win rate with ties counted half can't exceed 0.5 + (1 - tie_rate) / 2, so the tie rate is
    reported beside it.
    """
    a = np.asarray(scores_a, dtype=np.float64).ravel()
    b = np.asarray(scores_b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"win_rate needs two non-empty score lists of one length, got {a.size} and {b.size}")
    tie = np.abs(a - b) <= TIE_TOLERANCE
    win = (a > b) & ~tie
    decided = a.size - tie.sum()
    return {"win_rate": float(win.mean() + 0.5 * tie.mean()), "tie_rate": float(tie.mean()),
            "win_rate_excl_ties": float(win.sum() / decided) if decided else math.nan, "pairs": int(a.size)}


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n policy || base policy) = log n - (n - 1) / n nats (Stiennon et al. 2020, Gao et al. 2022).

    n = 1 gives 0; it grows like log n. (Beirami et al. 2024 show the formula is an upper bound on the
    true KL; it is the one the scaling-law papers plot against.)
    """
    return math.log(n) - (n - 1) / n


def best_of_n_expected(rm_scores, values, n: int) -> float:
    """Expected `values` of the answer the RM ranks best among n answers drawn from N >= n samples.

    Unbiased, and it uses all N samples for every n (one set of samples serves every n): sort the
    N samples by RM score, ascending; the i-th (1-based) is the best of a uniformly random n-subset
    exactly when the subset holds it and n - 1 of the i - 1 samples below it, with probability
    C(i-1, n-1) / C(N, n). So E = sum_i C(i-1, n-1) / C(N, n) * value_i. (n = 1 gives the plain
    mean; n = N gives the value of the RM's favourite.) Ties in RM score keep the sample order.
    """
    rm_scores = np.asarray(rm_scores, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    N = len(rm_scores)
    if not 1 <= n <= N:
        raise ValueError(f"best-of-{n} needs at least {n} samples, got {N}")
    order = np.argsort(rm_scores, kind="stable")
    weights = np.array([math.comb(i, n - 1) for i in range(N)], dtype=np.float64) / math.comb(N, n)  # i = rank - 1
    return float((weights * values[order]).sum())


def kl_regularised_optimum(scores, values, beta: float) -> tuple[float, float, float]:
    """The policy PPO with a KL penalty climbs towards, on N samples of the SFT policy.

    The maximiser of E_pi[score] - beta * KL(pi || pi_SFT) is pi*(y) ∝ pi_SFT(y) exp(score(y) / beta)
    (the optimum of the KL-regularised objective; Rafailov et al. 2023, eq. 4). Restricted to N i.i.d.
    samples of pi_SFT it weights sample i by w_i = softmax(score / beta)_i (uniform weights are SFT).
    Returns (E_w[values]; its KL to SFT, sum_i w_i log(N w_i); its win rate against one SFT sample
    judged by `values`, ties half: sum_i w_i mean_j ([v_i > v_j] + [v_i = v_j] / 2)).
    Sample-based: no weight can go outside the N samples, so the KL is at most log N.
    """
    scores = np.asarray(scores, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    logits = scores / beta
    weights = np.exp(logits - logits.max())   # subtract the max: exp never overflows
    weights /= weights.sum()
    N = len(scores)
    kl = float(np.sum(weights * np.log(np.maximum(N * weights, 1e-300))))
    tie = np.abs(values[:, None] - values[None, :]) <= TIE_TOLERANCE
    beats = ((values[:, None] > values[None, :]) & ~tie) + 0.5 * tie                  # (i, j)
    return float(weights @ values), kl, float(weights @ beats.mean(axis=1))


def fit_gao(d, gain, form: str) -> dict | None:
    """Least-squares fit of Gao et al. 2022's functional forms, d = sqrt(KL):

        best-of-n ("bon"):  gain(d) = d (alpha - beta d)
        RL ("rl"):          gain(d) = d (alpha - beta log d)        (d log d -> 0 at d = 0)

    `gain` is the gold score minus the initial policy's (both forms are 0 at d = 0). Both are
    linear in (alpha, beta), so this is ordinary least squares on the columns [d, -d^2] or
    [d, -d log d]. Returns alpha, beta and R^2 = 1 - SS_res / SS_tot, or None for fewer than 3 points.
    """
    gain = np.asarray(gain, dtype=np.float64)
    if len(gain) < 3:
        return None
    design = gao_columns(d, form)  # (points, 2)
    (alpha, beta), *_ = np.linalg.lstsq(design, gain, rcond=None)
    residual = gain - design @ np.array([alpha, beta])
    total = ((gain - gain.mean()) ** 2).sum()
    r2 = 1.0 - (residual ** 2).sum() / total if total > 0 else math.nan
    return {"alpha": float(alpha), "beta": float(beta), "r2": float(r2)}


def gao_columns(d, form: str) -> np.ndarray:
    """(points, 2) design matrix [d, -d^2] ("bon") or [d, -d log d] ("rl"): gain = columns @ (alpha, beta)."""
    if form not in ("bon", "rl"):
        raise ValueError(f"form must be 'bon' or 'rl', got {form!r}")
    d = np.asarray(d, dtype=np.float64)
    safe = np.where(d > 0, d, 1.0)  # trap: 0 * log 0 is nan in floating point; its limit is 0
    second = d * d if form == "bon" else np.where(d > 0, d * np.log(safe), 0.0)
    return np.stack([d, -second], axis=1)


def gao_curve(fit: dict, d, form: str) -> np.ndarray:
    """The fitted gain at d (see `fit_gao`)."""
    return gao_columns(d, form) @ np.array([fit["alpha"], fit["beta"]])


def sqrt_kl(kl) -> np.ndarray:
    """d = sqrt(KL); a sampled KL estimate can be slightly negative near 0, read as 0."""
    return np.sqrt(np.clip(np.asarray(kl, dtype=np.float64), 0.0, None))


# ------------------------------------------------------------------------------------------------
# Curves over many prompts, where each fitted curve peaks, and trends against model size
# (experiments/rm_scale.py: one policy's samples judged by reward models of several sizes)


def best_of_n_curve(rank_scores, values, ns) -> list[float]:
    """Best-of-n for each n in `ns`, averaged over prompts: rank_scores and values are (N, K), N
    samples of each of K prompts; for each prompt `best_of_n_expected(rank_scores[:, i], values[:, i], n)`.

    values = rank_scores gives the proxy curve (the RM score of the RM's pick), values = gold the
    gold curve; ranking by gold itself gives the ceiling a perfect reward model would reach.
    """
    rank_scores = np.asarray(rank_scores, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if rank_scores.shape != values.shape or rank_scores.ndim != 2:
        raise ValueError(f"best_of_n_curve needs two (N, K) arrays of one shape, got {rank_scores.shape} "
                         f"and {values.shape}")
    K = rank_scores.shape[1]
    return [float(np.mean([best_of_n_expected(rank_scores[:, i], values[:, i], n) for i in range(K)])) for n in ns]


def kl_regularised_optimum_curve(scores, values, betas) -> dict:
    """`kl_regularised_optimum` at each beta, averaged over prompts: scores and values (N, K), N
    samples of each of K prompts. Returns {"beta", "gold", "kl", "win_rate"}, one list entry per beta
    (large beta: near SFT; small beta: near the samples' best by `scores`)."""
    scores = np.asarray(scores, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    K = scores.shape[1]
    points = np.array([[kl_regularised_optimum(scores[:, i], values[:, i], beta) for i in range(K)]
                       for beta in betas]).mean(axis=1)                                 # (betas, 3)
    return {"beta": [float(b) for b in betas], "gold": points[:, 0].tolist(), "kl": points[:, 1].tolist(),
            "win_rate": points[:, 2].tolist()}


def gao_peak(fit: dict | None, form: str) -> dict | None:
    """Where a fitted Gao curve (`fit_gao`) peaks, in closed form; None without a fit or a peak (beta <= 0).

        best-of-n  R(d) = d (alpha - beta d):      R'(d) = alpha - 2 beta d = 0
                   ->  d* = alpha / (2 beta),      R* = alpha^2 / (4 beta)
        RL         R(d) = d (alpha - beta log d):  R'(d) = alpha - beta log d - beta = 0
                   ->  d* = exp(alpha / beta - 1), R* = d* (alpha - beta log d*) = beta d*

    Returns {"d", "kl" (= d^2), "gain"}: how far from the initial policy the gold score stops
    rising, and by how much it has risen there. Gao et al. find both grow with the RM's size.
    """
    if fit is None or not fit["beta"] > 0:
        return None
    alpha, beta = fit["alpha"], fit["beta"]
    if form == "bon":
        d = alpha / (2 * beta)
        gain = alpha * alpha / (4 * beta)
    elif form == "rl":
        d = math.exp(alpha / beta - 1)
        gain = beta * d
    else:
        raise ValueError(f"form must be 'bon' or 'rl', got {form!r}")
    if d <= 0:   # alpha <= 0 in the best-of-n form: the fitted gain never rises
        return None
    return {"d": float(d), "kl": float(d * d), "gain": float(gain)}


def fit_log_linear(sizes, values) -> dict | None:
    """Least squares of values = a + b ln(size): the trend Bai et al. 2022 report for reward-model
    accuracy and Gao et al. 2022 for the fitted alpha and beta, against parameter count.

    Returns {"intercept": a, "slope": b (per e-fold of size), "per_10x": b ln 10 (per tenfold),
    "r2"}, or None with fewer than 2 distinct sizes. Points whose value is None or NaN are left out.
    """
    pairs = [(float(s), float(v)) for s, v in zip(sizes, values) if v is not None and math.isfinite(v)]
    if len({s for s, _ in pairs}) < 2:
        return None
    log_size = np.log([s for s, _ in pairs])
    y = np.array([v for _, v in pairs])
    design = np.stack([np.ones_like(log_size), log_size], axis=1)   # (points, 2): [1, ln size]
    (intercept, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ np.array([intercept, slope])
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual ** 2).sum() / total if total > 0 else math.nan
    return {"intercept": float(intercept), "slope": float(slope), "per_10x": float(slope * math.log(10)),
            "r2": float(r2)}
