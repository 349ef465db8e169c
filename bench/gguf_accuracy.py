"""GGUF export accuracy on a trained run: the file in each dtype, read back by transformers' GGUF loader and by
llama.cpp (llama-cpp-python), against the merged Hugging Face export on the run's held-out examples (each in
its own forward, every position), and llama.cpp's greedy tokens against `tunelab generate`'s. One JSON line.

    python bench/gguf_accuracy.py runs/smollm2-lora-alpaca [--dtypes fp32,fp16,bf16,q8_0] [--no-llama-cpp]

Per dtype: `file_mb`; `transformers` and `llama_cpp`: `max_abs_diff` (largest |logit - merged logit|),
`top1` (fraction of positions whose argmax agrees with the merged model's), `positions`; `llama_cpp.greedy`:
prompts whose first `--new-tokens` greedy tokens (or up to EOS) equal the run's own (`tunelab generate`).
`merged_max_abs_logit` gives the scale. Not a speed benchmark: nothing here is timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Give three tips for staying healthy.", "Name three primary colours."]


def compare(got: list, want: list) -> dict:
    import torch

    diff = max((g - w).abs().max().item() for g, w in zip(got, want))
    agree = torch.cat([g.argmax(-1) == w.argmax(-1) for g, w in zip(got, want)])
    return {"max_abs_diff": diff, "top1": round(agree.float().mean().item(), 5), "positions": agree.numel()}


def greedy_llama_cpp(llm, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    llm.reset()
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(token)
        if token == llm.token_eos() or len(out) == n:
            return out
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--dtypes", default="fp32,fp16,bf16,q8_0")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--examples", type=int, default=0, help="the first N held-out examples (default: all)")
    p.add_argument("--no-llama-cpp", action="store_true")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.config import load_config
    from tunelab.data.base import build_data
    from tunelab.data.chat import prompt_ids
    from tunelab.export import export_run
    from tunelab.export.gguf import export_gguf
    from tunelab.models import load_model_folder
    from tunelab.tokenizers import load_hf_tokenizer

    torch.set_grad_enabled(False)
    cfg = load_config(args.run_dir / "config.yaml")
    cfg.output.progress = False
    held_out = [ids for ids, _ in build_data(cfg).eval.examples][: args.examples or None]
    out = Path(tempfile.mkdtemp(prefix="gguf-accuracy-"))
    merged = AutoModelForCausalLM.from_pretrained(export_run(args.run_dir, output=out / "merged", merge=True),
                                                  dtype=torch.float32).eval()  # fmt: skip
    want = [merged(input_ids=torch.tensor([ids])).logits[0] for ids in held_out]
    del merged
    use_llama_cpp = not args.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None
    if use_llama_cpp:  # the run's own greedy tokens, as `tunelab generate RUN` computes them
        tok = load_hf_tokenizer(str(args.run_dir / "final"))
        tuned = load_model_folder(args.run_dir / "final").eval()
        prompts = [prompt_ids(tok, prompt)[0].tolist() for prompt in PROMPTS]
        ours = []
        for ids in prompts:
            new = tuned.generate(input_ids=torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):]  # fmt: skip
            ours.append(new.tolist())
        del tuned

    result: dict = {"run": str(args.run_dir), "examples": len(held_out),
                    "merged_max_abs_logit": max(w.abs().max().item() for w in want)}  # fmt: skip
    for dtype in args.dtypes.split(","):
        print(f"gguf_accuracy: {dtype}", file=sys.stderr, flush=True)
        path = export_gguf(args.run_dir, output=out / f"model-{dtype}.gguf", dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        got = [model(input_ids=torch.tensor([ids])).logits[0] for ids in held_out]
        del model
        entry = {"file_mb": round(path.stat().st_size / 2**20, 1), "transformers": compare(got, want)}
        if use_llama_cpp:
            from llama_cpp import Llama

            llm = Llama(model_path=str(path), n_ctx=max(map(len, held_out)) + 64, n_threads=2, logits_all=True,
                        verbose=False)  # fmt: skip
            try:
                got = []
                for ids in held_out:
                    llm.reset()
                    llm.eval(ids)
                    got.append(torch.from_numpy(llm.scores[: len(ids)].copy()))
                entry["llama_cpp"] = compare(got, want)
                same = [greedy_llama_cpp(llm, ids, args.new_tokens) == mine for ids, mine in zip(prompts, ours)]
                entry["llama_cpp"]["greedy"] = f"{sum(same)}/{len(same)}"
            finally:
                llm.close()
        result[dtype] = entry
        path.unlink()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
