"""``mola``: expert count per depth group from a pattern such as ``2468``, uniform rank, top-2 (METHODS.md §4.2)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch import nn

from ..plan import AllocationPlan, find_targets, layer_index
from .registry import register
from .budget import (closest, depth_group, finish, num_layers, parse_budget, parse_pattern, pattern_costs, plan_cost,
                     routed, scaled_patterns, target_dims, warn_if_missed)

PATTERNS = ("2468", "8642", "8228", "5555")


@register("mola")
def mola_plan(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None, seed: int = 0,
              pattern: str | Sequence[int] = "2468", rank: int = 8, top_k: int = 2) -> AllocationPlan:
    """Block ``l`` of ``L`` gets ``pattern[l·G // L]`` experts (G = len(pattern)) of rank ``rank`` on every target
    module.

    With a budget the pattern is rescaled group-wise, ``e_g = max(1, round(c · P_g))`` with the ``c`` whose plan
    costs closest to the budget, so every module of a depth group keeps the same number of experts and a
    monotone pattern stays monotone (as :mod:`~moela.allocators.hilo` does for counts and ranks). The rank stays
    ``rank``, so the steps are coarse: a plan may miss ±2% (with a warning) where a module-wise spread would not.
    """
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget, model, targets)
    digits = parse_pattern(pattern, "mola")
    layers = num_layers(model, names)
    group = [depth_group(layer_index(n), layers, len(digits)) for n in names]
    counts = digits  # the pattern the plan uses
    if target is not None:
        options = [p for p, _ in scaled_patterns(digits)]
        cost = pattern_costs(np.array(options, dtype=float), np.array([[rank]], dtype=float), group,
                             [0] * len(names), dims)[:, 0]
        counts = options[closest(cost, target, f"one expert of rank {rank} on each of the {len(names)} target "
                                               "modules")]
    modules = {n: routed([rank] * counts[g], top_k) for n, g in zip(names, group)}
    if target is not None:
        warn_if_missed(target, plan_cost(modules, dims))
    scores = {"experts_per_layer": [counts[depth_group(l, layers, len(counts))] for l in range(layers)]}
    options = {"pattern": digits, "rank": rank, "top_k": top_k}
    return finish(modules, dims, "mola", options, target, scores)
