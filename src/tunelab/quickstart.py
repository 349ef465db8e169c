"""`tunelab quickstart`: the six steps end to end on the digits scikit-learn ships (no network).

1. define a small CNN   2. initialise it (normal, std 0.01)   3. pre-train it on digits 0-4 and load those
weights into a 10-class model (the head is shape-mismatched and skipped, the report says so)
4. cross-entropy + SGD   5. fine-tune on all ten digits   6. evaluate on a held-out split.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tunelab.config import load_config
from tunelab.engine.rundir import claim_run_dir, holds_trained_run
from tunelab.engine.trainer import Trainer
from tunelab.errors import ConfigError
from tunelab.run import build_run, fit_run, train


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def recipe(output_dir: str, classes: list[int] | None, epochs: int, pretrained: str | None) -> dict[str, Any]:
    return {
        "name": "quickstart",
        "model": {"name": "cnn", "num_classes": 10 if classes is None else len(classes), "width": 32},
        "init": {"scheme": "normal", "std": 0.01},
        "pretrained": {"path": pretrained, "allow_missing": ["fc.*"]},
        "data": {"name": "digits", "val_fraction": 0.2, "classes": classes},
        "task": {"name": "classification"},
        "loss": {"label_smoothing": 0.0},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "warmup_steps": 10},
        "train": {"epochs": epochs, "batch_size": 32, "seed": 0, "log_every": 10},
        "eval": {"monitor": "accuracy"},
        "output": {"dir": output_dir},
    }


def quickstart(output: str = "runs/quickstart", overwrite: bool = False) -> dict[str, Any]:
    out = Path(output)
    pre_dir = out.parent / f"{out.name}-pretrain"
    for folder in (pre_dir, out):
        if not overwrite and folder.is_dir() and holds_trained_run(folder):
            raise ConfigError(f"{folder} holds an earlier quickstart run: pass --overwrite to replace it, "
                              "or --output DIR for a new one")
    # Steps 1-5 on digits 0-4: a pre-trained 5-class model
    _log("== pre-training a small CNN on digits 0-4")
    pre_cfg = load_config(recipe(str(pre_dir), [0, 1, 2, 3, 4], epochs=5, pretrained=None))
    pre = train(pre_cfg, overwrite=overwrite, log=_log)
    _log(f"pre-trained: accuracy on held-out digits 0-4 = {pre['metrics']['accuracy']:.4f}")

    # Steps 1-3 again for the 10-class model, loading the 5-class weights
    _log("== building a 10-class model and loading the pre-trained weights")
    cfg = load_config(recipe(str(out), None, epochs=10, pretrained=str(pre_dir / "final" / "model.safetensors")))
    with claim_run_dir(cfg.output_dir, resume=False, overwrite=overwrite) as run_dir:
        run = build_run(cfg, log=_log)
        run_dir.commit()
        before = Trainer(run.model, run.task, run.data.train, run.data.eval, config=cfg).evaluate()["accuracy"]
        # Steps 4-6: fine-tune with SGD on all ten digits and evaluate on the held-out split
        _log("== fine-tuning on all ten digits")
        summary = fit_run(run, log=_log)
    after = summary["metrics"]["accuracy"]
    print(f"accuracy on the held-out digits: before fine-tuning {before:.4f}, after {after:.4f}")
    print(f"run directory: {out}  ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return summary
