"""Expert iteration (best-of-n distillation): sample n, keep the reward model's favourite, fine-tune on it.

Reads  out/sft.pt (the policy's start, and the reference its KL is measured against), out/rm.pt,
       data/ppo_prompts.jsonl (the RL prompts), data/eval_prompts.jsonl (held-out judging)
Writes out/expert.pt, out/expert_metrics.jsonl, out/expert_curves.png

The simplest way to use a reward model, and the baseline many RL runs fail to beat (Anthony et
al. 2017, "expert iteration"; the "best-of-n then SFT" of Touvron et al. 2023's Llama 2 rejection
sampling, and of the RAFT and ReST methods). Each round:

    1. sample   n responses per prompt from the current policy           (the "expert": best-of-n)
    2. select   of those that ended with EOS, the one with the highest reward r(x, y)
                (`RewardScorer.reward`: what PPO maximises); a prompt none of whose n samples
                stopped is skipped this round (distilling a response that never ends teaches rambling)
    3. distil   supervised fine-tuning on (prompt, best response): the SFT loss on response tokens

Best-of-n from SFT moves at most log n - (n-1)/n nats from it (`stats.best_of_n_kl`) and gains
whatever the RM's ranking is worth (evaluate.py draws its curve). Distilling it into the policy
makes that gain the policy's own at one sample; a second round searches from there. There is no
KL term: the distance to SFT is held by how few rounds and steps there are - eval/kl shows it.
The gold labeler judges the result on held-out prompts exactly as it judges PPO and DPO.

CPU:  python train_expert.py                   (preset tiny, ~2 minutes on 2 cores)
      python train_expert.py --n 8 --rounds 1  (search wider, once)
      python train_expert.py --preset smoke
GPU:  python train_expert.py --preset medium --device cuda
Resume an interrupted run:  python train_expert.py --resume   (same flags as the first run: every
      --save-every steps expert.pt is written with the round, the step within it, the round's chosen
      responses, its optimizer and the dice of the prompt draws and shuffles; the run continues from
      there without sampling the round again, exactly as if it had not stopped)
Several processes (data parallel): torchrun --standalone --nproc_per_node=2 train_expert.py --preset smoke
      Each rank samples and scores its share of the round's prompts with its own dice; the chosen
      responses are gathered so every rank holds the same distillation set; then, as in
      train_sft.py, each step's --batch-size examples are split over the ranks and every rank
      divides its summed loss by the GLOBAL token count. Rank 0 alone writes.
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
from minirlhf.data import read_sampling_prompts
from minirlhf.evaluation import HeldOutEvaluation, PolicyConfig
from minirlhf.metrics import MetricsLogger, Progress, read_metrics
from minirlhf.plots import plot_curves
from minirlhf.reward import load_reward_model
from minirlhf.runtime import setup_runtime
from minirlhf.tokenizer import Tokenizer, render_chat
from minirlhf.training import check_finite, cosine_lr, demonstration_loss, sample_responses, set_lr

EVAL_TEMPERATURE = 1.0   # held-out samples are drawn as PPO draws them (its default --temperature)
EVAL_BATCH_SIZE = 64     # PPO's tiny --batch-size: the same prompts, seed and batches as its evaluation


@dataclass
class ExpertConfig(PolicyConfig):
    reward_model: str = option("", "reward model checkpoint (default: OUT_DIR/rm.pt)")
    prompts: str = option("", "prompts to sample (default: DATA_DIR/ppo_prompts.jsonl)")
    rounds: int = option(2, "sample -> select -> distil rounds, each from the policy so far", min=1)
    prompts_per_round: int = option(512, "prompts sampled per round", min=1)
    n: int = option(4, "samples per prompt; the RM keeps the best one", min=2)
    temperature: float = option(1.0, "sampling temperature", min=0.05)
    sample_batch_size: int = option(256, "sequences sampled at once", min=1)
    epochs: int = option(2, "passes over each round's chosen responses", min=1)
    batch_size: int = option(32, "examples per step, over all processes", min=1)
    lr: float = option(5e-5, "peak learning rate of each round (AdamW)", above=0.0)
    min_lr: float = option(5e-6, "learning rate at the end of each round's cosine decay (<= --lr)", min=0.0)
    warmup_steps: int = option(3, "linear warmup steps of each round", min=0)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)", min=0.0)
    save_every: int = option(20, "write expert.pt every N steps (and at the end)", min=1)


PRESETS = {
    "smoke": dict(rounds=1, prompts_per_round=16, n=4, max_new_tokens=16, epochs=1, batch_size=8, warmup_steps=1,
                  eval_prompts=4, eval_samples=1),
    "tiny": {},
    "medium": dict(prompts_per_round=1024),
    "small": dict(prompts_per_round=2048, n=8, batch_size=64, lr=1e-5, min_lr=1e-6, eval_prompts=111,
                  eval_samples=4, max_new_tokens=64),
}


def best_of_n_examples(policy, tokenizer, scorer, prompts: list[str], cfg, generator, runtime) -> tuple[list, dict]:
    """Steps 1-2 of a round: n samples per prompt, the RM's favourite of each prompt kept.

    Returns (examples, stats): (prompt ids, response ids + EOS) of the favourite among each prompt's
    samples that ended - rendered from the text, as the RM read it - on every rank, in prompt order;
    and the share of prompts kept, the mean reward of their n samples and of the chosen ones. Each
    rank samples its share of the prompts."""
    mine = runtime.shard(list(range(len(prompts))))
    chosen = []   # (prompt index, text, reward of the favourite, mean reward of the n)
    for first in range(0, len(mine), max(1, cfg.sample_batch_size // cfg.n)):
        indices = mine[first:first + max(1, cfg.sample_batch_size // cfg.n)]
        repeated = [prompts[i] for i in indices for _ in range(cfg.n)]          # n copies of each, together
        texts, ended, _ = sample_responses(policy, tokenizer, repeated, max_new_tokens=cfg.max_new_tokens,
                                           temperature=cfg.temperature, generator=generator,
                                           batch_size=len(repeated))
        rewards = scorer.reward(repeated, texts, ended).view(len(indices), cfg.n)   # (prompts, n)
        stopped = torch.tensor(ended).view(len(indices), cfg.n)
        best = rewards.masked_fill(~stopped, -math.inf).argmax(dim=1)              # the favourite that ended
        for row, index in enumerate(indices):
            if stopped[row].any():
                chosen.append((index, texts[row * cfg.n + best[row].item()], rewards[row, best[row]].item(),
                               rewards[row].mean().item()))
    chosen = sorted(runtime.gather_objects(chosen), key=lambda c: c[0])   # every rank's, in prompt order
    examples = []
    for index, text, _, _ in chosen:
        prompt_ids = render_chat(tokenizer, prompts[index])
        examples.append((prompt_ids, render_chat(tokenizer, prompts[index], text)[len(prompt_ids):]))
    stats = {"select/kept": len(chosen) / len(prompts),
             "select/reward_chosen": sum(c[2] for c in chosen) / max(len(chosen), 1),
             "select/reward_mean": sum(c[3] for c in chosen) / max(len(chosen), 1)}
    return examples, stats


def main() -> None:
    cfg = parse_config(ExpertConfig, PRESETS, description=__doc__.split("\n\n")[0])
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed, kernels=cfg.kernels)
    print_config(cfg, "train_expert")   # after setup_runtime: under torchrun rank 0 alone prints

    tokenizer = Tokenizer.from_file(os.path.join(cfg.data_dir, "tokenizer.tiktoken"))
    init_path = cfg.init or os.path.join(cfg.out_dir, "sft.pt")
    policy, _ = load_policy(init_path, tokenizer.identity, runtime)
    ref_policy, _ = load_policy(init_path, tokenizer.identity, runtime)
    ref_policy.requires_grad_(False)
    scorer = load_reward_model(cfg.reward_model or os.path.join(cfg.out_dir, "rm.pt"), tokenizer, runtime)
    block_size = policy.config.block_size
    prompts, eval_prompts = read_sampling_prompts(cfg, tokenizer, block_size)
    if runtime.is_main:
        make_out_dir(cfg.out_dir)   # the inputs are read: a bad --out-dir fails now, not at the first save
    rng = random.Random(cfg.seed)   # the same seed on every rank: the ranks agree on prompts and batches
    out_path = os.path.join(cfg.out_dir, "expert.pt")
    resumed, start_round, baseline = None, 0, {}   # baseline: the SFT policy's held-out gold (the evaluation at 0)
    if cfg.resume:   # the weights, the dice and the interrupted round as they were at the last save
        resumed = load_resume_checkpoint(out_path, kind="expert", tokenizer_identity=tokenizer.identity,
                                         total_steps=None, model_config=policy.config, train_config=cfg,
                                         needs=("optimizer", "examples", "rng_state"))
        policy.load_state_dict(resumed["model"])
        rng.setstate(resumed["rng_state"])
        baseline = {k: v for k, v in resumed["metrics"].items() if k.startswith("sft/")}
        start_round = resumed["round"]
        print(f"resumed from {out_path} at step {resumed['step']} (round {start_round + 1}, "
              f"{resumed['round_step']} of its steps done)")
    train_policy = runtime.wrap(policy)   # DDP under torchrun: backward averages the gradients over ranks

    # evaluate(step): the gold labeler on held-out samples, as PPO logs it; gains relative to step 0 (SFT)
    evaluate = HeldOutEvaluation(policy, ref_policy, tokenizer, eval_prompts, samples_per_prompt=cfg.eval_samples,
                                 max_new_tokens=cfg.max_new_tokens, temperature=EVAL_TEMPERATURE, seed=cfg.seed,
                                 batch_size=EVAL_BATCH_SIZE, runtime=runtime, reward_scorer=scorer, baseline=baseline)

    def save(step: int, summary: dict, **resume_state) -> None:
        """expert.pt: at the end, and every --save-every steps with `resume_state` besides, for --resume
        (marked unfinished: evaluate.py and chat.py refuse it)."""
        save_checkpoint(out_path, kind="expert", model_state=policy.state_dict(), model_config=asdict(policy.config),
                        tokenizer_identity=tokenizer.identity, train_config=asdict(cfg), step=step,
                        metrics={**summary, **baseline}, **resume_state)

    metrics_path = os.path.join(cfg.out_dir, "expert_metrics.jsonl")
    start = time.time()
    step, record, last_eval = (resumed["step"] if resumed else 0), {}, {}
    with MetricsLogger(metrics_path, resume_step=step if resumed else None, enabled=runtime.is_main) as log:
        if not resumed:
            last_eval = evaluate(0)   # the SFT policy itself: the baseline
            if last_eval:
                log.log(0, **last_eval)
        for round_ in range(start_round, cfg.rounds):
            resuming = resumed is not None and round_ == start_round
            if resuming:   # the interrupted round: its chosen responses as saved, in their shuffled order
                examples, first_step = [tuple(example) for example in resumed["examples"]], resumed["round_step"]
                print(f"round {round_ + 1}/{cfg.rounds}: the {len(examples)} responses chosen before the interrupt "
                      "(not sampled again)")
            else:
                # ---- 1-2. sample n per prompt from the current policy, keep the RM's favourite
                round_prompts = labeling.cycle_prompts(prompts, cfg.prompts_per_round, rng)
                examples, selected = best_of_n_examples(policy, tokenizer, scorer, round_prompts, cfg,
                                                        runtime.generator(cfg.seed + 1 + round_), runtime)
                if not examples:
                    raise UserError(f"round {round_ + 1}: no sample ended within --max-new-tokens "
                                    f"{cfg.max_new_tokens}: raise it")
                print(f"round {round_ + 1}/{cfg.rounds}: best of {cfg.n} for {len(round_prompts)} prompts: reward "
                      f"{selected['select/reward_mean']:.2f} (mean of n) -> {selected['select/reward_chosen']:.2f} "
                      f"(chosen); {len(examples)} kept")
                first_step = 0

            # ---- 3. distil: SFT on the chosen responses (a fresh optimizer and schedule each round;
            #      dropout stays off, as in PPO and DPO: load_policy returns the model in eval mode)
            optimizer = policy.configure_optimizer(0.0, cfg.lr)
            if resuming:
                optimizer.load_state_dict(resumed["optimizer"])
            round_steps = math.ceil(len(examples) / cfg.batch_size) * cfg.epochs
            progress = Progress(round_steps, desc=f"round {round_ + 1}", start=first_step)
            for round_step in range(first_step, round_steps):   # (a resumed round's first step is > 0)
                if round_step % math.ceil(len(examples) / cfg.batch_size) == 0:
                    rng.shuffle(examples)
                first = (round_step % math.ceil(len(examples) / cfg.batch_size)) * cfg.batch_size
                lr = set_lr(optimizer, cosine_lr(round_step, round_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr))
                global_batch = examples[first:first + cfg.batch_size]   # SFT's loss on the chosen responses
                loss = demonstration_loss(train_policy, global_batch, tokenizer.pad_id, block_size, runtime)
                check_finite(loss, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf"))
                optimizer.step()
                step += 1
                record = {"loss/train": runtime.mean_over_ranks({"loss": loss.item()})["loss"], "lr": lr,
                          "grad_norm": grad_norm.item(), "round": round_ + 1}
                if round_step == 0:
                    record.update(selected)
                if round_step == round_steps - 1:
                    last_eval = evaluate(step)
                    record.update(last_eval)
                log.log(step, **record)
                progress.log(round_step + 1, loss=record["loss/train"])
                last_of_run = round_ == cfg.rounds - 1 and round_step == round_steps - 1
                if runtime.is_main and step % cfg.save_every == 0 and not last_of_run:
                    log.commit()   # the metrics first: a stop during the save leaves them ahead, never behind
                    # what --resume needs: the round and its steps done, its chosen responses (sampled once,
                    # in their current order), its optimizer, and the dice of the later shuffles and draws
                    save(step, {k: v for k, v in record.items() if isinstance(v, (int, float)) and math.isfinite(v)},
                         finished=False, round=round_, round_step=round_step + 1, examples=examples,
                         optimizer=optimizer.state_dict(), rng_state=rng.getstate())

    minutes = (time.time() - start) / 60
    if not runtime.is_main:
        return   # rank 0 alone reports and writes
    summary = {k: v for k, v in {**record, **last_eval}.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    summary.update({"minutes": minutes, "samples_drawn": cfg.rounds * cfg.prompts_per_round * cfg.n, **baseline})
    save(step, summary)   # (the metrics file was written when the loop's block ended)
    curves = os.path.join(cfg.out_dir, "expert_curves.png")
    plot_curves(read_metrics(metrics_path), [
        {"keys": ["loss/train"], "title": "distillation loss (chosen responses' tokens)", "ylabel": "cross-entropy (nats)"},
        {"keys": ["select/reward_mean", "select/reward_chosen"], "title": f"reward: mean of {cfg.n} vs the chosen one",
         "ylabel": "normalised RM reward", "smooth": False},
        {"keys": ["eval/gold"], "title": "held-out gold labeler score", "ylabel": "gold total", "smooth": False},
        {"keys": ["eval/kl"], "title": "KL(policy || SFT) per held-out response", "ylabel": "nats", "smooth": False},
    ], curves, title=f"Expert iteration ({cfg.rounds} rounds of best-of-{cfg.n})")
    if last_eval:
        evaluate.print_result("expert iteration", summary, samples=3)
    print(f"done in {minutes:.1f} min, {summary['samples_drawn']} samples drawn")
    print(f"wrote {out_path}, {metrics_path}, {curves}")


if __name__ == "__main__":
    run_main(main)
