"""`tunelab generate RUN_DIR_OR_MODEL --prompt "..."`: sample text from a run or a model, streamed.

Dispatches on the model source through the GENERATORS registry: the native GPT (a run's own tokenizer) and
Hugging Face causal LMs (the run's prompt template or the model's chat template; a folder, GGUF file or hub
id works too). Says on stderr why generation stopped: at EOS or at the token limit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tunelab.commands.common import add_trust_code
from tunelab.errors import ConfigError, TunelabError
from tunelab.registry import COMMANDS, GENERATORS


def _stop_reason(ended: bool, max_new_tokens: int) -> str:
    return "[stopped at EOS]" if ended else f"[stopped at --max-new-tokens {max_new_tokens} before EOS]"


@GENERATORS.register("gpt")
def generate_gpt(target: str, args: argparse.Namespace) -> None:
    """A native GPT run: its model and tokenizer, one sample printed."""
    import torch

    from tunelab.run import load_run
    from tunelab.tokenizers import load_run_tokenizer

    run = load_run(target, which="best" if args.best else "final", with_data=False, trust_code=args.trust_code)
    tokenizer = load_run_tokenizer(Path(run.run_dir))
    model = run.model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    ids = tokenizer.encode(args.prompt) or [tokenizer.eos_id or 0]
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         eos_id=tokenizer.eos_id, generator=generator)
    new = out[0, len(ids):].tolist()
    print(tokenizer.decode(out[0].tolist()))
    print(_stop_reason(bool(new) and tokenizer.eos_id is not None and new[-1] == tokenizer.eos_id,
                       args.max_new_tokens), file=sys.stderr)


def _run_template(target: str) -> str:
    """The prompt template a run was trained with (`data.template`), else the chat template."""
    from tunelab.paths import resolve_path

    cfg = resolve_path(target) / "config.yaml"
    if cfg.is_file():
        import yaml

        data = (yaml.safe_load(cfg.read_text()) or {}).get("data") or {}
        return str(data.get("template") or "chat")
    return "chat"


@GENERATORS.register("hf_causal_lm")
def generate_hf(target: str, args: argparse.Namespace) -> None:
    """A Hugging Face causal LM (a run, a folder, a GGUF file or a hub id): the reply streamed to stdout."""
    from tunelab.data.chat import prompt_ids
    from tunelab.models.llm import generate_ids, load_for_generation

    model, tokenizer = load_for_generation(target, "best" if args.best else "final", trust_code=args.trust_code)

    def echo(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    ids = prompt_ids(tokenizer, args.prompt, template="none" if args.no_chat else _run_template(target))
    _, ended = generate_ids(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p or 1.0, top_k=args.top_k, stream=echo, seed=args.seed)
    sys.stdout.write("\n")
    print(_stop_reason(ended, args.max_new_tokens), file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from tunelab.paths import resolve_path

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    # bytes that are not UTF-8 reach Python as lone surrogates, which tokenizers refuse: read them as U+FFFD
    args.prompt = args.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: must be at least 1")
    target = resolve_path(args.target)  # keeps pkg://... (Path() would fold its '//')
    local = args.target.startswith((".", "/", "~", "pkg://")) or (str(target.parent) != "." and target.parent.is_dir())
    if local and not target.exists():
        # a local-looking path that is not there (`runs/quickstrat`): say so now rather than ask the hub
        raise TunelabError(f"{args.target}: no such run folder, model folder or file")
    name = "hf_causal_lm"
    if (target / "config.yaml").is_file():
        from tunelab.config import load_config

        name = load_config(target / "config.yaml").model.name.split(":")[0]
    GENERATORS.get(name)(args.target, args)
    return 0


@COMMANDS.register("generate")
def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="sample text from a run or a model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("target", help="run dir, model folder, GGUF file or hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="send the prompt as raw text, without the chat template")
    p.add_argument("--best", action="store_true", help="use best/ instead of final/")
    add_trust_code(p)
    p.set_defaults(func=run)
