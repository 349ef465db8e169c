"""A decoder-only transformer in plain PyTorch 2, in two flavours, readable top to bottom.

- `gpt2`:  LayerNorm, GELU MLP, learned absolute positions (GPT-2 / nanoGPT).
- `llama`: RMSNorm, rotary positions (RoPE), SwiGLU MLP, grouped-query attention (Llama 2/3).

Attention goes through `F.scaled_dot_product_attention` (flash / memory-efficient kernels where the
device has them). The forward pass has no Python-side data-dependent branches, so `torch.compile` traces
the whole training step as one graph (tests/test_gpt.py counts the graph breaks).

This file is also the template to copy when you develop your own architecture: a config dataclass, a
few small modules, one `register_model` builder.

    model = create_model("gpt", size="baby", vocab_size=65)
    logits = model(input_ids)                          # (B, T, vocab_size)
    model.num_params(), model.flops_per_token()        # for MFU
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.errors import ConfigError, did_you_mean
from tunelab.models import register_model
from tunelab.models.checkpointing import plain_checkpoint_kwargs
from tunelab.models.dropout import MARK as FAST_DROPOUT
from tunelab.models.dropout import attention_with_dropout

Flavour = Literal["gpt2", "llama"]


@dataclass(frozen=True)
class GPTConfig:
    flavour: Flavour = "gpt2"
    vocab_size: int = 50304
    block_size: int = 1024  # longest sequence; sizes the position table / RoPE cache
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None: same as n_head
    n_embd: int = 768
    mlp_hidden: int | None = None  # None: 4 * n_embd (gpt2) or Llama's 2/3 * 4 * n_embd rounded to 256
    bias: bool = False  # biases in Linear layers and LayerNorm (GPT-2 has them)
    dropout: float = 0.0
    tie_embeddings: bool = True  # lm_head shares the token-embedding matrix
    norm_eps: float = 1e-5
    gelu_approximate: Literal["none", "tanh"] = "tanh"  # gpt2 flavour: F.gelu's `approximate` (nanoGPT: none)
    rope_theta: float = 10000.0
    init_std: float = 0.02
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute

    def __post_init__(self) -> None:
        if self.flavour not in ("gpt2", "llama"):
            raise ConfigError(f"`model.flavour` = {self.flavour!r} is invalid: use `gpt2` or `llama`")
        if self.gelu_approximate not in ("none", "tanh"):
            raise ConfigError(f"`model.gelu_approximate` = {self.gelu_approximate!r} is invalid: use `none` or `tanh`")
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"`model.{key}` = {getattr(self, key)} is invalid: must be > 0")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"`model.n_embd` = {self.n_embd} is not divisible by `model.n_head` = {self.n_head}; "
                f"pick n_embd as a multiple of n_head (e.g. {self.n_head * max(1, self.n_embd // self.n_head)})"
            )
        if self.kv_heads <= 0 or self.n_head % self.kv_heads:
            raise ConfigError(
                f"`model.n_kv_head` = {self.n_kv_head} must divide `model.n_head` = {self.n_head}"
            )
        if self.flavour == "llama" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head size; n_embd / n_head = {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.flavour == "gpt2":
            return 4 * self.n_embd
        return 256 * math.ceil(int(2 * 4 * self.n_embd / 3) / 256)


# Named sizes. `vocab_size` usually comes from the tokenizer (the `tokens` data source passes it).
SIZES: dict[str, dict[str, Any]] = {
    # nanoGPT's CPU "baby GPT" for tiny-shakespeare (char level): ~0.8M parameters.
    "baby": dict(flavour="gpt2", n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65),
    "baby-llama": dict(flavour="llama", n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=64, vocab_size=65),
    "gpt2-124m": dict(flavour="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=True),
    "gpt2-350m": dict(flavour="gpt2", n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304, bias=True),
    # Llama 3.2 1B's shape (without its long-context RoPE scaling).
    "llama-1b": dict(
        flavour="llama", n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, mlp_hidden=8192,
        block_size=2048, vocab_size=128256, rope_theta=500000.0, tie_embeddings=True,
    ),
}  # fmt: skip


def gpt_config(size: str | None = None, **overrides: Any) -> GPTConfig:
    """A GPTConfig from a named size plus overrides (None values are ignored)."""
    base: dict[str, Any] = {}
    if size is not None:
        if size not in SIZES:
            raise ConfigError(
                f"`model.size` = {size!r} is unknown{did_you_mean(size, SIZES)}; known: {', '.join(SIZES)}"
            )
        base = dict(SIZES[size])
    known = {f.name for f in fields(GPTConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(f"unknown key `model.{key}`{did_you_mean(key, known)}")
        if value is not None:
            base[key] = value
    return GPTConfig(**base)


# -- building blocks --------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.flavour == "llama":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cache(cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (block_size, head_dim) in the "rotate half" layout Hugging Face Llama uses."""
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    )
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries/keys; cos/sin are (T, D) or (B, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        # one matmul for queries, keys and values (keys/values have fewer heads under GQA)
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim],
            dim=-1,
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.training and self.dropout and getattr(self, FAST_DROPOUT, False):
            # attention dropout on CPU: sdpa's math path with the cheap mask (models/dropout.py)
            y = attention_with_dropout(q, k, v, self.dropout, causal=True)
            return self.proj(y.transpose(1, 2).reshape(B, T, C))
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """GELU MLP (gpt2) or SwiGLU (llama: `fc` holds the gate and up projections side by side)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.flavour == "llama"
        self.gelu_approximate = cfg.gelu_approximate
        self.fc = nn.Linear(cfg.n_embd, cfg.hidden * (2 if self.swiglu else 1), bias=cfg.bias)
        self.proj = nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        return self.proj(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), CausalSelfAttention(cfg)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope))
        return x + self.drop(self.mlp(self.norm2(x)))


# -- the model --------------------------------------------------------------------------------------


class GPT(nn.Module):
    # Parameter-name globs of the output layer (for strategies that freeze all but the head).
    tunelab_head_patterns = ["lm_head.*", "norm_f.*"]

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.flavour == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.flavour == "llama":
            cos, sin = rope_cache(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def tunelab_init_buffers(self) -> None:
        """Recompute the rotary tables (non-persistent buffers) after the model was built on meta."""
        if self.config.flavour == "llama":
            cos, sin = rope_cache(self.config)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def reset_parameters(self) -> None:
        """GPT-2's init: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * n_layer)
        so the residual stream's variance does not grow with depth."""
        gpt2_init(self, self.config.init_std)

    def tunelab_init(self, scheme: str, std: float | None = None) -> None:
        """`init: {scheme: gpt2, std: 0.02}` in a recipe (tunelab.weights.init_weights calls this)."""
        gpt2_init(self, std if std is not None else self.config.init_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size). `position_ids` (B, T) restarts positions inside packed sequences.
        `attention_mask` is accepted for right-padded batches and not needed: attention is causal, so real
        tokens never see the padding after them (its labels are -100)."""
        T = input_ids.size(1)
        x = self.tok_emb(input_ids)
        rope = None
        if self.pos_emb is not None:
            x = x + (self.pos_emb.weight[:T] if position_ids is None else self.pos_emb(position_ids))
        else:
            if position_ids is None:
                rope = (self.rope_cos[:T], self.rope_sin[:T])
            else:
                rope = (self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1))
            rope = (rope[0].to(x.dtype), rope[1].to(x.dtype))
        x = self.drop(x)
        for block in self.blocks:
            if self.config.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, **plain_checkpoint_kwargs())
            else:
                x = block(x, rope)
        return self.lm_head(self.norm_f(x))

    # -- sizes, for MFU and for the docs --------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters (shared tensors counted once). `non_embedding` leaves out token/position tables
        (the lm_head still counts when it is not tied: it is a matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if self.config.tie_embeddings:
                n += self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight plus the attention scores
        and values, 12 * n_layer * n_embd * T (PaLM appendix B; nanoGPT's `estimate_mfu`)."""
        T = seq_len or self.config.block_size
        matmul_params = self.num_params(non_embedding=True)
        return 6.0 * matmul_params + 12.0 * self.config.n_layer * self.config.n_embd * T

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample `max_new_tokens` tokens after `input_ids` (B, T). temperature 0 is greedy.
        No KV cache: each step re-reads the last block_size tokens (simple, fine for small models)."""
        ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(ids[:, -self.config.block_size :])[:, -1, :].float()
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            ids = torch.cat([ids, next_id], dim=1)
            if eos_id is not None and bool((next_id == eos_id).all()):
                break
        return ids


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, V): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def gpt2_init(model: nn.Module, std: float = 0.02) -> None:
    """GPT-2 init: Linear/Embedding weights ~ N(0, std), biases 0, norms 1; every residual-branch output
    projection (`*.proj.weight`) ~ N(0, std / sqrt(2 * n_layer))."""
    n_layer = len(getattr(model, "blocks", [])) or 1
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            scaled = name.endswith(".proj") and name.startswith("blocks.")
            nn.init.normal_(module.weight, 0.0, std / math.sqrt(2 * n_layer) if scaled else std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def gpt_hints(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What the `tokens` data source asks the model source (through the registry): its context length."""
    return {"block_size": kwargs.get("block_size") or SIZES.get(kwargs.get("size") or "baby", {}).get("block_size")}


def gpt_on_meta(**kwargs: Any) -> tuple[GPT, None]:
    """The GPT on the meta device (FSDP shards it before it has storage); no weights of its own."""
    with torch.device("meta"):
        return gpt(**kwargs), None


@register_model("gpt", hints=gpt_hints, meta=gpt_on_meta)
def gpt(
    size: str | None = "baby",
    flavour: Flavour | None = None,
    vocab_size: int | None = None,
    block_size: int | None = None,
    n_layer: int | None = None,
    n_head: int | None = None,
    n_kv_head: int | None = None,
    n_embd: int | None = None,
    mlp_hidden: int | None = None,
    bias: bool | None = None,
    dropout: float | None = None,
    tie_embeddings: bool | None = None,
    norm_eps: float | None = None,
    gelu_approximate: Literal["none", "tanh"] | None = None,
    rope_theta: float | None = None,
    init_std: float | None = None,
    activation_checkpointing: bool | None = None,
) -> GPT:
    """The native GPT: a named `size` (baby, baby-llama, gpt2-124m, gpt2-350m, llama-1b, or None for the
    GPTConfig defaults) with any field overridden."""
    overrides = {k: v for k, v in locals().items() if k != "size"}
    return GPT(gpt_config(size, **overrides))


__all__ = ["GPT", "GPTConfig", "SIZES", "gpt", "gpt_config", "gpt2_init", "sample_next"]
