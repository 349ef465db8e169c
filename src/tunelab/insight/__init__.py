"""Training insight: the run doctor, the HTML report, the LR finder, the pre-flight plan, auto batch size.

`default_callbacks(cfg)` is what `tunelab.run` attaches to every CLI run: the doctor (unless
`doctor.enabled: false`) and the end-of-run report writer (unless `report.enabled: false`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.engine.callbacks import Callback


def default_callbacks(cfg: RunConfig) -> list[Callback]:
    """The doctor first (its diagnoses must be logged before the report reads them), the report last."""
    from tunelab.insight.doctor import Doctor, DoctorOptions, ReportWriter
    from tunelab.insight.report import ReportOptions

    callbacks: list[Callback] = []
    doctor = DoctorOptions.from_config(cfg)
    if doctor.enabled:
        callbacks.append(Doctor(doctor))
    report = ReportOptions.from_config(cfg)
    if report.enabled:
        callbacks.append(ReportWriter(report.dpi))
    return callbacks
