"""Step 1: supervised fine-tuning (SFT) on demonstrations.

Reads  out/base.pt, data/sft.jsonl ({"prompt", "completion"}), data/eval_prompts.jsonl (reporting only)
Writes out/sft.pt, out/sft_metrics.jsonl, out/sft_curves.png

InstructGPT section 3.5 ("Supervised fine-tuning"): fine-tune the pretrained model on labeler-written
demonstrations. The loss is the next-token cross-entropy on the RESPONSE tokens only - the EOS
included, which is how the model learns to stop - never on the prompt and never on PAD. A few
demonstrations are enough to teach the format (answer, be kind, stop); they do not make the model
perfect, which is what the reward model and PPO are for.

CPU:  python train_sft.py                    (preset tiny, ~1 minute on 2 cores)
      python train_sft.py --preset smoke
GPU:  python train_sft.py --preset medium --device cuda
Resume an interrupted run:  python train_sft.py --resume   (same flags as the first run: sft.pt is
      written every --save-every steps with the optimizer; the data order is replayed from the seed,
      so the run continues exactly as if it had not stopped)
Several processes (data parallel): torchrun --standalone --nproc_per_node=2 train_sft.py --preset smoke
      Each step's --batch-size demonstrations are split over the ranks; every rank divides its summed
      loss by the GLOBAL token count (/ world size, as DDP averages), so the update is one process's.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from minirlhf.checkpoint import load_policy, load_resume_checkpoint, save_checkpoint
from minirlhf.cli import StageConfig, UserError, make_out_dir, option, parse_config, print_config, run_main
from minirlhf.data import read_prompts, read_sft, sft_batch
from minirlhf.evaluation import gold_report
from minirlhf.metrics import MetricsLogger, Progress, read_metrics
from minirlhf.plots import plot_curves
from minirlhf.runtime import setup_runtime
from minirlhf.tokenizer import Tokenizer, render_chat
from minirlhf.training import check_finite, cosine_lr, demonstration_loss, lm_loss, sample_responses, set_lr


@dataclass
class SFTConfig(StageConfig):
    init: str = option("", "checkpoint to start from (default: OUT_DIR/base.pt)")
    demos: str = option("", "demonstrations JSONL (default: DATA_DIR/sft.jsonl)")
    epochs: int = option(4, "passes over the demonstrations", min=1)
    batch_size: int = option(32, "demonstrations per step", min=1)
    lr: float = option(5e-4, "peak learning rate (AdamW)", above=0.0)
    min_lr: float = option(3e-5, "learning rate at the end of the cosine decay (<= --lr)", min=0.0)
    warmup_steps: int = option(10, "linear warmup steps", min=0)
    weight_decay: float = option(0.0, "AdamW weight decay on 2-D weights", min=0.0)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)", min=0.0)
    val_fraction: float = option(0.1, "share of demonstrations held out for the val loss", min=0.0, max=0.5)
    eval_every: int = option(10, "held-out loss every N steps", min=1)
    max_new_tokens: int = option(48, "response budget when sampling", min=1)
    report_prompts: int = option(111, "held-out prompts sampled at the end for the gold-labeler summary (0: skip)", min=0)
    save_every: int = option(50, "write sft.pt every N steps (and at the end)", min=1)


PRESETS = {
    "smoke": dict(epochs=1, batch_size=8, eval_every=5, report_prompts=8, max_new_tokens=24, save_every=10),
    "tiny": {},
    "medium": {},
    "small": dict(epochs=3, batch_size=64, lr=1e-4, min_lr=1e-5),
}


def encode_demos(tokenizer, demos, block_size):
    """(prompt ids ending in [ASSISTANT], response ids ending in [EOS]) per demonstration."""
    examples = []
    for prompt, completion in demos:
        prompt_ids = render_chat(tokenizer, prompt)
        full = render_chat(tokenizer, prompt, completion)
        examples.append((prompt_ids, full[len(prompt_ids):]))
    too_long = sum(len(p) + len(r) > block_size + 1 for p, r in examples)
    if too_long:
        print(f"note: {too_long} demonstrations are longer than the block size and are cut")
    return examples


@torch.no_grad()
def held_out_loss(model, examples, cfg, pad_id, runtime) -> float:
    """Mean NLL per response token over `examples` (each rank scores its share; sums combined)."""
    model.eval()
    total, count = 0.0, 0
    mine = runtime.shard(examples)
    for start in range(0, len(mine), cfg.batch_size):
        batch = sft_batch(mine[start:start + cfg.batch_size], pad_id, model.config.block_size).to(runtime.device)
        n = batch.loss_mask.sum().item()
        total += lm_loss(model, batch.inputs, batch.targets, batch.loss_mask, batch.attention_mask).item() * n
        count += n
    model.train()
    total, count = runtime.sum_over_ranks(total, count)
    return total / max(count, 1)


def main() -> None:
    cfg = parse_config(SFTConfig, PRESETS, description="Supervised fine-tuning on demonstrations.")
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed, kernels=cfg.kernels)
    print_config(cfg, "train_sft")   # after setup_runtime: rank 0 alone prints

    tokenizer = Tokenizer.from_file(os.path.join(cfg.data_dir, "tokenizer.tiktoken"))
    init_path = cfg.init or os.path.join(cfg.out_dir, "base.pt")
    model, _ = load_policy(init_path, tokenizer.identity, kinds=("base", "sft"))
    runtime.prepare(model)
    config = model.config
    model.train()

    # ---- demonstrations: shuffled once, a slice held out
    demos = read_sft(cfg.demos or os.path.join(cfg.data_dir, "sft.jsonl"))
    random.Random(cfg.seed).shuffle(demos)
    examples = encode_demos(tokenizer, demos, config.block_size)
    n_val = int(len(examples) * cfg.val_fraction)
    val_examples, train_examples = examples[:n_val], examples[n_val:]
    if not train_examples:
        raise UserError("no demonstrations left for training (lower --val-fraction)")
    steps_per_epoch = (len(train_examples) + cfg.batch_size - 1) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    print(f"demonstrations: {len(train_examples)} train, {len(val_examples)} held out; "
          f"{total_steps} steps ({cfg.epochs} epochs)")

    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.lr)
    out_path = os.path.join(cfg.out_dir, "sft.pt")
    start_step = 0
    if cfg.resume:   # the weights and the optimizer as they were at the interrupted run's last save
        ckpt = load_resume_checkpoint(out_path, kind="sft", tokenizer_identity=tokenizer.identity,
                                      total_steps=total_steps, model_config=config, train_config=cfg)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
        print(f"resumed from {out_path} at step {start_step}")
    train_model = runtime.wrap(model)   # DDP under torchrun: backward averages the gradients over ranks
    report_prompts = read_prompts(os.path.join(cfg.data_dir, "eval_prompts.jsonl"))[:cfg.report_prompts]
    if runtime.is_main:
        make_out_dir(cfg.out_dir)
    metrics_path = os.path.join(cfg.out_dir, "sft_metrics.jsonl")

    def save(step: int, summary: dict) -> None:
        """sft.pt: at the end, and every --save-every steps with the optimizer besides, for --resume (marked
        unfinished: the later stages refuse it)."""
        resume_state = {} if step == total_steps else {"finished": False, "optimizer": optimizer.state_dict()}
        save_checkpoint(out_path, kind="sft", model_state=model.state_dict(), model_config=asdict(config),
                        tokenizer_identity=tokenizer.identity, train_config=asdict(cfg), step=step,
                        metrics=summary, **resume_state)

    order_rng = random.Random(cfg.seed)
    progress = Progress(total_steps, desc="sft", start=start_step)
    start = time.time()
    step = 0
    val_loss = held_out_loss(model, val_examples, cfg, tokenizer.pad_id, runtime) if val_examples else float("nan")
    with MetricsLogger(metrics_path, resume_step=start_step if cfg.resume else None, enabled=runtime.is_main) as log:
        if start_step == 0:
            log.log(0, **{"loss/val": val_loss})
        for epoch in range(cfg.epochs):
            order_rng.shuffle(train_examples)   # every epoch's shuffle, a resumed run's too: the same order
            for start_index in range(0, len(train_examples), cfg.batch_size):
                if step < start_step:   # a batch the interrupted run trained on before its last save
                    step += 1
                    continue
                lr = set_lr(optimizer, cosine_lr(step, total_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr))
                # mean NLL of the response tokens (EOS included, never the prompt or PAD) over the
                # step's demonstrations; under torchrun each rank takes its share of them
                global_batch = train_examples[start_index:start_index + cfg.batch_size]
                loss = demonstration_loss(train_model, global_batch, tokenizer.pad_id, config.block_size, runtime)
                check_finite(loss, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                optimizer.step()
                step += 1
                record = {"loss/train": runtime.mean_over_ranks({"loss": loss.item()})["loss"], "lr": lr,
                          "grad_norm": grad_norm.item(), "epoch": epoch}
                if val_examples and (step % cfg.eval_every == 0 or step == total_steps):
                    val_loss = held_out_loss(model, val_examples, cfg, tokenizer.pad_id, runtime)
                    record["loss/val"] = val_loss
                log.log(step, **record)
                progress.log(step, loss=record["loss/train"], val=val_loss)
                if runtime.is_main and step % cfg.save_every == 0 and step < total_steps:
                    log.commit()   # the metrics first: a stop during the save leaves them ahead of sft.pt, never behind
                    save(step, {"loss/train": record["loss/train"], "loss/val": val_loss})

    minutes = (time.time() - start) / 60
    summary = {"loss/train": record["loss/train"], "loss/val": val_loss, "minutes": minutes}
    if not runtime.is_main:
        return   # rank 0 alone reports and writes
    if report_prompts:
        summary.update(gold_report(model, tokenizer, report_prompts, max_new_tokens=cfg.max_new_tokens,
                                   seed=cfg.seed, runtime=runtime))
        print("gold labeler on held-out prompts: " + ", ".join(
            f"{k} {v:.3f}" for k, v in summary.items() if "/" in k and not k.startswith("loss")))
        texts, _, _ = sample_responses(model, tokenizer, report_prompts[:4], max_new_tokens=cfg.max_new_tokens,
                                       generator=runtime.generator(cfg.seed))
        for prompt, text in zip(report_prompts, texts):
            print(f"  [sample] {prompt!r} -> {text!r}")

    save(step, summary)   # (the metrics file was written when the loop's block ended)
    curves = os.path.join(cfg.out_dir, "sft_curves.png")
    plot_curves(read_metrics(metrics_path), [
        {"keys": ["loss/train", "loss/val"], "title": "SFT loss (response tokens only)", "ylabel": "cross-entropy (nats)"},
        {"keys": ["lr"], "title": "learning rate", "ylabel": "lr", "smooth": False},
        {"keys": ["grad_norm"], "title": "gradient norm (before clipping)", "ylabel": "L2 norm"},
    ], curves, title="Supervised fine-tuning")
    print(f"done in {minutes:.1f} min: held-out demonstration loss {val_loss:.3f}")
    print(f"wrote {out_path}, {metrics_path}, {curves}")


if __name__ == "__main__":
    run_main(main)
