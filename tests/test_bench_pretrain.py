"""bench/pretrain.py's measuring rule: nanoGPT's log parser and the steady-state tokens/s, the same on
every side (the first tenth of the steps skipped, evaluating iterations left out)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))  # as `python bench/pretrain.py` has it
spec = importlib.util.spec_from_file_location("bench_pretrain", Path(__file__).parents[1] / "bench" / "pretrain.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

STEPS, TOKENS = 20, 12 * 64
# nanoGPT's train.py output, as captured from `--max_iters=20 --eval_interval=10 --log_interval=1`
# (times edited to differ): it evaluates at 0, 10 and 20, and runs iteration 20 after its last eval.
STEP_MS = [950.0, 61.0, 44.5, 40.25, 39.0, 41.5, 38.75, 40.0, 42.0, 39.5,
           310.0, 40.5, 39.25, 41.0, 38.5, 40.75, 39.0, 43.0, 40.0, 39.75, 820.0]  # fmt: skip
LOG = "tokens per iteration will be: 768\nfound vocab_size = 65 (inside data/shakespeare_char/meta.pkl)\n"
for n, ms in enumerate(STEP_MS):
    if n % 10 == 0:
        LOG += f"step {n}: train loss {4.2 - n * 0.05:.4f}, val loss {4.21 - n * 0.04:.4f}\n"
        if n:
            LOG += "saving checkpoint to out\n"
    LOG += f"iter {n}: loss {4.19 - n * 0.05:.4f}, time {ms:.2f}ms, mfu {-100.0 if n < 5 else 0.01:.2f}%\n"


def test_parser_reads_every_iteration_and_eval():
    iters, evals = bench.parse_nanogpt_log(LOG)
    assert [n for n, _, _ in iters] == list(range(len(STEP_MS)))
    assert [s for _, _, s in iters] == pytest.approx([ms / 1000 for ms in STEP_MS])
    assert iters[3][1] == pytest.approx(4.19 - 3 * 0.05)
    assert sorted(evals) == [0, 10, 20]
    assert evals[20] == pytest.approx(4.21 - 20 * 0.04)


def test_nanogpt_tokens_per_s_skips_warmup_and_eval_iterations():
    skip = bench.warmup_steps(STEPS)
    assert skip == 2
    steady = [ms for n, ms in enumerate(STEP_MS) if skip <= n < STEPS and n % 10 != 0]
    assert 310.0 not in steady and 61.0 not in steady and 820.0 not in steady
    expected = TOKENS / (statistics.mean(steady) / 1000)
    assert bench.nanogpt_tokens_per_s(LOG, STEPS, TOKENS) == pytest.approx(expected)


def test_ours_rule_matches_nanogpts_on_the_same_step_times():
    """metrics.jsonl windows of steps/10 steps holding the same per-step times give the same figure (the
    engine's step time already leaves eval out, so the eval iteration's time is the plain step's)."""
    step_s = [ms / 1000 for ms in STEP_MS[:STEPS]]
    step_s[10] = statistics.mean(step_s[11:])  # ours: eval runs between steps, not inside one
    every = bench.warmup_steps(STEPS)
    events = [{"event": "start", "step": 0}]
    for end in range(every, STEPS + 1, every):
        window = step_s[end - every : end]
        events.append({"event": "train", "step": end, "step_time_s": statistics.mean(window),
                       "tokens_per_s": TOKENS * len(window) / sum(window)})  # fmt: skip
    expected = TOKENS * (STEPS - every) / sum(step_s[every:])
    assert bench.ours_tokens_per_s(events, STEPS) == pytest.approx(expected)
    log = "".join(f"iter {n}: loss 1.0, time {s * 1000:.6f}ms\n" for n, s in enumerate(step_s))
    assert bench.nanogpt_tokens_per_s(log, STEPS, TOKENS) == pytest.approx(expected)


def test_missing_iteration_lines_is_an_error():
    with pytest.raises(ValueError, match="iter N"):
        bench.nanogpt_tokens_per_s("step 0: train loss 4.2, val loss 4.2\n", STEPS, TOKENS)


def test_summary_keeps_every_repeat_and_takes_median_ratios():
    speeds = [(100.0, 50.0, 110.0), (90.0, 90.0, 100.0), (120.0, 80.0, 100.0)]  # ours, nanogpt, plain_loop
    # (the median of the per-repeat ratios, 1.5 and 0.909, differs from the ratio of the medians, 1.25 and 1.0)
    repeats = [{"ours": {"tokens_per_s": o, "val_loss": 1.9}, "nanogpt": {"tokens_per_s": n, "val_loss": 1.95},
                "plain_loop": {"tokens_per_s": p, "val_loss": 1.9}} for o, n, p in speeds]  # fmt: skip
    final = bench.summarize(repeats, ["ours", "nanogpt", "plain_loop"])
    assert len(final["repeats"]) == 3
    assert [r["speedup_vs_nanogpt"] for r in final["repeats"]] == pytest.approx([o / n for o, n, _ in speeds])
    assert final["speedup_vs_nanogpt"] == pytest.approx(statistics.median(o / n for o, n, _ in speeds))
    assert final["overhead_ratio"] == pytest.approx(statistics.median(o / p for o, _, p in speeds))
    assert final["ours"]["tokens_per_s"] == statistics.median(o for o, _, _ in speeds)
    assert (final["val_loss_ours"], final["val_loss_nanogpt"]) == (1.9, 1.95)
    assert "fsdp_ratio" not in final
