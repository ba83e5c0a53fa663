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

Speed (BENCHMARKS.md, "AlphaLoRA speed"): the Gram matrix is formed from its lower triangle only (what
``eigvalsh`` reads), ``workers=2`` solves two matrices at once on one thread each (the fast path: float64,
α within 1e-9 of the one-matrix-at-a-time result), ``precision="float32"`` halves the work again but moves α
by up to 0.47 on real weights (no bound on α: :func:`matrix_eigs`). The Gram path runs on the weights' device.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
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
    """The public code's fit, in torch, in the precision of ``lam`` (ascending).

    Its per-cut loop, vectorised over the cuts (one Python step per cut was ≈ 0.5 s for 4096 eigenvalues): the
    same float32 operations on the same values, and each suffix sum ``Σ_{j≥i} ln λ_j`` still one ``torch.sum``
    of ``logs[i:]`` so that it is summed in the same order; the tests check equality with the plain loop."""
    eigs = torch.from_numpy(np.ascontiguousarray(lam))
    logs = torch.log(eigs)
    n_all = len(eigs)
    hist = torch.log10(eigs)
    counts = torch.histc(hist, bins, min=float(hist.min()), max=float(hist.max()))
    edges = torch.linspace(float(hist.min()), float(hist.max()), bins + 1)
    peak = 10 ** edges[int(torch.argmax(counts))]
    low, high = torch.log10(0.95 * peak), 1.5 * peak
    alphas, dists = torch.zeros(n_all - 1), torch.ones(n_all - 1)
    stop = int(torch.searchsorted(eigs[:n_all - 1], high, right=True))  # the loop's break: first λ_i > high
    cuts = torch.nonzero(eigs[:stop] >= low).flatten()  # its continue: λ_i < low
    if len(cuts):
        n = (n_all - cuts).to(eigs.dtype)
        sums = torch.stack([torch.sum(logs[i:]) for i in cuts.tolist()])
        alpha = 1 + (sums - n * logs[cuts]).reciprocal() * n  # how torch computes python float / tensor
        alphas[cuts] = alpha.to(alphas.dtype)
        keep = alpha > 1
        for chunk in torch.split(torch.nonzero(keep).flatten(), max(1, 2**20 // n_all)):
            rows = cuts[chunk]  # cut i, KS distance over the tail λ_i ≤ λ_k, k = i + j
            first = int(rows[0])
            k = torch.arange(first, n_all)
            j = k[None, :] - rows[:, None]
            tail = j >= 0
            n_rows = n[chunk][:, None]
            seq = j.clamp(min=0).to(eigs.dtype)
            ratio = eigs[None, first:] / eigs[rows][:, None]
            gap = torch.abs(1 - ratio ** (-alpha[chunk][:, None] + 1) - seq / n_rows)
            dists[rows] = torch.where(tail, gap, torch.zeros((), dtype=gap.dtype)).amax(dim=1).to(dists.dtype)
    return float(alphas[int(torch.argmin(dists))])


PRECISIONS = ("float64", "float32")


def matrix_eigs(weight: torch.Tensor, exact_reference: bool, precision: str | None = None) -> np.ndarray:
    """Eigenvalues of ``WᵀW``: the public code's float32 ``svdvals(W)²`` on the CPU (``exact_reference`` with
    ``precision=None``), or the eigenvalues of the smaller Gram matrix ``WᵀW`` / ``WWᵀ`` (same non-zero
    eigenvalues, several times faster than ``svdvals``) formed and solved in ``precision`` (``"float64"``, the
    default of moela mode, or ``"float32"``) on the weight's device (a GPU when the model is there).

    Error of ``"float32"`` against ``"float64"`` (whose own error, ≈ 1e-16·n·‖W‖₂², is negligible here):
    forming ``G = WᵀW`` in float32 (the weights are float32 or narrower, so exact in float32) gives
    ``|fl(G) − G| ≤ γ_m·|W|ᵀ|W|`` elementwise (``γ_m = m·ε/(1 − m·ε)``, ``m`` the inner dimension, ε = 2⁻²⁴), hence
    ``‖fl(G) − G‖₂ ≤ γ_m·‖W‖_F² ≤ γ_m·n·‖W‖₂²``; the symmetric eigensolver (``syevd``: Householder
    tridiagonalisation, then QR or divide and conquer) is backward stable, its eigenvalues exact for
    ``fl(G) + E`` with ``‖E‖₂ ≤ c·n·ε·‖G‖₂``. By Weyl's inequality every eigenvalue moves by at most
    ``|λ̂_i − λ_i| ≤ (γ_m·n + c·n·ε)·λ_max``: an *absolute* error, worst case ≈ 1e-3·λ_max at 4096, in practice
    (rounding errors add like a random walk) ≤ n·ε·λ_max, which the tests check on MiniLM. For the Hill fit it
    is a relative error ``|λ̂_i − λ_i| / λ_i ≤ bound·λ_max / λ_i``: small for the eigenvalues of the tail that the
    fit uses (cuts from ≈ the histogram's peak up), ``|Δ ln λ_i|`` the same. **But α has no such bound**: the
    histogram's edges run from the smallest kept eigenvalue, which float32 gets only to a few per cent where it
    is ≈ 1e-6·λ_max (typical of square weights), and a moved peak moves the window of cuts and the KS choice, a
    discontinuous function of the spectrum: |Δα| up to 0.33 (stories260k) and 0.47 (all-MiniLM-L6-v2), one
    expert moved between blocks of MiniLM. ``"float64"`` paths differ among themselves (blocking, threads, GPU)
    only in the order of float64 operations: eigenvalues within ≈ 1e-14·λ_max, α within 1e-9."""
    if exact_reference and precision is None:
        return torch.linalg.svdvals(weight.detach().float().cpu()).square().numpy()
    precision = precision or "float64"
    if precision not in PRECISIONS:
        raise ValueError(f"alphalora precision must be one of {', '.join(PRECISIONS)} (or None), got {precision!r}")
    w = weight.detach().to(torch.float64 if precision == "float64" else torch.float32)
    return torch.linalg.eigvalsh(_lower_gram(w.T if w.shape[0] < w.shape[1] else w)).cpu().numpy()


def _lower_gram(w: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """The lower triangle of ``WᵀW`` by blocks of columns (``eigvalsh`` reads only the lower triangle): 10 of
    the 16 block products, ⅝ of the work of ``W.T @ W`` (the upper blocks are left 0). Below 1024 columns,
    ``W.T @ W``."""
    n = w.shape[1]
    if n < 1024:
        return w.T @ w
    gram = torch.zeros(n, n, dtype=w.dtype, device=w.device)
    edges = [n * b // blocks for b in range(blocks + 1)]
    for b in range(blocks):
        rows = w[:, edges[b]:edges[b + 1]]
        gram[edges[b]:edges[b + 1], :edges[b + 1]] = rows.T @ w[:, :edges[b + 1]]
    return gram


def spectra(weights: Sequence[torch.Tensor], exact_reference: bool, precision: str | None = None,
            workers: int = 1) -> list[np.ndarray]:
    """:func:`matrix_eigs` of every weight. ``workers > 1``: the CPU matrices go to ``workers`` threads at once,
    each solving one matrix on one intra-op thread (torch's thread count is set to 1 meanwhile and restored),
    so that Gram products and eigensolves of different matrices overlap; GPU matrices are solved one by one on
    their device. The tridiagonalisation in ``eigvalsh`` is bound by memory traffic and parallelises poorly over
    threads: one matrix per thread gave 1.9–2.2× the throughput of two threads on one matrix on the shared
    2-core machine (BENCHMARKS.md). Results are those of one thread (last-bit differences from a multithreaded
    solve)."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"alphalora workers must be an integer >= 1, got {workers!r}")
    out: list[np.ndarray | None] = [None] * len(weights)
    cpu = [i for i, w in enumerate(weights) if w.device.type == "cpu"] if workers > 1 else []
    for i, w in enumerate(weights):
        if i not in cpu:
            out[i] = matrix_eigs(w, exact_reference, precision)
    if cpu:
        before = torch.get_num_threads()

        def one(i: int) -> np.ndarray:
            torch.set_num_threads(1)  # OpenMP's thread count is per thread: set it in each worker
            return matrix_eigs(weights[i], exact_reference, precision)

        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(min(workers, len(cpu))) as pool:
                for i, eigs in zip(cpu, pool.map(one, cpu)):
                    out[i] = eigs
        finally:
            torch.set_num_threads(before)
    return out  # type: ignore[return-value]


def matrix_alpha(weight: torch.Tensor, bins: int = 100, mode: str = "moela", threshold: float | None = 1e-5,
                 window: str = "fixed", precision: str | None = None) -> float:
    """α of the eigenvalues of ``WᵀW`` (:func:`matrix_eigs`, :func:`hill_alpha`)."""
    return hill_alpha(matrix_eigs(weight, mode == "reference", precision), bins, threshold, window)


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
def alphalora_plan(model: nn.Module, *, targets: Any, budget: int | str | None = None, data: Any = None, seed: int = 0,
                   total: int | None = None, beta: float = 2.5, rank: int = 8, top_k: int = 2, bins: int = 100,
                   mode: str = "reference", threshold: float | None | str = "mode", window: str | None = None,
                   precision: str | None = None, workers: int = 1) -> AllocationPlan:
    """``N_l = round(T · ᾱ_l^β / Σ ᾱ^β)`` experts on every target of block ``l``, repaired to sum to ``T``
    (default ``T`` = 4 per block with targets), top-k (top-1 where ``N_l = 1``), rank ``rank``. With a budget,
    ``T`` is the one whose plan costs closest to it, so every target of a block keeps the block's ``N_l``. ``mode``,
    ``threshold`` (default: None in reference mode, 1e-5 in moela mode) and ``window`` (default: the mode's):
    module docstring. [decision] ᾱ_l averages the *targets* of block l (the public code: every linear map of
    the block; the same with ``targets="all-linear"``); a layer rounded to 0 experts gets 1.

    ``precision`` (the eigenvalue path; default None = the mode's: float32 ``svdvals`` on the CPU in reference mode,
    float64 Gram in moela mode): ``"float64"`` or ``"float32"`` Gram eigenvalues, computed on the weights' device
    (the GPU when the model is there). ``"float32"`` is ≈ 2× faster on the CPU with ``workers=2`` (1.1–1.2× on two
    threads on one matrix) but moves α without a bound (:func:`matrix_eigs`): opt-in. ``workers`` (default 1): CPU
    matrices solved at once, one thread each (:func:`spectra`); ``workers=2`` with float64 is the fast path with α
    within 1e-9 of ``workers=1``, 2.3× faster than before on the loaded 2-core machine (BENCHMARKS.md, "AlphaLoRA
    speed"); each worker holds one float64 copy of a weight and its Gram matrix (≈ 0.5 GB at 11008 × 4096)."""
    if mode not in ("reference", "moela"):
        raise ValueError(f"alphalora mode must be 'reference' or 'moela', got {mode!r}")
    threshold = (None if mode == "reference" else 1e-5) if threshold == "mode" else threshold
    window = window or ("reference" if mode == "reference" else "fixed")
    names = find_targets(model, targets)
    dims = target_dims(model, names)
    target = parse_budget(budget, model, targets)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"alphalora precision must be one of {', '.join(PRECISIONS)} (or None), got {precision!r}")
    eigs = spectra([model.get_submodule(n).weight for n in names], mode == "reference", precision, workers)
    alphas = {n: hill_alpha(e, bins, threshold, window) for n, e in zip(names, eigs)}
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
        def build(count: int) -> dict:  # ``count`` experts per target module summed over the blocks, N_l per block
            per_block = dict(zip(layers, apportion([weight[l] for l in layers], count, lo=1)))
            return {n: routed([rank] * per_block[layer_index(n)], top_k) for n in names}

        modules, _ = fit(build, target, dims, lo=len(layers),
                         minimum=f"one expert of rank {rank} on each of the {len(names)} target modules")
    scores = {"alpha": alphas, "layer_alpha": {str(l): mean_alpha[l] for l in layers}}
    options = {"total": total, "beta": beta, "rank": rank, "top_k": top_k, "bins": bins, "mode": mode,
               "threshold": threshold, "window": window, "precision": precision, "workers": workers}
    return finish(modules, dims, "alphalora", options, target, scores)
