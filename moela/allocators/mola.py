"""``mola``: expert count per depth group from a pattern such as ``2468``, uniform rank, top-2 (METHODS.md §4.2)."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..plan import AllocationPlan, find_targets, layer_index
from .registry import register
from .budget import apportion, depth_group, finish, fit, num_layers, parse_budget, parse_pattern, routed, target_dims

PATTERNS = ("2468", "8642", "8228", "5555")


@register("mola")
def mola_plan(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None, seed: int = 0,
              pattern: str | Sequence[int] = "2468", rank: int = 8, top_k: int = 2) -> AllocationPlan:
    """Block ``l`` of ``L`` gets ``pattern[l·G // L]`` experts (G = len(pattern)) on every target module.

    With a budget the pattern is scaled: the total number of experts is spread over the modules in proportion
    to their group's digit (at least one each).
    """
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget, model, targets)
    digits = parse_pattern(pattern, "mola")
    layers = num_layers(model, names)
    weight = [digits[depth_group(layer_index(n), layers, len(digits))] for n in names]

    def build(total: int) -> dict:
        return {n: routed([rank] * e, top_k) for n, e in zip(names, apportion(weight, total, lo=1))}

    if target is None:
        modules = build(sum(weight))
    else:
        modules, _ = fit(build, target, dims, lo=len(names),
                         minimum=f"one expert of rank {rank} on each of the {len(names)} target modules")
    scores = {"experts_per_layer": [digits[depth_group(l, layers, len(digits))] for l in range(layers)]}
    options = {"pattern": digits, "rank": rank, "top_k": top_k}
    return finish(modules, dims, "mola", options, target, scores)
