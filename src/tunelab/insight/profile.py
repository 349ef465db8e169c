"""`tunelab train CONFIG --profile`: a torch.profiler trace of a few training steps, written into the run.

The profiler waits one step (start-up, compilation), warms up for one, records `steps` optimizer steps, and
writes `RUN_DIR/profile/trace.json` (open it in https://ui.perfetto.dev or chrome://tracing) and
`RUN_DIR/profile/ops.txt` (the operators that took the most time, torch's own table). Rank 0 only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunelab.callbacks import Callback


class ProfileSteps(Callback):
    """Record `steps` optimizer steps after `wait` + `warmup` ones; the trace path goes into summary.json."""

    def __init__(self, steps: int = 3, wait: int = 1, warmup: int = 1):
        self.steps, self.wait, self.warmup = steps, wait, warmup
        self.prof: torch.profiler.profile | None = None
        self.written: Path | None = None

    def on_fit_start(self, trainer: Any) -> None:
        if not trainer.is_main or trainer.output_dir is None:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        folder = Path(trainer.output_dir) / "profile"

        def write(prof: profile) -> None:
            folder.mkdir(exist_ok=True)
            prof.export_chrome_trace(str(folder / "trace.json"))
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            (folder / "ops.txt").write_text(table + "\n")
            self.written = folder / "trace.json"

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
        self.prof = profile(activities=activities, on_trace_ready=write,
                            schedule=schedule(wait=self.wait, warmup=self.warmup, active=self.steps, repeat=1))
        self.prof.start()

    def on_optimizer_step(self, trainer: Any) -> None:
        if self.prof is not None:
            self.prof.step()

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
        if self.written is not None:
            summary["profile"] = str(self.written)
