"""Plan accuracy: `tunelab plan`'s predicted training memory against the measured peak.

Two figures per case. The process total: the plan's `process_peak_bytes` (its baseline of interpreter,
libraries, tokenizer and data, plus the peak) against the training process's peak RSS (`ru_maxrss`, what
summary.json's `peak_rss_mb` and `top` show a user), within +-20%. The growth (below), which isolates the
breakdown from the baseline.

CPU: the growth of the process RSS during `Trainer.fit` (sampled every 2 ms) over the RSS just before it,
with the model and data already loaded, every weight page read (safetensors weights may be memory-mapped
and become resident only when first read) and the optimizer module imported; the plan's comparable figure is its total minus the weights
(gradients + optimizer states + activations + working space). Beside RSS, the growth of what glibc's
malloc has handed out and not had back (mallinfo2: heap in use + mmapped blocks), i.e. the live bytes
without the free holes the heap keeps resident. GPU: torch.cuda.max_memory_allocated
against the plan's total. Each side runs in its own subprocess; one JSON line per case, then a final one.

    python bench/plan_accuracy.py                   # text classification, SFT (LoRA), GPT pretraining
    python bench/plan_accuracy.py --only sst2 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tunelab.allocator import preload_env

REPO = Path(__file__).resolve().parents[1]

# Short, eval-light versions of the recipes: memory per step does not depend on the number of steps.
CASES = {
    "sst2": ("recipes/sst2-minilm.yaml", ["data.max_rows=512"]),
    "sft": ("recipes/smollm2-lora-alpaca.yaml", ["data.num_samples=0"]),
    "pretrain": ("recipes/gpt-shakespeare-char.yaml", ["train.compile=false"]),  # the plan probes eager mode
}
COMMON = [
    "eval.batch_size=1",
    "eval.max_batches=1",
    "output.progress=false",
    "output.tensorboard=false",
    "report.enabled=false",
    "doctor.enabled=false",
]

MEASURE = r"""
import ctypes, json, sys, threading, time
import torch
from tunelab.config import load_config
from tunelab.run import build_run, make_trainer

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
try:  # glibc: bytes malloc has handed out and not had back (heap in use + mmapped blocks)
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _MallInfo2
    def live():
        m = _libc.mallinfo2()
        return m.uordblks + m.hblkhd
except (OSError, AttributeError):
    live = None
from tunelab.allocator import active
if active() == "mimalloc":
    live = None  # glibc's counters no longer see the tensors: RSS is the measure

cfg = load_config(sys.argv[1], sys.argv[2:])
import shutil
shutil.rmtree(cfg.output_dir, ignore_errors=True)  # the benchmark's own scratch folder: a fresh run each time
run = build_run(cfg, log=lambda m: None)
trainer = make_trainer(run)
peak, live_peak, stop = [0], [0], [False]
def sample():
    n = 0
    while not stop[0]:
        peak[0] = max(peak[0], rss())
        if live is not None and n % 5 == 0:  # mallinfo2 walks the heap's free lists: every 10 ms
            live_peak[0] = max(live_peak[0], live())
        n += 1
        time.sleep(0.002)
# Pay the one-time imports before the baseline: building the first torch.optim optimizer imports
# torch._dynamo/sympy (~150 MB of Python modules on torch 2.14), which is not memory of the training step.
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
# Weights loaded from safetensors can stay memory-mapped, their pages resident only once read: read every
# one now, so that the growth below is training memory, not the weights the plan counts apart.
with torch.no_grad():
    for t in list(run.model.parameters()) + list(run.model.buffers()):
        t.sum()
base = rss()
live_base = live() if live is not None else 0
t = threading.Thread(target=sample, daemon=True)
t.start()
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
trainer.fit()
stop[0] = True
t.join()
import resource
out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": base / 2**20, "rss_growth_mb": (peak[0] - base) / 2**20, "malloc": active()}
if live is not None:
    out["malloc_live_growth_mb"] = (live_peak[0] - live_base) / 2**20
if torch.cuda.is_available():
    out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
print(json.dumps(out))
"""


def _last_json(cmd: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=sorted(CASES))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default="/tmp/tunelab-plan-accuracy")
    p.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="measure with glibc MALLOC_MMAP_THRESHOLD_=N (bytes): freed large blocks go back to the "
        "OS, so RSS follows live tensor memory instead of the heap's high-water mark",
    )
    p.add_argument(
        "--malloc", choices=["default", "system"], default="default",
        help="the training process's malloc (default: mimalloc on Linux, as `tunelab train` runs it)",
    )
    args = p.parse_args()
    rows = []
    for name in args.only or list(CASES):
        recipe, extra = CASES[name]
        if not (REPO / recipe).is_file():
            print(json.dumps({"case": name, "skipped": f"{recipe} not found"}))
            continue
        overrides = extra + COMMON + [f"train.max_steps={args.steps}", f"output.dir={args.out}/{name}"]
        plan = _last_json([sys.executable, "-m", "tunelab.cli", "plan", recipe, *overrides, "--json"])
        env = dict(os.environ)
        if args.mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        elif args.malloc == "default":  # what `tunelab train` runs on (tunelab/allocator.py)
            env = preload_env(env) or env
        measured = _last_json([sys.executable, "-c", MEASURE, recipe, *overrides], env)
        predicted = (plan["total_bytes"] - plan["weights_bytes"]) / 2**20  # the training-time growth
        row = {
            "case": name,
            "recipe": recipe,
            "micro_batch": plan["micro_batch"],
            "seq_len": plan["seq_len"],
            "trainable_params": plan["trainable_params"],
            "pred_weights_mb": round(plan["weights_bytes"] / 2**20, 1),
            "pred_gradients_mb": round(plan["gradients_bytes"] / 2**20, 1),
            "pred_optimizer_mb": round(plan["optimizer_bytes"] / 2**20, 1),
            "pred_activations_mb": round(plan["activations_bytes"] / 2**20, 1),
            "pred_working_mb": round(plan["overhead_bytes"] / 2**20, 1),
            "pred_index_lists_mb": round(plan["data_index_bytes"] / 2**20, 1),
            "predicted_growth_mb": round(predicted, 1),
            "measured_rss_growth_mb": round(measured["rss_growth_mb"], 1),
            "error_pct": round(100 * (predicted - measured["rss_growth_mb"]) / measured["rss_growth_mb"], 1),
            # what the process's tensors and buffers held (glibc mallinfo2), without the heap's free holes
            "measured_malloc_live_growth_mb": round(measured.get("malloc_live_growth_mb", float("nan")), 1),
            "predicted_process_peak_mb": round(plan["process_peak_bytes"] / 2**20, 1),
            "measured_peak_rss_mb": round(measured["peak_rss_mb"], 1),
            "total_error_pct": round(100 * (plan["process_peak_bytes"] / 2**20 - measured["peak_rss_mb"])
                                     / measured["peak_rss_mb"], 1),
            "malloc": measured["malloc"],
            "malloc_mmap_threshold": args.mmap_threshold,
        }
        if "gpu_peak_mb" in measured:
            row["predicted_total_mb"] = round(plan["total_bytes"] / 2**20, 1)
            row["measured_gpu_peak_mb"] = round(measured["gpu_peak_mb"], 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(
        json.dumps(
            {
                "bench": "plan_accuracy",
                "cases": [r["case"] for r in rows],
                "error_pct": {r["case"]: r["error_pct"] for r in rows},
                "all_within_20pct": all(abs(r["error_pct"]) <= 20 for r in rows),
                "total_error_pct": {r["case"]: r["total_error_pct"] for r in rows},
                "all_totals_within_20pct": all(abs(r["total_error_pct"]) <= 20 for r in rows),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
