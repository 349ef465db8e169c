"""Preference pairs for DPO, ORPO and SimPO: `data: {name: preference, path: pairs.jsonl, ...}`.

A record is one prompt with a chosen and a rejected reply, in any of these shapes (detected per record):
- `prompt`, `chosen`, `rejected` as strings (the prompt is one user turn);
- the same with chat messages: `prompt` a list of turns, `chosen`/`rejected` a string or one assistant turn;
- `chosen` and `rejected` alone, as whole chats (message lists) or as Anthropic HH-RLHF dialogues
  ("\\n\\nHuman: ...\\n\\nAssistant: ..."), which share every turn but the last assistant reply: they are split
  at their longest common prefix of turns, which is the prompt.

Both sequences are rendered with the model's chat template (tunelab.data.chat.Encoder: the same prompt and
response boundaries, EOS closing the reply) and only the final reply's tokens are targets. A pair longer than
`max_length` loses the start of its prompt first (never below `max_prompt_length` tokens), then the ends of
its replies; both are counted in the run's `start` event.

Batches keep the two sequences of a pair together, in one of three layouts (`layout`, PreferenceCollator):
`shared_prompt` (default) computes the prompt once for both replies (one row: prompt, chosen, rejected, with
an attention mask that hides the chosen reply from the rejected one), `packed` puts prompt + chosen and
prompt + rejected in one row with positions restarting (block-diagonal attention, as tunelab.data.chat
packs), `padded` gives each sequence its own row. The batch lists its targets flat (position, token and
sequence of each), which the preference tasks sum into per-sequence log-probabilities.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from tunelab.config import RunConfig
from tunelab.data.base import DataBundle, register_data, validate_options
from tunelab.data.chat import (
    Encoder,
    _split_records,
    _tokenizer_source,
    normalize_messages,
    read_records,
)
from tunelab.errors import ConfigError, DataError


class PreferenceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # .json / .jsonl / .jsonl.gz, a `datasets.save_to_disk` folder, or `hf:NAME`
    eval_path: str | None = None
    eval_size: float = Field(0.1, ge=0)  # held out of `path` when no eval_path: a fraction (<1) or a count
    split: str = "train"
    split_seed: int = 0
    tokenizer: str | None = None  # default: model.path
    system_prompt: str | None = None
    max_length: int = Field(512, gt=2)  # tokens per sequence: prompt + one reply
    max_prompt_length: int | None = Field(None, gt=0)  # the prompt keeps at least this many; default max_length // 2
    truncate_prompt: bool = True  # false: a prompt is never cut, and one that leaves no room is an error
    layout: Literal["shared_prompt", "packed", "padded"] = "shared_prompt"  # see PreferenceCollator
    limit: int | None = Field(None, gt=0)  # use only the first N records


# -- records -> (prompt messages, chosen reply, rejected reply) ------------------------------------------------
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh(text: str) -> list[dict[str, str]] | None:
    """An HH-RLHF dialogue as chat turns (consecutive turns of one role merged), or None if `text` is not one."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    turns: list[dict[str, str]] = []
    for i in range(1, len(parts), 2):
        role, content = _HH_ROLES[parts[i]], parts[i + 1]
        if turns and turns[-1]["role"] == role:  # "Human:" without its blank line leaves two replies in a row
            turns[-1]["content"] += f"\n\n{parts[i]}: {content}"
        else:
            turns.append({"role": role, "content": content})
    return turns


def _as_chat(value: Any, index: int, where: str, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        turns = parse_hh(value)
        if turns is None:
            raise DataError(
                f"{where}: record {index} has no `prompt`, and its `{key}` is neither a message list nor an "
                f"HH dialogue (\"\\n\\nHuman: ...\\n\\nAssistant: ...\"); add a `prompt`"
            )
        return turns
    if isinstance(value, list) and value:
        return normalize_messages(value, index, where)
    raise DataError(f"{where}: record {index}: `{key}` must be a string or a list of messages")


def _reply(value: Any, index: int, where: str, key: str) -> str:
    """A reply given after an explicit prompt: a string or a single assistant turn."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        turns = normalize_messages(value, index, where)
        if len(turns) == 1 and turns[0]["role"] == "assistant":
            return turns[0]["content"]
    raise DataError(f"{where}: record {index}: `{key}` must be a string or one assistant message")


def split_pair(record: dict[str, Any], index: int, where: str) -> tuple[list[dict[str, str]], str, str]:
    """(prompt turns, chosen reply, rejected reply) of one record (see the module docstring)."""
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            turns = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt:
            turns = normalize_messages(prompt, index, where)
        else:
            raise DataError(f"{where}: record {index}: `prompt` must be a string or a list of messages")
        return turns, _reply(record["chosen"], index, where, "chosen"), _reply(
            record["rejected"], index, where, "rejected"
        )
    chosen = _as_chat(record["chosen"], index, where, "chosen")
    rejected = _as_chat(record["rejected"], index, where, "rejected")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    rest_c, rest_r = chosen[k:], rejected[k:]
    if not rest_c and not rest_r:
        return chosen, "", ""  # identical: reported by the caller
    if not (len(rest_c) == len(rest_r) == 1 and rest_c[0]["role"] == rest_r[0]["role"] == "assistant"):
        raise DataError(
            f"{where}: record {index}: `chosen` and `rejected` differ before their last assistant reply "
            f"(they share {k} turns); give an explicit `prompt`"
        )
    if not chosen[:k] or chosen[k - 1]["role"] == "assistant":
        raise DataError(f"{where}: record {index}: the shared turns do not end with a user turn to reply to")
    return chosen[:k], rest_c[0]["content"], rest_r[0]["content"]


# -- tokens ------------------------------------------------------------------------------------------------------
Pair = tuple[list[int], list[int], list[int]]  # prompt, chosen reply, rejected reply (token ids)


class PairEncoder:
    """A pair as token ids with the model's chat template, truncated to `max_length`."""

    def __init__(self, tokenizer: Any, opts: PreferenceOptions):
        self.encoder = Encoder(tokenizer, "chat", mask_prompt=True, system=opts.system_prompt)
        self.max_length = opts.max_length
        self.min_prompt = (opts.max_prompt_length or opts.max_length // 2) if opts.truncate_prompt else None
        self.counts = {"prompts_truncated": 0, "replies_truncated": 0}

    def tokens(self, turns: list[dict[str, str]], reply: str, index: int, where: str) -> tuple[list[int], int]:
        """(prompt + reply ids, prompt length)."""
        system = self.encoder.system
        if system and turns[0]["role"] != "system":
            turns = [{"role": "system", "content": system}, *turns]
        ids, flags = self.encoder.encode_chat([*turns, {"role": "assistant", "content": reply}], index, where,
                                              last_only=True)
        return ids, flags.index(True)

    def encode(self, turns: list[dict[str, str]], chosen: str, rejected: str, index: int, where: str) -> Pair | None:
        """The pair's tokens, or None when its prompt leaves no room for a reply (truncate_prompt: false)."""
        ids_c, n_c = self.tokens(turns, chosen, index, where)
        ids_r, n_r = self.tokens(turns, rejected, index, where)
        if n_c != n_r or ids_c[:n_c] != ids_r[:n_r]:
            raise DataError(f"{where}: record {index}: the chat template renders the shared prompt differently "
                            f"for the two replies")
        prompt, c, r = ids_c[:n_c], ids_c[n_c:], ids_r[n_r:]
        longest = max(len(c), len(r))
        if len(prompt) + longest <= self.max_length:
            return prompt, c, r
        keep = len(prompt)
        if self.min_prompt is not None:  # the prompt loses its start first, down to min_prompt tokens
            keep = min(len(prompt), max(self.max_length - longest, self.min_prompt))
        room = self.max_length - keep
        if room < 1:
            return None
        if keep < len(prompt):
            self.counts["prompts_truncated"] += 1
            prompt = prompt[len(prompt) - keep :]
        if longest > room:
            self.counts["replies_truncated"] += 1
            c, r = c[:room], r[:room]
        return prompt, c, r


def encode_pairs(records: list[Any], enc: PairEncoder, where: str, numbers: list[int]) -> list[Pair]:
    """Every record as a tokenised pair. Records that lack a reply, whose replies are identical, or whose
    prompt leaves no room for a reply are counted and reported together in one DataError."""
    pairs: list[Pair] = []
    problems: dict[str, list[int]] = {}
    for rec, number in zip(records, numbers):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: record {number} is a {type(rec).__name__}, not a mapping")
        missing = [k for k in ("chosen", "rejected") if rec.get(k) is None]
        if missing:
            problems.setdefault(f"lack `{missing[0]}`", []).append(number)
            continue
        turns, chosen, rejected = split_pair(rec, number, where)
        if chosen == rejected:
            problems.setdefault("have identical chosen and rejected replies", []).append(number)
            continue
        pair = enc.encode(turns, chosen, rejected, number, where)
        if pair is None:
            problems.setdefault(f"have a prompt that leaves no room for a reply within "
                                f"data.max_length={enc.max_length} (data.truncate_prompt is false)", []).append(number)
            continue
        pairs.append(pair)
    if problems:
        singular = {"lack": "lacks", "have": "has"}
        parts = []
        for what, idx in problems.items():
            verb, rest = what.split(" ", 1)
            counted = f"{len(idx)} records {verb}" if len(idx) > 1 else f"1 record {singular[verb]}"
            shown = ", ".join(map(str, idx[:3])) + (", ..." if len(idx) > 3 else "")
            parts.append(f"{counted} {rest} (record {shown})")
        raise DataError(f"{where}: " + "; ".join(parts) + "; fix or remove them")
    if not pairs:
        raise DataError(f"{where}: no preference pairs")
    return pairs


# -- datasets and batches ---------------------------------------------------------------------------------------
LAYOUTS = ("shared_prompt", "packed", "padded")


class PreferenceDataset(Dataset):
    """Item i: `{prompt, chosen, rejected}` token tensors, plus `ref_logps` (chosen, rejected) once a
    reference's log-probabilities have been set (`reference`, shape (n, 2))."""

    def __init__(self, pairs: list[Pair], layout: str = "shared_prompt"):
        self.pairs, self.layout = pairs, layout
        self.reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        prompt, chosen, rejected = self.pairs[i]
        item = {"prompt": torch.tensor(prompt), "chosen": torch.tensor(chosen), "rejected": torch.tensor(rejected)}
        if self.reference is not None:
            item["ref_logps"] = self.reference[i]
        return item

    @property
    def lengths(self) -> list[int]:
        """Row lengths in this layout (padded: the longer of the pair's two sequences)."""
        if self.layout == "shared_prompt":
            return [len(p) + len(c) + len(r) for p, c, r in self.pairs]
        if self.layout == "packed":
            return [2 * len(p) + len(c) + len(r) for p, c, r in self.pairs]
        return [len(p) + max(len(c), len(r)) for p, c, r in self.pairs]

    def token_digest(self) -> str:
        """A digest of the tokens, naming this dataset in caches."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        for pair in self.pairs:
            for seq in pair:
                h.update(torch.tensor(seq, dtype=torch.int64).numpy().tobytes() + b"|")
        return h.hexdigest()


class PreferenceCollator:
    """Pairs -> a batch in one of three layouts (see the module docstring):
    - `shared_prompt` (default): one row a pair, prompt + chosen + rejected; the rejected reply continues the
      prompt's positions and a 4-D `attention_mask` (rows, 1, width, width; True = may attend) hides the
      chosen reply from it, so the prompt is computed once for both replies;
    - `packed`: one row a pair, prompt + chosen then prompt + rejected, `position_ids` restarting (Hugging Face
      models build a block-diagonal mask from the restarts; works with flash attention too);
    - `padded`: 2 x pairs rows, the chosen sequences first, a 2-D `attention_mask`.
    The targets are listed flat, whatever the layout: `target_index` (positions in the flattened
    rows x width batch; the last prompt token appears twice in `shared_prompt`, once per reply), the token
    each predicts (`target_tokens`) and its sequence (`target_segment`: 2b for pair b's chosen reply, 2b + 1
    for its rejected one). `pair_tokens` (pairs,) counts each pair's tokens as two sequences (2 x prompt +
    both replies) in every layout, so tokens/s compares across layouts and with other tools."""

    def __init__(self, pad_id: int, layout: str = "shared_prompt"):
        if layout not in LAYOUTS:
            raise ConfigError(f"`data.layout` = {layout!r} is invalid; use one of {', '.join(LAYOUTS)}")
        self.pad_id, self.layout = pad_id, layout

    def _rows(self, items: list[dict[str, torch.Tensor]]) -> list[list[tuple[torch.Tensor, int, list]]]:
        """Each row as pieces (token ids, first position, [(target offset in the piece, tokens, segment)])."""
        rows = []
        for b, it in enumerate(items):
            p, c, r = it["prompt"], it["chosen"], it["rejected"]
            n = len(p)
            if self.layout == "shared_prompt":  # r[0] is predicted by the prompt's last token, as c[0] is
                rows.append([(torch.cat([p, c]), 0, [(n - 1, c, 2 * b)]),
                             (r, n, [(-1 - len(c), r[:1], 2 * b + 1), (0, r[1:], 2 * b + 1)])])
            elif self.layout == "packed":
                rows.append([(torch.cat([p, c]), 0, [(n - 1, c, 2 * b)]),
                             (torch.cat([p, r]), 0, [(n - 1, r, 2 * b + 1)])])
            else:
                rows.append([(torch.cat([p, c]), 0, [(n - 1, c, 2 * b)])])
        if self.layout == "padded":
            rows += [[(torch.cat([it["prompt"], it["rejected"]]), 0, [(len(it["prompt"]) - 1, it["rejected"],
                                                                        2 * b + 1)])] for b, it in enumerate(items)]
        return rows

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        rows = self._rows(items)
        width = max(sum(len(ids) for ids, _, _ in row) for row in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        positions = torch.arange(width).repeat(n, 1)
        if self.layout == "shared_prompt":  # causal, minus the chosen reply for the rejected one's queries
            mask = torch.ones(width, width, dtype=torch.bool).tril().repeat(n, 1, 1, 1)
        elif self.layout == "padded":
            mask = torch.zeros((n, width), dtype=torch.long)
        index, tokens, segments = [], [], []
        for i, row in enumerate(rows):
            start = 0
            for j, (ids, first, targets) in enumerate(row):
                end = start + len(ids)
                input_ids[i, start:end] = ids
                positions[i, start:end] = torch.arange(first, first + len(ids))
                for offset, ys, seg in targets:  # offsets count from the piece's start (may reach before it)
                    at = i * width + start + offset
                    index.append(torch.arange(at, at + len(ys)))
                    tokens.append(ys)
                    segments.append(torch.full((len(ys),), seg))
                if self.layout == "shared_prompt" and j == 1:  # the rejected reply does not see the chosen one
                    mask[i, 0, start:end, len(items[i]["prompt"]) : start] = False
                elif self.layout == "padded":
                    mask[i, start:end] = 1
                start = end
            positions[i, start:] = torch.arange(width - start)  # padding: a separate, loss-free block
            if self.layout == "shared_prompt":
                mask[i, 0, start:, :start] = False
        out: dict[str, Any] = {"input_ids": input_ids}
        if self.layout == "padded":
            out["attention_mask"] = mask
        else:
            out["position_ids"] = positions
            if self.layout == "shared_prompt":
                out["attention_mask"] = mask
        out.update(
            target_index=torch.cat(index),
            target_tokens=torch.cat(tokens),
            target_segment=torch.cat(segments),
            pair_tokens=torch.tensor([2 * len(it["prompt"]) + len(it["chosen"]) + len(it["rejected"])
                                      for it in items]),
        )
        if "ref_logps" in items[0]:
            out["ref_logps"] = torch.stack([it["ref_logps"] for it in items])
        return out


# -- the data source ---------------------------------------------------------------------------------------------
@register_data("preference")
def build_preference(cfg: RunConfig) -> DataBundle:
    """Preference-pair data source (see module docstring)."""
    from tunelab.tokenizers import load_hf_tokenizer

    opts = validate_options(PreferenceOptions, cfg)
    if opts.max_prompt_length is not None and opts.max_prompt_length >= opts.max_length:
        raise ConfigError(f"`data.max_prompt_length` = {opts.max_prompt_length} leaves no room for a reply within "
                          f"data.max_length = {opts.max_length}; make it smaller")
    tokenizer = load_hf_tokenizer(_tokenizer_source(cfg, opts))
    if not tokenizer.chat_template:
        raise ConfigError(f"the tokenizer of {_tokenizer_source(cfg, opts)!r} has no chat template; set "
                          f"data.tokenizer to a model that has one")
    records = read_records(opts.path, opts.split)
    if opts.limit:
        records = records[: opts.limit]
    if not records:
        raise DataError(f"{opts.path}: no records")
    train_recs, eval_recs, train_idx, eval_idx = _split_records(records, opts)
    enc = PairEncoder(tokenizer, opts)
    train_ds = PreferenceDataset(encode_pairs(train_recs, enc, opts.path, train_idx), opts.layout)
    eval_ds = None
    if eval_recs:
        eval_ds = PreferenceDataset(encode_pairs(eval_recs, enc, opts.eval_path or opts.path, eval_idx),
                                    opts.layout)
    info = {
        "format": "preference",
        "train_pairs": len(train_ds),
        "eval_pairs": len(eval_ds) if eval_ds is not None else 0,
        **enc.counts,
        "train_tokens": sum(2 * len(p) + len(c) + len(r) for p, c, r in train_ds.pairs),
    }
    return DataBundle(
        train=train_ds,
        eval=eval_ds,
        collate_fn=PreferenceCollator(tokenizer.pad_token_id, opts.layout),
        train_lengths=train_ds.lengths,
        eval_lengths=eval_ds.lengths if eval_ds is not None else None,
        info=info,
    )
