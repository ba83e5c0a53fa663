"""Routed layers train under ``torch.autocast`` (bf16, and fp16 where the CPU has it), for float32 and bf16
models with adapters in float32 or in the model's dtype; their gradients match the per-expert loop reference
run under the same autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moela.layer import LoraMoELinear
from moela.reference import loop_forward

from tests.helpers import tiny_model

D_IN, D_OUT, T = 24, 20, 33

VARIANTS = {
    "top-k": dict(ranks=[2, 4, 6, 2], top_k=2),
    "top-p": dict(ranks=[2, 4, 6, 2], top_p=0.6, max_k=3),
    "null experts": dict(ranks=[4, 2, 4], top_k=2, num_null=2),
    "E=1": dict(ranks=[8]),
}
PRECISIONS = {  # (model dtype, adapter dtype, input dtype: None for the autocast dtype)
    "fp32 model": (torch.float32, torch.float32, torch.float32),
    "fp32 model, autocast input": (torch.float32, torch.float32, None),  # e.g. o_proj after autocast attention
    "bf16 model": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "bf16 model, fp32 adapter": (torch.bfloat16, torch.float32, torch.bfloat16),
}


def _cpu_autocast_fp16() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float16
    except RuntimeError:
        return False


AUTOCAST = [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.skipif(
    not _cpu_autocast_fp16(), reason="this torch build has no float16 autocast on CPU"))]


def make_layer(variant: str, model_dtype: torch.dtype, adapter_dtype: torch.dtype, seed: int = 0) -> LoraMoELinear:
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT).to(model_dtype).requires_grad_(False)
    layer = LoraMoELinear(base, adapter_dtype=adapter_dtype, **VARIANTS[variant])
    nn.init.normal_(layer.lora_B.weight, std=0.1)  # B = 0 at init would leave A and the router without gradient
    return layer


def reference(layer: LoraMoELinear, x: torch.Tensor) -> torch.Tensor:
    """The per-expert loop with the packed forward's selection and differentiable renormalised gates."""
    if layer.router is None:
        return loop_forward(layer, x)
    selected = layer.last_stats.selected[..., :layer.num_experts]
    logits = layer.router(x)[..., :layer.num_experts]
    gates = logits.masked_fill(~selected, float("-inf")).softmax(-1).nan_to_num(0.0)
    return loop_forward(layer, x, gates)


def gradients(layer: LoraMoELinear, forward, x: torch.Tensor, autocast: torch.dtype) -> dict[str, torch.Tensor]:
    weight = torch.randn(T, D_OUT, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=autocast):
        y = forward(x)
    assert y.dtype == autocast
    (y.float() * weight).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("autocast", AUTOCAST)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step_under_autocast_matches_loop_reference(variant, precision, autocast):
    model_dtype, adapter_dtype, input_dtype = PRECISIONS[precision]
    layer = make_layer(variant, model_dtype, adapter_dtype)
    x = torch.randn(T, D_IN, generator=torch.Generator().manual_seed(1)).to(input_dtype or autocast)

    # The two computations round differently in the coarsest dtype involved: allow 2 of its epsilons (relative,
    # Frobenius norm); measured errors are about 1/4 of that.
    tolerance = 2 * max(torch.finfo(autocast).eps, torch.finfo(model_dtype).eps)
    packed = gradients(layer, layer, x, autocast)
    if layer.router is not None:
        assert layer.last_stats.logits.dtype == torch.float32, "the router must stay float32 under autocast"
    expected = gradients(layer, lambda inp: reference(layer, inp), x, autocast)
    assert set(packed) == set(expected) == {"lora_A.weight", "lora_B.weight"} | (
        {"router.weight"} if layer.routed else set())
    for name, grad in packed.items():
        assert grad.dtype == layer.get_parameter(name).dtype and torch.isfinite(grad).all(), name
        error = (grad.double() - expected[name].double()).norm() / expected[name].double().norm()
        assert error < tolerance, f"{name}: relative error {error:.2e}"

    before = {name: p.detach().clone() for name, p in layer.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for name, p in layer.named_parameters():
        if p.requires_grad:
            p.grad = packed[name]
    optimizer.step()
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all() and not torch.equal(p, before[name]), name


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_tiny_llama_with_routed_layers_trains_under_autocast_bf16(model_dtype):
    model = tiny_model("llama").to(model_dtype).train()
    model.requires_grad_(False)
    kinds = list(VARIANTS)
    for i, name in enumerate(n for n, m in list(model.named_modules()) if n.endswith("_proj")):
        layer = LoraMoELinear(model.get_submodule(name), adapter_dtype=torch.float32, **VARIANTS[kinds[i % 4]])
        nn.init.normal_(layer.lora_B.weight, std=0.02)
        model.set_submodule(name, layer)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    layers = [m for m in model.modules() if isinstance(m, LoraMoELinear)]
    assert len(layers) == 4 * 7 and sum(layer.routed for layer in layers) == 21
    for layer in layers:
        for name, p in layer.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.dtype == torch.float32, name
                assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_router_under_autocast_saves_no_float32_copy_and_backward_may_run_inside_autocast():
    layer = make_layer("top-k", torch.bfloat16, torch.bfloat16)
    x = torch.randn(T, D_IN, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = layer.router(x)
    assert logits.dtype == torch.float32
    assert (torch.float32, (T, D_IN)) not in saved and (torch.bfloat16, (T, D_IN)) in saved
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.router.weight.grad.dtype == torch.float32
    assert torch.isfinite(layer.router.weight.grad).all() and layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["top-k", "top-p", "null experts"])
def test_built_in_balance_loss_under_autocast_bf16(variant):
    """The gradient the layer attaches equals adding ``coef · balance_loss()`` to the loss by hand."""
    layer = make_layer(variant, torch.bfloat16, torch.float32).train()
    x = torch.randn(3, 11, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, 7:] = 0
    weight = torch.randn(3, 11, D_OUT, generator=torch.Generator().manual_seed(3))
    grads = []
    for built_in in (True, False):
        layer.balance_coef, layer.token_mask = (0.3 if built_in else 0.0), mask
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (layer(x).float() * weight).sum()
        if not built_in:
            loss = loss + 0.3 * layer.balance_loss(mask)
        else:
            torch.testing.assert_close(layer.last_balance, layer.balance_loss(mask).detach())
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in layer.named_parameters() if p.requires_grad})
        layer.zero_grad(set_to_none=True)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_evaluation_under_autocast_takes_the_module_path(variant, monkeypatch):
    """Without autograd under bf16 autocast (evaluation in a bf16 run) the layer leaves its direct inference path
    and calls its modules, so the router keeps its float32 logits: the output is exactly that of the module path
    (forced by a global forward hook, as hook-based sharding would)."""
    layer = make_layer(variant, torch.float32, torch.float32).eval()
    x = torch.randn(T, D_IN, generator=torch.Generator().manual_seed(1))
    direct = []
    infer = LoraMoELinear._infer
    monkeypatch.setattr(LoraMoELinear, "_infer", lambda self, x: direct.append(1) or infer(self, x))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: None)
        try:
            expected = layer(x)
        finally:
            hook.remove()
    assert direct == []
    assert torch.equal(out, expected)
