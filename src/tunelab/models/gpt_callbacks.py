"""Model FLOPs utilisation (MFU) during training: achieved FLOP/s over the accelerator's peak.

Attached by the `tokens` data source (DataBundle.callbacks), so every GPT pretraining run logs, with each
`train` line of metrics.jsonl, `tflops` (achieved, per device) and `mfu` (when the peak is known: a
table of bf16 dense peaks for common GPUs, or `TUNELAB_PEAK_FLOPS`, e.g. 989e12). The model's own
`flops_per_token(seq_len)` is used when it has one (the native GPT), else 6 x parameters.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from tunelab.engine.callbacks import Callback

# Dense bf16 tensor-core peaks (FLOP/s) by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s: `TUNELAB_PEAK_FLOPS` if set, else the table above for CUDA devices."""
    env = os.environ.get("TUNELAB_PEAK_FLOPS")
    if env:
        return float(env)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return None


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    fn = getattr(model, "flops_per_token", None)
    if callable(fn):
        return float(fn(seq_len))
    return 6.0 * sum(p.numel() for p in model.parameters() if p.requires_grad)


class FlopsCallback(Callback):
    """Adds `tflops` and `mfu` to the trainer's periodic train logs and to summary.json."""

    def __init__(self, tokens_per_sample: int):
        self.seq_len = tokens_per_sample
        self.flops_per_token = 0.0
        self.peak: float | None = None

    def on_fit_start(self, trainer: Any) -> None:
        self.flops_per_token = model_flops_per_token(trainer.raw_model, self.seq_len)
        self.peak = peak_flops(trainer.device)

    def _add(self, fields: dict[str, Any], tokens_per_s: float | None) -> None:
        if not tokens_per_s or not self.flops_per_token:
            return
        achieved = tokens_per_s * self.flops_per_token
        fields["tflops"] = achieved / 1e12
        if self.peak:
            fields["mfu"] = achieved / self.peak

    def on_step_end(self, trainer: Any, logs: dict[str, Any]) -> None:
        self._add(logs, logs.get("tokens_per_s"))

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        self._add(summary, summary.get("train_tokens_per_s"))
