"""The `tunelab` command. Each subcommand builds the same objects as the Python API.

Errors caused by the input (a TunelabError) print one line and exit with code 2; `--debug` shows the
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunelab.errors import ConfigError, TunelabError
from tunelab.io import atomic_write, atomic_write_text


def one_line(message: str) -> str:
    """The user-facing line of an error message. An error raised in a DataLoader worker arrives wrapped in
    the worker's traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ..."):
    its last line holds the original message."""
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


def _print_json(obj) -> None:
    print(json.dumps(obj, default=float))


def cmd_train(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.run import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr),
                    allow_data_change=args.allow_data_change)
    metrics = {k: v for k, v in summary["metrics"].items() if isinstance(v, (int, float))}
    print(f"{summary['status']}: step {summary['global_step']}, "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
          + f"; run dir {cfg.output_dir}", file=sys.stderr)
    if summary["status"] == "diverged":
        found = next((d for d in summary.get("diagnoses", []) if d.get("kind") == "divergence"), {})
        raise TunelabError(f"the run diverged: {found.get('evidence', 'the loss climbed far above its minimum')}; "
                           f"{found.get('remedy', 'lower optim.lr')}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tunelab.run import evaluate_run

    metrics = evaluate_run(args.run_dir, "best" if args.best else "final", args.overrides, trust_code=args.trust_code)
    _print_json(metrics)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tunelab.weights import describe_checkpoint

    path = Path(args.checkpoint)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    rows = describe_checkpoint(path)
    width = max((len(n) for n, _, _ in rows), default=10)
    total = 0
    for name, shape, dtype in rows:
        n = 1
        for s in shape:
            n *= s
        total += n
        print(f"{name:<{width}}  {str(list(shape)):<20} {dtype}")
    print(f"{len(rows)} tensors, {total:,} values")
    if args.against:
        from tunelab.config import load_config
        from tunelab.models import create_model
        from tunelab.weights import load_pretrained

        cfg = load_config(args.against[0], args.against[1:])
        model = create_model(cfg.model.name, **cfg.model.kwargs)
        report = load_pretrained(model, path, allow_missing=cfg.pretrained.allow_missing,
                                 rename=cfg.pretrained.rename, strict=False)
        print()
        print(report.table())
        left = report.uninitialised(cfg.pretrained.allow_missing)
        if left and cfg.pretrained.strict:
            print(f"\nA training run would refuse this load: {len(left)} model tensors would stay uninitialised "
                  f"({', '.join(left[:3])}{' ...' if len(left) > 3 else ''}); allow them with "
                  "pretrained.allow_missing=[...] or set pretrained.strict=false")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tunelab.registry import PREDICTORS
    from tunelab.run import load_run

    if args.output and Path(args.output).suffix not in (".jsonl", ".json", ".csv"):
        raise ConfigError(f"--output {args.output}: write .jsonl (one JSON object per line) or .csv")
    if args.output:
        from tunelab.engine.rundir import check_not_managed

        check_not_managed(args.output)
    run = load_run(args.run_dir, "best" if args.best else "final", with_data=False, trust_code=args.trust_code)
    source = run.cfg.data.kwargs["name"]
    if source not in PREDICTORS:
        raise TunelabError(
            f"{args.run_dir}: predict reads new inputs for {', '.join(PREDICTORS.names())} runs, and this run's data "
            f"is `{source}`; `tunelab eval {args.run_dir}` scores its eval split"
        )
    rows = PREDICTORS.get(source)(run, args)
    if args.output:
        out = Path(args.output)
        if out.suffix == ".csv":
            import csv

            def flat(r: dict) -> dict:  # one column per class: prob_<name>, as text predictions have
                out: dict = {}
                for k, v in r.items():
                    if isinstance(v, dict):
                        out.update({f"{'prob' if k == 'probabilities' else k}_{name}": p for name, p in v.items()})
                    else:
                        out[k] = json.dumps(v) if isinstance(v, list) else v
                return out

            table = [flat(r) for r in rows]
            fields = list(dict.fromkeys(k for r in table for k in r)) or ["label"]
            def write_csv(tmp: Path) -> None:
                with open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows(table)

            atomic_write(out, write_csv)
        else:
            atomic_write_text(out, "".join(json.dumps(r, default=float) + "\n" for r in rows))
        print(f"wrote {len(rows)} predictions to {out}", file=sys.stderr)
    else:
        for r in rows:
            _print_json(r)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tunelab.paths import resolve_path
    from tunelab.registry import GENERATORS

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
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


def cmd_quickstart(args: argparse.Namespace) -> int:
    from tunelab.quickstart import quickstart

    quickstart(args.output, overwrite=args.overwrite)
    return 0


def add_trust_code(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help="allow the run folder's files to name Python code to import (a `module:Class` model, "
                        "trust_remote_code); only for folders you trust")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML recipe")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in output.dir (only a tunelab run)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue although the data files changed since the checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="re-evaluate a run's final (or best) weights; prints one JSON line")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--best", action="store_true")
    add_trust_code(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="list a checkpoint's tensors; with --against, the LoadReport")
    p.add_argument("checkpoint")
    p.add_argument("--against", nargs="+", metavar="CONFIG [KEY=VALUE ...]",
                   help="a recipe (and overrides) whose model the checkpoint is matched against")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("predict", help="labels and probabilities from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--text", action="append", help="a text to classify (repeatable)")
    p.add_argument("--text-pair", action="append", help="second text for pair tasks (repeatable)")
    p.add_argument("--image", nargs="+", help="image files to classify")
    p.add_argument("--file", help="a CSV/TSV/JSONL file of inputs")
    p.add_argument("--output", help="write predictions to .jsonl or .csv instead of stdout")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--best", action="store_true")
    add_trust_code(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("generate", help="sample text from a run or a model")
    p.add_argument("target", help="run dir, model folder or GGUF file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--best", action="store_true")
    add_trust_code(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("quickstart", help="the whole pipeline on the digits that scikit-learn ships")
    p.add_argument("--output", default="runs/quickstart")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_quickstart)

    # plug-in subcommands (lr-find, plan, report, export): each module defines add_parser(subparsers)
    import importlib

    from tunelab.registry import COMMANDS

    for module_name in dict.fromkeys(COMMANDS.lazy_modules()):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # optional plug-in whose dependencies are not installed
        module.add_parser(sub)
    return parser


# commands that train or run a model over a dataset: run on mimalloc (see tunelab.allocator)
_MIMALLOC_COMMANDS = {"train", "lr-find", "eval", "quickstart"}


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # started as a program (not called from Python): the allocator can still be chosen
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        if command in _MIMALLOC_COMMANDS:
            from tunelab.allocator import reexec_with_mimalloc

            reexec_with_mimalloc()
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv  # anywhere on the line: `tunelab --debug train ...` or `tunelab train ... --debug`
    argv = [a for a in argv if a != "--debug"]
    try:
        parser = build_parser()
        # key=value overrides may come before or after flags (`train CFG --resume a=1 b=2`)
        args, extra = parser.parse_known_args(argv)
        if extra:
            if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
                args.overrides = list(args.overrides or []) + extra
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args) or 0
    except TunelabError as e:
        if debug:
            raise
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        from tunelab.io import disk_error

        err = disk_error(e)
        if err is None or debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        return 143 if type(e).__name__ == "Terminated" else 130
    except BrokenPipeError:  # `tunelab inspect ... | head`: the reader left; exit quietly like other tools
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
