"""Allocation recovery in miniature, and HiLo's group structure under a budget."""

from __future__ import annotations

import pytest
import torch
import transformers

import moela
from moela.allocators import allocate
from moela.allocators.probe import swapped
from moela.allocators.prune import ablation_importance, taylor_importance
from moela.layer import LoraMoELinear
from moela.plan import AllocationPlan, ModulePlan, find_targets, layer_index

from tests.helpers import batch, tiny_model, toy_task

TOY_BUDGET = 128  # rank 4 in all on two 16 × 16 maps: rank 2 each (uniform) or rank 4 on one (oracle)

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops run faster on one thread


def distill_loss(plan: AllocationPlan, seed: int) -> float:
    """Held-out loss after training ``plan`` on the toy task (rank-6 change needed in layers.0.proj only)."""
    model, data = toy_task(seed)
    moela.inject(model, plan)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.02)
    torch.manual_seed(seed)
    train, held = data[:32], data[32:]
    for _ in range(8):
        for b in train:
            loss = model(**b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return sum(model(**b).loss.item() for b in held) / len(held)


def test_oracle_and_gradspec_beat_uniform_on_a_planted_task():
    seed = 3
    model, data = toy_task(seed)
    uniform = allocate("uniform", model, budget=TOY_BUDGET, experts=1, rank=2)
    oracle = AllocationPlan({"layers.0.proj": ModulePlan([4], top_k=1)})
    found = allocate("gradspec", model, budget=TOY_BUDGET, data=data[:32], batch_size=1)
    assert oracle.num_trainable(model) == uniform.num_trainable(model) == TOY_BUDGET
    assert set(found.modules) == {"layers.0.proj"}
    losses = {name: distill_loss(plan, seed) for name, plan in
              (("uniform", uniform), ("oracle", oracle), ("gradspec", found))}
    assert losses["oracle"] < 0.9 * losses["uniform"]
    assert losses["gradspec"] < 0.9 * losses["uniform"]


def test_gradspec_spectra_are_the_squared_singular_values_of_the_mean_gradient(monkeypatch):
    from moela.allocators import gradspec
    from moela.allocators.probe import batches

    means = {}

    def recording(matrix, exact_reference):
        means[len(means)] = matrix.clone()
        return real(matrix, exact_reference)

    real = gradspec.matrix_eigs
    monkeypatch.setattr(gradspec, "matrix_eigs", recording)
    model, data = toy_task(3)
    names = ["layers.0.proj", "layers.1.proj"]
    spectra = gradspec.gradient_spectra(model, names, batches(data[:32], 4))
    for i, name in enumerate(names):
        svd = torch.linalg.svdvals(means[i]).square()
        got = torch.tensor(spectra[name]["sigma2"], dtype=torch.float64)
        assert torch.all(got[:-1] >= got[1:])  # descending
        torch.testing.assert_close(got, svd, rtol=0, atol=16 * 1e-15 * float(svd[0]))


def test_prune_keeps_the_module_that_needs_an_update_and_leaves_the_model_as_it_was():
    seed = 3
    model, data = toy_task(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    plan = allocate("prune", model, budget=TOY_BUDGET, data=data[:32], keep=0.5, warmup=40, refit=5, lr=0.02)
    assert set(plan.modules) == {"layers.0.proj"}
    (importance,) = plan.meta["scores"]["rounds"]
    assert importance["layers.0.proj"] > 10 * abs(importance["layers.1.proj"])
    assert abs(plan.num_trainable(model) - TOY_BUDGET) <= 0.02 * TOY_BUDGET
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not model.training and [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("estimate", ["ablation", "taylor"])
def test_prune_under_bf16_autocast_trains_its_adapters_and_keeps_the_module_that_needs_an_update(estimate):
    """As users run it on GPUs, inside ``torch.autocast``: the search's in-place weight updates must reach the
    forward (autocast's cache of cast weights would keep every adapter at its zero-initialised B)."""
    model, data = toy_task(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = allocate("prune", model, budget=TOY_BUDGET, data=data[:32], keep=0.5, warmup=40, refit=5, lr=0.02,
                        estimate=estimate, probes=2)
    assert torch.is_autocast_cache_enabled()
    assert set(plan.modules) == {"layers.0.proj"}
    (importance,) = plan.meta["scores"]["rounds"]
    assert importance["layers.0.proj"] > 10 * abs(importance["layers.1.proj"])


def test_prune_restarts_keep_the_most_frequent_survivors():
    model, data = toy_task(3)
    options = dict(budget=TOY_BUDGET, data=data[:32], keep=0.5, warmup=40, refit=5, lr=0.02)
    plan = allocate("prune", model, restarts=3, **options)
    scores = plan.meta["scores"]
    assert set(plan.modules) == {"layers.0.proj"} and scores["votes"] == {"layers.0.proj": 3}
    assert [set(s["final"]) for s in scores["searches"]] == [{"layers.0.proj"}] * 3
    mean = sum(s["final"]["layers.0.proj"] for s in scores["searches"]) / 3
    assert scores["final"]["layers.0.proj"] == pytest.approx(mean)
    one = allocate("prune", model, **options)  # one search: the first of the three, kept as it is
    assert one.meta["scores"]["final"] == scores["searches"][0]["final"]
    assert one.meta["scores"]["rounds"] == scores["searches"][0]["rounds"] == scores["rounds"]
    assert "votes" not in one.meta["scores"]
    with pytest.raises(ValueError, match="restarts"):
        allocate("prune", model, data=data[:32], restarts=0)


def test_prune_gives_ranks_by_final_importance_when_asked():
    model, data = toy_task(3)
    totals = {}
    for ranks in ("equal", "importance"):
        plan = allocate("prune", model, budget=TOY_BUDGET, data=data[:32], keep=1.0, warmup=40, lr=0.02, ranks=ranks)
        final = plan.meta["scores"]["final"]
        assert set(final) == set(plan.modules) == {"layers.0.proj", "layers.1.proj"}  # keep=1: no round
        totals[ranks] = [sum(plan[n].ranks) for n in ("layers.0.proj", "layers.1.proj")]
    assert abs(totals["equal"][0] - totals["equal"][1]) <= 1
    assert totals["importance"] == [sum(totals["equal"]) - 1, 1]  # all but the floor to the module that needs it
    with pytest.raises(ValueError, match="ranks"):
        allocate("prune", model, data=data[:32], ranks="largest")


def test_prune_taylor_estimate_is_the_ablation_where_the_loss_is_quadratic():
    """The toy's loss is quadratic in each adapter's output scale, so the second-order expansion is exact: alone,
    Hutchinson's z² = 1 makes the estimate the ablation; together, it converges to it as the probes grow."""
    model, data = toy_task(3)
    names, val, cpu = ["layers.0.proj", "layers.1.proj"], data[32:36], torch.device("cpu")
    with swapped(model, names, lambda base: LoraMoELinear(base, [4], top_k=1), 0) as layers:
        for layer in layers.values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        exact = ablation_importance(model, layers, names, val, cpu)
        for name in names:
            alone = taylor_importance(model, layers, [name], val, cpu, 1, torch.Generator())
            assert alone[name] == pytest.approx(exact[name], rel=1e-4)
        both = taylor_importance(model, layers, names, val, cpu, 64, torch.Generator().manual_seed(0))
        assert both == pytest.approx(exact, rel=0.05)
        assert all(not layer.lora_B._forward_hooks for layer in layers.values())


def test_prune_taylor_estimate_approaches_the_ablation_through_a_transformer():
    """Through a tiny Llama (attention's second derivatives on the math kernel) the expansion's error shrinks with
    the adapters' size: third-order terms only."""
    model = tiny_model("llama")
    names = find_targets(model, "all-linear")[:14]  # the first two blocks
    val = []
    for seed in range(4):
        b = batch(seed=seed, size=4, length=12)
        val.append({**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)})
    errors = []
    for std in (0.01, 0.003):
        with swapped(model, names, lambda base: LoraMoELinear(base, [4], top_k=1), 0) as layers:
            torch.manual_seed(1)
            for layer in layers.values():
                torch.nn.init.normal_(layer.lora_B.weight, std=std)
            exact = ablation_importance(model, layers, names, val, torch.device("cpu"))
            estimate = {n: taylor_importance(model, layers, [n], val, torch.device("cpu"), 1, torch.Generator())[n]
                        for n in names}
        errors.append(max(abs(estimate[n] - exact[n]) for n in names) / max(abs(v) for v in exact.values()))
    assert errors[1] < 0.02 and errors[1] < errors[0] / 4


def test_prune_with_the_taylor_estimate_keeps_the_module_that_needs_an_update():
    model, data = toy_task(3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = allocate("prune", model, budget=TOY_BUDGET, data=data[:32], keep=0.5, warmup=40, refit=5, lr=0.02,
                    estimate="taylor", probes=2)
    assert set(plan.modules) == {"layers.0.proj"}
    assert plan.meta["options"]["estimate"] == "taylor"
    (importance,) = plan.meta["scores"]["rounds"]
    assert importance["layers.0.proj"] > 10 * abs(importance["layers.1.proj"])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="estimate"):
        allocate("prune", model, data=data[:32], estimate="gradient")
    with pytest.raises(ValueError, match="probes"):
        allocate("prune", model, data=data[:32], estimate="taylor", probes=0)


def test_hilo_keeps_depth_groups_equal_and_monotone_under_a_budget():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97))
    for budget in ("uniform:E=4,r=8", "uniform:E=2,r=4", "uniform:E=6,r=8"):
        plan = allocate("hilo", model, budget=budget)
        target = plan.meta["budget"]["target"]
        assert abs(plan.num_trainable(model) - target) <= 0.02 * target
        per_block = {}
        for name, spec in plan.items():
            assert len(set(spec.ranks)) == 1
            per_block.setdefault(layer_index(name), set()).add((spec.num_experts, spec.ranks[0]))
        assert all(len(v) == 1 for v in per_block.values())
        shapes = [per_block[b].pop() for b in range(8)]
        assert shapes[0::2] == shapes[1::2]  # 4 groups of 2 blocks
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(shapes, shapes[1:]))
        assert shapes[-1][0] > shapes[0][0] and shapes[-1][1] > shapes[0][1]
