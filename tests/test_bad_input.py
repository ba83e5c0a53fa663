"""Bad input through the ``moela`` command: non-zero exit and one line ``moela: error: …`` naming the file, line,
record, module or step at fault; a failed run is marked FAILED and keeps what was complete."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from moela import AllocationPlan, inject, save_adapter
from moela.cli import main
from moela.settings import load_settings
from tests.helpers import byte_tokenizer, classification_files, instruction_records, lm_config, save_tiny

GOOD = json.dumps(instruction_records(1)[0])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moela: error: "), err
    return err


@pytest.mark.parametrize("name, text, message", [
    ("bad.json", "[1, 2", r"bad\.json: line 1: not valid JSON"),
    ("bad.jsonl", GOOD + "\n\n{oops\n", r"bad\.jsonl: line 3: not valid JSON"),
    ("bad.jsonl", GOOD + '\n{"instruction": "q"}\n', r"bad\.jsonl: line 2: the record has neither 'output' nor 'answer'"),
    ("bad.json", json.dumps([{"output": "a"}]), r"bad\.json: record 0: field 'instruction' is missing"),
    ("empty.jsonl", "\n", r"empty\.jsonl: no records"),
    ("empty.json", "[]", r"empty\.json: no records"),
])
def test_bad_training_data(tmp_path, tiny_lm, capsys, name, text, message):
    config = lm_config(tmp_path, tiny_lm)
    (tmp_path / name).write_text(text)
    assert main(["train", str(config), f"data.train={tmp_path / name}"]) == 1
    assert re.search(message, one_line_error(capsys))
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_no_training_records(tmp_path, tiny_lm, capsys):
    assert main(["train", str(lm_config(tmp_path, tiny_lm)), "data.train=[]"]) == 1
    assert "data.train gives no training records" in one_line_error(capsys)


def test_label_outside_the_label_set(tmp_path, capsys):
    bert = save_tiny(tmp_path / "bert", "bert")
    train, dev = classification_files(tmp_path, 8, 4)
    train.write_text(train.read_text() + "\nc odd one\t2")
    config = tmp_path / "cls.yaml"
    config.write_text(f"model: {{name_or_path: {bert}, task: sequence_classification, num_labels: 2}}\n")
    assert main(["train", str(config), f"data.train={train}", f"data.eval={dev}", f"output_dir={tmp_path / 'run'}"]) == 1
    assert f"{train}: record 8: label 2 is outside the label set 0..1 (model.num_labels=2)" in one_line_error(capsys)


@pytest.mark.parametrize("override, message", [
    ("adapter.options={uniform: {experts: 2, top_k: 3}}", "uniform: top_k=3 is larger than the number of experts (2)"),
    ("adapter.budget=100", "budget 100 is below the minimum of 928 parameters for uniform (one expert of rank 1 on "
                           "each of the 14 target modules)"),
    ("adapter.method=lora", None),  # control: the same config otherwise allocates
])
def test_impossible_allocations(tmp_path, tiny_lm, capsys, override, message):
    code = main(["allocate", str(lm_config(tmp_path, tiny_lm)), override])
    if message is None:
        assert code == 0
    else:
        assert code == 1 and message in one_line_error(capsys)


def test_plan_for_another_model(tmp_path, tiny_lm, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"modules": {"model.layers.7.mlp.down_proj": {"ranks": [2, 2], "top_k": 1}}}))
    assert main(["train", str(lm_config(tmp_path, tiny_lm)), f"adapter.plan={plan}"]) == 1
    err = one_line_error(capsys)
    assert f"{plan}: the plan does not fit {tiny_lm}: plan module 'model.layers.7.mlp.down_proj' does not exist" in err


def other_lm(folder: Path, **config) -> Path:
    torch.manual_seed(0)
    base = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=260, max_position_embeddings=512, pad_token_id=0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**base, **config})).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("change, message", [
    ({"num_hidden_layers": 1}, r"adapter_config\.json: adapter does not fit this base model: plan module "
                               r"'model\.layers\.1\.self_attn\.q_proj' does not exist"),
    ({"hidden_size": 48}, r"adapter_model\.safetensors: adapter does not fit this base model: module "
                          r"'model\.layers\.0\.self_attn\.q_proj' was trained on d_in=32, d_out=32 but here has d_in=48"),
])
def test_adapter_into_a_different_base(tmp_path, tiny_lm, capsys, change, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(load_settings(lm_config(tmp_path, tiny_lm)).to_dict()))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm)
    save_adapter(inject(model, AllocationPlan.uniform(model, "all-linear", experts=2, rank=2)), run / "adapter")
    other = other_lm(tmp_path / "other", **change)
    assert main(["evaluate", str(run), f"model.name_or_path={other}"]) == 1
    assert re.search(message, one_line_error(capsys))


def test_non_finite_loss_stops_naming_the_step(tmp_path, tiny_lm, capsys):
    """A learning rate of 1e20 makes step 2's loss infinite: training stops there, checkpoint-1 stays."""
    config = lm_config(tmp_path, tiny_lm, train={"max_steps": 4, "save_steps": 1, "lr": 1e20, "warmup_ratio": 0.0,
                                                 "progress": False})
    assert main(["train", str(config)]) == 1
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "checkpoint-1"
    assert one_line_error(capsys) == (f"moela: error: non-finite loss at step 2: training stopped; last good "
                                      f"checkpoint: {checkpoint} (lower train.lr, or check the data)")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-1"]
    assert load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    assert (run / "FAILED").read_text().startswith("FloatingPointError: non-finite loss at step 2")
    assert not (run / "adapter").exists() and not (run / "FINISHED").exists()


def test_failed_checkpoint_save_keeps_the_last_one_and_resumes(tmp_path, tiny_lm, capsys, monkeypatch):
    injection = importlib.import_module("moela.adapter")
    real, calls = injection.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the adapter of checkpoint-4
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    config = lm_config(tmp_path, tiny_lm, train={"max_steps": 6, "save_steps": 2, "progress": False})
    monkeypatch.setattr(injection, "save_file", failing)
    assert main(["train", str(config)]) == 1
    checkpoints = tmp_path / "run" / "checkpoints"
    assert one_line_error(capsys) == (f"moela: error: {checkpoints / 'checkpoint-4'}: saving the checkpoint failed "
                                      f"(OSError: No space left on device); last good checkpoint: "
                                      f"{checkpoints / 'checkpoint-2'}")
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["checkpoint-2"]
    monkeypatch.setattr(injection, "save_file", real)
    assert main(["train", str(config), "--resume"]) == 0
    assert (tmp_path / "run" / "FINISHED").is_file() and not (tmp_path / "run" / "FAILED").exists()
    assert json.loads((tmp_path / "run" / "train_log.json").read_text())["global_step"] == 6


def test_failed_adapter_save_leaves_the_previous_adapter(tmp_path, tiny_lm, monkeypatch):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm)
    inject(model, AllocationPlan.uniform(model, ["q_proj"], experts=2, rank=2), modules_to_save=["lm_head"])
    save_adapter(model, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.weight.fill_(1.0)

    def failing(*args, **kwargs):  # the head file is written after the adapter files
        raise OSError("No space left on device")

    monkeypatch.setattr(importlib.import_module("moela.adapter"), "save_file", failing)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(model, tmp_path / "adapter")
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left behind
