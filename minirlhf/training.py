"""Small pieces that every training script shares: the learning-rate schedule, the language-model
loss through the fused logprob kernel, sampling chat responses, and the NaN guard."""

from __future__ import annotations

import math

import torch

from minirlhf.cli import UserError
from minirlhf.data import sft_batch
from minirlhf.generate import generate
from minirlhf.kernels import token_logprobs
from minirlhf.tokenizer import Tokenizer, render_chat


def cosine_lr(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr: float) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Give every parameter group of `optimizer` the learning rate `lr` (this step's, from
    `cosine_lr`); returns it, for the metrics."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def unwrap(model):
    """The model inside a `DistributedDataParallel` wrapper (`Runtime.wrap`), or `model` itself."""
    return getattr(model, "module", model)


def lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, token_count: float | torch.Tensor | None = None
            ) -> torch.Tensor:
    """Mean negative log-likelihood of `targets` over the tokens where `loss_mask` is 1.

    inputs, targets, loss_mask: (B, T); targets[b, t] is the token the logits at inputs[b, t]
    predict (the caller has shifted them). The LM head is fused into `token_logprobs`, so the
    (B, T, V) logits are never materialised. Equal to `losses.sft_loss(logits, targets, mask)`.
    `model` may be DDP-wrapped. `token_count`: divide the summed NLL by this instead of the number
    of loss tokens here (data-parallel ranks divide by the global count / world_size, so that the
    gradient DDP averages is the one mean over every rank's tokens).
    """
    hidden = model(inputs, attention_mask=attention_mask, return_hidden=True).hidden   # (B, T, d)
    if loss_mask is None:
        loss_mask = torch.ones_like(targets)
    masked_targets = targets.masked_fill(loss_mask == 0, -100)   # ignored: logprob 0, no gradient
    logprobs = token_logprobs(hidden, unwrap(model).lm_head.weight, masked_targets)   # (B, T)
    if token_count is None:
        token_count = loss_mask.sum().clamp(min=1)
    return -logprobs.sum() / token_count


def demonstration_loss(model, global_batch: list, pad_id: int, block_size: int, runtime) -> torch.Tensor:
    """SFT's loss on this rank's share of a global batch of (prompt ids, response ids) examples: the
    NLL of the response tokens (the EOS included; never the prompt or PAD, `data.sft_batch`),
    summed and divided by the tokens of ALL ranks / world size. DDP averages the ranks' gradients,
    so the step is the whole batch's mean, exactly what one process computes.

    A rank that a short last batch left with nothing gets one row that counts no token: it still
    runs the forward and backward pass that DDP's gradient all-reduce waits for.
    """
    mine = runtime.shard(global_batch)
    batch = sft_batch(mine or global_batch[:1], pad_id, block_size).to(runtime.device)
    if not mine:
        batch.loss_mask.zero_()
    (global_tokens,) = runtime.sum_over_ranks(batch.loss_mask.sum().item())
    return lm_loss(model, batch.inputs, batch.targets, batch.loss_mask, batch.attention_mask,
                   token_count=max(global_tokens, 1.0) / runtime.world_size)


def check_finite(loss: torch.Tensor, step: int, what: str = "loss") -> None:
    """A NaN/Inf stops the run with a message; the last checkpoint on disk stays as it was."""
    if not torch.isfinite(loss).all():
        raise UserError(f"{what} became {loss.item()} at step {step}: stopping (the last saved checkpoint is "
                        "intact; try a lower --lr)")


@torch.no_grad()
def sample_responses(model, tokenizer: Tokenizer, prompts: list[str], *, max_new_tokens: int,
                     temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                     generator: torch.Generator | None = None, batch_size: int = 64):
    """Sample one response per prompt. Returns (texts, ended, generations): decoded responses
    (EOS excluded), whether each stopped with EOS within `max_new_tokens`, and the raw
    `Generation` of each batch (token ids, masks, logprobs).

    PAD and the role markers are never sampled (`Tokenizer.never_sampled_ids`): `decode` would drop
    them from the text while the token ids kept them, and what the gold labeler reads (the text)
    and what the policy produced (the ids) must be the same response."""
    texts, ended, generations = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        out = generate(model, [render_chat(tokenizer, p) for p in chunk], max_new_tokens=max_new_tokens,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=temperature,
                       top_k=top_k, top_p=top_p, generator=generator, suppress_ids=tokenizer.never_sampled_ids)
        texts += [tokenizer.decode(ids) for ids in out.response_lists()]
        ended += out.ended.tolist()
        generations.append(out)
    return texts, ended, generations


def response_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                      temperature: float = 1.0, return_entropy: bool = False):
    """Log-probabilities of the response tokens of (prompt + response) sequences under `model`.

    sequences, attention_mask: (B, P + R) as from `Generation.sequences()` (prompts left-padded to
    P, responses right-padded). Returns (B, R) log p(response token t) - 0 at PAD positions, which
    the kernel skips - and the (B, R) entropies if asked.
    Off-by-one: the logits that predict response token t sit at position P - 1 + t, so we take the
    hidden states at positions P-1 .. P+R-2. The logits are divided by `temperature` - the same one
    the sampler used - for the policy, the old policy and the reference alike (PPO's logprobs must
    describe the distribution the tokens were actually drawn from).
    """
    hidden = model(sequences, attention_mask=attention_mask, return_hidden=True).hidden   # (B, P+R, d)
    hidden = hidden[:, prompt_len - 1:-1]                                                 # (B, R, d)
    response_mask = attention_mask[:, prompt_len:]
    targets = sequences[:, prompt_len:].masked_fill(response_mask == 0, -100)            # (B, R)
    return token_logprobs(hidden, unwrap(model).lm_head.weight, targets, temperature=temperature,
                          return_entropy=return_entropy)
