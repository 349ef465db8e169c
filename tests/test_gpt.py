"""The native GPT: shapes, causality, init, checkpointing, compile without graph breaks, HF Llama round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tunelab.errors import ConfigError
from tunelab.models import create_model
from tunelab.models.gpt import GPT, SIZES, gpt, gpt_config, sample_next

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50)


@pytest.fixture(params=["gpt2", "llama"])
def flavour(request) -> str:
    return request.param


def tiny(flavour: str, **kw) -> GPT:
    torch.manual_seed(0)
    return gpt(
        size=None, flavour=flavour, **{**TINY, **({"n_kv_head": 2} if flavour == "llama" else {}), **kw}
    )


def test_forward_shape_and_registry(flavour):
    model = create_model("gpt", size=None, flavour=flavour, **TINY)
    ids = torch.randint(0, 50, (3, 10))
    assert model(ids).shape == (3, 10, 50)
    # explicit positions 0..T-1 are the default positions
    pos = torch.arange(10).expand(3, 10)
    torch.testing.assert_close(model(ids, position_ids=pos), model(ids))


def test_causal(flavour):
    model = tiny(flavour).eval()
    ids = torch.randint(0, 50, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4


def test_named_sizes_parameter_counts():
    with torch.device("meta"):
        assert GPT(gpt_config("baby")).num_params() == 804_096  # nanoGPT's baby (bias-free, vocab 65)
        big = GPT(gpt_config("gpt2-124m"))
        llama = GPT(gpt_config("llama-1b"))
    # GPT-2 small has 124.44M with vocab 50257; padded to 50304 it is 124.48M
    assert big.num_params() == 124_475_904
    assert abs(llama.num_params() - 1.236e9) < 0.01e9  # Llama 3.2 1B
    n = big.num_params(non_embedding=True)
    assert big.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024
    assert set(SIZES) >= {"baby", "gpt2-124m", "llama-1b"}


def test_gpt2_scaled_residual_init():
    model = gpt(size=None, n_layer=8, n_head=4, n_embd=256, vocab_size=100, block_size=16)
    std_proj = model.blocks[0].mlp.proj.weight.std().item()
    std_fc = model.blocks[0].mlp.fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / math.sqrt(16)) < 0.0005
    assert model.lm_head.weight is model.tok_emb.weight  # tied by default


def test_activation_checkpointing_same_gradients(flavour):
    ids = torch.randint(0, 50, (2, 16))
    grads = []
    for ckpt in (False, True):
        model = tiny(flavour, activation_checkpointing=ckpt)
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=130, n_head=4), "not divisible by `model.n_head`"),
        (dict(flavour="llama", n_head=4, n_kv_head=3, n_embd=32), "must divide"),
        (dict(size="gpt3"), "unknown"),
        (dict(flavour="mamba"), "flavour"),
        (dict(gelu_approximate="fast"), "gelu_approximate"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        gpt(**{"size": None, "vocab_size": 10, "block_size": 8, **kwargs})


def test_gelu_approximate_switches_the_mlp_activation():
    x = torch.randint(0, 65, (2, 16))
    outs = []
    for approx in ("tanh", "none"):  # GPT-2's tanh approximation; nanoGPT's exact GELU
        torch.manual_seed(0)
        outs.append(gpt(size="baby", gelu_approximate=approx)(x))
    assert outs[0].shape == outs[1].shape and not torch.equal(outs[0], outs[1])
    assert torch.allclose(outs[0], outs[1], atol=1e-2)  # the same model up to the activation's approximation


def test_compiled_training_step_has_no_graph_breaks(flavour):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny(flavour)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph raises on a break
    ids = torch.randint(0, 50, (2, 16))
    for _ in range(2):
        loss = F.cross_entropy(compiled(ids).flatten(0, 1), ids.flatten(), reduction="sum")
        loss.backward()
    assert sum(counters["graph_break"].values()) == 0
    assert model.tok_emb.weight.grad is not None
    # and the packed-positions path traces too
    explanation = torch._dynamo.explain(model)(ids, position_ids=torch.arange(16).expand(2, 16))
    assert explanation.graph_break_count == 0
    torch._dynamo.reset()


def test_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    assert sample_next(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(50)}
    assert picks == {1, 3}
    picks = {sample_next(logits, 1.0, top_p=0.1, generator=g).item() for _ in range(20)}
    assert picks == {1}
    model = tiny("gpt2").eval()
    prompt = torch.tensor([[1, 2, 3]])
    a = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 23) and torch.equal(a, b)  # seeded: reproducible; longer than block_size: cropped


@pytest.mark.parametrize("tie", [True, False])
def test_hf_llama_export_import_same_logits(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    from tunelab.models.gpt_hf import export_hf_llama, import_hf_llama

    model = tiny("llama", tie_embeddings=tie, bias=False).eval()
    with torch.no_grad():  # non-trivial norms so the mapping of every tensor matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    export_hf_llama(model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
        assert ours.std() > 1e-3
        assert (ours - theirs).abs().max().item() < 1e-4
        back = import_hf_llama(tmp_path / "hf").eval()
        assert (back(ids) - ours).abs().max().item() < 1e-5
    assert (back.lm_head.weight is back.tok_emb.weight) == tie


def test_gpt2_flavour_does_not_export(tmp_path):
    from tunelab.models.gpt_hf import export_hf_llama

    with pytest.raises(ConfigError, match="llama"):
        export_hf_llama(tiny("gpt2"), tmp_path)
