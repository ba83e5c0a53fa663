"""GuiLoMo: straight-through selection, the DARTS hypergradient, and the search end to end."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from moela.allocators import allocate, guilomo
from moela.allocators.budget import plan_cost, routed, target_dims
from moela.allocators.guilomo import RANK_OFF, GSVLinear, PrefixSelect, RowAdam, hypergradient
from moela.plan import find_targets

from tests.helpers import examples, tiny_model, toy_task


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops run faster on one thread


def test_prefix_select_forward_and_straight_through_backward():
    sig = torch.tensor([0.2, 0.9, 0.5, 0.1], requires_grad=True)
    mask = PrefixSelect.apply(sig, 0, 1e-4)
    assert mask.tolist() == pytest.approx([1, 1, 1e-4, 1e-4])
    mask.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert sig.grad.tolist() == pytest.approx([0, 1 * 0.2 + 2 * 0.9, 0, 0])
    sig.grad = None
    PrefixSelect.apply(sig, 2, 0.0).backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # floor n_min − 1 = 2
    assert sig.grad.tolist() == pytest.approx([0, 0, 0.2 + 1.8 + 1.5, 0])


def selected_layer(seed: int = 0) -> tuple[GSVLinear, torch.Tensor]:
    torch.manual_seed(seed)
    layer = GSVLinear(nn.Linear(8, 8), experts=6, rank=4, min_experts=1)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.5)
        layer.expert_gsv.copy_(torch.linspace(-1, 1, 6))  # argmax last: all experts eligible
        layer.rank_gsv.copy_(torch.linspace(-1, 1, 4).expand(6, 4))
    return layer, torch.randn(64, 8)


@pytest.mark.parametrize("helps", [False, True])
def test_straight_through_gradient_moves_the_selection_toward_lower_loss(helps):
    layer, x = selected_layer()
    with torch.no_grad():
        base = layer.base_layer(x)
        target = base + 2 * (layer(x) - base) if helps else base  # the active experts help, or only hurt
    optimizer = torch.optim.SGD([layer.expert_gsv, layer.rank_gsv], lr=0.5)
    start = ((layer(x) - target) ** 2).mean().item()
    for _ in range(60):
        optimizer.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        optimizer.step()
    experts, ranks = layer.selection()
    loss = ((layer(x) - target) ** 2).mean().item()
    if helps:  # the selected entries are reinforced and the full prefix stays
        assert (experts, ranks) == (6, [4] * 6)
        assert layer.expert_gsv[-1] > 1 and (layer.rank_gsv[:, -1] > 1).all()
    else:  # the selected counts shrink, and the loss with them
        assert experts < 6 and sum(ranks) < 4 * experts
        assert loss < start


def test_second_order_hypergradient_matches_finite_differences():
    """d/dα L_val(w − ξ ∇_w L_train(w, α), α) on a smooth problem, by central differences in α."""
    g = torch.Generator().manual_seed(0)
    a_t, a_v = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    xi = 0.1

    def train_loss(w=w, alpha=alpha):
        return ((a_t @ w - b * alpha[0]) ** 2).sum() + alpha[1] * (w ** 2).sum() + (alpha ** 2).sum()

    def val_loss(w=w, alpha=alpha):
        return ((a_v @ w - b) ** 2).sum() * torch.exp(alpha[0] * 0.3) + alpha[1] ** 2

    def unrolled(al):
        wt = w.detach().requires_grad_()
        grad = torch.autograd.grad(train_loss(wt, al), wt)[0]
        return val_loss(w.detach() - xi * grad, al).item()

    w_before = w.detach().clone()
    got = hypergradient([w], [alpha], train_loss, val_loss, xi, second_order=True)[0]
    h = 1e-6
    expected = [(unrolled(alpha.detach() + h * e) - unrolled(alpha.detach() - h * e)) / (2 * h)
                for e in torch.eye(2, dtype=torch.float64)]
    assert got.tolist() == pytest.approx(expected, rel=1e-4)
    assert torch.equal(w.detach(), w_before) and w.grad is None and alpha.grad is None
    first = hypergradient([w], [alpha], train_loss, val_loss, xi, second_order=False)[0]
    assert first.tolist() == pytest.approx(torch.autograd.grad(val_loss(), alpha)[0].tolist())


@pytest.mark.parametrize("second_order", [False, True])
def test_search_runs_is_deterministic_and_leaves_the_model_alone(second_order):
    model = tiny_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = examples(24)
    kwargs = dict(data=data, batch_size=4, max_steps=6, second_order=second_order, seed=1)
    plan = allocate("guilomo", model, **kwargs)
    assert plan.to_dict()["modules"] == allocate("guilomo", model, **kwargs).to_dict()["modules"]
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert plan.meta["cost"]["steps"] == 6 and plan.meta["options"]["second_order"] is second_order
    for name, spec in plan.items():
        assert 2 <= spec.num_experts <= 8 and all(1 <= r <= 8 for r in spec.ranks)
        assert len(plan.meta["scores"]["expert_gsv"][name]) == 8


def test_search_budget_is_met_within_two_percent():
    model = tiny_model("llama")
    plan = allocate("guilomo", model, data=examples(24), batch_size=4, max_steps=4, budget="uniform:E=4,r=8")
    target = plan.meta["budget"]["target"]
    assert abs(plan.num_trainable(model) - target) <= 0.02 * target


PUBLISHED = dict(estimator="selected", init_scale=1.0, gsv_lr=3e-3, b_std=0.0, rank_leak=0.0, settle=None)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("mechanics", ["default", "published-selection"])
def test_search_gives_capacity_to_the_module_that_needs_it(seed, mechanics):
    """The module whose adapter only fits noise hurts the validation loss, so it ends with less rank than the
    one that needs capacity; with the selected-entry estimator its selections are pushed down until it sits
    at n_min experts while the other keeps (and reinforces) its own."""
    model, data = toy_task(seed)
    options = PUBLISHED if mechanics != "default" else {}
    plan = allocate("guilomo", model, data=data, epochs=20, max_steps=400, patience=100, lr=1e-2, seed=seed,
                    **options)
    needs, idle = plan["layers.0.proj"], plan["layers.1.proj"]
    assert sum(needs.ranks) > sum(idle.ranks)
    if mechanics != "default":
        assert idle.num_experts == 2 and needs.num_experts > idle.num_experts


def test_unmoved_share_is_recorded_and_warned_about():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="equal their random start"):
        plan = allocate("guilomo", model, data=examples(24), batch_size=4, max_steps=2, gsv_lr=0.0)
    assert plan.meta["unmoved"] == {"experts": 1.0, "ranks": 1.0}
    moved = allocate("guilomo", model, data=examples(24), batch_size=4, max_steps=20, gsv_lr=0.05, epochs=5)
    assert 0 <= moved.meta["unmoved"]["experts"] <= 1 and moved.meta["unmoved"]["ranks"] < 1


def test_search_stops_early_once_the_selections_stop_moving():
    model = tiny_model("llama")
    plan = allocate("guilomo", model, data=examples(24), batch_size=4, epochs=50, max_steps=50, gsv_lr=0.0,
                    check_every=2, patience=2)
    assert plan.meta["cost"]["steps"] == 6  # checks at steps 2 (first), 4 and 6 (unchanged twice)


def test_row_adam_moves_entries_in_proportion_to_their_gradients():
    """Per-entry Adam steps every entry of constant sign by about lr, so a GSV's order never changes; RowAdam
    shares the scale over a row, so the entries move in proportion to their gradients."""
    grad = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -1.0, -4.0]])
    moved = {}
    for name, make in (("row", lambda p: RowAdam([p], lr=0.01)), ("adam", lambda p: torch.optim.Adam([p], lr=0.01))):
        p = torch.zeros(2, 3, requires_grad=True)
        optimizer = make(p)
        for _ in range(5):
            p.grad = grad.clone()
            optimizer.step()
        moved[name] = p.detach()
    assert (moved["row"] / moved["row"][:, :1]).flatten().tolist() == pytest.approx([1, 2, 3, 1, 1, 4], rel=1e-5)
    assert moved["adam"].abs().flatten().tolist() == pytest.approx([0.05] * 6, rel=1e-3)


def test_soft_cost_is_the_cost_of_the_selection():
    layer = GSVLinear(nn.Linear(8, 6), experts=4, rank=4, min_experts=1)
    with torch.no_grad():
        layer.expert_gsv.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))  # 3 experts
        layer.rank_gsv.copy_(torch.eye(4)[[1, 3, 0, 2]])  # ranks 2, 4, 1 (and 3 for the masked expert)
    expected = 3 * 8 + (8 + 6) * (2 + 4 + 1)  # a router row per expert and the rank columns
    off = (8 + 6) * RANK_OFF * (2 + 0 + 3)  # the rows beyond each prefix, scaled by RANK_OFF
    assert float(layer.soft_cost()) == pytest.approx(expected + off, rel=1e-6)
    assert layer.selection() == (3, [2, 4, 1])


def test_min_experts_zero_reads_out_no_expert_and_keeps_the_switch_on_signal():
    torch.manual_seed(0)
    layer = GSVLinear(nn.Linear(8, 8), experts=3, rank=2, min_experts=0, dense=True)
    assert layer.expert_gsv.shape == (4,) and layer.readout()[0] >= 1  # entry 0 ("none") starts lowest
    with torch.no_grad():
        layer.expert_gsv.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        layer.lora_B.weight.normal_(0, 0.5)
    assert layer.selection() == (0, [])
    expert, _ = layer.masks()
    assert expert.tolist() == pytest.approx([RANK_OFF, 0, 0])
    x = torch.randn(16, 8)
    base = layer.base_layer(x).detach()
    with torch.no_grad():
        layer.expert_gsv.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))  # expert 0 on
        on = layer(x) - base
        layer.expert_gsv.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # off again
    out = layer(x)
    assert torch.allclose(out - base, RANK_OFF * on, rtol=0, atol=1e-6)  # expert 0 alone, at 1e-4 (float32 sums)
    (out - base - x).pow(2).sum().backward()
    assert layer.expert_gsv.grad[1] != 0  # would switching expert 0 on help? The loss still says
    for refused in (dict(dense=False), dict(dense=True, expert_mask="logits")):  # "off" would be a trap there
        with pytest.raises(ValueError, match="min_experts=0 needs"):
            GSVLinear(nn.Linear(8, 8), experts=3, rank=2, min_experts=0, **refused)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_budget_search_spends_the_budget_where_it_is_needed(seed):
    """Under a budget of 8 rank units over two modules, the search held to the budget keeps only the module
    that needs a rank-6 change, with all 8 units; the unconstrained search scaled to the budget leaves that
    module less (5, 5 and 7 units on these seeds) and gives the rest to the idle one."""
    model, data = toy_task(seed)
    common = dict(data=data, epochs=20, max_steps=400, patience=100, lr=1e-2, seed=seed, budget="uniform:E=1,r=4")
    plan = allocate("guilomo", model, budget_search=True, min_experts=0, **common)
    assert list(plan.modules) == ["layers.0.proj"] and sum(plan["layers.0.proj"].ranks) >= 6
    assert plan.meta["budget_search"]["readout_cost"] <= 1.0 and plan.meta["options"]["budget_search"] is True
    unconstrained = allocate("guilomo", model, min_experts=1, **common)
    assert sum(unconstrained["layers.0.proj"].ranks) < sum(plan["layers.0.proj"].ranks)
    assert "budget_search" not in unconstrained.meta


def test_budget_search_runs_under_bf16_autocast_with_a_teacher():
    """As users run it on GPUs: under ``torch.autocast`` (bf16) the priced search with the teacher's KL keeps λ
    and the GSVs finite, and the plan meets the budget."""
    import copy

    import moela

    model = tiny_model("llama")
    teacher = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), moela.teacher_loss(model, teacher):
        plan = allocate("guilomo", model, data=examples(24), batch_size=4, max_steps=6, budget="uniform:E=1,r=2",
                        budget_search=True, min_experts=0)
    target = plan.meta["budget"]["target"]
    assert abs(plan.num_trainable(model) - target) <= 0.02 * target
    dual = plan.meta["budget_search"]
    assert all(torch.isfinite(torch.tensor(v)) for v in dual.values()) and dual["lambda"] > 0
    assert all(torch.isfinite(torch.tensor(g)).all() for g in plan.meta["scores"]["expert_gsv"].values())


def test_a_budget_no_read_out_can_fit_is_refused_before_the_search(monkeypatch):
    monkeypatch.setattr(guilomo, "search", lambda *a, **k: pytest.fail("the search ran"))
    with pytest.raises(ValueError, match=r"guilomo: budget 1,000 is below the minimum of .* \(2 rank-1 experts on "
                                         r"each of the \d+ target modules\); raise the budget or lower min_experts"):
        allocate("guilomo", tiny_model("llama"), data=examples(24), budget=1000)


def test_a_read_out_over_the_budget_names_budget_search():
    model = tiny_model("llama")
    names = find_targets(model, "all-linear")
    smallest = plan_cost({n: routed([1, 1], 2) for n in names}, target_dims(model, names))
    with pytest.raises(ValueError, match="experts of rank 1 read out, at least 2 per module; budget_search=True"):
        allocate("guilomo", model, data=examples(24), batch_size=4, max_steps=4, budget=smallest)
