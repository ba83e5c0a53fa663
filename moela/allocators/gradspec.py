"""``gradspec``: rank units where the task's mean weight gradient stands out of its own sampling noise.

moela's own allocator (no paper; an attempt at an allocator that finds where an update is needed, see
BENCHMARKS.md "Allocation recovery" for how far it gets). One pass over ``n`` probe examples in ``N`` batches
accumulates, for every target ``W0_m``, the mean gradient ``Ḡ_m = (1/N) Σ_b ∇_{W0_m} L_b`` (batch gradients
``gᵀ x`` from hooks; no weight gets a gradient) and ``Q_m = Σ_b ‖∇_{W0_m} L_b‖_F²``. The sampling noise of
``Ḡ_m`` has ``E‖N_m‖_F² ≈ (Q_m/N − ‖Ḡ_m‖_F²)/(N − 1)``; as an i.i.d.-like matrix its largest squared singular
value is about ``f_m = ‖N_m‖_F² (√d_in + √d_out)² / (d_in d_out)`` (Marchenko–Pastur edge). Rank unit ``j`` of
module ``m`` is worth its signal-to-noise ratio ``v_{m,j} = max(0, σ_j(Ḡ_m)² − f_m) / f_m`` (``denoise=False``:
raw ``σ_j²``), which makes modules with large but noisy gradients (e.g. every ``v_proj``) comparable to quiet
ones. The plan takes the ``t`` most valuable units (``t`` fitted to the budget); a module with ``R_m`` units gets
``⌈R_m / rank⌉`` experts whose ranks split ``R_m`` evenly, top-k routing; a module with none gets no adapter.
The ``σ_j²`` are the eigenvalues of the smaller float64 Gram matrix ``ḠᵀḠ`` or ``ḠḠᵀ`` (AlphaLoRA's
:func:`~moela.allocators.alphalora.matrix_eigs`), 4× faster than ``svdvals`` on Llama-2-7B's matrices and
equal to its squares within ≈ n·1e-16·σ_1² (tests/test_alloc_recovery.py).
Memory: one float64 ``d_out × d_in`` accumulator per target (≈ 1.6 GB per Llama-2-7B block, so ≈ 52 GB for the
model: BENCHMARKS.md "Allocation cost at 7B scale").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..distributed import process_group
from ..plan import AllocationPlan, find_targets
from .alphalora import matrix_eigs
from .budget import DEFAULT_BUDGET, apportion, finish, fit, parse_budget, routed, target_dims
from .probe import Cost, batches, pad_id
from .registry import register
from .sensitivity import backward_hooks


def gradient_spectra(model: nn.Module, names: list[str], probe_batches: list[dict],
                     cost: Cost | None = None) -> dict[str, dict[str, Any]]:
    """``{path: {"sigma2": σ_j(Ḡ)² descending, "floor": f_m}}`` over the batches; several processes
    all-reduce the sums first, so every process gets the same spectra."""
    device = next(model.parameters()).device
    dims = target_dims(model, names)
    mean = {n: torch.zeros(d_out, d_in, dtype=torch.float64, device=device) for n, (d_in, d_out) in dims.items()}
    squares = torch.zeros(len(names), dtype=torch.float64, device=device)
    index = {n: i for i, n in enumerate(names)}

    def add(task: Any, name: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        batch_grad = grad.reshape(-1, grad.shape[-1]).double().T @ x.reshape(-1, x.shape[-1]).double()
        mean[name] += batch_grad
        squares[index[name]] += batch_grad.pow(2).sum()

    rank, world = process_group()
    mine = probe_batches[rank::world]
    for batch in mine:
        backward_hooks(model, names, [batch], add, cost)
    count = torch.tensor([float(len(mine))], dtype=torch.float64, device=device)
    if world > 1:
        for t in [*mean.values(), squares, count]:
            torch.distributed.all_reduce(t)
    n_b = max(int(count.item()), 1)
    out = {}
    for name, (d_in, d_out) in dims.items():
        avg = mean[name] / n_b
        noise = max(0.0, (float(squares[index[name]]) / n_b - float(avg.pow(2).sum())) / (n_b - 1)) if n_b > 1 else 0.0
        out[name] = {"sigma2": np.clip(matrix_eigs(avg, exact_reference=False)[::-1], 0.0, None).tolist(),
                     "floor": noise * (math.sqrt(d_in) + math.sqrt(d_out)) ** 2 / (d_in * d_out)}
    return out


@register("gradspec", needs_data=True, needs_weights=True, every_target=False)
def gradspec_plan(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None, seed: int = 0,
                  rank: int = 8, top_k: int = 2, max_rank: int = 64, examples: int = 256, batch_size: int = 8,
                  denoise: bool = True) -> AllocationPlan:
    """Rank units to the largest signal-to-noise ratios of the mean weight gradients' singular values;
    experts of rank ≤ ``rank`` (``⌈R_m/rank⌉`` per module), at most ``max_rank`` units per module. Without a budget: as many units as uniform 4 experts of rank 8 on every target. ``denoise=False`` keeps
    the raw ``σ_j²``."""
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget if budget is not None else DEFAULT_BUDGET, model, targets)
    cost = Cost("gradspec")
    spectra = gradient_spectra(model, names, batches(data, batch_size, examples, seed, pad_id(model)), cost)
    units = []
    for i, name in enumerate(names):
        floor = spectra[name]["floor"]
        for j, s2 in enumerate(spectra[name]["sigma2"][:max_rank]):
            units.append((max(0.0, s2 - floor) / floor if denoise and floor > 0 else s2, i, j))
    units.sort(key=lambda u: (-u[0], u[1], u[2]))

    def build(t: int) -> dict:
        total = dict.fromkeys(names, 0)
        for _, i, _ in units[:t]:
            total[names[i]] += 1
        plan = {}
        for name, r in total.items():
            if r:
                experts = math.ceil(r / rank)
                plan[name] = routed(apportion([1.0] * experts, r, lo=1), top_k)
        return plan

    modules, _ = fit(build, target, dims, lo=1, hi=len(units),
                     minimum="one rank-1 expert on the module with the largest gradient")
    scores = {"sigma2": {n: s["sigma2"][:max_rank] for n, s in spectra.items()},
              "noise_floor": {n: s["floor"] for n, s in spectra.items()},
              "snr": {n: float(np.maximum(0.0, np.array(s["sigma2"][:max_rank]) - s["floor"]).sum() / s["floor"])
                      if s["floor"] > 0 else 0.0 for n, s in spectra.items()}}
    options = {"rank": rank, "top_k": top_k, "max_rank": max_rank, "examples": examples, "batch_size": batch_size,
               "denoise": denoise, "seed": seed}
    return finish(modules, dims, "gradspec", options, target, scores, cost.report())
