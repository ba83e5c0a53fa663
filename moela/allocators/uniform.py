"""``uniform`` and ``lora``: every target module gets E experts of rank r (METHODS.md §4.1)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..plan import AllocationPlan
from . import register


@register("uniform")
def uniform(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None,
            experts: int = 4, rank: int = 8, top_k: int = 2, **routing: Any) -> AllocationPlan:
    if budget is not None:
        raise NotImplementedError("budget matching for uniform is not implemented yet")
    return AllocationPlan.uniform(model, targets, experts=experts, rank=rank, top_k=top_k, **routing)


@register("lora")
def lora(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None,
         rank: int = 8, **_: Any) -> AllocationPlan:
    return uniform(model, targets=targets, budget=budget, experts=1, rank=rank, top_k=1)
