"""DPO: learn from the comparisons directly, with no reward model and no sampling while training.

Reads  out/sft.pt (the policy's start and the frozen reference), out/rm_comparisons.jsonl (the
       rankings train_rm.py collected; or --comparisons FILE: ranked {"prompt", "responses",
       "ranking"} or {"prompt", "chosen", "rejected"}), data/eval_prompts.jsonl (held-out judging)
Writes out/dpo.pt, out/dpo_metrics.jsonl, out/dpo_curves.png

Direct Preference Optimization (Rafailov et al. 2023). The KL-regularised objective PPO maximises
has a closed-form optimum, pi*(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta); read backwards, every
policy implies a reward r = beta log pi/pi_ref (plus a constant per prompt). In the Bradley-Terry
model the reward model was trained with, that constant cancels, and the labels' likelihood becomes
a loss on the policy itself (`losses.dpo_loss`): raise log pi/pi_ref of the chosen response above
that of the rejected one. So DPO is supervised learning on fixed pairs: no reward model, no critic,
no samples drawn while training (it is *offline*: it learns only from the SFT policy's responses,
never from its own). The gold labeler judges it on held-out prompts exactly as it judges PPO
(`evaluation.HeldOutEvaluation`: eval/gold, eval/kl), so the two runs compare directly.

Watch the implicit rewards in dpo_curves.png: the margin grows mostly by pushing the REJECTED
responses down; the chosen ones drift down too, a little: the loss asks only for the difference.

CPU:  python train_dpo.py                           (preset tiny, ~2 minutes on 2 cores)
      python train_dpo.py --loss-type ipo           (IPO: a fixed margin 1/(2 beta) instead of a sigmoid)
      python train_dpo.py --label-smoothing 0.1     (cDPO: assume 10% of the labels are flipped)
      python train_dpo.py --preset smoke
GPU:  python train_dpo.py --preset medium --device cuda
Resume an interrupted run:  python train_dpo.py --resume   (same flags as the first run: dpo.pt is
      written every --save-every steps with the optimizer; the pair order is replayed from the seed
      and the reference log-probabilities computed again - both deterministic - so the run continues
      exactly as if it had not stopped)
Several processes (data parallel): torchrun --standalone --nproc_per_node=2 train_dpo.py --preset smoke
      --batch-size stays the GLOBAL number of pairs per step: every rank shuffles the pairs with
      the same seed, takes its share of each batch and weights its mean loss so that DDP's averaged
      gradient is the one of the mean over the whole batch (`reward.batch_share`). The reference
      log-probabilities are computed once, each rank its share, then gathered. Rank 0 alone writes.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from minirlhf import labeling
from minirlhf.checkpoint import load_policy, load_resume_checkpoint, save_checkpoint
from minirlhf.cli import UserError, make_out_dir, option, parse_config, print_config, run_main
from minirlhf.data import evenly_spaced, pad_sequences, read_prompts
from minirlhf.evaluation import HeldOutEvaluation, PolicyConfig
from minirlhf.losses import DPO_LOSS_TYPES, dpo_loss
from minirlhf.metrics import MetricsLogger, Progress, read_metrics
from minirlhf.plots import plot_curves
from minirlhf.reward import batch_share
from minirlhf.runtime import setup_runtime
from minirlhf.tokenizer import Tokenizer, render_chat
from minirlhf.training import check_finite, cosine_lr, response_logprobs, set_lr

EVAL_TEMPERATURE = 1.0   # held-out samples are drawn as PPO draws them (its default --temperature)
EVAL_BATCH_SIZE = 64     # PPO's tiny --batch-size: same prompts, seed and batches, so step 0 is PPO's step 0


@dataclass
class DPOConfig(PolicyConfig):
    comparisons: str = option("", "preference JSONL, ranked or chosen/rejected (default: OUT_DIR/rm_comparisons.jsonl, "
                                  "written by train_rm.py)")
    beta: float = option(0.5, "the KL coefficient the implicit reward beta*log(pi/pi_ref) assumes (small: the policy "
                              "may move further)", min=1e-6)
    loss_type: str = option("sigmoid", "sigmoid (DPO) or ipo (IPO: squared distance to a margin of 1/(2 beta))",
                            choices=list(DPO_LOSS_TYPES))
    label_smoothing: float = option(0.0, "cDPO: the assumed chance that a label is flipped, in [0, 0.5) (sigmoid loss "
                                         "only)", min=0.0)
    epochs: int = option(1, "passes over the preference pairs", min=1)
    batch_size: int = option(32, "preference pairs per step, over all processes", min=1)
    max_steps: int | None = option(None, "stop after this many steps (none: every pair, --epochs times)", min=1)
    lr: float = option(5e-5, "peak learning rate (AdamW)", above=0.0)
    min_lr: float = option(5e-6, "learning rate at the end of the cosine decay (<= --lr)", min=0.0)
    warmup_steps: int = option(5, "linear warmup steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay on 2-D weights", min=0.0)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)", min=0.0)
    eval_every: int = option(25, "held-out gold evaluation every N steps (0: only at the start and the end)", min=0)
    save_every: int = option(50, "write dpo.pt every N steps (and at the end)", min=1)

    def __post_init__(self):   # parse_config reports these as a bad flag: one line, exit 2
        super().__post_init__()
        if self.label_smoothing >= 0.5:
            raise ValueError(f"--label-smoothing must be < 0.5 (a label flipped half the time says nothing), "
                             f"got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("--label-smoothing (cDPO) goes with --loss-type sigmoid")


PRESETS = {
    "smoke": dict(max_steps=4, batch_size=8, warmup_steps=1, eval_every=2, eval_prompts=4, eval_samples=1,
                  max_new_tokens=16, save_every=2),
    # beta 0.5 measured on the tiny pipeline (one epoch: 186 steps over the 5947 pairs of its
    # rm_comparisons.jsonl; 444 held-out samples): beta 0.1 drifts to KL ~3 nats and loses gold
    # (-0.09 SFT sd); beta 0.5 gains +0.26 at KL 0.7; beta 1.0 +0.21 at KL 0.4; lr 1e-4 (beta 0.5)
    # +0.19 at KL 1.1. The GPU presets keep it (the paper's 0.1 lost gold here; not measured on a GPU).
    "tiny": {},
    "medium": {},
    "small": dict(batch_size=64, lr=1e-5, min_lr=1e-6, eval_prompts=111, eval_samples=4,
                  max_new_tokens=64),
}


def encode_pairs(tokenizer, comparisons, block_size, source):
    """Comparisons -> (rows, pairs): every distinct response once as (prompt ids, response ids), and
    every preference as (chosen row, rejected row).

    A ranking of K responses, best first, holds C(K, 2) pairs "ranked higher beats ranked lower",
    less its ties (`RankedComparison.preferences`: the noiseless gold labeler marks responses with
    equal totals as tied, and a tie says neither is better, so it is no preference). Each response is
    rendered exactly as the reward model saw it (`reward.encode_ranked`): [USER] prompt [ASSISTANT]
    response [EOS], the EOS left off a response that ran out of tokens (`ended` False), since its
    log-probability is that of the tokens the policy actually wrote. A pair of identical responses
    is skipped: its log-ratios cancel, so it only dilutes the batch."""
    rows, pairs, identical, tied, cut = [], [], 0, 0, 0
    for number, comparison in enumerate(comparisons, start=1):
        first = len(rows)
        try:
            prompt_ids = render_chat(tokenizer, comparison.prompt)
            for text, ended in zip(comparison.responses, comparison.ended):
                response_ids = render_chat(tokenizer, comparison.prompt, text, add_eos=ended)[len(prompt_ids):]
                if len(prompt_ids) + len(response_ids) > block_size:
                    if len(prompt_ids) >= block_size:
                        raise ValueError(f"the prompt alone has {len(prompt_ids)} tokens, the block size is "
                                         f"{block_size}")
                    response_ids, cut = response_ids[:block_size - len(prompt_ids)], cut + 1
                rows.append((prompt_ids, response_ids))
        except ValueError as error:   # e.g. a special-token string inside the text
            raise UserError(f"{source}:{number}: {error}") from None
        preferences = comparison.preferences()
        tied += math.comb(len(comparison.responses), 2) - len(preferences)
        for better, worse in preferences:   # response indices, better first, ties left out
            if rows[first + better] == rows[first + worse]:
                identical += 1
                continue
            pairs.append((first + better, first + worse))
    if cut:
        print(f"note: {cut} prompt + response sequences are longer than the block size ({block_size}) and are cut")
    if tied:
        print(f"note: {tied} tied pairs skipped (the labeler preferred neither response)")
    if identical:
        print(f"note: {identical} pairs of identical responses skipped")
    return rows, pairs


def sequence_logprobs(model, rows, pad_id, device) -> torch.Tensor:
    """log pi(response | prompt), summed over each response's tokens: (N,) for N rows.

    The rows are laid out as PPO's rollouts are (`Generation.sequences`): prompts left-padded to
    P columns, responses right-padded, so the hidden state at P - 1 + t predicts response token t
    in every row (`training.response_logprobs`; PAD positions count 0). `model` may be DDP-wrapped."""
    prompt_ids, prompt_mask = pad_sequences([p for p, _ in rows], pad_id, side="left")
    response_ids, response_mask = pad_sequences([r for _, r in rows], pad_id, side="right",
                                                length=max(1, max(len(r) for _, r in rows)))
    ids = torch.cat([prompt_ids, response_ids], dim=1).to(device)
    mask = torch.cat([prompt_mask, response_mask], dim=1).to(device)
    return response_logprobs(model, ids, mask, prompt_ids.shape[1]).sum(dim=1)


@torch.no_grad()
def reference_logprobs(ref_policy, rows, pad_id, batch_size, runtime) -> torch.Tensor:
    """The frozen reference's log pi_ref(response | prompt) of every row, (N,), computed ONCE: the
    reference never changes, so neither do these (constants to the loss: no gradient).
    Rows go in order of length (little padding); each rank scores its share, all ranks get all."""
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    mine = runtime.shard(by_length)
    scored = []
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        scored += zip(chunk, sequence_logprobs(ref_policy, [rows[i] for i in chunk], pad_id, runtime.device).tolist())
    values = [value for _, value in sorted(runtime.gather_objects(scored))]
    return torch.tensor(values, dtype=torch.float32, device=runtime.device)


def global_means(runtime, local: dict[str, float], weight: float) -> dict[str, float]:
    """The global batch's means from each rank's means over its share: weighted like the loss
    (`batch_share`), they sum over the ranks to world_size times the global mean. One process: as is."""
    totals = runtime.sum_over_ranks(*(value * weight for value in local.values()))
    return {name: total / runtime.world_size for name, total in zip(local, totals)}


def main() -> None:
    cfg = parse_config(DPOConfig, PRESETS, description=__doc__)
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed, kernels=cfg.kernels)
    print_config(cfg, "train_dpo")   # after setup_runtime: under torchrun rank 0 alone prints

    # ---- models: the policy (trained) and the reference (the same checkpoint, frozen)
    tokenizer = Tokenizer.from_file(os.path.join(cfg.data_dir, "tokenizer.tiktoken"))
    init_path = cfg.init or os.path.join(cfg.out_dir, "sft.pt")
    policy, _ = load_policy(init_path, tokenizer.identity, runtime)   # eval(): dropout off, as in PPO
    ref_policy, _ = load_policy(init_path, tokenizer.identity, runtime)
    ref_policy.requires_grad_(False)
    block_size = policy.config.block_size

    # ---- preference pairs, and the reference's log-probabilities of every response
    comparisons_path = cfg.comparisons or os.path.join(cfg.out_dir, "rm_comparisons.jsonl")
    if not os.path.exists(comparisons_path):
        raise UserError(f"{comparisons_path} not found: run train_rm.py first (it writes the comparisons it ranks), "
                        "or pass --comparisons FILE")
    comparisons = labeling.read_ranked_comparisons(comparisons_path)
    rows, pairs = encode_pairs(tokenizer, comparisons, block_size, comparisons_path)
    if not pairs:
        raise UserError(f"{comparisons_path}: no preference pair with two different responses")
    eval_prompts = evenly_spaced(read_prompts(os.path.join(cfg.data_dir, "eval_prompts.jsonl")), cfg.eval_prompts)
    longest = max((len(render_chat(tokenizer, p)) for p in eval_prompts), default=0)
    if longest + cfg.max_new_tokens > block_size:
        raise UserError(f"the longest held-out prompt ({longest} tokens) + --max-new-tokens {cfg.max_new_tokens} "
                        f"exceeds the model's block_size {block_size}")
    if runtime.is_main:
        make_out_dir(cfg.out_dir)   # the inputs are read: a bad --out-dir fails now, not at the first save
    start = time.time()
    ref_logps = reference_logprobs(ref_policy, rows, tokenizer.pad_id, 2 * cfg.batch_size, runtime)   # (rows,)
    steps_per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or math.inf)
    print(f"{len(comparisons)} comparisons from {comparisons_path}: {len(pairs)} preference pairs over {len(rows)} "
          f"responses; {total_steps} steps of {cfg.batch_size} pairs ({total_steps * cfg.batch_size / len(pairs):.2f} "
          f"epochs), {cfg.loss_type} loss, beta {cfg.beta}")

    optimizer = policy.configure_optimizer(cfg.weight_decay, cfg.lr)
    out_path = os.path.join(cfg.out_dir, "dpo.pt")
    start_step, baseline = 0, {}   # baseline: the SFT policy's held-out gold, filled by the evaluation at step 0
    if cfg.resume:   # the weights, the optimizer and the baseline as they were at the interrupted run's last save
        ckpt = load_resume_checkpoint(out_path, kind="dpo", tokenizer_identity=tokenizer.identity,
                                      total_steps=total_steps, model_config=policy.config, train_config=cfg)
        policy.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        baseline = {k: v for k, v in ckpt["metrics"].items() if k.startswith("sft/")}
        start_step = ckpt["step"]
        print(f"resumed from {out_path} at step {start_step}")
    train_policy = runtime.wrap(policy)   # DDP under torchrun: backward averages the gradients over ranks

    # evaluate(step): the gold labeler on held-out samples, as PPO logs it; gains relative to step 0 (SFT)
    evaluate = HeldOutEvaluation(policy, ref_policy, tokenizer, eval_prompts, samples_per_prompt=cfg.eval_samples,
                                 max_new_tokens=cfg.max_new_tokens, temperature=EVAL_TEMPERATURE, seed=cfg.seed,
                                 batch_size=EVAL_BATCH_SIZE, runtime=runtime, baseline=baseline)

    def save(step: int, summary: dict) -> None:
        """dpo.pt: at the end, and every --save-every steps with the optimizer besides, for --resume (marked
        unfinished: evaluate.py and chat.py refuse it). The pair order and the reference log-probabilities
        are not saved: a resumed run computes them again, the same."""
        resume_state = {} if step == total_steps else {"finished": False, "optimizer": optimizer.state_dict()}
        save_checkpoint(out_path, kind="dpo", model_state=policy.state_dict(), model_config=asdict(policy.config),
                        tokenizer_identity=tokenizer.identity, train_config=asdict(cfg), step=step,
                        metrics={**summary, **baseline}, beta=cfg.beta, loss_type=cfg.loss_type, **resume_state)

    # ---- the loop: each step, the global batch's pairs -> one forward of chosen and rejected -> DPO loss
    metrics_path = os.path.join(cfg.out_dir, "dpo_metrics.jsonl")
    order_rng = random.Random(cfg.seed)   # the same seed on every rank: the ranks agree on each global batch
    progress = Progress(total_steps, desc="dpo", start=start_step)
    step, record, last_eval = 0, {}, {}
    with MetricsLogger(metrics_path, resume_step=start_step if cfg.resume else None, enabled=runtime.is_main) as log:
        if start_step == 0:
            last_eval = evaluate(0)   # the SFT policy itself: the baseline
            if last_eval:
                log.log(0, **last_eval)
        while step < total_steps:
            order = list(range(len(pairs)))
            order_rng.shuffle(order)   # every epoch's shuffle, a resumed run's too: the same order
            for first in range(0, len(order), cfg.batch_size):
                if step == total_steps:
                    break
                if step < start_step:   # a batch the interrupted run trained on before its last save
                    step += 1
                    continue
                lr = set_lr(optimizer, cosine_lr(step, total_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr))
                share, weight = batch_share(runtime, order[first:first + cfg.batch_size])   # this rank's pairs
                chosen, rejected = [pairs[k][0] for k in share], [pairs[k][1] for k in share]
                # chosen and rejected in ONE forward (DDP expects one forward per backward)
                logps = sequence_logprobs(train_policy, [rows[i] for i in chosen + rejected], tokenizer.pad_id,
                                          runtime.device)
                loss, stats = dpo_loss(logps[:len(share)], logps[len(share):], ref_logps[chosen], ref_logps[rejected],
                                       cfg.beta, cfg.loss_type, cfg.label_smoothing)
                record = global_means(runtime, {"loss/train": loss.item(), **stats}, weight)
                check_finite(torch.tensor(record["loss/train"]), step)   # the global loss: all ranks stop together
                optimizer.zero_grad(set_to_none=True)
                (loss * weight).backward()   # DDP averages the ranks' gradients: the global batch's mean
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf"))
                optimizer.step()
                step += 1
                record.update({"lr": lr, "grad_norm": grad_norm.item()})
                if step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0):
                    last_eval = evaluate(step)
                    record.update(last_eval)
                log.log(step, **record)
                progress.log(step, loss=record["loss/train"], acc=record["rewards/accuracies"],
                             margin=record["rewards/margins"], gold=last_eval.get("eval/gold", math.nan))
                if runtime.is_main and step % cfg.save_every == 0 and step < total_steps:
                    log.commit()   # the metrics first: a stop during the save leaves them ahead of dpo.pt, never behind
                    save(step, {k: v for k, v in record.items() if isinstance(v, (int, float)) and math.isfinite(v)})

    minutes = (time.time() - start) / 60
    if not runtime.is_main:
        return   # rank 0 alone reports and writes
    summary = {k: v for k, v in {**record, **last_eval}.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    summary.update({"minutes": minutes, "samples_drawn": 0, "comparisons": len(comparisons), "pairs": len(pairs),
                    **baseline})
    save(step, summary)   # (the metrics file was written when the loop's block ended)
    curves = os.path.join(cfg.out_dir, "dpo_curves.png")
    plot_curves(read_metrics(metrics_path), [
        {"keys": ["loss/train"], "title": f"DPO loss ({cfg.loss_type})", "ylabel": "loss",
         "hline": math.log(2) if cfg.loss_type == "sigmoid" else None, "hline_label": "log 2: policy = reference"},
        {"keys": ["rewards/chosen", "rewards/rejected", "rewards/margins"],
         "title": "implicit rewards beta * log(pi / pi_ref)", "ylabel": "nats x beta"},
        {"keys": ["rewards/accuracies"], "title": "pairs the implicit reward orders as labelled",
         "ylabel": "share of pairs", "hline": 0.5, "hline_label": "chance"},
        {"keys": ["eval/gold"], "title": "held-out gold labeler score", "ylabel": "gold total", "smooth": False},
        {"keys": ["eval/kl"], "title": "KL(policy || SFT) per held-out response", "ylabel": "nats", "smooth": False},
        {"keys": ["grad_norm"], "title": "gradient norm (before clipping)", "ylabel": "L2 norm"},
    ], curves, title=f"DPO (beta {cfg.beta}, {cfg.loss_type} loss)")
    if last_eval:
        evaluate.print_result("DPO", summary, samples=3)
    print(f"done in {minutes:.1f} min, no samples drawn while training (DPO is offline)")
    print(f"wrote {out_path}, {metrics_path}, {curves}")


if __name__ == "__main__":
    run_main(main)
