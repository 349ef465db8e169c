"""Preference tuning through the CLI on a tiny Llama (SmolLM2's tokenizer and chat template, random weights)
and real HH-RLHF pairs: metrics, `tunelab eval`, bit-identical resume after SIGKILL, and bad input.

The acceptance run (SmolLM2-135M-Instruct, held-out reward accuracy) is recipes/smollm2-dpo-hh.yaml, see
docs/sft.md; here only the machinery is exercised, in seconds per run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, assert_one_line_error, kill_once_written, run_cli, same_weights

EVAL_KEYS = {"loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logp_chosen",
             "logp_rejected"}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, smollm_gguf) -> Path:
    """A 2-layer Llama with SmolLM2's vocabulary, saved as a Hugging Face folder with the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.tokenizers import load_hf_tokenizer

    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tok = load_hf_tokenizer(str(smollm_gguf))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """A private tunelab cache (precomputed reference log-probabilities land there)."""
    return {**os.environ, "TUNELAB_CACHE": str(tmp_path_factory.mktemp("cache")), "TUNELAB_MALLOC": "system"}


def recipe(tmp: Path, tiny_lm: Path, shared_data: Path, **sections) -> Path:
    cfg = yaml.safe_load((REPO / "recipes" / "smollm2-dpo-hh.yaml").read_text())
    cfg["model"].update(path=str(tiny_lm), gradient_checkpointing=False)
    cfg["data"].update(path=str(shared_data / "preference" / "hh_harmless_base_test.jsonl.gz"), limit=32,
                       eval_size=8, max_length=64)
    cfg["train"].update(max_steps=6, batch_size=4, log_every=1)
    cfg["optim"]["lr"] = 1e-3
    cfg["eval"].update(every=3, batch_size=8)
    cfg["output"] = {"dir": str(tmp / "run"), "progress": False}
    for key, value in sections.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg.setdefault(key, {}).update(value)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


TIMING = {"time", "samples_per_s", "step_time_s", "data_wait_frac", "tokens_per_s"}


def events(out: Path, kinds=("train", "eval", "best")) -> list[dict]:
    """metrics.jsonl's events of these kinds, without the timing fields."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows if r["event"] in kinds]


def test_dpo_lora_run_logs_preference_metrics_and_eval_reproduces_them(tmp_path, tiny_lm, shared_data, env):
    path = recipe(tmp_path, tiny_lm, shared_data)
    run_cli("train", path, env=env)
    out = tmp_path / "run"
    start = next(e for e in events(out, ("start",)))
    assert start["data"]["train_pairs"] == 24 and start["data"]["eval_pairs"] == 8
    assert start["data"]["prompts_truncated"] > 0  # max_length 64 cuts HH prompts
    evals = events(out, ("eval",))
    assert [e["step"] for e in evals] == [3, 6]
    assert EVAL_KEYS | {"drift"} <= set(evals[-1])
    assert 0 <= evals[-1]["reward_accuracy"] <= 1 and evals[-1]["logp_chosen"] < 0
    assert evals[-1]["drift"] != 0  # the policy moved away from its reference
    assert (out / "final" / "adapter_config.json").is_file()
    proc = run_cli("eval", out, env=env)
    again = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in EVAL_KEYS | {"drift"}:
        assert again[key] == pytest.approx(evals[-1][key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_reference_free_tasks_train_without_a_reference(tmp_path, tiny_lm, shared_data, env, name):
    path = recipe(tmp_path, tiny_lm, shared_data)
    cfg = yaml.safe_load(path.read_text())
    cfg["task"] = {"name": name, "beta": 0.1}
    cfg["train"]["max_steps"] = 3
    path.write_text(yaml.safe_dump(cfg))
    run_cli("train", path, env=env)
    last = events(tmp_path / "run", ("eval",))[-1]
    assert EVAL_KEYS <= set(last) and "drift" not in last


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "full_precomputed"])
def test_sigkill_and_resume_is_bit_identical(tmp_path, tiny_lm, shared_data, env, variant):
    extra = {} if variant == "lora" else {"strategy": None, "task": {"precompute_ref": True}}
    over = ["train.max_steps=16", "train.checkpoint_every=4", "eval.every=8", "train.log_every=2",
            "train.batch_size=2"]
    ref_dir, killed = tmp_path / "ref", tmp_path / "killed"
    path = recipe(tmp_path, tiny_lm, shared_data, **extra)
    run_cli("train", path, *over, f"output.dir={ref_dir}", env=env)
    kill_once_written(killed / "checkpoints" / "step-8", "train", path, *over, f"output.dir={killed}", env=env)
    assert not (killed / "final").exists()
    run_cli("train", path, *over, f"output.dir={killed}", "--resume", env=env)
    weights = "adapter_model.safetensors" if variant == "lora" else "model.safetensors"
    assert same_weights(ref_dir / "final" / weights, killed / "final" / weights)
    assert events(ref_dir) == events(killed)  # metrics.jsonl was trimmed to the checkpoint and continued


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def test_bad_preference_input_is_one_line_and_leaves_the_run_dir_untouched(tmp_path, tiny_lm, shared_data, env):
    path = recipe(tmp_path, tiny_lm, shared_data)
    cases = [
        ([{"prompt": "hi", "chosen": "a", "rejected": "b"}, {"prompt": "hi", "chosen": "a"}],
         [], "1 record lacks `rejected` (record 1)"),
        ([{"prompt": "hi", "chosen": "a", "rejected": "b"}, {"prompt": "hi", "chosen": "x", "rejected": "x"}],
         [], "1 record has identical chosen and rejected replies (record 1)"),
        ([{"prompt": "word " * 200, "chosen": "a", "rejected": "b"}] * 2,
         ["data.truncate_prompt=false"], "2 records have a prompt that leaves no room for a reply within "
                                         "data.max_length=64"),
    ]
    for i, (records, over, fragment) in enumerate(cases):
        data = tmp_path / f"bad{i}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        out = tmp_path / f"out{i}"
        proc = run_cli("train", path, f"data.path={data}", "data.eval_size=0", *over, f"output.dir={out}",
                       check=False, env=env)
        line = assert_one_line_error(proc, fragment)
        assert str(data) in line
        assert not out.exists() or {p.name for p in out.iterdir()} <= {".tunelab"}  # at most the folder's marker


def test_resume_without_the_precomputed_reference_is_refused_before_touching_the_run(tmp_path, tiny_lm,
                                                                                     shared_data):
    env = {**os.environ, "TUNELAB_CACHE": str(tmp_path / "cache"), "TUNELAB_MALLOC": "system"}
    path = recipe(tmp_path, tiny_lm, shared_data, strategy=None, task={"precompute_ref": True})
    run_cli("train", path, "train.max_steps=2", env=env)
    cached = list((tmp_path / "cache" / "preference").glob("*.safetensors"))
    assert len(cached) == 2  # train and eval pairs
    for f in cached:
        f.unlink()
    before = tree_digest(tmp_path / "run")
    proc = run_cli("train", path, "train.max_steps=2", "--resume", check=False, env=env)
    assert_one_line_error(proc, "the reference log-probabilities this run started with are gone from the cache")
    assert tree_digest(tmp_path / "run") == before
