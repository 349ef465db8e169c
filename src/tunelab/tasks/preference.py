"""Preference tuning on chosen/rejected pairs: DPO (with a frozen reference), ORPO and SimPO (without).

`task: {name: dpo, beta: 0.1, loss: sigmoid | ipo | hinge, label_smoothing: 0.0}` (data: `preference`).

Every loss is a function of each response's summed log-probability under the policy, log pi(y|x): the sum
over the response tokens (the targets of `tunelab.data.preference`) of log_softmax(logits)[token]. These come
from the output head applied to the target positions only, fused with the log-softmax
(`linear_ce.linear_log_probs`): the (tokens x vocab) logits are never materialised, as in SFT.

DPO (Rafailov et al. 2023) compares the policy with a frozen reference pi_ref through the log-ratios
    h = [log pi(y_c|x) - log pi_ref(y_c|x)] - [log pi(y_r|x) - log pi_ref(y_r|x)]
  sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing: cDPO)
  hinge:   max(0, 1 - beta h)                                          (SLiC)
  ipo:     (h' - 1 / (2 beta))^2 with each log-ratio divided by its response's token count (as TRL does)
  plus `nll_weight` x the chosen response's per-token NLL (RPO; a remedy for falling chosen likelihoods).
The implicit rewards are beta x each log-ratio. The reference:
  - LoRA: the same network with its adapters disabled (no second copy in memory);
  - `precompute_ref: true`: the reference log-probabilities of every pair, computed once with the initial
    model before the first step and cached (`$TUNELAB_CACHE/preference`), so training holds one model;
  - otherwise (full fine-tuning) a frozen copy of the initial model.
ORPO (Hong et al. 2024): chosen NLL per token - beta log sigmoid(log-odds ratio of the per-token average
log-probs); SimPO (Meng et al. 2024): -log sigmoid(beta (avg_c - avg_r) - gamma_beta_ratio beta). Neither
needs a reference; their rewards are beta x the per-token average log-probabilities.

The trainer divides the summed loss by the number of targets, and a target here is a pair.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tunelab.callbacks import Callback
from tunelab.errors import CheckpointError, ConfigError, TunelabError
from tunelab.io import atomic_write
from tunelab.tasks.base import Batch, MetricSet, Task, register_task
from tunelab.tasks.causal_lm import output_head, replaced_head, target_rows
from tunelab.tasks.linear_ce import linear_log_probs


@dataclass
class PairLogps:
    """Summed response log-probabilities of a batch of pairs (each of shape (pairs,))."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


def num_pairs(batch: Batch) -> int:
    """Pairs in a batch of tunelab.data.preference (PreferenceCollator)."""
    return batch["pair_tokens"].shape[0]


def _peft_model(model: nn.Module) -> nn.Module | None:
    from tunelab.weights import unwrap_model

    model = unwrap_model(model)
    return model if hasattr(model, "peft_config") and hasattr(model, "disable_adapter") else None


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _smoothed_sigmoid_loss(z: torch.Tensor, eps: float) -> torch.Tensor:
    loss = -F.logsigmoid(z)
    return (1 - eps) * loss - eps * F.logsigmoid(-z) if eps else loss


class PreferenceTask(Task):
    """Shared machinery: per-response log-probabilities, the pair count as the target count, metrics."""

    name = "preference"
    default_monitor = "reward_accuracy"
    model_input_keys = ("input_ids", "attention_mask", "position_ids")
    uses_reference = False

    def __init__(self, loss: Any = None, beta: float = 0.1, label_smoothing: float = 0.0, fused: bool = True):
        super().__init__(loss)
        if beta <= 0:
            raise ConfigError(f"`task.beta` = {beta} must be positive, e.g. 0.1")
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"`task.label_smoothing` = {label_smoothing} must be in [0, 0.5)")
        self.beta, self.label_smoothing, self.fused = beta, label_smoothing, fused

    # -- log-probabilities ------------------------------------------------------------------------------------
    def _target_log_probs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """log p(target) of every target the batch lists (`target_index`, `target_tokens`), fp32."""
        index, targets = batch["target_index"], batch["target_tokens"]
        head = output_head(model)
        if head is not None and self.fused and type(head) is nn.Linear:
            with replaced_head(head, index, lambda h, w, b: linear_log_probs(h, w, b, targets)) as box:
                out = super().forward(model, batch)
            if out is box.get("out"):
                return out
            self.fused = False  # the model post-processes its head's output: use target-only logits
        if head is not None:
            with target_rows(head, index):
                logits = super().forward(model, batch)
        else:
            logits = super().forward(model, batch).flatten(0, 1)[index]
        return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)

    def sequence_log_probs(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probability, token count) of each reply, ordered chosen/rejected by pair: shape
        (2 x pairs,), index 2b is pair b's chosen reply, 2b + 1 its rejected one."""
        segment = batch["target_segment"]
        n = 2 * num_pairs(batch)
        token_logps = self._target_log_probs(model, batch)
        sums = token_logps.new_zeros(n).index_add(0, segment, token_logps)
        return sums, torch.bincount(segment, minlength=n).float()

    def shard_refusal(self, model: nn.Module) -> str | None:
        return (f"the {self.name} task scores pairs through the output head narrowed per batch (and DPO with "
                f"LoRA disables the adapters for the reference), state that threads would share")

    def forward(self, model: nn.Module, batch: Batch) -> PairLogps:
        logps, tokens = self.sequence_log_probs(model, batch)
        out = PairLogps(logps[0::2], logps[1::2], tokens[0::2], tokens[1::2])
        if self.uses_reference:
            out.ref_chosen, out.ref_rejected = self.reference_log_probs(model, batch)
        return out

    def reference_log_probs(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- losses ---------------------------------------------------------------------------------------------------
    def pair_terms(self, out: PairLogps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, chosen reward, rejected reward) of each pair."""
        raise NotImplementedError

    def loss_sum(self, outputs: PairLogps, batch: Batch) -> torch.Tensor:
        return self.pair_terms(outputs)[0].sum()

    def count_targets(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(float(num_pairs(batch)))

    def count_tokens(self, batch: Batch) -> int | None:
        """Each pair's tokens as two sequences (2 x prompt + both replies), whatever the batch layout."""
        return int(batch["pair_tokens"].sum())

    def batch_size(self, batch: Batch) -> int:
        return num_pairs(batch)

    def metrics(self) -> MetricSet:
        return PreferenceMetrics(self)

    def monitor_mode(self, metric: str) -> str:
        return "min" if metric == "loss" else "max"

    def check_dataset(self, dataset: Any, split: str) -> None:
        if not hasattr(dataset, "pairs"):
            raise ConfigError(f"task `{self.name}` trains on preference pairs: set data.name: preference "
                              f"(records with prompt/chosen/rejected)")

    def bind(self, model: nn.Module, data: Any) -> None:
        """Called once the model is built, before any checkpoint is loaded into it (tunelab.run). A Hugging
        Face model's KV cache is turned off: with a cache, packed pairs would attend across sequences."""
        config = getattr(model, "config", None)
        if getattr(config, "use_cache", False):
            config.use_cache = False
        attention = getattr(config, "_attn_implementation", None)
        layout = getattr(getattr(data, "collate_fn", None), "layout", None)
        if layout == "shared_prompt" and attention not in (None, "sdpa"):
            raise ConfigError(
                f"data.layout: shared_prompt hides the chosen reply from the rejected one with a 4-D boolean "
                f"attention mask, which {attention!r} attention does not take; use model.attn_implementation: "
                f"sdpa, or data.layout: packed"
            )


class PreferenceMetrics(MetricSet):
    """Streaming sums over pairs: loss, reward accuracy (ties count half), margin, rewards, log-probs and,
    with a reference, the drift: the mean per-token log-ratio log pi - log pi_ref over both responses."""

    KEYS = ("pairs", "loss", "correct", "margin", "reward_chosen", "reward_rejected", "logp_chosen",
            "logp_rejected", "drift")

    def __init__(self, task: PreferenceTask):
        super().__init__()
        self.task = task
        self.sums = dict.fromkeys(self.KEYS, 0.0)

    def update(self, outputs: PairLogps, batch: Batch, loss_sum: torch.Tensor, n_targets: torch.Tensor):
        loss, reward_c, reward_r = self.task.pair_terms(outputs)
        values = {
            "pairs": float(len(loss)),
            "loss": loss.detach().sum(),
            "correct": ((reward_c > reward_r).float() + 0.5 * (reward_c == reward_r).float()).sum(),
            "margin": (reward_c - reward_r).sum(),
            "reward_chosen": reward_c.sum(),
            "reward_rejected": reward_r.sum(),
            "logp_chosen": outputs.chosen.sum(),
            "logp_rejected": outputs.rejected.sum(),
        }
        if outputs.ref_chosen is not None:
            drift = ((outputs.chosen - outputs.ref_chosen) / outputs.chosen_tokens.clamp(min=1)
                     + (outputs.rejected - outputs.ref_rejected) / outputs.rejected_tokens.clamp(min=1))
            values["drift"] = drift.sum() / 2
        for k, v in values.items():
            self.sums[k] += float(v)

    def sync(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([self.sums[k] for k in self.KEYS], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            self.sums = dict(zip(self.KEYS, t.tolist()))

    def compute(self) -> dict[str, Any]:
        n = max(self.sums["pairs"], 1e-12)
        out = {
            "loss": self.sums["loss"] / n,
            "reward_accuracy": self.sums["correct"] / n,
            "reward_margin": self.sums["margin"] / n,
            "reward_chosen": self.sums["reward_chosen"] / n,
            "reward_rejected": self.sums["reward_rejected"] / n,
            "logp_chosen": self.sums["logp_chosen"] / n,
            "logp_rejected": self.sums["logp_rejected"] / n,
        }
        if self.task.uses_reference:
            out["drift"] = self.sums["drift"] / n
        return out


# -- DPO ----------------------------------------------------------------------------------------------------------
@register_task("dpo")
class DPOTask(PreferenceTask):
    name = "dpo"
    uses_reference = True
    LOSS_TYPES = ("sigmoid", "ipo", "hinge")

    def __init__(
        self,
        loss: Any = None,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        nll_weight: float = 0.0,
        precompute_ref: bool = False,
        fused: bool = True,
    ):
        super().__init__(loss, beta, label_smoothing, fused)
        if loss_type not in self.LOSS_TYPES:
            raise ConfigError(f"`task.loss` = {loss_type!r} is not a DPO loss; use one of {', '.join(self.LOSS_TYPES)}")
        if label_smoothing and loss_type != "sigmoid":
            raise ConfigError(f"`task.label_smoothing` applies to the sigmoid loss only, not {loss_type!r}; "
                              f"set it to 0")
        if nll_weight < 0:
            raise ConfigError(f"`task.nll_weight` = {nll_weight} must be >= 0")
        self.loss_type, self.nll_weight, self.precompute_ref = loss_type, nll_weight, precompute_ref
        self.reference: nn.Module | None = None  # a frozen copy (full fine-tuning)
        self.reference_source: str | None = None  # adapters | copy | precomputed, once bound

    def pair_terms(self, out: PairLogps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ratio_c, ratio_r = out.chosen - out.ref_chosen, out.rejected - out.ref_rejected
        if self.loss_type == "ipo":
            h = ratio_c / out.chosen_tokens.clamp(min=1) - ratio_r / out.rejected_tokens.clamp(min=1)
            loss = (h - 1 / (2 * self.beta)) ** 2
        elif self.loss_type == "hinge":
            loss = torch.relu(1 - self.beta * (ratio_c - ratio_r))
        else:
            loss = _smoothed_sigmoid_loss(self.beta * (ratio_c - ratio_r), self.label_smoothing)
        if self.nll_weight:
            loss = loss - self.nll_weight * out.chosen / out.chosen_tokens.clamp(min=1)
        return loss, self.beta * ratio_c.detach(), self.beta * ratio_r.detach()

    # -- the reference ------------------------------------------------------------------------------------------
    def bind(self, model: nn.Module, data: Any) -> None:
        """Choose the reference from the initial model: precomputed log-probs, the adapters disabled (LoRA)
        or a frozen copy. A model whose adapters already hold trained weights has no reference to fall back
        on (disabling them gives the base model, not the one being tuned)."""
        super().bind(model, data)
        if any(p.is_meta for p in model.parameters()):
            raise ConfigError(
                "task dpo takes its reference from the initial model, which FSDP with meta_init builds on the "
                "meta device and fills only after sharding; set train.distributed.meta_init: false, or use "
                "strategy: lora"
            )
        if self.precompute_ref:
            self.reference_source = "precomputed"
            data.callbacks.append(PrecomputedReference(self, model_digest(model), data.train, data.eval))
            return
        peft = _peft_model(model)
        if peft is not None:
            trained = [n for n, p in peft.named_parameters() if "lora_B" in n and bool(p.detach().abs().sum() > 0)]
            if trained:
                raise ConfigError(
                    f"task dpo has no reference model: the model's LoRA adapters already hold trained weights "
                    f"({trained[0]}), so disabling them gives the base model, not the one being tuned; set "
                    f"task.precompute_ref: true, or merge the adapters first (tunelab export --merge)"
                )
            self.reference_source = "adapters"
            return
        self.reference_source = "copy"
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def reference_log_probs(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_logps" in batch:
            ref = batch["ref_logps"].float()
            return ref[:, 0], ref[:, 1]
        if self.reference_source == "precomputed":
            raise TunelabError("task dpo: the precomputed reference log-probabilities are missing from this batch; "
                               "they are set before the first step (task.precompute_ref)")
        with torch.no_grad():
            if self.reference is not None:
                device = batch["input_ids"].device
                if next(self.reference.parameters()).device != device:
                    self.reference.to(device)
                logps, _ = self.sequence_log_probs(self.reference, batch)
            else:
                peft = _peft_model(model)
                if peft is None:
                    raise TunelabError(
                        "task dpo has no reference model for this fully fine-tuned model: its frozen copy or "
                        "precomputed log-probabilities are made when a run starts (tunelab train; in Python, "
                        "task.bind(model, data) with the initial model); `tunelab eval` re-evaluates LoRA runs, "
                        "whose reference is the model with its adapters disabled"
                    )
                with peft.disable_adapter():
                    logps, _ = self.sequence_log_probs(peft, batch)
        return logps[0::2], logps[1::2]


def model_digest(model: nn.Module) -> str:
    """A digest of the model's weights: the precomputed reference is valid for exactly these."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class PrecomputedReference(Callback):
    """Sets each dataset's reference log-probabilities (`PreferenceDataset.reference`) before the first step:
    from the cache when these weights and tokens were seen before, else computed with the initial model (a
    fresh run, before it trains) and cached. A resumed run reads them from the cache as it loads its
    checkpoint, so a cache that lost them stops the resume before the run folder is touched."""

    def __init__(self, task: PreferenceTask, weights_digest: str, *datasets: Any):
        self.task, self.weights_digest = task, weights_digest
        self.datasets = [ds for ds in datasets if ds is not None]

    def cache_file(self, dataset: Any) -> Any:
        from tunelab.hub import cache_dir

        return cache_dir() / "preference" / f"{self.weights_digest}-{dataset.token_digest()}.safetensors"

    def _load(self, dataset: Any) -> bool:
        from safetensors.torch import load_file

        path = self.cache_file(dataset)
        if path.is_file():
            dataset.reference = load_file(str(path))["ref_logps"]
        return path.is_file()

    def on_fit_start(self, trainer: Any) -> None:
        from safetensors.torch import save_file

        for ds in self.datasets:
            if ds.reference is not None or self._load(ds):
                continue
            ds.reference = self.compute(trainer, ds)
            path = self.cache_file(ds)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp, ref=ds.reference: save_file({"ref_logps": ref}, str(tmp)))

    def state_dict(self) -> dict[str, Any]:
        return {"precomputed": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for ds in self.datasets:  # a resume: the log-probs of the initial model, which is gone by now
            if not self._load(ds):
                raise CheckpointError(
                    f"{self.cache_file(ds)}: the reference log-probabilities this run started with are gone "
                    f"from the cache (task.precompute_ref); start the run afresh (--overwrite)"
                )

    @torch.no_grad()
    def compute(self, trainer: Any, dataset: Any) -> torch.Tensor:
        """(pairs, 2) summed log-probabilities of every pair under the trainer's model as it is now, in the
        run's precision."""
        model, device, dtype = trainer.raw_model, trainer.device, trainer.autocast_dtype
        was_training = model.training
        model.eval()
        bs = trainer.eval_cfg.batch_size or trainer.train_cfg.batch_size
        order = sorted(range(len(dataset)), key=lambda i: dataset.lengths[i])
        out = torch.empty(len(dataset), 2)
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            batch = {k: v.to(device) for k, v in trainer.collate_fn([dataset[i] for i in idx]).items()}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logps, _ = self.task.sequence_log_probs(model, batch)
            out[idx] = logps.float().cpu().view(-1, 2)
        model.train(was_training)
        return out


# -- reference-free ------------------------------------------------------------------------------------------------
class _AverageLogProbTask(PreferenceTask):
    def averages(self, out: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
        return out.chosen / out.chosen_tokens.clamp(min=1), out.rejected / out.rejected_tokens.clamp(min=1)


@register_task("orpo")
class ORPOTask(_AverageLogProbTask):
    """ORPO: chosen NLL (per token) + beta x the odds-ratio loss; no reference model."""

    name = "orpo"

    def pair_terms(self, out: PairLogps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        avg_c, avg_r = self.averages(out)
        log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
        loss = -avg_c + self.beta * _smoothed_sigmoid_loss(log_odds, self.label_smoothing)
        return loss, self.beta * avg_c.detach(), self.beta * avg_r.detach()


@register_task("simpo")
class SimPOTask(_AverageLogProbTask):
    """SimPO: the sigmoid loss on the per-token average log-probs with a target margin; no reference."""

    name = "simpo"

    def __init__(self, loss: Any = None, beta: float = 2.0, gamma_beta_ratio: float = 0.5,
                 label_smoothing: float = 0.0, fused: bool = True):
        super().__init__(loss, beta, label_smoothing, fused)
        self.gamma_beta_ratio = gamma_beta_ratio

    def pair_terms(self, out: PairLogps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        avg_c, avg_r = self.averages(out)
        loss = _smoothed_sigmoid_loss(self.beta * (avg_c - avg_r - self.gamma_beta_ratio), self.label_smoothing)
        return loss, self.beta * avg_c.detach(), self.beta * avg_r.detach()
