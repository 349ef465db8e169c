"""Tokenizers and the `tokens` data source: caching, windows, bad input, exact resume through the engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tunelab.config import load_config
from tunelab.data.tokens import TokensOptions, TokenWindows, prepare_tokens
from tunelab.errors import ConfigError, DataError
from tunelab.tokenizers import build_tokenizer, load_text_tokenizer, token_dtype

BLOCK = 32


@pytest.fixture(scope="session")
def corpus(shared_data) -> Path:
    return shared_data / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


def recipe(corpus: Path, cache: Path, out: Path, **data) -> dict:
    return {
        "name": "t",
        "model": {"name": "gpt", "size": None, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": BLOCK},
        "data": {"name": "tokens", "path": str(corpus), "tokenizer": "char", "cache_dir": str(cache), **data},
        "task": {"name": "causal_lm"},
        "optim": {"lr": 3e-3, "weight_decay": 0.1},
        "schedule": {"name": "cosine", "warmup_steps": 2},
        "train": {
            "max_steps": 6,
            "batch_size": 4,
            "clip_grad_norm": 1.0,
            "checkpoint_every": 3,
            "log_every": 1,
        },
        "eval": {"every": 3, "max_batches": 2},
        "output": {"dir": str(out), "progress": False, "tensorboard": False},
        "doctor": {"enabled": False},
        "report": {"enabled": False},
    }


def test_char_tokens_cached_and_split(corpus, cache):
    opts = TokensOptions(path=str(corpus), cache_dir=str(cache))
    folder = prepare_tokens(opts)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["vocab_size"] == 65 and meta["dtype"] == "uint16"
    assert meta["n_train"] + meta["n_val"] == 1_115_394  # one token per character
    assert meta["n_val"] == pytest.approx(111_540, abs=1)
    stamp = (folder / "train.bin").stat().st_mtime_ns
    assert prepare_tokens(opts) == folder and (folder / "train.bin").stat().st_mtime_ns == stamp  # cached

    tok = load_text_tokenizer(folder / "tokenizer")
    windows = TokenWindows(folder / "train.bin", np.uint16, BLOCK, stride=1)
    assert len(windows) == meta["n_train"] - BLOCK
    sample = windows[1000]
    assert torch.equal(sample["labels"][:-1], sample["input_ids"][1:])  # labels already shifted
    text = corpus.read_text()
    assert tok.decode(sample["input_ids"].tolist()) == text[1000 : 1000 + BLOCK]
    seq = TokenWindows(folder / "train.bin", np.uint16, BLOCK, stride=BLOCK)
    assert len(seq) == (meta["n_train"] - BLOCK - 1) // BLOCK + 1
    assert tok.decode(seq[2]["input_ids"].tolist()) == text[2 * BLOCK : 3 * BLOCK]


def test_bpe_round_trip_and_save(corpus, tmp_path):
    text = corpus.read_text()[:200_000]
    tok = build_tokenizer("bpe", text, vocab_size=400)
    assert tok.vocab_size == 400 and tok.eos_id == 0
    ids = tok.encode_corpus(text)
    assert len(ids) < len(text) * 0.7  # merges compress
    assert tok.decode(ids.tolist()) == text
    assert ids.tolist() == tok.encode(text)  # chunked corpus encoding == one-shot encoding
    back = load_text_tokenizer(tok.save(tmp_path / "tok"))
    assert back.fingerprint() == tok.fingerprint() and back.encode("Romeo") == tok.encode("Romeo")


def test_hf_tokenizer_by_path(minilm_path):
    tok = build_tokenizer(str(minilm_path), "unused")
    assert tok.vocab_size == 30522 and tok.decode(tok.encode("hello world")) == "hello world"


def test_token_dtype_limits():
    assert token_dtype(65) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(128_256) == np.uint32
    with pytest.raises(ConfigError, match="does not fit `data.dtype` = uint16"):
        token_dtype(70_000, "uint16")


def test_corpus_shorter_than_one_block(tmp_path, cache):
    from tunelab.run import build_run

    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.\n")
    cfg = load_config(recipe(short, cache, tmp_path / "out", val_fraction=0.0))
    with pytest.raises(DataError, match=r"shorter than one window \(block_size \+ 1 = 33\)"):
        build_run(cfg)


def test_unknown_character_and_bad_tokenizer(tmp_path, corpus):
    tok = build_tokenizer("char", "abc")
    with pytest.raises(DataError, match="'z' is not in this character-level vocabulary"):
        tok.encode("abz")
    with pytest.raises(ConfigError, match="neither `char`, `bpe` nor"):
        build_tokenizer(str(tmp_path / "nope"), "abc")
    with pytest.raises(ConfigError, match="needs `data.vocab_size`"):
        build_tokenizer("bpe", "abc")


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def threaded(spec: dict, threads: int) -> dict:
    spec["train"]["batch_threads"] = threads
    return spec


@pytest.mark.parametrize("threads", [1, 2])  # 2: each batch's forward and backward in two threads
def test_exact_resume_and_tokenizer_guard(corpus, cache, tmp_path, threads):
    from tunelab.run import train

    full = tmp_path / "full"
    s_full = train(load_config(threaded(recipe(corpus, cache, full), threads)))
    assert s_full["global_step"] == 6
    assert json.loads((full / "tokenizer" / "tunelab_tokenizer.json").read_text())["vocab_size"] == 65
    assert load_config(full / "config.yaml").model.kwargs["vocab_size"] == 65  # from the tokenizer
    assert s_full["tflops"] > 0  # the FLOPs callback

    # the same run, interrupted after the step-3 checkpoint, then resumed
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step-6")
    shutil.rmtree(part / "final")
    s_resumed = train(load_config(threaded(recipe(corpus, cache, part), threads)), resume=True)
    assert s_resumed["global_step"] == 6
    a, b = _final_weights(full), _final_weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert s_resumed["metrics"]["loss"] == pytest.approx(s_full["metrics"]["loss"], abs=1e-6)

    # resuming with another tokenizer is refused
    bpe = recipe(corpus, cache, part, tokenizer="bpe", vocab_size=300)
    bpe["model"]["vocab_size"] = 300
    with pytest.raises(DataError, match="different tokenizer"):
        train(load_config(bpe), resume=True)
