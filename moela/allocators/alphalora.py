"""``alphalora``: more experts for layers whose weight spectra have lighter tails (AlphaLoRA; METHODS.md §4.5).

Training-free. For each target ``W``, the eigenvalues ``λ`` of ``WᵀW`` get a power-law tail fit by the Hill
estimator ``α̂_i = 1 + n / (Σ_{j≥i} ln λ_j − n ln λ_i)`` (``n = N − i``, 0-based ``i``), at the cut ``i`` that
minimises the Kolmogorov–Smirnov distance among cuts in a window around the peak of a histogram of
``log10 λ``. Layer ``l`` gets ``N_l ∝ ᾱ_l^β`` experts, ᾱ_l the mean α of its targets.

``mode="reference"`` (default) reproduces the public code (peijunallin/alphalora ``expert_number.py``):
float32 ``svdvals``, every eigenvalue kept (``threshold=None``), window ``log10(0.95·peak) ≤ λ_i ≤ 1.5·peak``
(its lower bound compares an eigenvalue with a logarithm, so in practice only the upper bound acts), cuts
whose ``α ≤ 1`` scored ``D = 1``, and its rounding of ``T·ᾱ^β/Σᾱ^β`` (repairs go to ``argmin/argmax`` of
``ᾱ^β − N``). ``mode="moela"``: float64 Gram eigenvalues (several times faster), eigenvalues ``≤ 1e-5``
dropped, window ``0.95·peak ≤ λ_i ≤ 1.5·peak`` (the histogram fix), largest-remainder rounding with at least
one expert per layer. ``threshold`` and ``window`` override either mode; BENCHMARKS.md gives their effect.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..plan import AllocationPlan, find_targets, layer_index
from .registry import register
from .budget import apportion, finish, fit, parse_budget, routed, target_dims


def hill_alpha(eigs: np.ndarray, bins: int = 100, threshold: float | None = 1e-5, window: str = "fixed") -> float:
    """Power-law exponent α of the tail of the eigenvalues ``eigs`` (Hill estimator, KS-chosen cut).

    ``threshold``: drop eigenvalues ``≤ threshold`` first (None keeps all). ``window``: ``"fixed"`` searches
    cuts with ``0.95·peak ≤ λ_i ≤ 1.5·peak``; ``"reference"`` reproduces the public code's
    ``λ_i ≥ log10(0.95·peak)``, ``λ_i ≤ 1.5·peak``, with cuts of ``α ≤ 1`` scored ``D = 1`` (α taken even so
    when no cut scores below 1), computed in the precision of ``eigs``.
    """
    if window not in ("fixed", "reference"):
        raise ValueError(f"alphalora window must be 'fixed' or 'reference', got {window!r}")
    lam = np.sort(np.asarray(eigs))
    if threshold is not None:
        lam = lam[lam > threshold]
    n_all = len(lam)
    if n_all < 2:
        raise ValueError(f"a spectrum needs at least 2 eigenvalues above {threshold} to fit a tail")
    if window == "reference":
        return _reference_alpha(lam, bins)
    lam = lam.astype(np.float64)
    logs = np.log(lam)
    counts, edges = np.histogram(np.log10(lam), bins=bins)
    peak = 10 ** edges[int(np.argmax(counts))]
    cuts = [i for i in range(n_all - 1) if 0.95 * peak <= lam[i] <= 1.5 * peak] or list(range(n_all - 1))
    best_alpha, best_d = None, np.inf
    for i in cuts:
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


def _reference_alpha(lam: np.ndarray, bins: int) -> float:
    """The public code's fit, in torch, in the precision of ``lam`` (ascending)."""
    eigs = torch.from_numpy(np.ascontiguousarray(lam))
    logs = torch.log(eigs)
    n_all = len(eigs)
    hist = torch.log10(eigs)
    counts = torch.histc(hist, bins, min=float(hist.min()), max=float(hist.max()))
    edges = torch.linspace(float(hist.min()), float(hist.max()), bins + 1)
    peak = 10 ** edges[int(torch.argmax(counts))]
    low, high = torch.log10(0.95 * peak), 1.5 * peak
    alphas, dists = torch.zeros(n_all - 1), torch.ones(n_all - 1)
    for i in range(n_all - 1):
        xmin = eigs[i]
        if xmin < low:
            continue
        if xmin > high:
            break
        n = float(n_all - i)
        alpha = 1 + n / (torch.sum(logs[i:]) - n * logs[i])
        alphas[i] = alpha
        if alpha > 1:
            seq = torch.arange(n, dtype=eigs.dtype)
            dists[i] = torch.max(torch.abs(1 - (eigs[i:] / xmin) ** (-alpha + 1) - seq / n))
    return float(alphas[int(torch.argmin(dists))])


def matrix_eigs(weight: torch.Tensor, exact_reference: bool) -> np.ndarray:
    """Eigenvalues of ``WᵀW``: the public code's float32 ``svdvals(W)²`` (``exact_reference``), or the
    eigenvalues of the smaller Gram matrix ``WᵀW`` / ``WWᵀ`` in float64 (same non-zero eigenvalues, several
    times faster than ``svdvals``)."""
    if exact_reference:
        return torch.linalg.svdvals(weight.detach().float().cpu()).square().numpy()
    w = weight.detach().to(torch.float64)
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return torch.linalg.eigvalsh(gram).cpu().numpy()


def matrix_alpha(weight: torch.Tensor, bins: int = 100, mode: str = "moela", threshold: float | None = 1e-5,
                 window: str = "fixed") -> float:
    """α of the eigenvalues of ``WᵀW`` (:func:`matrix_eigs`, :func:`hill_alpha`)."""
    return hill_alpha(matrix_eigs(weight, mode == "reference"), bins, threshold, window)


def reference_rounding(values: Sequence[float], total: int, beta: float) -> list[int]:
    """The public code's ``round(T · v^β / Σ v^β)``, repaired one unit at a time at ``argmin(v^β − N)`` (too
    few) or ``argmax(v^β − N)`` (too many)."""
    scaled = np.power(np.asarray(values, dtype=float), beta)
    counts = np.round(scaled / scaled.sum() * total).astype(int)
    while counts.sum() != total:
        if counts.sum() < total:
            counts[np.argmin(scaled - counts)] += 1
        else:
            counts[np.argmax(scaled - counts)] -= 1
    return counts.tolist()


@register("alphalora", needs_weights=True)
def alphalora(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None, seed: int = 0,
              total: int | None = None, beta: float = 2.5, rank: int = 8, top_k: int = 2, bins: int = 100,
              mode: str = "reference", threshold: float | None | str = "mode", window: str | None = None
              ) -> AllocationPlan:
    """``N_l = round(T · ᾱ_l^β / Σ ᾱ^β)`` experts on every target of block ``l``, repaired to sum to ``T``
    (default ``T`` = 4 per block with targets), top-k (top-1 where ``N_l = 1``), rank ``rank``. With a budget,
    experts are spread over the modules in proportion to their block's ``ᾱ^β`` until it is met. ``mode``,
    ``threshold`` (default: None in reference mode, 1e-5 in moela mode) and ``window`` (default: the mode's):
    module docstring. [decision] ᾱ_l averages the *targets* of block l (the public code: every linear map of
    the block; the same with ``targets="all-linear"``); a layer rounded to 0 experts gets 1."""
    if mode not in ("reference", "moela"):
        raise ValueError(f"alphalora mode must be 'reference' or 'moela', got {mode!r}")
    threshold = (None if mode == "reference" else 1e-5) if threshold == "mode" else threshold
    window = window or ("reference" if mode == "reference" else "fixed")
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget, model, targets)
    alphas = {n: matrix_alpha(model.get_submodule(n).weight, bins, mode, threshold, window) for n in names}
    by_layer = defaultdict(list)
    for n in names:
        by_layer[layer_index(n)].append(alphas[n])
    layers = sorted(by_layer)
    mean_alpha = {l: float(np.mean(by_layer[l])) for l in layers}
    weight = {l: mean_alpha[l] ** beta for l in layers}
    if target is None:
        total = total or 4 * len(layers)
        if mode == "reference":
            counts = {l: max(1, c) for l, c in zip(layers, reference_rounding([mean_alpha[l] for l in layers],
                                                                               total, beta))}
        else:
            counts = dict(zip(layers, apportion([weight[l] for l in layers], total, lo=1)))
        modules = {n: routed([rank] * counts[layer_index(n)], top_k) for n in names}
    else:
        per_module = [weight[layer_index(n)] for n in names]

        def build(count: int) -> dict:
            return {n: routed([rank] * e, top_k) for n, e in zip(names, apportion(per_module, count, lo=1))}

        modules, _ = fit(build, target, dims, lo=len(names),
                         minimum=f"one expert of rank {rank} on each of the {len(names)} target modules")
    scores = {"alpha": alphas, "layer_alpha": {str(l): mean_alpha[l] for l in layers}}
    options = {"total": total, "beta": beta, "rank": rank, "top_k": top_k, "bins": bins, "mode": mode,
               "threshold": threshold, "window": window}
    return finish(modules, dims, "alphalora", options, target, scores)
