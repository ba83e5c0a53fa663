"""Sibling routing (moela.siblings): q, k, v and gate, up computed in one pass in inference, equal to the module by
module path."""

import pytest
import torch
from torch import nn
from transformers import GenerationConfig

import moela
from moela.plan import AllocationPlan, ModulePlan, find_targets
from moela.siblings import SiblingGroup

from tests.helpers import tiny_model

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def plan(model, kind: str) -> AllocationPlan:
    if kind == "uniform":
        return AllocationPlan.uniform(model, PROJECTIONS, experts=4, rank=4, top_k=2)
    if kind == "LoRA":
        return AllocationPlan.uniform(model, PROJECTIONS, experts=1, rank=4, top_k=1)
    if kind == "top-p, null experts":
        return AllocationPlan({path: ModulePlan([2, 2, 2], top_p=0.5, max_k=2, num_null=1)
                               for path in find_targets(model, PROJECTIONS)}, {})
    # Siblings with different experts and ranks, some plain LoRA: routed member by member after one GEMM.
    return AllocationPlan({path: ModulePlan([2, 4][:1 + i % 2] + [3] * (i % 3), top_k=min(2, 1 + i % 2 + i % 3))
                           for i, path in enumerate(find_targets(model, PROJECTIONS))}, {})


def adapted(kind: str, **options) -> nn.Module:
    model = tiny_model("llama")
    moela.inject(model, plan(model, kind), **options)
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.3)
    return model.eval()


def counting(monkeypatch) -> list:
    """Records every pass that computes a whole group."""
    calls, outputs = [], SiblingGroup._outputs
    monkeypatch.setattr(SiblingGroup, "_outputs", lambda self, x: calls.append(self) or outputs(self, x))
    return calls


def stats(model) -> list:
    return [None if layer.last_stats is None else (layer.last_stats.logits, layer.last_stats.selected)
            for _, layer in moela.moela_layers(model)]


def test_siblings_are_grouped_by_name():
    llama = tiny_model("llama")
    moela.inject(llama, plan(llama, "uniform"))
    groups = {layer.siblings for _, layer in moela.moela_layers(llama) if layer.siblings is not None}
    names = {tuple(path.rsplit(".", 1)[1] for path, layer in moela.moela_layers(llama) if layer.siblings is g)
             for g in groups}
    assert names == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}
    assert len(groups) == 2 * llama.config.num_hidden_layers
    assert all(layer.siblings is None for path, layer in moela.moela_layers(llama)
               if path.endswith(("o_proj", "down_proj")))
    bert = tiny_model("bert")
    moela.inject(bert, AllocationPlan.uniform(bert, ["query", "key", "value"], experts=2, rank=2, top_k=1))
    assert all(len(layer.siblings.layers) == 3 for _, layer in moela.moela_layers(bert))
    gpt2 = tiny_model("gpt2")  # one fused c_attn: no siblings
    moela.inject(gpt2, AllocationPlan.uniform(gpt2, ["c_attn", "c_fc"], experts=2, rank=2, top_k=1))
    assert all(layer.siblings is None for _, layer in moela.moela_layers(gpt2))


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("kind", ["uniform", "heterogeneous", "LoRA", "top-p, null experts"])
def test_greedy_generation_equals_module_by_module(kind, batch_size, monkeypatch):
    """Tokens equal, logits and router logits equal up to the stacked GEMM's rounding, routing choices equal."""
    model = adapted(kind)
    calls = counting(monkeypatch)
    prompt = torch.randint(3, 97, (batch_size, 5), generator=torch.Generator().manual_seed(batch_size))
    config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
    grouped = model.generate(prompt, generation_config=config)
    grouped_stats = stats(model)
    assert len(calls) == 2 * model.config.num_hidden_layers * config.max_new_tokens
    moela.set_sibling_routing(model, False)
    alone = model.generate(prompt, generation_config=config)
    assert len(calls) == 2 * model.config.num_hidden_layers * config.max_new_tokens
    assert torch.equal(grouped.sequences, alone.sequences)
    for step, (a, b) in enumerate(zip(grouped.logits, alone.logits)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    for a, b in zip(grouped_stats, stats(model)):
        assert (a is None) == (b is None)
        assert (a is None) == (kind == "LoRA") or kind == "heterogeneous"
        if a is not None:
            torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(a[1], b[1])


def test_low_precision_adapters_with_float32_routers(monkeypatch):
    """bf16 adapters and float32 routers: two stacked GEMMs (``A`` in bf16, routers in float32)."""
    model = adapted("uniform").to(torch.bfloat16)
    for _, layer in moela.moela_layers(model):
        layer.router.float()
    calls = counting(monkeypatch)
    x = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        grouped = model(x).logits
        moela.set_sibling_routing(model, False)
        alone = model(x).logits
    assert calls and torch.equal(grouped.argmax(-1), alone.argmax(-1))
    torch.testing.assert_close(grouped, alone, rtol=2e-2, atol=2e-2)


def test_a_stored_output_is_used_only_for_the_same_unchanged_input():
    model = adapted("uniform")
    attention = model.model.layers[0].self_attn
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    x, y, z = torch.randn(3, 2, 3, model.config.hidden_size)
    with torch.no_grad():
        q(x)
        x.mul_(2)  # changed in place after q's call: k recomputes the group's outputs
        torch.testing.assert_close(k(x), alone(k, x), rtol=1e-5, atol=1e-6)
        v(x), q(x)
        q(y)
        k.lora_A.weight.mul_(0.5)  # k's weight changed after q's call: k recomputes, with new stacked weights
        torch.testing.assert_close(k(y), alone(k, y), rtol=1e-5, atol=1e-6)
        v(y), q(y)
        assert q.siblings.enabled
        q(z)
        torch.testing.assert_close(k(z + 1), alone(k, z + 1), rtol=1e-5, atol=1e-6)
    assert not q.siblings.enabled  # k was called with another input while q's group waited: they do not share it


def alone(layer, x):
    """The layer's output computed module by module."""
    group, layer.siblings = layer.siblings, None
    try:
        return layer(x)
    finally:
        layer.siblings = group


def test_training_and_disabled_adapters_do_not_use_the_group(monkeypatch):
    model = adapted("uniform")
    calls = counting(monkeypatch)
    x = torch.randint(3, 97, (2, 7))
    model.train()
    model(x).logits.sum().backward()
    model.eval()
    with torch.no_grad(), moela.disable_adapters(model):
        model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(x)
    assert calls == []
