"""End-to-end runs on tiny models saved to disk: run directory, metrics, resume, evaluation protocols."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file

from moela import AllocationPlan, inject, run_folder
from moela.cli import main
from moela.evaluate import RoutingCounter, classify, extract_answer, is_correct, option_scores, routing_statistics
from moela.data import make_loader, tokenize
from tests.helpers import byte_tokenizer, classification_files, lm_config, save_tiny


def test_run_writes_the_run_directory(tmp_path, tiny_lm, capsys):
    config = lm_config(tmp_path, tiny_lm)
    assert main(["run", str(config)]) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "plan.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "metrics.json", "routing.json", "report.md", "expert_load.png", "FINISHED"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == "generation" and metrics["n"] == 8 and set(metrics["tasks"]) == {"odd"}
    assert 0.0 <= metrics["accuracy"] <= 1.0
    routing = json.loads((run / "routing.json").read_text())
    for module in routing["modules"].values():
        assert sum(module["load"]) == pytest.approx(1.0)
    report = (run / "report.md").read_text()
    assert "| uniform |" in report and "expert_load.png" in report
    logged = json.loads((run / "train_log.json").read_text())["log_history"]
    assert any("balance" in entry for entry in logged)  # the balance loss is logged next to the loss
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["adapter"]["method"] == "uniform" and resolved["train"]["seed"] == 0
    capsys.readouterr()
    # a finished run is never overwritten without --overwrite
    assert main(["run", str(config)]) == 1
    assert "finished run" in capsys.readouterr().err
    assert main(["run", str(config), "--overwrite", "eval.protocol=loglik"]) == 0
    assert json.loads((run / "metrics.json").read_text())["protocol"] == "loglik"


def test_resume_continues_from_the_checkpoint(tmp_path, tiny_lm):
    """An interrupted run resumed from checkpoint-3 ends with the adapter of the uninterrupted run; a resumed
    run really starts from the checkpoint (a corrupted checkpoint changes the result)."""
    common = {"train": {"max_steps": 6, "save_steps": 3, "save_total_limit": 5, "batch_size": 4, "lr": 1e-2,
                        "logging_steps": 1, "progress": False}, "adapter": {"dropout": 0.1, "method": "uniform",
                                                                             "options": {"uniform": {"experts": 2, "rank": 2}}}}
    config = lm_config(tmp_path, tiny_lm, **common)
    assert main(["run", str(config), "--set", "eval.max_new_tokens=1"]) == 0
    run = tmp_path / "run"
    full = load_file(str(run / "adapter" / "adapter_model.safetensors"))

    def interrupted(copy: Path) -> Path:
        shutil.copytree(run, copy)
        for name in ("adapter", "checkpoints/checkpoint-6"):
            shutil.rmtree(copy / name)
        for name in ("FINISHED", "metrics.json"):
            (copy / name).unlink()
        return copy

    resumed = interrupted(tmp_path / "resumed")
    assert main(["run", str(config), f"output_dir={resumed}", "eval.max_new_tokens=1", "--resume"]) == 0
    again = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert full.keys() == again.keys()
    for key in full:
        torch.testing.assert_close(again[key], full[key], rtol=0, atol=1e-6)
    log = json.loads((resumed / "train_log.json").read_text())
    assert log["global_step"] == 6

    corrupted = interrupted(tmp_path / "corrupted")
    weights = corrupted / "checkpoints" / "checkpoint-3" / "adapter" / "adapter_model.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(weights)).items()}, str(weights))
    assert main(["run", str(config), f"output_dir={corrupted}", "eval.max_new_tokens=1", "--resume"]) == 0
    other = load_file(str(corrupted / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.allclose(other[k], full[k]) for k in full)


def test_run_unfinished_needs_resume_or_overwrite(tmp_path, tiny_lm, capsys):
    config = lm_config(tmp_path, tiny_lm)
    (tmp_path / "run").mkdir()
    run_folder.mark_owned(tmp_path / "run", "run")  # a run folder moela created, left unfinished
    (tmp_path / "run" / "plan.json").write_text("{}")
    assert main(["run", str(config)]) == 1
    assert "--resume" in capsys.readouterr().err
    (tmp_path / "run" / "plan.json").unlink()
    (tmp_path / "run" / run_folder.MARKER).unlink()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(["run", str(config), "--overwrite"]) == 1  # --overwrite deletes only moela run folders
    assert "not a moela run folder" in capsys.readouterr().err and (tmp_path / "run" / "notes.txt").is_file()


def test_classifier_head_is_trained_saved_and_reloaded(tmp_path, tiny_bert, capsys):
    train, dev = classification_files(tmp_path)
    run = tmp_path / "run"
    args = ["run", f"model.name_or_path={tiny_bert}", f"data.train={train}", f"data.eval={dev}",
            "adapter.method=lora", "train.epochs=4", "train.lr=5e-3", "train.progress=false", f"output_dir={run}",
            "name=cls"]
    config = tmp_path / "cls.yaml"
    config.write_text("model: {task: sequence_classification}\n")
    assert main(["run", str(config)] + args[1:]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == "classification" and metrics["n"] == 32
    assert metrics["accuracy"] >= 0.9  # the first byte decides; chance is 0.5
    assert (run / "adapter" / "head.safetensors").is_file()
    capsys.readouterr()
    assert main(["evaluate", str(run), "-o", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["accuracy"] == metrics["accuracy"]


def test_multiple_choice_encoder_learns_and_ignores_padded_choices(tmp_path):
    """ScienceQA-style records (question, 2-3 choices, answer letter); the right choice is always 'ok'."""
    base = save_tiny(tmp_path / "bert", "bert-base")
    words = ["no", "bad", "nil", "off", "low"]

    def rows(n, offset):
        out = []
        for i in range(n):
            k = 2 + (i + offset) % 2
            choices = [words[(i + j) % 5] for j in range(k)]
            right = (i * 7 + offset) % k
            choices[right] = "ok"
            out.append({"question": f"pick {i}", "choices": choices, "answer": "ABC"[right]})
        return "\n".join(json.dumps(r) for r in out)
    (tmp_path / "train.jsonl").write_text(rows(96, 0))
    (tmp_path / "test.jsonl").write_text(rows(30, 1))
    config = tmp_path / "mc.yaml"
    config.write_text(f"model: {{name_or_path: {base}, task: multiple_choice}}\n"
                      f"data: {{train: {tmp_path / 'train.jsonl'}, eval: {tmp_path / 'test.jsonl'}, "
                      "text_column: question, label_column: answer}\n"
                      "adapter: {method: uniform, options: {uniform: {experts: 2, rank: 2}}}\n"
                      "train: {epochs: 6, batch_size: 8, lr: 1.0e-2, progress: false}\n")
    run = tmp_path / "run"
    assert main(["run", str(config), f"output_dir={run}"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == "multiple_choice" and metrics["n"] == 30
    assert metrics["accuracy"] >= 0.75  # chance is 0.42 (2 or 3 choices)
    predictions = json.loads((run / "predictions.json").read_text())
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert all(p["prediction"] < len(t["choices"]) for p, t in zip(predictions, test))
    routing = json.loads((run / "routing.json").read_text())
    assert all(sum(m["load"]) == pytest.approx(1.0) for m in routing["modules"].values())


def test_classify_batches_by_length_and_counts_routing_on_the_way():
    """Length-sorted batches give each feature its own prediction; the routing counted during classification
    equals a separate routing pass over the same features."""
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=260,
        max_position_embeddings=64, num_labels=3, pad_token_id=0)).eval()
    inject(model, AllocationPlan.uniform(model, ["query", "value", "dense"], experts=3, rank=2, top_k=2))
    for layer in model.modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B.weight)
    lengths = [9, 3, 17, 5, 12, 3, 20, 7, 1, 14]
    features = [{"input_ids": torch.randint(1, 260, (n,)).tolist(), "attention_mask": [1] * n, "labels": 0}
                for n in lengths]
    one_by_one = [classify(model, [f], pad_token_id=0, batch_size=1)[0] for f in features]
    counter = RoutingCounter(model)
    assert classify(model, features, pad_token_id=0, batch_size=4, routing=counter) == one_by_one
    assert len(set(one_by_one)) > 1
    counted = counter.result()
    separate = routing_statistics(model, make_loader(features, 0, batch_size=3, keep_task=False))
    assert counted["tokens"] == separate["tokens"] == sum(lengths)
    assert counted["active_params_per_token"] == pytest.approx(separate["active_params_per_token"])
    for name, module in separate["modules"].items():
        assert counted["modules"][name]["load"] == pytest.approx(module["load"])


# --- evaluation pieces --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, options, numeric, expected", [
    ("the correct answer is true", ["true", "false"], False, "true"),
    ("False. the correct answer is true", ["true", "false"], False, "false"),  # first match, as LLM-Adapters
    ("the correct answer is answer3 not answer1", ["answer1", "answer2", "answer3"], False, "answer3"),
    ("Answer: The answer is B.", ["A", "B", "C"], False, "B"),
    ("A dog is a mammal. The answer is B.", ["A", "B"], False, "B"),
    ("option2 fits", ["option1", "option2"], False, "option2"),
    ("the correct answer is true8cred!", ["true", "false"], False, "true"),  # no word boundary, as LLM-Adapters
    ("Bobcats abound.", ["A", "B"], False, None),  # a letter inside a word is no answer
    ("nothing here", ["true", "false"], False, None),
    ("He has 1,250 apples, so 12.5 each. The answer is 12.5", None, True, "12.5"),
])
def test_extract_answer(text, options, numeric, expected):
    assert extract_answer(text, options, numeric) == expected


def test_numeric_answers_match_within_tolerance():
    assert is_correct("5", "5.0") and is_correct("5.0004", "5.0") and not is_correct("5.1", "5.0")
    assert not is_correct(None, "true") and is_correct("True", "true")


def test_option_scores_equal_a_manual_log_likelihood(tiny_lm):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tok = byte_tokenizer()
    prompt, conts = "is it odd? ", ["the answer is true", "no"]
    scores = option_scores(model, tok, prompt, conts)
    normalised = option_scores(model, tok, prompt, conts, length_normalize=True)
    for cont, score, norm in zip(conts, scores, normalised):
        ids = tok(prompt + cont)["input_ids"]
        start = len(tok(prompt)["input_ids"])
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        manual = sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids)))
        assert score == pytest.approx(manual, abs=1e-4)
        assert norm == pytest.approx(manual / len(cont.encode()), abs=1e-5)


def test_routing_statistics_known_answers(tiny_lm):
    tok = byte_tokenizer()
    features = tokenize([{"instruction": "hello there", "input": "", "output": "yes", "answer": "yes",
                          "task": "t"}] * 3, tok, "instruction", template="plain")
    loader = make_loader(features, tok.pad_token_id, batch_size=2)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm)
    plan = AllocationPlan.uniform(model, ["q_proj", "down_proj"], experts=3, rank=2, top_k=2)
    inject(model, plan)
    stats = routing_statistics(model, loader)
    assert stats["tokens"] == sum(len(f["input_ids"]) for f in features)
    for name, module in stats["modules"].items():
        layer = model.get_submodule(name)
        assert sum(module["load"]) == pytest.approx(1.0)
        # every token uses exactly two experts of rank 2
        assert module["active_params_per_token"] == pytest.approx(2 * 2 * (layer.d_in + layer.d_out))
    lora = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm)
    inject(lora, AllocationPlan.uniform(lora, ["q_proj"], experts=1, rank=4))
    stats = routing_statistics(lora, loader)
    assert stats["active_params_per_token"] == pytest.approx(2 * 4 * (32 + 32)) == stats["adapter_params"]


def test_lm_eval_protocol_needs_its_extra():
    import importlib.util

    from moela.evaluate import lm_eval_harness

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed; this checks the message shown without it")
    with pytest.raises(ValueError, match=r"pip install 'moela\[eval\]'"):
        lm_eval_harness(torch.nn.Linear(1, 1), None, ["boolq"])


def test_a_comparisons_runs_equal_the_same_runs_alone(tmp_path, tiny_lm):
    """A comparison reads its data once and gives it to the runs of its first seed: each of its adapters equals
    the one that run trains alone (its data read by itself)."""
    config = lm_config(tmp_path, tiny_lm, train={"max_steps": 2, "progress": False}, adapter={"dropout": 0.0})
    budget = "adapter.budget=uniform:E=2,r=2"
    assert main(["compare", str(config), "--methods", "lora,uniform", budget, f"output_dir={tmp_path / 'cmp'}"]) == 0
    for method in ("lora", "uniform"):
        assert main(["train", str(config), f"adapter.method={method}", budget, f"output_dir={tmp_path / method}"]) == 0
        alone, compared = (load_file(str(folder / "adapter" / "adapter_model.safetensors"))
                           for folder in (tmp_path / method, tmp_path / "cmp" / method))
        assert alone.keys() == compared.keys() and all(torch.equal(alone[k], compared[k]) for k in alone), method
