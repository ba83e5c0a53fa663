"""The allocator registry: each method registers itself with :func:`register`, declaring what it needs;
:func:`allocator` answers what a method needs and which options it takes; :func:`allocate` runs one."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..plan import AllocationPlan

_COMMON = ("model", "targets", "budget", "data", "seed")  # what every allocator takes besides its options


@dataclass(frozen=True)
class Allocator:
    """A registered method: ``fn(model, *, targets, budget, data, seed, **options) -> AllocationPlan``."""

    name: str
    fn: Callable[..., AllocationPlan]
    needs_data: bool = False
    """It reads training examples (``data``)."""
    needs_weights: bool = False
    """It reads the base weights (so it cannot plan on a model built on the meta device)."""
    every_target: bool = True
    """Its plans put at least one expert on every target module (a budget below that is refused first)."""

    @property
    def options(self) -> dict[str, Any]:
        """Option name → default (``inspect.Parameter.empty`` when it has none)."""
        params = inspect.signature(self.fn).parameters
        return {n: p.default for n, p in params.items() if n not in _COMMON and p.kind == p.KEYWORD_ONLY}

    @property
    def open_options(self) -> bool:
        """It takes options beyond :attr:`options` (``**options``, e.g. routing settings)."""
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(self.fn).parameters.values())

    def accepts(self, option: str) -> bool:
        return option in self.options or self.open_options


_REGISTRY: dict[str, Allocator] = {}


def register(name: str, *, needs_data: bool = False, needs_weights: bool = False,
             every_target: bool = True) -> Callable[[Callable[..., AllocationPlan]], Callable[..., AllocationPlan]]:
    """Decorator: make ``fn`` available as ``allocate(name, ...)``, with what it needs (:class:`Allocator`)."""
    def wrap(fn: Callable[..., AllocationPlan]) -> Callable[..., AllocationPlan]:
        _REGISTRY[name] = Allocator(name, fn, needs_data, needs_weights, every_target)
        return fn
    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def allocator(method: str) -> Allocator:
    """The registered method; ValueError listing the available ones when there is none of that name."""
    if method not in _REGISTRY:
        raise ValueError(f"unknown allocation method {method!r}; available: {', '.join(available())}")
    return _REGISTRY[method]


def options_for(method: str, options: Mapping[str, Any], methods: Sequence[str] = ()) -> dict[str, Any]:
    """Options for ``method`` from one settings mapping: ``options[method]`` (a mapping of that method's own
    options) over the common options (the keys that are not method names), of which a method gets those it
    accepts. So one setting can say ``{rank: 4, uniform: {experts: 2}, hilo: {experts: "2468"}}`` for a
    comparison of ``methods``. An own option the method does not take, or a common one that no method of
    ``methods`` takes, is a ValueError naming it."""
    chosen = allocator(method)
    group = [allocator(m) for m in dict.fromkeys([*methods, method])]
    names = set(available())
    common = {k: v for k, v in options.items() if k not in names}
    for key in common:
        if not any(a.accepts(key) for a in group):
            raise ValueError(f"adapter.options: unknown option {key!r} (not taken by "
                             f"{', '.join(a.name for a in group)}); {method} takes: {_listed(chosen)}")
    own = options.get(method) or {}
    if not isinstance(own, Mapping):
        raise ValueError(f"adapter.options.{method} must be a mapping of {method}'s options, got {own!r}")
    for key in own:
        if not chosen.accepts(key):
            raise ValueError(f"adapter.options.{method}: unknown option {key!r}; {method} takes: {_listed(chosen)}")
    return {**{k: v for k, v in common.items() if chosen.accepts(k)}, **own}


def _listed(entry: Allocator) -> str:
    return ", ".join(entry.options) + (" and routing options (top_p, max_k, num_null)" if entry.open_options else "")


def allocate(method: str, model: nn.Module, *, targets: Any = "all-linear", budget: int | str | None = None,
             data: Any = None, seed: int = 0, **options: Any) -> AllocationPlan:
    """Run allocator ``method`` on ``model``'s ``targets`` and return its plan (within ±2% of ``budget``, a
    parameter count or ``"uniform:E=4,r=8"``, when one is given; the same plan for the same ``seed``).
    ``data`` (a DataLoader or tokenised examples) is needed by the data-driven methods. ValueError when
    ``top_k`` exceeds ``experts`` (both given as integers), or the budget cannot buy one rank-1 expert on
    every target of a method that adapts them all."""
    entry = allocator(method)
    if entry.needs_data and data is None:
        raise ValueError(f"allocator {method!r} is data-driven: it needs data (training examples)")
    experts, top_k = options.get("experts"), options.get("top_k")
    if isinstance(experts, int) and isinstance(top_k, int) and top_k > experts:
        raise ValueError(f"{method}: top_k={top_k} is larger than the number of experts ({experts})")
    with warnings.catch_warnings(record=True) as caught:  # an impossible budget's error supersedes its warning
        warnings.simplefilter("always")
        plan = _without_autocast_cache(entry.fn, model, targets=targets, budget=budget, data=data, seed=seed,
                                       **options)
        if budget is not None and entry.every_target:  # an allocator that only warned about an impossible budget
            from ..plan import find_targets
            from .budget import TOLERANCE, parse_budget, plan_cost, routed, target_dims

            names = find_targets(model, targets)
            minimum = plan_cost({n: routed([1], 1) for n in names}, target_dims(model, names))
            if parse_budget(budget, model, targets) * (1 + TOLERANCE) < minimum:
                raise ValueError(f"budget {budget} is below the minimum of {minimum:,} parameters for {method} "
                                 f"(one expert of rank 1 on each of the {len(names)} target modules)")
    for warning in caught:
        warnings.warn(warning.message, warning.category, stacklevel=2)
    return plan


def _without_autocast_cache(fn: Callable[..., AllocationPlan], *args: Any, **kwargs: Any) -> AllocationPlan:
    """``fn(*args, **kwargs)`` with autocast's cache of cast weights off. ``prune`` and ``guilomo`` train and
    perturb weights in place inside the allocation; under a caller's ``torch.autocast``, a cached bf16 copy would
    keep the first value of each weight, so every adapter would stay at its initialisation."""
    cache = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_autocast_cache_enabled(cache)
