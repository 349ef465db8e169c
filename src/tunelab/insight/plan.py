"""`tunelab plan CONFIG [--budget 24GB]`: the pre-flight plan of a run, before any training.

Parameters (total, trainable); peak memory broken down into weights, gradients, optimizer states and
activations; FLOPs per optimizer step and an estimated step time on this device; and, when the budget is
too small, the levers that would fit it (smaller micro-batch with accumulation, activation checkpointing,
LoRA, QLoRA, FSDP across N GPUs).

How: the model is built (on CPU) and one forward/backward *probe* runs on a single worst-case example
(the longest of the training set). Autograd's saved tensors are counted through
`torch.autograd.graph.saved_tensors_hooks` (parameters excluded, storages counted once), which measures
the activations of this exact model, LoRA, precision and checkpointing setting rather than guessing them
from a formula; they scale linearly with the micro-batch. FLOPs come from `FlopCounterMode` on the same
probe. Weights, gradients and optimizer states are counted from the parameters and the optimizer kind.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tunelab.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from tunelab.config import RunConfig

GiB = 2**30
MiB = 2**20
# What a first training step costs beyond its tensors on CPU (autograd, thread pools, kernel workspaces):
# a digits CNN run grows its RSS by 24 MB with ~2 MB of tensors.
RUNTIME_BYTES = 32 * MiB


def parse_size(text: str) -> int:
    """'24GB', '24GiB', '800MB', '1.5T' -> bytes (GB and GiB are both taken as 2**30, as GPU makers mean)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise ConfigError(f"--budget {text!r} is not a size; write e.g. 24GB, 80GiB or 512MB")
    scale = {"": 1, "k": 2**10, "m": MiB, "g": GiB, "t": 2**40}[m.group(2).lower()]
    if m.group(2) == "" and m.group(3) is None:
        scale = GiB  # a bare number means GB
    return int(float(m.group(1)) * scale)


def human_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


@dataclass
class Lever:
    name: str
    override: str
    total_bytes: int
    fits: bool
    note: str = ""


@dataclass
class Plan:
    model: str
    device: str
    total_params: int
    trainable_params: int
    micro_batch: int
    grad_accum: int
    seq_len: int | None
    precision: str
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    overhead_bytes: int
    data_index_bytes: int
    total_bytes: int
    flops_per_step: float
    est_step_time_s: float | None
    device_flops: float | None
    budget_bytes: int | None
    fits: bool | None
    levers: list[Lever] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def training_bytes(self) -> int:
        """What training adds on top of the loaded model (what a CPU run's RSS growth measures)."""
        return self.total_bytes - self.weights_bytes


# -- counting ----------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage (e.g. quantised)
        return None


def optimizer_state_bytes(params: list[torch.Tensor], optim_name: str, momentum: float) -> int:
    """Adam/AdamW keep two moments per trainable value (in the parameter's dtype); SGD one momentum buffer
    when momentum > 0."""
    per = {"adam": 2, "adamw": 2}.get(optim_name, 1 if momentum > 0 else 0)
    return per * sum(p.numel() * p.element_size() for p in params)


@dataclass
class Probe:
    saved_bytes: int
    output_bytes: int
    flops: float
    seconds: float
    batch: int
    seq_len: int | None


def probe_step(
    model: torch.nn.Module,
    task: Any,
    batch: dict[str, Any],
    autocast: torch.dtype | None,
    device: torch.device,
) -> Probe:
    """One forward + backward on `batch` through the training step's own forward (`engine.step.TrainStep`):
    bytes autograd saves for backward (parameters excluded), the bytes of the output kept alive through
    backward, FLOPs (forward + backward) and wall time."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tunelab.engine.step import TrainStep, to_device

    step = TrainStep(model, task, device, autocast_dtype=autocast)
    batch = to_device(batch, device)
    params = {k[0] for p in list(model.parameters()) + list(model.buffers()) if (k := _storage_key(p))}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key[0] not in params:
            seen[key[0]] = key[1]
        return t

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        out, loss_sum = step.forward(batch)
        return out, loss_sum / task.count_targets(batch).to(device).clamp(min=1e-12)

    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, loss = forward()
        loss.backward()
    key = _storage_key(out)
    output_bytes = key[1] if key is not None and key[0] not in seen else 0
    model.zero_grad(set_to_none=True)
    del out, loss
    t0 = time.perf_counter()  # timed again without the counters
    out, loss = forward()
    loss.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    ids = batch.get("input_ids", batch.get("inputs"))
    seq = int(ids.shape[1]) if ids is not None and ids.dim() == 2 and "input_ids" in batch else None
    return Probe(
        sum(seen.values()),
        output_bytes,
        float(counter.get_total_flops()),
        seconds,
        task.batch_size(batch),
        seq,
    )


def device_matmul_flops(device: torch.device, size: int = 1024, reps: int = 3) -> float:
    """Measured fp32 matmul FLOP/s on the device (an optimistic rate for a training step)."""
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * reps / max(time.perf_counter() - t0, 1e-9)


def longest_example_batch(data: Any, collate_fn: Any, m: int = 1) -> dict[str, Any]:
    """A batch of `m` copies of the longest training example (worst case for memory)."""
    from tunelab.data.base import collate_dicts

    ds = data.train
    index = 0
    if data.train_lengths is not None and len(data.train_lengths):
        lengths = list(data.train_lengths)
        index = max(range(len(lengths)), key=lambda i: lengths[i])
    fn = collate_fn or collate_dicts
    getitems = getattr(ds, "__getitems__", None)
    return fn(getitems([index] * m)) if getitems else fn([ds[index]] * m)


def _layers_hidden(model: torch.nn.Module) -> tuple[int, int] | None:
    """(number of transformer blocks, hidden size) from the model's config, when it has one."""
    for m in (
        model,
        getattr(model, "base_model", None),
        getattr(getattr(model, "base_model", None), "model", None),
    ):
        conf = getattr(m, "config", None)
        if conf is None:
            continue
        layers = getattr(conf, "num_hidden_layers", None) or getattr(conf, "n_layer", None)
        hidden = getattr(conf, "hidden_size", None) or getattr(conf, "n_embd", None)
        if layers and hidden:
            return int(layers), int(hidden)
    return None


def _checkpointing_switch(cfg: RunConfig) -> str | None:
    """The config key that turns activation checkpointing on for this model source, if any."""
    name = cfg.model.name
    if name == "gpt":
        return (
            None
            if cfg.model.kwargs.get("activation_checkpointing")
            else "model.activation_checkpointing=true"
        )
    if name in ("hf_causal_lm",):
        import inspect

        from tunelab.registry import MODELS

        default = inspect.signature(MODELS.get(name).build).parameters["gradient_checkpointing"].default
        on = cfg.model.kwargs.get("gradient_checkpointing", default)
        return None if on is True else "model.gradient_checkpointing=true"
    return None


def _linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    import torch.nn as nn

    return [
        (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(h in n for h in ("lm_head", "classifier", "score"))
    ]


def _kept_inputs_bytes(layers: int, tokens: int, hidden: int, half: bool) -> int:
    """The block inputs activation checkpointing keeps for the recompute: one hidden state per token per block."""
    return layers * tokens * hidden * (2 if half else 4)


def _checkpointed_extra(model: torch.nn.Module, task: Any, batch: dict[str, Any], autocast: Any, pr: Probe) -> int:
    """What a checkpointed model holds that the saved-tensor probe cannot see: each checkpointed layer's
    input (kept by the checkpoint, not saved by autograd) and, in backward, one layer's recomputed
    activations. The per-layer size comes from a second probe with checkpointing switched off."""
    import torch

    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    # The checkpointed blocks are the innermost flagged modules: transformers also flags the model that
    # holds the decoder layers.
    flagged = {id(m) for m in layers}
    blocks = [m for m in layers if not any(id(c) in flagged for c in m.modules() if c is not m)]
    if not blocks:
        return 0
    for m in layers:
        m.gradient_checkpointing = False
    try:
        full = probe_step(model, task, batch, autocast, torch.device("cpu"))
    finally:
        for m in layers:
            m.gradient_checkpointing = True
    shape = _layers_hidden(model)
    ids = batch.get("input_ids")
    inputs = 0
    if shape is not None and ids is not None:
        half = autocast in (torch.bfloat16, torch.float16)
        inputs = _kept_inputs_bytes(len(blocks), ids.numel(), shape[1], half)
    per_layer = max(0, full.saved_bytes - pr.saved_bytes) // len(blocks)
    return inputs + per_layer + _selectively_kept(model, blocks, task, batch)


def _selectively_kept(model: torch.nn.Module, blocks: list, task: Any, batch: dict[str, Any]) -> int:
    """Selective checkpointing (models/checkpointing.py) also keeps the outputs of the ops its policy
    saves: count them in one no-grad forward, inside the checkpointed blocks only."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.checkpoint import CheckpointPolicy

    from tunelab.models.checkpointing import selective_policy

    policy = selective_policy(getattr(blocks[0], "_gradient_checkpointing_func", None))
    if policy is None:
        return 0
    depth, kept = [0], [0]

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if depth[0] and policy(None, func, *args, **(kwargs or {})) == CheckpointPolicy.MUST_SAVE:
                kept[0] += sum(t.nbytes for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
    try:
        with torch.no_grad(), _Count():
            task.forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return kept[0]


# -- the plan ------------------------------------------------------------------------------------------


def peak_bytes(weights: float, gradients: float, optimizer: float, activations: float, working: float) -> int:
    """Peak of one training step. Gradients are freed after each step (zero_grad(set_to_none=True)) and
    grow during backward while the saved activations are released, so the two do not add up: the peak is
    at the start of backward (activations) or at its end (gradients), whichever is larger."""
    return int(weights + optimizer + max(activations, gradients) + working)


def make_plan(cfg: RunConfig, budget: int | None = None, log=print, time_device: bool = True) -> Plan:
    """Build the run on CPU, probe one example, and return the plan for the configured micro-batch."""
    # Stays whole (over 60 lines): the plan's arithmetic reads top to bottom in the order of the printed breakdown.
    import torch

    from tunelab.engine.step import pick_device, resolve_precision
    from tunelab.run import build_run
    from tunelab.weights import count_parameters

    if cfg.optim.lr == "auto":
        cfg = cfg.model_copy(deep=True)
        cfg.optim.lr = 1e-3  # the plan does not depend on it
    target = pick_device(cfg.train.device)
    run = build_run(cfg, log=log)
    model = run.model
    run.strategy.on_epoch_start(model, 0)
    total, trainable = count_parameters(model)
    seen: set[int] = set()
    params, weights = [], 0
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        weights += p.numel() * p.element_size()
        if isinstance(p, torch.nn.Parameter) and p.requires_grad:
            params.append(p)
    grads = sum(p.numel() * p.element_size() for p in params)
    opt = optimizer_state_bytes(params, cfg.optim.name, cfg.optim.momentum)
    autocast = resolve_precision(cfg.train.precision, target)
    cpu = torch.device("cpu")
    probe_autocast = autocast if autocast == torch.bfloat16 else None  # CPU autocast: bf16 only
    batch = longest_example_batch(run.data, run.data.collate_fn)
    pr = probe_step(model, run.task, batch, probe_autocast, cpu)
    micro, accum = cfg.train.batch_size, cfg.train.grad_accum
    scale = micro / max(pr.batch, 1)
    activations = int((pr.saved_bytes + pr.output_bytes) * scale)
    notes = []
    recompute = _checkpointed_extra(model, run.task, batch, probe_autocast, pr)
    if recompute:
        activations += int(recompute * scale)
        notes.append("activation checkpointing: kept layer inputs + one layer recomputed in backward")
    if autocast == torch.float16:
        activations //= 2
        notes.append("fp16 activations estimated as half of the fp32 probe")
    # Working space beyond what is saved: at the start of backward the loss's gradient w.r.t. its log-softmax
    # and w.r.t. the logits are both alive, each the size of the output; plus the runtime constant.
    overhead = int(2 * pr.output_bytes * scale) + RUNTIME_BYTES
    if pr.output_bytes <= 8 and getattr(run.task, "fused_loss", False):
        # the fused head + loss returned the loss itself; its one chunk of fp32 logits is the working space
        from tunelab.tasks.linear_ce import CHUNK_ELEMENTS

        overhead += 4 * CHUNK_ELEMENTS
        notes.append("output head and loss fused: one chunk of logits at a time")
    # The trainer's batch sampler materialises each epoch's shuffled indices as Python lists: a 28-byte int
    # and two 8-byte list slots per example, plus one list per batch (measured: ~120 MB for the 1M windows of
    # tiny-shakespeare at batch size 1).
    n_train = len(run.data.train) if run.data.train is not None else 0
    index = int(n_train * (44 + 64 / micro))
    total_bytes = peak_bytes(weights, grads, opt, activations, overhead) + index
    flops = pr.flops * scale * accum
    here = target.type == "cpu" or (target.type == "cuda" and torch.cuda.is_available())
    dev_flops = device_matmul_flops(target) if time_device and here else None
    step_time = flops / dev_flops if dev_flops else None
    if budget is None:
        budget = _device_memory(target)
    plan = Plan(
        model=cfg.model.name,
        device=str(target),
        total_params=total,
        trainable_params=trainable,
        micro_batch=micro,
        grad_accum=accum,
        seq_len=pr.seq_len,
        precision=str(autocast or "fp32"),
        weights_bytes=weights,
        gradients_bytes=grads,
        optimizer_bytes=opt,
        activations_bytes=activations,
        overhead_bytes=overhead,
        data_index_bytes=index,
        total_bytes=total_bytes,
        flops_per_step=flops,
        est_step_time_s=step_time,
        device_flops=dev_flops,
        budget_bytes=budget,
        fits=None if budget is None else total_bytes <= budget,
        notes=notes,
    )
    if budget is not None and total_bytes > budget:
        plan.levers = levers(plan, cfg, model, pr, budget)
    return plan


def _device_memory(device: torch.device) -> int | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory if torch.cuda.is_available() else None
    if device.type != "cpu":
        return None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def levers(plan: Plan, cfg: RunConfig, model: torch.nn.Module, pr: Probe, budget: int) -> list[Lever]:
    """What would fit the budget, each with its predicted peak and the override that applies it."""
    # Stays whole (over 60 lines): one block per lever, in the order the plan prints them.
    out: list[Lever] = []
    budget -= plan.data_index_bytes  # the same with every lever; added back to the totals below
    w, g, o = plan.weights_bytes, plan.gradients_bytes, plan.optimizer_bytes
    act_per = plan.activations_bytes / plan.micro_batch
    work_per = (plan.overhead_bytes - RUNTIME_BYTES) / plan.micro_batch
    effective = plan.micro_batch * plan.grad_accum
    # 1. smaller micro-batch, same effective batch through accumulation
    for m in sorted({d for d in range(1, plan.micro_batch) if effective % d == 0}, reverse=True):
        total = peak_bytes(w, g, o, act_per * m, work_per * m + RUNTIME_BYTES)
        if total <= budget:
            out.append(
                Lever(
                    "smaller micro-batch",
                    f"train.batch_size={m} train.grad_accum={effective // m}",
                    total,
                    True,
                    f"same effective batch {effective}",
                )
            )
            break
    else:
        out.append(
            Lever(
                "smaller micro-batch",
                "train.batch_size=1",
                peak_bytes(w, g, o, act_per, work_per + RUNTIME_BYTES),
                False,
                "even one example per micro-batch does not fit",
            )
        )
    # 2. activation checkpointing: keep each block's input, recompute one block at a time in backward
    switch = _checkpointing_switch(cfg)
    shape = _layers_hidden(model)
    if switch and shape:
        layers, hidden = shape
        tokens = plan.micro_batch * (pr.seq_len or 1)
        half = plan.precision in ("torch.bfloat16", "torch.float16")
        act = _kept_inputs_bytes(layers, tokens, hidden, half) + plan.activations_bytes / layers
        total = peak_bytes(w, g, o, act, plan.overhead_bytes)
        out.append(Lever("activation checkpointing", switch, total, total <= budget, "~30% more compute"))
    # 3. LoRA r=16 on every linear layer (when the run is not LoRA already)
    linears = _linear_shapes(model)
    if cfg.strategy.kwargs.get("name") != "lora" and linears:
        lora = sum(16 * (i + o) for i, o in linears) * 4
        opt_per = 2 if cfg.optim.name in ("adam", "adamw") else (1 if cfg.optim.momentum > 0 else 0)
        total = peak_bytes(w + lora, lora, lora * opt_per, plan.activations_bytes, plan.overhead_bytes)
        out.append(
            Lever(
                "LoRA (r=16, all linear layers)",
                "strategy.name=lora strategy.r=16 strategy.target_modules=all-linear",
                total,
                total <= budget,
            )
        )
    # 4. QLoRA: linear weights in 4 bits (about 0.56 byte per value with the block scales)
    if linears and cfg.model.name == "hf_causal_lm":
        lin = sum(i * o for i, o in linears)
        lora = sum(16 * (i + o) for i, o in linears) * 4
        weights = plan.weights_bytes - lin * 4 + int(lin * 0.56)
        total = peak_bytes(weights + lora, lora, 2 * lora, plan.activations_bytes, plan.overhead_bytes)
        out.append(
            Lever(
                "QLoRA (4-bit base + LoRA r=16)",
                "model.quantize=4bit strategy.name=lora",
                total,
                total <= budget,
                "needs CUDA and bitsandbytes",
            )
        )
    # 5. FSDP: shard weights, gradients and optimizer states across N GPUs
    for n in (2, 4, 8, 16, 32, 64):
        total = peak_bytes(w / n, g / n, o / n, plan.activations_bytes, plan.overhead_bytes)
        if total <= budget:
            out.append(
                Lever(
                    f"FSDP across {n} GPUs",
                    f"torchrun --nproc_per_node={n} (FULL_SHARD)",
                    total,
                    True,
                    "per-GPU peak",
                )
            )
            break
    for lv in out:
        lv.total_bytes += plan.data_index_bytes
    return out


def format_plan(plan: Plan) -> str:
    rows = [
        f"model {plan.model}: {plan.total_params:,} parameters, {plan.trainable_params:,} trainable "
        f"({100 * plan.trainable_params / max(plan.total_params, 1):.2f}%)",
        f"micro-batch {plan.micro_batch} x accumulation {plan.grad_accum}"
        + (f", sequence length {plan.seq_len}" if plan.seq_len else "")
        + f", precision {plan.precision}",
        "",
        "estimated peak memory",
        f"  weights           {human_bytes(plan.weights_bytes):>12}",
        f"  gradients         {human_bytes(plan.gradients_bytes):>12}",
        f"  optimizer states  {human_bytes(plan.optimizer_bytes):>12}",
        f"  activations       {human_bytes(plan.activations_bytes):>12}",
        f"  working space     {human_bytes(plan.overhead_bytes):>12}",
        f"  batch index lists {human_bytes(plan.data_index_bytes):>12}",
        f"  peak              {human_bytes(plan.total_bytes):>12}   "
        "(weights + optimizer + max(activations, gradients) + working space)",
        "",
        f"compute: {plan.flops_per_step / 1e9:,.1f} GFLOP per optimizer step",
    ]
    if plan.est_step_time_s is not None and plan.device_flops:
        rows.append(
            f"  ~{plan.est_step_time_s:.3g} s per step on {plan.device} "
            f"(at the measured matmul rate {plan.device_flops / 1e9:,.0f} GFLOP/s; a lower bound)"
        )
    if plan.budget_bytes is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        rows += ["", f"budget {human_bytes(plan.budget_bytes)}: {verdict}"]
    if plan.levers:
        rows.append("levers that change the peak:")
        for lv in plan.levers:
            mark = "fits" if lv.fits else "too big"
            note = f" ({lv.note})" if lv.note else ""
            rows.append(f"  - {lv.name}: {human_bytes(lv.total_bytes)} [{mark}]{note}\n      {lv.override}")
    rows += [f"note: {n}" for n in plan.notes]
    return "\n".join(rows)
