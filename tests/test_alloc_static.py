"""Budget matching and the static allocators: uniform, lora, mola, hilo."""

from __future__ import annotations

import pytest
import torch
import transformers

from moela.allocators import allocate, available
from moela.allocators.budget import apportion, parse_budget
from moela.plan import AllocationPlan, layer_index, module_type

from tests.helpers import TINY, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops run faster on one thread


def tiny_llama(layers: int, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**{**TINY, "num_hidden_layers": layers})).eval()


def experts_by_layer(plan: AllocationPlan) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for name, spec in plan.items():
        out.setdefault(layer_index(name), set()).add(spec.num_experts)
    return out


def test_registry_lists_the_methods():
    assert {"uniform", "lora", "mola", "hilo"} <= set(available())
    with pytest.raises(ValueError, match="unknown allocation method 'nope'"):
        allocate("nope", tiny_model("llama"))


def test_apportion_is_proportional_within_bounds():
    assert apportion([1, 1, 2], 8) == [2, 2, 4]
    assert apportion([1, 2, 3, 4], 10, lo=1) == [1, 2, 3, 4]
    assert apportion([1, 1, 100], 9, lo=1, hi=4) == [2, 3, 4] or apportion([1, 1, 100], 9, lo=1, hi=4) == [3, 2, 4]
    assert sum(apportion([0.3, 0.1, 0.6], 7, lo=0, hi=8)) == 7
    with pytest.raises(ValueError):
        apportion([1, 1], 1, lo=1)


def test_budget_string_is_the_uniform_plans_cost():
    model = tiny_model("llama")
    expected = AllocationPlan.uniform(model, "all-linear", experts=4, rank=8).num_trainable(model)
    assert parse_budget("uniform:E=4,r=8", model, "all-linear") == expected
    assert parse_budget(1234, model, "all-linear") == 1234
    for bad in ("uniform:E=x", "lots", -5):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad, model, "all-linear")


@pytest.mark.parametrize("layers", [4, 8])
def test_mola_gives_the_published_patterns(layers):
    model = tiny_llama(layers)
    for pattern, digits in [("2468", [2, 4, 6, 8]), ("8642", [8, 6, 4, 2]), ("8228", [8, 2, 2, 8]),
                            ("5555", [5, 5, 5, 5])]:
        plan = allocate("mola", model, pattern=pattern)
        per = layers // 4
        assert experts_by_layer(plan) == {l: {digits[l // per]} for l in range(layers)}
        assert all(spec.ranks == [8] * spec.num_experts and spec.top_k == 2 for spec in plan.modules.values())
        assert plan.meta["method"] == "mola" and plan.meta["options"]["pattern"] == digits


def test_mola_accepts_lists_of_any_length():
    plan = allocate("mola", tiny_llama(4), pattern=[3, 1])
    assert experts_by_layer(plan) == {0: {3}, 1: {3}, 2: {1}, 3: {1}}
    assert {s.top_k for n, s in plan.items() if layer_index(n) >= 2} == {1}
    with pytest.raises(ValueError, match="mola pattern"):
        allocate("mola", tiny_llama(4), pattern="2x")


def test_hilo_sets_experts_and_ranks_per_group():
    plan = allocate("hilo", tiny_llama(8))
    for name, spec in plan.items():
        group = layer_index(name) // 2
        assert spec.ranks == [[2, 4, 6, 8][group]] * [2, 4, 6, 8][group]
    dynamic = allocate("hilo", tiny_llama(4), experts="4444", ranks="2468", top_p=0.5, max_k=3)
    spec = dynamic["model.layers.3.mlp.down_proj"]
    assert (spec.ranks, spec.top_p, spec.max_k) == ([8] * 4, 0.5, 3)


@pytest.mark.parametrize("method,options", [("uniform", {}), ("mola", {"pattern": "2468"}),
                                            ("mola", {"pattern": "8228"}), ("hilo", {}), ("lora", {"rank": 4})])
@pytest.mark.parametrize("budget", ["uniform:E=4,r=8", 90_000])
def test_budget_is_met_within_two_percent_keeping_the_shape(method, options, budget):
    model = tiny_llama(8)
    plan = allocate(method, model, budget=budget, **options)
    target = parse_budget(budget, model, "all-linear")
    achieved = plan.num_trainable(model)
    assert plan.meta["budget"] == {"target": target, "achieved": achieved}
    if method in ("uniform", "lora") and target == 90_000:
        # identical modules: the closest (E, r) is the closest achievable, which may miss 2%
        best = min(abs(allocate(method, model, experts=e, rank=r).num_trainable(model) - target)
                   for e in range(1, 9) for r in range(1, 33)) if method == "uniform" else None
        assert best is None or abs(achieved - target) <= max(best, 0.02 * target)
    elif method == "mola" and target == 90_000:
        # one expert count per depth group at a fixed rank: the closest rescaled pattern, which may miss 2%
        digits = [int(d) for d in options["pattern"]]
        best = min(abs(allocate(method, model, pattern=[max(1, round(c * d)) for d in digits]).num_trainable(model)
                       - target) for c in [i / 100 for i in range(10, 300)])
        assert abs(achieved - target) <= max(best, 0.02 * target) and abs(achieved - target) <= 0.05 * target
    else:
        assert abs(achieved - target) <= 0.02 * target
    if method == "mola":  # every module of a depth group has the group's number of experts
        groups = {}
        for name, spec in plan.items():
            groups.setdefault(layer_index(name) // 2, set()).add(spec.num_experts)
        assert all(len(counts) == 1 for counts in groups.values())
        assert plan.meta["scores"]["experts_per_layer"] == [min(groups[l // 2]) for l in range(8)]
    if method in ("mola", "hilo"):
        raw = allocate(method, model, **options)
        mean = {}
        for name, spec in plan.items():
            mean.setdefault(raw[name].num_experts * raw[name].ranks[0], []).append(sum(spec.ranks))
        sizes = [sum(v) / len(v) for _, v in sorted(mean.items())]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # bigger raw modules stay bigger


def test_budget_below_one_expert_per_module_names_the_minimum():
    with pytest.raises(ValueError, match="below the minimum of .*one expert of rank 8 on each of the 28"):
        allocate("mola", tiny_llama(4), budget=1000)


def test_uniform_budget_matches_its_own_plan_exactly():
    model = tiny_model("gpt2")
    plan = allocate("uniform", model, targets=["c_attn", "c_fc"], budget="uniform:E=4,r=8")
    assert {tuple(s.ranks) for s in plan.modules.values()} == {(8, 8, 8, 8)}
    assert module_type(next(iter(plan))) == "attn.c_attn"


def test_alphalora_under_a_budget_gives_every_target_of_a_block_its_count():
    model = tiny_llama(4)
    for budget in (40_000, 50_000, 60_000):  # a module-wise spread gave block 0 e.g. [4, 3, 3, 3, 3, 3, 3] at 40,000
        plan = allocate("alphalora", model, budget=budget, mode="moela")
        blocks = {}
        for name, spec in plan.items():
            blocks.setdefault(layer_index(name), set()).add(spec.num_experts)
        assert all(len(counts) == 1 for counts in blocks.values()), blocks
        assert abs(plan.num_trainable(model) - budget) <= 0.05 * budget
