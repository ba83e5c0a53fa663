"""Allocators: (model, targets, data, budget) → :class:`~moela.plan.AllocationPlan` (METHODS.md §4).

Each method lives in its own module and registers itself here with :func:`register`, declaring what it needs;
users add their own the same way. :func:`allocate` is the one entry point; :func:`allocator` answers what a
method needs and which options it takes, so nothing outside a method's module names it.

Several processes (``torch.distributed`` initialised, e.g. under ``accelerate launch``): the data-driven
allocators split their probe batches across the processes and combine the results, so every process gets the
same plan — ``sensitivity`` sums the scores of all processes in rank order, ``guilomo`` averages the search
gradients (GSVs and weights stay identical everywhere); ``prune`` runs whole on every process. The run
pipeline also broadcasts the main process's plan, which covers any other allocator.
"""

from __future__ import annotations

from . import alphalora, gradspec, guilomo, hilo, mola, prune, sensitivity, uniform  # noqa: F401  (they register themselves)
from .registry import Allocator, allocate, allocator, available, options_for, register

__all__ = ["Allocator", "allocate", "allocator", "available", "options_for", "register"]
