"""Injection into real transformers architectures, the balance loss through a model, and adapter round trips."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import moela
from moela import AllocationPlan, ModulePlan
from moela.adapter import adapter_state_dict
from tests.helpers import ARCHITECTURES, TARGETS, batch, tiny_model


def heterogeneous_plan(model, targets) -> AllocationPlan:
    """Experts and ranks that differ across modules, with every routing variant somewhere."""
    names = moela.find_targets(model, targets)
    variants = [ModulePlan([2, 4, 6], top_k=2), ModulePlan([8], top_k=1), ModulePlan([3, 1], top_p=0.6, max_k=2),
                ModulePlan([4, 4], top_k=1, num_null=2)]
    return AllocationPlan({n: variants[i % len(variants)] for i, n in enumerate(names)})


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def randomise_adapters(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in moela.moela_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_zero_init_equals_base_then_round_trip(kind, tmp_path):
    inputs = batch()
    base_out = logits(tiny_model(kind), inputs)
    model = tiny_model(kind)
    plan = heterogeneous_plan(model, TARGETS[kind])
    moela.inject(model, plan, alpha=8.0)
    torch.testing.assert_close(logits(model, inputs), base_out, rtol=0, atol=0)

    randomise_adapters(model)
    adapted = logits(model, inputs)
    assert not torch.allclose(adapted, base_out)
    with moela.disable_adapters(model):
        torch.testing.assert_close(logits(model, inputs), base_out, rtol=0, atol=0)

    moela.save_adapter(model, tmp_path / "adapter")
    fresh = moela.load_adapter(tiny_model(kind), tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh, inputs), adapted, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_num_trainable_counts_requires_grad(kind):
    model = tiny_model(kind)
    plan = heterogeneous_plan(model, TARGETS[kind])
    head = sum(p.numel() for p in model.classifier.parameters()) if kind == "bert" else 0
    expected = plan.num_trainable(model) + head
    moela.inject(model, plan)
    trainable, _ = moela.count_parameters(model)
    assert trainable == expected  # the classifier of a sequence classifier trains with the adapter by default
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_A." in n or ".lora_B." in n or ".router." in n or n.startswith("classifier.") for n in names)
    assert model.moela_config.modules_to_save == (["classifier"] if kind == "bert" else [])


def test_num_trainable_formula_by_hand():
    model = tiny_model("llama")  # hidden 32, intermediate 48
    plan = AllocationPlan({"model.layers.0.mlp.up_proj": ModulePlan([2, 6], top_k=1),
                           "model.layers.1.self_attn.k_proj": ModulePlan([4]),
                           "model.layers.2.self_attn.q_proj": ModulePlan([1, 1], num_null=3)})
    up = 8 * (32 + 48) + 2 * 32
    k = 4 * (32 + 16)  # 2 kv heads of dim 8
    q = 2 * (32 + 32) + 5 * 32
    assert plan.num_trainable(model) == up + k + q


def test_adapter_files_use_documented_keys_and_shapes(tmp_path):
    model = tiny_model("llama")
    name = "model.layers.1.mlp.down_proj"  # 48 → 32
    moela.inject(model, AllocationPlan({name: ModulePlan([2, 5], top_k=1),
                                        "model.layers.1.mlp.up_proj": ModulePlan([3])}))
    moela.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        f"{name}.router.weight": (2, 48), f"{name}.experts.0.lora_A": (2, 48), f"{name}.experts.0.lora_B": (32, 2),
        f"{name}.experts.1.lora_A": (5, 48), f"{name}.experts.1.lora_B": (32, 5),
        "model.layers.1.mlp.up_proj.experts.0.lora_A": (3, 32), "model.layers.1.mlp.up_proj.experts.0.lora_B": (48, 3)}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["plan"]["modules"][name] == {"ranks": [2, 5], "top_k": 1}
    assert config["alpha"] == 16.0 and config["scaling"] == "lora" and config["moela_version"] == moela.__version__
    state = adapter_state_dict(model)
    layer = model.get_submodule(name)
    torch.testing.assert_close(torch.cat([state[f"{name}.experts.0.lora_A"], state[f"{name}.experts.1.lora_A"]]),
                               layer.lora_A.weight)


def test_load_into_mismatched_base_is_a_clear_error(tmp_path):
    model = tiny_model("llama")
    moela.inject(model, AllocationPlan.uniform(model, ["q_proj"], experts=2, rank=4))
    moela.save_adapter(model, tmp_path)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ValueError, match=r"does not fit this base model.*q_proj.*does not exist"):
        moela.load_adapter(gpt2, tmp_path)
    import transformers
    wider = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=48, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*d_in=32.*d_in=48"):
        moela.load_adapter(wider, tmp_path)
    assert not any(True for _ in moela.moela_layers(wider)), "a refused adapter must leave the base untouched"


def test_failed_save_keeps_previous_adapter(tmp_path, monkeypatch):
    model = tiny_model("llama")
    moela.inject(model, AllocationPlan.uniform(model, ["v_proj"], experts=2, rank=2))
    moela.save_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    randomise_adapters(model)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sys.modules["moela.adapter"], "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        moela.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "no temporary folder may be left behind"


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_balance_loss_through_model_ignores_padding(reduction):
    model = tiny_model("llama")
    moela.inject(model, AllocationPlan.uniform(model, ["q_proj", "up_proj"], experts=4, rank=2),
                 balance_reduction=reduction)
    inputs = batch()
    model(**inputs)
    auto = moela.balance_loss(model)
    layers = [layer for _, layer in moela.moela_layers(model)]
    reduce = torch.sum if reduction == "sum" else torch.mean
    expected = reduce(torch.stack([layer.balance_loss(inputs["attention_mask"]) for layer in layers]))
    torch.testing.assert_close(auto, expected)
    unmasked = reduce(torch.stack([layer.balance_loss() for layer in layers]))
    assert not torch.allclose(auto, unmasked)
    coefs = {layer.balance_coef for layer in layers}
    assert coefs == ({1e-3} if reduction == "sum" else {1e-3 / len(layers)})
    auto.backward()
    assert all(layer.router.weight.grad is not None for layer in layers)


def test_training_step_moves_only_adapters():
    model = tiny_model("qwen2").train()
    before = {n: p.clone() for n, p in model.named_parameters()}
    moela.inject(model, AllocationPlan.uniform(model, "all-linear", experts=3, rank=2))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch()
    for _ in range(2):
        out = model(**inputs, labels=inputs["input_ids"])
        (out.loss + 1e-3 * moela.balance_loss(model)).backward()
        optim.step()
        optim.zero_grad()
    for name, param in model.named_parameters():
        original = name.replace(".base_layer.", ".")
        if original in before:
            assert torch.equal(param, before[original]), f"frozen {name} changed"
        else:
            assert not torch.equal(param, torch.zeros_like(param)) or "lora_B" not in name


def test_inject_twice_and_bad_plans_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="'model.layers.9.self_attn.q_proj' does not exist"):
        moela.inject(model, AllocationPlan({"model.layers.9.self_attn.q_proj": ModulePlan([4])}))
    with pytest.raises(ValueError, match="'model.layers.0.input_layernorm' is a LlamaRMSNorm, not a linear layer"):
        moela.inject(model, AllocationPlan({"model.layers.0.input_layernorm": ModulePlan([4])}))
    moela.inject(model, AllocationPlan.uniform(model, ["q_proj"], experts=2, rank=2))
    with pytest.raises(ValueError, match="already has moela adapters"):
        moela.inject(model, AllocationPlan.uniform(model, ["k_proj"], experts=2, rank=2))
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)


def test_multiple_choice_padding_is_left_out_of_the_balance_loss():
    model = transformers.BertForMultipleChoice(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=97))
    moela.inject(model, AllocationPlan.uniform(model, ["query", "value"], experts=3, rank=2))
    ids = torch.randint(3, 97, (2, 3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, 1:, 3:] = 0  # choices 2 and 3 are padded after 3 tokens
    model(input_ids=ids, attention_mask=mask)
    layers = [layer for _, layer in moela.moela_layers(model)]
    expected = torch.stack([layer.balance_loss(mask.reshape(-1, 6)) for layer in layers]).sum()
    torch.testing.assert_close(moela.balance_loss(model), expected)
    assert all(torch.equal(layer.token_mask, mask) for layer in layers)  # what the layers' own gradient term uses
