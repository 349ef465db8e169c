"""GGUF export (tunelab.export.gguf) on tiny models: read back by transformers' GGUF loader (same logits), by
tunelab as a model source, and by llama.cpp (llama-cpp-python: logits, greedy tokens, tokenisation); the
tokenizer metadata for each supported pre-tokenizer; one-line refusals that leave the run dir untouched.
The real SmolLM2 LoRA run is in tests/e2e/test_gguf_cli.py."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_one_line_error, run_cli
from tunelab.errors import ConfigError
from tunelab.export.gguf import check_llama_config, export_gguf
from tunelab.models import save_model_folder

SAMPLE = "First Citizen: we're 1234 strong,\n\n  they'LL come at 5:30 -- won't they?\tÉlan ☃ 🦙!"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install 'tunelab[gguf-run]' compiles llama.cpp once)",
)


def corpus(shared_data: Path) -> str:
    return (shared_data / "tinyshakespeare" / "input.txt").read_text()[:60_000]


def hf_bpe_tokenizer(text: str, pre: str, vocab_size: int = 320):
    """A byte-level BPE with the pre-tokenizer llama.cpp calls `pre`, as transformers' fast tokenizer
    (<|endoftext|> is id 0, BOS and EOS). The merges are learned with GPT-2's split on `text` plus numbers
    and contractions, then the pre-tokenizer is swapped: so merges exist across the boundaries where the
    three splits differ, and a wrong `pre` changes the tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    steps = {
        "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]),
    }  # fmt: skip
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    numbers = " ".join(str(n) for n in range(1000, 3000, 3)) + " they'LL we'RE won't 5:30 -- " * 100
    tok.train_from_iterator([text, numbers], trainer=trainer)
    tok.pre_tokenizer = steps[pre]
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_llama(vocab_size: int = 320, tie: bool = False):
    """A random Llama with non-trivial norms (so every tensor's mapping matters), GQA, head dim 16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, rope_theta=10000.0)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def make_hf_run(root: Path, text: str, pre: str = "gpt-2", lora: bool = False, tie: bool = False):
    """A tunelab `hf_causal_lm` run dir (final/ only) on a tiny Llama base folder; returns (run, model)."""
    from tunelab.strategies.lora import LoRA

    base = root / "base"
    model = tiny_llama(tie=tie)
    model.save_pretrained(base)
    hf_bpe_tokenizer(text, pre).save_pretrained(base)
    if lora:
        model, _ = LoRA(r=4, alpha=8, dropout=0.0, target_modules="all-linear").setup(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        model.eval()
    save_model_folder(model, root / "run" / "final", {"name": "hf_causal_lm", "kwargs": {"path": str(base)}})
    return root / "run", model


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path) with its sha256: what an export must not change."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fp32_gguf_gives_the_same_logits_in_transformers_and_back_in_tunelab(tmp_path, shared_data, monkeypatch,
                                                                            lora):  # fmt: skip
    import gguf

    from tunelab.models.llm import hf_causal_lm

    run, model = make_hf_run(tmp_path, corpus(shared_data), lora=lora)
    path = export_gguf(run, dtype="fp32")
    assert path == run / "export" / "run-fp32.gguf" and not list(path.parent.glob(".*"))  # no scratch left
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = load_gguf(path)(input_ids=ids).logits
        assert want.std() > 1e-2
        # the same fp32 weights (LoRA: merged in float64 and rounded once): fp32 noise at most
        assert (got - want).abs().max().item() < 1e-5
        monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
        again = hf_causal_lm(str(path), gradient_checkpointing=False).eval()(input_ids=ids).logits
        assert torch.equal(again, got)  # tunelab's model source dequantises it to the same model

    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert len(names) == 2 + 1 + 2 * 9 and {"token_embd.weight", "output.weight", "blk.1.attn_q.weight"} <= names
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    with pytest.raises(Exception, match="already exists"):
        export_gguf(run, dtype="fp32")


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "q8_0"])
def test_each_dtype_stores_what_it_names_within_its_rounding(tmp_path, shared_data, dtype):
    """Every 2-D weight read back is within half a step of its quantisation grid of the original; norms are
    stored exactly (fp32). The Q/K permutation is undone by the reader, so the comparison is by HF name."""
    import gguf

    run, model = make_hf_run(tmp_path, corpus(shared_data), tie=True)
    path = export_gguf(run, dtype=dtype, output=tmp_path / f"m.{dtype}.gguf")
    want_type = {"fp16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert "output.weight" not in types  # tied: llama.cpp uses token_embd
    assert {n for n, t in types.items() if t == "F32"} == {n for n in types if n.endswith("norm.weight")}
    assert {t for n, t in types.items() if not n.endswith("norm.weight")} == {want_type}
    back = dict(load_gguf(path).named_parameters())
    for name, w in model.named_parameters():
        err = (back[name] - w).abs()
        if w.ndim == 1:
            assert torch.equal(back[name], w), name
        elif dtype == "q8_0":  # blocks of 32 along a row: int8 times the scale amax/127, stored in fp16
            scale = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
            assert (err.reshape(-1, 32) <= scale * (0.5 + 127 * 2.0**-11)).all(), name
        else:
            rel = {"fp16": 2.0**-11, "bf16": 2.0**-8}[dtype]
            assert (err <= w.abs() * rel + 1e-7).all() and err.max() > 0, name


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe"])
def test_tokenizer_metadata_round_trips(tmp_path, shared_data, pre):
    """The vocabulary, merges and special ids come back the same; the pre-tokenizer is named for llama.cpp
    (transformers rebuilds the gpt-2 and llama-bpe splits; llama.cpp all three, checked below)."""
    import gguf
    from transformers import AutoTokenizer

    run, _ = make_hf_run(tmp_path, corpus(shared_data), pre=pre)
    path = export_gguf(run, dtype="fp16")
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == pre
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 0
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    source = AutoTokenizer.from_pretrained(run / "final")
    assert len(fields["tokenizer.ggml.tokens"].contents()) == len(source)
    if pre != "smollm":
        back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        assert back(SAMPLE)["input_ids"] == source(SAMPLE)["input_ids"]


def native_llama_run(root: Path, text: str, tokenizer: str = "bpe", flavour: str = "llama"):
    """A tunelab `gpt` run dir (final/ + tokenizer/) with a tiny native GPT and a tokenizer trained on `text`."""
    from tunelab.models.gpt import gpt
    from tunelab.tokenizers import build_tokenizer

    tok = build_tokenizer(tokenizer, text, vocab_size=300)
    kwargs = dict(size=None, flavour=flavour, vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4,
                  n_embd=64, **({"n_kv_head": 2} if flavour == "llama" else {}))  # fmt: skip
    torch.manual_seed(0)
    model = gpt(**kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    save_model_folder(model, root / "final", {"name": "gpt", "kwargs": kwargs})
    tok.save(root / "tokenizer")
    return model, tok


def test_native_llama_gpt_exports_with_its_bpe_vocabulary(tmp_path, shared_data):
    from transformers import AutoTokenizer

    model, tok = native_llama_run(tmp_path / "run", corpus(shared_data))
    path = export_gguf(tmp_path / "run", dtype="fp32")
    ids = torch.tensor([tok.encode("ROMEO: what light through yonder window breaks?")])
    with torch.no_grad():
        ours, theirs = model(ids), load_gguf(path)(input_ids=ids).logits
    assert ours.std() > 1e-2 and (ours - theirs).abs().max().item() < 1e-4
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert back(SAMPLE)["input_ids"] == tok.encode(SAMPLE) and back.eos_token_id == tok.eos_id


@needs_llama_cpp
@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe"])
def test_llama_cpp_reads_the_file_same_tokens_and_logits(tmp_path, shared_data, pre):
    """llama.cpp, a second reader: it tokenises like the source tokenizer, its fp32 logits match transformers'
    (the Q/K permutation and every hyperparameter matter here) and greedy decoding picks the same tokens."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    run, model = make_hf_run(tmp_path, corpus(shared_data), pre=pre)
    path = export_gguf(run, dtype="fp32")
    source = AutoTokenizer.from_pretrained(run / "final")
    llm = Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    try:
        assert llm.tokenize(SAMPLE.encode(), add_bos=False, special=True) == source(SAMPLE)["input_ids"]
        ids = source("Now is the winter of our discontent")["input_ids"]
        llm.eval(ids)
        theirs = torch.tensor(llm.scores[: len(ids)])
        with torch.no_grad():
            ours = model(input_ids=torch.tensor([ids])).logits[0]
            greedy = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()  # fmt: skip
        assert (ours - theirs).abs().max().item() < 1e-3 * ours.abs().max().item()
        llm.reset()
        generated = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            generated.append(token)
            if len(generated) == 20:
                break
        assert generated == greedy
    finally:
        llm.close()


# -- bad input: one line, exit 2, the run dir untouched ------------------------------------------------------
def _tiny_gpt2_hf_run(root: Path, text: str) -> Path:
    """A fully fine-tuned `hf_causal_lm` run of a (tiny) GPT-2: a causal LM, but not a Llama."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = root / "gpt2"
    model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(base)
    hf_bpe_tokenizer(text, "gpt-2").save_pretrained(base)
    save_model_folder(model, root / "run" / "final", {"name": "hf_causal_lm", "kwargs": {"path": str(base)}})
    return root / "run"


@pytest.mark.parametrize("case", ["dtype", "gpt2-flavour", "char-tokenizer", "not-llama", "format"])
def test_bad_input_is_one_line_and_leaves_the_run_dir_alone(tmp_path, shared_data, case):
    text = corpus(shared_data)
    args, fragment = ["--format", "gguf"], ""
    if case in ("dtype", "format"):
        run, _ = make_hf_run(tmp_path, text)
        if case == "dtype":
            args, fragment = args + ["--dtype", "q4_k"], "--dtype 'q4_k' is not written to GGUF; use one of fp32"
        else:
            args, fragment = ["--dtype", "q8_0"], "--dtype 'q8_0' is invalid; use one of fp32, bf16, fp16"
    elif case == "not-llama":
        run = _tiny_gpt2_hf_run(tmp_path, text)
        fragment = "GGUF export writes Llama-architecture models (model_type llama), not 'gpt2'"
    else:
        run = tmp_path / "run"
        native_llama_run(run, text, tokenizer="char" if case == "char-tokenizer" else "bpe",
                         flavour="gpt2" if case == "gpt2-flavour" else "llama")  # fmt: skip
        fragment = "only the `llama` flavour" if case == "gpt2-flavour" else "this run's tokenizer is char"
    before = snapshot(run)
    assert_one_line_error(run_cli("export", run, *args, check=False), fragment)
    assert snapshot(run) == before and not (run / "export").exists()


@pytest.mark.parametrize("change, fragment", [
    ({"model_type": "qwen2"}, "not 'qwen2'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}, "RoPE scaling 'llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])  # fmt: skip
def test_configs_llama_cpp_would_run_differently_are_refused(change, fragment):
    config = {**tiny_llama().config.to_dict(), **change}
    with pytest.raises(ConfigError, match=fragment):
        check_llama_config(config, "x/config.json")
    check_llama_config(tiny_llama().config.to_dict(), "x/config.json")  # the unchanged one passes
