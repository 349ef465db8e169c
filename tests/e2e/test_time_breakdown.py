"""Where the time goes: every run's summary, console and report give the share of wall time per phase, and
`--profile` writes a torch.profiler trace of a few steps into the run folder."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli


def test_time_breakdown_and_profile_on_the_digits_recipe(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "recipes/digits-cnn.yaml", f"output.dir={out}", "train.max_steps=12",
                   "train.checkpoint_every=6", "--profile", "2")
    summary = json.loads((out / "summary.json").read_text())
    shares = summary["time_breakdown"]
    assert set(shares) == {"data", "forward_backward", "optimizer", "eval", "checkpoint", "other"}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6) and min(shares.values()) >= 0
    assert shares["forward_backward"] > shares["optimizer"] > 0  # a CNN's step is its convolutions
    assert shares["eval"] > 0 and shares["checkpoint"] > 0  # the final eval, checkpoints at 6 and 12
    assert "time: data " in proc.stderr and "forward+backward" in proc.stderr
    trace = json.loads((out / "profile" / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert sum(n.startswith("ProfilerStep#") for n in names) == 2  # the two recorded steps
    assert any("convolution" in n for n in names)
    assert "Self CPU" in (out / "profile" / "ops.txt").read_text()
    assert summary["profile"] == str(out / "profile" / "trace.json")
    assert "where the time went" in (out / "report.html").read_text()
