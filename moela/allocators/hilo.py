"""``hilo``: expert count *and* rank per depth group (HiLo, "Rank Also Matters"; METHODS.md §4.3).

[reconstructed] Depth groups take an expert-count pattern and a rank pattern (default ``2468`` / ``2468``,
shallow → deep); all experts of a module share their group's rank; routing is top-k, or top-p capped at
``max_k`` as the "dynamic activation" option.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch import nn

from ..plan import AllocationPlan, find_targets, layer_index
from .registry import register
from .budget import (TOLERANCE, closest, depth_group, finish, num_layers, parse_budget, parse_pattern,
                     pattern_costs, plan_cost, routed, scaled_patterns, target_dims, warn_if_missed)


@register("hilo")
def hilo_plan(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None, seed: int = 0,
              experts: str | Sequence[int] = "2468", ranks: str | Sequence[int] = "2468", top_k: int = 2,
              top_p: float | None = None, max_k: int | None = None) -> AllocationPlan:
    """Block ``l`` of ``L`` gets ``experts[l·G_e // L]`` experts of rank ``ranks[l·G_r // L]``.

    With a budget both patterns are rescaled group-wise, ``e_g = max(1, round(c_e · E_g))`` and
    ``r_g = max(1, round(c_r · R_g))``, so every module of a depth group keeps the same experts and rank and a
    monotone pattern stays monotone. Among the ``(c_e, c_r)`` whose plan lands within ±2% of the budget the
    one with ``c_e / c_r`` closest to 1 (the same factor for both, as the method's shape asks) is taken; if
    none does, the closest plan (with a warning).
    """
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget, model, targets)
    count_digits, rank_digits = parse_pattern(experts, "hilo experts"), parse_pattern(ranks, "hilo ranks")
    layers = num_layers(model, names)
    count_group = [depth_group(layer_index(n), layers, len(count_digits)) for n in names]
    rank_group = [depth_group(layer_index(n), layers, len(rank_digits)) for n in names]
    routing = {} if top_p is None else {"top_p": top_p}

    def module(e: int, r: int) -> Any:
        spec = routed([r] * e, top_k, **routing)
        if top_p is not None:
            spec.max_k = min(max_k or e, e)
        return spec

    def build(counts: Sequence[int], rank_of: Sequence[int]) -> dict:
        return {n: module(counts[cg], rank_of[rg]) for n, cg, rg in zip(names, count_group, rank_group)}

    counts, rank_of = count_digits, rank_digits  # the patterns the plan uses
    if target is None:
        modules = build(counts, rank_of)
    else:
        count_options, rank_options = scaled_patterns(count_digits), scaled_patterns(rank_digits)
        e_mat = np.array([c for c, _ in count_options], dtype=float)
        r_mat = np.array([r for r, _ in rank_options], dtype=float)
        cost = pattern_costs(e_mat, r_mat, count_group, rank_group, dims)
        skew = np.abs(np.log(np.array([c for _, c in count_options]))[:, None]
                      - np.log(np.array([c for _, c in rank_options]))[None, :])
        inside = np.abs(cost - target) <= TOLERANCE * target
        nearest = closest(cost.ravel(), target, f"one expert of rank 1 on each of the {len(names)} target modules")
        i, j = np.unravel_index(np.argmin(np.where(inside, skew, np.inf)) if inside.any() else nearest, cost.shape)
        counts, rank_of = count_options[i][0], rank_options[j][0]
        modules = build(counts, rank_of)
        warn_if_missed(target, plan_cost(modules, dims))
    scores = {"experts_per_layer": [counts[depth_group(l, layers, len(counts))] for l in range(layers)],
              "rank_per_layer": [rank_of[depth_group(l, layers, len(rank_of))] for l in range(layers)]}
    options = {"experts": count_digits, "ranks": rank_digits, "top_k": top_k, "top_p": top_p, "max_k": max_k}
    return finish(modules, dims, "hilo", options, target, scores)
