"""The packed layer equals the per-expert loop reference: outputs and gradients, for every routing variant."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from moela.layer import LoraMoELinear
from moela.reference import loop_forward, reference_gates

D_IN, D_OUT, T = 12, 10, 37


def make_layer(ranks, seed=0, base=None, **kwargs) -> LoraMoELinear:
    torch.manual_seed(seed)
    base = base if base is not None else nn.Linear(D_IN, D_OUT)
    base.requires_grad_(False)
    layer = LoraMoELinear(base, ranks, **kwargs).double()
    nn.init.normal_(layer.lora_B.weight)  # B = 0 at init would hide every expert-side error
    if layer.router is not None:
        layer.router.double()
    return layer


def inputs(seed=1):
    return torch.randn(T, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_close(actual, expected, msg=None):
    """Equal up to float32 rounding of the per-expert scales s_i (the layer keeps them in float32)."""
    scale = max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * scale, msg=msg)


def grads(layer, out):
    out.pow(2).sum().backward()
    named = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad()
    return named


CASES = {
    "heterogeneous top-2": dict(ranks=[2, 4, 6, 8, 2, 4, 6, 8], top_k=2),
    "top-1": dict(ranks=[3, 1, 5], top_k=1),
    "top-k = E": dict(ranks=[2, 3], top_k=2),
    "single expert (LoRA)": dict(ranks=[8], top_k=1),
    "rslora": dict(ranks=[1, 4, 9], top_k=2, scaling="rslora"),
    "top-p": dict(ranks=[2, 4, 6, 8], top_p=0.5, max_k=3),
    "null experts": dict(ranks=[4, 4, 8], top_k=2, num_null=2),
    "null experts top-p": dict(ranks=[4, 2], top_p=0.7, num_null=2),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_packed_equals_per_expert_reference(case):
    layer = make_layer(**CASES[case])
    x = inputs()
    packed = layer(x)
    needs_exact_gates = layer.top_p is not None or layer.num_null
    gates = reference_gates(layer, x) if (needs_exact_gates and layer.router is not None) else None
    if gates is not None:
        # the reference gates are constants; route the packed layer's router gradient the same way
        torch.testing.assert_close(layer.route(x).gates()[:, :layer.num_experts], gates)
        ref = loop_forward(layer, x, gates)
        assert_close(packed, ref)
        return
    ref = loop_forward(layer, x)
    assert_close(packed, ref)
    g_packed, g_ref = grads(layer, layer(x)), grads(layer, loop_forward(layer, x))
    assert set(g_packed) == set(g_ref)
    for name in g_packed:
        assert_close(g_packed[name], g_ref[name], msg=name)


def test_top_p_and_null_gradients_match_reference_with_same_selection():
    """With the selection fixed, gradients through the gates equal those of the loop (float64)."""
    for kwargs in (CASES["top-p"], CASES["null experts"]):
        layer = make_layer(**kwargs)
        x = inputs(2)
        g_packed = grads(layer, layer(x))
        selected = layer.last_stats.selected
        logits = layer.router(x)
        masked = logits[:, :layer.num_experts].masked_fill(~selected[:, :layer.num_experts], float("-inf"))
        gates = masked.softmax(-1).nan_to_num(0.0)
        g_ref = grads(layer, loop_forward(layer, x, gates))
        for name in g_packed:
            assert_close(g_packed[name], g_ref[name], msg=name)


def test_null_expert_tokens_use_fewer_real_experts():
    layer = make_layer([4, 4], top_k=2, num_null=3)
    x = inputs(3)
    layer(x)
    real = layer.last_stats.selected[:, :2].sum(-1)
    assert (real < 2).any(), "with 3 null experts some tokens should pick a null one"
    gates = layer.route(x).gates()[:, :2]
    torch.testing.assert_close(gates.sum(-1)[real > 0], torch.ones(int((real > 0).sum()), dtype=gates.dtype))
    assert torch.all(gates[real == 0] == 0)


def test_top_p_selects_smallest_set_reaching_mass():
    layer = make_layer([1, 1, 1, 1, 1], top_p=0.6)
    x = inputs(4)
    layer(x)
    selected = layer.last_stats.selected
    probs = layer.router(x).softmax(-1)
    for t in range(T):
        chosen = probs[t][selected[t]]
        assert chosen.sum() >= 0.6 - 1e-12
        assert chosen.sum() - chosen.min() < 0.6  # dropping the weakest chosen expert would fall short
        assert (~selected[t]).all() or chosen.min() >= probs[t][~selected[t]].max()


def test_conv1d_base_matches_linear_base():
    conv = Conv1D(D_OUT, D_IN)
    linear = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    a, b = make_layer([2, 3], seed=5, base=conv), make_layer([2, 3], seed=5, base=linear)
    x = inputs()
    torch.testing.assert_close(a(x), b(x))
    assert_close(a(x), loop_forward(a, x))


def test_zero_B_equals_base_and_disabled_is_base():
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    layer = LoraMoELinear(base, [2, 4], top_k=1)
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    nn.init.normal_(layer.lora_B.weight)
    assert not torch.allclose(layer(x), base(x))
    layer.disabled = True
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_batched_input_and_mixed_dtype():
    base = nn.Linear(D_IN, D_OUT).to(torch.bfloat16)
    layer = LoraMoELinear(base, [2, 4, 2], top_k=2, adapter_dtype=torch.float32)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.router.weight.dtype == torch.float32
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, D_IN, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (3, 5, D_OUT) and y.dtype == torch.bfloat16
    assert layer.last_stats.logits.shape == (3, 5, 3)


def test_router_is_called_as_a_module_and_upcasts_with_plain_gradients():
    """Sharding hooks (ZeRO-3, FSDP) see the router called; bf16 inputs get cast + linear's exact gradients."""
    layer = LoraMoELinear(nn.Linear(D_IN, D_OUT).to(torch.bfloat16), [2, 4, 2], top_k=2)
    calls = []
    layer.router.register_forward_pre_hook(lambda module, args: calls.append(args[0].dtype))
    x = torch.randn(7, D_IN, dtype=torch.bfloat16, requires_grad=True)
    logits = layer.router(x)
    layer(x)
    assert calls == [torch.bfloat16, torch.bfloat16] and logits.dtype == torch.float32
    grad = torch.randn_like(logits)
    gx, gw = torch.autograd.grad(logits, (x, layer.router.weight), grad)
    x_ref = x.detach().clone().requires_grad_()
    ref = nn.functional.linear(x_ref.float(), layer.router.weight)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x_ref, layer.router.weight), grad)
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=1e-6)


def test_balance_loss_definition():
    layer = make_layer([2, 2, 2, 2], top_k=2)
    x = inputs()
    layer(x)
    probs = layer.router(x).softmax(-1)
    chosen = layer.last_stats.selected.double()
    f = chosen.sum(0) / (T * 2)
    expected = 4 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(layer.balance_loss(), expected)
    # uniform router → loss 1 (perfect balance)
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(x)
    torch.testing.assert_close(layer.balance_loss(), torch.tensor(1.0, dtype=torch.float64))


def test_balance_loss_ignores_padding_and_averages_null_experts():
    layer = make_layer([2, 2], top_k=1, num_null=2)
    x = torch.randn(2, 6, D_IN, dtype=torch.float64)
    layer(x)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    full = layer.balance_loss(mask)
    probs = layer.last_stats.logits.softmax(-1)[mask.bool()]
    chosen = layer.last_stats.selected[mask.bool()].double()
    f, p = chosen.mean(0), probs.mean(0)
    f[2:], p[2:] = f[2:].mean(), p[2:].mean()
    torch.testing.assert_close(full, 4 * (f * p).sum())
    assert not torch.allclose(full, layer.balance_loss())
    full.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_single_expert_has_no_router_and_no_stats():
    layer = make_layer([4])
    layer(inputs())
    assert layer.router is None and layer.balance_loss() is None


def test_invalid_layer_arguments():
    with pytest.raises(ValueError, match="ranks"):
        LoraMoELinear(nn.Linear(4, 4), [])
    with pytest.raises(ValueError, match="ranks"):
        LoraMoELinear(nn.Linear(4, 4), [2, 0])
    with pytest.raises(ValueError, match="scaling"):
        LoraMoELinear(nn.Linear(4, 4), [2], scaling="dora")
    with pytest.raises(TypeError, match="not a linear layer"):
        LoraMoELinear(nn.Embedding(4, 4), [2])


BALANCED = {name: CASES[name] for name in ("heterogeneous top-2", "top-p", "null experts", "null experts top-p")}


def balance_grads(layer, x, coef, explicit, token_mask=None, autocast=None):
    """Gradients of ``(y · w).sum()`` (+ ``coef · L_bal`` added by hand when ``explicit``) w.r.t. the layer's
    parameters and the input, and the output."""
    x = x.detach().clone().requires_grad_()
    layer.balance_coef = 0.0 if explicit else coef
    layer.token_mask = token_mask
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        y = layer(x)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    loss = (y.double() * w).sum()
    if explicit:
        loss = loss + coef * layer.balance_loss(token_mask)
    loss.backward()
    named = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    named["input"] = x.grad
    layer.zero_grad(set_to_none=True)
    return named, y.detach()


@pytest.mark.parametrize("case", BALANCED, ids=list(BALANCED))
def test_built_in_balance_loss_adds_its_gradient_to_the_router(case):
    layer = make_layer(**BALANCED[case]).train()
    x = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    for token_mask, expected_mask in ((None, None), (mask, mask), (mask.bool().reshape(15), mask),
                                      (mask[:, :4], None)):  # a mask of another size is ignored
        expected, y_expected = balance_grads(layer, x, 0.5, explicit=True, token_mask=expected_mask)
        built_in, y = balance_grads(layer, x, 0.5, explicit=False, token_mask=token_mask)
        torch.testing.assert_close(y, y_expected, rtol=0, atol=0)
        assert set(built_in) == set(expected)
        for name in expected:
            assert_close(built_in[name], expected[name], msg=name)
        torch.testing.assert_close(layer.last_balance, layer.balance_loss(expected_mask).detach())
    plain, _ = balance_grads(layer, x, 0.0, explicit=False)
    assert layer.last_balance is None
    assert not torch.allclose(plain["router.weight"], built_in["router.weight"])
    for name in ("lora_A.weight", "lora_B.weight"):
        assert_close(plain[name], built_in[name], msg=name)


def test_balance_coef_zero_eval_and_no_grad_add_nothing():
    layer = make_layer(**CASES["heterogeneous top-2"]).train()
    x = inputs()
    plain, y = balance_grads(layer, x, 0.0, explicit=False)
    assert layer.last_balance is None
    reference, _ = balance_grads(layer.eval(), x, 0.0, explicit=True)  # the eval-mode layer computes the same
    for name in plain:
        torch.testing.assert_close(plain[name], reference[name], rtol=0, atol=0)
    evaluated, y_eval = balance_grads(layer.eval(), x, 0.5, explicit=False)
    assert layer.last_balance is None
    for name in plain:
        torch.testing.assert_close(evaluated[name], plain[name], rtol=0, atol=0)
    layer.train()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    assert layer.last_balance is None


def test_built_in_balance_loss_output_allows_in_place_ops_and_skips_frozen_router():
    layer = make_layer(**CASES["top-p"]).train()
    layer.balance_coef = 0.1
    x = inputs()
    y = layer(x)
    y.mul_(2)  # a later in-place op (activation, residual) must not break the custom backward
    y.sum().backward()
    assert layer.router.weight.grad is not None
    layer.zero_grad()
    layer.router.requires_grad_(False)
    layer(x).sum().backward()
    assert layer.router.weight.grad is None and layer.lora_A.weight.grad is not None


GENERATION = {"top-k": dict(ranks=[2, 4, 2, 4], top_k=2), "top-p": dict(ranks=[2, 4, 2, 4], top_p=0.6, max_k=3),
              "null experts": dict(ranks=[4, 2, 4], top_k=2, num_null=2)}


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("routing", GENERATION)
def test_greedy_generation_equals_reference(routing, batch_size):
    """Greedy decoding with the KV cache (a few tokens per forward) gives the tokens and logits of the same
    model computed by the literal definitions (per-token reference gates, per-expert loop)."""
    from transformers import GenerationConfig

    from moela.reference import ReferenceLoraMoELinear

    from tests.helpers import tiny_model

    models = []
    for cls in (LoraMoELinear, ReferenceLoraMoELinear):
        model = tiny_model("llama")
        torch.manual_seed(3)
        for name in [n for n, _ in model.named_modules() if n.endswith("_proj")]:
            layer = cls(model.get_submodule(name), **GENERATION[routing])
            nn.init.normal_(layer.lora_B.weight, std=0.3)
            model.set_submodule(name, layer)
        models.append(model.double().eval())  # router and gate scales too: the comparison is float64-exact
    prompt = torch.randint(3, 97, (batch_size, 5), generator=torch.Generator().manual_seed(batch_size))
    config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
    packed, reference = (model.generate(prompt, generation_config=config) for model in models)
    assert torch.equal(packed.sequences, reference.sequences)
    for step, (a, b) in enumerate(zip(packed.logits, reference.logits)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"step {step}")


@pytest.mark.parametrize("module", ["base_layer", "lora_A"])
@pytest.mark.parametrize("wrap", ["forward hook", "own forward"])
def test_inference_calls_a_module_that_is_hooked_or_wraps_its_forward(module, wrap):
    """Without autograd the layer reads plain ``nn.Linear`` weights directly; a base layer or adapter module with
    a hook of its own, or a ``forward`` of its own (accelerate's offloading wraps it so), is called instead, with
    the same output."""
    layer = make_layer(**CASES["heterogeneous top-2"]).eval()
    x = inputs()
    with torch.no_grad():
        expected = layer(x)
    calls, target = [], getattr(layer, module)
    if wrap == "forward hook":
        target.register_forward_hook(lambda *_: calls.append(1))
    else:
        forward = target.forward
        target.forward = lambda t: calls.append(1) or forward(t)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    assert calls == [1]


def test_every_expert_selected_routes_by_the_full_softmax():
    layer = make_layer(**CASES["top-k = E"])
    x = inputs()
    layer(x)
    assert layer.last_stats.selected.all()
    torch.testing.assert_close(layer.route(x).gates(), layer.router(x).softmax(-1))
    torch.testing.assert_close(layer.balance_loss(), torch.tensor(1.0, dtype=torch.float64))  # f_i = 1/E


INFERENCE = {**GENERATION, "single expert (LoRA)": dict(ranks=[4], top_k=1), "every expert": dict(ranks=[2, 4], top_k=2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("routing", INFERENCE)
def test_inference_path_equals_module_call_path(routing, batch_size, dtype, monkeypatch):
    """Greedy decoding without autograd takes the direct path on the weights (``_infer``); it gives exactly the
    tokens, logits and routing of the module-call path (forced here by a global forward hook, as hook-based
    sharding would), and a forward with autograd on gives exactly its logits."""
    from transformers import GenerationConfig

    from tests.helpers import tiny_model

    model = tiny_model("llama").to(dtype)
    torch.manual_seed(3)
    for name in [n for n, _ in model.named_modules() if n.endswith("_proj")]:
        layer = LoraMoELinear(model.get_submodule(name), **INFERENCE[routing])
        nn.init.normal_(layer.lora_B.weight, std=0.3)
        model.set_submodule(name, layer)
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, LoraMoELinear)]
    direct = []
    infer = LoraMoELinear._infer
    monkeypatch.setattr(LoraMoELinear, "_infer", lambda self, x: direct.append(1) or infer(self, x))
    prompt = torch.randint(3, 97, (batch_size, 5), generator=torch.Generator().manual_seed(batch_size))
    config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)

    def generate():
        out = model.generate(prompt, generation_config=config)
        stats = [layer.last_stats for layer in layers]
        return out, [None if s is None else (s.logits, s.selected) for s in stats]

    fast, fast_stats = generate()
    assert len(direct) == len(layers) * config.max_new_tokens
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: None)
    try:
        slow, slow_stats = generate()
    finally:
        hook.remove()
    assert len(direct) == len(layers) * config.max_new_tokens  # the hook sent every forward down the module calls
    assert torch.equal(fast.sequences, slow.sequences)
    for step, (a, b) in enumerate(zip(fast.logits, slow.logits)):
        assert torch.equal(a, b), f"step {step}"
    for a, b in zip(fast_stats, slow_stats):
        assert (a is None) == (b is None) == (INFERENCE[routing]["ranks"] == [4])
        if a is not None:
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with torch.no_grad():
        logits = model(fast.sequences).logits
    assert torch.equal(logits, model(fast.sequences).logits.detach())
