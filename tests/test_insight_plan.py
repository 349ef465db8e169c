"""Pre-flight plan: the memory breakdown, FLOPs, levers for a small budget; and the GPU auto batch search."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.insight.autobatch import find_micro_batch_for_config, search_micro_batch
from tunelab.insight.plan import MiB, make_plan, parse_size, probe_step
from tunelab.tasks.classification import ClassificationTask

torch.set_num_threads(1)


def test_parse_size():
    assert parse_size("24GB") == parse_size("24GiB") == 24 * 2**30
    assert parse_size("512MB") == 512 * MiB
    assert parse_size("1.5g") == int(1.5 * 2**30)
    assert parse_size("8") == 8 * 2**30
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("lots")


def test_probe_counts_saved_activations_not_weights():
    model = nn.Sequential(nn.Linear(100, 1000), nn.ReLU(), nn.Linear(1000, 10))
    batch = {"inputs": torch.randn(8, 100), "labels": torch.randint(0, 10, (8,))}
    pr = probe_step(model, ClassificationTask(num_classes=10), batch, None, torch.device("cpu"))
    # saved for backward: the input (8x100), the hidden pre/post ReLU (8x1000, shared by ReLU and the second
    # Linear: counted once or twice), the logits' log-softmax (8x10); weights (400 KB) are not counted
    assert 8 * 1000 * 4 <= pr.saved_bytes <= 8 * (100 + 2 * 1000 + 2 * 10) * 4 + 1024
    # forward 2*N*MACs; backward: both grads of the second Linear, only the weight grad of the first
    # (the input needs none): FlopCounterMode counts what autograd really runs
    fwd = 2 * 8 * (100 * 1000 + 1000 * 10)
    assert pr.flops == pytest.approx(fwd + 2 * 8 * 100 * 1000 + 2 * 2 * 8 * 1000 * 10, rel=0.01)
    assert pr.batch == 8


def test_plan_breakdown_for_the_digits_recipe():
    cfg = load_config("recipes/digits-cnn.yaml", ["train.batch_size=64"])
    plan = make_plan(cfg, budget=24 * 2**30, log=lambda m: None, time_device=False)
    n = plan.trainable_params
    assert plan.total_params == n == 21_578
    assert plan.gradients_bytes == 4 * n
    assert plan.optimizer_bytes == 4 * n  # SGD with momentum: one buffer
    assert plan.weights_bytes >= 4 * n  # + BatchNorm statistics
    assert plan.activations_bytes > plan.weights_bytes  # 64 images through two 32/64-channel convs
    assert plan.flops_per_step > 0 and plan.fits and plan.levers == []
    half = make_plan(
        load_config("recipes/digits-cnn.yaml", ["train.batch_size=32"]),
        24 * 2**30,
        log=lambda m: None,
        time_device=False,
    )
    assert half.activations_bytes == pytest.approx(plan.activations_bytes / 2, rel=0.01)


def test_plan_adds_the_process_baseline_a_user_sees_and_says_where_its_time_went():
    from tunelab.insight.plan import format_plan, process_rss_bytes

    plan = make_plan(load_config("recipes/digits-cnn.yaml"), 24 * 2**30, log=lambda m: None, time_device=False)
    # this process (torch, the test suite, the digits) holds far more than the run's tensors; less than it has now
    assert plan.total_bytes < plan.baseline_bytes <= process_rss_bytes()
    assert plan.process_peak_bytes == plan.baseline_bytes + plan.total_bytes  # CPU: the tensors are in the process
    assert set(plan.seconds) >= {"build the run (data: read + tokenise; model: load)",
                                 "probe: one forward/backward on the longest example"}
    text = format_plan(plan)
    assert "process total" in text and "peak_rss_mb" in text and "the plan took" in text


def test_small_budget_offers_levers_that_fit(capsys):
    rc = main(["plan", "recipes/digits-cnn.yaml", "train.batch_size=512", "--budget", "34MB", "--json"])
    assert rc == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["fits"] is False
    levers = {lv["name"]: lv for lv in plan["levers"]}
    micro = levers["smaller micro-batch"]
    assert micro["fits"] and micro["total_bytes"] <= 34 * MiB
    m, a = (int(part.split("=")[1]) for part in micro["override"].split())
    assert m * a == 512 and m < 512  # same effective batch through accumulation
    assert all(lv["fits"] == (lv["total_bytes"] <= 34 * MiB) for lv in plan["levers"])


def test_plan_text_output_for_a_gpt_with_checkpointing_lever(capsys, shared_data):
    rc = main(
        [
            "plan",
            "recipes/gpt-shakespeare-char.yaml",
            f"data.path={shared_data}/tinyshakespeare/input.txt",
            "train.batch_size=64",
            "--budget",
            "70MB",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    for part in (
        "weights",
        "gradients",
        "optimizer states",
        "activations",
        "GFLOP per optimizer step",
        "does NOT fit",
        "activation checkpointing",
        "model.activation_checkpointing=true",
    ):
        assert part in text, part


def test_auto_batch_search_keeps_the_effective_batch():
    tried = []

    def fits(m: int) -> bool:
        tried.append(m)
        return m <= 12

    res = search_micro_batch(fits, 32)
    assert (res.micro_batch, res.grad_accum) == (8, 4)
    assert len(tried) <= 3 and res.overrides() == ["train.batch_size=8", "train.grad_accum=4"]
    assert search_micro_batch(lambda m: True, 24).micro_batch == 24
    with pytest.raises(TunelabError, match="even a micro-batch of 1"):
        search_micro_batch(lambda m: False, 16)


def test_auto_batch_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU error path does not apply")
    with pytest.raises(TunelabError, match="searches GPU memory"):
        find_micro_batch_for_config(load_config("recipes/digits-cnn.yaml"), log=lambda m: None)


def test_train_auto_batch_key_keeps_the_recipe_batch_off_gpu_and_records_it(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the search itself runs there")
    from tunelab.run import train

    cfg = load_config("recipes/digits-cnn.yaml", ["train.auto_batch=true", "train.max_steps=2", "train.epochs=null",
                                                  f"output.dir={tmp_path / 'run'}", "report.enabled=false",
                                                  "output.progress=false"])  # fmt: skip
    logs: list[str] = []
    summary = train(cfg, log=logs.append)
    assert summary["global_step"] == 2
    assert any("auto batch" in m and "micro-batch 32" in m for m in logs)
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.train.auto_batch is False and saved.train.batch_size == 32


def test_plan_counts_what_checkpointed_decoder_layers_keep(smollm_gguf):
    """SmolLM2 LoRA SFT: every decoder layer is found as a checkpointed block (by structure, not class
    name), so checkpointing lowers the activation estimate but keeps each layer's input; selective
    checkpointing keeps more than full checkpointing and less than none."""

    def plan(mode: str):
        cfg = load_config(
            "recipes/smollm2-lora-alpaca.yaml",
            [f"model.path={smollm_gguf}", f"model.gradient_checkpointing={mode}", "data.max_length=64"],
        )
        return make_plan(cfg, 24 * 2**30, log=lambda m: None, time_device=False)

    off, full, selective = plan("false"), plan("true"), plan("selective")
    assert "activation checkpointing" not in " ".join(off.notes)
    assert any("activation checkpointing" in n for n in full.notes + selective.notes)
    assert 0 < full.activations_bytes < selective.activations_bytes < off.activations_bytes
    # at least the 30 layers' inputs: one fp32 hidden state (576 wide) per token per layer
    assert full.activations_bytes >= 30 * full.micro_batch * full.seq_len * 576 * 4
