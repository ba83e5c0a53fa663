"""Every registered allocator: deterministic for a seed, within ±2% of a budget, meta recorded, plan valid."""

from __future__ import annotations

import json

import pytest
import torch

from moela.allocators import allocate, available
from moela.plan import AllocationPlan

from tests.helpers import ARCHITECTURES, TARGETS, examples, tiny_model

OPTIONS = {"sensitivity": {"mode": "proportional"}, "guilomo": {"max_steps": 3, "batch_size": 4},
           "prune": {"warmup": 3, "refit": 2, "batch_size": 4}}
DATA_DRIVEN = {"sensitivity", "guilomo", "gradspec", "prune"}


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops run faster on one thread


def test_every_builtin_is_covered():
    assert set(available()) >= {"uniform", "lora", "mola", "hilo", "sensitivity", "alphalora", "guilomo"}


@pytest.mark.parametrize("method", ["uniform", "mola", "hilo", "sensitivity", "alphalora", "guilomo", "gradspec",
                                    "prune"])
def test_deterministic_budgeted_and_recorded(method, tmp_path):
    model = tiny_model("qwen2")
    data = examples(12) if method in DATA_DRIVEN else None
    kwargs = dict(budget="uniform:E=3,r=8", data=data, seed=7, **OPTIONS.get(method, {}))
    plan = allocate(method, model, **kwargs)
    again = allocate(method, model, **kwargs)
    assert plan.to_dict()["modules"] == again.to_dict()["modules"]
    target = plan.meta["budget"]["target"]
    assert abs(plan.num_trainable(model) - target) <= 0.02 * target
    assert plan.meta["budget"]["achieved"] == plan.num_trainable(model)
    assert plan.meta["method"] == method and isinstance(plan.meta["options"], dict)
    if method in DATA_DRIVEN:
        assert set(plan.meta["cost"]) == {"seconds", "steps", "examples"} and plan.meta["scores"]
    plan.save(tmp_path / "plan.json")
    loaded = AllocationPlan.load(tmp_path / "plan.json")
    assert loaded.to_dict() == json.loads((tmp_path / "plan.json").read_text())
    assert loaded.num_trainable(model) == plan.num_trainable(model)


def test_data_driven_allocators_say_they_need_data():
    for method in DATA_DRIVEN:
        with pytest.raises(ValueError, match="needs data|at least 2"):
            allocate(method, tiny_model("llama"))


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_model_dependent_allocators_on_every_architecture(kind):
    model = tiny_model(kind)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = examples(12, classify=kind == "bert")
    for method in ("sensitivity", "alphalora", "guilomo", "gradspec", "prune"):
        plan = allocate(method, model, targets=TARGETS[kind], data=data, **OPTIONS.get(method, {}))
        plan.validate(model)
        assert plan.meta["budget"]["achieved"] == plan.num_trainable(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
