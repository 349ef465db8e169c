"""The README's Python API example runs as written (with the pretrained file it names created first)."""

import re

import pytest
import torch

from tests.helpers import REPO
from tunelab.errors import TunelabError
from tunelab.models import create_model
from tunelab.weights import save_state_dict


def test_readme_api_example(tmp_path, monkeypatch, capsys):
    text = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    pre = tmp_path / "runs" / "quickstart-pretrain" / "final"
    pre.mkdir(parents=True)
    torch.manual_seed(0)
    save_state_dict(create_model("cnn", num_classes=5).state_dict(), pre / "model.safetensors")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "fc.weight: checkpoint [5, 256] vs model [10, 256] (skipped)" in out
    assert "'accuracy':" in out and (tmp_path / "runs" / "api-demo" / "final" / "model.safetensors").is_file()
    # Running it again does not mix two runs in one folder: a resume is `fit(resume=True)`.
    before = (tmp_path / "runs" / "api-demo" / "metrics.jsonl").read_text()
    with pytest.raises(TunelabError, match=r"holds a run.*fit\(resume=True\)"):
        exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "api-demo" / "metrics.jsonl").read_text() == before
