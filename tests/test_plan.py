"""Plans: JSON round trips, target selection, accounting, and the clear error for each bad plan."""

from __future__ import annotations

import json

import pytest

import moela
from moela import AllocationPlan, ModulePlan
from moela.plan import layer_index, module_type
from tests.helpers import tiny_model


def test_round_trip_json(tmp_path):
    plan = AllocationPlan({"a.0.q": ModulePlan([2, 4], top_k=1), "a.1.q": ModulePlan([8]),
                           "a.2.q": ModulePlan([3, 3, 3], top_p=0.8, max_k=2), "a.3.q": ModulePlan([4, 4], num_null=2)},
                          meta={"method": "test", "scores": {"a.0.q": 0.5}})
    plan.save(tmp_path / "plan.json")
    again = AllocationPlan.load(tmp_path / "plan.json")
    assert again == plan
    assert again.to_dict()["modules"]["a.1.q"] == {"ranks": [8], "top_k": 1}
    assert AllocationPlan.from_dict(plan.to_dict()["modules"]).modules == plan.modules  # bare mapping


def test_uniform_plan_and_summary():
    model = tiny_model("llama")
    plan = AllocationPlan.uniform(model, ["q_proj", "v_proj"], experts=4, rank=8, top_k=2)
    assert len(plan) == 8 and all(spec.ranks == [8] * 4 and spec.top_k == 2 for spec in plan.modules.values())
    # q: 4·8·(32+32) + 4·32; v: 4·8·(32+16) + 4·32, over 4 layers
    assert plan.num_trainable(model) == 4 * (4 * 8 * 64 + 128 + 4 * 8 * 48 + 128)
    text = plan.summary(model)
    assert "model.layers.3.self_attn.v_proj" in text and f"{plan.num_trainable(model):,}" in text
    lora = AllocationPlan.uniform(model, ["q_proj"], experts=1, rank=4)
    assert all(spec.top_k == 1 for spec in lora.modules.values()) and lora.meta["method"] == "lora"


def test_find_targets_conventions():
    model = tiny_model("llama")
    assert len(moela.find_targets(model, "all-linear")) == 4 * 7
    assert "lm_head" not in moela.find_targets(model, "all-linear")
    assert moela.find_targets(model, r"model\.layers\.[01]\.mlp\.up_proj") == [
        "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert len(moela.find_targets(model, ["q_proj", "mlp.down_proj"])) == 8
    with pytest.raises(ValueError, match="match no linear module.*q_proj"):
        moela.find_targets(model, ["query"])


def test_depth_and_module_type():
    assert layer_index("model.layers.12.self_attn.q_proj") == 12
    assert module_type("model.layers.12.self_attn.q_proj") == "self_attn.q_proj"
    assert module_type("bert.encoder.layer.3.attention.output.dense") == "attention.output.dense"
    assert module_type("bert.encoder.layer.3.output.dense") == "output.dense"
    with pytest.raises(ValueError, match="no block index"):
        layer_index("lm_head")


BAD = [
    ({"model.layers.0.self_attn.q_proj": {"ranks": [4, 0]}}, "model.layers.0.self_attn.q_proj.*integer >= 1"),
    ({"model.layers.0.self_attn.q_proj": {"ranks": []}}, "model.layers.0.self_attn.q_proj.*non-empty"),
    ({"model.layers.0.self_attn.q_proj": {"ranks": [4, 4], "top_k": 3}}, "q_proj.*top_k=3.*number of experts \\(2\\)"),
    ({"model.layers.0.self_attn.q_proj": {"ranks": [4, 4], "top_k": 0}}, "q_proj.*top_k=0"),
    ({"model.layers.0.self_attn.q_proj": {"ranks": [4.5]}}, "q_proj.*integer"),
    ({"model.layers.0.self_attn.q_proj": {"ranks": [4], "experts": 3}}, "q_proj.*unknown field.*experts"),
    ({"model.layers.0.self_attn.q_proj": {"ranks": [4, 4], "top_p": 1.5}}, "q_proj.*top_p"),
    ({"model.layers.0.self_attn.q_proj": [4, 4]}, "q_proj.*expected an object with 'ranks'"),
    ({}, "at least one module"),
]


@pytest.mark.parametrize("data,message", BAD)
def test_bad_plan_entries(data, message):
    with pytest.raises(ValueError, match=message):
        AllocationPlan.from_dict(data)


def test_bad_plans_against_model():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="'model.layers.0.attn.q' does not exist.*another model.*model.layers.0.self_attn.q_proj"):
        AllocationPlan.from_dict({"model.layers.0.attn.q": {"ranks": [4]}}).validate(model)
    with pytest.raises(ValueError, match="'model.embed_tokens' is a Embedding, not a linear layer"):
        AllocationPlan.from_dict({"model.embed_tokens": {"ranks": [4]}}).num_trainable(model)


def test_load_names_file_and_line(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"modules": {\n "a": {"ranks": [1]},\n}}')
    with pytest.raises(ValueError, match=r"plan.json: line 3: not valid JSON"):
        AllocationPlan.load(path)
    path.write_text(json.dumps({"modules": {"x.0.q": {"ranks": [0]}}}))
    with pytest.raises(ValueError, match=r"plan.json: plan entry 'x.0.q'"):
        AllocationPlan.load(path)


def test_a_plan_built_from_plain_entries_is_checked_like_a_loaded_one():
    plan = AllocationPlan({"model.layers.0.mlp.up_proj": {"ranks": [4, 2], "top_k": 1}})
    assert plan.modules["model.layers.0.mlp.up_proj"] == ModulePlan(ranks=[4, 2], top_k=1)
    with pytest.raises(ValueError, match="plan entry 'x': expected an object with 'ranks'"):
        AllocationPlan({"x": {"rank": 2}})
    mixed = AllocationPlan({"a.0.q": ModulePlan([2]), "modules": {"ranks": [4]}})  # a module may be called so
    assert mixed.modules == {"a.0.q": ModulePlan([2]), "modules": ModulePlan([4])}
