"""LoRA-SMoE gradient-sensitivity allocation: the probe is exact, bounded and side-effect free; the rules."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from moela.allocators import allocate
from moela.allocators.probe import collate
from moela.allocators.sensitivity import probe, squared_grad_norm, vote
from moela.plan import find_targets, layer_index, module_type

from tests.helpers import TARGETS, examples, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops run faster on one thread


def reference_scores(model, names, data) -> dict[str, float]:
    """Σ over single examples of ‖∇W L‖² from autograd on the real weights."""
    model.requires_grad_(False)
    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    out = dict.fromkeys(names, 0.0)
    for ex in data:
        batch = collate([{k: v for k, v in ex.items() if k != "task"}])
        grads = torch.autograd.grad(model(**batch).loss, list(weights.values()))
        for n, g in zip(names, grads):
            out[n] += float(g.double().pow(2).sum())
    return out


@pytest.mark.parametrize("tokens,d_in,d_out", [(50, 4, 3), (3, 40, 30)])  # gradient path, Gram path
def test_squared_grad_norm_both_ways(tokens, d_in, d_out):
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(2, tokens, d_in, generator=g), torch.randn(2, tokens, d_out, generator=g)
    want = (grad.reshape(-1, d_out).double().T @ x.reshape(-1, d_in).double()).pow(2).sum().item()
    assert squared_grad_norm(x, grad) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_probe_equals_autograd_weight_gradients(kind):
    model = tiny_model(kind)
    names = find_targets(model, TARGETS[kind])
    data = examples(4, classify=kind == "bert")
    got = probe(model, names, [collate([ex]) for ex in data])[0]
    want = reference_scores(tiny_model(kind), names, data)
    for n in names:
        assert got[n] == pytest.approx(want[n], rel=1e-6, abs=1e-12), n


def test_probe_leaves_the_model_unchanged():
    model = tiny_model("llama")
    model.lm_head.weight.requires_grad_(True)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    allocate("sensitivity", model, data=examples(4))
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def test_modules_with_larger_gradients_get_more_experts():
    model = tiny_model("llama")
    with torch.no_grad():  # layer 2's MLP inputs ×20: its gate/up weight gradients grow ×20
        model.model.layers[2].post_attention_layernorm.weight.mul_(20)
    plan = allocate("sensitivity", model, data=examples(6), mode="proportional")
    s = plan.meta["scores"]["sensitivity"]
    for kind in ("mlp.gate_proj", "mlp.up_proj"):
        layer = {layer_index(n): n for n in s if module_type(n) == kind}
        assert max(layer, key=lambda l: s[layer[l]]) == 2
        counts = {l: plan[n].num_experts if n in plan.modules else 0 for l, n in layer.items()}
        assert counts[2] == max(counts.values()) and counts[2] > sorted(counts.values())[1]


def test_vote_rule_on_planted_scores():
    names = [f"model.layers.{l}.self_attn.{k}" for l in range(5) for k in ("q_proj", "v_proj")]
    task0 = {n: float(layer_index(n)) for n in names}             # prefers deep layers
    task1 = {n: float(-layer_index(n)) for n in names}            # prefers shallow layers
    counts = vote({0: task0, 1: task1}, names, p=40)              # top 40% of 5 depths = 2 per task
    assert [counts[f"model.layers.{l}.self_attn.q_proj"] for l in range(5)] == [1, 1, 0, 1, 1]
    assert vote({0: task0, 1: task0}, names, p=40)["model.layers.4.self_attn.v_proj"] == 2


def test_vote_mode_with_a_task_column_and_budget_steering_p():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].post_attention_layernorm.weight.mul_(20)
    data = examples(8, tasks=2)
    plan = allocate("sensitivity", model, data=data)
    assert plan.meta["options"]["mode"] == "vote" and set(plan.meta["scores"]["per_task"]) == {"0", "1"}
    assert plan["model.layers.2.mlp.gate_proj"].num_experts == 2  # both tasks vote for it
    assert all(1 <= s.num_experts <= 2 for s in plan.modules.values())
    small = allocate("sensitivity", model, data=data, budget=plan.num_trainable(model) // 2)
    assert small.meta["options"]["p"] < 60 and small.num_trainable(model) < plan.num_trainable(model)


def test_proportional_budget_determinism_and_loader_input():
    model = tiny_model("qwen2")
    data = examples(6)
    a = allocate("sensitivity", model, data=data, budget="uniform:E=2,r=8", seed=3)
    b = allocate("sensitivity", model, data=data, budget="uniform:E=2,r=8", seed=3)
    assert a.to_dict()["modules"] == b.to_dict()["modules"]
    target = a.meta["budget"]["target"]
    assert abs(a.num_trainable(model) - target) <= 0.02 * target
    assert set(a.meta["cost"]) == {"seconds", "steps", "examples"} and a.meta["cost"]["examples"] == 6
    loader = DataLoader(data, batch_size=1, collate_fn=collate)
    c = allocate("sensitivity", model, data=loader, budget="uniform:E=2,r=8")
    assert c.meta["scores"]["sensitivity"] == pytest.approx(a.meta["scores"]["sensitivity"], rel=1e-6)


def test_vote_budget_below_the_smallest_allocation_names_the_minimum():
    with pytest.raises(ValueError, match="below the minimum of .*smallest vote allocation"):
        allocate("sensitivity", tiny_model("llama"), data=examples(4, tasks=2), budget=100)


def test_probe_never_asks_for_a_weight_gradient():
    """Memory bound: no weight requires a gradient during the probe (the norms come from hooks)."""
    model = tiny_model("llama")
    seen = []
    handles = [m.register_forward_pre_hook(lambda m, a: seen.append(m.weight.requires_grad))
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    allocate("sensitivity", model, data=examples(2))
    for h in handles:
        h.remove()
    assert seen and not any(seen)
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are back
