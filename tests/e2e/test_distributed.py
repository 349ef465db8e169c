"""Distributed training on this machine: torchrun with 2 processes on the gloo backend (CPU). FSDP2 and DDP
against one process of the same global batch, resharded resumes, a rank killed mid-run, a model built on
the meta device and loaded shard by shard, and LoRA under FSDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, assert_one_line_error, run_cli

GPT = "recipes/gpt-shakespeare-char.yaml"
SFT = "recipes/smollm2-lora-alpaca.yaml"
BABY_LLAMA = ["model.flavour=llama", "model.n_kv_head=2", "train.compile=false", "output.progress=off",
              "report.enabled=false", "eval.max_batches=1", "eval.batch_size=12", "schedule.warmup_steps=0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TUNELAB_MALLOC": "system"}
_PORT = [29700]


def torchrun(*args: str, nproc: int = 2, check: bool = True, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    _PORT[0] += 1
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_PORT[0]}",
           "-m", "tunelab.cli", "train", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def max_diff(a: Path, b: Path) -> float:
    sa, sb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def _gpt(out: Path, *extra: str) -> list[str]:
    return [GPT, f"output.dir={out}", *BABY_LLAMA, *extra]


@pytest.fixture(scope="module")
def sgd_single(tmp_path_factory) -> Path:
    """One process, global batch 12, SGD, 20 steps (checkpoints at 10 and 20)."""
    out = tmp_path_factory.mktemp("dist") / "single"
    run_cli("train", *_gpt(out, "train.batch_size=12", "optim.name=sgd", "optim.lr=0.05", "train.max_steps=20",
                           "train.checkpoint_every=10", "train.log_every=5"), env=ENV)
    return out


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_ranks_match_one_process_of_the_same_global_batch(sgd_single, tmp_path, strategy):
    """2 ranks x (micro-batch 3 x accumulation 2) against 1 x 12: same examples per step, targets counted
    across ranks, gradients synchronised only at the window's end."""
    out = tmp_path / strategy
    torchrun(*_gpt(out, "train.batch_size=3", "train.grad_accum=2", "optim.name=sgd", "optim.lr=0.05",
                   "train.max_steps=20", "train.checkpoint_every=10", "train.log_every=5",
                   f"train.distributed.strategy={strategy}"))
    assert max_diff(sgd_single, out) <= 1e-4
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 1  # rank 0 writes the log
    # the logged training loss is the global batch's (not rank 0's sum over both ranks' targets, which read
    # as half the loss), and throughput counts both ranks' examples
    single = [json.loads(line) for line in (sgd_single / "metrics.jsonl").read_text().splitlines()]
    losses = [[e["loss"] for e in log if e["event"] == "train"] for log in (single, events)]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    per_step = [e["samples_per_s"] * e["step_time_s"] for e in events if e["event"] == "train"]
    assert per_step == pytest.approx([12] * 4)
    if strategy == "fsdp":
        assert sorted(p.name for p in (out / "checkpoints" / "step-20").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        shards = events[0]["fsdp"]
        assert shards["param_bytes_rank"] / shards["param_bytes_model"] == pytest.approx(0.5, abs=0.02)


def test_adamw_under_fsdp_stays_within_fp32_tolerance(tmp_path):
    """AdamW divides by sqrt(v) + eps, so a reduction order's last-bit differences in the gradients grow where
    v is tiny; after 20 steps the weights still agree to 1e-4 (the measured gap is ~1e-6)."""
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    run_cli("train", *_gpt(single, "train.batch_size=12", "train.max_steps=20", "train.checkpoints=false"), env=ENV)
    torchrun(*_gpt(sharded, "train.batch_size=6", "train.max_steps=20", "train.checkpoints=false",
                   "train.distributed.strategy=fsdp"))
    assert max_diff(single, sharded) <= 1e-4


def test_checkpoints_reshard_between_two_ranks_and_one(sgd_single, tmp_path):
    """A checkpoint written by 2 FSDP ranks resumes in one process, and one written by one process resumes
    on 2 FSDP ranks; both reach the uninterrupted run's weights."""
    import shutil

    sgd = ["optim.name=sgd", "optim.lr=0.05", "train.checkpoint_every=10", "train.max_steps=30"]
    whole = tmp_path / "whole"
    shutil.copytree(sgd_single, whole)
    run_cli("train", *_gpt(whole, "train.batch_size=12", *sgd), "--resume", env=ENV)
    two = tmp_path / "two"
    torchrun(*_gpt(two, "train.batch_size=6", *sgd, "train.max_steps=20", "train.distributed.strategy=fsdp"))
    shutil.copytree(two, tmp_path / "two-copy")
    run_cli("train", *_gpt(two, "train.batch_size=12", *sgd), "--resume", env=ENV)  # 2 -> 1
    one = tmp_path / "one"
    shutil.copytree(sgd_single, one)
    torchrun(*_gpt(one, "train.batch_size=6", *sgd, "train.distributed.strategy=fsdp"), "--resume")  # 1 -> 2
    assert max_diff(whole, two) <= 1e-5 and max_diff(whole, one) <= 1e-5
    # a global batch that does not divide the examples already seen cannot continue exactly: one line
    proc = run_cli("train", *_gpt(tmp_path / "two-copy", "train.batch_size=7", *sgd), "--resume", check=False, env=ENV)
    assert_one_line_error(proc, "not a whole number of global batches of 7")


class KilledJob:
    """A 2-rank FSDP job (torchrun options `launch`) whose rank 1 is SIGKILLed once checkpoint 10 exists.

    The launcher runs in its own session with stderr in a file (no pipe to fill or to wait on for EOF), and
    it and its whole process tree are killed at the end. If it outlives `wait`'s timeout, every rank is asked for its Python
    stacks (SIGUSR1, see cli._stacks_on_sigusr1) and those and the process tree go into the failure."""

    def __init__(self, out: Path, launch: list[str], settings: list[str], tmp: Path):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *launch, "-m", "tunelab.cli",
               "train", *_gpt(out, "train.batch_size=6", *settings, "train.distributed.strategy=fsdp")]
        self.out, self.log = out, tmp / "torchrun.err"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        deadline = time.time() + 300
        while not (out / "checkpoints" / "step-10").is_dir():
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise AssertionError(f"no checkpoint 10 (launcher {self.proc.returncode}):\n{self.stderr()[-3000:]}")
            time.sleep(0.1)
        os.kill(next(p for p in self.ranks() if _rank_of(p) == 1), signal.SIGKILL)  # rank 1 dies mid-run

    def tree(self) -> list[int]:
        """The launcher's descendants (torchrun starts each rank in a session of its own)."""
        found, todo = [], [self.proc.pid]
        while todo:
            out = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True).stdout
            todo += [int(p) for p in out.split()]
            found += [int(p) for p in out.split()]
        return found

    def ranks(self) -> list[int]:
        return [p for p in self.tree() if _rank_of(p) is not None]

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: int) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            for pid in self.ranks():
                os.kill(pid, signal.SIGUSR1)
            time.sleep(3)
            pids = ",".join(map(str, [self.proc.pid, *self.tree()]))
            tree = subprocess.run(["ps", "-o", "pid,ppid,stat,pcpu,etime,args", "-p", pids],
                                  capture_output=True, text=True).stdout
            self.close()
            raise AssertionError(f"torchrun still running after {timeout} s\n{tree}\n{self.stderr()[-12000:]}") from e
        finally:
            self.close()

    def close(self) -> None:
        for pid in [*self.tree(), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()


def _rank_of(pid: int) -> int | None:
    """The RANK torchrun gave process `pid` (None for the launcher)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)


def test_a_killed_rank_ends_the_job_and_the_run_resumes_on_two_and_on_one(tmp_path):
    sgd = ["optim.name=sgd", "optim.lr=0.05", "schedule.name=constant", "train.checkpoint_every=5", "train.max_steps=400",
           "train.log_every=1"]  # a constant lr: the resumes shorten the run to 40 steps
    out = tmp_path / "run"
    _PORT[0] += 1
    job = KilledJob(out, [f"--master_port={_PORT[0]}"], sgd, tmp_path)
    assert job.wait(timeout=300) != 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] in ("failed", "interrupted") and summary["error"]
    assert 10 <= summary["global_step"] < 400
    # resume on 2 ranks and, from a copy, on 1: both reach the uninterrupted run's weights
    import shutil

    shutil.copytree(out, tmp_path / "on-one")
    end = ["train.max_steps=40"]
    torchrun(*_gpt(out, "train.batch_size=6", *sgd, *end, "train.distributed.strategy=fsdp"), "--resume")
    run_cli("train", *_gpt(tmp_path / "on-one", "train.batch_size=12", *sgd, *end), "--resume", env=ENV)
    whole = tmp_path / "whole"
    run_cli("train", *_gpt(whole, "train.batch_size=12", *sgd, *end), env=ENV)
    assert max_diff(whole, out) <= 1e-5 and max_diff(whole, tmp_path / "on-one") <= 1e-5


@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_torchrun_max_restarts_resumes_without_resume_flag(tmp_path, rendezvous):
    """A rank killed under `torchrun --max-restarts`: the restarted command (the same one, no --resume)
    continues from the newest checkpoint and ends where an uninterrupted run ends. torchrun keeps one store
    for all attempts; tunelab prefixes it per attempt (engine.distributed._attempt_store), without which a
    restarted gloo group could wait forever on the dead attempt's keys."""
    sgd = ["optim.name=sgd", "optim.lr=0.05", "schedule.name=constant", "train.checkpoint_every=5",
           "train.max_steps=40", "train.log_every=1", "train.distributed.timeout_s=120"]
    out = tmp_path / "run"
    _PORT[0] += 1
    launch = (["--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{_PORT[0]}"] if rendezvous == "c10d"
              else [f"--master_port={_PORT[0]}"])
    job = KilledJob(out, ["--max-restarts=2", *launch], sgd, tmp_path)
    code = job.wait(timeout=300)
    err = job.stderr()
    assert code == 0, err[-3000:]
    assert "auto-resume: continuing from the newest checkpoint" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 40
    whole = tmp_path / "whole"
    run_cli("train", *_gpt(whole, "train.batch_size=12", *sgd), env=ENV)
    assert max_diff(whole, out) <= 1e-5


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm_gguf) -> Path:
    """A 2-layer Hugging Face Llama with SmolLM2's tokenizer and chat template, saved as a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.hub import resolve_model_path
    from tunelab.tokenizers import load_hf_tokenizer

    folder = tmp_path_factory.mktemp("tiny") / "llama"
    tok = load_hf_tokenizer(resolve_model_path(str(smollm_gguf)))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _sft(out: Path, model: Path, shared_data: Path, *extra: str) -> list[str]:
    return [SFT, f"output.dir={out}", f"model.path={model}", "model.gradient_checkpointing=false",
            f"data.path={shared_data / 'instruct' / 'alpaca_data_1k.json'}", "data.limit=48", "data.eval_size=8",
            "data.max_length=64", "data.num_samples=0", "train.max_steps=4", "train.grad_accum=1",
            "train.log_every=1", "output.progress=off", "report.enabled=false", "eval.every=4", *extra]


def test_a_model_built_on_meta_loads_shard_by_shard(tiny_llama, shared_data, tmp_path):
    """Full fine-tuning under FSDP: the model is built on the meta device, sharded, and each rank reads only
    its rows of the pretrained weights; each rank holds about half the parameters, the load is accounted
    for, and training matches one process."""
    full = ["strategy={name: full}", "optim.lr=1e-3"]
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    run_cli("train", *_sft(single, tiny_llama, shared_data, "train.batch_size=4", *full), env=ENV)
    torchrun(*_sft(sharded, tiny_llama, shared_data, "train.batch_size=2", "train.distributed.strategy=fsdp", *full))
    start = json.loads((sharded / "metrics.jsonl").read_text().splitlines()[0])
    assert start["fsdp"]["param_bytes_rank"] / start["fsdp"]["param_bytes_model"] == pytest.approx(0.5, abs=0.02)
    report = json.loads((sharded / "load_report.json").read_text())
    assert report["loaded"] > 0 and report["missing"] == [] and report["unexpected"] == []
    a = load_file(str(single / "final" / "model.safetensors"))
    b = load_file(str(sharded / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4


def test_lora_under_fsdp_saves_an_adapter_that_generate_and_export_use(tiny_llama, shared_data, tmp_path):
    out = tmp_path / "lora"
    torchrun(*_sft(out, tiny_llama, shared_data, "train.batch_size=2", "train.distributed.strategy=fsdp"))
    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    proc = run_cli("generate", out, "--prompt", "Hi", "--max-new-tokens", "4", env=ENV)
    assert "[stopped" in proc.stderr
    merged = Path(run_cli("export", out, "--merge", env=ENV).stdout.strip().splitlines()[-1])
    assert (merged / "model.safetensors").is_file() or list(merged.glob("model*.safetensors"))


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_plan_per_rank_figures_match_a_two_rank_gloo_run(tmp_path, strategy):
    """`tunelab plan --nproc 2`: each rank's parameters, gradients and optimizer state, and (FSDP) the bytes
    gathered and reduce-scattered per step, within 20% of what a 2-rank gloo run holds and moves."""
    from tunelab.config import load_config
    from tunelab.insight.plan import make_plan

    args = [*BABY_LLAMA, "train.batch_size=4", "train.max_steps=2", "optim.name=adamw",
            f"train.distributed.strategy={strategy}", f"output.dir={tmp_path / 'run'}"]
    _PORT[0] += 1
    found = tmp_path / "found.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_PORT[0]}",
                    "tests/dist_memory_probe.py", str(found), GPT, *args],
                   cwd=REPO, check=True, timeout=300, env=ENV, capture_output=True)
    measured = json.loads(found.read_text())
    plan = make_plan(load_config(REPO / GPT, args), log=lambda m: None, time_device=False, nproc=2)
    row = next(r for r in plan.ranks if r.strategy == strategy)
    assert row.shard_ranks == (2 if strategy == "fsdp" else 1)
    keys = ["weights_bytes", "gradients_bytes", "optimizer_bytes"]
    if strategy == "fsdp":
        keys += ["all_gather_bytes", "reduce_scatter_bytes"]
        assert row.weights_bytes < 0.6 * plan.weights_bytes  # sharded: about half the model per rank
    for key in keys:
        print(key, getattr(row, key), measured[key])
        assert measured[key] > 0
        assert getattr(row, key) == pytest.approx(measured[key], rel=0.2), key


@pytest.mark.slow
def test_gpu_script_dry_run_builds_and_runs_every_check_on_cpu():
    """bench/gpu.sh --dry-run: every GPU check runs a step or two on CPU at tiny sizes, one JSON line each."""
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=1800, env={**ENV, "PY": sys.executable})
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [x["check"] for x in lines] == ["pretrain-gpt2-124m", "pretrain-llama-1b", "sft-bf16", "textcls-bf16"]
    assert proc.returncode == 0, proc.stdout
    pretrain, llama, sft, text = (x["result"] for x in lines)
    assert pretrain["ours"]["tokens_per_s"] > 0 and pretrain["overhead_ratio"] > 0
    assert llama["ours_fsdp"]["val_loss"] == pytest.approx(llama["ours"]["val_loss"], abs=1e-3)  # same job, sharded
    assert sft["speedup"] > 0 and text["speedup"] > 0
