"""Pretraining from scratch through the CLI: the shipped recipe (shortened) on tiny-shakespeare, sampling
with `tunelab generate`, the tokenizer guard on resume, and one-line errors. (HF Llama export/import
logits are checked in tests/test_gpt.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error, run_cli

RECIPE = "recipes/gpt-shakespeare-char.yaml"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("gpt")
    out = tmp / "run"
    common = [
        f"data.path={shared_data / 'tinyshakespeare' / 'input.txt'}",
        f"data.cache_dir={tmp / 'cache'}",
        "train.max_steps=40",
        "schedule.warmup_steps=10",
        "train.compile=false",  # compile is covered by tests/test_gpt.py (graph breaks) and the bench
        "train.checkpoint_every=20",
        "train.log_every=20",
        "eval.every=20",
        "eval.max_batches=5",
        "output.progress=false",
        "output.tensorboard=false",
    ]
    run_cli("train", RECIPE, *common, f"output.dir={out}")
    return out, common, tmp


def test_recipe_trains_and_logs_flops(short_run):
    out, _, _ = short_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 40
    assert summary["metrics"]["loss"] < 3.3  # from ln(65) = 4.17 at init
    assert summary["train_tokens_per_s"] > 0 and summary["tflops"] > 0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    assert train and all("tflops" in e for e in train)
    assert (out / "tokenizer" / "tunelab_tokenizer.json").is_file()
    assert json.loads((out / "final" / "tunelab_model.json").read_text())["kwargs"]["vocab_size"] == 65


def test_generate_is_seeded(short_run):
    out, _, _ = short_run
    args = ["generate", out, "--prompt", "ROMEO:", "--temperature", "0.8", "--top-k", "20", "--seed", "3",
            "--max-new-tokens", "40"]  # fmt: skip
    a, b = run_cli(*args).stdout, run_cli(*args).stdout
    assert a == b and a.startswith("ROMEO:") and len(a.strip()) > len("ROMEO:") + 20
    c = run_cli(*args[:-4], "--seed", "4", "--max-new-tokens", "40").stdout
    assert c != a and c.startswith("ROMEO:")


def test_resume_with_other_tokenizer_is_refused(short_run):
    out, common, _ = short_run
    proc = run_cli("train", RECIPE, *common, f"output.dir={out}", "data.tokenizer=bpe", "data.vocab_size=300",
                   "train.max_steps=60", "--resume", check=False)  # fmt: skip
    assert_one_line_error(proc, "different tokenizer")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.n_embd=130"], "`model.n_embd` = 130 is not divisible by `model.n_head` = 4"),
        (["data.block_size=2000000", "model.block_size=2000000"], "shorter than one window"),
    ],
)
def test_bad_input_one_line(short_run, tmp_path, overrides, fragment):
    _, common, _ = short_run
    proc = run_cli("train", RECIPE, *common, f"output.dir={tmp_path / 'x'}", *overrides, check=False)
    assert_one_line_error(proc, fragment)


def test_llama_flavour_exports_a_folder_transformers_loads(short_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models import load_model_folder

    _, common, _ = short_run
    out = tmp_path / "llama"
    run_cli("train", RECIPE, *common, "model.size=baby-llama", "train.max_steps=5", f"output.dir={out}")
    folder = run_cli("export", out).stdout.strip().splitlines()[-1]
    ids = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        ours = load_model_folder(out / "final").eval()(ids)
        theirs = AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["eos_token_id"] is None and config["bos_token_id"] is None  # char level: no end-of-text id
    assert_one_line_error(run_cli("export", out, "--merge", check=False), "--merge applies to LoRA runs")
