"""Steps 2 and 3: initialise weights by scheme, and load pretrained weights strictly, with a report.

`load_pretrained` replaces the tutorial idiom `{k: v for k, v in sd.items() if k in model_dict}`, which
silently loads nothing when the keys do not line up. Here every key is accounted for: loaded, missing,
unexpected, or shape-mismatched (with both shapes), and a load that leaves parameters uninitialised
outside what the user allowed is an error.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunelab.errors import CheckpointError, ConfigError, did_you_mean
from tunelab.io import atomic_write, verify_beside_manifest
from tunelab.paths import resolve_path

# ---------------------------------------------------------------------------------------------------------
# Step 2: initialisation
# ---------------------------------------------------------------------------------------------------------

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Embedding)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _normal(w: torch.Tensor, mean: float = 0.0, std: float = 0.02) -> None:
    nn.init.normal_(w, mean, std)


def _trunc_normal(w: torch.Tensor, mean: float = 0.0, std: float = 0.02, a: float = -2.0, b: float = 2.0):
    # a, b are in units of std, as in timm's trunc_normal_ usage
    nn.init.trunc_normal_(w, mean, std, a=mean + a * std, b=mean + b * std)


def _xavier_uniform(w: torch.Tensor, gain: float = 1.0) -> None:
    nn.init.xavier_uniform_(w, gain)


def _xavier_normal(w: torch.Tensor, gain: float = 1.0) -> None:
    nn.init.xavier_normal_(w, gain)


def _kaiming_uniform(w: torch.Tensor, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "relu"):
    nn.init.kaiming_uniform_(w, a=a, mode=mode, nonlinearity=nonlinearity)


def _kaiming_normal(w: torch.Tensor, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "relu"):
    nn.init.kaiming_normal_(w, a=a, mode=mode, nonlinearity=nonlinearity)


def _zeros(w: torch.Tensor) -> None:
    nn.init.zeros_(w)


def _constant(w: torch.Tensor, value: float = 0.0) -> None:
    nn.init.constant_(w, value)


INIT_SCHEMES = {
    "normal": _normal,
    "trunc_normal": _trunc_normal,
    "xavier_uniform": _xavier_uniform,
    "xavier_normal": _xavier_normal,
    "kaiming_uniform": _kaiming_uniform,
    "kaiming_normal": _kaiming_normal,
    "zeros": _zeros,
    "constant": _constant,
}


def init_weights(
    model: nn.Module,
    scheme: str,
    *,
    bias: str | float = "zeros",
    modules: Iterable[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Initialise every Linear/Conv/Embedding weight of `model` with `scheme` (see INIT_SCHEMES), biases
    with zeros (or a constant), and norm layers to weight 1 / bias 0.

    `modules`: glob patterns of module names to touch (default: all). Extra kwargs go to the scheme,
    e.g. `init_weights(model, "normal", std=0.01)`. Modules may define `tunelab_init(scheme, **kw)` to
    override (the GPT uses it for GPT-2's scaled residual init).
    """
    if scheme not in INIT_SCHEMES and scheme != "gpt2":
        raise ConfigError(f"`init.scheme` = {scheme!r} is unknown{did_you_mean(scheme, INIT_SCHEMES)}; "
                          f"choose from {', '.join(INIT_SCHEMES)}")
    if hasattr(model, "tunelab_init") and scheme == "gpt2":
        model.tunelab_init(scheme, **kwargs)
        return model
    fn = INIT_SCHEMES.get(scheme)
    if fn is None:
        raise ConfigError(f"`init.scheme` = {scheme!r} needs a model that defines tunelab_init (e.g. `gpt`)")
    from tunelab.config import check_kwargs

    check_kwargs(fn, kwargs, "init", internal=("w",))  # w: the tensor, passed by init_weights
    patterns = list(modules) if modules else None
    for name, module in model.named_modules():
        if patterns and not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        if isinstance(module, _WEIGHTED):
            fn(module.weight, **kwargs)
            if getattr(module, "bias", None) is not None:
                if bias == "zeros":
                    nn.init.zeros_(module.bias)
                else:
                    nn.init.constant_(module.bias, float(bias))
        elif isinstance(module, _NORMS) and getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# ---------------------------------------------------------------------------------------------------------
# Safe tensor-file I/O
# ---------------------------------------------------------------------------------------------------------


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None):
    """Atomically write a safetensors file. Tied tensors are stored once per name (cloned) so that the file
    loads into any model without knowing the ties."""
    path = Path(path)
    seen: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        t = v.detach()
        if ptr in seen and ptr != -1:
            t = t.clone()
        seen.setdefault(ptr, k)
        tensors[k] = t.contiguous().cpu()
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_exact_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path, hint: str) -> None:
    """`model.load_state_dict(state)` (strict), with a mismatch (a missing, extra or reshaped tensor: weights
    from another model, or edited ones) raised as one line naming `source`, its first mismatch and `hint`."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = (lines[1] if len(lines) > 1 else lines[0] if lines else "mismatch")[:200]
        raise CheckpointError(f"{source}: the weights do not fit the model ({first}); {hint}") from e


def load_state_dict_file(path: str | Path, verified: bool = False) -> dict[str, torch.Tensor]:
    """Read `.safetensors`, or `.pt/.pth/.bin` with `weights_only=True` (no arbitrary unpickling). A file
    inside a folder tunelab wrote (final/, best/, a checkpoint) is checked against that folder's manifest
    (`verified`: the caller has just checked the whole folder)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not verified:
        verify_beside_manifest(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends: refuse, never fall back to full unpickling
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: it is not a plain tensor checkpoint ({first[:200]}); "
            "only weights-only files are read (re-save it as a state dict or safetensors)"
        ) from e
    return _unwrap_state(obj, path)


def _unwrap_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside common checkpoint layouts: {'state_dict': ...}, {'model': ...}, ..."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            for key in ("state_dict", "model_state_dict", "model", "module", "ema", "weights"):
                if key in obj and isinstance(obj[key], dict):
                    obj = obj[key]
                    break
            else:
                tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
                if tensors:
                    return tensors
                break
        else:
            break
    raise CheckpointError(f"{path}: no tensors found (expected a state dict, or one under 'state_dict'/'model')")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file, a tunelab run/final folder, or a sharded folder with an index json."""
    path = resolve_path(path)
    if path.is_dir():
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = path / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError) as e:
                    raise CheckpointError(f"{index}: not a valid shard index (needs `weight_map`)") from e
                state: dict[str, torch.Tensor] = {}
                for shard in sorted(set(weight_map.values())):
                    state.update(load_state_dict_file(path / shard))
                return state
        for name in ("model.safetensors", "pytorch_model.bin", "model.pt"):
            if (path / name).is_file():
                return load_state_dict_file(path / name)
        for sub in ("final", "best"):
            if (path / sub / "model.safetensors").is_file():
                return load_state_dict_file(path / sub / "model.safetensors")
        raise CheckpointError(f"{path}: folder has no model.safetensors, pytorch_model.bin or shard index")
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    return load_state_dict_file(path)


# ---------------------------------------------------------------------------------------------------------
# Step 3: load pretrained weights with a report
# ---------------------------------------------------------------------------------------------------------

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not filled by the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, ckpt, model
    renamed: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched

    def uninitialised(self, allow_missing: list[str] | tuple[str, ...] = ()) -> list[str]:
        """Model tensors the load leaves as they were (missing or shape-mismatched), minus the allowed globs:
        what a strict load refuses."""
        return [k for k in self.missing + [m[0] for m in self.mismatched]
                if not any(fnmatch.fnmatch(k, p) for p in allow_missing)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "loaded": len(self.loaded),
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mismatched": [{"key": k, "checkpoint": list(a), "model": list(b)} for k, a, b in self.mismatched],
        }

    def table(self, limit: int = 12) -> str:
        """A plain-text table for the console."""
        lines = [f"Loaded pretrained weights from {self.source}",
                 f"  {'loaded':<22}{len(self.loaded):>6} tensors"]

        def block(title: str, items: list[str]) -> None:
            lines.append(f"  {title:<22}{len(items):>6}")
            for it in items[:limit]:
                lines.append(f"      {it}")
            if len(items) > limit:
                lines.append(f"      ... and {len(items) - limit} more")

        block("shape-mismatched", [f"{k}: checkpoint {list(a)} vs model {list(b)} (skipped)"
                                   for k, a, b in self.mismatched])
        block("missing in checkpoint", self.missing)
        block("unexpected (ignored)", self.unexpected)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _clean_key(key: str, rename: list[tuple[re.Pattern, str]]) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
        key = key.replace("._orig_mod.", ".").replace(".module.", ".") if "._orig_mod." in key else key
    for pattern, repl in rename:
        key = pattern.sub(repl, key)
    return key


def match_checkpoint(
    own: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    source: str,
    *,
    allow_missing: Iterable[str] = (),
    rename: dict[str, str] | None = None,
    strict: bool = True,
) -> tuple[LoadReport, dict[str, str]]:
    """Account for every key of a checkpoint (`found`: key -> shape) against a model (`own`: key -> shape):
    the LoadReport and which checkpoint key fills each model key. Raises when nothing matches, or (strict)
    when a model tensor outside `allow_missing` would stay uninitialised. Shapes only: the FSDP loader
    reads just each rank's rows afterwards."""
    rules = []
    for pattern, repl in (rename or {}).items():
        try:
            rules.append((re.compile(pattern), repl))
        except re.error as e:
            raise ConfigError(f"`pretrained.rename`: {pattern!r} is not a valid regex ({e})") from e
    report = LoadReport(source=source)
    fills: dict[str, str] = {}
    for key, shape in found.items():
        new_key = _clean_key(key, rules)
        report.renamed += new_key != key
        if new_key not in own:
            report.unexpected.append(new_key)
        elif tuple(own[new_key]) != tuple(shape):
            report.mismatched.append((new_key, tuple(shape), tuple(own[new_key])))
        else:
            fills[new_key] = key
    report.loaded = sorted(fills)
    # non-persistent-free state (e.g. BatchNorm's num_batches_tracked) counts like parameters
    report.missing = [k for k in own if k not in fills and not any(k == m[0] for m in report.mismatched)]
    if not fills:
        raise CheckpointError(
            f"{source}: no checkpoint key matches the model (checkpoint has e.g. {', '.join(list(found)[:3])}; "
            f"model has e.g. {', '.join(list(own)[:3])}); add `pretrained.rename` rules or check the file"
        )
    left = report.uninitialised(list(allow_missing)) if strict else []
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise CheckpointError(
            f"{source}: {len(left)} model tensors would stay uninitialised: {', '.join(left[:3])}{more}; "
            f"allow them with `pretrained.allow_missing` (e.g. [\"{left[0].split('.')[0]}.*\"]) "
            f"or fix the checkpoint"
        )
    return report, fills


def load_pretrained(
    model: nn.Module,
    path: str | Path | dict[str, torch.Tensor],
    *,
    allow_missing: Iterable[str] = (),
    rename: dict[str, str] | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load weights into `model` and account for every key.

    - reads `.safetensors`, `.pt/.pth/.bin` (weights only), sharded folders with an index json, and run
      folders; unwraps `state_dict`/`model` nesting; strips `module.` / `_orig_mod.` prefixes;
    - `rename`: regex -> replacement rules applied to checkpoint keys, in order;
    - tensors whose shape differs from the model's are skipped and reported with both shapes;
    - `strict`: error when a model parameter is left missing (or skipped) unless it matches a glob in
      `allow_missing`. A load that matches no key at all is always an error.
    """
    source = "<state dict>" if isinstance(path, dict) else str(path)
    state = dict(path) if isinstance(path, dict) else read_checkpoint(path)
    own = unwrap_model(model).state_dict()
    report, fills = match_checkpoint({k: tuple(v.shape) for k, v in own.items()},
                                     {k: tuple(v.shape) for k, v in state.items()}, source,
                                     allow_missing=allow_missing, rename=rename, strict=strict)
    with torch.no_grad():
        for k, src in fills.items():
            own[k].copy_(state[src].to(own[k].dtype))
    return report


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files a checkpoint path stands for (a file, a folder with model.safetensors or a
    shard index, a run folder's final/): what the shard-by-shard loader reads."""
    path = resolve_path(path)
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for cand in (path / "model.safetensors", path / "final" / "model.safetensors"):
        if cand.is_file():
            return [cand]
    raise CheckpointError(f"{path}: no safetensors weights to load shard by shard (model.safetensors or an index)")


def describe_checkpoint(path: str | Path) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every tensor in a checkpoint, without building a model."""
    state = read_checkpoint(path)
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts, tied parameters counted once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.1f}T" if not math.isnan(n) else "nan"
