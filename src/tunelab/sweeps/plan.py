"""The `sweep:` section of a recipe, checked in full before a sweep writes anything.

    sweep:
      space:                                  # any recipe key -> an Optuna distribution
        optim.lr: {loguniform: [1.0e-4, 0.3]}
        optim.weight_decay: {loguniform: [1.0e-6, 1.0e-2]}
        loss.label_smoothing: {uniform: [0.0, 0.2]}
        train.batch_size: {int: [16, 64], step: 16}
        strategy.r: {categorical: [4, 8, 16]}
      objective: accuracy                     # default: eval.monitor, else the task's default metric
      mode: max                               # default: eval.mode, else from the metric's name
      n_trials: 20                            # and/or timeout: seconds (per invocation)
      sampler: tpe                            # random | grid | cmaes, or {name: tpe, n_startup_trials: 5}
      pruner: median                          # successive_halving | hyperband | none, or {name: ..., ...}

A `SweepPlan` is that section made concrete: the recipe without its sweep section, the distributions, the
objective and its direction, and `trial_config(params, number)`, the recipe of one trial. Optuna is
imported inside functions: this module is imported to build the CLI.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.config import RunConfig, load_config
from tunelab.errors import ConfigError, TunelabError, did_you_mean

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

KINDS = ("loguniform", "uniform", "float", "int", "categorical")
_EXTRA_KEYS = {"float": ("step", "log"), "int": ("step", "log")}
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler", "cmaes": "CmaEsSampler"}
PRUNERS = {"median": "MedianPruner", "successive_halving": "SuccessiveHalvingPruner",
           "hyperband": "HyperbandPruner", "none": "NopPruner"}
FIXED_KEYS = ("name", "output", "sweep")  # where a trial lives is the sweep's business, not the search's


class SweepOptions(BaseModel):
    """The `sweep:` section (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    space: dict[str, Any]
    objective: str | None = None
    mode: Literal["min", "max"] | None = None
    n_trials: int | None = Field(None, gt=0)
    timeout: float | None = Field(None, gt=0)  # seconds; no new trial starts after it (each invocation)
    sampler: str | dict[str, Any] = "tpe"
    pruner: str | dict[str, Any] = "median"
    seed: int | None = None  # the sampler's seed; default train.seed
    importance: Literal["fanova", "mdi"] = "fanova"  # the report's parameter-importance evaluator

    @classmethod
    def from_config(cls, cfg: RunConfig) -> SweepOptions:
        raw = cfg.sweep.kwargs
        if not raw:
            raise ConfigError("no `sweep:` section; add one (sweep: {space: {optim.lr: "
                              "{loguniform: [1.0e-4, 1.0e-1]}}, n_trials: 20}) or pass --sweep FILE")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                raise ConfigError(f"unknown key `sweep.{key}`{did_you_mean(key, cls.model_fields)}; "
                                  f"sweep keys: {', '.join(cls.model_fields)}") from e
            raise ConfigError(f"`sweep.{key}`: {err['msg']}") from e


# -- the search space -------------------------------------------------------------------------------------


def flatten_space(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{optim: {lr: {loguniform: ...}}}` and `{optim.lr: {loguniform: ...}}` alike: dotted key -> spec
    (so `sweep.space.optim.lr=...` works as an override)."""
    out: dict[str, Any] = {}
    for key, spec in raw.items():
        name = f"{prefix}{key}"
        if isinstance(spec, dict) and spec and not set(spec) & set(KINDS):
            out.update(flatten_space(spec, name + "."))
        else:
            out[name] = spec
    return out


def _number(value: Any, where: str, integer: bool) -> float | int:
    """A bound: YAML reads `1e-5` (no dot) as text, so numeric text counts as a number."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: the bounds must be finite numbers, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise ConfigError(f"{where}: `int` takes whole-number bounds, got {value!r}")
        return int(value)
    return float(value)


def parse_distribution(key: str, spec: Any) -> BaseDistribution:
    """One entry of `sweep.space` as an Optuna distribution, with a one-line error for each mistake."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = f"`sweep.space.{key}`"
    kinds = [k for k in KINDS if isinstance(spec, dict) and k in spec]
    if len(kinds) != 1:
        raise ConfigError(
            f"{where} = {spec!r}: give one distribution: {{loguniform: [low, high]}}, {{uniform: [low, high]}}, "
            "{float: [low, high], step: s, log: true}, {int: [low, high], step: s} or {categorical: [a, b, ...]}"
        )
    kind = kinds[0]
    allowed = _EXTRA_KEYS.get(kind, ())
    for extra in spec:
        if extra != kind and extra not in allowed:
            raise ConfigError(f"unknown key `sweep.space.{key}.{extra}`; `{kind}` takes "
                              + (", ".join(allowed) if allowed else "no other key"))
    args = spec[kind]
    if kind == "categorical":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: `categorical` takes a non-empty list of choices, got {args!r}")
        bad = [v for v in args if v is not None and not isinstance(v, (bool, int, float, str))]
        if bad:
            raise ConfigError(f"{where}: categorical choices are numbers, strings, booleans or null, "
                              f"not {bad[0]!r}")
        return CategoricalDistribution(args)
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: `{kind}` takes [low, high], got {args!r}")
    integer = kind == "int"
    low, high = (_number(v, where, integer) for v in args)
    log = kind == "loguniform" or bool(spec.get("log", False))
    step = spec.get("step")
    if low > high:
        raise ConfigError(f"{where}: the bounds [{args[0]}, {args[1]}] are reversed; write [{args[1]}, {args[0]}]")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs bounds above 0, got low = {args[0]}")
    if step is not None:
        step = _number(step, where, integer)
        if step <= 0:
            raise ConfigError(f"{where}: `step` must be above 0, got {step}")
        if log:
            raise ConfigError(f"{where}: `step` and a log scale do not go together; drop one")
    if integer:
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(low, high, log=log, step=step)


def describe(dist: BaseDistribution) -> str:
    """The distribution as the recipe writes it (for sweep.json, the report and MLflow)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return f"categorical {list(dist.choices)}"
    if isinstance(dist, IntDistribution):
        kind, step = "int", dist.step if dist.step != 1 else None
    else:
        kind, step = "loguniform" if dist.log else "uniform", dist.step
    return f"{kind} [{dist.low:g}, {dist.high:g}]" + (f", step {step:g}" if step is not None else "")


def corner_values(dist: BaseDistribution) -> list[Any]:
    """The values a key must accept: both bounds, or every choice."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def grid_values(key: str, dist: BaseDistribution) -> list[Any]:
    """The points of a key for `sampler: grid` (categorical choices, or a range with a step)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if dist.step is None:
        raise ConfigError(f"`sweep.space.{key}`: `sampler: grid` needs a finite set of values: "
                          "use {categorical: [...]} or give a step")
    n = int(round((dist.high - dist.low) / dist.step)) + 1
    values = [dist.low + i * dist.step for i in range(n)]
    return values if isinstance(dist, IntDistribution) else [round(v, 12) for v in values]


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted `key` in a nested recipe dict (sections created as needed)."""
    *sections, last = key.split(".")
    for part in sections:
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data = data[part]
    data[last] = value


# -- samplers and pruners ---------------------------------------------------------------------------------


def _named(spec: str | dict[str, Any], table: dict[str, str], what: str) -> tuple[str, dict[str, Any]]:
    kwargs = dict(spec) if isinstance(spec, dict) else {"name": spec}
    name = kwargs.pop("name", None)
    if name not in table:
        raise ConfigError(f"`sweep.{what}` = {name!r} is not one of {', '.join(table)}{did_you_mean(name, table)}")
    return name, kwargs


def _ask_and_tell_grid() -> type:
    import optuna

    class AskAndTellGridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler calls `study.stop()` once the grid is exhausted, which Optuna allows only
        inside `study.optimize`; a sweep stops by itself after the grid's size."""

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            pass

    return AskAndTellGridSampler


def _construct(cls: type, kwargs: dict[str, Any], where: str) -> Any:
    from tunelab.config import check_kwargs

    check_kwargs(cls.__init__, kwargs, where)
    try:
        return cls(**kwargs)
    except ImportError as e:  # CMA-ES needs the `cmaes` package
        raise ConfigError(f"`{where}` needs a package that is not installed ({e.name or e}): "
                          "pip install 'tunelab[sweep]'") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"`{where}`: {e}") from e


# -- the plan ---------------------------------------------------------------------------------------------


@dataclass
class SweepPlan:
    """What a sweep searches and where: everything the processes working on one study must agree on."""

    recipe: dict[str, Any]  # the resolved recipe without its sweep section
    options: SweepOptions
    space: dict[str, BaseDistribution]
    objective: str
    mode: str | None  # None only for a plan that is not checked (`--best` reads the study's direction)
    folder: Path

    @property
    def name(self) -> str:
        return str(self.recipe["name"])

    @property
    def target_trials(self) -> int | None:
        """How many trials the study should hold (grid: every point once, unless n_trials says fewer)."""
        if self.sampler_name == "grid":
            size = math.prod(len(grid_values(k, d)) for k, d in self.space.items())
            return min(size, self.options.n_trials or size)
        return self.options.n_trials

    @property
    def sampler_name(self) -> str:
        return _named(self.options.sampler, SAMPLERS, "sampler")[0]

    @property
    def pruner_name(self) -> str:
        return _named(self.options.pruner, PRUNERS, "pruner")[0]

    def trial_dir(self, number: int) -> Path:
        return self.folder / f"trial-{number:03d}"

    def trial_config(self, params: dict[str, Any], number: int) -> RunConfig:
        """The recipe of trial `number`: the sweep's recipe with `params` set, in its own run folder."""
        data = copy.deepcopy(self.recipe)
        for key, value in params.items():
            set_key(data, key, value)
        data["name"] = f"{self.name}-trial-{number:03d}"
        data["output"]["dir"] = str(self.trial_dir(number))
        if data["output"].get("mlflow") is not None and not data["output"]["mlflow"].get("experiment"):
            data["output"]["mlflow"]["experiment"] = self.name  # the sweep's experiment, not one per trial
        return load_config(data)

    def make_sampler(self, salt: int = 0) -> Any:
        """The sampler, seeded by sweep.seed (else train.seed). A process that joins or resumes a study
        passes a `salt`: a sampler seeded as at the start would draw the start's random trials again. The
        grid sampler keeps its seed: it maps trial numbers to grid points, the same in every process."""
        import optuna

        name, kwargs = _named(self.options.sampler, SAMPLERS, "sampler")
        cls = _ask_and_tell_grid() if name == "grid" else getattr(optuna.samplers, SAMPLERS[name])
        if "seed" in inspect.signature(cls.__init__).parameters and "seed" not in kwargs:
            seed = self.options.seed if self.options.seed is not None else self.recipe["train"]["seed"]
            kwargs["seed"] = seed if name == "grid" else (seed * 1_000_003 + salt) % 2**32
        if name == "grid":
            kwargs["search_space"] = {k: grid_values(k, d) for k, d in self.space.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
            return _construct(cls, kwargs, "sweep.sampler")

    def make_pruner(self) -> Any:
        import optuna

        name, kwargs = _named(self.options.pruner, PRUNERS, "pruner")
        if name == "median":
            kwargs.setdefault("n_startup_trials", 5)
        return _construct(getattr(optuna.pruners, PRUNERS[name]), kwargs, "sweep.pruner")

    def definition(self) -> dict[str, Any]:
        """What may not change between the processes and resumptions of one study (n_trials and timeout
        may; so may the output section and the report's importance evaluator: they change no trial)."""
        options = self.options.model_dump(exclude={"n_trials", "timeout", "space", "objective", "mode", "importance"})
        recipe = {k: v for k, v in self.recipe.items() if k not in ("output", "sweep")}
        return {"recipe": recipe, "space": {k: describe(d) for k, d in self.space.items()},
                "objective": self.objective, "mode": self.mode, **options}

    def to_yaml(self) -> str:
        """The recipe with its resolved sweep section: what worker processes read (`sweep.yaml`)."""
        import yaml

        data = copy.deepcopy(self.recipe)
        data["sweep"] = {**self.options.model_dump(exclude_none=True), "objective": self.objective,
                         **({"mode": self.mode} if self.mode else {})}
        return yaml.safe_dump(data, sort_keys=False)


def plan_sweep(cfg: RunConfig, label: str = "config", check: bool = True) -> SweepPlan:
    """Validate `cfg`'s sweep section against the recipe and return the plan; errors name `label` (the
    recipe file). With `check`, one trial's run is also built short of its model (data, task, strategy;
    the model's arguments checked against its builder): unknown keys of plug-in sections and an objective
    the task does not report fail here, before the sweep folder is touched."""
    try:
        return _plan(cfg, check)
    except ConfigError as e:
        message = str(e).removeprefix("config: ")
        raise ConfigError(message if message.startswith(label) else f"{label}: {message}") from e


def _plan(cfg: RunConfig, check: bool) -> SweepPlan:
    try:
        import optuna  # noqa: F401
    except ImportError as e:
        raise TunelabError("tunelab sweep needs Optuna, an optional extra: pip install 'tunelab[sweep]'") from e
    options = SweepOptions.from_config(cfg)
    flat = flatten_space(options.space)
    if not flat:
        raise ConfigError("`sweep.space` is empty; name at least one key, e.g. optim.lr: {loguniform: [1.0e-4, 0.1]}")
    space = {key: parse_distribution(key, spec) for key, spec in flat.items()}
    recipe = cfg.to_dict()
    recipe["sweep"] = {}
    for key, dist in space.items():
        if key.split(".")[0] in FIXED_KEYS:
            raise ConfigError(f"`sweep.space.{key}`: a sweep cannot vary `{key.split('.')[0]}` (each trial's "
                              "name and folder are the sweep's); choose recipe keys such as optim.lr")
        for value in corner_values(dist):
            data = copy.deepcopy(recipe)
            set_key(data, key, value)
            try:
                load_config(data)
            except ConfigError as e:
                message = str(e).removeprefix("config: ")
                raise ConfigError(f"sweep.space: {message}" if message.startswith("unknown key")
                                  else f"sweep.space `{key}` reaches {value!r}: {message}") from e
    plan = SweepPlan(recipe, options, space, options.objective or "", options.mode, cfg.output_dir)
    plan.make_sampler()  # their options are checked now
    plan.make_pruner()
    if options.n_trials is None and options.timeout is None and plan.sampler_name != "grid":
        raise ConfigError("give `sweep.n_trials` or `sweep.timeout` (seconds), e.g. sweep.n_trials=20")
    if check:
        _check_trial(plan)
    elif not plan.objective:
        plan.objective = cfg.eval.monitor or "loss"
    return plan


def metric_names(task: Any) -> list[str]:
    """The scalar metrics the task's evaluation reports (computed on an empty set: only the names count)."""
    metrics = task.metrics()
    names = ["loss", *(metrics.collection.keys() if metrics.collection is not None else ())]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            computed = metrics.compute()
        names = [k for k, v in computed.items() if isinstance(v, (int, float))]
    except Exception:  # some metrics refuse an empty set; their names still stand
        pass
    return names


def _check_trial(plan: SweepPlan) -> None:
    from tunelab.config import check_kwargs
    from tunelab.data.base import build_data
    from tunelab.models import resolve_builder
    from tunelab.run import build_task_from_config, fill_model_from_data
    from tunelab.strategies import build_strategy

    params = {key: corner_values(dist)[0] for key, dist in plan.space.items()}
    cfg = plan.trial_config(params, 0)
    try:
        data = build_data(cfg)
        fill_model_from_data(cfg, data, log=lambda message: None)
        entry, implied = resolve_builder(cfg.model.name)
        check_kwargs(entry.build, {**implied, **cfg.model.kwargs}, "model")
        build_strategy(cfg)
        task = build_task_from_config(cfg, data)
    except ConfigError as e:
        swept = [key for key in plan.space if f"`{key}`" in str(e)]
        raise ConfigError(f"sweep.space `{swept[0]}`: {e}" if swept else str(e)) from e
    if data.eval is None:
        raise ConfigError("a sweep scores each trial on the eval split, and this data has none "
                          "(set data.val_fraction or an eval file)")
    names = metric_names(task)
    if not plan.objective:
        plan.objective = cfg.eval.monitor or task.default_monitor
    if plan.objective not in names:
        where = "`sweep.objective`" if plan.options.objective else "`eval.monitor` (the sweep's objective)"
        raise ConfigError(f"{where} = {plan.objective!r} is not a metric of task "
                          f"`{cfg.task.kwargs['name']}`{did_you_mean(plan.objective, names)}; "
                          f"it reports: {', '.join(names)}")
    if plan.mode is None:
        same = plan.objective == cfg.eval.monitor
        plan.mode = (cfg.eval.mode if same else None) or task.monitor_mode(plan.objective)
