"""Hugging Face Llama folders <-> the native GPT's `llama` flavour.

    export_hf_llama(model, "out/hf")          # config.json + model.safetensors; transformers loads it
    model = import_hf_llama("out/hf")         # back to a native GPT (any plain Llama checkpoint folder)

The native model fuses q/k/v into one `qkv` matmul and gate/up into one `fc` matmul; the mapping splits
and joins them. Only what the native model can express is accepted: RoPE without scaling, SiLU, no
sliding windows; anything else is an error, never a silently different model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ConfigError
from tunelab.models.gpt import GPT, GPTConfig


def hf_llama_config(cfg: GPTConfig) -> dict[str, Any]:
    """config.json content for a `llama`-flavour GPTConfig."""
    if cfg.flavour != "llama":
        raise ConfigError(
            f"only the `llama` flavour exports as a Hugging Face Llama (this model is `{cfg.flavour}`)"
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
    }


def _layer_pairs(cfg: GPTConfig, i: int) -> list[tuple[str, str]]:
    """(native, hf) names of the parameters that map one to one in layer i."""
    n, h = f"blocks.{i}.", f"model.layers.{i}."
    pairs = [
        (n + "norm1.weight", h + "input_layernorm.weight"),
        (n + "norm2.weight", h + "post_attention_layernorm.weight"),
        (n + "attn.proj.weight", h + "self_attn.o_proj.weight"),
        (n + "mlp.proj.weight", h + "mlp.down_proj.weight"),
    ]
    if cfg.bias:
        pairs += [
            (n + "attn.proj.bias", h + "self_attn.o_proj.bias"),
            (n + "mlp.proj.bias", h + "mlp.down_proj.bias"),
        ]
    return pairs


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    cfg = model.config
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    q_kv = [cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
    for i in range(cfg.n_layer):
        n, h = f"blocks.{i}.", f"model.layers.{i}."
        for ours, theirs in _layer_pairs(cfg, i):
            out[theirs] = sd[ours]
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = sd[f"{n}attn.qkv.{suffix}"].split(q_kv)
            out[f"{h}self_attn.q_proj.{suffix}"], out[f"{h}self_attn.k_proj.{suffix}"] = q, k
            out[f"{h}self_attn.v_proj.{suffix}"] = v
            gate, up = sd[f"{n}mlp.fc.{suffix}"].chunk(2)
            out[f"{h}mlp.gate_proj.{suffix}"], out[f"{h}mlp.up_proj.{suffix}"] = gate, up
    return {k: v.detach().contiguous() for k, v in out.items()}


def export_hf_llama(model: GPT, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write a Hugging Face Llama folder (config.json, model.safetensors, and the tokenizer when given a
    tunelab BPE/HF tokenizer) that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    from tunelab.weights import save_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_llama_config(model.config)
    # the run's end-of-text id (else transformers' Llama defaults, bos 1 / eos 2, would name two ordinary
    # tokens of this vocabulary); None where the tokenizer has none
    eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
    config.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=None)
    save_state_dict(to_hf_state_dict(model), folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None and getattr(tokenizer, "kind", None) in ("bpe", "hf"):
        if tokenizer.kind == "hf":
            tokenizer.tok.save_pretrained(str(folder))
        else:
            from transformers import PreTrainedTokenizerFast

            PreTrainedTokenizerFast(
                tokenizer_object=tokenizer.tok, eos_token="<|endoftext|>"
            ).save_pretrained(str(folder))
    return folder


def gpt_config_from_hf(config: dict[str, Any]) -> GPTConfig:
    """The GPTConfig of a Hugging Face Llama config.json (refusing what the native model cannot express)."""
    if config.get("model_type") not in ("llama", None):
        raise ConfigError(
            f"config.json model_type {config.get('model_type')!r}: only `llama` imports natively"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(
            f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported by the native GPT; "
            "load this model with model.name=hf_causal_lm instead"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {config['hidden_act']!r}: the native Llama flavour uses silu")
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, n_embd // n_head):
        raise ConfigError(
            f"head_dim {config['head_dim']} != hidden_size / num_attention_heads: not supported"
        )
    if config.get("attention_bias", False) != config.get("mlp_bias", False):
        raise ConfigError("attention_bias and mlp_bias differ: the native model has one `bias` switch")
    return GPTConfig(
        flavour="llama",
        vocab_size=config["vocab_size"],
        block_size=config.get("max_position_embeddings", 2048),
        n_layer=config["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=config.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        mlp_hidden=config["intermediate_size"],
        bias=bool(config.get("attention_bias", False)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        init_std=config.get("initializer_range", 0.02),
    )


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from tunelab.weights import load_state_dict_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_state_dict_file(folder / name))
        return state
    return load_state_dict_file(folder / "model.safetensors")


def import_hf_llama(folder: str | Path, block_size: int | None = None) -> GPT:
    """A native GPT with the weights of a Hugging Face Llama folder (strict: every tensor must map)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: no config.json; not a Hugging Face model folder")
    cfg = gpt_config_from_hf(json.loads((folder / "config.json").read_text()))
    if block_size:
        cfg = GPTConfig(**{**cfg.__dict__, "block_size": block_size})
    theirs = read_hf_weights(folder)
    with torch.device("meta"):
        model = GPT(cfg)
    ours: dict[str, torch.Tensor] = {"tok_emb.weight": theirs.pop("model.embed_tokens.weight"),
                                     "norm_f.weight": theirs.pop("model.norm.weight")}  # fmt: skip
    head = theirs.pop("lm_head.weight", None)
    ours["lm_head.weight"] = ours["tok_emb.weight"] if cfg.tie_embeddings or head is None else head
    for i in range(cfg.n_layer):
        n, h = f"blocks.{i}.", f"model.layers.{i}."
        for native, hf in _layer_pairs(cfg, i):
            ours[native] = theirs.pop(hf)
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            ours[f"{n}attn.qkv.{suffix}"] = torch.cat(
                [theirs.pop(f"{h}self_attn.{p}_proj.{suffix}") for p in ("q", "k", "v")]
            )
            ours[f"{n}mlp.fc.{suffix}"] = torch.cat(
                [theirs.pop(f"{h}mlp.{p}_proj.{suffix}") for p in ("gate", "up")]
            )
    leftover = [k for k in theirs if "rotary_emb" not in k]
    if leftover:
        raise ConfigError(
            f"{folder}: {len(leftover)} tensors do not map to the native model, e.g. {leftover[0]}"
        )
    model.load_state_dict(ours, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    from tunelab.models.gpt import rope_cache

    cos, sin = rope_cache(cfg)
    model.rope_cos, model.rope_sin = cos, sin  # non-persistent buffers are not in the state dict
    return model.float()
