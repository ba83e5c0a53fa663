"""Allocators: (model, targets, data, budget) → :class:`~moela.plan.AllocationPlan` (METHODS.md §4).

Each method lives in its own module and registers itself here with :func:`register`; users add their own
the same way. :func:`allocate` is the one entry point.

Several processes (``torch.distributed`` initialised, e.g. under ``accelerate launch``): the data-driven
allocators split their probe batches across the processes and combine the results, so every process gets the
same plan — ``sensitivity`` sums the scores of all processes in rank order, ``guilomo`` averages the search
gradients (GSVs and weights stay identical everywhere). The ``moela`` command also broadcasts the main
process's plan, which covers any other allocator.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..plan import AllocationPlan

Allocator = Callable[..., AllocationPlan]
_REGISTRY: dict[str, Allocator] = {}
_EVERY_TARGET: set[str] = set()


def register(name: str, every_target: bool = True) -> Callable[[Allocator], Allocator]:
    """Decorator: make ``fn(model, *, targets, budget, data, seed, **options) -> AllocationPlan`` available as
    ``allocate(name, ...)``. ``every_target``: its plans put at least one expert on every target module (so a
    budget below that is refused before it runs)."""
    def wrap(fn: Allocator) -> Allocator:
        _REGISTRY[name] = fn
        (_EVERY_TARGET.add if every_target else _EVERY_TARGET.discard)(name)
        return fn
    return wrap


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def available() -> list[str]:
    return sorted(_REGISTRY)


def allocate(method: str, model: nn.Module, *, targets: Any = "all-linear", budget: int | str | None = None,
             data: Any = None, seed: int = 0, **options: Any) -> AllocationPlan:
    """Run allocator ``method`` on ``model``'s ``targets`` and return its plan (within ±2% of ``budget``, a
    parameter count or ``"uniform:E=4,r=8"``, when one is given; the same plan for the same ``seed``).
    ``data`` (a DataLoader or tokenised examples) is needed by the data-driven methods. ValueError when
    ``top_k`` exceeds ``experts`` (both given as integers), or the budget cannot buy one rank-1 expert on
    every target of a method that adapts them all."""
    if method not in _REGISTRY:
        raise ValueError(f"unknown allocation method {method!r}; available: {', '.join(available())}")
    experts, top_k = options.get("experts"), options.get("top_k")
    if isinstance(experts, int) and isinstance(top_k, int) and top_k > experts:
        raise ValueError(f"{method}: top_k={top_k} is larger than the number of experts ({experts})")
    plan = _REGISTRY[method](model, targets=targets, budget=budget, data=data, seed=seed, **options)
    if budget is not None and method in _EVERY_TARGET:  # an allocator that only warned about an impossible budget
        from ..plan import find_targets
        from .budget import TOLERANCE, parse_budget, plan_cost, routed, target_dims

        names = find_targets(model, targets)
        minimum = plan_cost({n: routed([1], 1) for n in names}, target_dims(model, names))
        if parse_budget(budget, model, targets) * (1 + TOLERANCE) < minimum:
            raise ValueError(f"budget {budget} is below the minimum of {minimum:,} parameters for {method} (one "
                             f"expert of rank 1 on each of the {len(names)} target modules)")
    return plan


from . import alphalora, gradspec, guilomo, hilo, mola, sensitivity, uniform  # noqa: E402,F401  (register the built-ins)
