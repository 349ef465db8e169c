"""Vision backbones from torchvision and timm, with the classifier head replaced for `num_classes`.

`create_model("torchvision:resnet18", num_classes=2, weights="DEFAULT")` builds the library's model (with
its pretrained weights when `weights` names them, which needs a network or a warm torch hub cache), swaps
the last linear layer for a fresh `num_classes` one and records the head's parameter names in
`model.tunelab_head_patterns`, so strategies know what to train first and `load_pretrained` can skip it.

`backbone_preset(name)` gives the eval transform the backbone was trained with (resize, crop, mean, std);
the image data sources build their transforms from it (asking through the registry's `model_hint`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tunelab.errors import ConfigError, TunelabError, did_you_mean
from tunelab.models import register_model

NO_WEIGHTS = (None, False, "none", "None", "")


def backbone_preset(name: str) -> dict[str, Any] | None:
    """How backbone `name` (`torchvision:ARCH`, `timm:ARCH`) expects its images: `crop_size`,
    `resize_size`, `mean`, `std`, `interpolation` (None when the source does not say).

    Taken from the weights' metadata even when the model is built without weights, so a checkpoint loaded
    later through `pretrained.path` sees the normalisation it was trained with. Needs no network."""
    source, _, arch = name.partition(":")
    if source == "torchvision" and arch:
        import torchvision.models as tvm

        try:
            t = tvm.get_model_weights(arch).DEFAULT.transforms()
        except (ValueError, KeyError, AttributeError):
            return None
        return {"crop_size": int(t.crop_size[0]), "resize_size": int(t.resize_size[0]), "mean": tuple(t.mean),
                "std": tuple(t.std), "interpolation": str(t.interpolation.value)}
    if source == "timm" and arch:
        try:
            import timm
        except ImportError:
            return None
        cfg = timm.get_pretrained_cfg(arch)
        if cfg is None:
            return None
        crop = int(cfg.input_size[-1])
        return {"crop_size": crop, "resize_size": int(round(crop / (cfg.crop_pct or 0.875))), "mean": tuple(cfg.mean),
                "std": tuple(cfg.std), "interpolation": str(cfg.interpolation or "bilinear")}
    return None


def vision_hints(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What the image data sources ask the model source (through the registry): its preset."""
    return {"image_preset": backbone_preset(name)}


# -- head replacement ------------------------------------------------------------------------------------
def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier: the last `nn.Linear` registered in the model (`fc`, `classifier.1`, `heads.head`)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no linear classifier head to replace; "
            "pick an architecture with a linear head or build it without `num_classes`"
        )
    return found[-1]


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Swap the classifier for a fresh `Linear(in_features, num_classes)`; returns its module name."""
    name, old = find_head(model)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)
    return name


def _to_channels_last(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def is_convnet(model: nn.Module) -> bool:
    """More than one 2-d convolution: a CNN (a ViT's single patch-embedding conv does not count)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def use_channels_last(model: nn.Module, channels_last: bool | None = True) -> nn.Module:
    """NHWC weights and inputs: faster convolutions on tensor-core GPUs and with oneDNN on CPU (a
    ResNet-18 training step at 112 px, batch 16: 4-12% less time on this project's 2-core CPU, docs/vision.md).
    `None` (the builders' default): on for convolutional networks, off otherwise. FSDP2 needs contiguous
    parameters, so the sharded engine turns the weights back (engine/fsdp.py); the outputs are the same."""
    if channels_last is None:
        channels_last = is_convnet(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        model.register_forward_pre_hook(_to_channels_last)
    return model


def _check_num_classes(num_classes: int | None, where: str) -> None:
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ConfigError(
            f"`model.num_classes` = {num_classes!r} for {where} is invalid: need an integer >= 1"
        )


# -- torchvision -----------------------------------------------------------------------------------------
def _torchvision_weights(arch: str, weights: Any) -> Any:
    """The weights enum member named by `weights` (`DEFAULT`, `IMAGENET1K_V1`, `ResNet18_Weights.X`)."""
    import torchvision.models as tvm

    if weights in NO_WEIGHTS:
        return None
    enum = tvm.get_model_weights(arch)
    key = "DEFAULT" if weights is True else str(weights).rpartition(".")[2]
    names = list(dict.fromkeys(["DEFAULT", *enum.__members__]))
    if key not in names:
        raise ConfigError(
            f"`model.weights` = {weights!r} is not a weight set of torchvision:{arch}{did_you_mean(key, names)}; "
            f"choose one of {', '.join(names)} or null"
        )
    return enum[key]


@register_model("torchvision", hints=vision_hints)
def torchvision_model(
    arch: str,
    num_classes: int | None = None,
    weights: str | bool | None = None,
    channels_last: bool | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A torchvision classifier by name; `weights` picks the library's pretrained set (None: random).

    Extra keyword arguments go to the torchvision builder (e.g. `dropout` for EfficientNet)."""
    import torchvision.models as tvm

    where = f"torchvision:{arch}"
    if arch not in tvm.list_models():
        raise ConfigError(
            f"model `{where}`: unknown torchvision architecture{did_you_mean(arch, tvm.list_models())}"
        )
    _check_num_classes(num_classes, where)
    weight_set = _torchvision_weights(arch, weights)
    try:
        model = tvm.get_model(arch, weights=weight_set, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model `{where}`: bad builder argument ({e})") from e
    except OSError as e:  # urllib errors: no network and no cached file
        raise TunelabError(
            f"model `{where}`: cannot fetch weights {weight_set} ({e}); offline, put the file in "
            "~/.cache/torch/hub/checkpoints/ or set model.weights=null and pretrained.path=FILE"
        ) from e
    head = find_head(model)[0]
    if num_classes is not None and model.get_submodule(head).out_features != num_classes:
        head = replace_head(model, num_classes)
    model.tunelab_head_patterns = [f"{head}.*"]
    return use_channels_last(model, channels_last)


# -- timm ------------------------------------------------------------------------------------------------
@register_model("timm", hints=vision_hints)
def timm_model(
    arch: str,
    num_classes: int | None = None,
    weights: str | bool | None = None,
    channels_last: bool | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm model by name (`timm:convnext_tiny`, `timm:resnet50.a1_in1k`); timm resets the head itself."""
    try:
        import timm
    except ImportError as e:
        raise TunelabError(f"model `timm:{arch}` needs timm: pip install 'tunelab[timm]'") from e
    where = f"timm:{arch}"
    if not timm.is_model(arch):
        known = timm.list_models()
        raise ConfigError(f"model `{where}`: unknown timm architecture{did_you_mean(arch, known)}")
    _check_num_classes(num_classes, where)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(arch, pretrained=weights not in NO_WEIGHTS, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model `{where}`: bad builder argument ({e})") from e
    except OSError as e:
        raise TunelabError(
            f"model `{where}`: cannot fetch pretrained weights ({e}); offline, set model.weights=null "
            "and pretrained.path=FILE"
        ) from e
    classifier = model.pretrained_cfg.get("classifier") or find_head(model)[0]
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    model.tunelab_head_patterns = [f"{n}.*" for n in names]
    return use_channels_last(model, channels_last)
