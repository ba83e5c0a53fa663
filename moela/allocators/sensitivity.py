"""``sensitivity``: experts where the task's gradient on the frozen weights is large (LoRA-SMoE; METHODS.md §4.4).

The probe accumulates ``S(m) = Σ_steps ‖∇_{W0_m} L‖_F²`` for every target matrix. For a linear map
``y = x W0ᵀ`` on tokens ``X`` (T × d_in) with output gradients ``G`` (T × d_out), ``∇_{W0} L = Gᵀ X``, so
``‖∇_{W0} L‖_F² = ‖Gᵀ X‖_F² = ⟨G Gᵀ, X Xᵀ⟩``: hooks compute it per matrix during the backward pass and drop
it at once. No weight gets ``requires_grad`` (only the embedding output does, so a backward pass exists), so
memory stays at one matrix-sized temporary on top of LoRA-like activations, and the model is left as it was.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..plan import AllocationPlan, find_targets, module_type
from ..distributed import process_group
from .registry import register
from .budget import TOLERANCE, apportion, finish, fit, parse_budget, plan_cost, routed, target_dims, warn_if_missed
from .probe import Cost, batches, pad_id, progress, to_device


def squared_grad_norm(x: torch.Tensor, g: torch.Tensor) -> float:
    """``‖Gᵀ X‖_F²`` for tokens ``x`` (…, d_in) and output gradients ``g`` (…, d_out), through the smaller of
    the (T × T) Gram matrices or the (d_out × d_in) gradient, in float32 summed in float64."""
    x, g = x.reshape(-1, x.shape[-1]).float(), g.reshape(-1, g.shape[-1]).float()
    if x.shape[0] ** 2 < x.shape[1] * g.shape[1]:
        return float(((x @ x.T) * (g @ g.T)).sum(dtype=torch.float64))
    return float((g.T @ x).pow(2).sum(dtype=torch.float64))


def backward_hooks(model: nn.Module, names: list[str], probe_batches: list[dict[str, torch.Tensor]],
                   on_grad: Callable[[Any, str, torch.Tensor, torch.Tensor], None], cost: Cost | None = None) -> None:
    """Forward and backward every batch through ``model`` and call ``on_grad(task, name, x, g)`` with each
    target's input tokens ``x`` (…, d_in) and output gradients ``g`` (…, d_out) (so ``∇_{W0} L = gᵀ x``).
    Rows of a batch are split by its ``task`` column (task 0 without one). No weight gets ``requires_grad``
    (only the embedding output does, or the floating-point inputs of a model without input embeddings, so a
    backward pass exists); the model is left exactly as it was."""
    device = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    current: dict[str, Any] = {}
    handles = []

    def watch(name: str):
        def forward_hook(module, args, output):
            if not args:
                raise ValueError(f"module {name!r} was called without a positional input")
            x, task = args[0].detach(), current["task"]
            if output.requires_grad:
                output.register_hook(lambda g: on_grad(task, name, x, g))
        return forward_hook

    try:
        model.eval()
        model.requires_grad_(False)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is not None:
            handles.append(embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_()))
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(watch(name)))
        for batch in progress(probe_batches, "gradient probe"):
            inputs, task = to_device(batch, device)
            groups = [(0, None)] if task is None else [(int(t), task == t) for t in torch.unique(task)]
            for t, rows in groups:
                current["task"] = t
                sub = inputs if rows is None else {k: v[rows.to(v.device)] if isinstance(v, torch.Tensor)
                                                   and len(v) == len(rows) else v for k, v in inputs.items()}
                if embeddings is None:
                    sub = {k: v.detach().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
                           and k != "labels" else v for k, v in sub.items()}
                model(**sub).loss.backward()
                if cost is not None:
                    cost.add(sub)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def probe(model: nn.Module, names: list[str], probe_batches: list[dict[str, torch.Tensor]],
          cost: Cost | None = None) -> dict[Any, dict[str, float]]:
    """``{task: {path: S(path)}}`` summed over the batches (rows of a batch are split by its ``task`` column;
    without one every batch is task 0). The model is left exactly as it was."""
    scores: dict[Any, dict[str, float]] = defaultdict(lambda: dict.fromkeys(names, 0.0))

    def add(task: Any, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        scores[task][name] += squared_grad_norm(x, g)

    backward_hooks(model, names, probe_batches, add, cost)
    return {t: dict(s) for t, s in sorted(scores.items())}


def probe_all(model: nn.Module, names: list[str], probe_batches: list[dict[str, torch.Tensor]],
              cost: Cost | None = None) -> dict[Any, dict[str, float]]:
    """:func:`probe` over all batches: with several processes each probes every world-th batch and the
    scores are summed in rank order, the same on every process."""
    rank, world = process_group()
    if world == 1:
        return probe(model, names, probe_batches, cost)
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, probe(model, names, probe_batches[rank::world], cost))
    total: dict[Any, dict[str, float]] = {}
    for part in parts:
        for task, scores in part.items():
            into = total.setdefault(task, dict.fromkeys(names, 0.0))
            for name, value in scores.items():
                into[name] += value
    return dict(sorted(total.items()))


def vote(per_task: dict[Any, dict[str, float]], names: list[str], p: float) -> dict[str, int]:
    """``E(m)`` = number of tasks whose ``S_t(m)`` exceeds the ``(100 − p)``-th percentile of that task's
    scores over the modules of m's type."""
    kinds = defaultdict(list)
    for name in names:
        kinds[module_type(name)].append(name)
    counts = dict.fromkeys(names, 0)
    for scores in per_task.values():
        for members in kinds.values():
            threshold = np.percentile([scores[n] for n in members], 100 - p)
            for n in members:
                counts[n] += int(scores[n] > threshold)
    return counts


def per_type_share(scores: dict[str, float]) -> dict[str, float]:
    """``S(m) / Σ_{m' of the same type} S(m')``."""
    totals = defaultdict(float)
    for name, s in scores.items():
        totals[module_type(name)] += s
    return {n: s / totals[module_type(n)] if totals[module_type(n)] > 0 else 0.0 for n, s in scores.items()}


@register("sensitivity", needs_data=True, needs_weights=True, every_target=False)
def sensitivity_plan(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None,
                     seed: int = 0, mode: str = "auto", p: float = 60.0, experts: int = 4, max_experts: int = 8,
                     rank: int = 8, top_k: int = 2, examples: int = 256, batch_size: int = 1) -> AllocationPlan:
    """Gradient-sensitivity allocation.

    ``mode="vote"`` (multi-task data with a ``task`` column): per task and module type, modules above the
    ``(100 − p)``-th percentile get a vote; ``E(m)`` = votes (0 = no adapter); a budget steers ``p``.
    ``mode="proportional"``: ``E(m) ∝ S(m)`` normalised within each module type, clipped to
    ``[0, max_experts]``, ``experts · #targets`` experts in all, or as many as the budget buys.
    ``"auto"`` votes when the data has more than one task. Experts have rank ``rank``, top-k routing.
    Examples are probed one per step by default (``batch_size=1``, as the public code).
    """
    if mode not in ("auto", "vote", "proportional"):
        raise ValueError(f"sensitivity mode must be 'auto', 'vote' or 'proportional', got {mode!r}")
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget, model, targets)
    cost = Cost("sensitivity")
    per_task = probe_all(model, names, batches(data, batch_size, examples, seed, pad_id(model)), cost)
    if mode == "auto":
        mode = "vote" if len(per_task) > 1 else "proportional"
    total = {n: sum(s[n] for s in per_task.values()) for n in names}

    def plan_of(counts: dict[str, int]) -> dict:
        return {n: routed([rank] * e, top_k) for n, e in counts.items() if e > 0}

    if mode == "vote":
        if target is not None:
            costs = {float(q): plan_cost(plan_of(vote(per_task, names, q)), dims) for q in np.linspace(0, 100, 401)}
            costs = {q: c for q, c in costs.items() if c > 0}
            if min(costs.values()) > target * (1 + TOLERANCE):
                raise ValueError(f"budget {target:,} is below the minimum of {min(costs.values()):,} parameters "
                                 f"(the smallest vote allocation, experts of rank {rank})")
            inside = [q for q, c in costs.items() if abs(c - target) <= TOLERANCE * target]
            p = min(inside, key=lambda q: abs(q - p)) if inside else min(costs, key=lambda q: abs(costs[q] - target))
        modules = plan_of(vote(per_task, names, p))
        if target is not None:
            warn_if_missed(target, plan_cost(modules, dims))
    else:
        share = per_type_share(total)
        weights = [share[n] for n in names]

        def build(count: int) -> dict:
            return plan_of(dict(zip(names, apportion(weights, count, lo=0, hi=max_experts))))

        if target is None:
            modules = build(min(experts * len(names), max_experts * len(names)))
        else:
            modules, _ = fit(build, target, dims, lo=1, hi=max_experts * len(names),
                             minimum=f"one expert of rank {rank} on the most sensitive module")
    scores = {"sensitivity": total}
    if len(per_task) > 1:
        scores["per_task"] = {str(t): s for t, s in per_task.items()}
    options = {"mode": mode, "p": p, "experts": experts, "max_experts": max_experts, "rank": rank, "top_k": top_k,
               "examples": examples, "batch_size": batch_size, "seed": seed}
    return finish(modules, dims, "sensitivity", options, target, scores, cost.report())
