"""AlphaLoRA: the Hill estimator recovers planted power-law tails, and layers are ordered by them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from moela.allocators import allocate
from moela.allocators.alphalora import hill_alpha
from moela.plan import layer_index



pytestmark = pytest.mark.usefixtures("one_thread")  # small ops run faster on one thread


def pareto_quantiles(alpha: float, n: int) -> np.ndarray:
    """n evenly spaced quantiles of the density ∝ λ^(−α) on [1, ∞)."""
    q = np.arange(n) / n
    return (1 - q) ** (-1 / (alpha - 1))


def plant(weight: torch.Tensor, alpha: float, generator: torch.Generator) -> None:
    """Overwrite ``weight`` with U diag(√λ) Vᵀ, λ the power-law quantiles of exponent ``alpha``."""
    d_out, d_in = weight.shape
    k = min(d_out, d_in)
    u, _ = torch.linalg.qr(torch.randn(d_out, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, k, generator=generator, dtype=torch.float64))
    s = torch.from_numpy(np.sqrt(pareto_quantiles(alpha, k)))
    weight.copy_((u * s) @ v.T)


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5, 6.0])
def test_hill_estimator_recovers_the_exponent(alpha):
    assert hill_alpha(pareto_quantiles(alpha, 400)) == pytest.approx(alpha, rel=0.05)


def test_layers_with_lighter_tails_get_more_experts():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97))
    planted = [3.0, 2.0, 5.0, 4.0]  # layer → α of all its matrices
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                plant(module.weight, planted[layer_index(name)], g)
    plan = allocate("alphalora", model, total=20)
    layer_alpha = {int(l): a for l, a in plan.meta["scores"]["layer_alpha"].items()}
    assert sorted(layer_alpha, key=layer_alpha.get) == [1, 0, 3, 2]
    for l, a in layer_alpha.items():
        assert a == pytest.approx(planted[l], rel=0.15)
    counts = {layer_index(n): s.num_experts for n, s in plan.items()}
    assert sum(counts.values()) == 20
    assert counts[1] < counts[0] < counts[3] < counts[2]
    expected = np.array([layer_alpha[l] ** 2.5 for l in range(4)])
    assert np.abs(np.array([counts[l] for l in range(4)]) - 20 * expected / expected.sum()).max() < 1
    assert all(s.top_k == min(2, s.num_experts) for s in plan.modules.values())

    budgeted = allocate("alphalora", model, budget="uniform:E=4,r=8")
    target = budgeted.meta["budget"]["target"]
    assert abs(budgeted.num_trainable(model) - target) <= 0.02 * target
    mean = {l: np.mean([s.num_experts for n, s in budgeted.items() if layer_index(n) == l]) for l in range(4)}
    assert mean[1] < mean[0] < mean[3] < mean[2]
    assert allocate("alphalora", model, budget="uniform:E=4,r=8").to_dict() == budgeted.to_dict()


def straightforward_reference_alpha(weight: torch.Tensor, bins: int = 100) -> float:
    """The public AlphaLoRA fit written out plainly: float32 squared singular values, all kept; histogram of
    log10 λ; cuts i with log10(0.95·peak) ≤ λ_i (sic) and λ_i ≤ 1.5·peak; α_i by Hill; D_i by KS where α_i > 1,
    else 1; the α of the first smallest D."""
    lam = sorted(float(v) for v in torch.linalg.svdvals(weight.float()).square())
    lam_t = torch.tensor(lam, dtype=torch.float32)
    logs = torch.log(lam_t)
    h = torch.log10(lam_t)
    counts = torch.histc(h, bins, min=float(h.min()), max=float(h.max()))
    peak = 10 ** torch.linspace(float(h.min()), float(h.max()), bins + 1)[int(torch.argmax(counts))]
    best_d, best_alpha = None, None
    for i in range(len(lam) - 1):
        if lam_t[i] < torch.log10(0.95 * peak):
            alpha, d = 0.0, 1.0
        elif lam_t[i] > 1.5 * peak:
            break
        else:
            n = len(lam) - i
            alpha = float(1 + n / (logs[i:].sum() - n * logs[i]))
            d = 1.0
            if alpha > 1:
                tail = lam_t[i:] / lam_t[i]
                d = float(max(abs(1 - float(t) ** (1 - alpha) - j / n) for j, t in enumerate(tail)))
        if best_d is None or d < best_d:
            best_d, best_alpha = d, alpha
    return best_alpha


def test_reference_mode_matches_the_public_computation_on_real_weights(shared):
    from moela.allocators.alphalora import matrix_alpha

    model = transformers.AutoModelForCausalLM.from_pretrained(shared / "models" / "stories260k")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj", "model.layers.4.mlp.up_proj"):
        weight = model.get_submodule(name).weight
        got = matrix_alpha(weight, mode="reference", threshold=None, window="reference")
        assert got == pytest.approx(straightforward_reference_alpha(weight), rel=1e-4), name
    plan = allocate("alphalora", model, total=12)
    layer = [np.mean([straightforward_reference_alpha(model.get_submodule(n).weight) for n in plan.modules
                      if layer_index(n) == l]) for l in range(5)]
    from moela.allocators.alphalora import reference_rounding
    expected = reference_rounding(layer, 12, 2.5)
    assert [plan[f"model.layers.{l}.mlp.up_proj"].num_experts for l in range(5)] == [max(1, c) for c in expected]
