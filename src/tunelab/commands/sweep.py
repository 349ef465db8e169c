"""`tunelab sweep CONFIG [key=value ...] [--sweep FILE] [--resume] [--overwrite] [--workers N] [--best]`:
a hyperparameter sweep over a recipe (tunelab.sweeps; Optuna is imported only when a sweep runs)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.commands.common import log
from tunelab.errors import ConfigError
from tunelab.registry import COMMANDS

if TYPE_CHECKING:
    from tunelab.config import RunConfig


def load_sweep_config(args: argparse.Namespace) -> RunConfig:
    """The recipe with its overrides; `--sweep FILE` supplies the sweep section (before the overrides, so
    `sweep.n_trials=...` still applies)."""
    import yaml

    from tunelab.config import load_config

    overrides = list(args.overrides)
    if args.sweep_file:
        path = Path(args.sweep_file)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the sweep file ({e.strerror})") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
        section = data.get("sweep", data) if isinstance(data, dict) else None
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: expected a sweep section (a mapping with `space`, `n_trials`, ...)")
        flow = yaml.safe_dump(section, default_flow_style=True, width=1 << 30).strip()
        overrides.insert(0, f"sweep={flow}")
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from tunelab.sweeps import best_recipe, run_sweep, run_worker
    from tunelab.sweeps.plan import plan_sweep

    cfg = load_sweep_config(args)
    if args.best:
        print(best_recipe(plan_sweep(cfg, args.config, check=False)), end="")
        return 0
    if args.worker:  # a process started by --workers: the parent checked the plan and opened the study
        run_worker(plan_sweep(cfg, args.config, check=False), log)
        return 0
    results = run_sweep(plan_sweep(cfg, args.config), resume=args.resume, overwrite=args.overwrite,
                        workers=args.workers, log=log)
    counts, best, folder = results["counts"], results["best"], cfg.output_dir
    log(f"sweep {folder}: {len(results['trials'])} trials ({counts['complete']} completed, {counts['pruned']} pruned, "
        f"{counts['fail']} failed, {counts['running']} still running elsewhere)")
    if best:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        log(f"best: trial {best['number']}, {results['objective']} {best['value']:.4f} ({params})")
        log(f"report {folder / 'report.html'}; best weights {folder / 'best'} -> {best['final']}; "
            f"`tunelab sweep --best {shlex.join([args.config, *args.overrides])}` prints its recipe")
    return 0


@COMMANDS.register("sweep")
def add_parser(sub: Any) -> None:
    p = sub.add_parser("sweep", help="hyperparameter sweep (Optuna): trials, pruning, resume, report")
    p.add_argument("config", help="a recipe with a `sweep:` section (or give --sweep FILE)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sweep.n_trials=20")
    p.add_argument("--sweep", dest="sweep_file", metavar="FILE", help="YAML holding the sweep section")
    p.add_argument("--resume", action="store_true", help="continue the sweep in output.dir after a stop")
    p.add_argument("--overwrite", action="store_true", help="replace the sweep in output.dir")
    p.add_argument("--workers", type=int, default=1, help="processes working on the study (default 1)")
    p.add_argument("--best", action="store_true", help="print the best trial's recipe as YAML and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)
