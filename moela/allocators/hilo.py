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
from .budget import (TOLERANCE, depth_group, finish, num_layers, parse_budget, parse_pattern, plan_cost, routed,
                     target_dims, warn_if_missed)


def scaled_patterns(digits: Sequence[int], grid: np.ndarray) -> list[tuple[int, ...]]:
    """The distinct ``(max(1, round(c · d_g)))_g`` for the scale factors ``c`` in ``grid`` (each monotone
    wherever ``digits`` is, since rounding is monotone), with the factor that first gave each."""
    seen: dict[tuple[int, ...], float] = {}
    for c in grid:
        seen.setdefault(tuple(max(1, int(np.floor(c * d + 0.5))) for d in digits), float(c))
    return list(seen.items())


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

    if target is None:
        modules = build(count_digits, rank_digits)
    else:
        grid = np.geomspace(1e-3, 1e3, 6000)
        count_options, rank_options = scaled_patterns(count_digits, grid), scaled_patterns(rank_digits, grid)
        # cost = Σ_m e_m r_m (d_in + d_out) + [e_m > 1] e_m d_in, summed per (count group, rank group) cell
        width = np.zeros((len(count_digits), len(rank_digits)))
        router = np.zeros(len(count_digits))
        for n, cg, rg in zip(names, count_group, rank_group):
            width[cg, rg] += sum(dims[n])
            router[cg] += dims[n][0]
        e_mat = np.array([c for c, _ in count_options], dtype=float)
        r_mat = np.array([r for r, _ in rank_options], dtype=float)
        cost = np.einsum("ig,gh,jh->ij", e_mat, width, r_mat) + ((e_mat * (e_mat > 1)) @ router)[:, None]
        skew = np.abs(np.log(np.array([c for _, c in count_options]))[:, None]
                      - np.log(np.array([c for _, c in rank_options]))[None, :])
        miss = np.abs(cost - target)
        inside = miss <= TOLERANCE * target
        if (cost.min() > target * (1 + TOLERANCE)):
            raise ValueError(f"budget {target:,} is below the minimum of {int(cost.min()):,} parameters "
                             f"(one expert of rank 1 on each of the {len(names)} target modules)")
        i, j = np.unravel_index(np.argmin(np.where(inside, skew, np.inf)) if inside.any() else np.argmin(miss),
                                cost.shape)
        modules = build(count_options[i][0], rank_options[j][0])
        warn_if_missed(target, plan_cost(modules, dims))
    scores = {"experts_per_layer": [count_digits[depth_group(l, layers, len(count_digits))] for l in range(layers)],
              "rank_per_layer": [rank_digits[depth_group(l, layers, len(rank_digits))] for l in range(layers)]}
    options = {"experts": count_digits, "ranks": rank_digits, "top_k": top_k, "top_p": top_p, "max_k": max_k}
    return finish(modules, dims, "hilo", options, target, scores)
