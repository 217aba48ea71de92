"""Step 0: pretrain the base model on the tiny-world corpus.

Reads  data/corpus.txt, data/tokenizer.tiktoken   (written by data/prepare.py)
Writes out/base.pt, out/base_metrics.jsonl, out/base_curves.png

The corpus is narrative text plus chats in which the assistant is inconsistent (correct, wrong,
rude, off-topic, rambling, never stopping), so the base model learns the world's facts and the chat
format - and all of those behaviours. That is the starting point InstructGPT had: GPT-3 knew a lot
and followed instructions badly.

CPU:  python train_base.py                      (preset tiny, ~2.5 minutes on 2 cores)
      python train_base.py --preset smoke       (seconds; for tests)
GPU:  python train_base.py --preset medium --device cuda     (bf16 by default on a GPU)
Resume an interrupted run:  python train_base.py --resume   (same flags as the first run: base.pt is
      written every --save-every steps with the optimizer and the data dice, and the run continues
      from there exactly as if it had not stopped; the metrics after that step are logged again)
Several processes (data parallel): torchrun --standalone --nproc_per_node=2 train_base.py --preset smoke
      Every rank draws the same global batch of --batch-size windows and trains on its own slice;
      DDP averages the gradients, so N ranks make the same update as one process (up to float error).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch

from minirlhf.checkpoint import load_resume_checkpoint, save_checkpoint
from minirlhf.cli import StageConfig, UserError, make_out_dir, option, parse_config, print_config, run_main
from minirlhf.data import random_windows, read_prompts, read_text
from minirlhf.metrics import MetricsLogger, Progress, read_metrics
from minirlhf.model import GPT, MODEL_PRESETS, GPTConfig
from minirlhf.plots import plot_curves
from minirlhf.runtime import setup_runtime
from minirlhf.tokenizer import Tokenizer
from minirlhf.training import check_finite, cosine_lr, lm_loss, sample_responses, set_lr


@dataclass
class BaseConfig(StageConfig):
    max_steps: int = option(360, "optimizer steps", min=1)
    batch_size: int = option(16, "sequences per step", min=1)
    seq_len: int = option(128, "tokens per sequence", min=8)
    lr: float = option(2e-3, "peak learning rate (AdamW)", above=0.0)
    min_lr: float = option(2e-4, "learning rate at the end of the cosine decay (<= --lr)", min=0.0)
    warmup_steps: int = option(50, "linear warmup steps", min=0)
    weight_decay: float = option(0.1, "AdamW weight decay on 2-D weights", min=0.0)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)", min=0.0)
    eval_every: int = option(100, "held-out loss every N steps", min=1)
    eval_batches: int = option(8, "batches per held-out loss", min=1)
    sample_every: int = option(200, "print samples every N steps", min=1)
    save_every: int = option(100, "write base.pt every N steps (and at the end)", min=1)
    n_layer: int = option(0, "transformer blocks (0: the preset's)", min=0)
    d_model: int = option(0, "width (0: the preset's)", min=0)
    n_head: int = option(0, "attention heads (0: the preset's)", min=0)


PRESETS = {
    "smoke": dict(max_steps=30, batch_size=8, seq_len=64, eval_every=15, eval_batches=2, sample_every=30,
                  warmup_steps=5, save_every=10),
    "tiny": {},
    "medium": dict(max_steps=1500, batch_size=32, seq_len=128, eval_every=250, sample_every=500, save_every=250),
    "small": dict(max_steps=5000, batch_size=64, seq_len=256, lr=6e-4, min_lr=6e-5, warmup_steps=200,
                  eval_every=250, sample_every=1000, save_every=500),
}
SAMPLE_PROMPTS = 3


def model_config(cfg, vocab_size: int) -> GPTConfig:
    """The preset's architecture, with any --n-layer/--d-model/--n-head override."""
    arch = dict(MODEL_PRESETS[cfg.preset])
    for name in ("n_layer", "d_model", "n_head"):
        if getattr(cfg, name):
            arch[name] = getattr(cfg, name)
    return GPTConfig(vocab_size=vocab_size, **arch)


@torch.no_grad()
def held_out_loss(model, tokens, cfg, generator, runtime) -> float:
    """Mean loss over `eval_batches` random held-out batches (each rank its slice; averaged)."""
    model.eval()
    losses = []
    for _ in range(cfg.eval_batches):
        inputs, targets = random_windows(tokens, cfg.batch_size, cfg.seq_len, generator)
        inputs, targets = runtime.shard(inputs).to(runtime.device), runtime.shard(targets).to(runtime.device)
        losses.append(lm_loss(model, inputs, targets).item())
    model.train()
    return runtime.mean_over_ranks({"loss": sum(losses) / len(losses)})["loss"]


def main() -> None:
    cfg = parse_config(BaseConfig, PRESETS, description="Pretrain the base model on the tiny-world corpus.")
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed, kernels=cfg.kernels)
    print_config(cfg, "train_base")   # after setup_runtime: rank 0 alone prints
    if cfg.batch_size % runtime.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {runtime.world_size} processes")

    # ---- data: one token stream; the last 5% held out
    tokenizer = Tokenizer.from_file(os.path.join(cfg.data_dir, "tokenizer.tiktoken"))
    corpus_path = os.path.join(cfg.data_dir, "corpus.txt")
    tokens = torch.tensor(tokenizer.encode(read_text(corpus_path), allow_special=True), dtype=torch.long)
    split = int(0.95 * len(tokens))
    train_tokens, val_tokens = tokens[:split], tokens[split:]
    if len(val_tokens) <= cfg.seq_len + 1:
        raise UserError(f"{corpus_path}: corpus too small for --seq-len {cfg.seq_len}")
    sample_prompts = read_prompts(os.path.join(cfg.data_dir, "eval_prompts.jsonl"))[:SAMPLE_PROMPTS]
    print(f"corpus: {len(tokens):,} tokens ({len(train_tokens):,} train, {len(val_tokens):,} held out)")

    # ---- model and optimizer
    config = model_config(cfg, tokenizer.vocab_size)
    if cfg.seq_len > config.block_size:
        raise UserError(f"--seq-len {cfg.seq_len} is longer than the model's block_size {config.block_size}")
    model = runtime.prepare(GPT(config))
    train_model = runtime.wrap(model)   # DDP under torchrun: backward averages the gradients over ranks
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.lr)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters ({config.n_layer} layers, d_model {config.d_model}); "
          f"{runtime.device}, {runtime.dtype}, {runtime.world_size} process(es)")

    if runtime.is_main:
        make_out_dir(cfg.out_dir)
    out_path = os.path.join(cfg.out_dir, "base.pt")
    metrics_path = os.path.join(cfg.out_dir, "base_metrics.jsonl")
    generator = runtime.cpu_generator(cfg.seed)            # which windows of the (CPU) token stream
    eval_generator = runtime.cpu_generator(cfg.seed + 1)

    def save(step: int, summary: dict) -> None:
        """base.pt: at the end, and every --save-every steps with what --resume needs besides (marked
        unfinished: train_sft.py refuses it)."""
        resume_state = {} if step == cfg.max_steps else dict(
            finished=False, optimizer=optimizer.state_dict(), data_rng_state=generator.get_state(),
            eval_rng_state=eval_generator.get_state())
        save_checkpoint(out_path, kind="base", model_state=model.state_dict(), model_config=asdict(config),
                        tokenizer_identity=tokenizer.identity, train_config=asdict(cfg), step=step,
                        metrics=summary, **resume_state)

    start_step = 0
    if cfg.resume:   # the weights, the optimizer and the dice as they were at the interrupted run's last save
        ckpt = load_resume_checkpoint(out_path, kind="base", tokenizer_identity=tokenizer.identity,
                                      total_steps=cfg.max_steps, model_config=config, train_config=cfg)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["data_rng_state"])
        eval_generator.set_state(ckpt["eval_rng_state"])
        start_step = ckpt["step"]
        print(f"resumed from {out_path} at step {start_step}")
    progress = Progress(cfg.max_steps, desc="base", start=start_step)
    start = time.time()
    val_loss = float("nan")
    with MetricsLogger(metrics_path, resume_step=start_step if cfg.resume else None, enabled=runtime.is_main) as log:
        for step in range(start_step, cfg.max_steps):
            lr = set_lr(optimizer, cosine_lr(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr))
            # the global batch (the same on every rank), then this rank's slice of it
            inputs, targets = random_windows(train_tokens, cfg.batch_size, cfg.seq_len, generator)
            inputs, targets = runtime.shard(inputs).to(runtime.device), runtime.shard(targets).to(runtime.device)
            loss = lm_loss(train_model, inputs, targets)
            check_finite(loss, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            optimizer.step()

            tokens_per_s = (step + 1 - start_step) * cfg.batch_size * cfg.seq_len / (time.time() - start)   # run average
            record = runtime.mean_over_ranks({"loss/train": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                                              "tokens_per_s": tokens_per_s})
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
                val_loss = held_out_loss(model, val_tokens, cfg, eval_generator, runtime)
                record["loss/val"] = val_loss
            log.log(step + 1, **record)
            progress.log(step + 1, tokens=cfg.batch_size * cfg.seq_len, loss=record["loss/train"], val=val_loss)
            if runtime.is_main and ((step + 1) % cfg.sample_every == 0 or step + 1 == cfg.max_steps):
                texts, _, _ = sample_responses(model, tokenizer, sample_prompts, max_new_tokens=40,
                                               generator=runtime.generator(step))
                model.train()
                for prompt, text in zip(sample_prompts, texts):
                    print(f"  [sample] {prompt!r} -> {text!r}")
            if runtime.is_main and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
                log.commit()   # the metrics first: a stop during the save leaves them ahead of base.pt, never behind
                save(step + 1, {"loss/train": record["loss/train"], "loss/val": val_loss})

    summary = {"loss/train": record["loss/train"], "loss/val": val_loss, "minutes": (time.time() - start) / 60,
               "parameters": n_params}
    if not runtime.is_main:
        return   # rank 0 alone writes
    save(cfg.max_steps, summary)   # (the metrics file was written when the loop's block ended)
    curves = os.path.join(cfg.out_dir, "base_curves.png")
    plot_curves(read_metrics(metrics_path), [
        {"keys": ["loss/train", "loss/val"], "title": "next-token loss", "ylabel": "cross-entropy (nats)"},
        {"keys": ["lr"], "title": "learning rate", "ylabel": "lr", "smooth": False},
        {"keys": ["grad_norm"], "title": "gradient norm (before clipping)", "ylabel": "L2 norm"},
        {"keys": ["tokens_per_s"], "title": "throughput (run average)", "ylabel": "tokens / s", "smooth": False},
    ], curves, title="Base model pretraining")
    print(f"done in {summary['minutes']:.1f} min: held-out loss {val_loss:.3f}")
    print(f"wrote {out_path}, {metrics_path}, {curves}")


if __name__ == "__main__":
    run_main(main)
