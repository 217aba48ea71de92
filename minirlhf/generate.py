"""Batched sampling with the KV cache: how a policy produces the responses that RLHF scores.

Lesson: generation is a loop of "predict the next token, append it". Done naively, step s runs
the whole (P + s)-token prefix through the model again; with the KV cache (`GPT.forward(...,
use_cache=True)`), the prompt is run once (the *prefill*) and each later step runs only the one
new token, reading the earlier tokens' keys and values from the cache. Same logits, far less work
(`benchmarks/bench_generate.py` measures the difference).

Batching prompts of different lengths: prompts are LEFT-padded with PAD, so every row's next token
lands in the same column; the attention mask hides the PAD and the position ids skip it, so a
padded row samples exactly as it would alone.

    prompt_ids    [PAD PAD p0 p1 p2]      response_ids  [r0 r1 EOS PAD PAD]
    prompt_mask   [ 0   0  1  1  1 ]      response_mask [ 1  1  1   0   0 ]

Each row stops at its first EOS (the EOS is kept and counts in `response_mask`; PAD after it),
and the loop stops as soon as every row has stopped, so R <= max_new_tokens.

Convention (shared with the losses and PPO, docs/design.md): in `Generation.sequences()`, of length
P + R, the logits that predict response token t sit at position P - 1 + t (the last prompt token
predicts the first response token). `logprobs[b, t]` is log pi(response_ids[b, t] | prefix) under
log_softmax(logits / temperature) of the FULL distribution -- before top-k/top-p filtering, and
with temperature 1 when sampling greedily -- so PPO can recompute the same number with a forward
pass over `sequences()` and the same temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minirlhf.model import KVCache


@dataclass
class Generation:
    """A batch of sampled responses. B rows, P prompt columns, R response columns (R <= max_new_tokens).

    prompt_ids    (B, P) int64, left-padded with pad_id
    prompt_mask   (B, P) int64, 1 real token, 0 PAD
    response_ids  (B, R) int64, right-padded with pad_id after the first EOS
    response_mask (B, R) int64, 1 for tokens up to and including the first EOS
    logprobs      (B, R) float32, log-prob of each sampled token (see the module docstring), 0 at PAD
    ended         (B,)   bool, the row produced EOS (False: it ran out of max_new_tokens)
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ended: torch.Tensor
    eos_id: int
    pad_id: int

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), each (B, P + R): prompt then response, for a later forward pass.

        Off-by-one: the logits at position P - 1 + t predict response token t.
        """
        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)
        return ids, mask

    def response_lists(self) -> list[list[int]]:
        """Each row's response as a list of token ids, through its first EOS but without the EOS (for decoding)."""
        responses = []
        for ids, mask in zip(self.response_ids.tolist(), self.response_mask.tolist()):
            tokens = [token for token, keep in zip(ids, mask) if keep]
            if tokens and tokens[-1] == self.eos_id:
                tokens = tokens[:-1]
            responses.append(tokens)
        return responses


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask) (B, P), left-padded to the longest prompt; mask 1 at real tokens."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt) > 0:
            ids[row, P - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, P - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the top-k logits, then the nucleus of probability top_p; the rest become -inf. (B, V) -> (B, V).

    top-k: keep every logit >= the k-th largest (ties with the k-th are kept).
    top-p (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration"): sort by probability,
    keep the smallest prefix whose total probability reaches top_p. A token is kept when the mass
    of the tokens ranked above it is still < top_p, so the most likely token is always kept.
    Example: probs [0.5, 0.3, 0.2], top_p = 0.7 -> masses above each are [0, 0.5, 0.8] -> keep the first two.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=True)  # (B, V) each
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V) probability ranked above each token
        remove_sorted = mass_above >= top_p
        remove = remove_sorted.scatter(1, sorted_index, remove_sorted)  # back to vocabulary order
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    suppress_ids: tuple[int, ...] | list[int] = (),
) -> Generation:
    """Sample up to `max_new_tokens` tokens after each prompt, all rows at once.

    model           a `GPT` (anything with its forward signature and `.lm_head`, `.config.block_size`)
    prompts         B lists of token ids (any lengths >= 1); left-padded with pad_id here
    temperature     softmax(logits / temperature); 0 means greedy (argmax)
    top_k, top_p    optional filtering before sampling (ignored when greedy)
    suppress_ids    ids that are never sampled, greedy included (`sample_responses` passes PAD and the
                    role markers: a response is text and EOS, nothing else). Like top-k/top-p this is
                    a filter: `logprobs` stay those of the full distribution
    generator       a torch.Generator on the model's device, for reproducible sampling
    use_cache       True: prefill once, then one token per step with the KV cache. False: rerun the
                    whole prefix every step (same tokens, much slower; kept for the lesson and the benchmark)

    The model runs in eval mode (no dropout) and its previous training mode is restored afterwards.
    Returns a `Generation` (see its docstring and the module docstring for the conventions).
    """
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("generate() needs at least one prompt, and every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if eos_id == pad_id:
        raise ValueError(f"eos_id and pad_id must differ (both are {eos_id}): PAD would read as a stop")
    P = max(len(p) for p in prompts)
    block_size = model.config.block_size
    if P + max_new_tokens > block_size:
        raise ValueError(
            f"the longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) = {P + max_new_tokens} "
            f"exceeds the model's block_size={block_size}"
        )

    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)  # (B, P) each
        B = prompt_ids.shape[0]
        # greedy: report the logprobs under the temperature-1 distribution
        logprob_temperature = temperature if temperature > 0 else 1.0

        # The cache is allocated once, with room for every position this call can reach.
        kv_cache = KVCache(model.config, capacity=P + max_new_tokens) if use_cache else None
        # Prefill: the whole prompt at once. Left padding puts every row's last real token in the
        # last column, so hidden[:, -1] predicts every row's first response token. Apply the LM head
        # to that column only: the other P - 1 positions' logits would be thrown away.
        out = model(prompt_ids, attention_mask=prompt_mask, past_kv=kv_cache, use_cache=use_cache, return_hidden=True)
        next_logits = model.lm_head(out.hidden[:, -1]).float()  # (B, V)

        ids, mask = prompt_ids, prompt_mask  # the growing sequence (B, P + s), used without the cache
        done = torch.zeros(B, dtype=torch.bool, device=device)  # the row has already emitted EOS
        tokens, token_masks, token_logprobs = [], [], []
        suppress = torch.tensor(list(suppress_ids), dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            full_logprobs = F.log_softmax(next_logits / logprob_temperature, dim=-1)  # (B, V)
            allowed_logits = next_logits.index_fill(1, suppress, float("-inf"))  # (B, V)
            if temperature == 0:
                next_token = allowed_logits.argmax(dim=-1)  # (B,)
            else:
                filtered = filter_logits(allowed_logits / temperature, top_k, top_p)
                probs = F.softmax(filtered, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)  # (B,)

            alive = ~done  # rows still generating: this step's token is real (EOS included)
            next_token = torch.where(alive, next_token, torch.full_like(next_token, pad_id))
            logprob = full_logprobs.gather(1, next_token[:, None]).squeeze(1)  # (B,)
            tokens.append(next_token)
            token_masks.append(alive.long())
            token_logprobs.append(torch.where(alive, logprob, torch.zeros_like(logprob)))
            done = done | (alive & (next_token == eos_id))
            if bool(done.all()) or step == max_new_tokens - 1:
                break  # every row has stopped, or this was the last token: no need to run the model again

            # Feed the new token. The mask column is 0 for rows that had already stopped (their
            # token is PAD), so no later query attends to it.
            mask = torch.cat([mask, alive.long()[:, None]], dim=1)  # (B, P + step + 1)
            if use_cache:
                out = model(next_token[:, None], attention_mask=mask, past_kv=kv_cache,
                            use_cache=True, return_hidden=True)  # appends to kv_cache in place
            else:
                ids = torch.cat([ids, next_token[:, None]], dim=1)
                out = model(ids, attention_mask=mask, return_hidden=True)
            next_logits = model.lm_head(out.hidden[:, -1]).float()  # (B, V)

        response_ids = torch.stack(tokens, dim=1)  # (B, R)
        return Generation(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=torch.stack(token_masks, dim=1),
            logprobs=torch.stack(token_logprobs, dim=1),
            ended=done,
            eos_id=eos_id,
            pad_id=pad_id,
        )
    finally:
        model.train(was_training)
