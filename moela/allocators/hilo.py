"""``hilo``: expert count *and* rank per depth group (HiLo, "Rank Also Matters"; METHODS.md §4.3).

[reconstructed] Depth groups take an expert-count pattern and a rank pattern (default ``2468`` / ``2468``,
shallow → deep); all experts of a module share their group's rank; routing is top-k, or top-p capped at
``max_k`` as the "dynamic activation" option.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..plan import AllocationPlan, find_targets, layer_index
from .registry import register
from .budget import apportion, depth_group, finish, fit, num_layers, parse_budget, parse_pattern, routed, target_dims


@register("hilo")
def hilo(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None, seed: int = 0,
         experts: str | Sequence[int] = "2468", ranks: str | Sequence[int] = "2468", top_k: int = 2,
         top_p: float | None = None, max_k: int | None = None) -> AllocationPlan:
    """Block ``l`` of ``L`` gets ``experts[l·G_e // L]`` experts of rank ``ranks[l·G_r // L]``.

    With a budget both patterns are scaled by the same factor: a total of rank units and a total of experts
    (in the patterns' ratio) are each spread over the modules in proportion to their group's digits.
    """
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget, model, targets)
    count_digits, rank_digits = parse_pattern(experts, "hilo experts"), parse_pattern(ranks, "hilo ranks")
    layers = num_layers(model, names)
    count_w = [count_digits[depth_group(layer_index(n), layers, len(count_digits))] for n in names]
    rank_w = [rank_digits[depth_group(layer_index(n), layers, len(rank_digits))] for n in names]
    routing = {} if top_p is None else {"top_p": top_p}

    def module(e: int, r: int) -> Any:
        spec = routed([r] * e, top_k, **routing)
        if top_p is not None:
            spec.max_k = min(max_k or e, e)
        return spec

    def build(rank_total: int) -> dict:
        count_total = max(len(names), round(rank_total * sum(count_w) / sum(rank_w)))
        counts = apportion(count_w, count_total, lo=1)
        return {n: module(e, r) for n, e, r in zip(names, counts, apportion(rank_w, rank_total, lo=1))}

    if target is None:
        modules = {n: module(e, r) for n, e, r in zip(names, count_w, rank_w)}
    else:
        modules, _ = fit(build, target, dims, lo=len(names),
                         minimum=f"one expert of rank 1 on each of the {len(names)} target modules")
    scores = {"experts_per_layer": [count_digits[depth_group(l, layers, len(count_digits))] for l in range(layers)],
              "rank_per_layer": [rank_digits[depth_group(l, layers, len(rank_digits))] for l in range(layers)]}
    options = {"experts": count_digits, "ranks": rank_digits, "top_k": top_k, "top_p": top_p, "max_k": max_k}
    return finish(modules, dims, "hilo", options, target, scores)
