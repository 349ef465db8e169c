"""The run doctor: watches a run and names what is going wrong, with the evidence and a remedy.

Each check is a pure function of the records the trainer logs (`train` and `eval` events of
metrics.jsonl) plus a few numbers the callback gathers itself (the label counts of the training set, the
gradient size of the first and last trainable tensors). The `Doctor` callback runs the checks as the run
goes, reports each kind of problem once, to the console and as a `diagnosis` event in metrics.jsonl,
from where the HTML report shows it.

Kinds: overfitting, divergence, lr_too_low, underfitting, data_loader_bound, exploding_gradients,
vanishing_gradients, class_imbalance; for preference tuning (DPO, ORPO, SimPO), from the held-out reward
margin and chosen log-probabilities: margin_collapse, chosen_likelihood_falling (underfitting, a loss
ratio, does not apply there: the DPO loss starts at ln 2 and ends well above 60% of it).
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from tunelab.callbacks import Callback
from tunelab.config import validate_options
from tunelab.registry import CALLBACKS

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.engine.trainer import Trainer

Record = dict[str, Any]


class DoctorOptions(BaseModel):
    """`doctor:` section of a recipe. Thresholds are deliberately conservative: a healthy run must not
    raise a false alarm."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    overfit_evals: int = Field(3, ge=1)  # evaluations since the best eval loss without improvement
    overfit_rise: float = Field(0.05, ge=0)  # eval loss at least this fraction above its minimum
    plateau_logs: int = Field(5, ge=2)  # train logs (after warmup) to judge a plateau from the start
    plateau_drop: float = Field(0.02, ge=0)  # relative loss drop below this over those logs: LR too low
    underfit_ratio: float = Field(0.6, gt=0, le=1)  # final train loss above this fraction of the first
    underfit_gap: float = Field(0.1, ge=0)  # ... while eval loss stays within this fraction of train loss
    diverge_factor: float = Field(3.0, gt=1)  # train loss this many times its minimum: diverging
    data_wait_frac: float = Field(0.4, gt=0, lt=1)  # share of step time spent waiting for batches
    explode_factor: float = Field(50.0, gt=1)  # grad norm this many times its earlier median
    vanish_ratio: float = Field(1e-4, gt=0)  # RMS grad of the first trainable tensor / the last one's
    vanish_norm: float = Field(1e-8, gt=0)  # total grad norm below this: no gradient at all
    imbalance_ratio: float = Field(10.0, gt=1)  # largest class / smallest class in the training labels
    min_logs: int = Field(3, ge=1)  # train logs before the statistics-based checks speak
    margin_peak: float = Field(0.05, gt=0)  # preference: a held-out reward margin that reached this ...
    margin_collapse: float = Field(0.1, ge=0, lt=1)  # ... and fell below this fraction of it has collapsed
    chosen_logp_drop: float = Field(2.0, gt=0)  # nats the chosen replies' log-prob falls while the margin grows

    @classmethod
    def from_config(cls, cfg: RunConfig) -> DoctorOptions:
        return validate_options(cls, cfg, "doctor")


@dataclass
class Diagnosis:
    kind: str
    evidence: str
    remedy: str
    step: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"doctor: {self.kind.replace('_', ' ')} at step {self.step}: {self.evidence}. Try: {self.remedy}"
        )


REMEDIES = {
    "overfitting": "stronger weight decay (optim.weight_decay), dropout, data augmentation, early stopping "
    "(early_stopping.enabled=true restores the best weights), or more training data",
    "divergence": "lower optim.lr (tunelab lr-find suggests one), add warmup (schedule.warmup_ratio=0.05) "
    "and gradient clipping (train.clip_grad_norm=1.0)",
    "lr_too_low": "raise optim.lr (run `tunelab lr-find CONFIG` or set optim.lr=auto); check that the "
    "parameters you expect to train are trainable",
    "underfitting": "train longer, use a larger model, raise the learning rate, or lower the regularisation "
    "(weight decay, dropout, label smoothing)",
    "data_loader_bound": "raise train.num_workers, pre-process or cache the data once (tokenise ahead, "
    "smaller images), and lighten per-sample augmentation",
    "exploding_gradients": "clip gradients (train.clip_grad_norm=1.0), lower optim.lr, add warmup, and "
    "check the input scaling and the initialisation",
    "vanishing_gradients": "use normalisation layers and residual connections, ReLU/GELU instead of "
    "sigmoid/tanh, a variance-preserving init (init.scheme=kaiming or xavier), or layer-wise LR",
    "margin_collapse": "lower optim.lr (large steps push both replies' likelihood down together until the "
    "margin vanishes), raise task.beta to hold the policy closer to its reference, check the pairs for "
    "near-duplicate or flipped replies (task.label_smoothing=0.1 for noisy preferences), or try task.loss=ipo",
    "chosen_likelihood_falling": "add a likelihood term on the chosen replies (task.nll_weight=0.2 to 1, as "
    "RPO does), lower optim.lr or raise task.beta, or use task.name=orpo, whose loss includes that term; "
    "evaluate generations, not only the margin",
    "class_imbalance": "weight the loss (loss.class_weights), monitor f1_macro instead of accuracy "
    "(eval.monitor=f1_macro), or over-sample the rare classes",
}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _losses(trains: Sequence[Record]) -> list[float]:
    return [r["loss"] for r in trains if _finite(r.get("loss"))]


def _after_warmup(trains: Sequence[Record]) -> list[Record]:
    """The train logs from the first one at (almost) the peak learning rate: warmup is not a plateau."""
    lrs = [r.get("lr") for r in trains if _finite(r.get("lr"))]
    if not lrs:
        return list(trains)
    peak = max(lrs)
    for i, r in enumerate(trains):
        if _finite(r.get("lr")) and r["lr"] >= 0.9 * peak:
            return list(trains[i:])
    return list(trains)


# -- the checks: each returns a Diagnosis or None ------------------------------------------------------------


def check_overfitting(
    trains: Sequence[Record], evals: Sequence[Record], o: DoctorOptions
) -> Diagnosis | None:
    """Validation loss has risen for several evaluations since its minimum while training loss fell."""
    ev = [(r["step"], r["loss"]) for r in evals if _finite(r.get("loss")) and not r.get("restored_best")]
    if len(ev) < o.overfit_evals + 1:
        return None
    best_i = min(range(len(ev)), key=lambda i: ev[i][1])
    since = len(ev) - 1 - best_i
    best_step, best = ev[best_i]
    last_step, last = ev[-1]
    if since < o.overfit_evals or last < best * (1 + o.overfit_rise):
        return None
    before = [r["loss"] for r in trains if r["step"] <= best_step and _finite(r.get("loss"))]
    after = [r["loss"] for r in trains if r["step"] > best_step and _finite(r.get("loss"))]
    if not before or not after or not after[-1] < before[-1]:
        return None  # training loss did not fall either: not overfitting
    return Diagnosis(
        "overfitting",
        f"validation loss rose from {_fmt(best)} (step {best_step}) to {_fmt(last)} (step {last_step}) over "
        f"{since} evaluations while training loss fell from {_fmt(before[-1])} to {_fmt(after[-1])}",
        REMEDIES["overfitting"],
        last_step,
    )


def check_divergence(
    trains: Sequence[Record], o: DoctorOptions, failed_message: str | None = None, step: int = 0
) -> Diagnosis | None:
    """The loss became NaN/inf (the run failed) or climbed far above its minimum."""
    losses = _losses(trains)
    lr = next((r["lr"] for r in reversed(trains) if _finite(r.get("lr"))), None)
    at_lr = f" at lr {_fmt(lr)}" if lr is not None else ""
    if failed_message is not None or any(not _finite(r.get("loss")) for r in trains if "loss" in r):
        tail = ", ".join(_fmt(x) for x in losses[-4:])
        return Diagnosis(
            "divergence",
            f"the loss became non-finite{at_lr}" + (f" (last finite train losses: {tail})" if tail else ""),
            REMEDIES["divergence"],
            step or (trains[-1]["step"] if trains else 0),
        )
    if len(losses) < o.min_logs + 1:
        return None
    low_i = min(range(len(losses)), key=lambda i: losses[i])
    if losses[-1] > o.diverge_factor * losses[low_i] and losses[-1] > losses[0]:
        return Diagnosis(
            "divergence",
            f"training loss climbed from its minimum {_fmt(losses[low_i])} to {_fmt(losses[-1])}{at_lr}, "
            f"above its starting value {_fmt(losses[0])}",
            REMEDIES["divergence"],
            trains[-1]["step"],
        )
    return None


def check_lr_too_low(trains: Sequence[Record], o: DoctorOptions) -> Diagnosis | None:
    """A plateau from the start: after warmup, the loss barely moves over the first logs."""
    window = [r for r in _after_warmup(trains) if _finite(r.get("loss"))][: o.plateau_logs]
    if len(window) < o.plateau_logs:
        return None
    first, last = window[0]["loss"], min(r["loss"] for r in window[-2:])
    if first <= 0 or (first - last) / first >= o.plateau_drop:
        return None
    return Diagnosis(
        "lr_too_low",
        f"training loss stayed flat from the start: {_fmt(first)} at step {window[0]['step']}, {_fmt(last)} "
        f"at step {window[-1]['step']} ({100 * (first - last) / first:.1f}% lower) at lr {_fmt(window[-1]['lr'])}",
        REMEDIES["lr_too_low"],
        window[-1]["step"],
    )


def check_underfitting(
    trains: Sequence[Record], evals: Sequence[Record], o: DoctorOptions
) -> Diagnosis | None:
    """At the end, training loss is still high relative to where it started, and validation loss is no
    worse than training loss (so capacity or training time, not generalisation, is the problem)."""
    losses = _losses(trains)
    if len(losses) < o.min_logs:
        return None
    first, last = losses[0], statistics.fmean(losses[-2:])
    if first <= 0 or last < o.underfit_ratio * first:
        return None
    ev = [r["loss"] for r in evals if _finite(r.get("loss"))]
    gap = ""
    if ev:
        if ev[-1] > last * (1 + o.underfit_gap):
            return None
        gap = f"; validation loss {_fmt(ev[-1])} is as high"
    return Diagnosis(
        "underfitting",
        f"training loss ended at {_fmt(last)}, {100 * last / first:.0f}% of its first value {_fmt(first)}{gap}",
        REMEDIES["underfitting"],
        trains[-1]["step"],
    )


def check_data_loader(
    trains: Sequence[Record], o: DoctorOptions, num_workers: int | None = None
) -> Diagnosis | None:
    """Most of each step is spent waiting for the next batch."""
    fracs = [r["data_wait_frac"] for r in trains if _finite(r.get("data_wait_frac"))]
    if len(fracs) < o.min_logs:
        return None
    recent = fracs[1:] if len(fracs) > o.min_logs else fracs  # the first window includes worker start-up
    frac = statistics.fmean(recent)
    if frac < o.data_wait_frac:
        return None
    workers = f" with train.num_workers={num_workers}" if num_workers is not None else ""
    return Diagnosis(
        "data_loader_bound",
        f"{100 * frac:.0f}% of step time is spent waiting for data{workers} (mean over {len(recent)} logs)",
        REMEDIES["data_loader_bound"],
        trains[-1]["step"],
    )


def check_exploding(trains: Sequence[Record], o: DoctorOptions) -> Diagnosis | None:
    """The gradient norm jumps far above its typical size, or stops being finite."""
    norms = [r.get("grad_norm") for r in trains if "grad_norm" in r]
    steps = [r["step"] for r in trains if "grad_norm" in r]
    if not norms:
        return None
    if not _finite(norms[-1]):
        return Diagnosis(
            "exploding_gradients",
            f"the gradient norm became {norms[-1]} at step {steps[-1]}",
            REMEDIES["exploding_gradients"],
            steps[-1],
        )
    if len(norms) < o.min_logs + 1:
        return None
    earlier = [n for n in norms[:-1] if _finite(n)]
    median = statistics.median(earlier)
    if median > 0 and norms[-1] > o.explode_factor * median:
        return Diagnosis(
            "exploding_gradients",
            f"gradient norm {_fmt(norms[-1])} at step {steps[-1]} is {norms[-1] / median:.0f}x its earlier "
            f"median {_fmt(median)} (max {_fmt(max(earlier))})",
            REMEDIES["exploding_gradients"],
            steps[-1],
        )
    return None


def check_vanishing(trains: Sequence[Record], o: DoctorOptions) -> Diagnosis | None:
    """The earliest trainable layer gets almost no gradient compared with the last one (or none at all)."""
    if len(trains) < o.min_logs:
        return None
    recent = trains[-o.min_logs :]
    norms = [r.get("grad_norm") for r in recent]
    if all(_finite(n) and n < o.vanish_norm for n in norms):
        return Diagnosis(
            "vanishing_gradients",
            f"the total gradient norm is below {o.vanish_norm:g} over the last {len(recent)} logs",
            REMEDIES["vanishing_gradients"],
            recent[-1]["step"],
        )
    ratios = [
        r["grad_rms_first"] / r["grad_rms_last"]
        for r in recent
        if _finite(r.get("grad_rms_first")) and _finite(r.get("grad_rms_last")) and r["grad_rms_last"] > 0
    ]
    if len(ratios) < len(recent):
        return None
    ratio = statistics.median(ratios)
    if ratio >= o.vanish_ratio:
        return None
    names = recent[-1].get("grad_tensors", ["first", "last"])
    return Diagnosis(
        "vanishing_gradients",
        f"the RMS gradient of the first trainable tensor `{names[0]}` is {ratio:.1e} times that of the last "
        f"`{names[1]}` (median over the last {len(ratios)} logs)",
        REMEDIES["vanishing_gradients"],
        recent[-1]["step"],
    )


def check_class_imbalance(
    counts: Sequence[int], o: DoctorOptions, names: Sequence[str] | None = None
) -> Diagnosis | None:
    """The training labels are dominated by a few classes (or a class never appears)."""
    if len(counts) < 2 or sum(counts) == 0:
        return None
    lo, hi = min(counts), max(counts)
    if lo > 0 and hi / lo < o.imbalance_ratio:
        return None
    names = list(names) if names and len(names) == len(counts) else [str(i) for i in range(len(counts))]
    shown = ", ".join(f"{n}: {c}" for n, c in zip(names, counts))
    if len(counts) > 12:
        order = sorted(range(len(counts)), key=lambda i: counts[i])
        shown = ", ".join(f"{names[i]}: {counts[i]}" for i in order[:3] + order[-3:])
    total = sum(counts)
    weights = [total / (len(counts) * c) if c else 0.0 for c in counts]
    ratio = f"{hi / lo:.0f}:1" if lo else "a class has no example"
    return Diagnosis(
        "class_imbalance",
        f"training labels are imbalanced ({ratio}; counts {shown})",
        REMEDIES["class_imbalance"].replace(
            "(loss.class_weights)", f"(loss.class_weights=[{','.join(f'{w:.2f}' for w in weights)}])"
        ),
        0,
    )


def _preference_evals(evals: Sequence[Record]) -> list[Record]:
    return [r for r in evals if _finite(r.get("reward_margin")) and not r.get("restored_best")]


def check_margin_collapse(evals: Sequence[Record], o: DoctorOptions) -> Diagnosis | None:
    """Preference tuning: the held-out reward margin grew, then fell back to about zero."""
    ev = _preference_evals(evals)
    if len(ev) < 2:
        return None
    peak = max(ev, key=lambda r: r["reward_margin"])
    last = ev[-1]
    if peak is last or peak["reward_margin"] < o.margin_peak or last["reward_margin"] > o.margin_collapse * peak[
            "reward_margin"]:
        return None
    return Diagnosis(
        "margin_collapse",
        f"the held-out reward margin rose to {_fmt(peak['reward_margin'])} (step {peak['step']}) and fell to "
        f"{_fmt(last['reward_margin'])} (step {last['step']})"
        + (f"; reward accuracy {_fmt(last['reward_accuracy'])}" if _finite(last.get("reward_accuracy")) else ""),
        REMEDIES["margin_collapse"],
        last["step"],
    )


def check_chosen_likelihood_falling(evals: Sequence[Record], o: DoctorOptions) -> Diagnosis | None:
    """Preference tuning's known failure: the margin grows while the chosen replies lose likelihood (below
    the reference's: their reward is negative), i.e. the policy wins by pushing both replies down."""
    ev = [r for r in _preference_evals(evals) if _finite(r.get("logp_chosen"))]
    if len(ev) < 2:
        return None
    first, last = ev[0], ev[-1]
    drop = first["logp_chosen"] - last["logp_chosen"]
    below = not _finite(last.get("reward_chosen")) or last["reward_chosen"] < 0
    if last["reward_margin"] <= first["reward_margin"] or drop < o.chosen_logp_drop or not below:
        return None
    reward = f", chosen reward {_fmt(last['reward_chosen'])}" if _finite(last.get("reward_chosen")) else ""
    return Diagnosis(
        "chosen_likelihood_falling",
        f"the held-out reward margin grew from {_fmt(first['reward_margin'])} (step {first['step']}) to "
        f"{_fmt(last['reward_margin'])} (step {last['step']}) while the chosen replies' log-probability fell "
        f"from {_fmt(first['logp_chosen'])} to {_fmt(last['logp_chosen'])}{reward}",
        REMEDIES["chosen_likelihood_falling"],
        last["step"],
    )


def diagnose_records(records: Sequence[Record], o: DoctorOptions | None = None) -> list[Diagnosis]:
    """All the record-based checks over a finished run's metrics.jsonl (for runs logged without the doctor)."""
    o = o or DoctorOptions()
    trains = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    diverged = next((r for r in records if r.get("event") == "diverged"), None)
    found = [
        check_divergence(
            trains, o, diverged.get("message") if diverged else None, diverged["step"] if diverged else 0
        ),
        check_exploding(trains, o),
        check_vanishing(trains, o),
        check_lr_too_low(trains, o),
        check_data_loader(trains, o),
        check_overfitting(trains, evals, o),
        check_margin_collapse(evals, o),
        check_chosen_likelihood_falling(evals, o),
    ]
    lr_too_low = any(d and d.kind == "lr_too_low" for d in found)
    if diverged is None and not lr_too_low and not _preference_evals(evals):
        found.append(check_underfitting(trains, evals, o))
    return [d for d in found if d is not None]


# -- the callback -----------------------------------------------------------------------------------------


def label_counts(dataset: Any, num_classes: int | None = None) -> list[int] | None:
    """Per-class counts of a dataset's integer `labels` attribute (None when it has none)."""
    import torch

    labels = getattr(dataset, "labels", None)
    if labels is None:
        return None
    try:
        t = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        return None
    if t.dtype.is_floating_point or t.dim() != 1 or t.numel() == 0:
        return None
    t = t[t >= 0]  # ignore_index (-100) and similar
    if t.numel() == 0:
        return None
    return torch.bincount(t, minlength=num_classes or 0).tolist()


# the eval metrics the checks read
EVAL_KEYS = ("loss", "reward_margin", "reward_accuracy", "reward_chosen", "logp_chosen")


class Doctor(Callback):
    """Runs the checks as the run goes and reports each kind of problem once."""

    def __init__(self, options: DoctorOptions | None = None, echo: bool = True):
        self.o = options or DoctorOptions()
        self.echo = echo
        self.trains: list[Record] = []
        self.evals: list[Record] = []
        self.reported: dict[str, Diagnosis] = {}
        self._first: Any = None
        self._last: Any = None
        self._grad: dict[str, Any] = {}
        self._hooks: list[Any] = []

    @property
    def diagnoses(self) -> list[Diagnosis]:
        return list(self.reported.values())

    def _report(self, trainer: Trainer, d: Diagnosis | None) -> None:
        if d is None or d.kind in self.reported:
            return
        self.reported[d.kind] = d
        trainer.log("diagnosis", **d.to_dict())
        if self.echo and trainer.is_main:
            print(d.line(), file=sys.stderr)

    def on_fit_start(self, trainer: Trainer) -> None:
        import torch.nn as nn

        # embedding rows get sparse gradients (only the tokens seen): their RMS says nothing about depth
        sparse = {
            id(p) for m in trainer.raw_model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
        }
        trainable = [
            (n, p) for n, p in trainer.raw_model.named_parameters() if p.requires_grad and id(p) not in sparse
        ]
        if len(trainable) >= 2:
            (self._first, p_first), (self._last, p_last) = trainable[0], trainable[-1]
            for key, p in (("first", p_first), ("last", p_last)):
                # no .item() here: the value is read at log time, so the hook adds no device sync
                self._hooks.append(
                    p.register_post_accumulate_grad_hook(
                        lambda t, key=key: self._grad.__setitem__(key, t.grad.detach().pow(2).mean().sqrt())
                    )
                )
        task = trainer.task
        if getattr(task, "name", "") == "classification" and trainer.global_step == 0:
            counts = label_counts(trainer.train_data, getattr(task, "num_classes", None))
            if counts:
                self._report(
                    trainer, check_class_imbalance(counts, self.o, getattr(task, "label_names", None))
                )

    def on_step_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if "first" in self._grad and "last" in self._grad:
            logs["grad_rms_first"] = float(self._grad["first"])
            logs["grad_rms_last"] = float(self._grad["last"])
        record = {"step": trainer.global_step, **logs}
        if self._first is not None:
            record["grad_tensors"] = [self._first, self._last]
        self.trains.append(record)
        o, trains = self.o, self.trains
        self._report(trainer, check_divergence(trains, o))
        self._report(trainer, check_exploding(trains, o))
        self._report(trainer, check_vanishing(trains, o))
        self._report(trainer, check_lr_too_low(trains, o))
        self._report(trainer, check_data_loader(trains, o, trainer.train_cfg.num_workers))

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.evals.append({"step": trainer.global_step, **{k: v for k, v in metrics.items() if k in EVAL_KEYS}})
        self._report(trainer, check_overfitting(self.trains, self.evals, self.o))
        self._report(trainer, check_margin_collapse(self.evals, self.o))
        self._report(trainer, check_chosen_likelihood_falling(self.evals, self.o))

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if summary.get("status") == "failed" and trainer.diverged:
            self._report(
                trainer,
                check_divergence(
                    self.trains, self.o, summary.get("error", ""), summary.get("global_step", 0)
                ),
            )
        else:
            self._report(trainer, check_divergence(self.trains, self.o))
            if "lr_too_low" not in self.reported and not _preference_evals(self.evals):
                self._report(trainer, check_underfitting(self.trains, self.evals, self.o))
        if "divergence" in self.reported and summary.get("status") in ("completed", "stopped_early"):
            summary["status"] = "diverged"  # finite but far above its minimum: not a run to trust
        if self.reported:
            summary["diagnoses"] = [d.to_dict() for d in self.reported.values()]

    def state_dict(self) -> dict[str, Any]:
        return {
            "trains": self.trains,
            "evals": self.evals,
            "reported": {k: d.to_dict() for k, d in self.reported.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trains, self.evals = list(state.get("trains", [])), list(state.get("evals", []))
        self.reported = {k: Diagnosis(**d) for k, d in state.get("reported", {}).items()}


@CALLBACKS.register("doctor")
def doctor_callbacks(cfg: RunConfig, data: Any) -> list[Callback]:
    """The doctor on every run, unless `doctor.enabled: false`."""
    options = DoctorOptions.from_config(cfg)
    return [Doctor(options)] if options.enabled else []
