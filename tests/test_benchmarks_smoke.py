"""The benchmark scripts' building blocks run and compare like with like (nothing is timed here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moela

from moela.reference import LoopLoraMoELinear, loop_forward

pytest.importorskip("peft")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_speed_variants_share_base_and_budget():
    layer_speed = load("layer_speed")
    ranks = [2, 4, 1]
    modules = layer_speed.build(16, ranks, 2, torch.float64, "cpu")
    peft_layer, packed = modules["peft"], modules["packed"]
    assert peft_layer.base_layer is packed.base_layer is modules["base"]
    lora = [p for p in peft_layer.parameters() if p.requires_grad]
    assert sum(p.numel() for p in lora) == sum(ranks) * 32
    x = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(packed(x), loop_forward(packed, x))
    for name in layer_speed.VARIANTS:
        layer_speed.step_fn(name, modules[name], x, torch.ones(9, 16, dtype=torch.float64))()
        assert x.grad is None and all(p.grad is None for p in modules[name].parameters())


def test_speed_variants_train_generate_and_match_budgets():
    speed = load("speed")
    args = speed.parse(["--hidden", "32", "--intermediate", "48", "--layers", "4", "--heads", "4", "--vocab", "97",
                        "--batch", "2", "--seq", "8", "--prompt", "3", "--new-tokens", "2"])
    built = {name: speed.build(name, args) for name in speed.VARIANTS}
    counts = {name: count for name, (_, count) in built.items()}
    assert counts["loop"] == counts["uniform"]
    per_rank = 7 * 4 * (32 + 32) + 4 * 3 * (32 + 48)  # one more PEFT rank adds this many parameters
    assert abs(counts["peft"] - counts["uniform"]) <= per_rank / 2
    assert abs(counts["hetero"] - counts["uniform"]) < 0.25 * counts["uniform"]
    loop_model, uniform_model = built["loop"][0], built["uniform"][0]
    assert all(isinstance(m, LoopLoraMoELinear) for m in loop_model.modules() if hasattr(m, "lora_A"))
    with torch.no_grad():
        for (name, p), q in zip(uniform_model.named_parameters(), loop_model.parameters()):
            p.copy_(torch.randn_like(p) if "lora_B" in name else p)
            q.copy_(p)
    ids = speed.batch(args)
    torch.testing.assert_close(loop_model(input_ids=ids).logits, uniform_model(input_ids=ids).logits)
    # the same gradients: each trains with the balance loss once (moela's layers add it, the loop's loss does;
    # counting it twice moves the routers' gradients by ~6e-4 here, the loop's float error is ~2e-5)
    for name in ("uniform", "loop"):
        speed.step_loss(name, built[name][0], ids).backward()
    for (name, p), q in zip(uniform_model.named_parameters(), loop_model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-4, msg=name)
            p.grad = q.grad = None
    for name, (model, _) in built.items():
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        speed.train_step_fn(name, model, ids)()
        after = [p for p in model.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), f"{name}: AdamW changed nothing"
        speed.generate_fn(model.eval(), args)()


def test_decode_profile_counts_every_adapted_module_per_token():
    decode_profile = load("decode_profile")
    args = decode_profile.speed.parse(["--hidden", "32", "--intermediate", "48", "--layers", "2", "--heads", "4",
                                       "--vocab", "97", "--prompt", "3", "--new-tokens", "3", "--threads", "1"])
    ops, wall_ms, forwards = decode_profile.op_table("uniform", args, 1)
    assert forwards == 3 and wall_ms > 0
    # one routing per adapted module and forward (the prompt's and 2 decoding steps)
    assert ops["aten::topk"][0] == len(decode_profile.speed.PROJECTIONS) * args.layers * forwards


def test_allocation_scale_counts_prune_rounds_as_the_allocator_runs_them():
    allocation_scale = load("allocation_scale")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=5,
                                         num_attention_heads=4, vocab_size=97))  # 35 targets, as stories260k
    data = [{"input_ids": [i % 97] * 8, "attention_mask": [1] * 8, "labels": [i % 97] * 8} for i in range(40)]
    plan = moela.allocate("prune", model, targets="all-linear", data=data, examples=40, batch_size=8, warmup=1,
                          refit=1)
    rounds, final = plan.meta["scores"]["rounds"], plan.meta["scores"]["final"]
    passes = sum(len(r) + 1 for r in rounds) + len(final) + 1
    assert allocation_scale.prune_passes(35) == (len(rounds), passes) == (6, 134)
    # the measured configuration (one round and the final ablation) has the passes its fit assumes
    measured = moela.allocate("prune", allocation_scale.build(0.0625, 1), targets="all-linear",
                              **allocation_scale.allocator_options("prune", 1, 8)).meta["scores"]
    passes = sum(len(r) + 1 for r in measured["rounds"]) + len(measured["final"]) + 1
    assert allocation_scale.prune_passes(7, drop=0.5, keep=0.5) == (len(measured["rounds"]), passes) == (1, 13)
    for method in allocation_scale.METHODS:  # every measured configuration runs
        row = allocation_scale.measure_one(method, 0.0625, 1, 1, 8)
        assert row["seconds"] > 0 and row["model_mib"] > 0
    row = allocation_scale.measure_taylor(0.0625, 1, 8, rounds=1, probes=1)  # prune's estimate="taylor"
    assert row["forward_s"] > 0 and row["taylor_s"] > 0 and len(row["ratios"]) == 1
    config = allocation_scale.llama_config(1.0, 80, "70b")  # Llama-2-70B's shape: P₇₀ weights per block
    head = config.hidden_size // config.num_attention_heads
    assert (2 * config.hidden_size**2 + 2 * config.hidden_size * config.num_key_value_heads * head
            + 3 * config.hidden_size * config.intermediate_size) == allocation_scale.P70
    row = allocation_scale.measure_one("sensitivity", 0.03125, 1, 1, 8, "70b")
    assert row["seconds"] > 0 and row["model_mib"] > 0
