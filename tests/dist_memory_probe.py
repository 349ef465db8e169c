"""Run under torchrun: train a recipe for two steps and write, from rank 0, what one rank really holds and
moves: the local bytes of its parameters, gradients (just before the optimizer step) and optimizer state,
and the bytes its FSDP collectives gathered and reduce-scattered during the second step. The plan's
per-rank figures are tested against these (tests/e2e/test_distributed.py).

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_memory_probe.py OUT.json CONFIG [key=value ...]
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.distributed as dist

from tunelab.callbacks import Callback
from tunelab.config import load_config
from tunelab.run import build_run, make_trainer


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


class Probe(Callback):
    def __init__(self) -> None:
        self.found: dict[str, Any] = {"all_gather_bytes": 0, "reduce_scatter_bytes": 0}
        self.steps = 0

    def on_fit_start(self, trainer: Any) -> None:
        model, opt = trainer.raw_model, trainer.optimizer
        opt.register_step_pre_hook(lambda *_: self._before_step(model))
        opt.register_step_post_hook(lambda *_: self._after_step(opt))
        for name, key in [("all_gather_single", "all_gather_bytes"), ("reduce_scatter_single", "reduce_scatter_bytes")]:
            setattr(dist, name, self._counting(getattr(dist, name), key))

    def _counting(self, collective: Any, key: str) -> Any:
        def wrapped(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.steps == 1:  # the second step: no first-step set-up traffic
                whole = max(output.numel() * output.element_size(), input.numel() * input.element_size())
                size = dist.get_world_size(kwargs.get("group"))
                self.found[key] += whole * (size - 1) // size  # what this rank receives in a ring
            return collective(output, input, *args, **kwargs)

        return wrapped

    def _before_step(self, model: torch.nn.Module) -> None:
        if self.steps == 0:
            self.found["weights_bytes"] = sum(local_bytes(p) for p in model.parameters()) + sum(
                local_bytes(b) for b in model.buffers())
            self.found["gradients_bytes"] = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)

    def _after_step(self, opt: torch.optim.Optimizer) -> None:
        if self.steps == 0:
            self.found["optimizer_bytes"] = sum(
                local_bytes(v) for state in opt.state.values() for k, v in state.items()
                if torch.is_tensor(v) and k != "step")
        self.steps += 1


def main() -> None:
    out, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = load_config(config, overrides)
    probe = Probe()
    make_trainer(build_run(cfg, log=lambda m: None), [probe]).fit()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(probe.found, f)


if __name__ == "__main__":
    main()
