"""Using a trained reward model: load `rm.pt`, score (prompt, response) pairs, normalised.

The RM's raw outputs have an arbitrary offset and scale (the ranking loss only sees differences),
so after training `train_rm.py` stores a bias and a gain that make the SFT policy's samples score
mean 0, std 1 (InstructGPT normalises its RM the same way before RL; so does TRL). Every user of
the RM - PPO, best-of-n, evaluation - goes through `RewardScorer`, which applies them:

    score = (raw - bias) * gain
"""

from __future__ import annotations

import torch

from minirlhf.checkpoint import load_checkpoint
from minirlhf.data import pad_sequences
from minirlhf.model import GPTConfig, RewardModel
from minirlhf.tokenizer import Tokenizer, render_chat


class RewardScorer:
    """A frozen reward model with its normalisation."""

    def __init__(self, model: RewardModel, tokenizer: Tokenizer, bias: float = 0.0, gain: float = 1.0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.bias = float(bias)
        self.gain = float(gain)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_tokens(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised scores (B,) of token sequences [USER] prompt [ASSISTANT] response [EOS] (+ PAD).
        The reward is read at each row's last non-PAD token: the EOS when the response ended."""
        raw = self.model(ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return (raw.float() - self.bias) * self.gain

    def score(self, prompts: list[str], responses: list[str], ended: list[bool] | None = None,
              batch_size: int = 64) -> torch.Tensor:
        """Normalised scores (N,) of text pairs. A response that did not end (no EOS within the
        budget) is rendered without the EOS, exactly as the policy produced it."""
        ended = ended if ended is not None else [True] * len(prompts)
        scores = []
        for start in range(0, len(prompts), batch_size):
            rows = [render_chat(self.tokenizer, p, r, add_eos=e) for p, r, e in
                    zip(prompts[start:start + batch_size], responses[start:start + batch_size],
                        ended[start:start + batch_size])]
            ids, mask = pad_sequences(rows, self.tokenizer.pad_id, side="right",
                                      length=min(max(map(len, rows)), self.model.trunk.config.block_size))
            scores.append(self.score_tokens(ids, mask).cpu())
        return torch.cat(scores)


def load_reward_model(path: str, tokenizer: Tokenizer, device="cpu") -> RewardScorer:
    """`rm.pt` -> a frozen, normalised `RewardScorer` (a clear error for a wrong kind or tokenizer)."""
    ckpt = load_checkpoint(path, kind="rm", tokenizer_identity=tokenizer.identity)
    model = RewardModel(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).requires_grad_(False)
    return RewardScorer(model, tokenizer, bias=ckpt.get("reward_bias", 0.0), gain=ckpt.get("reward_gain", 1.0))
