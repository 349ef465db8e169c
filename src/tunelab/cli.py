"""The `tunelab` command. Each subcommand (tunelab.commands) builds the same objects as the Python API.

Errors caused by the input (a TunelabError, a full disk, a read-only folder) print one line and exit with
code 2; `--debug` anywhere on the line shows the traceback. Ctrl-C exits 130, SIGTERM 143.
"""

from __future__ import annotations

import argparse
import os
import sys

from tunelab.errors import TunelabError
from tunelab.registry import COMMANDS

# commands that train or run a model over a dataset: run on mimalloc (see tunelab.allocator)
_MIMALLOC_COMMANDS = {"train", "lr-find", "eval", "quickstart", "sweep"}


def one_line(message: str) -> str:
    """The user-facing line of an error message. An error raised in a DataLoader worker arrives wrapped in
    the worker's traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ..."):
    its last line holds the original message."""
    if "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS.ordered():
        try:
            add_parser = COMMANDS.get(name)
        except TunelabError:
            continue  # a command whose optional dependencies are not installed
        add_parser(sub)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    # key=value overrides may come before or after flags (`train CFG --resume a=1 b=2`)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` prints every thread's Python stack to stderr (a hung rank or run says where it is)."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # started as a program (not called from Python): the allocator can still be chosen
        _stacks_on_sigusr1()
        if not sys.stderr.isatty():  # a log file, CI, nohup: the libraries' loading bars would be \r-joined junk
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers and huggingface_hub
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        if command in _MIMALLOC_COMMANDS:
            from tunelab.allocator import reexec_with_mimalloc

            reexec_with_mimalloc()
    if argv is not None:
        return _run(argv)
    code = _run(sys.argv[1:])
    if "torch.distributed" in sys.modules:  # a torchrun rank ends through exit_process
        from tunelab.engine.distributed import exit_process

        code = exit_process(code)
    return code


def _run(argv: list[str]) -> int:
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        args = _parse(argv)
        return args.func(args) or 0
    except TunelabError as e:
        if debug:
            raise
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `tunelab inspect ... | head`: the reader left; exit quietly like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
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


if __name__ == "__main__":
    sys.exit(main())
