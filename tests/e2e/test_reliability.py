"""Attacks on the CLI, one test per case (docs/security.md keeps the table of what was tried and what
happens). Most run the digits recipe for a few steps: seconds each."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, assert_one_line_error, run_cli, same_weights

DIGITS = "recipes/digits-cnn.yaml"
GPT = "recipes/gpt-shakespeare-char.yaml"
QUIET = "output.progress=false"
FAST = [QUIET, "report.enabled=false", "output.tensorboard=false"]


def _train(out: Path, *extra: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return run_cli("train", DIGITS, f"output.dir={out}", *FAST, *extra, check=check, **kw)


def _rehash(folder: Path) -> None:
    """What an attacker who knows the format does after changing a file: fix up the manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished digits run with three checkpoints (steps 10, 15, 20) to copy and attack."""
    out = tmp_path_factory.mktemp("trained") / "run"
    _train(out, "train.max_steps=20", "train.checkpoint_every=5", "train.keep_last=3")
    return out


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


# -- FAIL 1: code execution from a run folder -----------------------------------------------------------------


def test_a_model_spec_naming_code_is_refused_without_trust_code(trained, tmp_path):
    run = _copy(trained, tmp_path)
    pwned = tmp_path / "PWNED"
    (run / "final" / "tunelab_model.json").write_text(
        json.dumps({"name": "os:system", "kwargs": {"command": f"touch {pwned}"}}))
    _rehash(run / "final")
    proc = run_cli("eval", run, check=False)
    assert_one_line_error(proc, "os:system", "--trust-code")
    for fmt in ("hf", "gguf"):  # export reads the same spec
        assert_one_line_error(run_cli("export", run, "--format", fmt, check=False), "os:system", "--trust-code")
    # trusted or not, a spec may only name an nn.Module subclass or a registered builder
    proc = run_cli("eval", run, "--trust-code", check=False)
    assert_one_line_error(proc, "os:system", "not an nn.Module subclass")
    assert not pwned.exists()


def test_a_config_naming_code_or_remote_code_is_refused(trained, tmp_path):
    run = _copy(trained, tmp_path)
    cfg = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(cfg.replace("name: cnn", "name: os:system", 1))
    assert_one_line_error(run_cli("eval", run, check=False), "config.yaml", "--trust-code")
    assert_one_line_error(run_cli("predict", run, "--text", "x", check=False), "--trust-code")
    assert_one_line_error(run_cli("plan", run, check=False), "--trust-code")
    spec = json.loads((trained / "final" / "tunelab_model.json").read_text())
    spec["kwargs"]["trust_remote_code"] = True
    run2 = _copy(trained, tmp_path, "run2")
    (run2 / "final" / "tunelab_model.json").write_text(json.dumps(spec))
    _rehash(run2 / "final")
    assert_one_line_error(run_cli("eval", run2, check=False), "trust_remote_code", "--trust-code")


def test_an_import_path_model_runs_with_trust_code(tmp_path):
    """A model from an importable class is a supported recipe; its run folder evaluates with --trust-code."""
    out = tmp_path / "run"
    _train(out, "model={name: 'tests.plugins:TinyNet'}", "init.scheme=null",
           "train.max_steps=3")
    assert_one_line_error(run_cli("eval", out, check=False), "tests.plugins:TinyNet", "--trust-code")
    metrics = json.loads(run_cli("eval", out, "--trust-code").stdout.splitlines()[-1])
    assert 0 <= metrics["accuracy"] <= 1


# -- FAIL 2 and 3: one process per run folder, and only folders tunelab made ----------------------------------


def _train_in_background(out: Path, until: str) -> subprocess.Popen:
    """A 400-step digits run (checkpoints every 10 steps), returned once `out/until` exists."""
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "train", DIGITS, f"output.dir={out}", *FAST,
                             "train.max_steps=400", "train.checkpoint_every=10"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / until).exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


def test_a_second_start_on_a_training_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    first = _train_in_background(out, "checkpoints/step-10")
    os.kill(first.pid, signal.SIGSTOP)  # paused, so it cannot finish (and free the folder) before the others try
    try:
        second = _train(out, "train.max_steps=5", check=False)
        assert_one_line_error(second, "another tunelab process is using this run folder")
        third = _train(out, "train.max_steps=5", "--overwrite", check=False)
        assert_one_line_error(third, "another tunelab process is using this run folder")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    events = _events(out)  # one run's log, every line whole
    assert [e["event"] for e in events].count("start") == 1 and events[-1]["event"] == "end"
    assert json.loads((out / "summary.json").read_text())["global_step"] == 400


def test_a_folder_tunelab_did_not_make_is_never_written(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own notes\n")
    (mine / "report.html").write_text("<p>mine</p>")
    before = _digest(mine)
    for extra in ([], ["--overwrite"], ["--resume"]):
        proc = _train(mine, "train.max_steps=2", *extra, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert_one_line_error(_train(mine, "train.max_steps=2", check=False), "not made by tunelab")
    assert _digest(mine) == before


# -- FAIL 4: tampered weights given as pretrained -------------------------------------------------------------


def test_tampered_weights_are_refused_as_pretrained(trained, tmp_path):
    run = _copy(trained, tmp_path)
    weights = run / "final" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0xFF
    weights.write_bytes(bytes(data))
    for path in (weights, run / "final", run):
        proc = _train(tmp_path / "new", f"pretrained.path={path}", "train.max_steps=2", check=False)
        assert_one_line_error(proc, "sha256 does not match")
    assert_one_line_error(run_cli("eval", run, check=False), "sha256 does not match")
    # an unlisted file dropped into a manifested folder is refused too
    shutil.copy(trained / "final" / "model.safetensors", run / "final" / "extra.safetensors")
    proc = _train(tmp_path / "new", f"pretrained.path={run / 'final' / 'extra.safetensors'}", check=False)
    assert_one_line_error(proc, "not listed in")


def test_a_final_folder_whose_manifest_was_removed_is_refused(trained, tmp_path):
    """Deleting manifest.json does not turn verification off for a run's final/ (tunelab always writes one
    there); the same files copied into a folder of the user's own still load, unverified."""
    run = _copy(trained, tmp_path)
    (run / "final" / "manifest.json").unlink()
    for proc in (run_cli("eval", run, check=False),
                 run_cli("export", run, "--output", tmp_path / "exported", check=False),
                 _train(tmp_path / "new", f"pretrained.path={run / 'final' / 'model.safetensors'}",
                        "train.max_steps=2", check=False)):
        assert_one_line_error(proc, "manifest.json is missing")
    assert not (tmp_path / "exported").exists()
    mine = tmp_path / "mine"
    shutil.copytree(run / "final", mine)
    _train(tmp_path / "new", f"pretrained.path={mine / 'model.safetensors'}", "train.max_steps=2")


def test_eval_refuses_overrides_that_a_saved_model_would_ignore(trained):
    proc = run_cli("eval", trained, "model.hidden=7", "optim.lr=0.5", check=False)
    assert_one_line_error(proc, "model.hidden=7 optim.lr=0.5")
    assert "would be ignored" in proc.stderr
    json.loads(run_cli("eval", trained, "eval.batch_size=7").stdout.strip().splitlines()[-1])  # eval keys apply


# -- FAIL 5: caches are checked, rebuilt when damaged ---------------------------------------------------------


def _gpt(out: Path, cache: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli("train", GPT, f"output.dir={out}", f"data.cache_dir={cache}", *FAST, "train.max_steps=3",
                   "eval.max_batches=2", "train.compile=false", *extra, check=check)


def test_damaged_token_caches_are_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    _gpt(tmp_path / "clean", cache)
    clean = json.loads((tmp_path / "clean" / "summary.json").read_text())["metrics"]["loss"]
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    damages = {
        "zeroed val.bin": lambda: (folder / "val.bin").write_bytes(bytes((folder / "val.bin").stat().st_size)),
        "truncated train.bin": lambda: os.truncate(folder / "train.bin", 1000),
        "an id past the vocabulary": lambda: _poke(folder / "train.bin", 10, b"\xff\xff"),
    }
    for i, (what, damage) in enumerate(damages.items()):
        damage()
        proc = _gpt(tmp_path / f"run{i}", cache)
        assert "rebuilding the token cache" in proc.stderr, what
        assert json.loads((tmp_path / f"run{i}" / "summary.json").read_text())["metrics"]["loss"] == clean, what


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_damaged_text_cache_entries_are_rebuilt(minilm_path, tmp_path):
    from tunelab.data.text import tokenize_texts
    from tunelab.tokenizers import load_hf_tokenizer

    tok = load_hf_tokenizer(str(minilm_path))
    texts = ["a charming and often affecting journey", "dull", "the plot is nowhere"]
    fresh = tokenize_texts(tok, texts, None, 32, cache_dir=None)
    tokenize_texts(tok, texts, None, 32, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.safetensors")
    _poke(entry, entry.stat().st_size - 9, b"\x7f")  # one flipped byte inside the token ids
    again = tokenize_texts(tok, texts, None, 32, cache_dir=tmp_path)
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)
    assert load_file(str(entry))["ids"].tolist() == fresh["ids"].tolist()  # rewritten intact


# -- FAIL 6: resume after the data changed --------------------------------------------------------------------


def test_resume_on_changed_data_is_refused_unless_allowed(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((REPO.parent / "shared/data/tinyshakespeare/input.txt").read_text()[:200_000])
    out, cache = tmp_path / "run", tmp_path / "cache"
    over = [f"data.path={corpus}", "train.checkpoint_every=2"]
    _gpt(out, cache, *over)
    with open(corpus, "a") as f:
        f.write("A line the first run never saw.\n" * 50)
    proc = _gpt(out, cache, *over, "train.max_steps=5", "--resume", check=False)
    assert_one_line_error(proc, str(corpus), "changed since the checkpoint", "--allow-data-change")
    assert json.loads((out / "summary.json").read_text())["global_step"] == 3  # untouched
    proc = _gpt(out, cache, *over, "train.max_steps=5", "--resume", "--allow-data-change")
    resume = [e for e in _events(out) if e["event"] == "resume"][-1]
    assert any(str(corpus) in c for c in resume["data_changed"])
    assert json.loads((out / "summary.json").read_text())["global_step"] == 5


# -- FAIL 7: changed optimizer settings on resume are applied -------------------------------------------------


def test_resume_applies_a_changed_learning_rate(tmp_path):
    out = tmp_path / "run"
    over = ["schedule.name=constant", "schedule.warmup_steps=0", "train.log_every=1", "optim.lr=0.05"]
    _train(out, *over, "train.max_steps=4")
    _train(out, *over, "train.max_steps=6", "optim.lr=0.01", "optim.weight_decay=0.001", "--resume")
    trains = {e["step"]: e["lr"] for e in _events(out) if e["event"] == "train"}
    assert trains[4] == 0.05 and trains[5] == 0.01 and trains[6] == 0.01
    state = torch.load(out / "checkpoints" / "step-6" / "optimizer.pt", weights_only=True)
    assert {g["weight_decay"] for g in state["param_groups"]} <= {0.001, 0.0}  # no_decay groups keep 0
    assert 0.001 in {g["weight_decay"] for g in state["param_groups"]}


# -- FAIL 8: non-finite states are never kept as the good ones ------------------------------------------------


def test_non_finite_states_are_never_saved(tmp_path):
    out = tmp_path / "run"
    proc = _train(out, "optim.lr=1e6", "schedule.warmup_steps=0", "train.max_steps=60", "train.checkpoint_every=1",
                  "train.keep_last=2", "eval.every=1", check=False)
    assert proc.returncode == 2
    saved = sorted((out / "checkpoints").glob("step-*"))
    for folder in saved + [out / "best"] * (out / "best").is_dir():
        state = load_file(str(folder / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), folder
    if saved:  # the message names the checkpoint that is there
        assert saved[-1].name in proc.stderr.strip().splitlines()[-1]


# -- WEAK: one line and exit 2 instead of a traceback --------------------------------------------------------


def _limit_file_size(nbytes: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return preexec


def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(tmp_path):
    """A file-size limit makes writes fail as on a full disk (EFBIG; with root, a tiny tmpfs gives ENOSPC)."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", DIGITS, f"output.dir={out}", *FAST,
                           "train.max_steps=3"], cwd=REPO, capture_output=True, text=True,
                          preexec_fn=_limit_file_size(20_000), timeout=600)
    assert_one_line_error(proc, "free space or choose a writable output.dir")
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    if os.geteuid() == 0 and shutil.which("mount"):
        small = tmp_path / "small"
        small.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]).returncode == 0:
            try:
                proc = _train(small / "run", "train.max_steps=3", check=False)
                assert_one_line_error(proc, "the disk is full")
                assert not [p for p in small.rglob("*") if p.name.startswith(".tmp-")]
            finally:
                subprocess.run(["umount", str(small)])


def test_a_read_only_output_folder_is_one_line(trained, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(ro)]).returncode == 0
    shutil.copytree(trained, ro / "run")
    try:
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        else:
            for p in [ro, *ro.rglob("*")]:
                p.chmod(0o555 if p.is_dir() else 0o444)
        before = _digest(ro / "run")
        proc = _train(ro / "run", "train.max_steps=25", "--resume", check=False)
        assert_one_line_error(proc, "choose a writable output.dir")
        proc = _train(ro / "new", "train.max_steps=2", check=False)
        assert_one_line_error(proc, "choose a writable output.dir")
        assert _digest(ro / "run") == before
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)])


def test_a_torn_last_log_line_is_skipped_on_resume(trained, tmp_path):
    run = _copy(trained, tmp_path)
    shutil.rmtree(run / "final")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": 21, "lo')
    _train(run, "train.max_steps=25", "train.checkpoint_every=5", "train.keep_last=3", "--resume")
    assert _events(run)[-1]["event"] == "end"  # every line parses


def test_a_malicious_training_state_is_refused_and_an_older_checkpoint_used(trained, tmp_path):
    run = _copy(trained, tmp_path)
    pwned = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {pwned}",))

    newest = run / "checkpoints" / "step-20"
    with open(newest / "trainer_state.pt", "wb") as f:
        pickle.dump({"global_step": Evil()}, f)
    _rehash(newest)
    proc = _train(run, "train.max_steps=22", "train.checkpoint_every=5", "train.keep_last=3", "--resume")
    assert "step-20 refused" in proc.stderr and "weights-only" in proc.stderr
    assert "resumed from" in proc.stderr and "step-15" in proc.stderr
    assert not pwned.exists()


def test_a_truncated_image_in_a_worker_is_one_line(shared_data, tmp_path):
    root = tmp_path / "images"
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            src = shared_data / "images" / "hymenoptera_data" / split / cls
            (root / split / cls).mkdir(parents=True)
            for p in sorted(src.glob("*.jpg"))[:4]:
                shutil.copy(p, root / split / cls / p.name)
    bad = sorted((root / "train" / "ants").glob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[:300])
    proc = run_cli("train", "recipes/hymenoptera-resnet18.yaml", f"output.dir={tmp_path / 'run'}", *FAST,
                   f"data.root={root}", "data.on_bad_image=error", "data.image_size=32", "train.num_workers=1",
                   "model.weights=null", "strategy.name=full", "train.max_steps=2", "train.batch_size=4",
                   check=False)
    assert_one_line_error(proc, bad.name)


def test_a_batch_that_does_not_fit_in_memory_is_one_line(tmp_path):
    import torch.nn as nn

    import tunelab as tl
    from tunelab.errors import TunelabError

    class Greedy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if self.training:
                torch.empty(1 << 50, dtype=torch.uint8)  # a petabyte: the allocator refuses at once
            return self.fc(x)

    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    trainer = tl.Trainer(Greedy(), tl.build_task("classification", num_classes=2), tl.TensorDataset(x, y),
                         train=tl.TrainConfig(max_steps=2, batch_size=8, grad_accum=2), output_dir=tmp_path / "r")
    with pytest.raises(TunelabError, match=r"micro-batch of 8 does not fit in memory.*train.grad_accum"):
        trainer.fit()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "failed"


def test_lora_targets_that_match_nothing_on_a_classifier(minilm_path, shared_data, tmp_path):
    proc = run_cli("train", "recipes/sst2-minilm.yaml", f"output.dir={tmp_path / 'r'}", *FAST,
                   "strategy={name: lora, target_modules: [nothing_here]}", "data.max_rows=64", "train.max_steps=1",
                   check=False)
    assert_one_line_error(proc, "strategy.target_modules", "matches no module", "query")


def test_overwrite_of_a_symlinked_run_folder_replaces_its_target(trained, tmp_path):
    real = _copy(trained, tmp_path, "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    _train(link, "train.max_steps=3", "--overwrite")
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert json.loads((real / "summary.json").read_text())["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    out = tmp_path / "run"
    proc = _train_in_background(out, "checkpoints/step-10")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    assert "interrupted" in proc.stderr.read()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 10 <= summary["global_step"] < 400
    _train(out, "train.max_steps=40", "train.checkpoint_every=10", "--resume")  # checkpoints are consistent
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_an_interrupted_overwrite_is_repaired_and_stale_temporaries_removed(trained, tmp_path):
    run = tmp_path / "run"
    # what a kill during --overwrite leaves: the old run hidden beside, a fresh folder that never trained
    shutil.copytree(trained, tmp_path / ".run.replaced-999999")
    run.mkdir()
    (run / ".tunelab").write_text("{}")
    (run / "config.yaml").write_text((trained / "config.yaml").read_text())
    proc = _train(run, "train.max_steps=20", "train.checkpoint_every=5", "train.keep_last=3", "--resume")
    assert "restored" in proc.stderr and "interrupted" in proc.stderr
    assert same_weights(run / "final" / "model.safetensors", trained / "final" / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # leftovers of killed atomic writes
    (run / ".tmp-final-123-456").mkdir()
    (run / "checkpoints" / ".tmp-step-25-123-456").mkdir()
    (run / ".tmp-summary.json-123-456").write_text("{")
    _train(run, "train.max_steps=22", "train.checkpoint_every=5", "train.keep_last=3", "--resume")
    assert not [p for p in run.rglob(".tmp-*")]


def test_no_valid_checkpoint_names_overwrite(tmp_path):
    out = tmp_path / "run"
    _train(out, "train.max_steps=3")
    for ckpt in (out / "checkpoints").glob("step-*"):
        (ckpt / "manifest.json").unlink()  # as a kill inside the first checkpoint write leaves it
    shutil.rmtree(out / "final")
    proc = _train(out, "train.max_steps=5", "--resume", check=False)
    assert_one_line_error(proc, "no valid checkpoint", "--overwrite")


def test_a_finite_blow_up_ends_diverged_with_a_non_zero_exit(tmp_path):
    from tunelab.insight.doctor import Doctor

    class Stub:
        is_main, global_step, diverged = True, 50, False

        def log(self, *a, **k):
            pass

    doctor = Doctor(echo=False)
    doctor.trains = [{"step": 10 * i, "loss": loss, "lr": 0.1} for i, loss in
                     enumerate([2.3, 1.1, 0.9, 5.0, 3e3, 3.7e14], start=1)]
    summary = {"status": "completed", "global_step": 60}
    doctor.on_fit_end(Stub(), summary)
    assert summary["status"] == "diverged" and summary["diagnoses"][0]["kind"] == "divergence"
    # and through the CLI: a regression onto the digit labels at an lr that grows the loss without NaN
    out = tmp_path / "run"
    proc = _train(out, "task={name: regression}", "model.num_classes=1", "loss.name=mse", "optim.lr=0.2",
                  "optim.momentum=0.99", "schedule.warmup_steps=0", "train.max_steps=40", "train.log_every=2",
                  check=False)
    summary = json.loads((out / "summary.json").read_text())
    if summary["status"] == "diverged":
        assert_one_line_error(proc, "the run diverged")
    else:  # the blow-up reached inf first: a NaN/inf stop, also non-zero
        assert summary["status"] == "failed" and proc.returncode == 2


def test_predict_refuses_to_write_over_a_run_file(trained, tmp_path):
    run = _copy(trained, tmp_path)
    before = (run / "metrics.jsonl").read_bytes()
    for target in (run / "metrics.jsonl", run / "final" / "preds.jsonl"):
        proc = run_cli("predict", run, "--text", "x", "--output", target, check=False)
        assert_one_line_error(proc, "belongs to the run")
    assert (run / "metrics.jsonl").read_bytes() == before


def test_the_eval_at_the_resume_step_is_logged_once(trained, tmp_path):
    run = _copy(trained, tmp_path)
    _train(run, "train.max_steps=20", "train.checkpoint_every=5", "train.keep_last=3", "--resume")
    evals = [e["step"] for e in _events(run) if e["event"] == "eval"]
    assert len(evals) == len(set(evals)), evals

