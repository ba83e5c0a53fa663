"""``moela.teacher_loss``: a teacher's distributions as the probe loss of the data-driven allocators."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import moela
from moela import AllocationPlan, load_settings
from moela.distillation import kl_to_teacher

from tests.helpers import TINY, batch, lm_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def planted_pair(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny Llama (weights large enough that its outputs are far from uniform) and the same model with a rank-4
    change of ``model.layers.1.mlp.down_proj``."""
    torch.manual_seed(0)
    student = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**TINY, initializer_range=0.2)).eval()
    teacher = copy.deepcopy(student)
    g = torch.Generator().manual_seed(seed)
    weight = teacher.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        u = torch.linalg.qr(torch.randn(weight.shape[0], 4, generator=g))[0]
        v = torch.linalg.qr(torch.randn(weight.shape[1], 4, generator=g))[0]
        weight.add_(u @ v.T)
    return student, teacher


def test_the_loss_is_the_kl_over_the_scored_positions_and_the_forward_comes_back():
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    inputs = batch(size=3, length=9)
    labels = inputs["input_ids"].clone()
    labels[0, -2:] = -100  # padding
    labels[1, :4] = -100  # a prompt
    with torch.no_grad():
        logits, target = student(**inputs).logits, teacher(**inputs).logits
    mask = labels[:, 1:] != -100
    expected = kl_to_teacher(logits[:, :-1], target[:, :-1].log_softmax(-1), mask)
    manual = (target[:, :-1].softmax(-1) * (target[:, :-1].log_softmax(-1) - logits[:, :-1].log_softmax(-1))).sum(-1)
    torch.testing.assert_close(expected, manual[mask].mean())

    teacher.train()
    with moela.teacher_loss(student, teacher, positions="labels") as model:
        assert model is student
        loss = student(**inputs, labels=labels).loss
        torch.testing.assert_close(loss, expected)
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        assert all(p.grad is None for p in teacher.parameters())
        unlabelled = student(**inputs).loss  # no labels: the positions the attention mask keeps
        kept = inputs["attention_mask"].bool()
        torch.testing.assert_close(unlabelled, kl_to_teacher(logits, target.log_softmax(-1), kept))
        nothing = student(**inputs, labels=torch.full_like(labels, -100)).loss
        assert nothing == 0 and nothing.requires_grad  # no scored position: 0, not NaN
    with moela.teacher_loss(student, teacher):  # the default, positions="inputs": labels ignored
        torch.testing.assert_close(student(**inputs, labels=labels).loss, unlabelled)
    with pytest.raises(ValueError, match="positions"), moela.teacher_loss(student, teacher, positions="tokens"):
        pass
    assert "forward" not in student.__dict__ and teacher.training
    ce = student(**inputs, labels=labels).loss
    assert not torch.allclose(ce, expected)  # the model's own loss again

    with moela.teacher_loss(student, copy.deepcopy(student)):
        assert student(**inputs, labels=labels).loss.abs() < 1e-6  # a teacher equal to the model: KL 0


def test_sequence_classification_and_unshifted_tokens():
    student, teacher = tiny_model("bert", seed=0), tiny_model("bert", seed=1)
    inputs = batch(size=4)
    with torch.no_grad():
        logits, target = student(**inputs).logits, teacher(**inputs).logits
    with moela.teacher_loss(student, teacher):
        loss = student(**inputs, labels=torch.tensor([0, 2, 1, 0])).loss
    torch.testing.assert_close(loss, kl_to_teacher(logits, target.log_softmax(-1)))

    lm, lm_teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, 3] = 5  # score position 3 only
    with torch.no_grad():
        logits, target = lm(**inputs).logits, lm_teacher(**inputs).logits
    with moela.teacher_loss(lm, lm_teacher, shift=False, positions="labels"):
        loss = lm(**inputs, labels=labels).loss
    torch.testing.assert_close(loss, kl_to_teacher(logits[:, 3], target[:, 3].log_softmax(-1)))


def test_a_teacher_with_another_vocabulary_is_refused_by_name():
    student = tiny_model("llama")
    torch.manual_seed(0)
    other = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**TINY, "vocab_size": 101}))
    with moela.teacher_loss(student, other), pytest.raises(ValueError, match="share the vocabulary"):
        student(**batch())
    assert "forward" not in student.__dict__


@pytest.mark.parametrize("seed", [0, 1])
def test_prune_with_a_teacher_keeps_the_changed_map(seed):
    student, teacher = planted_pair(seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (64, 16), generator=g)
    data = [{"input_ids": r.tolist(), "attention_mask": [1] * 16, "labels": r.tolist()} for r in ids]
    with torch.no_grad():
        base_kl = float(kl_to_teacher(student(input_ids=ids).logits, teacher(input_ids=ids).logits.log_softmax(-1)))
    with moela.teacher_loss(student, teacher):
        plan = moela.allocate("prune", student, targets="all-linear", data=data, keep=0.1, warmup=40, refit=10,
                              lr=1e-2, batch_size=8, seed=seed)
    final = plan.meta["scores"]["final"]
    changed = "model.layers.1.mlp.down_proj"
    assert changed in plan.modules
    assert final[changed] > 0.5 * base_kl  # its adapter carries most of the change
    assert all(abs(v) < 0.01 * final[changed] for n, v in final.items() if n != changed)


def test_a_run_allocates_with_the_teacher_it_names(tmp_path, tiny_lm, monkeypatch):
    from moela import pipeline

    seen = {}

    def recording(method, model, *, data, **kwargs):  # the probe loss the allocator would see on the first batch
        inputs = {k: v for k, v in next(iter(data)).items() if k != "task"}
        with torch.no_grad():
            seen[method, "teacher" if "forward" in model.__dict__ else "labels"] = float(model(**inputs).loss)
        return AllocationPlan.uniform(model, "all-linear", experts=1, rank=2, top_k=1)

    monkeypatch.setattr(pipeline, "allocate", recording)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm)  # the base with a changed final norm
    with torch.no_grad():
        teacher.model.norm.weight.mul_(30.0)  # sharper next-token distributions than the base's
    teacher.save_pretrained(tmp_path / "teacher")
    for path in (None, str(tmp_path / "teacher")):
        config = lm_config(tmp_path, tiny_lm, adapter={"method": "sensitivity", "teacher": path, "options": {}})
        ((plan, model),) = pipeline.plan_only(load_settings(config))
        assert "forward" not in model.__dict__  # the model's own forward once the plan is made
    first = next(iter(pipeline.make_loader(pipeline.prepare(load_settings(config)).train_features[:256], 0,
                                           batch_size=4, seed=0)))
    with torch.no_grad():
        logits = model(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
        target = teacher(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
    expected = kl_to_teacher(logits, target.log_softmax(-1), first["attention_mask"].bool())  # every input position
    assert seen["sensitivity", "labels"] > 1.0  # cross-entropy of the labels
    assert seen["sensitivity", "teacher"] == pytest.approx(float(expected), rel=1e-4) and expected > 1e-3

    untrained = tmp_path / "untrained"  # a teacher whose checkpoint lacks weights the task needs
    state = {k: v for k, v in teacher.state_dict().items() if "lm_head" not in k and "embed" not in k}
    teacher.save_pretrained(untrained, state_dict=state)
    config = lm_config(tmp_path, tiny_lm, adapter={"method": "sensitivity", "teacher": str(untrained), "options": {}})
    with pytest.raises(ValueError, match="has no weights for"):
        pipeline.plan_only(load_settings(config))


def test_a_teacher_is_checked_before_any_work(tmp_path, tiny_lm):
    from moela.checks import preflight

    def settings(method: str, teacher: str):
        return load_settings(lm_config(tmp_path, tiny_lm, adapter={"method": method, "teacher": teacher,
                                                                   "options": {}}))

    with pytest.raises(ValueError, match="'adapter.teacher' and 'adapter.plan' are both set"):
        preflight(load_settings(lm_config(tmp_path, tiny_lm, adapter={
            "method": "prune", "teacher": str(tiny_lm), "plan": str(tmp_path / "plan.json"), "options": {}})))
    with pytest.raises(ValueError, match=r"'adapter.teacher' is set, but no method of this run \(uniform\)"):
        preflight(settings("uniform", str(tiny_lm)))
    with pytest.raises(ValueError, match=r"adapter.teacher ./no-such-teacher: no such folder \(moved or deleted"):
        preflight(settings("prune", "./no-such-teacher"))
    other = tmp_path / "other"
    transformers.LlamaConfig(**{**TINY, "vocab_size": 101}).save_pretrained(other)
    with pytest.raises(ValueError, match="vocabulary of 101 tokens, the model"):
        preflight(settings("prune", str(other)))


def test_bf16_models_give_a_float32_loss_close_to_float32_models():
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    inputs = batch(size=2, length=9)
    labels = inputs["input_ids"].clone()
    with moela.teacher_loss(student, teacher):
        exact = student(**inputs, labels=labels).loss
    student, teacher = student.to(torch.bfloat16), teacher.to(torch.bfloat16)
    with moela.teacher_loss(student, teacher):
        low = student(**inputs, labels=labels).loss
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert exact > 1e-3  # the two models differ: a loss that bf16 rounding could hide is no test
    torch.testing.assert_close(low, exact, rtol=0.02, atol=1e-4)


def test_the_teacher_runs_without_dropout_and_must_be_a_separate_model():
    student, teacher = tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=1).train()  # GPT-2 has dropout
    inputs = batch()
    with moela.teacher_loss(student, teacher):
        first, second = student(**inputs).loss, student(**inputs).loss
    assert first > 0 and torch.equal(first, second)  # the teacher in eval mode: the same targets each time
    assert teacher.training  # and its mode back afterwards
    for same in (student, copy.copy(student)):  # itself, or a shallow copy sharing its parameters
        with pytest.raises(ValueError, match="shares parameters"), moela.teacher_loss(student, same):
            pass


def test_kl_counts_impossible_teacher_tokens_as_zero_and_refuses_a_regression_head():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    teacher = torch.tensor([[0.0, float("-inf"), float("-inf")]])  # all mass on token 0
    torch.testing.assert_close(kl_to_teacher(logits, teacher), -logits.log_softmax(-1)[0, 0])
    student, regression = tiny_model("bert"), tiny_model("bert", seed=1)
    student.classifier = torch.nn.Linear(32, 1)
    regression.classifier = torch.nn.Linear(32, 1)
    with moela.teacher_loss(student, regression), pytest.raises(ValueError, match="regression head"):
        student(**batch())
