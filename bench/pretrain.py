"""Pretraining benchmark: nanoGPT's CPU "baby GPT" on tiny-shakespeare (char level), tunelab vs nanoGPT's own code.

    python bench/pretrain.py                       # the README's figure: 2,000 steps, recipe settings, 3 repeats
    python bench/pretrain.py --repeats 1           # one run per side
    python bench/pretrain.py --steps 30 --sides ours,nanogpt,plain_loop   # a tiny end-to-end check
    python bench/pretrain.py --device cuda --size gpt2-124m --steps 300 --batch-size 16 --block-size 1024 \
        --precision bf16 --compile --sides ours,plain_loop   # the GPU check (MFU)

Each side runs in its own subprocess, one after the other, on the same machine in one invocation:

- `ours`:        `tunelab train recipes/gpt-shakespeare-char.yaml` through the CLI, as a user runs it (its
                 mimalloc re-exec included), with overrides only for steps, sizes, seed, the token cache,
                 the log window and the output folder, and the progress bar, TensorBoard, doctor and report
                 off. The recipe's own eval and checkpoint at step 1,000 stay (they run between steps).
- `nanogpt`:     nanoGPT's own files, unmodified (../shared/peers/nanogpt, see its SOURCE.md), copied to a
                 scratch folder; its prepare.py tokenises the shared input.txt (no download), then its
                 train.py runs with the README's CPU flags for the baby GPT and our steps, batch, block,
                 device and compile setting (`--eval_interval=STEPS`: it evaluates at iteration 0 and at
                 the end, and saves out/ckpt.pt there). `speedup_vs_nanogpt` = ours / nanogpt tokens/s.
- `plain_loop`:  a bare PyTorch loop over the same model, batches, optimizer and schedule as `ours`; the
                 engine-overhead baseline (`overhead_ratio` = ours / plain_loop tokens/s).
- `ours_fsdp`:   `ours` with `train.distributed.strategy=fsdp` on a 1-rank process group (the sharded
                 engine's overhead: `fsdp_ratio` = ours_fsdp / ours tokens/s).
- `ours_one_thread`: `ours` with `train.batch_threads=1` (the recipe's `auto` runs each batch as shards in
                 as many threads as there are intra-op threads; the plain loop runs the whole batch in one):
                 `batch_threads_gain` = ours / ours_one_thread, `overhead_one_thread` = ours_one_thread /
                 plain_loop (the engine's overhead alone).
(The former `eager_ref`, a re-typed nanoGPT-style loop, is gone: the `nanogpt` side runs the real code.)

tokens_per_s: tokens per step / mean step time over the steady steps, the same rule on every side: the
first tenth of the steps (warm-up, compile) is skipped and evaluation is left out. ours: metrics.jsonl's
train windows (log_every = steps/10, the first window dropped; the engine's step time excludes eval and
checkpoints); nanogpt: its per-iteration log `iter N: loss X, time Y ms`, iterations N >= steps/10 and
< steps, without the ones that evaluate (their time includes estimate_loss and the checkpoint save);
plain_loop: its own per-step timer. wall_s: the whole subprocess, start to exit.

val_loss: one measure for every side: the mean cross-entropy per target token over the non-overlapping
64-token windows of the validation split, in order (window i: inputs val[64i : 64i+64], targets
val[64i+1 : 64i+65]), exactly the windows tunelab's own end-of-run eval reads: whole eval batches of 64
(the recipe's eval.batch_size), so of tiny-shakespeare's 1,742 windows (its last 10%, 111,540 tokens) the
first 1,728 (the last 14, 1% of the split, are left out on every side). Both tokenisations are the same
(one id per distinct character, sorted; the same 90/10 split). For nanoGPT it is computed on its saved
checkpoint (the weights after `steps` iterations) with its own model.py and its own val.bin; `val_loss_nanogpt_estimate` is what its train.py printed (`estimate_loss`:
20 random batches of 12 windows). The two sides start from different seeds (nanoGPT: 1337, fixed).

With --repeats N (default 3) the sides run round-robin N times; the JSON keeps every run (`repeats`), each side's
figures are the medians over its runs, and each ratio is the median of the per-repeat ratios.
Prints one JSON line per run to stderr as it finishes, then one final JSON line with all sides on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repeats import median_side, run_round_robin  # bench/repeats.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "gpt-shakespeare-char.yaml"
NANOGPT = REPO.parent / "shared" / "peers" / "nanogpt"
NANOGPT_ITER = re.compile(r"^iter (\d+): loss (\S+), time ([\d.]+)ms", re.M)
NANOGPT_EVAL = re.compile(r"^step (\d+): train loss (\S+), val loss (\S+)", re.M)
RATIOS = {  # name: (numerator side, denominator side)
    "speedup_vs_nanogpt": ("ours", "nanogpt"),
    "overhead_ratio": ("ours", "plain_loop"),
    "fsdp_ratio": ("ours_fsdp", "ours"),
    "batch_threads_gain": ("ours", "ours_one_thread"),
    "overhead_one_thread": ("ours_one_thread", "plain_loop"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--sides", default="ours,nanogpt,plain_loop")
    p.add_argument("--side", help=argparse.SUPPRESS)  # set in the child processes
    p.add_argument("--size", default="baby")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--tokenizer", default="char")
    p.add_argument("--vocab-size", type=int, default=None, help="bpe only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="train.seed: model init and batch order")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="train.compile on every side (nanoGPT's --compile too); default: the recipe's (off)",
    )
    p.add_argument("--corpus", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"))
    p.add_argument(
        "--cache-dir", default=None, help="token cache (default: a temp folder, shared by the sides)"
    )
    p.add_argument("--scratch", default=None, help=argparse.SUPPRESS)  # nanoGPT's prepared copy
    p.add_argument(
        "--tied", action="store_true",
        help="tie the embeddings as nanoGPT does (the recipe unties them: lower val loss, docs/gpt.md)",
    )
    p.add_argument(
        "--ours-malloc", choices=["default", "system"], default="default",
        help="tunelab's malloc (default: mimalloc on Linux, as `tunelab train` picks it); the others: glibc's",
    )
    p.add_argument("--repeats", type=int, default=3, help="run the sides round-robin N times; report medians")
    args = p.parse_args(argv)
    if args.compile is None:
        from tunelab.config import load_config

        args.compile = bool(load_config(RECIPE).train.compile)
    return args


def overrides(args: argparse.Namespace, out: Path) -> list[str]:
    """The recipe, resized by the command line; the plain loop reads the same resolved config."""
    o = [
        f"model.size={args.size}",
        f"data.path={args.corpus}",
        f"data.block_size={args.block_size}",
        f"data.tokenizer={args.tokenizer}",
        f"data.cache_dir={args.cache_dir}",
        f"train.max_steps={args.steps}",
        f"train.seed={args.seed}",
        f"train.batch_size={args.batch_size}",
        f"train.compile={args.compile}",
        f"train.device={args.device}",
        f"train.precision={args.precision}",
        f"train.log_every={warmup_steps(args.steps)}",  # the first window is the warm-up the rule skips
        f"output.dir={out}",
        "output.progress=false",
        "output.tensorboard=false",
        "doctor.enabled=false",
        "report.enabled=false",
    ]
    if args.vocab_size:
        o.append(f"data.vocab_size={args.vocab_size}")
    if args.tied:
        o.append("model.tie_embeddings=true")
    if args.block_size > 64:
        o.append(f"model.block_size={args.block_size}")
    return o


def warmup_steps(steps: int) -> int:
    """The steps every side's tokens/s leaves out: the first tenth (compile, warm-up)."""
    return max(1, steps // 10)


def steady_tokens_per_s(steps: list[tuple[int, float, float]], skip: int) -> float:
    """Tokens per second over the steps after the first `skip`: `steps` holds (first step of the window,
    counting from 1; tokens; seconds) per logged window or step; windows starting within the warm-up go.
    With equal tokens per step this is tokens per step / mean step time."""
    kept = [(tokens, s) for first, tokens, s in steps if first > skip] or [(t, s) for _, t, s in steps]
    return sum(t for t, _ in kept) / sum(s for _, s in kept)


def parse_nanogpt_log(text: str) -> tuple[list[tuple[int, float, float]], dict[int, float]]:
    """nanoGPT's train.py output: [(iteration, train loss, seconds)] from its `iter N: loss X, time Y ms`
    lines, and {iteration: val loss estimate} from its `step N: train loss A, val loss B` lines."""
    iters = [(int(n), float(loss), float(ms) / 1000) for n, loss, ms in NANOGPT_ITER.findall(text)]
    evals = {int(n): float(val) for n, _, val in NANOGPT_EVAL.findall(text)}
    return iters, evals


def nanogpt_tokens_per_s(text: str, steps: int, tokens_per_iter: int) -> float:
    """The steady rule on nanoGPT's log: iterations from steps/10 up to `steps` (it runs one more, after
    its last eval), leaving out those that evaluated (their time includes eval and checkpoint save)."""
    iters, evals = parse_nanogpt_log(text)
    timed = [(n + 1, tokens_per_iter, s) for n, _, s in iters if n < steps and n not in evals]
    if not timed:
        raise ValueError("no `iter N: loss X, time Y ms` lines in nanoGPT's output")
    return steady_tokens_per_s(timed, warmup_steps(steps))


def ours_tokens_per_s(events: list[dict], steps: int) -> float:
    """The steady rule on metrics.jsonl's `train` windows (each: its last step, mean step time, tokens/s)."""
    windows, prev = [], 0
    for e in (e for e in events if e["event"] == "train"):
        seconds = e["step_time_s"] * (e["step"] - prev)
        windows.append((prev + 1, e["tokens_per_s"] * seconds, seconds))
        prev = e["step"]
    return steady_tokens_per_s(windows, warmup_steps(steps))


def run_ours(args: argparse.Namespace, out: Path, fsdp: bool = False, one_thread: bool = False) -> dict:
    """`tunelab train` on the recipe in its own process, as a user runs it; figures from its run folder."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    if args.ours_malloc == "system":
        env["TUNELAB_MALLOC"] = "system"
    extra = []
    if fsdp:  # FSDP2 on one rank: a 1-process group, as `torchrun --nproc_per_node 1` gives
        import socket

        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="localhost", MASTER_PORT=str(port))
        extra = ["train.distributed.strategy=fsdp"]
    if one_thread:
        extra.append("train.batch_threads=1")
    cmd = [sys.executable, "-m", "tunelab.cli", "train", str(RECIPE), *overrides(args, out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"`tunelab train` failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "tokens_per_s": ours_tokens_per_s(events, args.steps),
        "tokens_per_s_incl_compile": summary["train_tokens_per_s"],
        "val_loss": summary["metrics"]["loss"],
        "mfu": summary.get("mfu"),
        "tflops": summary.get("tflops"),
        "malloc": events[0].get("malloc"),
    }


def prepare_nanogpt(scratch: Path, corpus: Path) -> Path:
    """nanoGPT's files copied to `scratch`, its data prepared by its own prepare.py from `corpus`."""
    root = scratch / "nanogpt"
    shutil.copytree(NANOGPT, root)
    data = root / "data" / "shakespeare_char"
    shutil.copy(corpus, data / "input.txt")  # present: prepare.py does not download
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    return root


NANOGPT_SIZES = {"baby": (4, 4, 128), "gpt2-124m": (12, 12, 768), "gpt2-350m": (24, 16, 1024)}


def run_nanogpt(args: argparse.Namespace, root: Path) -> dict:
    """nanoGPT's train.py in its own process, then its checkpoint on the whole validation split."""
    if args.tokenizer != "char" or args.size not in NANOGPT_SIZES:
        raise SystemExit(f"the nanogpt side runs char-level sizes {', '.join(NANOGPT_SIZES)} only")
    n_layer, n_head, n_embd = NANOGPT_SIZES[args.size]
    out = root / "out"
    shutil.rmtree(out, ignore_errors=True)
    flags = {
        "device": args.device, "compile": args.compile, "dtype": "bfloat16" if args.precision == "bf16" else "float32",
        "eval_iters": 20, "eval_interval": args.steps, "always_save_checkpoint": True, "log_interval": 1,
        "block_size": args.block_size, "batch_size": args.batch_size, "n_layer": n_layer, "n_head": n_head,
        "n_embd": n_embd, "max_iters": args.steps, "lr_decay_iters": args.steps, "dropout": 0.0, "out_dir": "out",
    }  # fmt: skip
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *(f"--{k}={v}" for k, v in flags.items())]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"nanoGPT's train.py failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    _, evals = parse_nanogpt_log(proc.stdout)
    return {
        "tokens_per_s": nanogpt_tokens_per_s(proc.stdout, args.steps, args.batch_size * args.block_size),
        "val_loss": nanogpt_val_loss(root, args.device),
        "val_loss_nanogpt_estimate": evals.get(args.steps),
        "malloc": "system",
    }


def nanogpt_val_loss(root: Path, device: str) -> float:
    """nanoGPT's out/ckpt.pt, in its own model.py, on every non-overlapping window of its val.bin."""
    import numpy as np
    import torch

    from tunelab.config import load_config

    spec = importlib.util.spec_from_file_location("nanogpt_model", root / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # weights_only: the checkpoint holds tensors, numbers, strings and dicts of them only
    ckpt = torch.load(root / "out" / "ckpt.pt", map_location=device, weights_only=True)
    model = module.GPT(module.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.to(device).eval()
    tokens = np.fromfile(root / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16).astype(np.int64)
    block = ckpt["model_args"]["block_size"]
    starts = list(range(0, len(tokens) - block, block))  # window i needs tokens[64i : 64i+65]
    eval_batch = load_config(RECIPE).eval.batch_size  # tunelab's eval keeps whole batches only
    if len(starts) > eval_batch:
        starts = starts[: len(starts) - len(starts) % eval_batch]
    with torch.no_grad():
        return eval_windows(model, tokens, starts, block, device, lambda m, x, y: m(x, y)[0], eval_batch)


def eval_windows(model, tokens, starts, block: int, device, logits_of, batch_size: int = 64) -> float:
    """Mean cross-entropy per target token over the windows at `starts` (inputs tokens[s : s+block])."""
    import torch
    import torch.nn.functional as F

    total, count, starts = 0.0, 0, list(starts)
    for i in range(0, len(starts), batch_size):
        rows = torch.stack([torch.from_numpy(tokens[s : s + block + 1]) for s in starts[i : i + batch_size]])
        x, y = rows[:, :-1].contiguous().to(device), rows[:, 1:].contiguous().to(device)
        logits = logits_of(model, x, y).float()
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    return total / count


def run_plain(args: argparse.Namespace, out: Path) -> dict:
    """A bare loop: same model, batches, optimizer and schedule as `ours`; nothing else."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from tunelab.config import load_config
    from tunelab.data.base import ResumableBatchSampler
    from tunelab.data.tokens import build as build_tokens
    from tunelab.models import create_model
    from tunelab.run import fill_model_from_data

    cfg = load_config(RECIPE, overrides(args, out))
    data = build_tokens(cfg)  # the same memmapped windows
    fill_model_from_data(cfg, data, log=lambda *a: None)  # model.vocab_size: the tokenizer's, as in a run
    device = torch.device(args.device)
    torch.manual_seed(cfg.train.seed)
    model = create_model("gpt", **cfg.model.kwargs).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, fused=True)
    compiled = torch.compile(model) if args.compile else model
    warmup, steps, floor = cfg.schedule.warmup_steps, args.steps, cfg.schedule.min_lr_ratio

    def lr_at(s: int) -> float:
        if s < warmup:
            return cfg.optim.lr * (s + 1) / (warmup + 1)
        t = min(1.0, (s - warmup) / max(1, steps - warmup))
        return cfg.optim.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    train_windows = data.train
    sampler = ResumableBatchSampler(
        len(train_windows), cfg.train.batch_size, shuffle=True, seed=cfg.train.seed
    )
    batches = iter(sampler)
    timed: list[tuple[int, float, float]] = []
    tokens_per_step = cfg.train.batch_size * args.block_size
    for step in range(steps):
        t0 = time.perf_counter()
        idx = next(batches)
        batch = data.collate_fn([train_windows[i] for i in idx])
        x, y = batch["input_ids"].to(device), batch["labels"].to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with autocast:
            logits = compiled(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timed.append((step + 1, tokens_per_step, time.perf_counter() - t0))
    model.eval()
    val, block = data.eval, data.eval.block_size
    with torch.no_grad(), autocast:  # tunelab's own eval windows: every `stride` tokens
        val_loss = eval_windows(compiled, np.asarray(val.tokens).astype(np.int64),
                                [i * val.stride for i in range(len(val))], block, device, lambda m, x, y: m(x))  # fmt: skip
    return {
        "tokens_per_s": steady_tokens_per_s(timed, warmup_steps(steps)),
        "tokens_per_s_incl_compile": tokens_per_step * steps / sum(s for _, _, s in timed),
        "val_loss": val_loss,
    }


def child(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        if args.side in ("ours", "ours_fsdp", "ours_one_thread"):
            result = run_ours(args, out, fsdp=args.side == "ours_fsdp", one_thread=args.side == "ours_one_thread")
        elif args.side == "nanogpt":
            result = run_nanogpt(args, Path(args.scratch))
        elif args.side == "plain_loop":
            from tunelab.allocator import active

            result = {**run_plain(args, out), "malloc": active()}
        else:
            raise SystemExit(f"unknown side {args.side!r}; known: ours, nanogpt, plain_loop, ours_fsdp, ours_one_thread")
    print(json.dumps({"side": args.side, **result, "wall_s": time.perf_counter() - t0}), flush=True)


def summarize(repeats: list[dict[str, dict]], sides: list[str]) -> dict:
    """The final JSON's figures: every repeat with its ratios, each side's medians, each ratio's median
    over the per-repeat ratios (round-robin pairs: the sides of one repeat ran back to back)."""
    for rep in repeats:
        for name, (num, den) in RATIOS.items():
            if num in rep and den in rep:
                rep[name] = rep[num]["tokens_per_s"] / rep[den]["tokens_per_s"]
    final: dict = {side: median_side([rep[side] for rep in repeats]) for side in sides}
    for name in RATIOS:
        values = [rep[name] for rep in repeats if name in rep]
        if values:
            final[name] = statistics.median(values)
    for side in ("ours", "nanogpt"):
        if side in final:
            final[f"val_loss_{side}"] = final[side]["val_loss"]
    final["repeats"] = repeats
    return final


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side:
        return child(args)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as cache:
        args.cache_dir = args.cache_dir or cache
        base = [sys.executable, __file__] + (argv if argv is not None else sys.argv[1:])
        base += ["--cache-dir", args.cache_dir, "--compile" if args.compile else "--no-compile"]
        if "nanogpt" in sides:  # nanoGPT's copy and data once per invocation; each run trains afresh
            base += ["--scratch", str(prepare_nanogpt(Path(cache), Path(args.corpus)))]

        def launch(side: str, rep: int) -> tuple[list[str], dict]:
            # a fresh Inductor cache per run: every side pays a cold compile, as a first run would
            return base + ["--side", side], {**os.environ,
                                             "TORCHINDUCTOR_CACHE_DIR": str(Path(cache) / f"inductor-{side}-{rep}")}

        repeats = run_round_robin(args.repeats, sides, launch)
    final = summarize(repeats, sides)
    final["config"] = {"size": args.size, "steps": args.steps, "batch_size": args.batch_size,
                       "block_size": args.block_size, "device": args.device, "precision": args.precision,
                       "compile": args.compile, "repeats": args.repeats, "seed": args.seed, "tied": args.tied, "load_avg_1m": os.getloadavg()[0]}  # fmt: skip
    print(json.dumps(final))


if __name__ == "__main__":
    main()
