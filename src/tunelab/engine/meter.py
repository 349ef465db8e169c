"""Throughput: what each logged window of steps and the whole run did per second, and model FLOP/s.

`Meter` is the loop's collaborator that turns step results into the `train` log fields (loss averaged over
the window's targets, samples/s, tokens/s, step time, the share of it spent waiting for data) and the run
totals of summary.json, with the share of wall time each phase took (`time_breakdown`: data wait,
forward+backward, optimizer, eval, checkpoints; the rest is start-up, logging and callbacks), which answers
"is my run slow because of data, compute or checkpoints?". `FlopsCallback` adds achieved TFLOP/s and MFU for runs over fixed-length token
windows (the run attaches it when the data says `tokens_per_sample`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from tunelab.callbacks import Callback

PHASES = ("data", "forward_backward", "optimizer", "eval", "checkpoint")
_EMPTY = {"loss": 0.0, "targets": 0.0, "samples": 0, "tokens": 0, "time": 0.0, "data": 0.0, "steps": 0}


class Meter:
    """Sums per step; `window_fields()` averages since the last log and starts a new window."""

    def __init__(self, window: dict[str, Any] | None = None):
        self.window = dict(window or _EMPTY)  # a resumed run continues the window its checkpoint held
        self.train_time, self.samples, self.tokens, self.has_tokens = 0.0, 0, 0, False
        self.phases = dict.fromkeys(PHASES, 0.0)  # seconds in this process

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the block's wall time to `phase`. On a GPU, kernels run asynchronously: time spent waiting
        for them lands in the phase that waits (the totals are right, the split approximate)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] += time.perf_counter() - t0

    def breakdown(self, wall_s: float) -> dict[str, float]:
        """Each phase's share of `wall_s`, and `other` for the rest."""
        shares = {k: v / wall_s for k, v in self.phases.items()} if wall_s > 0 else dict.fromkeys(PHASES, 0.0)
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))
        return shares

    def add(self, loss_sum: float, targets: float, samples: int, tokens: int | None, step_s: float,
            data_s: float) -> None:
        w = self.window
        w["loss"] += loss_sum
        w["targets"] += targets
        w["samples"] += samples
        w["tokens"] += tokens or 0
        w["time"] += step_s
        w["data"] += data_s
        w["steps"] += 1
        self.phases["data"] += data_s
        self.train_time += step_s
        self.samples += samples
        self.tokens += tokens or 0
        self.has_tokens = self.has_tokens or tokens is not None

    def window_fields(self) -> dict[str, Any] | None:
        """The `train` log fields of the window since the last log (None when it is empty)."""
        w = self.window
        if not w["steps"]:
            return None
        fields = {
            "loss": w["loss"] / max(w["targets"], 1e-12),
            "samples_per_s": w["samples"] / max(w["time"], 1e-9),
            "step_time_s": w["time"] / w["steps"],
            "data_wait_frac": w["data"] / max(w["time"], 1e-9),
        }
        if self.has_tokens:
            fields["tokens_per_s"] = w["tokens"] / max(w["time"], 1e-9)
        self.window = dict(_EMPTY)
        return fields

    def totals(self) -> dict[str, Any]:
        """summary.json's throughput over the steps this process trained (every rank's examples and tokens)."""
        t = self.train_time
        return {
            "train_samples_per_s": self.samples / t if t else None,
            "train_tokens_per_s": self.tokens / t if (self.has_tokens and t) else None,
        }


def format_breakdown(shares: dict[str, float]) -> str:
    """`time_breakdown` as one line: "data 1%, forward+backward 85%, ..." in the loop's order."""
    names = {"forward_backward": "forward+backward"}
    return ", ".join(f"{names.get(k, k)} {100 * v:.0f}%" for k, v in shares.items())


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


def device_matmul_flops(device: torch.device, size: int = 1024, reps: int = 3) -> float:
    """Measured fp32 matmul FLOP/s on the device (an optimistic rate for a training step)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * reps / max(time.perf_counter() - t0, 1e-9)


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """The model's own `flops_per_token(seq_len)` (the native GPT), else 6 x trainable parameters."""
    fn = getattr(model, "flops_per_token", None)
    if callable(fn):
        return float(fn(seq_len))
    return 6.0 * sum(p.numel() for p in model.parameters() if p.requires_grad)


class FlopsCallback(Callback):
    """Adds `tflops` (achieved, per device) and `mfu` (when the peak is known: the table above or
    `TUNELAB_PEAK_FLOPS`, e.g. 989e12) to the periodic train logs and to summary.json."""

    def __init__(self, tokens_per_sample: int):
        self.seq_len = tokens_per_sample
        self.flops_per_token = 0.0
        self.peak: float | None = None
        self.devices = 1

    def on_fit_start(self, trainer: Any) -> None:
        self.flops_per_token = model_flops_per_token(trainer.raw_model, self.seq_len)
        self.peak = peak_flops(trainer.device)
        self.devices = trainer.dist.world_size  # the logged tokens/s counts every rank's tokens

    def _add(self, fields: dict[str, Any], tokens_per_s: float | None) -> None:
        if not tokens_per_s or not self.flops_per_token:
            return
        achieved = tokens_per_s * self.flops_per_token / self.devices
        fields["tflops"] = achieved / 1e12
        if self.peak:
            fields["mfu"] = achieved / self.peak

    def on_step_end(self, trainer: Any, logs: dict[str, Any]) -> None:
        self._add(logs, logs.get("tokens_per_s"))

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        self._add(summary, summary.get("train_tokens_per_s"))
        if summary.get("tflops") and trainer.device.type == "cpu":
            # no published peak for a CPU: this machine's measured fp32 matmul rate (an optimistic bound)
            summary["matmul_peak_tflops"] = device_matmul_flops(trainer.device) / 1e12
            summary["flops_frac_of_matmul_peak"] = summary["tflops"] / summary["matmul_peak_tflops"]
