"""Sample generations during training: greedy replies to a few fixed held-out prompts at each eval, logged
as `samples` events (a tuned model should answer and stop: each sample records whether it ended with EOS).
The report shows them. Attached to runs whose data offers prompts (`DataBundle.generation`: the `instruct`
source's `num_samples`)."""

from __future__ import annotations

from typing import Any

from tunelab.callbacks import Callback
from tunelab.config import RunConfig
from tunelab.data.base import DataBundle, GenerationPrompts
from tunelab.registry import CALLBACKS


def generate_reply(model: Any, tokenizer: Any, prompt: str, *, template: str = "chat", system: str | None = None,
                   **kw: Any) -> tuple[str, bool]:
    """A reply to `prompt` encoded as training encoded prompts; returns (text, stopped_at_eos). Keyword
    arguments go to `tunelab.models.llm.generate_ids` (max_new_tokens, temperature, top_p, top_k, ...)."""
    from tunelab.data.chat import prompt_ids
    from tunelab.models.llm import generate_ids

    return generate_ids(model, tokenizer, prompt_ids(tokenizer, prompt, system, template), **kw)


class SampleGenerations(Callback):
    def __init__(self, prompts: GenerationPrompts):
        self.p = prompts

    def on_eval_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        samples = []
        for prompt in self.p.prompts:
            text, ended = generate_reply(trainer.raw_model, self.p.tokenizer, prompt, template=self.p.template,
                                         system=self.p.system, max_new_tokens=self.p.max_new_tokens)
            samples.append({"prompt": prompt, "reply": text, "eos": ended})
        trainer.log("samples", step=trainer.global_step, samples=samples)


@CALLBACKS.register("samples")
def sample_callbacks(cfg: RunConfig, data: DataBundle) -> list[Callback]:
    return [SampleGenerations(data.generation)] if data.generation is not None else []
