"""LoRA DPO side by side: TRL's DPOTrainer (its defaults) and tunelab, each in its own subprocess.

    python bench/dpo.py                                   # both sides on HH-RLHF harmless-base pairs
    python bench/dpo.py --steps 2 --eval-size 8 --max-length 96   # a quick smoke run
    python bench/dpo.py --acceptance runs/smollm2-dpo-hh   # untrained vs trained held-out reward accuracy

Both sides train SmolLM2-135M-Instruct (the cached fp32 folder converted from the packaged GGUF) with the same
LoRA config (r16, alpha 32, no dropout, all linear layers; the reference is the model with its adapters
disabled), the same training pairs (HH dialogues split at their longest common prefix of turns by
tunelab.data.preference, given to TRL as conversational prompt/chosen/rejected records), the model's chat
template, the same max length per sequence, micro-batch, accumulation, steps, constant LR, beta, sigmoid loss,
gradient clipping at 1.0, seed and fp32 numerics (TRL's CPU default would be bf16 autocast: switched off so
both sides compute the same thing). Each tool's own defaults otherwise: TRL checkpoints activations
(gradient_checkpointing=True), pads the two sequences of each pair as separate rows and, over max_length,
keeps a sequence's end (`truncation_mode="keep_end"`, so, like tunelab, it cuts the prompt's start first);
tunelab computes the prompt once per pair (data.layout shared_prompt), uses selective checkpointing, the
fused head + log-softmax, and mimalloc as `tunelab train` does on Linux (`--peer-malloc mimalloc` gives it
to TRL too).

Measured per side: `tokens_per_s` = the pairs' non-padding tokens (2 x prompt + both replies, as each side
tokenised and truncated them) / wall time from the first to the last training step (loading and evaluation
excluded); `peak_rss_mb` = the process's peak resident memory up to the end of training; `reward_accuracy`
(and margin) on the same held-out pairs, computed after training by the same code (tunelab's DPO metrics:
ties count half) for both sides. One JSON line per side (stderr), then one final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from repeats import summarize
from sft import (
    GGUF,
    REPO,
    fit_timed,
    measured,
    peak_rss_mb,
    run_sides,
    split_records,
    trl_arguments,
    trl_timer,
)

DATA = REPO.parent / "shared" / "data" / "preference" / "hh_harmless_base_test.jsonl.gz"
SIDES = ("peer", "ours")
EVAL_KEYS = ("reward_accuracy", "reward_margin", "loss")
# The final line's figures, each computed per repeat (then the median over repeats)
FIGURES = {
    "speedup": lambda r: r["ours"]["tokens_per_s"] / r["peer"]["tokens_per_s"],
    "cpu_speedup": lambda r: r["ours"]["tokens_per_cpu_s"] / r["peer"]["tokens_per_cpu_s"],
    "rss_ratio": lambda r: r["ours"]["peak_rss_mb"] / r["peer"]["peak_rss_mb"],
    "reward_accuracy_delta": lambda r: r["ours"]["reward_accuracy"] - r["peer"]["reward_accuracy"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=SIDES, help="run one side in this process (used by the parent)")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="run the sides round-robin N times; report medians")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256, help="tokens per sequence (prompt + one reply)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--eval-size", type=float, default=0.1, help="held-out pairs: a fraction or a count")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--peer-malloc", choices=["system", "mimalloc"], default="system",
                   help="TRL's malloc (default: the system's, as a TRL user gets)")
    p.add_argument("--ours-malloc", choices=["default", "system"], default="default",
                   help="tunelab's malloc (default: mimalloc on Linux, as `tunelab train` runs it)")
    p.add_argument("--acceptance", metavar="RUN_DIR", help="check a finished LoRA DPO run against the issue's bar")
    return p.parse_args(argv)


# -- shared pieces (same code for both sides) --------------------------------------------------------------------
def held_out_metrics(model, tokenizer, records: list[dict], args: argparse.Namespace) -> dict:
    """tunelab's DPO metrics on the held-out pairs, the reference being `model` with its adapters disabled."""
    import torch

    from tunelab.data.preference import (
        PairEncoder,
        PreferenceCollator,
        PreferenceDataset,
        PreferenceOptions,
        encode_pairs,
    )
    from tunelab.tasks.preference import DPOTask

    enc = PairEncoder(tokenizer, PreferenceOptions(path="eval", max_length=args.max_length))
    ds = PreferenceDataset(encode_pairs(records, enc, "eval", list(range(len(records)))))
    collate = PreferenceCollator(tokenizer.pad_token_id)
    task = DPOTask(beta=args.beta)  # unbound: the reference is the peft model with its adapters disabled
    metrics = task.metrics()
    model.eval()
    model.config.use_cache = False
    with torch.inference_mode():
        for i in range(0, len(ds), args.eval_batch_size):
            batch = collate([ds[j] for j in range(i, min(i + args.eval_batch_size, len(ds)))])
            out = task.forward(model, batch)
            metrics.update(out, batch, task.loss_sum(out, batch), task.count_targets(batch))
    return {k: v for k, v in metrics.compute().items() if k in EVAL_KEYS}


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def result(tokens: int, timer: dict, evaluation: dict) -> dict:
    out = measured(tokens, timer, float("nan"))
    del out["eval_loss"]
    return {**out, **evaluation}


# -- sides -------------------------------------------------------------------------------------------------------
def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from tunelab.data.preference import split_pair
    from tunelab.hub import resolve_model_path
    from tunelab.tokenizers import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(GGUF)
    train_recs, eval_recs = split_records(args)

    def conversational(i: int, r: dict) -> dict:
        turns, chosen, rejected = split_pair(r, i, "train")
        return {"prompt": turns, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    train_ds = Dataset.from_list([conversational(i, r) for i, r in enumerate(train_recs)])
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(GGUF), dtype=torch.float32)
    config = DPOConfig(
        **trl_arguments(args, "dpo"),
        beta=args.beta,
        loss_type=["sigmoid"],
        truncation_mode="keep_end",
        max_grad_norm=1.0,
    )
    timer: dict[str, float] = {}
    trainer = DPOTrainer(model=model, args=config, train_dataset=train_ds, processing_class=tokenizer,
                         peft_config=lora_config(), callbacks=[trl_timer(timer)])
    trainer.train()
    # TRL's own count of the attention-mask tokens it trained on (its data loader collates batches ahead of the
    # steps that use them, so counting in the collator would overcount)
    tokens = trainer._total_train_tokens
    return result(tokens, timer, held_out_metrics(trainer.model, tokenizer, eval_recs, args))


def run_ours(args: argparse.Namespace) -> dict:
    from tunelab.config import load_config
    from tunelab.run import build_run
    from tunelab.tokenizers import load_hf_tokenizer

    train_recs, eval_recs = split_records(args)
    tmp = Path(tempfile.gettempdir()) / f"bench-dpo-ours-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    data_file = tmp / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in train_recs))
    cfg = load_config({
        "name": "bench-dpo",
        "model": {"name": "hf_causal_lm", "path": GGUF},
        "data": {"name": "preference", "path": str(data_file), "max_length": args.max_length, "eval_size": 0},
        "task": {"name": "dpo", "beta": args.beta, "loss": "sigmoid"},
        "strategy": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                  "clip_grad_norm": 1.0, "seed": args.seed, "log_every": 1000, "checkpoints": False},
        "output": {"dir": str(tmp / "run"), "progress": False, "tensorboard": False},
        "doctor": {"enabled": False},
        "report": {"enabled": False},
    })
    run = build_run(cfg, log=lambda m: None)
    tokens, timer, trainer = fit_timed(
        run, lambda items: sum(2 * len(it["prompt"]) + len(it["chosen"]) + len(it["rejected"]) for it in items))
    return result(tokens, timer, held_out_metrics(trainer.raw_model, load_hf_tokenizer(GGUF), eval_recs, args))


def acceptance(run_dir: Path) -> dict:
    """The issue's bar on a finished LoRA DPO run: held-out reward accuracy of the untrained model (fresh
    adapters: identical to its reference, so every pair ties) and of the trained one, by the run's own eval
    pipeline; and each model's raw preference, the share of held-out pairs whose chosen reply it finds more
    likely than the rejected one (summed log-probabilities)."""
    import torch

    from tunelab.config import load_config
    from tunelab.data.base import build_data
    from tunelab.models import create_model, load_model_folder
    from tunelab.run import build_task_from_config
    from tunelab.strategies import build_strategy

    cfg = load_config(run_dir / "config.yaml")
    data = build_data(cfg)
    task = build_task_from_config(cfg, data)
    untrained, _ = build_strategy(cfg).setup(create_model(cfg.model.name, **cfg.model.kwargs))
    out = {}
    for name, model in (("untrained", untrained), ("trained", load_model_folder(run_dir / "final"))):
        model.eval()
        metrics, prefer, n = task.metrics(), 0.0, 0
        order = sorted(range(len(data.eval)), key=lambda i: data.eval_lengths[i])
        with torch.inference_mode():
            for s in range(0, len(order), 16):
                batch = data.collate_fn([data.eval[i] for i in order[s : s + 16]])
                logps = task.forward(model, batch)
                metrics.update(logps, batch, task.loss_sum(logps, batch), task.count_targets(batch))
                prefer += float((logps.chosen > logps.rejected).sum())
                n += len(logps.chosen)
        m = metrics.compute()
        out[name] = {"reward_accuracy": round(m["reward_accuracy"], 4), "reward_margin": round(m["reward_margin"], 4),
                     "likelihood_preference": round(prefer / n, 4), "pairs": n}
    return out


def run_side(args: argparse.Namespace) -> None:
    import torch

    from tunelab.allocator import active

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = run_ours(args) if args.side == "ours" else run_trl(args)
    print(json.dumps({"side": args.side, **out, "peak_rss_mb_incl_eval": peak_rss_mb(), "malloc": active()}),
          flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.acceptance:
        print(json.dumps(acceptance(Path(args.acceptance))))
        return
    if args.side:
        run_side(args)
        return
    final = summarize(run_sides(__file__, args, argv), FIGURES)
    final["config"] = {k: getattr(args, k) for k in ("steps", "batch_size", "grad_accum", "max_length", "lr", "beta",
                                                     "eval_size", "seed", "peer_malloc", "ours_malloc",
                                                     "repeats")}
    print(json.dumps(final))


if __name__ == "__main__":
    main()
