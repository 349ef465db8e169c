"""End-to-end CLI tests of the foundation on real data (digits, MNIST)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import REPO, assert_one_line_error, kill_once_written, run_cli, same_weights
from tunelab.errors import ConfigError

DIGITS = "recipes/digits-cnn.yaml"
QUIET = "output.progress=false"


def test_quickstart(tmp_path):
    out = tmp_path / "qs"
    proc = run_cli("quickstart", "--output", out)
    assert "before fine-tuning" in proc.stdout and f"run directory: {out}" in proc.stdout
    assert "fc.weight: checkpoint [5, 256] vs model [10, 256] (skipped)" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["metrics"]["accuracy"] >= 0.95
    for key in (
        "global_step",
        "epoch",
        "best",
        "train_samples_per_s",
        "train_tokens_per_s",
        "wall_s",
        "peak_rss_mb",
    ):
        assert key in summary
    assert summary["train_tokens_per_s"] is None and summary["best"]["metric"] == "accuracy"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "final/model.safetensors",
        "final/tunelab_model.json",
        "best/model.safetensors",
    ):
        assert (out / name).is_file(), name
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in e for e in events) and {"start", "train", "eval", "end"} <= {
        e["event"] for e in events
    }
    # the CLI re-executed itself on mimalloc (a core dependency on Linux; tunelab/allocator.py)
    start = next(e for e in events if e["event"] == "start")
    assert start["malloc"] == ("mimalloc" if sys.platform.startswith("linux") else "system")


def test_malloc_can_be_switched_off_and_preload_is_composed(tmp_path):
    from tunelab import allocator

    out = tmp_path / "sys"
    run_cli("train", DIGITS, f"output.dir={out}", "train.max_steps=2", QUIET,
            env={**os.environ, "TUNELAB_MALLOC": "system"})
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["malloc"] == "system"
    if sys.platform.startswith("linux"):
        env = allocator.preload_env({"LD_PRELOAD": "/x/libother.so"})
        assert env["LD_PRELOAD"] == f"{allocator.library()}:/x/libother.so"
        assert env["MIMALLOC_PURGE_DELAY"] == "10000"  # freed gradients stay mapped between steps
        mine = allocator.preload_env({"MIMALLOC_PURGE_DELAY": "-1"})
        assert mine["MIMALLOC_PURGE_DELAY"] == "-1"  # the user's own setting wins
        assert allocator.preload_env(env) is None  # already preloaded: no second re-exec
    assert allocator.preload_env({"TUNELAB_MALLOC": "system"}) is None


def test_eval_and_inspect(tmp_path):
    out = tmp_path / "run"
    run_cli("train", DIGITS, f"output.dir={out}", "train.max_steps=40", QUIET)
    proc = run_cli("eval", out)
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert metrics["accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
    best = json.loads(run_cli("eval", out, "--best").stdout)
    assert best["accuracy"] == pytest.approx(summary["best"]["value"])
    proc = run_cli("inspect", out / "final" / "model.safetensors", "--against", DIGITS, "model.num_classes=7")
    assert "fc.weight" in proc.stdout and "[10, 256]" in proc.stdout and "float32" in proc.stdout
    assert "fc.weight: checkpoint [10, 256] vs model [7, 256] (skipped)" in proc.stdout


def test_mnist_linear_recipe(tmp_path):
    out = tmp_path / "mnist"
    run_cli(
        "train",
        "recipes/mnist-linear.yaml",
        f"output.dir={out}",
        "train.epochs=2",
        QUIET,
        "data.path=" + str(REPO.parent / "shared" / "data" / "mnist"),
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epoch"] == 2 and summary["metrics"]["accuracy"] > 0.8


def _resume_overrides(out: Path) -> list[str]:
    return [
        f"output.dir={out}",
        "model.width=96",
        "model.dropout=0.2",
        "train.max_steps=60",
        "train.checkpoint_every=10",
        "train.keep_last=3",
        "eval.every=20",
        "train.log_every=5",
        QUIET,
    ]


def _events(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["event"], r["step"], r.get("loss")) for r in rows if r["event"] in ("train", "eval", "best")]


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_cli("train", DIGITS, *_resume_overrides(ref))
    kill_once_written(killed / "checkpoints" / "step-30", "train", DIGITS, *_resume_overrides(killed))
    assert not (killed / "final").exists()
    run_cli("train", DIGITS, *_resume_overrides(killed), "--resume")
    assert same_weights(ref / "final" / "model.safetensors", killed / "final" / "model.safetensors")
    assert same_weights(ref / "best" / "model.safetensors", killed / "best" / "model.safetensors")
    assert _events(ref) == _events(killed)  # metrics.jsonl was trimmed to the checkpoint and continued


def test_tampered_and_truncated_checkpoints_are_refused(tmp_path):
    out = tmp_path / "run"
    over = [
        f"output.dir={out}",
        "train.max_steps=30",
        "train.checkpoint_every=10",
        "train.keep_last=3",
        QUIET,
    ]
    run_cli("train", DIGITS, *over)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-10", "step-20", "step-30"]
    weights = ckpts / "step-30" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # tamper with one byte of a tensor
    weights.write_bytes(bytes(data))
    opt = ckpts / "step-20" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])  # truncate
    proc = run_cli("train", DIGITS, *over, "train.max_steps=40", "--resume")
    assert "step-30 refused" in proc.stderr and "sha256 does not match" in proc.stderr
    assert "step-20 refused" in proc.stderr and "resumed from" in proc.stderr and "step-10" in proc.stderr
    assert json.loads((out / "summary.json").read_text())["global_step"] == 40


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    run_cli("train", DIGITS, f"output.dir={out}", "train.max_steps=5", QUIET)
    before = _tree_digest(out)
    proc = run_cli("train", DIGITS, f"output.dir={out}", "train.max_steps=5", QUIET, check=False)
    assert_one_line_error(proc, "holds a run", "--resume", "--overwrite")
    assert _tree_digest(out) == before


def test_overwrite_replaces_only_runs_and_only_once_the_new_one_builds(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_cli("train", DIGITS, f"output.dir={out}", "train.max_steps=5", QUIET)
    before = _tree_digest(out)
    # the replacement's data is missing: the old run is put back untouched, nothing is left beside it
    proc = run_cli("train", DIGITS, f"output.dir={out}", "data.name=mnist", "data.path=/nonexistent/mnist",
                   QUIET, "--overwrite", check=False)
    assert_one_line_error(proc, "/nonexistent/mnist")
    assert _tree_digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # a folder that is not a run is never deleted
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    proc = run_cli("train", DIGITS, f"output.dir={mine}", QUIET, "--overwrite", check=False)
    assert_one_line_error(proc, "was not made by tunelab", "notes.txt")
    assert (mine / "notes.txt").read_text() == "keep me"
    # nor the current folder, or one that holds it
    from tunelab.engine.rundir import claim_run_dir

    monkeypatch.chdir(out / "final")
    with pytest.raises(ConfigError, match="current folder or holds it"):
        with claim_run_dir(out, resume=False, overwrite=True):
            pass
    assert _tree_digest(out) == before


def test_a_start_that_never_trained_is_simply_rerun(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", DIGITS, f"output.dir={out}", "train.max_steps=3", "model.num_classes=3", QUIET,
                   check=False)
    assert_one_line_error(proc, "the model outputs 3 scores", "task has 10 classes", "model.num_classes")
    summary = json.loads((out / "summary.json").read_text())  # the failed start still says what happened
    assert summary["status"] == "failed" and "outputs 3 scores" in summary["error"]
    assert not any(d["kind"] == "divergence" for d in summary.get("diagnoses", []))  # not a NaN: no such advice
    run_cli("train", DIGITS, f"output.dir={out}", "train.max_steps=3", QUIET)  # fixed: no --overwrite needed
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events[-1] == "end"  # a fresh log, not appended to the failed one


def test_run_folder_works_from_any_folder_and_resume_reports_changes(tmp_path):
    out = tmp_path / "mnist"
    over = [f"output.dir={out}", "train.max_steps=6", "train.batch_size=16", QUIET]  # default checkpoints
    run_cli("train", "recipes/mnist-linear.yaml", *over)
    saved = (out / "config.yaml").read_text()
    assert f"path: {os.path.abspath(REPO / '../shared/data/mnist')}" in saved  # absolute in the run's config
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    metrics = json.loads(run_cli("eval", out, cwd=elsewhere).stdout.strip().splitlines()[-1])
    assert metrics["accuracy"] > 0.1
    proc = run_cli("train", "recipes/mnist-linear.yaml", *over, "train.max_steps=8", "optim.lr=0.02", "--resume",
                   "--debug")  # --debug after the subcommand is accepted
    assert "resuming with changed settings" in proc.stderr and "optim.lr: 0.01 -> 0.02" in proc.stderr
    resumes = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["event"] == "resume"]
    assert resumes[-1]["changed"]["optim.lr"] == [0.01, 0.02] and resumes[-1]["step"] == 6  # the end checkpoint
    assert json.loads((out / "summary.json").read_text())["global_step"] == 8


def test_resume_extending_max_steps_follows_the_new_schedule(tmp_path):
    """A 2-step cosine run ends at lr 0; extended to 4 steps with --resume, step 3 trains at the 4-step
    schedule's lr (half the peak), not at the saved optimizer's 0."""
    out = tmp_path / "run"
    over = [f"output.dir={out}", "schedule.warmup_steps=0", "train.log_every=1", "optim.lr=0.05", QUIET]
    run_cli("train", DIGITS, *over, "train.max_steps=2")
    run_cli("train", DIGITS, *over, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_last=3", "--resume")
    trains = {e["step"]: e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if e["event"] == "train"}
    assert trains[2]["lr"] == 0.0  # the end of the 2-step schedule (logged after each step: the next lr)
    assert trains[3]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    a = load_file(str(out / "checkpoints" / "step-2" / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / "step-3" / "model.safetensors"))
    assert not torch.equal(a["fc.weight"], b["fc.weight"])  # SGD at lr 0 would leave it unchanged


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["optim.lrr=0.1"], ["unknown key `optim.lrr`", "did you mean `optim.lr`"]),
        (["train.batch_size=lots"], ["`train.batch_size` = 'lots'"]),
        (["optim.lr=-0.01"], ["`optim.lr` = -0.01", "> 0"]),
        (["task.num_classes=5"], ["is outside [0, 5)", "task.num_classes to at least 10"]),
        (["data.classes=[]"], ["empty"]),
        (["data.name=mnist", "data.path=/nonexistent/mnist"], ["/nonexistent/mnist", "not found"]),
        (["model.widht=3"], ["unknown key `model.widht`", "did you mean `width`"]),
        (["task.loss=x"], ["`task.loss` is not a task setting", "loss: {name"]),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, overrides, fragments):
    proc = run_cli("train", DIGITS, f"output.dir={tmp_path / 'r'}", QUIET, *overrides, check=False)
    assert_one_line_error(proc, *fragments)


def test_checkpoint_with_no_matching_keys(tmp_path):
    save_file({"encoder.layer.0.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    proc = run_cli(
        "train",
        DIGITS,
        f"output.dir={tmp_path / 'r'}",
        QUIET,
        f"pretrained.path={tmp_path / 'other.safetensors'}",
        check=False,
    )
    assert_one_line_error(proc, "no checkpoint key matches the model", "encoder.layer.0.weight")


def test_malicious_checkpoint_via_cli(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"fc.weight": Evil()}, f)
    proc = run_cli(
        "train",
        DIGITS,
        f"output.dir={tmp_path / 'r'}",
        QUIET,
        f"pretrained.path={tmp_path / 'evil.pt'}",
        check=False,
    )
    assert_one_line_error(proc, "refused to load")
    assert not marker.exists()


def test_nan_loss_stops_and_keeps_good_state(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        DIGITS,
        f"output.dir={out}",
        QUIET,
        "optim.lr=1e20",
        "schedule.warmup_steps=0",
        "model={name: mlp, in_features: 64, hidden: [32], num_classes: 10}",
        "train.max_steps=50",
        "train.checkpoint_every=1",
        "eval.every=1",
        check=False,
    )
    line = assert_one_line_error(proc, "loss became", "at step", "learning rate")
    step = int(line.split("at step ")[1].split(":")[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["global_step"] == step
    steps = sorted(int(p.name[5:]) for p in (out / "checkpoints").iterdir())
    assert steps and max(steps) < step  # nothing saved from the diverged step
    from tunelab.io import verify_folder

    verify_folder(out / "checkpoints" / f"step-{max(steps)}")
    assert not (out / "final").exists()


def test_torchrun_matches_single_process(tmp_path):
    """2 ranks x batch 16 see the same examples per step as 1 process x batch 32 (rank-sharded sampler), and
    targets are counted across ranks, so the weights agree (an MLP: no per-rank BatchNorm statistics)."""
    mlp = "model={name: mlp, in_features: 64, hidden: [64], num_classes: 10}"
    common = ["train.max_steps=20", QUIET, mlp, "train.checkpoint_every=10", "optim.momentum=0.0"]
    single = tmp_path / "single"
    run_cli("train", DIGITS, f"output.dir={single}", "train.batch_size=32", *common)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
         "-m", "tunelab.cli", "train", DIGITS, f"output.dir={out}", "train.batch_size=16", *common],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 20 and (out / "checkpoints" / "step-20").is_dir()
    starts = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"start"' in line]
    assert len(starts) == 1  # only rank 0 writes
    a = load_file(str(single / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert summary["metrics"]["accuracy"] == pytest.approx(
        json.loads((single / "summary.json").read_text())["metrics"]["accuracy"], abs=0.01)
