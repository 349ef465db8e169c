"""LoRA (and QLoRA where bitsandbytes and CUDA exist) with peft.

`strategy: {name: lora, r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}`
QLoRA: add `model.quantize: 4bit` (the base loads in NF4; only on CUDA with bitsandbytes, else a clear error).

The base weights freeze; low-rank adapters train. `target_modules` is peft's: `all-linear`, a list of
module-name suffixes (`[q_proj, v_proj]`) or a regex. A run's final/ folder then holds only the adapter
(PEFT format) and points at the base model, see tunelab.models.llm.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from tunelab.errors import ConfigError
from tunelab.registry import STRATEGIES
from tunelab.strategies import Strategy, head_patterns


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the Linear layers (what `target_modules` can name)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names)


@STRATEGIES.register("lora")
class LoRA(Strategy):
    """Low-rank adapters on the named modules; everything else frozen."""

    name = "lora"
    checkpoint_trainable_only = True  # checkpoints hold the adapters; the base is rebuilt on resume

    def __init__(
        self,
        r: int = 16,
        alpha: float = 32,
        dropout: float = 0.05,
        target_modules: str | list[str] = "all-linear",
        modules_to_save: list[str] | None = None,
        bias: str = "none",
        use_rslora: bool = False,
    ):
        if r <= 0:
            raise ConfigError(f"`strategy.r` = {r} must be a positive rank, e.g. 8 or 16")
        if not 0 <= dropout < 1:
            raise ConfigError(f"`strategy.dropout` = {dropout} must be in [0, 1)")
        if bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"`strategy.bias` = {bias!r} is invalid; use none, all or lora_only")
        self.r, self.alpha, self.dropout, self.bias = r, alpha, dropout, bias
        self.target_modules, self.modules_to_save = target_modules, modules_to_save
        self.use_rslora = use_rslora

    def lora_config(self, task_type: str | None = None) -> Any:
        """The peft LoraConfig (CAUSAL_LM task type for generative models, so the adapter saves as such)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            bias=self.bias,
            use_rslora=self.use_rslora,
            task_type=task_type,
        )

    def setup(self, model: nn.Module) -> tuple[nn.Module, dict[str, float] | None]:
        from peft import PeftModel, get_peft_model

        if isinstance(model, PeftModel):  # e.g. a LoRA run's final/ folder loaded again: train its adapter
            for n, p in model.named_parameters():
                p.requires_grad_("lora_" in n)
            return model, None
        if getattr(model, "is_loaded_in_4bit", False):  # QLoRA: model.quantize: 4bit (CUDA + bitsandbytes)
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        task_type = "CAUSAL_LM" if hasattr(model, "generate") and hasattr(model, "config") else None
        config = self.lora_config(task_type)
        if task_type is None:
            # A classifier or any other model: its head (new, task-specific) trains in full and is saved with
            # the adapters (peft's modules_to_save, as task_type SEQ_CLS does for `classifier`/`score`).
            heads = [p[: -len(".*")] for p in head_patterns(model, None) if p.endswith(".*")]
            present = {n for n, _ in model.named_modules()}
            named = set(self.target_modules) if isinstance(self.target_modules, (list, tuple)) else set()
            # a head the recipe itself targets with LoRA stays an adapter target
            heads = [h for h in heads if h in present and h not in named and h.rsplit(".", 1)[-1] not in named]
            if heads:
                config.modules_to_save = list(dict.fromkeys((self.modules_to_save or []) + heads))
                config.exclude_modules = heads
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as e:  # peft's NoMatchingPeftModuleError is a ValueError
            if type(e).__name__ == "NoMatchingPeftModuleError" or "not found in the base model" in str(e) \
                    or "Target modules" in str(e):
                raise ConfigError(
                    f"`strategy.target_modules` = {self.target_modules!r} matches no module; "
                    f"Linear modules here: {', '.join(linear_module_names(model))} (or use all-linear)"
                ) from e
            raise
        return peft_model, None

    def model_to_save(self, model: nn.Module, keeps_adapters: bool) -> nn.Module:
        """A model whose folder format has no adapters (a classifier, a CNN) is saved merged: a plain folder
        every tool loads; the training model keeps its adapters."""
        if keeps_adapters or not hasattr(model, "peft_config"):
            return model
        import copy

        from tunelab.weights import unwrap_model

        return merge_lora(copy.deepcopy(unwrap_model(model)))

    def describe(self, model: nn.Module) -> dict[str, Any]:
        out = super().describe(model)
        out.update(r=self.r, alpha=self.alpha, target_modules=self.target_modules)
        return out


def merge_lora(model: Any) -> Any:
    """peft's `merge_and_unload`, rounded once: W + scale * B @ A is computed in float64 and cast to W's
    dtype (peft rounds the delta to W's dtype first, then the sum). Other adapter kinds use peft's merge."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLinear):
                continue
            base = module.get_base_layer()
            for name in module.active_adapters:
                if name not in module.lora_A:
                    continue
                if getattr(module, "lora_variant", {}).get(name) is not None or module.use_dora.get(name):
                    module.merge(adapter_names=[name])
                    continue
                module.lora_A[name].double()
                module.lora_B[name].double()
                delta = module.get_delta_weight(name).double()
                base.weight.data = (base.weight.data.double() + delta).to(base.weight.dtype)
                if module.lora_bias.get(name, False) and base.bias is not None:
                    base.bias.data += module.lora_B[name].bias.to(base.bias.dtype)
    return model.unload()
