"""Attack the `tunelab` CLI as an attacker and a careless user would (issue 20's acceptance): hostile and
damaged run folders, specs and data, symlinks out of run folders, output paths inside runs, concurrent starts,
kills, bad values of every kind, odd paths, read-only and full disks, sweeps, GGUF export, DPO data.

    PYTHONPATH=src python scripts/attack.py                # every case, 2 at a time
    PYTHONPATH=src python scripts/attack.py --only S01 O03 --jobs 1 --keep

Each case runs in its own temporary folder (the two baseline runs, a digits CNN and a tiny BPE Llama GPT, are
trained once and copied into it) and prints one row: id | what was tried | expected | observed | verdict.
FAIL = data lost or silently wrong, code executed, a traceback instead of one line for bad input, or an
existing run/output damaged. WEAK = safe, but a surprise (wrong exit code, an unclear message). The last line
is JSON: {"cases": N, "PASS": .., "WEAK": .., "FAIL": ..}. docs/security.md lists the cases by id.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "recipes" / "digits-cnn.yaml"
SWEEP = REPO / "recipes" / "digits-sweep.yaml"
GPT = REPO / "recipes" / "gpt-shakespeare-char.yaml"
DPO = REPO / "recipes" / "smollm2-dpo-hh.yaml"
SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")
PREFERENCE = Path("/work/shared/data/preference/hh_harmless_base_test.jsonl.gz")
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TUNELAB_PROGRESS": "0"}

CASES: list[tuple[str, str, str, Callable]] = []
BASE: dict[str, Path] = {}  # the baseline runs, trained once


def case(cid: str, tried: str, expected: str) -> Callable:
    def register(fn: Callable) -> Callable:
        CASES.append((cid, tried, expected, fn))
        return fn

    return register


# -- helpers --------------------------------------------------------------------------------------------------
def cli(*args, cwd: Path, timeout: int = 180, limit_fsize: int | None = None) -> subprocess.CompletedProcess:
    def preexec():
        if limit_fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    try:
        return subprocess.run([sys.executable, "-m", "tunelab.cli", *map(str, args)], cwd=cwd, env=ENV,
                              capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, -999, e.stdout or "", f"TIMEOUT after {timeout}s")


def start(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunelab.cli", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def last_line(p: subprocess.CompletedProcess, width: int = 160) -> str:
    lines = (p.stderr or "").strip().splitlines() or (p.stdout or "").strip().splitlines() or [""]
    return lines[-1][:width]


def refusal(p: subprocess.CompletedProcess, *fragments: str) -> tuple[str, str]:
    """PASS when `p` ended with one `error:` line and exit 2 (holding each fragment); FAIL on a traceback or
    a timeout; WEAK otherwise (a success where a refusal was expected, another code, a missing fragment)."""
    err = p.stderr or ""
    seen = f"exit {p.returncode}: {last_line(p)}"
    if "Traceback" in err or p.returncode in (-999, 1) or p.returncode < 0:
        return seen, "FAIL"
    line = last_line(p, width=100_000)
    if p.returncode == 2 and line.startswith("error: ") and all(f in line for f in fragments):
        return seen, "PASS"
    return seen, "WEAK"


def outcome(p: subprocess.CompletedProcess, note: str = "", harmed: bool = False) -> tuple[str, str]:
    """For a command that may succeed or refuse: FAIL on harm (data changed, code run), a traceback or
    another exit code than 0 and 2; else PASS."""
    seen = f"exit {p.returncode}: {last_line(p)}" + (f"; {note}" if note else "")
    bad = harmed or "Traceback" in (p.stderr or "") or p.returncode not in (0, 2)
    return seen, "FAIL" if bad else "PASS"


def worst(*verdicts: str) -> str:
    return max(verdicts, key=["PASS", "WEAK", "FAIL"].index)


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (links not followed), to prove a run was not touched."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "->" + os.readlink(p)
        elif p.is_file() and p.name != ".tunelab":
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def intact(folder: Path, before: dict[str, str]) -> bool:
    return folder.is_dir() and digest(folder) == before


def copy_run(kind: str, dest: Path) -> Path:
    shutil.copytree(BASE[kind], dest, symlinks=True)
    return dest


def rehash(folder: Path) -> None:
    """Re-write a folder's manifest.json to match its files (what an attacker who edits a run would do)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


EVIL_MODULE = """
from pathlib import Path
Path(__file__).with_name("PWNED").write_text("code ran")
import torch
class Net(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)
    def forward(self, x):
        return self.fc(x.flatten(1))
def load(**kw):
    return None
Task = Net
"""


def plant_evil(tmp: Path) -> Path:
    (tmp / "evil.py").write_text(EVIL_MODULE)
    return tmp / "PWNED"


def pickle_bomb(path: Path, target: Path) -> None:
    """A torch-style .pt whose unpickling would run `touch target`."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))

    path.write_bytes(pickle.dumps(Evil()))


def set_config(run: Path, key_path: str, value) -> None:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    section, key = key_path.split(".")
    cfg[section][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def train_digits(tmp: Path, out: str | Path, *overrides: str, flags: tuple = ()) -> subprocess.CompletedProcess:
    return cli("train", DIGITS, f"output.dir={out}", "train.max_steps=10", *overrides, *flags, cwd=tmp)


@contextlib.contextmanager
def read_only(folder: Path):
    """Mount a small tmpfs at `folder`, let the caller fill it, then remount it read-only (root only)."""
    folder.mkdir()
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                                              capture_output=True).returncode == 0  # fmt: skip
    state = {"mounted": ok}
    try:
        yield state
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def make_read_only(folder: Path, state: dict) -> None:
    if state["mounted"]:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    else:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)


# -- code execution ------------------------------------------------------------------------------------------
@case("X01", "final/tunelab_model.json names `evil:Net` (evil.py in the cwd writes PWNED on import), manifest re-hashed; `eval RUN`",
      "refused without --trust-code; evil.py never imported")  # fmt: skip
def _(tmp):
    pwned, run = plant_evil(tmp), copy_run("digits", tmp / "run")
    (run / "final" / "tunelab_model.json").write_text(json.dumps({"name": "evil:Net", "kwargs": {}}))
    rehash(run / "final")
    seen, v = refusal(cli("eval", run, cwd=tmp), "--trust-code")
    return seen + f"; PWNED {pwned.exists()}", "FAIL" if pwned.exists() else v


@case("X02", "the same `evil:Net` final/ given to `export RUN` and `export RUN --format gguf`",
      "both refused without --trust-code; nothing imported")  # fmt: skip
def _(tmp):
    pwned, run = plant_evil(tmp), copy_run("digits", tmp / "run")
    (run / "final" / "tunelab_model.json").write_text(json.dumps({"name": "evil:Net", "kwargs": {}}))
    rehash(run / "final")
    a, va = refusal(cli("export", run, cwd=tmp))
    b, vb = refusal(cli("export", run, "--format", "gguf", cwd=tmp))
    return f"{a}; {b}; PWNED {pwned.exists()}", "FAIL" if pwned.exists() else worst(va, vb)


@case("X03", "final/tunelab_model.json names `builtins:exec` with a source string, run with --trust-code",
      "refused: not an nn.Module subclass or registered builder")  # fmt: skip
def _(tmp):
    run, pwned = copy_run("digits", tmp / "run"), tmp / "PWNED"
    spec = {"name": "builtins:exec", "kwargs": {"source": f"open({str(pwned)!r}, 'w')"}}
    (run / "final" / "tunelab_model.json").write_text(json.dumps(spec))
    rehash(run / "final")
    seen, v = refusal(cli("eval", run, "--trust-code", cwd=tmp))
    return seen + f"; PWNED {pwned.exists()}", "FAIL" if pwned.exists() else v


@case("X04", "a run's config.yaml holding `!!python/object/apply:os.system [touch PWNED]`; `eval RUN`, `predict RUN`",
      "YAML read safely: one line, nothing runs")  # fmt: skip
def _(tmp):
    run, pwned = copy_run("digits", tmp / "run"), tmp / "PWNED"
    (run / "config.yaml").write_text(f"name: !!python/object/apply:os.system ['touch {pwned}']\n"
                                     + (run / "config.yaml").read_text().split("\n", 1)[1])  # fmt: skip
    a, va = refusal(cli("eval", run, cwd=tmp))
    b, vb = refusal(cli("predict", run, "--file", tmp / "none.csv", cwd=tmp))
    return f"{a}; {b}; PWNED {pwned.exists()}", "FAIL" if pwned.exists() else worst(va, vb)


@case("X05", "a run's config.yaml with `data.name: evil:load` and `task.name: evil:Task`; `eval RUN`",
      "refused without --trust-code; evil.py never imported")  # fmt: skip
def _(tmp):
    pwned = plant_evil(tmp)
    verdicts, seen = [], []
    for key in ("data.name", "task.name"):
        run = copy_run("digits", tmp / key)
        set_config(run, key, "evil:" + ("load" if key == "data.name" else "Task"))
        s, v = refusal(cli("eval", run, cwd=tmp), "--trust-code")
        seen.append(s)
        verdicts.append(v)
    return "; ".join(seen) + f"; PWNED {pwned.exists()}", "FAIL" if pwned.exists() else worst(*verdicts)


@case("X06", "`generate RUN` and `plan RUN` on a GPT run whose config.yaml names `model.name: evil:Net`",
      "refused without --trust-code; nothing imported")  # fmt: skip
def _(tmp):
    pwned, run = plant_evil(tmp), copy_run("gpt", tmp / "run")
    set_config(run, "model.name", "evil:Net")
    a, va = refusal(cli("generate", run, "--prompt", "ROMEO:", "--max-new-tokens", "2", cwd=tmp))
    b, vb = refusal(cli("plan", run, cwd=tmp))
    return f"{a}; {b}; PWNED {pwned.exists()}", "FAIL" if pwned.exists() else worst(va, vb)


@case("X07", "a GPT run's tokenizer/ with a tokenizer_config.json `auto_map` to tokenization_evil.py (writes PWNED); `generate RUN`",
      "the custom tokenizer code is never imported")  # fmt: skip
def _(tmp):
    run, pwned = copy_run("gpt", tmp / "run"), tmp / "PWNED"
    (run / "tokenizer" / "tokenization_evil.py").write_text(
        f"open({str(pwned)!r}, 'w').write('x')\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    (run / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}, "tokenizer_class": "EvilTokenizer"}))
    p = cli("generate", run, "--prompt", "ROMEO:", "--max-new-tokens", "2", cwd=tmp)
    return outcome(p, f"PWNED {pwned.exists()}", harmed=pwned.exists())


@case("X08", "`inspect evil.pt` and `train ... pretrained.path=evil.pt` with a __reduce__ pickle",
      "refused as not a plain tensor file; nothing runs")  # fmt: skip
def _(tmp):
    pwned = tmp / "PWNED"
    pickle_bomb(tmp / "evil.pt", pwned)
    a, va = refusal(cli("inspect", tmp / "evil.pt", cwd=tmp))
    b, vb = refusal(train_digits(tmp, "run", f"pretrained.path={tmp / 'evil.pt'}"))
    return f"{a}; {b}; PWNED {pwned.exists()}", "FAIL" if pwned.exists() else worst(va, vb)


@case("X09", "a checkpoint's model.safetensors replaced by a __reduce__ pickle, manifest re-hashed; `train --resume`",
      "the checkpoint is refused and an older one used (or one line); nothing runs")  # fmt: skip
def _(tmp):
    run, pwned = copy_run("digits", tmp / "run"), tmp / "PWNED"
    newest = sorted((run / "checkpoints").iterdir())[-1]
    pickle_bomb(newest / "model.safetensors", pwned)
    rehash(newest)
    p = train_digits(tmp, run, "train.max_steps=12", flags=("--resume",))
    return outcome(p, f"PWNED {pwned.exists()}", harmed=pwned.exists())


@case("X10", "safetensors files with a 2**60-byte header length and with tensor offsets past the end, as pretrained.path",
      "one line each, exit 2")  # fmt: skip
def _(tmp):
    (tmp / "huge.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}).encode()
    (tmp / "short.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    a, va = refusal(train_digits(tmp, "a", f"pretrained.path={tmp / 'huge.safetensors'}"))
    b, vb = refusal(train_digits(tmp, "b", f"pretrained.path={tmp / 'short.safetensors'}"))
    return f"{a}; {b}", worst(va, vb)


@case("X11", "`generate` on a .gguf file of random bytes and on an empty .gguf file", "one line each, exit 2")
def _(tmp):
    (tmp / "junk.gguf").write_bytes(os.urandom(4096))
    (tmp / "empty.gguf").write_bytes(b"")
    a, va = refusal(cli("generate", tmp / "junk.gguf", "--prompt", "hi", cwd=tmp))
    b, vb = refusal(cli("generate", tmp / "empty.gguf", "--prompt", "hi", cwd=tmp))
    return f"{a}; {b}", worst(va, vb)


@case("X12", "`sweep --sweep FILE` where FILE holds `!!python/object/apply:os.system [touch PWNED]`",
      "YAML read safely: one line, nothing runs")  # fmt: skip
def _(tmp):
    pwned = tmp / "PWNED"
    (tmp / "s.yaml").write_text(f"space: !!python/object/apply:os.system ['touch {pwned}']\n")
    seen, v = refusal(cli("sweep", DIGITS, "--sweep", tmp / "s.yaml", "output.dir=sw", cwd=tmp))
    return seen + f"; PWNED {pwned.exists()}", "FAIL" if pwned.exists() else v


# -- tampered and damaged run folders --------------------------------------------------------------------------
@case("T01", "final/manifest.json deleted, then a weight changed in final/model.safetensors; `eval RUN`",
      "refused (a tunelab final/ without its manifest is incomplete), never evaluated silently")  # fmt: skip
def _(tmp):
    from safetensors.torch import load_file, save_file

    run = copy_run("digits", tmp / "run")
    (run / "final" / "manifest.json").unlink()
    weights = load_file(run / "final" / "model.safetensors")
    next(iter(weights.values())).view(-1)[0] = -907.0
    save_file(weights, run / "final" / "model.safetensors")
    return refusal(cli("eval", run, cwd=tmp))


@case("T02", "final/manifest.json of invalid JSON; one listing `../config.yaml`; `eval RUN`",
      "one line each, exit 2")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    (run / "final" / "manifest.json").write_text("{not json")
    a, va = refusal(cli("eval", run, cwd=tmp))
    run2 = copy_run("digits", tmp / "run2")
    m = json.loads((run2 / "final" / "manifest.json").read_text())
    m["files"]["../config.yaml"] = "0" * 64
    (run2 / "final" / "manifest.json").write_text(json.dumps(m))
    b, vb = refusal(cli("eval", run2, cwd=tmp))
    return f"{a}; {b}", worst(va, vb)


@case("T03", "final/model.safetensors truncated to 0 bytes; replaced by a symlink to /etc/passwd; `eval RUN`",
      "one line each, exit 2")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    (run / "final" / "model.safetensors").write_bytes(b"")
    a, va = refusal(cli("eval", run, cwd=tmp))
    run2 = copy_run("digits", tmp / "run2")
    (run2 / "final" / "model.safetensors").unlink()
    (run2 / "final" / "model.safetensors").symlink_to("/etc/passwd")
    b, vb = refusal(cli("eval", run2, cwd=tmp))
    return f"{a}; {b}", worst(va, vb)


@case("T04", "final/model.safetensors with a tensor of the wrong shape and an extra key, manifest re-hashed; `eval`, `predict`",
      "one line naming the mismatch, exit 2")  # fmt: skip
def _(tmp):
    import torch
    from safetensors.torch import load_file, save_file

    run = copy_run("digits", tmp / "run")
    weights = load_file(run / "final" / "model.safetensors")
    key = next(iter(weights))
    weights[key] = torch.zeros(3, 3)
    weights["evil.extra"] = torch.zeros(1)
    save_file(weights, run / "final" / "model.safetensors")
    rehash(run / "final")
    (tmp / "in.csv").write_text("x\n1\n")
    a, va = refusal(cli("eval", run, cwd=tmp))
    return a, va


@case("T05", "metrics.jsonl replaced by 4 KB of random bytes; `report RUN`, then `train --resume`",
      "one line or a report of what is readable; no traceback")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    (run / "metrics.jsonl").write_bytes(os.urandom(4096))
    p = cli("report", run, cwd=tmp)
    q = train_digits(tmp, run, "train.max_steps=12", flags=("--resume",))
    seen = f"report exit {p.returncode}: {last_line(p)}; resume exit {q.returncode}: {last_line(q)}"
    bad = any("Traceback" in x.stderr or x.returncode not in (0, 2) for x in (p, q))
    return seen, "FAIL" if bad else "PASS"


@case("T06", "summary.json and config.yaml holding garbage / a truncated half / nothing; `report`, `eval`",
      "one line each, exit 2 (or a report without the summary)")  # fmt: skip
def _(tmp):
    verdicts, seen = [], []
    for i, text in enumerate(["\x00\xff garbage", None, ""]):
        run = copy_run("digits", tmp / f"run{i}")
        cfg = (run / "config.yaml").read_text()
        (run / "config.yaml").write_text(cfg[: len(cfg) // 2] if text is None else text)
        (run / "summary.json").write_text("{trunc")
        s, v = refusal(cli("eval", run, cwd=tmp))
        r = cli("report", run, cwd=tmp)
        seen.append(f"{s} / report exit {r.returncode}")
        verdicts.append(worst(v, "FAIL" if "Traceback" in r.stderr or r.returncode not in (0, 2) else "PASS"))
    return "; ".join(seen), worst(*verdicts)


@case("T07", "`.tunelab` marker deleted; marker holding garbage; then `train --resume`",
      "resumed (final/ and manifested checkpoints mark a run from before markers) or one line; no traceback")  # fmt: skip
def _(tmp):
    outs = []
    for name, marker in (("run", None), ("run2", b"\xff\x00junk")):
        run = copy_run("digits", tmp / name)
        if marker is None:
            (run / ".tunelab").unlink()
        else:
            (run / ".tunelab").write_bytes(marker)
        outs.append(train_digits(tmp, run, "train.max_steps=12", flags=("--resume",)))
    bad = any("Traceback" in q.stderr or q.returncode not in (0, 2) for q in outs)
    return "; ".join(f"exit {q.returncode}: {last_line(q)[:80]}" for q in outs), "FAIL" if bad else "PASS"


@case("T08", "checkpoints/ a symlink to another run's checkpoints (a wider CNN); `train --resume`",
      "the foreign checkpoints are refused in one line; the other run is untouched")  # fmt: skip
def _(tmp):
    other = tmp / "other"
    train_digits(tmp, other, "model.width=16")
    before = digest(other)
    run = copy_run("digits", tmp / "run")
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(other / "checkpoints")
    seen, v = refusal(train_digits(tmp, run, "train.max_steps=12", flags=("--resume",)))
    return seen + f"; other intact {intact(other, before)}", v if intact(other, before) else "FAIL"


@case("T09", "checkpoints/ a dangling symlink; all checkpoints deleted; `train --resume`",
      "one line naming --overwrite, exit 2")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(tmp / "nowhere")
    a, va = refusal(train_digits(tmp, run, "train.max_steps=12", flags=("--resume",)))
    run2 = copy_run("digits", tmp / "run2")
    for c in (run2 / "checkpoints").iterdir():
        shutil.rmtree(c)
    b, vb = refusal(train_digits(tmp, run2, "train.max_steps=12", flags=("--resume",)), "--overwrite")
    return f"{a}; {b}", worst(va, vb)


@case("T10", "final/ deleted; best/ deleted; then `eval RUN`, `eval RUN --best`, `export RUN`, `predict RUN`",
      "one line each, exit 2")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "best")
    (tmp / "in.jsonl").write_text('{"image": "x.png"}\n')
    outs = [refusal(cli("eval", run, cwd=tmp)), refusal(cli("eval", run, "--best", cwd=tmp)),
            refusal(cli("export", run, cwd=tmp)), refusal(cli("predict", run, "--file", tmp / "in.jsonl", cwd=tmp))]  # fmt: skip
    return "; ".join(s for s, _ in outs), worst(*(v for _, v in outs))


# -- symlinks out of a run folder: writes must stay inside ---------------------------------------------------
def user_folder(tmp: Path) -> Path:
    """A folder of the user's that no tunelab command may empty."""
    user = tmp / "user-folder"
    user.mkdir(exist_ok=True)
    (user / "thesis.tex").write_text("years of work")
    return user


def victim_file(tmp: Path) -> tuple[Path, bytes]:
    victim = tmp / "victim.txt"
    victim.write_bytes(b"the user's own file\n")
    return victim, victim.read_bytes()


@case("S01", "a run whose metrics.jsonl is a symlink to the user's file; `train --resume train.max_steps=15`",
      "the user's file is not changed")  # fmt: skip
def _(tmp):
    run, (victim, text) = copy_run("digits", tmp / "run"), victim_file(tmp)
    shutil.copy(run / "metrics.jsonl", victim)
    text = victim.read_bytes()
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    p = train_digits(tmp, run, "train.max_steps=15", flags=("--resume",))
    ok = victim.read_bytes() == text
    return outcome(p, f"victim unchanged {ok}", harmed=not ok)


@case("S02", "summary.json, config.yaml and report.html symlinks to the user's files; `train --resume`, `report RUN`",
      "the user's files are not changed")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    victims = {}
    for name in ("summary.json", "config.yaml", "report.html"):
        v = tmp / f"victim-{name}"
        shutil.copy(run / name, v)
        victims[v] = v.read_bytes()
        (run / name).unlink()
        (run / name).symlink_to(v)
    p = train_digits(tmp, run, "train.max_steps=15", flags=("--resume",))
    r = cli("report", run, cwd=tmp)
    ok = all(v.read_bytes() == b for v, b in victims.items())
    bad = not ok or any("Traceback" in x.stderr for x in (p, r))
    return f"resume exit {p.returncode}, report exit {r.returncode}: {last_line(r)}; victims unchanged {ok}", "FAIL" if bad else "PASS"


@case("S03", "checkpoints/step-1 a symlink to the user's folder; `train --resume` with train.keep_last=1 (prunes old checkpoints)",
      "the user's folder keeps its files")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    user = user_folder(tmp)
    (run / "checkpoints" / "step-1").symlink_to(user)
    p = train_digits(tmp, run, "train.max_steps=20", "train.checkpoint_every=5", "train.keep_last=1", flags=("--resume",))
    return outcome(p, f"user's file kept {(user / 'thesis.tex').is_file()}", harmed=not (user / "thesis.tex").is_file())


@case("S04", "`.tmp-x` and `.run.replaced-1` entries symlinked to the user's folder inside/beside a run; `train --resume`",
      "stale-temporary cleanup removes links, never the user's files")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    user = user_folder(tmp)
    (run / ".tmp-x").symlink_to(user)
    (run / "final" / ".tmp-y").symlink_to(user)
    p = train_digits(tmp, run, "train.max_steps=15", flags=("--resume",))
    return outcome(p, f"user's file kept {(user / 'thesis.tex').is_file()}", harmed=not (user / "thesis.tex").is_file())


@case("S05", "final/ a symlink to the user's folder; `train --resume train.max_steps=15` (which rewrites final/)",
      "the user's folder keeps its files (one line or the link replaced)")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    user = tmp / "user-folder"
    shutil.copytree(run / "final", user)
    (user / "thesis.tex").write_text("years of work")
    shutil.rmtree(run / "final")
    (run / "final").symlink_to(user)
    p = train_digits(tmp, run, "train.max_steps=15", flags=("--resume",))
    return outcome(p, f"user's file kept {(user / 'thesis.tex').is_file()}", harmed=not (user / "thesis.tex").is_file())


@case("S06", "RUN/export/run-hf (export's default destination) a symlink to the user's folder; `export RUN --overwrite`",
      "the user's folder keeps its files")  # fmt: skip
def _(tmp):
    run = copy_run("gpt", tmp / "run")
    first = cli("export", run, cwd=tmp)
    dest = Path(first.stdout.strip().splitlines()[-1]) if first.returncode == 0 else None
    if dest is None:
        return f"plain export failed: {last_line(first)}", "FAIL"
    dest = dest if dest.is_absolute() else tmp / dest
    user = user_folder(tmp)
    shutil.rmtree(dest)
    dest.symlink_to(user)
    p = cli("export", run, "--overwrite", cwd=tmp)
    return outcome(p, f"user's file kept {(user / 'thesis.tex').is_file()}", harmed=not (user / "thesis.tex").is_file())


# -- output paths ----------------------------------------------------------------------------------------------
@case("O01", "`export RUN --output RUN --overwrite` and `--output RUN/final --overwrite`",
      "refused; the run untouched")  # fmt: skip
def _(tmp):
    run = copy_run("gpt", tmp / "run")
    before = digest(run)
    a, va = refusal(cli("export", run, "--output", run, "--overwrite", cwd=tmp))
    b, vb = refusal(cli("export", run, "--output", run / "final", "--overwrite", cwd=tmp))
    ok = intact(run, before)
    return f"{a}; {b}; run intact {ok}", worst(va, vb) if ok else "FAIL"


@case("O02", "`export RUN --output OTHER_RUN --overwrite` where OTHER_RUN is another training run; also a user folder",
      "refused (not an export); both untouched")  # fmt: skip
def _(tmp):
    run, other = copy_run("gpt", tmp / "run"), copy_run("digits", tmp / "other")
    user = user_folder(tmp)
    before, ubefore = digest(other), digest(user)
    a, va = refusal(cli("export", run, "--output", other, "--overwrite", cwd=tmp))
    b, vb = refusal(cli("export", run, "--output", user, "--overwrite", cwd=tmp))
    ok = intact(other, before) and intact(user, ubefore)
    return f"{a}; {b}; both intact {ok}", worst(va, vb) if ok else "FAIL"


@case("O03", "`export RUN --format gguf --output X.gguf --overwrite` where X.gguf is RUN/final/model.safetensors renamed path / another run's final/",
      "refused; nothing inside a run replaced")  # fmt: skip
def _(tmp):
    run, other = copy_run("gpt", tmp / "run"), copy_run("gpt", tmp / "other")
    before = digest(other)
    a, va = refusal(cli("export", run, "--format", "gguf", "--output", other / "final", "--overwrite", cwd=tmp))
    b, vb = refusal(cli("export", run, "--format", "gguf", "--output", other / "final" / "x.gguf", "--overwrite", cwd=tmp))
    ok = intact(other, before)
    return f"{a}; {b}; other run intact {ok}", worst(va, vb) if ok else "FAIL"


@case("O04", "`report RUN -o RUN/metrics.jsonl` and `-o RUN/final/model.safetensors`",
      "refused; the run untouched")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    before = digest(run)
    a, va = refusal(cli("report", run, "-o", run / "metrics.jsonl", cwd=tmp))
    b, vb = refusal(cli("report", run, "-o", run / "final" / "model.safetensors", cwd=tmp))
    ok = intact(run, before)
    return f"{a}; {b}; run intact {ok}", worst(va, vb) if ok else "FAIL"


@case("O05", "`predict RUN --output` RUN/checkpoints/step-4/p.jsonl, RUN/final/p.csv, RUN/summary.json, OTHER/tb/p.jsonl, and link.jsonl -> RUN/metrics.jsonl",
      "refused before the run is loaded; every run untouched")  # fmt: skip
def _(tmp):
    run, other = copy_run("gpt", tmp / "run"), copy_run("digits", tmp / "other")
    step = sorted((run / "checkpoints").iterdir())[-1]
    (tmp / "link.jsonl").symlink_to(run / "metrics.jsonl")
    before, obefore = digest(run), digest(other)
    outs = [refusal(cli("predict", run, "--text", "hello", "--output", t, cwd=tmp), "belongs to the run")
            for t in (step / "p.jsonl", run / "final" / "p.csv", run / "summary.json", other / "tb" / "p.jsonl",
                      tmp / "link.jsonl")]  # fmt: skip
    ok = intact(run, before) and intact(other, obefore)
    return "; ".join(s[:70] for s, _ in outs) + f"; runs intact {ok}", worst(*(v for _, v in outs)) if ok else "FAIL"


@case("O06", "`predict --output` an existing folder, a path under a missing folder, /proc/version",
      "one line each (or the folder created); no traceback")  # fmt: skip
def _(tmp):
    run = copy_run("gpt", tmp / "run")
    (tmp / "dir").mkdir()
    outs = [cli("predict", run, "--text", "hi", "--output", t, cwd=tmp)
            for t in (tmp / "dir", tmp / "no" / "such" / "p.jsonl", "/proc/version")]  # fmt: skip
    bad = any("Traceback" in p.stderr or p.returncode not in (0, 2) for p in outs)
    return "; ".join(f"exit {p.returncode}: {last_line(p)}" for p in outs), "FAIL" if bad else "PASS"


@case("O07", "`export --format gguf --output X.gguf` where X.gguf is the user's existing file, without --overwrite",
      "refused; the file untouched")  # fmt: skip
def _(tmp):
    run, (victim, text) = copy_run("gpt", tmp / "run"), victim_file(tmp)
    target = tmp / "mine.gguf"
    victim.rename(target)
    seen, v = refusal(cli("export", run, "--format", "gguf", "--output", target, cwd=tmp), "--overwrite")
    ok = target.read_bytes() == text
    return seen + f"; file intact {ok}", v if ok else "FAIL"


# -- paths and config files ------------------------------------------------------------------------------------
@case("P01", "output.dir with spaces, accents, emoji and a quote: train, eval, report, export, export --format gguf",
      "every command works on the path")  # fmt: skip
def _(tmp):
    out = tmp / "runs dir" / "ré sumé ✓ 'q'"
    p = cli("train", GPT, f"output.dir={out}", *GPT_ARGS(tmp), cwd=tmp)
    steps = [p, cli("eval", out, cwd=tmp), cli("report", out, cwd=tmp), cli("export", out, cwd=tmp),
             cli("export", out, "--format", "gguf", cwd=tmp)]  # fmt: skip
    seen = ", ".join(str(s.returncode) for s in steps)
    return f"exits {seen}: {last_line(steps[-1])}", "PASS" if all(s.returncode == 0 for s in steps) else "FAIL"


@case("P02", "output.dir = '' ; '/' ; '.' ; an existing regular file ; a name with a newline",
      "one line each (the newline name may train); nothing outside written")  # fmt: skip
def _(tmp):
    (tmp / "afile").write_text("mine")
    outs = [train_digits(tmp, d) for d in ("", "/", ".", tmp / "afile")]
    nl = train_digits(tmp, "bad\nname")
    seen = "; ".join(f"exit {p.returncode}: {last_line(p)[:60]}" for p in outs) + f"; newline exit {nl.returncode}"
    verdicts = [refusal(p)[1] for p in outs]
    verdicts.append("FAIL" if "Traceback" in nl.stderr or nl.returncode not in (0, 2) else "PASS")
    if (tmp / "afile").read_text() != "mine":
        verdicts.append("FAIL")
    return seen, worst(*verdicts)


@case("P03", "`train` on a config path that is a folder, is missing, is binary junk, is a YAML list, is empty",
      "one line each, exit 2")  # fmt: skip
def _(tmp):
    (tmp / "folder.yaml").mkdir()
    (tmp / "junk.yaml").write_bytes(os.urandom(300))
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "empty.yaml").write_text("")
    outs = [refusal(cli("train", tmp / n, cwd=tmp)) for n in ("folder.yaml", "missing.yaml", "junk.yaml", "list.yaml", "empty.yaml")]
    return "; ".join(s[:70] for s, _ in outs), worst(*(v for _, v in outs))


@case("P04", "recipes holding a YAML alias bomb (9 levels of 9 references: a billion strings) as `name`, in `model` and in `data`",
      "one line each within seconds; no hang, no memory blow-up")  # fmt: skip
def _(tmp):
    chain = ", ".join(["&a0 [lol]"] + [f"&a{i} [{', '.join(['*a' + str(i - 1)] * 9)}]" for i in range(1, 10)])
    recipe = DIGITS.read_text()
    variants = {"name": recipe.replace("name: digits-cnn", f"name: [{chain}]"),
                "model": recipe.replace("model: {name: cnn, ", f"model: {{name: cnn, junk: [{chain}], "),
                "data": recipe.replace("data: {name: digits, ", f"data: {{name: digits, junk: [{chain}], ")}  # fmt: skip
    outs = []
    for name, text in variants.items():
        (tmp / f"{name}.yaml").write_text(text)
        outs.append(refusal(cli("train", tmp / f"{name}.yaml", "output.dir=r", cwd=tmp, timeout=90)))
    return "; ".join(s[:90] for s, _ in outs), worst(*(v for _, v in outs))


@case("P05", "a digits run and its folder made read-only (a read-only tmpfs): eval, report, export, predict, train --resume",
      "eval and predict work (they write nothing in the run) or one line; the others one line; nothing changed")  # fmt: skip
def _(tmp):
    ro = tmp / "ro"
    with read_only(ro) as state:
        run = copy_run("gpt", ro / "run")
        before = digest(run)
        make_read_only(ro, state)
        outs = [cli("eval", run, cwd=tmp), cli("predict", run, "--text", "hi", cwd=tmp), cli("report", run, cwd=tmp),
                cli("export", run, cwd=tmp), cli("train", GPT, f"output.dir={run}", *GPT_ARGS(tmp), "--resume", cwd=tmp)]  # fmt: skip
        ok = intact(run, before)
    bad = not ok or any("Traceback" in p.stderr or p.returncode not in (0, 2) for p in outs)
    return f"exits {[p.returncode for p in outs]}; {last_line(outs[-1])}; mounted {state['mounted']}", "FAIL" if bad else "PASS"


@case("P06", "a sweep whose output.dir is on a read-only tmpfs", "one line, exit 2")
def _(tmp):
    ro = tmp / "ro"
    with read_only(ro) as state:
        make_read_only(ro, state)
        return refusal(cli("sweep", SWEEP, f"output.dir={ro / 'sw'}", "sweep.n_trials=1", "train.max_steps=3", cwd=tmp))


@case("P07", "`export --format gguf` under a 64 KB file-size limit (EFBIG mid-write); then without the limit",
      "one line naming the full disk; no partial .gguf or temporary left; the second export works")  # fmt: skip
def _(tmp):
    run = copy_run("gpt", tmp / "run")
    seen, v = refusal(cli("export", run, "--format", "gguf", "--output", tmp / "o.gguf", cwd=tmp, limit_fsize=65536))
    left = [p.name for p in tmp.iterdir() if p.name.startswith(".tmp") or p.suffix == ".gguf"]
    q = cli("export", run, "--format", "gguf", "--output", tmp / "o.gguf", cwd=tmp)
    return seen + f"; left {left}; then exit {q.returncode}", v if not left and q.returncode == 0 else "FAIL"


@case("P08", "`export` (hf) and `predict --output` under a 64 KB file-size limit",
      "one line each; no partial destination")  # fmt: skip
def _(tmp):
    run = copy_run("gpt", tmp / "run")
    a, va = refusal(cli("export", run, "--output", tmp / "hf", cwd=tmp, limit_fsize=65536))
    left = [p.name for p in tmp.iterdir() if p.name not in ("run",)]
    return a + f"; left {left}", va if not left else "FAIL"


# -- bad values --------------------------------------------------------------------------------------------------
BAD_VALUES = [
    ("train.max_steps=0",), ("train.max_steps=-1",), ("train.batch_size=0",), ("train.batch_size=1000000000000",),
    ("optim.lr=nan",), ("optim.lr=-inf",), ("model.width=0",), ("model.num_classes=0",), ("train.grad_accum=0",),
    ("schedule.warmup_steps=-5",), ("data.val_fraction=1.5",), ("train.max_steps=abc",), ("=5",),
    ("train..max_steps=3",), ("eval.every=0",), ("train.keep_last=0",), ("train.epochs=0",),
    ("model.width=100000000",), ("train.seed=-1",), ("train.max_steps=1.5",),
    ("train.checkpoint_every=-3",), ("train.log_every=0",), ("optim.momentum=7",), ("model.dropout=1.5",),
]  # fmt: skip


LEGAL_VALUES = {"train.seed=-1", "train.batch_size=1000000000000"}


def _bad_values(tmp, values):
    outs = []
    for v in values:
        p = cli("train", DIGITS, "output.dir=r", "train.max_steps=10", *v, cwd=tmp, timeout=120)
        seen, verdict = refusal(p)
        if p.returncode == 0:  # accepted: fine when the value is legal (a seed, a batch larger than the data)
            verdict = "PASS" if v[0] in LEGAL_VALUES else "WEAK"
            shutil.rmtree(tmp / "r", ignore_errors=True)
        outs.append((f"{v[0]} -> {seen[:90]}", verdict))
    return "; ".join(s for s, v in outs if v != "PASS") or "all one line", worst(*(v for _, v in outs))


for i in range(0, len(BAD_VALUES), 4):
    chunk = BAD_VALUES[i : i + 4]
    case(f"V{i // 4 + 1:02d}", "train digits with " + ", ".join(c[0] for c in chunk),
         "one line each naming the key, exit 2 (a legal value trains)")(lambda tmp, chunk=chunk: _bad_values(tmp, chunk))  # fmt: skip


@case("V07", "optim.lr=1e30 with checkpoints every step", "the run stops (diverged/NaN, exit 2); no saved weight is non-finite")
def _(tmp):
    import torch
    from safetensors.torch import load_file

    p = train_digits(tmp, "r", "optim.lr=1e30", "train.checkpoint_every=1")
    bad = [str(f) for f in (tmp / "r").rglob("model.safetensors")
           if any(not torch.isfinite(t).all() for t in load_file(f).values() if t.is_floating_point())]  # fmt: skip
    seen = f"exit {p.returncode}: {last_line(p)}; non-finite files {bad}"
    return seen, "FAIL" if bad or "Traceback" in p.stderr else ("PASS" if p.returncode == 2 else "WEAK")


# -- resume with changed things -----------------------------------------------------------------------------------
@case("R01", "`train --resume model.width=64` (another architecture)", "one line naming the change; the run untouched")
def _(tmp):
    run = copy_run("digits", tmp / "run")
    before = digest(run)
    seen, v = refusal(train_digits(tmp, run, "model.width=64", "train.max_steps=12", flags=("--resume",)))
    return seen + f"; intact {intact(run, before)}", v if intact(run, before) else "FAIL"


@case("R02", "`train --resume optim.name=adamw` (optimizer state of another kind)", "one line or applied; no traceback")
def _(tmp):
    run = copy_run("digits", tmp / "run")
    p = train_digits(tmp, run, "optim.name=adamw", "train.max_steps=12", flags=("--resume",))
    return outcome(p)


@case("R03", "`train --resume train.max_steps=5` on a run at step 10", "exit 0 or one line; the run's weights untouched")
def _(tmp):
    run = copy_run("digits", tmp / "run")
    w = (run / "final" / "model.safetensors").read_bytes()
    p = train_digits(tmp, run, "train.max_steps=5", flags=("--resume",))
    ok = (run / "final" / "model.safetensors").read_bytes() == w
    seen = f"exit {p.returncode}: {last_line(p)}; final unchanged {ok}"
    return seen, "FAIL" if "Traceback" in p.stderr or p.returncode not in (0, 2) or not ok else "PASS"


@case("R04", "`train --resume` of the digits run with the GPT recipe (same output.dir)", "one line, the run untouched")
def _(tmp):
    run = copy_run("digits", tmp / "run")
    before = digest(run)
    seen, v = refusal(cli("train", GPT, f"output.dir={run}", *GPT_ARGS(tmp), "--resume", cwd=tmp))
    return seen + f"; intact {intact(run, before)}", v if intact(run, before) else "FAIL"


@case("R05", "`train --resume train.batch_size=7 data.val_fraction=0.5` (the data split changes)",
      "refused as a data change (or applied and logged); no traceback")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    p = train_digits(tmp, run, "train.batch_size=7", "data.val_fraction=0.5", "train.max_steps=12", flags=("--resume",))
    return outcome(p)


@case("R06", "a checkpoint's trainer_state.pt truncated AND the older one's manifest deleted; `train --resume`",
      "one line naming --overwrite; nothing trained from a damaged state")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    steps = sorted((run / "checkpoints").iterdir())
    for f in steps[-1].glob("*.pt"):
        f.write_bytes(f.read_bytes()[:20])
    for s in steps[:-1]:
        (s / "manifest.json").unlink()
    return refusal(train_digits(tmp, run, "train.max_steps=12", flags=("--resume",)), "--overwrite")


# -- kills and concurrency --------------------------------------------------------------------------------------
def _wait_for(pred: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while not pred():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


@case("K01", "SIGKILL a sweep once its first trial folder exists, then `sweep --resume`",
      "the resumed sweep completes every trial once; exit 0")  # fmt: skip
def _(tmp):
    args = (SWEEP, "output.dir=sw", "sweep.n_trials=3", "train.max_steps=6", "sweep.pruner=none")
    proc = start("sweep", *args, cwd=tmp)
    killed = _wait_for(lambda: any((tmp / "sw").glob("trial*/checkpoints/*")), proc)
    proc.kill()
    proc.communicate()
    p = cli("sweep", *args, "--resume", cwd=tmp)
    trials = sorted(x.name for x in (tmp / "sw").glob("trial*"))
    seen = f"killed {killed}; resume exit {p.returncode}: {last_line(p)}; trial folders {trials}"
    return seen, "PASS" if p.returncode == 0 and len(trials) == 3 else "FAIL"


@case("K02", "SIGTERM a sweep mid-trial, then `sweep --resume`", "exit 143 (or 130); the resumed sweep completes")
def _(tmp):
    args = (SWEEP, "output.dir=sw", "sweep.n_trials=2", "train.max_steps=6", "sweep.pruner=none")
    proc = start("sweep", *args, cwd=tmp)
    killed = _wait_for(lambda: any((tmp / "sw").glob("trial*/metrics.jsonl")), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    p = cli("sweep", *args, "--resume", cwd=tmp)
    seen = f"killed {killed}, exit {proc.returncode}; resume exit {p.returncode}: {last_line(p)}"
    bad = "Traceback" in err or p.returncode != 0
    return seen, "FAIL" if bad else ("PASS" if proc.returncode in (130, 143) or not killed else "WEAK")


@case("K03", "SIGKILL `export --format gguf` as soon as its temporary appears; then export again",
      "no partial .gguf at the destination; the second export works")  # fmt: skip
def _(tmp):
    run = copy_run("gpt", tmp / "run")
    proc = start("export", run, "--format", "gguf", "--output", tmp / "out" / "m.gguf", cwd=tmp)
    killed = _wait_for(lambda: (tmp / "out").is_dir() and any((tmp / "out").iterdir()), proc)
    proc.kill()
    proc.communicate()
    partial = (tmp / "out" / "m.gguf").exists() and killed
    q = cli("export", run, "--format", "gguf", "--output", tmp / "out" / "m.gguf", cwd=tmp)
    seen = f"killed {killed}; partial file {partial}; again exit {q.returncode}: {last_line(q)}"
    return seen, "FAIL" if partial or q.returncode != 0 else "PASS"


@case("K04", "SIGKILL `train` once it logged its start (before any checkpoint), then `train --resume`, then `train` (no flags)",
      "resume: one line naming --overwrite; a plain start reuses the folder (it never trained) and completes")  # fmt: skip
def _(tmp):
    proc = start("train", DIGITS, "output.dir=r", "train.max_steps=500", cwd=tmp)
    _wait_for(lambda: (tmp / "r" / "metrics.jsonl").exists(), proc)
    proc.kill()
    proc.communicate()
    a, va = refusal(train_digits(tmp, "r", flags=("--resume",)))
    b = train_digits(tmp, "r")
    if "Traceback" in b.stderr or b.returncode not in (0, 2):
        va = "FAIL"
    return f"{a}; plain start exit {b.returncode}: {last_line(b)[:60]}", va


@case("C01", "two `sweep` on one output.dir at once", "the second joins the study as a worker (flocks) or is refused in one line; each trial once; both end whole")
def _(tmp):
    args = (SWEEP, "output.dir=sw", "sweep.n_trials=2", "train.max_steps=6", "sweep.pruner=none")
    first = start("sweep", *args, cwd=tmp)
    _wait_for(lambda: (tmp / "sw").is_dir(), first)
    second = cli("sweep", *args, cwd=tmp)
    first.communicate(timeout=300)
    trials = sorted(x.name for x in (tmp / "sw").glob("trial*"))
    seen, v = outcome(second, f"first exit {first.returncode}; trial folders {trials}")
    return seen, v if first.returncode == 0 and len(trials) == 2 else "FAIL"


@case("C02", "`train --overwrite` and `train --resume` on a sweep's folder while the sweep runs",
      "refused in one line; the sweep completes")  # fmt: skip
def _(tmp):
    args = (SWEEP, "output.dir=sw", "sweep.n_trials=2", "train.max_steps=8", "sweep.pruner=none")
    first = start("sweep", *args, cwd=tmp)
    _wait_for(lambda: (tmp / "sw").is_dir(), first)
    a, va = refusal(train_digits(tmp, "sw", flags=("--overwrite",)))
    first.communicate(timeout=300)
    b, vb = refusal(train_digits(tmp, "sw", flags=("--resume",)))
    return f"{a}; {b}; sweep exit {first.returncode}", worst(va, vb) if first.returncode == 0 else "FAIL"


@case("C03", "`eval` and `export` of a run while `train --resume` trains it further",
      "each works on the finished final/ or says one line; the training run ends whole")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    proc = start("train", DIGITS, f"output.dir={run}", "train.max_steps=300", "train.checkpoint_every=50", "--resume", cwd=tmp)
    outs = [cli("eval", run, cwd=tmp), cli("export", run, "--output", tmp / "e", cwd=tmp)]
    proc.communicate(timeout=300)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    bad = proc.returncode != 0 or any("Traceback" in p.stderr or p.returncode not in (0, 2) for p in outs)
    return f"exits {[p.returncode for p in outs]}, train {proc.returncode}, {len(lines)} log lines", "FAIL" if bad else "PASS"


# -- sweeps ---------------------------------------------------------------------------------------------------------
SWEEP_BAD = [
    ("sweep.n_trials=0",), ("sweep.n_trials=-1",), ("sweep.space={optim.nonexistent: {uniform: [0, 1]}}",),
    ("sweep.space={optim.lr: {loguniform: [0, 1]}}",), ("sweep.space={optim.lr: {uniform: [1, 0]}}",),
    ("sweep.space={}",), ("sweep.space={optim.lr: {choice: []}}",), ("sweep.objective=nonexistent_metric",),
    ("sweep.sampler=evil:Sampler",), ("sweep.pruner.name=nonexistent",),
]  # fmt: skip


def _bad_sweeps(tmp, values):
    outs = [refusal(cli("sweep", SWEEP, "output.dir=sw", "train.max_steps=3", *v, cwd=tmp)) for v in values]
    return "; ".join(f"{v[0]} -> {s[:80]}" for v, (s, x) in zip(values, outs) if x != "PASS") or "all one line", worst(*(x for _, x in outs))


for i in range(0, len(SWEEP_BAD), 2):
    chunk = SWEEP_BAD[i : i + 2]
    case(f"W{i // 2 + 1:02d}", "sweep with " + ", ".join(c[0] for c in chunk),
         "one line each, exit 2")(lambda tmp, chunk=chunk: _bad_sweeps(tmp, chunk))  # fmt: skip


@case("W06", "`sweep --workers 0`, `--workers -2`, `--sweep missing.yaml`, `--best` on a folder with no sweep",
      "one line each, exit 2")  # fmt: skip
def _(tmp):
    outs = [refusal(cli("sweep", SWEEP, "output.dir=sw", *a, cwd=tmp))
            for a in (("--workers", "0"), ("--workers", "-2"), ("--sweep", "missing.yaml"), ("--best",))]  # fmt: skip
    return "; ".join(s[:80] for s, _ in outs), worst(*(v for _, v in outs))


@case("W07", "`sweep` and `sweep --overwrite` with output.dir = an existing training run",
      "refused (not a sweep) without --overwrite; the run untouched")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    before = digest(run)
    seen, v = refusal(cli("sweep", SWEEP, f"output.dir={run}", "sweep.n_trials=1", "train.max_steps=3", cwd=tmp))
    return seen + f"; intact {intact(run, before)}", v if intact(run, before) else "FAIL"


@case("W08", "`sweep --resume` after changing the search space; after deleting the study's storage",
      "one line each (or a fresh study), no traceback; finished trials untouched")  # fmt: skip
def _(tmp):
    args = (SWEEP, "output.dir=sw", "sweep.n_trials=1", "train.max_steps=3", "sweep.pruner=none")
    first = cli("sweep", *args, cwd=tmp)
    trials = sorted((tmp / "sw").glob("trial*"))
    before = digest(trials[0]) if trials else {}
    a = cli("sweep", *args, "sweep.space={optim.lr: {uniform: [0.01, 0.02]}}", "--resume", cwd=tmp)
    for f in (tmp / "sw").iterdir():
        if f.is_file() and f.suffix in (".db", ".sqlite", ".log", ".journal"):
            f.write_bytes(os.urandom(512))
    b = cli("sweep", *args, "--resume", cwd=tmp)
    ok = bool(trials) and intact(trials[0], before)
    bad = not ok or first.returncode != 0 or any("Traceback" in p.stderr or p.returncode not in (0, 2) for p in (a, b))
    return f"first {first.returncode}; changed space {a.returncode}: {last_line(a)[:80]}; damaged storage {b.returncode}: {last_line(b)[:80]}", "FAIL" if bad else "PASS"


@case("W09", "a sweep whose every trial diverges (optim.lr in [1e20, 1e30])",
      "trials marked failed/diverged; one line or a sweep summary; no traceback")  # fmt: skip
def _(tmp):
    p = cli("sweep", SWEEP, "output.dir=sw", "sweep.n_trials=2", "train.max_steps=5", "sweep.pruner=none",
            "sweep.space={optim.lr: {loguniform: [1.0e20, 1.0e30]}}", cwd=tmp)  # fmt: skip
    return outcome(p)


@case("W10", "`train --resume` and `eval` on a sweep folder; `sweep --best` on a damaged sweep (trial config garbage)",
      "one line each")  # fmt: skip
def _(tmp):
    args = (SWEEP, "output.dir=sw", "sweep.n_trials=1", "train.max_steps=3", "sweep.pruner=none")
    cli("sweep", *args, cwd=tmp)
    a = refusal(cli("eval", tmp / "sw", cwd=tmp))
    for c in (tmp / "sw").rglob("config.yaml"):
        c.write_text("\x00junk: [")
    b = cli("sweep", *args, "--best", cwd=tmp)
    bad = "Traceback" in b.stderr or b.returncode not in (0, 2)
    return f"eval {a[0]}; best exit {b.returncode}: {last_line(b)}", worst(a[1], "FAIL" if bad else "PASS")


# -- GGUF export and generation -----------------------------------------------------------------------------------
@case("G01", "`export --format gguf` of the digits CNN run; of a char-tokenizer GPT (gpt2 flavour)",
      "one line each naming why, exit 2")  # fmt: skip
def _(tmp):
    a, va = refusal(cli("export", copy_run("digits", tmp / "d"), "--format", "gguf", cwd=tmp))
    p = cli("train", GPT, "output.dir=c", f"data.path={tiny_text(tmp)}", "model.n_layer=1", "train.max_steps=2", "eval.every=2", cwd=tmp)
    b, vb = refusal(cli("export", tmp / "c", "--format", "gguf", cwd=tmp))
    return f"{a}; {b}", worst(va, vb) if p.returncode == 0 else "FAIL"


@case("G02", "`export --format gguf --dtype q4_0`, `--dtype fp64`, `export --dtype int3` (hf)", "one line each")
def _(tmp):
    run = copy_run("gpt", tmp / "run")
    outs = [refusal(cli("export", run, *a, cwd=tmp)) for a in (("--format", "gguf", "--dtype", "q4_0"),
            ("--format", "gguf", "--dtype", "fp64"), ("--dtype", "int3"))]  # fmt: skip
    return "; ".join(s[:80] for s, _ in outs), worst(*(v for _, v in outs))


@case("G03", "the GPT run's tokenizer/tokenizer.json replaced by junk; by a vocabulary with an id past vocab_size",
      "`export --format gguf` and `generate`: one line each")  # fmt: skip
def _(tmp):
    run = copy_run("gpt", tmp / "run")
    (run / "tokenizer" / "tokenizer.json").write_text("{junk")
    outs = [refusal(cli("export", run, "--format", "gguf", cwd=tmp)),
            refusal(cli("generate", run, "--prompt", "hi", "--max-new-tokens", "2", cwd=tmp))]  # fmt: skip
    run2 = copy_run("gpt", tmp / "run2")
    tj = json.loads((run2 / "tokenizer" / "tokenizer.json").read_text())
    tj["added_tokens"].append({**tj["added_tokens"][0], "id": 99999, "content": "<evil>"})
    (run2 / "tokenizer" / "tokenizer.json").write_text(json.dumps(tj))
    outs.append(refusal(cli("export", run2, "--format", "gguf", cwd=tmp)))
    return "; ".join(s[:90] for s, _ in outs), worst(*(v for _, v in outs))


@case("G04", "`generate` with --max-new-tokens -1 / 0, --temperature -1, --top-p 5, --top-k 0 on a GPT run and on its .gguf",
      "one line each for the invalid values (0 new tokens may print nothing)")  # fmt: skip
def _(tmp):
    run = copy_run("gpt", tmp / "run")
    gg = cli("export", run, "--format", "gguf", "--output", tmp / "m.gguf", cwd=tmp)
    outs = []
    for target in (run, tmp / "m.gguf"):
        for a in (("--max-new-tokens", "-1"), ("--temperature", "-1"), ("--top-p", "5"), ("--top-k", "0")):
            outs.append(refusal(cli("generate", target, "--prompt", "ROMEO:", *a, cwd=tmp)))
    z = cli("generate", run, "--prompt", "ROMEO:", "--max-new-tokens", "0", cwd=tmp)
    outs.append((f"zero exit {z.returncode}", "FAIL" if "Traceback" in z.stderr or z.returncode not in (0, 2) else "PASS"))
    bad = [s for s, v in outs if v != "PASS"]
    return ("; ".join(bad) or "all one line") + f"; gguf export exit {gg.returncode}", worst(*(v for _, v in outs))


@case("G05", "`generate` on the digits CNN run; a prompt of 100 KB; a prompt with NUL and lone surrogates",
      "one line for the classifier; the long/odd prompts one line or generated")  # fmt: skip
def _(tmp):
    a, va = refusal(cli("generate", copy_run("digits", tmp / "d"), "--prompt", "hi", cwd=tmp))
    run = copy_run("gpt", tmp / "run")
    outs = [cli("generate", run, "--prompt", "x" * 100_000, "--max-new-tokens", "2", cwd=tmp),
            cli("generate", run, "--prompt", "a\x01b\u200b\udcff", "--max-new-tokens", "2", cwd=tmp)]  # fmt: skip
    bad = any("Traceback" in p.stderr or p.returncode not in (0, 2) for p in outs)
    return f"{a}; long/odd exits {[p.returncode for p in outs]}: {last_line(outs[0])[:60]}", worst(va, "FAIL" if bad else "PASS")


@case("G06", "a GPT run with final/ tampered (a weight changed, manifest stale); `export --format gguf`",
      "refused by the manifest, nothing written")  # fmt: skip
def _(tmp):
    run = copy_run("gpt", tmp / "run")
    f = run / "final" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    seen, v = refusal(cli("export", run, "--format", "gguf", "--output", tmp / "x.gguf", cwd=tmp), "sha256")
    return seen, v if not (tmp / "x.gguf").exists() else "FAIL"


# -- DPO preference data ----------------------------------------------------------------------------------------------
def dpo(tmp: Path, data: Path, *overrides: str) -> subprocess.CompletedProcess:
    return cli("train", DPO, f"data.path={data}", "output.dir=dpo", "train.max_steps=1", *overrides, cwd=tmp, timeout=300)


def pairs(n: int = 12) -> list[dict]:
    with gzip.open(PREFERENCE, "rt") as f:
        return [json.loads(next(f)) for _ in range(n)]


@case("D01", "preference rows missing `rejected`; a row where `chosen` is a number; a JSON list line",
      "one line naming the file and row, exit 2")  # fmt: skip
def _(tmp):
    rows = pairs()
    outs = []
    for i, bad in enumerate(['{"chosen": "hi"}', '{"chosen": 5, "rejected": "x"}', '["a", "b"]']):
        f = tmp / f"p{i}.jsonl"
        f.write_text("\n".join([json.dumps(r) for r in rows] + [bad]) + "\n")
        outs.append(refusal(dpo(tmp, f)))
    return "; ".join(s[:100] for s, _ in outs), worst(*(v for _, v in outs))


@case("D02", "a preference file: empty; invalid UTF-8; a truncated .gz; an invalid JSON line",
      "one line each naming the file, exit 2")  # fmt: skip
def _(tmp):
    rows = [json.dumps(r) for r in pairs()]
    (tmp / "empty.jsonl").write_text("")
    (tmp / "latin.jsonl").write_bytes(("\n".join(rows) + "\n").encode() + b'{"chosen": "\xff\xfe", "rejected": "b"}\n')
    whole = gzip.compress(("\n".join(rows) + "\n").encode())
    (tmp / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp / "bad.jsonl").write_text("\n".join(rows) + "\n{not json\n")
    outs = [refusal(dpo(tmp, tmp / n)) for n in ("empty.jsonl", "latin.jsonl", "cut.jsonl.gz", "bad.jsonl")]
    return "; ".join(s[:100] for s, _ in outs), worst(*(v for _, v in outs))


@case("D03", "DPO with task.beta=-1, task.beta=0, data.max_length=0, task.loss=evil, train.batch_size=0",
      "one line each, exit 2")  # fmt: skip
def _(tmp):
    f = tmp / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in pairs()) + "\n")
    outs = [refusal(dpo(tmp, f, o)) for o in ("task.beta=-1", "task.beta=0", "data.max_length=0", "task.loss=evil",
                                                "train.batch_size=0")]  # fmt: skip
    return "; ".join(s[:90] for s, _ in outs), worst(*(v for _, v in outs))


# -- eval / predict on hostile input --------------------------------------------------------------------------------------
@case("E01", "`eval RUN` with overrides data.name=nonexistent, model.width=64, eval.batch_size=0",
      "one line each, exit 2 (model.width: the model comes from final/tunelab_model.json)")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    before = digest(run)
    outs = [refusal(cli("eval", run, o, cwd=tmp)) for o in ("data.name=nonexistent", "model.width=64", "eval.batch_size=0")]
    ok = intact(run, before)
    return "; ".join(s[:80] for s, _ in outs) + f"; run intact {ok}", worst(*(v for _, v in outs)) if ok else "FAIL"


@case("E02", "`predict` GPT run with --file: missing, a folder, binary junk, empty, a CSV without a text column; --batch-size 0",
      "one line each, exit 2")  # fmt: skip
def _(tmp):
    run = copy_run("gpt", tmp / "run")
    (tmp / "dir.csv").mkdir()
    (tmp / "junk.jsonl").write_bytes(os.urandom(500))
    (tmp / "empty.csv").write_text("")
    (tmp / "cols.csv").write_text("a,b\n1,2\n")
    outs = [refusal(cli("predict", run, "--file", tmp / n, cwd=tmp)) for n in ("missing.csv", "dir.csv", "junk.jsonl", "empty.csv", "cols.csv")]
    outs.append(refusal(cli("predict", run, "--text", "hi", "--batch-size", "0", cwd=tmp)))
    return "; ".join(s[:70] for s, _ in outs), worst(*(v for _, v in outs))


@case("E03", "`predict` digits run with --image: a text file named .png, a missing file, a 1x1 PNG, a folder",
      "one line each for the unreadable ones; the 1x1 image predicted or one line")  # fmt: skip
def _(tmp):
    from PIL import Image

    run = copy_run("digits", tmp / "run")
    (tmp / "fake.png").write_text("not an image")
    Image.new("RGB", (1, 1)).save(tmp / "one.png")
    outs = [refusal(cli("predict", run, "--image", tmp / n, cwd=tmp)) for n in ("fake.png", "missing.png", ".")]
    p = cli("predict", run, "--image", tmp / "one.png", cwd=tmp)
    outs.append((f"1x1 exit {p.returncode}", "FAIL" if "Traceback" in p.stderr or p.returncode not in (0, 2) else "PASS"))
    return "; ".join(s[:80] for s, _ in outs), worst(*(v for _, v in outs))


@case("E04", "`inspect` on a folder, a missing path, random bytes named .safetensors, a run folder; --against a junk recipe",
      "one line each, or the inspection")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    (tmp / "junk.safetensors").write_bytes(os.urandom(256))
    (tmp / "junk.yaml").write_text("model: [")
    outs = [cli("inspect", t, cwd=tmp) for t in (tmp, tmp / "missing.pt", tmp / "junk.safetensors", run)]
    outs.append(cli("inspect", run / "final" / "model.safetensors", "--against", tmp / "junk.yaml", cwd=tmp))
    bad = any("Traceback" in p.stderr or p.returncode not in (0, 2) for p in outs)
    return f"exits {[p.returncode for p in outs]}: {last_line(outs[2])[:80]}", "FAIL" if bad else "PASS"


@case("E05", "`report` on: a missing folder, a user folder, an empty run (no metrics), two runs one hostile; --dpi 0 / -5",
      "one line each, or a report of what is readable")  # fmt: skip
def _(tmp):
    run = copy_run("digits", tmp / "run")
    empty = copy_run("digits", tmp / "empty")
    (empty / "metrics.jsonl").write_text("")
    (tmp / "user").mkdir()
    outs = [cli("report", *a, cwd=tmp) for a in ((tmp / "missing",), (tmp / "user",), (empty,), (run, tmp / "user"),
                                                  (run, "--dpi", "0"), (run, "--dpi", "-5"))]  # fmt: skip
    bad = any("Traceback" in p.stderr or p.returncode not in (0, 2) for p in outs)
    return f"exits {[p.returncode for p in outs]}", "FAIL" if bad else "PASS"


@case("F01", "FSDP (torchrun --nproc_per_node=2, gloo): a run's sharded checkpoint tampered (one byte), then `--resume`",
      "the checkpoint refused by its manifest; an older one or one line; no traceback per rank")  # fmt: skip
def _(tmp):
    torchrun = Path(sys.executable).with_name("torchrun")
    base = [str(torchrun), "--nproc_per_node=2", "--master_port", str(_free_port()), "-m", "tunelab.cli",
            "train", str(DIGITS), "output.dir=f", "train.distributed.strategy=fsdp", "train.checkpoint_every=4", "train.keep_last=3",
            "train.batch_size=16"]  # fmt: skip
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*base, "train.max_steps=8"], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        return f"fsdp train exit {p.returncode}: {last_line(p)}", "WEAK" if "Traceback" not in p.stderr else "FAIL"
    ckpts = sorted((tmp / "f" / "checkpoints").iterdir())
    files = sorted(f for f in ckpts[-1].rglob("*") if f.is_file() and f.name != "manifest.json")
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[0].write_bytes(bytes(data))
    q = subprocess.run([*base, "train.max_steps=10", "--resume"], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    seen = f"checkpoints {[c.name for c in ckpts]}; resume exit {q.returncode}: {last_line(q)}"
    return seen, "FAIL" if "Traceback" in q.stderr else ("PASS" if q.returncode in (0, 2) else "WEAK")


def _free_port() -> int:
    """A port nothing listens on now (a fixed range collided with the test suite's torchrun jobs)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


# -- the baselines ----------------------------------------------------------------------------------------------------
def tiny_text(tmp: Path) -> Path:
    f = tmp / "tiny.txt"
    if not f.exists():
        f.write_text(SHAKESPEARE.read_text()[:20000])
    return f


def GPT_ARGS(tmp: Path) -> list[str]:  # noqa: N802 - reads like the constant it stands for
    return [f"data.path={tiny_text(tmp)}", "data.tokenizer=bpe", "data.vocab_size=300", "model.size=baby-llama",
            "model.n_layer=1", "train.max_steps=4", "eval.every=4", "train.checkpoint_every=2", "train.log_every=1"]  # fmt: skip


def build_baselines(root: Path) -> None:
    d = train_digits(root, root / "digits", "train.checkpoint_every=5")
    g = cli("train", GPT, f"output.dir={root / 'gpt'}", *GPT_ARGS(root), cwd=root)
    for name, p in (("digits", d), ("gpt", g)):
        if p.returncode != 0:
            raise SystemExit(f"baseline {name} failed: {p.stderr[-2000:]}")
        BASE[name] = root / name


def run_case(entry, root: Path, keep: bool) -> tuple[str, str, str, str, str]:
    cid, tried, expected, fn = entry
    tmp = Path(tempfile.mkdtemp(prefix=f"{cid}-", dir=root))
    try:
        observed, verdict = fn(tmp)
    except Exception as e:  # the attack itself broke: report it as a FAIL to look at, not a crash of the script
        observed, verdict = f"attack script error: {type(e).__name__}: {e}"[:300], "FAIL"
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return cid, tried, expected, observed.replace("\n", " "), verdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="case ids (prefixes) to run")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = ap.parse_args()
    chosen = [c for c in CASES if not args.only or any(c[0].startswith(o) for o in args.only)]
    root = Path(tempfile.mkdtemp(prefix="tunelab-attack-"))
    build_baselines(root)
    counts = {"PASS": 0, "WEAK": 0, "FAIL": 0}
    print("id | tried | expected | observed | verdict", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for cid, tried, expected, observed, verdict in pool.map(lambda c: run_case(c, root, args.keep), chosen):
            counts[verdict] += 1
            print(f"{cid} | {tried} | {expected} | {observed} | {verdict}", flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"cases": len(chosen), **counts}))
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
