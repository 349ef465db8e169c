"""hf_causal_lm: GGUF conversion cache, generation, LoRA strategy, adapter save/load, merged export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.hub import resolve_model_path
from tunelab.insight.samples import generate_reply
from tunelab.models import save_model_folder
from tunelab.models.llm import _from_pretrained, _quantization_config, hf_causal_lm, load_causal_lm
from tunelab.strategies.lora import LoRA
from tunelab.tokenizers import load_hf_tokenizer


@pytest.fixture(scope="module")
def base_path(smollm_gguf) -> str:
    return str(smollm_gguf)


@pytest.fixture(scope="module")
def tokenizer(base_path):
    return load_hf_tokenizer(base_path)


@pytest.fixture()
def lora_model(base_path):
    """SmolLM2 with LoRA on q/v, adapters moved off their zero init so they change the output."""
    model, scales = LoRA(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]).setup(
        hf_causal_lm(base_path)
    )
    assert scales is None
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.eval()


def test_gguf_converts_once_into_a_plain_cached_folder(base_path):
    folder = resolve_model_path(base_path)
    folder_path = Path(folder)
    config = json.loads((folder_path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    mtime = (folder_path / "model.safetensors").stat().st_mtime
    assert resolve_model_path(base_path) == folder  # cached: no second conversion
    assert (folder_path / "model.safetensors").stat().st_mtime == mtime


def test_a_damaged_cached_conversion_is_rebuilt(smollm_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    folder = Path(resolve_model_path(str(smollm_gguf)))
    weights = folder / "model.safetensors"
    clean = weights.read_bytes()
    with open(weights, "r+b") as f:
        f.seek(len(clean) - 11)
        f.write(b"\x00\x01")
    assert resolve_model_path(str(smollm_gguf)) == str(folder)
    assert "rebuilding the cached conversion" in capsys.readouterr().err
    assert weights.read_bytes() == clean


def test_bad_model_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="has no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ConfigError, match="model.dtype"):
        _from_pretrained(str(tmp_path), "fp8", "sdpa")


def test_qlora_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine could run QLoRA")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        _quantization_config("4bit", torch.float32)


def test_base_model_answers_with_its_chat_template_and_stops(base_path, tokenizer):
    model = hf_causal_lm(base_path).eval()
    streamed: list[str] = []
    text, ended = generate_reply(
        model, tokenizer, "What is the capital of France?", max_new_tokens=24, stream=streamed.append
    )
    assert "Paris" in text and ended
    assert "".join(streamed).strip() == text.strip()


def test_lora_targets_that_match_nothing_list_the_modules(base_path):
    with pytest.raises(ConfigError, match=r"matches no module; Linear modules here: down_proj, gate_proj"):
        LoRA(target_modules=["attn.qkv"]).setup(hf_causal_lm(base_path))


def test_lora_trains_only_adapters_and_checkpointing_keeps_gradients(base_path, tokenizer):
    model, _ = LoRA(r=4, target_modules="all-linear").setup(
        hf_causal_lm(base_path, gradient_checkpointing=True)
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    model.train()
    ids = tokenizer("Hello there", return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A's are 0 while B is 0
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@torch.no_grad()
def test_adapter_folder_round_trip_and_merged_export_match_logits(lora_model, base_path, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.export import export_run

    spec = {"name": "hf_causal_lm", "kwargs": {"path": base_path}}
    final = tmp_path / "run" / "final"
    save_model_folder(lora_model, final, spec)
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").is_file()
    assert (final / "tokenizer.json").is_file()

    ids = tokenizer("Write a haiku about the sea.", return_tensors="pt")["input_ids"]
    want = lora_model(input_ids=ids).logits
    reloaded = load_causal_lm(final, spec).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=0, atol=1e-5)

    merged_dir = export_run(tmp_path / "run", merge=True)
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert (merged(input_ids=ids).logits - want).abs().max().item() < 1e-4
    text, ended = generate_reply(merged, load_hf_tokenizer(str(merged_dir)), "Say hi.", max_new_tokens=48)
    assert ended and text

    adapter_dir = export_run(tmp_path / "run")
    assert sorted(p.name for p in adapter_dir.glob("adapter_*")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    with pytest.raises(ConfigError, match="already exists"):
        export_run(tmp_path / "run")
    from safetensors.torch import load_file

    bf16 = export_run(tmp_path / "run", dtype="bf16", output=tmp_path / "bf16")
    assert {t.dtype for t in load_file(bf16 / "adapter_model.safetensors").values()} == {torch.bfloat16}


def _tiny_llama_with_lora(dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, attn_implementation="sdpa")  # fmt: skip
    model, _ = LoRA(r=4, alpha=8, dropout=dropout, target_modules="all-linear").setup(LlamaForCausalLM(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _sft_batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (2, 24))
    labels = ids.roll(-1, dims=1)
    labels[:, :10] = -100  # the prompt carries no loss
    labels[1, 20:] = -100  # nor the padding
    return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100) | (torch.arange(24) < 20)}


def _loss_and_grads(model, task, batch):
    model.zero_grad(set_to_none=True)
    out = task.forward(model, batch)
    loss = task.loss_sum(out, batch)
    loss.backward()
    return out, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _tiny_llama(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, attn_implementation="sdpa")  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("lora", [True, False])
def test_target_only_and_fused_head_give_the_same_loss_and_gradients(lora, monkeypatch):
    from tunelab.tasks import linear_ce
    from tunelab.tasks.causal_lm import CausalLMTask

    monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", 300 * 7)  # 7 rows a chunk: several chunks and a ragged one
    model = (_tiny_llama_with_lora() if lora else _tiny_llama()).train()  # full FT: the tied head trains
    batch = _sft_batch()
    out_full, loss_full, g_full = _loss_and_grads(model, CausalLMTask(target_logits=False), batch)
    out_tgt, loss_tgt, g_tgt = _loss_and_grads(model, CausalLMTask(fused_loss=False), batch)
    out_fused, loss_fused, g_fused = _loss_and_grads(model, CausalLMTask(), batch)
    n_targets = int((batch["labels"] != -100).sum())
    assert out_full.shape == (2, 24, 300) and out_tgt.shape == (n_targets, 300) and out_fused.dim() == 0
    for loss, grads in ((loss_tgt, g_tgt), (loss_fused, g_fused)):
        torch.testing.assert_close(loss, loss_full, rtol=1e-5, atol=1e-5)
        assert grads.keys() == g_full.keys() and g_full
        for name in g_full:
            torch.testing.assert_close(grads[name], g_full[name], rtol=1e-4, atol=1e-6)
    assert ("model.embed_tokens.weight" in g_full) is not lora
    assert model(input_ids=batch["input_ids"]).logits.shape == (2, 24, 300)  # the hooks are off outside the task


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_linear_cross_entropy_matches_the_unfused_head_and_loss(smoothing, monkeypatch):
    import torch.nn.functional as F

    from tunelab.tasks import linear_ce

    monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", 50 * 16)  # 16 rows a chunk
    torch.manual_seed(0)
    h = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    want = F.cross_entropy(F.linear(h, w, b), t, reduction="sum", label_smoothing=smoothing)
    want_grads = torch.autograd.grad(want * 0.5, (h, w, b))
    got = linear_ce.linear_cross_entropy(h, w, b, t, smoothing)
    got_grads = torch.autograd.grad(got * 0.5, (h, w, b))  # backward scales by the incoming gradient
    torch.testing.assert_close(got, want.float())
    for g, ref in zip(got_grads, want_grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss alone, no gradient work
        torch.testing.assert_close(linear_ce.linear_cross_entropy(h, w, b, t, smoothing), want.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: bf16 matmuls, fp32 loss
        low = linear_ce.linear_cross_entropy(h.float(), w.float(), None, t)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, F.cross_entropy(F.linear(h, w), t, reduction="sum").float(), rtol=2e-2, atol=0.5)


def test_fused_head_falls_back_when_the_model_rescales_its_logits():
    from transformers.modeling_outputs import CausalLMOutput

    from tunelab.tasks.causal_lm import CausalLMTask

    class Scaled(torch.nn.Module):  # like Cohere's logit_scale or Gemma-2's soft-capping
        def __init__(self):
            super().__init__()
            self.inner = _tiny_llama()

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, **kw):
            return CausalLMOutput(logits=self.inner(**kw).logits * 0.5)

    model, batch = Scaled(), _sft_batch()
    task = CausalLMTask()
    _, loss, _ = _loss_and_grads(model, task, batch)
    _, want, _ = _loss_and_grads(model, CausalLMTask(target_logits=False), batch)
    assert task.fused_loss is False
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", [True, "selective"])
def test_activation_checkpointing_modes_keep_loss_and_gradients(mode):
    from tunelab.models.checkpointing import selective_checkpoint_kwargs
    from tunelab.tasks.causal_lm import CausalLMTask

    task, batch = CausalLMTask(), _sft_batch()
    model = _tiny_llama_with_lora(dropout=0.1).train()
    torch.manual_seed(2)
    _, loss_ref, g_ref = _loss_and_grads(model, task, batch)
    kwargs = selective_checkpoint_kwargs(min_inner=32) if mode == "selective" else {"use_reentrant": False}
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    torch.manual_seed(2)  # the same dropout masks: checkpointing replays the RNG in the recompute
    _, loss, grads = _loss_and_grads(model, task, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(grads[name], g_ref[name], rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        _check_gc_value("sometimes")


def _check_gc_value(value):
    """hf_causal_lm's check of `gradient_checkpointing`, on a stand-in model (no weights loaded)."""
    from tunelab.models import llm

    class _Fake(torch.nn.Module):
        config = type("C", (), {"use_cache": True})()

    orig = llm._from_pretrained
    llm._from_pretrained = lambda *a, **k: _Fake()
    try:
        llm.hf_causal_lm("unused", gradient_checkpointing=value)
    finally:
        llm._from_pretrained = orig


def test_merge_rounds_once_in_float64():
    from tunelab.strategies.lora import merge_lora

    model = _tiny_llama_with_lora().eval()
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight.detach().double()
    a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
    want = (w + b @ a * layer.scaling["default"]).float()
    ids = _sft_batch()["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged = merge_lora(model)
        after = merged(input_ids=ids).logits
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, want)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert (after - before).abs().max().item() < 1e-5
