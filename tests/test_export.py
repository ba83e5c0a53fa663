"""``moela export --to peft``: a LoRA-only run loads in PEFT with the same logits; routed plans are refused."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from moela.cli import main
from moela.adapter import load_adapter
from tests.helpers import classification_files, lm_config, save_tiny

peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'moela[peft]')")


def ids() -> torch.Tensor:
    return torch.tensor([[5, 70, 80, 90, 100, 110, 3], [9, 8, 7, 6, 5, 4, 3]])


@pytest.mark.parametrize("scaling", ["lora", "rslora"])
def test_lora_plan_exports_to_peft_with_equal_logits(tmp_path, tiny_lm, scaling):
    # per-module ranks differ (a rank pattern) so that PEFT's rank_pattern and scaling are exercised
    plan = tmp_path / "plan.json"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm)
    modules = {name: {"ranks": [2 + i % 3], "top_k": 1} for i, (name, m) in enumerate(model.named_modules())
               if name.endswith(("q_proj", "v_proj", "down_proj"))}
    plan.write_text(json.dumps({"modules": modules}))
    config = lm_config(tmp_path, tiny_lm, adapter={"plan": str(plan), "scaling": scaling, "dropout": 0.0},
                       train={"max_steps": 3, "lr": 5e-2})
    assert main(["run", str(config), "eval.max_new_tokens=1"]) == 0
    run = tmp_path / "run"
    assert main(["export", "--to", "peft", str(run), str(tmp_path / "peft")]) == 0
    exported = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA" and exported["use_rslora"] == (scaling == "rslora")

    ours = load_adapter(transformers.AutoModelForCausalLM.from_pretrained(tiny_lm), run / "adapter").eval()
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny_lm),
                                            str(tmp_path / "peft")).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    with torch.no_grad():
        expected, got, plain = ours(ids()).logits, theirs(ids()).logits, base(ids()).logits
    assert not torch.allclose(expected, plain, atol=1e-4)  # training moved the adapter away from zero
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_classifier_head_goes_to_modules_to_save(tmp_path):
    bert = save_tiny(tmp_path / "bert", "bert")
    train, dev = classification_files(tmp_path, 24, 8)
    run = tmp_path / "run"
    config = tmp_path / "cls.yaml"
    config.write_text(f"model: {{name_or_path: {bert}, task: sequence_classification}}\n"
                      f"data: {{train: {train}, eval: {dev}}}\n")
    assert main(["run", str(config), "adapter.method=lora", "adapter.options={rank: 2}", "train.max_steps=3",
                 "train.lr=5e-2", "train.progress=false", f"output_dir={run}"]) == 0
    assert main(["export", "--to", "peft", str(run), str(tmp_path / "peft")]) == 0
    ours = load_adapter(transformers.AutoModelForSequenceClassification.from_pretrained(bert), run / "adapter").eval()
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForSequenceClassification.from_pretrained(bert),
                                            str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids()).logits, ours(ids()).logits, rtol=1e-5, atol=1e-5)


def test_routed_plan_is_refused_naming_the_module(tmp_path, tiny_lm, capsys):
    config = lm_config(tmp_path, tiny_lm, train={"max_steps": 1})
    assert main(["run", str(config), "eval.max_new_tokens=1"]) == 0
    capsys.readouterr()
    assert main(["export", "--to", "peft", str(tmp_path / "run"), str(tmp_path / "peft")]) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj" in err and "2 experts" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "peft").exists()
