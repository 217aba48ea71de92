"""Held-out evaluation: sample a policy's answers to prompts no stage trained on, grade them with the
gold labeler, and summarise them. Every stage that judges a policy does it through this file:

    train_sft.py    `gold_report`: one sampled and one greedy answer per prompt, at the end
    train_ppo.py    `HeldOutEvaluation` (`evaluate_policy` every few updates): the same prompts with
    train_grpo.py     the same seed each time (two evaluations differ by the policy, not by the
    train_dpo.py      dice), logged as eval/gold, eval/kl, eval/rm, ... and the gain in SFT sd
    evaluate.py     `answer` for each checkpoint (S samples and one greedy answer per prompt),
                    `summarize_answers`, `best_of_n`, PPO's trajectory and Gao et al.'s fits
                    (`eval_report.py` turns them into tables and figures)

All of them stand on two functions:

    sample_and_grade   prompts -> one sampled response per entry (a prompt listed S times gets S
                       samples), each graded by the gold labeler (`labeler.score`: a total and its
                       rubric parts), with its length, its KL to a reference and its RM score
    kl_to_reference    the per-response KL of sampled responses to the reference (SFT) policy

The numbers a training run logs are means over the samples (`summarize`); evaluate.py's tables
are means over (S, N) arrays (`summarize_answers`) with standard errors, families and win rates.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from minirlhf import labeler, world
from minirlhf.cli import StageConfig, option
from minirlhf.labeling import RankedComparison
from minirlhf.metrics import read_metrics
from minirlhf.reward import gold_agreement, task_reward
from minirlhf.stats import best_of_n_expected, best_of_n_kl, fit_gao, kl_regularised_optimum, sqrt_kl
from minirlhf.training import response_logprobs, sample_responses

OPTIMUM_BETAS = (1.0, 0.5, 0.3, 0.2, 0.1)   # KL coefficients of the KL-regularised optimum, in SFT sd units


# --------------------------------------------------------------------------------------------------
# Sample, grade, measure the KL


@dataclass
class Graded:
    """K sampled responses, one per entry of `prompts` and in that order, graded. Arrays are (K,)."""

    prompts: list[str]
    texts: list[str]
    ended: np.ndarray              # bool: stopped with EOS within the budget
    gold: np.ndarray               # the gold labeler's total, 0..labeler.MAX_SCORE
    parts: dict[str, np.ndarray]   # rubric part -> its score in [0, 1]
    length: np.ndarray             # response tokens, EOS included
    kl: np.ndarray | None = None   # float32 sum_t log pi(y_t) - log pi_ref(y_t); None without a reference
    rm: np.ndarray | None = None   # float32 normalised RM score (`RewardScorer.score`); None without an RM


def grade(prompts: list[str], texts: list[str], ended: list[bool]):
    """Gold totals (K,) and parts {name: (K,)} for K (prompt, text, ended) triples."""
    scores = [labeler.score(p, t, e) for p, t, e in zip(prompts, texts, ended)]
    return (np.array([s.total for s in scores]),
            {part: np.array([s.parts[part] for s in scores]) for part in labeler.WEIGHTS})


@torch.no_grad()
def kl_to_reference(reference, generation, temperature: float, policy=None) -> torch.Tensor:
    """(B,) the KL of each sampled response to the reference policy:

        KL_i = sum over the response tokens t of  log pi(y_t) - log pi_ref(y_t)

    The tokens were sampled from pi, so the mean over samples is an unbiased estimate of
    KL(pi || pi_ref) per response (the k1 estimator summed over the sequence: the quantity PPO's
    `objective/kl` logs), in nats. log pi_ref is one forward pass of the reference over the same
    tokens at the sampling temperature, as PPO computes it. log pi is the sampler's own logprob
    (`generation.logprobs`), or, given `policy`, a forward pass of it like the reference's (what the
    training runs log: the two differ in the last bits, the KV cache's arithmetic).
    """
    ids, mask = generation.sequences()                       # (B, P + R) each
    prompt_len = generation.prompt_ids.shape[1]
    ref_logprobs = response_logprobs(reference, ids, mask, prompt_len, temperature)   # (B, R), 0 at PAD
    logprobs = generation.logprobs if policy is None else response_logprobs(policy, ids, mask, prompt_len, temperature)
    valid = generation.response_mask.bool()
    return torch.where(valid, logprobs - ref_logprobs, 0.0).sum(dim=1)


@torch.no_grad()
def sample_and_grade(policy, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float,
                     generator: torch.Generator | None = None, batch_size: int = 64, reference=None,
                     recompute_logprobs: bool = False, reward_scorer=None, runtime=None) -> Graded:
    """Sample one response per entry of `prompts` (temperature 0: greedy) and grade it.

    With `reference`, each response's KL to it (`kl_to_reference`; the policy itself as reference:
    0, no forward pass; `recompute_logprobs`: log pi from a forward pass, not the sampler's). With a
    `reward_scorer`, its normalised score of each response (no penalty for a missing EOS).
    The batches are `batch_size` consecutive entries, sampled in order with `generator`: the same
    generator state, prompts and batch size give the same samples.

    `runtime` (under torchrun): each rank samples its share of the entries (`Runtime.shard`) with its
    own generator; the results are gathered and put back in order, so every rank returns all K
    (a collective: call it on every rank). None: one process samples everything.
    """
    entries = list(range(len(prompts)))
    mine = runtime.shard(entries) if runtime is not None else entries
    rows = []   # (entry, text, ended, length, kl, rm) for each response sampled here
    for start in range(0, len(mine), batch_size):
        indices = mine[start:start + batch_size]
        batch = [prompts[i] for i in indices]
        texts, ended, (generation,) = sample_responses(policy, tokenizer, batch, max_new_tokens=max_new_tokens,
                                                       temperature=temperature, generator=generator,
                                                       batch_size=len(batch))
        lengths = generation.response_mask.sum(dim=1).tolist()
        kl = [None] * len(batch)
        if reference is policy:   # the reference itself: KL 0 by definition
            kl = [0.0] * len(batch)
        elif reference is not None:
            kl = kl_to_reference(reference, generation, temperature, policy if recompute_logprobs else None).tolist()
        rm = reward_scorer.score(batch, texts, ended).tolist() if reward_scorer is not None else [None] * len(batch)
        rows += zip(indices, texts, ended, lengths, kl, rm)
    if runtime is not None:
        rows = sorted(runtime.gather_objects(rows), key=lambda row: row[0])   # every rank's, in order
    texts, ended = [row[1] for row in rows], [row[2] for row in rows]
    gold, parts = grade(prompts, texts, ended)
    return Graded(prompts=list(prompts), texts=texts, ended=np.array(ended, dtype=bool), gold=gold, parts=parts,
                  length=np.array([row[3] for row in rows], dtype=np.int64),
                  kl=None if reference is None else np.array([row[4] for row in rows], dtype=np.float32),
                  rm=None if reward_scorer is None else np.array([row[5] for row in rows], dtype=np.float32))


def rl_reward(graded: Graded) -> np.ndarray:
    """(K,) float32 what RL maximises (`reward.task_reward`): the RM score, or the penalty without EOS."""
    return task_reward(torch.from_numpy(graded.rm), graded.ended).numpy()


def summarize(graded: Graded) -> dict:
    """Means over the samples (plain sums in sample order):

        gold, gold/<part>     the gold total (0..labeler.MAX_SCORE) and each rubric part (in [0, 1])
        gold_sd               the totals' standard deviation over the samples (population)
        kl, rm                the mean KL to the reference (nats), the mean normalised RM score
                              (each only when measured)
        eos_rate, response_length (tokens, EOS included)
        share_wrong, share_rude, share_off_topic   rubric parts correct < 0.5, harmless < 1, on_topic < 1
    """
    n = len(graded.texts)
    gold = graded.gold.tolist()
    mean = sum(gold) / n
    summary = {"gold": mean, "gold_sd": math.sqrt(sum((g - mean) ** 2 for g in gold) / n)}
    if graded.kl is not None:
        summary["kl"] = sum(graded.kl.tolist()) / n
    summary["eos_rate"] = sum(graded.ended.tolist()) / n
    summary["response_length"] = sum(graded.length.tolist()) / n
    for part, values in graded.parts.items():
        summary[f"gold/{part}"] = sum(values.tolist()) / n
    if graded.rm is not None:
        summary["rm"] = sum(graded.rm.tolist()) / n
    for share, part, below in (("wrong", "correct", 0.5), ("rude", "harmless", 1.0), ("off_topic", "on_topic", 1.0)):
        summary[f"share_{share}"] = sum(value < below for value in graded.parts[part].tolist()) / n
    return summary


# --------------------------------------------------------------------------------------------------
# The training runs' reports


def gold_report(policy, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int, runtime) -> dict:
    """How a policy's answers to held-out prompts score with the gold labeler, sampled (temperature 1)
    and greedy: "gold/sample", "gold/sample/<part>", "eos_rate/sample", "share_wrong/sample",
    "share_rude/sample", "share_off_topic/sample", and the same for "greedy" (train_sft.py's report).
    One process samples everything (call it on one rank)."""
    report = {}
    for name, temperature in (("sample", 1.0), ("greedy", 0.0)):
        summary = summarize(sample_and_grade(policy, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                             temperature=temperature, generator=runtime.generator(seed)))
        report[f"gold/{name}"] = summary["gold"]
        report.update({f"gold/{name}/{part}": summary[f"gold/{part}"] for part in labeler.WEIGHTS})
        report.update({f"{key}/{name}": summary[key]
                       for key in ("eos_rate", "share_wrong", "share_rude", "share_off_topic")})
    return report


def evaluate_policy(policy, ref_policy, tokenizer, prompts: list[str], *, samples_per_prompt: int,
                    max_new_tokens: int, temperature: float, generator: torch.Generator, reward_scorer=None,
                    batch_size: int = 64, runtime=None) -> dict:
    """`samples_per_prompt` samples of each prompt (side by side), summarised as a training run logs them:
    eval/gold, eval/gold_sd, eval/kl (log pi from a forward pass), eval/eos_rate, eval/response_length,
    eval/gold/<part>, eval/rm (with a `reward_scorer`), plus "samples": (prompt, response, gold) triples.
    `runtime`: as in `sample_and_grade` (under torchrun every rank samples its share, all get the numbers)."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    graded = sample_and_grade(policy, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=temperature,
                              generator=generator, batch_size=batch_size, reference=ref_policy,
                              recompute_logprobs=True, reward_scorer=reward_scorer, runtime=runtime)
    # (the SFT report's shares stay out of the training logs)
    result = {f"eval/{key}": value for key, value in summarize(graded).items() if not key.startswith("share_")}
    result["samples"] = list(zip(graded.prompts, graded.texts, graded.gold.tolist()))
    return result


@dataclass
class PolicyConfig(StageConfig):
    """The options of every method that trains the SFT policy further (PPO, GRPO/RLOO, DPO, expert
    iteration): where it starts, and the held-out evaluation it runs as it trains."""

    init: str = option("", "policy to start from, also the KL reference (default: OUT_DIR/sft.pt)")
    max_new_tokens: int = option(48, "response budget in tokens", min=1)
    eval_prompts: int = option(48, "held-out prompts per evaluation, evenly spaced in the file (0: none)", min=0)
    eval_samples: int = option(2, "samples per held-out prompt", min=1)


class HeldOutEvaluation:
    """A training run's periodic evaluation on held-out prompts (PPO, GRPO, RLOO, DPO).

    One training batch's gold mean swings by a few tenths from batch to batch (different prompts, one
    sample each): progress is judged here instead, on fixed prompts with `samples_per_prompt` samples
    each and the same sampling seed at every call (a fresh `runtime.generator(seed)`), so two
    evaluations differ by the policy, not by the dice. Calling it (`evaluate_policy`) returns the
    metrics to log (none without prompts) and prints them on one line:

        eval/gold, eval/gold/<part>   mean gold total, and each rubric part: which one the method improves
        eval/gold_sd                  the totals' spread over the samples
        eval/kl                       mean KL of the samples to the reference (`kl_to_reference`), nats
        eval/rm                       mean normalised RM score (with a reward model)
        eval/eos_rate, eval/response_length
        eval/gold_gain_sd             (eval/gold - SFT's) / SFT's gold_sd

    The first call (on the starting policy, the SFT model) fills `baseline` with "sft/gold" and
    "sft/gold_sd", in place: the caller's dict, which its checkpoints store (and a resumed run
    passes back). `samples` keeps the last call's (prompt, response, gold) triples. Under torchrun
    each rank samples its share with its own dice and every rank gets the same numbers: call it on
    every rank.
    """

    def __init__(self, policy, reference, tokenizer, prompts: list[str], *, samples_per_prompt: int,
                 max_new_tokens: int, temperature: float, seed: int, batch_size: int, runtime,
                 reward_scorer=None, baseline: dict | None = None):
        self.policy, self.reference, self.tokenizer, self.prompts = policy, reference, tokenizer, prompts
        self.samples_per_prompt, self.max_new_tokens, self.temperature = samples_per_prompt, max_new_tokens, temperature
        self.seed, self.batch_size, self.runtime, self.reward_scorer = seed, batch_size, runtime, reward_scorer
        self.baseline = {} if baseline is None else baseline
        self.samples: list[tuple[str, str, float]] = []

    def __call__(self, step: int) -> dict:
        if not self.prompts:
            return {}
        result = evaluate_policy(self.policy, self.reference, self.tokenizer, self.prompts,
                                 samples_per_prompt=self.samples_per_prompt, max_new_tokens=self.max_new_tokens,
                                 temperature=self.temperature, generator=self.runtime.generator(self.seed),
                                 reward_scorer=self.reward_scorer, batch_size=self.batch_size, runtime=self.runtime)
        self.samples = result.pop("samples")
        baseline = self.baseline
        if not baseline:   # the SFT policy's numbers: what progress is measured against
            baseline.update({"sft/gold": result["eval/gold"], "sft/gold_sd": result["eval/gold_sd"]})
        result["eval/gold_gain_sd"] = (result["eval/gold"] - baseline["sft/gold"]) / max(baseline["sft/gold_sd"], 1e-6)
        rm = f" | rm {result['eval/rm']:.3f}" if "eval/rm" in result else ""
        print(f"  [eval {step}] gold {result['eval/gold']:.3f} ({result['eval/gold_gain_sd']:+.2f} SFT sd) | "
              f"kl {result['eval/kl']:.2f}{rm} | eos {result['eval/eos_rate']:.2f} | "
              f"len {result['eval/response_length']:.1f}")
        return result

    def print_result(self, method: str, summary: dict, samples: int = 0) -> None:
        """The lines a method's run ends with: `samples` of the last evaluation's (prompt, response,
        gold), then held-out gold of SFT -> `method`, the gain in SFT sd and the KL (from `summary`,
        the last evaluation's metrics)."""
        for prompt, text, gold in self.samples[:samples]:
            print(f"  [sample] {prompt!r} -> {text!r} | gold {gold:.2f}")
        print(f"held-out gold: SFT {self.baseline['sft/gold']:.3f} -> {method} {summary['eval/gold']:.3f} "
              f"({summary['eval/gold_gain_sd']:+.2f} SFT standard deviations), KL {summary['eval/kl']:.2f} nats")


# --------------------------------------------------------------------------------------------------
# evaluate.py: every model's answers, their summary, best-of-n, PPO's trajectory


@dataclass
class Answers:
    """One model's answers to N prompts: S samples of each, arrays (S, N); `greedy_*` arrays (N,)."""

    texts: list[list[str]]            # [S][N]
    ended: np.ndarray                 # (S, N) bool: stopped with EOS within the budget
    gold: np.ndarray                  # (S, N) gold total
    parts: dict[str, np.ndarray]      # rubric part -> (S, N), each in [0, 1]
    length: np.ndarray                # (S, N) response tokens, EOS included
    kl: np.ndarray | None             # (S, N) sum_t log pi(y_t) - log pi_sft(y_t), or None without SFT
    greedy_texts: list[str]
    greedy_ended: np.ndarray
    greedy_gold: np.ndarray
    greedy_parts: dict[str, np.ndarray]
    rm: np.ndarray | None = None      # (S, N) what RL maximises: the normalised RM score, -1 without EOS (`rl_reward`)


def answer(model, tokenizer, prompts: list[str], *, samples: int, max_new_tokens: int, temperature: float, seed: int,
           batch_size: int, runtime, reference=None, reward_scorer=None) -> Answers:
    """`samples` answers per prompt at `temperature` (with the same seed for every model) and one
    greedy answer, all graded; the samples' KL to `reference` (the sampler's log pi) and reward."""
    N = len(prompts)
    repeated = [p for _ in range(samples) for p in prompts]   # sample j of prompt i at j * N + i
    sampled = sample_and_grade(model, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=temperature,
                               generator=runtime.generator(seed), batch_size=batch_size, reference=reference,
                               reward_scorer=reward_scorer)
    greedy = sample_and_grade(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                              batch_size=batch_size)
    shape = (samples, N)
    return Answers(
        texts=[sampled.texts[j * N:(j + 1) * N] for j in range(samples)], ended=sampled.ended.reshape(shape),
        gold=sampled.gold.reshape(shape), parts={k: v.reshape(shape) for k, v in sampled.parts.items()},
        length=sampled.length.reshape(shape), kl=None if sampled.kl is None else sampled.kl.reshape(shape),
        greedy_texts=greedy.texts, greedy_ended=greedy.ended, greedy_gold=greedy.gold, greedy_parts=greedy.parts,
        rm=None if sampled.rm is None else rl_reward(sampled).reshape(shape))


def summarize_answers(answers: Answers, prompts: list[str]) -> dict:
    """The per-model numbers of eval.json (names as in `gold_report`), means over the (S, N) arrays."""
    S = answers.gold.shape[0]
    summary = {"gold/sample": float(answers.gold.mean()),
               # the standard error treats every sample as independent (a prompt's samples are not quite)
               "gold/sample_se": float(answers.gold.std() / math.sqrt(answers.gold.size)),
               "gold/greedy": float(answers.greedy_gold.mean())}
    for part in labeler.WEIGHTS:
        summary[f"gold/sample/{part}"] = float(answers.parts[part].mean())
    for part in labeler.WEIGHTS:
        summary[f"gold/greedy/{part}"] = float(answers.greedy_parts[part].mean())
    families = np.array([(world.task_for_prompt(p) or world.Task("other", p)).family for p in prompts])
    for family in dict.fromkeys(families):
        summary[f"gold/sample/family/{family}"] = float(answers.gold[:, families == family].mean())
    summary["eos_rate/sample"] = float(answers.ended.mean())
    summary["eos_rate/greedy"] = float(answers.greedy_ended.mean())
    summary["length/sample"] = float(answers.length.mean())
    summary["kl_to_sft"] = float(answers.kl.mean()) if answers.kl is not None else None
    summary["rm/sample"] = float(answers.rm.mean()) if answers.rm is not None else None
    if answers.rm is not None and S > 1:
        summary.update(rm_against_gold(answers, prompts))
    summary["samples"] = S * len(prompts)
    return summary


def rm_against_gold(answers: Answers, prompts: list[str]) -> dict:
    """How well the RM orders this model's own samples of each held-out prompt, against the gold
    labeler (`reward.gold_agreement`: pairs whose gold scores differ): "rm/gold_accuracy" (and
    "/FAMILY"), "rm/gold_spearman_within", "rm/gold_top_choice". On SFT's samples it is the RM's
    held-out accuracy on prompts no stage trained on; on PPO's, how far the RM can still be trusted
    where PPO took the policy."""
    S = answers.gold.shape[0]
    groups = [RankedComparison(prompt, [answers.texts[j][i] for j in range(S)], list(range(S)),
                               [bool(answers.ended[j, i]) for j in range(S)]) for i, prompt in enumerate(prompts)]
    report, _, _ = gold_agreement(groups, answers.rm.T.tolist())
    return {key.replace("gold/", "rm/gold_"): value for key, value in report.items()
            if key.startswith(("gold/accuracy", "gold/spearman_within", "gold/top_choice"))
            and key not in ("gold/accuracy/all", "gold/accuracy/degenerate")}


def best_of_n(sft, sft_answers: Answers, tokenizer, prompts: list[str], subset: list[int], reward_scorer, *,
              max_n: int, max_new_tokens: int, temperature: float, seed: int, batch_size: int, runtime) -> dict:
    """Best-of-n from SFT, ranked by the RM, for n = 1, 2, 4, ... max_n, on the prompts whose
    indices are `subset`; beside it, the same samples ranked by the gold labeler (a perfect RM), and
    reweighted into the KL-regularised optimum of the RM and of the gold score (`kl_regularised_optimum`).

    Each prompt gets max_n i.i.d. SFT samples at the evaluation temperature: SFT's evaluation
    samples (already graded and scored) plus fresh ones (drawn with seed + 1). Every n is estimated
    from all of them with `best_of_n_expected`, then averaged over the prompts.
    """
    prompts = [prompts[i] for i in subset]
    K = len(prompts)
    ns = [2 ** k for k in range(int(math.log2(max_n)) + 1)]
    gold, rm = sft_answers.gold[:, subset], sft_answers.rm[:, subset]  # (S, K) each
    extra = ns[-1] - len(gold)
    if extra > 0:
        repeated = [p for _ in range(extra) for p in prompts]
        fresh = sample_and_grade(sft, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=temperature,
                                 generator=runtime.generator(seed + 1),   # not the evaluation samples again
                                 batch_size=batch_size, reward_scorer=reward_scorer)
        gold = np.concatenate([gold, fresh.gold.reshape(extra, K)])
        rm = np.concatenate([rm, rl_reward(fresh).reshape(extra, K)])
    result = {"prompts": K, "samples_per_prompt": len(gold), "n": ns, "kl": [best_of_n_kl(n) for n in ns]}
    result["gold"] = [float(np.mean([best_of_n_expected(rm[:, i], gold[:, i], n) for i in range(K)])) for n in ns]
    result["rm"] = [float(np.mean([best_of_n_expected(rm[:, i], rm[:, i], n) for i in range(K)])) for n in ns]
    # the same samples ranked by the gold labeler itself: what a perfect reward model would pick, the
    # ceiling of any policy at that KL that only reweights SFT's samples
    result["gold_ranked_by_gold"] = [float(np.mean([best_of_n_expected(gold[:, i], gold[:, i], n)
                                                    for i in range(K)])) for n in ns]
    # the KL-regularised optimum pi_SFT exp(score / beta) of the RM, and of the gold score in SFT sd units
    # (the RM is normalised that way), over the same samples: what PPO's objective is after at each beta
    gold_sd = max(float(gold.std()), 1e-6)
    result["optimum"] = {"beta": list(OPTIMUM_BETAS)}
    for name, scores in (("rm", rm), ("gold", gold / gold_sd)):
        points = np.array([[kl_regularised_optimum(scores[:, i], gold[:, i], beta) for i in range(K)]
                           for beta in OPTIMUM_BETAS]).mean(axis=1)                    # (betas, 3)
        result["optimum"][name] = {"gold": points[:, 0].tolist(), "kl": points[:, 1].tolist(),
                                   "win_rate": points[:, 2].tolist()}
    return result


def ppo_trajectory(path: str) -> dict | None:
    """PPO's gold and RM score against KL during training, from ppo_metrics.jsonl (None if absent).

    Prefers the held-out evaluation that train_ppo logs every few updates (`eval/gold`, `eval/kl`,
    `eval/rm`); falls back to the rollout batch's `objective/gold`, `objective/kl`, `objective/scores`.
    """
    if not os.path.exists(path):
        return None
    records = read_metrics(path)
    for prefix, rm_key in (("eval", "eval/rm"), ("objective", "objective/scores")):
        points = [r for r in records if r.get(f"{prefix}/gold") is not None and r.get(f"{prefix}/kl") is not None]
        if points:
            return {"source": f"{prefix}/gold, {prefix}/kl", "step": [r["step"] for r in points],
                    "kl": [float(r[f"{prefix}/kl"]) for r in points],
                    "gold": [float(r[f"{prefix}/gold"]) for r in points],
                    "rm": [r.get(rm_key) for r in points]}
    return None


def gao_fits(bon: dict | None, trajectory: dict | None) -> dict:
    """Gao et al.'s fits of gold gain against d = sqrt(KL), each relative to its own d = 0 point:
    best-of-n's n = 1 (the SFT policy), and PPO's first logged point when its KL is ~0 (else n = 1's)."""
    fits = {}
    if bon is not None:
        fits["bon"] = fit_gao(sqrt_kl(bon["kl"]), np.array(bon["gold"]) - bon["gold"][0], "bon")
        if fits["bon"]:
            fits["bon"]["baseline"] = bon["gold"][0]
    if trajectory is not None:
        d = sqrt_kl(trajectory["kl"])
        start = int(np.argmin(d))
        baseline = trajectory["gold"][start] if d[start] < 0.1 or bon is None else bon["gold"][0]
        fits["rl"] = fit_gao(d, np.array(trajectory["gold"]) - baseline, "rl")
        if fits["rl"]:
            fits["rl"]["baseline"] = baseline
    return fits
