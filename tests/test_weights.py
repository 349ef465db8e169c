import json
import pickle

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from tunelab.errors import CheckpointError, ConfigError
from tunelab.models import create_model
from tunelab.weights import count_parameters, init_weights, load_pretrained, read_checkpoint


def test_normal_init_std():
    model = nn.Sequential(nn.Linear(200, 300), nn.LayerNorm(300))
    init_weights(model, "normal", std=0.01)
    w = model[0].weight
    assert abs(w.std().item() - 0.01) < 0.001 and w.mean().abs().item() < 0.001
    assert torch.all(model[0].bias == 0) and torch.all(model[1].weight == 1)


@pytest.mark.parametrize("scheme", ["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal",
                                    "trunc_normal"])
def test_schemes_change_weights(scheme):
    model = nn.Linear(64, 64)
    before = model.weight.clone()
    init_weights(model, scheme, bias=0.5)
    assert not torch.equal(before, model.weight) and torch.all(model.bias == 0.5)


def test_trunc_normal_is_truncated():
    model = nn.Linear(500, 500)
    init_weights(model, "trunc_normal", std=0.02, a=-2, b=2)
    assert model.weight.abs().max() <= 0.04 + 1e-6


def test_unknown_scheme():
    with pytest.raises(ConfigError, match="did you mean `normal`"):
        init_weights(nn.Linear(2, 2), "normall")


def _cnn(n=10):
    return create_model("cnn", num_classes=n)


def test_load_reports_mismatched_head_and_strict_allows(tmp_path):
    src = _cnn(5)
    state = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "ckpt.pt")
    model = _cnn(10)
    with pytest.raises(CheckpointError, match=r"2 model tensors would stay uninitialised: fc.weight, fc.bias.*allow_missing"):
        load_pretrained(model, tmp_path / "ckpt.pt")
    report = load_pretrained(model, tmp_path / "ckpt.pt", allow_missing=["fc.*"])
    assert {m[0] for m in report.mismatched} == {"fc.weight", "fc.bias"}
    assert ("fc.weight", (5, 256), (10, 256)) in report.mismatched
    assert len(report.loaded) == len(src.state_dict()) - 2 and not report.unexpected
    assert torch.equal(model.features[0].weight, src.features[0].weight)
    assert "fc.weight: checkpoint [5, 256] vs model [10, 256] (skipped)" in report.table()


def test_zero_matching_keys_is_an_error(tmp_path):
    save_file({"encoder.w": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="no checkpoint key matches the model"):
        load_pretrained(_cnn(), tmp_path / "x.safetensors", strict=False)


def test_rename_rules_and_unexpected(tmp_path):
    src = _cnn()
    state = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    state["extra.thing"] = torch.ones(1)
    report = load_pretrained(_cnn(), state, rename={r"^backbone\.": ""})
    assert report.ok and report.unexpected == ["extra.thing"] and report.renamed == len(state) - 1


def test_sharded_folder(tmp_path):
    src = _cnn()
    items = list(src.state_dict().items())
    half = len(items) // 2
    save_file(dict(items[:half]), str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(dict(items[half:]), str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k, _ in items[:half]}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k, _ in items[half:]})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = _cnn()
    assert load_pretrained(model, tmp_path).ok
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": {"fc.weight": _Evil(marker)}}, f)
    # also as a real torch.save zip archive
    torch.save({"w": _Evil(marker)}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError, match="refused to load"):
            read_checkpoint(tmp_path / name)
    assert not marker.exists()


def test_count_parameters_counts_tied_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    total, trainable = count_parameters(nn.ModuleList([emb, head]))
    assert total == trainable == 40
