"""Ship it: the short LoRA SFT run of SmolLM2 (conftest.py's `sft_run`) -> `tunelab export --format gguf` ->
read back by transformers' GGUF loader (logits against the merged HF export on the run's held-out examples),
by llama.cpp (llama-cpp-python: the same first 20 greedy tokens as `tunelab generate` for three prompts) and
by tunelab itself (`tunelab generate FILE.gguf`). Measured bounds for the acceptance run: docs/sft.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.helpers import run_cli

PROMPTS = ["What is the capital of France?", "Give three tips for staying healthy.", "Name three primary colours."]


@pytest.fixture(scope="module")
def exports(sft_run, tmp_path_factory) -> dict[str, Path]:
    """The run as GGUF in fp32, fp16 and q8_0, and as the merged HF folder, all through the CLI."""
    out = tmp_path_factory.mktemp("ship")
    files = {dtype: Path(run_cli("export", sft_run, "--format", "gguf", "--dtype", dtype, "--output",
                                 out / f"run-{dtype}.gguf", timeout=900).stdout.strip().splitlines()[-1])
             for dtype in ("fp32", "fp16", "q8_0")}  # fmt: skip
    run_cli("export", sft_run, "--merge", "--output", out / "merged", timeout=900)
    return {**files, "merged": out / "merged"}


@pytest.mark.slow
def test_transformers_reads_each_gguf_back_with_the_merged_models_logits(sft_run, exports):
    from transformers import AutoModelForCausalLM

    from tunelab.config import load_config
    from tunelab.data.base import build_data

    cfg = load_config(sft_run / "config.yaml")
    cfg.output.progress = False
    held_out = [torch.tensor([ids]) for ids, _ in build_data(cfg).eval.examples]
    assert held_out
    merged = AutoModelForCausalLM.from_pretrained(exports["merged"], dtype=torch.float32).eval()
    with torch.no_grad():
        want = [merged(input_ids=ids).logits[0] for ids in held_out]
        for dtype in ("fp32", "fp16", "q8_0"):
            path = exports[dtype]
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            got = [model.eval()(input_ids=ids).logits[0] for ids in held_out]
            diff = max((g - w).abs().max().item() for g, w in zip(got, want))
            top1 = torch.cat([g.argmax(-1) == w.argmax(-1) for g, w in zip(got, want)]).float().mean().item()
            if dtype == "fp32":  # the same fp32 weights: fp32 noise at most (measured: 0)
                assert diff < 1e-4, diff
            else:  # bounds with margin over what docs/sft.md measured on the acceptance run
                assert diff < {"fp16": 0.5, "q8_0": 2.0}[dtype] and top1 > 0.9, (dtype, diff, top1)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install 'tunelab[gguf-run]' compiles llama.cpp once)")  # fmt: skip
def test_llama_cpp_generates_what_tunelab_generates(sft_run, exports):
    from llama_cpp import Llama

    from tunelab.data.chat import prompt_ids
    from tunelab.tokenizers import load_hf_tokenizer

    tok = load_hf_tokenizer(str(sft_run / "final"))
    llm = Llama(model_path=str(exports["fp32"]), n_ctx=512, n_threads=2, verbose=False)
    try:
        for prompt in PROMPTS:
            ids = prompt_ids(tok, prompt)[0].tolist()
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False)  # fmt: skip
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # llama.cpp's own tokenizer
            tokens: list[int] = []
            llm.reset()
            for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
                tokens.append(token)
                if token == llm.token_eos() or len(tokens) == 20:
                    break
            ours = run_cli("generate", sft_run, "--prompt", prompt, "--max-new-tokens", "20").stdout
            assert ours.strip() == tok.decode(tokens, skip_special_tokens=True).strip(), prompt
    finally:
        llm.close()


@pytest.mark.slow
def test_a_gguf_tunelab_wrote_is_a_tunelab_model_source(sft_run, exports, tmp_path):
    import os

    env = {**os.environ, "TUNELAB_CACHE": str(tmp_path / "cache")}  # converted once, beside the test
    args = ["--prompt", PROMPTS[0], "--max-new-tokens", "20"]
    from_gguf = run_cli("generate", exports["fp32"], *args, env=env).stdout
    assert from_gguf == run_cli("generate", sft_run, *args).stdout and "Paris" in from_gguf


@pytest.mark.slow
def test_the_file_carries_what_the_source_gguf_carries(exports, smollm_gguf):
    """Against the GGUF the run started from (written by llama.cpp's converter): the same tensor names, and
    every llama.* hyperparameter and tokenizer.* field (vocabulary, types, merges, ids, chat template, pre)."""
    import gguf

    source, ours = gguf.GGUFReader(str(smollm_gguf)), gguf.GGUFReader(str(exports["q8_0"]))
    assert {t.name for t in ours.tensors} == {t.name for t in source.tensors}
    keys = [k for k in source.fields if k.startswith(("llama.", "tokenizer."))]
    written = [k for k in keys if k in ours.fields]
    assert set(keys) - set(written) == {"tokenizer.ggml.add_space_prefix"}  # llama.cpp's BPE never adds one
    for key in written:
        assert ours.fields[key].contents() == source.fields[key].contents(), key
    assert ours.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
