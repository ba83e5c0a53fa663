"""Budget matching (METHODS.md §5): scale an allocator's raw output, keeping its shape, to a parameter budget.

Every allocator expresses its output as ``build(t) → {path: ModulePlan}``, a plan that grows with one integer
``t`` (a total number of experts or of rank units, spread over the modules in proportion to the allocator's
scores by :func:`apportion`). :func:`fit` finds the ``t`` whose plan costs closest to the budget.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import nn

from ..layer import linear_dims
from ..plan import AllocationPlan, ModulePlan, layer_index

TOLERANCE = 0.02
DEFAULT_BUDGET = "uniform:E=4,r=8"  # what an allocator that needs a budget spends when given none
_UNIFORM = re.compile(r"uniform:(.*)")
_KEYS = {"E": "experts", "experts": "experts", "r": "rank", "rank": "rank", "k": "top_k", "top_k": "top_k"}


def target_dims(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{path: (d_in, d_out)}`` of the target modules."""
    return {name: linear_dims(getattr(model.get_submodule(name), "base_layer", model.get_submodule(name)))
            for name in names}


def plan_cost(modules: Mapping[str, ModulePlan], dims: Mapping[str, tuple[int, int]]) -> int:
    """Trainable parameters of ``modules`` (METHODS.md §3)."""
    return sum(spec.cost(*dims[name]) for name, spec in modules.items())


def parse_budget(budget: int | str | None, model: nn.Module, targets: Any) -> int | None:
    """A budget in parameters: an int, or ``"uniform:E=4,r=8"`` (optionally ``k=2``), the cost of that
    uniform plan on the same targets."""
    if budget is None:
        return None
    if isinstance(budget, (int, np.integer)) and not isinstance(budget, bool):
        if budget <= 0:
            raise ValueError(f"budget must be a positive number of parameters, got {budget}")
        return int(budget)
    if isinstance(budget, str):
        if budget.strip().isdigit():
            return parse_budget(int(budget.strip()), model, targets)
        match = _UNIFORM.fullmatch(budget.strip())
        if match:
            options = {}
            for item in filter(None, (s.strip() for s in match.group(1).split(","))):
                key, _, value = item.partition("=")
                if key.strip() not in _KEYS or not value.strip().isdigit() or int(value) < 1:
                    raise ValueError(f"budget {budget!r}: cannot read {item!r}; expected e.g. 'uniform:E=4,r=8'")
                options[_KEYS[key.strip()]] = int(value)
            return AllocationPlan.uniform(model, targets, **options).num_trainable(model)
    raise ValueError(f"budget must be a parameter count or a string like 'uniform:E=4,r=8', got {budget!r}")


def apportion(weights: Sequence[float], total: int, lo: int | Sequence[int] = 0,
              hi: int | Sequence[int] | None = None) -> list[int]:
    """Integers ``x_i ∈ [lo_i, hi_i]`` summing to ``total``, proportional to ``weights`` where the bounds allow
    (largest-remainder rounding; ties go to the earlier index)."""
    w = np.asarray(weights, dtype=float)
    n = len(w)
    lo_a = np.broadcast_to(np.asarray(lo, dtype=float), (n,))
    hi_a = np.full(n, np.inf) if hi is None else np.broadcast_to(np.asarray(hi, dtype=float), (n,))
    if not lo_a.sum() <= total <= hi_a.sum():
        raise ValueError(f"cannot spread {total} units over {n} entries within [{lo_a.sum():g}, {hi_a.sum():g}]")
    w = np.where(w > 0, w, 0.0)
    w = w + (w.max() if w.max() > 0 else 1.0) * 1e-12  # zero weights only fill what the others cannot take

    def spread(c: float) -> np.ndarray:
        return np.clip(c * w, lo_a, hi_a)

    low, high = 0.0, 1.0
    while spread(high).sum() < total:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if spread(mid).sum() < total else (low, mid)
    x = spread(high)
    base = np.clip(np.floor(x + 1e-9), lo_a, hi_a)
    left = int(round(total - base.sum()))
    order = sorted(range(n), key=lambda i: (-(x[i] - base[i]), i))
    step = 1 if left > 0 else -1
    while left:
        moved = False
        for i in order if step > 0 else order[::-1]:
            if left and lo_a[i] <= base[i] + step <= hi_a[i]:
                base[i] += step
                left -= step
                moved = True
        if not moved:
            break
    return [int(v) for v in base]


def fit(build: Callable[[int], dict[str, ModulePlan]], budget: int, dims: Mapping[str, tuple[int, int]],
        lo: int, hi: int | None = None, minimum: str = "") -> tuple[dict[str, ModulePlan], int]:
    """The plan ``build(t)``, ``lo ≤ t ≤ hi``, whose cost is closest to ``budget``; and that cost.

    ``build``'s cost must grow with ``t``. Raises ValueError if even ``build(lo)`` costs more than the budget
    allows (``minimum`` says what that smallest plan is); warns when the closest plan misses ±2%.
    """
    def cost(t: int) -> int:
        return plan_cost(build(t), dims)

    smallest = cost(lo)
    if smallest > budget * (1 + TOLERANCE):
        raise ValueError(f"budget {budget:,} is below the minimum of {smallest:,} parameters "
                         f"({minimum or 'the smallest plan this allocator can make'})")
    if hi is None:
        hi = max(lo, 1)
        while cost(hi) < budget and hi < 2 ** 24:
            hi *= 2
    left, right = lo, hi  # smallest t with cost ≥ budget, or hi
    while left < right:
        mid = (left + right) // 2
        left, right = (mid + 1, right) if cost(mid) < budget else (left, mid)
    candidates = range(max(lo, left - 3), min(hi, left + 3) + 1)
    best = min(candidates, key=lambda t: (abs(cost(t) - budget), t))
    modules = build(best)
    achieved = plan_cost(modules, dims)
    warn_if_missed(budget, achieved)
    return modules, achieved


def warn_if_missed(budget: int, achieved: int) -> None:
    if abs(achieved - budget) > TOLERANCE * budget:
        warnings.warn(f"closest achievable budget is {achieved:,} parameters, {100 * (achieved / budget - 1):+.1f}% "
                      f"from the requested {budget:,}", stacklevel=3)


SCALES = np.geomspace(1e-3, 1e3, 6000)  # the scale factors a depth pattern is tried at under a budget


def scaled_patterns(digits: Sequence[int], grid: np.ndarray = SCALES) -> list[tuple[tuple[int, ...], float]]:
    """The distinct ``(max(1, round(c · d_g)))_g`` for the scale factors ``c`` in ``grid`` (each monotone
    wherever ``digits`` is, since rounding is monotone), with the factor that first gave each."""
    seen: dict[tuple[int, ...], float] = {}
    for c in grid:
        seen.setdefault(tuple(max(1, int(np.floor(c * d + 0.5))) for d in digits), float(c))
    return list(seen.items())


def pattern_costs(counts: np.ndarray, ranks: np.ndarray, count_group: Sequence[int], rank_group: Sequence[int],
                  dims: Mapping[str, tuple[int, int]]) -> np.ndarray:
    """Cost (METHODS.md §3) of the plans giving each module ``n`` (in the order of ``dims``) ``counts[i, g]``
    experts of rank ``ranks[j, h]``, with ``g, h`` its count and rank groups: (len(counts), len(ranks)).
    ``Σ_n e r (d_in + d_out) + [e > 1] e d_in``, summed per (count group, rank group) cell."""
    width = np.zeros((counts.shape[1], ranks.shape[1]))
    router = np.zeros(counts.shape[1])
    for (d_in, d_out), cg, rg in zip(dims.values(), count_group, rank_group):
        width[cg, rg] += d_in + d_out
        router[cg] += d_in
    return np.einsum("ig,gh,jh->ij", counts, width, ranks) + ((counts * (counts > 1)) @ router)[:, None]


def closest(cost: np.ndarray, budget: int, minimum: str) -> int:
    """The index of the cost closest to ``budget``; ValueError when even the smallest exceeds it by more than
    the tolerance (``minimum`` says what that smallest plan is)."""
    if cost.min() > budget * (1 + TOLERANCE):
        raise ValueError(f"budget {budget:,} is below the minimum of {int(cost.min()):,} parameters ({minimum})")
    return int(np.argmin(np.abs(cost - budget)))


def routed(ranks: list[int], top_k: int, **routing: Any) -> ModulePlan:
    """:meth:`ModulePlan.capped`: a module plan with top-k capped by the number of experts."""
    return ModulePlan.capped(ranks, top_k, **routing)


def finish(modules: dict[str, ModulePlan], dims: Mapping[str, tuple[int, int]], method: str,
           options: dict[str, Any], target: int | None, scores: Any = None, cost: dict | None = None
           ) -> AllocationPlan:
    """Wrap ``modules`` in a plan whose meta records method, options, budget (target and achieved), scores
    and, for data-driven allocators, their cost."""
    if not modules:
        raise ValueError(f"{method}: the allocation left no module with an expert")
    meta: dict[str, Any] = {"method": method, "options": options,
                            "budget": {"target": target, "achieved": plan_cost(modules, dims)}}
    if scores is not None:
        meta["scores"] = scores
    if cost is not None:
        meta["cost"] = cost
    return AllocationPlan(modules, meta)


# --- depth groups (MoLA / HiLo digit patterns) ---------------------------------------------------------------
def parse_pattern(pattern: str | Sequence[int], option: str) -> list[int]:
    """``"2468"`` (one digit per group), ``"2,4,6,8"`` or ``[2, 4, 6, 8]`` → ``[2, 4, 6, 8]``."""
    if isinstance(pattern, str):
        text = pattern.strip()
        values = text.split(",") if "," in text else list(text)
    else:
        values = list(pattern)
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        out = []
    if not out or any(v < 1 for v in out):
        raise ValueError(f"{option} pattern {pattern!r} must be digits like '2468' or a list of integers >= 1")
    return out


def num_layers(model: nn.Module, names: Sequence[str]) -> int:
    """Number of transformer blocks: the config's ``num_hidden_layers``, else one past the deepest target."""
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    deepest = max(layer_index(n) for n in names) + 1
    return max(int(depth), deepest) if isinstance(depth, int) else deepest


def depth_group(layer: int, layers: int, groups: int) -> int:
    """Index of the equal consecutive depth group that holds block ``layer`` (of ``layers``)."""
    return layer * groups // layers
