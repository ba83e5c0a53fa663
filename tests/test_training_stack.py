"""moela inside the users' own stack: the PEFT-style MoelaModel, the plain transformers Trainer, TRL's
SFTTrainer and a plain loop; the balance loss reaching the routers whatever computes the task loss."""

from __future__ import annotations

import pytest
import torch
import transformers
from datasets import Dataset

import moela
from moela import AllocationPlan, MoelaModel
from tests.helpers import batch, byte_tokenizer, tiny_model


def lm_dataset(n: int = 16, length: int = 12) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (n, length), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * n, "labels": ids})


def routed_plan(model) -> AllocationPlan:
    return AllocationPlan.uniform(model, ["q_proj", "v_proj", "down_proj"], experts=3, rank=2, top_k=2)


def randomise(model) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in moela.moela_layers(model):
            layer.lora_B.weight.normal_(0, 0.05)


def test_save_pretrained_from_pretrained_and_unload_round_trip(tmp_path):
    base_state = {k: v.clone() for k, v in tiny_model("llama").state_dict().items()}
    wrapped = moela.get_moela_model(tiny_model("llama"), routed_plan(tiny_model("llama")))
    randomise(wrapped)
    inputs = batch()
    with torch.no_grad():
        adapted = wrapped(**inputs).logits
    wrapped.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    again = MoelaModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, adapted, rtol=0, atol=0)
    assert not any(p.requires_grad for p in again.parameters())
    base = wrapped.unload()
    assert not isinstance(base, MoelaModel) and not any("lora_" in k for k in base.state_dict())
    assert all(torch.equal(base.state_dict()[k], v) for k, v in base_state.items())  # bit for bit


def test_classifier_head_is_trained_saved_and_reloaded(tmp_path):
    model = tiny_model("bert")
    wrapped = moela.get_moela_model(model, AllocationPlan.uniform(model, ["query", "value"], experts=2, rank=2))
    assert wrapped.moela_config.modules_to_save == ["classifier"] and wrapped.classifier.weight.requires_grad
    with torch.no_grad():
        wrapped.classifier.weight.add_(1.0)
        randomise(wrapped)
        expected = wrapped(**batch()).logits
    wrapped.save_pretrained(tmp_path / "a")
    again = MoelaModel.from_pretrained(tiny_model("bert"), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch()).logits, expected, rtol=0, atol=0)


def test_merge_and_unload_folds_plain_lora_and_refuses_a_router():
    model = tiny_model("llama")
    wrapped = moela.get_moela_model(model, AllocationPlan.uniform(model, "all-linear", experts=1, rank=3))
    randomise(wrapped)
    with torch.no_grad():
        expected = wrapped(**batch()).logits
        merged = wrapped.merge_and_unload()
        torch.testing.assert_close(merged(**batch()).logits, expected, rtol=1e-5, atol=1e-5)
    assert not list(moela.moela_layers(merged))
    routed = moela.get_moela_model(tiny_model("llama"), routed_plan(tiny_model("llama")))
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.self_attn\.q_proj' has 3 experts"):
        routed.merge_and_unload()


def test_wrapper_passes_attributes_and_generates():
    wrapped = moela.get_moela_model(tiny_model("llama"), routed_plan(tiny_model("llama")))
    assert wrapped.config.hidden_size == 32 and wrapped.device.type == "cpu"
    out = wrapped.generate(batch()["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch()["input_ids"].shape[1] + 3
    trainable, total = wrapped.get_nb_trainable_parameters()
    assert trainable == routed_plan(tiny_model("llama")).num_trainable(tiny_model("llama")) and total > trainable


def trainer(model, tmp_path, **args) -> transformers.Trainer:
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                    logging_steps=1, save_strategy="steps", save_steps=2, report_to="none", use_cpu=True,
                    disable_tqdm=True, seed=0) | args
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**settings),
                                train_dataset=lm_dataset())


def test_trainer_checkpoints_hold_the_adapter_only_and_resume(tmp_path):
    wrapped = moela.get_moela_model(tiny_model("llama"), routed_plan(tiny_model("llama")))
    run = trainer(wrapped, tmp_path)
    run.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "model.safetensors"))
    assert saved and all(".lora_" in k or ".router." in k or k == "_extra_state" for k in saved)
    run.save_model(str(tmp_path / "final"))
    reloaded = MoelaModel.from_pretrained(tiny_model("llama"), tmp_path / "final")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch()).logits, wrapped(**batch()).logits, rtol=0, atol=0)
    resumed = moela.get_moela_model(tiny_model("llama"), routed_plan(tiny_model("llama")))
    trainer(resumed, tmp_path).train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(wrapped.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def router_weights(model) -> torch.Tensor:
    return torch.cat([layer.router.weight.detach().flatten() for _, layer in moela.moela_layers(model) if layer.routed])


def trained_routers(make_trainer, coef: float) -> torch.Tensor:
    model = tiny_model("llama")
    wrapped = moela.get_moela_model(model, routed_plan(model), balance_coef=coef)
    make_trainer(wrapped).train()
    return router_weights(wrapped)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_plain_trainer_applies_the_balance_loss(tmp_path, bf16):
    def make(model):
        return trainer(model, tmp_path, max_steps=1, save_strategy="no", bf16=bf16, learning_rate=1e-1,
                       lr_scheduler_type="constant")
    with_balance, without = trained_routers(make, 10.0), trained_routers(make, 0.0)
    assert not torch.allclose(with_balance, without), "the balance loss never reached the routers"


def test_trl_sft_trainer_with_its_default_loss_applies_the_balance_loss(tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is in the dev extra")
    texts = Dataset.from_dict({"input_ids": lm_dataset()["input_ids"]})

    def make(model):
        config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=4,
                               learning_rate=1e-1, lr_scheduler_type="constant", report_to="none", use_cpu=True,
                               save_strategy="no", disable_tqdm=True, max_length=16)
        return trl.SFTTrainer(model=model, args=config, train_dataset=texts, processing_class=byte_tokenizer())
    with_balance, without = trained_routers(make, 10.0), trained_routers(make, 0.0)
    assert not torch.allclose(with_balance, without), "the balance loss never reached the routers"


def test_plain_loop_under_autocast_applies_the_balance_loss():
    def step(coef: float) -> torch.Tensor:
        model = tiny_model("llama")
        wrapped = moela.get_moela_model(model, routed_plan(model), balance_coef=coef).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wrapped(**batch(), labels=batch()["input_ids"]).loss
        loss.backward()
        return torch.cat([layer.router.weight.grad.flatten() for _, layer in moela.moela_layers(wrapped)])
    assert not torch.allclose(step(1.0), step(0.0))
