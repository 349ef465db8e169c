"""`tunelab plan CONFIG [--budget 24GB]`: the pre-flight plan of a run, before any training.

Parameters (total, trainable); peak memory broken down into weights, gradients, optimizer states and
activations; FLOPs per optimizer step and an estimated step time on this device; and, when the budget is
too small, the levers that would fit it (smaller micro-batch with accumulation, activation checkpointing,
LoRA, QLoRA, FSDP across N GPUs). With `--nproc G [--nnodes N]`, the per-rank memory of the same job under
DDP, FSDP and (several nodes) HSDP, and the bytes each rank moves per optimizer step.

How: the model is built (on CPU) and one forward/backward *probe* runs on a single worst-case example
(the longest of the training set). Autograd's saved tensors are counted through
`torch.autograd.graph.saved_tensors_hooks` (parameters excluded, storages counted once), which measures
the activations of this exact model, LoRA, precision and checkpointing setting rather than guessing them
from a formula; they scale linearly with the micro-batch. FLOPs come from `FlopCounterMode` on the same
probe. Weights, gradients and optimizer states are counted from the parameters and the optimizer kind.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tunelab.engine.meter import device_matmul_flops
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
class RankPlan:
    """One rank's share of a torchrun job (`train.batch_size` stays per rank, so activations do not shrink),
    and what it sends per optimizer step (ring collectives: about what it receives too)."""

    strategy: str  # ddp | fsdp | hsdp
    override: str
    ranks: int
    shard_ranks: int  # ranks one parameter is split over (1 for DDP)
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    working_bytes: int  # gathered blocks (FSDP), gradient buckets (DDP), the single-process working space
    total_bytes: int
    all_gather_bytes: int
    reduce_scatter_bytes: int
    all_reduce_bytes: int
    fits: bool | None = None
    note: str = ""

    @property
    def traffic_bytes(self) -> int:
        return self.all_gather_bytes + self.reduce_scatter_bytes + self.all_reduce_bytes


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
    ranks: list[RankPlan] = field(default_factory=list)
    # The process around the tensors: interpreter, libraries, tokenizer, data (measured in this process once
    # the run is built); with the peak above, the peak RSS a CPU run reports (summary.json, top).
    baseline_bytes: int | None = None
    process_peak_bytes: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # where the plan's own time went

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
    except AttributeError:  # an output that is not one tensor (preference tasks: per-pair log-probs, bytes)
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


def process_rss_bytes() -> int | None:
    """This process's resident set now (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def baseline_bytes(model: torch.nn.Module, weights: int) -> int | None:
    """What a training process holds besides the run's tensors, measured in this one once the run is built:
    the interpreter, the libraries, the tokenizer and the data. First paid here as training pays them: the
    import the first optimizer triggers (torch._dynamo, ~150 MB) and every weight page read (safetensors may
    map weights lazily); then the RSS less the weights."""
    import torch

    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
    except RuntimeError:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type == "cpu" and t.numel():
                t.sum()
    rss = process_rss_bytes()
    return None if rss is None else max(0, rss - weights)


def peak_bytes(weights: float, gradients: float, optimizer: float, activations: float, working: float) -> int:
    """Peak of one training step. Gradients are freed after each step (zero_grad(set_to_none=True)) and
    grow during backward while the saved activations are released, so the two do not add up: the peak is
    at the start of backward (activations) or at its end (gradients), whichever is larger."""
    return int(weights + optimizer + max(activations, gradients) + working)


def make_plan(cfg: RunConfig, budget: int | None = None, log=print, time_device: bool = True,
              nproc: int = 1, nnodes: int = 1) -> Plan:
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
    clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 2)
        clock = now

    run = build_run(cfg, log=log)
    lap("build the run (data: read + tokenise; model: load)")
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
    baseline = baseline_bytes(model, weights)
    lap("measure the baseline")
    grads = sum(p.numel() * p.element_size() for p in params)
    opt = optimizer_state_bytes(params, cfg.optim.name, cfg.optim.momentum)
    autocast = resolve_precision(cfg.train.precision, target)
    cpu = torch.device("cpu")
    probe_autocast = autocast if autocast == torch.bfloat16 else None  # CPU autocast: bf16 only
    batch = longest_example_batch(run.data, run.data.collate_fn)
    pr = probe_step(model, run.task, batch, probe_autocast, cpu)
    lap("probe: one forward/backward on the longest example")
    micro, accum = cfg.train.batch_size, cfg.train.grad_accum
    scale = micro / max(pr.batch, 1)
    activations = int((pr.saved_bytes + pr.output_bytes) * scale)
    notes = []
    recompute = _checkpointed_extra(model, run.task, batch, probe_autocast, pr)
    if recompute:
        activations += int(recompute * scale)
        notes.append("activation checkpointing: kept layer inputs + one layer recomputed in backward")
    lap("probe again for activation checkpointing")
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
    lap("time this device's matmul rate")
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
        baseline_bytes=baseline,
        # CPU: the tensors live in the process; GPU: the host holds the weights it loaded (CUDA's own not counted)
        process_peak_bytes=None if baseline is None else baseline + (total_bytes if target.type == "cpu" else weights),
        seconds=seconds,
    )
    if budget is not None and total_bytes > budget:
        plan.levers = levers(plan, cfg, model, pr, budget)
    if nproc < 1 or nnodes < 1:
        raise ConfigError(f"--nproc {nproc} / --nnodes {nnodes}: both must be at least 1")
    if nproc * nnodes > 1:
        plan.ranks = rank_plans(plan, cfg, model, nproc, nnodes)
    return plan


def rank_plans(plan: Plan, cfg: RunConfig, model: torch.nn.Module, nproc: int, nnodes: int) -> list[RankPlan]:
    """Per-rank memory and traffic of the job under DDP, FSDP and, on several nodes, HSDP.

    FSDP (reshard after forward, tunelab's default) holds 1/S of the parameters, gradients and optimizer
    state, plus, while a block runs, its gathered parameters and the next block's (prefetch), the root's
    gathered parameters (embeddings, head: kept through the step), and a block's unsharded gradients until
    they are reduce-scattered. Gradient accumulation keeps unsharded gradients across micro-batches (FSDP2
    without gradient sync), so then the whole gradient is held once. Traffic: parameters are all-gathered
    in forward and again in backward for each micro-batch, gradients reduce-scattered once per step (and,
    for HSDP, all-reduced across the replicas). DDP all-reduces the gradients once per step, through
    bucket copies of them."""
    from tunelab.engine.fsdp import transformer_blocks

    world = nproc * nnodes

    def bytes_of(params: Any, trainable_only: bool = False) -> int:
        return sum(p.numel() * p.element_size() for p in params if p.requires_grad or not trainable_only)

    blocks = transformer_blocks(model)
    block_params = [bytes_of(b.parameters()) for b in blocks]
    block_grads = [bytes_of(b.parameters(), trainable_only=True) for b in blocks]
    all_params = {id(p): p for p in model.parameters()}
    params = bytes_of(all_params.values())
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root_params = bytes_of(p for k, p in all_params.items() if k not in in_blocks)
    root_grads = bytes_of((p for k, p in all_params.items() if k not in in_blocks), trainable_only=True)
    buffers = plan.weights_bytes - params  # BatchNorm statistics, rotary tables: not sharded
    g, o, act = plan.gradients_bytes, plan.optimizer_bytes, plan.activations_bytes
    cast = 0.5 if plan.precision == "torch.bfloat16" else 1.0  # parameters gathered in bf16 under bf16
    accum, dist = plan.grad_accum, cfg.train.distributed
    rows = [RankPlan("ddp", "train.distributed.strategy=ddp", world, 1, plan.weights_bytes, g, o, act,
                     plan.overhead_bytes + g, peak_bytes(plan.weights_bytes, g, o, act, plan.overhead_bytes + g),
                     0, 0, int(2 * (world - 1) / world * g), note="gradient buckets: a second copy of the gradients")]
    options = [("fsdp", world, "train.distributed.strategy=fsdp")]
    if nnodes > 1:
        options.append(("hsdp", nproc, f"train.distributed.strategy=fsdp train.distributed.replicas={nnodes}"))
    for name, s, override in options:
        replicas = world // s
        largest = max(block_params, default=0)
        held = sum(block_params) if not dist.reshard_after_forward else 2 * largest
        gathered = int(cast * (root_params + min(held, sum(block_params))))
        unsharded_grads = g if accum > 1 else root_grads + max(block_grads, default=0)
        weights = params // s + buffers
        working = plan.overhead_bytes + gathered + unsharded_grads
        passes = 1 if not dist.reshard_after_forward else 2  # blocks gathered again in backward
        gather = accum * (s - 1) / s * cast * (root_params + passes * sum(block_params))
        rows.append(RankPlan(
            name, override, world, s, weights, g // s, o // s, act, working,
            peak_bytes(weights, g // s, o // s, act, working),
            int(gather), int((s - 1) / s * g), int(2 * (replicas - 1) / replicas * g / s),
            note=("no transformer blocks found: the model is gathered whole" if not blocks else
                  f"{len(blocks)} blocks sharded one by one" + (", unsharded gradients kept across the "
                                                               f"{accum} micro-batches" if accum > 1 else "")),
        ))
    for row in rows:
        row.total_bytes += plan.data_index_bytes  # the sampler's index lists, as in the single-process peak
        row.fits = None if plan.budget_bytes is None else row.total_bytes <= plan.budget_bytes
    return rows


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
    # 5. FSDP: shard weights, gradients and optimizer states across N GPUs (`tunelab plan --nproc N` details it)
    for n in (2, 4, 8, 16, 32, 64):
        total = peak_bytes(w / n, g / n, o / n, plan.activations_bytes, plan.overhead_bytes)
        if total <= budget:
            out.append(
                Lever(
                    f"FSDP across {n} GPUs",
                    f"torchrun --nproc_per_node={n} -m tunelab.cli train CONFIG train.distributed.strategy=fsdp",
                    total,
                    True,
                    f"per-GPU peak before gathered blocks; tunelab plan CONFIG --nproc {n} gives the whole picture",
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
    ]
    if plan.process_peak_bytes is not None:
        where = "peak RSS" if plan.device == "cpu" else "host peak RSS (weights before the move; CUDA's own not counted)"
        rows += [
            f"  process baseline  {human_bytes(plan.baseline_bytes):>12}   (interpreter, libraries, tokenizer, data)",
            f"  process total     {human_bytes(plan.process_peak_bytes):>12}   "
            f"(= {plan.process_peak_bytes / MiB:,.0f} MiB: the {where} summary.json's peak_rss_mb, in MiB, and top show)",
        ]
    rows += [
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
    rows += _rank_rows(plan.ranks)
    rows += [f"note: {n}" for n in plan.notes]
    if plan.seconds:
        rows.append(f"the plan took {sum(plan.seconds.values()):.1f} s: "
                    + "; ".join(f"{what} {s:.1f} s" for what, s in plan.seconds.items() if s >= 0.05))
    return "\n".join(rows)


def _rank_rows(ranks: list[RankPlan]) -> list[str]:
    """The per-rank table of `--nproc`: one column per strategy."""
    if not ranks:
        return []
    rows = ["", f"per rank, {ranks[0].ranks} ranks (train.batch_size stays per rank):",
            f"  {'':18}" + "".join(f"{r.strategy:>12}" for r in ranks)]
    for label, attr in [("weights", "weights_bytes"), ("gradients", "gradients_bytes"),
                        ("optimizer states", "optimizer_bytes"), ("activations", "activations_bytes"),
                        ("working space", "working_bytes"), ("peak", "total_bytes"),
                        ("all-gather /step", "all_gather_bytes"), ("reduce-scatter", "reduce_scatter_bytes"),
                        ("all-reduce /step", "all_reduce_bytes")]:
        rows.append(f"  {label:18}" + "".join(f"{human_bytes(getattr(r, attr)):>12}" for r in ranks))
    for r in ranks:
        fits = "" if r.fits is None else (" fits" if r.fits else " does NOT fit")
        rows.append(f"  {r.strategy}:{fits} {r.override} ({r.note})")
    return rows
