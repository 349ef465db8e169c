"""The FAILs scripts/attack.py found (docs/security.md, ids in brackets), one test each: exports and reports
that would have replaced a run or a user's folder, weights that do not fit their model, damaged side files
that broke `tunelab report`. A digits run and a tiny BPE Llama GPT (seconds each)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.e2e.test_reliability import _digest, _rehash
from tests.helpers import REPO, assert_one_line_error, run_cli

QUIET = ["output.progress=false", "output.tensorboard=false"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "run"
    run_cli("train", "recipes/digits-cnn.yaml", f"output.dir={out}", "train.max_steps=10", *QUIET)
    return out


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, shared_data) -> Path:
    """A native GPT (llama flavour, one layer) with a 300-token BPE: exportable to HF and GGUF."""
    root = tmp_path_factory.mktemp("llama")
    text = root / "tiny.txt"
    text.write_text((shared_data / "tinyshakespeare" / "input.txt").read_text()[:20000])
    run_cli("train", "recipes/gpt-shakespeare-char.yaml", f"output.dir={root / 'run'}", f"data.path={text}",
            "data.tokenizer=bpe", "data.vocab_size=300", "model.size=baby-llama", "model.n_layer=1",
            "train.max_steps=2", "eval.every=2", *QUIET)  # fmt: skip
    return root / "run"


def _user_folder(tmp_path: Path) -> Path:
    user = tmp_path / "user-folder"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    return user


@pytest.mark.slow
def test_export_never_replaces_a_run_or_a_folder_that_is_not_an_export(llama_run, digits_run, tmp_path):
    """[O01, O02, O03] `--overwrite` replaces an earlier export only: the run itself, its final/, another run
    and a user's folder are refused in one line and left as they were."""
    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    user, before, other = _user_folder(tmp_path), _digest(run), _digest(digits_run)
    for target, fragment in ((run, "holds"), (run / "final", "belongs to the run"), (digits_run, "run folder"),
                             (user, "not an earlier export")):  # fmt: skip
        proc = run_cli("export", run, "--output", target, "--overwrite", check=False)
        assert_one_line_error(proc, fragment)
    for target in (digits_run / "final" / "x.gguf", run / "checkpoints" / "x.gguf"):
        proc = run_cli("export", run, "--format", "gguf", "--output", target, "--overwrite", check=False)
        assert_one_line_error(proc, "belongs to the run")
    (tmp_path / "notes.gguf").write_text("my notes")
    proc = run_cli("export", run, "--format", "gguf", "--output", tmp_path / "notes.gguf", "--overwrite", check=False)
    assert_one_line_error(proc, "not an earlier export")
    assert (_digest(run), _digest(digits_run)) == (before, other)
    assert (user / "thesis.tex").read_text() == "years of work"
    assert (tmp_path / "notes.gguf").read_text() == "my notes"
    # an earlier export is what --overwrite is for
    for args in ((), ("--format", "gguf")):
        first = Path(run_cli("export", run, *args).stdout.strip().splitlines()[-1])
        again = Path(run_cli("export", run, *args, "--overwrite").stdout.strip().splitlines()[-1])
        assert first == again and again.exists()


def test_a_symlinked_export_destination_is_written_at_its_target_only_when_it_is_an_export(llama_run, tmp_path):
    """[S06] RUN/export/model linked to a user's folder: `export --overwrite` is one line (it used to die in
    rmtree with a traceback); linked to an earlier export, that export is replaced and the link stays."""
    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    dest = Path(run_cli("export", run).stdout.strip().splitlines()[-1])
    dest = dest if dest.is_absolute() else REPO / dest
    moved = tmp_path / "elsewhere"
    shutil.move(dest, moved)
    user = _user_folder(tmp_path)
    dest.symlink_to(user)
    assert_one_line_error(run_cli("export", run, "--overwrite", check=False), "not an earlier export")
    assert (user / "thesis.tex").is_file()
    dest.unlink()
    dest.symlink_to(moved)
    run_cli("export", run, "--overwrite")
    assert dest.is_symlink() and (moved / "config.json").is_file()


def test_report_refuses_to_write_over_a_run_file(digits_run, tmp_path):
    """[O04] `report -o RUN/metrics.jsonl` replaced the run's log; its own report.html stays writable."""
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    before = (run / "metrics.jsonl").read_bytes(), (run / "final" / "model.safetensors").read_bytes()
    for target in (run / "metrics.jsonl", run / "final" / "model.safetensors"):
        assert_one_line_error(run_cli("report", run, "-o", target, check=False), "belongs to the run")
    assert ((run / "metrics.jsonl").read_bytes(), (run / "final" / "model.safetensors").read_bytes()) == before
    run_cli("report", run, "-o", run / "report.html")


def test_weights_that_do_not_fit_the_model_are_one_line(digits_run, tmp_path):
    """[T04, T08] A reshaped tensor in final/ (manifest re-hashed), and checkpoints of a wider CNN under a
    run: one line naming the file and the first mismatch, not load_state_dict's traceback."""
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    weights = load_file(run / "final" / "model.safetensors")
    weights["fc.weight"] = torch.zeros(3, 3)
    save_file(weights, run / "final" / "model.safetensors")
    _rehash(run / "final")
    assert_one_line_error(run_cli("eval", run, check=False), "model.safetensors", "fc.weight", "do not fit")
    resumed = tmp_path / "resumed"
    shutil.copytree(digits_run, resumed)
    proc = run_cli("train", "recipes/digits-cnn.yaml", f"output.dir={resumed}", "train.max_steps=12",
                   "model.width=16", "--resume", *QUIET, check=False)  # fmt: skip
    assert_one_line_error(proc, "checkpoints", "do not fit", "model")


def test_a_damaged_log_summary_or_config_still_gives_a_report(digits_run, tmp_path):
    """[T05, T06] Random bytes as metrics.jsonl, a torn summary.json, YAML junk as config.yaml: `report`
    warns about each unreadable file and writes what it can (it died with UnicodeDecodeError/JSONDecodeError)."""
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    lines = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(bytes(range(256)) * 4 + b"\n" + lines + b"[1, 2]\n")
    (run / "summary.json").write_text('{"status": "comp')
    (run / "config.yaml").write_text("\x00model: [")
    proc = run_cli("report", run)
    assert "summary.json: unreadable" in proc.stderr and "config.yaml: unreadable" in proc.stderr
    page = (run / "report.html").read_text()
    assert "data:image/png" in page  # the readable log lines still make the loss figure


def test_a_yaml_alias_bomb_in_a_recipe_is_one_line(tmp_path):
    """[P04] A billion-string alias bomb as a recipe's `name`: the error message repr()'d the whole value and
    hung (then died printing the traceback); it is now one line, cut short."""
    chain = ", ".join(["&a0 [lol]"] + [f"&a{i} [{', '.join(['*a' + str(i - 1)] * 9)}]" for i in range(1, 10)])
    recipe = (REPO / "recipes" / "digits-cnn.yaml").read_text().replace("name: digits-cnn", f"name: [{chain}]")
    (tmp_path / "bomb.yaml").write_text(recipe)
    line = assert_one_line_error(run_cli("train", tmp_path / "bomb.yaml", check=False, timeout=120), "`name` =")
    assert len(line) < 1000


def test_model_settings_the_layers_refuse_are_one_line(tmp_path):
    """[V02, V05, V06] model.width=0 (failed in forward), model.dropout=1.5 and a width too large to allocate
    (failed in the layer's constructor): one line each, before anything is written."""
    for override, fragment in (("model.width=0", "`model.width` = 0"), ("model.dropout=1.5", "dropout"),
                               ("model.width=100000000", "make the model smaller")):  # fmt: skip
        proc = run_cli("train", "recipes/digits-cnn.yaml", f"output.dir={tmp_path / 'r'}", override, *QUIET, check=False)
        assert_one_line_error(proc, fragment)


def test_damaged_tokenizers_and_bytes_that_are_not_utf8(llama_run, shared_data, tmp_path):
    """[G03, G05, D02, E05] junk tokenizer.json: `generate` and `export --format gguf` one line each; a prompt
    holding bytes that are not UTF-8 is generated from (as U+FFFD); a preference file that is not UTF-8 and
    `report --dpi 0` are one line."""
    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    assert run_cli("generate", run, "--prompt", "ROMEO: \udcff", "--max-new-tokens", "2").returncode == 0
    (run / "tokenizer" / "tokenizer.json").write_text("{junk")
    assert_one_line_error(run_cli("generate", run, "--prompt", "hi", check=False), "damaged tokenizer")
    assert_one_line_error(run_cli("export", run, "--format", "gguf", check=False), "not a readable tokenizer.json")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_bytes(b'{"chosen": "a", "rejected": "b"}\n' * 12 + b'{"chosen": "\xff", "rejected": "b"}\n')
    proc = run_cli("train", "recipes/smollm2-dpo-hh.yaml", f"data.path={prefs}", f"output.dir={tmp_path / 'd'}", check=False)
    assert_one_line_error(proc, "not UTF-8")
    assert_one_line_error(run_cli("report", llama_run, "--dpi", "0", check=False), "--dpi 0")
