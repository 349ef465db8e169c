"""Instruction data for supervised fine-tuning: `data: {name: instruct, path: alpaca.json, ...}`.

Records come in three schemas, detected per file (or named with `format`):
- alpaca: `instruction`, optional `input`, `output`
- chat: `messages` (or `conversations`), a list of `{role, content}` with at least one assistant turn
- text: `text` (continued pretraining: every token is a target)

They are formatted with the model's own chat template (`template: chat`, the default) or the Alpaca prompt
(`template: alpaca`), tokenised, and labelled for `causal_lm` with labels already shifted
(labels[t] is the target of position t). Only response tokens carry loss (`mask_prompt`), every response
ends with EOS so the tuned model learns to stop, and over-long examples are truncated (and counted).

With `packing: true` (default) examples are bin-packed into rows of at most `max_length` tokens. A packed row
carries `position_ids` that restart at 0 for each example and no `attention_mask`: Hugging Face models then
build a block-diagonal causal mask from the position restarts, so no token attends across examples and each
example's loss is what it would be alone (tests/test_chat.py proves it).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from tunelab.config import RunConfig
from tunelab.data.base import DataBundle, GenerationPrompts, holdout_split, register_data, validate_options
from tunelab.errors import ConfigError, DataError
from tunelab.paths import resolve_path

IGNORE = -100
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class InstructOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # .json / .jsonl file, a `datasets.save_to_disk` folder, or `hf:NAME` (datasets cache)
    eval_path: str | None = None
    eval_size: float = Field(0.05, ge=0)  # held out of `path` when no eval_path: a fraction (<1) or a count
    split: str = "train"  # split of an HF dataset
    format: Literal["auto", "alpaca", "chat", "text"] = "auto"
    template: Literal["chat", "alpaca"] = "chat"
    system_prompt: str | None = None
    tokenizer: str | None = None  # default: model.path
    max_length: int = Field(512, gt=1)
    packing: bool = True
    mask_prompt: bool = True
    limit: int | None = Field(None, gt=0)  # use only the first N records
    split_seed: int = 0
    num_samples: int = Field(2, ge=0)  # eval prompts whose generations are logged at each eval
    sample_max_new_tokens: int = Field(48, gt=0)


# -- reading records --------------------------------------------------------------------------------------
def read_records(path: str, split: str = "train") -> list[dict[str, Any]]:
    """Records from a JSON list, JSON lines, a saved `datasets` folder or `hf:NAME`."""
    if path.startswith("hf:"):
        import datasets

        try:
            ds = datasets.load_dataset(path[3:], split=split)
        except Exception as e:  # datasets raises many types (offline, missing split, ...)
            raise DataError(f"data.path = {path!r}: cannot load this dataset ({e})") from e
        return [dict(r) for r in ds]
    p = resolve_path(path)
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise DataError(f"{p}: not a folder written by datasets.save_to_disk ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{p}: no split {split!r}; splits: {', '.join(ds)} (set data.split)")
            ds = ds[split]
        return [dict(r) for r in ds]
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    if p.suffix == ".gz":  # e.g. .jsonl.gz, as Anthropic ships HH-RLHF
        import gzip

        try:
            text = gzip.decompress(p.read_bytes()).decode("utf-8")
        except (OSError, EOFError) as e:
            raise DataError(f"{p}: not a readable gzip file ({e})") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text (byte {e.start} of the unpacked file); save it as UTF-8") from e
        p = p.with_name(p.stem)  # the suffix inside says JSON lines or JSON
    else:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    if p.suffix == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}: line {i + 1} is not valid JSON ({e.msg})") from e
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}); use .jsonl for JSON lines") from e
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of records")
    return data


def detect_format(record: Any, where: str) -> str:
    if isinstance(record, dict):
        if "messages" in record or "conversations" in record:
            return "chat"
        if "instruction" in record and "output" in record:
            return "alpaca"
        if "text" in record:
            return "text"
    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(
        f"{where}: record 0 has keys ({keys}); expected alpaca (instruction, input, output), "
        f"chat (messages) or text (text); set data.format if the file mixes them"
    )


def normalize_messages(messages: list[Any], index: int, where: str) -> list[dict[str, str]]:
    """`{role, content}` dicts from OpenAI-style or ShareGPT-style (`from`/`value`, human/gpt) messages."""
    norm = []
    for m in messages:
        if not isinstance(m, dict):
            raise DataError(f"{where}: record {index}: each message must be a {{role, content}} mapping")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if not isinstance(role, str) or not isinstance(content, str):
            raise DataError(f"{where}: record {index}: a message lacks a string `role` or `content`")
        norm.append({"role": role, "content": content})
    return norm


def to_messages(record: dict[str, Any], fmt: str, index: int, where: str, system: str | None) -> list[dict]:
    """A record as a chat (list of role/content dicts), checking the fields of its schema."""
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise DataError(
                    f"{where}: record {index} has no string `{key}` (alpaca schema needs instruction, output)"
                )
        user = record["instruction"]
        if record.get("input"):
            user = f"{user}\n\n{record['input']}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    else:
        messages = record.get("messages", record.get("conversations"))
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: record {index} has no `messages` list (chat schema)")
        messages = normalize_messages(messages, index, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: record {index} has no assistant turn, so nothing to learn from")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


# -- encoding ------------------------------------------------------------------------------------------------
class Encoder:
    """Turns one record into (token ids, per-token target flags) with the configured template."""

    def __init__(self, tokenizer: Any, template: str, mask_prompt: bool = True, system: str | None = None):
        self.tok, self.template, self.mask_prompt, self.system = tokenizer, template, mask_prompt, system
        self.eos = tokenizer.eos_token
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ConfigError("the tokenizer has no EOS token; a tuned model could never learn to stop")

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(
        self, record: dict[str, Any], fmt: str, index: int, where: str
    ) -> tuple[list[int], list[bool]]:
        if fmt == "text":
            text = record.get("text")
            if not isinstance(text, str):
                raise DataError(f"{where}: record {index} has no string `text` (text schema)")
            ids = self.tok(text, add_special_tokens=True)["input_ids"] + [self.eos_id]
            return ids, [True] * len(ids)
        if self.template == "alpaca":
            return self._encode_alpaca(record, fmt, index, where)
        return self.encode_chat(to_messages(record, fmt, index, where, self.system), index, where)

    def _encode_alpaca(self, record: dict, fmt: str, index: int, where: str) -> tuple[list[int], list[bool]]:
        if fmt != "alpaca":
            raise ConfigError("data.template = 'alpaca' needs alpaca records (instruction, input, output)")
        to_messages(record, fmt, index, where, None)  # field checks
        tmpl = ALPACA_PROMPT_INPUT if record.get("input") else ALPACA_PROMPT
        prompt = self.tok(tmpl.format(**{"input": "", **record}), add_special_tokens=True)["input_ids"]
        response = self._ids(record["output"]) + [self.eos_id]
        return prompt + response, [not self.mask_prompt] * len(prompt) + [True] * len(response)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def encode_chat(
        self, messages: list[dict], index: int, where: str, last_only: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids and target flags of a chat; with `last_only`, only the final assistant turn is a target
        (preference pairs: the earlier turns are the shared prompt)."""
        # Render the conversation turn by turn: the text between "history + assistant header" and
        # "history + assistant turn" is the response. Segments are tokenised separately so the boundary
        # between prompt and response is exact.
        segments: list[tuple[str, bool]] = []
        done = ""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], True)
            full = self._render(messages[: i + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError(
                    f"{where}: record {index}: the chat template does not render turns as prefixes of the "
                    f"whole chat; use data.template: alpaca"
                )
            response = full[len(prompt) :]
            cut = response.rfind(self.eos) if self.eos else -1
            if cut >= 0:  # the template closes the turn with EOS; what follows it is formatting
                target, rest = response[: cut + len(self.eos)], response[cut + len(self.eos) :]
            else:  # the template does not end turns with EOS: append it so the model learns to stop
                target, rest = response + self.eos, ""
            segments += [
                (prompt[len(done) :], not self.mask_prompt),
                (target, not last_only or i == last),
                (rest, not self.mask_prompt),
            ]
            done = full
        ids: list[int] = []
        flags: list[bool] = []
        last = max(i for i, (_, t) in enumerate(segments) if t and segments[i][0])
        for text, is_target in segments[: last + 1]:  # drop the formatting after the final EOS
            seg = self._ids(text)
            ids += seg
            flags += [is_target] * len(seg)
        return ids, flags


def shift_labels(ids: Sequence[int], flags: Sequence[bool]) -> list[int]:
    """labels[t] = ids[t+1] where token t+1 is a target, else -100 (the last position predicts nothing)."""
    return [ids[t + 1] if flags[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


# -- datasets ------------------------------------------------------------------------------------------------
class InstructDataset(Dataset):
    """Tokenised examples; item i is `{input_ids, labels}` (labels shifted)."""

    def __init__(self, examples: list[tuple[list[int], list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.examples[i]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids, _ in self.examples]


class PackedDataset(Dataset):
    """Rows of several examples each; `position_ids` restart at 0 at each example boundary."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], rows: list[list[int]]):
        self.examples, self.rows = examples, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for j in self.rows[i]:
            e_ids, e_labels = self.examples[j]
            ids += e_ids
            labels += e_labels
            pos += range(len(e_ids))
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(pos),
        }

    @property
    def lengths(self) -> list[int]:
        return [sum(len(self.examples[j][0]) for j in row) for row in self.rows]


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into rows of at most `capacity` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            room -= n
        else:
            rows.append([i])
            r, room = len(rows) - 1, capacity - n
        if room > 0:
            bisect.insort(free, (room, r))
    return rows


class InstructCollator:
    """Right-pads a batch. Plain rows get an `attention_mask`; packed rows keep `position_ids` only (the
    padding block restarts its positions, so it is a separate, loss-free document)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(s["input_ids"]) for s in samples)
        packed = "position_ids" in samples[0]
        out = {
            "input_ids": torch.full((len(samples), width), self.pad_id, dtype=torch.long),
            "labels": torch.full((len(samples), width), IGNORE, dtype=torch.long),
        }
        if packed:
            out["position_ids"] = torch.arange(width).repeat(len(samples), 1)
        else:
            out["attention_mask"] = torch.zeros((len(samples), width), dtype=torch.long)
        for b, s in enumerate(samples):
            n = len(s["input_ids"])
            out["input_ids"][b, :n] = s["input_ids"]
            out["labels"][b, :n] = s["labels"]
            if packed:
                out["position_ids"][b, :n] = s["position_ids"]
                out["position_ids"][b, n:] = torch.arange(width - n)
            else:
                out["attention_mask"][b, :n] = 1
        return out


# -- building -------------------------------------------------------------------------------------------------
def encode_records(
    records: list[Any], encoder: Encoder, fmt: str, max_length: int, where: str, numbers: list[int] | None = None
) -> tuple[list[tuple[list[int], list[int]]], dict[str, int], list[int]]:
    """Tokenise and label records; truncate to max_length. Returns (examples, counts, kept record indices).
    `numbers`: each record's index in its file, for error messages (default: its position here)."""
    examples, kept = [], []
    truncated = dropped = 0
    shortest = None
    for i, rec in enumerate(records):
        number = numbers[i] if numbers is not None else i
        if not isinstance(rec, dict):
            raise DataError(f"{where}: record {number} is a {type(rec).__name__}, not a mapping")
        ids, flags = encoder.encode(rec, fmt, number, where)
        shortest = len(ids) if shortest is None else min(shortest, len(ids))
        if len(ids) > max_length:
            truncated += 1
            ids, flags = ids[:max_length], flags[:max_length]
        labels = shift_labels(ids, flags)
        if all(t == IGNORE for t in labels):
            dropped += 1  # nothing of the response is left to learn from
            continue
        examples.append((ids, labels))
        kept.append(i)
    if records and truncated == len(records):
        raise DataError(
            f"{where}: all {len(records)} examples are longer than data.max_length={max_length} tokens "
            f"(the shortest has {shortest}); raise data.max_length"
        )
    if not examples:
        raise DataError(f"{where}: no example keeps a response token within data.max_length={max_length}")
    return examples, {"truncated": truncated, "dropped": dropped}, kept


def _tokenizer_source(cfg: RunConfig, opts: InstructOptions) -> str:
    src = opts.tokenizer or cfg.model.kwargs.get("path")
    if not src:
        raise ConfigError("data.tokenizer is not set and model.path is missing; name the tokenizer to use")
    return str(src)


def _split_records(records: list[Any], opts: InstructOptions) -> tuple[list[Any], list[Any], list[int], list[int]]:
    """(train records, eval records, their indices): `eval_path`'s records, or a seeded `eval_size` held out
    of `path` (indices are the file's record numbers, which errors name, whichever split a record is in)."""
    if opts.eval_path:
        eval_recs = read_records(opts.eval_path, opts.split)
        return records, eval_recs, list(range(len(records))), list(range(len(eval_recs)))
    train_idx, eval_idx = (holdout_split(len(records), opts.eval_size, opts.split_seed, "data.eval_size")
                           if opts.eval_size > 0 else (list(range(len(records))), []))
    return [records[i] for i in train_idx], [records[i] for i in eval_idx], train_idx, eval_idx


def _dataset(examples: list[tuple[list[int], list[int]]], packing: bool, max_length: int) -> Dataset:
    if not packing:
        return InstructDataset(examples)
    return PackedDataset(examples, pack_rows([len(ids) for ids, _ in examples], max_length))


@register_data("instruct")
def build_instruct(cfg: RunConfig) -> DataBundle:
    """Instruction data source (see module docstring)."""
    from tunelab.tokenizers import load_hf_tokenizer

    opts = validate_options(InstructOptions, cfg)
    tokenizer = load_hf_tokenizer(_tokenizer_source(cfg, opts))
    records = read_records(opts.path, opts.split)
    if opts.limit:
        records = records[: opts.limit]
    if not records:
        raise DataError(f"{opts.path}: no records")
    fmt = opts.format if opts.format != "auto" else detect_format(records[0], opts.path)
    if fmt != "text" and opts.template == "chat" and not tokenizer.chat_template:
        raise ConfigError(
            f"the tokenizer of {_tokenizer_source(cfg, opts)!r} has no chat template; set data.template: alpaca, "
            f"or data.tokenizer to a model that has one"
        )
    train_recs, eval_recs, train_idx, eval_idx = _split_records(records, opts)
    encoder = Encoder(tokenizer, opts.template, opts.mask_prompt, opts.system_prompt)
    train_ex, train_counts, _ = encode_records(train_recs, encoder, fmt, opts.max_length, opts.path, train_idx)
    eval_ds, eval_counts, eval_kept = None, {"truncated": 0, "dropped": 0}, []
    if eval_recs:
        eval_ex, eval_counts, eval_kept = encode_records(
            eval_recs, encoder, fmt, opts.max_length, opts.eval_path or opts.path, eval_idx
        )
        eval_ds = _dataset(eval_ex, opts.packing, opts.max_length)
    train_ds = _dataset(train_ex, opts.packing, opts.max_length)
    n_tokens = sum(len(ids) for ids, _ in train_ex)
    info = {
        "format": fmt,
        "template": "none" if fmt == "text" else opts.template,
        "train_examples": len(train_ex),
        "eval_examples": len(eval_ds.examples) if eval_ds is not None else 0,
        "truncated": train_counts["truncated"] + eval_counts["truncated"],
        "dropped": train_counts["dropped"] + eval_counts["dropped"],
        "train_tokens": n_tokens,
        "train_rows": len(train_ds),
        "records": {"train": len(train_recs), "eval": len(eval_recs)},
        "rows": {"train": len(train_ds), "eval": len(eval_ds) if eval_ds is not None else 0},
    }
    if info["dropped"]:
        info["dropped_why"] = (f"no response token left within data.max_length={opts.max_length} after "
                               "truncation (the prompt fills it); raise data.max_length to keep them")
    if opts.packing:
        info["packing_efficiency"] = round(n_tokens / (len(train_ds) * opts.max_length), 4)
    generation = None
    if fmt != "text" and opts.num_samples and eval_recs:
        prompts = [next(m["content"] for m in to_messages(eval_recs[i], fmt, i, opts.path, None) if m["role"] == "user")
                   for i in eval_kept[: opts.num_samples]]
        generation = GenerationPrompts(prompts, tokenizer, opts.template, opts.system_prompt,
                                       opts.sample_max_new_tokens)
    return DataBundle(
        train=train_ds,
        eval=eval_ds,
        collate_fn=InstructCollator(tokenizer.pad_token_id),
        train_lengths=train_ds.lengths,
        eval_lengths=eval_ds.lengths if eval_ds is not None else None,
        info=info,
        generation=generation,
    )


# -- prompts for generation ----------------------------------------------------------------------------
def prompt_ids(
    tokenizer: Any, prompt: str, system: str | None = None, template: str = "chat"
) -> torch.Tensor:
    """The prompt as the model saw prompts in training: its chat template (or the Alpaca one)."""
    if template == "alpaca" or (template == "auto" and not tokenizer.chat_template):
        text = ALPACA_PROMPT.format(instruction=prompt)
        return tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
    if template == "none":
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    if not tokenizer.chat_template:
        raise ConfigError(
            "this model's tokenizer has no chat template; pass --no-chat to send the prompt as raw text"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
