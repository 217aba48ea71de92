"""A GPT-2 written out by hand, plus the two scalar-headed models RLHF needs.

Lesson: this file is the transformer every stage trains. It follows GPT-2 (Radford et al. 2019,
"Language Models are Unsupervised Multitask Learners", section 2.3) and nanoGPT's layout:

    idx (B, T) --wte + wpe--> x (B, T, d) --n_layer x Block--> ln_f --> lm_head (tied to wte) --> logits (B, T, V)
    Block(x) = x + attn(ln_1(x));  x + mlp(ln_2(x))        (pre-LayerNorm residual blocks)

Shapes: B batch, T new tokens, T_past cached tokens, T_total = T_past + T, d = d_model,
nh = n_head, hs = d / nh head size, V = vocab_size.

What RLHF adds to a plain GPT, and where it lives here:

* **Padding.** Batches of prompts are LEFT-padded for generation (so every row's next token is
  written in the same column) and responses are RIGHT-padded. `attention_mask` (B, T_total) marks
  real tokens with 1 and PAD with 0; PAD keys are never attended to, and the default position ids
  count only real tokens (`cumsum(mask) - 1`), so a left-padded row gives the same logits at its
  real tokens as the same row without padding.
* **KV cache.** `use_cache=True` returns every layer's keys and values (a `KVCache`: preallocated
  buffers, `cache[layer]` -> (k, v) each (B, nh, T_total, hs)); feeding it back as `past_kv` with
  only the new tokens gives the logits a full forward would.
* **Hidden states.** `return_hidden=True` skips the LM head, so the caller can fuse the head into
  a log-prob kernel (`minirlhf.kernels.token_logprobs`) and never hold the (B, T, V) logits.
* **Scalar heads.** `RewardModel` reads one score per sequence at the last real token;
  `ValueModel` gives one value per token (the PPO critic). Both wrap the same `GPT` trunk, so a
  GPT checkpoint loads into them with `.trunk.load_state_dict(gpt_state)`.

GELU uses the tanh approximation, as GPT-2 itself does (`gelu_new` in Hugging Face), so GPT-2
weights load exactly (`GPT.from_hf_gpt2`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    """Architecture hyperparameters (stored in every checkpoint as a plain dict)."""

    vocab_size: int  # includes the special tokens (EOS, PAD, role markers)
    block_size: int = 256  # max sequence length (learned position embeddings)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    dropout: float = 0.0  # RL forward passes always run with dropout off (model.eval())
    bias: bool = True  # biases in the Linear layers and LayerNorms, as GPT-2


# Presets: `smoke` runs in seconds (tests), `tiny` is the CPU demo, `medium` (~26M parameters) is a few
# minutes on one GPU, `small` is GPT-2 small's shape (GPU).
MODEL_PRESETS: dict[str, dict] = {
    "smoke": dict(n_layer=2, n_head=2, d_model=64, block_size=128),
    "tiny": dict(n_layer=4, n_head=4, d_model=256, block_size=256),
    "medium": dict(n_layer=8, n_head=8, d_model=512, block_size=256),
    "small": dict(n_layer=12, n_head=12, d_model=768, block_size=512),
}


def count_parameters(config: GPTConfig) -> int:
    """The number of parameters of `GPT(config)`, in closed form.

    With d = d_model, L = n_layer, V = vocab_size, T = block_size, and b = 1 if config.bias else 0:

        embeddings   V*d (wte, shared with the LM head: counted once) + T*d (wpe)
        per block    12*d^2              weights: qkv 3d^2 + attn proj d^2 + MLP 4d^2 + 4d^2
                   + 2*d                 LayerNorm gains (ln_1, ln_2)
                   + b*(2*d + 9*d)       LayerNorm shifts 2d + Linear biases 3d + d + 4d + d
        final LN     d + b*d

    Example: GPT-2 small (V=50257, T=1024, d=768, L=12, bias) gives 124,439,808 -- "124M".
    """
    d, n_layer, b = config.d_model, config.n_layer, int(config.bias)
    embeddings = config.vocab_size * d + config.block_size * d
    per_block = 12 * d * d + 2 * d + b * 11 * d
    final_ln = d + b * d
    return embeddings + n_layer * per_block + final_ln


# ----------------------------------------------------------------------------------------------
# The transformer
# ----------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(hs) + mask) v, heads in parallel."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.d_model % config.n_head != 0:
            raise ValueError(f"d_model={config.d_model} is not divisible by n_head={config.n_head}")
        self.n_head = config.n_head
        self.d_model = config.d_model
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)  # residual projection
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, is_causal=False, kv_cache=None, layer=0):
        """x (B, T, d); attn_mask (B, 1, T, T_total) bool, True = may attend (or None);
        kv_cache: a KVCache holding the T_past earlier tokens (this layer's new k, v are appended), or None.
        Returns y (B, T, d)."""
        B, T, d = x.shape
        hs = d // self.n_head
        q, k, v = self.c_attn(x).split(d, dim=2)  # 3 x (B, T, d)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            # store the new keys/values; the new tokens attend to those of all earlier tokens too
            k, v = kv_cache.append(layer, k, v)  # (B, nh, T_total, hs) each
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, d)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(d, 4d) -> GELU (tanh approximation, as GPT-2) -> Linear(4d, d)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)  # residual projection
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2 section 2.3): normalise, transform, add back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, is_causal=False, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal, kv_cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTOutput:
    """What `GPT.forward` returns.

    logits  (B, T, V), or None when `return_hidden=True` (the caller applies/fuses the LM head)
    hidden  (B, T, d) the final hidden states, after the final LayerNorm (the LM head's input)
    past_kv the KVCache (past_kv[layer] -> (k, v), each (B, nh, T_total, hs)) when `use_cache=True`; else None
    """

    logits: torch.Tensor | None
    hidden: torch.Tensor
    past_kv: KVCache | None = None


class KVCache:
    """The keys and values of every layer for the tokens processed so far: the KV cache.

    Lesson: during generation, step s needs the keys and values of all P + s earlier tokens, which
    do not change once computed. Keeping them turns each step's work from O(P + s) tokens into one.
    How they are kept matters too: `torch.cat([past, new])` at every step copies the whole cache
    again (O(T^2) copying over a generation, one allocation per layer per step -- it was half the
    time of a cached step on a CPU). Here each layer's keys and values live in preallocated
    buffers (B, nh, capacity, hs), new ones are written in place, and attention reads the filled
    part through a view. A full buffer is reallocated at twice the size (capped at block_size),
    so appending stays O(1) per token on average, like a Python list.

    cache[layer]  -> (k, v), each (B, nh, T_total, hs): views of the filled part (no copy)
    len(cache)    -> n_layer;   cache.seq_len -> T_total, the number of tokens cached

    Trap: `GPT.forward` extends the cache IN PLACE and returns the same object. Feeding one cache
    to two different continuations (branching, beam search) would mix them: build a new one.
    """

    def __init__(self, config: GPTConfig, capacity: int | None = None):
        self.n_layer = config.n_layer
        self.block_size = config.block_size
        self.capacity = min(capacity or config.block_size, config.block_size)  # positions to allocate first
        self.keys: list[torch.Tensor | None] = [None] * config.n_layer  # (B, nh, capacity, hs) each
        self.values: list[torch.Tensor | None] = [None] * config.n_layer
        self.lengths = [0] * config.n_layer  # filled positions per layer (equal between forwards)

    @property
    def seq_len(self) -> int:
        return self.lengths[0]

    def __len__(self) -> int:
        return self.n_layer

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.lengths[layer]
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new k, v (B, nh, T, hs) after this layer's cached ones; return all (B, nh, T_total, hs)."""
        start = self.lengths[layer]
        end = start + k.shape[2]
        buffer_k, buffer_v = self.keys[layer], self.values[layer]
        if buffer_k is None or end > buffer_k.shape[2]:
            # (re)allocate: the first time, or when full (double the size, at most block_size)
            old_capacity = 0 if buffer_k is None else buffer_k.shape[2]
            capacity = max(end, self.capacity, min(2 * old_capacity, self.block_size))
            B, nh, _, hs = k.shape
            new_k, new_v = k.new_empty(B, nh, capacity, hs), v.new_empty(B, nh, capacity, hs)
            if buffer_k is not None:
                new_k[:, :, :start] = buffer_k[:, :, :start]
                new_v[:, :, :start] = buffer_v[:, :, :start]
            self.keys[layer], self.values[layer] = buffer_k, buffer_v = new_k, new_v
        buffer_k[:, :, start:end] = k
        buffer_v[:, :, start:end] = v
        self.lengths[layer] = end
        return buffer_k[:, :, :end], buffer_v[:, :, :end]


def build_attention_mask(attention_mask, T: int, T_past: int):
    """The boolean mask that `F.scaled_dot_product_attention` takes: True where query i may attend key j.

    attention_mask (B, T_past + T): 1 real token, 0 PAD (bool, int or float).
    Returns (B, 1, T, T_past + T) bool (the 1 broadcasts over the heads).

    allowed[b, i, j] = (j <= T_past + i)          causal: a query sees itself and the past
                       and attention_mask[b, j]   never attend to a PAD key
                       or j == T_past + i         every query sees its own key (see the trap below)

    Trap: a PAD query with no real token at or before it (the first column of a left-padded row)
    would have no key at all, and softmax over an all -inf row is 0/0 = NaN. NaNs in PAD rows look
    harmless but leak: NaN * 0 is still NaN in the backward pass and in masked sums. Letting each
    query attend to its own key keeps everything finite; real queries are unaffected, since their
    own key is real and already allowed.
    """
    B, T_total = attention_mask.shape
    device = attention_mask.device
    key_pos = torch.arange(T_total, device=device)  # (T_total,)
    query_pos = torch.arange(T_past, T_total, device=device)  # (T,) absolute positions of the new tokens
    causal = key_pos[None, :] <= query_pos[:, None]  # (T, T_total)
    is_self = key_pos[None, :] == query_pos[:, None]  # (T, T_total)
    key_is_real = attention_mask.bool()[:, None, :]  # (B, 1, T_total)
    allowed = (causal[None] & key_is_real) | is_self[None]  # (B, T, T_total)
    return allowed[:, None]  # (B, 1, T, T_total)


def configure_optimizer(module: nn.Module, weight_decay: float, lr: float, betas=(0.9, 0.95)):
    """AdamW with weight decay only on 2-D weights (matmul weights and embeddings), as nanoGPT.

    Biases and LayerNorm gains/shifts (1-D) are not decayed: shrinking a LayerNorm gain toward 0 or
    a bias toward 0 is not a sensible prior. A tied weight appears once (named_parameters dedups).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # the fused implementation: one kernel per step, on CUDA and on CPU (3x faster than the default
    # per-tensor loop for the tiny model here: 2.9 ms instead of 9 ms per step)
    use_fused = len(params) > 0 and all(p.device.type in ("cuda", "cpu") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=use_fused or None)


class GPT(nn.Module):
    """GPT-2: token + learned position embeddings, n_layer pre-LN blocks, final LayerNorm, tied LM head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)  # token embeddings (V, d)
        self.wpe = nn.Embedding(config.block_size, config.d_model)  # position embeddings (block_size, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017, used by GPT-2): the LM head's weight IS the token
        # embedding matrix, one Parameter, so a gradient step updates both at once.
        self.lm_head.weight = self.wte.weight
        # bf16 autocast for the blocks (`Runtime.prepare` sets it; not part of the config, not saved)
        self.autocast_dtype: torch.dtype | None = None

        # GPT-2 init: N(0, 0.02) for every weight, zero biases; the two residual projections per
        # block get std 0.02 / sqrt(2 * n_layer), so the residual stream's variance does not grow
        # with depth (GPT-2 section 2.3: "scale the weights of residual layers by 1/sqrt(N)").
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_kv: KVCache | None = None,
        use_cache: bool = False,
        return_hidden: bool = False,
    ) -> GPTOutput:
        """Run the transformer on the new tokens `idx`, after the cached `past_kv` if given.

        idx            (B, T) int64 token ids of the new tokens
        attention_mask (B, T_past + T) 1 real token, 0 PAD (bool/int/float); covers the cached
                       tokens too. None: every token is real.
        position_ids   (B, T) positions of the new tokens. Default: with a mask, cumsum(mask) - 1
                       clamped at 0 (real tokens count 0, 1, 2, ... whatever the padding); without,
                       T_past, ..., T_past + T - 1.
        past_kv        the KVCache of a previous call with use_cache=True (T_past = its seq_len), or an
                       empty KVCache(config, capacity) to preallocate, or None. It is extended IN PLACE.
        use_cache      return the KVCache (a new one when past_kv is None) as .past_kv
        Returns GPTOutput(logits (B, T, V) or None if return_hidden, hidden (B, T, d), past_kv).
        """
        B, T = idx.shape
        T_past = 0 if past_kv is None else past_kv.seq_len
        T_total = T_past + T
        if T_total > self.config.block_size:
            raise ValueError(
                f"sequence of {T_total} tokens ({T_past} cached + {T} new) is longer than the model's "
                f"block_size={self.config.block_size}; crop the input or use a larger block_size"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (B, T_total):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (B, T_past + T) = "
                f"({B}, {T_total}): it must cover the cached tokens as well as the new ones"
            )

        if position_ids is None:
            if attention_mask is not None:
                # left padding shifts no position: the first real token is position 0
                positions_all = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, T_total)
                position_ids = positions_all[:, T_past:]  # (B, T) the new tokens' positions
            else:
                position_ids = torch.arange(T_past, T_total, device=idx.device).expand(B, T)

        # Which mask SDPA gets. The plain training case (no padding, no cache) uses is_causal,
        # which lets SDPA pick its fastest kernel; a single new token with no padding sees every
        # cached key, so it needs no mask; anything else gets the explicit boolean mask.
        attn_mask, is_causal = None, False
        if attention_mask is not None:
            attn_mask = build_attention_mask(attention_mask, T, T_past)
        elif T_past == 0:
            is_causal = True
        elif T > 1:
            # trap: is_causal=True aligns the causal triangle to the top-left, which is wrong
            # when the queries come after T_past cached keys: build the offset triangle instead
            attn_mask = build_attention_mask(torch.ones(B, T_total, dtype=torch.bool, device=idx.device), T, T_past)

        x = self.drop(self.wte(idx) + self.wpe(position_ids))  # (B, T, d)
        kv_cache = past_kv
        if kv_cache is None and use_cache:
            kv_cache = KVCache(self.config, capacity=T_total)  # grows by doubling if extended later
        # mixed precision: the blocks' matmuls and attention in bf16 when asked (weights stay fp32);
        # the hidden states leave in fp32, so the LM head, logprobs and scalar heads are fp32
        with torch.autocast(idx.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            for layer, block in enumerate(self.blocks):
                x = block(x, attn_mask, is_causal, kv_cache, layer)
        hidden = self.ln_f(x.float())  # (B, T, d) fp32
        logits = None if return_hidden else self.lm_head(hidden)  # (B, T, V)
        return GPTOutput(logits=logits, hidden=hidden, past_kv=kv_cache if use_cache else None)

    def configure_optimizer(self, weight_decay: float, lr: float, betas=(0.9, 0.95)):
        """AdamW, decay on 2-D weights only (see the module-level `configure_optimizer`)."""
        return configure_optimizer(self, weight_decay, lr, betas)

    def freeze_lower(self, n_blocks: int) -> "GPT":
        """Freeze the embeddings and the lowest `n_blocks` blocks (0: nothing). Nothing below the
        first trainable block needs a gradient, so backward stops there: fewer FLOPs per step.
        Freeze before `configure_optimizer`, which keeps only the trainable parameters."""
        if n_blocks:
            for module in (self.wte, self.wpe, *self.blocks[:n_blocks]):
                module.requires_grad_(False)
        return self

    @classmethod
    def from_hf_gpt2(cls, local_dir: str) -> "GPT":
        """Load a Hugging Face GPT-2 checkpoint from a LOCAL directory (nothing is downloaded).

        The directory holds `config.json` and `pytorch_model.bin` (read with weights_only=True) or
        `model.safetensors` (if the `safetensors` package is installed). Hugging Face's GPT-2 stores
        its Linear layers as `Conv1D`, whose weight is (in, out): y = x @ W + b, so the four matmul
        weights are transposed into nn.Linear's (out, in). The causal-mask buffers are skipped.
        """
        with open(os.path.join(local_dir, "config.json")) as f:
            hf = json.load(f)
        config = GPTConfig(
            vocab_size=hf["vocab_size"],
            block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            d_model=hf["n_embd"],
            dropout=0.0,
            bias=True,
        )
        bin_path = os.path.join(local_dir, "pytorch_model.bin")
        st_path = os.path.join(local_dir, "model.safetensors")
        if os.path.exists(bin_path):
            hf_state = torch.load(bin_path, map_location="cpu", weights_only=True)
        elif os.path.exists(st_path):
            try:
                from safetensors.torch import load_file
            except ImportError as err:
                raise ValueError(f"{st_path} needs the `safetensors` package (pip install safetensors)") from err
            hf_state = load_file(st_path)
        else:
            raise ValueError(f"{local_dir} has neither pytorch_model.bin nor model.safetensors")

        model = cls(config)
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        state = {}
        for name, tensor in hf_state.items():
            name = name.removeprefix("transformer.")
            # skip the causal-mask buffers (trap: "attn.bias" is also the end of "attn.c_attn.bias")
            # and the LM head (tied to wte)
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                continue
            name = name.replace("h.", "blocks.", 1) if name.startswith("h.") else name
            state[name] = tensor.t() if name.endswith(transposed) else tensor
        state["lm_head.weight"] = state["wte.weight"]
        model.load_state_dict(state, strict=True)
        return model


# ----------------------------------------------------------------------------------------------
# Scalar heads: the reward model and the value model (critic)
# ----------------------------------------------------------------------------------------------


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) int64 index of each row's LAST real token (the last 1), whatever the padding.

    Trap: `mask.sum(-1) - 1` is only right for right-padded rows; a left-padded row's last real
    token is the last column. Reading the position of the last 1 works for both.
    """
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), positions, -1).max(dim=-1).values  # (B,)
    if bool((last < 0).any()):
        raise ValueError("a row of attention_mask has no real token (all PAD): it has no last token to read")
    return last


class RewardModel(nn.Module):
    """r(x, y): the GPT trunk plus a linear head giving one scalar per sequence (InstructGPT section 3.5).

    The score is read at each row's last real (non-PAD) token, which has seen the whole prompt and
    response; for a response ending in EOS that is the EOS itself.
    Head init: weight ~ N(0, std = 1/sqrt(d_model + 1)), bias 0 (as Stiennon et al. 2020 / LHP), so
    initial scores have a spread of order 1 rather than 0.02.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.trunk = GPT(config)  # its LM head is unused (and costs nothing: tied to wte)
        self.head = nn.Linear(config.d_model, 1)
        nn.init.normal_(self.head.weight, mean=0.0, std=1.0 / math.sqrt(config.d_model + 1))
        nn.init.zeros_(self.head.bias)

    def forward_all(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token scalars (B, T): the head applied to every position's hidden state."""
        hidden = self.trunk(idx, attention_mask=attention_mask, return_hidden=True).hidden  # (B, T, d)
        return self.head(hidden).squeeze(-1)  # (B, T)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One reward per row (B,), read at the row's last non-PAD token (rows may be left- or right-padded)."""
        scores = self.forward_all(idx, attention_mask)  # (B, T)
        if attention_mask is None:
            return scores[:, -1]
        last = last_token_index(attention_mask)  # (B,)
        return scores.gather(1, last[:, None]).squeeze(1)  # (B,)

    def configure_optimizer(self, weight_decay: float, lr: float, betas=(0.9, 0.95)):
        return configure_optimizer(self, weight_decay, lr, betas)


class ValueModel(nn.Module):
    """V(s_t): the GPT trunk plus a linear head giving one value per token (the PPO critic).

    values[b, t] estimates the return after having read tokens 0..t. The head starts at zero
    (weight and bias), so the critic's first predictions are exactly 0 -- unless it is started from
    a reward model (`from_reward_model`), as PPO does when it has one.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.trunk = GPT(config)
        self.head = nn.Linear(config.d_model, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token values (B, T) (the values at PAD positions are meaningless: mask them)."""
        hidden = self.trunk(idx, attention_mask=attention_mask, return_hidden=True).hidden  # (B, T, d)
        return self.head(hidden).squeeze(-1)  # (B, T)

    @classmethod
    def from_reward_model(cls, reward_model: RewardModel) -> "ValueModel":
        """A critic initialised as a COPY of a reward model (trunk and head): no tensor is shared."""
        weight = reward_model.head.weight
        value_model = cls(reward_model.config).to(device=weight.device, dtype=weight.dtype)
        value_model.load_state_dict(reward_model.state_dict())  # same keys: trunk.*, head.*
        return value_model

    def configure_optimizer(self, weight_decay: float, lr: float, betas=(0.9, 0.95)):
        return configure_optimizer(self, weight_decay, lr, betas)
