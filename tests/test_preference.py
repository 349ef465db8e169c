"""Preference tuning: pair records (HH split, chat, strings), tokens and truncation, bad records, and the
DPO / ORPO / SimPO losses and gradients against a direct implementation of their formulas on a tiny model."""

from __future__ import annotations

import copy
import gzip
import json

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.preference import (
    PairEncoder,
    PreferenceCollator,
    PreferenceDataset,
    PreferenceOptions,
    encode_pairs,
    parse_hh,
    split_pair,
)
from tunelab.errors import ConfigError, DataError
from tunelab.tasks.base import build_task
from tunelab.tasks.linear_ce import linear_log_probs
from tunelab.tasks.preference import DPOTask, PrecomputedReference


@pytest.fixture(scope="module")
def tokenizer(smollm_gguf):
    from tunelab.tokenizers import load_hf_tokenizer

    return load_hf_tokenizer(str(smollm_gguf))


@pytest.fixture(scope="module")
def hh(shared_data) -> list[dict]:
    with gzip.open(shared_data / "preference" / "hh_harmless_base_test.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


# -- records ----------------------------------------------------------------------------------------------------
def test_hh_dialogues_split_at_their_longest_common_prefix_of_turns(hh):
    rec = hh[0]
    turns, chosen, rejected = split_pair(rec, 0, "hh")
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert turns[0]["content"] == "what are some pranks with a pen i can do?"
    assert rec["chosen"].endswith(chosen) and rec["rejected"].endswith(rejected) and chosen != rejected
    assert chosen.startswith("No, sorry!") and rejected.startswith("There are lots of funny things")
    # every pair of the file splits into a prompt ending with a user turn and two different replies
    for i, r in enumerate(hh):
        turns, c, rj = split_pair(r, i, "hh")
        assert turns[-1]["role"] == "user" and c != rj
    # a reply whose text holds "  Human:" without the blank line stays one reply
    merged = parse_hh("\n\nHuman: hi\n\nAssistant: one\n\nAssistant: two")
    assert merged == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one\n\nAssistant: two"}]


def test_explicit_prompt_records_as_strings_or_messages():
    assert split_pair({"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."}, 0, "f") == (
        [{"role": "user", "content": "Sky?"}], "Blue.", "Green.")
    rec = {"prompt": [{"role": "user", "content": "Sky?"}],
           "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": "Green."}
    assert split_pair(rec, 0, "f") == ([{"role": "user", "content": "Sky?"}], "Blue.", "Green.")
    chat = [{"role": "user", "content": "Sky?"}]
    implicit = {"chosen": [*chat, {"role": "assistant", "content": "Blue."}],
                "rejected": [*chat, {"role": "assistant", "content": "Green."}]}
    assert split_pair(implicit, 0, "f") == (chat, "Blue.", "Green.")
    early = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
             "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match="record 3: `chosen` and `rejected` differ before their last assistant reply"):
        split_pair(early, 3, "f")
    with pytest.raises(DataError, match="record 1 has no `prompt`, and its `chosen` is neither"):
        split_pair({"chosen": "plain text", "rejected": "other"}, 1, "f")


def test_pair_tokens_use_the_chat_template_and_end_replies_with_eos(tokenizer, hh):
    enc = PairEncoder(tokenizer, PreferenceOptions(path="x", max_length=4096))
    turns, chosen, rejected = split_pair(hh[1], 1, "hh")
    prompt, c, r = enc.encode(turns, chosen, rejected, 1, "hh")
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(c) == chosen + tokenizer.eos_token and c[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(r) == rejected + tokenizer.eos_token
    assert enc.counts == {"prompts_truncated": 0, "replies_truncated": 0}


def test_truncation_cuts_the_prompt_start_first_then_the_replies(tokenizer):
    long_prompt = " ".join(["word"] * 300)
    rec = {"prompt": long_prompt, "chosen": "Yes " * 20, "rejected": "No."}
    enc = PairEncoder(tokenizer, PreferenceOptions(path="x", max_length=128))
    full = PairEncoder(tokenizer, PreferenceOptions(path="x", max_length=4096))
    p0, c0, r0 = full.encode(*split_pair(rec, 0, "f"), 0, "f")
    p, c, r = enc.encode(*split_pair(rec, 0, "f"), 0, "f")
    assert (c, r) == (c0, r0) and len(p) + len(c) == 128 and p == p0[-len(p):]  # the prompt's end is kept
    assert enc.counts == {"prompts_truncated": 1, "replies_truncated": 0}
    rec["chosen"] = "Yes " * 200  # the prompt stops at max_prompt_length (64), then the replies are cut
    p, c, r = enc.encode(*split_pair(rec, 0, "f"), 0, "f")
    assert len(p) == 64 and len(c) == 64 and r == r0
    assert enc.counts == {"prompts_truncated": 2, "replies_truncated": 1}


def test_bad_records_are_counted_in_one_error(tokenizer):
    records = [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "a", "chosen": "b"},
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        {"prompt": "a", "rejected": "c"},
        {"prompt": "a", "chosen": "same", "rejected": "same"},
    ]
    enc = PairEncoder(tokenizer, PreferenceOptions(path="x"))
    with pytest.raises(DataError) as e:
        encode_pairs(records, enc, "pairs.jsonl", list(range(5)))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("pairs.jsonl: ")
    assert "1 record lacks `rejected` (record 1)" in msg and "1 record lacks `chosen` (record 3)" in msg
    assert "2 records have identical chosen and rejected replies (record 2, 4)" in msg
    no_room = [{"prompt": " ".join(["word"] * 100), "chosen": "b", "rejected": "c"}] * 2
    enc = PairEncoder(tokenizer, PreferenceOptions(path="x", max_length=32, truncate_prompt=False))
    with pytest.raises(DataError, match="2 records have a prompt that leaves no room for a reply within "
                                        r"data.max_length=32 \(data.truncate_prompt is false\) \(record 7, 8\)"):
        encode_pairs(no_room, enc, "f", [7, 8])


# -- the losses on a tiny model --------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=tie, use_cache=False)
    return LlamaForCausalLM(cfg).float()


def random_pairs(n: int, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)

    def rnd(lo, hi):
        return torch.randint(1, 64, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [(rnd(2, 9), rnd(1, 8), rnd(1, 8)) for _ in range(n)]


def direct_logp(model, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """log pi(reply | prompt): the sequence alone, full logits, log-softmax, the reply tokens summed."""
    logits = model(input_ids=torch.tensor([prompt + reply])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(reply))


def direct_dpo_loss(model, ref, pairs, beta, loss_type, eps, nll_weight):
    """The DPO formulas written out pair by pair (Rafailov et al.; IPO as TRL normalises it)."""
    losses = []
    for p, c, r in pairs:
        with torch.no_grad():
            ref_c, ref_r = direct_logp(ref, p, c), direct_logp(ref, p, r)
        pol_c, pol_r = direct_logp(model, p, c), direct_logp(model, p, r)
        h = (pol_c - ref_c) - (pol_r - ref_r)
        if loss_type == "sigmoid":
            loss = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        elif loss_type == "hinge":
            loss = torch.relu(1 - beta * h)
        else:
            loss = ((pol_c - ref_c) / len(c) - (pol_r - ref_r) / len(r) - 1 / (2 * beta)) ** 2
        losses.append(loss - nll_weight * pol_c / len(c))
    return torch.stack(losses).mean()


def task_loss_and_grads(task, model, pairs, layout):
    batch = PreferenceCollator(0, layout)([PreferenceDataset(pairs)[i] for i in range(len(pairs))])
    model.zero_grad()
    out = task.forward(model, batch)
    loss = task.loss_sum(out, batch) / task.count_targets(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], out


def direct_loss_and_grads(fn, model):
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 1e-3 for g in grads_b)  # the comparison has teeth: real gradients
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["shared_prompt", "packed", "padded"])
@pytest.mark.parametrize("loss_type,eps,nll_weight", [("sigmoid", 0.0, 0.0), ("sigmoid", 0.1, 0.5),
                                                      ("ipo", 0.0, 0.0), ("hinge", 0.0, 0.0)])
def test_dpo_loss_and_gradients_equal_the_direct_formula(loss_type, eps, nll_weight, layout):
    ref = tiny_llama(0)
    model = copy.deepcopy(ref)
    with torch.no_grad():  # the policy has moved away from the reference
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = random_pairs(4)
    task = DPOTask(beta=0.5, loss_type=loss_type, label_smoothing=eps, nll_weight=nll_weight)
    task.bind(ref, None)  # full fine-tuning: a frozen copy of the initial model is the reference
    assert task.reference_source == "copy"
    loss, grads, _ = task_loss_and_grads(task, model, pairs, layout)
    assert task.fused  # the fused head + log-softmax path was used
    direct = direct_loss_and_grads(lambda: direct_dpo_loss(model, ref, pairs, 0.5, loss_type, eps, nll_weight), model)
    assert_same((loss, grads), direct)


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_reference_free_losses_equal_their_formulas(name):
    model = tiny_llama(0, tie=True)
    pairs = random_pairs(3)
    task = build_task(name, beta=0.7)

    def direct():
        losses = []
        for p, c, r in pairs:
            avg_c, avg_r = direct_logp(model, p, c) / len(c), direct_logp(model, p, r) / len(r)
            if name == "orpo":
                log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
                losses.append(-avg_c - 0.7 * F.logsigmoid(log_odds))
            else:
                losses.append(-F.logsigmoid(0.7 * (avg_c - avg_r) - 0.5 * 0.7))
        return torch.stack(losses).mean()

    loss, grads, _ = task_loss_and_grads(task, model, pairs, layout="shared_prompt")
    assert_same((loss, grads), direct_loss_and_grads(direct, model))


def test_linear_log_probs_matches_log_softmax_with_gradients():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.randn(37, generator=g)
    import tunelab.tasks.linear_ce as lce

    old, lce.CHUNK_ELEMENTS = lce.CHUNK_ELEMENTS, 50 * 8  # several chunks
    try:
        fused = linear_log_probs(hidden, weight, bias, targets)
        fused_grads = torch.autograd.grad((fused * upstream).sum(), (hidden, weight, bias))
    finally:
        lce.CHUNK_ELEMENTS = old
    plain = torch.log_softmax(F.linear(hidden, weight, bias), -1).gather(1, targets[:, None]).squeeze(1)
    plain_grads = torch.autograd.grad((plain * upstream).sum(), (hidden, weight, bias))
    torch.testing.assert_close(fused, plain)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- references ------------------------------------------------------------------------------------------------------
def lora_model(trained: bool = False):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    if trained:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    return model


def test_lora_reference_is_the_network_with_adapters_disabled():
    model = lora_model()
    task = DPOTask(beta=0.1)
    task.bind(model, None)
    assert task.reference_source == "adapters" and task.reference is None  # no second copy
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # the policy trains away from the base
    pairs = random_pairs(3)
    _, _, out = task_loss_and_grads(task, model, pairs, layout="shared_prompt")
    base = model.get_base_model()
    with model.disable_adapter(), torch.no_grad():
        expected = torch.stack([torch.stack([direct_logp(base, p, c), direct_logp(base, p, r)]) for p, c, r in pairs])
        policy_differs = direct_logp(model, *pairs[0][:2])
    torch.testing.assert_close(torch.stack([out.ref_chosen, out.ref_rejected], 1), expected, rtol=1e-5, atol=1e-5)
    assert (out.chosen[0] - policy_differs).abs() > 1e-4


def test_trained_adapters_leave_no_reference():
    with pytest.raises(ConfigError, match="task dpo has no reference model: the model's LoRA adapters already "
                                          "hold trained weights"):
        DPOTask().bind(lora_model(trained=True), None)


@pytest.mark.parametrize("precompute_ref", [False, True])
def test_a_model_on_the_meta_device_has_no_reference(precompute_ref):
    """FSDP with meta_init builds the model on meta and fills it only after sharding: nothing to copy or score."""
    with torch.device("meta"):
        model = tiny_llama(0)
    with pytest.raises(ConfigError, match="meta_init: false"):
        DPOTask(precompute_ref=precompute_ref).bind(model, None)


def test_precomputed_reference_equals_the_online_one(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from tunelab.data.base import DataBundle

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    model = tiny_llama(0)
    pairs = random_pairs(5)
    data = DataBundle(train=PreferenceDataset(pairs), eval=PreferenceDataset(pairs[:2]),
                      collate_fn=PreferenceCollator(0))
    task = DPOTask(precompute_ref=True)
    task.bind(model, data)
    callback = data.callbacks[0]
    assert isinstance(callback, PrecomputedReference) and task.reference is None
    trainer = SimpleNamespace(raw_model=model, device=torch.device("cpu"), global_step=0, autocast_dtype=None,
                              collate_fn=data.collate_fn, eval_cfg=SimpleNamespace(batch_size=2),
                              train_cfg=SimpleNamespace(batch_size=2))
    callback.on_fit_start(trainer)
    assert len(list((tmp_path / "preference").glob("*.safetensors"))) == 2
    online = DPOTask()
    online.bind(model, None)
    batch = data.collate_fn([data.train[i] for i in range(5)])
    assert "ref_logps" in batch
    with torch.no_grad():
        pre = task.reference_log_probs(model, batch)
        live = online.reference_log_probs(model, {k: v for k, v in batch.items() if k != "ref_logps"})
    torch.testing.assert_close(pre, live, rtol=1e-5, atol=1e-5)
    # a resumed run loads them from the cache with its checkpoint; gone from the cache, a resume is refused
    data.train.reference = None
    callback.load_state_dict(callback.state_dict())
    assert data.train.reference is not None
    for f in (tmp_path / "preference").iterdir():
        f.unlink()
    from tunelab.errors import CheckpointError

    with pytest.raises(CheckpointError, match="are gone from the cache"):
        callback.load_state_dict(callback.state_dict())


def test_metrics_count_ties_as_half_and_report_drift():
    from tunelab.tasks.preference import PairLogps

    task = DPOTask(beta=1.0)
    m = task.metrics()
    z = torch.zeros(4)
    out = PairLogps(torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([-2.0, -1.0, -3.0, -4.0]),
                    torch.full((4,), 2.0), torch.full((4,), 2.0), z - 1, z - 1)
    m.update(out, {}, torch.zeros(()), torch.tensor(4.0))
    r = m.compute()
    assert r["reward_accuracy"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert r["reward_margin"] == pytest.approx(0.0) and r["reward_chosen"] == pytest.approx(-1.5)
    assert r["logp_chosen"] == pytest.approx(-2.5) and r["drift"] == pytest.approx(-0.75)


def test_batch_layouts_list_each_replys_targets_once_and_hide_chosen_from_rejected():
    pairs = [([1, 2, 3], [4, 5], [6]), ([7], [8, 9, 10], [11, 12])]
    items = [PreferenceDataset(pairs)[i] for i in range(2)]
    for layout in ("shared_prompt", "packed", "padded"):
        batch = PreferenceCollator(0, layout)(items)
        flat = batch["input_ids"].flatten()
        # each target is predicted at the position of the token before it in its own sequence
        targets = sorted(zip(batch["target_segment"].tolist(), batch["target_tokens"].tolist(),
                             flat[batch["target_index"]].tolist()), key=lambda t: t[0])
        assert targets == [(0, 4, 3), (0, 5, 4), (1, 6, 3), (2, 8, 7), (2, 9, 8), (2, 10, 9), (3, 11, 7),
                           (3, 12, 11)], layout
        assert batch["pair_tokens"].tolist() == [9, 7]
    shared = PreferenceCollator(0, "shared_prompt")(items)
    assert shared["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 6]
    assert shared["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3]  # the rejected reply continues the prompt
    mask = shared["attention_mask"][0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True]  # it sees the prompt, not the chosen reply
    assert mask[4].tolist() == [True, True, True, True, True, False]
    assert shared["attention_mask"][1, 0, 4].tolist() == [True, False, False, False, True, False]
    short = PreferenceCollator(0, "shared_prompt")([*items, PreferenceDataset([([1], [2], [3])])[0]])
    pad = short["attention_mask"][2, 0]  # a 3-token row padded to 6: padding attends only to padding
    assert not pad[3:, :3].any() and pad[3:, 3:].tolist() == [[True, False, False], [True, True, False],
                                                              [True, True, True]]
    packed = PreferenceCollator(0, "packed")(items)
    assert packed["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    padded = PreferenceCollator(0, "padded")(items)
    assert padded["input_ids"].shape[0] == 4 and padded["attention_mask"].sum() == 5 + 4 + 4 + 3


@pytest.mark.slow
@torch.no_grad()
def test_the_three_layouts_give_the_same_log_probs_on_smollm2(tokenizer, hh, smollm_gguf):
    from tunelab.models.llm import hf_causal_lm

    model = hf_causal_lm(str(smollm_gguf)).eval()
    enc = PairEncoder(tokenizer, PreferenceOptions(path="x", max_length=128))
    pairs = encode_pairs(hh[:4], enc, "hh", list(range(4)))
    task = DPOTask()
    logps = {}
    for layout in ("shared_prompt", "packed", "padded"):
        ds = PreferenceDataset(pairs, layout)
        batch = PreferenceCollator(tokenizer.pad_token_id, layout)([ds[i] for i in range(4)])
        logps[layout] = task.sequence_log_probs(model, batch)
    alone = torch.stack([torch.stack([direct_logp(model, p, c), direct_logp(model, p, r)]) for p, c, r in pairs])
    for layout, (sums, counts) in logps.items():
        torch.testing.assert_close(sums.view(-1, 2), alone, rtol=1e-4, atol=2e-3, msg=layout)
        assert counts.tolist() == [float(len(y)) for _, c, r in pairs for y in (c, r)]


@pytest.mark.slow
def test_dpo_gradients_on_smollm2_with_lora_and_selective_checkpointing(tokenizer, hh, smollm_gguf):
    """The recipe's configuration end to end (GGUF model, LoRA, selective checkpointing, shared-prompt rows,
    the fused head, the reference as the adapters disabled) against the formula on each sequence alone."""
    from tunelab.models.llm import hf_causal_lm
    from tunelab.strategies.lora import LoRA

    model, _ = LoRA(r=4, alpha=8, dropout=0.0).setup(hf_causal_lm(str(smollm_gguf), gradient_checkpointing="selective"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    model.train()
    pairs = encode_pairs(hh[:2], PairEncoder(tokenizer, PreferenceOptions(path="x", max_length=48)), "hh", [0, 1])
    task = DPOTask(beta=0.1)
    ours = task_loss_and_grads(task, model, pairs, "shared_prompt")[:2]

    def direct():
        losses = []
        for p, c, r in pairs:
            with torch.no_grad(), model.disable_adapter():
                ref_c, ref_r = direct_logp(model, p, c), direct_logp(model, p, r)
            h = (direct_logp(model, p, c) - ref_c) - (direct_logp(model, p, r) - ref_r)
            losses.append(-F.logsigmoid(0.1 * h))
        return torch.stack(losses).mean()

    loss, grads = direct_loss_and_grads(direct, model)
    torch.testing.assert_close(ours[0], loss, rtol=1e-4, atol=1e-5)
    assert any(g.abs().max() > 1e-4 for g in grads)
    for a, b in zip(ours[1], grads):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-5)
