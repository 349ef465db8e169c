"""`tunelab export RUN_DIR --format gguf [--dtype fp32|fp16|bf16|q8_0]`: a Llama-architecture run as one GGUF
file for llama.cpp, Ollama and other GGUF runtimes.

    tunelab export runs/smollm2-lora-alpaca --format gguf --dtype q8_0
    llama-cli -m runs/smollm2-lora-alpaca/export/smollm2-lora-alpaca-q8_0.gguf -cnv

Which runs: `hf_causal_lm` runs of a Llama model (SmolLM2, or any Hugging Face Llama folder; LoRA runs are
merged into the fp32 base first, exactly as `--merge` does) and the native GPT's `llama` flavour. The model
goes through the Hugging Face Llama folder the HF export writes (into a scratch folder that is removed), and
that folder is written as GGUF the way llama.cpp's `convert_hf_to_gguf.py` writes a Llama:

- tensors under gguf's canonical names (`gguf.get_tensor_name_map`), Q and K rows permuted from the Hugging
  Face rotary layout (halves) to llama.cpp's (interleaved pairs), the output head left out when tied;
  norms and other 1-D tensors stay fp32; `q8_0` quantises every 2-D weight in blocks of 32 (a row whose
  length is not a multiple of 32 falls back to fp16, as in llama.cpp's converter);
- hyperparameters under `llama.*`, the byte-level BPE vocabulary (`tokenizer.ggml.model = gpt2`) with token
  types, merges, bos/eos/unk/pad ids, whether BOS/EOS are added, and the chat template;
- `tokenizer.ggml.pre` (which text splitting llama.cpp applies before BPE): copied from the base model when it
  is a GGUF file (SmolLM2: `smollm`), else read from tokenizer.json's pre-tokenizer (`gpt-2`, `smollm`,
  `llama-bpe`); any other pre-tokenizer, and sentencepiece vocabularies (Llama 2 style), are refused.

Supported `--dtype`: fp32, fp16, bf16, q8_0 (default: the run's weights dtype). Q4-class quantisations are
not written; quantise the fp16 file with llama.cpp's `llama-quantize`. Everything that can be refused is
checked before anything is written; the file is written beside its destination and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, TunelabError

GGUF_DTYPES = ("fp32", "fp16", "bf16", "q8_0")

# tokenizer.json pre-tokenizers (as (type, detail) steps) -> llama.cpp's `tokenizer.ggml.pre` name
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
}


# -- checks made before anything is written ---------------------------------------------------------------
def check_llama_config(config: dict[str, Any], source: str) -> None:
    """Refuse (one line) a config.json that llama.cpp's `llama` architecture would not run as the same model."""
    arch = config.get("model_type")
    if arch != "llama":
        raise ConfigError(
            f"{source}: GGUF export writes Llama-architecture models (model_type llama), not {arch!r}; "
            "export a Hugging Face folder instead (drop --format gguf)"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"{source}: RoPE scaling {rope_type!r} is not written to GGUF yet (only unscaled RoPE)")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {config['hidden_act']!r}: llama.cpp's Llama uses silu")


def _pre_tokenizer_steps(tokenizer_json: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    detail = {
        "ByteLevel": lambda s: bool(s.get("use_regex", True)),
        "Digits": lambda s: bool(s.get("individual_digits", False)),
        "Split": lambda s: (s.get("pattern") or {}).get("Regex"),
    }
    return tuple((s.get("type"), detail.get(s.get("type"), lambda s: None)(s)) for s in steps)


def tokenizer_pre(tokenizer_folder: Path, base_gguf: Path | None = None) -> str:
    """llama.cpp's name for how text is split before BPE: the base GGUF's own value when there is one,
    else recognised from tokenizer.json. Anything else is refused: llama.cpp would split differently."""
    tok_file = tokenizer_folder / "tokenizer.json"
    if not tok_file.is_file():
        raise ConfigError(f"{tokenizer_folder}: no tokenizer.json; GGUF export needs a Hugging Face fast tokenizer")
    try:
        model = json.loads(tok_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{tok_file}: not a readable tokenizer.json ({str(e)[:120]}); use an intact copy") from e
    kind = (model.get("model") or {}).get("type")
    if kind != "BPE" or (model.get("model") or {}).get("byte_fallback"):
        raise ConfigError(
            f"{tok_file}: GGUF export writes byte-level BPE vocabularies; this one is "
            f"{'sentencepiece-style BPE' if kind == 'BPE' else kind} (convert with llama.cpp's convert_hf_to_gguf.py)"
        )
    if base_gguf is not None:
        from gguf import GGUFReader

        field = GGUFReader(str(base_gguf)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    steps = _pre_tokenizer_steps(model)
    if steps not in PRE_TOKENIZERS:
        raise ConfigError(
            f"{tok_file}: pre-tokenizer {[s[0] for s in steps]} has no llama.cpp name this writer knows "
            f"(known: {', '.join(PRE_TOKENIZERS.values())}); convert with llama.cpp's convert_hf_to_gguf.py"
        )
    return PRE_TOKENIZERS[steps]


# -- the writer ---------------------------------------------------------------------------------------------
def _permute_rotary(w: Any, n_head: int) -> Any:
    """Hugging Face's rotary layout (each head's first half, then second half) -> llama.cpp's (interleaved
    pairs); `convert_hf_to_gguf.py`'s `LlamaModel.permute`, which transformers' GGUF loader reverses."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types (NORMAL / CONTROL / USER_DEFINED / UNUSED) for ids 0..vocab_size-1."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise TunelabError(f"the tokenizer has id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            special = added[i].special or (by_id[i].startswith("<|") and by_id[i].endswith("|>"))
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _adds_special(tokenizer: Any) -> dict[str, bool]:
    """Whether the tokenizer puts BOS / EOS around plain text (what the model saw), for llama.cpp."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bos is not None and ids[:1] == [bos], "eos": eos is not None and ids[-1:] == [eos]}


def _tensor_data(name: str, data: Any, dtype: str) -> tuple[Any, Any]:
    """(array, GGML type) for one tensor: 1-D tensors and norms in fp32, the rest in `dtype`."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import QuantError, quants

    qtype = {"fp32": Q.F32, "fp16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = Q.F32
    data = data.astype(np.float32)
    try:
        return quants.quantize(data, qtype), qtype
    except QuantError:  # q8_0 needs rows of a multiple of 32 values
        return quants.quantize(data, Q.F16), Q.F16


def _add_hyperparameters(writer: Any, config: dict[str, Any], dtype: str, name: str) -> None:
    """The `general.*` and `llama.*` keys llama.cpp reads to build the model."""
    import gguf

    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or n_embd // n_head
    rope = config.get("rope_parameters") or {}
    file_type = {"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]  # fmt: skip
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_file_type(file_type)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != n_embd // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _add_tokenizer(writer: Any, folder: Path, vocab_size: int, pre: str) -> None:
    """The byte-level BPE vocabulary, token types, merges, special ids and chat template (`tokenizer.*`)."""
    import gguf

    from tunelab.tokenizers import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(str(folder))
    tokens, types = _vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    special.add_special_token = _adds_special(tokenizer)
    special.add_to_gguf(writer, quiet=True)


def _add_tensors(writer: Any, folder: Path, config: dict[str, Any], dtype: str) -> None:
    """Every weight under llama.cpp's name, Q/K rows in its rotary layout, the tied output head left out."""
    import gguf

    from tunelab.models.gpt_hf import read_hf_weights

    n_head = config["num_attention_heads"]
    n_kv_head = config.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", False))
    for hf_name, tensor in read_hf_weights(folder).items():
        if "rotary_emb" in hf_name or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise TunelabError(f"{folder}: tensor {hf_name} has no GGUF name in llama.cpp's Llama architecture")
        data = tensor.float().numpy()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute_rotary(data, n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute_rotary(data, n_kv_head)
        data, qtype = _tensor_data(gguf_name, data, dtype)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)


def write_gguf(folder: Path, path: Path, dtype: str, pre: str, name: str) -> Path:
    """Write the Hugging Face Llama folder `folder` (config.json, safetensors, tokenizer) as the GGUF `path`."""
    import gguf

    config = json.loads((folder / "config.json").read_text())
    check_llama_config(config, str(folder / "config.json"))
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hyperparameters(writer, config, dtype, name)
    _add_tokenizer(writer, folder, config["vocab_size"], pre)
    _add_tensors(writer, folder, config, dtype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- `tunelab export RUN_DIR --format gguf` ----------------------------------------------------------------
def _check_run(run_dir: Path, folder: Path, spec: dict[str, Any], merge: bool) -> tuple[Path, Path | None]:
    """Refuse what GGUF export cannot write before anything is written; returns (folder holding the
    tokenizer.json to write, the base GGUF file when the model came from one)."""
    from tunelab.hub import resolve_model_path
    from tunelab.models.llm import ADAPTER_CONFIG
    from tunelab.paths import resolve_path

    name = spec.get("name")
    if name == "gpt":
        from tunelab.models.gpt import gpt_config
        from tunelab.models.gpt_hf import hf_llama_config

        if merge:
            raise ConfigError("--merge applies to LoRA runs; a GPT run exports its whole model without it")
        kwargs = dict(spec.get("kwargs", {}))
        hf_llama_config(gpt_config(kwargs.pop("size", "baby"), **kwargs))  # the gpt2 flavour is refused here
        meta = run_dir / "tokenizer" / "tunelab_tokenizer.json"
        kind = json.loads(meta.read_text()).get("type") if meta.is_file() else None
        if kind not in ("bpe", "hf"):
            raise ConfigError(
                f"{run_dir}: a GGUF file needs the run's vocabulary as byte-level BPE; this run's tokenizer is "
                f"{kind or 'missing'} (train with data.tokenizer=bpe, or export a Hugging Face folder)"
            )
        return run_dir / "tokenizer", None
    if name != "hf_causal_lm":
        raise TunelabError(
            f"{folder}: GGUF export writes Llama-architecture causal LMs (model.name hf_causal_lm, or gpt with "
            f"flavour llama), not `{name}`"
        )
    from transformers import AutoConfig

    base_path = spec.get("kwargs", {}).get("path", "")
    base = resolve_path(base_path)
    base_gguf = base if base.is_file() and base.suffix == ".gguf" else None
    # a LoRA run's architecture is its base model's (a folder, a converted GGUF or a hub id in the local cache)
    model_source = resolve_model_path(base_path) if (folder / ADAPTER_CONFIG).is_file() else str(folder)
    try:
        config = AutoConfig.from_pretrained(model_source).to_dict()
    except (OSError, ValueError) as e:
        raise ConfigError(f"{model_source}: cannot read the model's config.json ({e})") from e
    check_llama_config(config, f"{model_source}/config.json")
    tok_folder = folder if (folder / "tokenizer.json").is_file() else Path(model_source)
    return tok_folder, base_gguf


def _is_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file (its magic): --overwrite replaces only such a file."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(4) == b"GGUF"
    return False


def default_output(run_dir: Path, dtype: str) -> Path:
    """RUN_DIR/export/<run name>-<dtype>.gguf"""
    return run_dir / "export" / f"{run_dir.resolve().name}-{dtype}.gguf"


def export_gguf(
    run_dir: str | Path,
    output: str | Path | None = None,
    dtype: str | None = None,
    which: str = "final",
    overwrite: bool = False,
    merge: bool = False,
    trust_code: bool = False,
) -> Path:
    """Export a run's Llama-architecture model as one GGUF file; returns its path."""
    from tunelab.export import check_destination, export_run, run_model_folder
    from tunelab.io import TMP_PREFIX, atomic_write
    from tunelab.models.llm import ADAPTER_CONFIG

    run_dir = Path(run_dir)
    if dtype is not None and dtype not in GGUF_DTYPES:
        raise ConfigError(
            f"--dtype {dtype!r} is not written to GGUF; use one of {', '.join(GGUF_DTYPES)} "
            "(for Q4-class files, quantise the fp16 GGUF with llama.cpp's llama-quantize)"
        )
    folder, spec = run_model_folder(run_dir, which, trust_code)
    tok_folder, base_gguf = _check_run(run_dir, folder, spec, merge)
    pre = tokenizer_pre(tok_folder, base_gguf)
    dtype = dtype or spec.get("kwargs", {}).get("dtype") or "fp32"
    out = Path(output) if output else default_output(run_dir, dtype)
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; --output names the .gguf file to write")
    out = check_destination(out, run_dir, overwrite, _is_gguf)

    made_parent = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        # the merged (or whole) model as the fp32 Hugging Face Llama folder the HF export writes, in a scratch
        # folder beside the destination (same disk; a killed export's leftover is found by its TMP_PREFIX)
        with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{out.name}.hf-", dir=out.parent) as scratch:
            hf = export_run(run_dir, output=Path(scratch) / "hf", merge=(folder / ADAPTER_CONFIG).is_file(),
                            dtype="fp32", which=which)  # fmt: skip
            atomic_write(out, lambda tmp: write_gguf(hf, tmp, dtype, pre, name=run_dir.resolve().name))
    finally:
        if made_parent and not out.exists():
            with contextlib.suppress(OSError):
                out.parent.rmdir()
    return out
