"""docs/ARCHITECTURE.md is true: its out-of-tree walk-through trains as written, the layers contract holds
and catches an upward import, and import paths name only what a registry holds."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_one_line_error, run_cli

DOC = REPO / "docs" / "ARCHITECTURE.md"


def _block(first_line: str) -> str:
    """The fenced code block of the doc whose first line is `first_line`."""
    for body in re.findall(r"```[a-z]*\n(.*?)```", DOC.read_text(), flags=re.S):
        if body.splitlines()[0].strip() == first_line:
            return body
    raise AssertionError(f"docs/ARCHITECTURE.md has no code block starting {first_line!r}")


def test_the_walkthrough_trains_a_plugin_data_source_task_and_strategy(tmp_path):
    (tmp_path / "my_plugins.py").write_text(_block("# my_plugins.py"))
    (tmp_path / "my-plugins.yaml").write_text(_block("# my-plugins.yaml"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    run_cli("train", "my-plugins.yaml", "output.progress=off", cwd=tmp_path, env=env)
    out = tmp_path / "runs" / "cancer"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["metrics"]["accuracy"] > 0.85
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["data"] == {"rows": 569}  # the plug-in's info
    # BitFit: the weight matrices outside the head stay as they were; biases and the head train
    import torch
    from safetensors.torch import load_file

    final = load_file(str(out / "final" / "model.safetensors"))
    first = load_file(str(sorted((out / "checkpoints").glob("step-*"))[0] / "model.safetensors"))  # an epoch earlier
    frozen = [k for k in final if k.endswith("weight") and not k.startswith("head.")]
    assert frozen and all(torch.equal(first[k], final[k]) for k in frozen)
    assert not torch.equal(first["head.weight"], final["head.weight"])
    assert not torch.equal(first["body.1.bias"], final["body.1.bias"])
    # reading the run back imports the plug-ins: only with --trust-code
    assert_one_line_error(run_cli("eval", out, cwd=tmp_path, env=env, check=False), "--trust-code")
    metrics = json.loads(run_cli("eval", out, "--trust-code", cwd=tmp_path, env=env).stdout.splitlines()[-1])
    assert metrics["accuracy"] == pytest.approx(summary["metrics"]["accuracy"])


@pytest.mark.parametrize("section, name, expects", [
    ("task", "os:system", "not a subclass of tunelab.Task"),
    ("data", "os:system", "registered with @tunelab.register_data"),
    ("strategy", "collections:OrderedDict", "Strategy methods"),
    ("model", "os:system", "nn.Module subclass"),
])
def test_import_paths_name_only_what_the_registry_holds(tmp_path, section, name, expects):
    proc = run_cli("train", "recipes/digits-cnn.yaml", f"output.dir={tmp_path / 'r'}", f"{section}.name={name}",
                   "train.max_steps=1", check=False)
    assert_one_line_error(proc, name, expects)


def _lint_imports(src: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--config", str(REPO / "pyproject.toml")],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True)


def test_the_layers_contract_holds_and_catches_an_upward_import(tmp_path):
    proc = _lint_imports(REPO / "src")
    assert proc.returncode == 0, proc.stdout[-3000:]
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "tunelab", src / "tunelab")
    builtin = src / "tunelab" / "models" / "builtin.py"
    builtin.write_text(builtin.read_text() + "\n\ndef _planted():\n    from tunelab.run import train  # noqa\n")
    proc = _lint_imports(src)
    assert proc.returncode != 0 and "tunelab.models is not allowed to import tunelab.run" in proc.stdout


def test_long_functions_say_why_they_stay_whole():
    """No function in src/ runs past 60 lines without a comment saying why it is not split."""
    import ast

    unexplained = []
    for path in sorted((REPO / "src" / "tunelab").rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                head = "\n".join(lines[node.lineno - 1 : node.lineno + 30])
                if "# Stays whole" not in head:
                    unexplained.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not unexplained, unexplained
