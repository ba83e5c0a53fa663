"""``alphalora``: more experts for layers whose weight spectra have lighter tails (AlphaLoRA; METHODS.md §4.5).

Training-free. For each target ``W``, the eigenvalues ``λ`` of ``WᵀW`` get a power-law tail fit by the Hill
estimator ``α̂_i = 1 + n / (Σ_{j≥i} ln λ_j − n ln λ_i)`` (``n = N − i``, 0-based ``i``), at the cut ``i`` that
minimises the Kolmogorov–Smirnov distance, among cuts in ``[0.95, 1.5] ×`` the peak of a histogram of
``log10 λ`` (TempBalance's "xmin_peak"; [decision] its public code compares against ``log10(0.95·peak)``,
a slip, which is not reproduced). Layer ``l`` gets ``N_l ∝ ᾱ_l^β`` experts, ᾱ_l the mean α of its targets.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import nn

from ..plan import AllocationPlan, find_targets, layer_index
from .registry import register
from .budget import apportion, finish, fit, parse_budget, routed, target_dims


def hill_alpha(eigs: np.ndarray, bins: int = 100, threshold: float = 1e-5) -> float:
    """Power-law exponent α of the tail of the eigenvalues ``eigs`` (Hill estimator, KS-chosen cut)."""
    lam = np.sort(np.asarray(eigs, dtype=np.float64))
    lam = lam[lam > threshold]
    n_all = len(lam)
    if n_all < 2:
        raise ValueError(f"a spectrum needs at least 2 eigenvalues above {threshold} to fit a tail")
    logs = np.log(lam)
    counts, edges = np.histogram(np.log10(lam), bins=bins)
    peak = 10 ** edges[int(np.argmax(counts))]
    window = [i for i in range(n_all - 1) if 0.95 * peak <= lam[i] <= 1.5 * peak] or list(range(n_all - 1))
    best_alpha, best_d = None, np.inf
    for i in window:
        n = n_all - i
        spread = logs[i:].sum() - n * logs[i]
        if spread <= 0:
            continue
        alpha = 1 + n / spread
        d = np.abs(1 - (lam[i:] / lam[i]) ** (1 - alpha) - np.arange(n) / n).max()
        if d < best_d:
            best_alpha, best_d = alpha, d
    if best_alpha is None:
        raise ValueError("the spectrum is flat: no power-law tail to fit")
    return float(best_alpha)


def matrix_alpha(weight: torch.Tensor, bins: int = 100) -> float:
    """α of the eigenvalues of ``WᵀW`` (the squared singular values of ``W``), from the smaller of the Gram
    matrices ``WᵀW`` and ``WWᵀ`` (same non-zero eigenvalues) in float64: several times faster than ``svdvals``."""
    w = weight.detach().to(torch.float64)
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return hill_alpha(torch.linalg.eigvalsh(gram).cpu().numpy(), bins)


@register("alphalora", needs_weights=True)
def alphalora(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None, seed: int = 0,
              total: int | None = None, beta: float = 2.5, rank: int = 8, top_k: int = 2, bins: int = 100
              ) -> AllocationPlan:
    """``N_l = round(T · ᾱ_l^β / Σ ᾱ^β)`` experts on every target of block ``l``, repaired to sum to ``T``
    (default ``T`` = 4 per block with targets), top-k (top-1 where ``N_l = 1``), rank ``rank``. With a budget,
    experts are spread over the modules in proportion to their block's ``ᾱ^β`` until it is met."""
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget, model, targets)
    alphas = {n: matrix_alpha(model.get_submodule(n).weight, bins) for n in names}
    by_layer = defaultdict(list)
    for n in names:
        by_layer[layer_index(n)].append(alphas[n])
    layers = sorted(by_layer)
    mean_alpha = {l: float(np.mean(by_layer[l])) for l in layers}
    weight = {l: mean_alpha[l] ** beta for l in layers}
    if target is None:
        total = total or 4 * len(layers)
        counts = dict(zip(layers, apportion([weight[l] for l in layers], total, lo=1)))
        modules = {n: routed([rank] * counts[layer_index(n)], top_k) for n in names}
    else:
        per_module = [weight[layer_index(n)] for n in names]

        def build(count: int) -> dict:
            return {n: routed([rank] * e, top_k) for n, e in zip(names, apportion(per_module, count, lo=1))}

        modules, _ = fit(build, target, dims, lo=len(names),
                         minimum=f"one expert of rank {rank} on each of the {len(names)} target modules")
    scores = {"alpha": alphas, "layer_alpha": {str(l): mean_alpha[l] for l in layers}}
    options = {"total": total, "beta": beta, "rank": rank, "top_k": top_k, "bins": bins}
    return finish(modules, dims, "alphalora", options, target, scores)
