"""What a run shows while it trains (`output.progress`): a live bar on a terminal, the notebook bar in
Jupyter, and elsewhere (a log file, nohup, CI, a pipe) one plain line per logging step and one per eval,
as the HF Trainer and Lightning print them. `off` prints nothing.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

MODES = ("auto", "bar", "lines", "off")


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"
    except AttributeError:
        return False


def _sized_terminal(stream: Any) -> bool:
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, AttributeError, ValueError):
        return False


def resolve_mode(mode: str | bool) -> str:
    """`auto`: a bar on a sized terminal or in a notebook, else lines."""
    if mode is True:
        mode = "auto"
    elif mode is False:
        mode = "off"
    if mode == "auto":
        return "bar" if _sized_terminal(sys.stderr) or _in_notebook() else "lines"
    return mode


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _metric(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """The loop tells it each step, each train log and each eval; it shows them as the mode says."""

    def __init__(self, mode: str | bool, total: int, initial: int, stream: Any = None):
        self.mode, self.total, self.stream = resolve_mode(mode), total, stream or sys.stderr
        self.start_step, self.t0 = initial, time.perf_counter()
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=self.stream)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def _eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        return _duration((time.perf_counter() - self.t0) / done * (self.total - step))

    def train(self, step: int, fields: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{fields['loss']:.4f}", lr=f"{fields['lr']:.2e}",
                                 sps=f"{fields['samples_per_s']:.0f}", refresh=False)
        elif self.mode == "lines":
            rate = f"{fields['samples_per_s']:.1f} samples/s"
            if "tokens_per_s" in fields:
                rate += f", {fields['tokens_per_s']:.0f} tokens/s"
            self._line(f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) | loss "
                       f"{fields['loss']:.4f} | lr {fields['lr']:.3g} | {rate} | ETA {self._eta(step)}")

    def eval(self, step: int, metrics: dict[str, Any]) -> None:
        if self.mode == "off":
            return
        shown = ", ".join(f"{k} {_metric(v)}" for k, v in metrics.items() if isinstance(v, (int, float)))
        self._line(f"eval at step {step}: {shown}")

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
