"""bench/repeats.py: the sides' medians over round-robin repeats and each ratio as the median of the
per-repeat ratios (not the ratio of the medians), every run kept."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))  # as `python bench/sft.py` has it

from repeats import run_in_scratch, summarize  # noqa: E402

FIGURES = {"speedup": lambda r: r["ours"]["tok_s"] / r["peer"]["tok_s"],
           "loss_delta": lambda r: r["ours"]["loss"] - r["peer"]["loss"],
           "vs_tuned": lambda r: r["ours"]["tok_s"] / r["tuned"]["tok_s"]}


def test_medians_per_side_and_per_repeat_ratios():
    # machine load changes between repeats: repeat 1 is slow for both sides
    repeats = [{"peer": {"tok_s": 100.0, "loss": 2.0, "malloc": "glibc"}, "ours": {"tok_s": 120.0, "loss": 1.9}},
               {"peer": {"tok_s": 50.0, "loss": 2.2, "malloc": "glibc"}, "ours": {"tok_s": 65.0, "loss": 2.0}},
               {"peer": {"tok_s": 110.0, "loss": 2.1, "malloc": "glibc"}, "ours": {"tok_s": 121.0, "loss": 1.8}}]
    final = summarize(repeats, FIGURES)
    assert final["peer"] == {"tok_s": 100.0, "loss": 2.1, "malloc": "glibc"}
    assert final["ours"]["tok_s"] == 120.0 and final["ours"]["loss"] == 1.9
    # per-repeat ratios 1.2, 1.3, 1.1 -> 1.2 (the ratio of the medians would also be 1.2 here; the deltas differ)
    assert [r["speedup"] for r in final["repeats"]] == [1.2, 1.3, 1.1] and final["speedup"] == 1.2
    assert [r["loss_delta"] for r in final["repeats"]] == [-0.1, -0.2, -0.3] and final["loss_delta"] == -0.2
    assert "vs_tuned" not in final  # the tuned side did not run


def test_ratio_is_the_median_of_paired_ratios_not_of_medians():
    repeats = [{"peer": {"tok_s": 100.0}, "ours": {"tok_s": 150.0}},
               {"peer": {"tok_s": 60.0}, "ours": {"tok_s": 66.0}},
               {"peer": {"tok_s": 200.0}, "ours": {"tok_s": 210.0}}]
    final = summarize(repeats, FIGURES)
    assert final["speedup"] == 1.1  # paired ratios 1.5, 1.1, 1.05 -> 1.1; medians 150/100 would say 1.5


def test_a_side_leaves_nothing_in_the_temporary_folder(tmp_path):
    # a side writes its run folder (and the peer its output_dir) under tempfile's folder: a day of benchmarks
    # once left gigabytes in /tmp and filled the disk; run_in_scratch points TMPDIR at a folder it removes
    child = ("import json, os, tempfile; d = tempfile.mkdtemp(); open(os.path.join(d, 'ckpt.bin'), 'wb').write(b'x' * 1000);"
             " print(json.dumps({'dir': d, 'tmp': tempfile.gettempdir()}))")
    proc = run_in_scratch([sys.executable, "-c", child], {**os.environ, "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    scratch = Path(out["tmp"])
    assert scratch.parent == tmp_path and Path(out["dir"]).parent == scratch  # the side wrote in the scratch folder
    assert not scratch.exists() and list(tmp_path.iterdir()) == []  # and it is gone, with what the side left


def test_removing_the_scratch_folder_does_not_follow_links_out_of_it(tmp_path):
    # whatever a side leaves is removed, but a link it leaves to a folder elsewhere must not take that folder with it
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("kept")
    child = f"import os, tempfile; os.symlink({str(outside)!r}, os.path.join(tempfile.gettempdir(), 'link'))"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = run_in_scratch([sys.executable, "-c", child], {**os.environ, "TMPDIR": str(tmpdir)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert list(tmpdir.iterdir()) == []  # the scratch folder and the link are gone
    assert (outside / "keep.txt").read_text() == "kept"  # the folder it pointed at is not
