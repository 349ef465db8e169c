"""Typed run configuration: YAML recipe + dotted `key=value` overrides -> a validated RunConfig.

Sections whose keys depend on a plug-in (model, data, task, strategy) are open: their extra keys are the
plug-in's own arguments and are checked against its signature when it is built (see `check_kwargs`).
Every other section is closed: an unknown key is an error with a did-you-mean.
"""

from __future__ import annotations

import copy
import inspect
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import ConfigError, did_you_mean


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OpenSection(BaseModel):
    """A section whose extra keys are passed as keyword arguments to a plug-in."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ModelSection(OpenSection):
    name: str = Field(description="registry name (`cnn`, `gpt`, `hf`, `torchvision:resnet18`) or `pkg.module:Class`")


class InitSection(OpenSection):
    scheme: str | None = None  # None: keep the module's own initialisation


class PretrainedSection(Section):
    path: str | None = None
    allow_missing: list[str] = []  # glob patterns of model keys that may stay uninitialised by the load
    rename: dict[str, str] = {}  # regex -> replacement, applied to checkpoint keys in order
    strict: bool = True


class LossSection(Section):
    name: str | None = None  # default depends on the task
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: list[float] | None = None
    ignore_index: int = -100
    pos_weight: list[float] | None = None
    huber_delta: float = Field(1.0, gt=0)


class ParamGroupRule(Section):
    pattern: str  # glob over parameter names
    lr: float | None = Field(None, gt=0)
    lr_scale: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)


class OptimSection(Section):
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float | Literal["auto"] = 1e-3
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    no_decay: list[Literal["bias", "norm", "embedding"]] = ["bias", "norm", "embedding"]
    param_groups: list[ParamGroupRule] = []
    fused: bool | None = None  # None: fused/foreach where the device has it

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v: Any) -> Any:
        if v != "auto" and not v > 0:
            raise ValueError(f"learning rate must be > 0 (or `auto` for the LR finder), got {v}")
        return v


class ScheduleSection(Section):
    name: Literal["constant", "linear", "cosine", "onecycle", "step"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # floor of linear/cosine decay, as a fraction of lr
    step_size: int = Field(1000, gt=0)  # `step`: decay every N optimizer steps
    gamma: float = Field(0.1, gt=0)
    pct_start: float = Field(0.3, gt=0, lt=1)  # `onecycle`

    @model_validator(mode="after")
    def _one_warmup(self) -> ScheduleSection:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set one of schedule.warmup_steps and schedule.warmup_ratio, not both")
        if self.name == "onecycle" and (self.warmup_steps or self.warmup_ratio):
            raise ValueError("`onecycle` has its own warm-up (schedule.pct_start); drop warmup_steps/warmup_ratio")
        return self


class DistributedSection(Section):
    """How a torchrun job spreads the model (`train.distributed`); ignored in a single process."""

    strategy: Literal["ddp", "fsdp"] = "ddp"  # replicate (DDP) or shard parameters, gradients, optimizer state
    reshard_after_forward: bool = True  # fsdp: free the gathered block after forward (less memory, more traffic)
    cpu_offload: bool = False  # fsdp: keep sharded parameters and optimizer state in CPU memory
    replicas: int = Field(1, gt=0)  # fsdp: HSDP, shard inside groups of world/replicas ranks, replicate across
    # fsdp: build the model on the meta device, shard, then load its weights shard by shard (no rank holds the
    # whole model). auto: when there are weights to load; a model trained from scratch is then initialised on
    # every rank as in one process (the same init), and sharded.
    meta_init: bool | Literal["auto"] = "auto"
    # Seconds a rank waits for the others (to connect, in a collective) before the job fails; under
    # `torchrun --max-restarts` a failed connect is then retried instead of hanging. Must outlast rank 0's
    # longest lone work between collectives (a checkpoint or an eval the others wait for).
    timeout_s: int = Field(1800, gt=0)


def _int_or_auto(v: Any, low: int, high: int, expected: str) -> int | str:
    """`auto`, or a whole number in [low, high] (not a bool or a float); else a ValueError saying `expected`."""
    if v == "auto":
        return v
    try:
        n = None if isinstance(v, (bool, float)) else int(v)
    except (TypeError, ValueError):
        n = None
    if n is None or not low <= n <= high:
        raise ValueError(expected)
    return n


class TrainSection(Section):
    epochs: int | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(32, gt=0)
    grad_accum: int = Field(1, gt=0)
    # On a GPU: the largest micro-batch that fits (a divisor of batch_size x grad_accum), with accumulation
    # keeping the effective batch. The resolved sizes are what config.yaml records. No-op on CPU.
    auto_batch: bool = False
    clip_grad_norm: float | None = Field(None, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    # On CPU, dropout layers draw their masks from a vectorised generator (tunelab.models.dropout): torch's
    # CPU bernoulli_ is serial on CPUs without MKL's generator and made dropout ~15% of a BERT step.
    fast_dropout: bool = True
    log_every: int = Field(10, gt=0)
    # Resumable checkpoints: every N optimizer steps, else at the end of each epoch; both also at the end
    # of the run (so a finished run can be extended with --resume). `checkpoints: false` writes none.
    checkpoints: bool = True
    checkpoint_every: int | None = Field(None, gt=0)
    keep_last: int = Field(2, gt=0)
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    # How much the DataLoader workers lower their priority (Unix nice, 0-19). `auto`: 19 when training on
    # CPU, where the workers share the cores with the step's OpenMP threads and a thread pre-empted by a
    # worker stalls the whole op (ResNet-18 on 2 cores: 10-18% more images/s, docs/vision.md); the workers
    # still get every idle moment. 0 (unchanged) on accelerators, where the main process mostly waits.
    worker_nice: int | Literal["auto"] = "auto"
    # CPU only: split each micro-batch into this many shards and run their forwards and backwards at once in
    # as many threads, each with one intra-op thread, summing their gradients in a fixed order (the update
    # of the whole micro-batch, up to float rounding). Small models whose ops are too small to split well
    # across cores gain (the baby GPT on 2 cores: 11-37% more tokens/s, docs/gpt.md). `auto`: the number of
    # intra-op threads (at most 8) for a one-process, uncompiled CPU run of a model without BatchNorm or
    # dropout, else 1. With dropout the masks depend on thread timing (not reproducible); BatchNorm, torchrun
    # and compile are refused.
    batch_threads: int | Literal["auto"] = 1
    group_by_length: bool = False
    device: str = "auto"
    distributed: DistributedSection = DistributedSection()
    # Resume from the newest complete checkpoint when the run folder holds one (what a job restarted by
    # `torchrun --max-restarts` or a scheduler needs); a fresh folder starts a new run.
    auto_resume: bool = False

    @field_validator("worker_nice", mode="before")
    @classmethod
    def _nice(cls, v: Any) -> int | str:  # before pydantic's union, whose errors would name its `int` branch
        return _int_or_auto(v, 0, 19, "a nice increment from 0 (unchanged) to 19 (lowest priority), or `auto`")

    @field_validator("batch_threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> int | str:
        return _int_or_auto(v, 1, 256, "a number of threads from 1 (the whole micro-batch in one thread) to 256, "
                                       "or `auto`")

    def resolved_worker_nice(self, device_type: str) -> int:
        """`worker_nice` with `auto` resolved: 19 on CPU, 0 elsewhere."""
        if self.worker_nice == "auto":
            return 19 if device_type == "cpu" else 0
        return self.worker_nice

    @model_validator(mode="after")
    def _length(self) -> TrainSection:
        if self.epochs is None and self.max_steps is None:
            self.__dict__["epochs"] = 1
        return self


class EvalSection(Section):
    every: int | None = Field(None, gt=0)  # optimizer steps; None: at the end of each epoch
    batch_size: int | None = Field(None, gt=0)
    monitor: str | None = None  # e.g. `accuracy` or `loss`: keeps best/ and feeds early stopping
    mode: Literal["min", "max"] | None = None  # None: `min` for losses/errors, `max` otherwise
    max_batches: int | None = Field(None, gt=0)
    at_start: bool = False  # also evaluate the untrained model, as step 0 (HF's eval_on_start); not on resume


class EarlyStoppingSection(Section):
    enabled: bool = False
    monitor: str | None = None  # default: eval.monitor
    mode: Literal["min", "max"] | None = None
    patience: int = Field(3, gt=0)
    min_delta: float = Field(0.0, ge=0)
    restore_best: bool = True


class MlflowSection(Section):
    """`output.mlflow`: log the run to MLflow (tunelab.tracking). Tracking never fails the run."""

    tracking_uri: str | None = None  # None: MLflow's default (MLFLOW_TRACKING_URI, else a local store)
    experiment: str | None = None  # None: the recipe's name
    log_weights: bool = True  # upload final/ as an artifact
    flush_timeout: float = Field(120.0, gt=0)  # seconds the end of the run waits for pending uploads


class OutputSection(Section):
    dir: str = "runs/{name}"
    tensorboard: bool | None = None  # None: when tensorboard is installed
    # auto: a live bar on a terminal or in a notebook, else one line per train.log_every and per eval;
    # bar | lines | off force one (true = auto, false = off)
    progress: Literal["auto", "bar", "lines", "off"] | bool = "auto"
    mlflow: MlflowSection | None = None


class RunConfig(Section):
    name: str = "run"
    model: ModelSection
    init: InitSection = InitSection()
    pretrained: PretrainedSection = PretrainedSection()
    data: OpenSection
    task: OpenSection = OpenSection(name="classification")
    loss: LossSection = LossSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    early_stopping: EarlyStoppingSection = EarlyStoppingSection()
    strategy: OpenSection = OpenSection(name="full")
    output: OutputSection = OutputSection()
    doctor: OpenSection = OpenSection(enabled=True)
    report: OpenSection = OpenSection(enabled=True)
    sweep: OpenSection = OpenSection()  # read by `tunelab sweep` (tunelab.sweeps); `train` ignores it

    @model_validator(mode="after")
    def _open_sections_named(self) -> RunConfig:
        for section in ("data", "task", "strategy"):
            if "name" not in (getattr(self, section).model_extra or {}):
                raise ValueError(f"`{section}.name` is required")
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.name))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _format_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-", "literal[")))


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section at `loc` (for did-you-mean)."""
    cur: Any = model
    for part in loc[:-1]:
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        ann = next((a for a in typing.get_args(ann) if inspect.isclass(a) and issubclass(a, BaseModel)), ann)
        cur = ann if inspect.isclass(ann) and issubclass(ann, BaseModel) else None
        if cur is None:
            return []
    return list(getattr(cur, "model_fields", {}).keys())


def _short_repr(value: Any) -> str:
    """repr() cut to a line: a YAML alias bomb (a billion nested references) must not hang the message."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 3, 4, 4, 60, 60
    return short.repr(value)


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = _format_loc(loc)
    if e["type"] == "extra_forbidden":
        parent = ".".join(str(p) for p in loc[:-1])
        known = [f"{parent}.{k}" if parent else k for k in _known_keys(RunConfig, loc)]
        hint = did_you_mean(key, known)
        return f"{source}: unknown key `{key}`{hint}"
    if e["type"] == "missing":
        return f"{source}: missing required key `{key}`"
    value = e.get("input")
    msg = e["msg"].removeprefix("Value error, ")
    if not key:
        return f"{source}: {msg}"
    return f"{source}: `{key}` = {_short_repr(value)} is invalid: {msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override `{text}` must look like key=value, e.g. train.max_steps=100")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        cur = data
        for part in path[:-1]:
            nxt = cur.get(part)
            if nxt is None:
                nxt = cur[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override `{text}`: `{part}` is not a section")
            cur = nxt
        cur[path[-1]] = value
    return data


def load_config(
    source: str | Path | dict[str, Any], overrides: list[str] | None = None
) -> RunConfig:
    """Read a YAML recipe (or a dict), apply `key=value` overrides and validate."""
    label = "config"
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, label)) from e


def check_kwargs(fn: Any, kwargs: dict[str, Any], where: str, internal: tuple[str, ...] = ()) -> None:
    """Raise a ConfigError naming the key when `kwargs` has a key that `fn` does not accept. `internal`
    names parameters the caller fills itself: never config keys, never listed."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    hidden = {"self", *internal}
    for key in kwargs:
        if key not in params or key in hidden:
            names = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL and n not in hidden]
            raise ConfigError(
                f"unknown key `{where}.{key}`{did_you_mean(key, names)}; accepted: {', '.join(names) or 'none'}"
            )


def validate_options(model: type[BaseModel], cfg: RunConfig, section: str = "data") -> Any:
    """Validate the open section `cfg.<section>` (minus `name`) against a pydantic model: a data source's
    options, the doctor's and the report's settings. One-line errors name the key."""
    raw = {k: v for k, v in getattr(cfg, section).kwargs.items() if k != "name"}
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        msg = format_validation_error(e, "config")
        raise ConfigError(msg.replace("`", f"`{section}.", 1) if "`" in msg else msg) from e
