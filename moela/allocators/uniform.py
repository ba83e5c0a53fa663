"""``uniform`` and ``lora``: every target module gets E experts of rank r (METHODS.md §4.1)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..plan import AllocationPlan, find_targets
from .registry import register
from .budget import TOLERANCE, finish, parse_budget, plan_cost, routed, target_dims, warn_if_missed


@register("uniform")
def uniform_plan(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None, seed: int = 0,
                 experts: int = 4, rank: int = 8, top_k: int = 2, **routing: Any) -> AllocationPlan:
    """E experts of rank r on every target. With a budget, the identical-modules plan (E', r') closest to it,
    preferring, among those within ±2%, the one nearest the requested (E, r)."""
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget, model, targets)

    def build(e: int, r: int) -> dict:
        if routing.get("num_null"):
            return AllocationPlan.uniform(model, names, experts=e, rank=r, top_k=top_k, **routing).modules
        return {name: routed([r] * e, top_k, **routing) for name in names}

    if target is not None:
        grid = [(e, r) for e in range(1, max(16, 2 * experts) + 1) for r in range(1, max(64, 4 * rank) + 1)]
        cost = {er: plan_cost(build(*er), dims) for er in grid}
        inside = [er for er in grid if abs(cost[er] - target) <= TOLERANCE * target]
        if inside:
            experts, rank = min(inside, key=lambda er: (abs(math.log(er[0] / experts)), abs(math.log(er[1] / rank)),
                                                        abs(cost[er] - target)))
        else:
            experts, rank = min(grid, key=lambda er: (abs(cost[er] - target), er))
            warn_if_missed(target, cost[experts, rank])
    options = {"experts": experts, "rank": rank, "top_k": top_k, **routing}
    return finish(build(experts, rank), dims, "uniform" if experts > 1 else "lora", options, target)


@register("lora")
def lora(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None, seed: int = 0,
         rank: int = 8) -> AllocationPlan:
    """Plain LoRA of rank r on every target (with a budget: the rank closest to it)."""
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget, model, targets)
    if target is not None:
        per_rank = plan_cost({n: routed([1], 1) for n in names}, dims)
        rank = max(1, round(target / per_rank))
        warn_if_missed(target, rank * per_rank)
    return finish({n: routed([rank], 1) for n in names}, dims, "lora", {"rank": rank}, target)
