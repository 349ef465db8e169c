"""Fixtures shared by the end-to-end modules: one short LoRA SFT run of SmolLM2 (test_sft_cli, test_gguf_cli)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import run_cli


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, shared_data, smollm_gguf) -> Path:
    """The shipped recipe cut to 2 steps on 40 Alpaca records (about a minute)."""
    root = tmp_path_factory.mktemp("sft")
    recipe = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "recipes" / "smollm2-lora-alpaca.yaml").read_text()
    )
    recipe["model"]["path"] = str(smollm_gguf)
    recipe["data"].update(
        path=str(shared_data / "instruct" / "alpaca_data_1k.json"),
        limit=40,
        eval_size=6,
        max_length=128,
        num_samples=1,
        sample_max_new_tokens=8,
    )
    recipe["train"].update(max_steps=2, batch_size=2, log_every=1)
    recipe["optim"]["lr"] = 1e-4
    recipe["eval"] = {"every": 2, "batch_size": 4}
    recipe["output"] = {"dir": str(root / "run"), "progress": False}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_cli("train", root / "recipe.yaml", cwd=root, timeout=900)
    return root / "run"
