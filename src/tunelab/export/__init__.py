"""`tunelab export RUN_DIR [--merge] [--output DIR] [--dtype fp32|bf16|fp16]`: a run's model for other tools.
(`--format gguf`: one GGUF file for llama.cpp and Ollama, see tunelab.export.gguf.)

- A LoRA run without `--merge`: the adapter alone in PEFT format (`adapter_model.safetensors`,
  `adapter_config.json`) plus the tokenizer; load it with `PeftModel.from_pretrained(base, DIR)`.
- With `--merge` (or a fully fine-tuned run): a plain Hugging Face folder that
  `AutoModelForCausalLM.from_pretrained(DIR)` loads. The adapter is merged into the base loaded in fp32,
  never into a quantised base, then cast to `--dtype`.

The folder is written beside its destination and renamed into place, so a failed export leaves nothing
half-written. Heavy imports stay inside functions (this module is imported to build the CLI).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, TunelabError
from tunelab.io import follow_umask

EXPORT_DTYPES = ("fp32", "bf16", "fp16")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def check_destination(output: Path, run_dir: Path, overwrite: bool, is_export: Callable[[Path], bool]) -> Path:
    """Where an export may go: never onto a run's own files (its final/, checkpoints, log), a run folder,
    a folder holding the run or the current folder, and with --overwrite only onto an earlier export
    (`is_export`). A symlinked destination is written at its target (the link stays). Returns that path."""
    from tunelab.engine.rundir import check_not_managed, is_run_folder

    target = output.resolve() if output.is_symlink() else output
    for path in {output, target}:
        check_not_managed(path)
    resolved = target.resolve()
    for held in (run_dir.resolve(), Path.cwd().resolve()):
        if resolved == held or resolved in held.parents:
            raise ConfigError(f"--output {output}: holds {held}; choose a new folder or file for the export")
    if resolved.is_dir() and is_run_folder(resolved):
        raise ConfigError(f"--output {output}: is a tunelab run folder; choose a new folder for the export")
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        if not overwrite:
            raise ConfigError(f"{output}: already exists; pass --overwrite or choose another --output")
        if not is_export(target):
            raise ConfigError(f"--output {output}: is not an earlier export, so --overwrite does not replace "
                              "it; choose a new folder or file for the export")
    return target


def _is_hf_export(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("config.json", ADAPTER_FILES[1]))


@contextlib.contextmanager
def _written(output: Path, run_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling folder to write the export into, renamed to `output` when the block succeeds
    and removed when it fails; an existing `output` is refused unless `overwrite` and an earlier export."""
    output = check_destination(output, run_dir, overwrite, _is_hf_export)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        follow_umask(tmp)
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cast_adapter(path: Path, dtype: str) -> None:
    from safetensors.torch import load_file, save_file

    from tunelab.models.llm import DTYPES

    tensors = {k: v.to(DTYPES[dtype]) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def run_model_folder(run_dir: Path, which: str, trust_code: bool = False) -> tuple[Path, dict[str, Any]]:
    """A run's `final/` (or `best/`) folder, checked against its manifest where it has one, and its
    tunelab_model.json spec (which may name code to import only with `trust_code`)."""
    from tunelab.io import verify_if_manifested
    from tunelab.models import MODEL_JSON, check_trusted
    from tunelab.models.llm import find_model_folder

    folder = find_model_folder(run_dir, which) if run_dir.is_dir() else None
    if folder is None:
        raise TunelabError(f"{run_dir}: no {which}/ model folder (with {MODEL_JSON}); is this a finished run?")
    verify_if_manifested(folder)  # a tampered final/ is refused, never exported
    spec = json.loads((folder / MODEL_JSON).read_text())
    check_trusted(spec, trust_code, folder / MODEL_JSON)
    return folder, spec


def export_run(
    run_dir: str | Path,
    output: str | Path | None = None,
    merge: bool = False,
    dtype: str | None = None,
    which: str = "final",
    overwrite: bool = False,
    trust_code: bool = False,
) -> Path:
    """Export a run's `final/` (or `best/`) model; returns the folder written."""
    from tunelab.models.llm import ADAPTER_CONFIG, DTYPES, load_causal_lm
    from tunelab.tokenizers import load_hf_tokenizer

    run_dir = Path(run_dir)
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ConfigError(
            f"--dtype {dtype!r} is invalid; use one of {', '.join(EXPORT_DTYPES)} (q8_0: with --format gguf)"
        )
    folder, spec = run_model_folder(run_dir, which, trust_code)
    if spec.get("name") == "gpt":
        return _export_gpt(run_dir, folder, output, merge, dtype, overwrite)
    if spec.get("name") != "hf_causal_lm":
        raise TunelabError(
            f"{folder}: export writes Hugging Face causal LMs (model.name hf_causal_lm, or gpt with "
            f"flavour llama), not `{spec.get('name')}`"
        )
    is_adapter = (folder / ADAPTER_CONFIG).is_file()
    kind = "merged" if merge and is_adapter else ("adapter" if is_adapter else "model")
    out = Path(output) if output else run_dir / "export" / kind
    with _written(out, run_dir, overwrite) as tmp:
        if is_adapter and not merge:
            for name in ADAPTER_FILES + TOKENIZER_FILES:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, tmp / name)
            if dtype is not None:
                _cast_adapter(tmp / ADAPTER_FILES[0], dtype)
        else:
            # Merge in fp32 into an unquantised base, whatever the run trained with.
            kwargs = {**spec.get("kwargs", {}), "dtype": "fp32", "quantize": None}
            model = load_causal_lm(folder, {**spec, "kwargs": kwargs})
            if is_adapter:
                from tunelab.strategies.lora import merge_lora

                model = merge_lora(model)
            target = dtype or spec.get("kwargs", {}).get("dtype", "fp32")
            model = model.to(DTYPES[target])
            model.config.use_cache = True
            model.save_pretrained(tmp, safe_serialization=True)
            tok_src = str(folder) if (folder / "tokenizer_config.json").is_file() else kwargs["path"]
            load_hf_tokenizer(tok_src).save_pretrained(tmp)
    return out


def _export_gpt(run_dir: Path, folder: Path, output: str | Path | None, merge: bool, dtype: str | None,
                overwrite: bool) -> Path:
    """A native GPT of the `llama` flavour as a Hugging Face Llama folder, with the run's tokenizer when it
    is a BPE or Hugging Face one (tunelab.models.gpt_hf)."""
    from tunelab.models import load_model_folder
    from tunelab.models.gpt_hf import export_hf_llama, hf_llama_config
    from tunelab.models.llm import DTYPES
    from tunelab.tokenizers import load_run_tokenizer

    if merge:
        raise ConfigError("--merge applies to LoRA runs; a GPT run exports its whole model without it")
    model = load_model_folder(folder)
    hf_llama_config(model.config)  # a clear error for the gpt2 flavour before anything is written
    out = Path(output) if output else run_dir / "export" / "model"
    with _written(out, run_dir, overwrite) as tmp:
        tokenizer = load_run_tokenizer(run_dir) if (run_dir / "tokenizer").is_dir() else None
        export_hf_llama(model.to(DTYPES[dtype or "fp32"]), tmp, tokenizer)
    return out
