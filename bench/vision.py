"""Vision fine-tuning, side by side: the PyTorch transfer-learning tutorial loop vs tunelab's Trainer.

    .venv/bin/python bench/vision.py                                   # plain vs ours, 112 px, 40 steps, 3 repeats
    .venv/bin/python bench/vision.py --steps 8 --image-size 64         # a quick look
    .venv/bin/python bench/vision.py --sides plain,ours,ours_contiguous,ours_compile
    .venv/bin/python bench/vision.py --sides plain,ours,ours_nice0     # what the workers' lower priority buys
    .venv/bin/python bench/vision.py --repeats 1                       # one run per side

Same model (torchvision resnet18, random weights, 2-class head, full fine-tuning), same data (the
hymenoptera train folder, ImageFolder layout), same transforms (RandomResizedCrop + horizontal flip +
normalise, decoded with PIL in DataLoader workers), same batch size, SGD lr 0.001 momentum 0.9, fp32, same
seed. Each side runs in its own subprocess. Throughput is training images per second over the training
steps after the first `--warmup` (8) ones, each step timed from asking for the batch to the end of the
optimizer step (model building, evaluation and reports excluded on both sides). tunelab runs with
`train.log_every` = `--warmup`, so its metrics.jsonl windows line up with the plain loop's per-step times:
the first window is the warm-up, and the grad norm and the log line are paid once per window, as with
any logging interval (the default is 10). `ours` runs the model's defaults, so channels_last (NHWC) for a
CNN. Variants: `ours_contiguous` (model channels_last=false, the NCHW layout the tutorial loop uses),
`ours_compile` (train.compile=true; the first compile is in the warm-up steps, the recompile for the
last, smaller batch of an epoch is counted) and `ours_nice0` (train.worker_nice=0: the loader workers at the
training process's priority, as the tutorial loop runs them; `ours` runs the CPU default, nice 19).
The last line printed is one JSON object with every side's figures and the ratios.
With --repeats N (default 3) the sides alternate N times; each side shows its median run and keeps every run
(`runs`), and each ratio is the median of the per-repeat ratios (`ratio_per_repeat`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repeats import run_in_scratch  # bench/repeats.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DATA = (
    Path(os.environ.get("TUNELAB_SHARED_DATA", REPO.parent / "shared" / "data"))
    / "images"
    / "hymenoptera_data"
)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ---------------------------------------------------------------------------------------------------
# The sides (each runs in a child process)
# ---------------------------------------------------------------------------------------------------
def side_plain(args: argparse.Namespace) -> dict:
    """The loop of the PyTorch 'Transfer Learning for Computer Vision' tutorial, with its transforms."""
    import torch
    import torch.nn as nn
    from torchvision import datasets, models, transforms

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(args.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    dataset = datasets.ImageFolder(str(DATA / "train"), tf)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers
    )
    model = models.resnet18()
    model.fc = nn.Linear(model.fc.in_features, 2)
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    model.train()
    steps: list[tuple[int, float]] = []  # (images, seconds) per step
    while len(steps) < args.steps:
        it = iter(loader)
        while len(steps) < args.steps:
            t0 = time.perf_counter()
            try:
                inputs, labels = next(it)
            except StopIteration:
                break
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
            loss.item()  # the tutorial reads the loss every step (and it syncs the device)
            steps.append((len(labels), time.perf_counter() - t0))
    return rate(steps, args.warmup)


def rate(steps: list[tuple[int, float]], warmup: int) -> dict:
    """Images per second over the (images, seconds) entries after the first `warmup` ones."""
    kept = steps[warmup:]
    images, seconds = sum(n for n, _ in kept), sum(t for _, t in kept)
    return {"images_per_s": images / seconds, "timed_images": images, "train_s": round(seconds, 2)}


def side_ours(args: argparse.Namespace, variant: str) -> dict:
    sys.path.insert(0, str(REPO / "src"))
    from tunelab.config import load_config
    from tunelab.run import build_run, make_trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            {
                "name": "bench-vision",
                "model": {
                    "name": "torchvision:resnet18",
                    "num_classes": 2,
                    **({"channels_last": False} if variant == "ours_contiguous" else {}),
                },
                # the train folder alone: no eval split, so no evaluation or report on this side
                "data": {"name": "image_folder", "root": str(DATA / "train"), "image_size": args.image_size,
                         "resize_size": args.image_size, "verify_images": False},
                "optim": {"name": "sgd", "lr": 0.001, "momentum": 0.9, "no_decay": []},
                "train": {"max_steps": args.steps, "batch_size": args.batch_size, "num_workers": args.num_workers,
                          "seed": args.seed, "precision": "fp32", "device": args.device,
                          "compile": variant == "ours_compile", "log_every": args.warmup,
                          **({"worker_nice": 0} if variant == "ours_nice0" else {})},
                "output": {"dir": str(Path(tmp) / "run"), "progress": False, "tensorboard": False},
                "report": {"enabled": False},
                "doctor": {"enabled": False},
            }
        )  # fmt: skip
        run = build_run(cfg, log=lambda *_: None)
        make_trainer(run).fit()
        events = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    # one `train` event per window of log_every (= warmup) steps: step_time_s is the window's mean step time
    windows, prev = [], 0
    for e in (e for e in events if e["event"] == "train"):
        seconds = e["step_time_s"] * (e["step"] - prev)
        windows.append((round(e["samples_per_s"] * seconds), seconds))
        prev = e["step"]
    return rate(windows, 1)  # the first window is the warm-up


# ---------------------------------------------------------------------------------------------------
# The parent: one subprocess per side, one JSON line at the end
# ---------------------------------------------------------------------------------------------------
def run_side(side: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--image-size", str(args.image_size), "--num-workers", str(args.num_workers),
           "--seed", str(args.seed), "--device", args.device, "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
    if args.ours_malloc == "default" and side != "plain":  # ours runs on the malloc `tunelab train` picks
        from tunelab.allocator import preload_env

        env = preload_env() or dict(os.environ)
    else:
        env = dict(os.environ)
    t0 = time.time()
    proc = run_in_scratch(cmd, env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"side {side} failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.time() - t0, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", default="plain,ours")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=8, help="first steps left out of the timing (both sides); "
                   "also tunelab's log_every")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each side (0: torch's default)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side (alternating); medians reported")
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--ours-malloc", choices=["default", "system"], default="default",
                   help="tunelab's malloc (default: mimalloc on Linux, as `tunelab train` runs it); plain: glibc's")
    args = p.parse_args()
    if args.side:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = side_plain(args) if args.side == "plain" else side_ours(args, args.side)
        from tunelab.allocator import active

        result["malloc"] = active()
        print(json.dumps(result))
        return
    sides = args.sides.split(",")
    results: dict = {
        "bench": "vision",
        "model": "torchvision:resnet18",
        "device": args.device,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "num_workers": args.num_workers,
        "repeats": args.repeats,
        "warmup_steps": args.warmup,
        "threads": args.threads or "default",
        "load_avg_start": round(os.getloadavg()[0], 2),
    }
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.repeats):  # sides alternate, so a change of machine load hits them alike
        for side in sides:
            runs[side].append(run_side(side, args))
            print(f"{side}: {json.dumps(runs[side][-1])}", file=sys.stderr)
    for side, rs in runs.items():
        middle = sorted(rs, key=lambda r: r["images_per_s"])[(len(rs) - 1) // 2]  # the median run
        results[side] = {**middle, "runs": rs}
    ratios = {"ratio": ("ours", "plain")}  # name: (numerator, denominator); target >= 1.0
    ratios.update({f"{v.removeprefix('ours_')}_vs_ours": (v, "ours") for v in ("ours_contiguous", "ours_compile", "ours_nice0")})
    for name, (num, den) in ratios.items():
        if num in runs and den in runs:  # round-robin pairs: the median of per-repeat ratios
            per_repeat = [a["images_per_s"] / b["images_per_s"] for a, b in zip(runs[num], runs[den])]
            results[name] = round(statistics.median(per_repeat), 3)
            results[f"{name}_per_repeat"] = [round(r, 3) for r in per_repeat]
    results["load_avg_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
