"""Evaluation a user expects (issue 19), on MiniLM and real SST-2 rows: the untrained model's score as step 0
(`eval.at_start`, `tunelab eval CONFIG --base`), a test split scored at the end of the run and on demand."""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_textcls_cli import env, small  # noqa: F401  (env is a fixture)
from tests.helpers import assert_one_line_error, run_cli


def events(run_dir, kind):
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


@pytest.mark.slow
def test_eval_at_start_is_step_0_once_and_matches_eval_base(shared_data, env, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = small(shared_data, out, "data.max_rows=64", "eval.max_batches=2", "eval.at_start=true")
    proc = run_cli("train", *args, "train.max_steps=2", env=env)
    assert "LOAD REPORT" not in proc.stderr and "MISSING" not in proc.stderr  # transformers' banner, silenced
    assert "new, initialised here: classifier.bias, classifier.weight" in proc.stderr  # tunelab's own line
    first = events(out, "eval")
    assert [e["step"] for e in first] == [0, 2]
    run_cli("train", *args, "train.max_steps=3", "--resume", env=env)
    assert [e["step"] for e in events(out, "eval")] == [0, 2, 3]  # step 0 kept, not evaluated again
    base = json.loads(run_cli("eval", args[0], *args[1:], "--base", env=env).stdout.strip().splitlines()[-1])
    assert base["loss"] == pytest.approx(first[0]["loss"], abs=1e-5)
    assert base["accuracy"] == first[0]["accuracy"]
    assert base["loss"] != pytest.approx(first[1]["loss"], abs=1e-5)  # training moved it


@pytest.mark.slow
def test_a_labelled_test_split_is_scored_at_the_end_and_on_demand(shared_data, env, tmp_path):  # noqa: F811
    dev = (shared_data / "sst2" / "dev.tsv").read_text().splitlines()
    test = tmp_path / "test.tsv"  # SST-2's own test file has no labels: 40 labelled dev rows stand in
    test.write_text("\n".join(dev[:41]) + "\n")
    out = tmp_path / "run"
    run_cli("train", *small(shared_data, out, "data.max_rows=64", "train.max_steps=2", "eval.max_batches=2",
                            f"data.test={test}"), env=env)
    summary = json.loads((out / "summary.json").read_text())
    scored = summary["test_metrics"]
    assert set(scored) >= {"loss", "accuracy"} and scored["loss"] != summary["metrics"]["loss"]
    assert events(out, "test")[0]["accuracy"] == scored["accuracy"]
    report = (out / "report.html").read_text()
    assert "test accuracy" in report and f"{scored['accuracy']:.4g}" in report
    proc = run_cli("eval", out, "--split", "test", env=env)
    again = json.loads(proc.stdout.strip().splitlines()[-1])
    assert again["loss"] == pytest.approx(scored["loss"], abs=1e-5)
    assert f"{out}/final on the test split: 40 rows" in proc.stderr  # what was scored, on stderr
    other = tmp_path / "other.tsv"
    other.write_text("\n".join([dev[0], *dev[41:61]]) + "\n")
    proc = run_cli("eval", out, "--data", other, env=env)
    by_path = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"on the test split ({other}): 20 rows" in proc.stderr
    assert by_path["loss"] != pytest.approx(scored["loss"], abs=1e-5)
    assert by_path["accuracy"] * 20 == pytest.approx(round(by_path["accuracy"] * 20))  # 20 rows scored
    unlabelled = run_cli("eval", out, "--data", shared_data / "sst2" / "test.tsv", check=False, env=env)
    assert_one_line_error(unlabelled, "no labels")
